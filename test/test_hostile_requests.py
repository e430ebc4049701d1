"""The server under hostile requests (issue 8), against a real ``twistd
reflservd`` on loopback: each attack gets a clear 4xx that names the limit or
the rule, and changes nothing: the journal verifies and replays, the other
clients' work is there, and a restart comes back to the same state.

One server with worker tokens per queue and an admin token serves the module;
the tests that need other options start their own.
"""

import http.client
import json
import os
import subprocess
import sys
import uuid

import pytest

from test.conftest import TWISTD, ROOT, ServerProcess, childEnvironment, freePort
from test.support import FakeWorker

JOURNAL = [sys.executable, "-m", "reflservd.journalctl"]
QUEUE_A, QUEUE_B, ADMIN = "token-of-queue-a", "token-of-queue-b", "admin-token"


def secret(path, text):
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    workers = secret(directory / "workers", "a %s\nb %s\n" % (QUEUE_A, QUEUE_B))
    admins = secret(directory / "admins", "ops %s\n" % (ADMIN,))
    process = ServerProcess(directory, args=["--worker-token-file", str(workers),
                                             "--admin-token-file", str(admins)]).start()
    yield process
    process.stop(timeout=30)


def send(server, method, path, body=b"", headers=None, source="127.0.0.1", timeout=30):
    """``(status, headers, decoded JSON or bytes)`` of one request from ``source``
    (any address of 127/8), the headers exactly as given (Host included)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        given = {"Host": "127.0.0.1:%d" % (server.port,)}
        given.update(headers or {})
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in given.items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        raw = response.read()
        if response.getheader("Content-Type", "").startswith("application/json") and raw:
            raw = json.loads(raw)
        return response.status, response, raw
    finally:
        conn.close()


def sendJSON(server, method, path, value, headers=None, **kwargs):
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return send(server, method, path, body, dict({"Content-Type": "application/json"},
                                                   **(headers or {})), **kwargs)


def multipart(request, files=(), requestBytes=None):
    boundary = uuid.uuid4().hex
    parts = [b'--%s\r\nContent-Disposition: form-data; name="request"\r\n\r\n%s\r\n'
             % (boundary.encode(), requestBytes or json.dumps(request).encode())]
    for name, content in files:
        parts.append(b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n%s\r\n'
                     % (boundary.encode(), name, content))
    parts.append(b"--%s--\r\n" % (boundary.encode(),))
    return b"".join(parts), "multipart/form-data; boundary=" + boundary


def submitForm(server, request, files=(), headers=None, requestBytes=None, **kwargs):
    body, ctype = multipart(request, files, requestBytes)
    given = {"Content-Type": ctype, "X-Requested-With": "test"}
    given.update(headers or {})
    return send(server, "POST", "/api/v1/jobs", body, given, **kwargs)


def job(name="j", notify="", **extra):
    return dict({"name": name, "notify": notify, "service": "count", "version": "1", "data": 2},
                **extra)


def state(server):
    """What must not change: every job's id and status, and the counts."""
    _, _, listing = send(server, "GET", "/api/v1/jobs?limit=1000")
    return sorted((j["id"], j["status"]) for j in listing["jobs"])


def verify(server):
    done = subprocess.run(JOURNAL + [server.stateDir, "verify"], capture_output=True, text=True,
                          env=childEnvironment(), cwd=ROOT, timeout=120)
    return done.returncode, done.stdout + done.stderr


def worker(server, queue, token):
    fake = FakeWorker(server.url, queue=queue)
    base = fake._send

    def send_(method, path, body=None, contentType="application/json"):
        import urllib.request
        data = json.dumps(body).encode() if contentType == "application/json" and body is not None else body
        request = urllib.request.Request(server.url + path, data=data, method=method, headers={
            "Content-Type": contentType, "Authorization": "Bearer " + token})
        with urllib.request.urlopen(request, timeout=90) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)

    fake._send = send_
    del base
    return fake


# ---- 1. state that cannot be poisoned


def test_a_change_the_journal_cannot_hold_is_refused_and_changes_nothing(hostile):
    """Tens of thousands of inline files are refused by the files-per-job
    limit before they are decoded; results posted by the old worker that make
    a record over the journal's frame limit are refused with 413 naming it,
    the job stays ACTIVE, a cancel of it is journaled, and the journal
    verifies and replays on a restart."""
    before = state(hostile)
    inline = {"f%05d.dat" % i: "1" for i in range(20_000)}
    code, _, body = sendJSON(hostile, "POST", "/jobs.json", job(data={"files": inline}))
    assert code == 413 and "at most 200 files" in body["error"]
    assert state(hostile) == before
    code, _, submitted = sendJSON(hostile, "POST", "/jobs.json", job("legacy"))
    assert code == 200
    jobId = submitted["id"]
    code, _, leased = sendJSON(hostile, "POST", "/jobs/nextjob.json", {"queue": "a"},
                               {"Authorization": "Bearer " + QUEUE_A})
    assert (code, leased["id"]) == (200, jobId)
    boundary = uuid.uuid4().hex
    results = json.dumps({"status": "COMPLETE", "result": "x" * (9 << 20)}).encode()
    body = (b'--%s\r\nContent-Disposition: form-data; name="results"\r\n\r\n%s\r\n--%s--\r\n'
            % (boundary.encode(), results, boundary.encode()))
    code, _, answer = send(hostile, "POST", "/jobs/%d/postjob" % (jobId,), body, {
        "Content-Type": "multipart/form-data; boundary=" + boundary,
        "Authorization": "Bearer " + QUEUE_A})
    assert code == 413 and "journal record" in answer["error"]
    assert send(hostile, "GET", "/jobs/%d/status.json" % (jobId,))[2]["status"] == "ACTIVE"
    code, _, cancelled = sendJSON(hostile, "POST", "/api/v1/jobs/%d/cancel" % (jobId,), {},
                                  {"X-Job-Key": submitted["key"]})
    assert (code, cancelled["status"]) == (200, "CANCEL")
    expected = state(hostile)
    assert verify(hostile)[0] == 0
    hostile.restart()
    assert state(hostile) == expected


@pytest.mark.parametrize("route", ["/jobs.json", "/api/v1/jobs", "heartbeat", "complete"])
def test_deep_json_is_a_400_naming_the_depth(hostile, route):
    """A body of 100,000 ``[`` (and one 40 levels deep inside a request) is a
    400 naming the nesting limit on every route that reads JSON, never a 500."""
    before = state(hostile)
    deep = b"[" * 100_000
    nested = json.dumps(job(data=json.loads("[" * 40 + "]" * 40))).encode()
    for payload in (deep, nested):
        if route == "/jobs.json":
            code, _, body = sendJSON(hostile, "POST", route, payload)
        elif route == "/api/v1/jobs":
            code, _, body = submitForm(hostile, None, requestBytes=payload)
        else:
            code, _, body = sendJSON(hostile, "POST", "/api/v1/jobs/1/%s" % (route,), payload,
                                     {"Authorization": "Bearer " + QUEUE_A})
            if code == 404:     # no job 1 held: the body is read first all the same
                continue
        assert code == 400 and "nested deeper than 32" in body["error"], body
    assert state(hostile) == before


def test_text_that_cannot_be_encoded_is_refused_at_the_door(hostile):
    """A lone surrogate in a file name, a notify address, a name or deep in
    the data is refused with 400 before anything is written; another
    client's submit meanwhile is acknowledged and kept."""
    before = state(hostile)
    for request in (job(data={"files": {"a\ud800": "x"}}), job(notify="\udfff@x"),
                    job(name="n\ud800"), job(data={"model": {"deep": ["\ud800"]}})):
        code, _, body = sendJSON(hostile, "POST", "/jobs.json",
                                 json.dumps(request).encode())
        assert code == 400 and "surrogate" in body["error"], body
    code, _, body = submitForm(hostile, job(), files=[(b"a\xed\xa0\x80", b"x")])
    assert code == 400
    code, _, other = sendJSON(hostile, "POST", "/jobs.json", job("innocent"), source="127.0.0.9")
    assert code == 200
    assert state(hostile) == sorted(before + [(other["id"], "PENDING")])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_a_long_poll_timeout_must_be_finite(hostile, value):
    for path in ("/api/v1/queues/a/lease?timeout=" + value, "/api/v1/jobs/1/events?timeout=" + value):
        code, _, body = send(hostile, "POST" if "lease" in path else "GET", path,
                             headers={"Authorization": "Bearer " + QUEUE_A})
        assert code == 400 and "finite" in body["error"]


def test_errors_on_api_routes_are_json_405_included(hostile):
    code, response, body = send(hostile, "GET", "/api/v1/jobs/1/cancel")
    assert code == 405 and "not allowed" in body["error"]
    assert response.getheader("Allow") == "POST"
    code, _, body = send(hostile, "PATCH", "/jobs.json")
    assert code == 405 and isinstance(body, dict)


# ---- 3. who may act on a job


def test_a_job_belongs_to_its_key_holder(hostile):
    """Cancel and delete need the job's key or an admin token; the notify
    address shows only to them; the old client's delete works from the
    submitting address only."""
    code, _, submitted = submitForm(hostile, job("mine", notify="ann@example.org"))
    jobId, key = submitted["id"], submitted["key"]
    assert submitted["notify"] == "ann@example.org"
    for method, path in (("POST", "/api/v1/jobs/%d/cancel"), ("DELETE", "/api/v1/jobs/%d")):
        code, _, body = sendJSON(hostile, method, path % (jobId,), {})
        assert code == 403 and "key" in body["error"]
        code, _, body = sendJSON(hostile, method, path % (jobId,), {}, {"X-Job-Key": "wrong"})
        assert code == 403
    record = send(hostile, "GET", "/api/v1/jobs/%d" % (jobId,))[2]
    assert record["status"] == "PENDING" and record["notify"] is None
    assert record["request"]["notify"] is None
    listed = send(hostile, "GET", "/api/v1/jobs?limit=1000")[2]["jobs"]
    assert all(j["notify"] is None for j in listed)
    owned = send(hostile, "GET", "/api/v1/jobs/%d" % (jobId,), headers={"X-Job-Key": key})[2]
    assert owned["notify"] == "ann@example.org"
    code, _, body = sendJSON(hostile, "POST", "/api/v1/jobs/%d/cancel" % (jobId,), {},
                             {"X-Job-Key": key})
    assert (code, body["status"]) == (200, "CANCEL")
    code, _, other = submitForm(hostile, job("theirs"))
    code, _, body = send(hostile, "DELETE", "/api/v1/jobs/%d" % (other["id"],),
                         headers={"Authorization": "Bearer " + ADMIN})
    assert code == 200
    code, _, legacy = sendJSON(hostile, "POST", "/jobs.json", job("old client"), source="127.0.0.3")
    code, _, body = send(hostile, "DELETE", "/jobs/%d.json" % (legacy["id"],), source="127.0.0.4")
    assert code == 403
    code, _, body = send(hostile, "DELETE", "/jobs/%d.json" % (legacy["id"],), source="127.0.0.3")
    assert code == 200 and legacy["id"] not in body["jobs"]


def test_worker_routes_need_the_token_of_the_jobs_queue(hostile):
    """A queue's token leases only from that queue and acts only on that
    queue's jobs; no token is a 401; the legacy nextjob follows the same rule."""
    code, _, submitted = submitForm(hostile, job("for a"))
    code, _, body = send(hostile, "POST", "/api/v1/queues/a/lease?timeout=0")
    assert code == 401
    code, _, body = send(hostile, "POST", "/api/v1/queues/a/lease?timeout=0",
                         headers={"Authorization": "Bearer " + QUEUE_B})
    assert code == 403 and "'b'" in body["error"]
    code, _, body = sendJSON(hostile, "POST", "/jobs/nextjob.json", {"queue": "a"})
    assert code == 401
    assert send(hostile, "GET", "/api/v1/jobs/%d" % (submitted["id"],))[2]["status"] == "PENDING"
    a = worker(hostile, "a", QUEUE_A)
    a.drain()
    code, _, submitted = submitForm(hostile, job("leased by a"))
    lease = a.lease(timeout=5)
    assert lease["id"] == submitted["id"]
    for route, value in (("heartbeat", {"lease": lease["lease"]}),
                         ("complete", {"lease": lease["lease"], "status": "COMPLETE"})):
        code, _, body = sendJSON(hostile, "POST", "/api/v1/jobs/%d/%s" % (lease["id"], route),
                                 value, {"Authorization": "Bearer " + QUEUE_B})
        assert code == 403
    assert a.complete(lease, "COMPLETE")["status"] == "COMPLETE"


def test_fair_share_counts_who_submitted_not_the_notify_typed(hostile):
    """Fifteen jobs sent with ``notify=victim@…`` from an attacker's address
    do not push back the victim's own job, sent from the victim's address."""
    a = worker(hostile, "a", QUEUE_A)
    a.drain()
    forged = [sendJSON(hostile, "POST", "/jobs.json", job("forged", notify="victim@example.org"),
                       source="127.0.0.66")[2]["id"] for _ in range(15)]
    code, _, victim = sendJSON(hostile, "POST", "/jobs.json", job("own", notify="victim@example.org"),
                               source="127.0.0.77")
    leased = [a.lease(timeout=5)["id"] for _ in range(2)]
    assert leased == [forged[0], victim["id"]]
    a.drain()


def test_cross_site_requests_cannot_change_jobs(hostile):
    """A page of another site cannot submit, cancel or lease: a foreign
    ``Origin``, ``Sec-Fetch-Site: cross-site`` or a plain form without a
    script's header is a 403; nothing is created or cancelled."""
    before = state(hostile)
    body, ctype = multipart(job("forged"))
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {}):
        code, _, answer = send(hostile, "POST", "/api/v1/jobs", body,
                               dict({"Content-Type": ctype}, **headers))
        assert code == 403, (headers, answer)
        code, _, answer = send(hostile, "POST", "/submit", body,
                               dict({"Content-Type": ctype}, **headers))
        assert code == 403, (headers, answer)
    code, _, mine = submitForm(hostile, job("mine"))
    code, _, answer = send(hostile, "POST", "/api/v1/jobs/%d/cancel" % (mine["id"],), b"",
                           {"Origin": "http://evil.example", "X-Job-Key": mine["key"]})
    assert code == 403
    code, _, answer = send(hostile, "POST", "/api/v1/queues/a/lease?timeout=0", b"x=1",
                           {"Content-Type": "application/x-www-form-urlencoded",
                            "Authorization": "Bearer " + QUEUE_A, "Origin": "http://evil.example"})
    assert code == 403
    assert state(hostile) == sorted(before + [(mine["id"], "PENDING")])
    code, _, answer = submitForm(hostile, job("same site"),
                                 headers={"Origin": "http://127.0.0.1:%d" % (hostile.port,)})
    assert code == 201


def test_a_foreign_host_name_is_refused(hostile):
    """DNS rebinding: a page that reaches this loopback server under a name
    of its own sends that name as Host, and gets 421."""
    code, _, body = send(hostile, "GET", "/api/v1/jobs", headers={"Host": "evil.example:80"})
    assert code == 421 and "evil.example" in body["error"]


# ---- 4. progress from workers


def test_progress_is_typed_bounded_and_forgotten_when_the_job_ends(hostile):
    """A heartbeat of 1 MB, progress with fields of the wrong type or
    unknown ones are refused; a finished job keeps its last event only,
    its last progress stays."""
    a = worker(hostile, "a", QUEUE_A)
    a.drain()
    code, _, submitted = submitForm(hostile, job("progress"))
    lease = a.lease(timeout=5)
    path = "/api/v1/jobs/%d/heartbeat" % (lease["id"],)
    auth = {"Authorization": "Bearer " + QUEUE_A}
    for progress, expected in (
            ({"step": 1, "parameters": {"p%d" % i: 1.0 for i in range(100_000)}}, 413),
            ({"step": 1, "parameters": {"p%d" % i: 1.0 for i in range(201)}}, 400),
            ({"step": 1, "parameters": {"x" * 300: 1.0}}, 400),
            ({"step": 1, "elapsed": "an hour"}, 400),
            ({"step": "1"}, 400),
            ({"step": 1, "html": "<script>"}, 400)):
        code, _, body = sendJSON(hostile, "POST", path, {"lease": lease["lease"], "progress": progress},
                                 auth)
        assert code == expected, (progress.keys(), body)
    for step in range(1, 6):
        a.heartbeat(lease, {"step": step, "chisq": 2.0, "parameters": {"d": 10.0 + step},
                            "elapsed": 0.5 * step})
    events = send(hostile, "GET", "/api/v1/jobs/%d/events?after=0" % (lease["id"],))[2]["events"]
    assert [e["progress"]["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5]
    a.complete(lease, "COMPLETE", result={"chisq": 1.0})
    events = send(hostile, "GET", "/api/v1/jobs/%d/events?after=0" % (lease["id"],))[2]["events"]
    assert [(e["type"], e["status"]) for e in events] == [("status", "COMPLETE")]
    record = send(hostile, "GET", "/api/v1/jobs/%d" % (lease["id"],))[2]
    assert record["progress"]["step"] == 5


# ---- limits that need their own server


def test_result_quotas_and_submitter_limits(serverProcess, tmp_path):
    """Result files past the per-job count or bytes are a 413 naming the
    limit and are not stored; a submitter past its submissions a minute or
    its pending jobs gets 429 with Retry-After, while another submitter is
    served."""
    server = serverProcess(args=["--max-result-files", "2", "--max-result-bytes", "1000",
                                 "--submits-per-minute", "3", "--max-pending", "5"])
    fake = FakeWorker(server.url, queue="q")
    sendJSON(server, "POST", "/jobs.json", job("quota"))
    lease = fake.lease(timeout=5)
    put = "/api/v1/jobs/%d/files/%%s?lease=%d&last=1" % (lease["id"], lease["lease"])
    assert send(server, "PUT", put % "a.dat", b"x" * 600)[0] == 201
    assert send(server, "PUT", put % "a.dat", b"x" * 900)[0] == 201    # replaced, not added
    code, _, body = send(server, "PUT", put % "b.dat", b"x" * 200)
    assert code == 413 and "1000 bytes" in body["error"]
    assert send(server, "PUT", put % "b.dat", b"x" * 50)[0] == 201
    code, _, body = send(server, "PUT", put % "c.dat", b"x")
    assert code == 413 and "2 result files" in body["error"]
    files = send(server, "GET", "/api/v1/jobs/%d/files" % (lease["id"],))[2]["files"]
    assert sorted((f["name"], f["size"]) for f in files if f["kind"] == "result") == [
        ("a.dat", 900), ("b.dat", 50)]
    for _ in range(2):
        assert sendJSON(server, "POST", "/jobs.json", job())[0] == 200
    code, response, body = sendJSON(server, "POST", "/jobs.json", job())
    assert code == 429 and "3 submissions a minute" in body["error"]
    assert int(response.getheader("Retry-After")) >= 1
    assert sendJSON(server, "POST", "/jobs.json", job(), source="127.0.0.2")[0] == 200


# ---- the journal: replay and verify agree


def test_a_record_that_does_not_replay_stops_the_start_and_salvage_goes_on(serverProcess):
    """A cancel of a job the journal never recorded (what a record applied
    before it was journaled used to leave): ``verify`` names it with its
    offset and ``--salvage``; the server refuses to start with the same
    words; ``--salvage`` starts from the records before it, keeping the rest
    aside."""
    from reflservd.journalfiles import listJournal, segmentName
    from reflservd.journalframes import encodeRecord
    server = serverProcess()
    kept = sendJSON(server, "POST", "/jobs.json", job("kept"))[2]["id"]
    server.stop()
    journalDir = os.path.join(server.stateDir, "journal")
    segment = os.path.join(journalDir, segmentName(listJournal(journalDir)[0][-1]))
    offset = os.path.getsize(segment)
    with open(segment, "ab") as f:
        f.write(encodeRecord({"type": "cancel", "time": 1.0, "id": 424242}))
    code, report = verify(server)
    assert code == 1
    assert ":%d: a 'cancel' record cannot be applied" % (offset,) in report and "--salvage" in report
    with pytest.raises(RuntimeError) as refused:
        server.start()
    assert ":%d:" % (offset,) in str(refused.value) and "--salvage" in str(refused.value)
    server.args.append("--salvage")
    server.start()
    assert send(server, "GET", "/api/v1/jobs/%d" % (kept,))[2]["status"] == "PENDING"
    assert any(name.endswith(".salvaged-%d" % (offset,)) for name in os.listdir(journalDir))
    assert verify(server)[0] == 0


def test_a_corrupt_byte_in_the_middle_of_the_journal_stops_the_start(serverProcess):
    """Damage with whole records after it is no torn write: the start is
    refused naming the offset and ``verify``; ``--salvage`` starts from the
    records before it."""
    server = serverProcess()
    ids = [sendJSON(server, "POST", "/jobs.json", job("j%d" % i))[2]["id"] for i in range(3)]
    server.stop()
    from reflservd.journalfiles import listJournal, segmentName
    from reflservd.journalframes import iterFrames, scanSegment
    journalDir = os.path.join(server.stateDir, "journal")
    segment = os.path.join(journalDir, segmentName(listJournal(journalDir)[0][-1]))
    with open(segment, "rb") as f:
        data = f.read()
    offsets = [offset for offset, _ in iterFrames(data, scanSegment(data).end)]
    middle = offsets[len(offsets) // 2]
    with open(segment, "r+b") as f:
        f.seek(middle + 20)
        f.write(b"\xff")
    with pytest.raises(RuntimeError) as refused:
        server.start()
    assert ":%d: checksum mismatch" % (middle,) in str(refused.value)
    assert "verify" in str(refused.value) and "--salvage" in str(refused.value)
    server.args.append("--salvage")
    server.start()
    assert send(server, "GET", "/api/v1/jobs/%d" % (ids[0],))[0] == 200


# ---- start-up refusals


def startOnce(tmp_path, *args):
    """Run ``twistd -n reflservd`` that must refuse to start: its exit code and output."""
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "--logfile=-", "reflservd",
                           "--state-dir", str(tmp_path / "state")] + list(args),
                          capture_output=True, text=True, env=childEnvironment(), cwd=str(tmp_path),
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_refuses_to_start_open_to_the_network_or_with_readable_tokens(tmp_path):
    """Listening beyond loopback without worker tokens is refused unless
    ``--open-workers`` says so; a token file others may read is refused."""
    port = freePort()
    code, output = startOnce(tmp_path, "--listen", "tcp:%d" % (port,))
    assert code != 0 and "--open-workers" in output
    readable = tmp_path / "tokens"
    readable.write_text("a token\n")
    readable.chmod(0o644)
    code, output = startOnce(tmp_path, "--worker-token-file", str(readable))
    assert code != 0 and "chmod 600" in output


def test_open_workers_is_said_in_so_many_words():
    from reflservd.tap import Options
    options = Options()
    options.parseOptions(["--listen", "tcp:0", "--open-workers"])
    assert options["access"].workerTokens is None


def test_submitters_behind_a_proxy_and_with_submit_tokens(serverProcess, tmp_path):
    """Behind ``--trusted-proxy`` a submitter is the address the proxy
    forwarded (another client's forged header is not believed); with
    ``--submit-token-file`` submission needs a token, and the token's
    identity is the owner."""
    proxied = serverProcess(args=["--trusted-proxy", "127.0.0.5"])
    code, _, body = sendJSON(proxied, "POST", "/jobs.json", job(),
                             {"X-Forwarded-For": "10.1.1.1, 10.2.2.2"}, source="127.0.0.5")
    assert send(proxied, "GET", "/api/v1/jobs/%d" % (body["id"],))[2]["owner"] == "10.2.2.2"
    code, _, body = sendJSON(proxied, "POST", "/jobs.json", job(),
                             {"X-Forwarded-For": "10.2.2.2"}, source="127.0.0.6")
    assert send(proxied, "GET", "/api/v1/jobs/%d" % (body["id"],))[2]["owner"] == "127.0.0.6"
    tokens = secret(tmp_path / "submitters", "ann ann-secret\n")
    closed = serverProcess(args=["--submit-token-file", str(tokens)])
    code, _, body = submitForm(closed, job())
    assert code == 403 and "submit token" in body["error"]
    code, _, body = sendJSON(closed, "POST", "/jobs.json", job(),
                             {"Authorization": "Bearer wrong"})
    assert code == 403
    assert state(closed) == []
    code, _, body = submitForm(closed, job(), headers={"Authorization": "Bearer ann-secret"})
    assert code == 201 and body["owner"] == "token:ann"
