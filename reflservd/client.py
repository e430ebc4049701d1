"""A synchronous client of a reflservd server, for scripts and notebooks.

    from reflservd.client import Client
    job = Client("http://fits.example.org:8080").submit(
        "model.py", data=["run1.dat", "run2.dat"], fit="dream", samples=10000, seed=1)
    job.wait(callback=print)
    print(job.result["chisq"])
    job.download("results")

Only the standard library (``urllib``): no dependency beyond Python. Uploads
and downloads are streamed, so a large data set never sits in memory; a
download that breaks part way is resumed with a ``Range`` request, and every
file's size is checked against the server's listing.

``Client(url, legacy=True)`` speaks the old jobqueue's JSON-only protocol
(files inline in the request, no progress, no cancel) for servers that offer
nothing else.

A job belongs to whoever holds the key its submit answered: the client keeps
the keys of the jobs it submitted in ``$XDG_CONFIG_HOME/reflq/keys.json``
(``~/.config/reflq/keys.json``; readable by its owner alone) and sends a
job's key when it cancels or deletes it.
"""

import base64
import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from reflservd.clienterrors import (  # noqa: F401 (the errors a user of Client catches)
    ClientError, ServerUnreachable, UnknownJob, WaitTimeout, httpError, reasonOf)
from reflservd.clientfiles import CHUNK, KeyStore, fileNames, fitRequest, multipartBody, rangeStarts

DEFAULT_SERVER = "http://127.0.0.1:8080"
FINISHED = ("COMPLETE", "ERROR", "CANCEL")
LONG_POLL = 25.0


class Client:
    """One reflservd server, as seen from a script.

    @param url: the server's base URL (a path prefix is kept).
    @param legacy: speak the old jobqueue protocol (``/jobs.json`` …).
    @param timeout: seconds to wait for an ordinary answer.
    @param keys: where the keys of submitted jobs are kept (a `KeyStore`).
    @param caFile: a PEM file of the CA (or the self-signed certificate) an
        ``https://`` server's certificate must chain to, in place of the
        system's store.
    @param token: sent as ``Authorization: Bearer`` with every request (a
        submit token, where the server asks for one, or an admin token).
    """

    def __init__(self, url=DEFAULT_SERVER, legacy=False, timeout=60.0, keys=None, caFile=None,
                 token=None):
        if "://" not in url:
            url = "http://" + url
        self.url = url.rstrip("/")
        self.legacy = legacy
        self.timeout = timeout
        self.keys = keys or KeyStore()
        self.token = token
        try:
            context = ssl.create_default_context(cafile=caFile)
        except (OSError, ssl.SSLError) as e:
            raise ClientError("cannot read the CA file %s: %s" % (caFile, e)) from None
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))

    def __repr__(self):
        return "Client(%r%s)" % (self.url, ", legacy=True" if self.legacy else "")

    # ---- HTTP

    def open(self, method, path, body=None, headers=None, timeout=None, jobId=None):
        """The raw response to one request (a file-like object with
        ``status`` and ``headers``); errors become `ClientError`s. A
        request about a job carries its key when this user holds it."""
        headers = dict(headers or {}, **{"X-Requested-With": "reflq"})
        if self.token is not None:
            headers["Authorization"] = "Bearer " + self.token
        if jobId is not None:
            key = self.keys.get(self.url, jobId)
            if key is not None:
                headers["X-Job-Key"] = key
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers=headers)
        try:
            return self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise httpError(e, jobId) from None
        except urllib.error.URLError as e:
            raise ServerUnreachable("cannot reach the server at %s: %s" % (self.url, reasonOf(e.reason))) from None
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnreachable("cannot reach the server at %s: %s" % (self.url, reasonOf(e))) from None

    def call(self, method, path, value=None, timeout=None, jobId=None):
        """Send ``value`` as JSON (when given) and return the decoded answer."""
        body, headers = None, {"Accept": "application/json"}
        if value is not None:
            body = json.dumps(value).encode("utf-8")
            headers["Content-Type"] = "application/json"
        response = self.open(method, path, body, headers, timeout, jobId)
        try:
            with response:
                raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnreachable("the server at %s broke off its answer: %s" % (self.url, reasonOf(e))) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError("the server at %s answered %s %s with something that is not JSON"
                              % (self.url, method, path)) from None

    # ---- jobs

    def health(self):
        """The server's ``/healthz`` answer (job counts by status)."""
        return self.call("GET", "/healthz")

    def submit(self, model, data=(), fit=None, name=None, notify="", service="refl1d", queue=None,
               cache=True, **options):
        """Submit a refl1d fit: the model (a ``.py`` script or ``.json``
        FitProblem) and its data files, with refl1d fit options (``steps``,
        ``samples``, ``burn``, ``pop``, ``init``, ``seed``, ``time``, …;
        ``None`` values are left out), to ``queue`` (the server's default
        queue when None). A determined fit (a seed, or lm/newton/amoeba) may
        be answered from an earlier job's result (docs/client.md); ``cache=False``
        runs it anyway. Returns the `Job`."""
        paths = [model] + list(data)
        names = fileNames(paths)
        request = fitRequest(names[0], fit, name, notify, service, queue, options)
        if not cache:
            request["cache"] = False
        if self.legacy:
            return self._submitLegacy(request, list(zip(names, paths)))
        record = self.postFiles("/api/v1/jobs", request, list(zip(names, paths)))
        self._keep(record)
        return Job(self, record["id"], record)

    def postFiles(self, path, request, files):
        """POST ``request`` (the ``request`` part) and ``files`` (``[(name,
        path)]``, streamed) as multipart to ``path``; the decoded answer."""
        body, length, boundary = multipartBody(request, files)
        headers = {"Content-Type": "multipart/form-data; boundary=" + boundary,
                   "Content-Length": str(length), "Accept": "application/json"}
        response = self.open("POST", path, body, headers, timeout=max(self.timeout, 600))
        with response:
            return json.loads(response.read())

    def submitSeries(self, model, data, fit=None, name=None, notify="", service="refl1d",
                     queue=None, shared=(), **options):
        """Submit a fit series: one job per data file, each fitting ``model``
        (with the ``shared`` files) to its file, given as its first argument
        (``sys.argv[1]``). Returns the `reflservd.seriesclient.Series`."""
        from reflservd.seriesclient import submitSeries
        return submitSeries(self, model, data, fitRequest(os.path.basename(model), fit, name, notify,
                                                          service, queue, options), shared)

    def series(self, seriesId):
        """The series ``seriesId`` (`reflservd.seriesclient.Series`)."""
        from reflservd.seriesclient import Series
        series = Series(self, int(seriesId))
        series.refresh()
        return series

    def _keep(self, answer):
        if isinstance(answer.get("key"), str):
            self.keys.put(self.url, answer["id"], answer["key"])

    def _submitLegacy(self, request, files):
        inline = {}
        for fileName, path in files:
            with open(path, "rb") as f:
                content = f.read()
            try:
                inline[fileName] = content.decode("utf-8")
            except UnicodeDecodeError:
                inline[fileName] = {"base64": base64.b64encode(content).decode("ascii")}
        request = dict(request, data=dict(request["data"], files=inline))
        answer = self.call("POST", "/jobs.json", request, timeout=max(self.timeout, 600))
        self._keep(answer)
        return Job(self, answer["id"])

    def job(self, jobId):
        """The job ``jobId``; `UnknownJob` when the server has none."""
        job = Job(self, int(jobId))
        job.refresh()
        return job

    def jobs(self, status=None, owner=None, queue=None, limit=None):
        """The jobs that match, newest first (all of them unless ``limit``)."""
        if self.legacy:
            path = "/jobs/%s.json" % (status.lower(),) if status else "/jobs.json"
            ids = sorted(self.call("GET", path)["jobs"], reverse=True)
            return [Job(self, jobId) for jobId in ids[:limit]]
        found, offset = [], 0
        while limit is None or len(found) < limit:
            page = 1000 if limit is None else min(1000, limit - len(found))
            query = {"status": status, "owner": owner, "queue": queue, "limit": page, "offset": offset}
            answer = self.call("GET", "/api/v1/jobs?" + _query(query))
            found.extend(Job(self, record["id"], record) for record in answer["jobs"])
            offset += len(answer["jobs"])
            if not answer["jobs"] or offset >= answer["total"]:
                break
        return found

    def localAddress(self):
        """The address this machine reaches the server from: the owner the
        server records for a job submitted without ``notify`` (unless a
        proxy stands between)."""
        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=self.timeout) as s:
                return s.getsockname()[0]
        except OSError as e:
            raise ServerUnreachable("cannot reach the server at %s: %s" % (self.url, reasonOf(e))) from None


class Job:
    """A job on the server. ``record`` is the job record as last fetched;
    ``status``, ``progress`` and ``result`` ask the server each time (until
    the job has ended, when nothing changes any more)."""

    def __init__(self, client, jobId, record=None):
        self.client = client
        self.id = int(jobId)
        self.record = record

    def __repr__(self):
        status = self.record.get("status") if self.record else "?"
        return "<Job %d %s>" % (self.id, status)

    @property
    def url(self):
        """The job's page on the server."""
        return "%s/jobs/%d" % (self.client.url, self.id)

    def _path(self, rest=""):
        return "/api/v1/jobs/%d%s" % (self.id, rest)

    def refresh(self):
        """Fetch the job record again (the legacy protocol knows only the
        request and the status)."""
        if self.client.legacy:
            status = self._legacyStatus()
            answer = self.client.call("GET", "/jobs/%d.json" % (self.id,), jobId=self.id)
            request = answer.get("job") or {}
            self.record = {"id": self.id, "status": status, "name": request.get("name"),
                           "notify": request.get("notify"), "request": request,
                           "progress": None, "result": None}
        else:
            self.record = self.client.call("GET", self._path(), jobId=self.id)
        return self.record

    def _legacyStatus(self):
        status = self.client.call("GET", "/jobs/%d/status.json" % (self.id,))["status"]
        if status == "UNKNOWN":
            raise UnknownJob("the server has no job %d" % (self.id,))
        return status

    def _ended(self):
        return self.record is not None and self.record.get("status") in FINISHED

    @property
    def name(self):
        return (self.record or self.refresh()).get("name")

    @property
    def status(self):
        """The job's status now: PENDING, ACTIVE, COMPLETE, ERROR or CANCEL."""
        if self._ended():
            return self.record["status"]
        if self.client.legacy:
            status = self._legacyStatus()
            if self.record is not None:
                self.record["status"] = status
            return status
        return self.refresh()["status"]

    @property
    def progress(self):
        """The latest progress: ``{"step", "chisq", "elapsed", "parameters"}``
        (None before the first report, and always with the legacy protocol)."""
        if not self._ended() and not self.client.legacy:
            self.refresh()
        return self.record.get("progress") if self.record else None

    @property
    def result(self):
        """The result summary once COMPLETE (``chisq``, ``parameters``:
        ``{name: {"value", "uncertainty"}}``, ``fitter``, ``seed``…), else None."""
        if self.client.legacy:
            answer = self.client.call("GET", "/jobs/%d/results.json" % (self.id,), jobId=self.id)
            return answer.get("result") if answer.get("status") == "COMPLETE" else None
        if not self._ended():
            self.refresh()
        return self.record.get("result")

    @property
    def error(self):
        """Why the job ended ERROR (None otherwise)."""
        if self.client.legacy:
            return self.client.call("GET", "/jobs/%d/results.json" % (self.id,), jobId=self.id).get("error")
        if not self._ended():
            self.refresh()
        return self.record.get("error")

    def wait(self, timeout=None, callback=None, poll=LONG_POLL):
        """Wait until the job ends; return its final status.

        ``callback(event)`` is called with each event as it comes:
        ``{"seq", "time", "type": "status"|"progress", "status", "progress"}``.
        The events long-poll of the server means no polling interval to
        choose: an event arrives as soon as it happens. Raises `WaitTimeout`
        when ``timeout`` seconds pass first (the job goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.client.legacy:
            return self._waitLegacy(deadline, callback, poll)
        after = 0
        while True:
            wait = poll
            if deadline is not None:
                wait = min(poll, max(0.0, deadline - time.monotonic()))
            answer = self.events(after, wait)
            for event in answer["events"]:
                if callback is not None:
                    callback(event)
            after = answer["next"]
            if answer["status"] in FINISHED:
                self.refresh()
                return self.record["status"]
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout("job %d is still %s after %g s" % (self.id, answer["status"], timeout))

    def events(self, after=0, wait=0.0):
        """One long-poll of the job's events after ``after``:
        ``{"events": [...], "next": N, "status": S}``, waiting up to ``wait``
        seconds for one. A server that goes away for a moment (a restart)
        is retried for up to a minute before this gives up."""
        path = self._path("/events?after=%d&timeout=%g" % (after, wait))
        failedSince = None
        pause = 0.5
        while True:
            try:
                return self.client.call("GET", path, timeout=wait + 30, jobId=self.id)
            except ServerUnreachable:
                now = time.monotonic()
                failedSince = failedSince or now
                if now - failedSince > 60:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 10)

    def _waitLegacy(self, deadline, callback, poll):
        last, pause = None, 1.0
        while True:
            status = self._legacyStatus()
            if status != last:
                last = status
                if callback is not None:
                    callback({"type": "status", "status": status, "time": time.time(), "progress": None})
            if status in FINISHED:
                self.record = dict(self.record or {"id": self.id}, status=status)
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout("job %d is still %s" % (self.id, status))
            sleep = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            pause = min(pause * 1.5, poll / 2)

    # ---- files

    def files(self, kind="result"):
        """``[{"name", "size", "kind"}]``: the result files (or ``kind="upload"``,
        or ``kind=None`` for both)."""
        if self.client.legacy:
            if kind == "upload":
                return []
            answer = self.client.call("GET", "/jobs/%d/data/index.json" % (self.id,), jobId=self.id)
            return [{"name": n, "size": s, "kind": "result"} for n, s in answer["files"]]
        listing = self.client.call("GET", self._path("/files"), jobId=self.id)["files"]
        return [f for f in listing if kind is None or f["kind"] == kind]

    def _fileURL(self, name, kind="result"):
        quoted = urllib.parse.quote(name, safe="")
        if self.client.legacy:
            return "/jobs/%d/data/%s" % (self.id, quoted)
        return self._path("/files/%s%s" % (quoted, "?kind=upload" if kind == "upload" else ""))

    def read(self, name, offset=0, kind="result"):
        """The bytes of one file from ``offset`` on (for logs and small files)."""
        headers = {"Range": "bytes=%d-" % (offset,)} if offset else {}
        try:
            response = self.client.open("GET", self._fileURL(name, kind), headers=headers)
        except ClientError as e:
            if e.code == 416:
                return b""
            raise
        with response:
            data = response.read()
        if offset and response.status == 200:
            data = data[offset:]
        return data

    def download(self, directory=".", names=None, retries=5):
        """Download every result file (or those in ``names``) into
        ``directory``; return their paths.

        Each file is streamed to ``.NAME.ID.part`` and renamed once its size
        is the one the server lists. A connection that breaks is resumed
        with ``Range`` where it stopped (up to ``retries`` times), and so is
        a part file left by an earlier, interrupted download.
        """
        os.makedirs(directory, exist_ok=True)
        paths = []
        for entry in self.files():
            name, size = entry["name"], entry["size"]
            if names is not None and name not in names:
                continue
            final = os.path.join(directory, listedName(name))
            partial = os.path.join(directory, ".%s.%d.part" % (name, self.id))
            self._fetch(name, size, partial, retries)
            os.replace(partial, final)
            paths.append(final)
        return paths

    def _fetch(self, name, size, partial, retries):
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        if have > size:
            have = 0
        if have == 0:
            open(partial, "wb").close()
        failures = 0
        while have < size:
            headers = {"Range": "bytes=%d-" % (have,)} if have else {}
            try:
                response = self.client.open("GET", self._fileURL(name), headers=headers)
                with response:
                    if response.status == 206 and not rangeStarts(response, have):
                        raise ClientError("%s: the server answered a different range than asked" % (name,))
                    mode = "ab" if response.status == 206 else "wb"
                    with open(partial, mode) as f:
                        have = 0 if mode == "wb" else have
                        while True:
                            chunk = response.read(CHUNK)
                            if not chunk:
                                break
                            f.write(chunk)
                            have += len(chunk)
            except ServerUnreachable as e:
                error = e.message
            except (OSError, http.client.HTTPException) as e:
                error = "the download of %s broke off: %s" % (name, reasonOf(e))
            else:
                if have >= size:
                    break
                error = "the download of %s ended at %d of %d bytes" % (name, have, size)
            failures += 1
            if failures > retries:
                raise ClientError("%s (gave up after %d attempts)" % (error, failures))
            time.sleep(min(0.2 * 2 ** failures, 5))
        if have != size:
            raise ClientError("%s: received %d bytes, but the server lists %d" % (name, have, size))

    # ---- changes

    def cancel(self):
        """Cancel the job (a PENDING job at once; an ACTIVE one is stopped
        by its worker at its next heartbeat); returns the status."""
        if self.client.legacy:
            raise ClientError("the legacy protocol has no cancel (delete the job instead)")
        self.record = self.client.call("POST", self._path("/cancel"), jobId=self.id)
        return self.record["status"]

    def delete(self):
        """Delete the job and its files from the server."""
        if self.client.legacy:
            self.client.call("DELETE", "/jobs/%d.json" % (self.id,), jobId=self.id)
        else:
            self.client.call("DELETE", self._path(), jobId=self.id)
        self.record = None


def listedName(name):
    """``name``, a file name the server listed, if it is safe to write under; else ClientError."""
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ClientError("the server listed an unsafe file name %r" % (name,))
    return name


def _query(values):
    return urllib.parse.urlencode({k: v for k, v in values.items() if v is not None})
