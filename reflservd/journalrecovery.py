"""What a journal holds at start-up: the newest whole snapshot and the
whole records after it, with a torn tail set aside.

A crash in the middle of a write leaves a torn tail: ``readJournal`` keeps
every whole record, moves the torn bytes aside
(``segment-000042.torn-<offset>``) and truncates, so new records follow the
last whole one. A tail can only be torn by the last, unacknowledged write,
and one write is at most ``MAX_BATCH_BYTES``: bad bytes anywhere else are
corruption of acknowledged records, and the read refuses
(``JournalCorrupt``) rather than quietly drop them. A snapshot that is not
whole is moved aside and the one before it is used, with the records after
that.

Blocking: start-up and tools only.
"""

import os

from twisted.logger import Logger

from reflservd.journalfiles import (
    fsyncDirectory, journalDirectory, listJournal, readAll, readSnapshotFile, segmentName,
    snapshotName, stateFormat, writeAllAndClose)
from reflservd.journalframes import (
    MAX_BATCH_BYTES, SnapshotError, decodeRecords, findWholeFrames, iterFrames, scanSegment)

_log = Logger()


class JournalCorrupt(Exception):
    """Acknowledged records cannot be read back: a damaged segment, a missing
    segment, or no readable snapshot where the early segments were trimmed.
    ``reflservd-journal STATE_DIR verify`` shows where. ``segment`` and
    ``offset`` say where the damage starts when it is inside a segment (what
    ``salvageJournal`` can cut at), else None."""

    def __init__(self, message, segment=None, offset=None):
        Exception.__init__(self, message)
        self.segment, self.offset = segment, offset



class Recovery:
    """What ``Journal.load`` found.

    @ivar snapshot: the state dict of the newest readable snapshot, or None.
    @ivar records: every whole record after it, in order (an iterator of
        dicts, read lazily: consume it before the first append).
    @ivar torn: descriptions of torn tails set aside (empty when clean).
    @ivar recordCount: how many records ``records`` yields.
    @ivar snapshotNumber: the segment the snapshot precedes, or None.
    @ivar skippedSnapshots: descriptions of snapshots that were not whole.
    """

    def __init__(self, snapshot, records, torn, recordCount=0, snapshotNumber=None,
                 skippedSnapshots=(), journalDir=None, counts=()):
        self.snapshot = snapshot
        self.records = records
        self.torn = list(torn)
        self.recordCount = recordCount
        self.snapshotNumber = snapshotNumber
        self.skippedSnapshots = list(skippedSnapshots)
        self.journalDir = journalDir
        self.counts = list(counts)      # [(segment number, whole records in it)]
        self.header = None              # the snapshot's header
        self.tail = (0, 0)              # (number, length of its whole records) of the last segment
        self.sources = []               # [[fd, end]] of the segments ``records`` reads

    def close(self):
        """Close the segments ``records`` has not read (a load refused
        before its records were consumed)."""
        if hasattr(self.records, "close"):
            self.records.close()
        for fd, _ in self.sources:
            os.close(fd)
        del self.sources[:]

    def where(self, index):
        """``(segment number, offset)`` of the ``index``-th record of
        ``records`` (read again from the file: for reporting, not for speed)."""
        for number, count in self.counts:
            if index < count:
                with open(os.path.join(self.journalDir, segmentName(number)), "rb") as f:
                    data = f.read()
                for k, (offset, _) in enumerate(iterFrames(data, len(data))):
                    if k == index:
                        return number, offset
            index -= count
        return None, None

    def locate(self, index):
        """``segment-N.log:OFFSET`` of the ``index``-th record, for a message."""
        number, offset = self.where(index)
        return "record %d" % (index,) if number is None else "%s:%d" % (segmentName(number), offset)


class _Reader:
    """One read of a journal directory; ``writable`` repairs (torn tails,
    damaged snapshots moved aside), else it only looks."""

    def __init__(self, stateDir, writable, onSegmentRead):
        self.stateDir = stateDir
        self.journalDir = journalDirectory(stateDir)
        self.writable = writable
        self.onSegmentRead = onSegmentRead

    def read(self):
        segments, snapshots = listJournal(self.journalDir)
        state = header = chosen = None
        skipped = []
        for number in reversed(snapshots):
            path = os.path.join(self.journalDir, snapshotName(number))
            try:
                header, state = readSnapshotFile(path)
            except SnapshotError as e:
                skipped.append(self._skipSnapshot(path, e))
                continue
            chosen = number
            break
        start = 0 if chosen is None else chosen
        replay = [n for n in segments if n >= start]
        self._checkContiguous(replay, start, chosen, skipped)

        sources, torn, count, counts = [], [], 0, []
        try:
            for index, number in enumerate(replay):
                path = os.path.join(self.journalDir, segmentName(number))
                fd = os.open(path, os.O_RDONLY)
                sources.append([fd, 0])
                data = readAll(fd)
                scan = scanSegment(data)
                if scan.error is not None:
                    if index < len(replay) - 1:
                        raise JournalCorrupt(
                            "%s:%d: %s, in a segment that was complete; run "
                            "reflservd-journal %s verify (twistd reflservd --salvage starts "
                            "from the records before it and keeps the rest aside)"
                            % (path, scan.end, scan.error, self.stateDir), number, scan.end)
                    torn.append(self._tornTail(path, data, scan, number))
                sources[-1][1] = scan.end
                count += scan.count
                counts.append((number, scan.count))
        except BaseException:
            for fd, _ in sources:
                os.close(fd)
            raise

        _log.info(
            "journal {journalDir}: snapshot {snapshot}, {count} records after it in "
            "{segments} segments", journalDir=self.journalDir,
            snapshot=snapshotName(chosen) if chosen is not None else "none",
            count=count, segments=len(replay))
        recovery = Recovery(state, self._records(sources), torn, recordCount=count,
                            snapshotNumber=chosen, skippedSnapshots=skipped,
                            journalDir=self.journalDir, counts=counts)
        recovery.header = header
        recovery.tail = (replay[-1] if replay else start, sources[-1][1] if replay else 0)
        recovery.sources = sources
        return recovery

    def _skipSnapshot(self, path, error):
        description = "%s is not whole (%s)" % (path, error)
        if self.writable:
            os.replace(path, path + ".corrupt")
            fsyncDirectory(self.journalDir)
            description += "; moved aside to %s.corrupt" % (os.path.basename(path),)
        _log.warn("journal: snapshot {description}; falling back to an older one",
                       description=description)
        return description

    def _checkContiguous(self, replay, start, chosen, skipped):
        expected = list(range(start, start + len(replay)))
        if replay == expected:
            return
        missing = sorted(set(range(start, replay[-1] + 1)) - set(replay))
        if chosen is None and skipped:
            why = "no snapshot is readable and %s is gone" % (segmentName(missing[0]),)
        elif chosen is None:
            why = "%s is gone and there is no snapshot" % (segmentName(missing[0]),)
        else:
            why = "%s is gone (replay starts at %s)" % (segmentName(missing[0]), snapshotName(chosen))
        raise JournalCorrupt("journal %s: %s" % (self.journalDir, why))

    def _tornTail(self, path, data, scan, number):
        size = len(data) - scan.end
        whole = findWholeFrames(data, scan.end)
        if size > MAX_BATCH_BYTES or whole:
            raise JournalCorrupt(
                "%s:%d: %s, with %d bytes after it%s: not a torn last write but damage to "
                "acknowledged records; run reflservd-journal %s verify (twistd reflservd "
                "--salvage starts from the records before it and keeps the rest aside)"
                % (path, scan.end, scan.error, size,
                   " holding %d whole records" % (whole,) if whole else "", self.stateDir),
                number, scan.end)
        description = "%s: %d bytes from offset %d are not a whole record (%s)" % (
            path, size, scan.end, scan.error)
        if not self.writable:
            return description + "; left in place (read-only)"
        aside = self._setAside(path, data[scan.end:], scan.end)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.end)
            os.fsync(fd)
        finally:
            os.close(fd)
        description += "; set aside in %s" % (aside,)
        _log.warn("journal: torn tail: {description}", description=description)
        return description

    def _setAside(self, path, data, offset):
        base = "%s.torn-%d" % (path[:-len(".log")], offset)
        aside, suffix = base, 0
        while True:
            try:
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                suffix += 1
                aside = "%s.%d" % (base, suffix)
        writeAllAndClose(fd, data)
        fsyncDirectory(self.journalDir)
        return aside

    def _records(self, sources):
        """Yield the checked records, reading each segment again (the
        reading of the first pass is not kept: a long journal would not fit
        in memory twice)."""
        try:
            while sources:
                fd, end = sources[0]
                data = readAll(fd, end)
                record = None
                for record in decodeRecords(data, end):
                    yield record
                if record is not None:
                    self.onSegmentRead(record)
                os.close(fd)
                sources.pop(0)
        finally:
            for fd, _ in sources:
                os.close(fd)
            del sources[:]


def readJournal(stateDir, writable=True, onSegmentRead=lambda lastRecord: None):
    """The ``Recovery`` of a journal directory. ``onSegmentRead(record)`` is
    called with the last record of each segment as ``records`` reads it.

    @raise JournalCorrupt: acknowledged records cannot be read back.
    @raise StateTooNew: a newer server wrote the directory.
    """
    stateFormat(stateDir)
    return _Reader(stateDir, writable, onSegmentRead).read()
