"""Shared fixtures: real ``twistd reflservd`` and ``twistd reflworkerd`` processes.

Each daemon runs in the foreground (``twistd -n``) as a child of the test, on
127.0.0.1, in its own directory under the test's tmp_path, its log in
``DIR/twistd.log``. Start-up is waited for with a bound (the server answers
``/healthz``; the worker logs that it takes work), and the tests end only the
processes they started, by pid.

- ``serverProcess(leaseTimeout=…, tokenFile=…, args=[…], nofile=N)`` → a started `ServerProcess`
  (``.url``, ``.port``, ``.stateDir``, ``.api``, ``.stop()``, ``.kill()``, ``.restart()``);
  ``nofile`` sets its RLIMIT_NOFILE
- ``workerProcess(server, queue=…, slots=…, args=[…])`` → a started `WorkerProcess`
  (``.workDir``, ``.stop()``, ``.kill()``, ``.restart()``, ``.waitForLog(text)``)
- ``server``: one `ServerProcess` for a whole test module, for tests that share it
  (each drains the queue first); ``worker``: a `test.support.FakeWorker` of it on
  queue ``q``; ``model``: ``(modelPath, dataPaths)`` written by `test.support.writeModel`.

A daemon keeps its port and state directory across ``kill()``/``stop()`` and
``start()``: a restart comes back on the same state, at the same address. Its log
is ``.log()`` (``.log(sinceStart=True)`` for this start's part), and
``.waitForLog(text)`` waits for a line.
- `Api`: a small synchronous client of the HTTP API for the tests themselves
  (``submit``, ``job``, ``cancel``, ``files``, ``download``, ``waitFor``).
- `nifilmFiles()`: the nickel film model and its four data files.
- ``slurm``: one real one-node Slurm cluster for the whole session, a started
  `test.slurmcluster.SlurmCluster` (``.env`` for clients, ``.partition``, ``.conf``,
  ``.run(…)``, ``.killSlurmd()``, ``.startSlurmd()``); skipped where it cannot run.

Hypothesis runs under the ``ci`` profile when ``$CI`` is set: ``derandomize=True``,
so CI runs one fixed set of examples and cannot fail on a new random one; elsewhere
the default profile keeps exploring.
"""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest
from hypothesis import settings

from test.slurmcluster import SlurmCluster, unavailableReason
from test.support import FakeWorker, writeModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
NIFILM = os.path.join(HERE, "models", "nifilm.py")
NIFILM_DATA = ["nifilm-tof-%d.dat" % i for i in (1, 2, 3, 4)]

settings.register_profile("ci", derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(autouse=True)
def _ownConfigDirectory(tmp_path, monkeypatch):
    """Each test's clients keep their job keys in a config directory of its own."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def freePort():
    """A loopback port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exampleData():
    """The refl1d example data: $REFL1D_EXAMPLES, shared/ beside the checkout (as in CI), or /work/shared."""
    for path in (os.environ.get("REFL1D_EXAMPLES", ""),
                 os.path.join(ROOT, "..", "shared", "data", "refl1d-examples"),
                 "/work/shared/data/refl1d-examples"):
        if path and all(os.path.exists(os.path.join(path, n)) for n in NIFILM_DATA):
            return path
    pytest.skip("refl1d example data (nifilm-tof-*.dat) not found")


def nifilmFiles():
    """``{name: path}`` of the nickel film model and its data, for `Api.submit`."""
    data = exampleData()
    files = {"nifilm.py": NIFILM}
    files.update({name: os.path.join(data, name) for name in NIFILM_DATA})
    return files


def childEnvironment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    return env


class DaemonProcess:
    """A twistd plugin run in the foreground as a child process of the test."""

    plugin = None
    startTimeout = 90.0

    def __init__(self, directory):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.logPath = os.path.join(self.directory, "twistd.log")
        self.stderrPath = os.path.join(self.directory, "stderr.txt")
        self.process = None
        self._logStart = 0

    def pluginArgs(self):
        raise NotImplementedError

    def command(self):
        return [TWISTD, "-n", "--pidfile=", "--logfile=" + self.logPath, self.plugin] + self.pluginArgs()

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self):
        """Start the daemon and wait (bounded) until it is ready."""
        assert not self.running, "already running"
        self._logStart = os.path.getsize(self.logPath) if os.path.exists(self.logPath) else 0
        with open(self.stderrPath, "ab") as stderr:
            self.process = subprocess.Popen(self.command(), cwd=self.directory, env=childEnvironment(),
                                            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                            preexec_fn=self.preexec())
        deadline = time.monotonic() + self.startTimeout
        while not self.isReady():
            if self.process.poll() is not None:
                raise RuntimeError("%s exited with %s while starting:\n%s\n%s" % (
                    self.plugin, self.process.returncode, self.log()[-3000:], self._stderr()[-3000:]))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("%s was not ready within %s s:\n%s" % (
                    self.plugin, self.startTimeout, self.log()[-3000:]))
            time.sleep(0.05)
        return self

    def isReady(self):
        raise NotImplementedError

    def preexec(self):
        """What the child runs before it execs the daemon (None: nothing)."""
        return None

    def log(self, sinceStart=False):
        """The daemon's log (only this start's part with ``sinceStart``)."""
        try:
            with open(self.logPath, "rb") as f:
                if sinceStart:
                    f.seek(self._logStart)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _stderr(self):
        try:
            with open(self.stderrPath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def waitForLog(self, text, timeout=60.0):
        """Wait (bounded) until this start's log contains ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log(sinceStart=True):
            if time.monotonic() > deadline:
                raise AssertionError("%r not logged by %s within %s s:\n%s" % (
                    text, self.plugin, timeout, self.log(sinceStart=True)[-3000:]))
            if not self.running:
                raise AssertionError("%s ended before logging %r:\n%s" % (
                    self.plugin, text, self.log(sinceStart=True)[-3000:]))
            time.sleep(0.05)

    def stop(self, timeout=60.0):
        """SIGTERM, and wait for the exit; SIGKILL past ``timeout``. The exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self):
        """SIGKILL, and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        return self.process.returncode if self.process is not None else None

    def restart(self):
        self.stop()
        return self.start()


class ServerProcess(DaemonProcess):
    """``twistd -n reflservd`` on 127.0.0.1:``port`` with its state in ``DIR/state``."""

    plugin = "reflservd"

    def __init__(self, directory, leaseTimeout=None, tokenFile=None, args=(), port=None, nofile=None):
        DaemonProcess.__init__(self, directory)
        self.nofile = nofile
        self.port = port or freePort()
        self.url = "http://127.0.0.1:%d" % (self.port,)
        self.stateDir = os.path.join(self.directory, "state")
        self.leaseTimeout = leaseTimeout
        self.tokenFile = tokenFile
        self.args = list(args)
        self.api = Api(self.url)

    def pluginArgs(self):
        args = ["--listen", "tcp:%d:interface=127.0.0.1" % (self.port,), "--state-dir", self.stateDir]
        if self.leaseTimeout is not None:
            args += ["--lease-timeout", str(self.leaseTimeout)]
        if self.tokenFile is not None:
            os.chmod(self.tokenFile, 0o600)     # the server refuses a token file others may read
            args += ["--worker-token-file", str(self.tokenFile)]
        # The tests submit from one address, faster than a person: no per-submitter
        # limits unless a test asks for them (its args come last and win).
        args += ["--max-pending", "0", "--submits-per-minute", "0"]
        return args + self.args

    def preexec(self):
        if self.nofile is None:
            return None
        nofile = self.nofile

        def limitOpenFiles():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        return limitOpenFiles

    def isReady(self):
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False


class WorkerProcess(DaemonProcess):
    """``twistd -n reflworkerd`` taking work for ``server`` from ``queue``, in ``DIR/work``."""

    plugin = "reflworkerd"
    READY = "taking work from"

    def __init__(self, directory, server, queue="test", slots=1, pollTimeout=5.0,
                 sandbox="none", tokenFile=None, args=()):
        DaemonProcess.__init__(self, directory)
        self.server = server
        self.serverURL = server if isinstance(server, str) else server.url
        self.queue = queue
        self.slots = slots
        self.pollTimeout = pollTimeout
        self.sandbox = sandbox
        self.tokenFile = tokenFile
        self.workDir = os.path.join(self.directory, "work")
        self.args = list(args)

    def pluginArgs(self):
        args = ["--server", self.serverURL, "--queue", self.queue, "--work-dir", self.workDir,
                "--slots", str(self.slots), "--poll-timeout", str(self.pollTimeout),
                "--sandbox", self.sandbox]
        if self.tokenFile is not None:
            args += ["--token-file", str(self.tokenFile)]
        if self.sandbox == "auto":
            args += ["--allow-unconfined"]      # a host without namespaces still runs the tests
        if self.sandbox == "none" and os.geteuid() == 0 and "--slot-uid-base" not in self.args:
            # A root worker refuses --sandbox none with slot uids that cannot reach the
            # checkout; the tests of mode none run their fits as root, explicitly.
            args += ["--slot-uid-base", "0"]
        return args + self.args

    def isReady(self):
        return self.READY in self.log(sinceStart=True)


class Api:
    """A synchronous client of the reflservd HTTP API, for tests."""

    def __init__(self, url, token=None, timeout=30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.keys = {}      # job id -> the key its submit answered

    def call(self, method, path, body=None, data=None, headers=None, timeout=None):
        """``(status, decoded JSON or bytes)``; error statuses are returned, not raised.
        Sent as a script would (``X-Requested-With``)."""
        headers = dict({"X-Requested-With": "test"}, **(headers or {}))
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                status, raw, ctype = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        if ctype.startswith("application/json") and raw:
            return status, json.loads(raw)
        return status, raw

    def ok(self, method, path, **kwargs):
        status, value = self.call(method, path, **kwargs)
        assert 200 <= status < 300, "%s %s answered %s: %r" % (method, path, status, value)
        return value

    def submit(self, request, files):
        """Submit a job: ``request`` dict and ``files`` ``{name: path or bytes}``; the record."""
        boundary = uuid.uuid4().hex
        parts = [b'--%s\r\nContent-Disposition: form-data; name="request"\r\n'
                 b"Content-Type: application/json\r\n\r\n%s\r\n" % (boundary.encode(), json.dumps(request).encode())]
        for name, source in files.items():
            if isinstance(source, (bytes, bytearray)):
                content = bytes(source)
            else:
                with open(source, "rb") as f:
                    content = f.read()
            parts.append(b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                         b"Content-Type: application/octet-stream\r\n\r\n%s\r\n"
                         % (boundary.encode(), name.encode(), content))
        parts.append(b"--%s--\r\n" % (boundary.encode(),))
        status, record = self.call("POST", "/api/v1/jobs", data=b"".join(parts),
                                   headers={"Content-Type": "multipart/form-data; boundary=" + boundary})
        assert status == 201, "submit answered %s: %r" % (status, record)
        self.keys[record["id"]] = record["key"]
        return record

    def job(self, jobId):
        return self.ok("GET", "/api/v1/jobs/%d" % (jobId,))

    def cancel(self, jobId):
        """Cancel a job with the key its submit answered."""
        return self.ok("POST", "/api/v1/jobs/%d/cancel" % (jobId,),
                       headers={"X-Job-Key": self.keys.get(jobId, "")})

    def files(self, jobId, kind=None):
        listed = self.ok("GET", "/api/v1/jobs/%d/files" % (jobId,))["files"]
        return {f["name"]: f["size"] for f in listed if kind is None or f["kind"] == kind}

    def download(self, jobId, name, kind="result"):
        return self.ok("GET", "/api/v1/jobs/%d/files/%s?kind=%s" % (jobId, name, kind))

    def waitFor(self, jobId, predicate, timeout=120.0, what="the awaited state"):
        """Wait (bounded) until ``predicate(record)`` holds, woken by the job's
        events long-poll; the record. A server that is briefly away is waited for."""
        deadline = time.monotonic() + timeout
        after = 0
        record = None
        while True:
            try:
                record = self.job(jobId)
                if predicate(record):
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("job %d did not reach %s within %s s; it is %r" % (
                        jobId, what, timeout, record))
                status, events = self.call(
                    "GET", "/api/v1/jobs/%d/events?after=%d&timeout=%g" % (jobId, after, min(remaining, 10.0)),
                    timeout=min(remaining, 10.0) + 10.0)
                if status == 200:
                    after = events["next"]
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def waitStatus(self, jobId, *statuses, timeout=120.0):
        return self.waitFor(jobId, lambda r: r["status"] in statuses, timeout,
                            what="status %s" % ("|".join(statuses),))


@pytest.fixture
def serverProcess(tmp_path):
    """A factory of started reflservd processes; each is stopped (or killed) after the test."""
    started = []

    def make(**kwargs):
        server = ServerProcess(tmp_path / ("server%d" % (len(started) + 1)), **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop(timeout=30)


@pytest.fixture
def workerProcess(tmp_path, serverProcess):
    """A factory of started reflworkerd processes; each is stopped (or killed) after the
    test, before any server (hence the dependency on ``serverProcess``)."""
    started = []

    def make(server, **kwargs):
        worker = WorkerProcess(tmp_path / ("worker%d" % (len(started) + 1)), server, **kwargs)
        started.append(worker)
        return worker.start()

    yield make
    for worker in reversed(started):
        worker.stop(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One reflservd for the whole test module: its tests share it (and its job ids),
    which keeps a module of many small client tests fast."""
    process = ServerProcess(tmp_path_factory.mktemp("reflservd")).start()
    yield process
    process.stop(timeout=30)


@pytest.fixture
def worker(server):
    """A `FakeWorker` of the module's ``server``, on queue ``q``."""
    return FakeWorker(server.url, queue="q")


@pytest.fixture
def model(tmp_path):
    """``(modelPath, dataPaths)``: a small model script and two data files."""
    return writeModel(str(tmp_path / "fit"))


@pytest.fixture(scope="session")
def slurm():
    """A started one-node Slurm cluster shared by the session, in a temporary directory of
    its own (short: its unix sockets live there); stopped and removed at the end. A test
    that kills slurmd starts it again; one that leaves jobs behind calls ``cancelAll()``."""
    reason = unavailableReason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="reflslurm-")).start()
    yield cluster
    cluster.stop()
