"""The queue server: the queue, its journal and the job files, wired to the
reactor.

Every change goes the same way: the queue makes the record that carries the
decision, the record is applied to the queue and appended to the journal, and
the caller's Deferred fires once the journal has it on disk. The HTTP layer
answers only then, so a 2xx always means durable. When the disk refuses a
write, the state is reloaded from what is on disk and the callers get
``APIError(503)``: nothing is acknowledged that was not persisted.
"""

import contextlib
import functools
import gc
import time

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from reflservd import queue as Q
from reflservd.journal import Journal, JournalWriteError
from reflservd.store import Store, checkName
from reflservd.web import APIError

MAX_LONG_POLL = 60.0
INLINE_WRITE = 256 * 1024
"""A submit whose uploaded files total at most this many bytes (in memory)
is written to the store by the journal's files thread; a bigger one in the
store's pool before its record is journaled."""


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


def loadQueue(recovery, leaseTimeout, maxAttempts):
    """The queue that a journal's snapshot and records describe (called
    with the collector paused, around the journal's load as well)."""
    queue = Q.Queue.fromSnapshot(recovery.snapshot, leaseTimeout=leaseTimeout,
                                 maxAttempts=maxAttempts)
    for record in recovery.records:
        queue.apply(record)
    return queue


class QueueServer(service.Service):
    """The state of one site's queue, and the only code that changes it."""

    _log = Logger()

    def __init__(self, stateDir, reactor, leaseTimeout=60.0, maxAttempts=3,
                 snapshotEvery=100_000, metrics=None, notifier=None, runInThread=None):
        """``runInThread(f, *args) -> Deferred`` runs the disk work; by default
        thread pools. Tests of the logic pass one that runs it inline, with a
        ``Clock`` as the reactor."""
        self.stateDir = stateDir
        self.reactor = reactor
        self.leaseTimeout = leaseTimeout
        self.maxAttempts = maxAttempts
        self.snapshotEvery = snapshotEvery
        self.metrics = metrics
        self.notifier = notifier
        self.store = Store(stateDir + "/jobs")
        self.queue = None
        self.journal = None
        self._leaseWaiters = []     # [(Deferred, queueName, worker)], FIFO
        self._eventWaiters = {}     # jobId -> [(after, Deferred)]
        self._unstored = {}         # jobId -> request, until its submit is on disk
        self._expiry = None
        self._generation = 0
        self._runInThread = runInThread
        self._pool = ThreadPool(minthreads=1, maxthreads=4, name="reflservd-store")

    # ---- life

    def startService(self):
        service.Service.startService(self)
        self.load()

    def load(self):
        """Load the snapshot and replay the journal (blocking: start-up only)."""
        started = time.monotonic()
        self.journal = Journal(self.stateDir, self.reactor, snapshotEvery=self.snapshotEvery,
                               snapshotState=lambda: self.queue.snapshot(),
                               encodeState=Q.encodeSnapshot,
                               runInThread=self._runInThread, syncFirst=self.store.sync)
        if self.metrics is not None:
            self.journal.onBatch = self.metrics.journalBatch
        with collectorPaused():
            recovery = self.journal.load()
            for torn in recovery.torn:
                self._log.warn("journal: a torn tail was set aside: {torn}", torn=torn)
            self._setQueue(loadQueue(recovery, self.leaseTimeout, self.maxAttempts))
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
        if self.metrics is not None:
            self.metrics.watch(queue)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        for d, _, _ in list(self._leaseWaiters):
            d.callback(None)
        for waiters in list(self._eventWaiters.values()):
            for _, d in list(waiters):
                d.callback(None)
        if self.journal is not None:
            yield self.journal.close()
            self._log.info("journal flushed and closed")
        if self._runInThread is None:
            self._pool.stop()

    # ---- the one way state changes

    def commit(self, record, namesFiles=False, before=None):
        """Apply ``record`` and return a Deferred that fires once it is on
        disk; ``namesFiles`` when it names files just written to the store
        (they are made durable before it); ``before`` writes them first
        (``Journal.append``)."""
        generation = self._generation
        self.queue.apply(record)
        d = self.journal.append(record, syncFirst=namesFiles, before=before)
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
                self._setQueue(loadQueue(recovery, self.leaseTimeout, self.maxAttempts))
        raise APIError(503, "the journal cannot be written (%s); nothing was changed"
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
    def submit(self, request, files, origin):
        """Store a job's request and files, then journal it. ``files`` is
        ``[(name, bytes or file)]`` with names already checked."""
        name, notify, serviceName, version = checkRequest(request)
        names = [checkName(n) for n, _ in files]
        if len(set(names)) != len(names):
            raise APIError(400, "two files have the same name")
        jobId = self.queue.reserveId()
        before = None
        if sum(_inlineSize(source) for _, source in files) <= INLINE_WRITE:
            # A small job's files are written by the journal's files thread,
            # many jobs at a time, while the batch ahead is synced: no disk
            # work on the reactor and no hand-off per job. Until its record
            # is on disk, its request is served from memory.
            uploads = {fileName: len(source) for fileName, source in files}
            before = functools.partial(self.store.writeJob, jobId, request, files)
        else:
            try:
                uploads = yield self.inThread(self.store.writeJob, jobId, request, files)
            except OSError as e:
                self.inThread(self.store.remove, jobId)
                raise APIError(503, "the job's files could not be stored: %s" % (e.strerror,))
        record = self.queue.makeSubmit(jobId, self._now(), name, notify, origin,
                                       serviceName, version, uploads)
        d = self.commit(record, namesFiles=True, before=before)
        if before is not None:
            self._unstored[jobId] = request
            d.addBoth(_passThrough, self._unstored.pop, jobId, None)
        self.dispatch()
        yield d
        if self.metrics is not None:
            self.metrics.submits.inc()
        return self.queue.get(jobId)

    def cancel(self, jobId):
        try:
            record = self.queue.makeCancel(jobId, self._now())
        except Q.Conflict:
            return defer.succeed(self.queue.get(jobId))
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
        waiters = self._eventWaiters.setdefault(jobId, [])

        def cancel(d):
            if (after, d) in waiters:
                waiters.remove((after, d))

        d = defer.Deferred(canceller=cancel)
        waiters.append((after, d))
        call = self.reactor.callLater(min(timeout, MAX_LONG_POLL), lambda: d.called or d.callback(None))
        d.addBoth(self._finishWait, call, waiters, (after, d))
        d.addCallback(lambda _: self.queue.eventsAfter(jobId, after) if jobId in self.queue.jobs else [])
        return d

    def _jobEvent(self, job, event):
        waiters = self._eventWaiters.pop(job.id, None)
        if waiters:
            for _, d in waiters:
                d.callback(None)
        if self.notifier is not None and event[2] == "status":
            self.notifier.jobChanged(job)

    @staticmethod
    def _finishWait(result, call, waiters, entry):
        if call.active():
            call.cancel()
        if entry in waiters:
            waiters.remove(entry)
        return result

    # ---- workers

    def lease(self, queueName, worker=None, timeout=0.0, legacy=False):
        """A Deferred firing with the job leased to this worker, or None when
        nothing was pending within ``timeout`` seconds."""
        checkQueueName(queueName)
        if not self._leaseWaiters:
            record = self.queue.makeLease(self._now(), queueName, worker, legacy)
            if record is not None:
                return self._grant(record)
        if timeout <= 0:
            return defer.succeed(None)
        entry = []

        def cancel(d):
            if entry[0] in self._leaseWaiters:
                self._leaseWaiters.remove(entry[0])

        d = defer.Deferred(canceller=cancel)
        entry.append((d, queueName, worker))
        self._leaseWaiters.append(entry[0])
        call = self.reactor.callLater(min(timeout, MAX_LONG_POLL),
                                      lambda: d.called or d.callback(None))
        d.addBoth(self._finishWait, call, self._leaseWaiters, entry[0])
        return d

    def dispatch(self):
        """Hand pending jobs to waiting workers, oldest waiter first."""
        while self._leaseWaiters:
            d, queueName, worker = self._leaseWaiters[0]
            record = self.queue.makeLease(self._now(), queueName, worker)
            if record is None:
                return
            self._leaseWaiters.pop(0)
            self._grant(record).chainDeferred(d)

    def _grant(self, record):
        if self.metrics is not None:
            self.metrics.leases.inc()
        d = self.commit(record)
        d.addCallback(lambda _: self.queue.get(record["id"]))
        return d

    def heartbeat(self, jobId, lease, progress=None, confinement=None):
        return self.queue.heartbeat(jobId, lease, self._now(), progress, confinement)

    @defer.inlineCallbacks
    def putFile(self, jobId, lease, name, offset, source, last):
        """Store one part of a result file; journal it when it is whole."""
        checkName(name)
        self.queue.checkLease(jobId, lease)
        try:
            size = yield self.inThread(self.store.writeResultPart, jobId, name, offset, source, last)
        except OSError as e:
            raise APIError(503, "the file could not be stored: %s" % (e.strerror,))
        except ValueError as e:
            raise APIError(400, str(e))
        if last:
            yield self.commit(self.queue.makeFile(jobId, lease, self._now(), name, size),
                              namesFiles=True)
        return size

    @defer.inlineCallbacks
    def complete(self, jobId, lease, status, result=None, error=None, trace=None,
                 confinement=None):
        record = self.queue.makeComplete(jobId, lease, self._now(), status, result,
                                         error, trace, confinement)
        yield self.commit(record)
        return self.queue.get(jobId)

    @defer.inlineCallbacks
    def release(self, jobId, lease):
        yield self.commit(self.queue.makeRelease(jobId, lease, self._now()))
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


def _passThrough(result, f, *args):
    f(*args)
    return result


def _inlineSize(source):
    """The size of an upload held in memory; infinite for a file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return float("inf")


def checkRequest(request):
    """The request's name, notify, service and version, or a 400 saying what is wrong."""
    if not isinstance(request, dict):
        raise APIError(400, "the request must be a JSON object")
    for field in ("name", "notify"):
        if field not in request:
            raise APIError(400, "the request needs a %r field" % (field,))
    name, notify = request["name"], request["notify"]
    serviceName = request.get("service", "refl1d")
    version = request.get("version", "")
    for field, value in (("name", name), ("notify", notify), ("service", serviceName),
                         ("version", version)):
        if not isinstance(value, str) or len(value) > 1000:
            raise APIError(400, "%r must be a string of at most 1000 characters" % (field,))
    if serviceName == "fitter":
        raise APIError(400, "the legacy 'fitter' service sends a pickled problem; this server "
                            "never unpickles (unpickling runs code on the server). Submit the "
                            "model script or its JSON serialization to the 'refl1d' service")
    return name, notify, serviceName, str(version)


def checkQueueName(name):
    if not isinstance(name, str) or not name or len(name) > 100 or not name.replace(
            "-", "").replace("_", "").replace(".", "").isalnum():
        raise APIError(400, "a queue name is 1-100 letters, digits, '-', '_' or '.'")
    return name
