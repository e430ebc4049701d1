"""The HTML pages: the jobs, one job (live), a fit series (``seriespage``)
and a form to submit a fit, and the files they load (``/static/…``).

Pages are rendered on the server from the elements of
``reflservd.elements``; what changes while a page is open (progress, χ²
chart, status) is updated by small scripts of our own in ``reflservd/static``
that long-poll ``/api/v1/jobs/{id}/events``. Everything a page loads comes
from this server: no inline script or style, no CDN, and a strict
Content-Security-Policy on every page, so that text a user put in a job (its
name, its error) can never run as code in another user's browser.

Nothing here touches the disk on the reactor: a job's request, file lists
and log tails are read in the store's thread pool, and the static files
once, when the pages are made. A page is flattened to bytes before any is
sent: one that still fails is a logged 500 for that request alone.
"""

import os

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.template import flattenString

from reflservd import queue as Q
from reflservd.access import KEY_COOKIE, Access
from reflservd.elements import (
    LOG_TAIL, NAME_LIMIT, ErrorBody, JobBody, JobFiles, JobsBody, Page, SubmitBody)
from reflservd.errors import DomainError, Refused, UnknownJob
from reflservd.faces import answerRefusals, parseBody, submitter
from reflservd.fitoptions import fitOptions
from reflservd.format import displayText
from reflservd.names import LOG_NAMES, VERSION
from reflservd.seriespage import SeriesBody
from reflservd.store import checkName
from reflservd.web import APIError, formParts, statusOf

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
}
DOCTYPE = b"<!DOCTYPE html>\n"


def _pageHeaders(request):
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Security-Policy", CSP.encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"same-origin")
    request.setHeader(b"Cache-Control", b"no-store")


def _arg(request, name):
    raw = request.args.get(name.encode())
    return raw[0].decode("utf-8", "replace").strip() if raw else ""


def _tail(path, limit=LOG_TAIL):
    """The last ``limit`` bytes of a file as text, from a line start."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return None, 0
    if size > limit and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace"), size


def readJobFiles(server, jobId):
    """What a job's page shows from the store (`JobFiles`); blocking, so
    run in the store's thread pool."""
    try:
        request = server.readRequest(jobId)
    except (OSError, ValueError):
        request = {}
    store = server.store
    resultFiles = store.files(jobId, "result")
    present = dict(resultFiles)
    logs = []
    for name in LOG_NAMES:
        if name in present:
            text, size = _tail(store.path(jobId, "result", name))
            if text is not None:
                logs.append((name, text, size))
    return JobFiles(request, resultFiles, store.files(jobId, "upload"), logs)


def loadStatic(folder=STATIC):
    """``{name: (content type, bytes)}`` of the files the pages load: read
    once, so that serving them never touches the disk."""
    files = {}
    for name in os.listdir(folder):
        contentType = STATIC_TYPES.get(os.path.splitext(name)[1])
        path = os.path.join(folder, name)
        if contentType is not None and not name.startswith(".") and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = (contentType, f.read())
    return files


class JobPages:
    """The human pages of the site (``/``, ``/jobs/<id>``, ``/series/<id>``,
    ``/submit``) and the files they load (``/static/…``)."""

    _log = Logger()
    app = Klein()
    answerRefusals(app)

    def __init__(self, server=None, maxUpload=200 * 1024 * 1024, access=None, staticFiles=None):
        self.server = server
        self.maxUpload = maxUpload
        self.access = access or Access()
        self.staticFiles = loadStatic() if staticFiles is None else staticFiles

    def render(self, request, page):
        """A Deferred firing with the page's HTML. The page is flattened to
        bytes before any is sent, so that one that cannot be flattened is
        answered 500 (and logged) instead of 200 with half a page; the
        failure is this request's alone."""
        return _html(request, page).addErrback(self._renderFailed, request)

    def _renderFailed(self, failure, request):
        self._log.failure("the page {path} could not be rendered", failure,
                          path=request.uri.decode("latin-1"))
        request.setResponseCode(500)
        return _html(request, Page("Error", ErrorBody(
            "This page could not be shown", "Something in it could not be rendered; the server's log says what.")))

    @app.route("/", methods=["GET"])
    def jobsPage(self, request):
        _pageHeaders(request)
        status = _arg(request, "status").upper()
        if status not in Q.STATUSES:
            status = ""
        try:
            page = max(1, int(_arg(request, "page") or 1))
        except ValueError:
            page = 1
        body = JobsBody(self.server.queue, status, _arg(request, "owner"), _arg(request, "queue"), page)
        return self.render(request, Page("Jobs", body, scripts=["jobs.js"], section="jobs"))

    @app.route("/jobs/<int:jobId>", methods=["GET"])
    @defer.inlineCallbacks
    def jobPage(self, request, jobId):
        _pageHeaders(request)
        try:
            job = self.server.queue.get(jobId)
        except UnknownJob as e:
            request.setResponseCode(404)
            page = yield self.render(request, Page("No job %d" % (jobId,),
                                                   ErrorBody("No job %d" % (jobId,), e.message)))
            return page
        ahead = 0
        if job.status == Q.PENDING:
            order = self.server.queue.pendingOrder()
            ahead = order.index(job.id) if job.id in order else 0
        files = yield self.server.inThread(readJobFiles, self.server, job.id)
        body = JobBody(job, files, ahead, control=self.access.mayControl(request, job))
        title = "Job %d · %s" % (job.id, displayText(job.name, limit=NAME_LIMIT))
        page = yield self.render(request, Page(title, body, scripts=["chart.js", "job.js"]))
        return page

    @app.route("/series/<int:seriesId>", methods=["GET"])
    def seriesPage(self, request, seriesId):
        """A fit series: its members' table and parameter plots (``seriespage``)."""
        _pageHeaders(request)
        try:
            series = self.server.queue.series.get(seriesId)
        except UnknownJob as e:
            request.setResponseCode(404)
            return self.render(request, Page("No series %d" % (seriesId,),
                                             ErrorBody("No series %d" % (seriesId,), e.message)))
        title = "Series %d · %s" % (series.id, displayText(series.name, limit=NAME_LIMIT))
        body = SeriesBody(self.server.queue, series)
        return self.render(request, Page(title, body, scripts=["chart.js", "series.js"]))

    @app.route("/submit", methods=["GET"])
    def submitPage(self, request):
        _pageHeaders(request)
        return self.render(request, Page("Submit a fit", SubmitBody(), scripts=["submit.js"], section="submit"))

    @app.route("/submit", methods=["POST"])
    @defer.inlineCallbacks
    def submitForm(self, request):
        """The form's POST: the job is submitted like ``POST /api/v1/jobs``
        and the browser is sent to its page."""
        _pageHeaders(request)
        values = {}
        try:
            origin, owner = submitter(self.access, request)
            parts = yield parseBody(self.server, request, self.maxUpload, formParts, self.maxUpload)
            jobRequest, files, values = _formRequest(parts)
            job, key = yield self.server.submit(jobRequest, files, origin, owner)
        except (APIError, DomainError) as e:
            request.setResponseCode(statusOf(e))
            body = SubmitBody(values, "Not submitted: " + displayText(str(e)))
            page = yield self.render(request, Page("Submit a fit", body, scripts=["submit.js"], section="submit"))
            return page
        # The key stays in this browser, for the page's cancel button only.
        for path in (b"/api/v1/jobs/%d" % (job.id,), b"/jobs/%d" % (job.id,)):
            request.addCookie((KEY_COOKIE % (job.id,)).encode(), key.encode(), path=path,
                              httpOnly=True, sameSite="Strict", max_age=b"31536000")
        request.redirect(b"/jobs/%d" % (job.id,))
        request.setResponseCode(303)
        return b""

    @app.route("/static/<string:name>", methods=["GET", "HEAD"])
    def staticFile(self, request, name):
        """A file of ``reflservd/static``, with a fixed type by its suffix."""
        found = self.staticFiles.get(name)
        if found is None:
            raise APIError(404, "no static file %r" % (name,))
        contentType, body = found
        request.setHeader(b"Content-Type", contentType.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return body


def _html(request, page):
    return flattenString(request, page).addCallback(lambda html: DOCTYPE + html)


def _formRequest(parts):
    """The job request and files of a submitted form: ``(request, files,
    values)``; ``values`` are the text fields, to fill the form again."""
    values, files, model = {}, [], None
    for name, fileName, f in parts:
        if name in ("model", "data"):
            if not fileName:
                continue
            fileName = checkName(os.path.basename(fileName.replace("\\", "/")))
            if name == "model":
                if model is not None:
                    raise Refused("choose one model file")
                model = fileName
            files.append((fileName, f))
        else:
            try:
                values[name] = f.read(4096).decode("utf-8").strip()
            except UnicodeDecodeError:
                raise Refused("the field %r is not UTF-8 text" % (name,))
    if model is None:
        raise Refused("choose the model file (.py or .json)")
    if not model.endswith((".py", ".json")):
        raise Refused("the model must be a .py script or a .json FitProblem, not %r" % (model,))
    options = fitOptions(values)
    jobRequest = {
        "name": values.get("name") or os.path.splitext(model)[0],
        "notify": values.get("notify", ""),
        "service": "refl1d",
        "version": VERSION,
        "data": {"model": model, "options": options},
    }
    return jobRequest, files, values
