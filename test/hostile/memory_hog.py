"""Hostile model: allocate more memory than the job may have.

Tries ``hostile.json``'s ``"bytes"`` (default 16 GiB) at once as a Python
buffer, then as an anonymous mmap, then grows a list of 64 MiB blocks up to
the same total. Writes ``hostile-report.json`` (per attempt ``succeeded`` and
``detail``; ``largest``: the most it held at once) and prints it after
``HOSTILE-REPORT``.
"""

import mmap
import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import attempt, load, save  # noqa: E402

BLOCK = 64 * 1024 * 1024


config = load()
target = int(config.get("bytes") or 16 * 1024 ** 3)
report = {"script": "memory_hog", "attempts": {}, "target": target, "largest": 0, "finished": False}


def buffer():
    data = bytearray(target)
    report["largest"] = max(report["largest"], len(data))
    return "allocated %d bytes" % len(data)


def anonymous():
    area = mmap.mmap(-1, target)
    area.close()
    return "mapped %d bytes" % target


def blocks():
    held = []
    try:
        while len(held) * BLOCK < target:
            held.append(bytearray(BLOCK))
    finally:
        report["largest"] = max(report["largest"], len(held) * BLOCK)
    return "held %d bytes" % (len(held) * BLOCK)


attempt(report, "buffer", buffer)
attempt(report, "mmap", anonymous)
attempt(report, "blocks", blocks)
report["finished"] = True
save(report)
