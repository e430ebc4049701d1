"""Confinement of a fit process.

A job is hostile until proven otherwise: a refl1d model is Python code. The
fork server calls two functions from here:

- ``choose(mode)`` once, at worker start: the effective mode for ``auto``,
  ``apparmor``, ``namespaces`` or ``none``. It raises ``SandboxUnavailable``
  when the host cannot give what was asked, so that a worker configured for a
  confinement it cannot have refuses to start instead of running fits
  unconfined. ``auto`` picks the strongest mode this host offers and logs it.
- ``confine(jobDir, mode, limits, uid=None, gid=None)`` in a process freshly
  forked from the fork server, before the model is read. It returns only in
  the process that will run the fit, with its working directory set to the
  (real path of the) job directory and a minimal environment
  (``fitEnvironment``), and returns the description of what confines it.
- ``describe(mode, limits, uid, isRoot)``: that description, as the worker
  computes it for the job record from what it asked for (a fit can say
  anything about itself).

The layers (docs/security.md says what each one stops and what it does not):

``namespaces``
    ``unshare`` of the mount, pid, network, IPC and UTS namespaces (and of the
    user namespace where the worker is not root). The process that called
    ``confine`` stays outside the new pid namespace as a small reaper: it waits
    for the fit, forwards TERM/INT/HUP to it and exits with the fit's status;
    if the reaper is killed, the fit gets SIGKILL (parent-death signal). The
    fit is pid 1 of its namespace, so when it ends the kernel kills everything
    it started. The fit's root is a new, read-only tmpfs holding only: the
    system library directories (``/usr``, ``/lib*``, ``/bin``, ``/sbin``), a
    handful of files from ``/etc``, the Python installation and the venv, the
    packages the fork server imported from elsewhere (each package directory,
    never the directory that holds it), minimal ``/dev``, a fresh ``/proc``
    with the host-wide knobs read-only or masked, a private ``/tmp`` and
    ``/dev/shm``, and the job directory itself, read-write, at its own path.
    Everything else (other jobs, the worker's state, token and logs, home
    directories) is not there. The network namespace has only its own
    loopback.
``apparmor``
    The namespaces, then an immediate change to the ``reflworkerd-fit``
    profile (``apparmor.d/``) before the fit starts.
``none``
    Resource limits, nice 19, the per-slot uid and no capabilities only.

In every mode: resource limits (hard = soft, so the fit cannot raise them),
nice 19, a per-slot unprivileged uid/gid when the worker is root and one is
given (the job directory is chowned to it first), no capabilities,
``PR_SET_NO_NEW_PRIVS`` (no setuid binary can give privileges back),
``PR_SET_DUMPABLE`` 0, and a seccomp filter (x86_64, aarch64) refusing kernel
interfaces a fit has no use for, nested namespaces first.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile

from twisted.logger import Logger


class SandboxUnavailable(Exception):
    """The host cannot provide the confinement that was asked for."""


MODES = ("auto", "apparmor", "namespaces", "none")

FIT_PROFILE = "reflworkerd-fit"
HOSTNAME = "reflfit"
TMP_SIZE = 256 * 1024 * 1024
"""Default size of the fit's private /tmp and /dev/shm (tmpfs: host memory);
``limits["tmp"]`` overrides it."""

LIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "memory": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
    "nproc": resource.RLIMIT_NPROC,
    "nofile": resource.RLIMIT_NOFILE,
}
NOT_RLIMITS = ("tmp", "wall")
"""Keys of ``limits`` that are not rlimits: ``tmp`` sizes the private tmpfs,
``wall`` is enforced by the parent."""

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

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 1

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41,
                  "ppc64le": 203, "s390x": 217}

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SECCOMP_DENIED = {
    # name: (x86_64, aarch64) numbers; all answer EPERM. Kernel attack
    # surface a fit has no use for, most of it reachable without privilege.
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "ptrace": (101, 117),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "move_mount": (429, 429),
    "open_tree": (428, 428), "mount_setattr": (442, 442),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "acct": (163, 89),
    "settimeofday": (164, 170), "clock_settime": (227, 112),
    "clock_adjtime": (305, 266), "open_by_handle_at": (304, 265),
    "syslog": (103, 116), "quotactl": (179, 60), "lookup_dcookie": (212, 18),
    "vhangup": (153, 58),
}
SECCOMP_CLONE = (56, 220)
SECCOMP_CLONE3 = (435, 435)
CLONE_NEW_ANY = (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                 | CLONE_NEWPID | CLONE_NEWNET | 0x02000000 | 0x00000080)
"""Every CLONE_NEW* flag (with CLONE_NEWCGROUP and CLONE_NEWTIME)."""
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_STATVFS_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                  (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                  (os.ST_NODIRATIME, MS_NODIRATIME),
                  (os.ST_RELATIME, MS_RELATIME))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_log = Logger(namespace="reflworkerd.sandbox")


def _check(result, what):
    """Turn a libc ``-1`` into an ``OSError`` that names the call."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, "%s: %s" % (what, os.strerror(code)))
    return result


def _encode(path):
    return None if path is None else os.fsencode(path)


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(_encode(source), _encode(target), _encode(fstype),
                       flags, _encode(data)),
           "mount %s on %s" % (source or fstype, target))


def _prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5),
                  "prctl(%d)" % (option,))


def _unshare(flags):
    _check(_libc.unshare(flags), "unshare(%#x)" % (flags,))


def _pivotRoot(newRoot, putOld):
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise SandboxUnavailable("pivot_root: unknown syscall number on %s"
                                 % (platform.machine(),))
    _check(_libc.syscall(ctypes.c_long(number), _encode(newRoot),
                         _encode(putOld)), "pivot_root")


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


class _RootBuilder:
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
        _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
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


def _enterNamespaces(isRoot):
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
        _closeFds({0, 1, 2, lifeline})
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


def _exitOnSignal(signum, frame):
    """pid 1 of a namespace ignores signals it has no handler for; this
    handler gives TERM, INT and HUP their usual meaning (the reaper turns the
    exit status back into the signal). A fit may install its own."""
    os._exit(128 + signum)


def _loopbackUp():
    """The network namespace starts with only ``lo``, down. Bring it up: it
    reaches only this job, and in-job helpers may talk over it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        current = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", current | IFF_UP))


def _applyLimits(limits):
    for name, value in sorted(limits.items()):
        if name in NOT_RLIMITS or value is None:
            continue
        resource.setrlimit(LIMITS[name], (int(value), int(value)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
LOCALE = "C.UTF-8"


def fitEnvironment(home, tmp, inherited):
    """The whole environment of a fit: a path, its home in its job directory,
    matplotlib's settings there too, a locale, and the thread counts the fork
    server has; nothing else of the worker's (``inherited``)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": tmp,
           "MPLCONFIGDIR": os.path.join(home, ".config", "matplotlib"), "MPLBACKEND": "Agg",
           "LANG": LOCALE, "LC_ALL": LOCALE}
    for name in THREAD_VARIABLES:
        env[name] = inherited.get(name) or "1"
    return env


def _minimalEnvironment(home, tmp):
    env = fitEnvironment(home, tmp, os.environ)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None


def _size(value):
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return "%d%s" % (value >> shift, unit)
    return str(value)


def describeLimits(limits):
    """The limits as the confinement string shows them, e.g.
    ``rlimits(cpu=86400s,memory=4G,fsize=512M,nproc=512,nofile=4096)+wall(86400s)``."""
    shown = []
    for name in ("cpu", "memory", "fsize", "nproc", "nofile"):
        value = (limits or {}).get(name)
        if value is None:
            continue
        value = int(value)
        shown.append("%s=%s" % (name, "%ds" % value if name == "cpu" else
                                _size(value) if name in ("memory", "fsize") else str(value)))
    layers = ["rlimits(%s)" % (",".join(shown),)] if shown else []
    if (limits or {}).get("wall"):
        layers.append("wall(%gs)" % (float(limits["wall"]),))
    return layers


def describe(mode, limits, uid, isRoot, seccomp=None):
    """What ``confine(jobDir, mode, limits, uid)`` applies, in words, e.g.
    ``namespaces(mount,pid,net,ipc,uts)+seccomp+rlimits(...)+wall(...)+nice19+uid 60001``.

    The worker reports this for each job, computed from what it asked for,
    never from what a fit says. ``seccomp`` defaults to whether this machine
    has a filter. ``limits["wall"]`` is shown though the worker keeps it.
    """
    if seccomp is None:
        seccomp = seccompProgram(platform.machine()) is not None
    layers = []
    if mode == "apparmor":
        layers.append("apparmor(%s)" % (FIT_PROFILE,))
    if mode in ("apparmor", "namespaces"):
        names = (["user"] if not isRoot else []) + ["mount", "pid", "net", "ipc", "uts"]
        layers.append("namespaces(%s)" % (",".join(names),))
    if seccomp:
        layers.append("seccomp")
    layers.extend(describeLimits(limits))
    layers.append("nice19")
    if uid is not None:
        layers.append("uid %d" % (uid,))
    elif isRoot:
        layers.append("uid 0 without capabilities")
    return "+".join(layers)


def _dropBoundingSet():
    """Empty the bounding set, while CAP_SETPCAP is still there (before the
    uid changes): nothing exec'd later can gain a capability back."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EPERM:
                return
            if e.errno != errno.EINVAL:
                raise


def _dropCapabilities():
    """Empty the ambient, effective, permitted and inheritable sets."""
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccompProgram(machine):
    """
    The classic-BPF seccomp program for ``machine`` as ``(code, jt, jf, k)``
    tuples, or ``None`` where this module has no syscall table for it.

    Any other architecture's calls (32-bit, and x32 on x86_64) get EPERM;
    ``SECCOMP_DENIED`` get EPERM; ``clone`` with any CLONE_NEW* flag gets
    EPERM (no nested namespaces); ``clone3``, whose flags a filter cannot
    read, gets ENOSYS so that the C library falls back to ``clone``.
    """
    if machine not in SECCOMP_ARCH:
        return None
    column = 0 if machine == "x86_64" else 1
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow = 0x7FFF0000
    eperm = 0x00050000 | errno.EPERM
    enosys = 0x00050000 | errno.ENOSYS
    program = [(load, 0, 0, 4), (jeq, 1, 0, SECCOMP_ARCH[machine]), (ret, 0, 0, eperm),
               (load, 0, 0, 0)]
    if machine == "x86_64":
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    program += [(jeq, 0, 4, SECCOMP_CLONE[column]), (load, 0, 0, 16),
                (jset, 0, 1, CLONE_NEW_ANY), (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    program += [(jeq, 0, 1, SECCOMP_CLONE3[column]), (ret, 0, 0, enosys)]
    for numbers in SECCOMP_DENIED.values():
        program += [(jeq, 0, 1, numbers[column]), (ret, 0, 0, eperm)]
    program.append((ret, 0, 0, allow))
    return program


def _applySeccomp():
    """Install the filter; False where there is none for this machine."""
    program = seccompProgram(platform.machine())
    if program is None:
        return False
    filters = (_SockFilter * len(program))(*[_SockFilter(*op) for op in program])
    fprog = _SockFprog(len(program), filters)
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                       ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p).value, 0, 0),
           "prctl(PR_SET_SECCOMP)")
    return True


def _changeProfile(profile):
    """Move this process into AppArmor ``profile`` now (the fit is forked,
    not exec'd, so an on-exec transition would never happen)."""
    for path in ("/proc/self/attr/apparmor/current", "/proc/self/attr/current"):
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("changeprofile %s" % (profile,))
            return
    raise SandboxUnavailable("no AppArmor attribute file in /proc/self/attr")


def _chownTree(top, uid, gid):
    """
    Give the job directory to the slot's uid, before the model runs.
    Symlinks are not followed, and files with more than one link are left
    alone: a fit of an earlier attempt may have left a hard link to a file
    elsewhere, which a chown here would give away.
    """
    paths = [top]
    for directory, subdirs, files in os.walk(top):
        paths.extend(os.path.join(directory, name) for name in subdirs + files)
    for path in paths:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or (not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1):
            continue
        os.chown(path, uid, gid, follow_symlinks=False)


def _closeFds(keep):
    """Close every descriptor of this process but ``keep``.

    Not through ``/proc/self/fd``: the reaper calls this while the fit may
    already have pivoted the shared mount namespace into its new root, whose
    ``/proc`` is the fit's pid namespace's, where the reaper has no ``self``.
    """
    # Past every descriptor this process can hold, whatever its limit now (one
    # opened before the limit was lowered stays open): the kernel's default
    # fs.nr_open. os.closerange is one close_range(2) call, however wide.
    end = 1 << 20
    for limit in resource.getrlimit(resource.RLIMIT_NOFILE):
        if limit != resource.RLIM_INFINITY and limit > end:
            end = limit
    start = 0
    for fd in sorted(set(keep)) + [end]:
        if fd > start:
            os.closerange(start, min(fd, end))
        start = max(start, fd + 1)


def confine(jobDir, mode, limits, uid=None, gid=None, readOnly=(), keepFds=None):
    """
    Confine this freshly forked process to run one fit in ``jobDir``.

    Returns only in the process that will run the fit (in the namespace
    modes a child of the caller, which stays behind as the reaper and ends
    with the fit's status), with the working directory set to the real path
    of ``jobDir``, and returns a description such as
    ``"namespaces(mount,pid,net,ipc,uts)+seccomp+rlimits+nice19+uid 60001"``.

    @param mode: ``"apparmor"``, ``"namespaces"`` or ``"none"``: what
        ``choose`` returned.
    @param limits: ``{"cpu": s, "memory": bytes, "fsize": bytes, "nproc": n,
        "nofile": n}``, any subset; ``"tmp"`` sizes the private /tmp and
        /dev/shm; ``"wall"`` is ignored here (the parent enforces it).
    @param uid: the slot's unprivileged uid (and ``gid``, default ``uid``).
        Used when the worker is root: the job directory is chowned to it and
        the fit runs as it. RLIMIT_NPROC counts per uid, so give every slot its
        own. A non-root worker cannot change uid (``SandboxUnavailable``
        unless ``uid`` is its own).
    @param readOnly: more host paths the fit may read (bound read-only).
    @param keepFds: when given, every other descriptor but 0, 1 and 2 is
        closed in the fit process.
    @raise SandboxUnavailable: the mode cannot be had here, or the job
        directory lies where the fit would see its siblings.
    """
    if mode not in ("apparmor", "namespaces", "none"):
        raise SandboxUnavailable("confine needs the mode choose() returned, not %r" % (mode,))
    limits = dict(limits or {})
    unknown = set(limits) - set(LIMITS) - set(NOT_RLIMITS)
    if unknown:
        raise ValueError("unknown limits: %s" % (", ".join(sorted(unknown)),))
    isRoot = os.geteuid() == 0
    if uid is not None and not isRoot:
        if uid != os.getuid():
            raise SandboxUnavailable("a per-slot uid needs a worker running as root")
        uid = None
    if uid is not None:
        gid = uid if gid is None else gid
    jobDir = os.path.realpath(jobDir)
    if not os.path.isdir(jobDir):
        raise SandboxUnavailable("job directory %s does not exist" % (jobDir,))
    # A daemonized worker inherits twistd's umask 077; the new root's
    # directories must stay traversable by the slot's uid.
    os.umask(0o022)
    lifeline = None
    if mode in ("apparmor", "namespaces"):
        plan = RootPlan(jobDir, readOnly)
        if uid is not None:
            _chownTree(jobDir, uid, gid)
        _, lifeline = _enterNamespaces(isRoot)
        # Here: pid 1 of the new pid namespace.
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, _exitOnSignal)
        _RootBuilder(plan, os.getuid() if uid is None else uid,
                     os.getgid() if gid is None else gid,
                     int(limits.get("tmp") or TMP_SIZE)).build()
        socket.sethostname(HOSTNAME)
        _loopbackUp()
    elif uid is not None:
        _chownTree(jobDir, uid, gid)
    os.chdir(jobDir)
    _minimalEnvironment(jobDir, "/tmp" if mode != "none" else jobDir)
    _applyLimits(limits)
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    _dropBoundingSet()
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _dropCapabilities()
    if mode == "apparmor":
        _changeProfile(FIT_PROFILE)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)
    seccomp = _applySeccomp()
    if keepFds is not None:
        _closeFds(set(keepFds) | {0, 1, 2} | ({lifeline} if lifeline is not None else set()))
    if lifeline is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        ready, _, _ = select.select([lifeline], [], [], 0)
        if ready:
            os._exit(128 + signal.SIGKILL)
        os.close(lifeline)
    return describe(mode, limits, uid, isRoot, seccomp=seccomp)


def _appArmorMissing():
    """Why this host cannot apply the fit profile, or ``None`` if it can."""
    if not os.path.isdir("/sys/module/apparmor"):
        return "kernel has no AppArmor"
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            if f.read().strip() != "Y":
                return "AppArmor is disabled in the kernel"
    except OSError as e:
        return "cannot read AppArmor state: %s" % (e,)
    try:
        with open("/sys/kernel/security/apparmor/profiles") as f:
            loaded = [line.split(" (")[0] for line in f]
    except OSError as e:
        return "cannot list AppArmor profiles: %s" % (e,)
    if FIT_PROFILE not in loaded:
        return ("profile %s is not loaded (apparmor_parser -r apparmor.d/%s)"
                % (FIT_PROFILE, FIT_PROFILE))
    return None


def _namespacesMissing():
    """
    Why this host cannot confine a fit in namespaces, or ``None`` if it can:
    a trial ``confine`` in a throw-away child, so that every step (unshare,
    /proc, pivot_root) is tried at worker start and not first on a user's job.
    """
    jobDir = tempfile.mkdtemp(prefix="reflworkerd-probe-")
    readEnd, writeEnd = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readEnd)
                confine(jobDir, "namespaces", {})
                os._exit(0)
            except BaseException as e:
                try:
                    os.write(writeEnd, ("%s: %s" % (type(e).__name__, e)).encode()[:4000])
                finally:
                    os._exit(1)
        os.close(writeEnd)
        writeEnd = None
        message = b""
        while True:
            chunk = os.read(readEnd, 4096)
            if not chunk:
                break
            message += chunk
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            return None
        return message.decode(errors="replace") or "probe ended with status %d" % (status,)
    finally:
        os.close(readEnd)
        if writeEnd is not None:
            os.close(writeEnd)
        os.rmdir(jobDir)


def choose(mode):
    """
    The effective sandbox mode for the worker's ``--sandbox`` option.

    ``auto`` is the strongest of ``apparmor``, ``namespaces`` and ``none``
    that this host can give, and is logged with the reason the stronger ones
    were passed over. An explicit mode the host cannot give raises
    ``SandboxUnavailable``: a worker asked for confinement must not run fits
    without it.
    """
    if mode not in MODES:
        raise SandboxUnavailable("unknown sandbox mode %r (one of %s)"
                                 % (mode, ", ".join(MODES)))
    if mode == "none":
        _log.warn("sandbox: none (fits run with resource limits only)")
        return "none"
    nsMissing = _namespacesMissing()
    if mode in ("apparmor", "auto"):
        aaMissing = _appArmorMissing() or (
            nsMissing and "namespaces unavailable: %s" % (nsMissing,))
        if aaMissing is None:
            _log.info("sandbox: apparmor ({profile} over namespaces)", profile=FIT_PROFILE)
            return "apparmor"
        if mode == "apparmor":
            raise SandboxUnavailable("--sandbox=apparmor: %s" % (aaMissing,))
    if nsMissing is None:
        if mode == "auto":
            _log.info("sandbox: namespaces (no apparmor: {reason})", reason=aaMissing)
        else:
            _log.info("sandbox: namespaces")
        return "namespaces"
    if mode == "namespaces":
        raise SandboxUnavailable("--sandbox=namespaces: %s" % (nsMissing,))
    _log.warn("sandbox: none (no apparmor: {aaReason}; no namespaces: {nsReason})",
              aaReason=aaMissing, nsReason=nsMissing)
    return "none"
