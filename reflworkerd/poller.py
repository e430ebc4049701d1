"""The worker's pulling side: slots and lease long-polls.

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

Each leased job's life, from its lease to its acknowledged result, is
`lease.LeasedJob`; the HTTP side is `serverclient.ServerClient`.
"""

import json
import os
import random as _random
import shutil
import socket

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from reflworkerd.backend import reactorThreads
from reflworkerd import jobfiles
from reflworkerd.lease import LeasedJob
from reflworkerd.resultfiles import PART_SIZE
from reflworkerd.serverclient import Backoff, Reachability, ServerError, checkName

MIN_PROGRESS_INTERVAL = 0.1
"""The shortest ``progressInterval``: progress leaves the worker at most this often per job."""

class Poller(service.Service):
    """Keeps up to ``slots`` leased fits running, and delivers what they leave.

    ``backend`` is where fits run (`backend.IBackend`, e.g. `local.LocalBackend`);
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
        self.inThread = inThread or reactorThreads(reactor)
        self.resultFilesQuota = resultFilesQuota
        self.resultBytesQuota = resultBytesQuota
        self.reachability = Reachability(client.baseURL)
        self.leaseBackoff = self.makeBackoff()
        self.jobs = {}          # jobId -> LeasedJob, from lease to acknowledged result
        self.leasing = set()    # outstanding lease long-polls
        self._starting = set()  # job ids leased again, waiting for their old lease to end here
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

    def busySlots(self):
        """Slots taken: running fits, and leases waiting for the same job's old lease to end."""
        return len(self.runningFits()) + len(self._starting)

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
        self._takeUpPreviousRun()
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
        self._log.failure("the backend could not start; this worker takes no work", failure)
        if self.onFatal is not None:
            self.onFatal(failure.getErrorMessage())

    def _takeUpPreviousRun(self):
        """Outcomes a previous run left undelivered go out; fits still running in the
        backend are adopted; fits it lost go back."""
        survivors = self.backend.survivors()
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
                                float(state["leaseTimeout"]), request=state.get("request"),
                                outcome=state.get("outcome"),
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
                job.redeliver()
            elif job.jobId in survivors:
                self._log.info("job {jobId}: its fit is still in the backend; watching it again",
                               jobId=job.jobId)
                job.adopt()
            else:
                self._log.info("job {jobId}: its fit was lost with a previous run; releasing it",
                               jobId=job.jobId)
                job.handBack()
        self.backend.forgetSurvivors()

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
        for job in fits:
            if self.drain == "release":
                job.releaseOnStop()
            elif getattr(job.fitRun, "survives", False):
                job.halt()      # it goes on in the backend; the next start adopts it
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
               and len(self.leasing) + self.busySlots() < self.slots):
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
        held = self.jobs.get(jobId)
        if held is not None:
            if lease <= held.lease:
                self._log.warn("job {jobId} leased again while this worker still holds it",
                               jobId=jobId)
                return
            # Handed back a moment ago (its fit lost, say) and leased again at once:
            # the new lease starts once the old one's files are gone.
            self._log.info("job {jobId} leased again (lease {lease}); it starts once lease {old} "
                           "has ended here", jobId=jobId, lease=lease, old=held.lease)
            held.drop("the server leased the job again (lease %d)" % (lease,))
            self._starting.add(jobId)
            held.finished.addCallback(lambda _: self._startAfter(jobId, record))
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
            job.releaseOnStop()
        self._log.info("job {jobId} leased (lease {lease}, attempt {attempts})", jobId=jobId,
                       lease=lease, attempts=record.get("attempts"))
        job.fitEnded.addCallback(lambda _: self.fill())
        job.finished.addCallback(self._jobFinished, job)
        job.start()

    def _startAfter(self, jobId, record):
        self._starting.discard(jobId)
        self._leased(record)

    def _jobFinished(self, _, job):
        if self.jobs.get(job.jobId) is job:
            del self.jobs[job.jobId]
        self.fill()
