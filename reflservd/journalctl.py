"""reflservd-journal: look into a server's journal, and compact it.

    reflservd-journal STATE_DIR verify
    reflservd-journal STATE_DIR dump [--job ID] [--type T] [--since TIME] [--json]
    reflservd-journal STATE_DIR stats [--json]
    reflservd-journal STATE_DIR replay [--at TIME|OFFSET] [--json]
    reflservd-journal STATE_DIR compact

Every command but ``compact`` only reads, takes no lock and works while a
server runs: a last record still being written is the tail of a live journal,
not damage. ``compact`` needs the state directory to itself (the server's
flock) and refuses while a server holds it.

An OFFSET is ``segment-000003.log:1234`` (or ``3:1234``), as ``dump`` prints
it; a TIME is ISO 8601 (local time unless it names a zone) or seconds since
the epoch.
"""

import argparse
import datetime
import json
import os
import re
import sys
from collections import Counter

from reflservd.journal import Journal
from reflservd.journalfiles import (
    JournalLocked, JournalWriteError, journalDirectory, listJournal, readSnapshotFile, segmentName,
    snapshotName)
from reflservd.journalframes import SnapshotError, decodePayload, decodeRecords, iterFrames, parseJSON
from reflservd.journalread import CommandError, JournalFiles
from reflservd.journalrecovery import JournalCorrupt

EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

_OFFSET = re.compile(r"^(?:segment-)?(\d+)(?:\.log)?:(\d+)$")


# ---- formats


def parseTime(text):
    """Seconds since the epoch from an epoch number or ISO 8601 text."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CommandError("%r is neither an ISO 8601 time nor seconds since the epoch"
                           % (text,)) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


def parsePoint(text):
    """("offset", segment, offset) or ("time", seconds) from --at."""
    match = _OFFSET.match(text)
    if match:
        return ("offset", int(match.group(1)), int(match.group(2)))
    return ("time", parseTime(text))


def isoTime(seconds):
    if not isinstance(seconds, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).astimezone().isoformat(
        timespec="milliseconds")


def summarize(record, width=100):
    """The fields of a record other than type, time and id, on one line."""
    parts = []
    for key, value in record.items():
        if key in ("type", "time", "id"):
            continue
        if key == "resultJSON" and isinstance(value, str):
            parts.append("result=%s" % (value,))     # already JSON text
            continue
        parts.append("%s=%s" % (key, json.dumps(value, separators=(",", ":"))))
    text = " ".join(parts)
    return text if len(text) <= width else text[:width - 3] + "..."


def jobCount(state):
    jobs = state.get("jobs") if isinstance(state, dict) else None
    return len(jobs) if isinstance(jobs, (list, dict)) else None


# ---- commands


def verify(args, out, err):
    """Exit 0 when every record and snapshot is whole; else print where the
    first bad one is and exit 1."""
    files = JournalFiles(args.stateDir)
    problems, notes = [], []
    wholeSnapshots = []
    for number in files.snapshots:
        name = snapshotName(number)
        try:
            readSnapshotFile(files.path(name))
        except FileNotFoundError:
            notes.append("%s: trimmed by the server while reading" % (name,))
        except SnapshotError as e:
            problems.append("%s: not whole: %s" % (name, e))
        else:
            wholeSnapshots.append(number)
    segments = files.segments
    for before, after in zip(segments, segments[1:]):
        if after != before + 1:
            problems.append("%s: missing (between %s and %s)"
                            % (segmentName(before + 1), segmentName(before), segmentName(after)))
    if segments and segments[0] != 0 and not any(n >= segments[0] for n in wholeSnapshots):
        problems.append("%s: the records before it are gone and no whole snapshot holds them"
                        % (segmentName(segments[0]),))
    count = 0
    for number in segments:
        name = segmentName(number)
        read = files.readSegment(number)
        if read is None:
            notes.append("%s: trimmed by the server while reading" % (name,))
            continue
        data, scan = read
        bad = _firstUndecodable(data, scan.end)
        if bad is not None:
            problems.append("%s:%d: %s" % (name, bad[0], bad[1]))
            continue
        count += scan.count
        if scan.error is None:
            continue
        if files.isLiveTail(number, scan):
            notes.append("%s:%d: the last record is being written (server pid %d)"
                         % (name, scan.end, files.serverPid))
        else:
            problems.append("%s:%d: %s" % (name, scan.end, scan.error))
    if not problems:
        problems.extend(_replayProblems(files))
    for note in notes:
        print(note, file=out)
    if problems:
        print("first bad: %s" % (problems[0],), file=out)
        print("twistd reflservd refuses to start on it; with --salvage it starts from the "
              "records before the first bad one and sets the rest aside", file=out)
        for problem in problems[1:]:
            print("also bad: %s" % (problem,), file=out)
        return EXIT_BAD
    print("ok: %d whole records in %d segments, %d whole snapshots"
          % (count, len(segments), len(wholeSnapshots)), file=out)
    return EXIT_OK


def _replayProblems(files):
    """What a start would refuse in whole records: the first one the queue
    cannot apply to the state before it (a record about an unknown job,
    say), as ``[description]``; ``[]`` when all of them apply."""
    from reflservd.queuesnapshot import queueFromSnapshot

    try:
        start, state, _ = _startingSnapshot(files, None)
        queue = queueFromSnapshot(state)
    except (CommandError, ValueError, KeyError, TypeError) as e:
        return ["the newest whole snapshot cannot be loaded: %s" % (e,)]
    for number, offset, record, _ in files.records(fromSegment=start):
        try:
            queue.apply(record)
        except Exception as e:
            return ["%s:%d: a %r record cannot be applied to the state before it (%s: %s)"
                    % (segmentName(number), offset, record.get("type"), type(e).__name__, e)]
    return []


def _firstUndecodable(data, end):
    """(offset, why) of the first checked frame that is not a record, or None."""
    try:
        for _ in decodeRecords(data, end):
            pass
        return None
    except ValueError:
        pass
    for offset, payload in iterFrames(data, end):
        try:
            decodePayload(payload)
        except ValueError as e:
            return offset, "not a record: %s" % (e,)
    return None


def dump(args, out, err):
    """A line per record: where, when, what, which job, and the rest."""
    files = JournalFiles(args.stateDir)
    since = parseTime(args.since) if args.since is not None else None
    for number, offset, record, _ in files.records(err=err):
        if args.job is not None and str(record.get("id")) != args.job:
            continue
        if args.type is not None and record.get("type") not in args.type:
            continue
        if since is not None and not (isinstance(record.get("time"), (int, float))
                                      and record["time"] >= since):
            continue
        if args.json:
            line = dict(record, _segment=segmentName(number), _offset=offset)
            print(json.dumps(line, separators=(",", ":")), file=out)
        else:
            print("%s:%d  %s  %-8s  %s  %s" % (
                segmentName(number), offset, isoTime(record.get("time")),
                record.get("type"), record.get("id", "-"), summarize(record)), file=out)
    return EXIT_OK


def stats(args, out, err):
    """Records and bytes by type, the newest snapshot, the journal's size."""
    files = JournalFiles(args.stateDir)
    counts, sizes = Counter(), Counter()
    newest = None
    for number, header, body in files.snapshotsNewestFirst():
        state = parseJSON(body)
        newest = {"name": snapshotName(number), "segment": number,
                  "bytes": os.path.getsize(files.path(snapshotName(number))),
                  "created": header.get("created"), "lastTime": header.get("lastTime"),
                  "jobs": jobCount(state)}
        break
    segmentBytes = sinceSnapshot = 0
    for number, offset, record, size in files.records(err=err):
        kind = record.get("type")
        counts[kind] += 1
        sizes[kind] += size
        if newest is not None and number >= newest["segment"]:
            sinceSnapshot += 1
    for number in files.segments:
        try:
            segmentBytes += os.path.getsize(files.path(segmentName(number)))
        except FileNotFoundError:
            pass
    setAside = sorted(n for n in os.listdir(files.journalDir)
                      if ".torn-" in n or n.endswith(".corrupt"))
    report = {
        "records": sum(counts.values()),
        "byType": {kind: {"records": counts[kind], "bytes": sizes[kind]}
                   for kind in sorted(counts, key=str)},
        "segments": len(files.segments), "segmentBytes": segmentBytes,
        "snapshot": newest,
        "recordsSinceSnapshot": sinceSnapshot if newest is not None else sum(counts.values()),
        "setAside": setAside,
        "serverPid": files.serverPid,
    }
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return EXIT_OK
    print("journal %s: %d records in %d segments, %d bytes"
          % (files.journalDir, report["records"], report["segments"], segmentBytes), file=out)
    for kind, row in report["byType"].items():
        print("  %-10s %9d records %12d bytes" % (kind, row["records"], row["bytes"]), file=out)
    if newest is None:
        print("snapshot: none", file=out)
    else:
        print("snapshot: %s, %d bytes, %s jobs, written %s; %d records after it"
              % (newest["name"], newest["bytes"],
                 "?" if newest["jobs"] is None else newest["jobs"],
                 isoTime(newest["created"]), sinceSnapshot), file=out)
    for name in setAside:
        print("set aside: %s" % (name,), file=out)
    print("server: %s" % ("pid %d" % (files.serverPid,) if files.serverPid else "not running"),
          file=out)
    return EXIT_OK


def replay(args, out, err):
    """The queue as of a point: jobs by state and the pending order."""
    from reflservd.queuesnapshot import queueFromSnapshot

    files = JournalFiles(args.stateDir)
    point = parsePoint(args.at) if args.at is not None else None
    start, state, fromName = _startingSnapshot(files, point)
    queue = queueFromSnapshot(state)
    applied, last = 0, None
    for number, offset, record, _ in files.records(fromSegment=start, err=err):
        if point is not None:
            if point[0] == "time" and isinstance(record.get("time"), (int, float)) \
                    and record["time"] > point[1]:
                break
            if point[0] == "offset" and (number, offset) > point[1:]:
                break
        try:
            queue.apply(record)
        except Exception as e:
            raise CommandError("%s:%d: the queue cannot apply this %s record: %r"
                               % (segmentName(number), offset, record.get("type"), e)) from None
        applied += 1
        last = (number, offset, record)
    counts = {status: n for status, n in queue.counts().items() if n}
    order = queue.pendingOrder()
    where = ("%s:%d (%s)" % (segmentName(last[0]), last[1], isoTime(last[2].get("time")))
             if last is not None else "the snapshot")
    if args.json:
        print(json.dumps({"snapshot": fromName, "records": applied,
                          "last": None if last is None else {
                              "_segment": segmentName(last[0]), "_offset": last[1]},
                          "counts": counts, "pendingOrder": order}), file=out)
        return EXIT_OK
    print("state after %s: %s + %d records" % (where, fromName or "no snapshot", applied), file=out)
    print("jobs: %s" % (", ".join("%s %d" % item for item in sorted(counts.items())) or "none"),
          file=out)
    print("pending order: %s" % (" ".join(str(i) for i in order) or "(none)"), file=out)
    return EXIT_OK


def _startingSnapshot(files, point):
    """(segment, state, name) to replay from: the newest whole snapshot
    that precedes ``point`` (None: the end)."""
    for number, header, body in files.snapshotsNewestFirst():
        if point is not None and point[0] == "offset" and number > point[1]:
            continue
        if point is not None and point[0] == "time" and header.get("lastTime") is not None \
                and header["lastTime"] > point[1]:
            continue
        return number, parseJSON(body), snapshotName(number)
    if not files.segments or files.segments[0] == 0:
        return 0, None, None
    raise CommandError("the history before %s was trimmed and no whole snapshot precedes "
                       "that point" % (segmentName(files.segments[0]),))


def compact(args, out, err):
    """Snapshot the state now and delete everything older; needs the state
    directory to itself."""
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure
    from reflservd.queuesnapshot import encodeSnapshot, queueFromSnapshot, snapshotOf

    journalDir = journalDirectory(args.stateDir)
    if not os.path.isdir(journalDir):
        raise CommandError("%s has no journal (no %s)" % (args.stateDir, journalDir))
    queue = None
    try:
        journal = Journal(args.stateDir, reactor, snapshotState=lambda: snapshotOf(queue),
                          encodeState=encodeSnapshot, keepSnapshots=1,
                          runInThread=defer.maybeDeferred)
    except JournalLocked as e:
        print("refusing to compact: %s; stop the server first" % (e,), file=err)
        return EXIT_LOCKED
    outcome = []
    try:
        before = _directoryBytes(journalDir)
        recovery = journal.load()
        for torn in recovery.torn:
            print("torn tail set aside: %s" % (torn,), file=out)
        queue = queueFromSnapshot(recovery.snapshot)
        for record in recovery.records:
            queue.apply(record)
        journal.snapshot().addBoth(outcome.append)
    finally:
        journal.close()
    if outcome and isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    segments, snapshots = listJournal(journalDir)
    print("compacted %s: %d jobs in %s; %d bytes before, %d after"
          % (journalDir, len(queue.jobs), snapshotName(snapshots[-1]), before,
             _directoryBytes(journalDir)), file=out)
    return EXIT_OK


def _directoryBytes(path):
    total = 0
    for name in os.listdir(path):
        try:
            total += os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:
            pass
    return total


# ---- the command line


def makeParser():
    parser = argparse.ArgumentParser(
        prog="reflservd-journal", description="Inspect, check and compact a reflservd journal.")
    parser.add_argument("stateDir", metavar="STATE_DIR", help="the server's state directory")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    command = commands.add_parser("verify", help="check every record and snapshot is whole")
    command.set_defaults(run=verify)

    command = commands.add_parser("dump", help="a line per record")
    command.add_argument("--job", help="only the records of this job id")
    command.add_argument("--type", action="append", help="only records of this type (repeatable)")
    command.add_argument("--since", metavar="TIME", help="only records at or after TIME")
    command.add_argument("--json", action="store_true", help="one JSON object per line")
    command.set_defaults(run=dump)

    command = commands.add_parser("stats", help="records and bytes by type, the snapshot")
    command.add_argument("--json", action="store_true")
    command.set_defaults(run=stats)

    command = commands.add_parser("replay", help="the queue as of a point in the journal")
    command.add_argument("--at", metavar="TIME|OFFSET",
                         help="a time, or a record's SEGMENT:OFFSET (the state after it)")
    command.add_argument("--json", action="store_true")
    command.set_defaults(run=replay)

    command = commands.add_parser("compact", help="snapshot now and delete older files")
    command.set_defaults(run=compact)
    return parser


def main(argv=None, out=None, err=None):
    """The console script; returns the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = makeParser().parse_args(argv)
    try:
        return args.run(args, out, err)
    except (CommandError, JournalCorrupt, JournalWriteError) as e:
        print("reflservd-journal: %s" % (e,), file=err)
        return EXIT_BAD
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
