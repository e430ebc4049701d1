"""The queue state machine: fair share, leases and fencing, expiry, and the
promise that replaying the records gives the live state."""

import json

import pytest
from hypothesis import example, given, settings, strategies as st

from reflservd import errors
from reflservd import queue as Q
from reflservd.queuesnapshot import SHARED_FIELDS, encodeSnapshot, queueFromSnapshot, snapshotOf

DAY = 24 * 3600.0


def submit(queue, now, notify="", origin="10.0.0.1", name="job", owner=None):
    jobId = queue.reserveId()
    record = queue.makeSubmit(jobId, now, name, notify, origin, "refl1d", "1", {}, owner=owner)
    queue.apply(record)
    return jobId, record


def lease(queue, now, name="q"):
    record = queue.makeLease(now, name)
    if record is not None:
        queue.apply(record)
    return record


def test_fair_share_counts_by_submitter_not_by_notify():
    """Fifteen jobs sent by an attacker with ``notify`` set to a victim's
    address do not push the victim's own job back: the owner is who
    submitted (here the address), never the notify field as typed."""
    queue = Q.Queue()
    forged = [submit(queue, i, notify="victim@x", origin="10.6.6.6")[0] for i in range(15)]
    victim, record = submit(queue, 16, notify="victim@x", origin="10.0.0.7")
    assert record["owner"] == "10.0.0.7" and record["priority"] == 0
    assert queue.pendingOrder()[:2] == [forged[0], victim]


def test_fair_share_counts_by_owner_not_by_shared_address():
    """Behind one proxy, a newcomer's first job still runs before a heavy
    user's tenth: the owner given (the forwarded address or the token's
    identity) counts, not the proxy's address."""
    queue = Q.Queue()
    heavy = [submit(queue, i, origin="proxy", owner="heavy")[0] for i in range(10)]
    newcomer, record = submit(queue, 11, origin="proxy", owner="new")
    assert record["priority"] == 0
    order = queue.pendingOrder()
    assert order[:2] == [heavy[0], newcomer]
    assert order[2:] == heavy[1:]


def test_owner_without_notify_is_the_client_address():
    queue = Q.Queue()
    submit(queue, 0, origin="10.0.0.1")
    _, second = submit(queue, 1, origin="10.0.0.1")
    _, other = submit(queue, 2, origin="10.0.0.2")
    assert second["owner"] == "10.0.0.1" and second["priority"] == 1
    assert other["priority"] == 0


def test_fair_share_forgets_after_thirty_days():
    queue = Q.Queue()
    submit(queue, 0, owner="a@x")
    submit(queue, 1, owner="a@x")
    assert queue.fairShare("a@x", 2) == 2
    assert queue.fairShare("a@x", 30 * DAY + 0.5) == 1
    assert queue.fairShare("a@x", 31 * DAY) == 0


def test_fifo_among_equal_priorities():
    queue = Q.Queue()
    ids = [submit(queue, i, owner="u%d" % i)[0] for i in range(5)]
    assert [lease(queue, 10)["id"] for _ in ids] == ids
    assert lease(queue, 10) is None


def test_stale_lease_is_refused_and_changes_nothing():
    """A worker whose lease ran out cannot heartbeat, upload or complete."""
    queue = Q.Queue(leaseTimeout=10, maxAttempts=3)
    jobId, _ = submit(queue, 0)
    first = lease(queue, 1)
    for record in queue.makeExpiries(12):
        queue.apply(record)
    assert queue.get(jobId).status == Q.PENDING
    second = lease(queue, 13)
    assert second["lease"] == first["lease"] + 1
    before = json.dumps(snapshotOf(queue), sort_keys=True)
    with pytest.raises(errors.Conflict):
        queue.heartbeat(jobId, first["lease"], 14)
    with pytest.raises(errors.Conflict):
        queue.makeComplete(jobId, first["lease"], 14, Q.COMPLETE)
    with pytest.raises(errors.Conflict):
        queue.makeFile(jobId, first["lease"], 14, "x.par", 3)
    assert json.dumps(snapshotOf(queue), sort_keys=True) == before
    assert queue.get(jobId).attempts == 2


def test_heartbeat_extends_the_lease():
    queue = Q.Queue(leaseTimeout=10)
    jobId, _ = submit(queue, 0)
    token = lease(queue, 0)["lease"]
    assert queue.heartbeat(jobId, token, 8, {"step": 1}) is False
    assert queue.makeExpiries(12) == []
    assert queue.get(jobId).progress == {"step": 1}
    assert [r["id"] for r in queue.makeExpiries(18.5)] == [jobId]


def test_lease_lost_too_often_ends_error_worker_lost():
    queue = Q.Queue(leaseTimeout=1, maxAttempts=2)
    jobId, _ = submit(queue, 0)
    now = 0
    for _ in range(2):
        lease(queue, now)
        now += 2
        for record in queue.makeExpiries(now):
            queue.apply(record)
    job = queue.get(jobId)
    assert job.status == Q.ERROR
    assert "worker lost" in job.error
    assert lease(queue, now) is None


def test_cancel_of_active_job_reaches_the_worker_and_keeps_its_logs():
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    token = lease(queue, 1)["lease"]
    queue.apply(queue.makeCancel(jobId, 2))
    assert queue.get(jobId).status == Q.CANCEL
    assert queue.heartbeat(jobId, token, 3) is True
    queue.apply(queue.makeComplete(jobId, token, 4, Q.COMPLETE, result=1))
    job = queue.get(jobId)
    assert job.status == Q.CANCEL and job.finished == 4


def test_cancelled_pending_job_is_never_leased():
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    queue.apply(queue.makeCancel(jobId, 1))
    assert lease(queue, 2) is None
    assert queue.counts()[Q.CANCEL] == 1


def test_deleted_job_is_never_leased_and_unknown():
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    queue.apply(queue.makeDelete(jobId, 1))
    assert lease(queue, 2) is None
    assert queue.status(jobId) == "UNKNOWN"
    with pytest.raises(errors.UnknownJob):
        queue.get(jobId)


def test_complete_for_finished_job_is_refused():
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    token = lease(queue, 1)["lease"]
    queue.apply(queue.makeComplete(jobId, token, 2, Q.COMPLETE, result={"chisq": 1.0}))
    with pytest.raises(errors.Conflict):
        queue.makeComplete(jobId, token, 3, Q.ERROR, error="again")
    assert queue.get(jobId).result == {"chisq": 1.0}


def test_a_result_survives_a_snapshot_of_either_version():
    """A finished job's result (kept as JSON text) comes back from a snapshot,
    and from a version 2 snapshot, which held it as a dict."""
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    token = lease(queue, 1)["lease"]
    result = {"chisq": 1.5, "parameters": {"Ni thickness": {"value": 100.0, "uncertainty": 0.3}}}
    queue.apply(queue.makeComplete(jobId, token, 2, Q.COMPLETE, result=result))
    state = json.loads(json.dumps(snapshotOf(queue)))
    assert queueFromSnapshot(state).get(jobId).result == result
    old = dict(state, version=2, fields=["result" if f == "resultJSON" else f for f in state["fields"]])
    column = state["fields"].index("resultJSON")
    old["jobs"] = [row[:column] + [json.loads(row[column])] + row[column + 1:] for row in state["jobs"]]
    assert queueFromSnapshot(old).get(jobId).toJSON() == queue.get(jobId).toJSON()


def test_a_snapshot_writes_shared_strings_once_and_loads_as_it_was():
    """``encodeSnapshot`` writes owner, queue, status and the like once each,
    rows holding their index; loading it gives the same queue, its shared
    strings one object each."""
    queue = Q.Queue()
    for n in range(6):
        jobId, _ = submit(queue, n, notify="ann@x" if n % 2 else "", owner="ann@x" if n % 2 else None, name="job %d" % (n,))
    token = lease(queue, 10)["lease"]
    queue.apply(queue.makeComplete(1, token, 11, Q.COMPLETE, result={"chisq": 1.0},
                                   confinement="namespaces"))
    encoded = json.loads(encodeSnapshot(snapshotOf(queue)))
    assert encoded["shared"] == list(SHARED_FIELDS)
    assert sorted(encoded["strings"], key=str) == sorted(
        {None, "ann@x", "", "10.0.0.1", "refl1d", "1", Q.PENDING, Q.COMPLETE, "q", "namespaces"}, key=str)
    loaded = queueFromSnapshot(encoded)
    assert snapshotOf(loaded) == snapshotOf(queue)
    assert loaded.pendingOrder() == queue.pendingOrder()
    owners = {id(job.owner) for job in loaded.jobs.values() if job.owner == "ann@x"}
    assert len(owners) == 1


def test_a_complete_record_of_either_form_gives_the_result():
    """A complete record carries the result as JSON text; one written before
    that (the result as a dict) still gives the same job."""
    result = {"chisq": 0.97, "steps": 12}
    jobs = []
    for form in ("text", "dict"):
        queue = Q.Queue()
        jobId, _ = submit(queue, 0)
        token = lease(queue, 1)["lease"]
        record = queue.makeComplete(jobId, token, 2, Q.COMPLETE, result=result)
        if form == "dict":
            record["result"] = json.loads(record.pop("resultJSON"))
        queue.apply(json.loads(json.dumps(record)))
        jobs.append(queue.get(jobId).toJSON())
    assert jobs[0] == jobs[1] and jobs[0]["result"] == result


def test_release_hands_back_without_counting_the_attempt():
    queue = Q.Queue()
    jobId, _ = submit(queue, 0)
    token = lease(queue, 1)["lease"]
    queue.apply(queue.makeRelease(jobId, token, 2))
    job = queue.get(jobId)
    assert (job.status, job.attempts) == (Q.PENDING, 0)
    assert lease(queue, 3)["lease"] == token + 1


def test_a_lost_fit_counts_its_attempt_and_ends_error_past_the_last():
    """A release saying the fit was ``lost`` (a Slurm node failed) requeues the job
    with the attempt counted; past maxAttempts the job ends ERROR saying why."""
    queue = Q.Queue(maxAttempts=2)
    jobId, _ = submit(queue, 0)
    token = lease(queue, 1)["lease"]
    queue.apply(queue.makeRelease(jobId, token, 2, lost="NODE_FAIL on n1"))
    job = queue.get(jobId)
    assert (job.status, job.attempts) == (Q.PENDING, 1)
    token = lease(queue, 3)["lease"]
    record = queue.makeRelease(jobId, token, 4, lost="NODE_FAIL on n2")
    assert record["status"] == Q.ERROR
    queue.apply(record)
    job = queue.get(jobId)
    assert (job.status, job.attempts, job.finished) == (Q.ERROR, 2, 4)
    assert job.error == "its fit was lost 2 times; the last: NODE_FAIL on n2"


# ---- property: random operations keep the invariants, and replay == live

operations = st.lists(st.tuples(
    st.sampled_from(["submit", "lease", "heartbeat", "expire", "cancel", "complete",
                     "delete", "release", "restart"]),
    st.integers(min_value=0, max_value=7),
    st.sampled_from(["a@x", "b@x", ""])), max_size=60)


def _state(queue):
    return json.dumps(snapshotOf(queue), sort_keys=True)


def _checkInvariants(queue):
    counts = {status: 0 for status in Q.STATUSES}
    for job in queue.jobs.values():
        counts[job.status] += 1
        assert job.attempts <= queue.maxAttempts
        if job.status == Q.PENDING:
            assert job.queue is None
    assert counts == queue.counts()
    order = queue.pendingOrder()
    assert sorted(order) == sorted(j.id for j in queue.jobs.values() if j.status == Q.PENDING)
    keys = [(queue.jobs[i].priority, i) for i in order]
    assert keys == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(operations)
@example([("submit", 0, "a@x"), ("lease", 0, "a@x"), ("expire", 0, "a@x")])
def test_random_operations_keep_invariants_and_replay_gives_live_state(ops):
    queue = Q.Queue(leaseTimeout=5, maxAttempts=2)
    journal = []
    snapshot = None
    now = 0.0

    def commit(record):
        queue.apply(record)
        journal.append(record)

    for op, pick, owner in ops:
        now += 1.5
        ids = sorted(queue.jobs)
        jobId = ids[pick % len(ids)] if ids else None
        try:
            if op == "submit":
                commit(queue.makeSubmit(queue.reserveId(), now, "n", owner, "10.0.0.1", "refl1d", "", {}))
            elif op == "lease":
                record = queue.makeLease(now, "q")
                if record:
                    commit(record)
            elif op == "expire":
                now += 5
                for record in queue.makeExpiries(now):
                    commit(record)
            elif op == "restart":
                snapshot, journal = snapshotOf(queue), []
                queue = queueFromSnapshot(json.loads(json.dumps(snapshot)), leaseTimeout=5, maxAttempts=2)
                queue.restartLeases(now)
            elif jobId is None:
                continue
            elif op == "heartbeat":
                queue.heartbeat(jobId, queue.jobs[jobId].lease, now, {"step": pick})
            elif op == "cancel":
                commit(queue.makeCancel(jobId, now))
            elif op == "complete":
                commit(queue.makeComplete(jobId, queue.jobs[jobId].lease, now,
                                          Q.COMPLETE, result={"x": pick}))
            elif op == "delete":
                commit(queue.makeDelete(jobId, now))
            elif op == "release":
                commit(queue.makeRelease(jobId, queue.jobs[jobId].lease, now,
                                         lost="node failed" if owner == "b@x" else None))
        except errors.DomainError:
            pass
        _checkInvariants(queue)

    replayed = queueFromSnapshot(json.loads(json.dumps(snapshot)) if snapshot else None,
                                    leaseTimeout=5, maxAttempts=2)
    for record in json.loads(json.dumps(journal)):
        replayed.apply(record)
    live = json.loads(_state(queue))
    again = json.loads(_state(replayed))
    for state in (live, again):
        for job in state["jobs"]:
            job[state["fields"].index("progress")] = None  # a view, not journaled
    assert again == live
    assert replayed.pendingOrder() == queue.pendingOrder()
