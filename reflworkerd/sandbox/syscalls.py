"""The libc calls and kernel constants every layer of the sandbox uses."""

import ctypes
import ctypes.util
import os
import resource



class SandboxUnavailable(Exception):
    """The host cannot provide the confinement that was asked for."""

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
libc.unshare.argtypes = (ctypes.c_int,)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong)

def check(result, what):
    """Turn a libc ``-1`` into an ``OSError`` that names the call."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, "%s: %s" % (what, os.strerror(code)))
    return result


def encode(path):
    return None if path is None else os.fsencode(path)

def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    return check(libc.prctl(option, arg2, arg3, arg4, arg5),
                  "prctl(%d)" % (option,))

def closeFds(keep):
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
