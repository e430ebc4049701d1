"""Hostile model: try to signal, trace or inspect processes outside the job.

Reads ``hostile.json`` from the working directory when there is one:

    {"pids": [pid, …],      host pids to go after (the worker, a test)
     "signal": "SIGUSR1"}   what to send them; default 0 (only a probe)

Sends each pid the signal, tries ``PTRACE_ATTACH`` on it and to read its
/proc entries, and tries to reach its parent. Writes ``hostile-report.json``
and prints it after ``HOSTILE-REPORT``; ``"succeeded": true`` means the
process outside was reached.
"""

import ctypes
import os
import signal
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import attempt, load, save  # noqa: E402

PTRACE_ATTACH = 16
PTRACE_DETACH = 17


libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
libc.ptrace.restype = ctypes.c_long


def ptrace(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return "attached to %d" % (pid,)


def readProc(pid, name):
    with open("/proc/%d/%s" % (pid, name), "rb") as f:
        return f.read(200)


config = load()
signum = config.get("signal") or 0
if isinstance(signum, str):
    signum = getattr(signal, signum)
report = {"script": "escape_signals", "attempts": {}, "finished": False,
          "self": os.getpid(), "parent": os.getppid(), "signal": int(signum)}
for pid in config.get("pids") or []:
    attempt(report, "kill:%d" % pid, lambda: os.kill(pid, signum) or "signalled %d" % pid)
    attempt(report, "ptrace:%d" % pid, lambda: ptrace(pid))
    attempt(report, "environ:%d" % pid, lambda: readProc(pid, "environ"))
    attempt(report, "cmdline:%d" % pid, lambda: readProc(pid, "cmdline"))
    attempt(report, "root:%d" % pid, lambda: os.listdir("/proc/%d/root/" % pid))
if os.getppid() > 0:
    attempt(report, "ptraceParent", lambda: ptrace(os.getppid()))


def others():
    pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    return [p for p in pids if p != os.getpid()]


report["visiblePids"] = others()
report["finished"] = True
save(report)
