"""Every operation of ``/api/v1/openapi.json`` fuzzed by schemathesis against a
real ``twistd reflservd`` (issue 8 §6): no answer is a 5xx, and each answer is
one the document names, with the content type and the body it documents (an
error is ``{"error": string}``).

The server has a worker token, so the worker routes run with it; it holds a
few jobs (one ACTIVE under lease 1), so that generated job ids and leases
reach past the 404. ``REFLSERVD_FUZZ_EXAMPLES`` sets the examples per
operation (``make fuzz`` raises it); the default keeps ``make test`` at more
than 1,000 cases in all. Under ``CI`` the hypothesis profile is
derandomized (test/conftest.py): the same cases every run.
"""

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
OPERATIONS = 14


@pytest.fixture(scope="module")
def fuzzServer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    tokenFile = directory / "token"
    tokenFile.write_text(TOKEN + "\n")
    process = ServerProcess(directory / "server", tokenFile=str(tokenFile)).start()
    api = Api(process.url, token=TOKEN)
    request = {"name": "fuzzed", "notify": "fuzz@example.org", "service": "refl1d",
               "data": {"model": "model.py", "options": {"fit": "lm"}}}
    jobs = [api.submit(dict(request, queue="q"), {"model.py": b"x = 1\n"}) for _ in range(4)]
    lease = api.ok("POST", "/api/v1/queues/q/lease")
    assert lease["lease"] == 1 and lease["id"] == jobs[0]["id"]
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
