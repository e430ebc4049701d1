"""The OpenAPI 3 document of ``/api/v1`` (``GET /api/v1/openapi.json``).

Every route under ``/api/v1``, its parameters with the ranges the server
takes, its request body, and each status it answers with the body it
answers: an error is always ``{"error": message}``. test_api holds the
document to the routes the Klein app really has; test_fuzz holds the
answers to the document (schemathesis, every operation).
"""

from reflservd.longpoll import MAX_LONG_POLL

STATUSES = ["PENDING", "ACTIVE", "COMPLETE", "ERROR", "CANCEL"]
_ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
_JOB = {"$ref": "#/components/schemas/Job"}
_REASONS = {
    "400": "a parameter or the body is not what the route takes",
    "401": "a worker route without this site's worker token",
    "403": "not allowed: a job's key, a worker token of its queue, an admin or submit token, "
           "or a request from this site's own pages is needed",
    "404": "no such job, file or route",
    "409": "the job's state or lease does not allow it",
    "413": "the body is over the route's limit",
    "415": "the body is not of the content type the route takes",
    "421": "the Host header names no host this server answers to (--public-host)",
    "429": "the submitter is past its pending jobs or submissions a minute (Retry-After says when)",
    "503": "the journal or the store cannot be written; nothing was changed",
}


def _json(description, schema):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(code):
    return _json(_REASONS[code], _ERROR_SCHEMA)


def _object(required=(), **properties):
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _op(summary, responses, parameters=(), body=None, errors=("400", "404"), worker=False):
    """An operation; every one may answer 421 (a Host this site does not
    answer to), a worker's 401 and 403 too."""
    op = {"summary": summary, "tags": ["workers" if worker else "users"], "responses": dict(responses)}
    for code in tuple(errors) + ("421",) + (("401", "403") if worker else ()):
        op["responses"][code] = _error(code)
    if "429" in op["responses"]:
        op["responses"]["429"] = dict(op["responses"]["429"], headers={
            "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}})
    if parameters:
        op["parameters"] = list(parameters)
    if body:
        op["requestBody"] = body
    if worker:
        op["security"] = [{"workerToken": []}]
    return op


def _param(name, where="query", schema=None, required=False, description=""):
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema or {"type": "string"}, "description": description}


def _jsonBody(schema, required=True):
    return {"required": required, "content": {"application/json": {"schema": schema}}}


_INT = {"type": "integer"}
_STR = {"type": "string"}
_NSTR = {"type": "string", "nullable": True}
_NNUM = {"type": "number", "nullable": True}
_ID = _param("jobId", "path", {"type": "integer", "minimum": 0})
_NAME = _param("name", "path", description="a file name: no '/', no leading '.'")
_TIMEOUT = _param("timeout", schema={"type": "number", "minimum": 0, "maximum": MAX_LONG_POLL},
                  description="seconds to wait (more is taken as %g)" % (MAX_LONG_POLL,))
_LEASE = {"type": "integer", "description": "the lease token of the lease answer"}
_KEY = _param("X-Job-Key", "header", description="the job's key, as its submit answered it")

_SCHEMAS = {
    "Error": _object(["error"], error=_STR),
    "Job": _object(
        ["id", "status"],
        id=_INT, name=_NSTR, owner=_NSTR, notify=_NSTR, origin=_NSTR, service=_NSTR,
        version=_NSTR, status={"type": "string", "enum": STATUSES},
        priority={"type": "integer", "nullable": True}, queue=_NSTR,
        attempts={"type": "integer"}, lease={"type": "integer", "nullable": True},
        submitted=_NNUM, started=_NNUM, finished=_NNUM,
        progress={"type": "object", "nullable": True}, confinement=_NSTR,
        cancelRequested={"type": "boolean"}, result={"nullable": True}, error=_NSTR,
        request={"type": "object"},
        cachedFrom={"type": "integer", "nullable": True,
                    "description": "the job whose result answered this one (the result cache)"}),
    "Event": _object(["seq", "type", "status"], seq=_INT, type=_STR, status=_STR),
    "Series": _object(
        ["id", "total", "counts", "members"], id=_INT, name=_NSTR, owner=_NSTR, submitted=_NNUM,
        total=_INT, counts={"type": "object", "additionalProperties": _INT},
        members={"type": "array", "items": _object(["member", "id", "data", "status"], member=_INT,
                                                    id=_INT, data=_NSTR, status=_STR)},
        key={"type": "string", "description": "the series' key (its members' too), answered once"}),
}
_SERIES = {"$ref": "#/components/schemas/Series"}
_SERIES_ID = _param("seriesId", "path", {"type": "integer", "minimum": 0})

# (path, method) -> operation
OPERATIONS = {
    ("/api/v1/jobs", "post"): _op(
        "Submit a job: a 'request' JSON part and 'file' parts", {"201": _json("the job", _JOB)},
        body={"required": True, "content": {"multipart/form-data": {"schema": _object(
            ["request"], request={"type": "string", "description": "the job's JSON request"},
            file={"type": "array", "items": {"type": "string", "format": "binary"}})}}},
        errors=("400", "403", "413", "415", "429", "503")),
    ("/api/v1/jobs", "get"): _op(
        "List jobs, newest first",
        {"200": _json("a page of jobs", _object(
            ["jobs", "total", "offset", "limit"], jobs={"type": "array", "items": _JOB},
            total=_INT, offset=_INT, limit=_INT))},
        [_param("status", description="one of %s (any case)" % (", ".join(STATUSES),)),
         _param("owner"), _param("queue"),
         _param("limit", schema={"type": "integer", "minimum": 1, "maximum": 1000}),
         _param("offset", schema={"type": "integer", "minimum": 0})],
        errors=("400",)),
    ("/api/v1/jobs/{jobId}", "get"): _op("A job's record", {"200": _json("the job", _JOB)}, [_ID]),
    ("/api/v1/jobs/{jobId}", "delete"): _op(
        "Delete a job and its files", {"200": _json("deleted", _object(["deleted"], deleted=_INT))},
        [_ID, _KEY], errors=("400", "403", "404", "409", "503")),
    ("/api/v1/jobs/{jobId}/cancel", "post"): _op(
        "Cancel a job", {"200": _json("the job", _JOB)}, [_ID, _KEY],
        errors=("400", "403", "404", "409", "503")),
    ("/api/v1/jobs/{jobId}/files", "get"): _op(
        "A job's files",
        {"200": _json("the files", _object(["id", "files"], id=_INT, files={
            "type": "array", "items": _object(["name", "size", "kind"], name=_STR, size=_INT,
                                              kind={"type": "string", "enum": ["upload", "result"]})}))},
        [_ID]),
    ("/api/v1/jobs/{jobId}/files/{name}", "get"): _op(
        "Download a file (Range supported)",
        {"200": {"description": "the bytes", "content": {"application/octet-stream": {}, "image/png": {}}},
         "206": {"description": "the range asked for", "content": {"application/octet-stream": {},
                                                                    "image/png": {}}},
         "416": {"description": "a range outside the file", "content": {"application/octet-stream": {},
                                                                         "image/png": {}}}},
        [_ID, _NAME,
         _param("kind", schema={"type": "string", "enum": ["upload", "result"]},
                description="upload or result (default)"),
         _param("inline", description="1: serve a .png as an image")]),
    ("/api/v1/jobs/{jobId}/files/{name}", "put"): _op(
        "Upload one part of a result file (worker)",
        {"201": _json("the file is whole", _object(["name", "size"], name=_STR, size=_INT)),
         "202": _json("part received", _object(["name", "received"], name=_STR, received=_INT))},
        [_ID, _NAME, _param("lease", schema=_LEASE, required=True),
         _param("offset", schema={"type": "integer", "minimum": 0}),
         _param("last", description="1 or true: the last part")],
        body={"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        errors=("400", "404", "409", "413", "503"), worker=True),
    ("/api/v1/jobs/{jobId}/events", "get"): _op(
        "Long-poll a job's progress and state changes",
        {"200": _json("events", _object(
            ["id", "events", "next", "status"], id=_INT,
            events={"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            next=_INT, status={"type": "string", "enum": STATUSES}))},
        [_ID, _param("after", schema={"type": "integer", "minimum": 0}), _TIMEOUT]),
    ("/api/v1/queues/{queueName}/lease", "post"): _op(
        "Long-poll for a job to run (worker)",
        {"200": _json("a lease", _object(
            ["id", "lease", "attempts", "leaseTimeout", "request", "files"], id=_INT, lease=_INT,
            attempts=_INT, leaseTimeout={"type": "number"}, request={"type": "object"},
            files={"type": "array", "items": {"type": "array"}}, checkpoint=_STR)),
         "204": {"description": "nothing pending in time"}},
        [_param("queueName", "path", description="1-100 letters, digits, '-', '_' or '.'"), _TIMEOUT],
        _jsonBody(_object(worker={"type": "string", "description": "the worker's name"},
                          versions={"type": "object", "description": "the service versions it runs"}),
                  required=False),
        errors=("400", "413", "415", "503"), worker=True),
    ("/api/v1/jobs/{jobId}/heartbeat", "post"): _op(
        "Renew a lease, report progress; learn of a cancel (worker)",
        {"200": _json("cancel?", _object(["cancel", "leaseTimeout"], cancel={"type": "boolean"},
                                         leaseTimeout={"type": "number"}))},
        [_ID], _jsonBody(_object(["lease"], lease=_LEASE, progress={"type": "object"}, confinement=_STR)),
        errors=("400", "404", "409", "413", "415", "503"), worker=True),
    ("/api/v1/jobs/{jobId}/complete", "post"): _op(
        "Finish a job (worker)", {"200": _json("the job", _JOB)}, [_ID],
        _jsonBody(_object(["lease", "status"], lease=_LEASE,
                          status={"type": "string", "enum": ["COMPLETE", "ERROR", "CANCEL"]},
                          result={}, error=_STR, trace=_STR, confinement=_STR,
                          provenance={"type": "object", "description": "the worker's part of the provenance"})),
        errors=("400", "404", "409", "413", "415", "503"), worker=True),
    ("/api/v1/jobs/{jobId}/release", "post"): _op(
        "Hand a job back unfinished (worker); with 'lost' (why its fit was lost to the "
        "cluster) the attempt counts", {"200": _json("the job", _JOB)}, [_ID],
        _jsonBody(_object(["lease"], lease=_LEASE, lost=_STR)),
        errors=("400", "404", "409", "413", "415", "503"), worker=True),
    ("/api/v1/series", "post"): _op(
        "Submit a fit series: a job per member sharing the job request and the 'shared' files, "
        "each with its own files and model arguments",
        {"201": _json("the series", _SERIES)},
        body={"required": True, "content": {
            "multipart/form-data": {"schema": _object(
                ["request"], request={"type": "string", "description": "the series' JSON: "
                                      "{job, shared: [names], members: [{args, files}]}"},
                file={"type": "array", "items": {"type": "string", "format": "binary"}})},
            "application/json": {"schema": _object(
                ["job", "members"], job={"type": "object"}, shared={"type": "array"},
                members={"type": "array"})}}},
        errors=("400", "403", "413", "415", "429", "503")),
    ("/api/v1/series/{seriesId}", "get"): _op(
        "A series: its counts by state and its members", {"200": _json("the series", _SERIES)},
        [_SERIES_ID]),
    ("/api/v1/series/{seriesId}", "delete"): _op(
        "Delete every member of a series and its files", {"200": _json("the series", _SERIES)},
        [_SERIES_ID, _KEY], errors=("400", "403", "404", "503")),
    ("/api/v1/series/{seriesId}/cancel", "post"): _op(
        "Cancel every member of a series that has not ended", {"200": _json("the series", _SERIES)},
        [_SERIES_ID, _KEY], errors=("400", "403", "404", "503")),
    ("/api/v1/series/{seriesId}/table.json", "get"): _op(
        "A series' results: a row per member (χ², each parameter's value and uncertainty)",
        {"200": _json("the table", _object(["id", "parameters", "rows"], id=_INT, name=_NSTR,
                                           parameters={"type": "array", "items": _STR},
                                           rows={"type": "array", "items": {"type": "object"}}))},
        [_SERIES_ID]),
    ("/api/v1/series/{seriesId}/table.csv", "get"): _op(
        "A series' results as CSV", {"200": {"description": "the table", "content": {"text/csv": {}}}},
        [_SERIES_ID]),
    ("/api/v1/openapi.json", "get"): {
        "summary": "This document", "tags": ["ops"],
        "responses": {"200": _json("OpenAPI 3", {"type": "object"})}},
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
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"workerToken": {
                "type": "http", "scheme": "bearer",
                "description": "the site's worker token (--worker-token-file); "
                               "not asked for when the site has none"}},
        },
    }
