"""Nothing acknowledged is lost: a real ``twistd reflservd`` is SIGKILLed at
random moments while clients submit over keep-alive connections; after each
restart every acknowledged job is back as it was acknowledged."""

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


def submitter(srv, prefix, acknowledged, lock, stop):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    n = 0
    while not stop.is_set():
        n += 1
        job = {"name": "%s-%d" % (prefix, n), "notify": prefix + "@example.org",
               "service": "count", "version": "1", "data": n}
        try:
            code, body = request(srv, "POST", "/jobs.json", json.dumps(job), conn=conn)
        except (OSError, http.client.HTTPException):
            return
        if code == 200:
            with lock:
                acknowledged[body["id"]] = job


def test_sigkill_during_submits_loses_no_acknowledged_job(serverProcess):
    """Clients submit over keep-alive connections while the server is SIGKILLed
    three times; after each restart on the same state directory and port, every
    acknowledged job reads back as it was sent, and the journal verifies."""
    server = serverProcess()
    rng = random.Random(os.environ.get("REFLSERVD_SEED", 20261128))
    acknowledged, lock = {}, threading.Lock()
    for cycle in range(3):
        stop = threading.Event()
        clients = [threading.Thread(target=submitter, args=(server, "c%d%d" % (cycle, i),
                                                            acknowledged, lock, stop))
                   for i in range(4)]
        target = len(acknowledged) + rng.randrange(20, 200)
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < target and time.monotonic() < deadline:
            time.sleep(0.001)  # watching a counter, bounded
        assert server.kill() == -signal.SIGKILL
        stop.set()
        for client in clients:
            client.join(timeout=30)
        assert len(acknowledged) >= target, "the clients stalled"
        server.start()
        for jobId, sent in sorted(acknowledged.items()):
            code, job = request(server, "GET", "/jobs/%d.json" % jobId)
            assert code == 200, (jobId, job)
            assert job["job"] == sent
    code, listing = request(server, "GET", "/jobs.json")
    assert set(acknowledged) <= set(listing["jobs"])
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
