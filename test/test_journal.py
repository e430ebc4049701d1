"""The journal keeps what it acknowledged: framing, group commit, torn tails,
snapshots, disk failures and the state-directory lock, on real files."""

import errno
import json
import os
import shutil
import threading
import time
import zlib
from collections import deque

import pytest
from hypothesis import example, given, settings, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from reflservd import journalfiles, journalframes
from reflservd.journal import Journal
from reflservd.journalfiles import (
    JournalLocked, JournalWriteError, salvageJournal, segmentName, snapshotName)
from reflservd.journalframes import decodePayload, encodeRecord, iterFrames, scanSegment
from reflservd.journalrecovery import JournalCorrupt


# ---- helpers


class ManualRunner:
    """Stands in for the writer thread: work waits until the test runs it,
    so a test can append while a flush is "in progress"."""

    def __init__(self):
        self.calls = deque()

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runNext(self):
        f, args, d = self.calls.popleft()
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def runAll(self):
        while self.calls:
            self.runNext()


class CountingFsync:
    """os.fsync that counts, and notes how many acknowledgements had fired
    when each fsync began."""

    def __init__(self, fired=None):
        self.calls = 0
        self.firedAtCall = []
        self.fired = fired

    def __call__(self, fd):
        self.calls += 1
        if self.fired is not None:
            self.firedAtCall.append(len(self.fired))
        os.fsync(fd)


def inlineJournal(stateDir, **kwargs):
    kwargs.setdefault("runInThread", defer.maybeDeferred)
    return Journal(stateDir, kwargs.pop("reactor", Clock()), **kwargs)


def results(deferreds):
    """The outcome of each Deferred: None, a Failure, or "waiting"."""
    out = []
    for d in deferreds:
        box = []
        d.addBoth(lambda r, box=box: box.append(r) or None)
        out.append(box[0] if box else "waiting")
    return out


def waitFor(d, timeout=30.0):
    """Spin the global reactor until ``d`` fires (bounded); its result."""
    from twisted.internet import reactor
    box = []
    d.addBoth(box.append)
    deadline = time.monotonic() + timeout
    while not box and time.monotonic() < deadline:
        reactor.iterate(0.01)
    assert box, "the Deferred did not fire within %s s" % (timeout,)
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def segmentPath(stateDir, number):
    return os.path.join(stateDir, "journal", segmentName(number))


def readRecords(stateDir, **kwargs):
    journal = Journal(stateDir, Clock(), lock=False, **kwargs)
    recovery = journal.load()
    return recovery, list(recovery.records)


# ---- framing


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(st.integers(), st.floats(allow_nan=False), st.text(), st.none(),
              st.lists(st.integers(), max_size=3)),
    max_size=5), min_size=1, max_size=20))
def test_framingRoundTrip(fields):
    """Every record framed by encodeRecord is found whole by scanSegment and
    decodes to the same dict, in order."""
    records = [dict(f, type="t", time=1.5) for f in fields]
    data = b"".join(encodeRecord(r) for r in records)
    scan = scanSegment(data)
    assert (scan.count, scan.end, scan.error) == (len(records), len(data), None)
    assert [decodePayload(p) for _, p in iterFrames(data, scan.end)] == records


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 80, max_value=2 ** 80)
    | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=12),
       st.integers(min_value=1, max_value=5))
def test_decodeRecordsRoundTripsAnyJSON(fields, chunk):
    """Records of any JSON (nested, integers past 64 bits, infinities, any
    text) come back from decodeRecords as they were encoded, whatever the
    chunk size of its batched decoding."""
    records = [dict(f, type="t") for f in fields]
    data = b"".join(encodeRecord(r) for r in records)
    scan = scanSegment(data)
    assert (scan.count, scan.end, scan.error) == (len(records), len(data), None)
    assert list(journalframes.decodeRecords(data, scan.end, chunk=chunk)) == records


def _frame(payload):
    return journalframes.HEADER.pack(len(payload), zlib.crc32(payload)) + payload


segments = st.builds(
    lambda frames, tail: b"".join(frames) + tail,
    st.lists(st.one_of(
        st.binary(min_size=1, max_size=40).map(_frame),
        json_values.map(lambda v: _frame(json.dumps(v).encode())),
        st.dictionaries(st.text(max_size=5), json_values, max_size=3).map(
            lambda d: encodeRecord(dict(d, type="t")))), max_size=6),
    st.binary(max_size=20))


@settings(max_examples=300, deadline=None)
@given(segments | st.binary(max_size=200))
@example(_frame(b"[" * 100_000))
@example(_frame(b'{"type":"t","x":' + b"[" * 100_000 + b"}"))
@example(_frame(b'{"type":"\\ud800"}') + _frame(b"\xff\xfe"))
@example(_frame(b"NaN") + _frame(b'{"type":1e999}'))
def test_anyBytesScanAndDecodeWithinTheDocumentedErrors(data):
    """Any bytes scan without an exception: the whole frames found end at
    ``end``, ``error`` says why what follows is not one (None when nothing
    does); decoding those frames gives records (dicts with a type) or raises
    ValueError, never anything else."""
    scan = scanSegment(data)
    assert 0 <= scan.end <= len(data)
    assert (scan.error is None) == (scan.end == len(data))
    assert scan.count == len(list(iterFrames(data, scan.end)))
    if scan.error is not None:
        assert journalframes.checkFrame(data, scan.end) == scan.error
    for decode in (lambda: list(journalframes.decodeRecords(data, scan.end, chunk=2)),
                   lambda: [decodePayload(p) for _, p in iterFrames(data, scan.end)]):
        try:
            records = decode()
        except ValueError:
            continue
        assert all(isinstance(r, dict) and "type" in r for r in records)


def test_aPayloadNestedTooDeeplyIsAValueError():
    """A checked frame holding 100,000 ``[`` (past orjson's depth limit and the
    standard library's recursion) is refused as not a record, a ValueError,
    not a RecursionError that would escape the replay's handling."""
    data = _frame(b"[" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        journalframes.parseJSON(b"[" * 100_000)
    with pytest.raises(ValueError):
        list(journalframes.decodeRecords(data, scanSegment(data).end))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=3), min_size=1, max_size=8),
       st.data())
def test_aCutOrAFlippedByteLosesOnlyWhatFollowsIt(fields, data):
    """A segment cut anywhere keeps exactly the records wholly before the
    cut; one with a byte changed keeps the records before that byte and none
    changed (the checksum catches it)."""
    records = [dict(f, type="t") for f in fields]
    frames = [encodeRecord(r) for r in records]
    whole = b"".join(frames)
    ends = [sum(len(f) for f in frames[:i + 1]) for i in range(len(frames))]
    cut = data.draw(st.integers(min_value=0, max_value=len(whole)), label="cut")
    scan = scanSegment(whole[:cut])
    assert scan.count == sum(1 for end in ends if end <= cut)
    assert list(journalframes.decodeRecords(whole, scan.end)) == records[:scan.count]
    at = data.draw(st.integers(min_value=0, max_value=len(whole) - 1), label="at")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="flip")
    damaged = bytearray(whole)
    damaged[at] ^= flip
    scan = scanSegment(bytes(damaged))
    before = sum(1 for end in ends if end <= at)
    assert scan.count == before and scan.error is not None
    assert list(journalframes.decodeRecords(bytes(damaged), scan.end)) == records[:before]


def test_frameLayout():
    """A frame is a big-endian length, the crc32 of the payload, then compact JSON."""
    frame = encodeRecord({"type": "submit", "time": 1.0, "id": 7})
    payload = b'{"type":"submit","time":1.0,"id":7}'
    assert frame[:4] == len(payload).to_bytes(4, "big")
    assert frame[4:8] == zlib.crc32(payload).to_bytes(4, "big")
    assert frame[8:] == payload


def test_zeroFilledTailIsNotARecord():
    """Zeros where a crash extended the file are never mistaken for a record."""
    data = encodeRecord({"type": "t", "time": 0}) + b"\0" * 64
    scan = scanSegment(data)
    assert scan.count == 1 and scan.error is not None


def test_appendThenLoadReturnsTheRecords(tmp_path):
    """Appended records come back from load in order, with "time" set from
    the reactor where the caller gave none."""
    clock = Clock()
    clock.advance(1000)
    journal = inlineJournal(str(tmp_path), reactor=clock)
    journal.load()
    fired = results([journal.append({"type": "submit", "id": 1}),
                     journal.append({"type": "lease", "id": 1, "time": 5.0})])
    assert fired == [None, None]
    results([journal.close()])
    _, records = readRecords(str(tmp_path))
    assert records == [{"type": "submit", "id": 1, "time": 1000.0},
                       {"type": "lease", "id": 1, "time": 5.0}]


def test_recordsOrjsonRefusesComeBackAsWritten(tmp_path):
    """Replay decodes with orjson, and falls back to the standard library for
    what it refuses: NaN and infinities (a failed fit's χ²), a lone
    surrogate, an integer past 64 bits. Each record comes back as written,
    alone or among ordinary ones."""
    journal = inlineJournal(str(tmp_path))
    journal.load()
    odd = [{"type": "complete", "id": 1, "result": {"chisq": float("inf")}},
           {"type": "complete", "id": 2, "error": "\ud800 lone"},
           {"type": "submit", "id": 3, "big": 2 ** 70, "small": -2 ** 63 - 1},
           {"type": "complete", "id": 4, "result": {"chisq": float("nan")}}]
    plain = [{"type": "submit", "id": 10 + i} for i in range(3)]
    assert results([journal.append(dict(r, time=1.0)) for r in plain + odd]) == [None] * 7
    results([journal.close()])
    _, records = readRecords(str(tmp_path))
    assert [r["id"] for r in records] == [10, 11, 12, 1, 2, 3, 4]
    assert records[3]["result"]["chisq"] == float("inf")
    assert records[4]["error"] == "\ud800 lone" and records[5]["big"] == 2 ** 70
    assert records[5]["small"] == -2 ** 63 - 1 and isinstance(records[5]["small"], int)
    assert records[6]["result"]["chisq"] != records[6]["result"]["chisq"]   # NaN


def test_anIntegerPast64BitsAloneInARecordComesBackExact():
    """orjson reads 2**64 + 1 as the float 1.8446744073709552e+19: a record
    whose only long number is positive is decoded by the standard library
    too, and comes back as the integer written, in a batch or alone."""
    records = [{"type": "complete", "id": 1, "result": {"n": 2 ** 64 + 1}},
               {"type": "complete", "id": 2, "result": [10 ** 25, -(2 ** 63) - 1]}]
    for record in records:
        assert journalframes.parseJSON(encodeRecord(record)[8:]) == record
    data = b"".join(encodeRecord(r) for r in records)
    decoded = list(journalframes.decodeRecords(data, len(data)))
    assert decoded == records and isinstance(decoded[0]["result"]["n"], int)


def test_appendRefusesARecordWithoutType(tmp_path):
    journal = inlineJournal(str(tmp_path))
    journal.load()
    with pytest.raises(ValueError):
        journal.append({"id": 1})


# ---- group commit


def test_groupCommitOneFsyncPerBatch(tmp_path):
    """Records appended while a flush is in progress go in the next flush
    together: 100 records cost 2 fsyncs, and no record is acknowledged
    before the fsync of its batch."""
    fired = []
    fsync = CountingFsync(fired)
    runner = ManualRunner()
    journal = inlineJournal(str(tmp_path), runInThread=runner, fsync=fsync)
    journal.load()
    batches = []
    journal.onBatch = lambda size, seconds: batches.append(size)
    deferreds = [journal.append({"type": "t", "i": i}) for i in range(100)]
    for d in deferreds:
        d.addCallback(fired.append)
    assert len(runner.calls) == 1 and fired == []
    runner.runNext()
    assert fsync.calls == 1 and len(fired) == 1
    assert fsync.firedAtCall == [0]
    runner.runNext()
    assert fsync.calls == 2 and len(fired) == 100
    assert fsync.firedAtCall == [0, 1]
    assert batches == [1, 99]
    runner.runAll()
    results([journal.close()])
    assert [r["i"] for r in readRecords(str(tmp_path))[1]] == list(range(100))


def test_aBatchNamingFilesIsWrittenAfterOneSyncOfTheStore(tmp_path):
    """Records appended with ``syncFirst`` reach the segment only after the
    journal's ``syncFirst`` callable ran, once for their whole batch; a batch
    without such records does not call it."""
    events = []

    def sync():
        events.append(("sync", os.path.getsize(segmentPath(str(tmp_path), 0))))

    def fsync(fd):
        events.append(("fsync", None))
        os.fsync(fd)

    runner = ManualRunner()
    journal = inlineJournal(str(tmp_path), runInThread=runner, fsync=fsync, syncFirst=sync)
    journal.load()
    first = journal.append({"type": "t", "i": 0})
    named = [journal.append({"type": "t", "i": i}, syncFirst=(i % 2 == 0)) for i in range(1, 6)]
    runner.runNext()
    assert events == [("fsync", None)] and results([first]) == [None]
    runner.runNext()
    # The second batch (five records) had its one sync before any of its bytes.
    assert events[1:] == [("sync", len(encodeRecord({"type": "t", "i": 0, "time": 0.0}))),
                          ("fsync", None)]
    assert results(named) == [None] * 5
    results([journal.close()])
    assert [r["i"] for r in readRecords(str(tmp_path))[1]] == list(range(6))


def test_aFailedSyncOfTheStoreIsAWriteError(tmp_path):
    """When the store cannot be synced (EIO), the batch naming its files is
    refused as a failed write is, and no byte of it is in the segment."""
    stateDir = str(tmp_path)
    broken = {"on": True}

    def sync():
        if broken["on"]:
            raise OSError(errno.EIO, "Input/output error")

    journal = inlineJournal(stateDir, syncFirst=sync)
    journal.load()
    outcome = results([journal.append({"type": "submit", "id": 1}, syncFirst=True)])
    assert outcome[0].check(JournalWriteError)
    assert "job files" in str(outcome[0].value)
    assert os.path.getsize(segmentPath(stateDir, 0)) == 0
    broken["on"] = False
    assert results([journal.append({"type": "submit", "id": 2}, syncFirst=True)]) == [None]
    results([journal.close()])
    assert [r["id"] for r in readRecords(stateDir)[1]] == [2]


def test_aRecordWaitsForItsFilesThenItsBatchSyncs(tmp_path):
    """A record appended ``after`` a Deferred (its job's files, written by
    the store) is written once that fires, in a batch that syncs first; one
    whose files fail refuses its batch (JournalWriteError), even for a bug
    (not an OSError), and the journal goes on."""
    events = []
    runner = ManualRunner()
    journal = inlineJournal(str(tmp_path), runInThread=runner, syncFirst=lambda: events.append("sync"))
    journal.load()
    files = {i: defer.Deferred() for i in range(1, 7)}
    first = journal.append({"type": "submit", "id": 1}, after=files[1])
    assert not runner.calls                 # the batch waits for job 1's files
    files[1].callback(None)
    later = [journal.append({"type": "submit", "id": i}, after=files[i]) for i in (2, 3)]
    runner.runNext()                        # the writer, for job 1's batch
    assert events == ["sync"] and results([first]) == [None]
    assert not runner.calls                 # jobs 2 and 3 wait for their files, together
    files[2].callback(None)
    files[3].callback(None)
    runner.runAll()
    assert results(later) == [None, None] and events == ["sync", "sync"]
    refused = journal.append({"type": "submit", "id": 4}, after=files[4])
    files[4].errback(OSError(errno.ENOSPC, "No space left on device"))
    runner.runAll()
    assert results([refused])[0].check(JournalWriteError)
    broken = journal.append({"type": "submit", "id": 6}, after=files[6])
    files[6].errback(TypeError("a bug"))
    runner.runAll()
    assert "a bug" in str(results([broken])[0].value)
    after = journal.append({"type": "submit", "id": 5})
    runner.runAll()
    assert results([after]) == [None]
    closed = journal.close()
    runner.runAll()
    results([closed])
    assert [r["id"] for r in readRecords(str(tmp_path))[1]] == [1, 2, 3, 5]


def test_groupCommitOnTheWriterThread(tmp_path):
    """With the real writer thread and reactor: while one fsync is held up,
    200 appends queue and then reach the disk in one more batch; the reactor
    thread never waits for the disk."""
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slowFsync(fd):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            assert release.wait(30)
        os.fsync(fd)

    from twisted.internet import reactor
    journal = Journal(str(tmp_path), reactor, fsync=slowFsync)
    journal.load()
    try:
        first = journal.append({"type": "t", "i": 0})
        assert entered.wait(30)
        rest = [journal.append({"type": "t", "i": i}) for i in range(1, 201)]
        assert not first.called and not any(d.called for d in rest)
        release.set()
        waitFor(defer.gatherResults([first] + rest))
        assert len(calls) == 2
        assert threading.current_thread().name not in calls
    finally:
        release.set()
        waitFor(journal.close())
    assert [r["i"] for r in readRecords(str(tmp_path))[1]] == list(range(201))


# ---- torn tails


def writeJournal(stateDir, count):
    journal = inlineJournal(stateDir)
    journal.load()
    results([journal.append({"type": "t", "i": i, "time": float(i)}) for i in range(count)])
    results([journal.close()])
    with open(segmentPath(stateDir, 0), "rb") as f:
        return f.read()


def test_tornTailAtEveryCutOfTheLastRecord(tmp_path):
    """Whichever byte a crash cut the last record at, load keeps every whole
    record, sets the torn bytes aside, truncates, and the next append
    follows the last whole record."""
    original = str(tmp_path / "original")
    data = writeJournal(original, 3)
    lastStart = scanSegment(data[:-1]).end
    for cut in range(lastStart, len(data)):
        stateDir = str(tmp_path / ("cut%d" % (cut,)))
        shutil.copytree(original, stateDir)
        with open(segmentPath(stateDir, 0), "r+b") as f:
            f.truncate(cut)
        journal = inlineJournal(stateDir)
        recovery = journal.load()
        assert [r["i"] for r in recovery.records] == [0, 1]
        aside = segmentPath(stateDir, 0)[:-4] + ".torn-%d" % (lastStart,)
        if cut == lastStart:
            assert recovery.torn == [] and not os.path.exists(aside)
        else:
            assert len(recovery.torn) == 1 and "offset %d" % (lastStart,) in recovery.torn[0]
            with open(aside, "rb") as f:
                assert f.read() == data[lastStart:cut]
        assert os.path.getsize(segmentPath(stateDir, 0)) == lastStart
        results([journal.append({"type": "t", "i": 99})])
        results([journal.close()])
        assert [r["i"] for r in readRecords(stateDir)[1]] == [0, 1, 99]


def test_garbageTailIsSetAside(tmp_path):
    """Zeros after the last whole record (a crash after the file grew) are
    set aside like any torn tail."""
    stateDir = str(tmp_path)
    data = writeJournal(stateDir, 2)
    with open(segmentPath(stateDir, 0), "ab") as f:
        f.write(b"\0" * 100)
    journal = inlineJournal(stateDir)
    recovery = journal.load()
    assert len(list(recovery.records)) == 2 and len(recovery.torn) == 1
    assert os.path.getsize(segmentPath(stateDir, 0)) == len(data)
    results([journal.close()])


def test_readOnlyLoadLeavesATornTailInPlace(tmp_path):
    """lock=False reads the whole records and writes nothing, even where a
    tail is torn (it may be a write in progress)."""
    stateDir = str(tmp_path)
    data = writeJournal(stateDir, 3)
    with open(segmentPath(stateDir, 0), "r+b") as f:
        f.truncate(len(data) - 3)
    before = sorted(os.listdir(os.path.join(stateDir, "journal")))
    recovery, records = readRecords(stateDir)
    assert [r["i"] for r in records] == [0, 1] and "read-only" in recovery.torn[0]
    assert sorted(os.listdir(os.path.join(stateDir, "journal"))) == before
    assert os.path.getsize(segmentPath(stateDir, 0)) == len(data) - 3


def test_badChecksumInTheMiddleOfTheLastSegmentRefusesToLoadUntilSalvaged(tmp_path):
    """A damaged record with whole records after it is not a torn last
    write but damage to acknowledged records: load refuses, naming the
    offset, ``verify`` and ``--salvage``; ``salvageJournal`` then keeps the
    records before it and sets the rest aside (nothing is deleted)."""
    stateDir = str(tmp_path)
    data = writeJournal(stateDir, 5)
    second = len(encodeRecord({"type": "t", "i": 0, "time": 0.0}))
    with open(segmentPath(stateDir, 0), "r+b") as f:
        f.seek(second + 12)
        f.write(b"X")
    with pytest.raises(JournalCorrupt) as raised:
        inlineJournal(stateDir).load()
    message = str(raised.value)
    assert ":%d: checksum mismatch" % (second,) in message and "3 whole records" in message
    assert "verify" in message and "--salvage" in message
    assert (raised.value.segment, raised.value.offset) == (0, second)
    assert os.path.getsize(segmentPath(stateDir, 0)) == len(data)     # refused: untouched
    aside = salvageJournal(stateDir, 0, second)
    assert aside == ["segment-000000.log.salvaged-%d" % (second,)]
    damaged = data[:second + 12] + b"X" + data[second + 13:]
    with open(os.path.join(stateDir, "journal", aside[0]), "rb") as f:
        assert f.read() == damaged[second:]
    journal = inlineJournal(stateDir)
    assert [r["i"] for r in journal.load().records] == [0]
    results([journal.close()])


def test_badRecordInAnEarlierSegmentRefusesToLoad(tmp_path):
    """Bad bytes in a segment that was complete are acknowledged records
    lost: load raises JournalCorrupt naming the place."""
    stateDir = str(tmp_path)
    journal = inlineJournal(stateDir)
    journal.load()
    results([journal.append({"type": "t", "i": 0})])
    journal._writer.rotate()
    results([journal.append({"type": "t", "i": 1})])
    results([journal.close()])
    with open(segmentPath(stateDir, 0), "r+b") as f:
        f.seek(10)
        f.write(b"X")
    with pytest.raises(JournalCorrupt, match=r"segment-000000\.log:0: checksum mismatch"):
        inlineJournal(stateDir).load()


def test_missingSegmentRefusesToLoad(tmp_path):
    stateDir = str(tmp_path)
    journal = inlineJournal(stateDir)
    journal.load()
    results([journal.append({"type": "t"})])
    journal._writer.rotate()
    journal._writer.rotate()
    results([journal.close()])
    os.unlink(segmentPath(stateDir, 1))
    with pytest.raises(JournalCorrupt, match="segment-000001.log is gone"):
        inlineJournal(stateDir).load()


# ---- snapshots


class Counter:
    """A tiny state machine standing in for the queue."""

    def __init__(self, state=None):
        self.state = dict(state or {"count": 0, "sum": 0})

    def apply(self, record):
        self.state["count"] += 1
        self.state["sum"] += record["i"]

    def snapshot(self):
        return dict(self.state)


def recover(stateDir, **kwargs):
    journal = inlineJournal(stateDir, **kwargs)
    recovery = journal.load()
    counter = Counter(recovery.snapshot)
    for record in recovery.records:
        counter.apply(record)
    return journal, recovery, counter


def journalFiles(stateDir):
    return sorted(n for n in os.listdir(os.path.join(stateDir, "journal")) if n not in ("lock", "format"))


def test_snapshotTrimAndReplayGiveTheSameState(tmp_path):
    """Every snapshotEvery records a snapshot of exactly the state so far is
    written; older generations are trimmed (one previous kept); snapshot
    plus replay equals the live state."""
    stateDir = str(tmp_path)
    counter = Counter()
    seen = []

    def state():
        seen.append(counter.state["count"])
        return counter.snapshot()

    journal = inlineJournal(stateDir, snapshotEvery=10, snapshotState=state)
    journal.load()
    for i in range(35):
        record = {"type": "t", "i": i}
        counter.apply(record)
        journal.append(record)
    assert seen == [10, 20, 30]
    assert journal.recordsSinceSnapshot == 5
    results([journal.close()])
    assert journalFiles(stateDir) == [segmentName(2), segmentName(3),
                                      snapshotName(2), snapshotName(3)]
    journal, recovery, recovered = recover(stateDir)
    assert recovery.snapshotNumber == 3 and recovery.recordCount == 5
    assert recovered.state == counter.state == {"count": 35, "sum": sum(range(35))}
    results([journal.close()])


def test_snapshotStateIsCalledRightAfterTheAppendThatReachesTheCount(tmp_path):
    """The state for a snapshot is taken synchronously inside the append
    that reaches snapshotEvery, before any later append."""
    calls = []
    journal = inlineJournal(str(tmp_path), snapshotEvery=3, snapshotState=lambda: calls.append(1) or {})
    journal.load()
    journal.append({"type": "t", "i": 0})
    journal.append({"type": "t", "i": 1})
    assert calls == []
    journal.append({"type": "t", "i": 2})
    assert calls == [1]
    results([journal.close()])


def test_snapshotsOnTheirOwnThread(tmp_path):
    """With the real threads: snapshots are written beside the appends, and
    close() waits for them; the recovered state is the live one."""
    from twisted.internet import reactor
    stateDir = str(tmp_path)
    counter = Counter()
    journal = Journal(stateDir, reactor, snapshotEvery=50, snapshotState=counter.snapshot)
    journal.load()
    try:
        acks = []
        for i in range(120):
            counter.apply({"i": i})
            acks.append(journal.append({"type": "t", "i": i}))
        waitFor(defer.gatherResults(acks))
    finally:
        waitFor(journal.close())
    assert snapshotName(1) in journalFiles(stateDir)
    journal, recovery, recovered = recover(stateDir)
    assert recovery.snapshotNumber >= 1 and recovered.state == counter.state
    results([journal.close()])


def test_forcedSnapshotAndCompactTrim(tmp_path):
    """snapshot() writes one now; with keepSnapshots=1 everything before it
    is removed and the state still recovers."""
    stateDir = str(tmp_path)
    counter = Counter()
    journal = inlineJournal(stateDir, snapshotState=counter.snapshot, keepSnapshots=1)
    journal.load()
    for i in range(7):
        counter.apply({"i": i})
        journal.append({"type": "t", "i": i})
    assert results([journal.snapshot()]) == [None]
    results([journal.append({"type": "t", "i": 7})])
    counter.apply({"i": 7})
    results([journal.close()])
    assert journalFiles(stateDir) == [segmentName(1), snapshotName(1)]
    journal, _, recovered = recover(stateDir)
    assert recovered.state == counter.state
    results([journal.close()])


def test_corruptNewestSnapshotFallsBackToThePreviousOne(tmp_path):
    """A damaged newest snapshot is moved aside and the previous snapshot
    plus the records after it give the same state."""
    stateDir = str(tmp_path)
    counter = Counter()
    journal = inlineJournal(stateDir, snapshotEvery=4, snapshotState=counter.snapshot)
    journal.load()
    for i in range(10):
        counter.apply({"i": i})
        journal.append({"type": "t", "i": i})
    results([journal.close()])
    newest = os.path.join(stateDir, "journal", snapshotName(2))
    with open(newest, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"999")
    journal, recovery, recovered = recover(stateDir)
    assert recovery.snapshotNumber == 1 and len(recovery.skippedSnapshots) == 1
    assert recovered.state == counter.state
    assert os.path.exists(newest + ".corrupt") and not os.path.exists(newest)
    results([journal.close()])


def test_noReadableSnapshotAfterTrimRefusesToLoad(tmp_path):
    stateDir = str(tmp_path)
    counter = Counter()
    journal = inlineJournal(stateDir, snapshotState=counter.snapshot, keepSnapshots=1)
    journal.load()
    results([journal.append({"type": "t", "i": 1})])
    results([journal.snapshot()])
    results([journal.close()])
    with open(os.path.join(stateDir, "journal", snapshotName(1)), "ab") as f:
        f.write(b"x")
    with pytest.raises(JournalCorrupt, match="no snapshot is readable"):
        inlineJournal(stateDir).load()


def test_snapshotFileCarriesAChecksum(tmp_path):
    path = str(tmp_path / snapshotName(4))
    with open(path, "wb") as f:
        f.write(journalframes.encodeSnapshot(4, b'{"a":1}', 10.0, 9.0))
    header, state = journalfiles.readSnapshotFile(path)
    assert state == {"a": 1} and header["lastTime"] == 9.0
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"2")
    with pytest.raises(journalframes.SnapshotError, match="checksum"):
        journalfiles.readSnapshotFile(path)


# ---- disk failures


class FailingPwrite:
    """os.pwrite that, when armed, writes half the data and then refuses
    with the given errno: a disk filling up in the middle of a batch."""

    def __init__(self):
        self.failWith = None

    def __call__(self, fd, data, offset):
        if self.failWith is None:
            return os.pwrite(fd, data, offset)
        if len(data) > 1:
            half = len(data) // 2
            os.pwrite(fd, data[:half], offset)
            data = data[half:]
            self.half = True
        raise OSError(self.failWith, os.strerror(self.failWith))


def test_diskFullFailsTheBatchTruncatesAndRecovers(tmp_path):
    """ENOSPC: every record of the batch errbacks with JournalWriteError, the
    file is cut back to the whole acknowledged records, and once the disk
    has room the next append works."""
    stateDir = str(tmp_path)
    pwrite = FailingPwrite()
    journal = inlineJournal(stateDir, pwrite=pwrite)
    journal.load()
    results([journal.append({"type": "t", "i": 0})])
    size = os.path.getsize(segmentPath(stateDir, 0))
    pwrite.failWith = errno.ENOSPC
    failed = results([journal.append({"type": "t", "i": 1})])
    assert failed[0].check(JournalWriteError) and "No space left" in failed[0].getErrorMessage()
    assert os.path.getsize(segmentPath(stateDir, 0)) == size
    pwrite.failWith = None
    assert results([journal.append({"type": "t", "i": 2})]) == [None]
    results([journal.close()])
    assert [r["i"] for r in readRecords(stateDir)[1]] == [0, 2]


def test_failedBatchAlsoFailsTheRecordsQueuedBehindIt(tmp_path):
    """Records appended while a failing batch was in flight were decided on
    its state: they errback too, and none of them reaches the disk."""
    stateDir = str(tmp_path)
    pwrite = FailingPwrite()
    runner = ManualRunner()
    journal = inlineJournal(stateDir, pwrite=pwrite, runInThread=runner)
    journal.load()
    deferreds = [journal.append({"type": "t", "i": i}) for i in range(4)]
    pwrite.failWith = errno.EIO
    runner.runNext()
    outcome = results(deferreds)
    assert all(r != "waiting" and r.check(JournalWriteError) for r in outcome)
    assert runner.calls == deque()
    pwrite.failWith = None
    later = journal.append({"type": "t", "i": 9})
    runner.runAll()
    assert results([later]) == [None]
    results([journal.close()])
    runner.runAll()
    assert [r["i"] for r in readRecords(stateDir)[1]] == [9]


def test_fsyncFailureIsAWriteError(tmp_path):
    """An fsync that fails (EIO) acknowledges nothing and leaves no bytes."""
    stateDir = str(tmp_path)
    broken = {"on": True}

    def fsync(fd):
        if broken["on"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    journal = inlineJournal(stateDir, fsync=fsync)
    journal.load()
    outcome = results([journal.append({"type": "t", "i": 0})])
    assert outcome[0].check(JournalWriteError)
    broken["on"] = False
    assert os.path.getsize(segmentPath(stateDir, 0)) == 0
    assert results([journal.append({"type": "t", "i": 1})]) == [None]
    results([journal.close()])
    assert [r["i"] for r in readRecords(stateDir)[1]] == [1]


def test_snapshotAbandonedWhenARecordBeforeItFails(tmp_path):
    """A snapshot whose state includes a record that did not reach the disk
    is not written."""
    stateDir = str(tmp_path)
    pwrite = FailingPwrite()
    runner = ManualRunner()
    journal = inlineJournal(stateDir, pwrite=pwrite, runInThread=runner,
                            snapshotState=lambda: {"bad": True})
    journal.load()
    record = journal.append({"type": "t", "i": 0})
    snapshot = journal.snapshot()
    pwrite.failWith = errno.ENOSPC
    runner.runAll()
    assert results([record])[0].check(JournalWriteError)
    assert results([snapshot])[0].check(JournalWriteError)
    assert journalFiles(stateDir) == [segmentName(0)]
    results([journal.close()])
    runner.runAll()


# ---- the lock and closing


def test_secondJournalOnTheSameDirectoryIsLocked(tmp_path):
    """Only one writer holds a state directory; readers still read; the lock
    goes with close()."""
    stateDir = str(tmp_path)
    journal = inlineJournal(stateDir)
    journal.load()
    assert journalfiles.lockHolder(stateDir) == os.getpid()
    with pytest.raises(JournalLocked, match="pid %d" % (os.getpid(),)):
        inlineJournal(stateDir)
    results([journal.append({"type": "t", "i": 0})])
    assert [r["i"] for r in readRecords(stateDir)[1]] == [0]
    results([journal.close()])
    assert journalfiles.lockHolder(stateDir) is None
    again = inlineJournal(stateDir)
    again.load()
    results([again.close()])


def test_closeWritesWhatIsPendingFirst(tmp_path):
    """close() fires only after pending records are on disk, then refuses appends."""
    stateDir = str(tmp_path)
    runner = ManualRunner()
    journal = inlineJournal(stateDir, runInThread=runner)
    journal.load()
    records = [journal.append({"type": "t", "i": i}) for i in range(3)]
    closed = journal.close()
    assert not closed.called
    runner.runAll()
    assert results(records + [closed]) == [None] * 4
    assert results([journal.close()]) == [None]
    with pytest.raises(RuntimeError):
        journal.append({"type": "t"})
    assert len(readRecords(stateDir)[1]) == 3


def test_readOnlyJournalDoesNotCreateTheDirectory(tmp_path):
    stateDir = str(tmp_path / "absent")
    recovery, records = readRecords(stateDir)
    assert recovery.snapshot is None and records == [] and not os.path.exists(stateDir)
