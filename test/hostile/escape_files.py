"""Hostile model: try to read and write outside the job directory.

Run as a job's model script (or with ``runpy``) in the job directory. Reads
``hostile.json`` from the working directory when there is one:

    {"siblingSecret": "/…/jobs/other/secret.txt",   another job's file
     "workDir": "/…/jobs",                          the directory of all jobs
     "workerFiles": ["/…/worker/state.json"],       the worker's own files
     "tokenFile": "/…/worker/token",                the worker's token
     "hostMarker": "/tmp/marker-…",                 a file in the host's /tmp
     "nonce": "…"}                                  names the files it writes

Writes ``hostile-report.json`` in the working directory and prints it on one
line after ``HOSTILE-REPORT``. Each attempt is reported as
``{"succeeded": bool, "detail": str}``, as seen from inside. A read that
succeeds is an escape. A write to /tmp or /dev/shm may well succeed in the
job's private tmpfs: whoever runs this checks the host for the ``written``
paths afterwards.
"""

import os
import sys
import uuid

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import attempt, load, save  # noqa: E402

HOME_DIRS = ["/root", "/home"]


def read(path):
    with open(path, "rb") as f:
        return f.read(200)


def write(report, path):
    with open(path, "w") as f:
        f.write("hostile was here\n")
    report["written"].append(path)
    return path


config = load()
nonce = config.get("nonce") or uuid.uuid4().hex
report = {"script": "escape_files", "attempts": {}, "written": [], "finished": False}
jobDir = os.getcwd()
workDir = config.get("workDir") or os.path.dirname(jobDir)
name = "hostile-" + nonce

if config.get("siblingSecret"):
    attempt(report, "readSiblingJob", lambda: read(config["siblingSecret"]))


def listWorkDir():
    others = [n for n in os.listdir(workDir) if n != os.path.basename(jobDir)]
    if not others:
        raise PermissionError("only this job's directory is visible")
    return others


attempt(report, "listWorkDir", listWorkDir)
attempt(report, "writeWorkDir", lambda: write(report, os.path.join(workDir, name)))
for home in HOME_DIRS + [os.path.expanduser("~")]:
    attempt(report, "writeHome:" + home, lambda: write(report, os.path.join(home, name)))


def listHomes():
    found = []
    for home in HOME_DIRS:
        found += [os.path.join(home, n) for n in os.listdir(home)]
    found = [p for p in found if not p.startswith("/root/.pyenv")]
    if not found:
        raise PermissionError("no home directory is visible")
    return found


attempt(report, "listHomes", listHomes)
attempt(report, "writeTmp", lambda: write(report, os.path.join("/tmp", name)))
attempt(report, "writeDevShm", lambda: write(report, os.path.join("/dev/shm", name)))
if config.get("hostMarker"):
    attempt(report, "seeHostTmp", lambda: read(config["hostMarker"]))
for i, path in enumerate(config.get("workerFiles") or []):
    attempt(report, "readWorkerFile:%d" % i, lambda: read(path))
    attempt(report, "writeWorkerFile:%d" % i, lambda: write(report, path))
    attempt(report, "writeBesideWorkerFile:%d" % i,
            lambda: write(report, os.path.join(os.path.dirname(path), name)))
if config.get("tokenFile"):
    attempt(report, "readToken", lambda: read(config["tokenFile"]))
attempt(report, "readShadow", lambda: read("/etc/shadow"))
attempt(report, "writeEtc", lambda: write(report, os.path.join("/etc", name)))
attempt(report, "writeUsr", lambda: write(report, os.path.join("/usr", name)))
attempt(report, "writeRoot", lambda: write(report, os.path.join("/", name)))
report["ownJobWritable"] = bool(write(report, os.path.join(jobDir, name)))
report["rootListing"] = sorted(os.listdir("/"))
report["finished"] = True
save(report)
