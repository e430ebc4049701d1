"""One leased job on the worker, from its lease to its acknowledged result:
its downloads, its fit in the backend, heartbeats, checkpoints and results.

Its life is one `State`, moved only by ``LeasedJob._moveTo`` along `MOVES`;
why it is asked to end early is one `Ending` (cancel, release, drop: a
stronger one replaces a weaker one).

A DREAM or DE fit checkpoints its session file (``results/session.h5``): the
worker uploads it as the job's result file ``session.h5``, at most every
``checkpointEvery`` seconds. When the server hands out a job with such a
checkpoint of an earlier attempt (``"checkpoint"`` in the lease answer), the
worker downloads it into ``results/`` and runs the fit with ``resume``: it goes
on from where the lost attempt left off instead of starting over.

When the fit ends, its result files are chosen and uploaded
(`resultfiles.ResultFiles`: what it refuses ends the job ``ERROR`` saying
why) and the job is completed with its lease token. Until the server has
acknowledged the completion the outcome stays on disk
(``workDir/jobs/<id>.json``): a server that is down only delays delivery, and
a worker that restarts delivers what its previous run could not. A 409 (or
404) says the lease is no longer ours: the job is dropped quietly.
"""

import enum
import os
import shutil

from twisted.internet import defer
from twisted.logger import Logger

from reflworkerd import outcome
from reflworkerd.statefile import writeDurably
from reflworkerd.jobfiles import finite
from reflworkerd.checkpoint import Checkpoints, resumeFrom
from reflworkerd.heartbeat import Heartbeats
from reflworkerd.resultfiles import ResultFiles
from reflworkerd.serverclient import ServerError, checkName
from reflworkerd.shared import SESSION_NAME, isResumable


class State(enum.Enum):
    """Where a leased job is in its life on this worker."""
    LEASED = "leased"           # made, nothing started
    RUNNING = "running"         # its files coming down, then its fit
    DELIVERING = "delivering"   # its outcome and result files going up
    DELIVERED = "delivered"     # the server acknowledged the outcome
    RELEASING = "releasing"     # being handed back to the queue
    HALTED = "halted"           # the worker stops: the outcome stays on disk for the next start
    DONE = "done"               # its files removed; no longer held here


MOVES = {
    State.LEASED: {State.RUNNING, State.DELIVERING, State.RELEASING, State.HALTED, State.DONE},
    State.RUNNING: {State.DELIVERING, State.RELEASING, State.HALTED, State.DONE},
    State.DELIVERING: {State.DELIVERED, State.HALTED, State.DONE},
    State.RELEASING: {State.HALTED, State.DONE},
    State.HALTED: {State.DELIVERED, State.DONE},
    State.DELIVERED: {State.DONE},
    State.DONE: set(),
}
"""The moves a job's state may make; `LeasedJob._moveTo` refuses any other."""


class Ending(enum.IntEnum):
    """Why a job is asked to end other than by its fit's outcome, weakest first:
    a stronger reason replaces a weaker one, never the other way."""
    CANCEL = 1      # the server asked: the fit ends CANCEL, which is delivered
    RELEASE = 2     # the worker stops with --drain=release: the job goes back to the queue
    DROP = 3        # the lease is not ours: nothing more is delivered


class LeasedJob:
    """One job this worker holds a lease on, from the lease to the acknowledged result.

    Its state lives in ``workDir/jobs/<id>.json`` (id, lease, and once the fit
    ended its outcome) beside the job directory ``workDir/jobs/<id>/``, which
    the fit may write to and so is never trusted for the worker's own state.
    """

    _log = Logger()

    def __init__(self, poller, jobId, lease, leaseTimeout, request=None, files=(),
                 outcome=None, uploaded=(), checkpoint=None, slot=None, uid=None, results=None):
        self.poller = poller
        self.reactor = poller.reactor
        self.client = poller.client
        self.jobId = jobId
        self.lease = lease
        self.leaseTimeout = leaseTimeout
        self.request = request
        self.files = [tuple(f) for f in files]
        self.outcome = outcome
        self.jobDir = os.path.join(poller.jobsDir, str(int(jobId)))
        self.statePath = self.jobDir + ".json"
        self.checkpoint = checkpoint
        self.slot = slot
        self.uid = uid if uid is not None else poller.slotUid(slot)
        self.resultFiles = ResultFiles(
            self.client, poller.inThread, jobId, lease, self.jobDir, self.uid,
            poller.resultFilesQuota, poller.resultBytesQuota, poller.partSize, sizes=results,
            uploaded=uploaded, onUploaded=self._uploadedOne)
        self.fitRun = None
        self.state = State.LEASED
        self.ending = None
        self.finished = defer.Deferred()
        self.fitEnded = defer.Deferred()
        self.heartbeats = Heartbeats(
            self.reactor, self.client, jobId, lease, leaseTimeout, poller.reachability,
            poller.makeBackoff, poller.progressInterval, confinement=self._confinement,
            onLeaseTimeout=self._leaseTimeoutChanged, onCancel=self._serverCancelled,
            onStale=self.drop)
        self._working = None
        self.checkpoints = Checkpoints(
            self.reactor, jobId, poller.checkpointEvery, poller.reachability,
            send=lambda path: self.resultFiles.putFile(SESSION_NAME, path, maximum=poller.resultBytesQuota),
            wanted=lambda: not self.dropped and not self.fitEnded.called,
            onUnusable=self._checkpointUnusable, onStale=self.drop)

    # ---- its state

    def _moveTo(self, state):
        if state not in MOVES[self.state]:
            raise RuntimeError("job %s cannot go from %s to %s" % (self.jobId, self.state.value, state.value))
        self.state = state

    def _endAs(self, ending):
        """Ask the job to end for ``ending``, unless a stronger reason already stands."""
        if self.ending is None or ending > self.ending:
            self.ending = ending

    @property
    def dropped(self):
        return self.ending is Ending.DROP

    @property
    def releasing(self):
        return self.ending is Ending.RELEASE

    @property
    def cancelled(self):
        return self.ending is Ending.CANCEL

    # ---- state on disk

    def saveState(self):
        """Write the worker's state of this job (for a restart); True when it is on disk."""
        state = {"id": self.jobId, "lease": self.lease, "leaseTimeout": self.leaseTimeout,
                 "request": self.request, "outcome": self.outcome,
                 "uploaded": sorted(self.resultFiles.uploaded), "uid": self.uid,
                 "results": self.resultFiles.sizes}
        try:
            writeDurably(self.statePath, finite(state))
        except OSError as e:
            self._log.warn("job {jobId}: its state could not be saved ({why}); a restart "
                           "of the worker would lose it", jobId=self.jobId, why=e.strerror)
            return False
        return True

    def cleanUp(self):
        shutil.rmtree(self.jobDir, ignore_errors=True)
        for path in (self.statePath, self.statePath + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # ---- life

    def start(self):
        """Download the uploads, run the fit, deliver its outcome."""
        shutil.rmtree(self.jobDir, ignore_errors=True)
        try:
            os.makedirs(self.jobDir)
        except OSError as e:
            self._log.error("job {jobId}: cannot make {path} ({why}); handing it back",
                            jobId=self.jobId, path=self.jobDir, why=e.strerror)
            return self.handBack()
        self._moveTo(State.RUNNING)
        self.saveState()
        self.heartbeats.schedule()
        self._working = self._run()
        self._working.addErrback(self._failed)
        return self.finished

    def adopt(self):
        """Watch again the fit a previous run of the worker left running in the
        backend (a Slurm job), then deliver its outcome."""
        self._moveTo(State.RUNNING)
        self.heartbeats.schedule()
        self._working = self._run(adopted=True)
        self._working.addErrback(self._failed)
        return self.finished

    def redeliver(self):
        """Deliver an outcome that a previous run of the worker left undelivered."""
        self._moveTo(State.DELIVERING)
        self._endFit(None)
        self.heartbeats.schedule()
        self._working = self._deliverThenFinish()
        self._working.addErrback(self._failed)
        return self.finished

    def handBack(self):
        """Give the job back to the queue: its fit was lost with a previous run of the
        worker, or cannot be set up here."""
        self._moveTo(State.RELEASING)
        self._endFit(None)
        self._working = self._release()
        self._working.addBoth(lambda _: self._finish())
        return self.finished

    def _failed(self, failure):
        if failure.check(_Halted):
            self._log.warn("job {jobId}: the worker stops before its outcome was delivered; "
                           "it stays in {path} for the next start", jobId=self.jobId,
                           path=self.statePath)
            self._endFit(None)
            self.heartbeats.stop()
            if not self.finished.called:
                self.finished.callback(None)
            return
        self._log.failure("job {jobId}: unexpected failure; dropped", failure, jobId=self.jobId)
        self._endFit(None)
        self._finish()

    @defer.inlineCallbacks
    def _run(self, adopted=False):
        request = self.request
        try:
            if not adopted:
                yield self._download()
                request = yield self._resumeRequest()
        except _Dropped:
            pass
        except ServerError as e:
            self._log.error("job {jobId}: its files could not be downloaded ({why}); "
                            "reporting an error", jobId=self.jobId, why=str(e))
            self.outcome = outcome.error("the worker could not download the job's files: %s" % (e,))
        except OSError as e:
            self.outcome = outcome.error("the worker could not store the job's files: %s" % (e,))
        if self.outcome is None and self.ending is None:
            self._log.info("job {jobId} (lease {lease}): fit starts", jobId=self.jobId,
                           lease=self.lease)
            start = self.poller.backend.adopt if adopted else self.poller.backend.run
            self.fitRun = start(
                self.jobId, self.jobDir, request, self.progress,
                onCheckpoint=self.checkpointed if self.resumable() else None, uid=self.uid, gid=self.uid)
            try:
                self.outcome = yield self.fitRun.done
            except defer.CancelledError:
                raise _Halted()         # a fit that survives the worker: adopted at the next start
            except Exception as e:
                self.outcome = outcome.error("the worker lost the fit: %s" % (e,))
            self._log.info("job {jobId}: fit ended {status}", jobId=self.jobId,
                           status=self.outcome.get("status"))
        elif self.outcome is None:
            self.outcome = outcome.cancelled()
        yield self.checkpoints.stop()
        lost = self.outcome.get("error") if self.outcome.get("status") == "LOST" else None
        if lost is not None and not (self.dropped or self.releasing):
            self._log.warn("job {jobId}: {why}", jobId=self.jobId, why=lost)
            self._endAs(Ending.RELEASE)
        if not (self.dropped or self.releasing):
            yield self._keepResults()
        self._endFit(self.outcome)
        if self.dropped:
            self._finish()
            return
        if self.releasing:
            if self.state is not State.HALTED:
                self._moveTo(State.RELEASING)
            yield self._release(lost)
            self._finish()
            return
        self.saveState()
        self._checkHalted()
        self._moveTo(State.DELIVERING)
        yield self._deliverThenFinish()

    def _endFit(self, outcome):
        if not self.fitEnded.called:
            self.fitEnded.callback(outcome)

    def _checkHalted(self):
        if self.state is State.HALTED:
            raise _Halted()

    @defer.inlineCallbacks
    def _download(self):
        backoff = self.poller.makeBackoff()
        for name, size in self.files:
            checkName(name)
            path = os.path.join(self.jobDir, name)
            while True:
                if self.ending is not None:
                    raise _Dropped()
                try:
                    got = yield self.client.download(self.jobId, name, path)
                except ServerError as e:
                    if e.stale:
                        self.drop(str(e))
                        raise _Dropped()
                    if not e.transient:
                        raise
                    self.poller.reachability.failed(e)
                    yield self.poller.sleep(backoff.next())
                    continue
                self.poller.reachability.ok()
                if size is not None and got != size:
                    raise ServerError(None, "upload %r is %d bytes, the server said %d" % (name, got, size))
                break

    def resumable(self):
        """Whether this job's fit can go on from a checkpoint (a DREAM or DE fit of refl1d)."""
        return isResumable(self.request)

    def _resumeRequest(self):
        """The request to run: resuming from the checkpoint of an earlier attempt,
        where there is one (`checkpoint.resumeFrom`)."""
        if not self.checkpoint or not self.resumable():
            return defer.succeed(self.request)
        return resumeFrom(self.client, self.jobId, self.jobDir, self.checkpoint, self.request)

    @defer.inlineCallbacks
    def _keepResults(self):
        """Decide which result files go to the server (`resultfiles.ResultFiles.choose`);
        anything it refuses ends the job ERROR saying so."""
        problem = yield self.resultFiles.choose(said=(self.outcome or {}).get("error") or "")
        if problem is not None:
            self._log.warn("job {jobId}: {problem}", jobId=self.jobId, problem=problem)
            self._failWith(problem)

    @defer.inlineCallbacks
    def _uploadResults(self):
        """Upload the result files not yet acknowledged; what the sending found
        wrong ends the job ERROR. A stale or transient refusal is raised."""
        if self.resultFiles.sizes is None:
            yield self._keepResults()     # an outcome a worker of an older version left
        yield self.resultFiles.send()

    def _uploadedOne(self):
        """One more file acknowledged: what its sending found is in the outcome
        before the state is saved (a restart sends only the rest)."""
        for why in self.resultFiles.takeProblems():
            self._failWith(why)
        self.saveState()

    def _failWith(self, why):
        """The job ends ERROR for ``why`` (its fit's own error, if any, kept after it)."""
        self.outcome = outcome.failedWith(self.outcome, why)

    # ---- checkpoints

    def checkpointed(self, path):
        """The fit saved its session file at ``path``: `checkpoint.Checkpoints` sends it."""
        if not self.dropped and not self.fitEnded.called:
            self.checkpoints.saved(path)

    def _checkpointUnusable(self, why):
        if self.fitRun is not None:
            self.fitRun.abort("its checkpoint cannot be used: %s" % (why,))

    # ---- delivery

    @defer.inlineCallbacks
    def _deliverThenFinish(self):
        yield self._deliver()
        self._finish()

    @defer.inlineCallbacks
    def _deliver(self):
        """Upload the result files, then complete; until acknowledged or refused as stale."""
        backoff = self.poller.makeBackoff()
        refusedOnce = False
        while not self.dropped:
            self._checkHalted()
            try:
                yield self._uploadResults()
                progress = self.heartbeats.takeProgress()
                if progress is not None:
                    # The fit's last progress (its final step and chi^2) must not
                    # wait for the heartbeat's rate limit: the job ends now.
                    yield self.client.heartbeat(self.jobId, self.lease, progress, None)
                try:
                    yield self.client.complete(self.jobId, self.lease, self.outcome)
                except ServerError as e:
                    if e.stale or e.transient or refusedOnce:
                        raise
                    refusedOnce = True
                    self._log.error("job {jobId}: the server refused its outcome ({why}); "
                                    "reporting that instead", jobId=self.jobId, why=str(e))
                    self.outcome = outcome.error("the server refused the worker's outcome: %s" % (e,),
                                                 confinement=self.outcome.get("confinement"))
                    continue
            except ServerError as e:
                self._checkHalted()
                if e.stale:
                    self.drop(str(e))
                    return
                if not e.transient:
                    self._log.error("job {jobId}: delivery refused ({why}); dropped",
                                    jobId=self.jobId, why=str(e))
                    self._endAs(Ending.DROP)
                    return
                self.poller.reachability.failed(e)
                try:
                    yield self.poller.sleep(backoff.next())
                except defer.CancelledError:
                    raise _Halted()
                continue
            self.poller.reachability.ok()
            self._moveTo(State.DELIVERED)
            return

    @defer.inlineCallbacks
    def _release(self, lost=None):
        """Hand the job back (the worker stops, or its fit was ``lost``: why); a few
        tries, then the lease runs out."""
        backoff = self.poller.makeBackoff()
        for attempt in range(3):
            try:
                yield self.client.release(self.jobId, self.lease, lost)
            except ServerError as e:
                if e.transient and attempt < 2 and self.state is not State.HALTED:
                    try:
                        yield self.poller.sleep(backoff.next())
                    except defer.CancelledError:
                        return
                    continue
                self._log.info("job {jobId}: not released ({why}); its lease will run out",
                               jobId=self.jobId, why=str(e))
                return
            self._log.info("job {jobId}: released back to the queue", jobId=self.jobId)
            return

    def _finish(self):
        """Remove the job's files (off the reactor thread: a fit may have left
        a great many), then say the job is no longer held here."""
        self.heartbeats.stop()
        d = self.poller.inThread(self.cleanUp)
        d.addErrback(lambda f: self._log.failure("job {jobId}: its files could not be removed", f,
                                                 jobId=self.jobId))
        d.addCallback(lambda _: self._removed())

    def _removed(self):
        if self.state is State.DELIVERED:
            self._log.info("job {jobId}: {status} delivered; its files are removed",
                           jobId=self.jobId, status=self.outcome.get("status"))
        else:
            self._log.info("job {jobId}: no longer held here; its files are removed",
                           jobId=self.jobId)
        self._moveTo(State.DONE)
        if not self.finished.called:
            self.finished.callback(None)

    # ---- control

    def cancelFit(self, why):
        """Stop the fit at the server's request; its CANCEL outcome is delivered."""
        self._log.info("job {jobId}: cancelling the fit ({why})", jobId=self.jobId, why=why)
        self._endAs(Ending.CANCEL)
        if self.fitRun is not None:
            self.fitRun.cancel(self.poller.cancelGrace)

    def drop(self, why):
        """The lease is not ours any more: stop the fit, deliver nothing."""
        if self.dropped:
            return
        self._log.info("job {jobId}: lease {lease} is not current ({why}); dropped",
                       jobId=self.jobId, lease=self.lease, why=why)
        self._endAs(Ending.DROP)
        self.heartbeats.stop()
        if self.fitRun is not None and not self.fitEnded.called:
            self.fitRun.cancel(self.poller.cancelGrace)

    def releaseOnStop(self):
        """The worker stops with ``--drain=release``: end the fit and give the job back."""
        if self.fitEnded.called:
            return
        self._endAs(Ending.RELEASE)
        if self.fitRun is not None:
            self.fitRun.cancel(self.poller.cancelGrace)

    def halt(self):
        """The worker stops: leave an undelivered outcome on disk for the next start,
        and a fit that survives the worker (``fitRun.survives``) running for it."""
        if State.HALTED not in MOVES[self.state]:
            return
        self._moveTo(State.HALTED)
        if self._working is not None and not self.finished.called:
            self._working.cancel()

    # ---- heartbeats (heartbeat.Heartbeats sends them)

    def progress(self, progress):
        """Progress from the fit (in the reactor thread): sent with the next heartbeat."""
        self.heartbeats.progress(progress)

    def _confinement(self):
        return getattr(self.fitRun, "confinement", None) or None

    def _leaseTimeoutChanged(self, timeout):
        self.leaseTimeout = timeout

    def _serverCancelled(self):
        if not self.cancelled and not self.fitEnded.called:
            self.cancelFit("the server asked to cancel it")


class _Dropped(Exception):
    """The job was dropped, cancelled or released before its fit started."""


class _Halted(Exception):
    """The worker stops while the job's outcome is still being delivered."""
