"""Resource limits, uids and capabilities: what confines a fit in every mode."""

import ctypes
import ctypes.util
import errno
import os
import resource
import stat

from reflworkerd.sandbox.syscalls import PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, PR_CAPBSET_DROP, check, libc, prctl


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

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

def applyLimits(limits):
    for name, value in sorted(limits.items()):
        if name in NOT_RLIMITS or value is None:
            continue
        resource.setrlimit(LIMITS[name], (int(value), int(value)))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

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

def dropBoundingSet():
    """Empty the bounding set, while CAP_SETPCAP is still there (before the
    uid changes): nothing exec'd later can gain a capability back."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EPERM:
                return
            if e.errno != errno.EINVAL:
                raise


def dropCapabilities():
    """Empty the ambient, effective, permitted and inheritable sets."""
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "capset")

def chownTree(top, uid, gid):
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
