"""One job as the queue keeps it, and how jobs are read out of the queue:
the record the API shows, a result kept as JSON text, the jobs matching a
filter. Pure, like ``queue``.
"""

import json


class Job:
    """One job as the queue sees it. The request itself lives in the store."""

    __slots__ = (
        "id", "name", "owner", "notify", "origin", "service", "version",
        "status", "priority", "queue", "attempts", "lease", "leaseExpires",
        "legacy", "worker", "submitted", "started", "finished", "progress",
        "confinement", "cancelRequested", "resultJSON", "error", "trace",
        "resultPosted", "events", "eventSeq", "keyHash", "postedJSON", "series",
        "inputKey", "cachedFrom",
    )

    @property
    def result(self):
        """The result the worker sent (a fresh dict each time), or None. It is
        kept as its JSON text: a long history of finished jobs takes a fifth
        of the memory, and a snapshot of them decodes twice as fast."""
        text = self.resultJSON
        return None if text is None else json.loads(text)

    def toJSON(self, notify=False):
        """The job record of the API (docs/api.md), without the request; the
        notify address only with ``notify`` (for its key holder and admins)."""
        return {
            "id": self.id, "name": self.name, "owner": self.owner,
            "notify": self.notify if notify else None, "origin": self.origin,
            "service": self.service, "version": self.version,
            "status": self.status, "priority": self.priority,
            "queue": self.queue, "attempts": self.attempts, "lease": self.lease,
            "submitted": self.submitted, "started": self.started,
            "finished": self.finished, "progress": self.progress,
            "confinement": self.confinement,
            "cancelRequested": self.cancelRequested,
            "result": self.result, "error": self.error, "cachedFrom": self.cachedFrom,
            "series": self.series,
        }


_encodeJSON = json.JSONEncoder(separators=(",", ":")).encode


def encodeResult(result):
    """A result as the compact JSON text a job keeps (None for none)."""
    return None if result is None else _encodeJSON(result)


def selectJobs(queue, status=None, owner=None, queueName=None):
    """The jobs matching the filters, newest first."""
    if status is not None:
        status = status.upper()
    jobs = [job for job in queue.jobs.values()
            if (status is None or job.status == status)
            and (owner is None or job.owner == owner)
            and (queueName is None or job.queue == queueName)]
    jobs.sort(key=lambda job: job.id, reverse=True)
    return jobs
