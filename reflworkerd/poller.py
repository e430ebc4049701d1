"""The worker's pulling and reporting side: leases, heartbeats, results.

``Poller`` keeps up to ``slots`` fits running. While a slot is free it holds
one long-poll for a lease on its queue (never more, and never a busy loop:
a failed or suspiciously quick answer waits out a capped, jittered
exponential backoff). Each leased job is a ``LeasedJob``: its uploads are
streamed into ``workDir/jobs/<id>/``, the fit runs in the backend
(``backend.IBackend``), its progress goes to the server in heartbeats at
most once per ``progressInterval`` (the latest progress wins) and at least
every third of the lease timeout, and a heartbeat that answers ``cancel``
cancels the fit.

Where the worker runs as root, each slot runs its fits as a uid of its own
(``slotUidBase + slot``; the fork server's child chowns the job directory to
it before dropping to it).

A DREAM or DE fit checkpoints its session file (``results/session.h5``): the
worker uploads it as the job's result file ``session.h5``, at most every
``checkpointEvery`` seconds. When the server hands out a job with such a
checkpoint of an earlier attempt (``"checkpoint"`` in the lease answer), the
worker downloads it into ``results/`` and runs the fit with ``resume``: it goes
on from where the lost attempt left off instead of starting over.

When the fit ends, the files it left in ``results/`` are looked at
(``jobfiles.scanResults``, off the reactor thread, as every read of what a
fit left): anything but a regular file of the slot's uid ends the job
``ERROR`` saying what was found, and so do results past the per-job quota
(``resultFilesQuota`` files, ``resultBytesQuota`` bytes by apparent size),
keeping the files within it and naming those left out. What is kept is
uploaded in bounded parts (a server that answers 413, over its own quota,
ends the job ``ERROR`` with its message) and the job is completed with its
lease token. Until the server has
acknowledged the completion the outcome stays on disk
(``workDir/jobs/<id>.json``): a server that is down only delays delivery, and
a worker that restarts delivers what its previous run could not. A 409 (or
404) says the lease is no longer ours: the job is dropped quietly.

``ServerClient`` is the HTTP side of all this (docs/api.md, "For workers"),
over an injected treq client.
"""

import copy
import json
import math
import os
import random as _random
import shutil
import socket

import treq
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from reflworkerd import jobfiles, outcome
from reflworkerd.jobfiles import finite
from reflworkerd.shared import RESULTS_DIR, SESSION_NAME, isResumable

PART_SIZE = 8 * 1024 * 1024
"""Bytes per PUT of a result file: the server buffers each request body whole."""
UPLOADS_AT_ONCE = 4
"""Result files uploaded at the same time when a fit ends."""

MIN_PROGRESS_INTERVAL = 0.1
"""The shortest ``progressInterval``: progress leaves the worker at most this often per job."""

LEASE_MARGIN = 15.0
"""Seconds a lease long-poll may take past its own timeout before we give up on it."""


class ServerError(Exception):
    """The server answered with an error status, or could not be reached (``code`` None)."""

    def __init__(self, code, message, detail=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.detail = detail if detail is not None else message

    @property
    def stale(self):
        """The lease is not ours any more (or the job is gone): drop the job."""
        return self.code in (404, 409)

    @property
    def transient(self):
        """Worth trying again later: no answer, a server error, or a plea to slow down."""
        return self.code is None or self.code >= 500 or self.code in (408, 429)

    def __str__(self):
        if self.code is None:
            return self.message
        return "%d %s" % (self.code, self.message)


class OverQuota(Exception):
    """A file of a job that is larger than the job may send."""


def checkName(name):
    """A server-given file name that is safe to create in a job directory."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name or name.startswith(".")):
        raise ValueError("unsafe file name %r" % (name,))
    return name


class ServerClient:
    """The worker routes of one reflservd server, over a treq client.

    Every method returns a Deferred; an error status or a failure to reach the
    server errbacks with `ServerError`.
    """

    _log = Logger()

    def __init__(self, reactor, http, baseURL, token=None, requestTimeout=60.0):
        self.reactor = reactor
        self.http = http
        self.baseURL = baseURL.rstrip("/")
        self.token = token
        self.requestTimeout = requestTimeout

    def _headers(self, extra=None):
        headers = {b"Accept": [b"application/json"]}
        if self.token:
            headers[b"Authorization"] = [b"Bearer " + self.token.encode("latin-1")]
        headers.update(extra or {})
        return headers

    @defer.inlineCallbacks
    def _call(self, method, path, params=None, body=None, data=None, timeout=None):
        headers = {}
        if body is not None:
            data = json.dumps(finite(body)).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json"]
        elif data is not None:
            headers[b"Content-Type"] = [b"application/octet-stream"]
        try:
            response = yield self.http.request(
                method, self.baseURL + path, params=params, data=data,
                headers=self._headers(headers), reactor=self.reactor,
                timeout=timeout or self.requestTimeout)
            content = yield response.content()
        except Exception as e:
            raise ServerError(None, "%s %s: %s" % (method, path, _describe(e)))
        if response.code >= 400:
            try:
                message = json.loads(content)["error"]
            except Exception:
                message = content[:200].decode("utf-8", "replace")
            raise ServerError(response.code, "%s %s: %s" % (method, path, message), str(message))
        if response.code == 204 or not content:
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise ServerError(None, "%s %s: the answer is not JSON" % (method, path))

    def lease(self, queueName, timeout, worker=None):
        """The lease record of the next job, or None when none came within ``timeout``."""
        return self._call("POST", "/api/v1/queues/%s/lease" % (queueName,),
                          params={"timeout": "%g" % (timeout,)},
                          body={"worker": worker} if worker else None,
                          timeout=timeout + LEASE_MARGIN)

    def heartbeat(self, jobId, lease, progress=None, confinement=None):
        body = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        if confinement:
            body["confinement"] = confinement
        return self._call("POST", "/api/v1/jobs/%d/heartbeat" % (jobId,), body=body)

    def complete(self, jobId, lease, outcome):
        body = {"lease": lease, "status": outcome.get("status")}
        for field in ("result", "error", "trace"):
            if outcome.get(field) is not None:
                body[field] = outcome[field]
        if outcome.get("confinement"):
            body["confinement"] = outcome["confinement"]
        return self._call("POST", "/api/v1/jobs/%d/complete" % (jobId,), body=body)

    def release(self, jobId, lease):
        return self._call("POST", "/api/v1/jobs/%d/release" % (jobId,), body={"lease": lease})

    @defer.inlineCallbacks
    def download(self, jobId, name, path, kind="upload"):
        """Stream the job's file ``name`` (an upload, or with ``kind="result"`` a
        result) to ``path`` (written aside, then renamed); its size."""
        url = "%s/api/v1/jobs/%d/files/%s" % (self.baseURL, jobId, name)
        temporary = os.path.join(os.path.dirname(path), ".download-" + os.path.basename(path))
        try:
            response = yield self.http.request(
                "GET", url, params={"kind": kind}, headers=self._headers(),
                reactor=self.reactor, timeout=self.requestTimeout, unbuffered=True)
        except Exception as e:
            raise ServerError(None, "GET %s: %s" % (url, _describe(e)))
        if response.code != 200:
            content = yield response.content()
            try:
                message = json.loads(content)["error"]
            except Exception:
                message = content[:200].decode("utf-8", "replace")
            raise ServerError(response.code, "GET %s: %s" % (url, message))
        size = [0]
        with open(temporary, "wb") as f:
            def write(data):
                f.write(data)
                size[0] += len(data)
            try:
                yield treq.collect(response, write)
            except Exception as e:
                raise ServerError(None, "GET %s: %s" % (url, _describe(e)))
        os.rename(temporary, path)
        return size[0]

    def putPart(self, jobId, lease, name, offset, data, last):
        """Upload ``data`` at ``offset`` of the job's result ``name`` (``last`` ends it)."""
        params = {"lease": str(lease), "offset": str(offset)}
        if last:
            params["last"] = "1"
        return self._call("PUT", "/api/v1/jobs/%d/files/%s" % (jobId, name), params=params, data=data)


def _describe(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class Backoff:
    """Capped exponential delays with jitter: ``initial``, doubling, up to ``cap``.

    Each delay is drawn in [d/2, d) from the injected ``random`` (a function
    returning floats in [0, 1)), so that many workers that lost the same
    server do not come back in step.
    """

    def __init__(self, initial=0.5, cap=30.0, factor=2.0, random=_random.random):
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.random = random
        self.failures = 0

    def next(self):
        delay = min(self.cap, self.initial * self.factor ** self.failures)
        self.failures += 1
        return delay * (0.5 + 0.5 * self.random())

    def reset(self):
        self.failures = 0


class Reachability:
    """Logs when the server goes away and when it comes back, once each."""

    _log = Logger()

    def __init__(self, url):
        self.url = url
        self.down = False

    def failed(self, error):
        if not self.down:
            self.down = True
            code = getattr(error, "code", None)
            what = "unreachable" if code is None else "answers %d" % (code,)
            self._log.warn("server {url} {what} ({why}); retrying with backoff",
                           url=self.url, what=what, why=str(error))

    def ok(self):
        if self.down:
            self.down = False
            self._log.info("server {url} reachable again", url=self.url)


class LeasedJob:
    """One job this worker holds a lease on, from the lease to the acknowledged result.

    Its state lives in ``workDir/jobs/<id>.json`` (id, lease, and once the fit
    ended its outcome) beside the job directory ``workDir/jobs/<id>/``, which
    the fit may write to and so is never trusted for the worker's own state.
    """

    _log = Logger()

    def __init__(self, poller, jobId, lease, leaseTimeout, request=None, files=(),
                 outcome=None, uploaded=(), checkpoint=None, slot=None, uid=None, results=None):
        self.poller = poller
        self.reactor = poller.reactor
        self.client = poller.client
        self.jobId = jobId
        self.lease = lease
        self.leaseTimeout = leaseTimeout
        self.request = request
        self.files = [tuple(f) for f in files]
        self.outcome = outcome
        self.uploaded = set(uploaded)
        self.jobDir = os.path.join(poller.jobsDir, str(int(jobId)))
        self.statePath = self.jobDir + ".json"
        self.checkpoint = checkpoint
        self.slot = slot
        self.uid = uid if uid is not None else poller.slotUid(slot)
        self.results = dict(results) if results is not None else None
        self.fitRun = None
        self.dropped = False
        self.delivered = False
        self.releasing = False
        self.finished = defer.Deferred()
        self.fitEnded = defer.Deferred()
        self.cancelled = False
        self._pendingProgress = None
        self._confinementSent = None
        self._lastBeat = None
        self._beatCall = None
        self._beating = None
        self._beatBackoff = poller.makeBackoff(cap=self.keepalive())
        self._working = None
        self._stopped = False
        self.halted = False
        self._checkpointWanted = None
        self._checkpointCall = None
        self._checkpointUpload = None
        self._lastCheckpoint = None
        self._serverQuotaReached = False

    # ---- state on disk

    def saveState(self):
        """Write the worker's state of this job (for a restart); True when it is on disk."""
        state = {"id": self.jobId, "lease": self.lease, "leaseTimeout": self.leaseTimeout,
                 "outcome": self.outcome, "uploaded": sorted(self.uploaded), "uid": self.uid,
                 "results": self.results}
        temporary = self.statePath + ".tmp"
        try:
            with open(temporary, "w") as f:
                json.dump(finite(state), f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temporary, self.statePath)
        except OSError as e:
            self._log.warn("job {jobId}: its state could not be saved ({why}); a restart "
                           "of the worker would lose it", jobId=self.jobId, why=e.strerror)
            return False
        return True

    def cleanUp(self):
        shutil.rmtree(self.jobDir, ignore_errors=True)
        for path in (self.statePath, self.statePath + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # ---- life

    def start(self):
        """Download the uploads, run the fit, deliver its outcome."""
        shutil.rmtree(self.jobDir, ignore_errors=True)
        try:
            os.makedirs(self.jobDir)
        except OSError as e:
            self._log.error("job {jobId}: cannot make {path} ({why}); handing it back",
                            jobId=self.jobId, path=self.jobDir, why=e.strerror)
            return self.handBack()
        self.saveState()
        self._scheduleBeat()
        self._working = self._run()
        self._working.addErrback(self._failed)
        return self.finished

    def resume(self):
        """Deliver an outcome that a previous run of the worker left undelivered."""
        self._endFit(None)
        self._scheduleBeat()
        self._working = self._deliverThenFinish()
        self._working.addErrback(self._failed)
        return self.finished

    def handBack(self):
        """Give the job back to the queue: its fit was lost with a previous run of the
        worker, or cannot be set up here."""
        self._endFit(None)
        self._working = self._release()
        self._working.addBoth(lambda _: self._finish())
        return self.finished

    def _failed(self, failure):
        if failure.check(_Halted):
            self._log.warn("job {jobId}: the worker stops before its outcome was delivered; "
                           "it stays in {path} for the next start", jobId=self.jobId,
                           path=self.statePath)
            self._endFit(None)
            self._stopBeats()
            if not self.finished.called:
                self.finished.callback(None)
            return
        self._log.failure("job {jobId}: unexpected failure; dropped", failure, jobId=self.jobId)
        self._endFit(None)
        self._finish()

    @defer.inlineCallbacks
    def _run(self):
        request = self.request
        try:
            yield self._download()
            request = yield self._resumeRequest()
        except _Dropped:
            pass
        except ServerError as e:
            self._log.error("job {jobId}: its files could not be downloaded ({why}); "
                            "reporting an error", jobId=self.jobId, why=str(e))
            self.outcome = outcome.error("the worker could not download the job's files: %s" % (e,))
        except OSError as e:
            self.outcome = outcome.error("the worker could not store the job's files: %s" % (e,))
        if self.outcome is None and not (self.dropped or self.releasing or self.cancelled):
            self._log.info("job {jobId} (lease {lease}): fit starts", jobId=self.jobId,
                           lease=self.lease)
            self.fitRun = self.poller.backend.run(
                self.jobId, self.jobDir, request, self.progress,
                onCheckpoint=self.checkpointed if self.resumable() else None, uid=self.uid, gid=self.uid)
            try:
                self.outcome = yield self.fitRun.done
            except Exception as e:
                self.outcome = outcome.error("the worker lost the fit: %s" % (e,))
            self._log.info("job {jobId}: fit ended {status}", jobId=self.jobId,
                           status=self.outcome.get("status"))
        elif self.outcome is None:
            self.outcome = outcome.cancelled()
        yield self._stopCheckpoints()
        if not (self.dropped or self.releasing):
            yield self._keepResults()
        self._endFit(self.outcome)
        if self.dropped:
            self._finish()
            return
        if self.releasing:
            yield self._release()
            self._finish()
            return
        self.saveState()
        yield self._deliverThenFinish()

    def _endFit(self, outcome):
        if not self.fitEnded.called:
            self.fitEnded.callback(outcome)

    def _checkHalted(self):
        if self.halted:
            raise _Halted()

    @defer.inlineCallbacks
    def _download(self):
        backoff = self.poller.makeBackoff()
        for name, size in self.files:
            checkName(name)
            path = os.path.join(self.jobDir, name)
            while True:
                if self.dropped or self.cancelled or self.releasing:
                    raise _Dropped()
                try:
                    got = yield self.client.download(self.jobId, name, path)
                except ServerError as e:
                    if e.stale:
                        self.drop(str(e))
                        raise _Dropped()
                    if not e.transient:
                        raise
                    self.poller.reachability.failed(e)
                    yield self.poller.sleep(backoff.next())
                    continue
                self.poller.reachability.ok()
                if size is not None and got != size:
                    raise ServerError(None, "upload %r is %d bytes, the server said %d" % (name, got, size))
                break

    def resumable(self):
        """Whether this job's fit can go on from a checkpoint (a DREAM or DE fit of refl1d)."""
        return isResumable(self.request)

    @defer.inlineCallbacks
    def _resumeRequest(self):
        """The request to run: with ``resume`` where the server has a checkpoint of an
        earlier attempt and it came down into ``results/``; else the request as it is
        (a fit that cannot resume, or whose checkpoint cannot be had, starts over)."""
        if not self.checkpoint or not self.resumable():
            return self.request
        folder = os.path.join(self.jobDir, RESULTS_DIR)
        path = os.path.join(folder, SESSION_NAME)
        try:
            os.makedirs(folder, exist_ok=True)
            size = yield self.client.download(self.jobId, checkName(self.checkpoint), path, kind="result")
        except ServerError as e:
            self._log.warn("job {jobId}: its checkpoint could not be downloaded ({why}); "
                           "the fit starts over", jobId=self.jobId, why=str(e))
            shutil.rmtree(folder, ignore_errors=True)
            return self.request
        except (OSError, ValueError) as e:
            self._log.warn("job {jobId}: its checkpoint could not be stored ({why}); "
                           "the fit starts over", jobId=self.jobId, why=e)
            shutil.rmtree(folder, ignore_errors=True)
            return self.request
        self._log.info("job {jobId}: resuming the fit from the checkpoint of an earlier attempt "
                       "({size} bytes)", jobId=self.jobId, size=size)
        request = copy.deepcopy(self.request)
        request["data"]["options"]["resume"] = True
        return request

    @defer.inlineCallbacks
    def _keepResults(self):
        """Decide which result files go to the server: the regular files of the
        fit's uid within the quota. Anything else ends the job ERROR saying so."""
        try:
            found = yield self.poller.inThread(
                jobfiles.scanResults, self.jobDir, self.uid, self.poller.resultFilesQuota,
                self.poller.resultBytesQuota, RESULTS_DIR, checkName)
        except OSError as e:
            found = jobfiles.Results()
            found.unsafe.append("the job directory cannot be read (%s)" % (e.strerror,))
        self.results = dict(found.sizes)
        said = (self.outcome or {}).get("error") or ""
        found.unsafe = [what for what in found.unsafe if what not in said]     # said already (a checkpoint)
        problem = found.problem()
        if problem is not None:
            self._log.warn("job {jobId}: {problem}", jobId=self.jobId, problem=problem)
            self._failWith(problem)

    def _failWith(self, why):
        """The job ends ERROR for ``why`` (its fit's own error, if any, kept after it)."""
        self.outcome = outcome.failedWith(self.outcome, why)

    @defer.inlineCallbacks
    def _putFile(self, name, relative, limit=None, maximum=None):
        """Upload the job's file ``relative`` as its result ``name``, opened and read
        off the reactor thread (``jobfiles.openFile``), at most ``limit`` bytes of it
        (its size when it was looked at); the bytes sent. A file larger than
        ``maximum`` is not sent (`OverQuota`)."""
        jobFile = yield self.poller.inThread(jobfiles.openFile, self.jobDir, relative, self.uid)
        try:
            if maximum is not None and jobFile.size > maximum:
                raise OverQuota("%s is %d bytes, over the quota of %d bytes per job"
                                % (relative, jobFile.size, maximum))
            size = jobFile.size if limit is None else min(jobFile.size, limit)
            offset = 0
            while True:
                part = yield self.poller.inThread(jobFile.read, offset, min(self.poller.partSize, size - offset))
                last = offset + len(part) >= size or not part
                yield self.client.putPart(self.jobId, self.lease, name, offset, part, last)
                offset += len(part)
                if last:
                    return offset
        finally:
            jobFile.close()

    # ---- checkpoints

    def checkpointed(self, path):
        """The fit says it saved its session file at ``path`` (relative to the job
        directory): upload it as the job's ``session.h5``, at most every
        ``checkpointEvery`` seconds (the latest wins)."""
        if self.dropped or self.fitEnded.called:
            return
        self._checkpointWanted = path
        self._scheduleCheckpoint()

    def _scheduleCheckpoint(self):
        if (self._checkpointWanted is None or self._checkpointUpload is not None
                or self._checkpointCall is not None):
            return
        now = self.reactor.seconds()
        due = now if self._lastCheckpoint is None else self._lastCheckpoint + self.poller.checkpointEvery
        self._checkpointCall = self.reactor.callLater(max(0.0, due - now), self._uploadCheckpoint)

    def _uploadCheckpoint(self):
        self._checkpointCall = None
        path, self._checkpointWanted = self._checkpointWanted, None
        if path is None or self.dropped or self.fitEnded.called:
            return
        self._lastCheckpoint = self.reactor.seconds()
        d = self._checkpointUpload = self._putFile(SESSION_NAME, path, maximum=self.poller.resultBytesQuota)
        d.addCallbacks(self._checkpointSent, self._checkpointFailed)
        d.addBoth(self._checkpointDone)

    def _checkpointSent(self, size):
        self.poller.reachability.ok()
        self._log.info("job {jobId}: checkpoint sent ({size} bytes)", jobId=self.jobId, size=size)

    def _checkpointFailed(self, failure):
        if failure.check(jobfiles.UnsafeFile):
            if self.fitRun is not None:
                self.fitRun.abort("its checkpoint cannot be used: %s" % (failure.value,))
        elif failure.check(ServerError):
            error = failure.value
            if error.stale:
                self.drop(str(error))
            elif error.transient:
                self.poller.reachability.failed(error)
            else:
                self._log.warn("job {jobId}: checkpoint refused ({why})", jobId=self.jobId, why=str(error))
        elif failure.check(OSError, OverQuota):
            self._log.warn("job {jobId}: checkpoint not sent ({why})", jobId=self.jobId,
                           why=failure.getErrorMessage())
        else:
            self._log.failure("job {jobId}: checkpoint upload", failure, jobId=self.jobId)

    def _checkpointDone(self, _):
        self._checkpointUpload = None
        self._scheduleCheckpoint()

    def _stopCheckpoints(self):
        """No more checkpoints; fires once the one on its way (if any) is done, so that
        the final session file never races a checkpoint to the same name."""
        self._checkpointWanted = None
        if self._checkpointCall is not None and self._checkpointCall.active():
            self._checkpointCall.cancel()
        self._checkpointCall = None
        if self._checkpointUpload is None:
            return defer.succeed(None)
        idle = defer.Deferred()
        self._checkpointUpload.addBoth(lambda _: idle.callback(None))
        return idle

    # ---- delivery

    @defer.inlineCallbacks
    def _deliverThenFinish(self):
        yield self._deliver()
        self._finish()

    @defer.inlineCallbacks
    def _uploadResults(self):
        """Upload the result files not yet acknowledged, a few at a time (each
        is a round trip and a journal record on the server). Every upload of
        a round ends before this does, so a retry never races one in flight;
        then a stale or transient refusal, if any, is raised."""
        if self.results is None:
            yield self._keepResults()     # an outcome a worker of an older version left
        names = [name for name in sorted(self.results) if name not in self.uploaded]
        limit = defer.DeferredSemaphore(UPLOADS_AT_ONCE)
        outcomes = yield defer.DeferredList(
            [limit.run(self._uploadOne, name) for name in names], consumeErrors=True)
        errors = [result for ok, result in outcomes if not ok]
        stale = [f for f in errors if f.check(ServerError) and f.value.stale]
        for failure in stale or errors:
            failure.raiseException()

    @defer.inlineCallbacks
    def _uploadOne(self, name):
        if self._serverQuotaReached:
            return
        try:
            yield self._putFile(name, RESULTS_DIR + "/" + name, self.results.get(name))
        except ServerError as e:
            if e.stale or e.transient:
                raise
            if e.code == 413:
                self._log.error("job {jobId}: result file {name} refused, over the server's quota "
                                "({why}); no more are sent", jobId=self.jobId, name=name, why=str(e))
                self._serverQuotaReached = True
                self._failWith("the server refused result file %s: %s" % (name, e.detail))
            else:
                self._log.error("job {jobId}: result file {name} refused ({why}); "
                                "skipped", jobId=self.jobId, name=name, why=str(e))
        except jobfiles.UnsafeFile as e:
            self._log.warn("job {jobId}: result file {name} not sent ({why})",
                           jobId=self.jobId, name=name, why=str(e))
            self._failWith("the fit left what the worker does not read: %s" % (e,))
        except OSError as e:
            self._log.warn("job {jobId}: result file {name} not sent ({why})",
                           jobId=self.jobId, name=name, why=str(e))
        self.uploaded.add(name)
        self.saveState()

    @defer.inlineCallbacks
    def _deliver(self):
        """Upload the result files, then complete; until acknowledged or refused as stale."""
        backoff = self.poller.makeBackoff()
        refusedOnce = False
        while not self.dropped:
            self._checkHalted()
            try:
                yield self._uploadResults()
                if self._pendingProgress is not None:
                    # The fit's last progress (its final step and chi^2) must not
                    # wait for the heartbeat's rate limit: the job ends now.
                    progress, self._pendingProgress = self._pendingProgress, None
                    yield self.client.heartbeat(self.jobId, self.lease, progress, None)
                try:
                    yield self.client.complete(self.jobId, self.lease, self.outcome)
                except ServerError as e:
                    if e.stale or e.transient or refusedOnce:
                        raise
                    refusedOnce = True
                    self._log.error("job {jobId}: the server refused its outcome ({why}); "
                                    "reporting that instead", jobId=self.jobId, why=str(e))
                    self.outcome = outcome.error("the server refused the worker's outcome: %s" % (e,),
                                                 confinement=self.outcome.get("confinement"))
                    continue
            except ServerError as e:
                self._checkHalted()
                if e.stale:
                    self.drop(str(e))
                    return
                if not e.transient:
                    self._log.error("job {jobId}: delivery refused ({why}); dropped",
                                    jobId=self.jobId, why=str(e))
                    self.dropped = True
                    return
                self.poller.reachability.failed(e)
                try:
                    yield self.poller.sleep(backoff.next())
                except defer.CancelledError:
                    raise _Halted()
                continue
            self.poller.reachability.ok()
            self.delivered = True
            return

    @defer.inlineCallbacks
    def _release(self):
        """Hand the job back (the worker stops); a few tries, then the lease runs out."""
        backoff = self.poller.makeBackoff()
        for attempt in range(3):
            try:
                yield self.client.release(self.jobId, self.lease)
            except ServerError as e:
                if e.transient and attempt < 2 and not self.halted:
                    try:
                        yield self.poller.sleep(backoff.next())
                    except defer.CancelledError:
                        return
                    continue
                self._log.info("job {jobId}: not released ({why}); its lease will run out",
                               jobId=self.jobId, why=str(e))
                return
            self._log.info("job {jobId}: released back to the queue", jobId=self.jobId)
            return

    def _finish(self):
        """Remove the job's files (off the reactor thread: a fit may have left
        a great many), then say the job is no longer held here."""
        self._stopBeats()
        d = self.poller.inThread(self.cleanUp)
        d.addErrback(lambda f: self._log.failure("job {jobId}: its files could not be removed", f,
                                                 jobId=self.jobId))
        d.addCallback(lambda _: self._removed())

    def _removed(self):
        if self.delivered:
            self._log.info("job {jobId}: {status} delivered; its files are removed",
                           jobId=self.jobId, status=self.outcome.get("status"))
        else:
            self._log.info("job {jobId}: no longer held here; its files are removed",
                           jobId=self.jobId)
        if not self.finished.called:
            self.finished.callback(None)

    # ---- control

    def cancelFit(self, why):
        """Stop the fit at the server's request; its CANCEL outcome is delivered."""
        self._log.info("job {jobId}: cancelling the fit ({why})", jobId=self.jobId, why=why)
        self.cancelled = True
        if self.fitRun is not None:
            self.fitRun.cancel(self.poller.cancelGrace)

    def drop(self, why):
        """The lease is not ours any more: stop the fit, deliver nothing."""
        if self.dropped:
            return
        self._log.info("job {jobId}: lease {lease} is not current ({why}); dropped",
                       jobId=self.jobId, lease=self.lease, why=why)
        self.dropped = True
        self._stopBeats()
        if self.fitRun is not None and not self.fitEnded.called:
            self.fitRun.cancel(self.poller.cancelGrace)

    def releaseOnStop(self):
        """The worker stops with ``--drain=release``: end the fit and give the job back."""
        if self.fitEnded.called:
            return
        self.releasing = True
        if self.fitRun is not None:
            self.fitRun.cancel(self.poller.cancelGrace)

    def halt(self):
        """The worker stops: leave an undelivered outcome on disk for the next start."""
        self.halted = True
        if self._working is not None and not self.finished.called:
            self._working.cancel()

    # ---- heartbeats

    def keepalive(self):
        return max(self.leaseTimeout / 3.0, 0.1)

    def progress(self, progress):
        """Progress from the fit (in the reactor thread): sent with the next heartbeat."""
        if not isinstance(progress, dict):
            return
        self._pendingProgress = progress
        self._scheduleBeat()

    def _scheduleBeat(self):
        if self._stopped or self._beating is not None:
            return
        now = self.reactor.seconds()
        if self._lastBeat is None:
            due = now if self._pendingProgress is not None else now + self.keepalive()
        elif self._pendingProgress is not None or self._confinementChanged():
            due = self._lastBeat + self.poller.progressInterval
        else:
            due = self._lastBeat + self.keepalive()
        delay = max(0.0, due - now)
        if self._beatCall is not None and self._beatCall.active():
            if self._beatCall.getTime() <= now + delay:
                return
            self._beatCall.cancel()
        self._beatCall = self.reactor.callLater(delay, self._beat)

    def _confinementChanged(self):
        confinement = getattr(self.fitRun, "confinement", None) or None
        return confinement is not None and confinement != self._confinementSent

    def _beat(self):
        self._beatCall = None
        if self._stopped:
            return
        progress, self._pendingProgress = self._pendingProgress, None
        confinement = getattr(self.fitRun, "confinement", None) or None
        if confinement == self._confinementSent:
            confinement = None
        self._lastBeat = self.reactor.seconds()
        d = self._beating = self.client.heartbeat(self.jobId, self.lease, progress, confinement)
        d.addCallbacks(self._beatAnswered, self._beatFailed,
                       errbackArgs=(progress,), callbackArgs=(confinement,))

    def _beatAnswered(self, answer, confinement):
        self._beating = None
        if self._stopped:
            return
        self.poller.reachability.ok()
        self._beatBackoff.reset()
        if confinement:
            self._confinementSent = confinement
        answer = answer or {}
        timeout = answer.get("leaseTimeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.leaseTimeout = float(timeout)
            self._beatBackoff.cap = self.keepalive()
        if answer.get("cancel") and not self.cancelled and not self.fitEnded.called:
            self.cancelFit("the server asked to cancel it")
        self._scheduleBeat()

    def _beatFailed(self, failure, progress):
        self._beating = None
        if self._stopped:
            return
        if not failure.check(ServerError):
            self._log.failure("job {jobId}: heartbeat", failure, jobId=self.jobId)
            self._retryBeat(progress)
            return
        error = failure.value
        if error.stale:
            self.drop(str(error))
            return
        self.poller.reachability.failed(error)
        self._retryBeat(progress)

    def _retryBeat(self, progress):
        if self._pendingProgress is None:
            self._pendingProgress = progress
        if self._stopped:
            return
        self._beatCall = self.reactor.callLater(self._beatBackoff.next(), self._beat)

    def _stopBeats(self):
        self._stopped = True
        if self._beatCall is not None and self._beatCall.active():
            self._beatCall.cancel()
        self._beatCall = None
        if self._beating is not None:
            beating, self._beating = self._beating, None
            beating.cancel()


class _Dropped(Exception):
    """The job was dropped, cancelled or released before its fit started."""


class _Halted(Exception):
    """The worker stops while the job's outcome is still being delivered."""


class Poller(service.Service):
    """Keeps up to ``slots`` leased fits running, and delivers what they leave.

    ``backend`` is where fits run (`backend.IBackend`, e.g. `local.ForkServer`);
    a sibling in the service tree, started before and stopped after this;
    ``client`` a `ServerClient`. ``drain`` says what stopping does with the
    fits in hand: ``finish`` them (and deliver), or ``release`` them to the
    queue. ``onFatal(why)`` is called when the backend cannot start.
    """

    _log = Logger()

    def __init__(self, reactor, client, backend, queueName, workDir, slots=1,
                 pollTimeout=30.0, drain="finish", workerName=None, random=_random.random,
                 backoffInitial=0.5, backoffCap=30.0, progressInterval=1.0,
                 partSize=PART_SIZE, cancelGrace=5.0, deliverGrace=30.0, slotUidBase=None,
                 checkpointEvery=60.0, onFatal=None, inThread=None,
                 resultFilesQuota=jobfiles.RESULT_FILES_QUOTA,
                 resultBytesQuota=jobfiles.RESULT_BYTES_QUOTA):
        if drain not in ("finish", "release"):
            raise ValueError("drain is 'finish' or 'release', not %r" % (drain,))
        self.reactor = reactor
        self.client = client
        self.backend = backend
        self.queueName = queueName
        self.workDir = workDir
        self.jobsDir = os.path.join(workDir, "jobs")
        self.slots = slots
        self.pollTimeout = pollTimeout
        self.drain = drain
        self.workerName = workerName
        self.random = random
        self.backoffInitial = backoffInitial
        self.backoffCap = backoffCap
        self.progressInterval = max(progressInterval, MIN_PROGRESS_INTERVAL)
        self.partSize = partSize
        self.cancelGrace = cancelGrace
        self.deliverGrace = deliverGrace
        self.slotUidBase = slotUidBase
        self.checkpointEvery = checkpointEvery
        self.onFatal = onFatal
        self.inThread = inThread or (
            lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args))
        self.resultFilesQuota = resultFilesQuota
        self.resultBytesQuota = resultBytesQuota
        self.reachability = Reachability(client.baseURL)
        self.leaseBackoff = self.makeBackoff()
        self.jobs = {}          # jobId -> LeasedJob, from lease to acknowledged result
        self.leasing = set()    # outstanding lease long-polls
        self._retryCall = None
        self._ready = False
        self._draining = False
        self._sleeps = set()

    def makeBackoff(self, cap=None):
        return Backoff(self.backoffInitial, cap if cap is not None else self.backoffCap,
                       random=self.random)

    def sleep(self, seconds):
        """A Deferred firing after ``seconds`` on the injected clock; cancelled on stop."""
        d = task.deferLater(self.reactor, seconds, lambda: None)
        self._sleeps.add(d)
        d.addBoth(self._slept, d)
        return d

    def _slept(self, result, d):
        self._sleeps.discard(d)
        return result

    def runningFits(self):
        return [job for job in self.jobs.values() if not job.fitEnded.called]

    def freeSlot(self):
        """The lowest slot number no running fit holds (None when all are taken)."""
        held = {job.slot for job in self.runningFits()}
        free = [slot for slot in range(self.slots) if slot not in held]
        return free[0] if free else None

    def slotUid(self, slot):
        """The uid (and gid) a fit in ``slot`` runs as, or None: the worker's own."""
        if self.slotUidBase is None or slot is None:
            return None
        return self.slotUidBase + slot

    # ---- life

    def startService(self):
        service.Service.startService(self)
        if self.workerName is None:
            self.workerName = "%s:%d" % (socket.gethostname(), os.getpid())
        created = not os.path.isdir(self.workDir)
        os.makedirs(self.jobsDir, exist_ok=True)
        if self.slotUidBase is not None:
            # Slot uids reach their own job directory by its path (in --sandbox none on
            # the host's tree), whatever umask the worker runs with; they list nothing.
            for path in ([self.workDir] if created else []) + [self.jobsDir]:
                os.chmod(path, 0o711)
        self._resumeDeliveries()
        d = self.backend.whenReady()
        d.addCallbacks(self._backendReady, self._backendFailed)

    def _backendReady(self, _):
        if not self.running or self._draining:
            return
        self._ready = True
        uids = ("as the worker's uid" if self.slotUidBase is None else
                "as uid %d-%d" % (self.slotUidBase, self.slotUidBase + self.slots - 1))
        self._log.info("worker {worker} taking work from {queue} at {url} with {slots} slot(s), "
                       "fits running {uids}", worker=self.workerName, queue=self.queueName,
                       url=self.client.baseURL, slots=self.slots, uids=uids)
        self.fill()

    def _backendFailed(self, failure):
        self._log.failure("the fit runner could not start; this worker takes no work", failure)
        if self.onFatal is not None:
            self.onFatal(failure.getErrorMessage())

    def _resumeDeliveries(self):
        """Outcomes a previous run left undelivered go out; fits it lost go back."""
        for entry in sorted(os.listdir(self.jobsDir)):
            path = os.path.join(self.jobsDir, entry)
            if entry.endswith(".json.tmp"):
                os.unlink(path)
                continue
            if not entry.endswith(".json"):
                if not os.path.exists(path + ".json"):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                with open(path) as f:
                    state = json.load(f)
                job = LeasedJob(self, int(state["id"]), int(state["lease"]),
                                float(state["leaseTimeout"]), outcome=state.get("outcome"),
                                uploaded=state.get("uploaded") or (), uid=state.get("uid"),
                                results=state.get("results"))
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._log.warn("unreadable job state {path} ({why}); removed", path=path, why=e)
                os.unlink(path)
                continue
            self.jobs[job.jobId] = job
            job.finished.addCallback(self._jobFinished, job)
            if job.outcome is not None:
                self._log.info("job {jobId}: delivering the outcome a previous run left",
                               jobId=job.jobId)
                job.resume()
            else:
                self._log.info("job {jobId}: its fit was lost with a previous run; releasing it",
                               jobId=job.jobId)
                job.handBack()

    @defer.inlineCallbacks
    def stopService(self):
        """Stop taking work; finish or release the fits in hand (``drain``); give
        undelivered outcomes ``deliverGrace`` seconds, then leave them on disk."""
        service.Service.stopService(self)
        self._draining = True
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None
        self._cancelLeasing()
        fits = self.runningFits()
        if fits:
            self._log.info("stopping with {n} fit(s) in hand: drain={drain}", n=len(fits),
                           drain=self.drain)
        if self.drain == "release":
            for job in fits:
                job.releaseOnStop()
        yield defer.DeferredList([job.fitEnded for job in fits])
        pending = [job for job in self.jobs.values() if not job.finished.called]
        if pending:
            timer = self.reactor.callLater(self.deliverGrace, self._haltDeliveries)
            yield defer.DeferredList([job.finished for job in pending])
            if timer.active():
                timer.cancel()
        for d in list(self._sleeps):
            d.cancel()

    def _haltDeliveries(self):
        for job in list(self.jobs.values()):
            job.halt()

    # ---- leasing

    def fill(self):
        """Hold one lease long-poll for each free slot (none while backing off)."""
        while (self.running and self._ready and not self._draining and self._retryCall is None
               and len(self.leasing) + len(self.runningFits()) < self.slots):
            self._requestLease()

    def _requestLease(self):
        started = self.reactor.seconds()
        d = self.client.lease(self.queueName, self.pollTimeout, self.workerName)
        self.leasing.add(d)
        d.addBoth(self._leaseAnswered, d, started)
        d.addErrback(lambda f: self._log.failure("lease", f))

    def _cancelLeasing(self):
        leasing, self.leasing = self.leasing, set()
        for d in leasing:
            d.cancel()

    def _leaseAnswered(self, result, d, started):
        if d not in self.leasing:
            return None     # we cancelled it: stopping, or backing off
        self.leasing.discard(d)
        if isinstance(result, Failure):
            result.trap(ServerError)
            self.reachability.failed(result.value)
            self._backOff()
            return None
        self.reachability.ok()
        if result is None:
            if self.reactor.seconds() - started < self.pollTimeout / 2.0:
                self._backOff()
                return None
            self.leaseBackoff.reset()
        else:
            self.leaseBackoff.reset()
            self._leased(result)
        self.fill()
        return None

    def _backOff(self):
        if self._retryCall is not None or self._draining:
            return
        self._cancelLeasing()
        delay = self.leaseBackoff.next()
        self._retryCall = self.reactor.callLater(delay, self._retry)

    def _retry(self):
        self._retryCall = None
        self.fill()

    def _leased(self, record):
        try:
            jobId, lease = int(record["id"]), int(record["lease"])
            leaseTimeout = float(record.get("leaseTimeout") or 60.0)
            files = [(checkName(n), s) for n, s in record.get("files") or []]
            request = record.get("request")
            checkpoint = record.get("checkpoint")
            if checkpoint is not None:
                checkpoint = checkName(checkpoint)
        except (KeyError, TypeError, ValueError) as e:
            self._log.error("a lease answer that makes no sense ({why}): {record!r}",
                            why=e, record=record)
            return
        if jobId in self.jobs:
            self._log.warn("job {jobId} leased again while this worker still holds it",
                           jobId=jobId)
            return
        slot = self.freeSlot()
        if slot is None:
            self._log.error("job {jobId} leased with every slot busy; handing it back", jobId=jobId)
            job = LeasedJob(self, jobId, lease, leaseTimeout)
            self.jobs[jobId] = job
            job.finished.addCallback(self._jobFinished, job)
            job.handBack()
            return
        job = LeasedJob(self, jobId, lease, leaseTimeout, request, files, checkpoint=checkpoint,
                        slot=slot)
        self.jobs[jobId] = job
        if self._draining:
            job.releasing = True
        self._log.info("job {jobId} leased (lease {lease}, attempt {attempts})", jobId=jobId,
                       lease=lease, attempts=record.get("attempts"))
        job.fitEnded.addCallback(lambda _: self.fill())
        job.finished.addCallback(self._jobFinished, job)
        job.start()

    def _jobFinished(self, _, job):
        if self.jobs.get(job.jobId) is job:
            del self.jobs[job.jobId]
        self.fill()
