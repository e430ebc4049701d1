"""Hostile model: fork until the kernel says no.

Each child blocks for ever (a read on a pipe nobody writes). Stops at the
first refused fork or at ``hostile.json``'s ``"ceiling"`` (default 200), so
that on an unconfined host it does not take the machine down; the children
are left behind on purpose: the sandbox must end them with the job. Writes
``hostile-report.json`` (``forks``: how many succeeded, ``refused``: the
error that stopped it, ``succeeded``: whether it reached the ceiling) and
prints it after ``HOSTILE-REPORT``.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import load, save  # noqa: E402


config = load()
ceiling = int(config.get("ceiling") or 200)
report = {"script": "fork_bomb", "forks": 0, "refused": None, "finished": False}
block, _ = os.pipe()
while report["forks"] < ceiling:
    try:
        pid = os.fork()
    except OSError as e:
        report["refused"] = "%s: %s" % (type(e).__name__, e)
        break
    if pid == 0:
        try:
            os.read(block, 1)
        finally:
            os._exit(0)
    report["forks"] += 1
report["succeeded"] = report["forks"] >= ceiling
report["finished"] = True
save(report)
