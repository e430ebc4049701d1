"""A fit with ``mpi: N``: bumps' MPI mapper over N ranks, inside the fit's own confinement.

The fit is confined as every fit is (``sandbox.confine``: namespaces, new
root, seccomp, limits, the slot's uid). Then, instead of fitting in its own
process, it starts Open MPI's launcher, ``mpirun -n N python -m
reflworkerd.mpifit SPEC``, as a child (`runRanks`), and the N ranks start
inside that same confinement: the same mount, pid, network, IPC and UTS
namespaces, the same root, uid, seccomp filter and per-process limits. They
reach each other through ``mpirun``'s PMIx server on the fit's own loopback
and through shared memory in the fit's private ``/dev/shm`` and ``/tmp``,
which no other fit and nothing of the host can see. Rank 0 runs the fit as
the runner runs any (``runner.outcomeOf``, with bumps' ``MPIMapper``); the
other ranks load the model themselves and evaluate it for rank 0
(``MPIMapper.start_worker``).

Why not ``srun -n N``: ranks that slurmstepd starts are outside any
confinement of ours, and each must reach the step's PMIx server on the
node's own loopback; confining them would mean joining namespaces built
elsewhere and opening the host's loopback to hostile code. docs/slurm.md
says more.

Rank 0 sends its progress and checkpoints as the fit process would, as
lines on a FIFO in the fit's private temporary directory (``mpirun`` closes
every other descriptor of its children), and leaves its outcome record
there; `runRanks` relays the lines, and returns the result or raises
`RanksFailed` with the record. A rank that fails before the fit starts
leaves its own record and aborts the whole run.
"""

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile

from reflservd.fitoptions import modelArgs
from reflworkerd.wire import MAX_CHILD_LINE, LineBuffer, parseLine

SPEC_NAME = "spec.json"
MESSAGES_NAME = "messages"
OUTCOME_NAME = "outcome.json"
RANK_OUTCOME = "rank-%d.json"

MPIRUN = os.path.realpath(shutil.which("mpirun", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/mpirun")
"""Open MPI's launcher, resolved on the host: inside the fit's root
``/usr/bin/mpirun`` is a link through ``/etc/alternatives``, which is not there."""

MPI_ENVIRONMENT = {
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "self,vader",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_mca_base_component_show_load_errors": "0",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_hwloc_base_binding_policy": "none",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "HWLOC_HIDE_ERRORS": "2",
}
"""What Open MPI is told inside the fit: one node, ranks talking through
shared memory only (``vader``, copying through it: reading another rank's
memory directly, CMA, needs ptrace rights the fit does not have), no
binding (the fit has no ``/sys`` to learn the node's topology from, and
Slurm has already placed it on its CPUs)."""


class RanksFailed(Exception):
    """The MPI run did not complete: ``outcome`` is the ERROR record to report."""

    def __init__(self, outcome):
        Exception.__init__(self, outcome.get("error"))
        self.outcome = outcome


def launcherAvailable():
    """Whether this host can start MPI ranks: Open MPI's launcher and mpi4py."""
    import importlib.util

    return os.access(MPIRUN, os.X_OK) and importlib.util.find_spec("mpi4py") is not None


def runRanks(jobDir, request, ranks, progress, checkpoint=None, checkpointEvery=300, backend=None):
    """In the confined fit: run the fit of ``request`` over ``ranks`` MPI ranks;
    rank 0's result summary, or `RanksFailed`."""
    from reflworkerd import outcome

    if not launcherAvailable():
        raise RanksFailed(outcome.error(
            "option mpi=%d cannot run here: this node has no Open MPI launcher (%s) or no mpi4py for %s "
            "(Debian: apt-get install openmpi-bin libopenmpi-dev; pip install --no-binary mpi4py 'reflservd[mpi]')"
            % (ranks, MPIRUN, sys.executable)))
    if os.getpid() != 1:
        raise RanksFailed(outcome.error(
            "option mpi=%d needs a worker whose fits run in namespaces (--sandbox namespaces or apparmor): "
            "there the fit is pid 1 of its own pid namespace, and every rank ends with it" % (ranks,)))
    work = tempfile.mkdtemp(prefix="reflfit-mpi-")
    try:
        with open(os.path.join(work, SPEC_NAME), "w") as f:
            json.dump({"jobDir": jobDir, "request": request, "checkpointEvery": checkpointEvery,
                       "backend": backend}, f)
        messages = os.path.join(work, MESSAGES_NAME)
        os.mkfifo(messages, 0o600)
        reader = os.open(messages, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            code = _launch(work, ranks, reader, progress, checkpoint)
        finally:
            os.close(reader)
        record = _outcomeOf(work, ranks, code)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if record.get("status") != "COMPLETE":
        raise RanksFailed(record)
    return record["result"]


def rankEnvironment(work):
    """The ranks' environment: the fit's, Open MPI's settings, this Python's path
    (the packages bound into the fit's root), and the caches of numba and
    fontconfig in ``work`` (the fork host's preload spares a forked fit both;
    `seedNumbaCache` fills numba's)."""
    env = dict(os.environ, **MPI_ENVIRONMENT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env["NUMBA_CACHE_DIR"] = os.path.join(work, "numba")
    env["XDG_CACHE_HOME"] = os.path.join(work, "cache")     # fontconfig's, as matplotlib starts
    if os.geteuid() == 0:
        # A fit without a slot uid (--slot-uid-base 0) is uid 0 without capabilities.
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


NUMBA_PACKAGES = ("refl1d", "bumps")
"""The packages whose numba kernels the ranks find compiled (`seedNumbaCache`)."""


def seedNumbaCache(cacheDir, packages=NUMBA_PACKAGES):
    """Copy the numba kernels of ``packages`` that are compiled in their source
    tree (each ``__pycache__``'s ``.nbi``/``.nbc``, as the node program's preload
    left or found them) into ``cacheDir``, where numba looks for them with
    ``NUMBA_CACHE_DIR`` set; the number of files copied.

    A rank is a fresh interpreter: without them it compiles refl1d's and
    DREAM's kernels again (about 25 s of CPU here), in every rank of every
    fit. In the fit's root the source tree is read-only, and numba uses no
    cache directory it cannot write to. A kernel the fit's uid cannot read
    (numba wrote it with mode 0600 under a strict umask) is left out: the
    ranks compile that one themselves."""
    import importlib

    from numba.core.caching import UserProvidedCacheLocator

    copied = 0
    for name in packages:
        root = os.path.dirname(importlib.import_module(name).__file__)
        for directory, _, files in os.walk(root):
            kernels = [f for f in files if f.endswith((".nbi", ".nbc"))]
            if os.path.basename(directory) != "__pycache__" or not kernels:
                continue
            source = os.path.join(os.path.dirname(directory), "kernels.py")
            target = os.path.join(cacheDir, UserProvidedCacheLocator.get_suitable_cache_subpath(source))
            os.makedirs(target, exist_ok=True)
            for kernel in kernels:
                try:
                    shutil.copyfile(os.path.join(directory, kernel), os.path.join(target, kernel))
                except OSError:
                    continue        # not readable by the fit's uid (cached with mode 0600): compiled anew
                copied += 1
    return copied


def _launch(work, ranks, reader, progress, checkpoint):
    command = [MPIRUN, "-n", str(ranks), sys.executable, "-m", "reflworkerd.mpifit",
               os.path.join(work, SPEC_NAME)]
    env = rankEnvironment(work)
    seedNumbaCache(env["NUMBA_CACHE_DIR"])
    launcher = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, cwd=work)
    lines = LineBuffer(MAX_CHILD_LINE)
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    listening = True
    while launcher.poll() is None:
        if not listening:
            launcher.wait()
            break
        for _, mask in poller.poll(200):
            data = _readAll(reader)
            if not data and mask & select.POLLHUP:
                poller.unregister(reader)       # rank 0 is done writing
                listening = False
            for line in lines.feed(data):
                _relay(parseLine(line), progress, checkpoint)
    for line in lines.feed(_readAll(reader)):
        _relay(parseLine(line), progress, checkpoint)
    return launcher.returncode


def _readAll(fd):
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _relay(message, progress, checkpoint):
    if not isinstance(message, dict):
        return
    if message.get("type") == "progress" and isinstance(message.get("progress"), dict):
        progress(message["progress"])
    elif message.get("type") == "checkpoint" and checkpoint is not None and isinstance(message.get("path"), str):
        checkpoint(message["path"])


def _outcomeOf(work, ranks, code):
    from reflworkerd import jobfiles, outcome

    for name in [OUTCOME_NAME] + [RANK_OUTCOME % (rank,) for rank in range(ranks)]:
        try:
            with open(os.path.join(work, name), "rb") as f:
                record = jobfiles.loadJSON(f.read(outcome.MAX_OUTCOME_BYTES + 1), outcome.MAX_OUTCOME_BYTES)
        except FileNotFoundError:
            continue
        except ValueError as e:
            return outcome.error("rank 0 left no outcome record: %s" % (e,))
        if isinstance(record, dict) and record.get("status") in ("COMPLETE", "ERROR"):
            return record
    return outcome.error("the MPI ranks ended (mpirun exit code %s) before rank 0 reported how the fit "
                         "ended; see results/stderr.txt" % (code,))


class _Messages:
    """Rank 0's end of the FIFO: the fit's progress and checkpoints as lines."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def send(self, message):
        from reflworkerd.wire import encode, writeAll

        try:
            writeAll(self.fd, encode(message, allow_nan=False, default=str))
        except (BrokenPipeError, ValueError):
            pass

    def progress(self, progress):
        self.send({"type": "progress", "progress": progress})

    def checkpoint(self, path):
        self.send({"type": "checkpoint", "path": path})


def _evaluate(jobDir, request, backend):
    """A rank other than 0: check the request as rank 0 does, load the model
    (given its arguments, as rank 0 gives them) and evaluate it for rank 0
    until it says the fit is over."""
    from pathlib import Path

    from reflworkerd import runner

    data = request["data"]
    path = runner.modelPath(jobDir, data)
    runner.checkOptions(data.get("options"), backend=backend)
    runner.preload()
    from bumps.fitproblem import load_problem
    from bumps.mapper import MPIMapper

    problem = load_problem(Path(path).absolute(), args=modelArgs(data.get("args")))
    try:
        MPIMapper.start_worker(problem)
    except SystemExit as exit:
        if exit.code:
            raise


def main(specPath):
    """One rank (``python -m reflworkerd.mpifit SPEC``, started by `runRanks`)."""
    from mpi4py import MPI

    from reflworkerd import outcome, runner

    work = os.path.dirname(specPath)
    with open(specPath) as f:
        spec = json.load(f)
    comm = MPI.COMM_WORLD
    size = comm.size        # rank 0 finalizes MPI when the fit ends (MPIMapper.stop_mapper)
    os.chdir(spec["jobDir"])
    if comm.rank != 0:
        try:
            _evaluate(spec["jobDir"], spec["request"], spec["backend"])
        except BaseException as exc:
            record = (outcome.error(str(exc)) if isinstance(exc, runner.JobError)
                      else runner.errorOutcome(exc, spec["jobDir"]))
            record["error"] = "MPI rank %d: %s" % (comm.rank, record["error"])
            outcome.write(work, record, RANK_OUTCOME % (comm.rank,))
            comm.Abort(1)
        return 0
    messages = _Messages(os.path.join(work, MESSAGES_NAME))
    record = runner.outcomeOf(spec["jobDir"], spec["request"], messages.progress,
                              checkpointEvery=spec["checkpointEvery"], checkpoint=messages.checkpoint,
                              backend=spec["backend"], rank=0)
    if record.get("status") == "COMPLETE" and isinstance(record.get("result"), dict):
        record["result"]["mpi"] = size
    outcome.write(work, record, OUTCOME_NAME)
    os.close(messages.fd)
    if record.get("status") != "COMPLETE" and not MPI.Is_finalized():
        comm.Abort(1)       # the other ranks may still wait for points to evaluate
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
