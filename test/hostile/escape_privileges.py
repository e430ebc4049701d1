"""Hostile model: try to gain privileges or undo the confinement.

Mounts, unmounts, chroot, setuid(0), mknod, the kernel's knobs in /proc/sys
and /proc/sysrq-trigger, the hostname, a nested user namespace, the session
keyring, a raw socket. Also reports the
process's capability sets and NoNewPrivs flag as the kernel shows them.
Writes ``hostile-report.json`` and prints it after ``HOSTILE-REPORT``;
``"succeeded": true`` means the operation was allowed.
"""

import ctypes
import os
import socket
import stat
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import attempt, save  # noqa: E402


libc = ctypes.CDLL(None, use_errno=True)


def checked(result):
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return "allowed"


def mount():
    os.makedirs("hostile-mnt", exist_ok=True)
    return checked(libc.mount(b"tmpfs", b"hostile-mnt", b"tmpfs", 0, None))


def remountRoot():
    return checked(libc.mount(None, b"/", None, 32, None))  # MS_REMOUNT, read-write


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return "wrote %s" % path


def keyring():
    """keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING): the session
    keyring is inherited from whoever started the worker."""
    result = libc.syscall(250 if os.uname().machine == "x86_64" else 219, 0, -3, 0)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return "session keyring %d" % result


def readNonEmpty(path):
    with open(path, "rb") as f:
        data = f.read(16)
    if not data:
        raise EOFError("%s reads empty" % path)
    return data.hex()


def status():
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f)
                if k.startswith("Cap") or k in ("NoNewPrivs", "Uid", "Gid", "Groups")}


report = {"script": "escape_privileges", "attempts": {}, "finished": False}
attempt(report, "mount", mount)
attempt(report, "remountRootWritable", remountRoot)
attempt(report, "umountProc", lambda: checked(libc.umount2(b"/proc/sys", 2)))
attempt(report, "chroot", lambda: os.chroot("/tmp") or "allowed")
attempt(report, "setuid0", lambda: os.setuid(0) or "allowed")
attempt(report, "mknod", lambda: os.mknod("hostile-dev", 0o600 | stat.S_IFBLK, os.makedev(8, 0)) or "allowed")
attempt(report, "writeProcSys", lambda: write("/proc/sys/kernel/domainname", "hostile"))
attempt(report, "writeSysrq", lambda: write("/proc/sysrq-trigger", "h"))
attempt(report, "readKcore", lambda: readNonEmpty("/proc/kcore"))
attempt(report, "sethostname", lambda: socket.sethostname("hostile") or "allowed")
attempt(report, "nestedUserNamespace", lambda: checked(libc.unshare(0x10000000)))
attempt(report, "sessionKeyring", lambda: keyring())
attempt(report, "rawSocket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close() or "allowed")
report["status"] = status()
report["finished"] = True
save(report)
