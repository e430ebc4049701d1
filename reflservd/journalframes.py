"""The journal's framing: pure functions of bytes, no files, no threads.

A record's frame is a 4-byte big-endian payload length, the 4-byte
big-endian crc32 of the payload, then the payload: compact JSON (UTF-8) of a
dict that always has ``"type"`` and ``"time"``. A snapshot file is one JSON
header line (format, version, segment, length and crc32 of the body) and
then the state as JSON.
"""

import json
import struct
import zlib

import orjson

HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_BATCH_BYTES = 16 * 1024 * 1024
"""One write is at most this many bytes: a torn tail is never longer."""
SNAPSHOT_FORMAT = "reflservd-snapshot"
SNAPSHOT_VERSION = 1


class RecordTooLarge(ValueError):
    """A record whose frame would pass ``MAX_RECORD_BYTES``: refused before
    anything is changed (the server encodes a record before it applies it)."""

    def __init__(self, size):
        ValueError.__init__(self, "a change is limited to %d bytes as a journal record; "
                                  "this one is %d bytes" % (MAX_RECORD_BYTES, size))
        self.size = size



class SnapshotError(Exception):
    """A snapshot file is not whole (bad header, length or checksum)."""



_compactJSON = json.JSONEncoder(separators=(",", ":")).encode


def encodeRecord(record):
    """The frame of one record: length, crc32, compact JSON."""
    payload = _compactJSON(record).encode("utf-8")
    if len(payload) > MAX_RECORD_BYTES:
        raise RecordTooLarge(len(payload))
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class SegmentScan:
    """What a scan of one segment found: ``count`` whole records that end at
    ``end``; ``error`` says why the bytes after ``end`` are not a record
    (None when the segment is whole)."""

    __slots__ = ("count", "end", "error")

    def __init__(self, count, end, error):
        self.count, self.end, self.error = count, end, error


def checkFrame(data, offset):
    """None if a whole frame starts at ``offset``; otherwise why not."""
    if len(data) - offset < HEADER.size:
        return "incomplete frame header"
    length, crc = HEADER.unpack_from(data, offset)
    if length == 0 or length > MAX_RECORD_BYTES:
        return "impossible record length %d" % (length,)
    end = offset + HEADER.size + length
    if end > len(data):
        return "incomplete record (%d of %d bytes)" % (len(data) - offset - HEADER.size, length)
    if zlib.crc32(memoryview(data)[offset + HEADER.size:end]) != crc:
        return "checksum mismatch"
    return None


def scanSegment(data):
    """Check every frame's length and checksum (no JSON decoding: fast)."""
    view = memoryview(data)
    size = len(data)
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    offset = count = 0
    while offset < size:
        if size - offset < 8:
            return SegmentScan(count, offset, "incomplete frame header")
        length, crc = unpack(data, offset)
        end = offset + 8 + length
        if length == 0 or length > MAX_RECORD_BYTES or end > size or crc32(view[offset + 8:end]) != crc:
            return SegmentScan(count, offset, checkFrame(data, offset))
        offset = end
        count += 1
    return SegmentScan(count, offset, None)


def iterFrames(data, end):
    """(offset, payload bytes) of each frame before ``end``, which a scan
    has already checked."""
    unpack = HEADER.unpack_from
    offset = 0
    while offset < end:
        length, _ = unpack(data, offset)
        start = offset + 8
        yield offset, data[start:start + length]
        offset = start + length


class TooDeep(ValueError):
    """JSON nested past what the standard library's parser can read."""


_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")


def _mayHoldLongInteger(data):
    """True if ``data`` has a run of 20 digits or a minus sign and 19: the
    only text that could be an integer orjson reads as a float. Digits are
    mapped to 0 and two literal runs are looked for, which is ten times
    faster than a regular expression over a large snapshot (0.2 s, not
    2.5 s, for 120 MB)."""
    zeroed = bytes(data).translate(_DIGITS_TO_ZERO)
    return zeroed.find(b"0" * 20) >= 0 or zeroed.find(b"-" + b"0" * 19) >= 0


def parseJSON(data):
    """``json.loads`` of bytes, by orjson where it can (twice as fast on a
    large snapshot) and by the standard library where orjson refuses: NaN
    and Infinity (``json.dumps`` writes them, for instance for the χ² of a
    failed fit), lone surrogates. orjson reads an integer past 64 bits
    (below -2**63 or above 2**64 - 1) as a float rather than refusing it, so
    text with a negative number of 19 digits or more, or a run of 20 digits,
    goes to the standard library.
    Text nested past the standard library's recursion limit is a ValueError,
    as any other text that is not a record is."""
    if not _mayHoldLongInteger(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise TooDeep("JSON nested too deeply to decode") from None


def decodePayload(payload):
    """The record a checked payload holds."""
    record = parseJSON(payload)
    if not isinstance(record, dict) or "type" not in record:
        raise ValueError("not a journal record: %r" % (payload[:80],))
    return record


def decodeRecords(data, end, chunk=4096):
    """The records of the frames before ``end`` (checked by a scan), decoded
    a few thousand at a time as one JSON array: a third faster than one
    ``json.loads`` per record, which matters for a long replay."""
    payloads = []
    for offset, payload in iterFrames(data, end):
        payloads.append(payload)
        if len(payloads) == chunk:
            yield from _decodeChunk(payloads)
            payloads = []
    if payloads:
        yield from _decodeChunk(payloads)


def _decodeChunk(payloads):
    try:
        records = parseJSON(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        records = None
    if records is None or len(records) != len(payloads) or not all(
            isinstance(r, dict) and "type" in r for r in records):
        records = [decodePayload(p) for p in payloads]     # raises, naming the bad one
    return records


def findWholeFrames(data, start):
    """How many whole frames lie in ``data`` past the bad spot at ``start``:
    what a torn tail that is set aside may still hold, for the operator to
    judge. A payload is a JSON object, so only the places where ``{"``
    follows a header are tried."""
    found = 0
    search = start + 1
    while True:
        brace = data.find(b'{"', search + HEADER.size)
        if brace < 0:
            return found
        offset = brace - HEADER.size
        if checkFrame(data, offset) is None:
            while offset < len(data) and checkFrame(data, offset) is None:
                found += 1
                offset += HEADER.size + HEADER.unpack_from(data, offset)[0]
            search = offset
        else:
            search = offset + 1



def encodeSnapshot(number, body, created, lastTime):
    """The bytes of a snapshot file: one JSON header line, then the state."""
    header = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "segment": number,
              "length": len(body), "crc32": zlib.crc32(body), "created": created,
              "lastTime": lastTime}
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + body



def decodeSnapshot(data, number=None, decode=True):
    """(header, state) of a snapshot file's bytes; SnapshotError if they are
    not whole, or (``number``) name another segment. With ``decode=False``
    the state is returned as the checked JSON bytes."""
    newline = data.find(b"\n")
    if newline < 0:
        raise SnapshotError("no header line")
    try:
        header = parseJSON(data[:newline])
    except ValueError:
        raise SnapshotError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError("not a reflservd snapshot")
    body = memoryview(data)[newline + 1:]
    if len(body) != header.get("length"):
        raise SnapshotError("%d bytes of state where the header says %r"
                            % (len(body), header.get("length")))
    if zlib.crc32(body) != header.get("crc32"):
        raise SnapshotError("checksum mismatch")
    if number is not None and number != header.get("segment"):
        raise SnapshotError("the header names segment %r" % (header.get("segment"),))
    if not decode:
        return header, bytes(body)
    try:
        return header, parseJSON(body)
    except ValueError:
        raise SnapshotError("unreadable state") from None


def encodeJSON(state):
    """A state's snapshot body: compact JSON."""
    return _compactJSON(state).encode("utf-8")

