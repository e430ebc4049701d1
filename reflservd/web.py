"""What every HTTP route shares: the Klein app, the error type, JSON bodies,
multipart parsing, and a request class that refuses an oversized body before
reading it."""

import json
import time
from io import BytesIO
from urllib.parse import parse_qsl

import multipart
from klein import Klein
from twisted.logger import Logger
from twisted.web import resource, server, static
from werkzeug.exceptions import MethodNotAllowed, NotFound

from reflservd import limits
from reflservd.queue import QueueError, RateLimited
from reflservd.store import BadName

JSON = "application/json"


class APIError(Exception):
    """The one error type of the HTTP API: answered as ``{"error": message}``."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class Routes:
    """The base of the route classes (``JobAPI``, ``LegacyAPI``, ``JobPages``).

    They register on this one Klein app, so that a single site holds the
    legacy routes and the new ones side by side (``/jobs/7.json`` beside
    ``/jobs/7``); each instance of the combined class gets its own bound app.
    """

    app = Klein()

    @app.handle_errors(APIError, QueueError, BadName)
    def _apiError(self, request, failure):
        error = failure.value
        code = getattr(error, "code", 400)
        if isinstance(error, RateLimited):
            request.setHeader(b"Retry-After", b"%d" % (error.retryAfter,))
        return jsonBody(request, {"error": str(error)}, code)

    @app.handle_errors(NotFound)
    def _notFound(self, request, failure):
        return jsonBody(request, {"error": "no such route: %s" % (request.path.decode("latin-1"),)}, 404)

    @app.handle_errors(MethodNotAllowed)
    def _notAllowed(self, request, failure):
        allowed = sorted(failure.value.valid_methods or ())
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return jsonBody(request, {"error": "%s is not allowed on %s (allowed: %s)" % (
            request.method.decode("latin-1"), request.path.decode("latin-1"),
            ", ".join(allowed))}, 405)


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
            except QueueError as e:
                self.setResponseCode(e.code)
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


class Site(server.Site):
    """A site whose requests refuse bodies over ``maxBody`` before reading."""

    requestFactory = CappedRequest

    def __init__(self, resource, maxBody, **kwargs):
        server.Site.__init__(self, resource, **kwargs)
        self.maxBody = maxBody


