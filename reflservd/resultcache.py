"""The result cache: a submit answered from an earlier job's result, without a
fit (docs/api.md, "Result cache").

A refl1d job is *determined* when its result depends on its inputs alone: it
names a seed, or its fitter draws no random numbers (``DETERMINISTIC_FITTERS``
with one start). Its *input key* is the sha256 of its service, its data (the
model's name and the options, seed included) and the sha256 of each uploaded
file; the submit record carries it (``inputKey``), so the index below is
rebuilt from the jobs after a restart, whatever snapshot they came from.

A determined submit (without ``"cache": false``) is answered from the newest
COMPLETE job of the same key whose result's provenance names the versions
that every worker heard from in the last ``WORKER_MEMORY`` seconds reports
(with its lease long-polls, ``reflworkerd.provenance.serviceVersions``): the
new job's submit record names it (``cachedFrom``), the queue ends it
COMPLETE with that result at once, and its result files are hard links to
that job's (made before the record, like every file). Where the workers
disagree, or none was heard from, or one speaks the legacy protocol (it
reports nothing), nothing is answered from the cache: a fresh fit could run
on any of them.

The index is a hint: a candidate is checked against the queue (still
there, still COMPLETE: a deleted job is never served from) when it is used.
"""

import hashlib
import json
import os
import shutil

from twisted.internet import defer

from reflservd.errors import Refused
from reflservd.fitoptions import DEFAULT_FITTER
from reflservd.names import RESULTS_DIR
from reflservd.provenance import uploadDigests

DETERMINISTIC_FITTERS = ("lm", "newton", "amoeba")
"""bumps' fitters that draw no random numbers with one start (``starts`` 1):
Levenberg-Marquardt (mpfit), BFGS and Nelder-Mead start from the model's
values. (Nelder-Mead draws the next start of a multi-start fit, which one
start does not use.) DREAM, DE and PT draw throughout: only a seed
determines them."""
WORKER_MEMORY = 3600.0
"""Seconds a worker's reported versions count after its last lease long-poll."""
WORKERS_BEFORE_PRUNING = 1000
"""Workers remembered before those long silent are forgotten at a lease long-poll."""
INLINE_HASH = 256 * 1024


def cacheable(request):
    """Whether a request's result is determined by its inputs (a refl1d job
    with a seed, or a deterministic fitter with one start). A time limit
    (option ``time``) makes where the fit stops depend on the machine's speed,
    and a resume on a checkpoint: neither is determined."""
    data = request.get("data") if isinstance(request, dict) else None
    if request.get("service", "refl1d") != "refl1d" or not isinstance(data, dict):
        return False
    options = data.get("options") or {}
    if not isinstance(options, dict) or options.get("resume") or options.get("time"):
        return False
    if options.get("seed"):
        return True
    return (options.get("fit") or DEFAULT_FITTER) in DETERMINISTIC_FITTERS and options.get("starts", 1) in (0, 1)


def wantsCache(request):
    """The request's ``cache`` (default true); ``Refused`` unless a boolean."""
    value = request.get("cache", True) if isinstance(request, dict) else True
    if not isinstance(value, bool):
        raise Refused("'cache' must be true or false, not %r" % (value,))
    return value


def inputKey(request, digests):
    """The sha256 of what decides a determined job's result."""
    text = json.dumps({"service": request.get("service", "refl1d"), "data": request.get("data"),
                       "files": digests}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resultVersions(job):
    """The versions the fit process of ``job``'s result saw, or None."""
    result = job.result
    provenance = result.get("provenance") if isinstance(result, dict) else None
    return provenance.get("versions") if isinstance(provenance, dict) else None


def checkVersions(versions):
    """A worker's reported versions, or None where it sent none or not an object of strings."""
    if not isinstance(versions, dict) or len(versions) > 20:
        return None
    if not all(isinstance(k, str) and (v is None or isinstance(v, str)) and len(k) + len(v or "") < 200
               for k, v in versions.items()):
        return None
    return versions


def shareResults(store, sourceId, jobId):
    """Hard-link the result files of ``sourceId`` into ``jobId``'s results
    (blocking). A source whose files are gone raises OSError."""
    source = os.path.join(store.jobDir(sourceId), RESULTS_DIR)
    target = os.path.join(store.jobDir(jobId), RESULTS_DIR)
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        if not name.startswith(".part-"):
            os.link(os.path.join(source, name), os.path.join(target, name))


def unshareResults(store, jobId):
    shutil.rmtree(os.path.join(store.jobDir(jobId), RESULTS_DIR), ignore_errors=True)


class ResultCache:
    """The input keys of the COMPLETE determined jobs, and the versions the
    workers report; no state of its own that a restart would lose (the keys
    are in the jobs, the workers report again within a long-poll)."""

    def __init__(self, memory=WORKER_MEMORY):
        self.memory = memory
        self._workers = {}      # worker -> (versions or None, when last heard)
        self._index = {}        # inputKey -> [job ids], oldest first

    # ---- the workers

    def heard(self, worker, versions, now):
        """A worker long-polled for a lease reporting ``versions`` (None: it did not say).
        Those not heard from within ``memory`` are forgotten here too, once
        there are many, so that the list stays bounded without submits."""
        self._workers[worker] = (checkVersions(versions), now)
        if len(self._workers) > WORKERS_BEFORE_PRUNING:
            self._forgetSilent(now)

    def _forgetSilent(self, now):
        for worker, (_, when) in list(self._workers.items()):
            if when < now - self.memory:
                del self._workers[worker]

    def workerVersions(self, now):
        """The versions every worker heard from lately reports, or None (none heard,
        one that did not say, or two that disagree)."""
        self._forgetSilent(now)
        reported = [versions for versions, _ in self._workers.values()]
        if not reported or any(v is None or v != reported[0] for v in reported):
            return None
        return reported[0]

    # ---- the index

    def rebuild(self, queue):
        """Index the jobs of a queue just loaded (or reloaded)."""
        self._index = {}
        for job in queue.jobs.values():
            self.jobChanged(job)

    def jobChanged(self, job):
        """Called with each job event: a determined job that ends COMPLETE is indexed."""
        if job.status == "COMPLETE" and job.inputKey is not None:
            ids = self._index.setdefault(job.inputKey, [])
            if job.id not in ids:
                ids.append(job.id)

    def find(self, queue, key, now):
        """The newest COMPLETE job of input key ``key`` that today's workers would
        reproduce (its versions are theirs), or None."""
        ids = self._index.get(key)
        if not ids:
            return None
        ids[:] = [i for i in ids if i in queue.jobs and queue.jobs[i].status == "COMPLETE"]
        versions = self.workerVersions(now)
        if versions is None:
            return None
        for jobId in reversed(ids):
            job = queue.jobs[jobId]
            if resultVersions(job) == versions:
                return job
        return None

    # ---- a submit

    def lookUp(self, server, request, files):
        """``(inputKey, source)`` for a submit (a Deferred): the key when it is
        determined (else None), and the job to answer it from (else None). A
        request that cannot be cached is answered at once: every submit asks."""
        if not cacheable(request):
            return defer.succeed((None, None))
        return self._lookUp(server, request, files)

    @defer.inlineCallbacks
    def _lookUp(self, server, request, files):
        useCache = wantsCache(request)
        if all(isinstance(source, bytes) for _, source in files) and sum(
                len(source) for _, source in files) <= INLINE_HASH:
            digests = uploadDigests(files)
        else:
            digests = yield server.inThread(uploadDigests, files)
        key = inputKey(request, digests)
        return key, (self.find(server.queue, key, server.reactor.seconds()) if useCache else None)

    @defer.inlineCallbacks
    def share(self, server, source, jobId):
        """Link ``source``'s result files into the new job ``jobId``; ``source``,
        or None where it went (deleted) meanwhile: the job then runs."""
        try:
            yield server.inThread(shareResults, server.store, source.id, jobId)
        except OSError:
            source = None
        if source is not None and server.queue.jobs.get(source.id) is source and source.status == "COMPLETE":
            return source
        yield server.inThread(unshareResults, server.store, jobId)
        return None
