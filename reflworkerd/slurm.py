"""The ``slurm`` backend: each leased job's fit is one Slurm batch job.

The worker runs on a cluster's login node; the job directories are under
``--shared-dir``, a path the compute nodes share. For each fit the backend
writes the fork host's own ``run`` command into a control directory of its
own (``SHARED/slurm/<job id>/``, mode 0700, never inside the job directory)
and submits ``python -m reflworkerd.slurmjob CONTROL`` with ``sbatch``. On the
node that program runs the fork host's loop for the one fit (``slurmjob``), so
the preload, the fork, the confinement, the limits, the seed, the progress, the
checkpoints and the result files are those of the ``local`` backend, and the
worker's policy of a fit (`localrun.FitRun`: wall limit, cancel, its one
outcome read from what the fit left) is the same object.

The node's events come back through the shared directory
(``CONTROL/events``); every ``pollInterval`` one ``squeue`` call asks for all
of this worker's Slurm jobs at once, never one per job, and the events files
are read on from where they were left. Slurm's end states map to outcomes:
a job that ran its program ends as its fit did; ``TIMEOUT``,
``OUT_OF_MEMORY``, ``DEADLINE`` and a cancel by someone else end ``ERROR``
saying so; ``NODE_FAIL``, ``PREEMPTED`` and ``BOOT_FAIL`` hand the job back
to the server (``outcome.lost``: requeued, the attempt counted).

A cancel TERMs the fit's processes (``scancel --full --signal=TERM``), KILLs
them after the grace period, and ends the Slurm job (``scancel``): nothing of
ours stays in ``squeue``. The Slurm jobs outlive the worker: after a restart
the backend reads its control directories (``survivors``), the poller adopts
the jobs it still holds (``adopt``) and the rest are cancelled
(``forgetSurvivors``).
"""

import json
import os
import shlex
import shutil
import signal
import sys

from twisted.application import service
from twisted.internet import defer, task, utils
from twisted.logger import Logger
from twisted.python import failure

from reflservd.fitoptions import requestedCpus
from reflworkerd.backend import reactorThreads
from reflworkerd import outcome, sandbox
from reflworkerd.local import fitEnvironment
from reflworkerd.localrun import FitRun
from reflworkerd.slurmjob import COMMAND_NAME, EVENTS_NAME
from reflworkerd.statefile import writeDurably
from reflworkerd.wire import LineBuffer, parseLine

SLURM_ID_NAME = "slurm.json"
"""In a control directory: the job id and its Slurm job id, written once sbatch answered."""
SCRIPT_NAME = "job.sh"
OUTPUT_NAME = "slurm.out"
EVENTS_PER_POLL = 1024 * 1024
"""Bytes of a job's events read per poll: a fit that floods them only delays itself."""
TAG = "reflworkerd:"
"""The start of each Slurm job's comment, followed by its control directory: how a
worker finds its own jobs in Slurm when its control files do not say."""
FORGOTTEN_POLLS = 3
"""Polls a Slurm job may be missing from ``squeue`` before it is taken as gone."""

LIVE_STATES = frozenset([
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"])
HANDED_BACK = frozenset(["NODE_FAIL", "PREEMPTED", "BOOT_FAIL"])
"""End states that are the cluster's failure, not the fit's: the job goes back to the queue."""
ENDED_BY_SLURM = {
    "TIMEOUT": "Slurm's time limit for the job (--slurm-time) was reached",
    "OUT_OF_MEMORY": "Slurm ended the job: out of memory on its node",
    "DEADLINE": "Slurm ended the job: its deadline passed",
    "CANCELLED": "the job was cancelled in Slurm, not by this worker",
}


class SlurmError(Exception):
    """A Slurm command failed; the message is its own."""


class SlurmCommands:
    """Slurm's commands, run without a shell and off the reactor thread."""

    def __init__(self, reactor, env=None):
        self._reactor = reactor
        self.env = dict(os.environ if env is None else env)

    @defer.inlineCallbacks
    def run(self, name, *args):
        """The standard output of ``name args``; `SlurmError` where it fails."""
        path = shutil.which(name, path=self.env.get("PATH"))
        if path is None:
            raise SlurmError("%s is not installed here (Debian: apt-get install slurm-client)" % (name,))
        out, err, code = yield utils.getProcessOutputAndValue(path, args, env=self.env,
                                                              reactor=self._reactor)
        if code != 0:
            said = (err or out).decode("utf-8", "replace").strip()
            raise SlurmError("%s: %s" % (name, said[-500:] or "exit code %s" % (code,)))
        return out.decode("utf-8", "replace")

    @defer.inlineCallbacks
    def states(self, slurmIds):
        """``{slurmId: (state, reason, nodes)}`` of the jobs Slurm still knows, in one call."""
        try:
            out = yield self.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%r|%N",
                                 "--jobs=" + ",".join(str(i) for i in sorted(slurmIds)))
        except SlurmError as e:
            if "Invalid job id" in str(e):
                return {}       # squeue's answer when the one id asked for is unknown
            raise
        return parseStates(out)

    @defer.inlineCallbacks
    def tagged(self):
        """``{slurmId: comment}`` of this user's live Slurm jobs that a worker tagged."""
        out = yield self.run("squeue", "--noheader", "--user=%d" % (os.geteuid(),),
                             "--format=%i|%k")
        jobs = {}
        for line in out.splitlines():
            slurmId, _, comment = line.strip().partition("|")
            if slurmId.isdigit() and comment.startswith(TAG):
                jobs[int(slurmId)] = comment[len(TAG):]
        return jobs


def parseStates(text):
    states = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[0].isdigit():
            states[int(fields[0])] = (fields[1], fields[2], fields[3])
    return states


class SlurmRun(FitRun):
    """A `FitRun` whose fit is a Slurm job: its id, its state and its events file."""

    survives = True

    def __init__(self, *args, **kw):
        FitRun.__init__(self, *args, **kw)
        self.slurmId = None
        self.slurmState = None
        self.missing = 0
        self.eventsOffset = 0
        self.lines = LineBuffer()
        self.exitEvent = None


class SlurmBackend(service.Service):
    """The ``slurm`` backend (`backend.IBackend`): fits as Slurm batch jobs.

    ``sharedDir`` holds the control directories (the job directories are in
    the worker's work directory, which must also be shared with the nodes).
    ``partition``, ``account``, ``cpusPerJob``, ``timeLimit`` and ``extra``
    (more ``sbatch`` arguments) shape each Slurm job; a job asking for
    ``parallel`` or ``mpi`` N gets at least N CPUs (one task: the ranks of
    ``mpi`` start inside the fit's confinement, ``mpifit``). ``commands`` runs Slurm's commands
    (`SlurmCommands`); ``inThread`` a blocking call off the reactor thread.
    """

    _log = Logger()

    def __init__(self, reactor, sharedDir, partition, account=None, cpusPerJob=1, timeLimit=None,
                 extra=(), python=sys.executable, sandboxMode="none", limits=None, env=None,
                 checkpointEvery=300, pollInterval=2.0, inThread=None, commands=None):
        self._reactor = reactor
        self.controlRoot = os.path.join(os.path.abspath(sharedDir), "slurm")
        self.partition = partition
        self.account = account
        self.cpusPerJob = cpusPerJob
        self.timeLimit = timeLimit
        self.extra = list(extra)
        self.python = python
        self.sandboxMode = sandbox.checkApplied(sandboxMode)
        self.limits = dict(limits or {})
        self.checkpointEvery = checkpointEvery
        self.pollInterval = pollInterval
        self._inThread = inThread or reactorThreads(reactor)
        self.commands = commands or SlurmCommands(reactor, fitEnvironment(env))
        self.stopping = False
        self._runs = {}
        self._survivors = {}
        self._ready = None
        self._readyWaiters = []
        self._loop = None
        self._polling = None

    # ---- life

    def startService(self):
        service.Service.startService(self)
        self.stopping = False
        os.makedirs(self.controlRoot, mode=0o700, exist_ok=True)
        os.chmod(self.controlRoot, 0o700)
        self._survivors = readSurvivors(self.controlRoot)
        self._ready = self.commands.run("sinfo", "--noheader", "--format=%a", "--partition=" + self.partition)
        self._ready.addCallback(self._partitionChecked)
        self._ready.addErrback(self._notReady)
        self._ready.addBoth(self._settled)
        self._loop = task.LoopingCall(self._poll)
        self._loop.clock = self._reactor
        self._loop.start(self.pollInterval, now=False).addErrback(
            lambda f: self._log.failure("the Slurm poll stopped", f))

    def _partitionChecked(self, out):
        if not out.strip():
            raise SlurmError("Slurm has no partition %r" % (self.partition,))
        self._log.info("fits go to Slurm partition {partition} ({state})", partition=self.partition,
                       state=out.split()[0])

    def _notReady(self, failure):
        self._log.error("the Slurm backend cannot start: {why}", why=failure.getErrorMessage())
        return failure

    @defer.inlineCallbacks
    def stopService(self):
        """Stop watching; the Slurm jobs go on, for the next start to adopt."""
        service.Service.stopService(self)
        self.stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._polling is not None:
            yield self._polling

    def whenReady(self):
        """Fires once Slurm has answered that the partition exists; fails where it cannot."""
        if isinstance(self._ready, defer.Deferred) or self._ready is None:
            d = defer.Deferred()
            self._readyWaiters.append(d)
            return d
        return defer.fail(self._ready) if isinstance(self._ready, Exception) else defer.succeed(None)

    def _settled(self, result):
        self._ready = result.value if isinstance(result, failure.Failure) else True
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            if self._ready is True:
                d.callback(None)
            else:
                d.errback(self._ready)

    def survivors(self):
        """The jobs this worker had in Slurm when it last stopped."""
        return frozenset(self._survivors)

    # ---- fits

    def _newRun(self, jobId, jobDir, request, onProgress, onCheckpoint, uid, gid):
        jobDir = os.path.abspath(jobDir)
        fitRun = SlurmRun(self, self._reactor, self._inThread, self.limits, int(jobId), jobId, jobDir,
                          request, onProgress, onCheckpoint, uid, gid,
                          applied=sandbox.describe(self.sandboxMode, self.limits, uid, os.geteuid() == 0))
        self._runs[fitRun.token] = fitRun
        return fitRun

    def run(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        """Submit the fit of the job in ``jobDir`` to Slurm (see `backend.IBackend.run`)."""
        fitRun = self._newRun(jobId, jobDir, request, onProgress, onCheckpoint, uid, gid)
        self._submit(fitRun).addErrback(
            lambda f: fitRun.finish(outcome.error("the job could not be given to Slurm: %s"
                                                  % (f.getErrorMessage(),))))
        return fitRun

    def adopt(self, jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        """Watch again the Slurm job of ``jobId`` that a previous run of the worker
        submitted; its events are read from the start."""
        slurmId = self._survivors.pop(jobId)
        fitRun = self._newRun(jobId, jobDir, request, onProgress, onCheckpoint, uid, gid)
        fitRun.slurmId = slurmId
        fitRun.sent = True
        self._log.info("job {jobId}: adopted Slurm job {slurmId}", jobId=jobId, slurmId=slurmId)
        return fitRun

    def forgetSurvivors(self):
        """The survivors no job held here adopted: cancel them in Slurm, remove them;
        and any other live Slurm job tagged with a control directory of ours (one
        whose sbatch answered after the last state was written)."""
        survivors, self._survivors = self._survivors, {}
        for jobId, slurmId in sorted(survivors.items()):
            self._log.info("job {jobId}: no longer held here; cancelling its Slurm job {slurmId}",
                           jobId=jobId, slurmId=slurmId)
            self._scancel(slurmId).addBoth(lambda _, j=jobId: self._inThread(self._removeControl, j))
        d = self.commands.tagged()
        d.addCallback(self._cancelUntracked, set(survivors.values()))
        d.addErrback(lambda f: self._log.warn("looking for untracked Slurm jobs: {why}",
                                              why=f.getErrorMessage()))
        return d

    def _cancelUntracked(self, tagged, cancelled):
        tracked = {r.slurmId for r in self._runs.values()} | cancelled
        for slurmId, control in sorted(tagged.items()):
            if os.path.dirname(control) == self.controlRoot and slurmId not in tracked:
                self._log.info("Slurm job {slurmId} ({control}) is ours but no job holds it; "
                               "cancelling it", slurmId=slurmId, control=control)
                self._scancel(slurmId)

    def _controlDir(self, jobId):
        return os.path.join(self.controlRoot, str(int(jobId)))

    @defer.inlineCallbacks
    def _submit(self, fitRun):
        control = self._controlDir(fitRun.jobId)
        script = yield self._inThread(self._writeControl, fitRun, control)
        cpus = max(self.cpusPerJob, requestedCpus(fitRun.request))
        args = ["--parsable", "--job-name=reflworkerd-%d" % (fitRun.jobId,),
                "--partition=" + self.partition, "--cpus-per-task=%d" % (cpus,),
                "--output=" + os.path.join(control, OUTPUT_NAME), "--chdir=" + control,
                "--no-requeue", "--export=ALL", "--comment=" + TAG + control]
        if self.account:
            args.append("--account=" + self.account)
        if self.timeLimit:
            args.append("--time=" + self.timeLimit)
        out = yield self.commands.run("sbatch", *(args + self.extra + [script]))
        slurmId = int(out.strip().split(";")[0])
        yield self._inThread(writeDurably, os.path.join(control, SLURM_ID_NAME),
                             {"jobId": fitRun.jobId, "slurmId": slurmId})
        fitRun.slurmId = slurmId
        self._log.info("job {jobId}: Slurm job {slurmId} in partition {partition}",
                       jobId=fitRun.jobId, slurmId=slurmId, partition=self.partition)
        if fitRun.finished:     # withdrawn while sbatch ran
            yield self._scancel(slurmId)
            yield self._inThread(self._removeControl, fitRun.jobId)
            return
        fitRun.sent = True
        if fitRun.cancelRequested or fitRun.aborted is not None:
            self.signal(fitRun, signal.SIGTERM)

    def _writeControl(self, fitRun, control):
        shutil.rmtree(control, ignore_errors=True)
        os.makedirs(control, mode=0o700)
        command = {"op": "run", "run": fitRun.token, "jobId": fitRun.jobId, "jobDir": fitRun.jobDir,
                   "request": fitRun.request, "sandbox": self.sandboxMode,
                   "limits": {k: v for k, v in self.limits.items() if k != "wall"},
                   "checkpointEvery": self.checkpointEvery, "uid": fitRun.uid, "gid": fitRun.gid,
                   "backend": "slurm"}
        writeDurably(os.path.join(control, COMMAND_NAME), command)
        script = os.path.join(control, SCRIPT_NAME)
        with open(script, "w") as f:
            f.write("#!/bin/sh\nexec %s -m reflworkerd.slurmjob %s\n"
                    % (shlex.quote(self.python), shlex.quote(control)))
        os.chmod(script, 0o700)
        return script

    def _removeControl(self, jobId):
        shutil.rmtree(self._controlDir(jobId), ignore_errors=True)

    def _scancel(self, slurmId, *args):
        d = self.commands.run("scancel", *(list(args) + [str(slurmId)]))
        d.addErrback(lambda f: self._log.warn("scancel {slurmId}: {why}", slurmId=slurmId,
                                              why=f.getErrorMessage()))
        return d

    # ---- what FitRun asks of its host

    def signal(self, fitRun, signum):
        """TERM or KILL the fit's processes in Slurm; a KILL also ends its Slurm job."""
        if fitRun.slurmId is None:
            return True         # signalled again once sbatch answered (see _submit)
        if fitRun.slurmState not in ("RUNNING", "COMPLETING", "SUSPENDED", "SIGNALING", "STOPPED"):
            self._scancel(fitRun.slurmId)     # not yet running: it never starts
        elif signum == signal.SIGTERM:
            self._scancel(fitRun.slurmId, "--full", "--signal=TERM")
        else:
            self._scancel(fitRun.slurmId, "--full", "--signal=KILL").addBoth(
                lambda _: self._scancel(fitRun.slurmId))
        return True

    def withdraw(self, fitRun):
        """A fit given up before sbatch answered: `_submit` cancels it once it has."""

    def forget(self, fitRun):
        self._runs.pop(fitRun.token, None)
        if fitRun.slurmId is not None:
            self._inThread(self._removeControl, fitRun.jobId)

    # ---- watching

    def _poll(self):
        if self._polling is None:
            self._polling = self._pollOnce()
            self._polling.addErrback(lambda f: self._log.failure("Slurm poll", f))
            self._polling.addBoth(self._polled)
        return None

    def _polled(self, _):
        self._polling = None

    @defer.inlineCallbacks
    def _pollOnce(self):
        runs = [r for r in self._runs.values() if r.slurmId is not None and not r.finished]
        if not runs:
            return
        try:
            states = yield self.commands.states([r.slurmId for r in runs])
        except SlurmError as e:
            self._log.warn("squeue failed ({why}); asking again in {interval} s", why=str(e),
                           interval=self.pollInterval)
            return
        for fitRun in runs:
            try:
                data, fitRun.eventsOffset = yield self._inThread(
                    _readFrom, os.path.join(self._controlDir(fitRun.jobId), EVENTS_NAME),
                    fitRun.eventsOffset, EVENTS_PER_POLL)
            except OSError:
                data = b""
            for line in fitRun.lines.feed(data):
                self._event(fitRun, parseLine(line))
            self._observe(fitRun, states.get(fitRun.slurmId))

    def _event(self, fitRun, event):
        if event is None or fitRun.finished:
            return
        kind = event.get("event")
        if kind == "started":
            fitRun.started(None)
            if fitRun.cancelRequested or fitRun.aborted is not None:
                fitRun.slurmState = "RUNNING"
                self.signal(fitRun, signal.SIGTERM)
        elif kind == "message" and isinstance(event.get("message"), dict):
            fitRun.relayed(event["message"])
        elif kind == "exited":
            fitRun.exitEvent = event

    def _observe(self, fitRun, state):
        """Act on what ``squeue`` says of the fit's Slurm job (None: it knows it no more)."""
        if fitRun.finished:
            return
        if state is None:
            fitRun.missing += 1
            if fitRun.exitEvent is not None:
                fitRun.exited(fitRun.exitEvent)
            elif fitRun.missing >= FORGOTTEN_POLLS:
                fitRun.ended("Slurm no longer knows its job %d" % (fitRun.slurmId,))
            return
        fitRun.missing = 0
        name, reason, nodes = state
        name = name.split()[0].rstrip("+")
        fitRun.slurmState = name
        if name in LIVE_STATES:
            return
        said = "Slurm job %d %s%s%s" % (fitRun.slurmId, name,
                                       " on " + nodes if nodes and nodes != "(null)" else "",
                                       " (%s)" % (reason,) if reason and reason != "None" else "")
        self._log.info("job {jobId}: {said}", jobId=fitRun.jobId, said=said)
        if name in HANDED_BACK and not fitRun.cancelRequested:
            fitRun.finish(outcome.lost("%s; the job goes back to the queue" % (said,)))
        elif fitRun.exitEvent is not None:
            fitRun.exited(fitRun.exitEvent)
        elif name == "CANCELLED" and fitRun.cancelRequested:
            fitRun.ended(said)
        else:
            fitRun.ended("%s: %s" % (ENDED_BY_SLURM.get(name, "the Slurm job ended before its fit did"),
                                     said))


def _readFrom(path, offset, limit):
    """Up to ``limit`` bytes of ``path`` from ``offset``, and the offset after them."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
    return data, offset + len(data)


def readSurvivors(controlRoot):
    """``{jobId: slurmId}`` of the control directories a previous run left."""
    survivors = {}
    for entry in sorted(os.listdir(controlRoot)):
        path = os.path.join(controlRoot, entry, SLURM_ID_NAME)
        try:
            with open(path) as f:
                record = json.load(f)
            survivors[int(record["jobId"])] = int(record["slurmId"])
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(os.path.join(controlRoot, entry), ignore_errors=True)
    return survivors
