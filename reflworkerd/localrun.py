"""One fit of the ``local`` backend: `FitRun`, the policy of a fit forked by
the local backend (``local.LocalBackend``).

A `FitRun` owns the wall-clock limit, cancel (TERM the fit's process group,
KILL after a grace period on the injected clock), and the one outcome it
gives back, read from what the child left (``outcome.read``, through
``jobfiles``, off the reactor thread) once the host reports the child exited
and its process group gone. A child that was killed, or died, leaves none,
and the run describes how it ended instead (``outcome.deathMessage``).

The model shares the child's message pipe: a run takes the first
``confined`` only as the sign that its own confinement (``sandbox.describe``)
is in place, cuts progress down to typed fields (``jobfiles.cleanProgress``),
and opens a checkpoint as any file of the job. It speaks to the fork server
only through its ``withdraw``, ``signal`` and ``forget`` and its ``stopping``.
"""

import signal

from twisted.internet import defer
from twisted.logger import Logger

from reflworkerd import jobfiles, outcome
from reflworkerd.wire import CHECKPOINT_PATH, LEFTOVER_TIMEOUT, groupExists, killGroup


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
    survives = False

    def __init__(self, host, clock, inThread, limits, token, jobId, jobDir, request, onProgress,
                 onCheckpoint=None, uid=None, gid=None, applied=""):
        self._host = host
        self._clock = clock
        self._inThread = inThread
        self._limits = limits
        self.token = token
        self.jobId = jobId
        self.jobDir = jobDir
        self.request = request
        self._onProgress = onProgress
        self._onCheckpoint = onCheckpoint
        self.done = defer.Deferred()
        self.pid = None
        self.uid, self.gid = uid, gid
        self.confinement = ""
        self.sent = False
        self.finished = False
        self.cancelRequested = False
        self.wallExceeded = False
        self.aborted = None
        self.unconfined = None
        self.applied = applied
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
            self._host.withdraw(self)
            self.finish(outcome.cancelled())
        else:
            self._terminate(grace)      # a fit not yet started is signalled again when it starts

    def abort(self, why):
        """End the fit ``ERROR`` with ``why`` (what it left cannot be used): TERM
        its group, KILL it after the grace period."""
        if self.finished or self.cancelRequested or self.aborted is not None:
            return
        self._log.warn("fit {jobId} ends: {why}", jobId=self.jobId, why=why)
        self.aborted = why
        if not self.sent:
            self._host.withdraw(self)
            self.finish(outcome.error(why))
        else:
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
        if not self._host.signal(self, signum) and self.pid is not None:
            killGroup(self.pid, signum)

    def started(self, pid):
        self.pid = pid
        wall = self._limits.get("wall")
        if wall and self._wallCall is None:
            self._wallCall = self._clock.callLater(wall, self._wallLimit, wall)
        if self.cancelRequested or self.aborted is not None:
            self._terminate(self._grace)

    def _wallLimit(self, wall):
        self._wallCall = None
        if not self.finished:
            self._log.info("fit {jobId} reached its wall-clock limit of {wall} s", jobId=self.jobId, wall=wall)
            self.wallExceeded = True
            self._terminate(self._grace)

    def relayed(self, message):
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
    def exited(self, event):
        record = self._decided()
        if record is None:
            try:
                left = yield self._inThread(outcome.read, self.jobDir, self.owner)
                record = self._record(left, event)
            except jobfiles.UnsafeFile as e:
                record = outcome.error("the fit left an outcome the worker does not read: %s" % (e,))
            except Exception as e:
                self._log.failure("fit {jobId}: its outcome could not be read", jobId=self.jobId)
                record = outcome.error("the worker could not read the fit's outcome: %s" % (e,))
        self.finish(record)

    @property
    def owner(self):
        """The uid the fit's files must belong to."""
        return jobfiles.expectedOwner(self.uid)

    def ended(self, why):
        """The fit's host ended without saying how the fit did (a Slurm job that
        ended before its program could report): the outcome the worker decided,
        else ``ERROR`` saying ``why``."""
        self.finish(self._decided() or outcome.error(why))

    def _decided(self):
        """The outcome where the worker decided it, without reading the fit's; else None."""
        limits = self._limits
        if self.aborted is not None:
            return outcome.error(self.aborted)
        if self.wallExceeded:
            return outcome.error("wall-clock limit of %s s exceeded" % (outcome.number(limits.get("wall")),))
        if self.cancelRequested:
            return outcome.cancelled()
        if self._host.stopping:
            return outcome.error("the worker stopped while this fit ran")
        if self.unconfined is not None:
            return outcome.error("could not confine the fit: %s" % (self.unconfined,))
        return None

    def _record(self, left, event):
        """The job's outcome from the record the fit ``left`` (None: it left none)."""
        limits = self._limits
        if left is None:
            return outcome.error(outcome.deathMessage(event, limits))
        record = outcome.make(left["status"], left.get("result"), left.get("error"), left.get("trace"))
        if record["status"] == "ERROR":
            record["error"] = outcome.limitMessage(record["error"] or "", left.get("limit"), limits)
        return record

    def lost(self, why):
        """The fork server is gone with this fit in it: KILL the fit's group, fail the job."""
        if self.finished:
            return
        if self.pid is None:
            self.finish(outcome.error(why))
            return
        killGroup(self.pid, signal.SIGKILL)
        deadline = self._clock.seconds() + LEFTOVER_TIMEOUT

        def check():
            self._goneCall = None
            if groupExists(self.pid) and self._clock.seconds() < deadline:
                killGroup(self.pid, signal.SIGKILL)
                self._goneCall = self._clock.callLater(0.05, check)
            else:
                self.finish(outcome.error(why))

        check()

    def finish(self, record):
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
        self._host.forget(self)
        self.done.callback(record)
