"""Hostile model: leave a FIFO where the worker reads a file, so that a blocking
``open`` would freeze it.

``hostile.json``: ``{"where": ".outcome.json"}`` (then exit at once, leaving
no outcome but the FIFO) or ``{"where": "results/session.h5", "announce":
true}`` (then say a checkpoint was saved there and wait to be killed).
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import announce, load, waitToBeKilled  # noqa: E402

config = load()
where = config.get("where") or ".outcome.json"
os.makedirs(os.path.dirname(where) or ".", exist_ok=True)
if os.path.lexists(where):
    os.unlink(where)
os.mkfifo(where)
if config.get("announce"):
    announce({"type": "checkpoint", "path": where})
    waitToBeKilled()
os._exit(0)
