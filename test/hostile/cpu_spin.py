"""Hostile model: spin on the CPU past the job's limit, ignoring SIGXCPU.

Spins for ``hostile.json``'s ``"seconds"`` of CPU time (default 600). A
report with ``"finished": false`` is written first; only if the spin ends by
itself is it rewritten with ``"finished": true`` (the limit did not hold).
Prints the final report after ``HOSTILE-REPORT``.
"""

import json
import os
import signal
import time


def load():
    try:
        with open("hostile.json") as f:
            return json.load(f)
    except OSError:
        return {}


def save(report):
    text = json.dumps(report, sort_keys=True)
    with open("hostile-report.json.tmp", "w") as f:
        f.write(text)
    os.replace("hostile-report.json.tmp", "hostile-report.json")
    print("HOSTILE-REPORT " + text, flush=True)


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
