"""Hostile model: write a file larger than the job may write.

Writes 1 MiB blocks to a file in the job directory and then in /tmp until a
write fails or ``hostile.json``'s ``"bytes"`` (default 1 GiB) are written.
Writes ``hostile-report.json`` (per place ``written`` bytes, ``error``, and
``succeeded`` when the whole amount went through) and prints it after
``HOSTILE-REPORT``.
"""

import json
import os

BLOCK = b"x" * (1024 * 1024)


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


def fill(path, target):
    result = {"written": 0, "error": None, "succeeded": False}
    try:
        with open(path, "wb", buffering=0) as f:
            while result["written"] < target:
                result["written"] += f.write(BLOCK)
        result["succeeded"] = True
    except OSError as e:
        result["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return result


config = load()
target = int(config.get("bytes") or 1024 ** 3)
report = {"script": "file_size", "target": target, "attempts": {}, "finished": False}
report["attempts"]["jobDir"] = fill("hostile-big.bin", target)
report["attempts"]["tmp"] = fill("/tmp/hostile-big.bin", target)
report["finished"] = True
save(report)
