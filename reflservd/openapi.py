"""The OpenAPI 3 document of ``/api/v1`` (``GET /api/v1/openapi.json``).

test_openapi holds it to the routes the Klein app really has.
"""

_JOB = {"$ref": "#/components/schemas/Job"}
_ERROR = {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description, schema=None):
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _op(summary, responses, parameters=(), body=None, tags=("users",)):
    op = {"summary": summary, "tags": list(tags), "responses": dict(responses)}
    for code in ("400", "404", "409", "413", "415", "503"):
        op["responses"].setdefault(code, _ERROR)
    if parameters:
        op["parameters"] = list(parameters)
    if body:
        op["requestBody"] = body
    return op


def _param(name, where="query", kind="string", required=False, description=""):
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": {"type": kind}, "description": description}


_ID = _param("jobId", "path", "integer")
_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
_WORKER = ("workers",)

# (path, method) -> operation
OPERATIONS = {
    ("/api/v1/jobs", "post"): _op(
        "Submit a job: a 'request' JSON part and 'file' parts", {"201": _json("the job", _JOB)},
        body={"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["request"],
            "properties": {"request": {"type": "string", "description": "the job's JSON request"},
                           "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}),
    ("/api/v1/jobs", "get"): _op(
        "List jobs, newest first", {"200": _json("a page of jobs")},
        [_param("status"), _param("owner"), _param("queue"), _param("limit", kind="integer"),
         _param("offset", kind="integer")]),
    ("/api/v1/jobs/{jobId}", "get"): _op("A job's record", {"200": _json("the job", _JOB)}, [_ID]),
    ("/api/v1/jobs/{jobId}", "delete"): _op("Delete a job and its files", {"200": _json("deleted")}, [_ID]),
    ("/api/v1/jobs/{jobId}/cancel", "post"): _op("Cancel a job", {"200": _json("the job", _JOB)}, [_ID]),
    ("/api/v1/jobs/{jobId}/files", "get"): _op("A job's files", {"200": _json("the files")}, [_ID]),
    ("/api/v1/jobs/{jobId}/files/{name}", "get"): _op(
        "Download a file (Range supported)",
        {"200": {"description": "the bytes", "content": {"application/octet-stream": {}}}},
        [_ID, _param("name", "path"), _param("kind", description="upload or result (default)"),
         _param("inline", description="1: serve a .png as an image")]),
    ("/api/v1/jobs/{jobId}/files/{name}", "put"): _op(
        "Upload one part of a result file (worker)",
        {"201": _json("the file is whole"), "202": _json("part received")},
        [_ID, _param("name", "path"), _param("lease", kind="integer", required=True),
         _param("offset", kind="integer"), _param("last")],
        body={"required": True, "content": {"application/octet-stream": {}}}, tags=_WORKER),
    ("/api/v1/jobs/{jobId}/events", "get"): _op(
        "Long-poll a job's progress and state changes", {"200": _json("events")},
        [_ID, _param("after", kind="integer"), _param("timeout", kind="number")]),
    ("/api/v1/queues/{queueName}/lease", "post"): _op(
        "Long-poll for a job to run (worker)",
        {"200": _json("a lease"), "204": {"description": "nothing pending in time"}},
        [_param("queueName", "path"), _param("timeout", kind="number")], tags=_WORKER),
    ("/api/v1/jobs/{jobId}/heartbeat", "post"): _op(
        "Renew a lease, report progress; learn of a cancel (worker)", {"200": _json("cancel?")},
        [_ID], _JSON_BODY, tags=_WORKER),
    ("/api/v1/jobs/{jobId}/complete", "post"): _op(
        "Finish a job (worker)", {"200": _json("the job", _JOB)}, [_ID], _JSON_BODY, tags=_WORKER),
    ("/api/v1/jobs/{jobId}/release", "post"): _op(
        "Hand a job back unfinished (worker)", {"200": _json("the job", _JOB)}, [_ID], _JSON_BODY,
        tags=_WORKER),
    ("/api/v1/openapi.json", "get"): _op("This document", {"200": _json("OpenAPI 3")}, tags=("ops",)),
}

_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Job": {"type": "object", "required": ["id", "status"], "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "owner": {"type": "string"},
        "status": {"type": "string", "enum": ["PENDING", "ACTIVE", "COMPLETE", "ERROR", "CANCEL"]},
        "priority": {"type": "integer"}, "queue": {"type": "string", "nullable": True},
        "attempts": {"type": "integer"}, "submitted": {"type": "number"},
        "started": {"type": "number", "nullable": True}, "finished": {"type": "number", "nullable": True},
        "progress": {"type": "object", "nullable": True},
        "confinement": {"type": "string", "nullable": True},
        "result": {"nullable": True}, "error": {"type": "string", "nullable": True},
        "request": {"type": "object"}}},
}


def document():
    paths = {}
    for (path, method), op in OPERATIONS.items():
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "reflservd", "version": "1",
                 "description": "The remote fitting queue for refl1d (docs/api.md)."},
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
