"""How many cores pay off: a DREAM fit with ``parallel: 1`` and ``parallel: 2``
through the queue, against the same fit run locally with ``refl1d --batch``.

The fit: the polymer brush pair of refl1d's examples (``test/models/brush.py``
on ``10ndt001.refl`` and ``10nht001.refl``: 16 parameters, two measurements),
DREAM with ``--samples``, ``--burn`` and ``--seed`` fixed. Each run is timed
from its start to its end:

- through the queue: real ``twistd reflservd`` and ``twistd reflworkerd``
  processes on loopback, the worker under ``--sandbox namespaces`` (``none``
  where this host has no namespaces) with its default limits (a uid per slot,
  ``nproc=512``); the job submitted with ``POST /api/v1/jobs`` and waited for
  until it is ``COMPLETE`` with its result files on the server: the whole
  user's wait, the fork, confinement and uploads included;
- locally: ``refl1d --batch brush.py --fit=dream … --parallel=N
  --export=results --session=session.h5`` of the same files (process start to
  exit), with the same thread settings as the worker's fits (one BLAS/numba
  thread per process).

The runs alternate (local, local at nice 19, queue, for 1 then 2 processes,
``--rounds`` times) so that all see the same machine; the medians are
compared. Goal: the queue within 5 % of the local run at each ``parallel``.
The worker runs its fits at nice 19, so on a machine busy with other work the
queue loses to a local run at nice 0 by the priority alone: the local run at
nice 19 is the reference that shows the queue's own cost. The speed-up of 2 processes
over 1 is shown for both, with the machine's load average, since other work on
the same cores takes from it first.

``python -m bench.parallel [--rounds N] [--samples N] [--burn N]``
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import Result, formatTable
from bench.forkserver import ROOT, exampleData
from bench.worker import Pair, namespacesMissing

MODEL = os.path.join(ROOT, "test", "models", "brush.py")
DATA_NAMES = ["10ndt001.refl", "10nht001.refl"]
SAMPLES = 16000
BURN = 100
SEED = 1
ROUNDS = 2
PROCESSES = (1, 2)
GOAL = 1.05
NICENESS = 19
"""The worker's fits run at nice 19 (they yield to the node's other work): the
local run is also timed at it, which tells the queue's own cost from the
priority's on a busy machine."""
THREADS = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                  "NUMBA_NUM_THREADS")}


def jobFiles():
    data = exampleData(DATA_NAMES)
    files = {"brush.py": MODEL}
    files.update({name: os.path.join(data, name) for name in DATA_NAMES})
    return files


def options(parallel, samples, burn):
    return {"fit": "dream", "samples": samples, "burn": burn, "seed": SEED, "parallel": parallel}


def localRun(base, n, parallel, samples, burn, niceness=0):
    """One ``refl1d --batch`` of the fit, process start to exit, at ``niceness``: seconds."""
    jobDir = os.path.join(base, "local%d" % n)
    os.makedirs(jobDir)
    for name, path in jobFiles().items():
        shutil.copy(path, os.path.join(jobDir, name))
    refl1d = os.path.join(os.path.dirname(sys.executable), "refl1d")
    command = [refl1d, "--batch", "brush.py", "--export=results", "--session=session.h5"]
    command += ["--%s=%s" % (name, value) for name, value in options(parallel, samples, burn).items()]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=jobDir, capture_output=True, env=dict(os.environ, **THREADS),
                          preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError("refl1d --batch exited %d:\n%s" % (done.returncode, done.stderr[-3000:]))
    shutil.rmtree(jobDir, ignore_errors=True)
    return elapsed


def load():
    return "load %.1f" % (os.getloadavg()[0],)


def run(say=print, rounds=ROUNDS, samples=SAMPLES, burn=BURN):
    missing = namespacesMissing()
    mode = "none" if missing else "namespaces"
    if missing:
        say("--sandbox namespaces is not available here (%s): the queue runs use --sandbox none" % (missing,))
    base = tempfile.mkdtemp(prefix="bench-parallel-")
    pair = Pair(base, mode)
    queue = {n: [] for n in PROCESSES}
    local = {n: [] for n in PROCESSES}
    niced = {n: [] for n in PROCESSES}
    confinement = None
    try:
        pair.start()
        n = 0
        for _ in range(rounds):
            for parallel in PROCESSES:
                n += 1
                local[parallel].append(localRun(base, n, parallel, samples, burn))
                say("local refl1d --batch, parallel %d: %.1f s (%s)" % (parallel, local[parallel][-1], load()))
                n += 1
                niced[parallel].append(localRun(base, n, parallel, samples, burn, niceness=NICENESS))
                say("local refl1d --batch at nice %d, parallel %d: %.1f s (%s)"
                    % (NICENESS, parallel, niced[parallel][-1], load()))
                request = {"name": "bench brush", "notify": "bench@example.org", "service": "refl1d",
                           "data": {"model": "brush.py", "options": options(parallel, samples, burn)}}
                sample = pair.job(request, jobFiles(), timeout=600)
                if sample["result"].get("parallel") != parallel:
                    raise RuntimeError("the queued fit ran with parallel %r, not %d"
                                       % (sample["result"].get("parallel"), parallel))
                queue[parallel].append(sample["e2e"])
                confinement = sample["confinement"]
                say("queue, parallel %d: %.1f s end to end, the fit process %.1f s (%s)"
                    % (parallel, sample["e2e"], sample["fit"], load()))
    finally:
        pair.stop()
        shutil.rmtree(base, ignore_errors=True)
    say("confinement: %s" % (confinement,))
    what = "brush DREAM (16 parameters, samples %d, burn %d)" % (samples, burn)
    results = []
    for parallel in PROCESSES:
        q, l = statistics.median(queue[parallel]), statistics.median(local[parallel])
        results.append(Result(
            "%s, parallel %d, queue --sandbox %s (median of %d)" % (what, parallel, mode, rounds),
            "%.1f s (%.2f× local)" % (q, q / l), "%.1f s (refl1d --batch --parallel=%d)" % (l, parallel),
            "≤ %.2f× local" % (GOAL,), q <= GOAL * l))
        results.append(Result(
            "    the same local run at nice %d, as the worker runs its fits" % (NICENESS,),
            "%.1f s (queue %.2f× this)" % (statistics.median(niced[parallel]), q / statistics.median(niced[parallel])),
            "", "", None))
    q1, q2 = statistics.median(queue[1]), statistics.median(queue[2])
    l1, l2 = statistics.median(local[1]), statistics.median(local[2])
    results.append(Result("    parallel 2 over 1, %d cores here" % (os.cpu_count() or 0,),
                          "%.2f× faster in the queue" % (q1 / q2,), "%.2f× faster locally" % (l1 / l2,), "", None))
    for row in results:
        say("%s: %s%s" % (row.name, row.figure, " vs " + row.reference if row.reference else ""))
    return results


def dreamArguments(module, argv, rounds=ROUNDS, samples=SAMPLES, burn=BURN):
    """``--rounds``, ``--samples`` and ``--burn`` of a DREAM benchmark ``module`` read from ``argv``."""
    parser = argparse.ArgumentParser(prog="python -m " + module.__name__,
                                     description=module.__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds, help="runs of each kind (default %(default)s)")
    parser.add_argument("--samples", type=int, default=samples, help="DREAM samples (default %(default)s)")
    parser.add_argument("--burn", type=int, default=burn, help="DREAM burn-in steps (default %(default)s)")
    args = parser.parse_args(argv)
    return {"rounds": args.rounds, "samples": args.samples, "burn": args.burn}


def main(argv=None):
    return run(**dreamArguments(sys.modules[__name__], argv))


if __name__ == "__main__":
    print()
    print(formatTable(main(sys.argv[1:])))
