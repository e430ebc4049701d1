"""A TCP listener that keeps serving when the process runs out of file
descriptors.

twisted.internet.tcp.Port, on ``EMFILE``, closes the connections waiting to
be accepted (with a reserved descriptor) and logs three lines for each; on
``ENFILE``, ``ENOBUFS`` or ``ENOMEM`` it logs and returns, and the reactor,
finding the listening socket still readable, calls it again at once: a busy
loop that floods the log. `GuardedPort` turns each such burst into one line
at most every ten seconds, and pauses accepting for a moment, so that the
open connections are served (and close, freeing descriptors) meanwhile.
The site's connection cap (`web.Site`, ``--max-connections``) keeps the
connections themselves below the limit; this is what is left when something
else used the descriptors up.
"""

from twisted.internet import tcp
from twisted.logger import Logger, globalLogPublisher

from reflservd.web import RateLimitedLog

_EXHAUSTED = {
    "Could not accept new connection ({acceptError})",
    "EMFILE encountered; releasing reserved file descriptor.",
}
_DROPPED = "EMFILE recovery: Closed socket from {address}"
_RESERVED = "Re-reserving EMFILE recovery file descriptor."


class GuardedPort(tcp.Port):
    """A `tcp.Port` that logs running out of descriptors (rate-limited) and
    pauses accepting for ``pause`` seconds each time, instead of spinning."""

    pause = 0.5
    _log = Logger()

    def __init__(self, *args, **kwargs):
        tcp.Port.__init__(self, *args, **kwargs)
        self._logger = Logger(namespace=tcp.Port._logger.namespace, observer=self._acceptEvent)
        self._exhaustion = RateLimitedLog(self._log, self.reactor, interval=10.0)
        self._error = None
        self._dropped = 0
        self._resume = None

    def _acceptEvent(self, event):
        fmt = event.get("log_format")
        if fmt in _EXHAUSTED:
            self._error = event.get("acceptError", "EMFILE")
        elif fmt == _DROPPED:
            self._dropped += 1
        elif fmt != _RESERVED:
            globalLogPublisher(event)

    def doRead(self):
        self._error, self._dropped = None, 0
        tcp.Port.doRead(self)
        if self._error is None:
            return
        self._exhaustion.info(
            "accept", "out of file descriptors ({error}) accepting connections on port {port}: "
            "{dropped} closed unanswered; accepting again in {pause} s, the open connections "
            "are served meanwhile", error=self._error, port=self.port, dropped=self._dropped,
            pause=self.pause)
        if self._resume is None and self.connected:
            self.stopReading()
            self._resume = self.reactor.callLater(self.pause, self._resumeAccepting)

    def _resumeAccepting(self):
        self._resume = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def connectionLost(self, reason):
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        return tcp.Port.connectionLost(self, reason)


class GuardedListeners:
    """The reactor as a listening endpoint sees it, except that ``listenTCP``
    makes a `GuardedPort` (``strports.service(..., reactor=GuardedListeners(r))``)."""

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = GuardedPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening
