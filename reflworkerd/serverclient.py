"""The worker's HTTP side (docs/api.md, "For workers"), over an injected
treq client: `ServerClient`, the errors it raises, and the backoff and
reachability the poller and its jobs retry with."""

import json
import os
import random as _random

import treq
from twisted.internet import defer
from twisted.logger import Logger

from reflworkerd.jobfiles import finite

LEASE_MARGIN = 15.0
"""Seconds a lease long-poll may take past its own timeout before we give up on it."""


class ServerError(Exception):
    """The server answered with an error status, or could not be reached (``code`` None)."""

    def __init__(self, code, message, detail=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.detail = detail if detail is not None else message

    @property
    def stale(self):
        """The lease is not ours any more (or the job is gone): drop the job."""
        return self.code in (404, 409)

    @property
    def transient(self):
        """Worth trying again later: no answer, a server error, or a plea to slow down."""
        return self.code is None or self.code >= 500 or self.code in (408, 429)

    def __str__(self):
        if self.code is None:
            return self.message
        return "%d %s" % (self.code, self.message)


class OverQuota(Exception):
    """A file of a job that is larger than the job may send."""


def checkName(name):
    """A server-given file name that is safe to create in a job directory."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name or name.startswith(".")):
        raise ValueError("unsafe file name %r" % (name,))
    return name


class ServerClient:
    """The worker routes of one reflservd server, over a treq client.

    Every method returns a Deferred; an error status or a failure to reach the
    server errbacks with `ServerError`.
    """

    _log = Logger()

    def __init__(self, reactor, http, baseURL, token=None, requestTimeout=60.0, facts=None):
        """``facts``: the worker's part of a result's provenance
        (``provenance.workerFacts``), sent with each outcome; its versions go
        with each lease long-poll (the server's result cache matches them)."""
        self.reactor = reactor
        self.facts = facts
        self.http = http
        self.baseURL = baseURL.rstrip("/")
        self.token = token
        self.requestTimeout = requestTimeout

    def _headers(self, extra=None):
        headers = {b"Accept": [b"application/json"]}
        if self.token:
            headers[b"Authorization"] = [b"Bearer " + self.token.encode("latin-1")]
        headers.update(extra or {})
        return headers

    @defer.inlineCallbacks
    def _call(self, method, path, params=None, body=None, data=None, timeout=None):
        headers = {}
        if body is not None:
            data = json.dumps(finite(body)).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json"]
        elif data is not None:
            headers[b"Content-Type"] = [b"application/octet-stream"]
        try:
            response = yield self.http.request(
                method, self.baseURL + path, params=params, data=data,
                headers=self._headers(headers), reactor=self.reactor,
                timeout=timeout or self.requestTimeout)
            content = yield response.content()
        except Exception as e:
            raise ServerError(None, "%s %s: %s" % (method, path, _describe(e)))
        if response.code >= 400:
            try:
                message = json.loads(content)["error"]
            except Exception:
                message = content[:200].decode("utf-8", "replace")
            raise ServerError(response.code, "%s %s: %s" % (method, path, message), str(message))
        if response.code == 204 or not content:
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise ServerError(None, "%s %s: the answer is not JSON" % (method, path))

    def lease(self, queueName, timeout, worker=None):
        """The lease record of the next job, or None when none came within ``timeout``."""
        body = {"worker": worker} if worker else {}
        if self.facts:
            body["versions"] = self.facts["versions"]
        return self._call("POST", "/api/v1/queues/%s/lease" % (queueName,),
                          params={"timeout": "%g" % (timeout,)},
                          body=body or None,
                          timeout=timeout + LEASE_MARGIN)

    def heartbeat(self, jobId, lease, progress=None, confinement=None):
        body = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        if confinement:
            body["confinement"] = confinement
        return self._call("POST", "/api/v1/jobs/%d/heartbeat" % (jobId,), body=body)

    def complete(self, jobId, lease, outcome):
        body = {"lease": lease, "status": outcome.get("status")}
        for field in ("result", "error", "trace"):
            if outcome.get(field) is not None:
                body[field] = outcome[field]
        if outcome.get("confinement"):
            body["confinement"] = outcome["confinement"]
        if self.facts:
            body["provenance"] = self.facts
        return self._call("POST", "/api/v1/jobs/%d/complete" % (jobId,), body=body)

    def release(self, jobId, lease, lost=None):
        """Hand the job back; ``lost`` (why its fit was lost) counts the attempt."""
        body = {"lease": lease} if lost is None else {"lease": lease, "lost": lost}
        return self._call("POST", "/api/v1/jobs/%d/release" % (jobId,), body=body)

    @defer.inlineCallbacks
    def download(self, jobId, name, path, kind="upload"):
        """Stream the job's file ``name`` (an upload, or with ``kind="result"`` a
        result) to ``path`` (written aside, then renamed); its size."""
        url = "%s/api/v1/jobs/%d/files/%s" % (self.baseURL, jobId, name)
        temporary = os.path.join(os.path.dirname(path), ".download-" + os.path.basename(path))
        try:
            response = yield self.http.request(
                "GET", url, params={"kind": kind}, headers=self._headers(),
                reactor=self.reactor, timeout=self.requestTimeout, unbuffered=True)
        except Exception as e:
            raise ServerError(None, "GET %s: %s" % (url, _describe(e)))
        if response.code != 200:
            content = yield response.content()
            try:
                message = json.loads(content)["error"]
            except Exception:
                message = content[:200].decode("utf-8", "replace")
            raise ServerError(response.code, "GET %s: %s" % (url, message))
        size = [0]
        with open(temporary, "wb") as f:
            def write(data):
                f.write(data)
                size[0] += len(data)
            try:
                yield treq.collect(response, write)
            except Exception as e:
                raise ServerError(None, "GET %s: %s" % (url, _describe(e)))
        os.rename(temporary, path)
        return size[0]

    def putPart(self, jobId, lease, name, offset, data, last):
        """Upload ``data`` at ``offset`` of the job's result ``name`` (``last`` ends it)."""
        params = {"lease": str(lease), "offset": str(offset)}
        if last:
            params["last"] = "1"
        return self._call("PUT", "/api/v1/jobs/%d/files/%s" % (jobId, name), params=params, data=data)


def _describe(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class Backoff:
    """Capped exponential delays with jitter: ``initial``, doubling, up to ``cap``.

    Each delay is drawn in [d/2, d) from the injected ``random`` (a function
    returning floats in [0, 1)), so that many workers that lost the same
    server do not come back in step.
    """

    def __init__(self, initial=0.5, cap=30.0, factor=2.0, random=_random.random):
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.random = random
        self.failures = 0

    def next(self):
        delay = min(self.cap, self.initial * self.factor ** self.failures)
        self.failures += 1
        return delay * (0.5 + 0.5 * self.random())

    def reset(self):
        self.failures = 0


class Reachability:
    """Logs when the server goes away and when it comes back, once each."""

    _log = Logger()

    def __init__(self, url):
        self.url = url
        self.down = False

    def failed(self, error):
        if not self.down:
            self.down = True
            code = getattr(error, "code", None)
            what = "unreachable" if code is None else "answers %d" % (code,)
            self._log.warn("server {url} {what} ({why}); retrying with backoff",
                           url=self.url, what=what, why=str(error))

    def ok(self):
        if self.down:
            self.down = False
            self._log.info("server {url} reachable again", url=self.url)
