"""Provenance, reruns, the result cache and ``reflq view`` end to end: real
``twistd reflservd`` and ``twistd reflworkerd`` processes on loopback and a
real seeded LM fit of the nickel film, shared by every check."""

import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from reflservd import names
from test.conftest import ROOT, childEnvironment, freePort, nifilmFiles
from test.test_cli import reflq
from test.test_worker_e2e import ended, nifilmRequest

SEEDED_LM = {"fit": "lm", "steps": 200, "seed": 5}


def sha256File(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def answers(url, process, log, timeout):
    """The body of ``url`` once it answers 200, while ``process`` serves it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8")
        except OSError:
            assert process.poll() is None, "the viewer ended: %s" % (log.read_text(errors="replace"),)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_seeded_fit_has_true_provenance_reruns_bit_identical_and_is_answered_from_the_cache(
        serverProcess, workerProcess, tmp_path):
    """One seeded LM fit of the nickel film:
    - its result's provenance names the versions this venv has, the sha256 of
      the model and of each data file (recomputed here), the seed, the options
      after bumps' defaults, the queue, host, backend, limits, times and attempts,
      and ``reflq show --provenance`` prints them;
    - ``reflq rerun`` runs it again (not from the cache) and finds it bit-identical;
    - with the worker stopped, the same submit is COMPLETE at once from the cache:
      ``cachedFrom`` the newest of the two, no attempt, its result files the same inodes;
      ``reflq submit --no-cache`` waits for a worker and runs;
    - ``reflq view --no-browser`` serves the rerun's session in refl1d's webview on
      localhost, while another's job is refused without ``--trust``."""
    server = serverProcess()
    worker = workerProcess(server)
    files = nifilmFiles()
    first = server.api.submit(nifilmRequest(SEEDED_LM), files)
    record = server.api.waitFor(first["id"], ended, timeout=180, what="its end")
    assert record["status"] == "COMPLETE", record
    provenance = record["result"]["provenance"]
    assert provenance["inputs"] == {name: sha256File(path) for name, path in files.items()}
    import bumps, numpy, refl1d, scipy
    assert provenance["versions"] == {
        "refl1d": refl1d.__version__, "bumps": bumps.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "python": platform.python_version(),
        "implementation": sys.implementation.name, "machine": platform.machine(),
        "reflservd": names.VERSION}
    assert provenance["seed"] == 5 == record["result"]["seed"]
    assert provenance["options"] == {"fit": "lm", "steps": 200, "ftol": 1e-10, "xtol": 1e-10,
                                     "starts": 1, "jump": 0, "seed": 5, "parallel": 1}
    assert provenance["service"] == "refl1d" and provenance["model"] == "nifilm.py"
    assert provenance["queue"] == "test" and provenance["host"] == socket.gethostname()
    assert provenance["worker"].startswith(socket.gethostname())
    assert provenance["backend"] == "local" and provenance["sandbox"] == "none"
    assert provenance["limits"]["wall"] > 0 and provenance["confinement"] == record["confinement"]
    assert provenance["attempts"] == 1 == record["attempts"]
    assert provenance["submitted"] == record["submitted"] and provenance["started"] == record["started"]
    assert record["started"] <= provenance["finished"] == record["finished"]
    code, out, _ = reflq(server, "show", str(first["id"]), "--provenance")
    assert code == 0 and provenance["inputs"]["nifilm.py"] in out and "refl1d 1." in out, out

    code, out, err = reflq(server, "rerun", str(first["id"]))
    assert code == 0 and "is bit-identical to job %d" % (first["id"],) in out, out + err
    rerunId = first["id"] + 1
    assert server.api.job(rerunId)["attempts"] == 1, "the rerun ran, not answered from the cache"

    worker.stop()
    cached = server.api.submit(nifilmRequest(SEEDED_LM), files)
    assert cached["status"] == "COMPLETE" and cached["cachedFrom"] == rerunId, "the newest of the two"
    assert cached["attempts"] == 0 and cached["lease"] == 0
    assert cached["result"] == server.api.job(rerunId)["result"]
    results = os.path.join(server.stateDir, "jobs", "%d", "results")
    for name in server.api.files(rerunId, kind="result"):
        assert (os.stat(os.path.join(results % (cached["id"],), name)).st_ino
                == os.stat(os.path.join(results % (rerunId,), name)).st_ino)
    with urllib.request.urlopen(server.url + "/jobs/%d" % (cached["id"],), timeout=30) as response:
        page = response.read().decode("utf-8")
    assert 'id="cached-from"' in page and provenance["inputs"]["nifilm.py"] in page
    code, out, _ = reflq(server, "submit", files["nifilm.py"], *[p for n, p in files.items() if n != "nifilm.py"],
                         "--fit", "lm", "--steps", "200", "--seed", "5", "--no-cache", "--json")
    assert code == 0, out
    uncached = server.api.job(cached["id"] + 1)
    assert uncached["status"] == "PENDING" and uncached["cachedFrom"] is None
    worker.start()
    again = server.api.waitFor(uncached["id"], ended, timeout=180, what="its end")
    assert again["status"] == "COMPLETE" and again["attempts"] == 1
    assert again["result"]["parameters"] == record["result"]["parameters"]

    code, _, err = reflq(server, "view", str(first["id"]), "--no-browser")
    assert code == 2 and "--trust" in err, err
    port = freePort()
    env = dict(childEnvironment(), REFLQ_SERVER=server.url)
    with open(tmp_path / "view.log", "wb") as log:
        viewer = subprocess.Popen([sys.executable, "-m", "reflservd.cli", "view", str(rerunId), "--no-browser",
                                   "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        labels = answers("http://localhost:%d/get_parameter_labels" % (port,), viewer, tmp_path / "view.log",
                         timeout=120)
        assert "Ni thickness" in labels, labels
    finally:
        os.killpg(viewer.pid, signal.SIGTERM)
        viewer.wait(30)
