"""The ``/api/v1`` routes (docs/api.md), ``/healthz`` and ``/metrics``."""

import math
import os

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger

from reflservd import limits
from reflservd.access import Access
from reflservd.faces import answerRefusals, parseBody, submitter, workerRoute
from reflservd.longpoll import MAX_LONG_POLL
from reflservd.names import SESSION_NAME
from reflservd.job import selectJobs
from reflservd.store import checkName
from reflservd.web import APIError, downloadable, formParts, jsonBody, readJSON

MAX_PAGE = 1000


class JobAPI:
    """The JSON API for users and workers."""

    _log = Logger()
    app = Klein()
    answerRefusals(app)

    def __init__(self, server, maxUpload=200 * 1024 * 1024, access=None, metrics=None):
        self.server = server
        self.maxUpload = maxUpload
        self.access = access or Access()
        self.metrics = metrics

    # ---- helpers

    def jobRecord(self, job, request=None, asker=None):
        """The job's record; with its request when ``request`` is given (the
        stored request, or True to read it from the store). The notify
        address is shown only to ``asker`` (the HTTP request) when it holds
        the job's key or an admin token."""
        notify = asker is not None and self.access.maySeeNotify(asker, job)
        record = job.toJSON(notify=notify)
        if request is True:
            request = self.server.readRequest(job.id)
        if request is not None:
            record["request"] = request if notify or not isinstance(request, dict) else dict(
                request, notify=None)
        return record

    @staticmethod
    def intArg(request, name, default, low=None, high=None):
        raw = request.args.get(name.encode())
        if not raw:
            return default
        try:
            value = float(raw[0]) if name == "timeout" else int(raw[0])
        except ValueError:
            raise APIError(400, "%s must be a number, not %r" % (name, raw[0].decode("latin-1")[:50]))
        if not math.isfinite(value) or abs(value) >= 2 ** 53:
            raise APIError(400, "%s must be a finite number below 2**53" % (name,))
        if low is not None and value < low:
            raise APIError(400, "%s must be at least %s" % (name, low))
        return min(value, high) if high is not None else value

    @staticmethod
    def strArg(request, name):
        raw = request.args.get(name.encode())
        return raw[0].decode("utf-8", "replace")[:limits.MAX_FIELD] if raw else None

    @staticmethod
    def lease(body):
        lease = body.get("lease")
        if not isinstance(lease, int) or isinstance(lease, bool):
            raise APIError(400, "'lease' must be the integer lease token")
        return lease

    # ---- users

    @app.route("/api/v1/jobs", methods=["POST"])
    @defer.inlineCallbacks
    def submit(self, request):
        origin, owner = submitter(self.access, request)
        jobRequest, files = yield parseBody(self.server, request, self.maxUpload, submitParts,
                                            self.maxUpload)
        job, key = yield self.server.submit(jobRequest, files, origin, owner)
        record = job.toJSON(notify=True)
        record["request"] = jobRequest
        record["key"] = key
        return jsonBody(request, record, 201)

    @app.route("/api/v1/jobs", methods=["GET"])
    def listJobs(self, request):
        status = self.strArg(request, "status")
        owner = self.strArg(request, "owner")
        queueName = self.strArg(request, "queue")
        limit = self.intArg(request, "limit", 100, 1, MAX_PAGE)
        offset = self.intArg(request, "offset", 0, 0)
        jobs = selectJobs(self.server.queue, status, owner, queueName)
        admin = self.access.isAdmin(request)
        return jsonBody(request, {"jobs": [j.toJSON(notify=admin) for j in jobs[offset:offset + limit]],
                                  "total": len(jobs), "offset": offset, "limit": limit})

    @app.route("/api/v1/jobs/<int:jobId>", methods=["GET"])
    def getJob(self, request, jobId):
        return jsonBody(request, self.jobRecord(self.server.queue.get(jobId), request=True,
                                                asker=request))

    def checkControl(self, request, jobId, what):
        """The job, if the request may cancel or delete it (its key or an admin token)."""
        self.access.checkSameOrigin(request)
        job = self.server.queue.get(jobId)
        self.access.checkControl(request, job, what)
        return job

    @app.route("/api/v1/jobs/<int:jobId>/cancel", methods=["POST"])
    @defer.inlineCallbacks
    def cancelJob(self, request, jobId):
        self.checkControl(request, jobId, "cancelling")
        job = yield self.server.cancel(jobId)
        return jsonBody(request, self.jobRecord(job, asker=request))

    @app.route("/api/v1/jobs/<int:jobId>", methods=["DELETE"])
    @defer.inlineCallbacks
    def deleteJob(self, request, jobId):
        self.checkControl(request, jobId, "deleting")
        yield self.server.delete(jobId)
        return jsonBody(request, {"deleted": jobId})

    @app.route("/api/v1/jobs/<int:jobId>/files", methods=["GET"])
    def listFiles(self, request, jobId):
        self.server.queue.get(jobId)
        store = self.server.store
        files = [{"name": n, "size": s, "kind": kind}
                 for kind in ("upload", "result") for n, s in store.files(jobId, kind)]
        return jsonBody(request, {"id": jobId, "files": files})

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["GET", "HEAD"])
    def getFile(self, request, jobId, name):
        self.server.queue.get(jobId)
        kind = self.strArg(request, "kind") or "result"
        if kind not in ("upload", "result"):
            raise APIError(400, "kind is 'upload' or 'result'")
        path = self.server.store.path(jobId, kind, name)
        if not os.path.isfile(path):
            raise APIError(404, "job %d has no %s file %r" % (jobId, kind, name))
        inline = self.strArg(request, "inline") == "1" and name.lower().endswith(".png")
        types = {".png": "image/png"} if inline else {}
        return downloadable(path, types, attachment=not inline)

    @app.route("/api/v1/jobs/<int:jobId>/events", methods=["GET"])
    @defer.inlineCallbacks
    def events(self, request, jobId):
        after = self.intArg(request, "after", 0, 0)
        timeout = self.intArg(request, "timeout", 0.0, 0, MAX_LONG_POLL)
        events = yield self.server.events(jobId, after, timeout)
        queue = self.server.queue
        status = queue.status(jobId)
        nextSeq = events[-1]["seq"] if events else after
        return jsonBody(request, {"id": jobId, "events": events, "next": nextSeq, "status": status})

    # ---- workers

    @app.route("/api/v1/queues/<string:queueName>/lease", methods=["POST"])
    @defer.inlineCallbacks
    def leaseJob(self, request, queueName):
        limits.checkQueueName(queueName)
        self.access.checkSameOrigin(request, bodiless=True)
        self.access.checkWorker(request, queueName)
        timeout = self.intArg(request, "timeout", 0.0, 0, MAX_LONG_POLL)
        body = readJSON(request, required=False)
        worker = body.get("worker")
        if worker is None:
            worker = self.access.address(request)
        job = yield self.server.lease(queueName, worker, timeout, versions=body.get("versions"))
        if job is None:
            request.setResponseCode(204)
            return b""
        answer = {"id": job.id, "lease": job.lease, "attempts": job.attempts,
                  "leaseTimeout": self.server.leaseTimeout}
        answer.update((yield self.server.inThread(self._leaseFiles, job.id, job.attempts)))
        return jsonBody(request, answer)

    def _leaseFiles(self, jobId, attempts):
        """What a lease hands over from the store: the request, the uploads,
        and an earlier attempt's checkpoint to resume from. Runs in the store's
        thread pool, off the reactor (the lease is on the dispatch path)."""
        store = self.server.store
        files = {"request": self.server.readRequest(jobId),
                 "files": [[n, s] for n, s in store.files(jobId, "upload")]}
        if attempts >= 2 and any(n == SESSION_NAME for n, _ in store.files(jobId, "result")):
            files["checkpoint"] = SESSION_NAME
        return files

    @app.route("/api/v1/jobs/<int:jobId>/heartbeat", methods=["POST"])
    @workerRoute()
    def heartbeat(self, request, jobId):
        body = readJSON(request)
        cancel = self.server.heartbeat(jobId, self.lease(body), body.get("progress"),
                                       body.get("confinement"))
        return jsonBody(request, {"cancel": cancel, "leaseTimeout": self.server.leaseTimeout})

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["PUT"])
    @workerRoute()
    @defer.inlineCallbacks
    def putFile(self, request, jobId, name):
        lease = self.intArg(request, "lease", None)
        if lease is None:
            raise APIError(400, "send the lease token as ?lease=T")
        offset = self.intArg(request, "offset", 0, 0)
        last = self.strArg(request, "last") in ("1", "true")
        request.content.seek(0)
        size = yield self.server.putFile(jobId, lease, name, offset, request.content, last)
        if last:
            return jsonBody(request, {"name": name, "size": size}, 201)
        return jsonBody(request, {"name": name, "received": size}, 202)

    @app.route("/api/v1/jobs/<int:jobId>/complete", methods=["POST"])
    @workerRoute()
    @defer.inlineCallbacks
    def completeJob(self, request, jobId):
        body = readJSON(request, limit=4 << 20)
        result = body.get("result")
        if result is not None and not isinstance(result, (dict, list, str, int, float)):
            raise APIError(400, "'result' must be JSON")
        for field in ("error", "trace", "confinement"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise APIError(400, "%r must be a string" % (field,))
        job = yield self.server.complete(jobId, self.lease(body), body.get("status"), result,
                                         body.get("error"), body.get("trace"),
                                         body.get("confinement"), workerFacts=body.get("provenance"))
        return jsonBody(request, self.jobRecord(job))

    @app.route("/api/v1/jobs/<int:jobId>/release", methods=["POST"])
    @workerRoute()
    @defer.inlineCallbacks
    def releaseJob(self, request, jobId):
        body = readJSON(request)
        lost = body.get("lost")
        if lost is not None and not isinstance(lost, str):
            raise APIError(400, "'lost' must be a string saying how the fit was lost")
        job = yield self.server.release(jobId, self.lease(body), lost)
        return jsonBody(request, self.jobRecord(job))

    # ---- operations

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request):
        from reflservd.openapi import document
        return jsonBody(request, document())

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        queue = self.server.queue
        return jsonBody(request, {"status": "ok", "jobs": queue.counts()})

    @app.route("/metrics", methods=["GET"])
    def metricsText(self, request):
        if self.metrics is None:
            raise APIError(404, "metrics are off")
        body, contentType = self.metrics.render()
        request.setHeader(b"Content-Type", contentType.encode())
        return body


def submitParts(request, maxUpload):
    """The request and files of a ``POST /api/v1/jobs`` (or ``/api/v1/series``) body."""
    parts = formParts(request, maxUpload)
    requestParts = [f for name, _, f in parts if name == "request"]
    if len(requestParts) != 1:
        raise APIError(400, "send exactly one part named 'request' (the job's or series' JSON)")
    jobRequest = limits.parseJSON(requestParts[0].read(), "the 'request' part")
    files = []
    for name, fileName, f in parts:
        if name == "file":
            files.append((checkName(fileName or ""), f))
        elif name != "request":
            raise APIError(400, "unexpected part %r (send 'request' and 'file' parts)" % (name,))
    return jobRequest, files
