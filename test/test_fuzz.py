"""Every operation of ``/api/v1/openapi.json`` fuzzed by schemathesis against a
real ``twistd reflservd`` (issue 8 §6): no answer is a 5xx, and each answer is
one the document names, with the content type and the body it documents (an
error is ``{"error": string}``).

The server has a token that is both its worker token and an admin token, and
every case carries it, so the worker routes and cancel and delete run past
their refusals; no submit limits; it holds a few jobs (one ACTIVE under lease
1), so that generated job ids and leases reach past the 404. ``REFLSERVD_FUZZ_EXAMPLES`` sets the examples per
operation (``make fuzz`` raises it); the default keeps ``make test`` at more
than 1,000 cases in all. Under ``CI`` the hypothesis profile is
derandomized (test/conftest.py): the same cases every run. ``HOSTILE`` holds
the requests that random generation from the document seldom reaches, each
sent to a server of its own.
"""

import json
import math
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from reflservd.openapi import document
from test.conftest import Api, ServerProcess

EXAMPLES = int(os.environ.get("REFLSERVD_FUZZ_EXAMPLES", "80"))
TOKEN = "fuzz-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
OPERATIONS = 20


@pytest.fixture(scope="module")
def fuzzServer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    tokenFile = directory / "token"
    tokenFile.write_text(TOKEN + "\n")
    tokenFile.chmod(0o600)
    process = ServerProcess(directory / "server", tokenFile=str(tokenFile), args=[
        "--admin-token-file", str(tokenFile), "--submits-per-minute", "0", "--max-pending", "0"]).start()
    api = Api(process.url, token=TOKEN)
    request = {"name": "fuzzed", "notify": "fuzz@example.org", "service": "refl1d",
               "data": {"model": "model.py", "options": {"fit": "lm"}}}
    jobs = [api.submit(dict(request, queue="q"), {"model.py": b"x = 1\n"}) for _ in range(4)]
    lease = api.ok("POST", "/api/v1/queues/q/lease")
    assert lease["lease"] == 1 and lease["id"] == jobs[0]["id"]
    api.ok("POST", "/api/v1/series", body={"job": {"name": "fuzzed series", "notify": "", "service": "count",
                                                   "data": 0, "queue": "q"}, "members": [{}, {}]})
    yield process
    process.stop(timeout=30)


schema = schemathesis.openapi.from_dict(document())
"""The document the server serves (test_theServedDocumentIsTheOneFuzzed): read
here, at collection, so that each operation is a test of its own."""


def shortWait(case):
    """A long-poll's ``timeout`` brought down to none, so that a thousand
    cases take seconds; what does not read as a number is left to be refused."""
    query = case.query or {}
    raw = query.get("timeout")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return
    if value > 0 and not math.isnan(value):
        query["timeout"] = "0"


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_everyOperationAnswersAsDocumentedAndNeverWith5xx(case, fuzzServer):
    shortWait(case)
    case.call_and_validate(base_url=fuzzServer.url, headers={"Authorization": "Bearer " + TOKEN},
                           checks=CHECKS, timeout=30)


def test_theServedDocumentIsTheOneFuzzedWithAThousandCases(fuzzServer):
    """The server serves the document fuzzed here, every operation of it is
    fuzzed, and the examples per operation add up to at least 1,000 cases."""
    assert Api(fuzzServer.url).ok("GET", "/api/v1/openapi.json") == document()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == OPERATIONS
    assert EXAMPLES * len(operations) >= 1000


DEEP = b"[" * 100_000


def _multipart(requestPart, fileName=b"model.py"):
    boundary = b"hostile-boundary-3c1d"
    body = (b'--%s\r\nContent-Disposition: form-data; name="request"\r\n\r\n%s\r\n'
            b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\nx = 1\r\n'
            b"--%s--\r\n" % (boundary, requestPart, boundary, fileName, boundary))
    return body, "multipart/form-data; boundary=" + boundary.decode()


_JOB = {"name": "hostile", "notify": "h@example.org", "queue": "empty"}
HOSTILE = {
    # What random generation from the document seldom reaches.
    "deep JSON heartbeat": ("POST", "/api/v1/jobs/1/heartbeat", DEEP, "application/json"),
    "deep JSON complete": ("POST", "/api/v1/jobs/1/complete", DEEP, "application/json"),
    "deep JSON release": ("POST", "/api/v1/jobs/1/release", DEEP, "application/json"),
    "deep JSON lease": ("POST", "/api/v1/queues/empty/lease", DEEP, "application/json"),
    "deep JSON legacy submit": ("POST", "/jobs.json", DEEP, "application/json"),
    "deep JSON request part": ("POST", "/api/v1/jobs") + _multipart(DEEP),
    "lone surrogate in an inline file name": (
        "POST", "/jobs.json", json.dumps(dict(_JOB, data={"files": {"\ud800.py": "x"}})).encode(),
        "application/json"),
    "lone surrogate in an uploaded file name": ("POST", "/api/v1/jobs") + _multipart(
        json.dumps(_JOB).encode(), b"\xed\xa0\x80.py"),
    "lone surrogate in the job name": ("POST", "/api/v1/jobs") + _multipart(
        json.dumps(dict(_JOB, name="\ud800")).encode()),
    "timeout=nan on an empty queue": ("POST", "/api/v1/queues/empty/lease?timeout=nan", b"", None),
    "timeout=nan on events": ("GET", "/api/v1/jobs/1/events?after=1000&timeout=nan", None, None),
    "a method no route takes": ("DELETE", "/api/v1/jobs", None, None),
    "a path that is not UTF-8": ("GET", "/api/v1/jobs/1/files/%ED%A0%80", None, None),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostileRequestsAreRefusedWithAJSON4xx(name, serverProcess):
    """Each request of ``HOSTILE`` is answered below 500, a refusal with
    ``{"error": string}``, within a bound; and the server still answers
    ``/healthz`` after it. Each runs on a server of its own, holding job 1
    ACTIVE under lease 1 and nothing pending."""
    method, path, body, contentType = HOSTILE[name]
    server = serverProcess()
    api = Api(server.url, timeout=20)
    api.submit(dict(_JOB, queue="q"), {"model.py": b"x = 1\n"})
    assert api.ok("POST", "/api/v1/queues/q/lease")["lease"] == 1     # job 1 ACTIVE, none pending
    status, answer = api.call(method, path, data=body,
                              headers={"Content-Type": contentType} if contentType else {})
    assert status < 500, (status, answer)
    if status >= 400:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), (status, answer)
    assert api.ok("GET", "/healthz")["status"] == "ok"
