"""The ``local`` backend: fits forked from a preloaded fork host on this machine.

``LocalBackend`` is a `service.Service` child of the worker (as
``procmon.ProcessMonitor`` is): started and stopped by the service tree, it
spawns the fork host (``python -m reflworkerd.forkhost``) with
``reactor.spawnProcess``, speaks ``wire`` to it, restarts it when it dies, and
hands out a `localrun.FitRun` per fit (the policy of one fit). If the fork host dies with
fits in it, their groups are KILLed, those jobs alone fail, and a new host
starts.
"""

import os
import signal
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from reflworkerd.backend import reactorThreads
from reflworkerd import outcome, sandbox
from reflworkerd.localrun import FitRun
from reflworkerd.wire import COMMANDS_FD, EVENTS_FD, LineBuffer, encode, parseLine


def fitEnvironment(env=None):
    """The environment of a fork host, here or on a Slurm node: ``env`` (default
    the worker's) with one thread per numeric library (a fit is one CPU unless
    it asks for ``parallel``), a plotting backend without a screen, and this
    package importable."""
    env = dict(os.environ if env is None else env)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, "1")
    env.setdefault("MPLBACKEND", "Agg")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class ForkHostProtocol(protocol.ProcessProtocol):
    """Translate the fork host's pipes into calls on its `LocalBackend`; nothing more."""

    _log = Logger()

    def __init__(self, owner):
        self.owner = owner
        self.events = LineBuffer()
        self.output = {1: LineBuffer(), 2: LineBuffer()}

    def childDataReceived(self, fd, data):
        """Never raises: an exception here would make Twisted close the pipe, and
        the fork server, every fit in it."""
        if fd == EVENTS_FD:
            for line in self.events.feed(data):
                event = parseLine(line)
                if event is not None:
                    try:
                        self.owner.eventReceived(self, event)
                    except Exception:
                        self._log.failure("fork server event {event!r:.300}", event=event)
        elif fd in self.output:
            for line in self.output[fd].feed(data):
                self.owner.outputReceived(fd, line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.owner.hostEnded(self, reason)


class LocalBackend(service.Service):
    """The ``local`` backend: the worker's supervisor of its fork host process.

    ``sandboxMode`` is what ``sandbox.choose`` returned (once, at the
    worker's start). ``limits`` applies to every fit: ``{"cpu": s, "memory":
    bytes, "wall": s, "fsize": bytes, "nproc": n, "nofile": n}``; all but
    ``wall`` are applied in the child by ``sandbox.confine``, ``wall`` is kept
    from here. ``checkpointEvery`` is the session autosave interval of long
    (DREAM) fits. ``inThread(f, *args)`` runs a blocking call (reading what a
    fit left) off the reactor thread and returns a Deferred; by default in the
    reactor's thread pool.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        python=sys.executable,
        sandboxMode="none",
        limits=None,
        env=None,
        checkpointEvery=300,
        restartDelay=1.0,
        stopTimeout=10.0,
        inThread=None,
    ):
        self._reactor = reactor
        self.python = python
        self.sandboxMode = sandbox.checkApplied(sandboxMode)
        self._inThread = inThread or reactorThreads(reactor)
        self.limits = dict(limits or {})
        self.env = env
        self.checkpointEvery = checkpointEvery
        self.restartDelay = restartDelay
        self.stopTimeout = stopTimeout
        self.pid = None
        self._process = None
        self._protocol = None
        self._ready = False
        self._starting = None
        self._everReady = False
        self.stopping = False
        self._startError = None
        self._readyWaiters = []
        self._stopWaiters = []
        self._restartCall = None
        self._stopKillCall = None
        self._failures = 0
        self._tokens = 0
        self._runs = {}
        self._queue = []

    def startService(self):
        service.Service.startService(self)
        self.start().addErrback(lambda failure: None)     # whenReady() says so; start() logged it

    def stopService(self):
        """Fires when the fork host and every fit in it are gone."""
        service.Service.stopService(self)
        return self.stop()

    def whenReady(self):
        """A Deferred that fires once the fork host first says it is ready (fits
        given before then wait for it), or fails when it cannot start."""
        if self._everReady:
            return defer.succeed(None)
        if self._startError is not None:
            return defer.fail(self._startError)
        d = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def survivors(self):
        """Job ids whose fits outlive a restart of the worker: none, the fork host's
        fits die with it."""
        return frozenset()

    def adopt(self, jobId, *args, **kw):
        raise KeyError("the local backend has no survivors to adopt (job %s)" % (jobId,))

    def forgetSurvivors(self):
        """There are none."""

    def start(self):
        """Start the fork host; the Deferred fires when it has preloaded and is ready."""
        if self._starting is not None:
            return self._starting
        self.stopping = False
        self._starting = defer.Deferred()
        self._spawn()
        return self._starting

    def _spawn(self):
        self._restartCall = None
        self._protocol = ForkHostProtocol(self)
        args = [self.python, "-m", "reflworkerd.forkhost"]
        self._process = self._reactor.spawnProcess(
            self._protocol,
            self.python,
            args,
            env=fitEnvironment(self.env),
            childFDs={0: "w", 1: "r", 2: "r", COMMANDS_FD: "w", EVENTS_FD: "r"},
        )
        self._process.closeStdin()
        self.pid = self._process.pid
        self._log.info("fork server started, pid {pid}", pid=self.pid)

    def run(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        """Fork a fit for the job in ``jobDir``; ``onProgress(dict)`` gets its progress.

        ``onCheckpoint(path)`` is called (in the reactor thread) with the
        path of the session file relative to ``jobDir`` each time the fit says
        it has checkpointed it (every ``checkpointEvery`` seconds): a
        consistent file, replaced whole by the next checkpoint, unless the
        fit lies (read it with ``jobfiles.openFile``). A retry given that file as
        ``results/session.h5`` in its job directory and the option
        ``"resume": true`` resumes the fit from it.
        ``uid``/``gid``: the slot's unprivileged user, for ``sandbox.confine``
        (used where the worker runs as root).
        """
        self._tokens += 1
        jobDir = os.path.abspath(jobDir)
        outcome.remove(jobDir)
        fitRun = FitRun(self, self._reactor, self._inThread, self.limits, self._tokens, jobId, jobDir,
                        request, onProgress, onCheckpoint, uid, gid,
                        applied=sandbox.describe(self.sandboxMode, self.limits, uid, os.geteuid() == 0))
        self._runs[fitRun.token] = fitRun
        if self._ready:
            self._send(fitRun)
        else:
            self._queue.append(fitRun)
        return fitRun

    def stop(self):
        """Stop the server and every fit in it; fires when the server process is gone."""
        self.stopping = True
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        self._restartCall = None
        for fitRun in list(self._queue):
            fitRun.finish(outcome.error("the worker stopped before this fit started"))
        self._queue = []
        if self._process is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopWaiters.append(d)
        if len(self._stopWaiters) == 1:
            try:
                self._process.closeChildFD(COMMANDS_FD)
            except Exception:
                pass
            self._stopKillCall = self._reactor.callLater(self.stopTimeout, self._killServer)
        return d

    def _killServer(self):
        self._stopKillCall = None
        if self._process is not None:
            try:
                self._process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    def _send(self, fitRun):
        fitRun.sent = True
        self._write(
            {
                "op": "run",
                "run": fitRun.token,
                "jobId": fitRun.jobId,
                "jobDir": fitRun.jobDir,
                "request": fitRun.request,
                "sandbox": self.sandboxMode,
                "limits": {k: v for k, v in self.limits.items() if k != "wall"},
                "checkpointEvery": self.checkpointEvery,
                "uid": fitRun.uid,
                "gid": fitRun.gid,
            }
        )

    def _write(self, command):
        if self._process is None:
            return False
        try:
            self._process.writeToChild(COMMANDS_FD, encode(command))
        except (KeyError, OSError):
            return False
        return True

    def signal(self, fitRun, signum):
        """Ask the fork host to signal the run's process group; False where it cannot."""
        if not self._ready:
            return False
        return self._write({"op": "signal", "run": fitRun.token, "signal": int(signum)})

    def withdraw(self, fitRun):
        """A run that was never sent is not sent."""
        if fitRun in self._queue:
            self._queue.remove(fitRun)

    def forget(self, fitRun):
        """A run that ended."""
        self._runs.pop(fitRun.token, None)
        self.withdraw(fitRun)

    def eventReceived(self, proto, event):
        if proto is not self._protocol:
            return
        kind = event.get("event")
        fitRun = self._runs.get(event.get("run")) if isinstance(event.get("run"), int) else None
        if kind == "ready":
            self._becameReady(event)
        elif fitRun is None:
            return
        elif kind == "started":
            fitRun.started(int(event["pid"]))
        elif kind == "message" and isinstance(event.get("message"), dict):
            fitRun.relayed(event["message"])
        elif kind == "exited":
            fitRun.exited(event)

    def _becameReady(self, event):
        self._ready = True
        self._everReady = True
        self._failures = 0
        self._log.info(
            "fork server {pid} ready after {preload:.2f} s of preloading ({threads} thread(s))",
            pid=event.get("pid"),
            preload=event.get("preload", 0.0),
            threads=event.get("threads"),
        )
        if event.get("threads", 1) != 1:
            self._log.warn("fork server has {threads} threads after preloading: forks copy only one",
                           threads=event.get("threads"))
        queued, self._queue = self._queue, []
        for fitRun in queued:
            self._send(fitRun)
        if self._starting is not None and not self._starting.called:
            self._starting.callback(None)
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            d.callback(None)

    def outputReceived(self, fd, line):
        self._log.info("fork server {stream}: {line}", stream="stdout" if fd == 1 else "stderr", line=line)

    def hostEnded(self, proto, reason):
        if proto is not self._protocol:
            return
        self._process = None
        self._protocol = None
        self._ready = False
        self.pid = None
        status = reason.value
        why = "the fork server ended (%s) while this fit ran" % (describeEnd(status),)
        if self.stopping:
            why = "the worker stopped while this fit ran"
        for fitRun in [r for r in self._runs.values() if r.sent]:
            fitRun.lost(why)
        if self.stopping:
            if self._stopKillCall is not None and self._stopKillCall.active():
                self._stopKillCall.cancel()
            self._stopKillCall = None
            self._starting = None
            waiters, self._stopWaiters = self._stopWaiters, []
            for d in waiters:
                d.callback(None)
            return
        if not self._everReady:
            starting, self._starting = self._starting, None
            self._log.error("fork server failed to start: {why}", why=describeEnd(status))
            self._startError = RuntimeError("the fork server failed to start (%s)" % (describeEnd(status),))
            if starting is not None and not starting.called:
                starting.errback(self._startError)
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.errback(self._startError)
            return
        self._failures += 1
        delay = min(self.restartDelay * 2 ** (self._failures - 1), 30.0)
        self._log.warn(
            "fork server ended ({why}); restarting in {delay} s", why=describeEnd(status), delay=delay
        )
        self._restartCall = self._reactor.callLater(delay, self._spawn)


def describeEnd(status):
    if isinstance(status, error.ProcessTerminated):
        if status.signal is not None:
            try:
                return "killed by %s" % (signal.Signals(status.signal).name,)
            except ValueError:
                return "killed by signal %s" % (status.signal,)
        return "exit code %s" % (status.exitCode,)
    return "exit code 0"
