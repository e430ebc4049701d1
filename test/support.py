"""Plain helpers shared by the test modules (no fixtures, no daemons: those are
in conftest.py). Tests import them as ``from test.support import …`` and never
from one another.

- `FakeWorker`: a worker made of plain HTTP calls, so a test decides when a job
  starts, reports progress and ends; `RESULT`, `progressAt`, `resultFiles` are what
  it reports and uploads.
- `pngBytes`: a small valid PNG, written without any library.
- `writeModel`: a model script and data files in a folder, to submit.
- `runInThread`: run a blocking call beside the test; ``join()`` re-raises its error.
"""

import contextlib
import json
import os
import struct
import threading
import urllib.request
import zlib

RESULT = {
    "fitter": "lm", "steps": 3, "chisq": 1.0312, "seed": 243896112, "elapsed": 0.9,
    "parameters": {"Ni thickness": {"value": 100.12, "uncertainty": 0.31},
                   "Ni interface": {"value": 4.9, "uncertainty": None}},
}


def progressAt(step):
    """The progress a fit reports at ``step``: χ² falling, thickness rising."""
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
    """``{name: bytes}`` like a refl1d fit's output: two plots, the parameters, the logs."""
    return {
        "nifilm-1-refl.png": pngBytes(),
        "nifilm-1-profile.png": pngBytes(90, 60),
        "nifilm.par": b"Ni thickness 100.12\nNi interface 4.9\n",
        "stdout.txt": b"".join(b"line %d of the fit\n" % i for i in range(300)),
        "stderr.txt": b"a warning\n",
    }


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

    def drain(self):
        """Lease and end whatever is still pending, so a test on a shared server
        starts with an empty queue."""
        while True:
            status, lease = self._send("POST", "/api/v1/queues/%s/lease?timeout=0" % (self.queue,))
            if status != 200:
                return
            self.complete(lease, "ERROR", error="drained")

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


def sessionGenerations(path):
    """The DREAM generations in a session file (a fit's checkpoint); 0 when
    it is missing, unreadable (being written) or holds no sampler state (the
    save at the fit's start)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            state = h5.get("fitting/fit_state")
            if state is None or "total_generations" not in state:
                return 0
            return int(state["total_generations"][()])
    except (OSError, KeyError, ValueError):
        return 0


@contextlib.contextmanager
def reaped(process):
    """``with reaped(Popen(…)) as process:`` the child, killed and reaped if it
    still runs when the block ends (a failed assertion leaves no process behind)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
