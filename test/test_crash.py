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

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def freePort():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real reflservd process on a loopback port."""

    def __init__(self, stateDir, port):
        self.stateDir, self.port = stateDir, port
        self.process = None

    def start(self, bound=60.0):
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "reflservd", "--listen",
             "tcp:%d:interface=127.0.0.1" % self.port, "--state-dir", self.stateDir],
            stdout=open(os.path.join(self.stateDir, "..", "server.log"), "ab"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("the server exited with %s" % self.process.returncode)
            try:
                self.request("GET", "/healthz")
                return
            except OSError:
                time.sleep(0.05)  # polling for readiness, bounded
        raise AssertionError("the server did not answer within %s s" % bound)

    def request(self, method, path, body=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            if own:
                conn.close()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    stateDir = tmp_path / "state"
    stateDir.mkdir()
    srv = Server(str(stateDir), freePort())
    srv.start()
    yield srv
    srv.stop()


def submitter(srv, prefix, acknowledged, lock, stop):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    n = 0
    while not stop.is_set():
        n += 1
        request = {"name": "%s-%d" % (prefix, n), "notify": prefix + "@example.org",
                   "service": "count", "version": "1", "data": n}
        try:
            code, body = srv.request("POST", "/jobs.json", json.dumps(request), conn=conn)
        except (OSError, http.client.HTTPException):
            return
        if code == 200:
            with lock:
                acknowledged[body["id"]] = request


def test_sigkill_during_submits_loses_no_acknowledged_job(server):
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
        server.kill()
        stop.set()
        for client in clients:
            client.join(timeout=30)
        assert len(acknowledged) >= target, "the clients stalled"
        server.start()
        for jobId, request in sorted(acknowledged.items()):
            code, job = server.request("GET", "/jobs/%d.json" % jobId)
            assert code == 200, (jobId, job)
            assert job["job"] == request
    code, listing = server.request("GET", "/jobs.json")
    assert set(acknowledged) <= set(listing["jobs"])
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "reflservd-journal"),
                             server.stateDir, "verify"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigterm_stops_cleanly_and_answers_waiting_workers(server):
    """SIGTERM: the waiting long-poll is answered (204), the journal is closed,
    and twistd exits by the signal it was sent (as Twisted's twistd does)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/api/v1/queues/q/lease?timeout=50")
    server.request("GET", "/healthz")  # the long-poll has been taken in
    server.process.send_signal(signal.SIGTERM)
    response = conn.getresponse()
    assert response.status == 204
    assert server.process.wait(timeout=30) == -signal.SIGTERM
    log = open(os.path.join(server.stateDir, "..", "server.log")).read()
    assert "journal flushed and closed" in log


def test_daemon_mode_starts_in_background_and_stops_on_sigterm(tmp_path):
    stateDir = tmp_path / "state"
    pidfile, logfile = tmp_path / "reflservd.pid", tmp_path / "reflservd.log"
    port = freePort()
    subprocess.run([TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "reflservd",
                    "--listen", "tcp:%d:interface=127.0.0.1" % port, "--state-dir", str(stateDir)],
                   check=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        srv = Server(str(stateDir), port)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert srv.request("GET", "/healthz")[0] == 200
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
