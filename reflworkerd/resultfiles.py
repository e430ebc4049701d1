"""A leased job's result files: which of what the fit left go to the server,
and sending them in bounded parts.

When the fit ends, ``results/`` is looked at (``jobfiles.scanResults``, off
the reactor thread, as every read of what a fit left): anything but a regular
file of the slot's uid is a problem that ends the job ``ERROR`` saying what
was found, and so are results past the per-job quota (``filesQuota`` files,
``bytesQuota`` bytes by apparent size), keeping the files within it and
naming those left out. What is kept is uploaded ``partSize`` bytes per PUT,
a few files at a time; a server that answers 413 (over its own quota) gets no
more, and the job ends ``ERROR`` with its message. Each acknowledged file is
remembered (``uploaded``, saved with the job's state by ``onUploaded``) so
that a delivery that is retried, or taken up by the next start of the
worker, sends only the rest.
"""

from twisted.internet import defer
from twisted.logger import Logger

from reflworkerd import jobfiles
from reflworkerd.serverclient import OverQuota, ServerError, checkName
from reflworkerd.shared import RESULTS_DIR

PART_SIZE = 8 * 1024 * 1024
"""Bytes per PUT of a result file: the server buffers each request body whole."""
UPLOADS_AT_ONCE = 4
"""Result files uploaded at the same time when a fit ends."""


class ResultFiles:
    """The result files of the job ``jobId`` (lease ``lease``) in ``jobDir``.

    ``sizes`` is ``{name: bytes to send}`` once chosen (None before),
    ``uploaded`` the names the server has acknowledged.
    """

    _log = Logger()

    def __init__(self, client, inThread, jobId, lease, jobDir, uid, filesQuota, bytesQuota,
                 partSize=PART_SIZE, sizes=None, uploaded=(), onUploaded=None):
        self.client = client
        self._inThread = inThread
        self.jobId = jobId
        self.lease = lease
        self.jobDir = jobDir
        self.uid = uid
        self.filesQuota = filesQuota
        self.bytesQuota = bytesQuota
        self.partSize = partSize
        self.sizes = dict(sizes) if sizes is not None else None
        self.uploaded = set(uploaded)
        self._onUploaded = onUploaded
        self._serverQuotaReached = False
        self._problems = []

    @defer.inlineCallbacks
    def choose(self, said=""):
        """Look at what the fit left; the problem that ends the job ERROR, or None.
        What ``said`` (the outcome's error) already says is not said again."""
        try:
            found = yield self._inThread(
                jobfiles.scanResults, self.jobDir, self.uid, self.filesQuota, self.bytesQuota,
                RESULTS_DIR, checkName)
        except OSError as e:
            found = jobfiles.Results()
            found.unsafe.append("the job directory cannot be read (%s)" % (e.strerror,))
        self.sizes = dict(found.sizes)
        found.unsafe = [what for what in found.unsafe if what not in said]     # said already (a checkpoint)
        return found.problem()

    def takeProblems(self):
        """What sending found that ends the job ERROR, each said once."""
        problems, self._problems = self._problems, []
        return problems

    @defer.inlineCallbacks
    def putFile(self, name, relative, limit=None, maximum=None):
        """Upload the job's file ``relative`` as its result ``name``, opened and read
        off the reactor thread (``jobfiles.openFile``), at most ``limit`` bytes of it
        (its size when it was looked at); the bytes sent. A file larger than
        ``maximum`` is not sent (`OverQuota`)."""
        jobFile = yield self._inThread(jobfiles.openFile, self.jobDir, relative, self.uid)
        try:
            if maximum is not None and jobFile.size > maximum:
                raise OverQuota("%s is %d bytes, over the quota of %d bytes per job"
                                % (relative, jobFile.size, maximum))
            size = jobFile.size if limit is None else min(jobFile.size, limit)
            offset = 0
            while True:
                part = yield self._inThread(jobFile.read, offset, min(self.partSize, size - offset))
                last = offset + len(part) >= size or not part
                yield self.client.putPart(self.jobId, self.lease, name, offset, part, last)
                offset += len(part)
                if last:
                    return offset
        finally:
            jobFile.close()

    @defer.inlineCallbacks
    def send(self):
        """Upload the chosen files not yet acknowledged, a few at a time (each
        is a round trip and a journal record on the server). Every upload of
        a round ends before this does, so a retry never races one in flight;
        then a stale or transient refusal, if any, is raised."""
        names = [name for name in sorted(self.sizes) if name not in self.uploaded]
        limit = defer.DeferredSemaphore(UPLOADS_AT_ONCE)
        outcomes = yield defer.DeferredList(
            [limit.run(self._sendOne, name) for name in names], consumeErrors=True)
        errors = [result for ok, result in outcomes if not ok]
        stale = [f for f in errors if f.check(ServerError) and f.value.stale]
        for failure in stale or errors:
            failure.raiseException()

    @defer.inlineCallbacks
    def _sendOne(self, name):
        if self._serverQuotaReached:
            return
        try:
            yield self.putFile(name, RESULTS_DIR + "/" + name, self.sizes.get(name))
        except ServerError as e:
            if e.stale or e.transient:
                raise
            if e.code == 413:
                self._log.error("job {jobId}: result file {name} refused, over the server's quota "
                                "({why}); no more are sent", jobId=self.jobId, name=name, why=str(e))
                self._serverQuotaReached = True
                self._problems.append("the server refused result file %s: %s" % (name, e.detail))
            else:
                self._log.error("job {jobId}: result file {name} refused ({why}); "
                                "skipped", jobId=self.jobId, name=name, why=str(e))
        except jobfiles.UnsafeFile as e:
            self._log.warn("job {jobId}: result file {name} not sent ({why})",
                           jobId=self.jobId, name=name, why=str(e))
            self._problems.append("the fit left what the worker does not read: %s" % (e,))
        except OSError as e:
            self._log.warn("job {jobId}: result file {name} not sent ({why})",
                           jobId=self.jobId, name=name, why=str(e))
        self.uploaded.add(name)
        if self._onUploaded is not None:
            self._onUploaded()
