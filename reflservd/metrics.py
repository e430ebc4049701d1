"""Prometheus metrics of a reflservd server (``GET /metrics``)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from reflservd.queue import STATUSES


class Metrics:
    """One registry per server, so that tests can run several."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.submits = Counter("reflservd_submits", "Jobs submitted", registry=registry)
        self.leases = Counter("reflservd_leases", "Leases granted to workers", registry=registry)
        self.expiries = Counter("reflservd_lease_expiries", "Leases that ran out", registry=registry)
        self.requestSeconds = Histogram(
            "reflservd_request_seconds", "HTTP request latency", ["method"], registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.fsyncSeconds = Histogram(
            "reflservd_journal_fsync_seconds", "Journal write+fsync time per batch", registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.batchRecords = Histogram(
            "reflservd_journal_batch_records", "Records per journal fsync (group commit)",
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024))
        self.jobs = Gauge("reflservd_jobs", "Jobs by state", ["state"], registry=registry)
        self._queue = None

        def collectJobs():
            counts = self._queue.counts() if self._queue is not None else {}
            for state in STATUSES:
                self.jobs.labels(state=state).set(counts.get(state, 0))

        self._collectJobs = collectJobs

    def watch(self, queue):
        self._queue = queue

    def journalBatch(self, size, seconds):
        self.batchRecords.observe(size)
        self.fsyncSeconds.observe(seconds)

    def observeRequest(self, method, seconds):
        self.requestSeconds.labels(method=method).observe(seconds)

    def render(self):
        self._collectJobs()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
