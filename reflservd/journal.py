"""The journal: an append-only, checksummed record of every change to the
queue, so that a restarted server finds exactly the state it acknowledged.

This module is the writer service; the frames are ``journalframes``, the
files (names, lock, snapshots, trim, fsync) ``journalfiles``, and what a
start finds ``journalrecovery``.

The promise: the Deferred that ``Journal.append`` returns fires only once the
record is on disk (fsync). Records that arrive while a write is in progress
wait and go together in the next write (group commit), on a dedicated writer
thread, so the reactor never waits for the disk and a burst of N appends costs
far fewer than N fsyncs. A record may name job files: the writer first syncs
the store's filesystem (``syncFirst``), and a record whose files are still
being written (by the store, ``after``) waits for them, while the batch
ahead of it is being synced and written.

Snapshots bound replay time and disk use. Every ``snapshotEvery`` records the
writer starts a new segment and the state at that boundary is written (under a
temporary name, fsynced, renamed) as a snapshot with its own checksum; then
snapshots and segments older than the previous snapshot are deleted. One
previous generation stays, so a damaged newest snapshot falls back to the one
before it and the records after that.
"""

import functools
import os
import threading
from collections import deque

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from reflservd.journalfiles import (
    JournalWriteError, SegmentWriter, encodeAndWriteSnapshot, fsyncDirectory, journalDirectory,
    lockDirectory, markStateFormat, segmentName, snapshotName, unlockDirectory)
from reflservd.journalframes import MAX_BATCH_BYTES, encodeJSON, encodeRecord
from reflservd.journalrecovery import readJournal


class _Pending:
    __slots__ = ("frame", "deferred", "syncFirst", "after")

    def __init__(self, frame, deferred, syncFirst, after):
        self.frame, self.deferred = frame, deferred
        self.syncFirst, self.after = syncFirst or after is not None, after


class _SnapshotMarker:
    """A snapshot's place in the record stream: the state it carries is the
    state after every record queued before it."""

    __slots__ = ("data", "deferred")

    def __init__(self, data, deferred):
        self.data, self.deferred = data, deferred


class Journal:
    """The journal of one state directory.

    ``append`` may be called from the reactor thread only; the disk work
    happens on a writer thread (snapshots on a second one, so a big
    snapshot does not hold back the acknowledgements of new records).

    @ivar onBatch: if set, called ``(batchSize, fsyncSeconds)`` in the reactor
        thread after each batch reaches the disk.
    @ivar recordsSinceSnapshot: records appended (or replayed) since the
        boundary of the newest snapshot.
    """

    _log = Logger()

    def __init__(self, stateDir, reactor, snapshotEvery=100_000, snapshotState=None, lock=True,
                 *, keepSnapshots=2, runInThread=None, fsync=os.fsync, pwrite=os.pwrite,
                 syncFirst=None, encodeState=encodeJSON):
        """
        @param stateDir: the server's state directory; files live in
            C{stateDir/journal/} (created if missing, unless read-only).
        @param snapshotState: a zero-argument callable returning a JSON-able
            dict of the live state. It is called in the reactor thread right
            after the append that reaches C{snapshotEvery} records since the
            last snapshot, so the caller must apply a record to its state
            before appending it. The dict must share no mutable object with
            the live state: it is encoded and written on the snapshot thread.
        @param lock: take an exclusive flock on C{stateDir/journal/lock} for
            the journal's lifetime (JournalLocked if another process holds
            it). With C{lock=False} the journal only reads: it never repairs,
            creates or appends, and tolerates a tail being written.
        @param keepSnapshots: how many snapshots (and the segments after the
            oldest of them) a trim keeps; 2 keeps a fallback generation.
        @param runInThread: C{f(callable, *args) -> Deferred} that runs the
            disk work; by default two 1-thread pools. Tools and tests may run
            it inline (C{defer.maybeDeferred}).
        @param fsync: C{fsync(fd)} of segment writes (tests observe it).
        @param pwrite: C{pwrite(fd, data, offset)} of segment writes (tests
            make it fail).
        @param encodeState: C{encodeState(state)} gives a snapshot's JSON
            bytes, on the snapshot thread (the queue writes its shared
            strings once).
        @param syncFirst: called on the writer thread before it writes a
            batch holding a record appended with C{syncFirst=True}: the
            server's C{Store.sync}, so the files a record names are on disk
            before the record is. An C{OSError} from it fails the batch as a
            failed write does.
        """
        self.stateDir = stateDir
        self.journalDir = journalDirectory(stateDir)
        self.reactor = reactor
        self.snapshotEvery = snapshotEvery
        self.snapshotState = snapshotState
        self.keepSnapshots = keepSnapshots
        self.writable = lock
        self.onBatch = None
        self.recordsSinceSnapshot = 0
        self._runInThread = runInThread
        self._fsync = fsync
        self._pwrite = pwrite
        self._syncFirst = syncFirst
        self._encodeState = encodeState
        self._lockFD = None
        self._writer = None
        self._pools = []
        self._shutdownTrigger = None
        self._pending = deque()
        self._flushing = False
        self._snapshotsInFlight = 0
        self._idleWaiters = []
        self._appendedCount = 0     # records appended, and of those written (in order)
        self._writtenCount = 0
        self._durableWaiters = []   # [(count, Deferred)], by count
        self._lastTime = None
        self._loaded = False
        self._closeState = None     # None, "closing", "closed"
        self._closeWaiters = []
        if lock:
            if not os.path.isdir(self.journalDir):
                os.makedirs(self.journalDir, exist_ok=True)
                fsyncDirectory(stateDir)
            self._lockFD = lockDirectory(stateDir)

    # ---- the lock

    # ---- start-up

    def load(self):
        """Read the newest whole snapshot and check the records after it,
        setting aside a torn tail (``journalrecovery``); blocking (start-up
        only). Call once, before the first append.

        @rtype: L{Recovery}
        @raise JournalCorrupt: acknowledged records cannot be read back.
        """
        if self._loaded:
            raise RuntimeError("Journal.load() is called once")
        if self._closeState is not None:
            raise RuntimeError("the journal is closed")
        attempts = 1 if self.writable else 5
        for attempt in range(attempts):
            try:
                recovery = readJournal(self.stateDir, self.writable, self._segmentRead)
                break
            except FileNotFoundError:
                # A running server trimmed the files we listed: look again.
                if attempt == attempts - 1:
                    self._unlock()
                    raise
            except BaseException:
                self._unlock()      # a refused load leaves the directory to its operator
                raise
        if self.writable:
            try:
                markStateFormat(self.stateDir)
                self._openWriter(*recovery.tail)
            except BaseException:
                recovery.close()
                self._unlock()
                raise
        self.recordsSinceSnapshot = recovery.recordCount
        if recovery.header is not None:
            self._lastTime = recovery.header.get("lastTime")
        self._loaded = True
        return recovery

    def _segmentRead(self, lastRecord):
        self._lastTime = lastRecord.get("time", self._lastTime)

    def _openWriter(self, number, length):
        for name in os.listdir(self.journalDir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.journalDir, name))
        path = os.path.join(self.journalDir, segmentName(number))
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        if created:
            fsyncDirectory(self.journalDir)
        self._writer = SegmentWriter(self.journalDir, number, fd, length, self._pwrite, self._fsync)
        if self._runInThread is None:
            writerPool = ThreadPool(minthreads=1, maxthreads=1, name="journal-writer")
            snapshotPool = ThreadPool(minthreads=1, maxthreads=1, name="journal-snapshot")
            self._pools = [writerPool, snapshotPool]
            for pool in self._pools:
                # A process that exits without close() must not hang on
                # them; an exit in mid-write is a torn tail, handled.
                pool.threadFactory = functools.partial(threading.Thread, daemon=True)
                pool.start()
            self._runWriter = lambda f, *a: deferToThreadPool(self.reactor, writerPool, f, *a)
            self._runSnapshot = lambda f, *a: deferToThreadPool(self.reactor, snapshotPool, f, *a)
            self._shutdownTrigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._closeAtShutdown)
        else:
            self._runWriter = self._runSnapshot = self._runInThread


    # ---- appending

    def encode(self, record):
        """The frame of ``record`` (a JSON-able dict with a ``"type"``; a
        missing ``"time"`` is set, in place, to the reactor's time), or
        ``RecordTooLarge``/``ValueError``: what ``append`` would write, for a
        caller that must know a record can be journaled before it changes
        anything."""
        if not isinstance(record.get("type"), str):
            raise ValueError("a journal record needs a string 'type': %r" % (record,))
        if "time" not in record:
            record["time"] = self.reactor.seconds()
        return encodeRecord(record)

    def append(self, record, syncFirst=False, after=None, frame=None):
        """Journal ``record`` (its ``frame``, when ``encode`` made it already;
        see ``encode`` for what a record is). With ``syncFirst`` the batch
        holding it is written only after the ``syncFirst`` callable given to
        the journal has run. ``after``, if given, is a Deferred that fires
        once the files the record names are written (it implies
        ``syncFirst``): the record's batch waits for it, and a failure of it
        fails the batch as a failed write does.

        @return: a Deferred that fires None once the record is on disk, or
            fails with JournalWriteError when the disk refused it (or a
            record before it) and nothing of it is on disk.
        """
        self._checkWritable()
        if frame is None:
            frame = self.encode(record)
        d = defer.Deferred()
        if after is not None:
            after.addErrback(_filesFailed)
        self._pending.append(_Pending(frame, d, syncFirst, after))
        self._appendedCount += 1
        self._lastTime = record["time"]
        self.recordsSinceSnapshot += 1
        if (self.snapshotState is not None and self.recordsSinceSnapshot >= self.snapshotEvery
                and self._snapshotsInFlight == 0):
            try:
                self._queueSnapshot(None)
            except Exception:
                self.recordsSinceSnapshot = 0
                self._log.failure("journal: the state could not be taken for a snapshot")
        self._flush()
        return d

    def durable(self):
        """A Deferred that fires once every record appended so far is on
        disk, or fails (``JournalWriteError``) when one of them is refused:
        what an answer must wait for when it shows a state that others'
        records made and that may not be durable yet."""
        if self._writtenCount >= self._appendedCount:
            return defer.succeed(None)
        d = defer.Deferred()
        self._durableWaiters.append((self._appendedCount, d))
        return d

    def _fireDurable(self, error=None):
        waiting, self._durableWaiters = self._durableWaiters, []
        for count, d in waiting:
            if error is not None:
                d.errback(JournalWriteError(str(error)))
            elif count <= self._writtenCount:
                d.callback(None)
            else:
                self._durableWaiters.append((count, d))

    def snapshot(self):
        """Snapshot the state now (``snapshotState()``); a Deferred that
        fires once the snapshot is on disk and the journal is trimmed."""
        self._checkWritable()
        if self.snapshotState is None:
            raise RuntimeError("the journal has no snapshotState to snapshot")
        d = defer.Deferred()
        try:
            self._queueSnapshot(d)
        except Exception:
            return defer.fail()
        self._flush()
        return d

    def _checkWritable(self):
        if not self.writable:
            raise RuntimeError("a read-only journal (lock=False) cannot be written")
        if not self._loaded:
            raise RuntimeError("Journal.load() comes before the first write")
        if self._closeState is not None:
            raise RuntimeError("the journal is closed")

    def _queueSnapshot(self, d):
        state = self.snapshotState()
        created = self.reactor.seconds()
        self._pending.append(_SnapshotMarker((state, created, self._lastTime), d))
        self._snapshotsInFlight += 1
        self.recordsSinceSnapshot = 0

    def _flush(self):
        """Start the next write unless one is in progress."""
        if self._flushing:
            return
        if not self._pending:
            self._checkIdle()
            return
        self._flushing = True
        if isinstance(self._pending[0], _SnapshotMarker):
            marker = self._pending.popleft()
            d = self._runWriter(self._writer.rotate)
            d.addCallbacks(self._rotated, self._rotateFailed,
                           callbackArgs=(marker,), errbackArgs=(marker,))
        else:
            batch, size = [], 0
            while self._pending and isinstance(self._pending[0], _Pending):
                frame = self._pending[0].frame
                if batch and size + len(frame) > MAX_BATCH_BYTES:
                    break
                batch.append(self._pending.popleft())
                size += len(frame)
            sync = self._syncFirst if any(item.syncFirst for item in batch) else None
            frames = [item.frame for item in batch]
            files = [item.after for item in batch if item.after is not None]
            if files:
                d = defer.gatherResults(files, consumeErrors=True)
                d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
                d.addCallback(lambda _: self._runWriter(self._writeBatch, frames, sync))
            else:
                d = self._runWriter(self._writeBatch, frames, sync)
            d.addCallbacks(self._written, self._writeFailed,
                           callbackArgs=(batch,), errbackArgs=(batch,))
        d.addErrback(lambda f: self._log.failure("journal bookkeeping failed", f))
        d.addBoth(self._flushed)

    def _writeBatch(self, frames, sync):
        """On the writer thread: ``sync`` (if any), then the frames."""
        if sync is not None:
            try:
                sync()
            except OSError as e:
                raise JournalWriteError("cannot make the job files durable: %s"
                                        % (e.strerror or e,)) from e
        return self._writer.writeBatch(frames)

    def _flushed(self, _):
        self._flushing = False
        self._flush()

    def _written(self, fsyncSeconds, batch):
        if self.onBatch is not None:
            try:
                self.onBatch(len(batch), fsyncSeconds)
            except Exception:
                self._log.failure("journal onBatch hook failed")
        for item in batch:
            item.deferred.callback(None)
        self._writtenCount += len(batch)
        self._fireDurable()

    def _writeError(self, failure):
        if failure.check(JournalWriteError):
            return failure.value
        self._log.failure("journal: unexpected error writing", failure)
        return JournalWriteError("unexpected error: %s" % (failure.getErrorMessage(),))

    def _writeFailed(self, failure, batch):
        """Fail the batch and everything queued behind it: those records
        were decided on a state that included the failed ones, and a
        snapshot queued behind them carries that state."""
        error = self._writeError(failure)
        behind = list(self._pending)
        self._pending.clear()
        self._appendedCount = self._writtenCount      # the refused records are gone
        self._fireDurable(error)
        self._log.error("journal: {error}; {count} records not acknowledged",
                        error=str(error), count=len(batch) + sum(
                            isinstance(item, _Pending) for item in behind))
        for item in batch + behind:
            if isinstance(item, _SnapshotMarker):
                self._snapshotFinished(item, JournalWriteError(
                    "snapshot abandoned: a record before it was not written (%s)" % (error,)))
            else:
                if item.after is not None:
                    item.after.addErrback(lambda f: None)    # nothing waits on it now
                item.deferred.errback(JournalWriteError(str(error)))

    def _rotated(self, number, marker):
        state, created, lastTime = marker.data
        d = self._runSnapshot(encodeAndWriteSnapshot, self.journalDir, number, state, created,
                              lastTime, self.keepSnapshots, self._encodeState)
        d.addCallbacks(self._snapshotWritten, self._snapshotFailed,
                       callbackArgs=(number, marker), errbackArgs=(marker,))

    def _rotateFailed(self, failure, marker):
        self._snapshotFinished(marker, self._writeError(failure))

    def _snapshotWritten(self, written, number, marker):
        removed, size = written
        self._log.info("journal: wrote {name} ({size} bytes); removed {removed}",
                       name=snapshotName(number), size=size, removed=", ".join(removed) or "nothing")
        self._snapshotFinished(marker, None)

    def _snapshotFailed(self, failure, marker):
        self._snapshotFinished(marker, self._writeError(failure))

    def _snapshotFinished(self, marker, error):
        self._snapshotsInFlight -= 1
        if error is not None:
            self._log.error("journal: snapshot failed: {error}", error=str(error))
        if marker.deferred is not None:
            if error is None:
                marker.deferred.callback(None)
            else:
                marker.deferred.errback(error)
        self._checkIdle()

    # ---- closing

    def _checkIdle(self):
        if self._flushing or self._pending or self._snapshotsInFlight:
            return
        waiters, self._idleWaiters = self._idleWaiters, []
        for d in waiters:
            d.callback(None)

    def close(self):
        """Write what is pending, stop the threads, release the lock; a
        Deferred that fires when done (again at once once closed)."""
        if self._closeState == "closed":
            return defer.succeed(None)
        d = defer.Deferred()
        self._closeWaiters.append(d)
        if self._closeState is None:
            self._closeState = "closing"
            idle = defer.Deferred()
            self._idleWaiters.append(idle)
            idle.addCallback(self._release)
            idle.addErrback(lambda f: self._log.failure("journal: closing failed", f))
            idle.addCallback(self._closedNow)
            self._checkIdle()
        return d

    def abandon(self):
        """Give the directory up at once after a load the caller refused
        (its records did not replay): threads stopped, lock released,
        nothing written."""
        self._closeState = "closed"
        self._release(None)

    def _release(self, _):
        if self._shutdownTrigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        pools, self._pools = self._pools, []
        for pool in pools:
            pool.stop()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._unlock()

    def _unlock(self):
        if self._lockFD is not None:
            unlockDirectory(self._lockFD)
            self._lockFD = None

    def _closedNow(self, _):
        self._closeState = "closed"
        waiters, self._closeWaiters = self._closeWaiters, []
        for d in waiters:
            d.callback(None)

    def _closeAtShutdown(self):
        self._shutdownTrigger = None
        return self.close()


def _filesFailed(failure):
    """What a record whose files could not be written fails with: its
    batch is refused, never left waiting."""
    if failure.check(JournalWriteError):
        return failure
    error = failure.value
    if not isinstance(error, OSError):
        Journal._log.error("journal: writing a job's files failed: {error!r}", error=error)
    raise JournalWriteError("cannot write the job files: %s"
                            % (getattr(error, "strerror", None) or error,))
