"""The Python client against a real server: ``twistd -n reflservd`` on a
loopback port, and a fake worker that leases and completes jobs through the
worker routes.

The helpers here (``ServerProcess``, ``FakeWorker``, ``pngBytes``,
``writeModel``) are shared with test_cli.py, test_pages.py and test_notify.py.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest

from reflservd.client import Client, ClientError, Job, ServerUnreachable, UnknownJob, WaitTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
START_TIMEOUT = 30.0


# ---- shared helpers


class ServerProcess:
    """``twistd -n reflservd`` on an ephemeral loopback port, in its own
    state directory; ``stop()`` ends it by its pid."""

    def __init__(self, stateDir, *extra):
        self.stateDir = str(stateDir)
        self.log = os.path.join(self.stateDir, "twistd.log")
        os.makedirs(self.stateDir, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", self.log, "reflservd",
             "--listen", "tcp:0:interface=127.0.0.1", "--state-dir", self.stateDir] + list(extra),
            cwd=self.stateDir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = self._waitForPort()
        self.url = "http://127.0.0.1:%d" % (self.port,)
        self._waitHealthy()

    def _waitForPort(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("reflservd exited (%s): %s" % (self.process.returncode, self.logText()))
            match = re.search(r"Site starting on (\d+)", self.logText())
            if match:
                return int(match.group(1))
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("reflservd did not listen within %g s: %s" % (START_TIMEOUT, self.logText()))

    def _waitHealthy(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("reflservd did not answer /healthz within %g s" % (START_TIMEOUT,))

    def logText(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(20)


class FakeWorker:
    """A worker made of plain HTTP calls to the worker routes, so that tests
    decide exactly when a job starts, reports progress and ends."""

    def __init__(self, url, queue="q"):
        self.url = url
        self.queue = queue

    def _send(self, method, path, body=None, contentType="application/json"):
        data = json.dumps(body).encode() if contentType == "application/json" and body is not None else body
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": contentType})
        with urllib.request.urlopen(request, timeout=90) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)

    def lease(self, timeout=30):
        status, lease = self._send("POST", "/api/v1/queues/%s/lease?timeout=%g" % (self.queue, timeout),
                                   {"worker": "fake:1"})
        assert status == 200, "no job was offered within %g s" % (timeout,)
        return lease

    def heartbeat(self, lease, progress=None, confinement="namespaces+rlimits"):
        body = {"lease": lease["lease"], "confinement": confinement}
        if progress is not None:
            body["progress"] = progress
        return self._send("POST", "/api/v1/jobs/%d/heartbeat" % (lease["id"],), body)[1]

    def putFile(self, lease, name, data):
        path = "/api/v1/jobs/%d/files/%s?lease=%d&last=1" % (lease["id"], name, lease["lease"])
        return self._send("PUT", path, data, "application/octet-stream")[1]

    def complete(self, lease, status="COMPLETE", result=None, error=None):
        body = {"lease": lease["lease"], "status": status, "result": result, "error": error}
        return self._send("POST", "/api/v1/jobs/%d/complete" % (lease["id"],), body)[1]

    def runFit(self, lease, steps=3, files=None):
        """Report ``steps`` progress events, upload ``files`` and complete
        with a result like the runner's."""
        for step in range(1, steps + 1):
            self.heartbeat(lease, progressAt(step))
        for name, data in (files if files is not None else resultFiles()).items():
            self.putFile(lease, name, data)
        return self.complete(lease, result=RESULT)


RESULT = {
    "fitter": "lm", "steps": 3, "chisq": 1.0312, "seed": 7, "elapsed": 0.9,
    "parameters": {"Ni thickness": {"value": 100.12, "uncertainty": 0.31},
                   "Ni interface": {"value": 4.9, "uncertainty": None}},
}


def progressAt(step):
    return {"step": step, "chisq": 10.0 / step, "elapsed": 0.1 * step,
            "parameters": {"Ni thickness": 90.0 + step, "Ni interface": 5.0}}


def pngBytes(width=120, height=80):
    """A small valid PNG (a diagonal line), written without any library."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            on = abs(x * height - y * width) < width
            row += bytes((20, 40, 160) if on else (250, 250, 250))
        rows.append(bytes(row))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def resultFiles():
    return {
        "nifilm-1-refl.png": pngBytes(),
        "nifilm-1-profile.png": pngBytes(90, 60),
        "nifilm.par": b"Ni thickness 100.12\nNi interface 4.9\n",
        "stdout.txt": b"".join(b"line %d of the fit\n" % i for i in range(300)),
        "stderr.txt": b"a warning\n",
    }


def writeModel(folder, dataNames=("nifilm-1.dat", "nifilm-2.dat")):
    """A model script and data files in ``folder``: ``(modelPath, dataPaths)``."""
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, "nifilm.py")
    with open(model, "w") as f:
        f.write("from refl1d.names import *\nfiles = %r\n" % (list(dataNames),))
    data = []
    for i, name in enumerate(dataNames):
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write("# Q R dR\n" + "".join("%g %g 0.01\n" % (0.01 * k, 1.0 / (k + 1 + i)) for k in range(50)))
        data.append(path)
    return model, data


def runInThread(target, *args):
    """Run ``target`` in a thread; the returned ``join()`` re-raises its error."""
    outcome = {}

    def run():
        try:
            outcome["value"] = target(*args)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout=60):
        thread.join(timeout)
        assert not thread.is_alive(), "the thread did not finish within %g s" % (timeout,)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return join


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("reflservd"))
    yield process
    process.stop()


@pytest.fixture
def worker(server):
    return FakeWorker(server.url, queue="q")


@pytest.fixture
def model(tmp_path):
    return writeModel(str(tmp_path / "fit"))


def drain(worker):
    """Lease and end whatever is still pending, so each test starts with an empty queue."""
    while True:
        status, lease = worker._send("POST", "/api/v1/queues/%s/lease?timeout=0" % (worker.queue,))
        if status != 200:
            return
        worker.complete(lease, "ERROR", error="drained")


# ---- the tests


def test_submitSendsTheRequestAndTheFiles(server, worker, model):
    """submit() sends the documented request (model's base name, options,
    service, client version) and every file as a 'file' part; the worker
    sees exactly those bytes."""
    drain(worker)
    modelPath, dataPaths = model
    job = Client(server.url).submit(modelPath, data=dataPaths, fit="dream", samples=2000, burn=10,
                                    seed=5, steps=None, name="ni film", notify="ann@example.org")
    assert job.record["status"] == "PENDING"
    request = job.record["request"]
    assert request["name"] == "ni film"
    assert request["notify"] == "ann@example.org"
    assert request["service"] == "refl1d"
    assert request["version"] == "0.1.0"
    assert request["data"] == {"model": "nifilm.py",
                               "options": {"fit": "dream", "samples": 2000, "burn": 10, "seed": 5}}
    lease = worker.lease()
    assert lease["id"] == job.id
    assert sorted(lease["files"]) == sorted([os.path.basename(p), os.path.getsize(p)]
                                            for p in [modelPath] + dataPaths)
    with open(dataPaths[1], "rb") as f:
        expected = f.read()
    assert job.read("nifilm-2.dat", kind="upload") == expected
    worker.complete(lease, "ERROR", error="test over")


def test_waitFollowsEventsUntilTheEndAndResultHasTheParameters(server, worker, model):
    """wait() returns the final status after passing every progress event to
    the callback, in order; result then holds χ² and the parameters."""
    drain(worker)
    job = Client(server.url).submit(model[0], data=model[1], fit="lm", steps=3)

    def fit():
        worker.runFit(worker.lease())

    seen = []
    join = runInThread(fit)
    status = job.wait(timeout=60, callback=seen.append)
    join()
    assert status == "COMPLETE"
    steps = [e["progress"]["step"] for e in seen if e["type"] == "progress"]
    assert steps == [1, 2, 3]
    assert [e["status"] for e in seen if e["type"] == "status"][-1] == "COMPLETE"
    assert job.status == "COMPLETE"
    assert job.result["chisq"] == RESULT["chisq"]
    assert job.result["parameters"]["Ni thickness"] == {"value": 100.12, "uncertainty": 0.31}
    assert job.progress["step"] == 3


def test_waitTimesOutAndLeavesTheJobAlone(server, worker, model):
    """wait(timeout=…) raises WaitTimeout when nothing ends the job; the job
    is still PENDING."""
    drain(worker)
    job = Client(server.url).submit(model[0], data=model[1])
    with pytest.raises(WaitTimeout):
        job.wait(timeout=0.5)
    assert job.status == "PENDING"
    job.cancel()


def test_downloadFetchesEveryResultFileWithItsSize(server, worker, model, tmp_path):
    """download() writes every result file, byte for byte, and leaves no part files."""
    drain(worker)
    job = Client(server.url).submit(model[0], data=model[1])
    files = resultFiles()
    worker.runFit(worker.lease(), files=files)
    paths = job.download(str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == sorted(files)
    for name, data in files.items():
        with open(tmp_path / "out" / name, "rb") as f:
            assert f.read() == data
    assert sorted(os.listdir(tmp_path / "out")) == sorted(files)


class CuttingProxy:
    """A loopback TCP proxy that breaks the first answer longer than
    ``cutAfter`` bytes: the connection is closed part way through it."""

    def __init__(self, upstreamPort, cutAfter):
        self.upstreamPort = upstreamPort
        self.cutAfter = cutAfter
        self.cuts = 0
        self.requests = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.upstreamPort))
        request = client.recv(65536)
        self.requests.append(request)
        upstream.sendall(request)
        budget = self.cutAfter if self.cuts == 0 else None
        sent = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if budget is not None and sent + len(data) > budget:
                    client.sendall(data[:budget - sent])
                    self.cuts += 1
                    break
                client.sendall(data)
                sent += len(data)
        finally:
            client.close()
            upstream.close()

    def close(self):
        self.listener.close()


def test_downloadResumesABrokenTransferWithRange(server, worker, model, tmp_path):
    """A download whose connection breaks part way is resumed with a Range
    request from where it stopped, and the file is whole."""
    drain(worker)
    job = Client(server.url).submit(model[0], data=model[1])
    big = os.urandom(600_000)
    worker.runFit(worker.lease(), files={"big.bin": big})
    proxy = CuttingProxy(server.port, cutAfter=200_000)
    try:
        proxied = Job(Client("http://127.0.0.1:%d" % (proxy.port,)), job.id)
        paths = proxied.download(str(tmp_path / "out"))
    finally:
        proxy.close()
    with open(paths[0], "rb") as f:
        assert f.read() == big
    assert proxy.cuts == 1
    ranged = [r for r in proxy.requests if b"\r\nRange: bytes=" in r]
    assert len(ranged) == 1
    offset = int(re.search(rb"Range: bytes=(\d+)-", ranged[0]).group(1))
    assert 0 < offset < len(big)


def test_downloadCompletesAPartFileLeftByAnEarlierAttempt(server, worker, model, tmp_path):
    """A part file from an interrupted download is continued from its end
    (its bytes are kept, not fetched again)."""
    drain(worker)
    job = Client(server.url).submit(model[0], data=model[1])
    data = bytes(range(256)) * 400
    worker.runFit(worker.lease(), files={"data.bin": data})
    out = tmp_path / "out"
    out.mkdir()
    marker = b"\xff" * 1000
    (out / (".data.bin.%d.part" % (job.id,))).write_bytes(marker)
    paths = job.download(str(out))
    with open(paths[0], "rb") as f:
        assert f.read() == marker + data[1000:]


def test_cancelAndDelete(server, worker, model):
    """cancel() ends a PENDING job at once as CANCEL; delete() removes it, and
    the job is then unknown."""
    drain(worker)
    client = Client(server.url)
    job = client.submit(model[0], data=model[1])
    assert job.cancel() == "CANCEL"
    assert job.status == "CANCEL"
    job.delete()
    with pytest.raises(UnknownJob):
        client.job(job.id)


def test_jobsFiltersByStatusNewestFirst(server, worker, model):
    """jobs(status=…) lists only jobs of that status, newest first."""
    drain(worker)
    client = Client(server.url)
    first = client.submit(model[0], data=model[1])
    second = client.submit(model[0], data=model[1])
    pending = [j.id for j in client.jobs(status="PENDING")]
    assert pending[:2] == [second.id, first.id]
    assert all(j.record["status"] == "PENDING" for j in client.jobs(status="PENDING"))
    first.cancel()
    assert first.id not in [j.id for j in client.jobs(status="PENDING")]
    assert first.id in [j.id for j in client.jobs(status="CANCEL")]
    second.cancel()


def test_unknownJobAndRefusedRequestsAreClientErrors(server, model, tmp_path):
    """An unknown id raises UnknownJob; a refused request raises ClientError
    with the server's message; a missing local file is refused before sending."""
    client = Client(server.url)
    with pytest.raises(UnknownJob):
        client.job(999999)
    with pytest.raises(ClientError, match="no such file"):
        client.submit(str(tmp_path / "missing.py"))
    with pytest.raises(ClientError, match="never unpickles"):
        client.submit(model[0], service="fitter")


def test_unreachableServerIsServerUnreachable():
    """A port with nothing listening raises ServerUnreachable, not a socket error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        Client("http://127.0.0.1:%d" % (port,)).jobs()


def test_legacyModeSubmitsInlineAndReadsStatusResultsAndFiles(server, worker, model, tmp_path):
    """legacy=True submits through POST /jobs.json with the files inline
    (text as text, binary as base64) and reads status, results and files
    through the old routes."""
    drain(worker)
    binary = tmp_path / "fit" / "raw.bin"
    binary.write_bytes(bytes(range(256)))
    client = Client(server.url, legacy=True)
    job = client.submit(model[0], data=model[1] + [str(binary)], fit="lm")
    assert job.status == "PENDING"
    lease = worker.lease()
    assert lease["id"] == job.id
    assert lease["request"]["data"]["model"] == "nifilm.py"
    assert Job(Client(server.url), job.id).read("raw.bin", kind="upload") == bytes(range(256))
    with open(model[0], "rb") as f:
        assert Job(Client(server.url), job.id).read("nifilm.py", kind="upload") == f.read()
    worker.runFit(lease, files={"nifilm.par": b"p 1\n"})
    assert job.wait(timeout=30) == "COMPLETE"
    assert job.result["chisq"] == RESULT["chisq"]
    paths = job.download(str(tmp_path / "out"))
    assert [os.path.basename(p) for p in paths] == ["nifilm.par"]
    job.delete()
    with pytest.raises(UnknownJob):
        job.status
