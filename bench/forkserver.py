"""What the fork server buys: a small fit forked from a preloaded process vs a cold ``refl1d``.

Measured, on the nickel film of refl1d's examples (LM fit, the same model and
data as the tests):

- the time of the fit through the fork server, from ``LocalBackend.run`` to its
  ``done`` (fork, confine, fit, export, session file, outcome read back),
  against a cold ``refl1d --batch MODEL --fit=lm --export=results
  --session=…`` of the same fit (process start to exit), median of each,
  interleaved so that both see the same machine;
- the fork server's own overhead per job: a ``count`` job of 0 steps (fork,
  confine ``none``, hand-off, exit, outcome read back), median;
- the fork server's start (imports and numba warm-up) and its memory (RSS and,
  where the kernel gives it, PSS: what the forked fits share is counted once).

The reactor runs in a child process (``--measure``) so that ``run()`` can be
called next to the other benchmarks of ``python -m bench``.

``python -m bench.forkserver [--runs N] [--count-runs N]``
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import Result, formatTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "test", "models", "nifilm.py")
DATA_NAMES = ["nifilm-tof-%d.dat" % i for i in (1, 2, 3, 4)]
RUNS = 7
COUNT_RUNS = 30


def exampleData(names=DATA_NAMES):
    """The directory of refl1d's example data holding ``names``: $REFL1D_EXAMPLES,
    shared/ beside the checkout, or /work/shared."""
    for path in (
        os.environ.get("REFL1D_EXAMPLES", ""),
        os.path.join(ROOT, "..", "shared", "data", "refl1d-examples"),
        "/work/shared/data/refl1d-examples",
    ):
        if path and all(os.path.exists(os.path.join(path, name)) for name in names):
            return path
    raise SystemExit("refl1d example data (%s) not found; set REFL1D_EXAMPLES" % (", ".join(names),))


def makeJob(base, n):
    jobDir = os.path.join(base, "job%d" % n)
    os.makedirs(jobDir)
    shutil.copy(MODEL, jobDir)
    data = exampleData()
    for name in DATA_NAMES:
        shutil.copy(os.path.join(data, name), jobDir)
    return jobDir


def memoryOf(pid):
    """(RSS, PSS) in bytes; PSS is None where /proc has no smaps_rollup."""
    values = {}
    for name in ("status", "smaps_rollup"):
        try:
            with open("/proc/%d/%s" % (pid, name)) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("VmRSS", "Pss"):
                        values[key] = int(rest.split()[0]) * 1024
        except OSError:
            pass
    return values.get("VmRSS"), values.get("Pss")


def measure(runs, countRuns):
    """In the child process: run the reactor, measure, print one JSON line."""
    from twisted.internet import defer, task

    from reflworkerd.local import LocalBackend

    refl1d = os.path.join(os.path.dirname(sys.executable), "refl1d")

    @defer.inlineCallbacks
    def main(reactor):
        base = tempfile.mkdtemp(prefix="bench-forkserver-")
        figures = {"fork": [], "cold": [], "count": []}
        backend = LocalBackend(reactor, python=sys.executable, env=dict(os.environ))
        try:
            started = time.perf_counter()
            yield backend.start()
            figures["start"] = time.perf_counter() - started
            n = 0
            for _ in range(runs):
                n += 1
                jobDir = makeJob(base, n)
                started = time.perf_counter()
                outcome = yield backend.run(n, jobDir, {"service": "refl1d", "data": {"model": "nifilm.py", "options": {"fit": "lm"}}}, lambda p: None).done
                figures["fork"].append(time.perf_counter() - started)
                if outcome["status"] != "COMPLETE":
                    raise RuntimeError("fit through the fork backend failed: %r" % (outcome,))
                n += 1
                jobDir = makeJob(base, n)
                started = time.perf_counter()
                code = yield _spawnAndWait(
                    reactor, refl1d, ["--batch", "nifilm.py", "--fit=lm", "--export=results", "--session=session.h5"], jobDir
                )
                figures["cold"].append(time.perf_counter() - started)
                if code != 0:
                    raise RuntimeError("refl1d --batch exited with %r" % (code,))
            countDir = os.path.join(base, "count")
            os.makedirs(countDir)
            for k in range(countRuns):
                started = time.perf_counter()
                outcome = yield backend.run("count%d" % k, countDir, {"service": "count", "data": 0}, lambda p: None).done
                figures["count"].append(time.perf_counter() - started)
                if outcome["status"] != "COMPLETE":
                    raise RuntimeError("count through the fork backend failed: %r" % (outcome,))
            figures["rss"], figures["pss"] = memoryOf(backend.pid)
        finally:
            yield backend.stop()
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(figures))

    task.react(main)


def _spawnAndWait(reactor, executable, args, path):
    """Run a process to its end with the reactor; fires with its exit code."""
    from twisted.internet import defer, protocol

    done = defer.Deferred()

    class Waiter(protocol.ProcessProtocol):
        def processEnded(self, reason):
            done.callback(reason.value.exitCode)

    reactor.spawnProcess(Waiter(), executable, [executable] + args, env=dict(os.environ), path=path, childFDs={0: "w", 1: "r", 2: "r"})
    return done


def run(say=print, runs=RUNS, countRuns=COUNT_RUNS):
    out = subprocess.run(
        [sys.executable, "-m", "bench.forkserver", "--measure", "--runs", str(runs), "--count-runs", str(countRuns)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError("bench.forkserver --measure failed:\n%s" % (out.stderr[-4000:],))
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    fork = statistics.median(figures["fork"]) * 1000
    cold = statistics.median(figures["cold"]) * 1000
    count = statistics.median(figures["count"]) * 1000
    rss, pss = figures["rss"], figures["pss"]
    memory = "%.0f MB RSS" % (rss / 2**20,) + (", %.0f MB PSS" % (pss / 2**20,) if pss else "")
    results = [
        Result("nickel film LM fit via fork server (median of %d)" % runs, "%.0f ms" % fork,
               "%.0f ms (cold refl1d --batch)" % cold, "faster than cold", fork < cold),
        Result("fork server overhead per job: count(0) run -> done (median of %d)" % countRuns,
               "%.1f ms" % count, "", "", None),
        Result("fork server start (imports + numba warm-up)", "%.2f s" % figures["start"], "", "", None),
        Result("fork server memory", memory, "", "", None),
    ]
    for row in results:
        say("%s: %s%s" % (row.name, row.figure, " vs %s" % row.reference if row.reference else ""))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.forkserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="fits of each kind (default %(default)s)")
    parser.add_argument("--count-runs", type=int, default=COUNT_RUNS, help="count(0) jobs (default %(default)s)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.runs, args.count_runs)
        return None
    return run(runs=args.runs, countRuns=args.count_runs)


if __name__ == "__main__":
    rows = main(sys.argv[1:])
    if rows is not None:
        print()
        print(formatTable(rows))
