"""The result cache and the provenance record, on a Clock with the real
journal and store running inline (the end to end test is in
test_provenance_e2e.py)."""

import hashlib
import os

import pytest
from twisted.internet.task import Clock

from reflservd import errors
from reflservd.provenance import withProvenance
from reflservd.resultcache import ResultCache, cacheable, inputKey
from test.test_server import makeServer, result

VERSIONS = {"refl1d": "1.0.1", "bumps": "1.0.4", "numpy": "2.4.6", "scipy": "1.17.1",
            "python": "3.11.9", "implementation": "cpython", "machine": "x86_64", "reflservd": "1"}
MODEL = b"from refl1d.names import *\n# a model the server never loads\n"
DATA = b"# q R dR\n0.01 1.0 0.1\n"


def fitRequest(options, cache=None):
    request = {"name": "ni", "notify": "a@x", "service": "refl1d",
               "data": {"model": "m.py", "options": options}}
    if cache is not None:
        request["cache"] = cache
    return request


def files(model=MODEL):
    return [("m.py", model), ("d.dat", DATA)]


def fitResult(versions=VERSIONS, seed=5):
    """What a worker sends: the fit's summary with the fit process's provenance,
    and (a hostile model could write anything) inputs of its own."""
    return {"fitter": "lm", "chisq": 1.02, "seed": seed, "steps": 12,
            "parameters": {"Ni thickness": {"value": 100.2, "uncertainty": 0.3}},
            "provenance": {"versions": versions, "seed": seed, "options": {"fit": "lm", "steps": 200},
                           "inputs": {"m.py": "forged"}}}


FACTS = {"host": "node7", "backend": "local", "sandbox": "namespaces", "reflservd": "1",
         "limits": {"cpu": 60}, "versions": VERSIONS, "queue": "forged"}


def runToCompletion(server, clock, request, versions=VERSIONS, worker="w1"):
    """Submit ``request``, lease it as ``worker`` reporting ``versions``, upload a
    result file and complete it; the job."""
    job = result(server.submit(request, files(), "10.0.0.1"))[0]
    leased = result(server.lease("q", worker, versions=versions))
    assert leased is job
    result(server.putFile(job.id, job.lease, "m.par", 0, b"Ni thickness 100.2\n", True))
    clock.advance(3)
    result(server.complete(job.id, job.lease, "COMPLETE", fitResult(versions), confinement="namespaces",
                           workerFacts=FACTS))
    return job


def test_determined_requests_are_those_with_a_seed_or_a_deterministic_fitter():
    """A seed determines any fitter; lm, newton and amoeba (refl1d's default) need
    none with one start; DREAM, DE, several starts, a resume, a time limit, the
    count service do not qualify."""
    assert cacheable(fitRequest({"fit": "lm"}))
    assert cacheable(fitRequest({}))
    assert cacheable(fitRequest({"fit": "newton", "starts": 1}))
    assert cacheable(fitRequest({"fit": "dream", "seed": 3}))
    assert not cacheable(fitRequest({"fit": "dream"}))
    assert not cacheable(fitRequest({"fit": "de"}))
    assert not cacheable(fitRequest({"fit": "amoeba", "starts": 5}))
    assert not cacheable(fitRequest({"fit": "lm", "seed": 3, "resume": True}))
    assert not cacheable(fitRequest({"fit": "lm", "seed": 3, "time": 0.5}))
    assert not cacheable({"name": "c", "notify": "", "service": "count", "data": 3})


def test_the_input_key_changes_with_any_input_byte_option_or_seed():
    digests = {"m.py": hashlib.sha256(MODEL).hexdigest()}
    key = inputKey(fitRequest({"fit": "lm"}), digests)
    assert key == inputKey(dict(fitRequest({"fit": "lm"}), name="other", notify="b@y"), digests)
    assert key != inputKey(fitRequest({"fit": "lm", "steps": 10}), digests)
    assert key != inputKey(fitRequest({"fit": "lm", "seed": 2}), digests)
    assert key != inputKey(fitRequest({"fit": "lm"}), {"m.py": hashlib.sha256(MODEL + b" ").hexdigest()})


def test_the_versions_of_todays_workers_are_those_all_recent_workers_report():
    cache = ResultCache(memory=100)
    assert cache.workerVersions(0) is None
    cache.heard("a", VERSIONS, 0)
    assert cache.workerVersions(50) == VERSIONS
    cache.heard("b", dict(VERSIONS, numpy="2.5.0"), 60)
    assert cache.workerVersions(70) is None, "workers that disagree: a fresh fit could run on either"
    assert cache.workerVersions(150) == dict(VERSIONS, numpy="2.5.0"), "a is forgotten after memory"
    cache.heard("legacy", None, 150)
    assert cache.workerVersions(150) is None, "a worker that does not say its versions"
    cache.heard("odd", ["not", "an", "object"], 300)
    assert cache.workerVersions(300) is None


def test_the_workers_remembered_stay_bounded_without_submits():
    """Long polls from ever new worker names (no determined submit ever asks
    for the versions) keep the list to the workers heard within ``memory``,
    past ``WORKERS_BEFORE_PRUNING``."""
    from reflservd.resultcache import WORKERS_BEFORE_PRUNING
    cache = ResultCache(memory=100)
    for k in range(3 * WORKERS_BEFORE_PRUNING):
        cache.heard("worker-%d" % (k,), VERSIONS, k)
    assert len(cache._workers) <= WORKERS_BEFORE_PRUNING + 1


def test_provenance_takes_inputs_times_and_queue_from_the_server_not_the_worker(tmp_path):
    """The result of a completed fit carries its provenance: the fit process's
    versions, seed and options, the worker's host, backend and limits, and what
    the server knows itself: the sha256 of the files it stored (a forged value
    from the fit is dropped), the service, queue, worker, times and attempts."""
    clock = Clock()
    server = makeServer(tmp_path, clock)
    job = runToCompletion(server, clock, fitRequest({"fit": "lm", "seed": 5}))
    provenance = job.result["provenance"]
    assert provenance["inputs"] == {"m.py": hashlib.sha256(MODEL).hexdigest(),
                                    "d.dat": hashlib.sha256(DATA).hexdigest()}
    assert provenance["versions"] == VERSIONS and provenance["seed"] == 5
    assert provenance["options"] == {"fit": "lm", "steps": 200}
    assert provenance["host"] == "node7" and provenance["backend"] == "local"
    assert provenance["limits"] == {"cpu": 60} and provenance["sandbox"] == "namespaces"
    assert provenance["queue"] == "q" and provenance["worker"] == "w1"
    assert provenance["service"] == "refl1d" and provenance["model"] == "m.py"
    assert provenance["confinement"] == "namespaces"
    assert provenance["submitted"] == job.submitted and provenance["started"] == job.started
    assert provenance["finished"] == job.finished == 3 and provenance["attempts"] == 1
    assert withProvenance(7, job, None, {}, None, None, 0) == 7, "a result that is not an object"


def test_a_determined_resubmit_is_answered_from_the_earlier_job_without_a_lease(tmp_path):
    """The same inputs again: COMPLETE at once, ``cachedFrom`` the first job,
    never leased (attempts 0), its result that job's and its result files the
    same inodes. ``"cache": false`` runs it; a changed model runs it."""
    clock = Clock()
    server = makeServer(tmp_path, clock)
    first = runToCompletion(server, clock, fitRequest({"fit": "lm", "seed": 5}))
    cached = result(server.submit(fitRequest({"fit": "lm", "seed": 5}), files(), "10.0.0.2"))[0]
    assert cached.status == "COMPLETE" and cached.cachedFrom == first.id
    assert cached.attempts == 0 and cached.lease == 0 and cached.queue is None
    assert cached.result == first.result
    assert cached.toJSON()["cachedFrom"] == first.id
    store = server.store
    assert (os.stat(store.path(cached.id, "result", "m.par")).st_ino
            == os.stat(store.path(first.id, "result", "m.par")).st_ino)
    assert server.queue.pendingCount() == 0
    assert result(server.lease("q", "w1", versions=VERSIONS)) is None
    uncached = result(server.submit(fitRequest({"fit": "lm", "seed": 5}, cache=False), files(), "10.0.0.2"))[0]
    assert uncached.status == "PENDING" and uncached.cachedFrom is None
    changed = result(server.submit(fitRequest({"fit": "lm", "seed": 5}), files(MODEL + b"#\n"), "10.0.0.2"))[0]
    assert changed.status == "PENDING"
    with pytest.raises(errors.Refused, match="'cache' must be true or false"):
        result(server.submit(fitRequest({"fit": "lm"}, cache="no"), files(), "10.0.0.2"))


def test_the_cache_answers_only_for_the_versions_of_todays_workers(tmp_path):
    """A result made with other versions than today's workers report is not
    served; nor is one while no worker has been heard from, or workers disagree."""
    clock = Clock()
    server = makeServer(tmp_path, clock)
    runToCompletion(server, clock, fitRequest({"fit": "lm"}))
    server.resultCache.heard("w2", dict(VERSIONS, bumps="1.0.5"), clock.seconds())
    assert result(server.submit(fitRequest({"fit": "lm"}), files(), "x"))[0].status == "PENDING"
    server.resultCache.heard("w1", dict(VERSIONS, bumps="1.0.5"), clock.seconds())
    assert result(server.submit(fitRequest({"fit": "lm"}), files(), "x"))[0].status == "PENDING"
    clock.advance(server.resultCache.memory + 1)
    assert result(server.submit(fitRequest({"fit": "lm"}), files(), "x"))[0].status == "PENDING"


@pytest.mark.parametrize("snapshotEvery", [100_000, 2], ids=["replayed", "from a snapshot"])
def test_a_deleted_job_is_not_served_and_the_cache_survives_a_restart(tmp_path, snapshotEvery):
    """After a restart (the journal replayed, or a snapshot loaded) the cached
    job is still COMPLETE with its result, and the earlier job still answers;
    once it and the jobs answered from it are deleted, the same inputs run."""
    clock = Clock()
    server = makeServer(tmp_path, clock, snapshotEvery=snapshotEvery)
    first = runToCompletion(server, clock, fitRequest({"fit": "lm", "seed": 5}))
    cached = result(server.submit(fitRequest({"fit": "lm", "seed": 5}), files(), "x"))[0]
    result(server.stopService())
    if snapshotEvery == 2:
        journal = os.listdir(tmp_path / "journal")
        assert any(name.startswith("snapshot") for name in journal), journal
    server = makeServer(tmp_path, clock, snapshotEvery=snapshotEvery)
    again = server.queue.get(cached.id)
    assert again.status == "COMPLETE" and again.cachedFrom == first.id
    assert again.result == server.queue.get(first.id).result
    server.resultCache.heard("w1", VERSIONS, clock.seconds())
    third = result(server.submit(fitRequest({"fit": "lm", "seed": 5}), files(), "x"))[0]
    assert third.status == "COMPLETE" and third.cachedFrom in (first.id, cached.id)
    for jobId in (first.id, cached.id, third.id):
        result(server.delete(jobId))
    fourth = result(server.submit(fitRequest({"fit": "lm", "seed": 5}), files(), "x"))[0]
    assert fourth.status == "PENDING" and fourth.cachedFrom is None
