"""Requests that wait: the long-polls of workers for a lease and of clients
for a job's next event.

A ``WaitList`` holds Deferreds oldest first, each with a deadline on the
clock. A waiter fires with None at its deadline, with what the server hands
it (``pop``) or with None when everything is woken (``wakeAll``); Klein
cancels it when its client goes away, and a cancelled waiter leaves the list
and its timer at once, so a disconnected worker is never handed a job.
"""

from twisted.internet import defer

MAX_LONG_POLL = 60.0
"""The longest a long-poll waits, in seconds (more is taken as this)."""


class WaitList:
    """Waiters, oldest first; each carries a ``key`` (what it waits for)."""

    def __init__(self, clock):
        self.clock = clock
        self._waiting = []  # [(Deferred, key, timer)]

    def __len__(self):
        return len(self._waiting)

    def wait(self, timeout, key=None):
        """A Deferred that fires within ``min(timeout, MAX_LONG_POLL)`` seconds."""
        entry = []

        def cancel(d):
            self._remove(entry[0])

        d = defer.Deferred(canceller=cancel)
        timer = self.clock.callLater(min(timeout, MAX_LONG_POLL), self._expire, d)
        entry.append((d, key, timer))
        self._waiting.append(entry[0])
        return d

    def oldestKey(self):
        """The key of the oldest waiter (the list must not be empty)."""
        return self._waiting[0][1]

    def pop(self):
        """The oldest waiter's Deferred, out of the list, its timer stopped:
        the caller fires it."""
        d, _, timer = self._waiting.pop(0)
        if timer.active():
            timer.cancel()
        return d

    def wakeAll(self):
        """Fire every waiter with None."""
        while self._waiting:
            self.pop().callback(None)

    def _remove(self, entry):
        if entry in self._waiting:
            self._waiting.remove(entry)
            if entry[2].active():
                entry[2].cancel()

    def _expire(self, d):
        for entry in self._waiting:
            if entry[0] is d:
                self._waiting.remove(entry)
                break
        d.callback(None)
