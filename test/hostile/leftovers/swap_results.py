"""Hostile model: replace the job's ``results`` with a symbolic link to another
job's ``results``, so that a worker following it would store the other job's
files (its ``session.h5``) as this job's.

``hostile.json``: ``{"target": "/…/jobs/OTHER/results", "announce": bool}``.
With ``announce`` the model says a checkpoint was saved and waits to be
killed; without, it exits at once and leaves the link to the final upload.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import announce, load, waitToBeKilled  # noqa: E402

config = load()
if os.path.isdir("results"):
    os.rename("results", "results.mine")
os.symlink(config["target"], "results")
if config.get("announce"):
    announce({"type": "checkpoint", "path": "results/session.h5"})
    waitToBeKilled()
os._exit(0)
