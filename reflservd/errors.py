"""What the server refuses, in the domain's own words.

The queue, the store, the limits, the access rules and the queue server
raise these; none of them knows HTTP. The web layer holds the one table from
each to its status code (``web.STATUS``) and answers all of them with one
handler, as ``{"error": message}``.
"""


class DomainError(Exception):
    """A request the server refuses; ``message`` says why, in one line."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class Refused(DomainError):
    """A request whose input breaks a limit or a rule (``reflservd.limits``)."""


class BadName(Refused, ValueError):
    """A file name that could escape the job's directory or confuse a shell
    (or a part of a file that does not follow the part before it)."""


class TooLarge(Refused):
    """A request past a size or count limit."""


class RateLimited(DomainError):
    """A submitter past its limits; ``retryAfter`` seconds until it may try again."""

    def __init__(self, message, retryAfter):
        DomainError.__init__(self, message)
        self.retryAfter = retryAfter


class Unavailable(DomainError):
    """The disk refused a write: nothing was changed."""


class Forbidden(DomainError):
    """A request from someone who may not act on this job or queue."""


class Unauthenticated(Forbidden):
    """A worker route asked without a worker token."""


class WrongHost(Forbidden):
    """A request addressed to a host name this server does not answer to."""


class UnknownJob(DomainError):
    """No such job (never was, or deleted)."""


class Conflict(DomainError):
    """The request does not fit the job's state, or carries a stale lease."""
