"""Fit series (``reflservd.series``, ``seriesserver``, ``seriesapi``): the
domain on a Clock with the real journal run inline (one record for a whole
series, fair share, limits, refusals that change nothing, cancel, replay
after a restart), and the routes on a real loopback server with treq."""

import csv
import io
import json
import os

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from reflservd import errors
from reflservd import queue as Q
from reflservd import series as S
from reflservd.fitoptions import modelArgs
from reflservd.journal import Journal
from reflservd.seriesserver import SeriesDesk
from reflservd.limits import Quotas
from test.test_api import SCRIPT, ServerCase
from test.test_server import _comparable, makeServer, result, submit

MODEL = b"import sys\nfrom refl1d.names import *\n"


def countSeries(n):
    return {"job": {"name": "counts", "notify": "", "service": "count", "data": 0},
            "members": [{}] * n}


def fitSeries(names):
    document = {"job": {"name": "ni", "notify": "a@x", "service": "refl1d",
                        "data": {"model": "model.py", "options": {"fit": "lm"}}},
                "shared": ["model.py"],
                "members": [{"args": [name], "files": [name]} for name in names]}
    files = [("model.py", MODEL)] + [(name, b"# q R dR\n0.01 1 0.1\n") for name in names]
    return document, files


def journalRecords(stateDir):
    recovery = Journal(str(stateDir), Clock(), lock=False).load()
    return list(recovery.records)


def test_a_series_is_one_record_of_ordinary_jobs_that_count_toward_the_share(tmp_path):
    """A series of three is one ``series`` record; its members are PENDING
    jobs of its owner, each naming the series and its data file, sharing one
    key, with priorities counting the members before them (as three submits
    would); a later job of another owner goes before the series' second member."""
    server = makeServer(tmp_path, Clock())
    desk = SeriesDesk(server)
    document, files = fitSeries(["a.dat", "b.dat", "c.dat"])
    series, key = result(desk.submit(document, files, "10.0.0.1"))
    assert key and series.labels == ["a.dat", "b.dat", "c.dat"]
    members = [server.queue.jobs[i] for i in series.members]
    assert [j.status for j in members] == [Q.PENDING] * 3
    assert {j.series for j in members} == {series.id}
    assert [j.priority for j in members] == [0, 1, 2]
    assert len({j.keyHash for j in members}) == 1 and members[0].keyHash == series.keyHash
    assert server.readRequest(members[1].id)["data"] == {
        "model": "model.py", "options": {"fit": "lm"}, "args": ["b.dat"]}
    assert dict(server.store.files(members[1].id, "upload")) == {"model.py": len(MODEL), "b.dat": 20}
    other = result(server.submit({"name": "x", "notify": "", "service": "count", "data": 1}, [],
                                 "10.0.0.2"))[0]
    assert server.queue.pendingOrder() == [members[0].id, other.id, members[1].id, members[2].id]
    assert S.counts(server.queue, series) == {Q.PENDING: 3}
    result(server.stopService())
    kinds = [r["type"] for r in journalRecords(tmp_path)]
    assert kinds == ["series", "submit"]


@pytest.mark.parametrize("every", [1000, 1])
def test_a_restart_replays_the_series_from_the_journal_or_a_snapshot(tmp_path, every):
    """After a restart (from the records, or from a snapshot) the series, its
    members and their states are as they were, and the next series id is new."""
    clock = Clock()
    server = makeServer(tmp_path, clock, snapshotEvery=every)
    desk = SeriesDesk(server)
    first, _ = result(desk.submit(countSeries(4), [], "10.0.0.1"))
    result(server.lease("q"))
    result(desk.cancel(first.id))
    before = _comparable(server.queue)
    result(server.stopService())
    server = makeServer(tmp_path, clock, snapshotEvery=every)
    assert _comparable(server.queue) == before
    again = server.queue.series.get(first.id)
    assert again.members == first.members and again.keyHash == first.keyHash
    assert S.counts(server.queue, again) == {Q.CANCEL: 4}
    second, _ = result(SeriesDesk(server).submit(countSeries(1), [], "10.0.0.1"))
    assert second.id == first.id + 1
    result(server.stopService())


def test_cancel_ends_every_member_that_has_not_ended(tmp_path):
    """Cancel acts on each member: PENDING ones end CANCEL, an ACTIVE one is
    asked to stop (its worker is told), one that had completed stays COMPLETE."""
    server = makeServer(tmp_path, Clock())
    desk = SeriesDesk(server)
    series, _ = result(desk.submit(countSeries(3), [], "10.0.0.1"))
    done = result(server.lease("q"))
    result(server.complete(done.id, done.lease, Q.COMPLETE, {"chisq": 1.0}))
    running = result(server.lease("q"))
    result(desk.cancel(series.id))
    assert S.counts(server.queue, series) == {Q.COMPLETE: 1, Q.CANCEL: 2}
    assert server.queue.jobs[running.id].cancelRequested
    assert server.heartbeat(running.id, running.lease) is True
    result(desk.cancel(series.id))      # again: nothing left to cancel, answered as it is
    result(server.stopService())


def test_delete_removes_every_member_and_its_files(tmp_path):
    server = makeServer(tmp_path, Clock())
    desk = SeriesDesk(server)
    document, files = fitSeries(["a.dat", "b.dat"])
    series, _ = result(desk.submit(document, files, "10.0.0.1"))
    result(server.delete(series.members[0]))        # a member alone, as any job
    assert S.counts(server.queue, series) == {S.DELETED: 1, Q.PENDING: 1}
    result(desk.delete(series.id))
    assert S.counts(server.queue, series) == {S.DELETED: 2}
    assert os.listdir(server.store.root) == []
    result(server.stopService())


def _nothingChanged(server, tmp_path):
    assert server.queue.jobs == {} and server.queue.series.series == {}
    assert os.listdir(server.store.root) == []


@pytest.mark.parametrize("change, says", [
    (lambda d, f: d.update(extra=1), "unknown series field"),
    (lambda d, f: d.update(members=[]), "at least one member"),
    (lambda d, f: d.update(members=[{}] * 1001), "at most 1000 members"),
    (lambda d, f: d["members"][1].update(args=["a\0b"]), "member 2: a model argument"),
    (lambda d, f: d["members"][1].update(args="b.dat"), "member 2: the model's args must be a list"),
    (lambda d, f: d["members"][0].update(args=[""]), "non-empty"),
    (lambda d, f: d["members"][0].update(data=1), "member 1 must be an object"),
    (lambda d, f: d["members"][1].update(files=["a.dat"]), "named twice"),
    (lambda d, f: d["members"][1].update(files=["../x"]), "file name"),
    (lambda d, f: d["job"]["data"].update(args=["x"]), "are its members'"),
    (lambda d, f: d["job"].update(data=1), "needs 'data'"),
    (lambda d, f: d["job"].update(service="fitter"), "never unpickles"),
    (lambda d, f: f.pop(), "was not sent"),
    (lambda d, f: f.append(("z.dat", b"1")), "neither 'shared' nor a member names it"),
    (lambda d, f: f.append(("b.dat", b"1")), "two files are named"),
    (lambda d, f: f.append(("big.dat", b"x" * 3000)) or d["shared"].append("big.dat"), "bytes"),
])
def test_bad_series_are_refused_saying_why_and_nothing_changes(tmp_path, change, says):
    server = makeServer(tmp_path, Clock(), quotas=Quotas(maxFileBytes=2000))
    document, files = fitSeries(["a.dat", "b.dat"])
    change(document, files)
    with pytest.raises(errors.Refused) as refused:
        result(SeriesDesk(server).submit(document, files, "10.0.0.1"))
    assert says in refused.value.message
    _nothingChanged(server, tmp_path)
    result(server.stopService())


def test_a_series_is_held_to_the_submitters_pending_limit_counting_every_member(tmp_path):
    """With --max-pending 5: a series of 6 is refused whole (it could never
    be taken); with 2 jobs pending a series of 4 waits (429) and changes
    nothing; one of 3 is taken, and fills the limit."""
    server = makeServer(tmp_path, Clock(), quotas=Quotas(maxPending=5))
    desk = SeriesDesk(server)
    with pytest.raises(errors.TooLarge) as refused:
        result(desk.submit(countSeries(6), [], "10.0.0.1"))
    assert "--max-pending" in refused.value.message
    _nothingChanged(server, tmp_path)
    submit(server), submit(server)
    with pytest.raises(errors.RateLimited) as limited:
        result(desk.submit(countSeries(4), [], "10.0.0.1"))
    assert "2 jobs pending" in limited.value.message
    assert len(server.queue.jobs) == 2 and server.queue.series.series == {}
    result(desk.submit(countSeries(3), [], "10.0.0.1"))
    assert server.queue.pendingOf("10.0.0.1") == 5
    result(server.stopService())


def test_a_series_with_an_address_is_mailed_once_when_its_last_member_ends(tmp_path):
    """Through the queue server: the members' starts and ends send nothing,
    the end of the last one sends the series' one mail to its address."""
    from reflservd.notify import Notifier
    from test.test_notify import Outbox
    outbox = Outbox()
    clock = Clock()
    server = makeServer(tmp_path, clock, notifier=Notifier(clock, "smtp", 25, "q@x.org", "http://q",
                                                            sendmail=outbox))
    document, files = fitSeries(["a.dat", "b.dat"])
    document["job"]["notify"] = "ann@example.org"
    result(SeriesDesk(server).submit(document, files, "10.0.0.1"))
    first, second = result(server.lease("q")), result(server.lease("q"))
    result(server.complete(first.id, first.lease, Q.COMPLETE, {"chisq": 1.5}))
    assert outbox.sent == []
    result(server.complete(second.id, second.lease, Q.ERROR, error="bad"))
    assert [mail["Subject"] for *_, mail in outbox.sent] == ["[reflservd] series 1 (ni) ended"]
    assert "1 COMPLETE, 1 ERROR" in outbox.sent[0][-1].get_content()
    result(server.stopService())


def test_the_table_has_a_row_per_member_with_chisq_and_each_parameter(tmp_path):
    server = makeServer(tmp_path, Clock())
    series, _ = result(SeriesDesk(server).submit(fitSeries(["a.dat", "b.dat", "c.dat"])[0],
                                                 fitSeries(["a.dat", "b.dat", "c.dat"])[1], "10.0.0.1"))
    for k, thickness in ((0, 100.5), (1, 101.5)):
        job = result(server.lease("q"))
        result(server.complete(job.id, job.lease, Q.COMPLETE, {"chisq": 1.0 + k, "parameters": {
            "thickness": {"value": thickness, "uncertainty": 0.5},
            "rough": {"value": 3.0, "uncertainty": None}}}))
    table = S.table(server.queue, series)
    assert table["parameters"] == ["thickness", "rough"]
    assert [(r["member"], r["data"], r["status"], r["chisq"]) for r in table["rows"]] == [
        (1, "a.dat", Q.COMPLETE, 1.0), (2, "b.dat", Q.COMPLETE, 2.0), (3, "c.dat", Q.PENDING, None)]
    assert table["rows"][1]["parameters"]["thickness"] == {"value": 101.5, "uncertainty": 0.5}
    lines = S.tableCSV(table).splitlines()
    assert lines[0] == "member,job,data,status,chisq,thickness,thickness uncertainty,rough,rough uncertainty"
    assert lines[1].split(",")[2:] == ["a.dat", "COMPLETE", "1.0", "100.5", "0.5", "3.0", ""]
    assert lines[3].split(",")[2:] == ["c.dat", "PENDING", "", "", "", "", ""]
    result(server.stopService())


def test_csv_cells_a_spreadsheet_would_run_start_with_a_quote():
    """A data file or parameter named like a formula is written as text in the
    table's CSV (a leading quote); numbers, negative ones too, stay numbers."""
    table = {"parameters": ["=cmd|' /C calc'!A0"], "rows": [
        {"member": 1, "id": 7, "data": "=HYPERLINK(\"http://x\")", "status": "COMPLETE", "chisq": 1.5,
         "parameters": {"=cmd|' /C calc'!A0": {"value": -2.5, "uncertainty": 0.1}}},
        {"member": 2, "id": 8, "data": "@SUM(A1)", "status": "PENDING", "chisq": None, "parameters": {}}]}
    rows = list(csv.reader(io.StringIO(S.tableCSV(table))))
    assert rows[0][5:] == ["'=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0 uncertainty"]
    assert rows[1][2:] == ["'=HYPERLINK(\"http://x\")", "COMPLETE", "1.5", "-2.5", "0.1"]
    assert rows[2][2] == "'@SUM(A1)"


def test_model_arguments_rules():
    assert modelArgs(None) == [] and modelArgs(["run-1.refl", "--x=1"]) == ["run-1.refl", "--x=1"]
    for bad in ("a", [1], [""], ["a\0"], ["x" * 1001], ["a"] * 101, ["\ud800"]):
        with pytest.raises(errors.Refused):
            modelArgs(bad)


class SeriesRouteTests(ServerCase):
    """The routes on a real server: submit (multipart and JSON), read, the
    tables, and control with the series' key only."""

    maxUpload = 100_000

    def multipart(self, document, files):
        boundary = "b0undary"
        parts = [b'--%s\r\nContent-Disposition: form-data; name="request"\r\n\r\n%s\r\n'
                 % (boundary.encode(), json.dumps(document).encode())]
        for name, content in files:
            parts.append(b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n%s\r\n'
                         % (boundary.encode(), name.encode(), content))
        parts.append(b"--%s--\r\n" % (boundary.encode(),))
        headers = {**SCRIPT, b"Content-Type": [b"multipart/form-data; boundary=" + boundary.encode()]}
        return b"".join(parts), headers

    @defer.inlineCallbacks
    def test_submit_read_and_control_a_series(self):
        body, headers = self.multipart(*fitSeries(["a.dat", "b.dat"]))
        code, answer, _ = yield self.call("POST", "/api/v1/series", data=body, headers=headers)
        self.assertEqual(code, 201, answer)
        seriesId, key = answer["id"], answer["key"]
        ids = [m["id"] for m in answer["members"]]
        self.assertEqual([m["data"] for m in answer["members"]], ["a.dat", "b.dat"])
        self.assertEqual(answer["counts"], {"PENDING": 2})
        code, job, _ = yield self.call("GET", "/api/v1/jobs/%d" % (ids[0],))
        self.assertEqual((job["series"], job["request"]["data"]["args"]), (seriesId, ["a.dat"]))
        code, table, _ = yield self.call("GET", "/api/v1/series/%d/table.json" % (seriesId,))
        self.assertEqual([r["status"] for r in table["rows"]], ["PENDING", "PENDING"])
        code, csv, response = yield self.call("GET", "/api/v1/series/%d/table.csv" % (seriesId,))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/csv; charset=utf-8"])
        self.assertTrue(csv.startswith(b"member,job,data,status,chisq\n1,"))
        for headers, code in (({}, 403), ({b"X-Job-Key": [b"not-it"]}, 403)):
            got, refused, _ = yield self.call("POST", "/api/v1/series/%d/cancel" % (seriesId,),
                                              headers={**SCRIPT, **headers})
            self.assertEqual(got, code)
            self.assertIn("needs its key", refused["error"])
        code, answer, _ = yield self.call("POST", "/api/v1/series/%d/cancel" % (seriesId,),
                                          headers={**SCRIPT, b"X-Job-Key": [key.encode()]})
        self.assertEqual((code, answer["counts"]), (200, {"CANCEL": 2}))
        code, answer, _ = yield self.call("DELETE", "/api/v1/series/%d" % (seriesId,),
                                          headers={**SCRIPT, b"X-Job-Key": [key.encode()]})
        self.assertEqual((code, answer["counts"]), (200, {"DELETED": 2}))
        code, _, _ = yield self.call("GET", "/api/v1/jobs/%d" % (ids[1],))
        self.assertEqual(code, 404)
        code, page, _ = yield self.call("GET", "/series/%d" % (seriesId,))
        self.assertEqual(code, 200)
        self.assertIn(b"2 members", page)

    @defer.inlineCallbacks
    def test_a_json_series_and_the_refusals_of_the_routes(self):
        code, answer, _ = yield self.call("POST", "/api/v1/series", json=countSeries(3), headers=SCRIPT)
        self.assertEqual((code, answer["total"]), (201, 3))
        code, answer, _ = yield self.call("POST", "/api/v1/series", json={"job": countSeries(1)["job"]}, headers=SCRIPT)
        self.assertEqual(code, 400)
        self.assertIn("'members'", answer["error"])
        code, answer, _ = yield self.call("GET", "/api/v1/series/99")
        self.assertEqual((code, answer["error"]), (404, "no series 99"))
        code, _, _ = yield self.call("GET", "/series/99")
        self.assertEqual(code, 404)


def test_a_single_jobs_model_arguments_are_checked_at_the_door(tmp_path):
    """A job may carry model arguments alone too (``refl1d model.py DATA``):
    held to the same rule at its submit, refused there with nothing stored."""
    server = makeServer(tmp_path, Clock())
    request = {"name": "x", "notify": "", "service": "refl1d",
               "data": {"model": "model.py", "args": ["run-1.dat", "a\0"]}}
    with pytest.raises(errors.Refused) as refused:
        result(server.submit(request, [("model.py", MODEL)], "10.0.0.1"))
    assert "a model argument" in refused.value.message
    _nothingChanged(server, tmp_path)
    request["data"]["args"] = ["run-1.dat"]
    job, _ = result(server.submit(request, [("model.py", MODEL)], "10.0.0.1"))
    assert server.readRequest(job.id)["data"]["args"] == ["run-1.dat"] and job.series is None
    result(server.stopService())


def test_reflq_submits_each_file_as_a_member_and_prints_the_series(server, worker, tmp_path):
    """``reflq submit MODEL SHARED --each 'run-*.dat'``: one member per file in
    natural order (run-2 before run-10), each with the model, the shared file
    and its own file, its file as the model's argument; ``reflq series`` prints
    the table (a member that a worker completed with its χ² and parameters),
    ``--csv`` the CSV, and ``--cancel`` cancels the rest with the key reflq kept."""
    from reflservd import cli
    from reflservd.client import Client
    from test.support import RESULT, writeModel

    worker.drain()
    model, data = writeModel(str(tmp_path / "fit"), ("run-1.dat", "run-10.dat", "run-2.dat", "shared.txt"))

    def reflq(*argv):
        out, err = io.StringIO(), io.StringIO()
        return cli.main(["--server", server.url] + list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()

    code, out, err = reflq("submit", model, data[3], "--each", str(tmp_path / "fit" / "run-*.dat"),
                           "--fit", "lm", "--steps", "20")
    assert code == 0, err
    seriesId = int(err.split()[1])
    assert "series %d submitted: 3 members" % (seriesId,) in err
    series = Client(server.url).series(seriesId)
    assert [m["data"] for m in series.record["members"]] == ["run-1.dat", "run-2.dat", "run-10.dat"]
    first = series.members[0]
    first.refresh()
    assert first.record["request"]["data"] == {"model": "nifilm.py", "options": {"fit": "lm", "steps": 20},
                                               "args": ["run-1.dat"]}
    assert sorted(f["name"] for f in first.files(kind="upload")) == ["nifilm.py", "run-1.dat", "shared.txt"]

    lease = worker.lease()
    assert lease["id"] == first.id and lease["request"]["data"]["args"] == ["run-1.dat"]
    worker.complete(lease, result=RESULT)
    code, out, err = reflq("series", str(seriesId))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MEMBER", "JOB", "DATA", "STATUS", "χ²", "Ni", "thickness", "Ni", "interface"]
    assert lines[1].split()[2:] == ["run-1.dat", "COMPLETE", "1.031", "100.12", "±", "0.31", "4.9"]
    assert lines[3].split()[2:] == ["run-10.dat", "PENDING", "-", "-", "-"]
    code, out, _ = reflq("series", str(seriesId), "--csv")
    assert out.splitlines()[1].split(",")[2:] == ["run-1.dat", "COMPLETE", "1.0312", "100.12", "0.31", "4.9", ""]
    code, out, err = reflq("series", str(seriesId), "--cancel")
    assert (code, out.strip()) == (0, "series %d: 2 cancel, 1 complete" % (seriesId,))
    code, _, err = reflq("series", "999999")
    assert code == 4 and "no series 999999" in err
