"""The queue's snapshots: the whole state as JSON, and back.

``snapshotOf(queue)`` is what the journal's snapshot holds (version 4): the
jobs as rows of their fields in ``SNAPSHOT_FIELDS`` order. ``encodeSnapshot``
writes each value of the ``SHARED_FIELDS`` once; ``queueFromSnapshot`` loads
a state of any version written so far (2: results as dicts; 3: shared
strings in each row; 4: shared values once) with a row loader compiled for
the snapshot's field order.
"""

import json
import operator
from sys import intern

from reflservd.job import Job, encodeResult
from reflservd.queue import LEGACY_LEASE_TIMEOUT, Queue

SNAPSHOT_VERSION = 4

SNAPSHOT_FIELDS = tuple(name for name in Job.__slots__
                        if name not in ("events", "eventSeq", "leaseExpires"))
_snapshotFields = operator.attrgetter(*SNAPSHOT_FIELDS)


SHARED_FIELDS = ("owner", "notify", "origin", "service", "version", "status", "queue",
                 "worker", "confinement")
"""Fields whose few values many jobs share: a snapshot writes each value once."""
_INTERNED = SHARED_FIELDS[:5]
"""Those that snapshots before version 4 held as strings, interned at a load."""


def encodeSnapshot(state):
    """The JSON bytes of a ``snapshotOf(queue)`` state, with each value of the
    ``SHARED_FIELDS`` written once, in ``strings``, and each row holding its
    index there: a restart decodes a third as many objects. Runs on the
    journal's snapshot thread (the rows are the state's own copies)."""
    fields = state["fields"]
    columns = [fields.index(name) for name in SHARED_FIELDS]
    index, strings = {}, []
    for row in state["jobs"]:
        for i in columns:
            value = row[i]
            k = index.get(value)
            if k is None:
                k = index[value] = len(strings)
                strings.append(value)
            row[i] = k
    coded = dict(state, shared=list(SHARED_FIELDS), strings=strings)
    return _encodeJSON(coded).encode("utf-8")


def _rowsLoader(fields, shared=(), strings=()):
    """``load(rows, jobs)``: make the Job of each snapshot row and put it in
    ``jobs`` by id, compiled for this snapshot's field order (loading a large
    queue is on the restart path, and a loop of setattr is several times
    slower). ``shared`` fields hold indexes into ``strings`` (interned once);
    in older snapshots the strings many jobs share are interned one by one."""
    lines = []
    for i, name in enumerate(fields):
        if name in shared:
            lines.append("job.%s = strings[row[%d]]" % (name, i))
        elif name in _INTERNED:
            lines.append("job.%s = intern(row[%d])" % (name, i))
        elif name in SNAPSHOT_FIELDS:
            lines.append("job.%s = row[%d]" % (name, i))
        elif name == "result":      # a version 2 snapshot: the result as a dict
            lines.append("job.resultJSON = encode(row[%d])" % (i,))
    lines += ["job.%s = None" % (name,) for name in SNAPSHOT_FIELDS
              if name not in fields and name != "resultJSON"]
    if "resultJSON" not in fields and "result" not in fields:
        lines.append("job.resultJSON = None")
    lines += ["job.leaseExpires = 0.0",
              "job.eventSeq = 1",
              "job.events = (1, job.finished or job.started or job.submitted, 'status',"
              " job.status, None)",
              "jobs[job.id] = job"]
    source = ("def load(rows, jobs):\n    for row in rows:\n        job = Job()\n"
              + "".join("        %s\n" % (line,) for line in lines))
    namespace = {"Job": Job, "intern": intern, "encode": encodeResult,
                 "strings": [intern(v) if isinstance(v, str) else v for v in strings]}
    exec(source, namespace)
    return namespace["load"]


def snapshotOf(queue):
    """A JSON-able dict of the whole state of ``queue``. Its rows are fresh
    lists (the one dict in a row, progress, is replaced on change, never
    changed in place), so the journal may encode it on another thread."""
    return {
        "version": SNAPSHOT_VERSION,
        "nextId": queue.nextId,
        "fields": list(SNAPSHOT_FIELDS),
        "jobs": [list(_snapshotFields(job)) for job in queue.jobs.values()],
        "deleted": sorted(queue.deleted),
        "owners": queue.submitTimes(),
        "series": queue.series.snapshot(),
    }


def queueFromSnapshot(state, leaseTimeout=60.0, maxAttempts=3,
                      legacyLeaseTimeout=LEGACY_LEASE_TIMEOUT):
    """The queue a snapshot describes (an empty one for None). After
    replaying the records that follow it, a server calls
    ``restartLeases(now)``."""
    queue = Queue(leaseTimeout=leaseTimeout, maxAttempts=maxAttempts,
                  legacyLeaseTimeout=legacyLeaseTimeout)
    if state is None:
        return queue
    _rowsLoader(state["fields"], state.get("shared", ()), state.get("strings", ()))(
        state["jobs"], queue.jobs)
    queue.adopt(state["nextId"], state["deleted"], state["owners"])
    queue.series.restore(state.get("series", ()))
    return queue


_encodeJSON = json.JSONEncoder(separators=(",", ":")).encode


class ReplayError(Exception):
    """A journal record that cannot be applied to the state before it;
    ``segment`` and ``offset`` say where it is (``salvageJournal`` cuts there)."""

    def __init__(self, message, segment=None, offset=None):
        Exception.__init__(self, message)
        self.segment, self.offset = segment, offset


def loadQueue(recovery, leaseTimeout, maxAttempts, legacyLeaseTimeout=LEGACY_LEASE_TIMEOUT):
    """The queue that a journal's snapshot and records describe (called
    with the collector paused, around the journal's load as well). A record
    that does not apply raises ``ReplayError`` naming where it is."""
    queue = queueFromSnapshot(recovery.snapshot, leaseTimeout=leaseTimeout,
                              maxAttempts=maxAttempts, legacyLeaseTimeout=legacyLeaseTimeout)
    record = None
    index = -1
    try:
        for index, record in enumerate(recovery.records):
            queue.apply(record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        recovery.records.close()
        segment, offset = recovery.where(index)
        raise ReplayError("%s: a %r record cannot be applied to the state before it (%s: %s)" % (
            recovery.locate(index), record.get("type") if isinstance(record, dict) else record,
            type(e).__name__, e), segment, offset) from None
    return queue
