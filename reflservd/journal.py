"""The journal: an append-only, checksummed record of every change to the
queue, so that a restarted server finds exactly the state it acknowledged.

Layout, in ``STATE_DIR/journal/``::

    lock                    flock'ed by the one server that owns the directory
    segment-000042.log      records, each framed as length, crc32, payload
    snapshot-000042.json    the state after every record in segments < 42

A frame is a 4-byte big-endian payload length, the 4-byte big-endian crc32 of
the payload, then the payload: compact JSON (UTF-8) of a dict that always has
``"type"`` and ``"time"``.

The promise: the Deferred that ``Journal.append`` returns fires only once the
record is on disk (fsync). Records that arrive while a write is in progress
wait and go together in the next write (group commit), on a dedicated writer
thread, so the reactor never waits for the disk and a burst of N appends costs
far fewer than N fsyncs. A record may name job files: the writer first syncs
the store's filesystem (``syncFirst``), and the files of a small job are
written by a third thread (``before``), many jobs per turn, while the batch
ahead of them is being synced and written.

A crash in the middle of a write leaves a torn tail: ``load`` keeps every whole
record, moves the torn bytes aside (``segment-000042.torn-<offset>``) and
truncates, so new records follow the last whole one. A tail can only be torn by
the last, unacknowledged write, and one write is at most ``MAX_BATCH_BYTES``:
bad bytes anywhere else are corruption of acknowledged records, and ``load``
refuses (``JournalCorrupt``) rather than quietly drop them.

Snapshots bound replay time and disk use. Every ``snapshotEvery`` records the
writer starts a new segment and the state at that boundary is written (under a
temporary name, fsynced, renamed) as a snapshot with its own checksum; then
snapshots and segments older than the previous snapshot are deleted. One
previous generation stays, so a damaged newest snapshot falls back to the one
before it and the records after that.
"""

import errno
import fcntl
import functools
import json
import os
import re
import struct
import threading
import time
import zlib
from collections import deque

import orjson
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_BATCH_BYTES = 16 * 1024 * 1024
SNAPSHOT_FORMAT = "reflservd-snapshot"
SNAPSHOT_VERSION = 1

_SEGMENT = re.compile(r"^segment-(\d+)\.log$")
_SNAPSHOT = re.compile(r"^snapshot-(\d+)\.json$")


class JournalWriteError(Exception):
    """The disk refused a write; nothing in the batch is durable."""


class RecordTooLarge(ValueError):
    """A record whose frame would pass ``MAX_RECORD_BYTES``: refused before
    anything is changed (the server encodes a record before it applies it)."""

    def __init__(self, size):
        ValueError.__init__(self, "a change is limited to %d bytes as a journal record; "
                                  "this one is %d bytes" % (MAX_RECORD_BYTES, size))
        self.size = size


class JournalLocked(Exception):
    """Another process holds the state directory."""


class JournalCorrupt(Exception):
    """Acknowledged records cannot be read back: a damaged segment, a missing
    segment, or no readable snapshot where the early segments were trimmed.
    ``reflservd-journal STATE_DIR verify`` shows where. ``segment`` and
    ``offset`` say where the damage starts when it is inside a segment (what
    ``salvageJournal`` can cut at), else None."""

    def __init__(self, message, segment=None, offset=None):
        Exception.__init__(self, message)
        self.segment, self.offset = segment, offset


class SnapshotError(Exception):
    """A snapshot file is not whole (bad header, length or checksum)."""


# ---- names and files


def journalDirectory(stateDir):
    return os.path.join(stateDir, "journal")


def segmentName(number):
    return "segment-%06d.log" % (number,)


def snapshotName(number):
    return "snapshot-%06d.json" % (number,)


def listJournal(journalDir):
    """The segment numbers and snapshot numbers in ``journalDir``, ascending."""
    segments, snapshots = [], []
    try:
        names = os.listdir(journalDir)
    except FileNotFoundError:
        return segments, snapshots
    for name in names:
        match = _SEGMENT.match(name)
        if match:
            segments.append(int(match.group(1)))
            continue
        match = _SNAPSHOT.match(name)
        if match:
            snapshots.append(int(match.group(1)))
    return sorted(segments), sorted(snapshots)


def writeAllAndClose(fd, data):
    """Write all of ``data`` to ``fd``, fsync it, close it (even on error)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsyncDirectory(path):
    """Make a file creation, rename or removal in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def readAll(fd, size=None):
    """The first ``size`` bytes of an open file (all of it when None)."""
    if size is None:
        size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def lockHolder(stateDir):
    """The pid of a live process that holds ``stateDir``, else None.

    It reads the pid the holder wrote and asks whether that process lives; it
    never touches the lock itself, so a server starting at the same instant
    is never refused because a read-only tool looked.
    """
    try:
        with open(os.path.join(journalDirectory(stateDir), "lock")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


# ---- framing


_compactJSON = json.JSONEncoder(separators=(",", ":")).encode


def encodeRecord(record):
    """The frame of one record: length, crc32, compact JSON."""
    payload = _compactJSON(record).encode("utf-8")
    if len(payload) > MAX_RECORD_BYTES:
        raise RecordTooLarge(len(payload))
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class SegmentScan:
    """What a scan of one segment found: ``count`` whole records that end at
    ``end``; ``error`` says why the bytes after ``end`` are not a record
    (None when the segment is whole)."""

    __slots__ = ("count", "end", "error")

    def __init__(self, count, end, error):
        self.count, self.end, self.error = count, end, error


def checkFrame(data, offset):
    """None if a whole frame starts at ``offset``; otherwise why not."""
    if len(data) - offset < HEADER.size:
        return "incomplete frame header"
    length, crc = HEADER.unpack_from(data, offset)
    if length == 0 or length > MAX_RECORD_BYTES:
        return "impossible record length %d" % (length,)
    end = offset + HEADER.size + length
    if end > len(data):
        return "incomplete record (%d of %d bytes)" % (len(data) - offset - HEADER.size, length)
    if zlib.crc32(memoryview(data)[offset + HEADER.size:end]) != crc:
        return "checksum mismatch"
    return None


def scanSegment(data):
    """Check every frame's length and checksum (no JSON decoding: fast)."""
    view = memoryview(data)
    size = len(data)
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    offset = count = 0
    while offset < size:
        if size - offset < 8:
            return SegmentScan(count, offset, "incomplete frame header")
        length, crc = unpack(data, offset)
        end = offset + 8 + length
        if length == 0 or length > MAX_RECORD_BYTES or end > size or crc32(view[offset + 8:end]) != crc:
            return SegmentScan(count, offset, checkFrame(data, offset))
        offset = end
        count += 1
    return SegmentScan(count, offset, None)


def iterFrames(data, end):
    """(offset, payload bytes) of each frame before ``end``, which a scan
    has already checked."""
    unpack = HEADER.unpack_from
    offset = 0
    while offset < end:
        length, _ = unpack(data, offset)
        start = offset + 8
        yield offset, data[start:start + length]
        offset = start + length


class TooDeep(ValueError):
    """JSON nested past what the standard library's parser can read."""


_LONG_INTEGER = re.compile(rb"-[0-9]{19}|[0-9]{20}")


def parseJSON(data):
    """``json.loads`` of bytes, by orjson where it can (twice as fast on a
    large snapshot) and by the standard library where orjson refuses: NaN
    and Infinity (``json.dumps`` writes them, for instance for the χ² of a
    failed fit), lone surrogates. orjson reads an integer past 64 bits
    (below -2**63 or above 2**64 - 1) as a float rather than refusing it, so
    text with a negative number of 19 digits or more, or a run of 20 digits,
    goes to the standard library.
    Text nested past the standard library's recursion limit is a ValueError,
    as any other text that is not a record is."""
    if _LONG_INTEGER.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise TooDeep("JSON nested too deeply to decode") from None


def decodePayload(payload):
    """The record a checked payload holds."""
    record = parseJSON(payload)
    if not isinstance(record, dict) or "type" not in record:
        raise ValueError("not a journal record: %r" % (payload[:80],))
    return record


def decodeRecords(data, end, chunk=4096):
    """The records of the frames before ``end`` (checked by a scan), decoded
    a few thousand at a time as one JSON array: a third faster than one
    ``json.loads`` per record, which matters for a long replay."""
    payloads = []
    for offset, payload in iterFrames(data, end):
        payloads.append(payload)
        if len(payloads) == chunk:
            yield from _decodeChunk(payloads)
            payloads = []
    if payloads:
        yield from _decodeChunk(payloads)


def _decodeChunk(payloads):
    try:
        records = parseJSON(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        records = None
    if records is None or len(records) != len(payloads) or not all(
            isinstance(r, dict) and "type" in r for r in records):
        records = [decodePayload(p) for p in payloads]     # raises, naming the bad one
    return records


def findWholeFrames(data, start):
    """How many whole frames lie in ``data`` past the bad spot at ``start``:
    what a torn tail that is set aside may still hold, for the operator to
    judge. A payload is a JSON object, so only the places where ``{"``
    follows a header are tried."""
    found = 0
    search = start + 1
    while True:
        brace = data.find(b'{"', search + HEADER.size)
        if brace < 0:
            return found
        offset = brace - HEADER.size
        if checkFrame(data, offset) is None:
            while offset < len(data) and checkFrame(data, offset) is None:
                found += 1
                offset += HEADER.size + HEADER.unpack_from(data, offset)[0]
            search = offset
        else:
            search = offset + 1


# ---- snapshots


def encodeSnapshot(number, body, created, lastTime):
    """The bytes of a snapshot file: one JSON header line, then the state."""
    header = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "segment": number,
              "length": len(body), "crc32": zlib.crc32(body), "created": created,
              "lastTime": lastTime}
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + body


def readSnapshotFile(path, decode=True):
    """(header, state) of a snapshot file; SnapshotError if it is not whole.
    With ``decode=False`` the state is returned as the checked JSON bytes."""
    with open(path, "rb") as f:
        data = f.read()
    newline = data.find(b"\n")
    if newline < 0:
        raise SnapshotError("no header line")
    try:
        header = parseJSON(data[:newline])
    except ValueError:
        raise SnapshotError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError("not a reflservd snapshot")
    body = memoryview(data)[newline + 1:]
    if len(body) != header.get("length"):
        raise SnapshotError("%d bytes of state where the header says %r"
                            % (len(body), header.get("length")))
    if zlib.crc32(body) != header.get("crc32"):
        raise SnapshotError("checksum mismatch")
    match = _SNAPSHOT.match(os.path.basename(path))
    if match and int(match.group(1)) != header.get("segment"):
        raise SnapshotError("the header names segment %r" % (header.get("segment"),))
    if not decode:
        return header, bytes(body)
    try:
        return header, parseJSON(body)
    except ValueError:
        raise SnapshotError("unreadable state") from None


def encodeJSON(state):
    """A state's snapshot body: compact JSON."""
    return _compactJSON(state).encode("utf-8")


def encodeAndWriteSnapshot(journalDir, number, state, created, lastTime, keep, encode=encodeJSON):
    """Encode a state (``encode(state)`` gives the JSON bytes) and write it as
    snapshot ``number`` (on the snapshot thread, so a large state does not
    hold up the reactor); ``(removed, size)``."""
    body = encode(state)
    data = encodeSnapshot(number, body, created, lastTime)
    return writeSnapshotFile(journalDir, number, data, keep), len(data)


def writeSnapshotFile(journalDir, number, data, keep):
    """Write a snapshot durably (temporary name, fsync, rename, fsync the
    directory), then trim. Runs on a thread; returns the names removed."""
    final = os.path.join(journalDir, snapshotName(number))
    temporary = final + ".tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        writeAllAndClose(fd, data)
        os.replace(temporary, final)
        fsyncDirectory(journalDir)
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise JournalWriteError("cannot write %s: %s" % (final, e.strerror or e)) from e
    return trimJournal(journalDir, keep)


def trimJournal(journalDir, keep):
    """Delete the snapshots older than the ``keep`` newest, and the segments
    that only they need. Nothing is deleted while fewer snapshots exist."""
    segments, snapshots = listJournal(journalDir)
    if len(snapshots) < keep:
        return []
    oldest = snapshots[-keep]
    removed = []
    for number in snapshots:
        if number < oldest:
            removed.append(snapshotName(number))
    for number in segments:
        if number < oldest:
            removed.append(segmentName(number))
    for name in removed:
        try:
            os.unlink(os.path.join(journalDir, name))
        except FileNotFoundError:
            pass
    if removed:
        fsyncDirectory(journalDir)
    return removed


def salvageJournal(stateDir, segment, offset):
    """Cut the journal at ``offset`` of ``segment``: the bytes from there on,
    the later segments and the snapshots that hold their state are moved
    aside (``*.salvaged``), never deleted, so that a start replays the
    records before the damage. Returns the names set aside."""
    journalDir = journalDirectory(stateDir)
    segments, snapshots = listJournal(journalDir)
    aside = []
    path = os.path.join(journalDir, segmentName(segment))
    with open(path, "rb") as f:
        data = f.read()
    tail = "%s.salvaged-%d" % (segmentName(segment), offset)
    fd = os.open(os.path.join(journalDir, tail), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writeAllAndClose(fd, data[offset:])
    aside.append(tail)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    later = [segmentName(n) for n in segments if n > segment]
    later += [snapshotName(n) for n in snapshots if n > segment]
    for name in later:
        os.replace(os.path.join(journalDir, name), os.path.join(journalDir, name + ".salvaged"))
        aside.append(name + ".salvaged")
    fsyncDirectory(journalDir)
    return aside


# ---- what load() found


class Recovery:
    """What ``Journal.load`` found.

    @ivar snapshot: the state dict of the newest readable snapshot, or None.
    @ivar records: every whole record after it, in order (an iterator of
        dicts, read lazily: consume it before the first append).
    @ivar torn: descriptions of torn tails set aside (empty when clean).
    @ivar recordCount: how many records ``records`` yields.
    @ivar snapshotNumber: the segment the snapshot precedes, or None.
    @ivar skippedSnapshots: descriptions of snapshots that were not whole.
    """

    def __init__(self, snapshot, records, torn, recordCount=0, snapshotNumber=None,
                 skippedSnapshots=(), journalDir=None, counts=()):
        self.snapshot = snapshot
        self.records = records
        self.torn = list(torn)
        self.recordCount = recordCount
        self.snapshotNumber = snapshotNumber
        self.skippedSnapshots = list(skippedSnapshots)
        self.journalDir = journalDir
        self.counts = list(counts)      # [(segment number, whole records in it)]

    def where(self, index):
        """``(segment number, offset)`` of the ``index``-th record of
        ``records`` (read again from the file: for reporting, not for speed)."""
        for number, count in self.counts:
            if index < count:
                with open(os.path.join(self.journalDir, segmentName(number)), "rb") as f:
                    data = f.read()
                for k, (offset, _) in enumerate(iterFrames(data, len(data))):
                    if k == index:
                        return number, offset
            index -= count
        return None, None

    def locate(self, index):
        """``segment-N.log:OFFSET`` of the ``index``-th record, for a message."""
        number, offset = self.where(index)
        return "record %d" % (index,) if number is None else "%s:%d" % (segmentName(number), offset)


# ---- the writer thread's side


class _SegmentWriter:
    """The open segment. Only the writer thread touches it after ``load``.

    ``length`` is the size of the whole, fsynced records; after a failed
    write the file is truncated back to it (and again before the next write
    if that truncation failed too), so the file only ever holds whole,
    acknowledged records."""

    def __init__(self, journalDir, number, fd, length, pwrite, fsync):
        self.journalDir = journalDir
        self.number = number
        self.fd = fd
        self.length = length
        self.dirty = False
        self._pwrite = pwrite
        self._fsync = fsync

    def _path(self, number=None):
        return os.path.join(self.journalDir, segmentName(self.number if number is None else number))

    def _truncate(self):
        os.ftruncate(self.fd, self.length)
        self._fsync(self.fd)
        self.dirty = False

    def _error(self, e, what):
        return JournalWriteError("cannot %s %s: %s" % (what, self._path(), e.strerror or e))

    def writeBatch(self, frames):
        """Write and fsync the frames; the fsync's duration in seconds."""
        try:
            if self.dirty:
                self._truncate()
            view = memoryview(b"".join(frames))
            offset = self.length
            self.dirty = True
            while view:
                written = self._pwrite(self.fd, view, offset)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                offset += written
                view = view[written:]
            started = time.monotonic()
            self._fsync(self.fd)
            seconds = time.monotonic() - started
        except OSError as e:
            error = self._error(e, "write")
            try:
                self._truncate()
            except OSError:
                pass
            raise error from e
        self.length = offset
        self.dirty = False
        return seconds

    def rotate(self):
        """Start the next segment; its number."""
        number = self.number + 1
        path = self._path(number)
        try:
            if self.dirty:
                self._truncate()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size:
                    raise OSError(errno.EEXIST, "a new segment already holds data")
                fsyncDirectory(self.journalDir)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise JournalWriteError("cannot start %s: %s" % (path, e.strerror or e)) from e
        os.close(self.fd)
        self.fd, self.number, self.length = fd, number, 0
        return number

    def close(self):
        os.close(self.fd)


# ---- the journal


def _runBefores(befores):
    """On the files thread: call each; what it raised, or None, in order."""
    errors = []
    for before in befores:
        try:
            before()
        except Exception as e:
            errors.append(e)
        else:
            errors.append(None)
    return errors


class _Pending:
    __slots__ = ("frame", "deferred", "syncFirst", "filesWritten")

    def __init__(self, frame, deferred, syncFirst, filesWritten):
        self.frame, self.deferred = frame, deferred
        self.syncFirst, self.filesWritten = syncFirst or filesWritten is not None, filesWritten


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
    snapshot does not hold back the acknowledgements of new records, and the
    ``before`` calls that write small jobs' files on a third).

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
        self._befores = []          # [(before, Deferred)] for the files thread
        self._filesBusy = False
        self._flushing = False
        self._snapshotsInFlight = 0
        self._idleWaiters = []
        self._lastTime = None
        self._loaded = False
        self._closeState = None     # None, "closing", "closed"
        self._closeWaiters = []
        if lock:
            if not os.path.isdir(self.journalDir):
                os.makedirs(self.journalDir, exist_ok=True)
                fsyncDirectory(stateDir)
            self._lock()

    # ---- the lock

    def _lock(self):
        path = os.path.join(self.journalDir, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = readAll(fd).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise JournalLocked("%s is in use by another process (pid %s)"
                                % (self.stateDir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % (os.getpid(),), 0)
        self._lockFD = fd

    def _unlock(self):
        if self._lockFD is not None:
            try:
                os.ftruncate(self._lockFD, 0)
            except OSError:
                pass
            os.close(self._lockFD)
            self._lockFD = None

    # ---- start-up

    def load(self):
        """Read the newest whole snapshot and check the records after it,
        setting aside a torn tail; blocking (start-up only). Call once,
        before the first append.

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
                recovery = self._load()
                break
            except FileNotFoundError:
                # A running server trimmed the files we listed: look again.
                if attempt == attempts - 1:
                    self._unlock()
                    raise
            except BaseException:
                self._unlock()      # a refused load leaves the directory to its operator
                raise
        self._loaded = True
        return recovery

    def _load(self):
        segments, snapshots = listJournal(self.journalDir)
        state = header = chosen = None
        skipped = []
        for number in reversed(snapshots):
            path = os.path.join(self.journalDir, snapshotName(number))
            try:
                header, state = readSnapshotFile(path)
            except SnapshotError as e:
                skipped.append(self._skipSnapshot(path, e))
                continue
            chosen = number
            break
        start = 0 if chosen is None else chosen
        replay = [n for n in segments if n >= start]
        self._checkContiguous(replay, start, chosen, skipped)

        sources, torn, count, counts = [], [], 0, []
        try:
            for index, number in enumerate(replay):
                path = os.path.join(self.journalDir, segmentName(number))
                fd = os.open(path, os.O_RDONLY)
                sources.append([fd, 0])
                data = readAll(fd)
                scan = scanSegment(data)
                if scan.error is not None:
                    if index < len(replay) - 1:
                        raise JournalCorrupt(
                            "%s:%d: %s, in a segment that was complete; run "
                            "reflservd-journal %s verify (twistd reflservd --salvage starts "
                            "from the records before it and keeps the rest aside)"
                            % (path, scan.end, scan.error, self.stateDir), number, scan.end)
                    torn.append(self._tornTail(path, data, scan, number))
                sources[-1][1] = scan.end
                count += scan.count
                counts.append((number, scan.count))
            if self.writable:
                self._openWriter(replay[-1] if replay else start,
                                 sources[-1][1] if replay else 0)
        except BaseException:
            for fd, _ in sources:
                os.close(fd)
            raise

        self.recordsSinceSnapshot = count
        if header is not None:
            self._lastTime = header.get("lastTime")
        self._log.info(
            "journal {journalDir}: snapshot {snapshot}, {count} records after it in "
            "{segments} segments", journalDir=self.journalDir,
            snapshot=snapshotName(chosen) if chosen is not None else "none",
            count=count, segments=len(replay))
        return Recovery(state, self._records(sources), torn, recordCount=count,
                        snapshotNumber=chosen, skippedSnapshots=skipped,
                        journalDir=self.journalDir, counts=counts)

    def _skipSnapshot(self, path, error):
        description = "%s is not whole (%s)" % (path, error)
        if self.writable:
            os.replace(path, path + ".corrupt")
            fsyncDirectory(self.journalDir)
            description += "; moved aside to %s.corrupt" % (os.path.basename(path),)
        self._log.warn("journal: snapshot {description}; falling back to an older one",
                       description=description)
        return description

    def _checkContiguous(self, replay, start, chosen, skipped):
        expected = list(range(start, start + len(replay)))
        if replay == expected:
            return
        missing = sorted(set(range(start, replay[-1] + 1)) - set(replay))
        if chosen is None and skipped:
            why = "no snapshot is readable and %s is gone" % (segmentName(missing[0]),)
        elif chosen is None:
            why = "%s is gone and there is no snapshot" % (segmentName(missing[0]),)
        else:
            why = "%s is gone (replay starts at %s)" % (segmentName(missing[0]), snapshotName(chosen))
        raise JournalCorrupt("journal %s: %s" % (self.journalDir, why))

    def _tornTail(self, path, data, scan, number):
        size = len(data) - scan.end
        whole = findWholeFrames(data, scan.end)
        if size > MAX_BATCH_BYTES or whole:
            raise JournalCorrupt(
                "%s:%d: %s, with %d bytes after it%s: not a torn last write but damage to "
                "acknowledged records; run reflservd-journal %s verify (twistd reflservd "
                "--salvage starts from the records before it and keeps the rest aside)"
                % (path, scan.end, scan.error, size,
                   " holding %d whole records" % (whole,) if whole else "", self.stateDir),
                number, scan.end)
        description = "%s: %d bytes from offset %d are not a whole record (%s)" % (
            path, size, scan.end, scan.error)
        if not self.writable:
            return description + "; left in place (read-only)"
        aside = self._setAside(path, data[scan.end:], scan.end)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.end)
            os.fsync(fd)
        finally:
            os.close(fd)
        description += "; set aside in %s" % (aside,)
        self._log.warn("journal: torn tail: {description}", description=description)
        return description

    def _setAside(self, path, data, offset):
        base = "%s.torn-%d" % (path[:-len(".log")], offset)
        aside, suffix = base, 0
        while True:
            try:
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                suffix += 1
                aside = "%s.%d" % (base, suffix)
        writeAllAndClose(fd, data)
        fsyncDirectory(self.journalDir)
        return aside

    def _openWriter(self, number, length):
        for name in os.listdir(self.journalDir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.journalDir, name))
        path = os.path.join(self.journalDir, segmentName(number))
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        if created:
            fsyncDirectory(self.journalDir)
        self._writer = _SegmentWriter(self.journalDir, number, fd, length, self._pwrite, self._fsync)
        if self._runInThread is None:
            writerPool = ThreadPool(minthreads=1, maxthreads=1, name="journal-writer")
            snapshotPool = ThreadPool(minthreads=1, maxthreads=1, name="journal-snapshot")
            filesPool = ThreadPool(minthreads=1, maxthreads=1, name="journal-files")
            self._pools = [writerPool, snapshotPool, filesPool]
            for pool in self._pools:
                # A process that exits without close() must not hang on
                # them; an exit in mid-write is a torn tail, handled.
                pool.threadFactory = functools.partial(threading.Thread, daemon=True)
                pool.start()
            self._runWriter = lambda f, *a: deferToThreadPool(self.reactor, writerPool, f, *a)
            self._runSnapshot = lambda f, *a: deferToThreadPool(self.reactor, snapshotPool, f, *a)
            self._runFiles = lambda f, *a: deferToThreadPool(self.reactor, filesPool, f, *a)
            self._shutdownTrigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._closeAtShutdown)
        else:
            self._runWriter = self._runSnapshot = self._runFiles = self._runInThread

    def _records(self, sources):
        """Yield the checked records, reading each segment again (the
        reading of the first pass is not kept: a long journal would not fit
        in memory twice)."""
        try:
            while sources:
                fd, end = sources[0]
                data = readAll(fd, end)
                record = None
                for record in decodeRecords(data, end):
                    yield record
                if record is not None:
                    self._lastTime = record.get("time", self._lastTime)
                os.close(fd)
                sources.pop(0)
        finally:
            for fd, _ in sources:
                os.close(fd)
            del sources[:]

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

    def append(self, record, syncFirst=False, before=None, frame=None):
        """Journal ``record`` (its ``frame``, when ``encode`` made it already;
        see ``encode`` for what a record is). With
        ``syncFirst`` the batch holding it is written only after the
        ``syncFirst`` callable given to the journal has run. ``before``, if
        given, writes the files the record names (it implies ``syncFirst``):
        it runs on the journal's files thread, with the other ``before``
        calls that arrived meanwhile (one hand-off for many jobs), while the
        writer syncs and writes the batch ahead; the record's batch waits
        for it. An ``OSError`` from it fails the record's batch as a failed
        write does.

        @return: a Deferred that fires None once the record is on disk, or
            fails with JournalWriteError when the disk refused it (or a
            record before it) and nothing of it is on disk.
        """
        self._checkWritable()
        if frame is None:
            frame = self.encode(record)
        d = defer.Deferred()
        filesWritten = None
        if before is not None:
            filesWritten = defer.Deferred()
            self._befores.append((before, filesWritten))
            self._writeFiles()
        self._pending.append(_Pending(frame, d, syncFirst, filesWritten))
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
            files = [item.filesWritten for item in batch if item.filesWritten is not None]
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

    def _writeFiles(self):
        """Hand the ``before`` calls that are waiting to the files thread,
        unless it is busy (they go when it is done)."""
        if self._filesBusy or not self._befores:
            return
        group, self._befores = self._befores, []
        self._filesBusy = True
        d = self._runFiles(_runBefores, [before for before, _ in group])
        d.addBoth(self._filesDone, group)

    def _filesDone(self, outcome, group):
        """Each record waiting on its files goes on, or fails with what went
        wrong (so its batch is refused, never left waiting)."""
        self._filesBusy = False
        errors = outcome if isinstance(outcome, list) else [outcome.value] * len(group)
        for error, (_, filesWritten) in zip(errors, group):
            if error is None:
                filesWritten.callback(None)
            else:
                if not isinstance(error, OSError):
                    self._log.error("journal: writing a job's files failed: {error!r}", error=error)
                filesWritten.errback(JournalWriteError(
                    "cannot write the job files: %s" % (getattr(error, "strerror", None) or error,)))
        self._writeFiles()

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
        self._log.error("journal: {error}; {count} records not acknowledged",
                        error=str(error), count=len(batch) + sum(
                            isinstance(item, _Pending) for item in behind))
        for item in batch + behind:
            if isinstance(item, _SnapshotMarker):
                self._snapshotFinished(item, JournalWriteError(
                    "snapshot abandoned: a record before it was not written (%s)" % (error,)))
            else:
                if item.filesWritten is not None:
                    item.filesWritten.addErrback(lambda f: None)    # nothing waits on it now
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

    def _closedNow(self, _):
        self._closeState = "closed"
        waiters, self._closeWaiters = self._closeWaiters, []
        for d in waiters:
            d.callback(None)

    def _closeAtShutdown(self):
        self._shutdownTrigger = None
        return self.close()
