"""Benchmarks of the queue server (``twistd reflservd``), each against its goal.

1. ``submit``: durable submits (``POST /jobs.json``, a 2xx means fsynced) at
   1, 16 and 64 concurrent keep-alive clients; the reference is a bare
   twisted.web resource under the same ``twistd`` that only parses the JSON
   body and answers, driven by the same load generator in the same run.
2. ``dispatch``: a worker waits in a lease long-poll; the time from sending a
   submit to the worker receiving its lease.
3. ``restart``: from process start to ``/healthz`` answering, with a journal of
   1,000,000 records, without and with a snapshot; the reference is the start
   with an empty state directory.
4. ``memory``: the server's RSS with 100,000 pending jobs; the reference is
   its RSS with an empty state.
5. ``waiters``: 1,000 workers hold lease long-polls at once: the server's
   memory increase, and the dispatch latency while they wait.

The load generator is a compact asyncio HTTP/1.1 keep-alive client (one
request in flight per connection, no pipelining) running in its own process;
it reports its own CPU use, and the server's, so that a reader can see which
side was the bottleneck. Everything runs on loopback; every loop is bounded in
count and time; only the processes started here are ended, by pid.

``python -m bench.server [submit dispatch restart memory waiters]``
runs some of them; ``--profile DIR`` runs the submit benchmark's server under
cProfile and prints where its time goes.
"""

import argparse
import asyncio
import http.client
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import Result, formatTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SUBMIT_BODY = json.dumps({"name": "bench", "notify": "bench@example.org", "service": "count",
                          "version": "1", "data": 1}).encode()
CLIENT_LEVELS = (1, 16, 64)
WARMUP_SECONDS = 1.0
MEASURE_SECONDS = 5.0
MAX_REQUESTS = 200_000
DISPATCH_SAMPLES = 200
RESTART_RECORDS = 1_000_000
RESTART_SNAPSHOT_TAIL = 100_000     # records after the snapshot: the default --snapshot-every
RESTART_RUNS = {"empty": 5, "snapshot": 5, "plain": 2}
"""Starts of each kind (the median is reported); a plain replay takes seconds."""
PENDING_JOBS = 100_000
WAITERS = 1000
WAITER_DISPATCH_SAMPLES = 200


# ---- processes we start


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raiseFileLimit():
    """Enough descriptors for a thousand connections (in this process and,
    called as ``preexec_fn``, in the children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Daemon:
    """A ``twistd -n`` process on a loopback port that this benchmark started
    and alone ends (by its pid)."""

    def __init__(self, argv, port, logPath):
        self.argv, self.port, self.logPath = argv, port, logPath
        self.process = None
        self.started = None

    @classmethod
    def reflservd(cls, stateDir, logPath, *options):
        port = freePort()
        # The load comes from one address, faster than people and WAITERS of
        # them at once: no per-submitter limits; the requests name their host "bench".
        argv = [TWISTD, "-n", "--pidfile=", "reflservd", "--listen",
                "tcp:%d:interface=127.0.0.1" % (port,), "--state-dir", stateDir,
                "--submits-per-minute", "0", "--max-pending", "0",
                "--public-host", "bench,127.0.0.1,localhost",
                "--max-connections-per-address", str(WAITERS + 100)] + list(options)
        return cls(argv, port, logPath)

    @classmethod
    def reference(cls, logPath):
        port = freePort()
        argv = [TWISTD, "-n", "--pidfile=", "web", "--listen",
                "tcp:%d:interface=127.0.0.1" % (port,), "--class", "bench.server.ReferenceResource"]
        return cls(argv, port, logPath)

    @property
    def pid(self):
        return self.process.pid

    def start(self, bound=120.0):
        """Start and wait for ``/healthz``; the seconds from spawn to its answer."""
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.logPath, "ab") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=raiseFileLimit)
        return self.waitHealthy(bound)

    def waitHealthy(self, bound):
        deadline = self.started + bound
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("%s exited with %s; see %s"
                                   % (self.argv[3], self.process.returncode, self.logPath))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=bound) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    answer = s.recv(64)
                if answer.startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.005)   # polling for the port to open, bounded by the deadline
        raise RuntimeError("%s did not answer /healthz within %s s" % (self.argv[3], bound))

    def rssBytes(self):
        return rssBytes(self.pid)

    def cpuSeconds(self):
        return cpuSeconds(self.pid)

    def stop(self, bound=30.0):
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=bound)


def rssBytes(pid):
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for pid %d" % (pid,))


def machineBusySeconds():
    """CPU seconds all processes on this machine have used (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def cpuSeconds(pid):
    """User + system CPU seconds of a process, all its threads."""
    with open("/proc/%d/stat" % (pid,)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def fsyncLatency(directory, samples=50, gap=0.01):
    """The median time to append 200 bytes to a file and fsync it, with
    ``gap`` seconds between writes (as the dispatch benchmark spaces its
    submits): what one durable write costs on this disk, for reference."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(samples):
            os.write(fd, b"x" * 200)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
            time.sleep(gap)     # spacing like the dispatch benchmark's, bounded
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times)


# ---- the reference server


def _referenceResource():
    from twisted.web import resource

    class ReferenceResource(resource.Resource):
        """What a submit costs with nothing but twisted.web: parse the JSON
        body, answer JSON. No journal, no store, no routing."""

        isLeaf = True

        def __init__(self):
            resource.Resource.__init__(self)
            self.count = 0

        def render_POST(self, request):
            body = json.loads(request.content.read())
            self.count += 1
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"id": self.count, "job": body}).encode()

        def render_GET(self, request):
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"status": "ok"}'

    return ReferenceResource


def __getattr__(name):
    # twistd web --class imports bench.server.ReferenceResource; twisted.web
    # is imported only then, so the load generator stays light.
    if name == "ReferenceResource":
        return _referenceResource()
    raise AttributeError(name)


# ---- the HTTP client


def httpRequest(method, path, body=b"", contentType=b"application/json"):
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), path.encode())
    if body or method in ("POST", "PUT"):
        head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (contentType, len(body))
    return head + b"\r\n" + body


class HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight at a time.
    ``onResponse(connection, status, body)`` is called for each answer."""

    def __init__(self, onResponse=None):
        self.onResponse = onResponse
        self.transport = None
        self.sent = 0.0
        self.buffer = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self._waiting = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_exception(ConnectionError("the server closed the connection"))

    def send(self, data):
        self.sent = time.perf_counter()
        self.transport.write(data)

    def request(self, data):
        """Send a request; a future of ``(status, body, seconds)``."""
        self._waiting = asyncio.get_running_loop().create_future()
        self.send(data)
        return self._waiting

    def data_received(self, data):
        self.buffer += data
        while True:
            answer = self._parse()
            if answer is None:
                return
            if self._waiting is not None and not self._waiting.done():
                self._waiting.set_result(answer + (time.perf_counter() - self.sent,))
            if self.onResponse is not None:
                self.onResponse(self, *answer)

    def _parse(self):
        """``(status, body)`` of the first whole response in the buffer, which
        it removes; None while the response is not whole."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:stop if stop >= 0 else len(head)])
            if len(buf) < start + length:
                return None
            body = bytes(buf[start:start + length])
            del buf[:start + length]
            return status, body
        if b"\r\ntransfer-encoding: chunked" in head:
            position, parts = start, []
            while True:
                lineEnd = buf.find(b"\r\n", position)
                if lineEnd < 0:
                    return None
                size = int(bytes(buf[position:lineEnd]).split(b";")[0], 16)
                if size == 0:
                    if len(buf) < lineEnd + 4:
                        return None
                    del buf[:lineEnd + 4]
                    return status, b"".join(parts)
                if len(buf) < lineEnd + 2 + size + 2:
                    return None
                parts.append(bytes(buf[lineEnd + 2:lineEnd + 2 + size]))
                position = lineEnd + 2 + size + 2
        del buf[:start]
        return status, b""


async def connect(port, onResponse=None):
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(lambda: HTTPConnection(onResponse), "127.0.0.1", port)
    return connection


def percentile(values, fraction):
    """The nearest-rank percentile of a sorted list."""
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))
    return values[index]


class DispatchProbe:
    """Workers waiting in lease long-polls (served oldest first) and one
    submitter: submits jobs one at a time and times, for each, from sending
    the submit to a worker receiving its lease."""

    LEASE = httpRequest("POST", "/api/v1/queues/q/lease?timeout=60", b"")
    SUBMIT = httpRequest("POST", "/jobs.json", SUBMIT_BODY)

    def __init__(self, port):
        self.port = port
        self.workers = []
        self.submitter = None
        self.arrivals = None

    async def open(self, workers):
        """Connect ``workers`` workers, each sending a lease long-poll."""
        self.arrivals = asyncio.Queue()

        def leased(connection, status, body):
            self.arrivals.put_nowait((time.perf_counter(), connection, status, body))

        for _ in range(workers):
            connection = await connect(self.port, leased)
            connection.send(self.LEASE)
            self.workers.append(connection)
        self.submitter = await connect(self.port)

    async def measure(self, samples, rearm=False, settle=0.01):
        """``(dispatch seconds, submit answer seconds)`` of ``samples``
        submits. With ``rearm`` each worker that got a job waits again
        (after ``settle`` seconds, for its long-poll to reach the server)."""
        dispatch, submitTimes = [], []
        for _ in range(samples):
            sent = time.perf_counter()
            answer = self.submitter.request(self.SUBMIT)
            arrived, worker, status, body = await asyncio.wait_for(self.arrivals.get(), 30)
            submitStatus, submitBody, submitSeconds = await asyncio.wait_for(answer, 30)
            if status != 200 or submitStatus != 200:
                raise RuntimeError("lease answered %s %r, submit %s %r"
                                   % (status, body[:200], submitStatus, submitBody[:200]))
            dispatch.append(arrived - sent)
            submitTimes.append(submitSeconds)
            if rearm:
                worker.send(self.LEASE)
                await asyncio.sleep(settle)     # a benchmark's settle time, bounded
        return dispatch, submitTimes

    def close(self):
        for connection in self.workers + [self.submitter]:
            if connection is not None:
                connection.transport.close()


# ---- the load generator (its own process)


async def generateLoad(port, request, clients, warmup, duration, maxRequests, serverPid):
    """Drive ``clients`` keep-alive connections, each sending ``request`` as
    soon as its previous answer arrived, for ``warmup`` + ``duration``
    seconds (or ``maxRequests`` answers). Throughput counts the answers
    within the measured window; latency samples are the requests sent in it
    (those still in flight at its end are awaited, not dropped)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    warmEnd, measureEnd = t0 + warmup, t0 + warmup + duration
    latencies, statuses = [], {}
    counts = {"window": 0, "total": 0}
    marks = {}

    def mark(name):
        marks[name] = (time.perf_counter(), time.process_time(),
                       cpuSeconds(serverPid) if serverPid else 0.0, machineBusySeconds())

    def onResponse(connection, status, body):
        now = time.perf_counter()
        counts["total"] += 1
        if connection.sent >= warmEnd:
            latencies.append(now - connection.sent)
            statuses[status] = statuses.get(status, 0) + 1
        if warmEnd <= now <= measureEnd:
            counts["window"] += 1
        if now >= measureEnd or counts["total"] >= maxRequests:
            connection.transport.close()
        else:
            connection.send(request)

    connections = [await connect(port, onResponse) for _ in range(clients)]
    loop.call_at(loop.time() + warmup, mark, "warm")
    loop.call_at(loop.time() + warmup + duration, mark, "end")
    for connection in connections:
        connection.send(request)
    await asyncio.wait_for(asyncio.gather(*(c.lost for c in connections)),
                           timeout=warmup + duration + 60)
    if "end" not in marks:          # stopped by maxRequests
        mark("end")
    if "warm" not in marks:
        raise RuntimeError("the load ended before the warm-up did (maxRequests too small)")
    (wallA, cpuA, serverA, busyA), (wallB, cpuB, serverB, busyB) = marks["warm"], marks["end"]
    window = wallB - wallA
    latencies.sort()
    return {
        "clients": clients, "seconds": window, "answers": counts["window"],
        "rate": counts["window"] / window, "samples": len(latencies),
        "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
        "max": latencies[-1] if latencies else float("nan"),
        "statuses": {str(k): v for k, v in statuses.items()},
        "loadgenCPU": (cpuB - cpuA) / window, "serverCPU": (serverB - serverA) / window,
        "otherCPU": ((busyB - busyA) - (cpuB - cpuA) - (serverB - serverA)) / window,
    }


def runLoadProcess(port, request, clients, serverPid, warmup=WARMUP_SECONDS,
                   duration=MEASURE_SECONDS, maxRequests=MAX_REQUESTS):
    """Run the load generator in its own process (so that it does not share
    this one's interpreter lock) and return its figures."""
    spec = {"port": port, "request": request.decode("latin-1"), "clients": clients,
            "warmup": warmup, "duration": duration, "maxRequests": maxRequests,
            "serverPid": serverPid}
    out = subprocess.run([sys.executable, "-m", "bench.server", "--loadgen", json.dumps(spec)],
                         cwd=ROOT, capture_output=True, timeout=warmup + duration + 120,
                         preexec_fn=raiseFileLimit)
    if out.returncode != 0:
        raise RuntimeError("the load generator failed:\n" + out.stderr.decode(errors="replace"))
    return json.loads(out.stdout)


def loadgenMain(specText):
    spec = json.loads(specText)
    figures = asyncio.run(generateLoad(
        spec["port"], spec["request"].encode("latin-1"), spec["clients"], spec["warmup"],
        spec["duration"], spec["maxRequests"], spec["serverPid"]))
    sys.stdout.write(json.dumps(figures))


# ---- state directories written directly with the journal's encoder


def jobHistory(queue, total, start, submitsOnly=False):
    """``total`` real records, as the live server makes them (``Queue.make*``)
    and applied to ``queue``: submits from 50 owners, each job leased and
    completed a few records after its submit (a third of the records each),
    unless ``submitsOnly``. Record times advance half a second each."""
    owners = ["user%02d@example.org" % (n,) for n in range(50)]
    uploads = {"model.py": 2417, "ni_film.refl": 31804}
    result = {"fitter": "dream", "chisq": 1.037, "parameters": {
        "Ni thickness": {"value": 100.13, "uncertainty": 0.31},
        "Ni interface": {"value": 4.92, "uncertainty": 0.08},
        "Si interface": {"value": 3.11, "uncertainty": 0.12}}}
    leased = []
    now, n, made = start, 0, 0
    while made < total:
        step = made % 3 if not submitsOnly else 0
        now += 0.5
        record = None
        if step == 1:
            record = queue.makeLease(now, "cluster-a", "node%02d:%d" % (made % 7, 4000 + made % 97))
            if record is not None:
                leased.append((record["id"], record["lease"]))
        elif step == 2 and leased:
            jobId, lease = leased.pop(0)
            record = queue.makeComplete(jobId, lease, now, "COMPLETE", result, None, None,
                                        "namespaces+apparmor+rlimits+uid")
        if record is None:
            n += 1
            jobId = queue.reserveId()
            owner = owners[n % len(owners)]
            record = queue.makeSubmit(jobId, now, "ni film fit %d" % (n,), owner, "127.0.0.1",
                                      "refl1d", "1.0.1", uploads)
        queue.apply(record)
        made += 1
        yield record


def buildStates(root, records, snapshotTail):
    """Two state directories holding the same history of ``records`` records:
    ``plain`` (one segment, no snapshot: every record is replayed) and
    ``snapshot`` (a snapshot after ``records - snapshotTail`` records and a
    segment with the last ``snapshotTail``: the most a server with
    ``--snapshot-every snapshotTail`` ever replays). The segments before the
    snapshot, which a start never reads, are left out of ``snapshot``."""
    from itertools import islice

    from reflservd.journalfiles import journalDirectory, segmentName
    from reflservd.queue import Queue
    from reflservd.queuesnapshot import snapshotOf

    plain, snap = os.path.join(root, "plain"), os.path.join(root, "snapshot")
    for stateDir in (plain, snap):
        os.makedirs(journalDirectory(stateDir))
    queue = Queue()
    history = jobHistory(queue, records, time.time() - 10 * 86400)
    with open(os.path.join(journalDirectory(plain), segmentName(0)), "wb") as f:
        writeSegmentTo(f, islice(history, records - snapshotTail))
        lastTime = max(job.finished or job.started or job.submitted for job in queue.jobs.values())
        snapshotSize = writeSnapshot(journalDirectory(snap), 1, snapshotOf(queue), lastTime)
        with open(os.path.join(journalDirectory(snap), segmentName(1)), "wb") as tail:
            for frames in chunkedFrames(history):
                f.write(frames)
                tail.write(frames)
    return plain, snap, queue, snapshotSize


def writeSnapshot(journalDir, number, state, lastTime):
    """Write ``state`` as the server's snapshot thread does; its size."""
    from reflservd import journalfiles, queuesnapshot
    return journalfiles.encodeAndWriteSnapshot(journalDir, number, state, time.time(), lastTime, 2,
                                          queuesnapshot.encodeSnapshot)[1]


def chunkedFrames(records, size=10000):
    from reflservd.journalframes import encodeRecord
    frames = []
    for record in records:
        frames.append(encodeRecord(record))
        if len(frames) == size:
            yield b"".join(frames)
            frames = []
    if frames:
        yield b"".join(frames)


def writeSegmentTo(f, records):
    for frames in chunkedFrames(records):
        f.write(frames)


def buildPending(stateDir, jobs):
    """A state directory with ``jobs`` pending jobs (submit records only)."""
    from reflservd.journalfiles import journalDirectory, segmentName
    from reflservd.queue import Queue
    os.makedirs(journalDirectory(stateDir))
    queue = Queue()
    with open(os.path.join(journalDirectory(stateDir), segmentName(0)), "wb") as f:
        writeSegmentTo(f, jobHistory(queue, jobs, time.time() - 86400, submitsOnly=True))
    return queue


# ---- the benchmarks


def ms(seconds):
    return "%.1f ms" % (seconds * 1000,) if seconds >= 0.001 else "%.2f ms" % (seconds * 1000,)


def mb(size):
    return "%.1f MB" % (size / 1e6,)


class Bench:
    """The benchmarks, sharing a scratch directory and the list of results."""

    def __init__(self, scratch, say=print, profileDir=None):
        self.scratch = scratch
        self.say = say
        self.profileDir = profileDir
        self.results = []
        self._count = 0

    def dir(self, name):
        self._count += 1
        path = os.path.join(self.scratch, "%02d-%s" % (self._count, name))
        os.makedirs(path)
        return path

    def result(self, name, figure, reference, goal, met):
        row = Result(name, figure, reference, goal, met)
        self.results.append(row)
        self.say("  %-34s %-34s ref %-30s goal %-26s %s" % (
            name, figure, reference or "-", goal or "-", {True: "met", False: "NOT MET", None: ""}[met]))
        return row

    def server(self, name, *options, stateDir=None):
        base = self.dir(name)
        if stateDir is None:
            stateDir = os.path.join(base, "state")
            os.makedirs(stateDir)
        return Daemon.reflservd(stateDir, os.path.join(base, "server.log"), *options)

    # 1.

    def submit(self):
        self.say("submit: POST /jobs.json (JSON body, each 2xx fsynced) over keep-alive "
                 "connections; load: asyncio HTTP/1.1 client in its own process, "
                 "%.0f s warm-up + %.0f s measured per level" % (WARMUP_SECONDS, MEASURE_SECONDS))
        request = httpRequest("POST", "/jobs.json", SUBMIT_BODY)
        figures = {}
        for label, daemon in (("reference", Daemon.reference(os.path.join(self.dir("reference"), "web.log"))),
                              ("reflservd", self.server("submit"))):
            if label == "reflservd" and self.profileDir:
                daemon.argv[1:1] = ["--profile", os.path.join(self.profileDir, "submit.prof"),
                                    "--profiler", "cprofile", "--savestats"]
            daemon.start()
            try:
                for clients in CLIENT_LEVELS:
                    f = runLoadProcess(daemon.port, request, clients, daemon.pid)
                    figures[label, clients] = f
                    self.say("  %-9s %2d clients: %7.0f/s  p50 %-8s p99 %-8s max %-8s "
                             "statuses %s  CPU (%% of a core): server %.0f, load generator %.0f, "
                             "other processes %.0f"
                             % (label, clients, f["rate"], ms(f["p50"]), ms(f["p99"]), ms(f["max"]),
                                f["statuses"], 100 * f["serverCPU"], 100 * f["loadgenCPU"],
                                100 * f["otherCPU"]))
            finally:
                daemon.stop()
        for clients in CLIENT_LEVELS:
            ours, ref = figures["reflservd", clients], figures["reference", clients]
            ok = all(200 <= int(code) < 300 for code in ours["statuses"])
            figure = "%.0f/s, p50 %s, p99 %s" % (ours["rate"], ms(ours["p50"]), ms(ours["p99"]))
            reference = "%.0f/s, p50 %s, p99 %s" % (ref["rate"], ms(ref["p50"]), ms(ref["p99"]))
            if clients == max(CLIENT_LEVELS):
                met = ok and ours["rate"] >= ref["rate"] / 2 and ours["p99"] <= 0.100
                goal = ">= %.0f/s (half ref), p99 <= 100 ms" % (ref["rate"] / 2,)
            else:
                met, goal = (None if ok else False), ("" if ok else "only 2xx")
            self.result("submit, %d client%s" % (clients, "s" if clients > 1 else ""),
                        figure, reference, goal, met)
        return figures

    # 2. and 5.

    def dispatch(self):
        self.say("dispatch: one worker in a lease long-poll; %d submits, one at a time; "
                 "time from sending the submit to the worker holding its lease" % (DISPATCH_SAMPLES,))
        daemon = self.server("dispatch")
        daemon.start()

        async def run():
            probe = DispatchProbe(daemon.port)
            try:
                await probe.open(1)
                await asyncio.sleep(0.05)       # the first long-poll reaches the server
                return await probe.measure(DISPATCH_SAMPLES, rearm=True)
            finally:
                probe.close()

        try:
            dispatch, submitTimes = asyncio.run(run())
        finally:
            daemon.stop()
        disk = fsyncLatency(self.scratch)
        dispatch.sort()
        submitTimes.sort()
        median = statistics.median(dispatch)
        self.say("  dispatch p50 %s p99 %s max %s; the submit's own answer p50 %s p99 %s; "
                 "one append+fsync on this disk p50 %s"
                 % (ms(median), ms(percentile(dispatch, 0.99)), ms(dispatch[-1]),
                    ms(statistics.median(submitTimes)), ms(percentile(submitTimes, 0.99)), ms(disk)))
        self.result("dispatch, 1 waiting worker", "p50 %s, p99 %s" % (ms(median), ms(percentile(dispatch, 0.99))),
                    "one fsync p50 %s" % (ms(disk),), "p50 <= 5 ms", median <= 0.005)

    def waiters(self):
        self.say("waiters: %d workers hold lease long-polls at once; memory increase, and "
                 "dispatch over %d submits while they wait" % (WAITERS, WAITER_DISPATCH_SAMPLES))
        daemon = self.server("waiters")
        daemon.start()
        figures = {}

        async def settle(bound=20.0):
            """Wait until the server has taken in every long-poll: its CPU
            time stops moving for 0.3 s (bounded)."""
            deadline = time.monotonic() + bound
            last, still = daemon.cpuSeconds(), 0
            while time.monotonic() < deadline and still < 3:
                await asyncio.sleep(0.1)
                now = daemon.cpuSeconds()
                still = still + 1 if now == last else 0
                last = now

        async def run():
            warm = DispatchProbe(daemon.port)     # warm the code paths first
            try:
                await warm.open(1)
                await asyncio.sleep(0.05)
                await warm.measure(20, rearm=True)
            finally:
                warm.close()
            await settle()
            figures["before"] = daemon.rssBytes()
            probe = DispatchProbe(daemon.port)
            try:
                await probe.open(WAITERS)
                await settle()
                figures["after"] = daemon.rssBytes()
                dispatch, _ = await probe.measure(WAITERS)
            finally:
                probe.close()
            return dispatch, len(dispatch)

        try:
            dispatch, received = asyncio.run(run())
        finally:
            daemon.stop()
        increase = figures["after"] - figures["before"]
        head = sorted(dispatch[:WAITER_DISPATCH_SAMPLES])
        median = statistics.median(head)
        self.say("  RSS %s -> %s (+%s, %.1f kB a waiter); dispatch p50 %s p99 %s over the first %d "
                 "submits; %d of %d waiters got a job"
                 % (mb(figures["before"]), mb(figures["after"]), mb(increase), increase / WAITERS / 1e3,
                    ms(median), ms(percentile(head, 0.99)), len(head), received, WAITERS))
        self.result("%d waiters: memory increase" % (WAITERS,), mb(increase),
                    "RSS before %s" % (mb(figures["before"]),), "<= 100 MB",
                    increase <= 100e6 and received == WAITERS)
        self.result("%d waiters: dispatch" % (WAITERS,),
                    "p50 %s, p99 %s" % (ms(median), ms(percentile(head, 0.99))), "",
                    "p50 <= 5 ms", median <= 0.005)

    # 3.

    def restart(self):
        base = self.dir("restart")
        started = time.monotonic()
        plain, snap, queue, snapshotSize = buildStates(base, RESTART_RECORDS, RESTART_SNAPSHOT_TAIL)
        counts = queue.counts()
        sizes = {name: sum(os.path.getsize(os.path.join(d, "journal", n))
                           for n in os.listdir(os.path.join(d, "journal")))
                 for name, d in (("plain", plain), ("snapshot", snap))}
        self.say("restart: built %d records (%d jobs: %s) in %.1f s; journal %s; snapshot %s + "
                 "%d records after it; runs: %s; warm page cache"
                 % (RESTART_RECORDS, len(queue.jobs), ", ".join("%d %s" % (v, k) for k, v in counts.items() if v),
                    time.monotonic() - started, mb(sizes["plain"]), mb(snapshotSize),
                    RESTART_SNAPSHOT_TAIL, ", ".join("%d %s" % (n, k) for k, n in RESTART_RUNS.items())))
        del queue
        times = {}
        for label, stateDir in (("empty", None), ("snapshot", snap), ("plain", plain)):
            runs, others = [], []
            for run in range(RESTART_RUNS[label]):
                daemon = self.server("restart-" + label, stateDir=stateDir)
                busy = machineBusySeconds()
                try:
                    runs.append(daemon.start())
                    others.append((machineBusySeconds() - busy - daemon.cpuSeconds()) / runs[-1])
                    rss = daemon.rssBytes()
                finally:
                    daemon.stop()
            times[label] = statistics.median(runs)
            self.say("  %-8s start to /healthz: %s (runs: %s); RSS after start %s; other processes "
                     "used %.0f%% of a core meanwhile"
                     % (label, "%.2f s" % times[label], ", ".join("%.2f" % r for r in runs), mb(rss),
                        100 * statistics.mean(others)))
        reference = "empty state %.2f s" % (times["empty"],)
        self.result("restart, snapshot + %dk records" % (RESTART_SNAPSHOT_TAIL // 1000,),
                    "%.2f s" % (times["snapshot"],), reference, "<= 2 s", times["snapshot"] <= 2.0)
        self.result("restart, replay %dM records" % (RESTART_RECORDS // 1_000_000,),
                    "%.2f s" % (times["plain"],), reference, "<= 10 s", times["plain"] <= 10.0)
        shutil.rmtree(base, ignore_errors=True)

    # 4.

    def memory(self):
        empty = self.server("memory-empty")
        empty.start()
        try:
            emptyRSS = empty.rssBytes()
        finally:
            empty.stop()
        base = self.dir("memory")
        stateDir = os.path.join(base, "state")
        buildPending(stateDir, PENDING_JOBS)
        daemon = Daemon.reflservd(stateDir, os.path.join(base, "server.log"))
        daemon.start()
        try:
            rss = daemon.rssBytes()
        finally:
            daemon.stop()
        self.say("memory: %d pending jobs (submit records replayed at start): RSS %s; empty state %s; "
                 "%.2f kB a job" % (PENDING_JOBS, mb(rss), mb(emptyRSS), (rss - emptyRSS) / PENDING_JOBS / 1e3))
        self.result("memory, %dk pending jobs" % (PENDING_JOBS // 1000,), "RSS " + mb(rss),
                    "empty state " + mb(emptyRSS), "<= 200 MB", rss <= 200e6)
        shutil.rmtree(base, ignore_errors=True)


    # 6.

    def bigsubmit(self, size=186 << 20):
        """A legal submit of one large file (a 186 MB upload took the reactor
        2.5 s once): the slowest /healthz answer while it is parsed and
        stored, against the slowest on the idle server."""
        self.say("bigsubmit: one %s multipart submit while a client asks /healthz every 10 ms"
                 % (mb(size),))
        daemon = self.server("bigsubmit")
        daemon.start()
        try:
            idle = healthLatencies(daemon.port, 2.0)
            boundary = b"bench-boundary"
            request = json.dumps({"name": "big", "notify": "", "service": "count", "data": 1})
            body = b"".join([
                b'--%s\r\nContent-Disposition: form-data; name="request"\r\n\r\n%s\r\n'
                % (boundary, request.encode()),
                b'--%s\r\nContent-Disposition: form-data; name="file"; filename="big.dat"\r\n\r\n'
                % (boundary,), b"0" * size, b"\r\n--%s--\r\n" % (boundary,)])
            answer = {}

            def upload():
                conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=600)
                conn.request("POST", "/api/v1/jobs", body, {
                    "Content-Type": "multipart/form-data; boundary=" + boundary.decode(),
                    "X-Requested-With": "bench"})
                response = conn.getresponse()
                answer["status"] = response.status
                response.read()
                conn.close()

            sender = threading.Thread(target=upload)
            started = time.monotonic()
            sender.start()
            busy = healthLatencies(daemon.port, None, until=sender)
            seconds = time.monotonic() - started
        finally:
            daemon.stop()
        worst, reference = max(busy), max(idle)
        self.say("  submit answered %s in %.1f s; /healthz max %s (p50 %s) during it, %s idle"
                 % (answer.get("status"), seconds, ms(worst), ms(statistics.median(busy)),
                    ms(reference)))
        self.result("large submit (%s), /healthz" % (mb(size),), "max %s during" % (ms(worst),),
                    "max %s idle" % (ms(reference),), "max <= 250 ms, 201",
                    worst <= 0.250 and answer.get("status") == 201)


def healthLatencies(port, seconds, until=None):
    """The latencies of ``GET /healthz`` asked every 10 ms for ``seconds``,
    or while the thread ``until`` runs (bounded: 10 minutes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    deadline = time.monotonic() + (seconds if seconds is not None else 600)
    try:
        while time.monotonic() < deadline and (until is None or until.is_alive()):
            began = time.monotonic()
            conn.request("GET", "/healthz", headers={"Host": "127.0.0.1"})
            conn.getresponse().read()
            latencies.append(time.monotonic() - began)
            time.sleep(0.01)
    finally:
        conn.close()
    return latencies


BENCHMARKS = ("submit", "dispatch", "restart", "memory", "waiters", "bigsubmit")


def run(names=BENCHMARKS, say=print, profileDir=None, keep=False):
    """Run the named benchmarks; their result rows."""
    raiseFileLimit()
    scratch = tempfile.mkdtemp(prefix="reflservd-bench-")
    bench = Bench(scratch, say, profileDir)
    try:
        for name in names:
            started = time.monotonic()
            getattr(bench, name)()
            say("  (%s took %.0f s)" % (name, time.monotonic() - started))
    finally:
        if keep:
            say("scratch directory kept: %s" % (scratch,))
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return bench.results


def printProfile(path, say=print, top=30):
    import io
    import pstats
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    say(out.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, of %s (all when none is named)" % (", ".join(BENCHMARKS),))
    parser.add_argument("--profile", metavar="DIR", help="run the submit benchmark's server under cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, states)")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error("no benchmark named %s" % (", ".join(sorted(unknown)),))
    if args.loadgen:
        loadgenMain(args.loadgen)
        return []
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    results = run(args.names or BENCHMARKS, profileDir=args.profile, keep=args.keep)
    if args.profile and os.path.exists(os.path.join(args.profile, "submit.prof")):
        printProfile(os.path.join(args.profile, "submit.prof"))
    return results


if __name__ == "__main__":
    rows = main()
    if rows:
        print()
        print(formatTable(rows))
