"""Fit series: one model fitted to many data sets, each data set its own job.

A series is submitted as one ``series`` journal record that carries the
submit record of every member (``queue.Queue.makeSubmit``, each naming the
series): one commit, so that a series is on disk whole or not at all, and a
replay makes the same members. The members are ordinary jobs: fair share,
leases, cancel and results are theirs. Each member's priority is its owner's
share plus its place in the series, as if its members had been submitted
one by one: a long series does not hold the queue against other owners.

This module is pure like ``queue.py``: the series' own state (`SeriesBook`,
kept by the queue and in its snapshots), the record of a submit
(`makeSeries`) and what is read back (`counts`, `members`, `table`,
`tableCSV`). The server's side (the check of a request, files, limits,
commits) is ``seriesserver.py``; the routes ``seriesapi.py``.
"""

import csv
import io

from reflservd import limits
from reflservd.errors import UnknownJob

DELETED = "DELETED"
"""The state a member deleted on its own is shown in."""


class Series:
    """One series as the queue keeps it: its members' job ids in order and
    each member's label (its data file's name)."""

    __slots__ = ("id", "name", "owner", "origin", "keyHash", "submitted", "members", "labels")

    def toJSON(self):
        return {"id": self.id, "name": self.name, "owner": self.owner, "submitted": self.submitted}


class SeriesBook:
    """The series of a queue, by id; applied from the ``series`` records."""

    def __init__(self):
        self.series = {}
        self.nextId = 1

    def get(self, seriesId):
        found = self.series.get(seriesId)
        if found is None:
            raise UnknownJob("no series %d" % (seriesId,))
        return found

    def reserveId(self):
        seriesId = self.nextId
        self.nextId += 1
        return seriesId

    def add(self, r):
        """Keep the series of a ``series`` record (its members are already jobs)."""
        series = Series()
        series.id, series.name, series.owner = r["id"], r["name"], r["owner"]
        series.origin, series.keyHash, series.submitted = r["origin"], r.get("keyHash"), r["time"]
        series.members = [member["id"] for member in r["members"]]
        series.labels = list(r["labels"])
        self.series[series.id] = series
        self.nextId = max(self.nextId, series.id + 1)

    def snapshot(self):
        """The series as JSON rows (a snapshot of the queue holds them)."""
        return [[s.id, s.name, s.owner, s.origin, s.keyHash, s.submitted, s.members, s.labels]
                for s in self.series.values()]

    def restore(self, rows):
        for row in rows:
            series = Series()
            (series.id, series.name, series.owner, series.origin, series.keyHash,
             series.submitted, series.members, series.labels) = row
            self.series[series.id] = series
            self.nextId = max(self.nextId, series.id + 1)


def memberRequest(job, args, label):
    """The request of one member: the shared one, its name telling the
    member, and for refl1d its model arguments (``data.args``)."""
    request = dict(job, name=("%s %s" % (job.get("name", ""), label)).strip()[:limits.MAX_FIELD])
    if args:
        request["data"] = dict(job["data"], args=args)
    return request


def memberLabel(args, files, index):
    """What a member is called in its series' table: its first model
    argument (its data file), else its first file, else its place."""
    return args[0] if args else files[0] if files else "#%d" % (index,)


def makeSeries(seriesId, now, name, origin, owner, keyHash, submits, labels):
    """The ``series`` record of members whose ``submits`` were made by
    ``queue.makeSubmit`` (in order), each given the series and a priority
    that counts the members before it."""
    for k, submit in enumerate(submits):
        submit["series"] = seriesId
        submit["priority"] += k
    return {"type": "series", "time": now, "id": seriesId, "name": name, "origin": origin,
            "owner": owner, "keyHash": keyHash, "members": submits, "labels": list(labels)}


def members(queue, series):
    """``[(index, jobId, label, job or None)]``, None for a deleted member."""
    jobs = queue.jobs
    return [(k, jobId, label, jobs.get(jobId))
            for k, (jobId, label) in enumerate(zip(series.members, series.labels), 1)]


def counts(queue, series):
    """How many members are in each state (``DELETED`` for those deleted)."""
    found = {}
    for _, _, _, job in members(queue, series):
        state = job.status if job is not None else DELETED
        found[state] = found.get(state, 0) + 1
    return found


def seriesRecord(queue, series):
    """The series as ``GET /api/v1/series/{id}`` answers it."""
    record = series.toJSON()
    record["total"] = len(series.members)
    record["counts"] = counts(queue, series)
    record["members"] = [{"member": k, "id": jobId, "data": label,
                          "status": job.status if job is not None else DELETED}
                         for k, jobId, label, job in members(queue, series)]
    return record


def table(queue, series):
    """One row per member: member, job id, data, status, χ² and every fitted
    parameter's value and uncertainty (from its result; None where it has
    none), and the parameters' labels in the order the members name them."""
    rows, labels, known = [], [], set()
    for k, jobId, label, job in members(queue, series):
        result = job.result if job is not None else None
        parameters = result.get("parameters") if isinstance(result, dict) else None
        fitted = {}
        if isinstance(parameters, dict):
            for name, fit in parameters.items():
                if isinstance(fit, dict):
                    fitted[name] = {"value": _number(fit.get("value")),
                                    "uncertainty": _number(fit.get("uncertainty"))}
                    if name not in known:
                        known.add(name)
                        labels.append(name)
        rows.append({"member": k, "id": jobId, "data": label,
                     "status": job.status if job is not None else DELETED,
                     "chisq": _number(result.get("chisq")) if isinstance(result, dict) else None,
                     "parameters": fitted})
    return {"id": series.id, "name": series.name, "parameters": labels, "rows": rows}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def tableCSV(answer):
    """The ``table`` as CSV text: a header, then a row per member. A text
    cell a spreadsheet would read as a formula (a data file or parameter
    named ``=HYPERLINK(…)``) starts with a ``'``, as OWASP advises, so that
    opening the table runs nothing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["member", "job", "data", "status", "chisq"]
    for name in answer["parameters"]:
        header += [name, name + " uncertainty"]
    writer.writerow([_text(cell) for cell in header])
    for row in answer["rows"]:
        cells = [row["member"], row["id"], _text(row["data"]), row["status"], _cell(row["chisq"])]
        for name in answer["parameters"]:
            fit = row["parameters"].get(name, {})
            cells += [_cell(fit.get("value")), _cell(fit.get("uncertainty"))]
        writer.writerow(cells)
    return out.getvalue()


def _cell(value):
    return "" if value is None else repr(float(value))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a CSV cell as a formula."""


def _text(value):
    value = str(value)
    return "'" + value if value.startswith(FORMULA_STARTS) else value
