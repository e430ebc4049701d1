"""What every HTTP route shares: the error type and its status table, JSON bodies,
multipart parsing, a request class that refuses an oversized body before
reading it, and a site that bounds what one connection may hold: connections
per address, and the time a request may take to arrive."""

import json
import time
from collections import Counter
from io import BytesIO
from urllib.parse import parse_qsl, unquote_to_bytes

import multipart
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, resource, server, static
from zope.interface import implementer

from reflservd import errors, limits

JSON = "application/json"


class APIError(Exception):
    """A refusal of the HTTP layer itself (a content type, a body's size, a
    query argument), with its status code; the domain's refusals are
    ``reflservd.errors`` and get theirs from ``STATUS``."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


STATUS = {
    errors.Refused: 400,
    errors.BadName: 400,
    errors.TooLarge: 413,
    errors.Unauthenticated: 401,
    errors.WrongHost: 421,
    errors.Forbidden: 403,
    errors.UnknownJob: 404,
    errors.Conflict: 409,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
    errors.DomainError: 400,
}
"""The one table from a domain error to the HTTP status that answers it."""


def statusOf(error):
    """The HTTP status of a refusal: an ``APIError``'s own, else the status
    of the nearest class of the domain error in ``STATUS``."""
    if isinstance(error, APIError):
        return error.code
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def errorBody(request, error):
    """The answer to a refusal: ``{"error": message}`` with its status, and
    ``Retry-After`` when it says when to try again."""
    if isinstance(error, errors.RateLimited):
        request.setHeader(b"Retry-After", b"%d" % (error.retryAfter,))
    return jsonBody(request, {"error": str(error)}, statusOf(error))


class UTF8Paths(resource.Resource):
    """The routes' resource, except that a URL path that is not UTF-8 once
    unquoted is answered as every refusal is, ``{"error": …}`` with a 400
    (Klein answers it in plain text and logs a traceback each time)."""

    isLeaf = True

    def __init__(self, routes):
        resource.Resource.__init__(self)
        self.routes = routes

    def render(self, request):
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return jsonBody(request, {"error": "the URL path is not UTF-8"}, 400)
        return self.routes.render(request)


def downloadable(path, contentTypes=None, attachment=True):
    """A resource serving a job's file: streamed, with ranges, never as HTML in
    this origin (a fixed type, ``nosniff``, a sandboxing CSP)."""
    resource = static.File(path, defaultType="application/octet-stream")
    resource.contentTypes = contentTypes or {}
    resource.isLeaf = True
    return _Headers(resource, attachment)


class _Headers(resource.Resource):
    isLeaf = True

    def __init__(self, wrapped, attachment):
        resource.Resource.__init__(self)
        self.wrapped, self.attachment = wrapped, attachment

    def render(self, request):
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"sandbox; default-src 'none'")
        if self.attachment:
            name = self.wrapped.basename().encode("utf-8", "replace").replace(b'"', b"")
            request.setHeader(b"Content-Disposition", b'attachment; filename="%s"' % (name,))
        return self.wrapped.render(request)


def jsonBody(request, value, code=200):
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:      # NaN or an infinity (a failed fit's χ²): null, which a browser parses
        text = json.dumps(_nullNonFinite(value))
    return text.encode("utf-8")


def _nullNonFinite(value):
    """``value`` with NaN and infinities as null: JSON a browser can parse."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _nullNonFinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nullNonFinite(v) for v in value]
    return value


def readJSON(request, limit=1 << 20, required=True):
    """The request's JSON body as a dict; 415 for another content type, 413
    past ``limit``, 400 when it does not parse or is not an object."""
    ctype = contentType(request)
    body = readBody(request, limit)
    if not body and not required:
        return {}
    if ctype != JSON:
        raise APIError(415, "send a JSON body (Content-Type: application/json), not %r" % (ctype or "nothing",))
    value = limits.parseJSON(body)
    if not isinstance(value, dict):
        raise APIError(400, "the body must be a JSON object")
    return value


def readBody(request, limit):
    checkSize(request, limit)
    return request.content.read()


def checkSize(request, limit):
    """The body's size, or 413 past ``limit``; leaves the body at its start."""
    request.content.seek(0, 2)
    size = request.content.tell()
    if size > limit:
        raise APIError(413, "the body is %d bytes; this route takes at most %d" % (size, limit))
    request.content.seek(0)
    return size


def contentType(request):
    raw = request.getHeader(b"content-type") or b""
    return raw.decode("latin-1").split(";")[0].strip().lower()


def formParts(request, limit):
    """The parts of a ``multipart/form-data`` (or urlencoded) body as
    ``[(name, filename or None, file)]``; files are spooled to disk past 1 MB."""
    ctype = request.getHeader(b"content-type") or b""
    kind = contentType(request)
    size = checkSize(request, limit)
    if kind == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise APIError(400, "the form is not UTF-8")
        return [(name, None, BytesIO(value.encode("utf-8"))) for name, value in pairs]
    if kind != "multipart/form-data":
        raise APIError(415, "send multipart/form-data, not %r" % (kind or "nothing",))
    _, options = multipart.parse_options_header(ctype.decode("latin-1"))
    boundary = options.get("boundary")
    if not boundary:
        raise APIError(400, "the multipart body has no boundary")
    try:
        parser = multipart.MultipartParser(
            request.content, boundary, content_length=size, charset="utf-8",
            part_limit=1000, spool_limit=1 << 20, memory_limit=64 << 20, disk_limit=limit)
        return [(part.name, part.filename, part.file) for part in parser]
    except multipart.MultipartError as e:
        raise APIError(400, "the multipart body does not parse: %s" % (e,))


class CappedRequest(server.Request):
    """A request that refuses a body over the site's cap as soon as the
    headers say how long it is (or, when they do not, as soon as it grows past
    the cap), before reading it: 413 and the connection closed."""

    _log = Logger()
    refused = False

    def __init__(self, channel, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        server.Request.__init__(self, channel, *args, **kwargs)
        self._received = 0

    def _cap(self):
        return getattr(self.channel.site, "maxBody", None)

    def gotLength(self, length):
        cap = self._cap()
        if cap is not None and length is not None and length > cap:
            self._refuse(length, cap)
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self._received += len(data)
        cap = self._cap()
        if cap is not None and self._received > cap:
            self._refuse(self._received, cap)
            return
        server.Request.handleContentChunk(self, data)

    def _refuse(self, length, cap):
        self.refused = True
        self._log.info("refused a body of {length} bytes (cap {cap})", length=length, cap=cap)
        body = json.dumps({"error": "the body is %d bytes; this server takes at most %d" % (length, cap)}).encode()
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.channel.loseConnection()

    def requestReceived(self, command, path, version):
        if self.refused:
            return
        server.Request.requestReceived(self, command, path, version)

    def process(self):
        access = getattr(self.channel.site, "access", None)
        if access is not None:
            try:
                access.checkHost(self)
            except errors.DomainError as e:
                code = statusOf(e)
                self.setResponseCode(code, http.RESPONSES.get(code, b"Misdirected Request"))
                self.setHeader(b"Content-Type", b"application/json")
                self.write(json.dumps({"error": str(e)}).encode("utf-8"))
                self.finish()
                return
        metrics = getattr(self.channel.site, "metrics", None)
        if metrics is not None:
            began = time.monotonic()
            method = self.method.decode("ascii", "replace")
            self.notifyFinish().addBoth(
                lambda _: metrics.observeRequest(method, time.monotonic() - began))
        server.Request.process(self)


class RateLimitedLog:
    """Log one kind of event at most once per ``interval`` seconds for each
    key (an address), counting those left out: a flood of refusals writes a
    line now and then, not a line each."""

    def __init__(self, logger, clock, interval=60.0):
        self._log, self._clock, self.interval = logger, clock, interval
        self._last = {}
        self._quiet = Counter()

    def info(self, key, format, **fields):
        now = self._clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._quiet[key] += 1
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = now
        fields["more"] = self._quiet.pop(key, 0)
        if fields["more"]:
            format += " ({more} more like it since the last such line)"
        self._log.info(format, **fields)


def _plainAnswer(transport, code, reason, message):
    body = json.dumps({"error": message}).encode()
    transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (code, reason, len(body), body))


@implementer(IHalfCloseableProtocol)
class _Refusal(Protocol):
    """What a connection over a cap gets: a 503 with a JSON error, and the
    server's side closed at once. The connection itself is closed when the
    client closes its side, or after ``abortAfter`` seconds: closing it while
    the client's request is still unread would reset it, and the client
    could lose the answer."""

    def __init__(self, message, clock, abortAfter):
        self.message, self.clock, self.abortAfter = message, clock, abortAfter
        self._abort = None

    def connectionMade(self):
        _plainAnswer(self.transport, 503, b"Service Unavailable", self.message)
        self.transport.loseWriteConnection()
        self._abort = self.clock.callLater(self.abortAfter, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel whose requests have a total deadline to arrive.

    From the moment a request is awaited (the connection opened, or the
    previous response sent) its headers and body must be in within
    ``site.requestDeadline`` seconds, plus one second for each
    ``site.minUploadRate`` bytes of its body (declared by Content-Length, or
    received so far when chunked). Bytes arriving do not reset it, unlike
    twisted.web's idle ``timeOut``, so a client sending a byte a minute is
    closed as surely as a silent one: with a 408 when part of a request came,
    silently when the connection was only idle. The handler's own time (a
    long-poll) is not counted."""

    _deadline = None
    _awaitedSince = None
    _requestBytes = 0
    _bodyBytes = 0
    address = None

    def connectionMade(self):
        http.HTTPChannel.connectionMade(self)
        self._awaitRequest()

    def _now(self):
        return self.site.reactor.seconds()

    def _awaitRequest(self):
        self._cancelDeadline()
        self._awaitedSince = self._now()
        self._requestBytes = self._bodyBytes = 0
        self._deadline = self.callLater(self.site.requestDeadline, self._deadlinePassed)

    def _cancelDeadline(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _allowed(self):
        """Seconds this request may take to arrive, as far as it is known."""
        body = max(self.length or 0, self._bodyBytes)
        return self.site.requestDeadline + body / self.site.minUploadRate

    def dataReceived(self, data):
        if not self._handlingRequest:
            self._requestBytes += len(data)
        http.HTTPChannel.dataReceived(self, data)

    def rawDataReceived(self, data):
        if not self._handlingRequest:
            self._bodyBytes += len(data)
        http.HTTPChannel.rawDataReceived(self, data)

    def allContentReceived(self):
        self._cancelDeadline()
        http.HTTPChannel.allContentReceived(self)

    def requestDone(self, request):
        if self.persistent:
            self._awaitRequest()
        http.HTTPChannel.requestDone(self, request)

    def _deadlinePassed(self):
        self._deadline = None
        if self.transport.disconnecting:
            return
        allowed = self._allowed()
        remaining = self._awaitedSince + allowed - self._now()
        if remaining > 0:
            self._deadline = self.callLater(remaining, self._deadlinePassed)
            return
        self.site.deadlineLog.info(
            self.address, "closed a connection from {address}: no whole request within the "
            "{seconds:.1f} s allowed ({received} bytes came)",
            address=self.address, seconds=allowed, received=self._requestBytes)
        if self._requestBytes:
            _plainAnswer(self.transport, 408, b"Request Timeout",
                         "the request did not arrive within %.1f s" % (allowed,))
        self.loseConnection()
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def connectionLost(self, reason):
        self._cancelDeadline()
        self.site.connectionClosed(self.address)
        http.HTTPChannel.connectionLost(self, reason)


class Site(server.Site):
    """A site whose requests refuse bodies over ``maxBody`` before reading,
    and whose connections are bounded: at most ``maxConnections`` open, at most
    ``maxPerAddress`` from one address (the rest answered 503 and closed at
    once, logged once a minute per address), each request given a total
    deadline to arrive (`DeadlineChannel`)."""

    requestFactory = CappedRequest
    _log = Logger()

    def __init__(self, resource, maxBody, maxConnections=None, maxPerAddress=None,
                 requestDeadline=60.0, minUploadRate=64 * 1024, **kwargs):
        server.Site.__init__(self, resource, **kwargs)
        self.maxBody = maxBody
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        self.requestDeadline = requestDeadline
        self.minUploadRate = minUploadRate
        self.openConnections = Counter()
        self.openTotal = 0
        self.refusalLog = RateLimitedLog(self._log, self.reactor)
        self.deadlineLog = RateLimitedLog(self._log, self.reactor)

    def buildProtocol(self, addr):
        address = getattr(addr, "host", None) or "local"
        if self.maxConnections is not None and self.openTotal >= self.maxConnections:
            self.refusalLog.info(
                "*", "refused a connection from {address}: {open} connections open (cap {cap})",
                address=address, open=self.openTotal, cap=self.maxConnections)
            return _Refusal("the server is at its limit of %d connections; try again later"
                            % (self.maxConnections,), self.reactor, 5)
        if self.maxPerAddress is not None and self.openConnections[address] >= self.maxPerAddress:
            self.refusalLog.info(
                address, "refused a connection from {address}: {open} open from that address (cap {cap})",
                address=address, open=self.openConnections[address], cap=self.maxPerAddress)
            return _Refusal("%d connections are open from %s, the most this server takes from one "
                            "address; try again later" % (self.openConnections[address], address),
                            self.reactor, 5)
        protocol = server.Site.buildProtocol(self, addr)
        protocol._channel.address = address
        self.openConnections[address] += 1
        self.openTotal += 1
        return protocol

    def connectionClosed(self, address):
        self.openTotal -= 1
        self.openConnections[address] -= 1
        if self.openConnections[address] <= 0:
            del self.openConnections[address]

    protocol = staticmethod(lambda: http._GenericHTTPChannelProtocol(DeadlineChannel()))


