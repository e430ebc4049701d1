"""The slurm backend end to end on a real one-node Slurm (test/slurmcluster.py):
real ``twistd reflservd`` and ``twistd reflworkerd --backend slurm``
processes, real sbatch jobs running real nickel fits on the node.

The same seeded fit gives the same result through Slurm as through the local
backend; a cancelled DREAM fit leaves nothing in ``squeue``; a worker
restarted while its fit runs in Slurm adopts it (one Slurm job, delivered);
a node that fails under a fit hands the job back and it runs again; batch
mode runs a fit with no worker daemon; a seeded DREAM fit over two MPI ranks
(``mpi: 2``) gives the serial fit's parameters, in the same confinement.
Each waits through the server's state or Slurm's, with a bound.
"""

import pytest

from reflworkerd import mpifit

from test.conftest import nifilmFiles
from test.test_worker_e2e import ENDLESS_DREAM, LM, ended, hasProgress, nifilmRequest

SEEDED_LM = dict(LM, seed=11)
SLURM_DREAM = {"fit": "dream", "samples": 40000, "burn": 50, "seed": 7}
"""A DREAM fit of tens of seconds: long enough to restart a worker under it."""
MPI_DREAM = {"fit": "dream", "samples": 2000, "burn": 20, "seed": 4321}


@pytest.fixture(autouse=True)
def _slurmClients(slurm, monkeypatch):
    """The daemons the tests start find the test cluster (its SLURM_CONF). After
    the test (and its daemons), what its fits left in Slurm is cancelled: a
    stopped worker leaves its Slurm jobs running, by design."""
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    yield
    slurm.cancelAll()


def slurmWorker(workerProcess, server, tmp_path, slurm, name="shared", **kw):
    args = ["--backend", "slurm", "--shared-dir", str(tmp_path / name),
            "--slurm-partition", slurm.partition, "--slurm-poll", "0.5"]
    return workerProcess(server, args=args + list(kw.pop("args", ())), **kw)


def ourSlurmJobs(slurm, tmp_path, jobId):
    """``[(slurm id, state)]`` of the Slurm jobs this test's worker submitted for
    ``jobId`` (their working directory is its control directory), finished ones too."""
    out = slurm.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%Z",
                    "--name=reflworkerd-%d" % (jobId,)).stdout
    return [(slurmId, state) for slurmId, state, where in (line.split("|") for line in out.split())
            if where.startswith(str(tmp_path) + "/")]


def live(jobs):
    return [j for j in jobs if j[1] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")]


def test_a_seeded_fit_gives_the_same_result_through_slurm_as_locally(
        serverProcess, workerProcess, tmp_path, slurm):
    """The nickel LM fit, seeded, through the local backend and then through
    Slurm: the same χ² and parameters, the same result files, in a Slurm job.
    The local backend refuses a fit with ``mpi``, naming the backend that runs it."""
    server = serverProcess()
    local = workerProcess(server, queue="local")
    first = server.api.submit(nifilmRequest(SEEDED_LM), nifilmFiles())
    localRecord = server.api.waitFor(first["id"], ended, timeout=120, what="its end")
    mpi = server.api.submit(nifilmRequest(dict(MPI_DREAM, mpi=2)), nifilmFiles())
    refused = server.api.waitFor(mpi["id"], ended, timeout=120, what="its end")
    assert refused["status"] == "ERROR", refused
    assert refused["error"] == ("option mpi runs a fit under MPI on a worker with the slurm backend "
                                "(--backend slurm); this worker's backend is local: use parallel for "
                                "processes on one machine")
    local.stop(timeout=30)
    slurmWorker(workerProcess, server, tmp_path, slurm, queue="cluster")
    # The same determined fit: the result cache would answer it without running it.
    second = server.api.submit(dict(nifilmRequest(SEEDED_LM), cache=False), nifilmFiles())
    record = server.api.waitFor(second["id"], ended, timeout=180, what="its end")
    assert (localRecord["status"], record["status"]) == ("COMPLETE", "COMPLETE"), record
    assert record["queue"] == "cluster"
    assert record["result"]["chisq"] == localRecord["result"]["chisq"]
    assert record["result"]["parameters"] == localRecord["result"]["parameters"]
    assert set(server.api.files(second["id"], kind="result")) == set(
        server.api.files(first["id"], kind="result"))
    assert [state for _, state in ourSlurmJobs(slurm, tmp_path, second["id"])] == ["COMPLETED"]


def test_a_dream_fit_cancelled_in_slurm_leaves_nothing_running(
        serverProcess, workerProcess, tmp_path, slurm):
    server = serverProcess()
    slurmWorker(workerProcess, server, tmp_path, slurm)
    job = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=120, what="progress")
    assert [state for _, state in ourSlurmJobs(slurm, tmp_path, job["id"])] == ["RUNNING"]
    server.api.cancel(job["id"])
    record = server.api.waitFor(job["id"], ended, timeout=60, what="its end")
    assert record["status"] == "CANCEL"
    jobs = ourSlurmJobs(slurm, tmp_path, job["id"])
    assert len(jobs) == 1 and not live(jobs), jobs


def test_a_restarted_worker_adopts_its_fit_in_slurm(serverProcess, workerProcess, tmp_path, slurm):
    """The DREAM fit's checkpoints reach the server while it runs in Slurm. The
    worker stops while the fit runs: the Slurm job goes on;
    the next start watches it again and delivers its result, with no second
    Slurm job and no hand-back."""
    server = serverProcess()
    worker = slurmWorker(workerProcess, server, tmp_path, slurm, args=["--checkpoint-every", "1"])
    job = server.api.submit(nifilmRequest(SLURM_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=120, what="progress")
    # The fit's checkpoints come back from the node through the shared directory.
    server.api.waitFor(job["id"], lambda r: "session.h5" in server.api.files(job["id"], kind="result"),
                       timeout=120, what="a checkpoint")
    worker.stop(timeout=30)
    assert [state for _, state in ourSlurmJobs(slurm, tmp_path, job["id"])] == ["RUNNING"]
    assert server.api.job(job["id"])["status"] == "ACTIVE"
    worker.start()
    assert "adopted Slurm job" in worker.log(sinceStart=True)
    record = server.api.waitFor(job["id"], ended, timeout=240, what="its end")
    assert record["status"] == "COMPLETE", record
    assert record["attempts"] == 1
    assert [state for _, state in ourSlurmJobs(slurm, tmp_path, job["id"])] == ["COMPLETED"]
    assert 0.8 < record["result"]["chisq"] < 1.3


def test_batch_mode_runs_fits_on_slurm_without_a_worker_daemon(serverProcess, tmp_path, slurm):
    """twistd reflservd --batch-queue slurm: the nickel fit runs as a Slurm job
    from the server alone, with the same result as through a worker; a DREAM
    fit's progress shows and its cancel ends it in Slurm."""
    options = "--slurm-partition %s --shared-dir %s --slurm-poll 0.5 --sandbox none --slot-uid-base 0" % (
        slurm.partition, tmp_path / "batch")
    server = serverProcess(args=["--batch-queue", "slurm", "--batch-options", options])
    fit = server.api.submit(nifilmRequest(SEEDED_LM), nifilmFiles())
    record = server.api.waitFor(fit["id"], ended, timeout=180, what="its end")
    assert record["status"] == "COMPLETE", record
    assert record["queue"] == "slurm" and 0.8 < record["result"]["chisq"] < 1.3
    assert "nifilm.par" in server.api.files(fit["id"], kind="result")
    assert [state for _, state in ourSlurmJobs(slurm, tmp_path, fit["id"])] == ["COMPLETED"]
    dream = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(dream["id"], hasProgress, timeout=120, what="progress")
    server.api.cancel(dream["id"])
    assert server.api.waitFor(dream["id"], ended, timeout=60, what="its end")["status"] == "CANCEL"
    assert not live(ourSlurmJobs(slurm, tmp_path, dream["id"]))


def test_a_fit_whose_node_fails_is_handed_back_and_runs_again(serverProcess, workerProcess, tmp_path, slurm):
    """slurmd is killed under a running fit and stays away: Slurm ends the job
    NODE_FAIL, the worker hands it back with the attempt counted, leases it again
    and submits it again; once the node is back a later attempt runs (Slurm may
    fail the node once more as it comes back: that attempt is handed back too),
    and is cancelled here: nothing of any attempt stays live in squeue."""
    server = serverProcess()
    worker = slurmWorker(workerProcess, server, tmp_path, slurm)
    job = server.api.submit(nifilmRequest(ENDLESS_DREAM), nifilmFiles())
    server.api.waitFor(job["id"], hasProgress, timeout=120, what="progress")
    slurm.killSlurmd()
    try:
        server.api.waitFor(job["id"], lambda r: r["attempts"] == 2, timeout=120, what="a second attempt")
        assert "NODE_FAIL" in worker.log(sinceStart=True)
    finally:
        slurm.startSlurmd()
    record = server.api.waitFor(job["id"], lambda r: hasProgress(r) and r["attempts"] >= 2,
                                timeout=180, what="progress of a later attempt")
    assert record["status"] == "ACTIVE"
    server.api.cancel(job["id"])
    assert server.api.waitFor(job["id"], ended, timeout=60, what="its end")["status"] == "CANCEL"
    states = [state for _, state in sorted(ourSlurmJobs(slurm, tmp_path, job["id"]), key=lambda j: int(j[0]))]
    assert states == ["NODE_FAIL"] * (record["attempts"] - 1) + ["CANCELLED"], states


def test_a_seeded_dream_fit_over_two_mpi_ranks_gives_the_serial_parameters(
        serverProcess, workerProcess, tmp_path, slurm):
    """``mpi: 2``: a Slurm job of two CPUs whose fit, confined as the serial fit is
    (namespaces, a slot's uid), runs over two MPI ranks (rank 0 reports a world of
    2); the seeded DREAM fit ends with the serial fit's χ² and parameters."""
    if not mpifit.launcherAvailable():
        pytest.skip("no Open MPI launcher or no mpi4py for this Python: apt-get install openmpi-bin "
                    "libopenmpi-dev; pip install -e '.[mpi]'")
    if slurm.cpus < 2:
        pytest.skip("needs two CPUs, this host has %d" % (slurm.cpus,))
    server = serverProcess()
    slurmWorker(workerProcess, server, tmp_path, slurm, sandbox="namespaces")
    serial = server.api.submit(nifilmRequest(MPI_DREAM), nifilmFiles())
    ranks = server.api.submit(nifilmRequest(dict(MPI_DREAM, mpi=2)), nifilmFiles())
    serialRecord = server.api.waitFor(serial["id"], ended, timeout=300, what="its end")
    record = server.api.waitFor(ranks["id"], ended, timeout=300, what="its end")
    assert (serialRecord["status"], record["status"]) == ("COMPLETE", "COMPLETE"), (record.get("error"), record.get("trace"))
    assert record["confinement"] == serialRecord["confinement"]
    assert record["confinement"].startswith("namespaces(mount,pid,net,ipc,uts)+seccomp+"), record
    assert record["result"]["mpi"] == 2 and "mpi" not in serialRecord["result"]
    # Rank 0's progress came through the fit (its FIFO) and the node's events, as a serial fit's does.
    progress = [{k: v for k, v in r["progress"].items() if k != "elapsed"} for r in (record, serialRecord)]
    assert progress[0] == progress[1] and progress[0]["step"] > 0, progress
    assert record["result"]["chisq"] == serialRecord["result"]["chisq"]
    assert record["result"]["parameters"] == serialRecord["result"]["parameters"]
    [(slurmId, state)] = ourSlurmJobs(slurm, tmp_path, ranks["id"])
    assert state == "COMPLETED"
    assert slurm.run("squeue", "--noheader", "--states=all", "--format=%C", "--jobs=" + slurmId).stdout.split() == ["2"]
