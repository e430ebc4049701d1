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

Each layer is a module of this package: ``namespaces`` (the namespaces, the
reaper and the fit's new root), ``seccomp`` (the filter), ``limits``
(resource limits, uids and capabilities) and ``probe`` (what ``auto`` tries at
worker start); ``syscalls`` holds the libc calls they share. ``confine``
below puts them together, in order.

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

import os
import platform
import select
import signal
import socket
import tempfile

from reflworkerd.sandbox.limits import (LIMITS, NOT_RLIMITS, applyLimits, chownTree, describeLimits,
                                       dropBoundingSet, dropCapabilities)
from reflworkerd.sandbox.namespaces import (FORWARDED_SIGNALS, HOSTNAME, TMP_SIZE, RootBuilder, RootPlan,
                                           enterNamespaces, exitOnSignal, loopbackUp)
from reflworkerd.sandbox.seccomp import applySeccomp, seccompProgram
from reflworkerd.sandbox.syscalls import (PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG,
                                         SandboxUnavailable, closeFds, prctl)

__all__ = ["FIT_PROFILE", "MODES", "SandboxUnavailable", "checkApplied", "choose", "confine", "describe", "describeLimits",
           "fitEnvironment"]

FIT_PROFILE = "reflworkerd-fit"


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

def _changeProfile(profile):
    """Move this process into AppArmor ``profile`` now (the fit is forked,
    not exec'd, so an on-exec transition would never happen)."""
    for path in ("/proc/self/attr/apparmor/current", "/proc/self/attr/current"):
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("changeprofile %s" % (profile,))
            return
    raise SandboxUnavailable("no AppArmor attribute file in /proc/self/attr")

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
    checkApplied(mode)
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
            chownTree(jobDir, uid, gid)
        _, lifeline = enterNamespaces(isRoot)
        # Here: pid 1 of the new pid namespace.
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, exitOnSignal)
        RootBuilder(plan, os.getuid() if uid is None else uid,
                     os.getgid() if gid is None else gid,
                     int(limits.get("tmp") or TMP_SIZE)).build()
        socket.sethostname(HOSTNAME)
        loopbackUp()
    elif uid is not None:
        chownTree(jobDir, uid, gid)
    os.chdir(jobDir)
    _minimalEnvironment(jobDir, "/tmp" if mode != "none" else jobDir)
    applyLimits(limits)
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    dropBoundingSet()
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    dropCapabilities()
    if mode == "apparmor":
        _changeProfile(FIT_PROFILE)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
    seccomp = applySeccomp()
    if keepFds is not None:
        closeFds(set(keepFds) | {0, 1, 2} | ({lifeline} if lifeline is not None else set()))
    if lifeline is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        ready, _, _ = select.select([lifeline], [], [], 0)
        if ready:
            os._exit(128 + signal.SIGKILL)
        os.close(lifeline)
    return describe(mode, limits, uid, isRoot, seccomp=seccomp)


from reflworkerd.sandbox.probe import MODES, checkApplied, choose  # noqa: E402 (probe tries confine)
