"""The journal's files: their names, the directory's lock, the segment
being written, snapshots, trimming and salvage, and every fsync.

Layout, in ``STATE_DIR/journal/``::

    lock                    flock'ed by the one server that owns the directory
    format                  the state format: {"format": "reflservd-state", "version": N, ...}
    segment-000042.log      records (``journalframes``)
    snapshot-000042.json    the state after every record in segments < 42

Everything here blocks; the journal (``reflservd.journal``) runs it on its
threads.
"""

import errno
import fcntl
import os
import re
import time

from reflservd.journalframes import decodeSnapshot, encodeJSON, encodeSnapshot, parseJSON
from reflservd.names import VERSION

STATE_FORMAT = 1
"""The format of a state directory (its records, snapshots and job files) this
server writes, and the newest it reads; it reads every older one. A directory
without a ``format`` file is format 1, written before the file existed.
Raise it when a change would mislead an older server, and keep a state
directory of the old format in test/states/ to show the new one reads it."""
_FORMAT_NAME = "format"

_SEGMENT = re.compile(r"^segment-(\d+)\.log$")
_SNAPSHOT = re.compile(r"^snapshot-(\d+)\.json$")


class JournalWriteError(Exception):
    """The disk refused a write; nothing in the batch is durable."""



class StateTooNew(Exception):
    """The state directory was written in a format newer than this server reads."""


class JournalLocked(Exception):
    """Another process holds the state directory."""



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


def stateFormat(stateDir):
    """The format of a state directory (1 where it has no ``format`` file).

    @raise StateTooNew: a newer server wrote it; naming both versions.
    """
    path = os.path.join(journalDirectory(stateDir), _FORMAT_NAME)
    try:
        with open(path, "rb") as f:
            written = parseJSON(f.read())
    except FileNotFoundError:
        return 1
    except ValueError:
        written = None
    version = written.get("version") if isinstance(written, dict) else None
    if not isinstance(version, int) or written.get("format") != "reflservd-state":
        raise StateTooNew("%s is not a reflservd state format file" % (path,))
    if version > STATE_FORMAT:
        raise StateTooNew(
            "%s was written by reflservd %s in state format %d; this reflservd %s reads state "
            "formats up to %d: run that version or a newer one" % (
                stateDir, written.get("writer", "(unknown)"), version, VERSION, STATE_FORMAT))
    return version


def markStateFormat(stateDir):
    """Record this server's format in the state directory (once it has read
    it): from then on an older server refuses the directory, not misreads it."""
    journalDir = journalDirectory(stateDir)
    if stateFormat(stateDir) == STATE_FORMAT and os.path.exists(os.path.join(journalDir, _FORMAT_NAME)):
        return
    temporary = os.path.join(journalDir, _FORMAT_NAME + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writeAllAndClose(fd, encodeJSON({"format": "reflservd-state", "version": STATE_FORMAT,
                                     "writer": VERSION}))
    os.rename(temporary, os.path.join(journalDir, _FORMAT_NAME))
    fsyncDirectory(journalDir)


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


def lockDirectory(stateDir):
    """An open descriptor of ``STATE_DIR/journal/lock``, flock'ed for this
    process, which wrote its pid in it; ``JournalLocked`` when another
    process holds it."""
    path = os.path.join(journalDirectory(stateDir), "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = readAll(fd).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise JournalLocked("%s is in use by another process (pid %s)"
                            % (stateDir, holder)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % (os.getpid(),), 0)
    return fd


def unlockDirectory(fd):
    """Release the lock ``lockDirectory`` took (its pid erased first)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def readSnapshotFile(path, decode=True):
    """(header, state) of a snapshot file; SnapshotError if it is not whole.
    With ``decode=False`` the state is returned as the checked JSON bytes."""
    with open(path, "rb") as f:
        data = f.read()
    match = _SNAPSHOT.match(os.path.basename(path))
    return decodeSnapshot(data, int(match.group(1)) if match else None, decode)


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



class SegmentWriter:
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
