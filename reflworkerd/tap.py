"""``twistd reflworkerd``: the options and the service tree of a worker."""

import os
import re
import shlex
import stat
import sys
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from reflservd.names import readSecret
from reflworkerd import sandbox
from reflworkerd.shared import isQueueName
from reflworkerd.jobfiles import RESULT_BYTES_QUOTA, RESULT_FILES_QUOTA

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

DEFAULT_LIMITS = {"cpu": 86400, "memory": 4 << 30, "wall": 86400.0, "nproc": 512, "fsize": 512 << 20}
"""What a fit may use unless told otherwise: a day of CPU and of wall-clock
time, 4 GiB of address space, 512 processes and threads, files of 512 MiB. A
DREAM fit of refl1d's examples uses a fraction of each (docs/security.md).
The process limit is the default only where each slot has a uid of its own:
RLIMIT_NPROC counts every process of the fit's uid, and the worker's own uid
(or root) has others on the host."""

SLOT_UID_BASE = 60001
"""Slot i of a worker running as root runs its fits as uid/gid SLOT_UID_BASE + i."""
MAX_UID = 2**32 - 2


def parseBytes(text):
    """``BYTES``, or a number with a K/M/G/T suffix (powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError("not a size in bytes: %r (e.g. 2000000000 or 2G)" % (text,))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _positive(value):
    value = float(value)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number")
    return value


class Options(usage.Options):
    synopsis = "--server URL --queue NAME [options]"
    optFlags = [
        ["allow-unconfined", None, "Let --sandbox auto run fits without namespaces where the host "
         "has none (else the worker refuses to start)."],
    ]
    longdesc = ("A reflservd worker: long-polls its queue for fits, runs each in a "
                "preloaded fork server, sandboxed, and streams progress and results back.")
    optParameters = [
        ["server", "s", None, "URL of the reflservd server, e.g. http://127.0.0.1:8080/."],
        ["queue", "q", None, "The queue (cluster) to take work from."],
        ["work-dir", "w", "var/reflworkerd", "Directory of the jobs in hand."],
        ["slots", None, 1, "Fits run at the same time.", int],
        ["token-file", None, None, "File holding the server's worker token."],
        ["ca-file", None, None, "PEM file of the certificate authorities (or the self-signed "
         "certificate) an https:// --server is checked against (default: the system's)."],
        ["poll-timeout", None, 30.0, "Seconds one lease long-poll waits (at most 60).", float],
        ["sandbox", None, "auto", "Confinement: auto, apparmor, namespaces or none."],
        ["cpu-limit", None, DEFAULT_LIMITS["cpu"], "CPU seconds a fit may use.", _positive],
        ["memory-limit", None, DEFAULT_LIMITS["memory"], "Address space of a fit, in bytes (K/M/G suffixes).",
         parseBytes],
        ["wall-limit", None, DEFAULT_LIMITS["wall"], "Seconds a fit may run.", _positive],
        ["process-limit", None, None, "Processes and threads a fit's uid may have (RLIMIT_NPROC; "
         "counted per uid; default %d where each slot has its own uid, none where fits run as the "
         "worker's uid or root, whose other processes count too)." % (DEFAULT_LIMITS["nproc"],), int],
        ["file-size-limit", None, DEFAULT_LIMITS["fsize"], "Largest file a fit may write, in bytes "
         "(K/M/G suffixes).", parseBytes],
        ["result-files-quota", None, RESULT_FILES_QUOTA, "Result files a job may leave; past it the "
         "job ends ERROR, keeping files within the quota.", int],
        ["result-bytes-quota", None, RESULT_BYTES_QUOTA, "Bytes of results a job may leave (apparent "
         "sizes; K/M/G suffixes).", parseBytes],
        ["checkpoint-every", None, 60.0, "Seconds between session checkpoints of long fits.", _positive],
        ["backend", None, "local", "Where fits run: local (forked here) or slurm (one sbatch job each)."],
        ["shared-dir", None, None, "With --backend slurm: a directory the compute nodes share "
         "(the jobs in hand and the Slurm jobs' control files go there; it replaces --work-dir)."],
        ["slurm-partition", None, None, "With --backend slurm: the partition fits go to."],
        ["slurm-account", None, None, "With --backend slurm: the account charged."],
        ["slurm-cpus-per-job", None, 1, "With --backend slurm: CPUs each Slurm job asks for "
         "(at least a job's parallel option).", int],
        ["slurm-time", None, None, "With --backend slurm: each Slurm job's time limit (Slurm's format, "
         "e.g. 2:00:00)."],
        ["slurm-extra", None, "", "With --backend slurm: more sbatch arguments, as one string "
         "(split as a shell would, never run by one)."],
        ["slurm-poll", None, 2.0, "With --backend slurm: seconds between the squeue calls that "
         "watch all of this worker's Slurm jobs at once.", _positive],
        ["drain", None, "finish", "On stop: finish the fits in hand, or release them to the queue."],
        ["name", None, None, "This worker's name in the server's records (default host:pid)."],
        ["slot-uid-base", None, None,
         "Where the worker is root, slot i runs its fits as uid/gid BASE+i (default %d); "
         "0 runs them as root without capabilities (unsafe: no process limit, files owned by root)."
         % (SLOT_UID_BASE,), int],
    ]

    _log = Logger()

    def postOptions(self):
        if not self["server"]:
            raise usage.UsageError("--server URL is required")
        url = urlsplit(self["server"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise usage.UsageError("--server takes an http:// or https:// URL, not %r" % (self["server"],))
        if not self["queue"]:
            raise usage.UsageError("--queue NAME is required")
        if not isQueueName(self["queue"]):
            raise usage.UsageError("a queue name is 1-100 letters, digits, '-', '_' or '.'")
        if self["slots"] < 1:
            raise usage.UsageError("--slots must be at least 1")
        if not 0 < self["poll-timeout"] <= 60:
            raise usage.UsageError("--poll-timeout must be in (0, 60] seconds")
        if self["backend"] not in ("local", "slurm"):
            raise usage.UsageError("--backend is local or slurm, not %r" % (self["backend"],))
        self._slurmOptions()
        if self["drain"] not in ("finish", "release"):
            raise usage.UsageError("--drain is finish or release, not %r" % (self["drain"],))
        try:
            self["sandbox-effective"] = sandbox.choose(self["sandbox"])
        except sandbox.SandboxUnavailable as e:
            raise usage.UsageError("--sandbox=%s: %s" % (self["sandbox"], e))
        if self["sandbox"] == "auto" and self["sandbox-effective"] == "none" and not self["allow-unconfined"]:
            raise usage.UsageError("--sandbox=auto: this host cannot confine fits in namespaces (see the "
                                   "log); give --allow-unconfined to run them with --sandbox none's "
                                   "protection only, or fix the host")
        if self["result-files-quota"] < 1 or self["result-bytes-quota"] < 1 << 20:
            raise usage.UsageError("--result-files-quota must be at least 1 and --result-bytes-quota 1M")
        self["token"] = None
        if self["token-file"] is not None:
            try:
                self["token"] = readSecret(self["token-file"])
            except OSError as e:
                raise usage.UsageError("cannot read --token-file %s: %s" % (self["token-file"], e.strerror))
            except ValueError:
                raise usage.UsageError("--token-file %s is empty" % (self["token-file"],))
        self["trust-root"] = None
        if self["ca-file"] is not None:
            if url.scheme != "https":
                raise usage.UsageError("--ca-file is for an https:// --server")
            self["trust-root"] = loadTrustRoot(self["ca-file"])
        self["work-dir"] = os.path.abspath(self["work-dir"])
        limits = {}
        if self["cpu-limit"] is not None:
            limits["cpu"] = int(-(-self["cpu-limit"] // 1))
        if self["memory-limit"] is not None:
            if self["memory-limit"] < 1 << 20:
                raise usage.UsageError("--memory-limit below 1 MB leaves a fit no room to start")
            limits["memory"] = self["memory-limit"]
        if self["wall-limit"] is not None:
            limits["wall"] = self["wall-limit"]
        if self["process-limit"] is not None:
            if self["process-limit"] < 1:
                raise usage.UsageError("--process-limit must be at least 1")
            limits["nproc"] = self["process-limit"]
        if self["file-size-limit"] is not None:
            if self["file-size-limit"] < 1 << 20:
                raise usage.UsageError("--file-size-limit below 1 MB leaves a fit no room for its results")
            limits["fsize"] = self["file-size-limit"]
        self["slot-uids"] = self._slotUids(os.geteuid() == 0)
        if "nproc" not in limits and self["slot-uids"] is not None:
            limits["nproc"] = DEFAULT_LIMITS["nproc"]
        self["limits"] = limits
        self["limits-described"] = "+".join(sandbox.describeLimits(limits))

    def _slurmOptions(self):
        slurmOnly = [name for name in ("shared-dir", "slurm-partition", "slurm-account", "slurm-time")
                     if self[name] is not None] + (["slurm-extra"] if self["slurm-extra"] else [])
        if self["backend"] != "slurm":
            if slurmOnly:
                raise usage.UsageError("--%s is for --backend slurm" % (slurmOnly[0],))
            return
        if not self["shared-dir"]:
            raise usage.UsageError("--backend slurm needs --shared-dir DIR, a directory the compute "
                                   "nodes share")
        if not self["slurm-partition"]:
            raise usage.UsageError("--backend slurm needs --slurm-partition NAME")
        if self["slurm-cpus-per-job"] < 1:
            raise usage.UsageError("--slurm-cpus-per-job must be at least 1")
        try:
            self["slurm-extra-args"] = shlex.split(self["slurm-extra"])
        except ValueError as e:
            raise usage.UsageError("--slurm-extra: %s" % (e,))
        self["shared-dir"] = os.path.abspath(self["shared-dir"])
        self["work-dir"] = self["shared-dir"]

    def _slotUids(self, isRoot):
        """The uid of slot 0 (slot i has this + i), or None: fits run as the worker's uid.

        Only a root worker can change uid. In ``--sandbox none`` the fit sees
        the host's file system as its uid would: where that uid cannot reach
        the Python installation or the work directory the worker refuses to
        start (running the fit as root instead would let it read every
        secret of the host and write into the venv).
        """
        base = self["slot-uid-base"]
        if base is None:
            base = SLOT_UID_BASE
        if base < 0 or base + self["slots"] - 1 > MAX_UID:
            raise usage.UsageError("--slot-uid-base must be 0 (off) or a uid with room for %d slot(s)"
                                   % (self["slots"],))
        if base == 0:
            if isRoot:
                self._log.warn("--slot-uid-base 0: fits run as root without capabilities "
                               "(no process limit, files owned by root); give each slot a uid")
            return None
        if not isRoot:
            return None
        if self["sandbox-effective"] == "none":
            needed = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      os.path.join(self["work-dir"], "jobs")]
            blocked = [b for b in (unreachable(path) for path in needed) if b is not None]
            if blocked:
                why = ("with --sandbox none a fit runs as uid %d on the host's files, and %s is not "
                       "open to other users (it needs o+x on the way, o+rx at the end)" % (base, blocked[0]))
                raise usage.UsageError("--slot-uid-base %d: %s; open it, or use --sandbox namespaces"
                                       % (base, why))
        return base


def loadTrustRoot(path):
    """The certificates of the PEM file ``path`` as a trust root, or a usage error."""
    from twisted.internet import ssl
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise usage.UsageError("cannot read --ca-file %s: %s" % (path, e.strerror))
    try:
        certificates = [ssl.Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n")
                        for block in pem.split(b"-----END CERTIFICATE-----")[:-1]]
    except Exception as e:
        raise usage.UsageError("--ca-file %s holds no PEM certificate: %s" % (path, e))
    if not certificates:
        raise usage.UsageError("--ca-file %s holds no PEM certificate" % (path,))
    return ssl.trustRootFromCertificates(certificates)


def unreachable(path):
    """The first directory on the way to ``path`` that a uid owning nothing and in
    no group cannot enter (or, for ``path`` itself, list), or None.

    A path that does not exist yet is judged by the part of it that does (the
    worker makes the rest, mode 0755).
    """
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    parts = path.strip(os.sep).split(os.sep) if path != os.sep else []
    current = os.sep
    for n in range(len(parts) + 1):
        if n:
            current = os.path.join(current, parts[n - 1])
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return current
        need = stat.S_IXOTH | (stat.S_IROTH if n == len(parts) else 0)
        if stat.S_ISDIR(mode) and mode & need != need:
            return current
    return None


def _quietFactory():
    from twisted.web.client import _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        """No "Starting factory" line for every connection the pool opens."""
        noisy = False

    return QuietFactory


class WorkerService(service.MultiService):
    """The worker's service tree: its children start in the order they were
    added and stop one after another, last first, each once the one before has
    stopped: the poller drains its fits before the backend that runs them goes."""

    _log = Logger()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                self._log.failure("stopping {child}", child=child.name)


def makeService(config, reactor=None, onFatal=None):
    """The worker: the backend that runs fits, then the `Poller` that leases them.
    ``onFatal(why)``: the backend cannot start (by default the reactor stops)."""
    if reactor is None:
        from twisted.internet import reactor
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
    from treq.client import HTTPClient

    from reflworkerd.local import LocalBackend
    from reflworkerd.poller import Poller
    from reflworkerd.provenance import workerFacts
    from reflworkerd.serverclient import ServerClient

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _quietFactory()
    pool.maxPersistentPerHost = config["slots"] + 2
    policy = BrowserLikePolicyForHTTPS(trustRoot=config["trust-root"])
    http = HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
    client = ServerClient(reactor, http, config["server"], token=config["token"], facts=workerFacts(config))
    if config["backend"] == "slurm":
        from reflworkerd.slurm import SlurmBackend

        backend = SlurmBackend(reactor, config["shared-dir"], config["slurm-partition"],
                               account=config["slurm-account"], cpusPerJob=config["slurm-cpus-per-job"],
                               timeLimit=config["slurm-time"], extra=config["slurm-extra-args"],
                               sandboxMode=config["sandbox-effective"], limits=config["limits"],
                               checkpointEvery=config["checkpoint-every"], pollInterval=config["slurm-poll"])
    else:
        backend = LocalBackend(reactor, sandboxMode=config["sandbox-effective"], limits=config["limits"],
                             checkpointEvery=config["checkpoint-every"])

    def fatal(why):
        if onFatal is not None:
            onFatal(why)
        elif reactor.running:
            reactor.stop()

    poller = Poller(reactor, client, backend, config["queue"], config["work-dir"],
                    slots=config["slots"], pollTimeout=config["poll-timeout"],
                    drain=config["drain"],
                    workerName=config["name"],
                    slotUidBase=config["slot-uids"],
                    checkpointEvery=config["checkpoint-every"],
                    resultFilesQuota=config["result-files-quota"],
                    resultBytesQuota=config["result-bytes-quota"],
                    onFatal=fatal)
    top = WorkerService()
    backend.setName("backend")
    backend.setServiceParent(top)
    poller.setName("poller")
    poller.setServiceParent(top)
    return top
