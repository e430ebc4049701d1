"""A fit's outcome: the one record a backend gives back for each job.

``{"status": "COMPLETE"|"ERROR"|"CANCEL"|"LOST", "result", "error", "trace"}`` (``LOST``:
never delivered, the job is handed back, see ``lost``) and,
once the worker has added it, ``"confinement"`` (what the worker applied; a
fit's own word for it is never taken). The constructors below are the only
place the record is spelled out.

Inside the fit, the runner leaves the record in ``jobDir/.outcome.json``
(``write``) as it ends; the worker reads it (``read``) once the fit's
processes are gone. The file is the fit's: it is read as hostile input.
"""

import json
import os
import signal

OUTCOME_NAME = ".outcome.json"
"""The fit's outcome record, in the job directory (not among the results)."""

MAX_OUTCOME_BYTES = 4 * 1024 * 1024


def make(status, result=None, error=None, trace=None, **more):
    """An outcome record; ``more`` adds ``confinement`` or the child's ``limit``."""
    record = {"status": status, "result": result, "error": error, "trace": trace}
    record.update(more)
    return record


def completed(result):
    return make("COMPLETE", result=result)


def error(message, trace=None, **more):
    return make("ERROR", error=message, trace=trace, **more)


def cancelled(**more):
    return make("CANCEL", **more)


def lost(why):
    """The fit was lost to its cluster (a node failed, Slurm preempted it), not to
    its own doing: the worker hands the job back, the attempt counted."""
    return make("LOST", error=why)


def failedWith(outcome, why):
    """``outcome`` turned ERROR for ``why``, its own error kept after it; a CANCEL stays."""
    outcome = outcome or {}
    if outcome.get("status") == "CANCEL":
        return outcome
    if outcome.get("status") == "ERROR" and outcome.get("error") and why not in outcome["error"]:
        why = "%s; and %s" % (why, outcome["error"])
    return error(why, outcome.get("trace"), confinement=outcome.get("confinement"))


def number(value):
    return ("%g" % value) if isinstance(value, (int, float)) else str(value)


def limitMessage(error, limit, limits):
    """Say which limit a model's error comes from, when it plainly comes from one."""
    if limit == "memory" and limits.get("memory"):
        return "memory limit of %d bytes exceeded (%s)" % (limits["memory"], error)
    if limit == "fsize" and limits.get("fsize"):
        return "file size limit of %d bytes exceeded (%s)" % (limits["fsize"], error)
    return error


def deathMessage(event, limits):
    """What ended a fit that left no outcome, from the fork host's ``exited`` event."""
    signum = event.get("signal")
    code = event.get("code")
    cpu = event.get("cpu") or 0.0
    if signum in (signal.SIGKILL, signal.SIGXCPU) and limits.get("cpu") and cpu >= limits["cpu"] - 1:
        return "CPU time limit of %s s exceeded" % (number(limits["cpu"]),)
    if signum == signal.SIGXFSZ and limits.get("fsize"):
        return "file size limit of %d bytes exceeded" % (limits["fsize"],)
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        message = "the fit process was killed by %s without a result" % (name,)
        if limits.get("memory") and signum in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            message += " (memory limit %d bytes)" % (limits["memory"],)
        return message
    return "the fit process exited with code %s without a result" % (code,)


def write(jobDir, outcome, name=OUTCOME_NAME):
    """Write the outcome record where the worker looks for it (or as ``name``), whole or not at all.

    Not fsynced: the worker reads it from the page cache right after the child
    exits, and a machine that crashes loses the job's lease anyway (the server
    hands the job out again).
    """
    path = os.path.join(jobDir, name)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(outcome, f, allow_nan=False, default=_jsonDefault)
    os.rename(temporary, path)


def _jsonDefault(value):
    try:
        return float(value)
    except Exception:
        return repr(value)


def read(jobDir, uid=None):
    """The outcome the fit wrote, or None when it wrote none.

    The file was written by a process running a model nobody vetted: it is
    opened with ``jobfiles.openFile`` (a regular file of the fit's ``uid``,
    reached through no link) and parsed with bounded size and depth; anything
    else raises ``jobfiles.UnsafeFile`` saying what was found. Its
    ``confinement``, if any, is dropped: the worker reports what it applied.
    """
    from reflworkerd import jobfiles

    try:
        raw = jobfiles.readFile(jobDir, OUTCOME_NAME, uid, MAX_OUTCOME_BYTES)
    except FileNotFoundError:
        return None
    try:
        outcome = jobfiles.loadJSON(raw, MAX_OUTCOME_BYTES)
    except ValueError as e:
        raise jobfiles.UnsafeFile("%s is not an outcome record: %s" % (OUTCOME_NAME, e))
    if not isinstance(outcome, dict) or outcome.get("status") not in ("COMPLETE", "ERROR"):
        raise jobfiles.UnsafeFile("%s is not an outcome record (no status COMPLETE or ERROR)" % (OUTCOME_NAME,))
    for key in ("error", "trace", "limit"):
        if outcome.get(key) is not None and not isinstance(outcome[key], str):
            raise jobfiles.UnsafeFile("%s is not an outcome record (%s is not text)" % (OUTCOME_NAME, key))
    outcome.pop("confinement", None)
    return outcome


def remove(jobDir):
    """Remove a stale outcome (an earlier attempt's) before a new run."""
    for name in (OUTCOME_NAME, OUTCOME_NAME + ".tmp"):
        try:
            os.unlink(os.path.join(jobDir, name))
        except FileNotFoundError:
            pass
