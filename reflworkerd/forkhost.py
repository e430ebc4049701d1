"""The fork host: the process that preloads refl1d once and forks each fit.

Run by the worker's local backend (``local.LocalBackend``) as ``python -m
reflworkerd.forkhost``, speaking the line protocol of ``wire`` on fds 3 and
4. A plain ``poll`` loop, no reactor, so that forks start from a quiet,
single-threaded process.

A cold ``refl1d --batch`` spends seconds importing numpy, bumps, refl1d and
matplotlib and compiling numba kernels before it fits anything. The host does
that once (``runner.preload(warm=True)``) and forks a child per fit: the child
starts with everything in memory, confines itself (``sandbox.confine``) before
it reads the model, runs ``runner.outcomeOf``, leaves the outcome in the job
directory (``outcome.write``) and exits. Its progress and checkpoints go on a
pipe of its own, relayed to the worker as ``message`` events at a bounded rate.

Each fit runs in its own process group (its pid). When the child exits the
host KILLs whatever is left in that group and reaps it (the host is a child
subreaper, so orphans of the fit come back to it) before it reports
``exited``: nothing a fit started outlives it (in the ``none`` sandbox mode,
short of a process that leaves the group with ``setsid``; the namespace modes
run the fit as pid 1 of its own pid namespace, which the kernel empties when it
ends). Each child also dies with the host (``PR_SET_PDEATHSIG``).
"""

import errno
import os
import select
import signal
import sys
import time

from reflworkerd import outcome, preload, runner, sandbox
from reflworkerd.jobfiles import finite
from reflworkerd.shared import RESULTS_DIR, STDERR_NAME, STDOUT_NAME
from reflworkerd.wire import (COMMANDS_FD, EVENTS_FD, LEFTOVER_TIMEOUT, MAX_CHILD_LINE, RELAY_INTERVAL,
                              RELAYED_TYPES, LineBuffer, encode, groupExists, killGroup, parseLine,
                              writeAll)

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


class _Child:
    def __init__(self, token, pid, readFd):
        self.token = token
        self.pid = pid
        self.readFd = readFd
        self.lines = LineBuffer(MAX_CHILD_LINE)
        self.exit = None
        self.drainDeadline = None
        self.pending = {}
        self.lastRelay = {}


class ForkHost:
    """The fork host's loop: commands in, forks, relayed child messages, exits out.

    ``once``: the loop ends after its first fit has exited (a Slurm job's
    node program, ``slurmjob``, runs one fit this way)."""

    def __init__(self, commandsFd, eventsFd, once=False):
        self.commandsFd = commandsFd
        self.once = once
        self.eventsFd = eventsFd
        self.commands = LineBuffer()
        self.children = {}
        self.byPid = {}
        self.byFd = {}
        self.closing = False
        self.wakeRead, self.wakeWrite = os.pipe()
        os.set_blocking(self.wakeRead, False)
        os.set_blocking(self.wakeWrite, False)
        self.pid = os.getpid()

    def send(self, event):
        writeAll(self.eventsFd, encode(event))

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
                    killGroup(child.pid, signal.SIGKILL)

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
            command = parseLine(line)
            if command is None:
                continue
            if command.get("op") == "run":
                self._fork(poller, command)
            elif command.get("op") == "signal":
                child = self.children.get(command.get("run"))
                if child is not None and child.exit is None:
                    killGroup(child.pid, int(command["signal"]))

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
                backend=command.get("backend") or "local",
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
                self._closePipe(poller, child)
                return
            for line in child.lines.feed(data):
                message = parseLine(line)
                if message is not None and message.get("type") in RELAYED_TYPES:
                    child.pending[message["type"]] = message
            self._relayDue(child)

    def _closePipe(self, poller, child):
        poller.unregister(child.readFd)
        del self.byFd[child.readFd]
        os.close(child.readFd)
        child.readFd = None

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
            if killGroup(child.pid, signal.SIGKILL) and time.monotonic() < child.drainDeadline:
                continue
            if child.readFd is not None:
                self._readChild(poller, child)
                if child.readFd is not None:
                    self._closePipe(poller, child)
            self._relayDue(child, force=True)
            del self.children[child.token]
            leftover = groupExists(child.pid)
            self.send(dict(child.exit, event="exited", run=child.token, leftover=leftover))
            if self.once:
                self.closing = True


class _Reporter:
    """The child's end of its message pipe: whole JSON lines, one writer at a time."""

    def __init__(self, fd):
        import threading

        self.fd = fd
        self.lock = threading.Lock()

    def send(self, message):
        data = encode(message, allow_nan=False, default=str)
        with self.lock:
            try:
                writeAll(self.fd, data)
            except BrokenPipeError:
                return

    def progress(self, progress):
        try:
            self.send({"type": "progress", "progress": finite(progress)})
        except ValueError:
            pass

    def checkpoint(self, path):
        self.send({"type": "checkpoint", "path": path})


def _redirect(fd, path):
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)


def serve(commandsFd=COMMANDS_FD, eventsFd=EVENTS_FD, once=False):
    """The fork host process: preload, say ready, fork fits until the worker closes
    ``commandsFd`` (or, ``once``, until the first fit has exited)."""
    started = time.monotonic()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    for fd in (commandsFd, eventsFd):
        os.set_inheritable(fd, False)
    preload.preload(warm=True)
    import threading

    host = ForkHost(commandsFd, eventsFd, once=once)
    host.send(
        {"event": "ready", "pid": os.getpid(), "preload": time.monotonic() - started, "threads": threading.active_count()}
    )
    try:
        host.loop()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise


if __name__ == "__main__":
    serve()
