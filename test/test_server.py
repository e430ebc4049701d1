"""QueueServer logic on a Clock, with the real journal running inline: lease
expiry, long-poll timeouts and wake-ups, and replay after restarts."""

import json
import os

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from reflservd import errors
from reflservd import queue as Q
from reflservd.queuesnapshot import snapshotOf
from reflservd.server import QueueServer
from reflservd.web import statusOf


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def result(d):
    """The result of a Deferred that has fired (inline disk work)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def makeServer(stateDir, clock, **kwargs):
    server = QueueServer(str(stateDir), clock, runInThread=inline, **kwargs)
    server.startService()
    return server


def submit(server, name="job", notify="a@x"):
    request = {"name": name, "notify": notify, "service": "count", "data": 1}
    return result(server.submit(request, [], "10.0.0.1"))[0]


class ManualRunner:
    """The disk work waits until the test runs it (a thread "in progress")."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self):
        while self.calls:
            f, args, d = self.calls.pop(0)
            d.callback(f(*args))


def test_a_small_jobs_request_is_served_from_memory_until_its_file_is_written(tmp_path):
    """A small submit's files are written on the journal's files thread with
    its batch. Until the batch is on disk the request is served from memory
    (nothing on disk yet); then from its file, and the memory is let go. A
    job without files has no directory, only its request file."""
    clock = Clock()
    runner = ManualRunner()
    server = QueueServer(str(tmp_path), clock, runInThread=runner)
    server.startService()
    runner.runAll()
    request = {"name": "small", "notify": "a@x", "service": "count", "data": 3}
    answered = server.submit(request, [], "10.0.0.1")
    jobId = server.queue.pendingOrder()[0]
    assert not answered.called
    assert server.readRequest(jobId) == request
    assert os.listdir(server.store.root) == []
    runner.runAll()
    assert result(answered)[0].id == jobId
    assert server._unstored == {}
    assert os.listdir(server.store.root) == ["%d.json" % (jobId,)]
    assert server.readRequest(jobId) == request
    answered = server.submit(dict(request, name="files"), [("model.py", b"x = 1\n")], "10.0.0.1")
    runner.runAll()
    withFiles = result(answered)[0]
    assert server.store.files(withFiles.id, "upload") == [("model.py", 6)]
    assert server.readRequest(withFiles.id)["name"] == "files"
    stopped = server.stopService()
    runner.runAll()
    result(stopped)


def test_a_start_removes_the_files_of_jobs_the_journal_never_recorded(tmp_path):
    """Files of a submit that crashed before its record (a request file, a
    job directory) are removed at the next start; recorded jobs keep theirs."""
    clock = Clock()
    server = makeServer(tmp_path, clock)
    kept = submit(server)
    result(server.submit({"name": "f", "notify": "", "service": "count", "data": 1},
                         [("model.py", b"1")], "10.0.0.1"))
    result(server.stopService())
    root = server.store.root
    with open(os.path.join(root, "90.json"), "w") as f:
        f.write("{}")
    os.makedirs(os.path.join(root, "91", "uploads"))
    server = makeServer(tmp_path, clock)
    assert sorted(os.listdir(root)) == ["%d.json" % (kept.id,), "2", "2.json"]
    assert server.readRequest(kept.id)["name"] == "job"
    result(server.stopService())


def test_expired_lease_requeues_then_ends_error_worker_lost(tmp_path):
    clock = Clock()
    server = makeServer(tmp_path, clock, leaseTimeout=10, maxAttempts=2)
    job = submit(server)
    assert result(server.lease("q")).id == job.id
    clock.advance(5)
    server.heartbeat(job.id, 1, {"step": 1})
    clock.advance(9)
    assert job.status == Q.ACTIVE  # the heartbeat carried it past 10 s
    clock.advance(2)
    assert (job.status, job.attempts) == (Q.PENDING, 1)
    assert result(server.lease("q")).lease == 2
    clock.advance(11)
    assert job.status == Q.ERROR and "worker lost" in job.error
    result(server.stopService())


def test_waiting_lease_times_out_with_none_and_wakes_on_submit(tmp_path):
    clock = Clock()
    server = makeServer(tmp_path, clock)
    waiting = server.lease("q", timeout=30)
    assert server.waitingLeases() == 1
    clock.advance(29)
    assert not waiting.called
    clock.advance(1)
    assert result(waiting) is None
    assert server.waitingLeases() == 0
    waiting = server.lease("q", timeout=30)
    job = submit(server)
    assert result(waiting).id == job.id
    result(server.stopService())


def test_cancelled_long_poll_leaves_no_waiter(tmp_path):
    """Klein cancels the Deferred when the client goes away."""
    clock = Clock()
    server = makeServer(tmp_path, clock)
    waiting = server.lease("q", timeout=30)
    assert server.waitingLeases() == 1
    waiting.cancel()
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    assert server.waitingLeases() == 0
    assert clock.getDelayedCalls() == [call for call in clock.getDelayedCalls()
                                       if call.getTime() - clock.seconds() != 30]
    job = submit(server)
    assert job.status == Q.PENDING
    assert result(server.lease("q")).id == job.id
    result(server.stopService())


def test_events_long_poll_wakes_on_progress(tmp_path):
    clock = Clock()
    server = makeServer(tmp_path, clock)
    job = submit(server)
    result(server.lease("q"))
    waiting = server.events(job.id, after=2, timeout=20)
    assert not waiting.called
    server.heartbeat(job.id, 1, {"step": 4, "chisq": 1.5})
    events = result(waiting)
    assert [(e["type"], e["progress"]) for e in events] == [
        ("progress", {"step": 4, "chisq": 1.5, "parameters": {}, "elapsed": 0.0})]
    result(server.stopService())


def test_fitter_service_refused_and_nothing_stored(tmp_path):
    server = makeServer(tmp_path, Clock())
    with pytest.raises(errors.Refused) as caught:
        result(server.submit({"name": "x", "notify": "", "service": "fitter"}, [], "h"))
    assert statusOf(caught.value) == 400
    assert server.queue.jobs == {} and server.store.files(1, "upload") == []
    result(server.stopService())


operations = st.lists(st.tuples(
    st.sampled_from(["submit", "lease", "heartbeat", "expire", "cancel", "complete",
                     "delete", "restart"]),
    st.integers(min_value=0, max_value=5)), max_size=40)


def _comparable(queue):
    state = snapshotOf(queue)
    for job in state["jobs"]:
        job[state["fields"].index("progress")] = None  # a view, not journaled
    return json.dumps(state, sort_keys=True)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(min_value=2, max_value=7))
def test_random_operations_survive_restarts_through_the_real_journal(tmp_path_factory, ops, every):
    """Restarting (closing the journal and loading it again, with snapshots
    every few records) always gives back the live state."""
    stateDir = tmp_path_factory.mktemp("state")
    clock = Clock()
    server = makeServer(stateDir, clock, leaseTimeout=5, maxAttempts=2, snapshotEvery=every)
    for op, pick in ops:
        ids = sorted(server.queue.jobs)
        jobId = ids[pick % len(ids)] if ids else None
        try:
            if op == "submit":
                submit(server, notify="u%d@x" % (pick % 2))
            elif op == "lease":
                result(server.lease("q"))
            elif op == "expire":
                clock.advance(6)
            elif op == "restart":
                before = _comparable(server.queue)
                result(server.stopService())
                server = makeServer(stateDir, clock, leaseTimeout=5, maxAttempts=2,
                                    snapshotEvery=every)
                assert _comparable(server.queue) == before
            elif jobId is None:
                continue
            elif op == "heartbeat":
                server.heartbeat(jobId, server.queue.jobs[jobId].lease, {"step": pick})
            elif op == "cancel":
                result(server.cancel(jobId))
            elif op == "complete":
                result(server.complete(jobId, server.queue.jobs[jobId].lease, Q.COMPLETE, {"x": 1}))
            elif op == "delete":
                result(server.delete(jobId))
        except errors.DomainError:
            pass
    before = _comparable(server.queue)
    result(server.stopService())
    server = makeServer(stateDir, clock, leaseTimeout=5, maxAttempts=2, snapshotEvery=every)
    assert _comparable(server.queue) == before
    result(server.stopService())


def test_a_cancel_of_an_ended_job_is_answered_once_the_end_is_on_disk(tmp_path):
    """A second cancel finds the job CANCEL already, by a first cancel whose
    record is still on its way to the disk: its answer waits for that record
    (answering at once acknowledged a state a crash could lose; found by the
    crash test). A refused write fails it too."""
    clock = Clock()
    runner = ManualRunner()
    server = QueueServer(str(tmp_path), clock, runInThread=runner)
    server.startService()
    runner.runAll()
    answered = server.submit({"name": "j", "notify": "", "service": "count", "data": 1}, [], "h")
    runner.runAll()
    job, _ = result(answered)
    first = server.cancel(job.id)
    second = server.cancel(job.id)
    assert server.queue.get(job.id).status == Q.CANCEL
    assert not first.called and not second.called
    runner.runAll()
    assert result(first).status == result(second).status == Q.CANCEL
    assert result(server.journal.durable()) is None


def test_small_writes_that_arrive_while_one_runs_go_together_in_the_next():
    """``BatchedWrites`` hands the calls that arrive while a group is on the
    thread to the thread together, in the next group; each caller gets its
    own call's result or exception."""
    from twisted.internet import defer
    from reflservd.store import BatchedWrites
    turns = []

    def runInThread(f, *args):
        d = defer.Deferred()
        turns.append((f, args, d))
        return d

    def runTurn():
        f, args, d = turns.pop(0)
        d.callback(f(*args))

    calls = []

    def write(i):
        calls.append(i)
        if i == 3:
            raise OSError(28, "No space left on device")
        return i * 10

    writes = BatchedWrites(runInThread)
    first = writes.write(write, 1)
    later = [writes.write(write, i) for i in (2, 3, 4)]
    assert len(turns) == 1
    runTurn()
    assert calls == [1] and result(first) == 10 and len(turns) == 1
    runTurn()
    assert calls == [1, 2, 3, 4] and not turns
    assert result(later[0]) == 20 and result(later[2]) == 40
    with pytest.raises(OSError):
        result(later[1])
