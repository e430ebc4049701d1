"""An MPI fit against the serial fit, through Slurm.

One real one-node Slurm (``test/slurmcluster.py``), one ``twistd reflservd``
and one ``twistd reflworkerd --backend slurm --sandbox namespaces`` (``none``
where this host has no namespaces; a uid per slot and the shipped limits).
The fit: DREAM on the polymer brush pair (``test/models/brush.py`` on
``10ndt001.refl`` and ``10nht001.refl``, 16 parameters), as in
``bench.parallel``, with ``--samples``, ``--burn`` and ``--seed`` fixed. In
each round the same job runs serially, with ``parallel: 2`` (bumps' process
mapper) and with ``mpi: 2`` (two MPI ranks, ``reflworkerd/mpifit.py``), each
timed from its submit until it is ``COMPLETE`` with its result files on the
server. The figure is the median time of ``mpi: 2``; the reference is the
serial median of the same run. There is no goal: the figure says whether
two ranks pay off for this model on this machine, beside ``parallel: 2``.

Two ranks start two cold interpreters inside the fit's confinement (the
ranks import refl1d and bumps and compile numba's kernels themselves: the
fork host's preload is not theirs), so each MPI fit pays a few seconds more
than a fork does before its first evaluation.

``python -m bench.mpi [--rounds N] [--samples N] [--burn N]`` (as root, with
slurm-wlm, munge, openmpi-bin and mpi4py in this Python).
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from bench import Result, formatTable
from bench.parallel import dreamArguments, jobFiles, load
from bench.slurm import slurmCluster
from bench.worker import namespacesMissing

SAMPLES = 8000
BURN = 50
SEED = 1
ROUNDS = 2
KINDS = (("serial", {}), ("parallel 2", {"parallel": 2}), ("mpi 2", {"mpi": 2}))


def timeJob(api, options):
    request = {"name": "bench brush", "notify": "bench@example.org", "service": "refl1d",
               "data": {"model": "brush.py", "options": options}}
    started = time.time()
    record = api.submit(request, jobFiles())
    record = api.waitFor(record["id"], lambda r: r["finished"] is not None, timeout=900, what="its end")
    if record["status"] != "COMPLETE":
        raise RuntimeError("bench job ended %s: %s" % (record["status"], record["error"]))
    return time.time() - started, record


def run(say=print, rounds=ROUNDS, samples=SAMPLES, burn=BURN):
    from reflworkerd import mpifit

    if not mpifit.launcherAvailable():
        raise RuntimeError("the MPI benchmark cannot run here: no Open MPI launcher or no mpi4py "
                           "(apt-get install openmpi-bin libopenmpi-dev; pip install -e '.[mpi]')")
    mode = "none" if namespacesMissing() else "namespaces"
    with slurmCluster("MPI benchmark") as cluster:
        times, fits, confinement = _timeAll(say, cluster, mode, rounds, samples, burn)
    say("confinement: %s" % (confinement,))
    serial = statistics.median(times["serial"])
    serialFit = statistics.median(fits["serial"])
    what = "brush DREAM (16 parameters, samples %d, burn %d) through Slurm, --sandbox %s" % (samples, burn, mode)
    results = [Result(what + ", serial (median of %d)" % (rounds,), "%.1f s" % (serial,), "", "", None),
               Result("    of which the fit (its process, from its start)", "%.1f s" % (serialFit,), "", "", None)]
    for name, _ in KINDS[1:]:
        median, fit = statistics.median(times[name]), statistics.median(fits[name])
        results.append(Result("    %s (median of %d)" % (name, rounds),
                              "%.1f s (%.2f× faster)" % (median, serial / median),
                              "%.1f s serial" % (serial,), "", None))
        results.append(Result("    of which the fit (rank 0 from its start)" if name.startswith("mpi")
                              else "    of which the fit", "%.1f s (%.2f× faster)" % (fit, serialFit / fit),
                              "%.1f s serial" % (serialFit,), "", None))
    for row in results:
        say("%s: %s%s" % (row.name, row.figure, " vs " + row.reference if row.reference else ""))
    return results


def _timeAll(say, cluster, mode, rounds, samples, burn):
    from test.conftest import ServerProcess, WorkerProcess

    base = tempfile.mkdtemp(prefix="bench-mpi-")
    times = {name: [] for name, _ in KINDS}
    fits = {name: [] for name, _ in KINDS}
    confinement = None
    server = ServerProcess(os.path.join(base, "server")).start()
    try:
        worker = WorkerProcess(os.path.join(base, "slurm"), server, queue="cluster", sandbox=mode, args=[
            "--backend", "slurm", "--shared-dir", os.path.join(base, "shared"),
            "--slurm-partition", cluster.partition, "--slurm-poll", "0.5"]).start()
        try:
            for _ in range(rounds):
                for name, extra in KINDS:
                    options = dict({"fit": "dream", "samples": samples, "burn": burn, "seed": SEED}, **extra)
                    elapsed, record = timeJob(server.api, options)
                    if "mpi" in extra and record["result"].get("mpi") != extra["mpi"]:
                        raise RuntimeError("the MPI fit ran over %r ranks" % (record["result"].get("mpi"),))
                    times[name].append(elapsed)
                    fits[name].append(record["result"]["elapsed"])
                    confinement = record["confinement"]
                    say("%s: %.1f s end to end, the fit %.1f s (%s)"
                        % (name, elapsed, record["result"]["elapsed"], load()))
        finally:
            worker.stop(timeout=30)
    finally:
        server.stop(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    return times, fits, confinement


def main(argv=None):
    return run(**dreamArguments(sys.modules[__name__], argv, samples=SAMPLES, burn=BURN))


if __name__ == "__main__":
    print()
    print(formatTable(main(sys.argv[1:])))
