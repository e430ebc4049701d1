"""The server's side of fit series (``reflservd.series``): a series
request checked whole, its members' files written, and one ``series``
record committed; cancel and delete of every member.

A series is held to what its members would be held to one by one: each
member's files to the per-job limits, its owner's pending jobs to
``--max-pending`` counting every member (a series past it is refused
whole), and the model arguments to ``fitoptions.modelArgs``. Anything
refused changes nothing: the checks come before any file is written, and
files written for a series whose record is refused are removed.
"""

from twisted.internet import defer
from twisted.logger import Logger

from reflservd import limits
from reflservd import queue as Q
from reflservd import series as S
from reflservd.access import newJobKey
from reflservd.errors import DomainError, Refused, TooLarge, Unavailable
from reflservd.fitoptions import modelArgs
from reflservd.journalfiles import JournalWriteError
from reflservd.limits import checkRequest, sourceSize
from reflservd.store import checkName


class SeriesDesk:
    """Submit, cancel and delete series on a `server.QueueServer`."""

    _log = Logger()

    def __init__(self, server):
        self.server = server

    def get(self, seriesId):
        return self.server.queue.series.get(seriesId)

    @defer.inlineCallbacks
    def submit(self, document, files, origin, owner=None):
        """Submit the series ``document`` (``checkSeries``) with the uploaded
        ``files`` (``[(name, bytes or file)]``); ``(series, key)`` once its
        record is on disk, the key controlling the series and every member."""
        server, queue = self.server, self.server.queue
        job, shared, members = checkSeries(document)
        name, notify, serviceName, version = checkRequest(job)   # checked already: its values
        sources = _sources(files, shared, members)
        sizes = {fileName: sourceSize(source) for fileName, source in sources.items()}
        quotas = server.quotas
        for args, own in members:
            limits.checkFiles([(n, sizes[n]) for n in shared + own], quotas.maxFiles,
                              quotas.maxFileBytes, quotas.maxJobBytes)
        owner = owner or origin
        server.checkSubmitter(owner, len(members))
        key, keyHash = newJobKey()
        seriesId = queue.series.reserveId()
        planned = []
        for index, (args, own) in enumerate(members, 1):
            label = S.memberLabel(args, own, index)
            planned.append((queue.reserveId(), S.memberRequest(job, args, label), shared + own, label))
        try:
            yield server.inThread(_writeMembers, server.store, planned, sources)
        except OSError as e:
            server.inThread(_removeMembers, server.store, planned)
            raise Unavailable("the series' files could not be stored: %s" % (e.strerror,))
        queue = server.queue        # a journal that failed meanwhile reloaded it
        now = server.reactor.seconds()
        submits = [queue.makeSubmit(jobId, now, request["name"], notify, origin, serviceName, version,
                                    {n: sizes[n] for n in names}, owner=owner, keyHash=keyHash)
                   for jobId, request, names, _ in planned]
        record = S.makeSeries(seriesId, now, name, origin, owner, keyHash, submits,
                              [label for *_, label in planned])
        try:
            d = server.commit(record, namesFiles=True)
        except DomainError:
            server.inThread(_removeMembers, server.store, planned)
            raise
        server.countSubmit(owner)
        server.dispatch()
        yield d
        if server.metrics is not None:
            server.metrics.submits.inc(len(planned))
        self._log.info("series {seriesId}: {count} members submitted by {owner}",
                       seriesId=seriesId, count=len(planned), owner=owner)
        return queue.series.get(seriesId), key

    def cancel(self, seriesId):
        """Cancel every member that has not ended; the series once the records are on disk."""
        server, queue = self.server, self.server.queue
        series = queue.series.get(seriesId)
        now = server.reactor.seconds()
        commits = [server.commit(queue.makeCancel(jobId, now)) for jobId in series.members
                   if jobId in queue.jobs and queue.jobs[jobId].status not in Q.FINISHED]
        if commits:
            d = defer.gatherResults(commits, consumeErrors=True)
            d.addErrback(_firstError)
        else:
            d = server.journal.durable()
            d.addErrback(_unavailable)
        return d.addCallback(lambda _: series)

    def delete(self, seriesId):
        """Delete every member still there (its record and its files)."""
        server, queue = self.server, self.server.queue
        series = queue.series.get(seriesId)
        deletes = [server.delete(jobId) for jobId in series.members if jobId in queue.jobs]
        d = defer.gatherResults(deletes, consumeErrors=True)
        d.addErrback(_firstError)
        return d.addCallback(lambda _: series)


def _unavailable(failure):
    failure.trap(JournalWriteError)
    raise Unavailable("the journal cannot be written (%s)" % (failure.getErrorMessage(),))


def _firstError(failure):
    failure.trap(defer.FirstError)
    failure.value.subFailure.raiseException()


def checkSeries(document, maxMembers=limits.MAX_SERIES):
    """The parts of a series request (``docs/api.md``): ``(job, shared,
    members)``: ``job`` the request every member shares, ``shared`` the
    names of the files every member gets, ``members`` a list of ``(args,
    files)``; ``Refused`` naming the first rule broken. Every uploaded name
    is used once (a member's files are its own)."""
    if not isinstance(document, dict):
        raise Refused("the series request must be a JSON object")
    limits.checkJSON(document, "the series request")
    unknown = sorted(set(document) - {"job", "shared", "members"})
    if unknown:
        raise Refused("unknown series field(s) %s (expected job, shared, members)" % (", ".join(unknown),))
    job = document.get("job")
    if not isinstance(job, dict):
        raise Refused("the series needs 'job': the job request its members share")
    checkRequest(job)
    service = job.get("service", "refl1d")
    if service == "refl1d" and not isinstance(job.get("data"), dict):
        raise Refused("a refl1d series' 'job' needs 'data': {\"model\": NAME, \"options\": {...}}")
    if isinstance(job.get("data"), dict) and "args" in job["data"]:
        raise Refused("a series' model arguments are its members' ('args' of each member), not the job's")
    shared = _names(document.get("shared", []), "'shared'")
    members = document.get("members")
    if not isinstance(members, list) or not members:
        raise Refused("the series needs 'members': a list of at least one member")
    if len(members) > maxMembers:
        raise TooLarge("a series takes at most %d members, not %d" % (maxMembers, len(members)))
    parsed, seen = [], set(shared)
    for index, member in enumerate(members, 1):
        what = "member %d" % (index,)
        if not isinstance(member, dict) or set(member) - {"args", "files"}:
            raise Refused("%s must be an object of 'args' and 'files'" % (what,))
        try:
            args = modelArgs(member.get("args", []))
        except Refused as e:
            raise Refused("%s: %s" % (what, e.message)) from None
        if args and service != "refl1d":
            raise Refused("%s: model arguments are for the refl1d service, not %r" % (what, service))
        files = _names(member.get("files", []), "%s's 'files'" % (what,))
        for fileName in files:
            if fileName in seen:
                raise Refused("file %r is named twice in the series (shared, or another member's)"
                              % (fileName,))
            seen.add(fileName)
        parsed.append((args, files))
    return job, shared, parsed


def _names(value, what):
    if not isinstance(value, list) or len(value) > limits.MAX_FILES:
        raise Refused("%s must be a list of at most %d file names" % (what, limits.MAX_FILES))
    if not all(isinstance(name, str) for name in value):
        raise Refused("%s must hold file names (strings)" % (what,))
    names = [checkName(name) for name in value]
    if len(set(names)) != len(names):
        raise Refused("%s names a file twice" % (what,))
    return names


def _sources(files, shared, members):
    """``{name: source}`` of the uploads, which must be exactly the files
    the series names."""
    sources = {}
    for fileName, source in files:
        if fileName in sources:
            raise Refused("two files are named %r" % (fileName,))
        sources[checkName(fileName)] = source
    named = set(shared).union(*(own for _, own in members))
    missing = sorted(named - set(sources))
    if missing:
        raise Refused("file %r is named in the series but was not sent" % (missing[0],))
    unnamed = sorted(set(sources) - named)
    if unnamed:
        raise Refused("file %r was sent but neither 'shared' nor a member names it" % (unnamed[0],))
    return sources


def _writeMembers(store, planned, sources):
    """Write each member's request and files (blocking: the store's thread)."""
    for jobId, request, names, _ in planned:
        files = []
        for fileName in names:
            source = sources[fileName]
            if not isinstance(source, (bytes, bytearray, memoryview)):
                source.seek(0)
            files.append((fileName, source))
        store.writeJob(jobId, request, files)


def _removeMembers(store, planned):
    for jobId, *_ in planned:
        store.remove(jobId)
