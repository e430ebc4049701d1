"""Fit series: a 500-member series of the ``count`` service submitted in one
request and run to the end, next to the same 500 jobs submitted one by one.

Real ``twistd reflservd`` and ``twistd reflworkerd`` processes on loopback
(the worker with 2 slots, ``--sandbox none``: the figure is the queue's, not
the confinement's), the server without per-submitter limits. After one
warm-up job, in the same run:

(a) the reference: 500 ``count`` jobs (``data: 0``), each its own
    ``POST /api/v1/jobs``, one after the other; the time until the last
    submit answered, and until every job is COMPLETE;
(b) the series: ``POST /api/v1/series`` with 500 ``count`` members; the time
    until it answered (every member journaled in one record), and until
    every member is COMPLETE (each waited for with the events long-poll);
(c) one ordinary submit (median of 20) beside the series' one request;
(d) the pages: the job list (``/``, now holding the 1,000 jobs) and the
    series' page listing its 500 members, median of 10 each, against the job
    list before the runs (one job).

Goals: the series' submit within 20 times one ordinary submit (one request
for 500 jobs), its completion no slower than the 500 jobs one by one (+10%),
and its page within 1 s.

``python -m bench.series [--members N]``
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

from bench import Result, formatTable

MEMBERS = 500
JOB = {"name": "bench count", "notify": "", "service": "count", "data": 0}


def timed(f, *args):
    started = time.perf_counter()
    value = f(*args)
    return time.perf_counter() - started, value


def getPage(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def pageTime(url, runs=10):
    return statistics.median(timed(getPage, url)[0] for _ in range(runs))


def waitAll(api, ids, timeout=600):
    """Wait (events long-poll, bounded) for every job in ``ids`` to end COMPLETE."""
    for jobId in ids:
        record = api.waitFor(jobId, lambda r: r["finished"] is not None, timeout=timeout, what="its end")
        if record["status"] != "COMPLETE":
            raise RuntimeError("job %d ended %s: %s" % (jobId, record["status"], record["error"]))


def measure(base, members):
    from test.conftest import ServerProcess, WorkerProcess

    server = ServerProcess(os.path.join(base, "server"))
    worker = WorkerProcess(os.path.join(base, "worker"), server, queue="bench", slots=2)
    server.start()
    worker.start()
    try:
        api = server.api
        waitAll(api, [api.submit(JOB, {})["id"]])          # warm-up: first lease, first fork
        figures = {"listBefore": pageTime(server.url + "/")}

        started = time.perf_counter()
        ids = [api.submit(JOB, {})["id"] for _ in range(members)]
        figures["jobsSubmit"] = time.perf_counter() - started
        waitAll(api, ids)
        figures["jobsDone"] = time.perf_counter() - started

        document = {"job": JOB, "members": [{}] * members}
        started = time.perf_counter()
        answer = api.ok("POST", "/api/v1/series", body=document, timeout=120)
        figures["seriesSubmit"] = time.perf_counter() - started
        waitAll(api, [m["id"] for m in answer["members"]])
        figures["seriesDone"] = time.perf_counter() - started
        if api.ok("GET", "/api/v1/series/%d" % (answer["id"],))["counts"] != {"COMPLETE": members}:
            raise RuntimeError("the series did not end with every member COMPLETE")

        figures["oneSubmit"] = statistics.median(timed(api.submit, JOB, {})[0] for _ in range(20))
        figures["listAfter"] = pageTime(server.url + "/")
        figures["seriesPage"] = pageTime("%s/series/%d" % (server.url, answer["id"]))
        return figures
    finally:
        worker.stop(timeout=30)
        server.stop(timeout=30)


def ms(seconds):
    return "%.1f ms" % (seconds * 1000,)


def run(say=print, members=MEMBERS):
    base = tempfile.mkdtemp(prefix="bench-series-")
    try:
        f = measure(base, members)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    say("series of %d: submit %.3f s, done %.2f s; one by one: submits %.2f s, done %.2f s"
        % (members, f["seriesSubmit"], f["seriesDone"], f["jobsSubmit"], f["jobsDone"]))
    return [
        Result("series of %d count jobs: submit (one request) -> 201" % (members,),
               "%.3f s" % (f["seriesSubmit"],), "%.2f s for %d submits one by one; one submit %s"
               % (f["jobsSubmit"], members, ms(f["oneSubmit"])),
               "<= 20 x one submit", f["seriesSubmit"] <= 20 * f["oneSubmit"]),
        Result("series of %d count jobs: submit -> every member COMPLETE" % (members,),
               "%.2f s" % (f["seriesDone"],), "%.2f s one by one" % (f["jobsDone"],),
               "<= 1.1 x one by one", f["seriesDone"] <= 1.1 * f["jobsDone"]),
        Result("series page, %d members" % (members,), ms(f["seriesPage"]), "", "<= 1 s",
               f["seriesPage"] <= 1.0),
        Result("job list page, %d jobs" % (2 * members + 22,), ms(f["listAfter"]),
               "%s with 1 job" % (ms(f["listBefore"]),), "", None),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=MEMBERS, help="members (default %(default)s)")
    args = parser.parse_args(argv)
    results = run(members=args.members)
    print(formatTable(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
