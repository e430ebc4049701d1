"""The HTML pages: their security headers and self-contained assets (plain
HTTP), and what a scientist sees in a real headless Chromium: a fit
submitted through the form, its progress arriving without a reload, the
result with its plots, the cancel button, the filtered job list."""

import html.parser
import os
import shutil
import urllib.error
import urllib.request

import pytest

from reflservd.client import Client
from reflservd.pages import CSP
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
    """The cancel button (after the confirm) cancels the job and the page says CANCEL."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1], name="to cancel")
    browser.get(server.url + "/jobs/%d" % job.id)
    from selenium.webdriver.common.by import By
    browser.find_element(By.ID, "cancel").click()
    waitFor(browser, lambda d: d.switch_to.alert, "no confirmation was asked")
    browser.switch_to.alert.accept()
    waitFor(browser, lambda d: text(d, "#status") == "CANCEL", "the page did not show CANCEL")
    assert Client(server.url).job(job.id).status == "CANCEL"
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
