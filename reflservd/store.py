"""Job files on disk: the request, the uploaded files, the result files.

Every file is in place before the journal record that names it is written:
a new job's files inside its new directory (which nothing names until its
submit record), a result file under a temporary name and then renamed. The
record is appended with ``syncFirst``, and the journal's writer calls
``Store.sync`` (one ``syncfs`` of the store's filesystem) before it writes a
batch holding such records: so a record never names a file that a crash
could have lost, and a batch of 64 submits costs one sync, not three fsyncs
each. A file over ``SYNC_ITSELF`` bytes is fsynced as it is written, so the
batch's sync never waits for bulk data.

The methods block; the server runs them in a thread pool. A small job's
files are written by ``BatchedWrites``, many jobs in one hand-off to that
pool, and its submit record waits for them (``Journal.append(after=…)``).
"""

import ctypes
import ctypes.util
import json
import os
import shutil

from twisted.internet import defer

from reflservd.errors import BadName

MAX_NAME = 255
SYNC_ITSELF = 1 << 20


def checkName(name):
    """``name`` if it is a safe plain file name, else ``BadName`` saying why."""
    if not isinstance(name, str) or not name:
        raise BadName("a file name must be a non-empty string")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName("file name %r is not valid Unicode (a lone surrogate)" % (name,)) from None
    if len(encoded) > MAX_NAME:
        raise BadName("file name longer than %d bytes" % (MAX_NAME,))
    if "/" in name or "\\" in name:
        raise BadName("file name %r contains a path separator" % (name,))
    if name in (".", ".."):
        raise BadName("file name %r is not a file" % (name,))
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadName("file name %r contains a control character" % (name,))
    return name


def baseName(name):
    """The last part of a path sent by the old worker (it sends full paths)."""
    return (name or "").replace("\\", "/").rsplit("/", 1)[-1]


class Store:
    """``root/<id>.json`` (the request) and, once the job has files,
    ``root/<id>/uploads/<name>`` and ``root/<id>/results/<name>``."""

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def jobDir(self, jobId):
        return os.path.join(self.root, str(int(jobId)))

    def requestPath(self, jobId):
        return os.path.join(self.root, "%d.json" % (jobId,))

    def writeJob(self, jobId, request, files):
        """Write a job about to be submitted: its request and its uploaded
        files (``[(name, bytes or file)]``, names checked); ``{name: size}``.
        Nothing names these files until the submit record is journaled, so
        they are written in place, not renamed: a submit that crashed before
        its record leaves files that the next start removes (and that a new
        job given the same id replaces here). A job without files makes no
        directory: one file creation in all."""
        path = self.jobDir(jobId)
        if os.path.lexists(path):
            shutil.rmtree(path)
        uploads = {}
        if files:
            os.mkdir(path)
            os.mkdir(os.path.join(path, "uploads"))
            for name, source in files:
                uploads[name] = _writeNew(self.path(jobId, "upload", name), source)
        data = memoryview(json.dumps(request, sort_keys=True).encode("utf-8"))
        fd = os.open(self.requestPath(jobId), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while data:     # three system calls, no buffered file object
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        return uploads

    def sync(self):
        """Make every file and rename so far durable: ``syncfs`` of the
        store's filesystem (the journal's writer calls it before a batch
        whose records name files)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def readRequest(self, jobId):
        with open(self.requestPath(jobId), "rb") as f:
            return json.loads(f.read())

    def path(self, jobId, kind, name):
        folder = {"upload": "uploads", "result": "results"}[kind]
        return os.path.join(self.jobDir(jobId), folder, checkName(name))

    def writeResultPart(self, jobId, name, offset, source, last):
        """Write one part of a result file at ``offset``. With ``last`` the file
        is renamed into place (fsynced first if it is over ``SYNC_ITSELF``) and
        its size returned; else the bytes received so far. A part must start
        where the previous one ended."""
        final = self.path(jobId, "result", name)
        partial = os.path.join(self.jobDir(jobId), "results", ".part-" + name)
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        if offset == 0:
            have = 0
        elif offset != have:
            raise BadName("part at offset %d, but %d bytes were received" % (offset, have))
        with open(partial, "r+b" if offset else "wb") as f:
            f.truncate(offset)
            f.seek(offset)
            received = offset + _copy(source, f)
            if last:
                _syncIfLarge(f, received)
        if not last:
            return received
        os.rename(partial, final)
        return received

    def files(self, jobId, kind):
        """``[(name, size), …]`` of a job's uploads or results, by name."""
        folder = os.path.join(self.jobDir(jobId), {"upload": "uploads", "result": "results"}[kind])
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith(".part-"))
        except FileNotFoundError:
            return []
        return [(n, os.path.getsize(os.path.join(folder, n))) for n in names]

    def remove(self, jobId):
        shutil.rmtree(self.jobDir(jobId), ignore_errors=True)
        try:
            os.unlink(self.requestPath(jobId))
        except FileNotFoundError:
            pass

    def removeOthers(self, known):
        """Remove the files of jobs the journal does not know (submits that
        crashed before their record); returns how many jobs."""
        removed = set()
        for entry in os.listdir(self.root):
            number = entry[:-5] if entry.endswith(".json") else entry
            if number.isdigit() and int(number) not in known:
                path = os.path.join(self.root, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
                removed.add(int(number))
        return len(removed)


class BatchedWrites:
    """Writes handed to a thread in groups: the calls that arrive while one
    group is being written go together in the next, so a burst of small
    submits costs one hand-off, not one each.

    @param runInThread: ``f(*args) -> Deferred`` that runs ``f`` off the reactor.
    """

    def __init__(self, runInThread):
        self._runInThread = runInThread
        self._waiting = []          # [(call, Deferred)]
        self._busy = False

    def write(self, f, *args):
        """A Deferred that fires with ``f(*args)``, called in the next group,
        or fails with what it raised."""
        d = defer.Deferred()
        self._waiting.append((lambda: f(*args), d))
        self._next()
        return d

    def _next(self):
        if self._busy or not self._waiting:
            return
        group, self._waiting = self._waiting, []
        self._busy = True
        self._runInThread(_callEach, [call for call, _ in group]).addBoth(self._done, group)

    def _done(self, outcome, group):
        self._busy = False
        if not isinstance(outcome, list):
            outcome = [(False, outcome.value)] * len(group)
        for (ok, value), (_, d) in zip(outcome, group):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        self._next()


def _callEach(calls):
    """On the thread: call each; ``[(True, result) or (False, exception)]``."""
    outcome = []
    for call in calls:
        try:
            outcome.append((True, call()))
        except Exception as e:
            outcome.append((False, e))
    return outcome


def _copy(source, f):
    if isinstance(source, (bytes, bytearray, memoryview)):
        f.write(source)
        return len(source)
    n = 0
    while True:
        chunk = source.read(1 << 20)
        if not chunk:
            return n
        f.write(chunk)
        n += len(chunk)


def _writeNew(path, source):
    with open(path, "xb") as f:
        size = _copy(source, f)
        _syncIfLarge(f, size)
    return size


def _syncIfLarge(f, size):
    """Bulk data goes to the disk as it is written, so that the journal's
    once-a-batch sync never waits for it; small files ride that sync."""
    if size > SYNC_ITSELF:
        f.flush()
        os.fsync(f.fileno())


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _syncfs(fd):
    """Flush the whole filesystem holding ``fd`` (Linux ``syncfs``; ``sync``
    where the C library lacks it)."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    if syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
