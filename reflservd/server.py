"""The queue server: the queue, its journal and the job files, wired to the
reactor.

Every change goes the same way: the queue makes the record that carries the
decision, the record is applied to the queue and appended to the journal, and
the caller's Deferred fires once the journal has it on disk. The HTTP layer
answers only then, so a 2xx always means durable. When the disk refuses a
write, the state is reloaded from what is on disk and the callers get
``errors.Unavailable``: nothing is acknowledged that was not persisted.
"""

import collections
import contextlib
import gc
import math
import time

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from reflservd import limits
from reflservd import queue as Q
from reflservd.access import newJobKey
from reflservd.errors import Conflict, DomainError, RateLimited, Refused, TooLarge, Unavailable
from reflservd.journal import Journal
from reflservd.journalfiles import JournalWriteError, salvageJournal
from reflservd.journalframes import RecordTooLarge
from reflservd.journalrecovery import JournalCorrupt
from reflservd.longpoll import WaitList
from reflservd.provenance import completedResult
from reflservd.queuesnapshot import ReplayError, encodeSnapshot, loadQueue, snapshotOf
from reflservd.resultcache import ResultCache
from reflservd.store import BatchedWrites, Store, checkName

INLINE_WRITE = 256 * 1024
"""A submit whose uploaded files total at most this many bytes (in memory)
is written to the store with others (``store.BatchedWrites``) while its
record waits in the journal; a bigger one before its record is journaled."""


@contextlib.contextmanager
def collectorPaused():
    """The cyclic garbage collector off while a state loads: loading creates
    millions of objects and no garbage, and the collector's passes over them
    took more than half of a restart's time. What was loaded is then frozen
    out of later collections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


class QueueServer(service.Service):
    """The state of one site's queue, and the only code that changes it."""

    _log = Logger()

    def __init__(self, stateDir, reactor, leaseTimeout=60.0, maxAttempts=3,
                 snapshotEvery=100_000, metrics=None, notifier=None, runInThread=None,
                 quotas=None, legacyLeaseTimeout=Q.LEGACY_LEASE_TIMEOUT, salvage=False):
        """``runInThread(f, *args) -> Deferred`` runs the disk work; by default
        thread pools. Tests of the logic pass one that runs it inline, with a
        ``Clock`` as the reactor."""
        self.stateDir = stateDir
        self.reactor = reactor
        self.leaseTimeout = leaseTimeout
        self.legacyLeaseTimeout = legacyLeaseTimeout
        self.maxAttempts = maxAttempts
        self.quotas = quotas or limits.Quotas()
        self.salvage = salvage
        self.snapshotEvery = snapshotEvery
        self.metrics = metrics
        self.notifier = notifier
        self.store = Store(stateDir + "/jobs")
        self.resultCache = ResultCache()
        self.queue = None
        self.journal = None
        self._leaseWaiters = WaitList(reactor)  # keyed by (queueName, worker)
        self._eventWaiters = {}     # jobId -> WaitList
        self._unstored = {}         # jobId -> request, until its submit is on disk
        self._submitTimes = {}      # owner -> deque of submit times in the last minute
        self._resultSizes = {}      # jobId -> {name: size} of its stored results, while leased
        self._expiry = None
        self._generation = 0
        self._runInThread = runInThread
        self._pool = ThreadPool(minthreads=1, maxthreads=4, name="reflservd-store")
        self._smallWrites = BatchedWrites(self.inThread)

    # ---- life

    def startService(self):
        service.Service.startService(self)
        self.load()

    def load(self):
        """Load the snapshot and replay the journal (blocking: start-up only).
        Damage inside a segment, or a record that does not apply, stops the
        start naming the place; with ``salvage`` the journal is cut there
        (the rest set aside, ``salvageJournal``) and the start goes on."""
        try:
            self._load()
        except (JournalCorrupt, ReplayError) as e:
            if self.journal is not None:
                self.journal.abandon()
            if not self.salvage or e.segment is None:
                raise JournalCorrupt(
                    "%s; run reflservd-journal %s verify. twistd reflservd --salvage starts from "
                    "the records before it and keeps the rest aside" % (e, self.stateDir)) from None
            aside = salvageJournal(self.stateDir, e.segment, e.offset)
            self._log.warn("salvage: {why}; the journal from there on is set aside in {aside}",
                           why=str(e), aside=", ".join(aside))
            self._load()

    def _load(self):
        started = time.monotonic()
        self.journal = Journal(self.stateDir, self.reactor, snapshotEvery=self.snapshotEvery,
                               snapshotState=lambda: snapshotOf(self.queue),
                               encodeState=encodeSnapshot,
                               runInThread=self._runInThread, syncFirst=self.store.sync)
        if self.metrics is not None:
            self.journal.onBatch = self.metrics.journalBatch
        with collectorPaused():
            recovery = self.journal.load()
            for torn in recovery.torn:
                self._log.warn("journal: a torn tail was set aside: {torn}", torn=torn)
            self._setQueue(loadQueue(recovery, self.leaseTimeout, self.maxAttempts,
                                     self.legacyLeaseTimeout))
        removed = self.store.removeOthers(set(self.queue.jobs))
        self._log.info(
            "loaded {jobs} jobs ({pending} pending) in {seconds:.2f} s; "
            "the files of {removed} unrecorded jobs removed",
            jobs=len(self.queue.jobs), pending=self.queue.pendingCount(),
            seconds=time.monotonic() - started, removed=removed)
        if self._runInThread is None:
            self._pool.start()
        self._expiry = task.LoopingCall(self.expireLeases)
        self._expiry.clock = self.reactor
        self._expiry.start(min(1.0, self.leaseTimeout / 4), now=False)

    def _setQueue(self, queue):
        self.queue = queue
        queue.restartLeases(self.reactor.seconds())
        queue.onEvent = self._jobEvent
        self.resultCache.rebuild(queue)
        if self.metrics is not None:
            self.metrics.watch(queue)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._leaseWaiters.wakeAll()
        for waiters in list(self._eventWaiters.values()):
            waiters.wakeAll()
        if self.journal is not None:
            yield self.journal.close()
            self._log.info("journal flushed and closed")
        if self._runInThread is None:
            self._pool.stop()

    # ---- the one way state changes

    def commit(self, record, namesFiles=False, after=None):
        """Apply ``record`` and return a Deferred that fires once it is on
        disk. It is encoded first: a record the journal cannot hold is
        refused (``TooLarge``) before it changes anything. ``namesFiles``
        when it names files written to the store (they are made durable
        before it); ``after``, a Deferred that fires once they are written,
        when they are still being written (``Journal.append``)."""
        generation = self._generation
        try:
            frame = self.journal.encode(record)
        except RecordTooLarge as e:
            raise TooLarge(str(e)) from None
        self.queue.apply(record)
        d = self.journal.append(record, syncFirst=namesFiles, after=after, frame=frame)
        d.addErrback(self._journalFailed, generation)
        return d

    def _journalFailed(self, failure, generation):
        failure.trap(JournalWriteError)
        if generation == self._generation:
            self._generation += 1
            self._log.error("journal write failed ({why}); reloading the state from disk",
                            why=failure.getErrorMessage())
            with collectorPaused():
                recovery = Journal(self.stateDir, self.reactor, lock=False).load()
                self._setQueue(loadQueue(recovery, self.leaseTimeout, self.maxAttempts,
                                         self.legacyLeaseTimeout))
        raise Unavailable("the journal cannot be written (%s); nothing was changed"
                            % (failure.getErrorMessage(),))

    def readRequest(self, jobId):
        """A job's request: from memory while its submit is on its way to
        the disk (its file is written with it), else from the store."""
        request = self._unstored.get(jobId)
        return request if request is not None else self.store.readRequest(jobId)

    def inThread(self, f, *args):
        if self._runInThread is not None:
            return self._runInThread(f, *args)
        return threads.deferToThreadPool(self.reactor, self._pool, f, *args)

    def _now(self):
        return self.reactor.seconds()

    # ---- users

    @defer.inlineCallbacks
    def submit(self, request, files, origin, owner=None):
        """Store a job's request and files, then journal it; ``(job, key)``,
        the key that controls it (answered once). ``files`` is ``[(name,
        bytes or file)]``; ``owner`` is who submits (by default ``origin``,
        the client's address). Every limit is checked before anything is
        written."""
        name, notify, serviceName, version = limits.checkRequest(request)
        names = [checkName(n) for n, _ in files]
        if len(set(names)) != len(names):
            raise Refused("two files have the same name")
        quotas = self.quotas
        limits.checkFiles([(n, limits.sourceSize(source)) for n, source in files], quotas.maxFiles,
                          quotas.maxFileBytes, quotas.maxJobBytes)
        owner = owner or origin
        self.checkSubmitter(owner)
        inputKey, answeredBy = yield self.resultCache.lookUp(self, request, files)
        key, keyHash = newJobKey()
        jobId = self.queue.reserveId()
        written = None
        if answeredBy is None and sum(_inlineSize(source) for _, source in files) <= INLINE_WRITE:
            # A small job's files are written with others' in one hand-off
            # (once its record is accepted), while the journal's batch ahead
            # is synced; its record waits for them. Until the record is on
            # disk, its request is served from memory.
            uploads = {fileName: len(source) for fileName, source in files}
            written = defer.Deferred()
        else:
            try:
                uploads = yield self.inThread(self.store.writeJob, jobId, request, files)
            except OSError as e:
                self.inThread(self.store.remove, jobId)
                raise Unavailable("the job's files could not be stored: %s" % (e.strerror,))
            if answeredBy is not None:
                answeredBy = yield self.resultCache.share(self, answeredBy, jobId)
        record = self.queue.makeSubmit(jobId, self._now(), name, notify, origin,
                                       serviceName, version, uploads, owner=owner,
                                       keyHash=keyHash, inputKey=inputKey,
                                       cachedFrom=answeredBy.id if answeredBy is not None else None)
        try:
            d = self.commit(record, namesFiles=True, after=written)
        except DomainError:
            if written is None:
                self.inThread(self.store.remove, jobId)
            raise
        self.countSubmit(owner)
        if written is not None:
            self._smallWrites.write(self.store.writeJob, jobId, request, files).chainDeferred(written)
            self._unstored[jobId] = request
            d.addBoth(_passThrough, self._unstored.pop, jobId, None)
        self.dispatch()
        yield d
        if self.metrics is not None:
            self.metrics.submits.inc()
        return self.queue.get(jobId), key

    def countSubmit(self, owner):
        """One more submit of ``owner`` in the last minute (``checkSubmitter``)."""
        self._submitTimes.setdefault(owner, collections.deque()).append(self._now())

    def checkSubmitter(self, owner, jobs=1):
        """``RateLimited`` when ``owner`` would have too many jobs pending with
        ``jobs`` more, or has submitted too many times in the last minute."""
        quotas = self.quotas
        pending = self.queue.pendingOf(owner)
        if quotas.maxPending and pending + jobs > quotas.maxPending:
            if jobs > quotas.maxPending:
                raise TooLarge("a series of %d members is more than the %d pending jobs this server "
                               "takes from one submitter (--max-pending)" % (jobs, quotas.maxPending))
            raise RateLimited("you have %d jobs pending%s, the most this server takes from one "
                              "submitter is %d; submit more when some have started"
                              % (pending, " and this series has %d" % (jobs,) if jobs > 1 else "",
                                 quotas.maxPending), 60)
        times = self._submitTimes.get(owner)
        if not times:
            return
        now = self._now()
        while times and times[0] <= now - 60.0:
            times.popleft()
        if not times:
            del self._submitTimes[owner]
        elif quotas.submitsPerMinute and len(times) >= quotas.submitsPerMinute:
            raise RateLimited("this server takes %d submissions a minute from one submitter"
                                % (quotas.submitsPerMinute,),
                                max(1, math.ceil(times[0] + 60.0 - now)))

    def cancel(self, jobId):
        """Cancel a job; a job that has ended already is answered as it is,
        once the records that ended it are on disk (another request's, which
        may still be on its way there)."""
        try:
            record = self.queue.makeCancel(jobId, self._now())
        except Conflict:
            d = self.journal.durable()
            d.addErrback(lambda f: f.trap(JournalWriteError) and _unavailable(f))
            return d.addCallback(lambda _: self.queue.get(jobId))
        return self.commit(record).addCallback(lambda _: self.queue.get(jobId))

    @defer.inlineCallbacks
    def delete(self, jobId):
        record = self.queue.makeDelete(jobId, self._now())
        yield self.commit(record)
        yield self.inThread(self.store.remove, jobId)

    def events(self, jobId, after, timeout):
        """The job's events after ``after``; waits up to ``timeout`` seconds for one."""
        events = self.queue.eventsAfter(jobId, after)
        if events or timeout <= 0:
            return defer.succeed(events)
        waiters = self._eventWaiters.get(jobId)
        if waiters is None:
            waiters = self._eventWaiters[jobId] = WaitList(self.reactor)
        d = waiters.wait(timeout)
        d.addCallback(lambda _: self.queue.eventsAfter(jobId, after) if jobId in self.queue.jobs else [])
        return d

    def _jobEvent(self, job, event):
        waiters = self._eventWaiters.pop(job.id, None)
        if waiters is not None:
            waiters.wakeAll()
        if self.notifier is not None and event[2] == "status":
            if job.series is None:
                self.notifier.jobChanged(job)
            else:
                series = self.queue.series.series.get(job.series)   # None while its record applies
                if series is not None:
                    self.notifier.seriesChanged(series, [self.queue.jobs.get(i) for i in series.members])
        self.resultCache.jobChanged(job)

    # ---- workers

    def lease(self, queueName, worker=None, timeout=0.0, legacy=False, versions=None):
        """A Deferred firing with the job leased to this worker, or None when
        nothing was pending within ``timeout`` seconds. A legacy worker's
        lease is a sign of life: its other legacy leases are renewed. The
        ``versions`` it reports count for the result cache."""
        limits.checkQueueName(queueName)
        if worker is not None:
            limits.checkText(worker, "the worker's name", limits.MAX_WORKER)
        timeout = limits.finiteNumber(timeout, "timeout")
        self.resultCache.heard(worker, versions, self._now())
        if legacy:
            self.queue.renewLegacy(worker, self._now())
        if not self._leaseWaiters:
            record = self.queue.makeLease(self._now(), queueName, worker, legacy)
            if record is not None:
                return self._grant(record)
        if timeout <= 0:
            return defer.succeed(None)
        return self._leaseWaiters.wait(timeout, key=(queueName, worker))

    def waitingLeases(self):
        """How many workers wait in a lease long-poll."""
        return len(self._leaseWaiters)

    def dispatch(self):
        """Hand pending jobs to waiting workers, oldest waiter first."""
        while self._leaseWaiters:
            queueName, worker = self._leaseWaiters.oldestKey()
            record = self.queue.makeLease(self._now(), queueName, worker)
            if record is None:
                return
            self._grant(record).chainDeferred(self._leaseWaiters.pop())

    def _grant(self, record):
        if self.metrics is not None:
            self.metrics.leases.inc()
        d = self.commit(record)
        d.addCallback(lambda _: self.queue.get(record["id"]))
        return d

    def heartbeat(self, jobId, lease, progress=None, confinement=None):
        if progress is not None:
            progress = limits.checkProgress(progress)
        if confinement is not None:
            confinement = limits.checkText(confinement, "'confinement'")
        return self.queue.heartbeat(jobId, lease, self._now(), progress, confinement)

    @defer.inlineCallbacks
    def putFile(self, jobId, lease, name, offset, source, last):
        """Store one part of a result file; journal it when it is whole.
        A job's results are held to the result quotas (``limits.Quotas``): a part
        that would pass them is refused before it is written."""
        checkName(name)
        self.queue.checkLease(jobId, lease)
        sizes = self._resultSizes.get(jobId)
        if sizes is None:
            listed = yield self.inThread(self.store.files, jobId, "result")
            sizes = self._resultSizes.setdefault(jobId, dict(listed))
        self._checkResultQuota(sizes, name, offset + limits.sourceSize(source))
        try:
            size = yield self.inThread(self.store.writeResultPart, jobId, name, offset, source, last)
        except OSError as e:
            raise Unavailable("the file could not be stored: %s" % (e.strerror,))
        except ValueError as e:
            raise Refused(str(e))
        if last:
            yield self.commit(self.queue.makeFile(jobId, lease, self._now(), name, size),
                              namesFiles=True)
            sizes[name] = size
        return size

    def _checkResultQuota(self, sizes, name, size):
        quotas = self.quotas
        if name not in sizes and len(sizes) >= quotas.maxResultFiles:
            raise TooLarge("a job keeps at most %d result files" % (quotas.maxResultFiles,))
        total = sum(sizes.values()) - sizes.get(name, 0) + size
        if total > quotas.maxResultBytes:
            raise TooLarge("a job keeps at most %d bytes of results; with %r it would be %d"
                             % (quotas.maxResultBytes, name, total))

    @defer.inlineCallbacks
    def complete(self, jobId, lease, status, result=None, error=None, trace=None,
                 confinement=None, posted=None, workerFacts=None):
        """End a leased job with what its worker sent (``posted``: a legacy
        worker's results as it posted them, answered back to legacy clients);
        a COMPLETE result gets its provenance (``provenance.completedResult``)."""
        for value, what in ((result, "'result'"), (posted, "the results")):
            if value is not None:
                limits.checkJSON(value, what)
        for value, what in ((error, "'error'"), (trace, "'trace'"), (confinement, "'confinement'")):
            if value is not None:
                limits.checkText(value, what, 1 << 20)
        job = self.queue.checkLease(jobId, lease)
        now = self._now()
        if status == Q.COMPLETE and isinstance(result, dict):
            result, now = yield completedResult(self, job, result, workerFacts, confinement)
        record = self.queue.makeComplete(jobId, lease, now, status, result,
                                         error, trace, confinement, posted)
        if job.legacy:
            self.queue.renewLegacy(job.worker, self._now())
        yield self.commit(record)
        self._resultSizes.pop(jobId, None)
        return self.queue.get(jobId)

    @defer.inlineCallbacks
    def release(self, jobId, lease, lost=None):
        """Hand the job back (see `queue.Queue.makeRelease`)."""
        yield self.commit(self.queue.makeRelease(jobId, lease, self._now(), lost))
        self.dispatch()
        return self.queue.get(jobId)

    def expireLeases(self):
        records = self.queue.makeExpiries(self._now())
        for record in records:
            self._log.info("job {jobId}: lease {lease} ran out; now {status}",
                           jobId=record["id"], lease=record["lease"], status=record["status"])
            if self.metrics is not None:
                self.metrics.expiries.inc()
            self.commit(record).addErrback(lambda f: None)
        if records:
            self.dispatch()


def _unavailable(failure):
    raise Unavailable("the journal cannot be written (%s); nothing was changed"
                        % (failure.getErrorMessage(),))


def _passThrough(result, f, *args):
    f(*args)
    return result


def _inlineSize(source):
    """The size of an upload held in memory; infinite for a file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return float("inf")
