"""The user side's files: the keys of the jobs this user submitted, the
files of a fit and its request, the streamed ``multipart/form-data`` body of
a submit, and the range check of a resumed download (for
``reflservd.client``)."""

import json
import os
import uuid

from reflservd.clienterrors import ClientError
from reflservd.names import VERSION

CHUNK = 1 << 16


def keysPath():
    """The file of the job keys this user's clients were given."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "reflq", "keys.json")


class KeyStore:
    """The keys of the jobs this user submitted, by server and job id, in a
    file only its owner may read (``keysPath()``)."""

    def __init__(self, path=None):
        self.path = path or keysPath()

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                keys = json.load(f)
        except (OSError, ValueError):
            return {}
        return keys if isinstance(keys, dict) else {}

    def get(self, url, jobId):
        key = self._read().get("%s#%d" % (url, jobId))
        return key if isinstance(key, str) else None

    def held(self, url):
        """The ids of the jobs on ``url`` whose keys are kept here."""
        prefix = url + "#"
        return {int(name[len(prefix):]) for name in self._read()
                if name.startswith(prefix) and name[len(prefix):].isdigit()}

    def put(self, url, jobId, key):
        self.putAll(url, {jobId: key})

    def putAll(self, url, keys):
        """Keep the keys of ``{jobId: key}`` (a series' members, in one write)."""
        held = self._read()
        held.update(("%s#%d" % (url, jobId), key) for jobId, key in keys.items())
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        temporary = "%s.%d.tmp" % (self.path, os.getpid())
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(held, f, indent=0, sort_keys=True)
        os.replace(temporary, self.path)


def fileNames(paths):
    """The names the server keeps the files at ``paths`` by (their base
    names); `ClientError` for a file that is not there or a name used twice."""
    names = [os.path.basename(p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise ClientError("no such file: %s" % (path,))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ClientError("two files are named %s: the server keeps files by name" % (duplicates[0],))
    return names


def fitRequest(model, fit, name, notify, service, queue, options):
    """The job request of a fit of the model file named ``model`` (``None``
    options are left out)."""
    fitOptions = {key: value for key, value in options.items() if value is not None}
    if fit is not None:
        fitOptions = dict(fit=fit, **fitOptions)
    request = {"name": name if name is not None else os.path.splitext(model)[0],
               "notify": notify or "", "service": service, "version": VERSION,
               "data": {"model": model, "options": fitOptions}}
    if queue is not None:
        request["queue"] = queue
    return request


def multipartBody(request, files):
    """A streamed ``multipart/form-data`` body: ``(chunks, length, boundary)``;
    the files are read in blocks as the body is sent."""
    boundary = "reflq-" + uuid.uuid4().hex
    head = ('--%s\r\nContent-Disposition: form-data; name="request"\r\n'
            "Content-Type: application/json\r\n\r\n" % (boundary,)).encode() + \
        json.dumps(request).encode("utf-8") + b"\r\n"
    pieces = [head]
    length = len(head)
    for fileName, path in files:
        quoted = fileName.replace("\\", "\\\\").replace('"', '\\"')
        header = ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n" % (boundary, quoted)).encode("utf-8")
        pieces.extend([header, path, b"\r\n"])
        length += len(header) + os.path.getsize(path) + 2
    tail = ("--%s--\r\n" % (boundary,)).encode()
    pieces.append(tail)
    length += len(tail)

    def chunks():
        for piece in pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            with open(piece, "rb") as f:
                while True:
                    block = f.read(CHUNK)
                    if not block:
                        break
                    yield block

    return chunks(), length, boundary


def rangeStarts(response, offset):
    contentRange = response.headers.get("Content-Range", "")
    try:
        return int(contentRange.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False
