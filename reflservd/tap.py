"""``twistd reflservd``: the options and the service tree of the server."""

import math
import os
import resource

from twisted.application import service, strports
from twisted.python import usage

from reflservd import limits
from reflservd.access import Access, TokenFileError, isLoopbackListen, readTokenFile
from reflservd.queue import LEGACY_LEASE_TIMEOUT

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


def _names(text):
    return [n.strip() for n in (text or "").split(",") if n.strip()]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "The refl1d remote fitting queue: jobs, leases, journal, HTTP API."
    optFlags = [
        ["open-workers", None, "Serve worker routes without tokens on a non-loopback listener."],
        ["salvage", None, "Start from the journal records before damage, setting the rest aside."],
    ]
    optParameters = [
        ["state-dir", "d", "var/reflservd", "Directory of the journal and the job files."],
        ["max-upload", None, 200 * 1024 * 1024, "Largest request body, in bytes.", int],
        ["lease-timeout", None, 60.0, "Seconds a lease lasts without a heartbeat.", float],
        ["legacy-lease-timeout", None, LEGACY_LEASE_TIMEOUT,
         "Seconds a legacy (jobqueue) worker's lease lasts without its nextjob or postjob.", float],
        ["max-attempts", None, 3, "Leases a job may lose before it ends ERROR.", int],
        ["snapshot-every", None, 100_000, "Journal records between snapshots.", int],
        ["worker-token-file", None, None,
         "File of 'QUEUE TOKEN' lines (a bare TOKEN serves every queue); mode 600."],
        ["admin-token-file", None, None, "File of admin tokens (cancel or delete any job); mode 600."],
        ["submit-token-file", None, None,
         "File of 'IDENTITY TOKEN' lines: submission needs one of them (mode 600)."],
        ["trusted-proxy", None, None, "Comma-separated addresses whose X-Forwarded-For is believed."],
        ["public-host", None, None, "Comma-separated Host names this server answers to."],
        ["max-files", None, limits.MAX_FILES, "Files uploaded with one job.", int],
        ["max-file-bytes", None, 200 * 1024 * 1024, "Bytes of one uploaded file.", int],
        ["max-result-files", None, 1000, "Result files one job keeps.", int],
        ["max-result-bytes", None, 1 << 30, "Bytes of results one job keeps.", int],
        ["max-pending", None, 500, "Pending jobs of one submitter (0: no limit).", int],
        ["submits-per-minute", None, 120, "Submissions a minute from one submitter (0: no limit).", int],
        ["base-url", None, None, "The server's public URL, for links in mails."],
        ["smtp", None, None, "HOST:PORT of an SMTP server for notification mails (off when unset)."],
        ["smtp-from", None, "reflservd@localhost", "From address of notification mails."],
        ["max-connections", None, None,
         "Open connections at most; the rest are answered 503 (default: half the open-file "
         "limit left after 64 for the journal and the store).", int],
        ["max-connections-per-address", None, 64,
         "Open connections from one address at most; the rest are answered 503.", int],
        ["request-deadline", None, 60.0,
         "Seconds a request's headers and body may take to arrive, plus one for each "
         "--min-upload-rate bytes of its body; bytes trickling in do not extend it.", float],
        ["batch-queue", None, None, "Batch mode: put every job on the local batch system "
         "(slurm) from this server, with no worker daemon."],
        ["batch-options", None, "", "With --batch-queue: the options of the worker the server runs, "
         "as reflworkerd takes them (--slurm-partition, --shared-dir, --slots, --sandbox, limits …), "
         "in one string."],
        ["min-upload-rate", None, 64 * 1024,
         "Bytes per second a body must at least arrive at (see --request-deadline).", int],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, endpoint):
        """An endpoint to listen on, a Twisted endpoint string (tcp:PORT:interface=ADDRESS, ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem, unix:PATH); give it again for another listener [default: %s]"""  # noqa: E501 (one line: twistd --help wraps it)
        self["listen"].append(endpoint)

    opt_l = opt_listen
    opt_listen.__doc__ %= (DEFAULT_LISTEN,)

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for name in ("max-upload", "max-attempts", "snapshot-every", "max-files",
                     "max-file-bytes", "max-result-files", "max-result-bytes"):
            if self[name] < 1:
                raise usage.UsageError("--%s must be at least 1" % (name,))
        for name in ("max-pending", "submits-per-minute"):
            if self[name] < 0:
                raise usage.UsageError("--%s must be 0 (no limit) or more" % (name,))
        for name in ("lease-timeout", "legacy-lease-timeout"):
            if not self[name] > 0:
                raise usage.UsageError("--%s must be positive" % (name,))
        for name in ("max-connections-per-address", "min-upload-rate"):
            if self[name] < 1:
                raise usage.UsageError("--%s must be at least 1" % (name,))
        if not 0 < self["request-deadline"] < math.inf:
            raise usage.UsageError("--request-deadline must be a positive number of seconds")
        if self["max-connections"] is None:
            self["max-connections"] = defaultMaxConnections()
        elif self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        tokens = {}
        for option, what, named in (("worker-token-file", "worker token file", True),
                                    ("admin-token-file", "admin token file", True),
                                    ("submit-token-file", "submit token file", True)):
            path = self[option]
            try:
                tokens[option] = None if path is None else readTokenFile(path, what, named)
            except TokenFileError as e:
                raise usage.UsageError(str(e))
        beyond = [endpoint for endpoint in self["listen"] if not isLoopbackListen(endpoint)]
        if tokens["worker-token-file"] is None and not self["open-workers"] and beyond:
            raise usage.UsageError(
                "--listen %s reaches beyond this machine, and without --worker-token-file "
                "anyone could lease jobs, read their files and post results: give workers "
                "tokens, or say --open-workers" % (beyond[0],))
        publicHosts = _names(self["public-host"]) or None
        if publicHosts is None and not beyond:
            publicHosts = ["localhost", "127.0.0.1", "::1"]
        self["batch-worker"] = None
        if self["batch-queue"] is not None:
            from reflservd.batch import workerOptions

            self["batch-worker"] = workerOptions(self["batch-queue"], self["batch-options"])
            if publicHosts is not None:
                publicHosts = list(publicHosts) + ["127.0.0.1"]    # the batch worker's own listener
        elif self["batch-options"]:
            raise usage.UsageError("--batch-options is for --batch-queue")
        self["access"] = Access(
            workerTokens=tokens["worker-token-file"], adminTokens=tokens["admin-token-file"],
            submitTokens=tokens["submit-token-file"],
            trustedProxies=_names(self["trusted-proxy"]), publicHosts=publicHosts)
        if self["smtp"] is not None:
            host, _, port = self["smtp"].rpartition(":")
            if not host or not port.isdigit():
                raise usage.UsageError("--smtp takes HOST:PORT")
        self["state-dir"] = os.path.abspath(self["state-dir"])


def defaultMaxConnections():
    """Half of the open files this process may have past 64 kept for the
    journal, the store and the thread pool: each connection may hold a
    second descriptor, its spooled body. At least 16."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - 64) // 2)


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from reflservd.listen import GuardedListeners
    from reflservd.metrics import Metrics
    from reflservd.notify import Notifier
    from reflservd.limits import Quotas
    from reflservd.server import QueueServer
    from reflservd.site import makeSite

    metrics = Metrics()
    top = service.MultiService()
    quotas = Quotas(
        maxFiles=config["max-files"], maxFileBytes=config["max-file-bytes"],
        maxJobBytes=config["max-upload"], maxResultFiles=config["max-result-files"],
        maxResultBytes=config["max-result-bytes"], maxPending=config["max-pending"],
        submitsPerMinute=config["submits-per-minute"])
    queueServer = QueueServer(
        config["state-dir"], reactor, leaseTimeout=config["lease-timeout"],
        maxAttempts=config["max-attempts"], snapshotEvery=config["snapshot-every"],
        metrics=metrics, notifier=Notifier.fromConfig(config, reactor), quotas=quotas,
        legacyLeaseTimeout=config["legacy-lease-timeout"], salvage=config["salvage"])
    queueServer.setName("queue")
    queueServer.setServiceParent(top)
    site = makeSite(queueServer, config["max-upload"], config["access"], metrics,
                    reactor=reactor, maxConnections=config["max-connections"],
                    maxPerAddress=config["max-connections-per-address"],
                    requestDeadline=config["request-deadline"],
                    minUploadRate=config["min-upload-rate"])
    for number, endpoint in enumerate(config["listen"], 1):
        web = strports.service(endpoint, site, reactor=GuardedListeners(reactor))
        web.setName("web" if number == 1 else "web-%d" % (number,))
        web.setServiceParent(top)
    if config["batch-worker"] is not None:
        from reflservd.batch import BatchWorker

        batch = BatchWorker(reactor, site, config["access"], config["batch-worker"])
        batch.setName("batch")
        batch.setServiceParent(top)
    return top
