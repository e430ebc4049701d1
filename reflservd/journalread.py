"""Reading a state directory's journal for ``reflservd-journal``: without a
lock, tolerant of a server that appends and trims while it is read."""

import os

from reflservd.journalfiles import (
    StateTooNew, journalDirectory, listJournal, lockHolder, readSnapshotFile, segmentName,
    snapshotName, stateFormat)
from reflservd.journalframes import HEADER, SnapshotError, decodePayload, iterFrames, scanSegment


class CommandError(Exception):
    """A command cannot do what was asked; the message says why."""


class JournalFiles:
    """The segments and snapshots of one state directory, read without a lock.

    A running server may append to the last segment while it is read (its
    incomplete last record is ``live``) and may trim old files after a
    snapshot (a vanished file is skipped, and said so)."""

    def __init__(self, stateDir):
        self.stateDir = stateDir
        self.journalDir = journalDirectory(stateDir)
        if not os.path.isdir(self.journalDir):
            raise CommandError("%s has no journal (no %s)" % (stateDir, self.journalDir))
        try:
            stateFormat(stateDir)
        except StateTooNew as e:
            raise CommandError(str(e)) from None
        self.segments, self.snapshots = listJournal(self.journalDir)
        self.serverPid = lockHolder(stateDir)

    def path(self, name):
        return os.path.join(self.journalDir, name)

    def readSegment(self, number):
        """(data, scan) of a segment, or None if it was trimmed meanwhile."""
        try:
            with open(self.path(segmentName(number)), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, scanSegment(data)

    def isLiveTail(self, number, scan):
        """Whether a bad end of this segment may just be a write in progress."""
        return (self.serverPid is not None and number == self.segments[-1]
                and scan.error is not None and scan.error.startswith("incomplete"))

    def snapshotsNewestFirst(self):
        """(number, header, state) of each whole snapshot, newest first;
        the state is decoded lazily by the caller through ``loadState``."""
        for number in reversed(self.snapshots):
            try:
                header, body = readSnapshotFile(self.path(snapshotName(number)), decode=False)
            except (SnapshotError, FileNotFoundError):
                continue
            yield number, header, body

    def records(self, fromSegment=0, err=None):
        """(segment, offset, record, frame bytes) of every whole record in
        the segments from ``fromSegment`` on; damage is reported to ``err``
        and skipped."""
        for number in self.segments:
            if number < fromSegment:
                continue
            read = self.readSegment(number)
            if read is None:
                _say(err, "%s: trimmed by the server while reading" % (segmentName(number),))
                continue
            data, scan = read
            for offset, payload in iterFrames(data, scan.end):
                try:
                    record = decodePayload(payload)
                except ValueError as e:
                    _say(err, "%s:%d: %s" % (segmentName(number), offset, e))
                    continue
                yield number, offset, record, HEADER.size + len(payload)
            if scan.error is not None:
                if self.isLiveTail(number, scan):
                    _say(err, "%s:%d: the last record is being written"
                         % (segmentName(number), scan.end))
                else:
                    _say(err, "%s:%d: %s; the rest of this segment is not read"
                         % (segmentName(number), scan.end, scan.error))


def _say(stream, text):
    if stream is not None:
        print(text, file=stream)
