"""The job queue: a pure state machine, fed by journal records.

Every change to the queue is a record (a JSON-able dict with ``type`` and
``time``). The ``make*`` methods check a request against the current state and
return the record that carries the decision; ``apply`` is the only code that
changes state, and it is the same code whether the record was just made or is
being replayed from the journal, so a replay gives exactly the live state.

This module knows nothing of HTTP, of the disk or of the reactor: time comes in
through the records and through the ``now`` arguments.
"""

import heapq
from collections import deque
from sys import intern

from reflservd.errors import Conflict, Refused, UnknownJob
from reflservd.job import Job, encodeResult
from reflservd.series import SeriesBook

PENDING, ACTIVE, COMPLETE, ERROR, CANCEL = "PENDING", "ACTIVE", "COMPLETE", "ERROR", "CANCEL"
STATUSES = (PENDING, ACTIVE, COMPLETE, ERROR, CANCEL)
FINISHED = (COMPLETE, ERROR, CANCEL)
FAIR_SHARE_WINDOW = 30 * 24 * 3600.0
EVENTS_KEPT = 100
"""Events a running job keeps (each progress report is at most
``limits.MAX_PROGRESS_BYTES``): what the events long-poll serves is bounded."""
MAX_TEXT = 64 * 1024
LEGACY_LEASE_TIMEOUT = 24 * 3600.0
"""Seconds a legacy worker's lease lasts without a sign of life from that
worker (docs/legacy.md): the old worker sends no heartbeat and holds a
prefetched job, unread, while it runs a long one."""


class Queue:
    """Jobs in memory, the fair-share pending heap and the leases."""

    def __init__(self, leaseTimeout=60.0, maxAttempts=3, legacyLeaseTimeout=LEGACY_LEASE_TIMEOUT):
        self.leaseTimeout = leaseTimeout
        self.legacyLeaseTimeout = legacyLeaseTimeout
        self.maxAttempts = maxAttempts
        self.jobs = {}
        self.deleted = set()
        self.nextId = 1
        self._pending = []          # heap of (priority, id); stale entries skipped
        self._inHeap = set()        # ids with an entry in the heap, stale or not
        self._leaseDeadlines = []   # heap of (expires, id, lease); stale entries skipped
        self._owners = {}           # owner -> deque of submit times within the window
        self._pendingOf = {}        # owner -> number of PENDING jobs
        self._counts = dict.fromkeys(STATUSES, 0)
        self.onEvent = None         # called (job, event) after each job event
        self.series = SeriesBook()

    # ---- reading

    def get(self, jobId):
        job = self.jobs.get(jobId)
        if job is None:
            if jobId in self.deleted:
                raise UnknownJob("job %d was deleted" % (jobId,))
            raise UnknownJob("no job %d" % (jobId,))
        return job

    def status(self, jobId):
        """The status of a job, or ``UNKNOWN`` (the legacy protocol's word)."""
        job = self.jobs.get(jobId)
        return job.status if job is not None else "UNKNOWN"

    def counts(self):
        return dict(self._counts)

    def pendingCount(self):
        return self._counts[PENDING]

    def pendingOrder(self):
        """The ids of the pending jobs in the order they will be leased."""
        return [jobId for priority, jobId in sorted(self._pending)
                if self._isPendingEntry(priority, jobId)]

    def pendingOf(self, owner):
        """How many of ``owner``'s jobs are PENDING."""
        return self._pendingOf.get(owner, 0)

    def submitTimes(self):
        """Each owner's submit times in the fair-share window (a snapshot keeps them)."""
        return {owner: list(times) for owner, times in self._owners.items()}

    def fairShare(self, owner, now):
        """The owner's number of submissions in the window before ``now``."""
        times = self._owners.get(owner)
        if not times:
            return 0
        _forget(times, now)
        return len(times)

    # ---- making records (checks only; no change)

    def reserveId(self):
        """An id for a job about to be submitted (its files are stored first)."""
        jobId = self.nextId
        self.nextId += 1
        return jobId

    def makeSubmit(self, jobId, now, name, notify, origin, service, version, uploads,
                   owner=None, keyHash=None, inputKey=None, cachedFrom=None):
        """The submit of a job. Its ``owner`` is who sent it (by default its
        origin address), never ``notify``, which anyone may fill in with
        another's address: fair share counts by owner. A determined job carries
        its ``inputKey``; one answered by the result cache names the job it is
        answered from, ``cachedFrom`` (``reflservd.resultcache``)."""
        owner = owner or origin or "anonymous"
        record = {
            "type": "submit", "time": now, "id": jobId, "name": name,
            "notify": notify, "origin": origin, "owner": owner,
            "service": service, "version": version,
            "priority": self.fairShare(owner, now),
            "uploads": dict(uploads),
        }
        if keyHash is not None:
            record["keyHash"] = keyHash
        if inputKey is not None:
            record["inputKey"] = inputKey
        if cachedFrom is not None:
            record["cachedFrom"] = cachedFrom
        return record

    def makeLease(self, now, queue, worker=None, legacy=False):
        """The record leasing the next pending job, or None when none is pending."""
        while self._pending:
            priority, jobId = heapq.heappop(self._pending)
            self._inHeap.discard(jobId)
            if self._isPendingEntry(priority, jobId):
                job = self.jobs[jobId]
                return {"type": "lease", "time": now, "id": jobId, "queue": queue,
                        "lease": job.lease + 1, "worker": worker, "legacy": legacy}
        return None

    def checkLease(self, jobId, lease):
        """The job, if ``lease`` is its current lease; else Conflict."""
        job = self.get(jobId)
        if job.lease != lease or job.lease == 0:
            raise Conflict("lease %r of job %d is not current" % (lease, jobId))
        if not self._leaseOpen(job):
            raise Conflict("job %d is %s, not ACTIVE" % (jobId, job.status))
        return job

    @staticmethod
    def _leaseOpen(job):
        """Whether a worker holds the job: ACTIVE, or cancelled while ACTIVE
        and not yet given back (the worker still sends its logs)."""
        return not job.resultPosted and (
            job.status == ACTIVE or (job.status == CANCEL and job.cancelRequested))

    def heartbeat(self, jobId, lease, now, progress=None, confinement=None):
        """Extend a lease and keep the latest progress (checked by the caller:
        ``limits.checkProgress``). Not journaled: progress is a view, and a
        lease is renewed by the next heartbeat after a restart. Returns
        whether the worker should cancel the fit."""
        job = self.checkLease(jobId, lease)
        job.leaseExpires = now + self._termOf(job)
        if confinement:
            job.confinement = confinement
        if progress is not None:
            job.progress = progress
            self._event(job, now, "progress", progress)
        return job.cancelRequested

    def _termOf(self, job):
        return self.legacyLeaseTimeout if job.legacy else self.leaseTimeout

    def renewLegacy(self, worker, now):
        """A legacy worker showed it lives (it leased a job or posted results):
        every legacy lease it holds gets a full term from ``now``. Scans the
        lease deadlines, which hold only the leases in force."""
        for _, jobId, lease in self._leaseDeadlines:
            job = self.jobs.get(jobId)
            if (job is not None and job.legacy and job.worker == worker and job.lease == lease
                    and self._leaseOpen(job)):
                job.leaseExpires = now + self.legacyLeaseTimeout

    def makeFile(self, jobId, lease, now, name, size):
        self.checkLease(jobId, lease)
        return {"type": "file", "time": now, "id": jobId, "name": name, "size": size}

    def makeComplete(self, jobId, lease, now, status, result=None, error=None,
                     trace=None, confinement=None, posted=None):
        job = self.checkLease(jobId, lease)
        if status not in FINISHED:
            raise Refused("status must be one of %s, not %r" % (", ".join(FINISHED), status))
        if job.status == CANCEL:
            status = CANCEL
        record = {"type": "complete", "time": now, "id": jobId, "status": status,
                  "resultJSON": encodeResult(result), "error": _clip(error),
                  "trace": _clip(trace)}
        if confinement:
            record["confinement"] = confinement
        if posted is not None:
            record["postedJSON"] = encodeResult(posted)
        return record

    def makeRelease(self, jobId, lease, now, lost=None):
        """The job goes back to the queue uncounted; or, where its fit was ``lost``
        (a node failed: the reason), counted as an attempt, ERROR past the last."""
        job = self.checkLease(jobId, lease)
        if job.status != ACTIVE:
            raise Conflict("job %d is %s, not ACTIVE" % (jobId, job.status))
        if lost is None:
            return {"type": "release", "time": now, "id": jobId}
        status = PENDING if job.attempts < self.maxAttempts else ERROR
        return {"type": "release", "time": now, "id": jobId, "lost": str(lost)[:MAX_TEXT], "status": status}

    def makeCancel(self, jobId, now):
        job = self.get(jobId)
        if job.status in FINISHED:
            raise Conflict("job %d has already ended %s" % (jobId, job.status))
        return {"type": "cancel", "time": now, "id": jobId}

    def makeDelete(self, jobId, now):
        self.get(jobId)
        return {"type": "delete", "time": now, "id": jobId}

    def makeExpiries(self, now):
        """Records for the leases that have run out by ``now``."""
        records, seen = [], set()
        while self._leaseDeadlines and self._leaseDeadlines[0][0] <= now:
            expires, jobId, lease = heapq.heappop(self._leaseDeadlines)
            job = self.jobs.get(jobId)
            if job is None or job.lease != lease or not self._leaseOpen(job) or jobId in seen:
                continue
            seen.add(jobId)
            if job.leaseExpires > now:
                heapq.heappush(self._leaseDeadlines, (job.leaseExpires, jobId, lease))
                continue
            if job.status == CANCEL:
                status = CANCEL
            elif job.attempts < self.maxAttempts:
                status = PENDING
            else:
                status = ERROR
            records.append({"type": "expire", "time": now, "id": jobId, "lease": lease,
                            "status": status})
        return records

    # ---- applying records (the only mutations)

    def apply(self, record):
        getattr(self, "_apply_" + record["type"])(record)

    def _apply_submit(self, r):
        job = Job()
        job.id = r["id"]
        job.name = r["name"]
        # The same few owners, addresses, services and versions recur in
        # thousands of jobs: one string each.
        job.owner, job.notify, job.origin = intern(r["owner"]), intern(r["notify"]), intern(r["origin"])
        job.service, job.version, job.priority = intern(r["service"]), intern(r["version"]), r["priority"]
        job.status = PENDING
        job.queue = job.worker = job.started = job.finished = None
        job.progress = job.confinement = job.resultJSON = job.error = job.trace = None
        job.attempts = job.lease = 0
        job.leaseExpires = 0.0
        job.legacy = job.cancelRequested = job.resultPosted = False
        job.submitted = r["time"]
        job.events = None
        job.eventSeq = 0
        job.keyHash = r.get("keyHash")
        job.postedJSON = None
        job.inputKey, job.cachedFrom = r.get("inputKey"), r.get("cachedFrom")
        job.series = r.get("series")
        self.jobs[job.id] = job
        self.nextId = max(self.nextId, job.id + 1)
        self._counts[PENDING] += 1
        self._countPending(job.owner, 1)
        self._enqueue(job)
        times = self._owners.setdefault(job.owner, deque())
        times.append(r["time"])
        _forget(times, r["time"])
        self._event(job, r["time"], "status")
        if job.cachedFrom is not None:
            self._answerFromCache(job, r["time"])

    def _answerFromCache(self, job, now):
        """A submit answered by the result cache ends COMPLETE at once with the
        result of the job it names, never leased (its pending entry is stale)."""
        source = self.jobs[job.cachedFrom]
        job.resultJSON, job.confinement = source.resultJSON, source.confinement
        job.resultPosted = True
        job.finished = now
        self._setStatus(job, COMPLETE)
        self._event(job, now, "status")
        self._forgetEvents(job)

    def _apply_series(self, r):
        """A fit series: its members' submits, then the series (``reflservd.series``)."""
        for member in r["members"]:
            self._apply_submit(member)
        self.series.add(r)

    def _apply_lease(self, r):
        job = self.jobs[r["id"]]
        self._setStatus(job, ACTIVE)
        job.lease = r["lease"]
        job.attempts += 1
        job.queue = r["queue"]
        job.worker = r.get("worker")
        job.legacy = bool(r.get("legacy"))
        job.started = r["time"]
        job.progress = None
        job.leaseExpires = r["time"] + self._termOf(job)
        heapq.heappush(self._leaseDeadlines, (job.leaseExpires, job.id, job.lease))
        self._event(job, r["time"], "status")

    def _apply_file(self, r):
        """A result file was stored (the store lists files; the record is history)."""

    def _apply_complete(self, r):
        job = self.jobs[r["id"]]
        job.resultJSON = r["resultJSON"] if "resultJSON" in r else encodeResult(r.get("result"))
        job.error, job.trace = r.get("error"), r.get("trace")
        job.postedJSON = r.get("postedJSON")
        if r.get("confinement"):
            job.confinement = r["confinement"]
        job.resultPosted = True
        job.finished = r["time"]
        if job.status != r["status"]:
            self._setStatus(job, r["status"])
        self._event(job, r["time"], "status")
        self._forgetEvents(job)

    def _apply_release(self, r):
        job = self.jobs[r["id"]]
        if "lost" not in r:
            job.attempts -= 1
        if r.get("status") == ERROR:
            job.error = "its fit was lost %d times; the last: %s" % (job.attempts, r["lost"])
            job.finished = r["time"]
            self._setStatus(job, ERROR)
            self._event(job, r["time"], "status")
            self._forgetEvents(job)
        else:
            self._requeue(job, r["time"])

    def _apply_expire(self, r):
        job = self.jobs[r["id"]]
        if r["status"] == PENDING:
            self._requeue(job, r["time"])
        elif r["status"] == CANCEL:
            job.resultPosted = True
            job.finished = r["time"]
            self._forgetEvents(job)
        else:
            job.error = "worker lost: the lease ran out %d times" % (job.attempts,)
            job.finished = r["time"]
            self._setStatus(job, ERROR)
            self._event(job, r["time"], "status")
            self._forgetEvents(job)

    def _apply_cancel(self, r):
        job = self.jobs[r["id"]]
        if job.status == ACTIVE:
            job.cancelRequested = True
        else:
            job.finished = r["time"]
        job.error = "cancelled"
        self._setStatus(job, CANCEL)
        self._event(job, r["time"], "status")
        if job.finished is not None:
            self._forgetEvents(job)

    def _apply_delete(self, r):
        job = self.jobs[r["id"]]
        self._setStatus(job, None)
        del self.jobs[job.id]
        self.deleted.add(job.id)

    def _requeue(self, job, now):
        self._setStatus(job, PENDING)
        job.queue = job.worker = job.started = None
        job.legacy = False
        self._enqueue(job)
        self._event(job, now, "status")

    def _enqueue(self, job):
        """Put a job in the pending heap, unless an entry for it is still
        there (a replayed lease does not pop it; the entry is valid again)."""
        if job.id not in self._inHeap:
            self._inHeap.add(job.id)
            heapq.heappush(self._pending, (job.priority, job.id))

    def _setStatus(self, job, status):
        """Move a job to ``status`` (None: out of the queue), keeping the counts."""
        self._counts[job.status] -= 1
        if job.status == PENDING:
            self._countPending(job.owner, -1)
        if status is not None:
            self._counts[status] += 1
            if status == PENDING:
                self._countPending(job.owner, 1)
        job.status = status

    def _countPending(self, owner, change):
        left = self._pendingOf.get(owner, 0) + change
        if left > 0:
            self._pendingOf[owner] = left
        else:
            self._pendingOf.pop(owner, None)

    def _isPendingEntry(self, priority, jobId):
        job = self.jobs.get(jobId)
        return job is not None and job.status == PENDING and job.priority == priority

    # ---- events (in memory only: what the events long-poll serves)

    def _event(self, job, now, kind, progress=None):
        """Record a job event. A job's only event is kept as a bare tuple (most
        jobs of a long queue have just their submit); more go in a deque."""
        job.eventSeq += 1
        event = (job.eventSeq, now, kind, job.status, progress)
        if job.events is None:
            job.events = event
        else:
            if isinstance(job.events, tuple):
                job.events = deque((job.events,), maxlen=EVENTS_KEPT)
            job.events.append(event)
        if self.onEvent is not None:
            self.onEvent(job, event)

    @staticmethod
    def _forgetEvents(job):
        """A finished job keeps its last event only (its last progress stays
        in ``job.progress``): the history of a fit is for watching it run."""
        if isinstance(job.events, deque):
            job.events = job.events[-1]

    def eventsAfter(self, jobId, after):
        job = self.get(jobId)
        events = (job.events,) if isinstance(job.events, tuple) else (job.events or ())
        return [{"seq": seq, "time": t, "type": kind, "status": status, "progress": progress}
                for seq, t, kind, status, progress in events if seq > after]

    # ---- a queue loaded from a snapshot (``reflservd.queuesnapshot``)

    def adopt(self, nextId, deleted, owners):
        """Take ``self.jobs`` (just loaded) as the state, with the next id,
        the deleted ids and the owners' submit times, and rebuild what is
        kept from the jobs: the counts, the pending heap, the held leases
        (each given a term from its start; after replaying the records that
        follow the snapshot, a server calls ``restartLeases(now)``)."""
        self.nextId = nextId
        self.deleted = set(deleted)
        self._owners = {owner: deque(times) for owner, times in owners.items()}
        counts, pending = self._counts, self._pending
        for job in self.jobs.values():
            counts[job.status] += 1
            if job.status == PENDING:
                pending.append((job.priority, job.id))
                self._countPending(job.owner, 1)
            elif self._leaseOpen(job):
                self.restartLease(job, job.started)
        self._inHeap = {jobId for _, jobId in pending}
        heapq.heapify(pending)

    def restartLease(self, job, now):
        job.leaseExpires = now + self._termOf(job)
        heapq.heappush(self._leaseDeadlines, (job.leaseExpires, job.id, job.lease))

    def restartLeases(self, now):
        """After a replay: give every held lease a full term from ``now``."""
        for job in self.jobs.values():
            if self._leaseOpen(job):
                self.restartLease(job, now)


def _forget(times, now):
    """Drop the submit times that have left the fair-share window."""
    horizon = now - FAIR_SHARE_WINDOW
    while times and times[0] <= horizon:
        times.popleft()


def _clip(text):
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n[clipped]"
