"""The ``/api/v1`` routes (docs/api.md), ``/healthz`` and ``/metrics``."""

import hmac
import json
import os

from twisted.internet import defer
from twisted.logger import Logger

from reflservd.server import MAX_LONG_POLL
from reflservd.store import checkName
from reflservd.web import APIError, Routes, downloadable, formParts, jsonBody, readJSON

app = Routes.app
MAX_PAGE = 1000
CHECKPOINT = "session.h5"
"""The result file a worker sends as a fit's checkpoint; named in the lease answer
of a later attempt of the same job, so that its worker resumes from it."""


class JobAPI(Routes):
    """The JSON API for users and workers."""

    _log = Logger()

    def __init__(self, server, maxUpload=200 * 1024 * 1024, workerToken=None, metrics=None):
        self.server = server
        self.maxUpload = maxUpload
        self.workerToken = workerToken
        self.metrics = metrics

    # ---- helpers

    def jobRecord(self, job, request=None):
        """The job's record; with its request when ``request`` is given (the
        stored request, or True to read it from the store)."""
        record = job.toJSON()
        if request is True:
            request = self.server.readRequest(job.id)
        if request is not None:
            record["request"] = request
        return record

    def checkWorker(self, request):
        if self.workerToken is None:
            return
        given = (request.getHeader(b"authorization") or b"").decode("latin-1")
        if not hmac.compare_digest(given.encode(), ("Bearer " + self.workerToken).encode()):
            raise APIError(401, "worker routes need 'Authorization: Bearer TOKEN' with this site's worker token")

    @staticmethod
    def intArg(request, name, default, low=None, high=None):
        raw = request.args.get(name.encode())
        if not raw:
            return default
        try:
            value = float(raw[0]) if name == "timeout" else int(raw[0])
        except ValueError:
            raise APIError(400, "%s must be a number, not %r" % (name, raw[0].decode("latin-1")))
        if low is not None and value < low:
            raise APIError(400, "%s must be at least %s" % (name, low))
        return min(value, high) if high is not None else value

    @staticmethod
    def strArg(request, name):
        raw = request.args.get(name.encode())
        return raw[0].decode("utf-8", "replace") if raw else None

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
        parts = formParts(request, self.maxUpload)
        requestParts = [f for name, _, f in parts if name == "request"]
        if len(requestParts) != 1:
            raise APIError(400, "send exactly one part named 'request' (the job's JSON)")
        try:
            jobRequest = json.loads(requestParts[0].read())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, "the 'request' part is not valid JSON: %s" % (e,))
        files = []
        for name, fileName, f in parts:
            if name == "file":
                files.append((checkName(fileName or ""), f))
            elif name != "request":
                raise APIError(400, "unexpected part %r (send 'request' and 'file' parts)" % (name,))
        job = yield self.server.submit(jobRequest, files, _origin(request))
        return jsonBody(request, self.jobRecord(job, request=jobRequest), 201)

    @app.route("/api/v1/jobs", methods=["GET"])
    def listJobs(self, request):
        status = self.strArg(request, "status")
        owner = self.strArg(request, "owner")
        queueName = self.strArg(request, "queue")
        limit = self.intArg(request, "limit", 100, 1, MAX_PAGE)
        offset = self.intArg(request, "offset", 0, 0)
        jobs = selectJobs(self.server.queue, status, owner, queueName)
        return jsonBody(request, {"jobs": [j.toJSON() for j in jobs[offset:offset + limit]],
                                  "total": len(jobs), "offset": offset, "limit": limit})

    @app.route("/api/v1/jobs/<int:jobId>", methods=["GET"])
    def getJob(self, request, jobId):
        return jsonBody(request, self.jobRecord(self.server.queue.get(jobId), request=True))

    @app.route("/api/v1/jobs/<int:jobId>/cancel", methods=["POST"])
    @defer.inlineCallbacks
    def cancelJob(self, request, jobId):
        job = yield self.server.cancel(jobId)
        return jsonBody(request, self.jobRecord(job))

    @app.route("/api/v1/jobs/<int:jobId>", methods=["DELETE"])
    @defer.inlineCallbacks
    def deleteJob(self, request, jobId):
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
        self.checkWorker(request)
        timeout = self.intArg(request, "timeout", 0.0, 0, MAX_LONG_POLL)
        body = readJSON(request, required=False)
        worker = body.get("worker") if isinstance(body.get("worker"), str) else _origin(request)
        job = yield self.server.lease(queueName, worker, timeout)
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
        if attempts >= 2 and any(n == CHECKPOINT for n, _ in store.files(jobId, "result")):
            files["checkpoint"] = CHECKPOINT
        return files

    @app.route("/api/v1/jobs/<int:jobId>/heartbeat", methods=["POST"])
    def heartbeat(self, request, jobId):
        self.checkWorker(request)
        body = readJSON(request)
        progress = body.get("progress")
        if progress is not None and not isinstance(progress, dict):
            raise APIError(400, "'progress' must be an object")
        confinement = body.get("confinement")
        if confinement is not None and not isinstance(confinement, str):
            raise APIError(400, "'confinement' must be a string")
        cancel = self.server.heartbeat(jobId, self.lease(body), progress, confinement)
        return jsonBody(request, {"cancel": cancel, "leaseTimeout": self.server.leaseTimeout})

    @app.route("/api/v1/jobs/<int:jobId>/files/<string:name>", methods=["PUT"])
    @defer.inlineCallbacks
    def putFile(self, request, jobId, name):
        self.checkWorker(request)
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
    @defer.inlineCallbacks
    def completeJob(self, request, jobId):
        self.checkWorker(request)
        body = readJSON(request, limit=4 << 20)
        result = body.get("result")
        if result is not None and not isinstance(result, (dict, list, str, int, float)):
            raise APIError(400, "'result' must be JSON")
        for field in ("error", "trace", "confinement"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise APIError(400, "%r must be a string" % (field,))
        job = yield self.server.complete(jobId, self.lease(body), body.get("status"), result,
                                         body.get("error"), body.get("trace"),
                                         body.get("confinement"))
        return jsonBody(request, self.jobRecord(job))

    @app.route("/api/v1/jobs/<int:jobId>/release", methods=["POST"])
    @defer.inlineCallbacks
    def releaseJob(self, request, jobId):
        self.checkWorker(request)
        job = yield self.server.release(jobId, self.lease(readJSON(request)))
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


def selectJobs(queue, status=None, owner=None, queueName=None):
    """The jobs matching the filters, newest first."""
    if status is not None:
        status = status.upper()
    jobs = [job for job in queue.jobs.values()
            if (status is None or job.status == status)
            and (owner is None or job.owner == owner)
            and (queueName is None or job.queue == queueName)]
    jobs.sort(key=lambda job: job.id, reverse=True)
    return jobs


def _origin(request):
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "local"
