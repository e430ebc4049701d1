"""What Slurm adds per job over the local backend.

One real one-node Slurm (``test/slurmcluster.py``: munged, slurmctld, slurmd
on loopback), one ``twistd reflservd`` and, in turn, a worker with
``--backend local`` and one with ``--backend slurm`` (``--slurm-poll 0.5``),
both ``--sandbox none``. Each takes the nickel film LM fit of the tests, one
untimed warm-up job, then ``--runs`` jobs one after the other, each timed
from its submit until it is ``COMPLETE`` with its result files stored on the
server (the events long-poll says so). The figure is the median through
Slurm, the reference the median through the local backend in the same run;
the goal is an overhead under 1 s per job.

Where the time goes: a Slurm job starts a cold Python on the node (no
preloaded fork host, so the imports of refl1d and bumps and numba's first
compilations are paid per job), waits for Slurm's scheduler to place it, and
its end is seen at the next ``squeue`` poll.

``python -m bench.slurm [--runs N]`` (as root, with slurm-wlm and munge
installed; otherwise it says why it cannot run).
"""

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench import Result, formatTable
from bench.worker import REQUEST, jobFiles

RUNS = 10
OVERHEAD_GOAL = 1.0


def timeJobs(api, runs):
    samples = []
    for n in range(runs + 1):
        started = time.time()
        record = api.submit(REQUEST, jobFiles())
        record = api.waitFor(record["id"], lambda r: r["finished"] is not None, timeout=180,
                             what="its end")
        if record["status"] != "COMPLETE":
            raise RuntimeError("bench job ended %s: %s" % (record["status"], record["error"]))
        if n:
            samples.append(time.time() - started)
    return samples


@contextlib.contextmanager
def slurmCluster(what):
    """A started one-node `test.slurmcluster.SlurmCluster`, its ``SLURM_CONF`` in this
    process's environment (the daemons started meanwhile inherit it) until it stops;
    ``RuntimeError`` saying why where it cannot run (``what``: the benchmark)."""
    from test.slurmcluster import SlurmCluster, unavailableReason

    reason = unavailableReason()
    if reason:
        raise RuntimeError("the %s cannot run here: %s" % (what, reason))
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="reflslurm-")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def run(runs=RUNS):
    with slurmCluster("Slurm benchmark") as cluster:
        return _run(cluster, runs)


def _run(cluster, runs):
    from test.conftest import ServerProcess, WorkerProcess

    base = tempfile.mkdtemp(prefix="bench-slurm-")
    server = ServerProcess(os.path.join(base, "server")).start()
    try:
        local = WorkerProcess(os.path.join(base, "local"), server, queue="local").start()
        try:
            localTimes = timeJobs(server.api, runs)
        finally:
            local.stop(timeout=30)
        slurm = WorkerProcess(os.path.join(base, "slurm"), server, queue="cluster", args=[
            "--backend", "slurm", "--shared-dir", os.path.join(base, "shared"),
            "--slurm-partition", cluster.partition, "--slurm-poll", "0.5"]).start()
        try:
            slurmTimes = timeJobs(server.api, runs)
        finally:
            slurm.stop(timeout=30)
    finally:
        server.stop(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    slurmMedian, localMedian = statistics.median(slurmTimes), statistics.median(localTimes)
    overhead = slurmMedian - localMedian
    return [
        Result("nickel LM job end to end through Slurm (median of %d)" % (runs,),
               "%.2f s" % (slurmMedian,), "%.2f s local backend" % (localMedian,), "", None),
        Result("    Slurm's overhead per job over the local backend", "%.2f s" % (overhead,), "",
               "< %.1f s" % (OVERHEAD_GOAL,), overhead < OVERHEAD_GOAL),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="timed jobs per backend (default %(default)s)")
    args = parser.parse_args(argv)
    return run(runs=args.runs)


if __name__ == "__main__":
    print()
    print(formatTable(main(sys.argv[1:])))
