"""What a request may carry: the limits every input is held to at the door.

Each check refuses with an ``errors.Refused`` (or ``TooLarge``) whose message
names the limit, before anything changes: so a value that reaches the queue,
the journal or the store can always be encoded, stored and shown. JSON is
read with a bounded nesting depth and every string in it must be text that
UTF-8 can hold (no lone surrogates, which JSON's ``\\ud800`` escapes can
carry but no file name, page or mail can).
"""

import math

from reflservd import journalframes
from reflservd.errors import Refused, TooLarge
from reflservd.fitoptions import modelArgs

MAX_DEPTH = 32
"""Nesting of objects and arrays in any JSON a request carries."""
MAX_FIELD = 1000
"""Characters in a job's name, notify, service and version."""
MAX_FILES = 200
"""Files uploaded with one job."""
MAX_WORKER = 200
"""Characters in a worker's name."""
MAX_PARAMETERS = 200
"""Parameters in one progress report."""
MAX_LABEL = 200
"""Characters in a parameter's label."""
MAX_PROGRESS_BYTES = 16 * 1024
"""Bytes of one progress report, as its labels and numbers add up."""
MAX_SERIES = 1000
"""Members of one fit series (``reflservd.series``)."""


def parseJSON(data, what="the body"):
    """The JSON value of ``data`` (bytes), or ``Refused`` saying why not:
    not JSON, not UTF-8, nested deeper than ``MAX_DEPTH``, or holding text
    that is not encodable. NaN and Infinity are taken (a failed fit's χ²)."""
    try:
        value = journalframes.parseJSON(data)
    except journalframes.TooDeep:
        raise Refused("%s is nested deeper than %d levels" % (what, MAX_DEPTH)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused("%s is not valid JSON: %s" % (what, e)) from None
    checkJSON(value, what)
    return value


def checkJSON(value, what="the value"):
    """``value`` if it nests at most ``MAX_DEPTH`` deep and all its strings
    (keys too) are encodable text; else ``Refused``. Iterative: a deep value
    cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _checkEncodable(item, what)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise Refused("%s is nested deeper than %d levels" % (what, MAX_DEPTH))
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise Refused("%s has a key that is not a string" % (what,))
                    _checkEncodable(key, what)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    return value


def _checkEncodable(text, what):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("%s holds text that is not valid Unicode (a lone surrogate)"
                      % (what,)) from None


def checkText(value, what, limit=MAX_FIELD, empty=True):
    """``value`` if it is a string of at most ``limit`` characters that
    UTF-8 can encode; else ``Refused`` naming ``what`` and the limit."""
    if not isinstance(value, str) or len(value) > limit or (not empty and not value):
        raise Refused("%s must be a %sstring of at most %d characters"
                      % (what, "" if empty else "non-empty ", limit))
    _checkEncodable(value, what)
    return value


def checkFiles(sizes, maxFiles=MAX_FILES, maxFileBytes=None, maxJobBytes=None):
    """Refuse a job's uploads (``[(name, size)]``) past the files-per-job,
    bytes-per-file and bytes-per-job limits (``None``: no limit)."""
    if len(sizes) > maxFiles:
        raise TooLarge("a job takes at most %d files, not %d" % (maxFiles, len(sizes)))
    total = 0
    for name, size in sizes:
        if maxFileBytes is not None and size > maxFileBytes:
            raise TooLarge("file %r is %d bytes; a file takes at most %d"
                           % (name, size, maxFileBytes))
        total += size
    if maxJobBytes is not None and total > maxJobBytes:
        raise TooLarge("the job's files are %d bytes; a job takes at most %d"
                       % (total, maxJobBytes))


def finiteNumber(value, what):
    """``value`` as a float if it is a finite number; else ``Refused``."""
    number = _number(value, what)
    if number is None:
        raise Refused("%s must be a finite number" % (what,))
    return number


def checkProgress(progress):
    """A worker's progress report as its typed fields only: ``step`` (an
    integer), ``chisq`` (a number or null), ``parameters`` (at most
    ``MAX_PARAMETERS`` labels of at most ``MAX_LABEL`` characters, each a
    number or null) and ``elapsed`` (seconds). Anything else is refused:
    progress is shown on pages and kept in memory for every watcher."""
    if not isinstance(progress, dict):
        raise Refused("'progress' must be an object")
    unknown = set(progress) - {"step", "chisq", "parameters", "elapsed"}
    if unknown:
        raise Refused("'progress' takes step, chisq, parameters and elapsed, not %s"
                      % (", ".join(sorted(map(repr, unknown)))[:200],))
    step = progress.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2 ** 53:
        raise Refused("progress 'step' must be an integer from 0 to 2**53")
    parameters = progress.get("parameters") or {}
    if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
        raise Refused("progress 'parameters' must map at most %d labels to numbers"
                      % (MAX_PARAMETERS,))
    if sum(len(label) + 24 for label in parameters) > MAX_PROGRESS_BYTES:
        raise Refused("a progress report is limited to %d bytes of labels and values"
                      % (MAX_PROGRESS_BYTES,))
    values = {}
    for label, value in parameters.items():
        checkText(label, "a parameter label", MAX_LABEL)
        values[label] = None if value is None else _number(value, "parameter %r" % (label[:40],))
    chisq = progress.get("chisq")
    return {"step": step,
            "chisq": None if chisq is None else _number(chisq, "progress 'chisq'"),
            "parameters": values,
            "elapsed": finiteNumber(progress.get("elapsed", 0.0), "progress 'elapsed'")}


def _number(value, what):
    """A number as a float; NaN, infinities and numbers past a float's range
    (which a fit may report) as None, which JSON can carry to a browser."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused("%s must be a number" % (what,))
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def checkModelArgs(request):
    """The model arguments of a refl1d job request (``data.args``), held to
    ``fitoptions.modelArgs``: ``Refused`` naming the rule."""
    data = request.get("data")
    if isinstance(data, dict) and "args" in data:
        return modelArgs(data["args"])
    return []


def checkQueueName(name):
    """``name`` if it is 1-100 ASCII letters, digits, '-', '_' or '.'; else ``Refused``."""
    if (not isinstance(name, str) or not name or len(name) > 100 or not name.isascii()
            or not name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        raise Refused("a queue name is 1-100 letters, digits, '-', '_' or '.'")
    return name


class Quotas:
    """What one submitter and one job may use (``twistd reflservd --help``);
    0 for a count or a rate means no limit."""

    def __init__(self, maxFiles=MAX_FILES, maxFileBytes=200 << 20, maxJobBytes=200 << 20,
                 maxResultFiles=1000, maxResultBytes=1 << 30, maxPending=500,
                 submitsPerMinute=120):
        self.maxFiles, self.maxFileBytes, self.maxJobBytes = maxFiles, maxFileBytes, maxJobBytes
        self.maxResultFiles, self.maxResultBytes = maxResultFiles, maxResultBytes
        self.maxPending, self.submitsPerMinute = maxPending, submitsPerMinute


def sourceSize(source):
    """The size of an upload, in memory or in a file (left at its start)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    here = source.tell()
    size = source.seek(0, 2) - here
    source.seek(here)
    return size


def checkRequest(request):
    """The request's name, notify, service and version, or ``Refused`` saying
    what is wrong. All of the request is held to ``checkJSON``."""
    if not isinstance(request, dict):
        raise Refused("the request must be a JSON object")
    checkJSON(request, "the request")
    for field in ("name", "notify"):
        if field not in request:
            raise Refused("the request needs a %r field" % (field,))
    name = checkText(request["name"], "'name'")
    notify = checkText(request["notify"], "'notify'")
    serviceName = checkText(request.get("service", "refl1d"), "'service'")
    version = checkText(request.get("version", ""), "'version'")
    checkModelArgs(request)
    if serviceName == "fitter":
        raise Refused("the legacy 'fitter' service sends a pickled problem; this server "
                        "never unpickles (unpickling runs code on the server). Submit the "
                        "model script or its JSON serialization to the 'refl1d' service")
    return name, notify, serviceName, version
