"""The Python client against a real server: ``twistd -n reflservd`` on a
loopback port (conftest's module-wide ``server``), and a fake worker that
leases and completes jobs through the worker routes (``worker``).
"""

import math
import os
import re
import socket
import threading
from decimal import MAX_EMAX, Context, Decimal, localcontext

import pytest
from hypothesis import given, strategies as st

from reflservd.client import Client, ClientError, Job, ServerUnreachable, UnknownJob, WaitTimeout
from reflservd.format import displayText, formatDuration, formatValue
from test.conftest import freePort
from test.support import RESULT, resultFiles, runInThread


# ---- the tests


def test_submitSendsTheRequestAndTheFiles(server, worker, model):
    """submit() sends the documented request (model's base name, options,
    service, client version) and every file as a 'file' part; the worker
    sees exactly those bytes."""
    worker.drain()
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
    worker.drain()
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
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    with pytest.raises(WaitTimeout):
        job.wait(timeout=0.5)
    assert job.status == "PENDING"
    job.cancel()


def test_downloadFetchesEveryResultFileWithItsSize(server, worker, model, tmp_path):
    """download() writes every result file, byte for byte, and leaves no part files."""
    worker.drain()
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
    worker.drain()
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
    worker.drain()
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
    worker.drain()
    client = Client(server.url)
    job = client.submit(model[0], data=model[1])
    assert job.cancel() == "CANCEL"
    assert job.status == "CANCEL"
    job.delete()
    with pytest.raises(UnknownJob):
        client.job(job.id)


def test_jobsFiltersByStatusNewestFirst(server, worker, model):
    """jobs(status=…) lists only jobs of that status, newest first."""
    worker.drain()
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
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        Client("http://127.0.0.1:%d" % (freePort(),)).jobs()


def test_legacyModeSubmitsInlineAndReadsStatusResultsAndFiles(server, worker, model, tmp_path):
    """legacy=True submits through POST /jobs.json with the files inline
    (text as text, binary as base64) and reads status, results and files
    through the old routes."""
    worker.drain()
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


# ---- the text of a job's values (pages, mails and reflq show them through these)


def test_formatValueGivesTheUncertaintyTwoDigitsAndTheValueTheSamePlace():
    """Honest results, among them 1.5 ± 5e-5 (which once recursed without end)."""
    assert formatValue(1.5, 5e-5) == "1.500000 ± 0.000050"
    assert formatValue(100.12, 0.31) == "100.12 ± 0.31"
    assert formatValue(-2.5, 0.0996) == "-2.50 ± 0.10"
    assert formatValue(3e-7, 2e-9) == "(3.000 ± 0.020)e-7"
    assert formatValue(1234567.0, 1200.0) == "(1.2346 ± 0.0012)e+6"
    assert formatValue(0.0, 0.5) == "0.00 ± 0.50"
    assert formatValue(1e300, 1e-300) == "1e+300 ± 1.0e-300"
    assert formatValue(4.9, None) == "4.9" and formatValue(4.9, -1.0) == "4.9"
    assert formatValue(243896112) == "243896112"
    assert formatValue(10 ** 30, 3) == "%d ± 3.0e+0" % (10 ** 30,)
    assert formatValue(float("nan"), 1.0) == "nan" and formatValue(1.0, float("inf")) == "1"


def _shown(text):
    """``(value, uncertainty)`` as Decimals from formatValue's text, and
    whether it wrote them apart."""
    scaled = re.fullmatch(r"\((\S+) ± (\S+)\)e([+-]\d+)", text)
    if scaled:
        exponent = int(scaled.group(3))
        return Decimal(scaled.group(1)).scaleb(exponent), Decimal(scaled.group(2)).scaleb(exponent), False
    value, spread = re.fullmatch(r"(\S+) ± (\S+)", text).groups()
    return Decimal(value), Decimal(spread), "e" in spread


@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True))
def test_formatValueEndsAndRoundsRightForEveryPairOfFloats(value, uncertainty):
    """For every pair of floats (finite or not, subnormal or huge) formatValue
    returns text; with a finite positive uncertainty the uncertainty shown has
    at most two significant digits and is within rounding of the true one,
    and the value shown is within half a unit of the uncertainty's last digit."""
    text = formatValue(value, uncertainty)
    assert isinstance(text, str) and text
    if not math.isfinite(value):
        assert text == repr(value)
        return
    if not (math.isfinite(uncertainty) and uncertainty > 0):
        assert text == "%.6g" % (value,)
        return
    with localcontext(Context(prec=2000, Emin=-MAX_EMAX, Emax=MAX_EMAX)):
        shownValue, shownSpread, apart = _shown(text)
        assert shownSpread > 0
        assert len(shownSpread.normalize().as_tuple().digits) <= 2
        assert abs(shownSpread - Decimal(uncertainty)) <= shownSpread / 20
        if apart:
            assert text.split(" ± ")[0] == "%.6g" % (value,)
        else:
            assert abs(shownValue - Decimal(value)) <= shownSpread / 20


@pytest.mark.parametrize("value, expected", [
    ("fit \ud800 one", "fit \ufffd one"),
    ({"model": {"a": [1, 2.5]}, "x\udfff": None}, '{"model":{"a":[1,2.5]},"x\ufffd":null}'),
    ([1, "two", float("nan")], '[1,"two",NaN]'),
    (float("inf"), "inf"), (1.5, "1.5"), (10 ** 40, str(10 ** 40)), (True, "true"), (None, ""),
])
def test_displayTextMakesAnyJSONValueText(value, expected):
    """Any value a job may carry becomes text that encodes as UTF-8 (no lone
    surrogate survives), objects and lists as JSON."""
    text = displayText(value)
    assert text == expected
    text.encode("utf-8")


def test_displayTextClipsAndNamesWhatItCannotWrite():
    """``limit`` clips with an ellipsis; what cannot be written (an integer
    past Python's digit limit, a list too deep) is named instead of raising."""
    assert displayText("abcdef", limit=4) == "abc…"
    assert displayText(10 ** 5000) == "(an integer of %d bits)" % ((10 ** 5000).bit_length(),)
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert displayText(deep) == "(list)"
    assert displayText(None, "–") == "–"


def test_formatDurationIsMissingForWhatIsNotAFiniteNumber():
    """``elapsed`` and run times of any JSON type: only finite numbers are a duration."""
    assert formatDuration(3723.4) == "1:02:03" and formatDuration(3600 * 10 ** 30) == "%d:00:00" % (10 ** 30,)
    for value in ("a while", None, True, float("nan"), float("inf"), {"s": 1}, [1]):
        assert formatDuration(value, "–") == "–"
