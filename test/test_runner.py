"""The runner's own rules, in this process: option checking, services, tracebacks, outcome files.

The fits themselves run through the fork server in test_forkserver.py; here are
the parts that need no fork: what is refused and how it is worded, how a
model's traceback is trimmed, and what the worker accepts as an outcome record.
"""

import json
import os
import shutil
import tempfile

import pytest

from reflservd import fitoptions
from reflservd.errors import Refused
from reflworkerd import outcome as outcomes, runner


@pytest.fixture
def jobDir():
    path = tempfile.mkdtemp(prefix="reflworkerd-runner-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def outcome(jobDir, request):
    progress = []
    return runner.outcomeOf(jobDir, request, progress.append), progress


def test_checkOptionsKeepsRefl1dNamesAndTypes():
    """Valid options by refl1d's own names come back as given (ints promoted to floats where bumps wants floats)."""
    options = runner.checkOptions(
        {"fit": "dream", "samples": 2000, "burn": 20, "pop": 10, "init": "lhs", "thin": 1, "alpha": 0.01, "seed": 5, "parallel": 1, "time": 1}
    )
    assert options == {
        "fit": "dream", "samples": 2000, "burn": 20, "pop": 10.0, "init": "lhs", "thin": 1, "alpha": 0.01,
        "seed": 5, "parallel": 1, "time": 1.0,
    }
    assert runner.checkOptions({"fit": "lm", "steps": 200, "xtol": 1e-8, "ftol": 1e-9, "starts": 2}) == {
        "fit": "lm", "steps": 200, "xtol": 1e-8, "ftol": 1e-9, "starts": 2,
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fit": "lm", "stpes": 10}, "unknown fit option 'stpes'"),
        ({"fit": "lm", "samples": 10}, "fit option 'samples' does not apply to fit=lm"),
        ({"fit": "levenberg"}, "unknown fitter fit='levenberg'"),
        ({"fit": "lm", "steps": "many"}, "option steps must be a number, not 'many'"),
        ({"fit": "lm", "steps": 2.5}, "option steps must be an integer, not 2.5"),
        ({"fit": "lm", "steps": -1}, "option steps must not be negative (-1)"),
        ({"fit": "lm", "steps": True}, "option steps must be a number, not True"),
        ({"fit": "dream", "alpha": 0.5}, "option alpha=0.5 is outside [0, 0.1]"),
        ({"fit": "dream", "init": "best"}, "option init='best' is not one of eps, lhs, cov, random"),
        ({"fit": "dream", "trim": 1}, "option trim must be true or false, not 1"),
        ({"fit": "lm", "seed": 0}, "option seed must be in 1..4294967295, not 0"),
        ({"fit": "lm", "seed": "x"}, "option seed must be an integer, not 'x'"),
        ({"fit": "lm", "parallel": -2}, "option parallel must be a number of processes, 1 or more, not -2"),
        ({"fit": "lm", "parallel": 0}, "option parallel must be a number of processes, 1 or more, not 0 (refl1d's 0, "
                                       "every CPU, is not offered"),
        ({"fit": "lm", "parallel": 1.5}, "option parallel must be an integer, not 1.5"),
        ({"fit": "lm", "resume": 1}, "option resume must be true or false, not 1"),
        ({"fit": "lm", "time": float("nan")}, "option time must be finite, not nan"),
        ("lm", "options must be an object of refl1d fit options, not str"),
    ],
)
def test_checkOptionsRefusesWithAClearMessage(options, message):
    """Unknown names, options of another fitter, wrong types and out-of-range values are refused, and the message names them."""
    with pytest.raises(runner.JobError) as caught:
        runner.checkOptions(options)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "parallel, cpus, processLimit, message",
    [
        (3, 2, None, "option parallel=3 is more than the 2 CPUs this worker gives a fit"),
        (8, 16, 20, "option parallel=8 needs about 26 processes and threads, past this worker's process limit "
                    "of 20 (parallel=5 at most)"),
        (2, 16, 12, "(parallel=1 at most)"),
    ],
)
def test_parallelIsBoundedByTheFitsCpusAndProcessLimit(parallel, cpus, processLimit, message):
    """parallel asks for processes of bumps' mapper: no more than the CPUs the fit may
    run on, and few enough that they and their threads fit under its RLIMIT_NPROC."""
    with pytest.raises(runner.JobError) as caught:
        runner.checkOptions({"fit": "dream", "parallel": parallel}, cpus=cpus, processLimit=processLimit)
    assert message in str(caught.value)
    assert runner.checkOptions({"fit": "dream", "parallel": 2}, cpus=2, processLimit=14)["parallel"] == 2
    assert runner.checkOptions({"fit": "dream", "parallel": 1}, cpus=1, processLimit=1)["parallel"] == 1


@pytest.mark.parametrize(
    "options, backend, message",
    [
        ({"mpi": 2}, None, "option mpi runs a fit under MPI on a worker with the slurm backend (--backend slurm); "
                           "this worker's backend is local: use parallel for processes on one machine"),
        ({"mpi": 1}, "slurm", "option mpi must be a number of MPI ranks, 2 or more, not 1 (leave it out"),
        ({"mpi": 2.5}, "slurm", "option mpi must be an integer, not 2.5"),
        ({"mpi": 3}, "slurm", "option mpi=3 is more than the 2 CPUs this fit was given"),
        ({"mpi": 2, "parallel": 2}, "slurm", "options mpi=2 and parallel=2 cannot be combined"),
    ],
)
def test_mpiIsRefusedOffSlurmAndBoundedLikeParallel(options, backend, message):
    """mpi asks for MPI ranks: only where the worker's backend runs them (slurm), 2 or
    more, no more than the fit's CPUs, not together with parallel."""
    with pytest.raises(runner.JobError) as caught:
        runner.checkOptions(dict(options, fit="dream"), cpus=2, processLimit=None, backend=backend)
    assert message in str(caught.value)
    assert runner.checkOptions({"fit": "dream", "mpi": 2, "parallel": 1}, cpus=2, backend="slurm")["mpi"] == 2


def test_mpiRanksAndTheirThreadsFitUnderTheProcessLimit():
    """Each rank counts with Open MPI's threads, and mpirun with its own."""
    assert fitoptions.mpiTasks(2) == 16
    with pytest.raises(runner.JobError) as caught:
        runner.checkOptions({"fit": "dream", "mpi": 4}, cpus=8, processLimit=20, backend="slurm")
    assert str(caught.value) == ("option mpi=4 needs about 24 processes and threads, past this worker's process "
                                 "limit of 20 (mpi=3 at most)")


def test_theCpusARequestAsksOfSlurm():
    """A Slurm job gets the CPUs its fit asks for by parallel or mpi; a value the runner
    will refuse asks for one (the runner then says why)."""
    def request(**options):
        return {"service": "refl1d", "data": {"model": "m.py", "options": options}}

    assert fitoptions.requestedCpus(request(mpi=3)) == 3
    assert fitoptions.requestedCpus(request(parallel=2)) == 2
    assert fitoptions.requestedCpus(request(mpi=1, parallel=True, seed=5)) == 1
    assert fitoptions.requestedCpus(request(mpi=10**6)) == 1
    assert fitoptions.requestedCpus({"service": "count", "data": 5}) == 1


def test_theSubmitFormAppliesTheSameRunnerRules():
    """The submit page's form reads seed and parallel by the runner's own rule (one
    place: reflservd.fitoptions), short of what only the worker knows (its CPUs)."""
    assert fitoptions.fitOptions({"fit": "dream", "seed": "7", "parallel": "2"}) == {
        "fit": "dream", "seed": 7, "parallel": 2}
    assert fitoptions.fitOptions({"fit": "dream", "mpi": "4"}) == {"fit": "dream", "mpi": 4}
    for values, message in (({"seed": "0"}, "option seed must be in 1..4294967295, not 0"),
                            ({"parallel": "0"}, "option parallel must be a number of processes, 1 or more"),
                            ({"mpi": "1"}, "option mpi must be a number of MPI ranks, 2 or more"),
                            ({"mpi": "2", "parallel": "3"}, "options mpi=2 and parallel=3 cannot be combined")):
        with pytest.raises(Refused) as caught:
            fitoptions.fitOptions(values)
        assert message in caught.value.message
    assert runner.MAX_SEED == fitoptions.MAX_SEED and runner.RUNNER_OPTIONS == fitoptions.RUNNER_OPTIONS


def test_anOverlongTemporaryDirectoryIsRefusedForParallelNotCrashed():
    """Under --sandbox none the fit's TMPDIR is its job directory; multiprocessing's
    manager listens on a socket there, and a socket path has 107 bytes at most."""
    runner._checkMapperSocket("/var/lib/reflworkerd/jobs/12345678", 2)
    with pytest.raises(runner.JobError) as caught:
        runner._checkMapperSocket("/" + "w" * 80, 2)
    assert "the worker's --work-dir must be shorter" in str(caught.value)


def test_mpiNeedsTheFitsOwnPidNamespace(jobDir, monkeypatch):
    """A fit with mpi on a slurm worker that confines it without namespaces (this
    process is not pid 1 of a namespace of its own) ends ERROR saying why, and
    starts no rank: nothing would end them with it."""
    from reflworkerd import mpifit, requestcheck

    monkeypatch.setattr(requestcheck, "fitCpus", lambda: 2)
    monkeypatch.setattr(mpifit, "launcherAvailable", lambda: True)
    monkeypatch.setattr(mpifit.subprocess, "Popen", None)
    with open(os.path.join(jobDir, "model.py"), "w") as f:
        f.write("raise SystemExit('the model is not run')\n")
    request = {"service": "refl1d", "data": {"model": "model.py", "options": {"fit": "dream", "mpi": 2}}}
    record = runner.outcomeOf(jobDir, request, [].append, backend="slurm")
    assert record["status"] == "ERROR"
    assert record["error"] == ("option mpi=2 needs a worker whose fits run in namespaces (--sandbox namespaces "
                               "or apparmor): there the fit is pid 1 of its own pid namespace, and every rank "
                               "ends with it")
    assert os.listdir(jobDir) == ["model.py"]


def test_countServiceCountsToItsData(jobDir):
    """The count service returns the number it was asked to count to, and reports it as progress."""
    result, progress = outcome(jobDir, {"service": "count", "data": 1234})
    assert result == {"status": "COMPLETE", "result": 1234, "error": None, "trace": None}
    assert progress[-1]["step"] == 1234


def test_countServiceRefusesNonNumbers(jobDir):
    """count with data that is no integer ends ERROR saying so, without a traceback."""
    result, _ = outcome(jobDir, {"service": "count", "data": "ten"})
    assert result["status"] == "ERROR"
    assert result["error"] == "count: data must be an integer, not 'ten'"
    assert result["trace"] is None


def test_unknownServiceNamesTheOfferedServices(jobDir):
    """A service the worker does not have is refused with the list of the ones it has."""
    result, _ = outcome(jobDir, {"service": "fitter", "data": "pickle"})
    assert result["status"] == "ERROR"
    assert result["error"] == "unknown service 'fitter': this worker offers count, refl1d"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": "../etc/passwd"}, "refl1d: model must be the name of an uploaded .py or .json file"),
        ({"model": "model.pickle"}, "must be a .py script or a .json serialized FitProblem"),
        ({"model": "absent.py"}, "refl1d: model file 'absent.py' was not uploaded"),
        ({"model": "absent.py", "extra": 1}, "unknown data field(s) extra"),
        ("model.py", 'refl1d: data must be {"model": NAME, "options": {...}}'),
    ],
)
def test_refl1dRefusesBadModelNames(jobDir, data, message):
    """The model must be a plain name of an uploaded .py or .json file in the job directory."""
    result, _ = outcome(jobDir, {"service": "refl1d", "data": data})
    assert result["status"] == "ERROR"
    assert message in result["error"]


def raiseFromJobFile(jobDir):
    """Raise from code whose file is in the job directory, called through this module's frames."""
    path = os.path.join(jobDir, "model.py")
    with open(path, "w") as f:
        f.write("def inner():\n    raise KeyError('layer')\n\ndef outer():\n    inner()\n")
    namespace = {}
    exec(compile(open(path).read(), path, "exec"), namespace)
    try:
        namespace["outer"]()
    except KeyError as exc:
        return exc


def test_modelTracebackStartsInTheJobAndShowsRelativeNames(jobDir):
    """The traceback given to the user starts at the first frame in the job's files, named relative to the job."""
    exc = raiseFromJobFile(jobDir)
    trace = runner.modelTraceback(exc, jobDir)
    assert trace == (
        "Traceback (most recent call last):\n"
        '  File "model.py", line 5, in outer\n'
        "    inner()\n"
        '  File "model.py", line 2, in inner\n'
        "    raise KeyError('layer')\n"
        "KeyError: 'layer'\n"
    )


def test_modelTracebackWithoutJobFramesDropsOnlyPlumbing(jobDir):
    """Where no frame is in the job's files, the worker's own frames are dropped and the rest kept."""
    try:
        json.loads("{not json")
    except ValueError as exc:
        trace = runner.modelTraceback(exc, jobDir)
    assert trace.startswith("Traceback (most recent call last):\n")
    assert "json" in trace and "decoder.py" in trace
    assert "test_runner.py" in trace
    assert "JSONDecodeError" in trace


def test_outcomeRoundTripsThroughTheJobDirectory(jobDir):
    """What the child writes with writeOutcome the worker reads back with readOutcome,
    but for a confinement, which the worker never takes from the fit; removeOutcome
    clears it."""
    record = {"status": "COMPLETE", "result": {"chisq": 1.0}, "error": None, "trace": None}
    outcomes.write(jobDir, dict(record, confinement="apparmor(reflworkerd-fit)+uid 60001"))
    assert outcomes.read(jobDir) == record
    outcomes.remove(jobDir)
    assert outcomes.read(jobDir) is None


@pytest.mark.parametrize(
    "content, says",
    [(b"", "not JSON"), (b"{not json", "not JSON"), (b"[1, 2]", "no status"), (b'{"status": "DONE"}', "no status"),
     (b'{"status": "ERROR", "error": 5}', "error is not text"), (b'{"status": "COMPLETE", "trace": []}', "trace is not text"),
     (b"[" * 200000, "nested deeper than 32 levels")],
)
def test_readOutcomeRefusesWhatIsNotAnOutcome(jobDir, content, says):
    """The outcome file is written by a process running untrusted code: anything not
    shaped like an outcome is refused, saying why (never an exception of the parser)."""
    from reflworkerd import jobfiles

    with open(os.path.join(jobDir, outcomes.OUTCOME_NAME), "wb") as f:
        f.write(content)
    with pytest.raises(jobfiles.UnsafeFile, match=r"^\.outcome\.json is not an outcome record.*" + says):
        outcomes.read(jobDir)


def test_memoryErrorIsMarkedForTheWorker(jobDir):
    """A MemoryError is marked so that the worker can name the memory limit in the job's error."""
    record = runner.errorOutcome(MemoryError("Unable to allocate"), jobDir)
    assert record["limit"] == "memory"
    assert record["error"] == "MemoryError: Unable to allocate"


def test_seedAllSeedsNumbaToo():
    """seedAll makes both numpy's and numba's random draws repeat (DREAM draws from numba's)."""
    import numba
    import numpy as np

    @numba.njit
    def draw():
        return np.random.rand()

    runner.seedAll(99)
    first = (np.random.rand(), draw())
    runner.seedAll(99)
    second = (np.random.rand(), draw())
    assert first == second


def test_drawnSeedsAreInRange():
    """Seeds drawn for jobs without one are valid numpy seeds, never bumps' 'no seed' 0."""
    seeds = {runner.drawSeed() for _ in range(100)}
    assert all(1 <= s <= runner.MAX_SEED for s in seeds)
    assert len(seeds) > 90


def test_resumeWithoutASessionIsRefused(jobDir):
    """Resuming needs the session file of an earlier attempt in results/: without one the job is refused."""
    with open(os.path.join(jobDir, "model.py"), "w") as f:
        f.write("raise SystemExit('not to be run')\n")
    result, _ = outcome(jobDir, {"service": "refl1d", "data": {"model": "model.py", "options": {"fit": "dream", "resume": True}}})
    assert result["status"] == "ERROR"
    assert result["error"] == "resume: there is no session file results/session.h5 to resume from"


@pytest.mark.parametrize("args, message", [
    ("run-1.dat", "refl1d: the model's args must be a list"),
    (["run-1.dat", "a\0b"], "refl1d: a model argument must be a non-empty string"),
    ([""], "refl1d: a model argument must be a non-empty string"),
])
def test_refl1dHoldsModelArgumentsToTheDoorsRules(jobDir, args, message):
    """``data.args`` (the model's sys.argv[1:]) is checked by the runner as at
    the door (fitoptions.modelArgs), before anything runs."""
    with open(os.path.join(jobDir, "model.py"), "w") as f:
        f.write("raise SystemExit('the model must not run')\n")
    result, _ = outcome(jobDir, {"service": "refl1d", "data": {"model": "model.py", "args": args}})
    assert result["status"] == "ERROR"
    assert message in result["error"]


def test_the_mpi_ranks_numba_cache_leaves_out_kernels_the_fit_cannot_read(tmp_path, monkeypatch):
    """``mpifit.seedNumbaCache`` copies the compiled kernels it can read and
    leaves out one it cannot (a cache file numba wrote 0600, seen in a fresh
    venv: the MPI fit ended ERROR on a PermissionError), instead of failing."""
    import shutil

    from reflworkerd import mpifit

    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("kernels.k-1.py311.nbi", "kernels.k-1.py311.1.nbc", "kernels.secret-2.py311.nbi"):
        (package / "__pycache__" / name).write_bytes(b"x")
    copy = shutil.copyfile

    def refuse(source, target):
        if "secret" in str(source):
            raise PermissionError(13, "Permission denied", str(source))
        return copy(source, target)

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mpifit.shutil, "copyfile", refuse)
    cache = tmp_path / "cache"
    assert mpifit.seedNumbaCache(str(cache), packages=("pkg",)) == 2
    copied = sorted(p.name for p in cache.rglob("*.nb*"))
    assert copied == ["kernels.k-1.py311.1.nbc", "kernels.k-1.py311.nbi"]
