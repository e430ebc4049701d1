"""The HTML pages: their security headers and self-contained assets (plain
HTTP), and what a scientist sees in a real headless Chromium: a fit
submitted through the form, its progress arriving without a reload, the
result with its plots, the cancel button, the filtered job list."""

import hashlib
import html.parser
import os
import re
import shutil
import urllib.error
import urllib.request

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python import failure
from twisted.web.error import FlattenerError
from twisted.web.template import Element, XMLString, renderer
from twisted.web.test.requesthelper import DummyRequest

from reflservd.client import Client
from reflservd.format import displayText
from reflservd.elements import ErrorBody, Page
from reflservd.pages import CSP, JobPages
from reflservd.server import QueueServer
from test.conftest import ServerProcess
from test.support import RESULT, progressAt, resultFiles, writeModel

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRED_CSP = ("default-src 'self'", "img-src 'self' data:", "object-src 'none'", "frame-ancestors 'none'")
WAIT = 30


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Markup(html.parser.HTMLParser):
    """What a page asks the browser to load and run."""

    def __init__(self):
        html.parser.HTMLParser.__init__(self)
        self.urls, self.inlineScripts, self.styles, self.handlers = [], 0, 0, []
        self._inScript = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "action"):
            if attrs.get(name) is not None:
                self.urls.append(attrs[name])
        if tag == "script" and "src" not in attrs:
            self._inScript = True
        if tag == "style" or "style" in attrs:
            self.styles += 1
        self.handlers += [name for name in attrs if name.startswith("on")]

    def handle_endtag(self, tag):
        self._inScript = False

    def handle_data(self, data):
        if self._inScript and data.strip():
            self.inlineScripts += 1


def someJobs(server, worker, model):
    """A COMPLETE job (with plots and logs) and a PENDING one."""
    worker.drain()
    client = Client(server.url)
    done = client.submit(model[0], data=model[1], fit="lm", steps=3, name="done <b>fit</b>")
    worker.runFit(worker.lease())
    waiting = client.submit(model[0], data=model[1], name="waiting")
    return done, waiting


def test_everyPageHasTheStrictCSPAndLoadsOnlyFromThisServer(server, worker, model):
    """/, /submit, a job page and an unknown job's page carry the CSP and
    the other hardening headers; every script, style sheet, image and link
    is a path on this server; no inline script, style or handler; a job's
    name is escaped."""
    done, waiting = someJobs(server, worker, model)
    for path, expected in (("/", 200), ("/submit", 200), ("/jobs/%d" % done.id, 200),
                           ("/jobs/%d" % waiting.id, 200), ("/jobs/999999", 404), ("/?status=complete&page=2", 200)):
        status, headers, body = get(server.url + path)
        assert status == expected, path
        csp = headers["Content-Security-Policy"]
        assert csp == CSP
        assert all(directive in csp.split("; ") for directive in REQUIRED_CSP)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        markup = Markup()
        markup.feed(body.decode("utf-8"))
        assert markup.inlineScripts == 0 and markup.styles == 0 and markup.handlers == [], path
        assert markup.urls and all(url.startswith("/") and not url.startswith("//") for url in markup.urls), path
    body = get(server.url + "/jobs/%d" % done.id)[2].decode()
    assert "done &lt;b&gt;fit&lt;/b&gt;" in body and "<b>fit</b>" not in body
    assert "<b>243896112</b>" in body  # a seed shown with all its digits, to repeat the fit


def test_aJobPageShowsHowItsResultWasMade(server, worker, model):
    """A completed fit's page shows its provenance: among it the sha256 of its
    model as the server stored it."""
    done, _ = someJobs(server, worker, model)
    body = get(server.url + "/jobs/%d" % done.id)[2].decode()
    with open(model[0], "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert 'id="provenance"' in body and digest in body


def test_staticFilesHaveFixedTypes(server):
    """/static/ serves our scripts, style sheet and icon with fixed types,
    and nothing outside its folder."""
    expected = {"job.js": "text/javascript; charset=utf-8", "chart.js": "text/javascript; charset=utf-8",
                "reflservd.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
    for name, contentType in expected.items():
        status, headers, body = get(server.url + "/static/" + name)
        assert status == 200 and headers["Content-Type"] == contentType and body
        assert headers["X-Content-Type-Options"] == "nosniff"
    for name in ("..%2Fpages.py", "nothing.js", "..%2F__init__.py"):
        assert get(server.url + "/static/" + name)[0] == 404


def test_theLegacyRoutesBesideThePagesStillAnswerJSON(server, worker, model):
    """/jobs/<id> is the page; /jobs/<id>.json and /jobs/<id>/status.json stay the legacy JSON."""
    done, _ = someJobs(server, worker, model)
    status, headers, _ = get(server.url + "/jobs/%d.json" % done.id)
    assert status == 200 and headers["Content-Type"] == "application/json"
    status, headers, body = get(server.url + "/jobs/%d/status.json" % done.id)
    assert status == 200 and b"COMPLETE" in body


def test_aFormFromAnotherSiteIsRefused(server, model):
    """A POST /submit whose Origin is another site is refused (403) and submits nothing."""
    before = len(Client(server.url).jobs())
    boundary = "xyz"
    with open(model[0], "rb") as f:
        content = f.read()
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.py\"\r\n\r\n" + content
            + b"\r\n--xyz--\r\n")
    request = urllib.request.Request(server.url + "/submit", data=body, method="POST", headers={
        "Content-Type": "multipart/form-data; boundary=" + boundary, "Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 403
    assert len(Client(server.url).jobs()) == before


# ---- in a real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (%s, %s) for the browser tests"
                    % (CHROMIUM, CHROMEDRIVER))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400",
                 "--user-data-dir=%s" % (tmp_path_factory.mktemp("chromium"),)):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def waitFor(driver, condition, message):
    """Wait, bounded, for ``condition``; elements replaced by the page's own
    refresh while being read are read again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
                         ).until(condition, message)


def text(driver, css):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, css).text


def screenshot(driver, tmp_path, name):
    """Save a screenshot (also to $REFLSERVD_SCREENSHOTS when set, to look at)."""
    path = str(tmp_path / name)
    driver.save_screenshot(path)
    folder = os.environ.get("REFLSERVD_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copy(path, os.path.join(folder, name))
    return path


def consoleErrors(driver):
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_submitThroughTheFormAndWatchTheFitLive(browser, server, worker, tmp_path):
    """Submit through the form; the job page shows the fake worker's start,
    each progress report (step, χ², chart, best parameters) without
    reloading, then COMPLETE with the parameter table and both plots loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    worker.drain()
    modelPath, dataPaths = writeModel(str(tmp_path / "fit"))
    browser.get(server.url + "/submit")
    browser.find_element(By.NAME, "model").send_keys(modelPath)
    browser.find_element(By.NAME, "data").send_keys("\n".join(dataPaths))
    browser.find_element(By.NAME, "name").send_keys("browser fit")
    Select(browser.find_element(By.ID, "fit")).select_by_value("lm")
    assert not browser.find_element(By.NAME, "steps").get_attribute("disabled")
    assert browser.find_element(By.NAME, "samples").get_attribute("disabled")
    browser.find_element(By.NAME, "steps").send_keys("3")
    browser.find_element(By.NAME, "seed").send_keys("11")
    screenshot(browser, tmp_path, "submit.png")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    waitFor(browser, lambda d: "/jobs/" in d.current_url, "the form did not lead to the job's page")
    jobId = int(browser.current_url.rsplit("/", 1)[1])
    assert text(browser, "#status") == "PENDING"
    record = Client(server.url).job(jobId).record
    assert record["request"]["data"] == {"model": "nifilm.py", "options": {"fit": "lm", "steps": 3, "seed": 11}}
    assert record["name"] == "browser fit"

    browser.execute_script("window.sameDocument = true;")
    lease = worker.lease()
    assert lease["id"] == jobId
    waitFor(browser, lambda d: text(d, "#status") == "ACTIVE", "the page did not show ACTIVE")
    for step in (1, 2, 3):
        worker.heartbeat(lease, progressAt(step))
        waitFor(browser, lambda d: text(d, "#step") == str(step), "step %d did not show" % step)
    assert text(browser, "#chisq") == "3.33333"
    assert "Ni thickness 93" in text(browser, "#best")
    inked = browser.execute_script(
        "var c = document.getElementById('chart'); var d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; var n = 0;"
        "for (var i = 0; i < d.length; i += 4) { if (d[i + 2] > 150 && d[i] < 80) n++; } return n;")
    assert inked > 50, "the χ² line was not drawn"
    screenshot(browser, tmp_path, "progress.png")

    files = resultFiles()
    for name, data in files.items():
        worker.putFile(lease, name, data)
    worker.complete(lease, result=RESULT)
    waitFor(browser, lambda d: text(d, "#status") == "COMPLETE", "the page did not show COMPLETE")
    assert browser.execute_script("return window.sameDocument === true;"), "the page was reloaded"
    assert "Ni thickness 100.12 ± 0.31" in text(browser, "#parameters")
    images = browser.find_elements(By.CSS_SELECTOR, ".plots img")
    assert len(images) == 2
    waitFor(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                   for i in images), "the plots did not load")
    assert [i.get_attribute("naturalWidth") for i in images] == ["120", "90"]
    links = {a.text for a in browser.find_elements(By.CSS_SELECTOR, "table.files a")}
    assert set(files) <= links
    assert "line 299 of the fit" in text(browser, "section.logs")
    assert browser.find_elements(By.ID, "cancel") == []
    screenshot(browser, tmp_path, "complete.png")
    assert consoleErrors(browser) == []


def test_theCancelButtonCancelsAPendingJob(browser, server, worker, model):
    """The browser that submitted a job through the form holds its key: its
    cancel button (after the confirm) cancels the job and the page says
    CANCEL. Another visitor's page of the same job shows no cancel button."""
    worker.drain()
    from selenium.webdriver.common.by import By
    browser.get(server.url + "/submit")
    browser.find_element(By.NAME, "model").send_keys(model[0])
    browser.find_element(By.NAME, "data").send_keys("\n".join(model[1]))
    browser.find_element(By.NAME, "name").send_keys("to cancel")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    waitFor(browser, lambda d: "/jobs/" in d.current_url, "the form did not lead to the job's page")
    jobId = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
    with urllib.request.urlopen(server.url + "/jobs/%d" % (jobId,), timeout=30) as response:
        assert b'id="cancel"' not in response.read()
    browser.find_element(By.ID, "cancel").click()
    waitFor(browser, lambda d: d.switch_to.alert, "no confirmation was asked")
    browser.switch_to.alert.accept()
    waitFor(browser, lambda d: text(d, "#status") == "CANCEL", "the page did not show CANCEL")
    assert Client(server.url).job(jobId).status == "CANCEL"
    assert browser.find_elements(By.ID, "cancel") == []


def test_theJobListFiltersByStatus(browser, server, worker, model, tmp_path):
    """The list shows jobs newest first; choosing a status shows only those."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    done, waiting = someJobs(server, worker, model)
    browser.get(server.url + "/")
    ids = [int(a.text) for a in browser.find_elements(By.CSS_SELECTOR, "table.jobs td.num a")]
    assert ids[:2] == [waiting.id, done.id]
    Select(browser.find_element(By.NAME, "status")).select_by_value("COMPLETE")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    waitFor(browser, lambda d: "status=COMPLETE" in d.current_url, "the filter was not applied")
    statuses = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "table.jobs .badge")}
    assert statuses == {"COMPLETE"}
    assert done.id in [int(a.text) for a in browser.find_elements(By.CSS_SELECTOR, "table.jobs td.num a")]
    screenshot(browser, tmp_path, "jobs.png")
    assert consoleErrors(browser) == []


# ---- pages that never break


NAN = float("nan")
HONEST = {"chisq": NAN, "fitter": {"name": "lm"}, "steps": 10 ** 30, "seed": True,
          "parameters": {"thickness": {"value": 1.5, "uncertainty": 5e-5},
                         "big": {"value": 10 ** 30, "uncertainty": 3},
                         "odd": {"value": "n/a", "uncertainty": "wide"},
                         "lost": {"value": NAN, "uncertainty": 1.0},
                         "listed": [1, 2]}}
"""A result that is honest JSON but of every awkward shape."""
ODD_PROGRESS = {"step": "three", "chisq": {"best": 1}, "elapsed": "a while", "parameters": {"thick": [1, 2]}}


def legacySubmit(server, name, data, notify=""):
    """``POST /jobs.json``, the legacy route, which takes any JSON as ``data``: ``(status, answer)``."""
    return server.api.call("POST", "/jobs.json", body={"name": name, "notify": notify, "service": "refl1d",
                                                       "data": data})


def listedIds(body):
    return [int(n) for n in re.findall(rb'<td class="num"><a href="/jobs/(\d+)">', body)]


def assertPage(path, server, status=200):
    """The page's status and hardening headers; its body."""
    code, headers, body = get(server.url + path)
    assert code == status, (path, code, body[-2000:])
    assert headers["Content-Security-Policy"] == CSP and "frame-ancestors 'none'" in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"An error occurred" not in body
    markup = Markup()
    markup.feed(body.decode("utf-8"))
    assert markup.inlineScripts == 0 and markup.styles == 0 and markup.handlers == [], path
    return body.decode("utf-8")


def test_jobsOfEveryShapeAreListedAndShown(browser, server, worker, model, tmp_path):
    """Jobs submitted and reported through the real API with values of every
    JSON type (an object as data.model, data that is a number or a string,
    progress whose elapsed is a string, the result 1.5 ± 5e-5 beside NaN and
    huge integers, results that are a list or a number, a name with a lone
    surrogate where the server still takes one): ``/`` answers 200 listing
    every job with the strict headers, each job's page answers 200 with its
    values written out, and in Chromium the live page shows the odd progress
    (NaN and Infinity too, which JSON.parse refuses) and then the result,
    with no script error."""
    from selenium.webdriver.common.by import By

    worker.drain()
    plain = Client(server.url).submit(model[0], data=model[1], name="a plain fit")
    status, answer = legacySubmit(server, "object model", {"model": {"layers": [1, 2]},
                                                           "options": {"steps": "many", "fit": ["lm"]}})
    assert status == 200, answer
    honest = answer["id"]
    others = {}
    for name, data, result in (("count", 7, [1, 2, "three"]), ("words", "a string", 42),
                               ("listed", [1, {"a": None}], "only text")):
        status, answer = legacySubmit(server, name, data)
        assert status == 200, answer
        others[answer["id"]] = result
    status, answer = legacySubmit(server, "fit \ud800 one", {"model": "m\udfff.py"}, notify="\ud800@example.org")
    surrogate = answer["id"] if status == 200 else None
    if surrogate is None:
        assert status == 400 and "error" in answer

    ends = {plain.id: ("ERROR", None, "Traceback\nValueError: bad <b>data</b>")}
    ends.update((jobId, ("COMPLETE", result, None)) for jobId, result in others.items())
    if surrogate is not None:
        ends[surrogate] = ("ERROR", None, "bad")

    def endUntil(jobId):
        """Lease and end the jobs ahead of ``jobId`` (fair share decides the
        order), then return its lease; with None, end them all."""
        while jobId is not None or ends:
            lease = worker.lease()
            if lease["id"] == jobId:
                return lease
            status, result, error = ends.pop(lease["id"])
            worker.complete(lease, status, result=result, error=error)

    lease = endUntil(honest)
    with pytest.raises(urllib.error.HTTPError) as refused:     # progress is typed at the door
        worker.heartbeat(lease, ODD_PROGRESS, confinement="none")
    assert refused.value.code == 400
    browser.get(server.url + "/jobs/%d" % (honest,))
    assert '{"layers":[1,2]}' in text(browser, "dl")
    worker.heartbeat(lease, {"step": 2, "chisq": NAN, "elapsed": 1e300, "parameters": {"thick": NAN}})
    waitFor(browser, lambda d: text(d, "#step") == "2", "progress holding NaN stopped the live page")
    assert text(browser, "#chisq") == "–" and text(browser, "#live") == "live"
    worker.complete(lease, result=HONEST)
    waitFor(browser, lambda d: text(d, "#status") == "COMPLETE", "the page did not show COMPLETE")
    shown = text(browser, "#parameters")
    assert "thickness 1.500000 ± 0.000050" in shown
    assert "big %d ± 3.0e+0" % (10 ** 30,) in shown and "odd n/a" in shown and "lost nan" in shown
    assert "listed [1,2]" in shown
    assert "%d" % (10 ** 30,) in text(browser, "#result-figures")
    screenshot(browser, tmp_path, "odd-result.png")
    assert consoleErrors(browser) == []
    endUntil(None)

    listed = listedIds(assertPage("/", server).encode())
    expected = [plain.id, honest] + list(others) + ([surrogate] if surrogate else [])
    assert set(expected) <= set(listed)
    assert "An error occurred" not in assertPage("/?status=COMPLETE", server)
    page = assertPage("/jobs/%d" % (plain.id,), server)
    assert "ValueError: bad &lt;b&gt;data&lt;/b&gt;" in page
    page = assertPage("/jobs/%d" % (honest,), server)
    assert "1.500000 ± 0.000050" in page
    assert "steps=many" in page and 'fit=["lm"]' in page.replace("&quot;", '"')
    for jobId, result in others.items():
        page = assertPage("/jobs/%d" % (jobId,), server)
        assert displayText(result) in page.replace("&quot;", '"')
    assert "(data: 7)" in assertPage("/jobs/%d" % (list(others)[0],), server)
    if surrogate is not None:
        page = assertPage("/jobs/%d" % (surrogate,), server)
        assert "fit \ufffd one" in page and "m\ufffd.py" in page


def writeOldState(stateDir):
    """A state written before the API checked what it takes: jobs whose name,
    notify, version, request, result and error hold lone surrogates, objects,
    NaN and integers past 64 bits, journaled as the server journals them.
    Their ids."""
    clock = Clock()
    clock.advance(1_700_000_000)
    server = QueueServer(str(stateDir), clock, runInThread=lambda f, *args: defer.maybeDeferred(f, *args))
    server.startService()
    ids = []
    for name, notify, request, status, result, error in (
            ("old \ud800 fit", "\udfff@example.org", {"data": {"model": {"m": "\ud800"}, "options": 5}},
             "COMPLETE", HONEST, None),
            ("count \udc80", "", {"data": 10 ** 30}, "COMPLETE", ["\ud800", NAN, 10 ** 40], None),
            ("failed", "ann@example.org", {"data": None}, "ERROR", None, "bad \ud800\nline \udfff"),
            ("odd request", "", ["not", "an", "object"], "COMPLETE", "\ud800", None)):
        jobId = server.queue.reserveId()
        server.store.writeJob(jobId, request, [])
        done(server.commit(server.queue.makeSubmit(jobId, clock.seconds(), name, notify, "10.0.0.1",
                                                   "refl1d", "1.0\ud800", {}, owner=notify or None),
                           namesFiles=True))     # the owner was the notify then
        job = done(server.lease("q", "old:1"))
        assert job.id == jobId
        clock.advance(5)
        done(server.commit(server.queue.makeComplete(
            jobId, job.lease, clock.seconds(), status, result, error,
            "trace \ud800" if error else None, "none\ud800")))
        ids.append(jobId)
    done(server.stopService())
    return ids


def done(d):
    """The result of a Deferred that has already fired (the disk work ran inline)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], failure.Failure):
        out[0].raiseException()
    return out[0]


def test_valuesAlreadyInAJournalFromBeforeTheChecksStillRender(browser, tmp_path):
    """A real server started on a state journaled before the API refused
    such values (lone surrogates in names and notify, objects, NaN, huge
    integers, a request that is not an object) answers 200 for ``/`` with
    every job listed and for each job's page, with the surrogates shown as
    U+FFFD; Chromium renders the list and a job without script errors."""
    from selenium.webdriver.common.by import By

    directory = tmp_path / "old"
    ids = writeOldState(directory / "state")
    server = ServerProcess(directory).start()
    try:
        body = assertPage("/", server)
        assert set(listedIds(body.encode())) == set(ids)
        assert "old \ufffd fit" in body and "\ufffd@example.org" in body
        pages = {jobId: assertPage("/jobs/%d" % (jobId,), server) for jobId in ids}
        assert "1.500000 ± 0.000050" in pages[ids[0]] and '{"m":"\ufffd"}' in pages[ids[0]].replace("&quot;", '"')
        assert '["\ufffd",NaN,%d]' % (10 ** 40,) in pages[ids[1]].replace("&quot;", '"')
        assert "(data: %d)" % (10 ** 30,) in pages[ids[1]]
        assert "bad \ufffd\nline \ufffd" in pages[ids[2]] and "trace \ufffd" in pages[ids[2]]
        assert "none\ufffd" in pages[ids[3]]
        browser.get(server.url + "/")
        shown = [int(a.text) for a in browser.find_elements(By.CSS_SELECTOR, "table.jobs td.num a")]
        assert sorted(shown) == sorted(ids)
        browser.get(server.url + "/jobs/%d" % (ids[0],))
        waitFor(browser, lambda d: text(d, "#status") == "COMPLETE", "the old job's page did not show")
        assert "thickness 1.500000 ± 0.000050" in text(browser, "#parameters")
        assert consoleErrors(browser) == []
    finally:
        server.stop()


class Unflattenable(Element):
    """A body whose renderer returns what the flattener refuses."""

    loader = XMLString('<p xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" t:render="bad" />')

    @renderer
    def bad(self, request, tag):
        return object()


def test_aPageThatCannotBeFlattenedIsALogged500():
    """A failure while flattening answers 500 with an error page (not 200
    with half a page, as when the page was flattened into the response) and
    logs it with the path; a page that renders answers as usual."""
    pages = JobPages()
    request = DummyRequest([b"jobs", b"7"])
    request.uri = b"/jobs/7"
    with capturedLogs() as events:
        body = done(pages.render(request, Page("Job 7", Unflattenable())))
    assert request.responseCode == 500
    assert body.startswith(b"<!DOCTYPE html>\n") and b"This page could not be shown" in body
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1 and failures[0]["path"] == "/jobs/7"
    assert failures[0]["log_failure"].check(FlattenerError)
    fine = DummyRequest([b""])
    body = done(pages.render(fine, Page("Fine", ErrorBody("heading", "message"))))
    assert fine.responseCode is None and b'<p class="error">message</p>' in body


def test_aJobsFilesAreNeverAPageOfThisSite(server, worker, model):
    """A result or upload file that is HTML or SVG (say, with a script in it)
    is served as an attachment of a fixed, inert type, with ``nosniff`` and
    a sandboxing CSP, also when asked ``inline`` and through the legacy
    route; only a PNG is shown inline, as an image."""
    worker.drain()
    evil = b"<html><script>alert(document.cookie)</script></html>"
    job = Client(server.url).submit(model[0], data=model[1])
    lease = worker.lease()
    for name in ("evil.html", "evil.svg", "plot.png"):
        worker.putFile(lease, name, evil if name != "plot.png" else resultFiles()["nifilm-1-refl.png"])
    worker.complete(lease, result=RESULT)
    for path in ("/api/v1/jobs/%d/files/evil.html", "/api/v1/jobs/%d/files/evil.html?inline=1",
                 "/api/v1/jobs/%d/files/evil.svg?inline=1", "/api/v1/jobs/%d/files/nifilm.py?kind=upload"):
        status, headers, body = get(server.url + path % (job.id,))
        assert status == 200, path
        assert headers["Content-Type"] == "application/octet-stream", path
        assert headers["Content-Disposition"].startswith("attachment; "), path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    status, headers, _ = get(server.url + "/jobs/%d/data/evil.html" % (job.id,))
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    status, headers, _ = get(server.url + "/api/v1/jobs/%d/files/plot.png?inline=1" % (job.id,))
    assert status == 200 and headers["Content-Type"] == "image/png" and "Content-Disposition" not in headers
