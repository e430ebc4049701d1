"""The worker end to end: real ``twistd reflservd`` and ``twistd reflworkerd``
processes on loopback, real fits of the nickel film model, no mocks.

Each test waits for what it expects through the server's state (the job's
events long-poll) or a daemon's log, always with a bound.
"""

import os
import re
import signal
import subprocess
import time

import pytest

from test.conftest import TWISTD, childEnvironment, nifilmFiles
from test.support import sessionGenerations

LM = {"fit": "lm", "steps": 200}
SHORT_DREAM = {"fit": "dream", "samples": 12000, "burn": 50, "seed": 7}
"""A DREAM fit of several seconds: long enough to be interrupted, short enough to rerun."""
ENDLESS_DREAM = {"fit": "dream", "samples": 10**7, "burn": 10**4, "seed": 7}
CHECKPOINTED_DREAM = {"fit": "dream", "samples": 50000, "burn": 50, "seed": 7}
"""Long enough to be killed after a checkpoint or two however busy the machine
(about 25 seconds on an idle one; 20,000 samples ended before the kill once)."""


def nifilmRequest(options, name="ni film"):
    return {"name": name, "notify": "e2e@example.org", "service": "refl1d",
            "data": {"model": "nifilm.py", "options": options}}


def hasProgress(record):
    return record["status"] == "ACTIVE" and record["progress"] is not None


def followEvents(api, jobId, after, timeout):
    """Every event of the job after ``after`` until it ends, read while it
    runs by the events long-poll (a finished job keeps only its last event)."""
    events, deadline = [], time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "job %d did not end within %s s" % (jobId, timeout)
        wait = min(remaining, 10.0)
        answer = api.ok("GET", "/api/v1/jobs/%d/events?after=%d&timeout=%g" % (jobId, after, wait),
                        timeout=wait + 10)
        events += answer["events"]
        after = answer["next"]
        if answer["status"] in ("COMPLETE", "ERROR", "CANCEL"):
            return events


def ended(record):
    return record["finished"] is not None


def processGone(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def checkpointGenerations(api, jobId, scratch):
    """The DREAM generations in the job's stored checkpoint (result file session.h5)."""
    if "session.h5" not in api.files(jobId, kind="result"):
        return 0
    path = os.path.join(str(scratch), "checkpoint.h5")
    with open(path, "wb") as f:
        f.write(api.download(jobId, "session.h5"))
    return sessionGenerations(path)


def forkServerPid(worker):
    found = re.findall(r"fork server started, pid (\d+)", worker.log(sinceStart=True))
    return int(found[-1])


def test_lm_fit_completes_with_its_results_on_the_server(serverProcess, workerProcess, tmp_path):
    """A submitted nickel film fit (LM) runs on the worker, with the worker token,
    and ends COMPLETE with χ² near 1, the thickness near 100 Å, and its exported
    files stored on the server; the worker keeps nothing once it is acknowledged."""
    token = tmp_path / "token"
    token.write_text("e2e-token\n")
    server = serverProcess(tokenFile=token)
    worker = workerProcess(server, tokenFile=token, sandbox="auto")
    job = server.api.submit(nifilmRequest(LM), nifilmFiles())
    record = server.api.waitFor(job["id"], ended, timeout=120, what="its end")
    assert record["status"] == "COMPLETE", record
    result = record["result"]
    assert 0.8 < result["chisq"] < 1.3
    assert abs(result["parameters"]["Ni thickness"]["value"] - 100.0) < 3.0
    assert record["attempts"] == 1 and record["queue"] == "test"
    assert record["confinement"]
    if os.geteuid() == 0:
        # A root worker runs each slot's fits as that slot's own unprivileged uid.
        assert record["confinement"].endswith("+uid 60001"), record["confinement"]
    files = server.api.files(job["id"], kind="result")
    assert {"nifilm.par", "stdout.txt", "session.h5"} <= set(files)
    par = server.api.download(job["id"], "nifilm.par").decode()
    assert "thickness" in par
    # The session file holds the fitted model: its parameters are those of the .par file.
    session = tmp_path / "session.h5"
    session.write_bytes(server.api.download(job["id"], "session.h5"))
    from bumps.webview.server.state_hdf5_backed import State
    state = State()
    state.read_problem_from_session(str(session))
    fitted = state.problem.fitProblem
    exported = dict(line.rsplit(" ", 1) for line in par.splitlines() if line.strip())
    assert exported == {label: "%.15g" % (value,)        # the .par file's own format
                        for label, value in zip(fitted.labels(), fitted.getp())}
    worker.waitForLog("job %d: COMPLETE delivered" % (job["id"],))
    assert os.listdir(os.path.join(worker.workDir, "jobs")) == []


def test_a_wrong_token_is_refused_and_retried_not_busy_looped(serverProcess, workerProcess, tmp_path):
    """A worker with the wrong token gets no work, logs the refusal once, and keeps trying with backoff."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right")
    bad.write_text("wrong")
    server = serverProcess(tokenFile=good)
    worker = workerProcess(server, tokenFile=bad)
    job = server.api.submit({"name": "count", "notify": "e2e@example.org", "service": "count",
                             "data": 10}, {})
    worker.waitForLog("401")
    assert server.api.job(job["id"])["status"] == "PENDING"
    assert worker.log(sinceStart=True).count("retrying with backoff") == 1


def test_a_running_dream_fit_is_cancelled(serverProcess, workerProcess):
    """Cancelling a running DREAM fit stops it on the worker; the job ends CANCEL
    with the fit's output delivered, and the worker takes the next job."""
    server = serverProcess()
    workerProcess(server)
    job = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=60, what="progress")
    server.api.cancel(job["id"])
    record = server.api.waitFor(job["id"], ended, timeout=60, what="its end")
    assert record["status"] == "CANCEL"
    assert "stdout.txt" in server.api.files(job["id"], kind="result")
    count = server.api.submit({"name": "count", "notify": "e2e@example.org", "service": "count",
                               "data": 1000}, {})
    record = server.api.waitFor(count["id"], ended, timeout=60, what="its end")
    assert record["status"] == "COMPLETE" and record["result"] == 1000


def test_a_job_whose_worker_is_killed_runs_again_elsewhere(serverProcess, workerProcess):
    """A worker SIGKILLed mid-fit loses its lease when it runs out; the job goes
    back to PENDING and a second worker finishes it (attempt 2). The killed
    worker's fit does not outlive it."""
    server = serverProcess(leaseTimeout=3)
    first = workerProcess(server, queue="first")
    job = server.api.submit(nifilmRequest(SHORT_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=60, what="progress")
    forkServer = forkServerPid(first)
    first.kill()
    assert processGone(forkServer), "the killed worker's fork server outlived it"
    server.api.waitStatus(job["id"], "PENDING", timeout=30)
    workerProcess(server, queue="second")
    record = server.api.waitFor(job["id"], ended, timeout=120, what="its end")
    assert record["status"] == "COMPLETE", record
    assert record["attempts"] == 2 and record["queue"] == "second"
    assert 0.8 < record["result"]["chisq"] < 1.3


def test_a_dream_fit_whose_worker_dies_resumes_from_its_checkpoint(serverProcess, workerProcess, tmp_path):
    """A DREAM fit checkpoints its session to the server every --checkpoint-every
    second; its worker is SIGKILLed once a checkpoint with sampler state is
    stored. The job goes back to PENDING and a second worker, given that
    checkpoint with the lease, resumes the fit from it: every progress report
    of attempt 2 is past the checkpoint's generation (a fresh fit starts at
    step 1), and the job ends COMPLETE with the right answer."""
    server = serverProcess(leaseTimeout=3)
    first = workerProcess(server, queue="first", args=["--checkpoint-every", "1"])
    job = server.api.submit(nifilmRequest(CHECKPOINTED_DREAM), nifilmFiles())
    deadline = time.monotonic() + 60
    while checkpointGenerations(server.api, job["id"], tmp_path) < 2:
        assert time.monotonic() < deadline, "no checkpoint with sampler state reached the server"
        assert server.api.job(job["id"])["status"] == "ACTIVE", "the fit ended before a checkpoint"
        time.sleep(0.1)
    forkServer = forkServerPid(first)
    first.kill()
    assert processGone(forkServer), "the killed worker's fork server outlived it"
    server.api.waitStatus(job["id"], "PENDING", timeout=30)
    resumedFrom = checkpointGenerations(server.api, job["id"], tmp_path)
    assert resumedFrom >= 2
    seen = server.api.ok("GET", "/api/v1/jobs/%d/events?after=0&timeout=0" % (job["id"],))["next"]

    second = workerProcess(server, queue="second", args=["--checkpoint-every", "1"])
    events = followEvents(server.api, job["id"], seen, timeout=120)
    record = server.api.job(job["id"])
    assert record["status"] == "COMPLETE", record
    assert record["attempts"] == 2 and record["queue"] == "second"
    assert 0.8 < record["result"]["chisq"] < 1.3
    second.waitForLog("job %d: resuming the fit from the checkpoint of an earlier attempt" % (job["id"],))
    steps = [e["progress"]["step"] for e in events if e["type"] == "progress"]
    assert steps, events
    assert min(steps) > resumedFrom, (resumedFrom, steps)


def test_a_fit_survives_a_server_restart_and_its_result_arrives(serverProcess, workerProcess):
    """The server restarts while a fit runs: the fit goes on, and its result is
    delivered to the restarted server under the same lease."""
    server = serverProcess()
    worker = workerProcess(server)
    job = server.api.submit(nifilmRequest(SHORT_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=60, what="progress")
    server.stop()
    assert not server.running
    server.start()
    record = server.api.waitFor(job["id"], ended, timeout=120, what="its end")
    assert record["status"] == "COMPLETE", record
    assert record["attempts"] == 1 and record["lease"] == 1
    assert "session.h5" in server.api.files(job["id"], kind="result")
    worker.waitForLog("job %d: COMPLETE delivered" % (job["id"],))


def test_a_stale_workers_late_results_are_refused(serverProcess, workerProcess):
    """A worker frozen past its lease comes back after the job was finished by
    another: its late report (a heartbeat or its results) is refused (409), it
    drops the job quietly, and the job keeps the second worker's result."""
    server = serverProcess(leaseTimeout=3)
    stale = workerProcess(server, queue="stale")
    job = server.api.submit(nifilmRequest(SHORT_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=60, what="progress")
    stale.process.send_signal(signal.SIGSTOP)
    try:
        # The frozen worker's fit goes on in its fork server and ends: its
        # results are ready to go the moment the worker wakes.
        outcome = os.path.join(stale.workDir, "jobs", str(job["id"]), ".outcome.json")
        deadline = time.monotonic() + 120
        while not os.path.exists(outcome) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(outcome), "the frozen worker's fit did not end"
        server.api.waitStatus(job["id"], "PENDING", timeout=30)
        workerProcess(server, queue="fresh")
        record = server.api.waitFor(job["id"], ended, timeout=120, what="its end")
    finally:
        stale.process.send_signal(signal.SIGCONT)
    assert record["status"] == "COMPLETE" and record["attempts"] == 2
    stale.waitForLog("lease 1 is not current")
    stale.waitForLog("dropped")
    # Whichever it sends first when it wakes (the fit's outcome is read off the reactor
    # thread, so the overdue heartbeat may go before the results) is refused.
    refused = re.compile(r'"(PUT /api/v1/jobs/%d/files/\S+\?lease=1&|POST /api/v1/jobs/%d/(heartbeat|complete) )'
                         r'[^"]*" 409' % (job["id"], job["id"]))
    assert refused.search(server.log()), "the stale worker's late report was not refused with 409"
    after = server.api.job(job["id"])
    assert (after["status"], after["lease"], after["queue"], after["finished"], after["result"]) == (
        record["status"], record["lease"], "fresh", record["finished"], record["result"])
    stale.waitForLog("job %d: no longer held here; its files are removed" % (job["id"],))
    assert os.listdir(os.path.join(stale.workDir, "jobs")) == []


def test_drain_release_hands_the_fit_back_on_sigterm(serverProcess, workerProcess):
    """A worker stopped with --drain=release cancels its fit and releases the
    job: PENDING again, the attempt not counted."""
    server = serverProcess()
    worker = workerProcess(server, args=["--drain", "release"])
    job = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=60, what="progress")
    assert worker.stop(timeout=60) in (0, -signal.SIGTERM)   # twistd ends by the signal it got
    record = server.api.job(job["id"])
    assert record["status"] == "PENDING" and record["attempts"] == 0


def test_daemon_mode_runs_in_the_background_and_stops_on_sigterm(serverProcess, tmp_path):
    """``twistd --pidfile P --logfile L reflworkerd …`` detaches, takes work, and
    stops on SIGTERM sent to the pid in its pidfile."""
    server = serverProcess()
    pidfile, logfile = tmp_path / "worker.pid", tmp_path / "worker.log"
    subprocess.run([TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "reflworkerd",
                    "--server", server.url, "--queue", "daemon", "--work-dir", str(tmp_path / "work"),
                    "--sandbox", "none", "--slot-uid-base", "0", "--poll-timeout", "5"],
                   cwd=str(tmp_path), env=childEnvironment(), check=True, timeout=60)
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        job = server.api.submit({"name": "count", "notify": "e2e@example.org", "service": "count",
                                 "data": 5}, {})
        record = server.api.waitFor(job["id"], ended, timeout=90, what="its end")
        assert record["status"] == "COMPLETE" and record["queue"] == "daemon"
    finally:
        os.kill(pid, signal.SIGTERM)
    assert processGone(pid, timeout=60)
    assert not pidfile.exists()
    assert "taking work from daemon" in logfile.read_text()


@pytest.mark.parametrize("args, says", [
    (["--backend", "slurm"], "--shared-dir"),
    (["--sandbox", "bogus"], "--sandbox"),
])
def test_usage_errors_exit_before_starting(tmp_path, args, says):
    """Options the worker cannot honour are refused at once with a usage error."""
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "reflworkerd", "--server", "http://127.0.0.1:9",
                           "--queue", "q", "--work-dir", str(tmp_path)] + args,
                          cwd=str(tmp_path), env=childEnvironment(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert says in done.stdout + done.stderr
