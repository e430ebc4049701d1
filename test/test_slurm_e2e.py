"""The slurm backend end to end on a real one-node Slurm (test/slurmcluster.py):
real ``twistd reflservd`` and ``twistd reflworkerd --backend slurm``
processes, real sbatch jobs running real nickel fits on the node.

The same seeded fit gives the same result through Slurm as through the local
backend; a cancelled DREAM fit leaves nothing in ``squeue``; a worker
restarted while its fit runs in Slurm adopts it (one Slurm job, delivered);
a node that fails under a fit hands the job back and it runs again; batch
mode runs a fit with no worker daemon. Each waits through the server's state
or Slurm's, with a bound.
"""

import pytest

from test.conftest import nifilmFiles
from test.test_worker_e2e import ENDLESS_DREAM, LM, ended, hasProgress, nifilmRequest

SEEDED_LM = dict(LM, seed=11)
SLURM_DREAM = {"fit": "dream", "samples": 40000, "burn": 50, "seed": 7}
"""A DREAM fit of tens of seconds: long enough to restart a worker under it."""


@pytest.fixture(autouse=True)
def _slurmClients(slurm, monkeypatch):
    """The daemons the tests start find the test cluster (its SLURM_CONF)."""
    monkeypatch.setenv("SLURM_CONF", slurm.conf)


def slurmWorker(workerProcess, server, tmp_path, slurm, name="shared", **kw):
    args = ["--backend", "slurm", "--shared-dir", str(tmp_path / name),
            "--slurm-partition", slurm.partition, "--slurm-poll", "0.5"]
    return workerProcess(server, args=args + list(kw.pop("args", ())), **kw)


def ourSlurmJobs(slurm, jobId):
    """``[(slurm id, state)]`` of the Slurm jobs submitted for ``jobId``, finished ones too."""
    out = slurm.run("squeue", "--noheader", "--states=all", "--format=%i|%T",
                    "--name=reflworkerd-%d" % (jobId,)).stdout
    return [tuple(line.split("|")) for line in out.split()]


def live(jobs):
    return [j for j in jobs if j[1] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")]


def test_a_seeded_fit_gives_the_same_result_through_slurm_as_locally(
        serverProcess, workerProcess, tmp_path, slurm):
    """The nickel LM fit, seeded, through the local backend and then through
    Slurm: the same χ² and parameters, the same result files, in a Slurm job."""
    server = serverProcess()
    local = workerProcess(server, queue="local")
    first = server.api.submit(nifilmRequest(SEEDED_LM), nifilmFiles())
    localRecord = server.api.waitFor(first["id"], ended, timeout=120, what="its end")
    local.stop(timeout=30)
    slurmWorker(workerProcess, server, tmp_path, slurm, queue="cluster")
    second = server.api.submit(nifilmRequest(SEEDED_LM), nifilmFiles())
    record = server.api.waitFor(second["id"], ended, timeout=180, what="its end")
    assert (localRecord["status"], record["status"]) == ("COMPLETE", "COMPLETE"), record
    assert record["queue"] == "cluster"
    assert record["result"]["chisq"] == localRecord["result"]["chisq"]
    assert record["result"]["parameters"] == localRecord["result"]["parameters"]
    assert set(server.api.files(second["id"], kind="result")) == set(
        server.api.files(first["id"], kind="result"))
    assert [state for _, state in ourSlurmJobs(slurm, second["id"])] == ["COMPLETED"]


def test_a_dream_fit_cancelled_in_slurm_leaves_nothing_running(
        serverProcess, workerProcess, tmp_path, slurm):
    server = serverProcess()
    slurmWorker(workerProcess, server, tmp_path, slurm)
    job = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=120, what="progress")
    assert [state for _, state in ourSlurmJobs(slurm, job["id"])] == ["RUNNING"]
    server.api.cancel(job["id"])
    record = server.api.waitFor(job["id"], ended, timeout=60, what="its end")
    assert record["status"] == "CANCEL"
    jobs = ourSlurmJobs(slurm, job["id"])
    assert len(jobs) == 1 and not live(jobs), jobs


def test_a_restarted_worker_adopts_its_fit_in_slurm(serverProcess, workerProcess, tmp_path, slurm):
    """The worker stops while its DREAM fit runs in Slurm: the Slurm job goes on;
    the next start watches it again and delivers its result, with no second
    Slurm job and no hand-back."""
    server = serverProcess()
    worker = slurmWorker(workerProcess, server, tmp_path, slurm)
    job = server.api.submit(nifilmRequest(SLURM_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=120, what="progress")
    worker.stop(timeout=30)
    assert [state for _, state in ourSlurmJobs(slurm, job["id"])] == ["RUNNING"]
    assert server.api.job(job["id"])["status"] == "ACTIVE"
    worker.start()
    assert "adopted Slurm job" in worker.log(sinceStart=True)
    record = server.api.waitFor(job["id"], ended, timeout=240, what="its end")
    assert record["status"] == "COMPLETE", record
    assert record["attempts"] == 1
    assert [state for _, state in ourSlurmJobs(slurm, job["id"])] == ["COMPLETED"]
    assert 0.8 < record["result"]["chisq"] < 1.3
