"""The worker's pulling and reporting side (reflworkerd.poller), in memory.

A small Klein server that records every call stands in for reflservd
(``FakeServer``), reached through StubTreq; a switch in front of it plays a
server that is down. The fit runner is a fake with the `ForkServer`
interface, and time is a `Clock`: the backoff sequence, the heartbeat rate
and the lease timeouts are read off the clock, never waited for.
"""

import json
import os

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage

from reflworkerd import tap
from reflworkerd.poller import Backoff, Poller, ServerClient

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

    def grant(self, jobId, lease=1, files=None, request=None):
        """Answer the oldest lease long-poll with this job."""
        files = files if files is not None else {"model.py": b"print('fit')\n"}
        for name, data in files.items():
            self.uploads[(jobId, name)] = data
        record = {"id": jobId, "lease": lease, "attempts": lease,
                  "request": request or {"service": "refl1d", "data": {"model": "model.py"}},
                  "files": [[n, len(d)] for n, d in files.items()],
                  "leaseTimeout": self.leaseTimeout}
        self.leaseWaiters.pop(0).callback(record)

    def noJob(self):
        self.leaseWaiters.pop(0).callback(None)

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["GET"])
    def download(self, request, jobId, name):
        self.record(request, "download", jobId)
        return self.refused(request, "download", jobId) or self.uploads[(jobId, name)]

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

    def request(self, method, url, **kwargs):
        self.timeouts.append(kwargs.get("timeout"))
        assert kwargs.get("reactor") is not None, "every request names its reactor"
        if self.down:
            return defer.fail(ConnectionRefusedError("the server is down"))
        return self.stub.request(method, url, **kwargs)


class FakeRun:
    def __init__(self, jobId, jobDir, request, onProgress):
        self.jobId, self.jobDir, self.request, self.onProgress = jobId, jobDir, request, onProgress
        self.done = defer.Deferred()
        self.cancels = []
        self.confinement = ""

    def cancel(self, grace=5.0):
        self.cancels.append(grace)

    def finish(self, status="COMPLETE", files=None, result=None):
        folder = os.path.join(self.jobDir, "results")
        os.makedirs(folder, exist_ok=True)
        for name, data in (files or {}).items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        self.done.callback({"status": status, "result": result, "error": None, "trace": None,
                            "confinement": self.confinement})


class FakeRunner:
    """The `ForkServer` interface: start, run, stop."""

    def __init__(self):
        self.runs = []
        self.started = False
        self.stopped = False

    def start(self):
        self.started = True
        return defer.succeed(None)

    def run(self, jobId, jobDir, request, onProgress):
        fitRun = FakeRun(jobId, jobDir, request, onProgress)
        self.runs.append(fitRun)
        return fitRun

    def stop(self):
        self.stopped = True
        return defer.succeed(None)


class World:
    """A poller wired to the fake server, the fake runner and a clock."""

    def __init__(self, workDir, **kwargs):
        self.clock = Clock()
        self.server = FakeServer()
        self.stub = StubTreq(self.server.app.resource())
        self.http = Switch(self.stub)
        self.client = ServerClient(self.clock, self.http, URL, token="sekrit")
        self.runner = FakeRunner()
        self.workDir = str(workDir)
        kwargs.setdefault("random", lambda: 1.0)
        self.poller = Poller(self.clock, self.client, self.runner, "q1", self.workDir,
                             workerName="test:1", **kwargs)

    def start(self):
        self.poller.startService()
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
    assert len(w.runner.runs) == 1
    w.server.grant(2)
    w.pump()
    assert len(w.server.leaseWaiters) == 0
    assert len(w.server.of("lease")) == 2
    w.runner.runs[0].finish()
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
    fitRun = w.runner.runs[0]
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
    fitRun = w.runner.runs[0]
    for step in range(10):
        fitRun.onProgress({"step": step})
        w.advance(0.05)
    beats = w.server.of("heartbeat")
    assert [b["json"].get("progress") for b in beats] == [{"step": 0}]
    w.advance(0.6)
    beats = w.server.of("heartbeat")
    assert [b["json"].get("progress") for b in beats] == [{"step": 0}, {"step": 9}]
    assert all(b["json"]["lease"] == 1 for b in beats)


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
    fitRun = w.runner.runs[0]
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
    fitRun = w.runner.runs[0]
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
    fitRun = w.runner.runs[0]
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
    w.runner.runs[0].finish(files={"fit.par": b"a" * 25, "empty.txt": b"", "x.dat": b"b" * 10},
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
    w.runner.runs[0].finish(files={"fit.par": b"thickness 100\n"}, result={"chisq": 1.0})
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
    w.runner.runs[0].finish()
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
    w.runner.runs[0].finish(files={"a": b"1"})
    w.advance(60.0, step=1.0)
    assert len(w.server.of("complete")) == 1
    assert not os.path.exists(w.jobDir(6))
    from twisted.logger import LogLevel
    assert not [e for e in logged if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


def test_links_left_by_a_fit_are_not_uploaded(world, tmp_path):
    """A hostile fit's symlink in results/ pointing at the worker's files is never read."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"worker secret")
    w = world()
    w.server.grant(8)
    w.pump()
    fitRun = w.runner.runs[0]
    os.makedirs(os.path.join(fitRun.jobDir, "results"))
    os.symlink(str(secret), os.path.join(fitRun.jobDir, "results", "leak.txt"))
    fitRun.finish(files={"ok.par": b"1"})
    w.pump()
    assert (8, "leak.txt") not in w.server.results
    assert w.server.results[(8, "ok.par")] == b"1"


def test_a_fit_keeps_running_while_the_server_is_down(world):
    """Heartbeats that fail do not touch the fit; they back off and resume, with
    the latest progress, when the server is back."""
    w = world()
    w.server.grant(9)
    w.pump()
    fitRun = w.runner.runs[0]
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
    w.runner.runs[0].finish(files={"fit.par": b"p"}, result={"chisq": 2.0})
    w.pump()
    stopped = w.poller.stopService()
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


# ---- stopping


def test_drain_release_cancels_and_releases(world):
    """Stopping with drain=release stops polling, cancels the fit, releases the
    job, and stops the runner."""
    w = world(drain="release")
    w.server.grant(1)
    w.pump()
    fitRun = w.runner.runs[0]
    stopped = w.poller.stopService()
    w.pump()
    assert not w.server.leaseWaiters
    assert fitRun.cancels == [5.0]
    assert not stopped.called
    fitRun.finish("CANCEL")
    w.pump()
    assert [c["json"] for c in w.server.of("release")] == [{"lease": 1}]
    assert not w.server.of("complete")
    assert stopped.called and w.runner.stopped


def test_drain_finish_waits_for_the_fit_and_delivers(world):
    """Stopping with drain=finish takes no new work but lets the fit end and delivers it."""
    w = world(drain="finish")
    w.server.grant(1)
    w.pump()
    stopped = w.poller.stopService()
    w.pump()
    assert not w.server.leaseWaiters
    assert not stopped.called
    w.runner.runs[0].finish(files={"r.par": b"1"})
    w.pump()
    assert [c["json"]["status"] for c in w.server.of("complete")] == ["COMPLETE"]
    assert stopped.called and w.runner.stopped
    assert len(w.server.of("lease")) == 1


def test_polling_starts_only_once_the_runner_is_ready(tmp_path):
    """No lease is asked for before the fork server has preloaded."""
    w = World(tmp_path / "work")
    ready = defer.Deferred()
    w.runner.start = lambda: ready
    w.start()
    assert not w.server.of("lease")
    ready.callback(None)
    w.pump()
    assert len(w.server.of("lease")) == 1


# ---- the tap


def parse(*args):
    options = tap.Options()
    options.parseOptions(["--server", "http://127.0.0.1:8080", "--queue", "q1", *args])
    return options


def test_tap_defaults():
    """One slot, 30 s polls, 60 s checkpoints, local backend, drain=finish."""
    options = parse("--sandbox", "none")
    assert options["slots"] == 1 and options["poll-timeout"] == 30.0
    assert options["checkpoint-every"] == 60.0
    assert options["backend"] == "local" and options["drain"] == "finish"
    assert options["limits"] == {}


def test_tap_limits():
    """CPU, memory (with suffixes) and wall limits become the fork server's limits."""
    options = parse("--sandbox", "none", "--cpu-limit", "10.5", "--memory-limit", "2G",
                    "--wall-limit", "60")
    assert options["limits"] == {"cpu": 11, "memory": 2 << 30, "wall": 60.0}


@pytest.mark.parametrize("args, says", [
    (["--backend", "slurm"], "not available yet"),
    (["--sandbox", "chroot"], "--sandbox"),
    (["--slots", "0"], "--slots"),
    (["--drain", "abandon"], "--drain"),
    (["--poll-timeout", "0"], "--poll-timeout"),
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
    assert parse("--sandbox", "none", "--token-file", str(token))["token"] == "s3cret"


def test_tap_service_tree(tmp_path):
    """makeService gives a MultiService holding the poller, configured from the options."""
    options = parse("--sandbox", "none", "--slots", "3", "--work-dir", str(tmp_path), "--drain", "release")
    top = tap.makeService(options, reactor=Clock())
    poller = top.getServiceNamed("poller")
    assert poller.slots == 3 and poller.drain == "release" and poller.queueName == "q1"
    assert poller.workDir == str(tmp_path)
    assert poller.client.baseURL == "http://127.0.0.1:8080"


def test_a_runner_that_cannot_start_is_fatal_and_no_work_is_taken(tmp_path):
    """When the fork server cannot start, the worker asks for no lease and says so through onFatal."""
    fatal = []
    w = World(tmp_path / "work", onFatal=fatal.append)
    w.runner.start = lambda: defer.fail(RuntimeError("the fork server failed to start (exit code 1)"))
    w.start()
    assert fatal == ["the fork server failed to start (exit code 1)"]
    assert not w.server.of("lease")
