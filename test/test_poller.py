"""The worker's pulling and reporting side (reflworkerd.poller), in memory.

A small Klein server that records every call stands in for reflservd
(``FakeServer``), reached through StubTreq; a switch in front of it plays a
server that is down. The backend is a fake with the `backend.IBackend`
interface, and time is a `Clock`: the backoff sequence, the heartbeat rate
and the lease timeouts are read off the clock, never waited for.
"""

import json
import os
import shutil
import tempfile

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage

from reflworkerd import outcome, tap
from reflworkerd.poller import Poller
from reflworkerd.serverclient import Backoff, ServerClient

URL = "http://reflservd.test"


class FakeServer:
    """The worker routes of docs/api.md, recording calls; the test decides the answers."""

    app = Klein()

    def __init__(self):
        self.calls = []
        self.leaseWaiters = []
        self.uploads = {}
        self.results = {}
        self.cancel = set()
        self.codes = {}          # (route, jobId) -> status code to answer instead
        self.leaseTimeout = 30.0
        self.heldPuts = None     # a list: PUT answers wait there until the test releases them

    def record(self, request, route, jobId=None):
        body = request.content.read()
        entry = {"route": route, "id": jobId, "method": request.method.decode(),
                 "args": {k.decode(): v[0].decode() for k, v in request.args.items()},
                 "auth": (request.getHeader(b"authorization") or b"").decode(),
                 "body": body}
        if request.getHeader(b"content-type") == b"application/json" and body:
            entry["json"] = json.loads(body)
        self.calls.append(entry)
        return entry

    def of(self, route):
        return [c for c in self.calls if c["route"] == route]

    def refused(self, request, route, jobId):
        code = self.codes.get((route, jobId))
        if code is None:
            return None
        request.setResponseCode(code)
        return json.dumps({"error": "refused with %d" % (code,)}).encode()

    @app.route("/api/v1/queues/<string:queue>/lease", methods=["POST"])
    def lease(self, request, queue):
        self.record(request, "lease")

        def cancel(d):
            if d in self.leaseWaiters:
                self.leaseWaiters.remove(d)

        d = defer.Deferred(cancel)
        self.leaseWaiters.append(d)

        def answer(record):
            if record is None:
                request.setResponseCode(204)
                return b""
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(record).encode()

        return d.addCallback(answer)

    def grant(self, jobId, lease=1, files=None, request=None, checkpoint=None):
        """Answer the oldest lease long-poll with this job (and, with ``checkpoint``
        bytes, a stored ``session.h5`` result of an earlier attempt)."""
        files = files if files is not None else {"model.py": b"print('fit')\n"}
        for name, data in files.items():
            self.uploads[(jobId, name)] = data
        record = {"id": jobId, "lease": lease, "attempts": lease,
                  "request": request or {"service": "refl1d", "data": {"model": "model.py"}},
                  "files": [[n, len(d)] for n, d in files.items()],
                  "leaseTimeout": self.leaseTimeout}
        if checkpoint is not None:
            self.results[(jobId, "session.h5")] = checkpoint
            record["checkpoint"] = "session.h5"
        self.leaseWaiters.pop(0).callback(record)

    def noJob(self):
        self.leaseWaiters.pop(0).callback(None)

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["GET"])
    def download(self, request, jobId, name):
        entry = self.record(request, "download", jobId)
        refused = self.refused(request, "download", jobId)
        if refused is not None:
            return refused
        files = self.results if entry["args"].get("kind") == "result" else self.uploads
        if (jobId, name) not in files:
            request.setResponseCode(404)
            return b'{"error": "no such file"}'
        return files[(jobId, name)]

    @app.route("/api/v1/jobs/<int:jobId>/heartbeat", methods=["POST"])
    def heartbeat(self, request, jobId):
        self.record(request, "heartbeat", jobId)
        refused = self.refused(request, "heartbeat", jobId)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"cancel": jobId in self.cancel, "leaseTimeout": self.leaseTimeout}).encode()

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["PUT"])
    def putFile(self, request, jobId, name):
        entry = self.record(request, "put", jobId)
        refused = self.refused(request, "put", jobId)
        if refused is not None:
            return refused
        offset = int(entry["args"]["offset"])
        have = self.results.get((jobId, name), b"")[:offset]
        self.results[(jobId, name)] = have + entry["body"]
        request.setResponseCode(201 if entry["args"].get("last") == "1" else 202)
        if self.heldPuts is not None:
            held = defer.Deferred()
            self.heldPuts.append(held)
            return held.addCallback(lambda _: b"{}")
        return b"{}"

    @app.route("/api/v1/jobs/<int:jobId>/complete", methods=["POST"])
    def complete(self, request, jobId):
        self.record(request, "complete", jobId)
        return self.refused(request, "complete", jobId) or b"{}"

    @app.route("/api/v1/jobs/<int:jobId>/release", methods=["POST"])
    def release(self, request, jobId):
        self.record(request, "release", jobId)
        return self.refused(request, "release", jobId) or b"{}"


class Switch:
    """An HTTP client in front of StubTreq that can play a server that is down."""

    def __init__(self, stub):
        self.stub = stub
        self.down = False
        self.timeouts = []
        self.hold = None         # a method whose requests wait in self.held until released
        self.held = []

    def request(self, method, url, **kwargs):
        self.timeouts.append(kwargs.get("timeout"))
        assert kwargs.get("reactor") is not None, "every request names its reactor"
        if self.down:
            return defer.fail(ConnectionRefusedError("the server is down"))
        if method == self.hold:
            waiting = defer.Deferred()
            waiting.addCallback(lambda _: self.stub.request(method, url, **kwargs))
            self.held.append(waiting)
            return waiting
        return self.stub.request(method, url, **kwargs)

    def release(self):
        self.hold = None
        held, self.held = self.held, []
        for waiting in held:
            waiting.callback(None)


class FakeRun:
    survives = False

    def __init__(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        self.jobId, self.jobDir, self.request, self.onProgress = jobId, jobDir, request, onProgress
        self.onCheckpoint, self.uid, self.gid = onCheckpoint, uid, gid
        self.done = defer.Deferred()
        self.cancels = []
        self.aborts = []
        self.confinement = ""

    def cancel(self, grace=5.0):
        self.cancels.append(grace)

    def abort(self, why):
        self.aborts.append(why)

    def finish(self, status="COMPLETE", files=None, result=None):
        """End the fit, leaving ``files`` in results/ (the fit's uid's, as a confined fit's are)."""
        folder = os.path.join(self.jobDir, "results")
        os.makedirs(folder, exist_ok=True)
        for name, data in (files or {}).items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            if self.uid is not None:
                os.chown(os.path.join(folder, name), self.uid, self.uid)
        self.done.callback({"status": status, "result": result, "error": None, "trace": None,
                            "confinement": self.confinement})


class FakeBackend(service.Service):
    """The `backend.IBackend` interface, as a service; ``survive``: its fits outlive
    the worker (as Slurm's do), ``surviving`` the job ids a previous run left."""

    def __init__(self):
        self.runs = []
        self.stopped = False
        self.survive = False
        self.surviving = set()
        self.adopted = []
        self.forgotten = []

    def stopService(self):
        service.Service.stopService(self)
        self.stopped = True

    def whenReady(self):
        return defer.succeed(None)

    def survivors(self):
        return frozenset(self.surviving)

    def run(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        fitRun = FakeRun(jobId, jobDir, request, onProgress, onCheckpoint, uid, gid)
        fitRun.survives = self.survive
        self.runs.append(fitRun)
        return fitRun

    def adopt(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        self.surviving.remove(jobId)
        fitRun = self.run(jobId, jobDir, request, onProgress, onCheckpoint, uid, gid)
        self.adopted.append(fitRun)
        return fitRun

    def forgetSurvivors(self):
        self.forgotten.extend(sorted(self.surviving))
        self.surviving = set()


class World:
    """A poller wired to the fake server, the fake backend and a clock."""

    def __init__(self, workDir, **kwargs):
        self.clock = Clock()
        self.server = FakeServer()
        self.stub = StubTreq(self.server.app.resource())
        self.http = Switch(self.stub)
        self.client = ServerClient(self.clock, self.http, URL, token="sekrit")
        self.backend = FakeBackend()
        self.workDir = str(workDir)
        kwargs.setdefault("random", lambda: 1.0)
        kwargs.setdefault("inThread", lambda f, *args: defer.maybeDeferred(f, *args))
        self.poller = Poller(self.clock, self.client, self.backend, "q1", self.workDir,
                             workerName="test:1", **kwargs)
        self.top = tap.WorkerService()
        self.backend.setServiceParent(self.top)
        self.poller.setServiceParent(self.top)

    def start(self):
        self.top.startService()
        self.pump()

    def pump(self):
        for _ in range(5):
            self.stub.flush()
            self.clock.advance(0)

    def advance(self, seconds, step=0.05):
        """Move the clock on in small steps, letting the stub deliver between them."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.pump()

    def jobDir(self, jobId):
        return os.path.join(self.workDir, "jobs", str(jobId))


@pytest.fixture
def world(tmp_path):
    def make(**kwargs):
        w = World(tmp_path / "work", **kwargs)
        w.start()
        return w
    return make


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def messages(events, word):
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if word in formatEvent(e)]


# ---- pulling


def test_one_long_poll_per_free_slot(world):
    """Each free slot holds exactly one lease long-poll; a busy slot holds none."""
    w = world(slots=2)
    assert len(w.server.leaseWaiters) == 2
    w.server.grant(1)
    w.pump()
    assert len(w.server.leaseWaiters) == 1
    assert len(w.backend.runs) == 1
    w.server.grant(2)
    w.pump()
    assert len(w.server.leaseWaiters) == 0
    assert len(w.server.of("lease")) == 2
    w.backend.runs[0].finish()
    w.pump()
    assert len(w.server.leaseWaiters) == 1
    assert len(w.server.of("lease")) == 3


def test_lease_asks_the_poll_timeout_and_names_the_worker(world):
    """The long-poll carries ?timeout=, the worker's name and the bearer token;
    treq's own timeout is the poll's plus a margin."""
    w = world(pollTimeout=25.0)
    call = w.server.of("lease")[0]
    assert call["args"]["timeout"] == "25"
    assert call["json"] == {"worker": "test:1"}
    assert call["auth"] == "Bearer sekrit"
    assert w.http.timeouts[0] > 25.0


def test_empty_long_poll_repolls_at_once(world):
    """A 204 after the full poll timeout is answered with the next long-poll at once."""
    w = world(pollTimeout=30.0)
    w.clock.advance(30.0)
    w.server.noJob()
    w.pump()
    assert len(w.server.of("lease")) == 2
    assert len(w.server.leaseWaiters) == 1


def test_quick_empty_answers_do_not_busy_loop(world):
    """A server answering 204 at once (e.g. while it stops) is polled with backoff, not in a loop."""
    w = world(pollTimeout=30.0)
    times = []
    for _ in range(4):
        times.append(w.clock.seconds())
        w.server.noJob()
        w.pump()
        assert not w.server.leaseWaiters
        while not w.server.leaseWaiters:
            w.advance(0.05)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([0.5, 1.0, 2.0], abs=0.06)


def test_backoff_doubles_to_its_cap_with_jitter_from_the_injected_random():
    """0.5 s doubling to 30 s; each delay drawn in [d/2, d) by the injected random."""
    full = Backoff(0.5, 30.0, random=lambda: 1.0)
    assert [full.next() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    half = Backoff(0.5, 30.0, random=lambda: 0.0)
    assert [half.next() for _ in range(3)] == [0.25, 0.5, 1.0]
    full.reset()
    assert full.next() == 0.5


def test_server_down_backs_off_from_half_a_second_to_thirty(tmp_path):
    """Leases to an unreachable server are retried after 0.5, 1, 2, 4, 8, 16, 30, 30 s."""
    w = World(tmp_path / "work")
    w.http.down = True
    w.start()
    times = [0.0]
    for _ in range(int(130 / 0.05)):
        w.clock.advance(0.05)
        while len(times) < len(w.http.timeouts):
            times.append(w.clock.seconds())
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    assert gaps[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_server_down_is_logged_once_and_its_return_once(world, logged):
    """An outage is logged once when it starts and once when it ends, not at every try."""
    w = world()
    w.http.down = True
    w.server.noJob()
    w.advance(200.0, step=0.5)
    assert len(w.http.timeouts) > 6
    assert len(messages(logged, "unreachable")) == 1
    w.http.down = False
    w.advance(31.0, step=0.5)
    assert len(w.server.leaseWaiters) == 1
    w.server.grant(1)
    w.pump()
    assert len(messages(logged, "reachable again")) == 1
    assert len(messages(logged, "unreachable")) == 1


# ---- one job


def test_uploads_are_downloaded_into_the_job_directory(world):
    """Every upload of the lease lands in workDir/jobs/<id>/ before the fit runs there."""
    w = world()
    w.server.grant(7, files={"model.py": b"x = 1\n", "data.dat": b"1 2 3\n" * 1000})
    w.pump()
    fitRun = w.backend.runs[0]
    assert fitRun.jobDir == w.jobDir(7)
    with open(os.path.join(fitRun.jobDir, "data.dat"), "rb") as f:
        assert f.read() == b"1 2 3\n" * 1000
    assert sorted(c["args"]["kind"] for c in w.server.of("download")) == ["upload", "upload"]


def test_progress_heartbeats_at_most_once_a_second_latest_wins(world):
    """Ten progress reports within a second make one heartbeat now and one a
    second later carrying the latest report."""
    w = world()
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    for step in range(10):
        fitRun.onProgress({"step": step})
        w.advance(0.05)
    beats = w.server.of("heartbeat")
    assert [b["json"].get("progress") for b in beats] == [{"step": 0}]
    w.advance(0.6)
    beats = w.server.of("heartbeat")
    assert [b["json"].get("progress") for b in beats] == [{"step": 0}, {"step": 9}]
    assert all(b["json"]["lease"] == 1 for b in beats)


def test_progress_leaves_at_most_ten_times_a_second_whatever_is_asked(world):
    """The progress rate limit has a floor: a poller asked for none still sends
    a job's progress at most every 0.1 s."""
    w = world(progressInterval=0.0)
    assert w.poller.progressInterval == 0.1


def test_heartbeats_keep_the_lease_without_progress(world):
    """With no progress a heartbeat still goes every third of the lease timeout."""
    w = world()
    w.server.leaseTimeout = 6.0
    w.server.grant(1)
    w.pump()
    w.advance(7.0, step=0.25)
    beats = w.server.of("heartbeat")
    assert len(beats) == 3
    assert all("progress" not in b["json"] for b in beats)


def test_confinement_goes_with_a_heartbeat_once(world):
    """What confines the fit is reported in a heartbeat once it is known, then not repeated."""
    w = world()
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    fitRun.confinement = "namespaces+rlimits"
    fitRun.onProgress({"step": 1})
    w.advance(1.5)
    fitRun.onProgress({"step": 2})
    w.advance(1.5)
    sent = [b["json"].get("confinement") for b in w.server.of("heartbeat")]
    assert sent == ["namespaces+rlimits", None]


def test_cancel_in_a_heartbeat_answer_cancels_the_fit_and_reports_cancel(world):
    """A heartbeat answering cancel cancels the fit; its CANCEL outcome is completed."""
    w = world()
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    w.server.cancel.add(1)
    fitRun.onProgress({"step": 3})
    w.pump()
    assert fitRun.cancels == [5.0]
    fitRun.finish("CANCEL", files={"stdout.txt": b"partial\n"})
    w.pump()
    complete = w.server.of("complete")
    assert [c["json"]["status"] for c in complete] == ["CANCEL"]
    assert w.server.results[(1, "stdout.txt")] == b"partial\n"


@pytest.mark.parametrize("code", [409, 404])
def test_stale_heartbeat_drops_the_job(world, code):
    """A heartbeat refused as stale (409) or unknown (404) cancels the fit and
    drops the job: nothing is uploaded or completed, its directory goes."""
    w = world()
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    w.server.codes[("heartbeat", 1)] = code
    fitRun.onProgress({"step": 1})
    w.pump()
    assert fitRun.cancels == [5.0]
    fitRun.finish("CANCEL", files={"x.par": b"1"})
    w.advance(60.0, step=1.0)
    assert not w.server.of("put") and not w.server.of("complete")
    assert not os.path.exists(w.jobDir(1))
    assert not os.listdir(os.path.join(w.workDir, "jobs"))
    assert len(w.server.leaseWaiters) == 1


def test_results_are_uploaded_in_bounded_parts_then_completed(world):
    """Every result file goes in parts of at most partSize bytes, then the
    complete with the lease token and the outcome; then the job directory goes."""
    w = world(partSize=10)
    w.server.grant(3, lease=2)
    w.pump()
    w.backend.runs[0].finish(files={"fit.par": b"a" * 25, "empty.txt": b"", "x.dat": b"b" * 10},
                            result={"chisq": 1.0})
    w.pump()
    parts = [(c["args"]["offset"], c["args"].get("last"), len(c["body"]))
             for c in w.server.of("put")]
    assert parts == [("0", "1", 0),                                       # empty.txt
                     ("0", None, 10), ("10", None, 10), ("20", "1", 5),   # fit.par
                     ("0", "1", 10)]                                      # x.dat
    assert w.server.results[(3, "fit.par")] == b"a" * 25
    assert w.server.results[(3, "empty.txt")] == b""
    assert w.server.results[(3, "x.dat")] == b"b" * 10
    assert all(c["args"]["lease"] == "2" for c in w.server.of("put"))
    complete = w.server.of("complete")
    assert len(complete) == 1
    assert complete[0]["json"] == {"lease": 2, "status": "COMPLETE", "result": {"chisq": 1.0}}
    assert w.server.calls[-1]["route"] in ("complete", "lease")
    assert not os.path.exists(w.jobDir(3))


def test_results_wait_on_disk_until_the_server_acknowledges(world):
    """A fit that ends while the server is down keeps its results on disk and
    retries with backoff; they are delivered once the server is back."""
    w = world()
    w.server.grant(4)
    w.pump()
    w.http.down = True
    w.backend.runs[0].finish(files={"fit.par": b"thickness 100\n"}, result={"chisq": 1.0})
    w.advance(120.0, step=0.5)
    assert not w.server.of("complete")
    assert os.path.exists(os.path.join(w.jobDir(4), "results", "fit.par"))
    with open(w.jobDir(4) + ".json") as f:
        assert json.load(f)["outcome"]["result"] == {"chisq": 1.0}
    w.http.down = False
    w.advance(31.0, step=0.5)
    assert len(w.server.of("complete")) == 1
    assert w.server.results[(4, "fit.par")] == b"thickness 100\n"
    assert not os.path.exists(w.jobDir(4))
    assert not os.path.exists(w.jobDir(4) + ".json")


def test_server_errors_on_complete_are_retried(world):
    """A 503 on complete (journal not writable) is retried until it is accepted."""
    w = world()
    w.server.grant(5)
    w.pump()
    w.server.codes[("complete", 5)] = 503
    w.backend.runs[0].finish()
    w.advance(5.0)
    tried = len(w.server.of("complete"))
    assert tried >= 2
    del w.server.codes[("complete", 5)]
    w.advance(20.0)
    assert len(w.server.of("complete")) == tried + 1
    assert not os.path.exists(w.jobDir(5))


def test_stale_complete_drops_quietly(world, logged):
    """A 409 on complete (the lease went elsewhere) drops the job: no retry, no error logged."""
    w = world()
    w.server.grant(6)
    w.pump()
    w.server.codes[("complete", 6)] = 409
    w.backend.runs[0].finish(files={"a": b"1"})
    w.advance(60.0, step=1.0)
    assert len(w.server.of("complete")) == 1
    assert not os.path.exists(w.jobDir(6))
    from twisted.logger import LogLevel
    assert not [e for e in logged if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


def test_links_left_by_a_fit_are_not_uploaded(world, tmp_path):
    """A hostile fit's symlink in results/ pointing at the worker's files is never
    read: the job ends ERROR naming it; its plain files still go up."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"worker secret")
    w = world()
    w.server.grant(8)
    w.pump()
    fitRun = w.backend.runs[0]
    os.makedirs(os.path.join(fitRun.jobDir, "results"))
    os.symlink(str(secret), os.path.join(fitRun.jobDir, "results", "leak.txt"))
    fitRun.finish(files={"ok.par": b"1"})
    w.pump()
    assert (8, "leak.txt") not in w.server.results
    assert w.server.results[(8, "ok.par")] == b"1"
    [complete] = w.server.of("complete")
    assert complete["json"]["status"] == "ERROR"
    assert complete["json"]["error"] == ("the fit left what the worker does not read: "
                                         "results/leak.txt is a symbolic link")


def test_results_past_the_quota_end_the_job_error_keeping_what_fits(world):
    """More result files than the quota: the job ends ERROR naming the limit and
    the files left out; stdout.txt and stderr.txt are kept first, then by name."""
    w = world(resultFilesQuota=3, resultBytesQuota=1 << 20)
    w.server.grant(1)
    w.pump()
    files = {"f%02d" % n: b"x" for n in range(5)}
    files.update({"stdout.txt": b"out", "stderr.txt": b"err"})
    w.backend.runs[0].finish(files=files)
    w.pump()
    assert sorted(name for job, name in w.server.results) == ["f00", "stderr.txt", "stdout.txt"]
    [complete] = w.server.of("complete")
    assert complete["json"]["status"] == "ERROR"
    assert complete["json"]["error"].startswith(
        "results over the quota of 3 files per job; 4 file(s) left out (f01, f02, f03, f04), 3 kept")


def test_results_past_the_byte_quota_count_sparse_files_whole(world):
    """A sparse file counts by its apparent size: one past the byte quota is left out."""
    w = world(resultBytesQuota=1 << 20)
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    folder = os.path.join(fitRun.jobDir, "results")
    os.makedirs(folder)
    with open(os.path.join(folder, "sparse.bin"), "wb") as f:
        f.truncate(2 << 20)
    fitRun.finish(files={"fit.par": b"p"})
    w.pump()
    assert sorted(name for job, name in w.server.results) == ["fit.par"]
    [complete] = w.server.of("complete")
    assert "results over the quota of 1048576 bytes per job; 1 file(s) left out (sparse.bin)" in (
        complete["json"]["error"])


def test_a_413_on_upload_ends_the_job_error_with_the_servers_message(world):
    """The server over its own quota answers 413: the worker sends no more files
    and completes the job ERROR with the server's message."""
    w = world()
    w.server.grant(1)
    w.pump()
    w.server.codes[("put", 1)] = 413
    w.backend.runs[0].finish(files={"a.par": b"1", "b.par": b"2", "c.par": b"3", "d.par": b"4",
                                   "e.par": b"5", "f.par": b"6"})
    w.pump()
    assert len(w.server.of("put")) <= 4      # the first round only, none after the refusal
    [complete] = w.server.of("complete")
    assert complete["json"]["status"] == "ERROR"
    assert complete["json"]["error"].startswith("the server refused result file ")
    assert complete["json"]["error"].endswith(": refused with 413")


def test_an_unusable_checkpoint_ends_the_fit_error(world):
    """A checkpoint announced where the session file is a FIFO is not opened for
    reading (nothing blocks): the fit is aborted with a message that says what was found."""
    w = world()
    w.server.grant(1, request=DREAM)
    w.pump()
    fitRun = w.backend.runs[0]
    os.makedirs(os.path.join(fitRun.jobDir, "results"))
    os.mkfifo(os.path.join(fitRun.jobDir, "results", "session.h5"))
    fitRun.onCheckpoint("results/session.h5")
    w.pump()
    assert fitRun.aborts == ["its checkpoint cannot be used: results/session.h5 is a FIFO, "
                             "not a regular file"]
    assert not w.server.of("put")


def test_a_fit_keeps_running_while_the_server_is_down(world):
    """Heartbeats that fail do not touch the fit; they back off and resume, with
    the latest progress, when the server is back."""
    w = world()
    w.server.grant(9)
    w.pump()
    fitRun = w.backend.runs[0]
    w.http.down = True
    fitRun.onProgress({"step": 1})
    w.advance(40.0, step=0.5)
    fitRun.onProgress({"step": 2})
    assert fitRun.cancels == []
    w.http.down = False
    w.advance(15.0, step=0.5)
    beats = w.server.of("heartbeat")
    assert beats and beats[0]["json"]["progress"] == {"step": 2}


def test_an_undelivered_outcome_is_delivered_by_the_next_start(world, tmp_path):
    """A worker that stops before the server acknowledged leaves the outcome on
    disk; the next worker on that directory delivers it."""
    w = world(deliverGrace=5.0)
    w.server.grant(10, lease=3)
    w.pump()
    w.http.down = True
    w.backend.runs[0].finish(files={"fit.par": b"p"}, result={"chisq": 2.0})
    w.pump()
    stopped = w.top.stopService()
    w.advance(6.0)
    assert stopped.called
    assert os.path.exists(w.jobDir(10) + ".json")

    again = World(tmp_path / "work")
    again.start()
    complete = again.server.of("complete")
    assert [c["json"] for c in complete] == [{"lease": 3, "status": "COMPLETE", "result": {"chisq": 2.0}}]
    assert again.server.results[(10, "fit.par")] == b"p"
    assert not os.path.exists(again.jobDir(10))


def test_a_fit_lost_with_a_previous_run_is_released(world, tmp_path):
    """A job whose fit died with the previous worker process is handed back at start."""
    jobs = tmp_path / "work" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "11").mkdir()
    (jobs / "11.json").write_text(json.dumps({"id": 11, "lease": 1, "leaseTimeout": 30, "outcome": None}))
    (jobs / "12").mkdir()     # no state: a leftover
    w = world()
    assert [(c["id"], c["json"]) for c in w.server.of("release")] == [(11, {"lease": 1})]
    assert os.listdir(str(jobs)) == []


def test_a_fit_that_survives_the_worker_is_adopted_by_the_next_start(world, tmp_path):
    """A backend whose fits outlive the worker (Slurm): stopping leaves the fit
    running and its state on disk; the next start adopts it (no second fit, no
    hand-back), and delivers its outcome; a survivor no job holds is forgotten."""
    w = world()
    w.backend.survive = True
    w.server.grant(21, lease=4, request={"service": "refl1d",
                                         "data": {"model": "model.py", "options": {"fit": "dream"}}})
    w.pump()
    stopped = w.top.stopService()
    w.pump()
    assert stopped.called and w.backend.runs[0].cancels == []
    assert not w.server.of("release") and not w.server.of("complete")
    assert os.path.exists(w.jobDir(21)) and os.path.exists(w.jobDir(21) + ".json")

    again = World(tmp_path / "work")
    again.backend.surviving = {21, 99}
    again.start()
    assert [r.jobId for r in again.backend.adopted] == [21]
    assert again.backend.adopted[0].onCheckpoint is not None     # a DREAM fit: its request was kept
    assert again.backend.forgotten == [99]
    assert not again.server.of("release") and not again.server.of("download")
    again.backend.adopted[0].finish(result={"chisq": 1.5})
    again.pump()
    assert [c["json"] for c in again.server.of("complete")] == [
        {"lease": 4, "status": "COMPLETE", "result": {"chisq": 1.5}}]


def test_a_fit_lost_to_its_cluster_is_handed_back_with_the_attempt_counted(world):
    """A LOST outcome (a Slurm node failed) is never delivered: the job is released
    with why, which the server counts as an attempt."""
    w = world()
    w.server.grant(22, lease=2)
    w.pump()
    fitRun = w.backend.runs[0]
    fitRun.done.callback(outcome.lost("Slurm job 7 NODE_FAIL on n1"))
    w.pump()
    assert [c["json"] for c in w.server.of("release")] == [
        {"lease": 2, "lost": "Slurm job 7 NODE_FAIL on n1"}]
    assert not w.server.of("complete")
    assert not os.path.exists(w.jobDir(22))
    assert len(w.server.leaseWaiters) == 1


def test_a_job_leased_again_while_its_old_lease_ends_here_starts_after_it(world):
    """A job handed back (its fit lost) can be leased to this worker again before
    the old lease's files are gone: the new lease waits for them, then runs,
    holding the slot meanwhile (no lease is dropped and left to run out)."""
    held = []

    def inThread(f, *args):
        if getattr(f, "__name__", "") == "cleanUp":
            d = defer.Deferred()
            held.append((d, f))
            return d
        return defer.maybeDeferred(f, *args)

    w = world(inThread=inThread)
    w.server.grant(23, lease=1)
    w.pump()
    w.backend.runs[0].done.callback(outcome.lost("Slurm job 9 NODE_FAIL"))
    w.pump()
    assert [c["json"]["lease"] for c in w.server.of("release")] == [1]
    w.server.grant(23, lease=2)
    w.pump()
    assert len(w.backend.runs) == 1 and not w.server.leaseWaiters     # waiting, the slot taken
    for d, f in held:
        f()
        d.callback(None)
    w.pump()
    assert len(w.backend.runs) == 2 and w.poller.jobs[23].lease == 2
    w.backend.runs[1].finish(result={"chisq": 1.0})
    w.pump()
    assert [c["json"]["lease"] for c in w.server.of("complete")] == [2]


# ---- stopping


def test_drain_release_cancels_and_releases(world):
    """Stopping with drain=release stops polling, cancels the fit, releases the
    job, then the backend stops."""
    w = world(drain="release")
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    stopped = w.top.stopService()
    w.pump()
    assert not w.server.leaseWaiters
    assert fitRun.cancels == [5.0]
    assert not stopped.called
    fitRun.finish("CANCEL")
    w.pump()
    assert [c["json"] for c in w.server.of("release")] == [{"lease": 1}]
    assert not w.server.of("complete")
    assert stopped.called and w.backend.stopped


def test_drain_finish_waits_for_the_fit_and_delivers(world):
    """Stopping with drain=finish takes no new work but lets the fit end and delivers it."""
    w = world(drain="finish")
    w.server.grant(1)
    w.pump()
    stopped = w.top.stopService()
    w.pump()
    assert not w.server.leaseWaiters
    assert not stopped.called
    w.backend.runs[0].finish(files={"r.par": b"1"})
    w.pump()
    assert [c["json"]["status"] for c in w.server.of("complete")] == ["COMPLETE"]
    assert stopped.called and w.backend.stopped
    assert len(w.server.of("lease")) == 1


def test_polling_starts_only_once_the_backend_is_ready(tmp_path):
    """No lease is asked for before the fork server has preloaded."""
    w = World(tmp_path / "work")
    ready = defer.Deferred()
    w.backend.whenReady = lambda: ready
    w.start()
    assert not w.server.of("lease")
    ready.callback(None)
    w.pump()
    assert len(w.server.of("lease")) == 1


# ---- the tap


NONE = ("--sandbox", "none", "--slot-uid-base", "0")
"""--sandbox none, fits as the worker's uid: accepted as root wherever the checkout is."""


def parse(*args):
    options = tap.Options()
    options.parseOptions(["--server", "http://127.0.0.1:8080", "--queue", "q1", *args])
    return options


def test_tap_defaults():
    """One slot, 30 s polls, 60 s checkpoints, local backend, drain=finish; the
    shipped limits (a day of CPU and wall time, 4 GiB, 512 processes, 512 MiB
    files) and result quotas (500 files, 512 MiB), within the server's own."""
    options = parse(*NONE)
    assert options["slots"] == 1 and options["poll-timeout"] == 30.0
    assert options["checkpoint-every"] == 60.0
    assert options["backend"] == "local" and options["drain"] == "finish"
    assert options["limits"] == {"cpu": 86400, "memory": 4 << 30, "wall": 86400.0, "fsize": 512 << 20}
    assert options["limits-described"] == "rlimits(cpu=86400s,memory=4G,fsize=512M)+wall(86400s)"
    assert (options["result-files-quota"], options["result-bytes-quota"]) == (500, 512 << 20)
    assert options["result-files-quota"] <= 1000 and options["result-bytes-quota"] <= 1 << 30


def test_tap_process_limit_is_a_default_only_with_slot_uids(monkeypatch):
    """RLIMIT_NPROC counts every process of the fit's uid: 512 by default where each
    slot has its own uid, none by default where fits run as the worker's uid or root
    (whose other processes on the host count too); an explicit one always applies."""
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: mode)
    monkeypatch.setattr(tap.os, "geteuid", lambda: 0)
    assert parse("--sandbox", "namespaces")["limits"]["nproc"] == 512
    assert "nproc" not in parse("--sandbox", "namespaces", "--slot-uid-base", "0")["limits"]
    assert parse("--sandbox", "namespaces", "--slot-uid-base", "0", "--process-limit", "64")["limits"]["nproc"] == 64
    monkeypatch.setattr(tap.os, "geteuid", lambda: 1000)
    assert "nproc" not in parse("--sandbox", "namespaces")["limits"]


def test_tap_limits():
    """CPU, memory (with suffixes), wall, process and file-size limits become the
    fork server's limits."""
    options = parse(*NONE, "--cpu-limit", "10.5", "--memory-limit", "2G",
                    "--wall-limit", "60", "--process-limit", "64", "--file-size-limit", "16M")
    assert options["limits"] == {"cpu": 11, "memory": 2 << 30, "wall": 60.0, "nproc": 64,
                                 "fsize": 16 << 20}


@pytest.mark.parametrize("args, says", [
    (["--backend", "slurm"], "--shared-dir"),
    (["--sandbox", "chroot"], "--sandbox"),
    (["--slots", "0"], "--slots"),
    (["--drain", "abandon"], "--drain"),
    (["--poll-timeout", "0"], "--poll-timeout"),
    (["--process-limit", "0"], "--process-limit"),
    (["--file-size-limit", "1000"], "--file-size-limit"),
    (["--token-file", "/nonexistent/token"], "--token-file"),
])
def test_tap_refuses_with_a_usage_error(args, says):
    """Bad options are usage errors that name the option."""
    with pytest.raises(usage.UsageError, match=says):
        parse(*args)


def test_tap_needs_server_and_queue():
    with pytest.raises(usage.UsageError, match="--server"):
        tap.Options().parseOptions(["--queue", "q"])
    with pytest.raises(usage.UsageError, match="--queue"):
        tap.Options().parseOptions(["--server", "http://x"])


def test_tap_reads_the_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert parse(*NONE, "--token-file", str(token))["token"] == "s3cret"


def test_tap_service_tree(tmp_path):
    """makeService gives a MultiService holding the poller, configured from the options."""
    options = parse(*NONE, "--slots", "3", "--work-dir", str(tmp_path), "--drain", "release")
    top = tap.makeService(options, reactor=Clock())
    poller = top.getServiceNamed("poller")
    assert poller.slots == 3 and poller.drain == "release" and poller.queueName == "q1"
    assert poller.workDir == str(tmp_path)
    assert poller.client.baseURL == "http://127.0.0.1:8080"


def test_a_backend_that_cannot_start_is_fatal_and_no_work_is_taken(tmp_path):
    """When the fork server cannot start, the worker asks for no lease and says so through onFatal."""
    fatal = []
    w = World(tmp_path / "work", onFatal=fatal.append)
    w.backend.whenReady = lambda: defer.fail(RuntimeError("the fork server failed to start (exit code 1)"))
    w.start()
    assert fatal == ["the fork server failed to start (exit code 1)"]
    assert not w.server.of("lease")


def test_tap_slot_uid_base_defaults_to_60001_for_a_root_worker(monkeypatch):
    """A root worker gives slot i the uid 60001 + i unless told otherwise; 0 turns
    slot uids off, and a worker that is not root cannot have them."""
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: mode)
    monkeypatch.setattr(tap.os, "geteuid", lambda: 0)
    assert parse("--sandbox", "namespaces")["slot-uids"] == 60001
    assert parse("--sandbox", "namespaces", "--slot-uid-base", "70000")["slot-uids"] == 70000
    assert parse("--sandbox", "namespaces", "--slot-uid-base", "0")["slot-uids"] is None
    monkeypatch.setattr(tap.os, "geteuid", lambda: 1000)
    assert parse("--sandbox", "namespaces")["slot-uids"] is None


@pytest.mark.parametrize("base", ["-1", str(2**32 - 2)])
def test_tap_refuses_slot_uids_out_of_range(monkeypatch, base):
    """A negative base, or one whose last slot would pass the largest uid, is a usage error."""
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: mode)
    monkeypatch.setattr(tap.os, "geteuid", lambda: 0)
    with pytest.raises(usage.UsageError, match="--slot-uid-base"):
        parse("--sandbox", "namespaces", "--slots", "2", "--slot-uid-base", base)


def test_tap_refuses_sandbox_none_as_root_where_slot_uids_cannot_reach_the_work(monkeypatch, tmp_path):
    """With --sandbox none the fit sees the host's files as its slot uid: where that
    uid cannot reach the work directory a root worker refuses to start, whether the
    slot uids were asked for or are the default (it never falls back to running
    fits as root); --slot-uid-base 0 (fits as root, said to be unsafe) is the
    administrator's explicit choice."""
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: mode)
    monkeypatch.setattr(tap.os, "geteuid", lambda: 0)
    closed = str(tmp_path / "closed")
    workDir = os.path.join(closed, "work")
    monkeypatch.setattr(tap, "unreachable", lambda path: closed if path.startswith(closed) else None)
    for explicit in ([], ["--slot-uid-base", "60001"]):
        with pytest.raises(usage.UsageError, match="--slot-uid-base 60001: .*%s is not open" % (closed,)):
            parse("--sandbox", "none", "--work-dir", workDir, *explicit)
    assert parse("--sandbox", "none", "--work-dir", workDir, "--slot-uid-base", "0")["slot-uids"] is None
    assert parse("--sandbox", "none", "--work-dir", str(tmp_path / "open"))["slot-uids"] == 60001


def test_tap_auto_never_ends_at_none_without_allow_unconfined(monkeypatch):
    """--sandbox auto on a host that offers no namespaces refuses to start; with
    --allow-unconfined it runs fits in mode none. The mode is chosen once, in
    postOptions, and makeService hands the chosen mode to the fork server."""
    chosen = []
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: chosen.append(mode) or "none")
    with pytest.raises(usage.UsageError, match="--allow-unconfined"):
        parse("--slot-uid-base", "0")
    options = parse("--slot-uid-base", "0", "--allow-unconfined")
    assert options["sandbox-effective"] == "none"
    chosen.clear()
    poller = tap.makeService(options, reactor=Clock()).getServiceNamed("poller")
    assert poller.backend.sandboxMode == "none" and chosen == []


def test_tap_service_passes_limits_and_quotas(tmp_path):
    """The limits reach the fork server and the result quotas the poller."""
    options = parse(*NONE, "--work-dir", str(tmp_path), "--result-files-quota", "20",
                    "--result-bytes-quota", "16M", "--cpu-limit", "5")
    poller = tap.makeService(options, reactor=Clock()).getServiceNamed("poller")
    assert (poller.resultFilesQuota, poller.resultBytesQuota) == (20, 16 << 20)
    assert poller.backend.limits["cpu"] == 5 and poller.backend.sandboxMode == "none"


def test_unreachable_names_the_first_closed_directory(tmp_path):
    """unreachable() finds the first directory on the way that others cannot
    enter, judges a path not made yet by its existing part, and passes an open one."""
    base = tempfile.mkdtemp(dir="/tmp", prefix="reflpoller-")
    try:
        os.chmod(base, 0o755)
        open_ = os.path.join(base, "open", "deeper")
        os.makedirs(open_, mode=0o755)
        os.chmod(os.path.join(base, "open"), 0o755)
        os.chmod(open_, 0o755)
        closed = os.path.join(base, "closed")
        os.makedirs(os.path.join(closed, "inner"))
        os.chmod(closed, 0o700)
        assert tap.unreachable(open_) is None
        assert tap.unreachable(os.path.join(open_, "not", "yet")) is None
        assert tap.unreachable(os.path.join(closed, "inner")) == closed
        os.chmod(open_, 0o711)
        assert tap.unreachable(open_) == open_        # entered, but not listed
    finally:
        os.chmod(closed, 0o755)
        shutil.rmtree(base)


def test_tap_service_passes_slot_uids_and_checkpoint_interval(tmp_path, monkeypatch):
    """makeService hands the slot uids and --checkpoint-every to the poller."""
    monkeypatch.setattr(tap.sandbox, "choose", lambda mode: mode)
    monkeypatch.setattr(tap.os, "geteuid", lambda: 0)
    options = parse("--sandbox", "namespaces", "--work-dir", str(tmp_path), "--slot-uid-base", "61000",
                    "--checkpoint-every", "5")
    poller = tap.makeService(options, reactor=Clock()).getServiceNamed("poller")
    assert poller.slotUidBase == 61000 and poller.checkpointEvery == 5.0


# ---- slot uids


def test_each_slot_runs_its_fits_as_its_own_uid(world, logged):
    """With slot uids, a fit runs as base + its slot number (uid and gid); a slot
    freed by a finished fit gives its uid to the next one, never two at once.
    The worker says at start which uids its fits run as."""
    w = world(slots=2, slotUidBase=60001)
    assert messages(logged, "fits running as uid 60001-60002")
    w.server.grant(1)
    w.server.grant(2)
    w.pump()
    assert sorted((r.uid, r.gid) for r in w.backend.runs) == [(60001, 60001), (60002, 60002)]
    first = next(r for r in w.backend.runs if r.uid == 60001)
    second = next(r for r in w.backend.runs if r.uid == 60002)
    first.finish()
    w.pump()
    w.server.grant(3)
    w.pump()
    assert (w.backend.runs[2].jobId, w.backend.runs[2].uid) == (3, 60001)
    w.backend.runs[2].finish()
    second.finish()
    w.pump()
    w.server.grant(4)
    w.pump()
    assert w.backend.runs[3].uid == 60001


def test_slot_uids_can_reach_their_job_directories_under_any_umask(tmp_path):
    """With slot uids, the work and jobs directories the worker makes are 0711
    even under a daemon's umask 077: a slot uid can reach its own job directory
    by path, and list neither."""
    previous = os.umask(0o077)
    try:
        w = World(tmp_path / "work", slotUidBase=60001)
        w.start()
    finally:
        os.umask(previous)
    for path in (w.workDir, os.path.join(w.workDir, "jobs")):
        assert os.stat(path).st_mode & 0o777 == 0o711, path


def test_without_slot_uids_fits_run_as_the_worker(world):
    """No slot uid base (not root, or turned off): the backend is given no uid."""
    w = world(slots=2)
    w.server.grant(1)
    w.pump()
    assert (w.backend.runs[0].uid, w.backend.runs[0].gid) == (None, None)


# ---- checkpoints and resume

DREAM = {"service": "refl1d", "data": {"model": "model.py", "options": {"fit": "dream", "samples": 1000}}}


def writeSession(fitRun, data):
    folder = os.path.join(fitRun.jobDir, "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "session.h5")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.rename(path + ".tmp", path)
    return "results/session.h5"     # what the fork server passes on: relative to the job


def test_checkpoints_go_up_as_session_h5_at_most_every_checkpoint_interval(world):
    """A DREAM fit's first checkpoint is uploaded at once as the result file
    session.h5 with the lease token; later ones at most every checkpointEvery
    seconds, the latest one winning."""
    w = world(checkpointEvery=10.0, partSize=4)
    w.server.grant(1, lease=2, request=DREAM)
    w.pump()
    fitRun = w.backend.runs[0]
    fitRun.onCheckpoint(writeSession(fitRun, b"first"))
    w.pump()
    assert w.server.results[(1, "session.h5")] == b"first"
    assert {c["args"]["lease"] for c in w.server.of("put")} == {"2"}
    sent = len(w.server.of("put"))
    for n in range(1, 4):
        w.advance(2.0)
        fitRun.onCheckpoint(writeSession(fitRun, b"checkpoint %d" % n))
    assert len(w.server.of("put")) == sent
    w.advance(4.1)
    assert w.server.results[(1, "session.h5")] == b"checkpoint 3"
    assert not w.server.of("complete")


def test_fits_that_cannot_resume_send_no_checkpoints(world):
    """An LM fit is given no checkpoint handler: its session file goes up once, with the results."""
    w = world()
    w.server.grant(1, request={"service": "refl1d", "data": {"model": "model.py", "options": {"fit": "lm"}}})
    w.pump()
    assert w.backend.runs[0].onCheckpoint is None


def test_the_final_session_file_waits_for_a_checkpoint_on_its_way(world):
    """A fit that ends while a checkpoint is being uploaded: the result files go
    only once that upload is done, so the final session.h5 is the one stored."""
    w = world(checkpointEvery=1.0)
    w.server.grant(1, request=DREAM)
    w.pump()
    fitRun = w.backend.runs[0]
    w.http.hold = "PUT"
    fitRun.onCheckpoint(writeSession(fitRun, b"checkpoint"))
    w.pump()
    writeSession(fitRun, b"final session")
    fitRun.finish(files={"fit.par": b"p"})
    w.advance(2.0)
    assert len(w.http.held) == 1
    assert not w.server.of("complete")
    w.http.release()
    w.advance(0.5)
    assert w.server.results[(1, "session.h5")] == b"final session"
    assert [c["json"]["status"] for c in w.server.of("complete")] == ["COMPLETE"]


def test_a_checkpoint_refused_as_stale_drops_the_job(world):
    """A 409 on a checkpoint upload means the lease went elsewhere: the fit is
    cancelled and nothing more is delivered."""
    w = world()
    w.server.grant(1, request=DREAM)
    w.pump()
    fitRun = w.backend.runs[0]
    w.server.codes[("put", 1)] = 409
    fitRun.onCheckpoint(writeSession(fitRun, b"checkpoint"))
    w.pump()
    assert fitRun.cancels == [5.0]
    fitRun.finish("CANCEL")
    w.advance(5.0)
    assert not w.server.of("complete")
    assert not os.path.exists(w.jobDir(1))


def test_a_lease_with_a_checkpoint_resumes_the_fit_from_it(world):
    """A DREAM job leased with the checkpoint of an earlier attempt: the worker
    downloads the result file session.h5 into results/ and runs the fit with
    resume, the request otherwise as it was."""
    w = world()
    w.server.grant(5, lease=2, request=DREAM, checkpoint=b"HDF5 checkpoint")
    w.pump()
    fitRun = w.backend.runs[0]
    with open(os.path.join(fitRun.jobDir, "results", "session.h5"), "rb") as f:
        assert f.read() == b"HDF5 checkpoint"
    assert fitRun.request["data"]["options"] == dict(DREAM["data"]["options"], resume=True)
    assert "resume" not in DREAM["data"]["options"]
    assert [(c["args"]["kind"]) for c in w.server.of("download")] == ["upload", "result"]


def test_a_checkpoint_is_ignored_by_a_fit_that_cannot_resume(world):
    """An LM job leased with a checkpoint starts over: nothing is downloaded for it."""
    w = world()
    lm = {"service": "refl1d", "data": {"model": "model.py", "options": {"fit": "lm"}}}
    w.server.grant(5, lease=2, request=lm, checkpoint=b"HDF5")
    w.pump()
    fitRun = w.backend.runs[0]
    assert fitRun.request == lm
    assert not os.path.exists(os.path.join(fitRun.jobDir, "results"))
    assert [c["args"]["kind"] for c in w.server.of("download")] == ["upload"]


def test_a_checkpoint_that_cannot_be_had_means_starting_over(world, logged):
    """A checkpoint the server cannot give (gone: 404) is logged, and the fit
    starts over without resume."""
    w = world()
    w.server.grant(5, lease=2, request=DREAM, checkpoint=b"HDF5")
    del w.server.results[(5, "session.h5")]
    w.pump()
    fitRun = w.backend.runs[0]
    assert fitRun.request == DREAM
    assert not os.path.exists(os.path.join(fitRun.jobDir, "results", "session.h5"))
    assert messages(logged, "starts over")


def test_last_progress_reaches_the_server_before_the_job_completes(world):
    """A fit that reports its final step and ends within the heartbeat's rate
    limit still gets that last progress to the server, ahead of the complete."""
    w = world()
    w.server.grant(1)
    w.pump()
    fitRun = w.backend.runs[0]
    fitRun.onProgress({"step": 1, "chisq": 783.4})
    w.advance(0.1)
    fitRun.onProgress({"step": 10, "chisq": 1.01})
    fitRun.finish()
    w.pump()
    routes = [(c["route"], (c.get("json") or {}).get("progress")) for c in w.server.calls
              if c["route"] in ("heartbeat", "complete")]
    assert routes[-2:] == [("heartbeat", {"step": 10, "chisq": 1.01}), ("complete", None)]


def test_result_files_upload_a_few_at_a_time_then_complete(world):
    """When a fit ends its result files go up four at once (each is a round
    trip and a journal record), and the job is completed only after all."""
    w = world()
    w.server.grant(1)
    w.pump()
    w.server.heldPuts = []
    files = {"r%d.dat" % i: b"%d" % i for i in range(9)}
    w.backend.runs[0].finish(files=files)
    w.pump()
    inFlight = []
    while w.server.heldPuts:
        inFlight.append(len(w.server.heldPuts))
        held, w.server.heldPuts[:] = list(w.server.heldPuts), []
        assert not w.server.of("complete")
        for d in held:
            d.callback(None)
        w.pump()
    assert inFlight == [4, 4, 1]
    assert len(w.server.of("put")) == 9 and len(w.server.of("complete")) == 1
