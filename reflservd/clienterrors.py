"""What `reflservd.client.Client` raises: one line saying why, and the HTTP
status where there was one."""

import http.client
import json
import socket


class ClientError(Exception):
    """A request the server refused or could not answer; ``message`` says
    why in one line, ``code`` is the HTTP status when there was one."""

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        self.message = message
        self.code = code


class ServerUnreachable(ClientError):
    """No answer from the server: refused, unresolvable, timed out."""


class UnknownJob(ClientError):
    """The server has no such job (never had, or it was deleted)."""


class WaitTimeout(ClientError, TimeoutError):
    """``Job.wait(timeout=…)`` ran out before the job ended."""


def reasonOf(reason):
    """Why a connection failed, in a few words."""
    if isinstance(reason, socket.timeout):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def httpError(error, jobId):
    """The `ClientError` an HTTP error answer means (its JSON ``error``, or its status line)."""
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    message = None
    try:
        value = json.loads(raw)
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            message = value["error"]
    except ValueError:
        pass
    if message is None:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        message = "%d %s%s" % (error.code, error.reason, (": " + text[0][:200]) if text else "")
    code = error.code
    if code == 404 and jobId is not None and not message.startswith("no such route"):
        return UnknownJob(message, code)
    if code >= 500:
        return ServerUnreachable("the server cannot serve this now (%d): %s" % (code, message), code)
    return ClientError(message, code)
