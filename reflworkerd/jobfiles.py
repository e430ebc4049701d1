"""What a fit leaves behind, read safely: files in its job directory, its outcome and progress.

The worker reads a job's directory from outside the sandbox, after (and, in
``--sandbox none``, beside) code that nobody vetted wrote there. Every file is
opened relative to the job's directory without following a symbolic link in
any component (``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``;
where the kernel lacks it, a chain of directory descriptors each opened
``O_NOFOLLOW``), first as ``O_PATH`` (opening it has no effect on a device and
never waits on a FIFO), checked with ``fstat`` to be a regular file with one
link, owned by the fit's uid, then reopened ``O_NONBLOCK`` and checked to be
that same file. Anything else raises `UnsafeFile`, whose message says what
was found. These calls block on the disk: the worker makes them off the
reactor thread.

JSON written or sent by a fit is parsed with bounded size and depth
(`loadJSON`), and its progress is cut down to typed fields (`cleanProgress`).
"""

import ctypes
import errno
import json
import math
import os
import re
import stat
import struct

RESULT_FILES_QUOTA = 500
"""Result files a job may leave by default (the server's own quota is at least 1,000)."""
RESULT_BYTES_QUOTA = 512 * 1024 * 1024
"""Bytes of results a job may leave by default, by apparent size (the server's is at least 1 GiB)."""

MAX_DEPTH = 32
"""Nesting a fit's JSON may have (an outcome is four levels deep)."""
MAX_PARAMETERS = 200
MAX_LABEL = 200
MAX_ENTRIES = 100000
"""Entries of ``results/`` looked at; a fit that made more is told so."""

_SYS_OPENAT2 = 437          # the same number on every architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2Works = None


class UnsafeFile(Exception):
    """A job's file that the worker will not read; the message says what was found."""


def kindOf(mode):
    """What a file of ``st_mode`` is, as a job's error names it."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a file of an unknown kind"


def expectedOwner(uid):
    """The uid a fit's files belong to: its slot's, else the worker's own."""
    return os.geteuid() if uid is None else uid


def _openat2(dirFd, relative, flags):
    """``openat2`` beneath ``dirFd`` following no link; None where the kernel has none."""
    global _openat2Works
    if _openat2Works is False:
        return None
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, 0, _RESOLVE)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirFd), os.fsencode(relative),
                       ctypes.c_char_p(how), ctypes.c_size_t(len(how)))
    if fd < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM) and _openat2Works is None:
            _openat2Works = False   # no openat2 here (or a seccomp filter refusing it)
            return None
        _openat2Works = True
        raise OSError(code, os.strerror(code), relative)
    _openat2Works = True
    return fd


def _openChain(dirFd, relative, flags):
    """The same as `_openat2`, one directory descriptor at a time, each ``O_NOFOLLOW``."""
    parts = relative.split("/")
    current = os.dup(dirFd)
    try:
        for part in parts[:-1]:
            following = os.open(part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=current)
            os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
    finally:
        os.close(current)


def _openBeneath(dirFd, relative, flags):
    fd = _openat2(dirFd, relative, flags)
    return _openChain(dirFd, relative, flags) if fd is None else fd


def _checkRelative(relative):
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafeFile("%r is not a plain path inside the job directory" % (relative,))


def _describeFailure(dirFd, relative, error):
    """Why ``relative`` could not be opened: the first component that is no directory or a link."""
    parts = relative.split("/")
    for n in range(1, len(parts) + 1):
        name = "/".join(parts[:n])
        try:
            info = os.stat(name, dir_fd=dirFd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            return "%s cannot be examined (%s)" % (name, e.strerror)
        if stat.S_ISLNK(info.st_mode):
            return "%s is a symbolic link" % (name,)
        if n < len(parts) and not stat.S_ISDIR(info.st_mode):
            return "%s is %s, not a directory" % (name, kindOf(info.st_mode))
    return "%s cannot be opened (%s)" % (relative, error.strerror)


def _checkPlain(info, relative, uid):
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFile("%s is a symbolic link" % (relative,))
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile("%s is %s, not a regular file" % (relative, kindOf(info.st_mode)))
    if info.st_nlink != 1:
        raise UnsafeFile("%s has %d hard links" % (relative, info.st_nlink))
    owner = expectedOwner(uid)
    if info.st_uid != owner:
        raise UnsafeFile("%s is owned by uid %d, not the fit's uid %d" % (relative, info.st_uid, owner))


class JobFile:
    """A regular file of a job, open for reading: ``size`` as it was when opened (what
    is read stops there), ``read(offset, n)`` with ``pread``; close it when done."""

    def __init__(self, fd, relative, size):
        self.fd = fd
        self.name = relative
        self.size = size

    def read(self, offset, n):
        n = max(0, min(n, self.size - offset))
        chunks = []
        while n > 0:
            chunk = os.pread(self.fd, n, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _openJobDir(jobDir):
    return os.open(jobDir, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def openFile(jobDir, relative, uid=None):
    """Open ``jobDir/relative`` safely (see the module); a `JobFile`.

    @raise FileNotFoundError: there is nothing at ``relative``.
    @raise UnsafeFile: there is something, but not a regular file of the fit's uid
        with one link reached through directories only.
    """
    _checkRelative(relative)
    top = _openJobDir(jobDir)
    try:
        try:
            pathFd = _openBeneath(top, relative, _O_PATH)
        except FileNotFoundError:
            why = _describeFailure(top, relative, None)
            if why is None:
                raise
            raise UnsafeFile(why)
        except OSError as e:
            raise UnsafeFile(_describeFailure(top, relative, e) or "%s cannot be opened (%s)"
                             % (relative, e.strerror))
        try:
            info = os.fstat(pathFd)
            _checkPlain(info, relative, uid)
            try:
                fd = _openBeneath(top, relative, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError as e:
                raise UnsafeFile("%s changed while it was opened (%s)" % (relative, e.strerror))
        finally:
            os.close(pathFd)
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (info.st_dev, info.st_ino):
            os.close(fd)
            raise UnsafeFile("%s was replaced while it was opened" % (relative,))
        return JobFile(fd, relative, again.st_size)
    finally:
        os.close(top)


def readFile(jobDir, relative, uid=None, limit=1 << 20):
    """The bytes of ``jobDir/relative`` opened with `openFile`; `UnsafeFile` past ``limit``."""
    with openFile(jobDir, relative, uid) as f:
        if f.size > limit:
            raise UnsafeFile("%s is %d bytes, more than the %d read of it" % (relative, f.size, limit))
        return f.read(0, f.size)


class Results:
    """What `scanResults` found: ``names`` (to upload, within the quota) with their
    ``sizes``, ``unsafe`` (what was refused, each said in words), ``leftOut``
    (regular files past the quota) and ``over`` (which limit, in words), if any."""

    def __init__(self):
        self.names = []
        self.sizes = {}
        self.unsafe = []
        self.leftOut = []
        self.over = None

    @property
    def bytes(self):
        return sum(self.sizes.values())

    def problem(self):
        """The job's error in words, or None when every file is kept."""
        parts = []
        if self.unsafe:
            shown = self.unsafe[:10]
            more = len(self.unsafe) - len(shown)
            parts.append("the fit left what the worker does not read: %s%s"
                         % ("; ".join(shown), "; and %d more" % (more,) if more else ""))
        if self.over:
            shown = ", ".join(self.leftOut[:5])
            more = len(self.leftOut) - 5
            parts.append("results over %s; %d file(s) left out (%s%s), %d kept (%d bytes)"
                         % (self.over, len(self.leftOut), shown, ", and %d more" % (more,) if more > 0 else "",
                            len(self.names), self.bytes))
        return "; ".join(parts) or None


FIRST = ("stdout.txt", "stderr.txt")
"""Kept first when the results are over the quota: what a user needs to see why."""


def scanResults(jobDir, uid=None, maxFiles=None, maxBytes=None, resultsDir="results", checkName=None):
    """The regular files the fit left in ``jobDir/resultsDir``, kept within the quota.

    Sizes are apparent sizes (``st_size``: a sparse file counts whole). Files
    are kept in the order ``FIRST``, then by name, while both ``maxFiles`` and
    ``maxBytes`` hold. ``checkName(name)`` raises ``ValueError`` for a name the
    server would refuse. A ``resultsDir`` that is missing holds nothing; one
    that is anything but a directory is itself unsafe.
    """
    found = Results()
    top = _openJobDir(jobDir)
    try:
        try:
            folder = _openBeneath(top, resultsDir, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
        except FileNotFoundError:
            return found
        except OSError as e:
            found.unsafe.append(_describeFailure(top, resultsDir, e) or "%s cannot be opened (%s)"
                                % (resultsDir, e.strerror))
            return found
    finally:
        os.close(top)
    plain = []
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= MAX_ENTRIES:
                    found.unsafe.append("%s holds more than %d entries" % (resultsDir, MAX_ENTRIES))
                    break
                relative = resultsDir + "/" + entry.name
                try:
                    entry.name.encode("utf-8")
                    if checkName is not None:
                        checkName(entry.name)
                    info = os.stat(entry.name, dir_fd=folder, follow_symlinks=False)
                    _checkPlain(info, relative, uid)
                except ValueError:
                    found.unsafe.append("%r is not a name a result may have" % (relative,))
                    continue
                except UnsafeFile as e:
                    found.unsafe.append(str(e))
                    continue
                except OSError:
                    continue    # gone meanwhile
                plain.append((entry.name, info.st_size))
    finally:
        os.close(folder)
    plain.sort(key=lambda item: (FIRST.index(item[0]) if item[0] in FIRST else len(FIRST), item[0]))
    total = 0
    for name, size in plain:
        if maxFiles is not None and len(found.names) >= maxFiles:
            found.over = found.over or "the quota of %d files per job" % (maxFiles,)
        elif maxBytes is not None and total + size > maxBytes:
            found.over = found.over or "the quota of %d bytes per job" % (maxBytes,)
        else:
            found.names.append(name)
            found.sizes[name] = size
            total += size
            continue
        found.leftOut.append(name)
    return found


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def loadJSON(raw, maxBytes, maxDepth=MAX_DEPTH):
    """Parse JSON a fit wrote, of at most ``maxBytes`` and ``maxDepth`` levels.

    The depth is measured before parsing (strings removed, then innermost
    bracket pairs removed once per level), so no input can exhaust the
    parser's recursion. Raises ``ValueError`` saying what is wrong.
    """
    if len(raw) > maxBytes:
        raise ValueError("%d bytes, more than the %d allowed" % (len(raw), maxBytes))
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(maxDepth):
        if not brackets:
            break
        brackets = _INNERMOST.sub(b"", brackets)     # one level: new pairs wait for the next pass
    if _INNERMOST.search(brackets) or brackets.count(b"[") + brackets.count(b"{") > maxDepth:
        raise ValueError("nested deeper than %d levels" % (maxDepth,))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError("not JSON (%s)" % (str(e)[:200],))


def finite(value):
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def cleanProgress(progress):
    """A fit's progress as it may leave the worker, or None where it is none.

    ``{"step": int, "chisq": float or None, "parameters": {label: float},
    "elapsed": float}`` and nothing else: at most ``MAX_PARAMETERS``
    parameters (the first ones), labels of at most ``MAX_LABEL`` characters,
    values that are finite numbers (others are left out).
    """
    if not isinstance(progress, dict):
        return None
    step = progress.get("step")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**53:
        return None
    parameters = {}
    given = progress.get("parameters")
    if isinstance(given, dict):
        for label, value in given.items():
            if len(parameters) >= MAX_PARAMETERS:
                break
            value = _number(value)
            if isinstance(label, str) and 0 < len(label) <= MAX_LABEL and value is not None:
                parameters[label] = value
    elapsed = _number(progress.get("elapsed"))
    return {"step": step, "chisq": _number(progress.get("chisq")), "parameters": parameters,
            "elapsed": elapsed if elapsed is not None and elapsed >= 0 else 0.0}
