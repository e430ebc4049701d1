"""Hostile model: write a file larger than the job may write.

Writes 1 MiB blocks to a file in the job directory and then in /tmp until a
write fails or ``hostile.json``'s ``"bytes"`` (default 1 GiB) are written.
Writes ``hostile-report.json`` (per place ``written`` bytes, ``error``, and
``succeeded`` when the whole amount went through) and prints it after
``HOSTILE-REPORT``.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import load, save  # noqa: E402

BLOCK = b"x" * (1024 * 1024)


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
