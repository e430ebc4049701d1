"""The namespaces layer: unshare, the reaper outside the fit's pid namespace,
and the fit's new root (`RootPlan` decides what it holds, `RootBuilder`
mounts it and pivots into it)."""

import ctypes
import ctypes.util
import fcntl
import os
import platform
import re
import resource
import shutil
import signal
import socket
import struct
import sys

from reflworkerd.sandbox.syscalls import SandboxUnavailable, check, closeFds, encode, libc


HOSTNAME = "reflfit"
TMP_SIZE = 256 * 1024 * 1024
"""Default size of the fit's private /tmp and /dev/shm (tmpfs: host memory);
``limits["tmp"]`` overrides it."""

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
             "nsswitch.conf", "host.conf", "hosts", "protocols", "services",
             "mime.types", "fonts")
DEVICES = ("null", "zero", "full", "random", "urandom")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats",
               "acpi", "scsi")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 1

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41,
                  "ppc64le": 203, "s390x": 217}

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_STATVFS_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                  (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                  (os.ST_NODIRATIME, MS_NODIRATIME),
                  (os.ST_RELATIME, MS_RELATIME))

def _mount(source, target, fstype, flags, data=None):
    check(libc.mount(encode(source), encode(target), encode(fstype),
                       flags, encode(data)),
           "mount %s on %s" % (source or fstype, target))

def _unshare(flags):
    check(libc.unshare(flags), "unshare(%#x)" % (flags,))


def _pivotRoot(newRoot, putOld):
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise SandboxUnavailable("pivot_root: unknown syscall number on %s"
                                 % (platform.machine(),))
    check(libc.syscall(ctypes.c_long(number), encode(newRoot),
                         encode(putOld)), "pivot_root")


def _under(path, ancestor):
    """Whether ``path`` is ``ancestor`` or lies below it (both real paths)."""
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")

class RootPlan:
    """
    What the fit's new root holds, decided in the forked process before any
    namespace is entered (it reads ``sys.modules`` and the host's file system).

    Kept apart from the mounting so that what a fit can see is a list one can
    read and test: ``readOnly`` (real paths bound read-only at the same path),
    ``symlinks`` (top-level links such as ``/bin -> usr/bin`` on merged-/usr
    systems), ``etc`` (files from ``/etc``), ``jobDir`` (bound read-write).
    """

    def __init__(self, jobDir, extraReadOnly=()):
        self.jobDir = os.path.realpath(jobDir)
        self.symlinks = {}
        candidates = []
        for top in SYSTEM_DIRS:
            if os.path.islink(top):
                self.symlinks[top] = os.readlink(top)
            elif os.path.isdir(top):
                candidates.append(top)
        prefixes = {os.path.realpath(p) for p in (
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
        candidates.extend(prefixes)
        candidates.extend(self._importedElsewhere(candidates))
        candidates.extend(os.path.realpath(p) for p in extraReadOnly)
        self.readOnly = self._outermost(candidates)
        for path in self.readOnly:
            if _under(self.jobDir, path):
                raise SandboxUnavailable(
                    "job directory %s lies inside %s, which the fit sees "
                    "read-only with all its siblings" % (self.jobDir, path))
            if _under(path, self.jobDir):
                raise SandboxUnavailable(
                    "library path %s lies inside the job directory" % (path,))
        self.etc = [name for name in ETC_FILES
                    if os.path.lexists(os.path.join("/etc", name))]

    @staticmethod
    def _outermost(paths):
        """Existing paths, sorted, without those inside another one."""
        kept = []
        for path in sorted(set(paths)):
            if not os.path.exists(path) or path == "/":
                continue
            if not any(_under(path, k) for k in kept):
                kept.append(path)
        return kept

    def _importedElsewhere(self, bound):
        """
        Package directories (and top-level module files) already imported
        from ``sys.path`` entries outside ``bound``: an editable install, the
        project's own source tree. Only each package is bound, never the
        entry that holds it, which may also hold the worker's state or jobs.
        Only top-level modules are looked at (their submodules live inside
        them), and paths are resolved only when their name is not already
        inside ``bound``: the fork server has thousands of modules loaded.
        """
        entries = []
        for entry in sys.path:
            if entry and os.path.isdir(entry):
                real = os.path.realpath(entry)
                if real != "/" and not any(_under(real, b) for b in bound):
                    entries.append(real)
        entries.sort(key=len, reverse=True)
        boundAsNamed = bound + [os.path.abspath(p) for p in (
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
        found = set()
        for name, module in list(sys.modules.items()):
            if "." in name:
                continue
            locations = list(getattr(module, "__path__", None) or ())
            if not locations and getattr(module, "__file__", None):
                locations = [module.__file__]
            for location in locations:
                if not isinstance(location, str) or not location:
                    continue
                location = os.path.abspath(location)
                if any(_under(location, b) for b in boundAsNamed):
                    continue
                real = os.path.realpath(location)
                if any(_under(real, b) for b in bound):
                    continue
                for entry in entries:
                    if _under(real, entry) and real != entry:
                        top = real[len(entry):].lstrip("/").split("/")[0]
                        found.add(os.path.join(entry, top))
                        break
        return [path for path in found if not _under(self.jobDir, path)]

    @staticmethod
    def passwd(uid, gid):
        """A synthetic /etc/passwd and /etc/group: the host's list of users
        is none of the fit's business."""
        users = {0: "root", 65534: "nobody"}
        users.setdefault(uid, "fit")
        groups = {0: "root", 65534: "nogroup"}
        groups.setdefault(gid, "fit")
        passwd = "".join("%s:x:%d:%d:%s:%s:/usr/sbin/nologin\n" % (
            name, u, gid if u == uid else u, name,
            "/tmp" if u == uid else "/nonexistent")
            for u, name in sorted(users.items()))
        group = "".join("%s:x:%d:\n" % (name, g) for g, name in sorted(groups.items()))
        return passwd, group


class RootBuilder:
    """
    Builds the planned root in the fit's mount namespace and pivots into it.

    Runs in the fit process (pid 1 of its pid namespace: a fresh /proc must be
    mounted from inside the namespace). The new root is a tmpfs mounted over
    /tmp of the private mount namespace; since the job directory or a library
    may itself live under /tmp, every source is opened (``O_PATH``) before and
    bound through ``/proc/self/fd``. The fresh /proc has no mounts inside, so
    its knobs are bound read-only one by one.
    """

    def __init__(self, plan, uid, gid, tmpSize):
        self.plan = plan
        self.uid = uid
        self.gid = gid
        self.tmpSize = tmpSize

    def build(self):
        plan = self.plan
        paths = list(plan.readOnly) + [plan.jobDir]
        paths += [os.path.join("/dev", name) for name in DEVICES
                  if os.path.exists(os.path.join("/dev", name))]
        self.hostMounts = self._mountPoints()
        sources = {}
        try:
            for path in paths:
                sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            self.root = root = "/tmp"
            _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
                   "mode=0755,size=4m,nr_inodes=4096")
            for link, target in sorted(plan.symlinks.items()):
                os.symlink(target, root + link)
            self._etc()
            self._tmpfs("/tmp", 0o1777)
            self._dev(sources)
            self._proc()
            for path in plan.readOnly:
                self._bind(sources[path], path, readOnly=True)
            self._bind(sources[plan.jobDir], plan.jobDir, readOnly=False)
        finally:
            for fd in sources.values():
                os.close(fd)
        _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(root)
        _pivotRoot(".", ".")
        check(libc.umount2(b".", MNT_DETACH), "umount old root")
        os.chdir("/")

    @staticmethod
    def _mountFlags(path):
        """The flags of the mount that holds ``path`` that a bind mount must
        keep (in a user namespace the kernel refuses to clear them)."""
        fsFlags = os.statvfs(path).f_flag
        return sum(ms for st, ms in _STATVFS_TO_MS if fsFlags & st)

    def _target(self, path, isDir):
        """Create the mount point for ``path`` in the new root."""
        target = self.root + path
        if isDir:
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        return target

    def _bind(self, fd, path, readOnly, device=False):
        """Bind ``path`` (opened as ``fd``) at the same path in the new root.
        A read-only bind of a tree with mounts inside is recursive, and each
        of those mounts is made read-only by itself."""
        source = "/proc/self/fd/%d" % (fd,)
        target = self._target(path, os.path.isdir(source))
        inside = [p for p in self.hostMounts if p != path and _under(p, path)]
        _mount(source, target, None, MS_BIND | (MS_REC if readOnly and inside else 0))
        extra = MS_NOSUID | (0 if device else MS_NODEV) | (MS_RDONLY if readOnly else 0)
        for point in [target] + ([self.root + p for p in inside] if readOnly else []):
            _mount(None, point, None, MS_BIND | MS_REMOUNT | extra | self._mountFlags(point))

    @staticmethod
    def _mountPoints():
        """The mount points of this mount namespace, shortest first."""
        found = set()
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                found.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                 line.split()[4]))
        return sorted(found, key=len)

    def _tmpfs(self, path, mode):
        target = self._target(path, True)
        _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
               "mode=%o,size=%d,nr_inodes=65536" % (mode, self.tmpSize))

    def _etc(self):
        """A few files copied from the host's /etc (small, and a copy cannot
        be used to reach the original), and a synthetic passwd and group."""
        etc = self._target("/etc", True)
        for name in self.plan.etc:
            path = os.path.join("/etc", name)
            copy = os.path.join(etc, name)
            try:
                if os.path.islink(path):
                    os.symlink(os.readlink(path), copy)
                elif os.path.isdir(path):
                    shutil.copytree(path, copy, symlinks=True)
                else:
                    shutil.copyfile(path, copy)
            except OSError:
                continue
        passwd, group = self.plan.passwd(self.uid, self.gid)
        for name, text in (("passwd", passwd), ("group", group), ("hostname", HOSTNAME + "\n")):
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)

    def _dev(self, sources):
        dev = self._target("/dev", True)
        for name in DEVICES:
            path = os.path.join("/dev", name)
            if path in sources:
                self._bind(sources[path], path, readOnly=False, device=True)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, os.path.join(dev, name))
        self._tmpfs("/dev/shm", 0o1777)

    def _proc(self):
        proc = self._target("/proc", True)
        _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in PROC_READONLY:
            path = os.path.join(proc, name)
            if os.path.exists(path):
                _mount(path, path, None, MS_BIND)
                _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY
                       | MS_NOSUID | MS_NODEV | MS_NOEXEC | self._mountFlags(path))
        for name in PROC_MASKED:
            path = os.path.join(proc, name)
            if os.path.isdir(path):
                _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       "mode=0555,size=4k")
            elif os.path.exists(path):
                _mount(self.root + "/dev/null", path, None, MS_BIND)

def enterNamespaces(isRoot):
    """
    Unshare the namespaces and fork. The calling process becomes the reaper
    and never returns from here; the child, pid 1 of the new pid namespace,
    returns ``(names, lifeline)``: the namespaces entered and the read end of
    a pipe that reaches end-of-file when the reaper is gone.
    """
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    names = ["mount", "pid", "net", "ipc", "uts"]
    uid, gid = os.geteuid(), os.getegid()
    if not isRoot:
        flags |= CLONE_NEWUSER
        names.insert(0, "user")
    _unshare(flags)
    if not isRoot:
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    lifelineRead, lifelineWrite = os.pipe()
    child = os.fork()
    if child:
        os.close(lifelineRead)
        _reap(child, lifelineWrite)
    os.close(lifelineWrite)
    return names, lifelineRead


def _reap(child, lifeline):
    """
    The reaper: wait for the fit (pid 1 of its namespace), pass on TERM, INT
    and HUP, and end the way it ended, so that whoever forked us sees the
    fit's own exit status or signal. Never returns.
    """
    try:
        os.chdir("/")
        closeFds({0, 1, 2, lifeline})
        forwarded = set()

        def forward(signum, frame):
            forwarded.add(signum)
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, forward)
        while True:
            pid, status = os.waitpid(child, 0)
            if pid == child and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                break
        if os.WIFSIGNALED(status):
            _dieBy(os.WTERMSIG(status))
        code = os.WEXITSTATUS(status)
        if code - 128 in forwarded:
            _dieBy(code - 128)
        os._exit(code)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()       # the fork server's stderr: the worker's log
        finally:
            os._exit(127)


def _dieBy(signum):
    """End this process by ``signum`` (no core file), as the fit did."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def exitOnSignal(signum, frame):
    """pid 1 of a namespace ignores signals it has no handler for; this
    handler gives TERM, INT and HUP their usual meaning (the reaper turns the
    exit status back into the signal). A fit may install its own."""
    os._exit(128 + signum)


def loopbackUp():
    """The network namespace starts with only ``lo``, down. Bring it up: it
    reaches only this job, and in-job helpers may talk over it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        current = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", current | IFF_UP))
