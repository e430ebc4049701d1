"""The HTTP API of reflservd: /api/v1 and the legacy jobqueue routes.

The routes run on a real server (journal, store, twisted.web on a loopback
port) driven with treq; the refusals that never reach the journal also run
through StubTreq, in memory.
"""

import hashlib
import json
import os
import shutil
import socket
import tempfile

import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet import defer, reactor
from twisted.trial import unittest

from reflservd.metrics import Metrics
from reflservd.server import QueueServer
from reflservd.site import makeSite

NIFILM = """from refl1d.names import *\n"""


SCRIPT = {b"X-Requested-With": [b"test"]}
"""What a script adds to a form POST to show it is no page of another site."""


class ServerCase(unittest.TestCase):
    """A real QueueServer and site on 127.0.0.1, in a fresh state directory."""

    maxUpload = 10_000
    leaseTimeout = 60.0
    access = None

    @defer.inlineCallbacks
    def setUp(self):
        self.stateDir = tempfile.mkdtemp(prefix="reflservd-test-")
        self.addCleanup(shutil.rmtree, self.stateDir, True)
        yield self.startServer()

    @defer.inlineCallbacks
    def startServer(self):
        self.metrics = Metrics()
        self.server = QueueServer(self.stateDir, reactor, leaseTimeout=self.leaseTimeout,
                                  metrics=self.metrics)
        self.server.startService()
        self.site = makeSite(self.server, self.maxUpload, self.access, self.metrics)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % (self.port.getHost().port,)
        from twisted.web.client import HTTPConnectionPool
        self.connections = HTTPConnectionPool(reactor, persistent=False)
        yield defer.succeed(None)

    @defer.inlineCallbacks
    def stopServer(self):
        yield self.port.stopListening()
        yield self.connections.closeCachedConnections()
        yield self.server.stopService()

    def tearDown(self):
        return self.stopServer()

    @defer.inlineCallbacks
    def call(self, method, path, **kwargs):
        """(code, decoded JSON or raw bytes, response)"""
        kwargs.setdefault("timeout", 30)
        response = yield treq.request(method, self.url + path, reactor=reactor,
                                      pool=self.connections, **kwargs)
        body = yield response.content()
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if ctype.startswith(b"application/json") and body:
            body = json.loads(body)
        return response.code, body, response

    def submit(self, name="fit", notify="ann@example.org", files=None, service="refl1d",
               options=None):
        request = {"name": name, "notify": notify, "service": service, "version": "1",
                   "data": {"model": "model.py", "options": options or {"fit": "lm"}}}
        files = files if files is not None else {"model.py": NIFILM.encode()}
        return self.call("POST", "/api/v1/jobs", headers=SCRIPT,
                         data={"request": json.dumps(request)},
                         files=[("file", (name_, "application/octet-stream", content))
                                for name_, content in files.items()])

    def lease(self, queue="cluster", timeout=0):
        return self.call("POST", "/api/v1/queues/%s/lease?timeout=%s" % (queue, timeout))

    def postJSON(self, path, value, method="POST"):
        return self.call(method, path, data=json.dumps(value).encode(),
                         headers={b"Content-Type": [b"application/json"]})


class JobLifeTests(ServerCase):

    @defer.inlineCallbacks
    def test_submit_stores_request_and_files_and_answers_201(self):
        code, job, _ = yield self.submit(files={"model.py": b"print(1)", "a.dat": b"1 2 3"})
        self.assertEqual(code, 201)
        self.assertEqual(job["status"], "PENDING")
        self.assertEqual((job["owner"], job["notify"]), ("127.0.0.1", "ann@example.org"))
        self.assertEqual(job["request"]["data"]["model"], "model.py")
        code, listing, _ = yield self.call("GET", "/api/v1/jobs/%d/files" % job["id"])
        self.assertEqual(sorted((f["name"], f["size"], f["kind"]) for f in listing["files"]),
                         [("a.dat", 5, "upload"), ("model.py", 8, "upload")])
        code, body, response = yield self.call("GET", "/api/v1/jobs/%d/files/a.dat?kind=upload" % job["id"])
        self.assertEqual((code, body), (200, b"1 2 3"))
        self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])

    @defer.inlineCallbacks
    def test_worker_lifecycle_lease_heartbeat_files_complete(self):
        _, job, _ = yield self.submit()
        code, lease, _ = yield self.lease()
        self.assertEqual(code, 200)
        self.assertEqual((lease["id"], lease["lease"], lease["attempts"]), (job["id"], 1, 1))
        self.assertEqual(lease["files"], [["model.py", len(NIFILM)]])
        path = "/api/v1/jobs/%d" % job["id"]
        code, beat, _ = yield self.postJSON(path + "/heartbeat", {"lease": 1, "progress": {"step": 3, "chisq": 2.5}})
        self.assertEqual((code, beat["cancel"]), (200, False))
        code, part, _ = yield self.call("PUT", path + "/files/fit.par?lease=1&offset=0", data=b"Ni ")
        self.assertEqual((code, part["received"]), (202, 3))
        code, whole, _ = yield self.call("PUT", path + "/files/fit.par?lease=1&offset=3&last=1", data=b"100.1\n")
        self.assertEqual((code, whole["size"]), (201, 9))
        code, events, _ = yield self.call("GET", path + "/events?after=0")
        self.assertEqual([(e["type"], e["status"]) for e in events["events"]],
                         [("status", "PENDING"), ("status", "ACTIVE"), ("progress", "ACTIVE")])
        code, done, _ = yield self.postJSON(path + "/complete", {
            "lease": 1, "status": "COMPLETE", "result": {"chisq": 1.01}, "confinement": "namespaces"})
        provenance = done["result"].pop("provenance")
        self.assertEqual((code, done["status"], done["result"]), (200, "COMPLETE", {"chisq": 1.01}))
        self.assertEqual(provenance["inputs"], {"model.py": hashlib.sha256(NIFILM.encode()).hexdigest()})
        self.assertEqual(done["confinement"], "namespaces")
        code, body, _ = yield self.call("GET", path + "/files/fit.par")
        self.assertEqual(body, b"Ni 100.1\n")
        code, events, _ = yield self.call("GET", path + "/events?after=0")
        self.assertEqual([(e["type"], e["status"]) for e in events["events"]],
                         [("status", "COMPLETE")])     # a finished job keeps its last event only
        self.assertEqual(done["progress"]["step"], 3)

    @defer.inlineCallbacks
    def test_stale_lease_gets_409_and_changes_nothing(self):
        _, job, _ = yield self.submit()
        yield self.lease()
        path = "/api/v1/jobs/%d" % job["id"]
        for method, route, kwargs in [
                ("POST", "/heartbeat", {"lease": 7}),
                ("POST", "/complete", {"lease": 7, "status": "COMPLETE"})]:
            code, body, _ = yield self.postJSON(path + route, kwargs)
            self.assertEqual(code, 409, body)
        code, body, _ = yield self.call("PUT", path + "/files/x.par?lease=7&last=1", data=b"x")
        self.assertEqual(code, 409)
        code, after, _ = yield self.call("GET", path)
        self.assertEqual((after["status"], after["result"]), ("ACTIVE", None))
        code, files, _ = yield self.call("GET", path + "/files")
        self.assertEqual([f for f in files["files"] if f["kind"] == "result"], [])

    @defer.inlineCallbacks
    def test_cancel_pending_and_active(self):
        _, first, _ = yield self.submit()
        _, second, _ = yield self.submit()
        yield self.lease()
        code, cancelled, _ = yield self.call("POST", "/api/v1/jobs/%d/cancel" % second["id"],
                                             headers={b"X-Job-Key": [second["key"].encode()]})
        self.assertEqual(cancelled["status"], "CANCEL")
        code, active, _ = yield self.call("POST", "/api/v1/jobs/%d/cancel" % first["id"],
                                          headers={b"X-Job-Key": [first["key"].encode()]})
        self.assertEqual((active["status"], active["cancelRequested"]), ("CANCEL", True))
        code, beat, _ = yield self.postJSON("/api/v1/jobs/%d/heartbeat" % first["id"], {"lease": 1})
        self.assertTrue(beat["cancel"])
        code, body, _ = yield self.lease()
        self.assertEqual(code, 204)

    @defer.inlineCallbacks
    def test_delete_removes_files_and_job(self):
        _, job, _ = yield self.submit()
        code, body, _ = yield self.call("DELETE", "/api/v1/jobs/%d" % job["id"],
                                        headers={b"X-Job-Key": [job["key"].encode()]})
        self.assertEqual((code, body), (200, {"deleted": job["id"]}))
        self.assertFalse(os.path.exists(self.server.store.jobDir(job["id"])))
        code, body, _ = yield self.call("GET", "/api/v1/jobs/%d" % job["id"])
        self.assertEqual(code, 404)
        code, body, _ = yield self.lease()
        self.assertEqual(code, 204)

    @defer.inlineCallbacks
    def test_list_filters_and_pages_newest_first(self):
        for i in range(5):
            yield self.submit(name="j%d" % i, notify="a@x" if i % 2 else "b@x")
        code, page, _ = yield self.call("GET", "/api/v1/jobs?owner=127.0.0.1&limit=1&offset=1")
        self.assertEqual(page["total"], 5)
        self.assertEqual([j["name"] for j in page["jobs"]], ["j3"])
        code, page, _ = yield self.call("GET", "/api/v1/jobs?status=pending")
        self.assertEqual([j["name"] for j in page["jobs"]], ["j4", "j3", "j2", "j1", "j0"])

    @defer.inlineCallbacks
    def test_restart_keeps_every_acknowledged_job(self):
        _, job, _ = yield self.submit()
        yield self.lease()
        yield self.postJSON("/api/v1/jobs/%d/complete" % job["id"],
                            {"lease": 1, "status": "ERROR", "error": "bad model"})
        _, other, _ = yield self.submit(name="second")
        yield self.stopServer()
        yield self.startServer()
        code, first, _ = yield self.call("GET", "/api/v1/jobs/%d" % job["id"])
        self.assertEqual((first["status"], first["error"]), ("ERROR", "bad model"))
        code, lease, _ = yield self.lease()
        self.assertEqual(lease["id"], other["id"])

    @defer.inlineCallbacks
    def test_metrics_count_submits_and_jobs_by_state(self):
        yield self.submit()
        code, body, _ = yield self.call("GET", "/metrics")
        text = body.decode()
        self.assertIn("reflservd_submits_total 1.0", text)
        self.assertIn('reflservd_jobs{state="PENDING"} 1.0', text)
        self.assertIn("reflservd_journal_fsync_seconds_count", text)


class RefusalTests(ServerCase):

    @defer.inlineCallbacks
    def test_bad_input_gets_clear_4xx_and_changes_nothing(self):
        cases = [
            (self.call("POST", "/api/v1/jobs", data=b"{}", headers={b"Content-Type": [b"application/json"]}), 415),
            (self.call("POST", "/api/v1/jobs", data={"request": "{not json"}, headers=SCRIPT), 400),
            (self.call("POST", "/api/v1/jobs", data={"request": json.dumps({"name": "x"})},
                       headers=SCRIPT), 400),
            (self.submit(files={"../evil": b"x"}), 400),
            (self.submit(files={"a\x01b": b"x"}), 400),
            (self.submit(files={"x" * 256: b"x"}), 400),
            (self.call("GET", "/api/v1/jobs/999"), 404),
            (self.call("POST", "/api/v1/queues/bad%20name/lease"), 400),
            (self.postJSON("/api/v1/jobs/1/heartbeat", {"lease": 1}), 404),
            (self.call("POST", "/jobs.json", data=b"name=x", headers={b"Content-Type": [b"application/x-www-form-urlencoded"]}), 415),
            (self.call("POST", "/jobs.json", data=b"{oops", headers={b"Content-Type": [b"application/json"]}), 400),
            (self.postJSON("/jobs.json", {"name": "x", "notify": "", "service": "fitter",
                                          "data": "cpickle\n..."}), 400),
        ]
        for pending, expected in cases:
            code, body, _ = yield pending
            self.assertEqual(code, expected, body)
            self.assertIsInstance(body["error"], str)
        self.assertEqual(self.server.queue.jobs, {})
        self.assertEqual(os.listdir(self.server.store.root), [])

    @defer.inlineCallbacks
    def test_pickled_fitter_request_says_why(self):
        code, body, _ = yield self.postJSON("/jobs.json", {"name": "x", "notify": "", "service": "fitter"})
        self.assertEqual(code, 400)
        self.assertIn("unpickl", body["error"])

    @defer.inlineCallbacks
    def test_oversized_body_refused_before_it_is_read(self):
        """The 413 comes on the headers alone: the server answers and closes
        although the client has sent none of the body."""
        host, port = "127.0.0.1", self.port.getHost().port
        def exchange():
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 999999999\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return data
                    data += chunk

        from twisted.internet import threads
        answer = yield threads.deferToThread(exchange)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer)
        self.assertIn(b"at most", answer)

    @defer.inlineCallbacks
    def test_body_over_the_limit_without_length_refused(self):
        big = b"x" * (self.maxUpload + 2_000_000)
        code, body, _ = yield self.submit(files={"big.bin": big})
        self.assertEqual(code, 413)


class StubTreqTests(unittest.TestCase):
    """The refusals in memory: no socket, no journal write."""

    def setUp(self):
        stateDir = tempfile.mkdtemp(prefix="reflservd-test-")
        self.addCleanup(shutil.rmtree, stateDir, True)
        self.server = QueueServer(stateDir, reactor)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        self.stub = StubTreq(makeSite(self.server, 1000).resource)

    @defer.inlineCallbacks
    def test_unknown_job_and_unknown_route_answer_json_404(self):
        for path in ("/api/v1/jobs/5", "/no/such/thing", "/jobs/5.json"):
            response = yield self.stub.get("http://x" + path)
            self.assertEqual(response.code, 404)
            body = yield response.json()
            self.assertIn("error", body)

    @defer.inlineCallbacks
    def test_each_face_answers_its_routes_and_the_site_the_rest(self):
        """One map of every face's routes picks the face: the API, the legacy
        routes and the pages each answer theirs; a method no face takes on a
        path is a JSON 405 whose Allow lists what the faces take there (the
        legacy GET and DELETE of /jobs/1.json); a missing trailing slash is
        left to the face that has the route."""
        for path, code, kind in (("/healthz", 200, "application/json"),
                                 ("/jobs.json", 200, "application/json"),
                                 ("/submit", 200, "text/html")):
            response = yield self.stub.get("http://x" + path)
            self.assertEqual((response.code, response.headers.getRawHeaders("content-type")[0][:len(kind)]),
                             (code, kind), path)
            yield response.content()
        response = yield self.stub.put("http://x/jobs/1.json", data=b"")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["DELETE, GET, HEAD"])
        self.assertIn("not allowed", (yield response.json())["error"])
        response = yield self.stub.post("http://x/api/v1/jobs/1", data=b"")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["DELETE, GET, HEAD"])
        yield response.content()

    @defer.inlineCallbacks
    def test_a_path_that_is_not_utf8_answers_json_400(self):
        """A lone surrogate (or any bytes that are not UTF-8) percent-encoded in
        the path is refused as every bad request is: 400 with a JSON error."""
        for path in ("/api/v1/jobs/1/files/%ED%A0%80", "/jobs/%FF.json", "/%C3"):
            response = yield self.stub.get("http://x" + path)
            self.assertEqual(response.code, 400, path)
            body = yield response.json()
            self.assertEqual(body, {"error": "the URL path is not UTF-8"})

    @defer.inlineCallbacks
    def test_legacy_status_of_unknown_id_is_200_unknown(self):
        response = yield self.stub.get("http://x/jobs/41/status.json")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"id": 41, "status": "UNKNOWN"})

    @defer.inlineCallbacks
    def test_legacy_pickle_format_is_not_offered(self):
        response = yield self.stub.get("http://x/jobs.pickle")
        self.assertEqual(response.code, 404)
        self.assertIn("never pickle", (yield response.json())["error"])

    @defer.inlineCallbacks
    def test_openapi_document_matches_the_routes(self):
        response = yield self.stub.get("http://x/api/v1/openapi.json")
        document = yield response.json()
        documented = {(path, method.upper()) for path, ops in document["paths"].items()
                      for method in ops}
        routes = set()
        from reflservd.api import JobAPI
        from reflservd.seriesapi import SeriesAPI
        for rule in list(JobAPI.app.url_map.iter_rules()) + list(SeriesAPI.app.url_map.iter_rules()):
            if not rule.rule.startswith("/api/v1"):
                continue
            path = rule.rule
            for converter in ("int:", "string:"):
                path = path.replace("<" + converter, "<")
            path = path.replace("<", "{").replace(">", "}")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((path, method))
        self.assertEqual(documented, routes)


class LongPollTests(unittest.TestCase):
    """The lease long-poll through the whole HTTP stack in memory (StubTreq),
    on a Clock: its waiter is counted by the server itself."""

    def setUp(self):
        from test.test_server import makeServer
        stateDir = tempfile.mkdtemp(prefix="reflservd-test-")
        self.addCleanup(shutil.rmtree, stateDir, True)
        self.clock = Clock()
        self.server = makeServer(stateDir, self.clock)
        self.addCleanup(self.server.stopService)
        self.stub = StubTreq(makeSite(self.server, 10_000).resource)

    def lease(self, timeout):
        """The long-poll's Deferred, and a list that gets its response."""
        d = self.stub.post("http://127.0.0.1/api/v1/queues/cluster/lease?timeout=%s" % (timeout,))
        answered = []
        d.addCallback(lambda response: answered.append(response) or response)
        return d, answered

    @defer.inlineCallbacks
    def test_waiting_lease_answers_the_moment_a_job_is_submitted(self):
        waiting, answered = self.lease(30)
        self.assertEqual(self.server.waitingLeases(), 1)
        self.assertEqual(answered, [])
        request = {"name": "fit", "notify": "ann@example.org", "service": "count", "data": 1}
        submitted = yield self.stub.post("http://127.0.0.1/api/v1/jobs", headers=SCRIPT,
                                         data={"request": json.dumps(request)})
        job = yield submitted.json()
        self.assertEqual(submitted.code, 201)
        self.stub.flush()
        self.assertEqual(len(answered), 1)
        response = yield waiting
        lease = yield response.json()
        self.assertEqual((response.code, lease["id"]), (200, job["id"]))
        self.assertEqual(self.server.waitingLeases(), 0)

    @defer.inlineCallbacks
    def test_lease_long_poll_answers_204_when_time_is_up(self):
        waiting, answered = self.lease(30)
        self.clock.advance(29.9)
        self.stub.flush()
        self.assertEqual(answered, [])
        self.assertEqual(self.server.waitingLeases(), 1)
        self.clock.advance(0.1)
        self.stub.flush()
        response = yield waiting
        self.assertEqual((response.code, (yield response.content())), (204, b""))
        self.assertEqual(self.server.waitingLeases(), 0)
