"""The fork server: one preloaded Python process per worker that forks each fit.

A cold ``refl1d --batch`` spends seconds importing numpy, bumps, refl1d and
matplotlib and compiling numba kernels before it fits anything. The fork server
does that once (``runner.preload(warm=True)``) and forks a child per fit: the
child starts with everything in memory, confines itself
(``sandbox.confine``) before it reads the model, runs ``runner.outcomeOf`` and
exits.

Two halves live here:

- ``ForkServer`` and ``FitRun``, used by the worker in its Twisted reactor: they
  start the server process with ``reactor.spawnProcess``, send it jobs, relay
  progress, enforce the wall-clock limit, cancel (TERM the fit's process group,
  KILL after a grace period on the injected clock), restart the server when it
  dies, and turn what the child left behind into the job's outcome.
- ``serve()``, the server process itself (``python -m reflworkerd.forkserver``):
  a plain ``poll`` loop, no reactor, so that forks start from a quiet,
  single-threaded process.

The wire between them is JSON lines on two extra pipes of the server process:
fd 3 carries commands from the worker, fd 4 carries events back (stdout and
stderr stay free for whatever libraries print; the worker logs them).

Commands::

    {"op": "run", "run": N, "jobId": ..., "jobDir": ABS, "request": {...},
     "sandbox": MODE, "limits": {...}, "checkpointEvery": S, "uid": U|null, "gid": G|null}
    {"op": "signal", "run": N, "signal": SIGNUM}

Events::

    {"event": "ready", "pid": P, "preload": SECONDS, "threads": N}
    {"event": "started", "run": N, "pid": P}          # P is also the fit's process group
    {"event": "message", "run": N, "message": {...}}  # from the child, see below
    {"event": "exited", "run": N, "code": C|null, "signal": S|null, "cpu": SECONDS, "leftover": BOOL}

Each child writes JSON lines on a pipe of its own, relayed as ``message``
events (at most one of each type per ``RELAY_INTERVAL``, the latest):
``{"type": "confined", "confinement": DESC, "pid": P}`` once confined (or
``{"type": "unconfined", "error": …}`` where confining failed), then
``{"type": "progress", "progress": {"step", "chisq", "parameters", "elapsed"}}``
and ``{"type": "checkpoint", "path": "results/session.h5"}`` after each
checkpoint of the session file. The model shares that pipe: the worker takes
the first ``confined`` only as the sign that its own confinement
(``sandbox.describe``) is in place, cuts progress down to typed fields
(``jobfiles.cleanProgress``), and opens a checkpoint as any file of the job.

The outcome (status, result summary, error, the model's traceback) does not go
over the pipe: the child writes it to ``jobDir/.outcome.json`` as it ends
(``outcome.write``), and the worker reads it (``outcome.read``,
through ``jobfiles``, off the reactor thread) once the server reports the
child exited and its process group gone. Every line either side parses is
bounded in size and depth and never raises: one fit's output cannot end the
fork server or another fit. A child that
was killed, or died, leaves none, and the worker describes how it ended instead.

Each fit runs in its own process group (its pid). When the child exits the
server KILLs whatever is left in that group and reaps it (the server is a child
subreaper, so orphans of the fit come back to it) before it reports ``exited``:
nothing a fit started outlives it (in the ``none`` sandbox mode, short of a
process that leaves the group with ``setsid``; the namespace modes run the fit
as pid 1 of its own pid namespace, which the kernel empties when it ends).
Each child also dies with the server
(``PR_SET_PDEATHSIG``); if the server dies anyway, the worker KILLs the groups
of the fits that were in it, fails those jobs alone and starts a new server.
"""

import errno
import json
import os
import select
import signal
import sys
import time

from twisted.internet import defer, error, protocol, threads
from twisted.logger import Logger

from reflworkerd import jobfiles, outcome, runner, sandbox
from reflworkerd.shared import RESULTS_DIR, SESSION_NAME, STDERR_NAME, STDOUT_NAME

COMMANDS_FD = 3
EVENTS_FD = 4
MAX_LINE = 16 * 1024 * 1024
MAX_CHILD_LINE = 1024 * 1024
LEFTOVER_TIMEOUT = 10.0
RELAY_INTERVAL = 0.1
"""At most one message of each type per child per this many seconds goes to the
worker (the latest wins): a fit that floods its pipe cannot flood the worker."""
RELAYED_TYPES = ("confined", "unconfined", "progress", "checkpoint")
CHECKPOINT_PATH = RESULTS_DIR + "/" + SESSION_NAME

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option, value):
    """prctl(2) through libc; returns False where it is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except Exception:
        return False


class _LineBuffer:
    """Split a byte stream into lines; drop a line longer than ``limit``."""

    def __init__(self, limit=MAX_LINE):
        self.limit = limit
        self.pending = b""
        self.discarding = False

    def feed(self, data):
        self.pending += data
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        if self.discarding and lines:
            lines.pop(0)
            self.discarding = False
        if len(self.pending) > self.limit:
            self.pending = b""
            self.discarding = True
        return lines


def _parseLine(line):
    """A JSON object from a line, or None: bounded in size and depth (a fit writes
    some of these lines), and never raising."""
    try:
        value = jobfiles.loadJSON(line, MAX_LINE)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------
# The worker's half: runs in the reactor thread.


class FitRun:
    """One fit handed to the fork server.

    ``done`` fires once with ``{"status": "COMPLETE"|"ERROR"|"CANCEL", "result",
    "error", "trace", "confinement"}``, after the fit's process group is gone.
    ``pid`` is the forked child's pid, which is also its process group, once
    the server has started it. ``confinement`` is the confinement the worker
    applies (``sandbox.describe``), set once the child says it is confined;
    what a fit says about itself is never taken for it.
    """

    _log = Logger()

    def __init__(self, server, token, jobId, jobDir, request, onProgress):
        self._server = server
        self._clock = server._reactor
        self.token = token
        self.jobId = jobId
        self.jobDir = jobDir
        self.request = request
        self._onProgress = onProgress
        self._onCheckpoint = None
        self.done = defer.Deferred()
        self.pid = None
        self.uid = self.gid = None
        self.confinement = ""
        self.sent = False
        self.finished = False
        self.cancelRequested = False
        self.wallExceeded = False
        self.aborted = None
        self.unconfined = None
        self.applied = ""
        self._grace = 5.0
        self._wallCall = None
        self._killCall = None
        self._goneCall = None

    def cancel(self, grace=5.0):
        """TERM the fit's whole process group; KILL it ``grace`` seconds later if still there."""
        if self.finished or self.cancelRequested:
            return
        self.cancelRequested = True
        self._grace = grace
        if not self.sent:
            self._server._unqueue(self)
            self._finish(outcome.cancelled())
        elif self.pid is not None:
            self._terminate(grace)

    def abort(self, why):
        """End the fit ``ERROR`` with ``why`` (what it left cannot be used): TERM
        its group, KILL it after the grace period."""
        if self.finished or self.cancelRequested or self.aborted is not None:
            return
        self._log.warn("fit {jobId} ends: {why}", jobId=self.jobId, why=why)
        self.aborted = why
        if not self.sent:
            self._server._unqueue(self)
            self._finish(outcome.error(why))
        elif self.pid is not None:
            self._terminate(self._grace)

    def _terminate(self, grace):
        self._signal(signal.SIGTERM)
        if self._killCall is None:
            self._killCall = self._clock.callLater(grace, self._kill)

    def _kill(self):
        self._killCall = None
        if not self.finished:
            self._log.info("fit {jobId} still running {grace} s after TERM: KILL", jobId=self.jobId, grace=self._grace)
            self._signal(signal.SIGKILL)

    def _signal(self, signum):
        if not self._server._signal(self, signum) and self.pid is not None:
            _killGroup(self.pid, signum)

    def _started(self, pid):
        self.pid = pid
        wall = (self._server.limits or {}).get("wall")
        if wall:
            self._wallCall = self._clock.callLater(wall, self._wallLimit, wall)
        if self.cancelRequested or self.aborted is not None:
            self._terminate(self._grace)

    def _wallLimit(self, wall):
        self._wallCall = None
        if not self.finished:
            self._log.info("fit {jobId} reached its wall-clock limit of {wall} s", jobId=self.jobId, wall=wall)
            self.wallExceeded = True
            self._terminate(self._grace)

    def _message(self, message):
        """A message relayed from the child. Only the first ``confined`` and an
        ``unconfined`` come from the worker's own code (before the model is
        read); the rest may be the model's: only their shape is used."""
        kind = message.get("type")
        if kind == "confined" and not self.confinement:
            self.confinement = self.applied
        elif kind == "unconfined" and self.unconfined is None and not self.confinement:
            self.unconfined = str(message.get("error"))[:2000]
        elif kind == "progress":
            progress = jobfiles.cleanProgress(message.get("progress"))
            if progress is not None:
                self._onProgress(progress)
        elif kind == "checkpoint" and self._onCheckpoint is not None:
            if message.get("path") == CHECKPOINT_PATH:
                self._onCheckpoint(CHECKPOINT_PATH)

    @defer.inlineCallbacks
    def _exited(self, event):
        record = self._decided()
        if record is None:
            try:
                left = yield self._server._inThread(outcome.read, self.jobDir, self.owner)
                record = self._record(left, event)
            except jobfiles.UnsafeFile as e:
                record = outcome.error("the fit left an outcome the worker does not read: %s" % (e,))
            except Exception as e:
                self._log.failure("fit {jobId}: its outcome could not be read", jobId=self.jobId)
                record = outcome.error("the worker could not read the fit's outcome: %s" % (e,))
        self._finish(record)

    @property
    def owner(self):
        """The uid the fit's files must belong to."""
        return jobfiles.expectedOwner(self.uid)

    def _decided(self):
        """The outcome where the worker decided it, without reading the fit's; else None."""
        limits = self._server.limits or {}
        if self.aborted is not None:
            return outcome.error(self.aborted)
        if self.wallExceeded:
            return outcome.error("wall-clock limit of %s s exceeded" % (_number(limits.get("wall")),))
        if self.cancelRequested:
            return outcome.cancelled()
        if self._server._stopping:
            return outcome.error("the worker stopped while this fit ran")
        if self.unconfined is not None:
            return outcome.error("could not confine the fit: %s" % (self.unconfined,))
        return None

    def _record(self, left, event):
        """The job's outcome from the record the fit ``left`` (None: it left none)."""
        limits = self._server.limits or {}
        if left is None:
            return outcome.error(_deathMessage(event, limits))
        record = outcome.make(left["status"], left.get("result"), left.get("error"), left.get("trace"))
        if record["status"] == "ERROR":
            record["error"] = _limitMessage(record["error"] or "", left.get("limit"), limits)
        return record

    def _lost(self, why):
        """The fork server is gone with this fit in it: KILL the fit's group, fail the job."""
        if self.finished:
            return
        if self.pid is None:
            self._finish(outcome.error(why))
            return
        _killGroup(self.pid, signal.SIGKILL)
        deadline = self._clock.seconds() + LEFTOVER_TIMEOUT

        def check():
            self._goneCall = None
            if _groupExists(self.pid) and self._clock.seconds() < deadline:
                _killGroup(self.pid, signal.SIGKILL)
                self._goneCall = self._clock.callLater(0.05, check)
            else:
                self._finish(outcome.error(why))

        check()

    def _finish(self, record):
        if self.finished:
            return
        if self.aborted is not None and record.get("status") != "ERROR":
            record = outcome.error(self.aborted)
        self.finished = True
        for name in ("_wallCall", "_killCall", "_goneCall"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        record["confinement"] = self.confinement
        self._server._forget(self)
        self.done.callback(record)


def _number(value):
    return ("%g" % value) if isinstance(value, (int, float)) else str(value)


def _limitMessage(error, limit, limits):
    """Say which limit a model's error comes from, when it plainly comes from one."""
    if limit == "memory" and limits.get("memory"):
        return "memory limit of %d bytes exceeded (%s)" % (limits["memory"], error)
    if limit == "fsize" and limits.get("fsize"):
        return "file size limit of %d bytes exceeded (%s)" % (limits["fsize"], error)
    return error


def _deathMessage(event, limits):
    signum = event.get("signal")
    code = event.get("code")
    cpu = event.get("cpu") or 0.0
    if signum in (signal.SIGKILL, signal.SIGXCPU) and limits.get("cpu") and cpu >= limits["cpu"] - 1:
        return "CPU time limit of %s s exceeded" % (_number(limits["cpu"]),)
    if signum == signal.SIGXFSZ and limits.get("fsize"):
        return "file size limit of %d bytes exceeded" % (limits["fsize"],)
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        message = "the fit process was killed by %s without a result" % (name,)
        if limits.get("memory") and signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            message += " (memory limit %d bytes)" % (limits["memory"],)
        return message
    return "the fit process exited with code %s without a result" % (code,)


def _killGroup(pgid, signum):
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _groupExists(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ServerProtocol(protocol.ProcessProtocol):
    """Translate the server process's pipes into calls on its `ForkServer`."""

    _log = Logger()

    def __init__(self, owner):
        self.owner = owner
        self.events = _LineBuffer()
        self.output = {1: _LineBuffer(), 2: _LineBuffer()}

    def childDataReceived(self, fd, data):
        """Never raises: an exception here would make Twisted close the pipe, and
        the fork server, every fit in it."""
        if fd == EVENTS_FD:
            for line in self.events.feed(data):
                event = _parseLine(line)
                if event is not None:
                    try:
                        self.owner._event(self, event)
                    except Exception:
                        self._log.failure("fork server event {event!r:.300}", event=event)
        elif fd in self.output:
            for line in self.output[fd].feed(data):
                self.owner._output(fd, line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.owner._ended(self, reason)


class ForkServer:
    """The worker's handle on its fork server process.

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
        if sandboxMode not in ("apparmor", "namespaces", "none"):
            raise ValueError("sandboxMode is what sandbox.choose returned, not %r" % (sandboxMode,))
        self._reactor = reactor
        self.python = python
        self.sandboxMode = sandboxMode
        self._inThread = inThread or (
            lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args))
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
        self._stopping = False
        self._stopWaiters = []
        self._restartCall = None
        self._stopKillCall = None
        self._failures = 0
        self._tokens = 0
        self._runs = {}
        self._queue = []

    def start(self):
        """Start the server process; the Deferred fires when it has preloaded and is ready."""
        if self._starting is not None:
            return self._starting
        self._stopping = False
        self._starting = defer.Deferred()
        self._spawn()
        return self._starting

    def _environment(self):
        env = dict(os.environ if self.env is None else self.env)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env.setdefault(name, "1")
        env.setdefault("MPLBACKEND", "Agg")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def _spawn(self):
        self._restartCall = None
        self._protocol = _ServerProtocol(self)
        args = [self.python, "-m", "reflworkerd.forkserver"]
        self._process = self._reactor.spawnProcess(
            self._protocol,
            self.python,
            args,
            env=self._environment(),
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
        fitRun = FitRun(self, self._tokens, jobId, jobDir, request, onProgress)
        fitRun.uid, fitRun.gid = uid, gid
        fitRun.applied = sandbox.describe(self.sandboxMode, self.limits, uid, os.geteuid() == 0)
        fitRun._onCheckpoint = onCheckpoint
        self._runs[fitRun.token] = fitRun
        if self._ready:
            self._send(fitRun)
        else:
            self._queue.append(fitRun)
        return fitRun

    def stop(self):
        """Stop the server and every fit in it; fires when the server process is gone."""
        self._stopping = True
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        self._restartCall = None
        for fitRun in list(self._queue):
            fitRun._finish(outcome.error("the worker stopped before this fit started"))
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
            self._process.writeToChild(COMMANDS_FD, json.dumps(command).encode("utf-8") + b"\n")
        except (KeyError, OSError):
            return False
        return True

    def _signal(self, fitRun, signum):
        if not self._ready:
            return False
        return self._write({"op": "signal", "run": fitRun.token, "signal": int(signum)})

    def _unqueue(self, fitRun):
        if fitRun in self._queue:
            self._queue.remove(fitRun)

    def _forget(self, fitRun):
        self._runs.pop(fitRun.token, None)
        self._unqueue(fitRun)

    def _event(self, proto, event):
        if proto is not self._protocol:
            return
        kind = event.get("event")
        fitRun = self._runs.get(event.get("run")) if isinstance(event.get("run"), int) else None
        if kind == "ready":
            self._becameReady(event)
        elif fitRun is None:
            return
        elif kind == "started":
            fitRun._started(int(event["pid"]))
        elif kind == "message" and isinstance(event.get("message"), dict):
            fitRun._message(event["message"])
        elif kind == "exited":
            fitRun._exited(event)

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

    def _output(self, fd, line):
        self._log.info("fork server {stream}: {line}", stream="stdout" if fd == 1 else "stderr", line=line)

    def _ended(self, proto, reason):
        if proto is not self._protocol:
            return
        self._process = None
        self._protocol = None
        self._ready = False
        self.pid = None
        status = reason.value
        why = "the fork server ended (%s) while this fit ran" % (_describeEnd(status),)
        if self._stopping:
            why = "the worker stopped while this fit ran"
        for fitRun in [r for r in self._runs.values() if r.sent]:
            fitRun._lost(why)
        if self._stopping:
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
            self._log.error("fork server failed to start: {why}", why=_describeEnd(status))
            if starting is not None and not starting.called:
                starting.errback(RuntimeError("the fork server failed to start (%s)" % (_describeEnd(status),)))
            return
        self._failures += 1
        delay = min(self.restartDelay * 2 ** (self._failures - 1), 30.0)
        self._log.warn(
            "fork server ended ({why}); restarting in {delay} s", why=_describeEnd(status), delay=delay
        )
        self._restartCall = self._reactor.callLater(delay, self._spawn)


def _describeEnd(status):
    if isinstance(status, error.ProcessTerminated):
        if status.signal is not None:
            try:
                return "killed by %s" % (signal.Signals(status.signal).name,)
            except ValueError:
                return "killed by signal %s" % (status.signal,)
        return "exit code %s" % (status.exitCode,)
    return "exit code 0"


# ---------------------------------------------------------------------------
# The server's half: runs in the spawned process, forks the fits.


class _Child:
    def __init__(self, token, pid, readFd):
        self.token = token
        self.pid = pid
        self.readFd = readFd
        self.lines = _LineBuffer(MAX_CHILD_LINE)
        self.exit = None
        self.drainDeadline = None
        self.pending = {}
        self.lastRelay = {}


class _Server:
    """The fork server's loop: commands in, forks, relayed child messages, exits out."""

    def __init__(self, commandsFd, eventsFd):
        self.commandsFd = commandsFd
        self.eventsFd = eventsFd
        self.commands = _LineBuffer()
        self.children = {}
        self.byPid = {}
        self.byFd = {}
        self.closing = False
        self.wakeRead, self.wakeWrite = os.pipe()
        os.set_blocking(self.wakeRead, False)
        os.set_blocking(self.wakeWrite, False)
        self.pid = os.getpid()

    def send(self, event):
        data = json.dumps(event).encode("utf-8") + b"\n"
        view = memoryview(data)
        while view:
            written = os.write(self.eventsFd, view)
            view = view[written:]

    def loop(self):
        signal.set_wakeup_fd(self.wakeWrite)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        poller = select.poll()
        poller.register(self.commandsFd, select.POLLIN)
        poller.register(self.wakeRead, select.POLLIN)
        while not (self.closing and not self.children):
            waiting = any(c.exit is not None or c.pending for c in self.children.values())
            try:
                ready = poller.poll(50 if waiting or self.closing else None)
            except InterruptedError:
                ready = []
            for fd, mask in ready:
                if fd == self.commandsFd:
                    self._readCommands(poller)
                elif fd == self.wakeRead:
                    self._drainWakeups()
                elif fd in self.byFd:
                    self._readChild(poller, self.byFd[fd])
            self._reap()
            self._relayDue()
            self._finishExited(poller)
            if self.closing:
                for child in self.children.values():
                    _killGroup(child.pid, signal.SIGKILL)

    def _drainWakeups(self):
        try:
            while os.read(self.wakeRead, 512):
                pass
        except BlockingIOError:
            pass

    def _readCommands(self, poller):
        try:
            data = os.read(self.commandsFd, 65536)
        except BlockingIOError:
            return
        if not data:
            poller.unregister(self.commandsFd)
            self.closing = True
            return
        for line in self.commands.feed(data):
            command = _parseLine(line)
            if command is None:
                continue
            if command.get("op") == "run":
                self._fork(poller, command)
            elif command.get("op") == "signal":
                child = self.children.get(command.get("run"))
                if child is not None and child.exit is None:
                    _killGroup(child.pid, int(command["signal"]))

    def _fork(self, poller, command):
        readFd, writeFd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readFd)
                self._inChild(command, writeFd)
            finally:
                os._exit(70)
        os.close(writeFd)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        os.set_blocking(readFd, False)
        child = _Child(command["run"], pid, readFd)
        self.children[child.token] = child
        self.byPid[pid] = child
        self.byFd[readFd] = child
        poller.register(readFd, select.POLLIN)
        self.send({"event": "started", "run": child.token, "pid": pid})

    def _inChild(self, command, progressFd):
        """The forked child: confine, run the job, leave the outcome, exit. Never returns."""
        code = 70
        try:
            os.setpgid(0, 0)
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.pid:
                os._exit(70)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            for fd in [self.commandsFd, self.eventsFd, self.wakeRead, self.wakeWrite] + list(self.byFd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            reporter = _Reporter(progressFd)
            try:
                confinement = sandbox.confine(
                    command["jobDir"],
                    command.get("sandbox") or "none",
                    command.get("limits"),
                    uid=command.get("uid"),
                    gid=command.get("gid"),
                    keepFds=[progressFd],
                )
            except Exception as exc:
                # Said on the pipe, not in a file: this process is not the fit's uid.
                reporter.send({"type": "unconfined", "error": "%s: %s" % (type(exc).__name__, exc)})
                code = 0
                return
            reporter.send({"type": "confined", "confinement": confinement, "pid": os.getpid()})
            jobDir = os.getcwd()
            os.makedirs(RESULTS_DIR, exist_ok=True)
            _redirect(1, os.path.join(RESULTS_DIR, STDOUT_NAME))
            _redirect(2, os.path.join(RESULTS_DIR, STDERR_NAME))
            record = runner.outcomeOf(
                jobDir,
                command.get("request"),
                reporter.progress,
                checkpointEvery=command.get("checkpointEvery", 300),
                checkpoint=reporter.checkpoint,
            )
            outcome.write(jobDir, record)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _readChild(self, poller, child):
        while True:
            try:
                data = os.read(child.readFd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                poller.unregister(child.readFd)
                del self.byFd[child.readFd]
                os.close(child.readFd)
                child.readFd = None
                return
            for line in child.lines.feed(data):
                message = _parseLine(line)
                if message is not None and message.get("type") in RELAYED_TYPES:
                    child.pending[message["type"]] = message
            self._relayDue(child)

    def _relayDue(self, only=None, force=False):
        now = time.monotonic()
        for child in [only] if only is not None else list(self.children.values()):
            for kind, message in list(child.pending.items()):
                if force or now - child.lastRelay.get(kind, -RELAY_INTERVAL) >= RELAY_INTERVAL:
                    del child.pending[kind]
                    child.lastRelay[kind] = now
                    self.send({"event": "message", "run": child.token, "message": message})

    def _reap(self):
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.byPid.pop(pid, None)
            if child is None:
                continue
            child.exit = {
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "cpu": usage.ru_utime + usage.ru_stime,
            }
            child.drainDeadline = time.monotonic() + LEFTOVER_TIMEOUT

    def _finishExited(self, poller):
        for child in [c for c in self.children.values() if c.exit is not None]:
            if _killGroup(child.pid, signal.SIGKILL) and time.monotonic() < child.drainDeadline:
                continue
            if child.readFd is not None:
                self._readChild(poller, child)
                if child.readFd is not None:
                    poller.unregister(child.readFd)
                    del self.byFd[child.readFd]
                    os.close(child.readFd)
            self._relayDue(child, force=True)
            del self.children[child.token]
            leftover = _groupExists(child.pid)
            self.send(dict(child.exit, event="exited", run=child.token, leftover=leftover))


class _Reporter:
    """The child's end of its message pipe: whole JSON lines, one writer at a time."""

    def __init__(self, fd):
        import threading

        self.fd = fd
        self.lock = threading.Lock()

    def send(self, message):
        data = json.dumps(message, allow_nan=False, default=str).encode("utf-8") + b"\n"
        with self.lock:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self.fd, view)
                except BrokenPipeError:
                    return
                view = view[written:]

    def progress(self, progress):
        try:
            self.send({"type": "progress", "progress": _finite(progress)})
        except ValueError:
            pass

    def checkpoint(self, path):
        self.send({"type": "checkpoint", "path": path})


def _finite(value):
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _redirect(fd, path):
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)


def serve():
    """The server process: preload, say ready, fork fits until the worker closes fd 3."""
    started = time.monotonic()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    for fd in (COMMANDS_FD, EVENTS_FD):
        os.set_inheritable(fd, False)
    runner.preload(warm=True)
    import threading

    server = _Server(COMMANDS_FD, EVENTS_FD)
    server.send(
        {"event": "ready", "pid": os.getpid(), "preload": time.monotonic() - started, "threads": threading.active_count()}
    )
    try:
        server.loop()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise


if __name__ == "__main__":
    serve()
