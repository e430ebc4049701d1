"""Hostile model: allocate more memory than the job may have.

Tries ``hostile.json``'s ``"bytes"`` (default 16 GiB) at once as a Python
buffer, then as an anonymous mmap, then grows a list of 64 MiB blocks up to
the same total. Writes ``hostile-report.json`` (per attempt ``succeeded`` and
``detail``; ``largest``: the most it held at once) and prints it after
``HOSTILE-REPORT``.
"""

import json
import mmap
import os

BLOCK = 64 * 1024 * 1024


def load():
    try:
        with open("hostile.json") as f:
            return json.load(f)
    except OSError:
        return {}


def attempt(report, name, action):
    try:
        detail = action()
        report["attempts"][name] = {"succeeded": True, "detail": str(detail)[:500]}
    except Exception as e:
        report["attempts"][name] = {"succeeded": False, "detail": "%s: %s" % (type(e).__name__, e)}


def save(report):
    text = json.dumps(report, sort_keys=True)
    with open("hostile-report.json.tmp", "w") as f:
        f.write(text)
    os.replace("hostile-report.json.tmp", "hostile-report.json")
    print("HOSTILE-REPORT " + text, flush=True)


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
