"""The seccomp layer: a classic-BPF filter refusing kernel interfaces a fit has
no use for, nested namespaces first."""

import ctypes
import ctypes.util
import errno
import platform

from reflworkerd.sandbox.namespaces import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWUTS
from reflworkerd.sandbox.syscalls import check, libc


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


def applySeccomp():
    """Install the filter; False where there is none for this machine."""
    program = seccompProgram(platform.machine())
    if program is None:
        return False
    filters = (_SockFilter * len(program))(*[_SockFilter(*op) for op in program])
    fprog = _SockFprog(len(program), filters)
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                       ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p).value, 0, 0),
           "prctl(PR_SET_SECCOMP)")
    return True
