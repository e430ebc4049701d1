"""The legacy jobqueue protocol, as the old client and worker speak it
(bumps extra/jobqueue client.py: JSON bodies, multipart postjob with the
worker's full paths as file names)."""

import base64
import json

from twisted.internet import defer

from reflservd import queue as Q
from test.test_api import ServerCase

REQUEST = {"name": "ni", "notify": "ann@example.org", "service": "count", "version": "0.1", "data": 5}


class LegacyTests(ServerCase):

    def legacySubmit(self, request=REQUEST):
        return self.postJSON("/jobs.json", request)

    def postjob(self, jobId, results, files=(), raw=None):
        fields = {"queue": "old", "results": raw if raw is not None else json.dumps(results)}
        return self.call("POST", "/jobs/%d/postjob" % jobId, data=fields,
                         files=[("file", (path, "application/octet-stream", content))
                                for path, content in files] or None)

    @defer.inlineCallbacks
    def test_old_client_and_worker_round_trip(self):
        code, submitted, _ = yield self.legacySubmit()
        self.assertEqual(code, 200)
        jobId = submitted["id"]
        self.assertEqual(submitted["job"], REQUEST)
        self.assertEqual((yield self.call("GET", "/jobs.json"))[1], {"jobs": [jobId]})
        self.assertEqual((yield self.call("GET", "/jobs/pending.json"))[1], {"jobs": [jobId]})
        self.assertEqual((yield self.call("GET", "/jobs/%d.json" % jobId))[1], {"id": jobId, "job": REQUEST})
        self.assertEqual((yield self.call("GET", "/jobs/%d/results.json" % jobId))[1],
                         {"id": jobId, "status": "PENDING"})
        code, nextjob, _ = yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        self.assertEqual((code, nextjob), (200, {"id": jobId, "request": REQUEST}))
        self.assertEqual((yield self.call("GET", "/jobs/%d/status.json" % jobId))[1],
                         {"id": jobId, "status": "ACTIVE"})
        code, answer, _ = yield self.postjob(jobId, {"status": "COMPLETE", "result": 5},
                                             [("/home/worker/tmp/%d/fit.par" % jobId, b"p 1\n"),
                                              ("C:\\work\\out.json", b'{"a": 1}')])
        self.assertEqual((code, answer), (200, {}))
        self.assertEqual((yield self.call("GET", "/jobs/%d/results.json" % jobId))[1],
                         {"id": jobId, "status": "COMPLETE", "result": 5})
        self.assertEqual((yield self.call("GET", "/jobs/%d/data/index.json" % jobId))[1],
                         {"id": jobId, "files": [["fit.par", 4], ["out.json", 8]]})
        code, body, response = yield self.call("GET", "/jobs/%d/data/out.json" % jobId)
        self.assertEqual(body, {"a": 1})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        code, body, _ = yield self.call("DELETE", "/jobs/%d.json" % jobId)
        self.assertEqual((code, body), (200, {"jobs": []}))
        self.assertEqual((yield self.call("GET", "/jobs/%d/status.json" % jobId))[1],
                         {"id": jobId, "status": "UNKNOWN"})

    @defer.inlineCallbacks
    def test_nextjob_with_nothing_pending_is_200_null(self):
        code, body, _ = yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        self.assertEqual((code, body), (200, {"request": None}))

    @defer.inlineCallbacks
    def test_results_refused_unless_job_active_and_held_here(self):
        _, submitted, _ = yield self.legacySubmit()
        jobId = submitted["id"]
        code, body, _ = yield self.postjob(jobId, {"status": "COMPLETE", "result": 1})
        self.assertEqual(code, 409, body)
        _, leased, _ = yield self.lease()  # taken by a new-API worker with a token
        code, body, _ = yield self.postjob(jobId, {"status": "COMPLETE", "result": 1})
        self.assertEqual(code, 409, body)
        self.assertEqual((yield self.call("GET", "/jobs/%d/status.json" % jobId))[1]["status"], "ACTIVE")

    @defer.inlineCallbacks
    def test_results_that_are_not_json_end_error_with_the_raw_text(self):
        _, submitted, _ = yield self.legacySubmit()
        jobId = submitted["id"]
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        code, body, _ = yield self.postjob(jobId, None, raw="Traceback: boom")
        self.assertEqual(code, 200)
        results = (yield self.call("GET", "/jobs/%d/results.json" % jobId))[1]
        self.assertEqual(results, {"id": jobId, "status": "ERROR",
                                   "error": "No results returned from the server",
                                   "trace": "Traceback: boom"})

    @defer.inlineCallbacks
    def test_cancel_shows_to_the_old_worker_as_a_status_change(self):
        _, submitted, _ = yield self.legacySubmit()
        jobId = submitted["id"]
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        yield self.call("POST", "/api/v1/jobs/%d/cancel" % jobId,
                        headers={b"X-Job-Key": [submitted["key"].encode()]})
        self.assertEqual((yield self.call("GET", "/jobs/%d/status.json" % jobId))[1]["status"], "CANCEL")
        code, _, _ = yield self.postjob(jobId, {"status": "CANCEL", "message": "killed"})
        self.assertEqual(code, 200)
        self.assertEqual((yield self.call("GET", "/jobs/%d/results.json" % jobId))[1],
                         {"id": jobId, "status": "CANCEL", "message": "killed"})

    @defer.inlineCallbacks
    def test_deleted_job_is_never_handed_out(self):
        _, submitted, _ = yield self.legacySubmit()
        yield self.call("DELETE", "/jobs/%d.json" % submitted["id"])
        code, body, _ = yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        self.assertEqual(body, {"request": None})

    @defer.inlineCallbacks
    def test_inline_files_are_stored_like_uploads(self):
        request = {"name": "ni", "notify": "", "service": "refl1d", "version": "1",
                   "data": {"model": "model.py", "options": {"fit": "lm"},
                            "files": {"model.py": "print('hi')\n",
                                      "big.bin": {"base64": base64.b64encode(b"\x00\xff").decode()}}}}
        code, submitted, _ = yield self.legacySubmit(request)
        self.assertEqual(code, 200)
        self.assertEqual(submitted["job"]["data"], {"model": "model.py", "options": {"fit": "lm"}})
        code, body, _ = yield self.call("GET", "/api/v1/jobs/%d/files/big.bin?kind=upload" % submitted["id"])
        self.assertEqual(body, b"\x00\xff")
        _, lease, _ = yield self.lease()
        self.assertEqual(lease["files"], [["big.bin", 2], ["model.py", 12]])

    @defer.inlineCallbacks
    def test_reads_never_extend_a_legacy_lease(self):
        """A client polling status.json (even from the worker's host) keeps
        no one's lease alive: only the worker's own nextjob and postjob do."""
        _, submitted, _ = yield self.legacySubmit()
        jobId = submitted["id"]
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        job = self.server.queue.get(jobId)
        job.leaseExpires -= 30
        before = job.leaseExpires
        for path in ("/jobs/%d/status.json", "/jobs/%d/results.json", "/jobs/%d.json"):
            yield self.call("GET", path % jobId)
        self.assertEqual(job.leaseExpires, before)

    @defer.inlineCallbacks
    def test_a_prefetched_job_is_held_while_its_worker_lives_and_comes_back_when_it_dies(self):
        """The old worker runs one job and prefetches the next, reading only
        the first one's status. The prefetched job outlives the ordinary
        lease timeout (it runs once, never twice); when the worker posts the
        first job's results its other legacy leases are renewed; a worker
        that dies lets them go back to the queue after the legacy lease
        timeout."""
        first = (yield self.legacySubmit())[1]["id"]
        second = (yield self.legacySubmit())[1]["id"]
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        queue, server, start = self.server.queue, self.server, self.server._now()
        hours = 3600.0
        self.assertLess(abs(queue.get(second).leaseExpires - start - Q.LEGACY_LEASE_TIMEOUT), 5)
        server._now = lambda: start + 20 * hours     # the first job ran for 20 hours
        code, _, _ = yield self.postjob(first, {"status": "COMPLETE", "result": 1})
        self.assertEqual(code, 200)
        server._now = lambda: start + 30 * hours
        server.expireLeases()
        self.assertEqual(queue.get(second).status, "ACTIVE")    # held, not handed out again
        server._now = lambda: start + 20 * hours + Q.LEGACY_LEASE_TIMEOUT + 1   # the worker died
        server.expireLeases()
        self.assertEqual(queue.get(second).status, "PENDING")

    @defer.inlineCallbacks
    def test_nextjob_without_a_queue_is_a_400_naming_the_field(self):
        yield self.legacySubmit()
        code, body, _ = yield self.postJSON("/jobs/nextjob.json", {})
        self.assertEqual(code, 400)
        self.assertIn("'queue'", body["error"])
        self.assertEqual(self.server.queue.counts()["ACTIVE"], 0)

    @defer.inlineCallbacks
    def test_results_are_what_the_worker_posted_and_unknown_ids_say_unknown(self):
        """An ERROR posted with ``message`` only keeps it; results come back
        as posted (any fields), plus ``id``; an id never seen is UNKNOWN."""
        jobId = (yield self.legacySubmit())[1]["id"]
        yield self.postJSON("/jobs/nextjob.json", {"queue": "old"})
        yield self.postjob(jobId, {"status": "ERROR", "message": "the process died",
                                   "extra": [1, 2]})
        results = (yield self.call("GET", "/jobs/%d/results.json" % jobId))[1]
        self.assertEqual(results, {"id": jobId, "status": "ERROR", "message": "the process died",
                                   "extra": [1, 2]})
        job = (yield self.call("GET", "/api/v1/jobs/%d" % jobId))[1]
        self.assertEqual(job["error"], "the process died")
        self.assertEqual((yield self.call("GET", "/jobs/999/results.json"))[1], {"status": "UNKNOWN"})
