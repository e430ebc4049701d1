"""Batch mode: the server puts every job on the local Slurm itself, no worker daemon.

``twistd reflservd --batch-queue slurm --batch-options "--slurm-partition P
--shared-dir DIR …"``: the server runs, in its own process, the worker the
``slurm`` backend makes (``reflworkerd.tap``), as the original jobqueue's
"batch queue" did. It is the same worker, with the same leases, progress,
result files and cancel as a worker daemon on a login node would have: it
takes its work from the server's queue through a listener of its own on
loopback (an ephemeral port, opened before the worker starts), with a worker
token made for it at each start. The job states, pages and API are those of
any job; only the fits' host is Slurm's.

The server itself never loads a model: the worker it runs only writes each
fit's command and submits it with ``sbatch``; the fit runs on a compute node.
"""

import secrets
import shlex

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage

BATCH_SYSTEMS = ("slurm",)
BATCH_LISTEN = "tcp:0:interface=127.0.0.1"


def workerOptions(batchQueue, text):
    """The worker's parsed options for batch mode from ``--batch-options``; a usage
    error names what is wrong."""
    from reflworkerd.tap import Options

    if batchQueue not in BATCH_SYSTEMS:
        raise usage.UsageError("--batch-queue is %s, not %r" % (" or ".join(BATCH_SYSTEMS), batchQueue))
    try:
        args = shlex.split(text)
    except ValueError as e:
        raise usage.UsageError("--batch-options: %s" % (e,))
    for fixed in ("--server", "--queue", "--backend", "--token-file", "--ca-file"):
        if any(arg == fixed or arg.startswith(fixed + "=") for arg in args):
            raise usage.UsageError("--batch-options: %s is set by the server in batch mode" % (fixed,))
    options = Options()
    try:
        options.parseOptions(["--server", "http://127.0.0.1:1/", "--queue", batchQueue,
                              "--backend", batchQueue] + args)
    except usage.UsageError as e:
        raise usage.UsageError("--batch-options: %s" % (e,))
    return options


class BatchWorker(service.Service):
    """The server's own worker: a loopback listener on ``site``, then the worker
    of ``options`` (see `workerOptions`) taking jobs through it."""

    _log = Logger()

    def __init__(self, reactor, site, access, options):
        self._reactor = reactor
        self._site = site
        self._access = access
        self._options = options
        self._port = None
        self.worker = None

    @defer.inlineCallbacks
    def startService(self):
        service.Service.startService(self)
        from reflworkerd.tap import makeService

        endpoint = endpoints.serverFromString(self._reactor, BATCH_LISTEN)
        self._port = yield endpoint.listen(self._site)
        config = dict(self._options)
        config["server"] = "http://127.0.0.1:%d/" % (self._port.getHost().port,)
        if self._access.workerTokens is not None:
            config["token"] = secrets.token_urlsafe(32)
            self._access.addWorkerToken(config["token"], config["queue"])
        self.worker = makeService(config, self._reactor, onFatal=self._fatal)
        self.worker.startService()
        self._log.info("batch mode: every job goes to Slurm partition {partition} through queue "
                       "{queue}", partition=config["slurm-partition"], queue=config["queue"])

    def _fatal(self, why):
        self._log.error("batch mode: the Slurm worker cannot run ({why}); jobs stay PENDING", why=why)

    @defer.inlineCallbacks
    def stopService(self):
        """The worker first (its Slurm jobs go on, adopted at the next start), then the listener."""
        service.Service.stopService(self)
        if self.worker is not None:
            yield self.worker.stopService()
        if self._port is not None:
            yield self._port.stopListening()
