"""reflservd-journal reads a journal as it is, a server running or not, and
compacts one only when no server holds it."""

import io
import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from reflservd import journalctl
from reflservd.journal import Journal
from reflservd.journalfiles import segmentName, snapshotName
from reflservd.journalframes import encodeRecord, scanSegment
from reflservd.queue import Queue
from reflservd.queuesnapshot import queueFromSnapshot, snapshotOf

T0 = 1_700_000_000.0


def run(*argv):
    """(exit status, stdout, stderr) of the command line."""
    out, err = io.StringIO(), io.StringIO()
    status = journalctl.main([str(a) for a in argv], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def openJournal(stateDir, queue, **kwargs):
    journal = Journal(stateDir, Clock(), snapshotState=lambda: snapshotOf(queue),
                      runInThread=defer.maybeDeferred, **kwargs)
    journal.load()
    return journal


class Site:
    """A queue and its journal, changed the way the server changes them:
    make a record, apply it, append it."""

    def __init__(self, stateDir, **kwargs):
        self.stateDir = stateDir
        self.queue = Queue()
        self.journal = openJournal(stateDir, self.queue, **kwargs)
        self.records = []

    def commit(self, record):
        self.queue.apply(record)
        self.journal.append(record)
        self.records.append(record)

    def submit(self, owner, now):
        jobId = self.queue.reserveId()
        self.commit(self.queue.makeSubmit(jobId, now, "fit %d" % (jobId,), owner, "127.0.0.1",
                                          "refl1d", "1", {"model.py": 10}, owner=owner))
        return jobId

    def lease(self, now):
        record = self.queue.makeLease(now, "cluster-a", worker="w1")
        self.commit(record)
        return record

    def close(self):
        self.journal.close()


def buildSite(stateDir, **kwargs):
    """Five jobs of two owners; one leased and completed, one cancelled."""
    site = Site(str(stateDir), **kwargs)
    for i, owner in enumerate(["ann", "ann", "bob", "ann", "cy"]):
        site.submit(owner, T0 + i)
    lease = site.lease(T0 + 10)
    site.commit(site.queue.makeComplete(lease["id"], lease["lease"], T0 + 11, "COMPLETE",
                                        result={"chisq": 1.0}))
    site.commit(site.queue.makeCancel(4, T0 + 12))
    return site


def segmentBytes(stateDir, number=0):
    with open(os.path.join(stateDir, "journal", segmentName(number)), "rb") as f:
        return f.read()


def offsets(data):
    """The offset of each whole record in a segment's bytes."""
    found, offset = [], 0
    while offset < scanSegment(data).end:
        found.append(offset)
        offset += 8 + int.from_bytes(data[offset:offset + 4], "big")
    return found


# ---- verify


def test_verifyCleanJournal(tmp_path):
    """verify exits 0 and counts the records when every record is whole."""
    site = buildSite(tmp_path)
    site.close()
    status, out, _ = run(tmp_path, "verify")
    assert status == 0 and "ok: %d whole records in 1 segments" % (len(site.records),) in out


def test_verifyNamesTheFirstBadRecord(tmp_path):
    """A flipped byte in the middle: verify exits non-zero and prints the
    segment file and byte offset of the damaged record."""
    site = buildSite(tmp_path)
    site.close()
    data = segmentBytes(str(tmp_path))
    third = offsets(data)[2]
    path = tmp_path / "journal" / segmentName(0)
    with open(path, "r+b") as f:
        f.seek(third + 20)
        f.write(b"#")
    status, out, _ = run(tmp_path, "verify")
    assert status == 1
    assert "first bad: segment-000000.log:%d: checksum mismatch" % (third,) in out


def test_verifyReportsADamagedSnapshot(tmp_path):
    site = buildSite(tmp_path)
    assert site.journal.snapshot().called
    site.close()
    with open(tmp_path / "journal" / snapshotName(1), "ab") as f:
        f.write(b" ")
    status, out, _ = run(tmp_path, "verify")
    assert status == 1 and "snapshot-000001.json: not whole" in out


def test_verifyToleratesTheTailOfARunningServer(tmp_path):
    """While a server holds the directory, an incomplete last record is a
    write in progress (exit 0, said so); with no server it is damage."""
    site = buildSite(tmp_path)
    site.close()
    path = tmp_path / "journal" / segmentName(0)
    with open(path, "ab") as f:
        f.write(encodeRecord({"type": "cancel", "time": T0 + 20, "id": 2})[:11])
    status, out, _ = run(tmp_path, "verify")
    assert status == 1 and "incomplete record" in out
    server = Journal(str(tmp_path), Clock(), runInThread=defer.maybeDeferred)
    try:
        status, out, _ = run(tmp_path, "verify")
        assert status == 0 and "being written (server pid %d)" % (os.getpid(),) in out
    finally:
        server.close()


# ---- dump


def test_dumpPrintsALinePerRecordWithItsOffset(tmp_path):
    """dump: segment:offset, ISO time, type, job id, summary, one per record."""
    site = buildSite(tmp_path)
    site.close()
    status, out, _ = run(tmp_path, "dump")
    lines = out.splitlines()
    assert status == 0 and len(lines) == len(site.records)
    expected = ["segment-000000.log:%d" % (o,) for o in offsets(segmentBytes(str(tmp_path)))]
    assert [line.split()[0] for line in lines] == expected
    first = lines[0].split()
    assert first[2:4] == ["submit", "1"] and first[1].startswith("2023-11-")
    assert "owner=\"ann\"" in lines[0]
    complete = [line for line in lines if line.split()[2] == "complete"]
    assert len(complete) == 1 and ' result={"' in complete[0]     # the result as JSON, not a quoted string


def test_dumpFilters(tmp_path):
    """--job, --type and --since keep only the matching records."""
    site = buildSite(tmp_path)
    site.close()
    _, out, _ = run(tmp_path, "dump", "--job", "4")
    assert [line.split()[2] for line in out.splitlines()] == ["submit", "cancel"]
    _, out, _ = run(tmp_path, "dump", "--type", "lease", "--type", "complete")
    assert [line.split()[2] for line in out.splitlines()] == ["lease", "complete"]
    _, out, _ = run(tmp_path, "dump", "--since", T0 + 10.5)
    assert [line.split()[2] for line in out.splitlines()] == ["complete", "cancel"]
    iso = journalctl.isoTime(T0 + 3)
    _, out, _ = run(tmp_path, "dump", "--since", iso, "--type", "submit")
    assert [line.split()[3] for line in out.splitlines()] == ["4", "5"]


def test_dumpJsonAddsTheOffsetFields(tmp_path):
    """--json prints each record as it was appended, plus _segment and _offset."""
    site = buildSite(tmp_path)
    site.close()
    _, out, _ = run(tmp_path, "dump", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.pop("_offset") for r in rows] == offsets(segmentBytes(str(tmp_path)))
    assert {r.pop("_segment") for r in rows} == {segmentName(0)}
    assert rows == site.records


def test_readOnlyCommandsWorkWhileAServerHoldsTheDirectory(tmp_path):
    site = buildSite(tmp_path)
    site.commit(site.queue.makeCancel(5, T0 + 30))
    try:
        status, out, _ = run(tmp_path, "dump", "--job", "5")
        assert status == 0
        assert [line.split()[2] for line in out.splitlines()] == ["submit", "cancel"]
        assert run(tmp_path, "stats")[0] == 0
        assert run(tmp_path, "replay")[0] == 0
    finally:
        site.close()


# ---- stats


def test_statsCountsByTypeAndShowsTheSnapshot(tmp_path):
    site = buildSite(tmp_path)
    site.journal.snapshot()
    site.commit(site.queue.makeCancel(5, T0 + 30))
    site.close()
    status, out, _ = run(tmp_path, "stats", "--json")
    report = json.loads(out)
    assert status == 0
    assert {k: v["records"] for k, v in report["byType"].items()} == {
        "submit": 5, "lease": 1, "complete": 1, "cancel": 2}
    assert sum(v["bytes"] for v in report["byType"].values()) == report["segmentBytes"]
    assert report["snapshot"]["name"] == snapshotName(1) and report["snapshot"]["jobs"] == 5
    assert report["recordsSinceSnapshot"] == 1
    status, out, _ = run(tmp_path, "stats")
    assert "snapshot: snapshot-000001.json" in out and "5 jobs" in out


# ---- replay


def stateOf(queue):
    return {"counts": {s: n for s, n in queue.counts().items() if n},
            "pendingOrder": queue.pendingOrder()}


def replayJson(stateDir, *args):
    status, out, err = run(stateDir, "replay", "--json", *args)
    assert status == 0, err
    return json.loads(out)


def test_replayToTheEndIsTheLiveState(tmp_path):
    """With snapshots and trimming along the way, replay gives the queue's
    own counts and pending order."""
    site = buildSite(tmp_path, snapshotEvery=3)
    site.close()
    result = replayJson(tmp_path)
    assert {k: result[k] for k in ("counts", "pendingOrder")} == stateOf(site.queue)
    assert result["snapshot"] is not None
    status, out, _ = run(tmp_path, "replay")
    assert "pending order: %s" % (" ".join(map(str, site.queue.pendingOrder())),) in out


def test_replayAtAnOffsetOrATime(tmp_path):
    """--at SEGMENT:OFFSET is the state right after that record; --at TIME
    the state after every record up to that time."""
    site = buildSite(tmp_path)
    site.close()
    prefix = Queue()
    for record in site.records[:6]:
        prefix.apply(record)
    sixth = offsets(segmentBytes(str(tmp_path)))[5]
    result = replayJson(tmp_path, "--at", "%s:%d" % (segmentName(0), sixth))
    assert {k: result[k] for k in ("counts", "pendingOrder")} == stateOf(prefix)
    assert result["records"] == 6
    result = replayJson(tmp_path, "--at", T0 + 10.5)
    assert result["records"] == 6 and result["counts"] == stateOf(prefix)["counts"]
    result = replayJson(tmp_path, "--at", "0:%d" % (sixth,))
    assert result["records"] == 6


def test_replayBeforeTrimmedHistoryIsRefused(tmp_path):
    site = buildSite(tmp_path, keepSnapshots=1)
    site.journal.snapshot()
    site.close()
    status, _, err = run(tmp_path, "replay", "--at", T0 + 1)
    assert status == 1 and "trimmed" in err


# ---- compact


def test_compactRefusesWhileAServerHoldsTheDirectory(tmp_path):
    site = buildSite(tmp_path)
    try:
        status, _, err = run(tmp_path, "compact")
        assert status == journalctl.EXIT_LOCKED
        assert "refusing to compact" in err and "pid %d" % (os.getpid(),) in err
    finally:
        site.close()
    assert sorted(os.listdir(tmp_path / "journal")) == ["format", "lock", segmentName(0)]


def test_compactSnapshotsAndTrims(tmp_path):
    """compact leaves one snapshot and an empty segment holding the same
    state, and a server can start from them."""
    site = buildSite(tmp_path, snapshotEvery=3)
    site.close()
    status, out, err = run(tmp_path, "compact")
    assert status == 0, err
    segments = sorted(n for n in os.listdir(tmp_path / "journal") if n.startswith("segment"))
    snapshots = sorted(n for n in os.listdir(tmp_path / "journal") if n.startswith("snapshot"))
    assert len(segments) == 1 and len(snapshots) == 1 and "compacted" in out
    assert os.path.getsize(tmp_path / "journal" / segments[0]) == 0
    result = replayJson(tmp_path)
    assert {k: result[k] for k in ("counts", "pendingOrder")} == stateOf(site.queue)
    journal = Journal(str(tmp_path), Clock(), runInThread=defer.maybeDeferred)
    try:
        recovery = journal.load()
        assert list(recovery.records) == []
        assert stateOf(queueFromSnapshot(recovery.snapshot)) == stateOf(site.queue)
    finally:
        journal.close()
    assert run(tmp_path, "verify")[0] == 0


# ---- the command line


def test_badTimeIsAClearError(tmp_path):
    site = buildSite(tmp_path)
    site.close()
    status, _, err = run(tmp_path, "dump", "--since", "yesterday")
    assert status == 1 and "'yesterday' is neither" in err


def test_missingJournalIsAClearError(tmp_path):
    status, _, err = run(tmp_path / "nothing", "stats")
    assert status == 1 and "has no journal" in err


@pytest.mark.parametrize("text,point", [
    ("segment-000003.log:1234", ("offset", 3, 1234)),
    ("3:1234", ("offset", 3, 1234)),
    ("1700000000.5", ("time", 1700000000.5)),
    ("2023-11-14T22:13:20+00:00", ("time", 1700000000.0)),
])
def test_parsePoint(text, point):
    assert journalctl.parsePoint(text) == point
