"""``twistd reflservd``: the options and the service tree of the server."""

import math
import os
import resource

from twisted.application import service, strports
from twisted.python import usage

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "The refl1d remote fitting queue: jobs, leases, journal, HTTP API."
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Endpoint to listen on (a Twisted endpoint string)."],
        ["state-dir", "d", "var/reflservd", "Directory of the journal and the job files."],
        ["max-upload", None, 200 * 1024 * 1024, "Largest request body, in bytes.", int],
        ["lease-timeout", None, 60.0, "Seconds a lease lasts without a heartbeat.", float],
        ["max-attempts", None, 3, "Leases a job may lose before it ends ERROR.", int],
        ["snapshot-every", None, 100_000, "Journal records between snapshots.", int],
        ["worker-token-file", None, None, "File holding the token workers must present."],
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
        ["min-upload-rate", None, 64 * 1024,
         "Bytes per second a body must at least arrive at (see --request-deadline).", int],
    ]

    def postOptions(self):
        for name in ("max-upload", "max-attempts", "snapshot-every"):
            if self[name] < 1:
                raise usage.UsageError("--%s must be at least 1" % (name,))
        if self["lease-timeout"] <= 0:
            raise usage.UsageError("--lease-timeout must be positive")
        for name in ("max-connections-per-address", "min-upload-rate"):
            if self[name] < 1:
                raise usage.UsageError("--%s must be at least 1" % (name,))
        if not 0 < self["request-deadline"] < math.inf:
            raise usage.UsageError("--request-deadline must be a positive number of seconds")
        if self["max-connections"] is None:
            self["max-connections"] = defaultMaxConnections()
        elif self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        path = self["worker-token-file"]
        if path is not None:
            try:
                with open(path) as f:
                    self["worker-token"] = f.read().strip()
            except OSError as e:
                raise usage.UsageError("cannot read --worker-token-file %s: %s" % (path, e.strerror))
            if not self["worker-token"]:
                raise usage.UsageError("--worker-token-file %s is empty" % (path,))
        else:
            self["worker-token"] = None
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
    from reflservd.server import QueueServer
    from reflservd.site import makeSite

    metrics = Metrics()
    top = service.MultiService()
    queueServer = QueueServer(
        config["state-dir"], reactor, leaseTimeout=config["lease-timeout"],
        maxAttempts=config["max-attempts"], snapshotEvery=config["snapshot-every"],
        metrics=metrics, notifier=Notifier.fromConfig(config, reactor))
    queueServer.setName("queue")
    queueServer.setServiceParent(top)
    site = makeSite(queueServer, config["max-upload"], config["worker-token"], metrics,
                    reactor=reactor, maxConnections=config["max-connections"],
                    maxPerAddress=config["max-connections-per-address"],
                    requestDeadline=config["request-deadline"],
                    minUploadRate=config["min-upload-rate"])
    web = strports.service(config["listen"], site, reactor=GuardedListeners(reactor))
    web.setName("web")
    web.setServiceParent(top)
    return top
