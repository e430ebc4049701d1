"""Nothing acknowledged is lost: a real ``twistd reflservd`` is SIGKILLed at
random moments while 64 clients submit, lease, complete, cancel and delete
over keep-alive connections; after each restart every acknowledged change is
back as it was acknowledged, once, and nothing deleted returns."""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from test.conftest import TWISTD, Api, childEnvironment, freePort


def request(server, method, path, body=None, conn=None):
    """``(status, decoded JSON)`` of one request to ``server``: on ``conn``, a
    keep-alive connection the caller owns, or else on a connection of its own."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        if own:
            conn.close()


class Ledger:
    """What the server acknowledged, as the clients saw it (under a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submitted = {}     # id -> (request, key)
        self.leased = {}        # id -> lease token
        self.finished = {}      # id -> COMPLETE or CANCEL, the status an answer gave
        self.deleted = set()
        self.deleting = set()   # ids a delete was sent for: it may have happened unanswered
        self.changes = 0

    def count(self):
        with self.lock:
            self.changes += 1

    def pick(self, rng, pool):
        with self.lock:
            ids = [i for i in pool if i not in self.deleted]
            return rng.choice(ids) if ids else None


def client(server, kind, n, ledger, stop, seed):
    """One of the 64 clients: a submitter, a worker (lease, heartbeat,
    complete), a canceller or a deleter, on a keep-alive connection, until
    ``stop`` or until the server goes away."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        while not stop.is_set():
            if kind == "submit":
                job = {"name": "c%d-%d" % (n, rng.randrange(10 ** 9)), "notify": "",
                       "service": "count", "version": "1", "data": rng.randrange(100)}
                code, body = request(server, "POST", "/jobs.json", json.dumps(job), conn=conn)
                if code == 200:
                    with ledger.lock:
                        ledger.submitted[body["id"]] = (job, body["key"])
                    ledger.count()
            elif kind == "work":
                code, lease = request(server, "POST", "/api/v1/queues/q/lease?timeout=0",
                                      json.dumps({"worker": "w%d" % (n,)}), conn=conn)
                if code != 200:
                    continue
                with ledger.lock:
                    ledger.leased[lease["id"]] = lease["lease"]
                ledger.count()
                path = "/api/v1/jobs/%d" % (lease["id"],)
                token = {"lease": lease["lease"]}
                request(server, "POST", path + "/heartbeat",
                        json.dumps(dict(token, progress={"step": 1, "chisq": 2.0})), conn=conn)
                code, done = request(server, "POST", path + "/complete", json.dumps(
                    dict(token, status="COMPLETE", result={"chisq": 1.0})), conn=conn)
                if code == 200:
                    with ledger.lock:
                        ledger.finished[lease["id"]] = done["status"]
                    ledger.count()
            else:
                jobId = ledger.pick(rng, list(ledger.submitted))
                if jobId is None:
                    time.sleep(0.001)   # nothing to act on yet (bounded by stop)
                    continue
                key = ledger.submitted[jobId][1]
                if kind == "delete":
                    with ledger.lock:
                        ledger.deleting.add(jobId)
                method, path = (("POST", "/api/v1/jobs/%d/cancel") if kind == "cancel"
                                else ("DELETE", "/api/v1/jobs/%d"))
                conn.request(method, path % (jobId,), body=b"{}", headers={
                    "Content-Type": "application/json", "X-Job-Key": key})
                response = conn.getresponse()
                body = json.loads(response.read() or b"null")
                if response.status == 200:
                    with ledger.lock:
                        if kind == "delete":
                            ledger.deleted.add(jobId)
                        elif body["status"] == "CANCEL":
                            ledger.finished[jobId] = "CANCEL"
                    ledger.count()
    except (OSError, http.client.HTTPException, ValueError):
        return
    finally:
        conn.close()


KINDS = ["submit"] * 28 + ["work"] * 20 + ["cancel"] * 8 + ["delete"] * 8


def test_sigkill_twenty_times_under_64_clients_loses_no_acknowledged_change(serverProcess):
    """64 clients submit, lease, heartbeat, complete, cancel and delete over
    keep-alive connections while the server is SIGKILLed twenty times. After
    each restart every acknowledged change is there once: each submitted job
    reads back as it was sent (none twice), a leased job is not PENDING
    again, a job that an answer said had ended COMPLETE or CANCEL is so,
    and nothing deleted comes back; the journal verifies."""
    server = serverProcess()
    rng = random.Random(os.environ.get("REFLSERVD_SEED", 20261202))
    ledger = Ledger()
    for cycle in range(20):
        stop = threading.Event()
        clients = [threading.Thread(target=client, args=(server, kind, n, ledger, stop,
                                                         rng.randrange(1 << 30)))
                   for n, kind in enumerate(KINDS)]
        target = ledger.changes + rng.randrange(20, 200)
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while ledger.changes < target and time.monotonic() < deadline:
            time.sleep(0.001)  # watching a counter, bounded
        assert server.kill() == -signal.SIGKILL
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        assert ledger.changes >= target, "the clients stalled"
        server.start()
        code, listing = request(server, "GET", "/jobs.json")
        assert len(listing["jobs"]) == len(set(listing["jobs"]))
        listed = set(listing["jobs"])
        with ledger.lock:
            assert not ledger.deleted & listed, "a deleted job came back"
            assert set(ledger.submitted) - ledger.deleting <= listed, "an acknowledged job was lost"
            status = {}
            for jobId in set(ledger.leased) | set(ledger.finished):
                if jobId not in ledger.deleting:
                    status[jobId] = request(server, "GET", "/jobs/%d/status.json" % (jobId,))[1]["status"]
            for jobId, (sent, _) in ledger.submitted.items():
                if jobId not in ledger.deleting and jobId % 7 == cycle % 7:
                    assert request(server, "GET", "/jobs/%d.json" % (jobId,))[1]["job"] == sent
            for jobId, ended in ledger.finished.items():
                if jobId not in ledger.deleting:
                    assert status[jobId] == ended, (jobId, ended, status[jobId])
            for jobId in ledger.leased:
                if jobId not in ledger.deleting:
                    assert status[jobId] != "PENDING", jobId
    assert len(ledger.submitted) > 200 and ledger.deleted and ledger.finished
    print("20 SIGKILLs under 64 clients: %d acknowledged changes (%d submits, %d leases, %d ends, "
          "%d deletes), none lost" % (ledger.changes, len(ledger.submitted), len(ledger.leased),
                                      len(ledger.finished), len(ledger.deleted)))
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "reflservd-journal"),
                             server.stateDir, "verify"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigterm_stops_cleanly_and_answers_waiting_workers(serverProcess):
    """SIGTERM: the waiting long-poll is answered (204), the journal is closed,
    and twistd exits by the signal it was sent (as Twisted's twistd does)."""
    server = serverProcess()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/api/v1/queues/q/lease?timeout=50")
    request(server, "GET", "/healthz")  # the long-poll has been taken in
    server.process.send_signal(signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 204
    assert server.process.wait(timeout=30) == -signal.SIGTERM
    assert "journal flushed and closed" in server.log()


def test_daemon_mode_starts_in_background_and_stops_on_sigterm(tmp_path):
    """``twistd --pidfile P --logfile L reflservd …`` detaches, answers on its
    port, and on SIGTERM to the pid in its pidfile stops and removes the pidfile."""
    stateDir = tmp_path / "state"
    pidfile, logfile = tmp_path / "reflservd.pid", tmp_path / "reflservd.log"
    port = freePort()
    subprocess.run([TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "reflservd",
                    "--listen", "tcp:%d:interface=127.0.0.1" % port, "--state-dir", str(stateDir)],
                   cwd=str(tmp_path), env=childEnvironment(), check=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        api = Api("http://127.0.0.1:%d" % (port,))
        deadline = time.monotonic() + 60
        while True:
            try:
                assert api.call("GET", "/healthz")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(pidfile):
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)
    assert "loaded 0 jobs" in logfile.read_text()
