"""Hostile model: spin on the CPU past the job's limit, ignoring SIGXCPU.

Spins for ``hostile.json``'s ``"seconds"`` of CPU time (default 600). A
report with ``"finished": false`` is written first; only if the spin ends by
itself is it rewritten with ``"finished": true`` (the limit did not hold).
Prints the final report after ``HOSTILE-REPORT``.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import load, save  # noqa: E402


config = load()
seconds = float(config.get("seconds") or 600)
report = {"script": "cpu_spin", "seconds": seconds, "finished": False}
save(report)
signal.signal(signal.SIGXCPU, signal.SIG_IGN)
start = time.process_time()
while time.process_time() - start < seconds:
    pass
report["cpu"] = time.process_time() - start
report["finished"] = True
report["succeeded"] = True
save(report)
