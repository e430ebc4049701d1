"""The slurm backend's logic on a Clock and a scripted Slurm: what it submits,
one squeue per poll for all its jobs, how Slurm's end states become
outcomes, cancel, and the survivors a restart adopts. The real cluster is in
test_slurm_e2e.py."""

import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from reflworkerd import outcome
from reflworkerd.slurm import SlurmBackend, SlurmError, parseStates
from reflworkerd.wire import encode


class ScriptedSlurm:
    """Slurm's commands as the backend calls them, answered from ``self.jobs``."""

    def __init__(self):
        self.calls = []
        self.jobs = {}          # slurm id -> (state, reason, nodes)
        self.nextId = 100
        self.sbatchError = None
        self.comments = {}      # slurm id -> control directory of a live tagged job

    def run(self, name, *args):
        self.calls.append((name,) + args)
        if name == "sinfo":
            return defer.succeed("up\n")
        if name == "sbatch":
            if self.sbatchError:
                return defer.fail(SlurmError("sbatch: " + self.sbatchError))
            self.nextId += 1
            self.jobs[self.nextId] = ("PENDING", "None", "")
            return defer.succeed("%d\n" % (self.nextId,))
        if name == "scancel":
            return defer.succeed("")
        raise AssertionError(name)

    def tagged(self):
        self.calls.append(("squeue", "tagged"))
        return defer.succeed(dict(self.comments))

    def states(self, slurmIds):
        self.calls.append(("squeue", tuple(sorted(slurmIds))))
        return defer.succeed({i: self.jobs[i] for i in slurmIds if i in self.jobs})

    def of(self, name):
        return [c for c in self.calls if c[0] == name]


class Cluster:
    def __init__(self, tmp_path, **kw):
        self.clock = Clock()
        self.slurm = ScriptedSlurm()
        self.shared = tmp_path / "shared"
        self.backend = SlurmBackend(self.clock, str(self.shared), "batch", commands=self.slurm,
                                    inThread=lambda f, *a: defer.maybeDeferred(f, *a),
                                    limits={"cpu": 60, "wall": 100.0}, pollInterval=2.0, **kw)
        self.backend.startService()
        self.progress = []

    def run(self, jobId, request=None):
        jobDir = self.shared / "jobs" / str(jobId)
        jobDir.mkdir(parents=True)
        fitRun = self.backend.run(jobId, str(jobDir), request or {"service": "count", "data": 3},
                                  self.progress.append)
        self.outcomes = getattr(self, "outcomes", {})
        fitRun.done.addCallback(lambda record: self.outcomes.setdefault(jobId, record))
        return fitRun

    def control(self, jobId):
        return self.shared / "slurm" / str(jobId)

    def event(self, jobId, event):
        with open(self.control(jobId) / "events", "ab") as f:
            f.write(encode(event))

    def poll(self):
        self.clock.advance(2.0)


@pytest.fixture
def cluster(tmp_path):
    return Cluster(tmp_path)


def test_a_fit_is_one_sbatch_job_running_the_fork_hosts_command(tmp_path):
    c = Cluster(tmp_path, account="refl", cpusPerJob=2, timeLimit="1:00:00", extra=["--qos=low"])
    fitRun = c.run(5, {"service": "refl1d", "data": {"model": "m.py", "options": {"parallel": 3}}})
    (sbatch,) = c.slurm.of("sbatch")
    control = str(c.control(5))
    assert sbatch[1:] == ("--parsable", "--job-name=reflworkerd-5", "--partition=batch",
                          "--cpus-per-task=3", "--output=%s/slurm.out" % control,
                          "--chdir=" + control, "--no-requeue", "--export=ALL",
                          "--comment=reflworkerd:" + control, "--account=refl",
                          "--time=1:00:00", "--qos=low", control + "/job.sh")
    command = json.loads((c.control(5) / "command.json").read_text())
    assert command["op"] == "run" and command["jobDir"] == str(tmp_path / "shared" / "jobs" / "5")
    assert command["backend"] == "slurm"        # the runner runs mpi for this backend only
    assert command["limits"] == {"cpu": 60}         # the wall limit is the worker's to keep
    assert json.loads((c.control(5) / "slurm.json").read_text()) == {"jobId": 5, "slurmId": 101}
    assert oct(os.stat(c.control(5)).st_mode & 0o777) == "0o700"
    assert "-m reflworkerd.slurmjob " + control in (c.control(5) / "job.sh").read_text()
    assert fitRun.slurmId == 101 and fitRun.survives


def test_a_fit_over_mpi_ranks_asks_for_a_cpu_per_rank_in_one_task(tmp_path):
    """The ranks of mpi: N start inside the fit's confinement on one node (mpifit):
    one Slurm task with N CPUs."""
    c = Cluster(tmp_path)
    c.run(6, {"service": "refl1d", "data": {"model": "m.py", "options": {"mpi": 4}}})
    (sbatch,) = c.slurm.of("sbatch")
    assert "--cpus-per-task=4" in sbatch and not any(a.startswith(("--ntasks", "-n")) for a in sbatch[1:])


def test_one_squeue_call_per_poll_for_every_job(cluster):
    for jobId in (1, 2, 3):
        cluster.run(jobId)
    cluster.poll()
    cluster.poll()
    assert cluster.slurm.of("squeue") == [("squeue", (101, 102, 103))] * 2


def test_a_completed_job_ends_as_its_fit_did_with_its_progress(cluster):
    fitRun = cluster.run(7)
    cluster.slurm.jobs[101] = ("RUNNING", "None", "n1")
    cluster.event(7, {"event": "started", "run": 7, "pid": 4242})
    cluster.event(7, {"event": "message", "run": 7, "message": {"type": "confined"}})
    cluster.event(7, {"event": "message", "run": 7, "message": {
        "type": "progress", "progress": {"step": 2, "chisq": 1.5, "parameters": {}, "elapsed": 0.1}}})
    cluster.poll()
    assert [p["step"] for p in cluster.progress] == [2]
    assert fitRun.confinement                       # the worker's description, not the fit's word
    outcome.write(fitRun.jobDir, outcome.completed(3))
    cluster.event(7, {"event": "exited", "run": 7, "code": 0, "signal": None, "cpu": 0.1})
    cluster.slurm.jobs[101] = ("COMPLETED", "None", "n1")
    cluster.poll()
    assert cluster.outcomes[7]["status"] == "COMPLETE" and cluster.outcomes[7]["result"] == 3
    assert not cluster.control(7).exists()


@pytest.mark.parametrize("state, status, says", [
    ("TIMEOUT", "ERROR", "Slurm's time limit for the job (--slurm-time) was reached"),
    ("OUT_OF_MEMORY", "ERROR", "out of memory"),
    ("DEADLINE", "ERROR", "its deadline passed"),
    ("CANCELLED", "ERROR", "cancelled in Slurm, not by this worker"),
    ("FAILED", "ERROR", "ended before its fit did"),
    ("NODE_FAIL", "LOST", "NODE_FAIL on n1"),
    ("PREEMPTED", "LOST", "goes back to the queue"),
    ("BOOT_FAIL", "LOST", "BOOT_FAIL"),
])
def test_slurms_end_states(cluster, state, status, says):
    cluster.run(8)
    cluster.slurm.jobs[101] = (state, "None", "n1")
    cluster.poll()
    assert cluster.outcomes[8]["status"] == status
    assert says in cluster.outcomes[8]["error"]


def test_cancel_terms_then_kills_and_ends_the_slurm_job(cluster):
    fitRun = cluster.run(9)
    cluster.slurm.jobs[101] = ("RUNNING", "None", "n1")
    cluster.event(9, {"event": "started", "run": 9, "pid": 1})
    cluster.poll()
    fitRun.cancel(grace=5.0)
    assert cluster.slurm.of("scancel") == [("scancel", "--full", "--signal=TERM", "101")]
    cluster.clock.advance(5.0)
    assert cluster.slurm.of("scancel")[1:] == [("scancel", "--full", "--signal=KILL", "101"),
                                                ("scancel", "101")]
    cluster.slurm.jobs[101] = ("CANCELLED", "None", "n1")
    cluster.poll()
    assert cluster.outcomes[9]["status"] == "CANCEL"


def test_a_pending_slurm_job_is_cancelled_outright(cluster):
    fitRun = cluster.run(10)
    cluster.poll()
    fitRun.cancel()
    assert cluster.slurm.of("scancel") == [("scancel", "101")]
    cluster.slurm.jobs[101] = ("CANCELLED", "None", "")
    cluster.poll()
    assert cluster.outcomes[10]["status"] == "CANCEL"


def test_the_wall_limit_counts_from_the_fits_start_on_its_node(cluster):
    fitRun = cluster.run(11)
    cluster.clock.advance(150.0)        # waiting in Slurm's queue longer than the wall limit
    assert not fitRun.wallExceeded
    cluster.slurm.jobs[101] = ("RUNNING", "None", "n1")
    cluster.event(11, {"event": "started", "run": 11, "pid": 1})
    cluster.poll()
    cluster.clock.advance(100.0)
    assert fitRun.wallExceeded
    assert ("scancel", "--full", "--signal=TERM", "101") in cluster.slurm.calls


def test_a_refused_sbatch_ends_the_fit_error(cluster):
    cluster.slurm.sbatchError = "invalid partition specified"
    cluster.run(12)
    assert cluster.outcomes[12]["status"] == "ERROR"
    assert "invalid partition specified" in cluster.outcomes[12]["error"]


def test_a_restart_adopts_its_survivors_and_cancels_the_rest(tmp_path):
    first = Cluster(tmp_path)
    first.run(13)
    first.run(14)
    first.backend.stopService()
    assert first.slurm.of("scancel") == []

    slurm = ScriptedSlurm()
    control = str(tmp_path / "shared" / "slurm")
    slurm.comments = {101: control + "/13", 102: control + "/14", 103: control + "/15",
                      200: "/elsewhere/slurm/15"}     # 103: its sbatch answered, its state unwritten
    again = SlurmBackend(Clock(), str(tmp_path / "shared"), "batch", commands=slurm,
                         inThread=lambda f, *a: defer.maybeDeferred(f, *a))
    again.startService()
    assert again.survivors() == {13, 14}
    adopted = again.adopt(13, str(tmp_path / "shared" / "jobs" / "13"), None, lambda p: None)
    assert adopted.slurmId == 101
    again.forgetSurvivors()
    assert again.commands.of("scancel") == [("scancel", "102"), ("scancel", "103")]
    assert not (tmp_path / "shared" / "slurm" / "14").exists()
    assert (tmp_path / "shared" / "slurm" / "13").exists()


def test_an_unknown_lone_job_id_is_no_answer_not_an_error():
    """squeue exits 1 ('Invalid job id specified') when the one id asked for is unknown."""
    from reflworkerd.slurm import SlurmCommands

    class Failing(SlurmCommands):
        def run(self, name, *args):
            return defer.fail(SlurmError("squeue: slurm_load_jobs error: Invalid job id specified"))

    answered = []
    Failing(Clock()).states([5]).addCallback(answered.append)
    assert answered == [{}]


def test_squeue_lines_are_parsed_strictly():
    assert parseStates("101|RUNNING|None|n1\n102|CANCELLED by 0|None|\nbogus\n|x|y|z\n") == {
        101: ("RUNNING", "None", "n1"), 102: ("CANCELLED by 0", "None", "")}
