"""A fit series end to end: real ``twistd reflservd`` and ``reflworkerd``
processes on loopback, the four nickel data files fitted one by one with
one model that loads ``sys.argv[1]``, submitted with the Python client,
read back as a table (client, ``reflq series``, CSV) and shown on the
series page in headless Chromium."""

import io
import math
import os

from reflservd.cli import main as reflq
from reflservd.client import Client
from test.conftest import HERE, NIFILM_DATA, exampleData
from test.test_pages import browser, consoleErrors, screenshot  # noqa: F401 (the fixture)

MODEL = os.path.join(HERE, "models", "nifilm_one.py")
PARAMETERS = {"Ni thickness", "Ni interface", "Si interface"}


def test_a_series_of_the_four_nickel_files_each_fitted_alone(serverProcess, workerProcess, browser,
                                                              tmp_path):
    """One member per data file, each fitted by LM on its own file (its model
    printed the name it was given, and only its own file was in its job);
    every member ends COMPLETE with χ² and each parameter's value and
    uncertainty in the table, which ``reflq series`` and the CSV give too.
    The series page, opened while every member waits for a worker, shows
    them pending and then, as they finish, without a reload, their results
    and a plot per parameter with a point per member."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serverProcess()
    data = [os.path.join(exampleData(), name) for name in NIFILM_DATA]
    client = Client(server.url)
    series = client.submitSeries(MODEL, data, fit="lm", steps=200)
    assert [m["data"] for m in series.record["members"]] == NIFILM_DATA
    browser.get("%s/series/%d" % (server.url, series.id))

    def waitUntil(condition, message, bound):
        """Bounded, reading again what the page's own refresh replaced meanwhile."""
        return WebDriverWait(browser, bound, poll_frequency=0.2, ignored_exceptions=(
            StaleElementReferenceException, NoSuchElementException)).until(condition, message)

    waitUntil(lambda d: d.find_element(By.ID, "counts").text == "4 members · 4 pending",
              "the page to show the four members pending", 30)
    assert browser.find_element(By.ID, "plots").get_attribute("data-drawn") is None

    workerProcess(server, slots=2)
    counts = series.wait(timeout=300)
    assert counts == {"COMPLETE": 4}

    for job, name in zip(series.members, NIFILM_DATA):
        assert job.status == "COMPLETE"
        assert job.record["series"] == series.id
        assert sorted(f["name"] for f in job.files(kind="upload")) == sorted(["nifilm_one.py", name])
        assert "model data: %s\n" % (name,) in job.read("stdout.txt").decode()

    table = series.table()
    assert set(table["parameters"]) == PARAMETERS
    assert [(r["member"], r["data"], r["status"]) for r in table["rows"]] == [
        (k, name, "COMPLETE") for k, name in enumerate(NIFILM_DATA, 1)]
    for row in table["rows"]:
        assert 0 < row["chisq"] < 10 and row["chisq"] == client.job(row["id"]).result["chisq"]
        assert set(row["parameters"]) == PARAMETERS
        for fit in row["parameters"].values():
            assert math.isfinite(fit["value"]) and fit["uncertainty"] > 0
        assert abs(row["parameters"]["Ni thickness"]["value"] - 100) < 10
    assert len({row["chisq"] for row in table["rows"]}) == 4     # four data sets, four fits

    lines = series.tableCSV().splitlines()
    assert lines[0].startswith("member,job,data,status,chisq,") and len(lines) == 5
    out = io.StringIO()
    assert reflq(["series", str(series.id), "--server", server.url], stdout=out, stderr=io.StringIO()) == 0
    printed = out.getvalue().splitlines()
    assert printed[0].split()[:5] == ["MEMBER", "JOB", "DATA", "STATUS", "χ²"]
    assert [line.split()[2:4] for line in printed[1:]] == [[name, "COMPLETE"] for name in NIFILM_DATA]

    waitUntil(lambda d: d.find_element(By.ID, "counts").text == "4 members · 4 complete"
              and d.find_element(By.ID, "plots").get_attribute("data-drawn") == "3"
              and {c.get_attribute("data-points") for c in d.find_elements(By.CSS_SELECTOR, "#plots canvas")}
              == {"4"}, "the page to show every member complete and a plot of each parameter with four points",
              60)
    rows = browser.find_elements(By.CSS_SELECTOR, "#members tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[2].text for row in rows] == NIFILM_DATA
    assert {row.find_element(By.CSS_SELECTOR, ".badge").text for row in rows} == {"COMPLETE"}
    canvases = browser.find_elements(By.CSS_SELECTOR, "#plots canvas.param")
    assert {c.get_attribute("data-parameter") for c in canvases} == PARAMETERS
    assert {c.get_attribute("data-points") for c in canvases} == {"4"}
    blank = browser.execute_script(
        "var c = document.createElement('canvas'); var s = arguments[0];"
        "c.width = s.width; c.height = s.height; return c.toDataURL();", canvases[0])
    assert all(c.get_attribute("data-points") and browser.execute_script(
        "return arguments[0].toDataURL();", c) != blank for c in canvases)
    screenshot(browser, tmp_path, "series.png")
    assert consoleErrors(browser) == []
    browser.get("%s/jobs/%d" % (server.url, table["rows"][1]["id"]))
    link = browser.find_element(By.CSS_SELECTOR, 'a[href="/series/%d"]' % (series.id,))
    assert link.text == "series %d" % (series.id,)
