"""The real one-node Slurm cluster of test/slurmcluster.py (the ``slurm`` fixture)
does what the Slurm backend's tests take for granted: batch jobs run and write
their output, two 1-CPU jobs run at once, squeue answers as the backend reads it,
slurmd can be killed and started again under a running job, and srun starts MPI
ranks through PMIx."""

import os
import subprocess

import pytest

from test import slurmcluster

SQUEUE = ("squeue", "--states=all", "-h", "-o", "%i|%T|%r", "-j")


def submit(slurm, *args):
    """sbatch a job on the cluster; its id."""
    return slurm.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def states(slurm, *jobIds):
    """``{job id: (state, reason)}`` as ``squeue --states=all`` lists them."""
    listed = slurm.run(*SQUEUE, ",".join(jobIds)).stdout.splitlines()
    return {jobId: (state, reason) for jobId, state, reason in (line.split("|") for line in listed)}


@pytest.fixture
def cancelled(slurm):
    """A list the test adds its job ids to; whatever still runs of them is cancelled after."""
    jobIds = []
    yield jobIds
    if jobIds:
        slurm.run("scancel", *jobIds, check=False)
        slurm.cancelAll()


def test_sbatchWaitRunsAJobAndItsOutputFileSaysHi(slurm, tmp_path):
    """``sbatch --wait --wrap 'echo hi'`` returns 0 once the job is done, and the
    job's output file holds its output; squeue still lists it, COMPLETED."""
    out = tmp_path / "hi.out"
    result = slurm.run("sbatch", "--parsable", "--wait", "--chdir", str(tmp_path),
                       "--output", str(out), "--wrap", "echo hi")
    jobId = result.stdout.strip()
    assert out.read_text() == "hi\n"
    assert states(slurm, jobId) == {jobId: ("COMPLETED", "None")}


def test_twoOneCpuJobsRunAtOnceOnTwoCpus(slurm, tmp_path, cancelled):
    """Two 1-CPU jobs are RUNNING at the same moment (one squeue answer lists both);
    scancel leaves them in squeue as CANCELLED with reason None."""
    if slurm.cpus < 2:
        pytest.skip("needs two CPUs, this host has %d" % (slurm.cpus,))
    for _ in range(2):
        cancelled.append(submit(slurm, "--cpus-per-task", "1", "--chdir", str(tmp_path),
                                "--output", "/dev/null", "--wrap", "sleep 300"))
    slurm.waitFor(lambda: set(states(slurm, *cancelled).values()) == {("RUNNING", "None")},
                  "both jobs RUNNING at once")
    slurm.run("scancel", *cancelled)
    slurm.waitFor(lambda: set(states(slurm, *cancelled).values()) == {("CANCELLED", "None")},
                  "both jobs CANCELLED")


def test_squeueOfUnknownJobIds(slurm, tmp_path):
    """What the backend reads for job ids squeue does not know: alone, an error
    (rc 1, "Invalid job id specified"); among known ones, simply left out (rc 0)."""
    known = submit(slurm, "--wait", "--chdir", str(tmp_path), "--output", "/dev/null", "--wrap", "true")
    unknown = str(int(known) + 1000)
    alone = slurm.run(*SQUEUE, unknown, check=False)
    assert (alone.returncode, alone.stdout) == (1, "")
    assert "Invalid job id specified" in alone.stderr
    among = slurm.run(*SQUEUE, "%s,%s" % (unknown, known))
    assert among.stdout == "%s|COMPLETED|None\n" % (known,)
    onlyUnknown = slurm.run(*SQUEUE, "%s,%d" % (unknown, int(unknown) + 1))
    assert (onlyUnknown.returncode, onlyUnknown.stdout) == (0, "")


def test_aJobOutlivesAShortSlurmdOutage(slurm, tmp_path, cancelled):
    """slurmd killed under a running job and started again (well within SlurmdTimeout):
    the job stays RUNNING, its processes untouched, and then completes."""
    go = tmp_path / "go"
    out = tmp_path / "job.out"
    jobId = submit(slurm, "--chdir", str(tmp_path), "--output", str(out),
                   "--wrap", "echo started; while [ ! -e %s ]; do sleep 0.1; done; echo went" % (go,))
    cancelled.append(jobId)
    slurm.waitFor(lambda: out.exists() and out.read_text() == "started\n", "the job started")
    slurm.killSlurmd()
    try:
        assert states(slurm, jobId) == {jobId: ("RUNNING", "None")}
    finally:
        slurm.startSlurmd()
    assert states(slurm, jobId) == {jobId: ("RUNNING", "None")}
    go.touch()
    slurm.waitFor(lambda: states(slurm, jobId)[jobId][0] == "COMPLETED", "the job COMPLETED")
    assert out.read_text() == "started\nwent\n"


def test_srunMpiPmixGivesEachRankTheWholeWorld(slurm):
    """``srun --mpi=pmix -n 2`` starts Open MPI ranks that see a world of 2 (pmi2 and
    none do not: Debian's Open MPI has no PMI-1/2 support, each rank aborts in MPI_Init)."""
    python = "/usr/bin/python3"
    if subprocess.run([python, "-c", "import mpi4py"], capture_output=True).returncode != 0:
        pytest.skip("%s has no mpi4py: apt-get install python3-mpi4py openmpi-bin" % (python,))
    result = slurm.run("srun", "--mpi=pmix", "-n", "2", python, "-c",
                       "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())", check=False)
    assert (result.returncode, result.stdout) == (0, "2\n2\n"), result.stderr


def test_unavailableReasonSaysWhatIsMissing(monkeypatch, tmp_path):
    """The fixture's skip reason: root is needed; a missing program names the packages."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in slurmcluster.unavailableReason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurmcluster, "SEARCH_PATH", str(tmp_path))
    assert slurmcluster.unavailableReason() == (
        "munged, slurmctld, slurmd, sbatch, srun, squeue, sinfo, scontrol, scancel not found: "
        "apt-get install slurm-wlm munge")
