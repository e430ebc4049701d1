"""The wire between the local backend (``local.LocalBackend``, in the worker's
reactor) and the fork host process (``forkhost``), shared by both sides.

JSON lines on two extra pipes of the fork host: fd 3 carries commands from the
worker, fd 4 carries events back (stdout and stderr stay free for whatever
libraries print; the worker logs them).

Commands::

    {"op": "run", "run": N, "jobId": ..., "jobDir": ABS, "request": {...},
     "sandbox": MODE, "limits": {...}, "checkpointEvery": S, "uid": U|null, "gid": G|null}
    {"op": "signal", "run": N, "signal": SIGNUM}

Events::

    {"event": "ready", "pid": P, "preload": SECONDS, "threads": N}
    {"event": "started", "run": N, "pid": P}          # P is also the fit's process group
    {"event": "message", "run": N, "message": {...}}  # from the child, see below
    {"event": "exited", "run": N, "code": C|null, "signal": S|null, "cpu": SECONDS, "leftover": BOOL}

Each child writes JSON lines on a pipe of its own, relayed as ``message``
events (at most one of each type per ``RELAY_INTERVAL``, the latest):
``{"type": "confined", "confinement": DESC, "pid": P}`` once confined (or
``{"type": "unconfined", "error": …}`` where confining failed), then
``{"type": "progress", "progress": {"step", "chisq", "parameters", "elapsed"}}``
and ``{"type": "checkpoint", "path": "results/session.h5"}`` after each
checkpoint of the session file.

Every line either side parses is bounded in size and depth and never raises:
one fit's output cannot end the fork host or another fit.
"""

import json
import os

from reflworkerd import jobfiles
from reflworkerd.shared import RESULTS_DIR, SESSION_NAME

COMMANDS_FD = 3
EVENTS_FD = 4
MAX_LINE = 16 * 1024 * 1024
MAX_CHILD_LINE = 1024 * 1024
LEFTOVER_TIMEOUT = 10.0
"""Seconds either side waits for a fit's process group to be gone after KILL."""
RELAY_INTERVAL = 0.1
"""At most one message of each type per child per this many seconds goes to the
worker (the latest wins): a fit that floods its pipe cannot flood the worker."""
RELAYED_TYPES = ("confined", "unconfined", "progress", "checkpoint")
CHECKPOINT_PATH = RESULTS_DIR + "/" + SESSION_NAME
"""The one path a ``checkpoint`` message may name, relative to the job directory."""


class LineBuffer:
    """Split a byte stream into lines; drop a line longer than ``limit``."""

    def __init__(self, limit=MAX_LINE):
        self.limit = limit
        self.pending = b""
        self.discarding = False

    def feed(self, data):
        self.pending += data
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        if self.discarding and lines:
            lines.pop(0)
            self.discarding = False
        if len(self.pending) > self.limit:
            self.pending = b""
            self.discarding = True
        return lines


def parseLine(line):
    """A JSON object from a line, or None: bounded in size and depth (a fit writes
    some of these lines), and never raising."""
    try:
        value = jobfiles.loadJSON(line, MAX_LINE)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def encode(message, **dumps):
    """One line of the wire."""
    return json.dumps(message, **dumps).encode("utf-8") + b"\n"


def writeAll(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def killGroup(pgid, signum):
    """Signal a fit's process group; False where it is gone (or not ours to signal)."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def groupExists(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
