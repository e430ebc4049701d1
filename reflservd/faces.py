"""What the site's faces (``api.JobAPI``, ``legacy.LegacyAPI``,
``pages.JobPages``) share, as functions rather than a base class: the one
refusal handler each face's Klein app registers, the worker-route decorator,
who submits, and parsing a large body off the reactor. Each face has its
own Klein app and constructor; ``site.py`` composes them."""

import functools

from twisted.internet import defer

from reflservd import errors
from reflservd.web import APIError, checkSize, errorBody

PARSE_IN_THREAD = 1 << 20
"""A body over this many bytes is parsed in the store's thread pool, off the reactor."""


def answerRefusals(app):
    """Register on a face's Klein ``app`` the one handler of refusals: the
    HTTP layer's ``APIError`` and the domain's errors, answered as
    ``{"error": message}`` with the status ``web.STATUS`` gives."""

    @app.handle_errors(APIError, errors.DomainError)
    def refused(face, request, failure):
        return errorBody(request, failure.value)

    return refused


def workerRoute(sameOrigin=None):
    """A route of a job's worker: before the handler runs, the request must
    hold a worker token of the job's queue (``Access.checkWorker``; an
    unknown job is ``UnknownJob``). ``sameOrigin``, when given, are the
    arguments of an ``Access.checkSameOrigin`` made first."""

    def decorate(route):
        @functools.wraps(route)
        def checked(face, request, jobId, **kwargs):
            if sameOrigin is not None:
                face.access.checkSameOrigin(request, **sameOrigin)
            job = face.server.queue.get(jobId)
            face.access.checkWorker(request, job.queue)
            return route(face, request, jobId, **kwargs)
        return checked

    return decorate


def submitter(access, request):
    """``(origin, owner)`` of a submit, after the same-origin rule."""
    access.checkSameOrigin(request)
    return access.address(request), access.submitter(request)


def parseBody(server, request, maxUpload, parse, *args):
    """``parse(request, *args)``, in the store's thread pool when the body
    is large (a 200 MB upload must not hold the reactor)."""
    if checkSize(request, maxUpload + (1 << 20)) > PARSE_IN_THREAD:
        return server.inThread(parse, request, *args)
    return defer.maybeDeferred(parse, request, *args)
