"""The result cache: how long a user waits for a fit the cache answers.

Real ``twistd reflservd`` and ``twistd reflworkerd`` processes on loopback,
the nickel film of refl1d's examples (the tests' model and four data files)
fitted once with LM and seed 5. Then, the worker stopped (so that nothing
else runs meanwhile), the same request is submitted ``--runs`` times as is
(each answered from the cache: a 201 whose job is COMPLETE, its result files
hard links) and ``--runs`` times with ``"cache": false`` (an ordinary submit:
a 201 whose job is PENDING), interleaved; the time of each is from sending
``POST /api/v1/jobs`` to its answer, through the tests' HTTP client (the
multipart body built from the files each time, as for both).

Rows: the median cached answer, against the median ordinary submit (goal:
at most 3 times it: the cache hashes the uploads and links the result files
on top of the submit's writes); and, informative, the time the first job
took from its submit to COMPLETE (what a cache answer saves).

``python -m bench.cache [--runs N] [--keep]``
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time

from bench import Result, formatTable

RUNS = 20
GOAL_RATIO = 3.0
OPTIONS = {"fit": "lm", "steps": 200, "seed": 5}


def request(cache=True):
    body = {"name": "bench cache", "notify": "", "service": "refl1d",
            "data": {"model": "nifilm.py", "options": OPTIONS}}
    if not cache:
        body["cache"] = False
    return body


def timedSubmit(api, files, cache):
    started = time.monotonic()
    record = api.submit(request(cache), files)
    return time.monotonic() - started, record


def run(runs=RUNS, keep=False):
    from test.conftest import ServerProcess, WorkerProcess, nifilmFiles

    base = tempfile.mkdtemp(prefix="bench-cache-")
    server = ServerProcess(base + "/server")
    worker = WorkerProcess(base + "/worker", server, queue="bench")
    files = nifilmFiles()
    try:
        server.start()
        worker.start()
        started = time.monotonic()
        first = server.api.submit(request(), files)
        done = server.api.waitStatus(first["id"], "COMPLETE", "ERROR", timeout=300)
        fitted = time.monotonic() - started
        if done["status"] != "COMPLETE":
            raise RuntimeError("the fit ended %s: %s" % (done["status"], done.get("error")))
        worker.stop()
        cached, ordinary = [], []
        for _ in range(runs):
            seconds, record = timedSubmit(server.api, files, cache=True)
            if record["status"] != "COMPLETE" or record.get("cachedFrom") is None:
                raise RuntimeError("not answered from the cache: %r" % (record,))
            cached.append(seconds)
            seconds, record = timedSubmit(server.api, files, cache=False)
            if record["status"] != "PENDING":
                raise RuntimeError("an uncached submit is %s" % (record["status"],))
            ordinary.append(seconds)
    finally:
        worker.stop(timeout=30)
        server.stop(timeout=30)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    cachedMedian, ordinaryMedian = statistics.median(cached), statistics.median(ordinary)
    return [
        Result("cached answer (p50 of %d)" % (runs,), "%.1f ms" % (cachedMedian * 1e3,),
               "ordinary submit %.1f ms" % (ordinaryMedian * 1e3,),
               "<= %g x the submit" % (GOAL_RATIO,), cachedMedian <= GOAL_RATIO * ordinaryMedian),
        Result("the same fit run (submit to COMPLETE)", "%.2f s" % (fitted,), "", "", None),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="submits of each kind (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    return run(runs=max(3, args.runs), keep=args.keep)


if __name__ == "__main__":
    print()
    print(formatTable(main(sys.argv[1:])))
