"""What a hostile fit leaves behind, as real jobs: a real server and a real worker
(``--sandbox namespaces``, two slots, its shipped limits, small result quotas)
fed every model of ``test/hostile/leftovers/`` beside a nickel film DREAM fit.

The worker reads a job's directory from outside the sandbox. Each model leaves
there what would hurt a careless reader: FIFOs where the outcome or an
announced checkpoint should be (a blocking ``open`` freezes the reactor, every
slot, and the neighbour's lease), ``results`` swapped for a link to the
neighbour's (whose ``session.h5`` a link-following worker would store as the
hostile job's), one of every special file in ``results/``, JSON nested
200,000 deep (a RecursionError that ended the fork server), a forged outcome
and progress, and results that cost nothing to make and much to store.

For each the test checks that the job ends with a message that says what was
found, that nothing outside it was read (no other job's file, no host file
among its stored results), that the server holds no more than the quota, and
that the neighbour's DREAM fit went on untouched: it completes with χ² ≈ 1 on
its first attempt (a frozen worker would have lost its 10 s lease), and a
fit after them all completes on the same fork server.

Root is needed (namespaces without a user namespace, per-slot uids).
"""

import json
import os
import re

import pytest

from test.conftest import nifilmFiles
from test.test_hostile_e2e import HOSTILE, ended, report
from test.test_sandbox import processesOf
from test.test_worker_e2e import forkServerPid, hasProgress

LEFTOVERS = os.path.join(HOSTILE, "leftovers")
SLOT_UIDS = (60001, 60002)
FILES_QUOTA = 50
BYTES_QUOTA = 16 << 20
NEIGHBOUR = {"fit": "dream", "samples": 40000, "burn": 100, "seed": 7}
"""A DREAM fit of tens of seconds: it runs while the hostile jobs pass through the other slot."""
DREAM = {"fit": "dream", "samples": 1000}
"""What a hostile model asks for when it announces checkpoints (only DREAM and DE fits send them)."""
LIMITS = "rlimits(cpu=86400s,memory=4G,fsize=512M,nproc=512)+wall(86400s)"
"""The shipped limits, as the confinement string shows them."""
FIT_ENVIRONMENT = {"PATH", "HOME", "TMPDIR", "MPLCONFIGDIR", "MPLBACKEND", "LANG", "LC_ALL",
                   "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the namespaces sandbox and per-slot uids need a worker running as root")


def submitLeftover(api, script, config, options=None):
    return api.submit({"name": "leftover " + script, "notify": "hostile@example.org", "service": "refl1d",
                       "data": {"model": "model.py", "options": options or {"fit": "lm"}}},
                      {"model.py": os.path.join(LEFTOVERS, script + ".py"),
                       "hostile_common.py": os.path.join(HOSTILE, "hostile_common.py"),
                       "hostile.json": json.dumps(config).encode()})


def nifilm(api, name, options):
    return api.submit({"name": name, "notify": "hostile@example.org", "service": "refl1d",
                       "data": {"model": "nifilm.py", "options": options}}, nifilmFiles())


def test_what_a_fit_leaves_behind_cannot_hurt_the_worker_or_its_neighbour(serverProcess, workerProcess,
                                                                          tmp_path):
    """Every leftover ends its own job ERROR (or, forged, with the worker's own
    confinement and typed progress) and nothing else: the neighbour DREAM fit
    completes on its first attempt, the fork server never restarts, and the
    next fit completes."""
    token = tmp_path / "token"
    token.write_text("leftovers-e2e-token\n")
    server = serverProcess(tokenFile=token, leaseTimeout=10)
    worker = workerProcess(server, tokenFile=token, sandbox="namespaces", slots=2,
                           args=["--result-files-quota", str(FILES_QUOTA), "--result-bytes-quota", "16M"])
    api = server.api
    jobsDir = os.path.join(worker.workDir, "jobs")
    forkServer = forkServerPid(worker)

    neighbour = nifilm(api, "ni film DREAM beside", NEIGHBOUR)
    api.waitFor(neighbour["id"], hasProgress, timeout=60, what="progress")
    otherResults = os.path.join(jobsDir, str(neighbour["id"]), "results")
    assert os.path.exists(os.path.join(otherResults, "session.h5"))
    jobs = {
        "fifo outcome": submitLeftover(api, "fifo", {"where": ".outcome.json"}),
        "fifo checkpoint": submitLeftover(api, "fifo", {"where": "results/session.h5", "announce": True}, DREAM),
        "swapped checkpoint": submitLeftover(api, "swap_results", {"target": otherResults, "announce": True}, DREAM),
        "swapped results": submitLeftover(api, "swap_results", {"target": otherResults}),
        "zoo": submitLeftover(api, "results_zoo", {"otherFile": os.path.join(otherResults, "session.h5")}),
        "deep": submitLeftover(api, "deep_outcome", {}),
        "forge": submitLeftover(api, "forge", {}, DREAM),
        "quota": submitLeftover(api, "quota", {"sparse": 7 << 20, "sparseFiles": 3, "smallFiles": 100}),
    }
    records = {name: api.waitFor(job["id"], ended, timeout=120, what="its end") for name, job in jobs.items()}
    after = nifilm(api, "ni film LM after", {"fit": "lm"})
    fits = [api.waitFor(job["id"], ended, timeout=180, what="its end") for job in (neighbour, after)]
    stored = {name: api.files(record["id"], kind="result") for name, record in records.items()}

    def error(name):
        assert records[name]["status"] == "ERROR", records[name]
        return records[name]["error"]

    # FIFOs: never opened for reading; each job says what it found.
    assert error("fifo outcome") == ("the fit left an outcome the worker does not read: "
                                     ".outcome.json is a FIFO, not a regular file")
    assert error("fifo checkpoint").startswith("its checkpoint cannot be used: results/session.h5 is a FIFO")
    assert records["fifo outcome"]["finished"] < fits[0]["finished"], "the neighbour was not running beside it"

    # A results directory swapped for a link to the neighbour's: refused by name, the
    # neighbour's session never stored as the hostile job's.
    assert error("swapped checkpoint").startswith("its checkpoint cannot be used: results is a symbolic link")
    assert error("swapped results").startswith("the fit left what the worker does not read: "
                                               "results is a symbolic link")
    for name in ("swapped checkpoint", "swapped results", "fifo checkpoint"):
        assert "session.h5" not in stored[name], (name, stored[name])

    # Every kind of special file named; only the plain file (and the logs) stored.
    zoo = error("zoo")
    for found in ("results/fifo is a FIFO", "results/socket is a socket", "results/shadow is a symbolic link",
                  "results/other-session.h5 is a symbolic link", "results/model-link.py has 2 hard links",
                  "results/directory is a directory", ".outcome.json is a directory"):
        assert found in zoo, (found, zoo)
    assert set(stored["zoo"]) == {"plain.txt", "stdout.txt", "stderr.txt"}, stored["zoo"]
    assert api.download(records["zoo"]["id"], "plain.txt") == b"an ordinary result\n"

    # JSON 200,000 deep: refused with a bound, on the pipe and in the outcome.
    assert error("deep") == ("the fit left an outcome the worker does not read: "
                             ".outcome.json is not an outcome record: nested deeper than 32 levels")

    # A forged outcome: its own result (it is the model's job), but the worker's confinement;
    # progress with typed fields only; a minimal environment; the shipped limits in force.
    forged = records["forge"]
    assert forged["status"] == "COMPLETE", forged
    applied = "namespaces(mount,pid,net,ipc,uts)+seccomp+%s+nice19+uid " % (LIMITS,)
    assert forged["confinement"] in [applied + str(uid) for uid in SLOT_UIDS], forged["confinement"]
    assert "apparmor" not in forged["confinement"]
    progress = forged["progress"]
    assert set(progress) == {"step", "chisq", "parameters", "elapsed"}, progress
    assert len(progress["parameters"]) == 200 and max(map(len, progress["parameters"])) <= 200
    said = report(api, forged["id"])
    assert set(said["environ"]) == FIT_ENVIRONMENT, said["environ"]
    assert said["environ"]["HOME"] == said["cwd"]
    assert said["limits"]["Max cpu time"] == "86400"
    assert said["limits"]["Max address space"] == str(4 << 30)
    assert said["limits"]["Max file size"] == str(512 << 20)
    assert said["limits"]["Max processes"] == "512"

    # Results past the quota: ERROR naming it; the server stores no more than the quota.
    assert "results over the quota of %d bytes per job" % (BYTES_QUOTA,) in error("quota")
    assert len(stored["quota"]) <= FILES_QUOTA and sum(stored["quota"].values()) <= BYTES_QUOTA
    assert {"stdout.txt", "stderr.txt"} <= set(stored["quota"])

    for name, record in records.items():
        assert record["confinement"].startswith("namespaces(") and LIMITS in record["confinement"], record
        assert len(stored[name]) <= FILES_QUOTA and sum(stored[name].values()) <= BYTES_QUOTA, name

    # The neighbour went on as if nothing happened; the worker and its one fork server serve on.
    for record in fits:
        assert record["status"] == "COMPLETE" and record["attempts"] == 1, record
        assert 0.8 < record["result"]["chisq"] < 1.3, record["result"]
    assert worker.running and server.running
    assert forkServerPid(worker) == forkServer
    assert len(re.findall(r"fork server started", worker.log(sinceStart=True))) == 1
    assert [pid for uid in SLOT_UIDS for pid in processesOf(uid)] == []
