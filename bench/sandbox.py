"""What confinement adds to the start of a fit.

The fork server forks each fit and the child calls ``sandbox.confine``
before it reads the model. This measures fork + confine + exit, seen from
the forking process (until ``waitpid`` returns), for ``none`` and for
``namespaces`` (with a per-slot uid when run as root), median of 50 each,
interleaved so that both see the same machine. The namespaces figure
includes the reaper and the kernel tearing down the namespaces at exit.

``python -m bench.sandbox`` (root for the namespaces figure; as another user
it measures the user-namespace variant where the kernel allows one).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench import Result, formatTable
from reflworkerd import sandbox

RUNS = 50
SLOT_UID = 61999
GOAL_MS = 50.0
"""Namespaces may add this much to a fit's start: a small fit from the
preloaded fork server starts in milliseconds, not the seconds of a cold
``refl1d``, and confinement must not undo that."""


def forkConfineExit(jobDir, mode, uid):
    """Seconds from fork to the reaped exit of a child that only confines."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sandbox.confine(jobDir, mode, {"nproc": 64, "nofile": 256}, uid=uid)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("confine(%r) failed in the child (status %#x)" % (mode, status))
    return elapsed


def run(say=print, runs=RUNS):
    base = tempfile.mkdtemp(prefix="bench-sandbox-")
    try:
        os.chmod(base, 0o755)
        jobDir = os.path.join(base, "jobs", "1")
        os.makedirs(jobDir)
        uid = SLOT_UID if os.geteuid() == 0 else None
        modes = ["none"]
        try:
            sandbox.choose("namespaces")
            modes.append("namespaces")
        except sandbox.SandboxUnavailable as e:
            say("namespaces unavailable here: %s" % (e,))
        times = {mode: [] for mode in modes}
        for _ in range(runs):
            for mode in modes:
                times[mode].append(forkConfineExit(jobDir, mode, uid))
        median = {mode: statistics.median(values) * 1000 for mode, values in times.items()}
        who = "uid %d" % uid if uid is not None else "unprivileged"
        results = [Result("fork + confine(none) + exit, %s" % who,
                          "%.1f ms" % median["none"], "", "", None)]
        if "namespaces" in median:
            added = median["namespaces"] - median["none"]
            results.append(Result(
                "fork + confine(namespaces) + exit, %s" % who,
                "%.1f ms (+%.1f ms)" % (median["namespaces"], added),
                "%.1f ms (none)" % median["none"],
                "adds < %.0f ms" % GOAL_MS, added < GOAL_MS))
        for row in results:
            say("%s: %s (median of %d)" % (row.name, row.figure, runs))
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per mode (default %(default)s)")
    args = parser.parse_args(argv)
    return run(runs=args.runs)


if __name__ == "__main__":
    rows = main(sys.argv[1:])
    print()
    print(formatTable(rows))
