"""A result's provenance: how it was made (docs/api.md, "Provenance").

A completed refl1d result carries ``result["provenance"]``, put together
when its worker completes the job from three sources, each trusted for what
only it knows:

- the fit process (``reflworkerd.provenance.fitProvenance``): the versions
  of refl1d, bumps, numpy, scipy and Python it imported, the seed, the
  options after bumps' defaults;
- the worker (``reflworkerd.provenance.workerFacts``, sent with the
  outcome): its host, backend, sandbox mode and limits, its reflservd;
- the server itself, never taken from the worker: the service, the sha256
  of the model and of each data file as it stored them, the queue and the
  worker the job was leased to, the confinement reported, the times
  (submitted, started, finished) and the attempts.

The server reads the stored uploads' bytes to hash them; it never loads a
model.
"""

import hashlib

from twisted.internet import defer

from reflservd import limits
from reflservd.errors import Refused

CHUNK = 1 << 20
WORKER_FIELDS = ("host", "reflservd", "backend", "sandbox", "limits")
FIT_FIELDS = ("versions", "seed", "options")


def sha256Of(source):
    """The hex sha256 of an upload: bytes, or a file (read from its start and left there)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    here = source.tell()
    for chunk in iter(lambda: source.read(CHUNK), b""):
        digest.update(chunk)
    source.seek(here)
    return digest.hexdigest()


def uploadDigests(files):
    """``{name: sha256}`` of a submit's ``[(name, bytes or file)]``."""
    return {name: sha256Of(source) for name, source in files}


def storedDigests(store, jobId):
    """``{name: sha256}`` of a job's stored uploads (blocking: run in a thread)."""
    digests = {}
    for name, _ in store.files(jobId, "upload"):
        with open(store.path(jobId, "upload", name), "rb") as f:
            digests[name] = sha256Of(f)
    return digests


def withProvenance(result, job, request, digests, workerFacts, confinement, now):
    """``result`` with its ``provenance``: the fit's part as its process sent
    it, the worker's, and the server's own (which no other part overrides).
    A result that is not an object is returned as it is."""
    if not isinstance(result, dict):
        return result
    fit = result.get("provenance")
    fit = fit if isinstance(fit, dict) else {}
    provenance = {name: fit[name] for name in FIT_FIELDS if name in fit}
    if isinstance(workerFacts, dict):
        provenance.update((name, workerFacts[name]) for name in WORKER_FIELDS if name in workerFacts)
    data = request.get("data") if isinstance(request, dict) else None
    provenance.update(
        service=job.service,
        model=data.get("model") if isinstance(data, dict) else None,
        inputs=digests,
        queue=job.queue, worker=job.worker,
        confinement=confinement or job.confinement,
        submitted=job.submitted, started=job.started, finished=now,
        attempts=job.attempts,
    )
    return dict(result, provenance=provenance)


def checkWorkerFacts(facts):
    """The worker's part of a provenance, held to ``limits.checkJSON``; ``Refused`` otherwise."""
    if facts is not None:
        if not isinstance(facts, dict):
            raise Refused("'provenance' must be an object")
        limits.checkJSON(facts, "'provenance'")
    return facts


@defer.inlineCallbacks
def completedResult(server, job, result, workerFacts, confinement):
    """``(result with its provenance, now)`` for a job its worker completes
    (``QueueServer.complete``): the stored inputs hashed in the store's
    threads, ``now`` the time the job finishes at."""
    checkWorkerFacts(workerFacts)
    digests = yield server.inThread(storedDigests, server.store, job.id)
    request = yield server.inThread(server.readRequest, job.id)
    now = server.reactor.seconds()
    return withProvenance(result, job, request, digests, workerFacts, confinement, now), now
