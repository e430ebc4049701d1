"""The heartbeats of one leased job: they renew its lease and carry its
progress and the confinement applied to its fit.

A heartbeat goes at most once per ``progressInterval`` while there is news
(the latest progress wins; a changed confinement), and at least every third
of the lease timeout. A failed one is retried after a capped backoff with
its progress kept, a stale answer (409/404: the lease is not ours) drops the
job, and an answer that says ``cancel`` cancels its fit.
"""

from twisted.logger import Logger

from reflworkerd.serverclient import ServerError


class Heartbeats:
    """The heartbeats of the job ``jobId`` under ``lease``.

    ``confinement()`` gives the fit's confinement as applied (or None);
    ``onLeaseTimeout(seconds)`` is told when the server changes the lease's
    timeout, ``onCancel()`` when it asks for the fit to be cancelled,
    ``onStale(why)`` when the lease is no longer ours."""

    _log = Logger()

    def __init__(self, clock, client, jobId, lease, leaseTimeout, reachability, makeBackoff,
                 progressInterval, confinement, onLeaseTimeout, onCancel, onStale):
        self.reactor = clock
        self.client = client
        self.jobId = jobId
        self.lease = lease
        self.leaseTimeout = leaseTimeout
        self.reachability = reachability
        self.progressInterval = progressInterval
        self.confinement = confinement
        self.onLeaseTimeout = onLeaseTimeout
        self.onCancel = onCancel
        self.onStale = onStale
        self._pendingProgress = None
        self._confinementSent = None
        self._lastBeat = None
        self._beatCall = None
        self._beating = None
        self._stopped = False
        self._beatBackoff = makeBackoff(cap=self.keepalive())

    def keepalive(self):
        return max(self.leaseTimeout / 3.0, 0.1)

    def progress(self, progress):
        """The fit's latest progress: sent with the next heartbeat (the latest wins)."""
        if not isinstance(progress, dict):
            return
        self._pendingProgress = progress
        self.schedule()

    def takeProgress(self):
        """The progress not sent yet (None if none), taken out: the caller sends it."""
        progress, self._pendingProgress = self._pendingProgress, None
        return progress

    def schedule(self):
        """Arm the next heartbeat: soon after progress or a new confinement, else a keepalive."""
        if self._stopped or self._beating is not None:
            return
        now = self.reactor.seconds()
        if self._lastBeat is None:
            due = now if self._pendingProgress is not None else now + self.keepalive()
        elif self._pendingProgress is not None or self._confinementChanged():
            due = self._lastBeat + self.progressInterval
        else:
            due = self._lastBeat + self.keepalive()
        delay = max(0.0, due - now)
        if self._beatCall is not None and self._beatCall.active():
            if self._beatCall.getTime() <= now + delay:
                return
            self._beatCall.cancel()
        self._beatCall = self.reactor.callLater(delay, self._beat)

    def _confinementChanged(self):
        confinement = self.confinement()
        return confinement is not None and confinement != self._confinementSent

    def _beat(self):
        self._beatCall = None
        if self._stopped:
            return
        progress, self._pendingProgress = self._pendingProgress, None
        confinement = self.confinement()
        if confinement == self._confinementSent:
            confinement = None
        self._lastBeat = self.reactor.seconds()
        d = self._beating = self.client.heartbeat(self.jobId, self.lease, progress, confinement)
        d.addCallbacks(self._beatAnswered, self._beatFailed,
                       errbackArgs=(progress,), callbackArgs=(confinement,))

    def _beatAnswered(self, answer, confinement):
        self._beating = None
        if self._stopped:
            return
        self.reachability.ok()
        self._beatBackoff.reset()
        if confinement:
            self._confinementSent = confinement
        answer = answer or {}
        timeout = answer.get("leaseTimeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.leaseTimeout = float(timeout)
            self._beatBackoff.cap = self.keepalive()
            self.onLeaseTimeout(self.leaseTimeout)
        if answer.get("cancel"):
            self.onCancel()
        self.schedule()

    def _beatFailed(self, failure, progress):
        self._beating = None
        if self._stopped:
            return
        if not failure.check(ServerError):
            self._log.failure("job {jobId}: heartbeat", failure, jobId=self.jobId)
            self._retryBeat(progress)
            return
        error = failure.value
        if error.stale:
            self.onStale(str(error))
            return
        self.reachability.failed(error)
        self._retryBeat(progress)

    def _retryBeat(self, progress):
        if self._pendingProgress is None:
            self._pendingProgress = progress
        if self._stopped:
            return
        self._beatCall = self.reactor.callLater(self._beatBackoff.next(), self._beat)

    def stop(self):
        """No more heartbeats; the one in flight is cancelled."""
        self._stopped = True
        if self._beatCall is not None and self._beatCall.active():
            self._beatCall.cancel()
        self._beatCall = None
        if self._beating is not None:
            beating, self._beating = self._beating, None
            beating.cancel()
