"""The checkpoints of one leased DREAM or DE fit: each time the fit saves its
session file the worker sends it as the job's result file ``session.h5``,
at most every ``checkpointEvery`` seconds, so that a later attempt goes on
from it (``resume``) instead of starting over; ``resumeFrom`` brings that
checkpoint down for the later attempt."""

import copy
import os
import shutil

from twisted.internet import defer
from twisted.logger import Logger

from reflworkerd import jobfiles
from reflworkerd.serverclient import OverQuota, ServerError, checkName
from reflworkerd.shared import RESULTS_DIR, SESSION_NAME

_log = Logger()


@defer.inlineCallbacks
def resumeFrom(client, jobId, jobDir, checkpoint, request):
    """The request to run: with ``resume`` once the server's ``checkpoint`` of an
    earlier attempt came down into ``results/``; else ``request`` as it is (a
    fit whose checkpoint cannot be had starts over)."""
    folder = os.path.join(jobDir, RESULTS_DIR)
    path = os.path.join(folder, SESSION_NAME)
    try:
        os.makedirs(folder, exist_ok=True)
        size = yield client.download(jobId, checkName(checkpoint), path, kind="result")
    except ServerError as e:
        _log.warn("job {jobId}: its checkpoint could not be downloaded ({why}); "
                  "the fit starts over", jobId=jobId, why=str(e))
        shutil.rmtree(folder, ignore_errors=True)
        return request
    except (OSError, ValueError) as e:
        _log.warn("job {jobId}: its checkpoint could not be stored ({why}); "
                  "the fit starts over", jobId=jobId, why=e)
        shutil.rmtree(folder, ignore_errors=True)
        return request
    _log.info("job {jobId}: resuming the fit from the checkpoint of an earlier attempt "
              "({size} bytes)", jobId=jobId, size=size)
    request = copy.deepcopy(request)
    request["data"]["options"]["resume"] = True
    return request


class Checkpoints:
    """``send(path)`` uploads a session file (a Deferred of its size);
    ``wanted()`` says whether the job still wants checkpoints sent;
    ``onUnusable(why)`` is told of a session file the worker will not read,
    ``onStale(why)`` of a lease that is no longer ours."""

    _log = Logger()

    def __init__(self, clock, jobId, every, reachability, send, wanted, onUnusable, onStale):
        self.reactor = clock
        self.jobId = jobId
        self.every = every
        self.reachability = reachability
        self.send = send
        self.wanted = wanted
        self.onUnusable = onUnusable
        self.onStale = onStale
        self._checkpointWanted = None
        self._checkpointCall = None
        self._checkpointUpload = None
        self._lastCheckpoint = None

    def saved(self, path):
        """The fit saved its session file at ``path`` (relative to the job
        directory): send it, at most every ``every`` seconds (the latest wins)."""
        self._checkpointWanted = path
        self._scheduleCheckpoint()

    def _scheduleCheckpoint(self):
        if (self._checkpointWanted is None or self._checkpointUpload is not None
                or self._checkpointCall is not None):
            return
        now = self.reactor.seconds()
        due = now if self._lastCheckpoint is None else self._lastCheckpoint + self.every
        self._checkpointCall = self.reactor.callLater(max(0.0, due - now), self._uploadCheckpoint)

    def _uploadCheckpoint(self):
        self._checkpointCall = None
        path, self._checkpointWanted = self._checkpointWanted, None
        if path is None or not self.wanted():
            return
        self._lastCheckpoint = self.reactor.seconds()
        d = self._checkpointUpload = self.send(path)
        d.addCallbacks(self._checkpointSent, self._checkpointFailed)
        d.addBoth(self._checkpointDone)

    def _checkpointSent(self, size):
        self.reachability.ok()
        self._log.info("job {jobId}: checkpoint sent ({size} bytes)", jobId=self.jobId, size=size)

    def _checkpointFailed(self, failure):
        if failure.check(jobfiles.UnsafeFile):
            self.onUnusable(failure.value)
        elif failure.check(ServerError):
            error = failure.value
            if error.stale:
                self.onStale(str(error))
            elif error.transient:
                self.reachability.failed(error)
            else:
                self._log.warn("job {jobId}: checkpoint refused ({why})", jobId=self.jobId, why=str(error))
        elif failure.check(OSError, OverQuota):
            self._log.warn("job {jobId}: checkpoint not sent ({why})", jobId=self.jobId,
                           why=failure.getErrorMessage())
        else:
            self._log.failure("job {jobId}: checkpoint upload", failure, jobId=self.jobId)

    def _checkpointDone(self, _):
        self._checkpointUpload = None
        self._scheduleCheckpoint()

    def stop(self):
        """No more checkpoints; fires once the one on its way (if any) is done, so that
        the final session file never races a checkpoint to the same name."""
        self._checkpointWanted = None
        if self._checkpointCall is not None and self._checkpointCall.active():
            self._checkpointCall.cancel()
        self._checkpointCall = None
        if self._checkpointUpload is None:
            return defer.succeed(None)
        idle = defer.Deferred()
        self._checkpointUpload.addBoth(lambda _: idle.callback(None))
        return idle
