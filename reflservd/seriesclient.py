"""Fit series from the user's side (``Client.submitSeries``, ``Client.series``):
one model fitted to many data files, each file its own job (a member).

    series = client.submitSeries("model.py", sorted(glob.glob("run-*.refl")), fit="lm")
    series.wait()
    for row in series.table()["rows"]:
        print(row["data"], row["chisq"], row["parameters"]["thickness"]["value"])

The series' key (which is also each member's) is kept with the job keys
(``clientfiles.KeyStore``, under the server's URL + ``/series``), and each
member's under its job id, so that ``reflq cancel`` works on one member too.
"""

import json
import time

from reflservd.clienterrors import ClientError, UnknownJob, WaitTimeout
from reflservd.clientfiles import fileNames

SERIES_KEYS = "/series"
"""What the series' keys are kept under: the server's URL and this."""


def submitSeries(client, model, data, request, shared=()):
    """Submit the series of ``model`` over the ``data`` files with the job
    ``request`` (`client.fitRequest`); the `Series`."""
    data = list(data)
    if not data:
        raise ClientError("a series needs at least one data file")
    paths = [model] + list(shared) + data
    names = fileNames(paths)
    document = {"job": request, "shared": names[:1 + len(shared)],
                "members": [{"args": [name], "files": [name]} for name in names[1 + len(shared):]]}
    record = client.postFiles("/api/v1/series", document, list(zip(names, paths)))
    key = record["key"]
    client.keys.put(client.url + SERIES_KEYS, record["id"], key)
    client.keys.putAll(client.url, {member["id"]: key for member in record["members"]})
    return Series(client, record["id"], record)


class Series:
    """A fit series on the server. ``record`` is its last answer: ``counts``
    by state and ``members`` (``{"member", "id", "data", "status"}``)."""

    def __init__(self, client, seriesId, record=None):
        self.client = client
        self.id = int(seriesId)
        self.record = record

    def __repr__(self):
        return "<Series %d %s>" % (self.id, self.record.get("counts") if self.record else "?")

    @property
    def url(self):
        """The series' page on the server."""
        return "%s/series/%d" % (self.client.url, self.id)

    def _call(self, method, rest=""):
        """The decoded answer about this series, with its key when this user holds it."""
        headers = {"Accept": "application/json"}
        key = self.client.keys.get(self.client.url + SERIES_KEYS, self.id)
        if key is not None:
            headers["X-Job-Key"] = key
        try:
            response = self.client.open(method, "/api/v1/series/%d%s" % (self.id, rest), None, headers)
        except ClientError as e:
            if e.code == 404:
                raise UnknownJob(e.message, e.code) from None
            raise
        with response:
            return json.loads(response.read())

    def refresh(self):
        self.record = self._call("GET")
        return self.record

    @property
    def members(self):
        """The member jobs, in order (`client.Job`)."""
        from reflservd.client import Job
        return [Job(self.client, member["id"]) for member in (self.record or self.refresh())["members"]]

    @property
    def counts(self):
        """How many members are in each state, now."""
        return self.refresh()["counts"]

    def wait(self, timeout=None, callback=None):
        """Wait until every member has ended; the counts by state.
        ``callback(job)`` is called as each member is seen ended, in order.
        Raises `WaitTimeout` when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.members:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                job.wait(timeout=remaining)
            except WaitTimeout:
                raise WaitTimeout("series %d: member job %d has not ended after %g s"
                                  % (self.id, job.id, timeout)) from None
            except UnknownJob:
                continue        # deleted: it has ended
            if callback is not None:
                callback(job)
        return self.counts

    def table(self):
        """``{"parameters": [labels], "rows": [{"member", "id", "data", "status",
        "chisq", "parameters": {label: {"value", "uncertainty"}}}]}``."""
        return self._call("GET", "/table.json")

    def tableCSV(self):
        """The table as CSV text (a row per member, a value and an uncertainty column per parameter)."""
        response = self.client.open("GET", "/api/v1/series/%d/table.csv" % (self.id,))
        with response:
            return response.read().decode("utf-8")

    def cancel(self):
        """Cancel every member that has not ended; the counts by state."""
        self.record = self._call("POST", "/cancel")
        return self.record["counts"]

    def delete(self):
        """Delete every member and its files."""
        self.record = self._call("DELETE")
        return self.record["counts"]
