"""The legacy jobqueue wire protocol (../shared/LEGACY_PROTOCOL.md, docs/legacy.md).

The old clients and workers keep working unchanged; the old server's bugs do
not come along: a job is journaled before any worker can see it, a deleted job
is never handed out, results are taken only from the worker that holds an
ACTIVE job, and a dead worker's job goes back to the queue when its lease runs
out. The old worker sends no heartbeat, and it holds a prefetched job without
reading its status while it runs a long one; so a legacy lease lasts
``--legacy-lease-timeout`` (a day by default) and is renewed by what only the
worker does (its ``nextjob`` and ``postjob``), never by anyone's reads.
"""

import base64
import binascii
import os

from klein import Klein
from twisted.internet import defer

from reflservd import limits
from reflservd import queue as Q
from reflservd.job import selectJobs
from reflservd.access import Access
from reflservd.errors import Forbidden, Refused, TooLarge
from reflservd.faces import answerRefusals, parseBody, submitter, workerRoute
from reflservd.store import baseName, checkName
from reflservd.web import JSON, APIError, contentType, downloadable, formParts, jsonBody, readJSON

STATUS_NAMES = "any(pending,active,error,complete,cancel)"


def checkFormat(fmt):
    if fmt != "json":
        raise APIError(404, "only .json is offered here (never pickle, which would run code)")


class LegacyAPI:
    """``/jobs.json`` and the rest, answering 200 wherever the old server did."""

    app = Klein()
    answerRefusals(app)

    def __init__(self, server, maxUpload=200 * 1024 * 1024, access=None):
        self.server = server
        self.maxUpload = maxUpload
        self.access = access or Access()

    @app.route("/jobs.<string:fmt>", methods=["GET"])
    def allJobs(self, request, fmt):
        checkFormat(fmt)
        jobs = sorted(self.server.queue.jobs.values(), key=lambda job: (job.priority, job.id))
        return jsonBody(request, {"jobs": [job.id for job in jobs]})

    @app.route("/jobs/<%s:status>.<string:fmt>" % (STATUS_NAMES,), methods=["GET"])
    def jobsByStatus(self, request, status, fmt):
        checkFormat(fmt)
        jobs = sorted(selectJobs(self.server.queue, status), key=lambda job: (job.priority, job.id))
        return jsonBody(request, {"jobs": [job.id for job in jobs]})

    @app.route("/jobs.<string:fmt>", methods=["POST"])
    @defer.inlineCallbacks
    def legacySubmit(self, request, fmt):
        checkFormat(fmt)
        if contentType(request) != JSON:
            raise APIError(415, "send the job as JSON (Content-Type: application/json)")
        origin, owner = submitter(self.access, request)
        jobRequest, files = yield parseBody(self.server, request, self.maxUpload, _legacySubmitBody,
                                            self.maxUpload, self.server.quotas.maxFiles)
        job, key = yield self.server.submit(jobRequest, files, origin, owner)
        return jsonBody(request, {"id": job.id, "job": jobRequest, "key": key})

    @app.route("/jobs/<int:jobId>.<string:fmt>", methods=["GET"])
    def legacyJob(self, request, jobId, fmt):
        checkFormat(fmt)
        job = self.server.queue.get(jobId)
        jobRequest = self.server.readRequest(jobId)
        if isinstance(jobRequest, dict) and not self.access.mayControl(request, job, byAddress=True):
            jobRequest = dict(jobRequest, notify=None)
        return jsonBody(request, {"id": jobId, "job": jobRequest})

    @app.route("/jobs/<int:jobId>/status.<string:fmt>", methods=["GET"])
    def legacyStatus(self, request, jobId, fmt):
        checkFormat(fmt)
        return jsonBody(request, {"id": jobId, "status": self.server.queue.status(jobId)})

    @app.route("/jobs/<int:jobId>/results.<string:fmt>", methods=["GET"])
    def legacyResults(self, request, jobId, fmt):
        checkFormat(fmt)
        job = self.server.queue.jobs.get(jobId)
        if job is None:
            return jsonBody(request, {"status": "UNKNOWN"})
        if not job.resultPosted:
            return jsonBody(request, {"id": jobId, "status": job.status})
        return jsonBody(request, dict(legacyResultsOf(job), id=jobId))

    @app.route("/jobs/<int:jobId>.<string:fmt>", methods=["DELETE"])
    @defer.inlineCallbacks
    def legacyDelete(self, request, jobId, fmt):
        checkFormat(fmt)
        job = self.server.queue.get(jobId)
        if not self.access.mayControl(request, job, byAddress=True):
            raise Forbidden("job %d may be deleted from the address that submitted it, with "
                              "its key, or with an admin token" % (jobId,))
        yield self.server.delete(jobId)
        return jsonBody(request, {"jobs": sorted(self.server.queue.jobs)})

    @app.route("/jobs/nextjob.<string:fmt>", methods=["POST"])
    @defer.inlineCallbacks
    def nextJob(self, request, fmt):
        checkFormat(fmt)
        body = readJSON(request, required=False)
        queueName = body.get("queue")
        if queueName is None:
            raise APIError(400, "nextjob needs the 'queue' field: {\"queue\": NAME}")
        limits.checkQueueName(queueName)
        self.access.checkWorker(request, queueName)
        job = yield self.server.lease(queueName, self.access.address(request), 0, legacy=True)
        if job is None:
            return jsonBody(request, {"request": None})
        jobRequest = yield self.server.inThread(self.server.readRequest, job.id)
        return jsonBody(request, {"id": job.id, "request": jobRequest})

    @app.route("/jobs/<int:jobId>/postjob", methods=["POST"])
    @workerRoute(sameOrigin={"simpleAllowed": True})
    @defer.inlineCallbacks
    def postJob(self, request, jobId):
        job = self.server.queue.get(jobId)
        if not job.legacy or job.worker != self.access.address(request):
            raise APIError(409, "job %d is not held by a legacy worker at this address" % (jobId,))
        lease = job.lease
        self.server.queue.checkLease(jobId, lease)
        fields, files = {}, []
        parts = yield parseBody(self.server, request, self.maxUpload, formParts, self.maxUpload)
        for name, fileName, f in parts:
            if name == "file":
                files.append((checkName(baseName(fileName)), f))
            else:
                fields[name] = f.read().decode("utf-8", "replace")
        results = parseResults(fields.get("results"))
        for fileName, f in files:
            yield self.server.putFile(jobId, lease, fileName, 0, f, True)
        status = results.get("status") if results.get("status") in Q.FINISHED else Q.ERROR
        error = results.get("error") or results.get("message")
        if status == Q.ERROR and error is None:
            error = "the worker sent no error message"
        yield self.server.complete(jobId, lease, status, results.get("result"),
                                   None if error is None else _text(error),
                                   results.get("trace") and _text(results["trace"]),
                                   posted=results)
        return jsonBody(request, {})

    @app.route("/jobs/<int:jobId>/data/index.<string:fmt>", methods=["GET"])
    def dataIndex(self, request, jobId, fmt):
        checkFormat(fmt)
        self.server.queue.get(jobId)
        files = self.server.store.files(jobId, "result")
        return jsonBody(request, {"id": jobId, "files": [[n, s] for n, s in files]})

    @app.route("/jobs/<int:jobId>/data/<string:name>", methods=["GET"])
    def dataFile(self, request, jobId, name):
        self.server.queue.get(jobId)
        path = self.server.store.path(jobId, "result", name)
        if not os.path.isfile(path):
            raise APIError(404, "job %d has no file %r" % (jobId, name))
        return downloadable(path, {".json": "application/json"}, attachment=False)


def _text(value):
    return value if isinstance(value, str) else repr(value)


def legacyResultsOf(job):
    """The results as the old worker posted them (made up from the job for
    a job ended otherwise: by a new worker, a cancel or a lost lease)."""
    if job.postedJSON is not None:
        posted = limits.parseJSON(job.postedJSON.encode("utf-8"), "the posted results")
        if isinstance(posted, dict):
            posted["status"] = job.status
            return posted
    if job.status == Q.COMPLETE:
        return {"status": job.status, "result": job.result}
    if job.status == Q.CANCEL:
        return {"status": job.status, "message": job.error or "cancelled"}
    return {"status": job.status, "error": job.error, "trace": job.trace}


def parseResults(text):
    """The ``results`` field of a postjob; not JSON → the original's ERROR."""
    try:
        results = limits.parseJSON(text.encode("utf-8", "replace")) if text is not None else None
    except Refused:
        results = None
    if not isinstance(results, dict):
        return {"status": Q.ERROR, "error": "No results returned from the server", "trace": text}
    return results


def _legacySubmitBody(request, maxUpload, maxFiles):
    """The request and inline files of a legacy ``POST /jobs.json``."""
    return inlineFiles(readJSON(request, limit=maxUpload), maxFiles)


def inlineFiles(jobRequest, maxFiles=limits.MAX_FILES):
    """Take the files sent inline in a legacy request's ``data.files``
    (text, or ``{"base64": …}``) out of it: ``(request, [(name, bytes)])``.
    The stored request is the same as a multipart submit's: the files are
    the job's uploads, not part of its request."""
    data = jobRequest.get("data")
    if not isinstance(data, dict) or "files" not in data:
        return jobRequest, []
    inline = data["files"]
    if not isinstance(inline, dict):
        raise APIError(400, "data.files must map file names to their contents")
    if len(inline) > maxFiles:
        raise TooLarge("a job takes at most %d files, not %d" % (maxFiles, len(inline)))
    files = []
    for name, content in inline.items():
        checkName(name)
        if isinstance(content, str):
            files.append((name, content.encode("utf-8")))
        elif isinstance(content, dict) and isinstance(content.get("base64"), str):
            try:
                files.append((name, base64.b64decode(content["base64"], validate=True)))
            except (binascii.Error, ValueError):
                raise APIError(400, "file %r is not valid base64" % (name,))
        else:
            raise APIError(400, "file %r must be text or {\"base64\": …}" % (name,))
    stored = dict(jobRequest, data={k: v for k, v in data.items() if k != "files"})
    return stored, files
