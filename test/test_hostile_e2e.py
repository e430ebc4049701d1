"""Hostile models as real jobs: a real server and a real worker confined with
``--sandbox namespaces``, two slots and small limits, fed every script of
``test/hostile/`` as an ordinary refl1d job.

Each script tries one kind of escape and prints what it managed on its
stdout (``HOSTILE-REPORT {...}``), which the worker delivers as the job's
``stdout.txt``. For each job the test checks that every attempt failed inside
the job, that the job ended with a clear message (``ERROR`` naming the limit
where a limit stopped it; else the model ran to its end and, defining no
problem, ended ``ERROR`` saying so), and, on the host, that nothing showed
outside: no file written, no signal received, no connection made, no log
rotated, no process of a slot's uid left. A job that sleeps until the wall
limit holds the first slot, so that its job directory (the "other job" the
file escape goes after) exists while the hostile jobs run in the second;
nickel film LM fits run among and after them and end ``COMPLETE`` with
χ² ≈ 1: the worker kept serving.

Root is needed (namespaces without a user namespace, per-slot uids).
"""

import json
import os
import select
import signal
import socket
import time
import uuid

import pytest

from test.conftest import nifilmFiles
from test.test_sandbox import processesOf
from test.test_worker_e2e import forkServerPid

HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile")
SLOT_UIDS = (60001, 60002)
LIMITS = ["--cpu-limit", "5", "--memory-limit", "1G", "--wall-limit", "20",
          "--process-limit", "64", "--file-size-limit", "8M"]
NO_PROBLEM = "requires 'problem = FitProblem(...)'"
"""The end of the error of a model that ran to its end without defining a problem."""
SLEEPER = (b"open('secret.txt', 'w').write('the sleeping job\\'s secret\\n')\n"
           b"import time\n"
           b"time.sleep(3600)\n")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the namespaces sandbox and per-slot uids need a worker running as root")


def request(name, options=None):
    return {"name": name, "notify": "hostile@example.org", "service": "refl1d",
            "data": {"model": "model.py" if options is None else "nifilm.py",
                     "options": options or {"fit": "lm"}}}


def submitHostile(api, script, config):
    """Submit ``test/hostile/SCRIPT.py`` as the job's model, with its ``hostile.json``."""
    return api.submit(request("hostile " + script),
                      {"model.py": os.path.join(HOSTILE, script + ".py"),
                       "hostile_common.py": os.path.join(HOSTILE, "hostile_common.py"),
                       "hostile.json": json.dumps(config).encode()})


def report(api, jobId):
    """The last ``HOSTILE-REPORT`` the job's model printed (its delivered stdout)."""
    stdout = api.download(jobId, "stdout.txt").decode("utf-8", "replace")
    lines = [line for line in stdout.splitlines() if line.startswith("HOSTILE-REPORT ")]
    assert lines, "job %d printed no report:\n%s" % (jobId, stdout[-2000:])
    return json.loads(lines[-1][len("HOSTILE-REPORT "):])


def succeeded(found):
    """The attempts of a report that got through (each should have failed)."""
    return sorted(name for name, outcome in found["attempts"].items() if outcome["succeeded"])


def waitForPath(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "%s did not appear within %s s" % (path, timeout)
        time.sleep(0.05)


def ended(record):
    return record["finished"] is not None


def test_hostile_jobs_fail_inside_and_the_worker_keeps_serving(serverProcess, workerProcess, tmp_path):
    """Every hostile model's escape fails inside its job; each job ends with a
    clear message; nothing shows on the host; fits beside and after them
    complete normally."""
    token = tmp_path / "token"
    token.write_text("hostile-e2e-token\n")
    server = serverProcess(tokenFile=token)
    worker = workerProcess(server, tokenFile=token, sandbox="namespaces", slots=2, args=LIMITS)
    api = server.api
    jobsDir = os.path.join(worker.workDir, "jobs")
    nonce = uuid.uuid4().hex
    marker = "/tmp/reflhostile-marker-" + nonce
    with open(marker, "w") as f:
        f.write("the host's /tmp\n")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    abstract, unix = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(5)
        udp.bind(("127.0.0.1", 0))
        abstract.bind("\0reflhostile-" + nonce)
        abstract.listen(5)
        unixPath = str(tmp_path / "control.sock")
        unix.bind(unixPath)
        unix.listen(5)

        # The sleeper holds the first slot until the wall limit: its directory is
        # the other job the file escape goes after.
        sleeper = api.submit(request("sleeper"), {"model.py": SLEEPER})
        secret = os.path.join(jobsDir, str(sleeper["id"]), "secret.txt")
        waitForPath(secret)
        configs = {
            "escape_files": {
                "siblingSecret": secret, "workDir": jobsDir,
                "workerFiles": [os.path.join(jobsDir, "%d.json" % sleeper["id"]), worker.logPath],
                "tokenFile": str(token), "hostMarker": marker, "nonce": nonce},
            "escape_signals": {"pids": [os.getpid(), worker.pid, server.pid, forkServerPid(worker)],
                               "signal": "SIGUSR1"},
            "escape_network": {"tcpPorts": [server.port, tcp.getsockname()[1]],
                               "udpPorts": [udp.getsockname()[1]],
                               "abstractSockets": ["reflhostile-" + nonce], "unixSockets": [unixPath],
                               "hosts": [["127.0.0.2", server.port]]},
            "escape_privileges": {},
            "daemon": {},
            "fork_bomb": {"ceiling": 200},
            "memory_hog": {"bytes": 4 * 1024 ** 3},
            "file_size": {"bytes": 64 * 1024 ** 2},
            "cpu_spin": {"seconds": 600},
        }
        assert set(configs) == {name[:-3] for name in os.listdir(HOSTILE)
                                if name.endswith(".py") and name != "hostile_common.py"}
        jobs = {}
        for script in ("escape_files", "escape_signals", "escape_network", "escape_privileges", "daemon"):
            jobs[script] = submitHostile(api, script, configs[script])
        beside = api.submit(request("ni film beside", {"fit": "lm"}), nifilmFiles())
        for script in ("fork_bomb", "memory_hog", "file_size", "cpu_spin"):
            jobs[script] = submitHostile(api, script, configs[script])
        after = api.submit(request("ni film after", {"fit": "lm"}), nifilmFiles())

        records = {script: api.waitFor(job["id"], ended, timeout=120, what="its end")
                   for script, job in jobs.items()}
        sleeping = api.waitFor(sleeper["id"], ended, timeout=120, what="its end")
        fits = [api.waitFor(job["id"], ended, timeout=120, what="its end") for job in (beside, after)]
        reports = {script: report(api, record["id"]) for script, record in records.items()}
        pending = select.select([tcp, udp, abstract, unix], [], [], 0)[0]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        for s in (tcp, udp, abstract, unix):
            s.close()
        os.unlink(marker)

    # Every job ran confined: namespaces, and a slot's own unprivileged uid.
    for record in list(records.values()) + [sleeping] + fits:
        assert record["confinement"].startswith("namespaces("), record
        assert record["confinement"].rsplit("+", 1)[-1] in ("uid %d" % uid for uid in SLOT_UIDS), record

    # Limits stopped these, and the job says which.
    assert (records["cpu_spin"]["status"], records["cpu_spin"]["error"]) == ("ERROR", "CPU time limit of 5 s exceeded")
    assert reports["cpu_spin"]["finished"] is False
    assert (sleeping["status"], sleeping["error"]) == ("ERROR", "wall-clock limit of 20 s exceeded")
    # The others ran to their end, every attempt failing inside; the job says the model defined no problem.
    for script, record in records.items():
        if script != "cpu_spin":
            assert record["status"] == "ERROR" and record["error"].endswith(NO_PROBLEM), record
            assert reports[script]["finished"], reports[script]

    files = reports["escape_files"]
    # The private /tmp and /dev/shm, and the fit's home, which is its own job directory.
    private = ("/tmp/hostile-" + nonce, "/dev/shm/hostile-" + nonce,
               os.path.join(os.path.realpath(jobsDir), str(jobs["escape_files"]["id"]), "hostile-" + nonce))
    assert [n for n in succeeded(files) if files["attempts"][n]["detail"] not in private] == [], files
    assert files["ownJobWritable"]
    assert records["escape_files"]["finished"] < sleeping["finished"], "the other job was gone already"
    for path in files["written"]:
        assert not os.path.exists(path), "%s was written on the host" % (path,)
    for place in ("/", "/tmp", "/dev/shm", "/root", "/home", "/etc", "/usr", jobsDir, worker.workDir,
                  worker.directory, server.directory):
        assert not os.path.exists(os.path.join(place, "hostile-" + nonce)), place
    assert token.read_text() == "hostile-e2e-token\n"

    signals = reports["escape_signals"]
    assert succeeded(signals) == [], signals
    assert signals["visiblePids"] == [] and signals["parent"] == 0
    assert received == []
    for daemon in (worker, server):
        assert not os.path.exists(daemon.logPath + ".1"), "SIGUSR1 reached %s: its log rotated" % (daemon.plugin,)

    network = reports["escape_network"]
    assert [n for n in succeeded(network) if not n.startswith("udp:")] == [], network
    assert network["interfaces"] == ["lo"]
    assert pending == [], "a socket on the host's loopback was reached"

    privileges = reports["escape_privileges"]
    assert succeeded(privileges) == [], privileges
    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(privileges["status"][name], 16) == 0, privileges["status"]
    assert privileges["status"]["NoNewPrivs"] == "1"
    assert int(privileges["status"]["Uid"].split()[0]) in SLOT_UIDS

    assert reports["daemon"]["daemonReady"]
    bomb = reports["fork_bomb"]
    assert bomb["forks"] < 64 and "Resource temporarily unavailable" in bomb["refused"], bomb
    hog = reports["memory_hog"]
    assert succeeded(hog) == [] and hog["largest"] < 1024 ** 3, hog
    for place, outcome in reports["file_size"]["attempts"].items():
        assert not outcome["succeeded"] and outcome["written"] <= 8 * 1024 ** 2, (place, outcome)
        assert "File too large" in outcome["error"], (place, outcome)
    # The daemon and the fork bomb's children went with their jobs.
    assert [pid for uid in SLOT_UIDS for pid in processesOf(uid)] == []

    # The worker kept serving: fits beside and after the hostile jobs completed normally.
    for record in fits:
        assert record["status"] == "COMPLETE", record
        assert 0.8 < record["result"]["chisq"] < 1.3, record["result"]
    assert worker.running and server.running
