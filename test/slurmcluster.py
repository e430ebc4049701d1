"""A real one-node Slurm cluster on loopback, for the tests of the Slurm backend.

`SlurmCluster(directory)` runs its own munged (its own key and socket), slurmctld
and slurmd as children of the test, in the foreground (``-F``/``-D``), with all
they write under ``directory``: ``slurm.conf``, the munge key, socket, seed and
log, the state and spool directories, pid and log files. The machine's own
``/etc/slurm`` and ``/etc/munge`` are neither read nor touched. slurmctld and
slurmd listen on 127.0.0.1 only, on ports chosen free. Clients reach the
cluster through ``SLURM_CONF``: run them with ``cluster.env`` (or ``cluster.run``).

One node named after this host (``NodeAddr=127.0.0.1``, all its CPUs, cons_tres
by core and memory, so two 1-CPU jobs run at once on two cores), one partition
``debug``. Finished jobs stay in ``squeue --states=all`` and ``scontrol show job``
for ``MinJobAge`` (10 minutes): there is no slurmdbd, so ``sacct`` knows nothing.

``start()`` waits (bounded) until the node is idle and a first job (``ready``)
has run, and fails with the daemons' log tails if that never happens. ``stop()``
cancels every job, ends the three daemons by the pids it started, waits for
them and removes ``directory``.
``killSlurmd()`` and ``startSlurmd()`` fail the node under a running job and
bring it back. What Slurm 22.05 then does (measured with the defaults here):

- slurmd back within ``SlurmdTimeout``: the job stays RUNNING throughout (its
  slurmstepd outlives slurmd) and ends COMPLETED as if nothing happened.
- slurmd away longer: about 16 s after the kill the node is ``down*`` and a
  batch job that may be requeued (the default) is PENDING again (``Restarts=1``,
  reason None, then BeginTime; never NODE_FAIL in squeue); ``--no-requeue`` jobs
  end NODE_FAIL (reason NodeDown). The old step's processes keep running until
  slurmd returns, when they are killed; the requeued job runs again once
  eligible, ``credExpire + 1`` s after the requeue (``SLURM_RESTART_COUNT=1``).

What the backend reads from squeue (``squeue --states=all -h -o '%i|%T|%r' -j IDS``,
pinned by test/test_slurmcluster.py): a finished job is listed (``7|COMPLETED|None``,
``8|FAILED|NonZeroExitCode``, ``9|CANCELLED|None`` after scancel, pending or
running alike); one unknown id alone is rc 1, no output, "slurm_load_jobs error:
Invalid job id specified" on stderr; unknown ids in a list of several are left
out, rc 0 (all unknown: rc 0, no output). The exit code is in ``scontrol show job``
(``ExitCode=3:0``).

`unavailableReason()` says why this machine cannot run a cluster, for a skip.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
INSTALL = "apt-get install slurm-wlm munge"
NODE_UP = ("idle", "mixed", "allocated")
CLIENT_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")


def unavailableReason():
    """Why a `SlurmCluster` cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "a Slurm cluster needs root (slurmd starts jobs as their users)"
    missing = [name for name in PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]
    if missing:
        return "%s not found: %s" % (", ".join(missing), INSTALL)
    return None


def program(name):
    """The full path of a Slurm or munge program (the daemons live in /usr/sbin)."""
    return shutil.which(name, path=SEARCH_PATH) or name


def freePorts(count):
    """``count`` distinct loopback ports that were free a moment ago."""
    from test.conftest import freePort      # conftest imports this module
    ports = set()
    while len(ports) < count:
        ports.add(freePort())
    return sorted(ports)


def safeMemory():
    """A RealMemory (MB) the node surely has: half of MemTotal, at most 4096.
    More than the host has would leave the node INVALID."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(256, min(4096, int(line.split()[1]) // 1024 // 2))
    return 1024


def clientEnvironment(conf):
    """This process's environment for Slurm clients of ``conf``: ``SLURM_CONF`` set,
    and no inherited Slurm variables (a test run inside a job must not aim at its job)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(CLIENT_PREFIXES)}
    env["SLURM_CONF"] = conf
    return env


class SlurmCluster:
    """munged, slurmctld and slurmd of one node, configured and run under ``directory``.

    ``slurmdTimeout`` and ``messageTimeout`` (s) set how soon a dead slurmd makes the
    node DOWN; ``credExpire`` (s, at least 5) how long a requeued job waits to run again.
    """

    startTimeout = 30.0
    stopTimeout = 30.0

    def __init__(self, directory, slurmdTimeout=5, messageTimeout=5, credExpire=10, mpiDefault="none"):
        self.directory = os.path.abspath(str(directory))
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.memory = safeMemory()
        self.slurmdTimeout = slurmdTimeout
        self.messageTimeout = messageTimeout
        self.credExpire = credExpire
        self.mpiDefault = mpiDefault
        self.partition = "debug"
        self.conf = self.path("slurm.conf")
        self.mungeSocket = self.path("munge", "munge.socket")
        self.env = clientEnvironment(self.conf)
        self.processes = {}     # daemon name -> the Popen this cluster started
        self.startupSeconds = None

    def path(self, *parts):
        return os.path.join(self.directory, *parts)

    # -- the cluster's life -----------------------------------------------------------

    def start(self):
        """Write the configuration, start the daemons, wait until the node is idle and a first job ran."""
        began = time.monotonic()
        for sub in ("state", "spool", "log"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)
        os.makedirs(self.path("munge"), exist_ok=True)
        os.chmod(self.path("munge"), 0o755)     # munged: everyone must reach its socket
        self.controllerPort, self.slurmdPort = freePorts(2)
        self._writeMungeKey()
        self._writeConf()
        try:
            self._startMunged()
            self._spawn("slurmctld", [program("slurmctld"), "-D", "-f", self.conf])
            self.waitFor(self._controllerUp, "slurmctld answering scontrol ping")
            self.startSlurmd(wait=False)
            self.waitFor(lambda: self.nodeState() == "idle", "node %s idle" % (self.hostname,))
            self._runFirstJob()
        except BaseException:
            self._halt()
            raise
        self.startupSeconds = time.monotonic() - began
        return self

    def stop(self):
        """Cancel every job, end the daemons this cluster started (by pid), remove the directory.

        A slurmd a test left killed is started again first: its return is what ends
        the job steps that outlived it."""
        try:
            if self._running("slurmctld"):
                if not self._running("slurmd"):
                    self.startSlurmd()
                self.cancelAll()
        finally:
            self._halt()

    def killSlurmd(self):
        """SIGKILL slurmd, as a node failure; its job steps (slurmstepd) live on."""
        self._end("slurmd", signal.SIGKILL)

    def startSlurmd(self, wait=True):
        """Start slurmd; with ``wait``, until slurmctld has the node up again (not ``down*``)."""
        assert not self._running("slurmd"), "slurmd already runs"
        self._spawn("slurmd", [program("slurmd"), "-D", "-f", self.conf])
        if wait:
            self.waitFor(lambda: self.nodeState() in NODE_UP, "node %s up" % (self.hostname,))

    def cancelAll(self):
        """scancel every job not yet finished and wait (bounded) until the node is idle."""
        active = list(self.jobs())
        if active:
            self.run("scancel", *active, check=False)
        self.waitFor(lambda: not self.jobs() and self.nodeState() == "idle", "every job gone, node idle")

    # -- clients ----------------------------------------------------------------------

    def run(self, name, *args, check=True, timeout=60):
        """Run a Slurm client on this cluster; its CompletedProcess (text)."""
        return subprocess.run([program(name)] + list(args), env=self.env, cwd=self.directory,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def nodeState(self):
        """The node's state as sinfo prints it (``idle``, ``mixed``, ``down*``, ...); None if unknown."""
        result = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=15)
        if result.returncode != 0:
            return None
        return result.stdout.strip() or None

    def jobs(self):
        """``{job id: state}`` of the jobs not yet finished (pending, running, completing)."""
        result = self.run("squeue", "-h", "-o", "%i|%T", check=False, timeout=15)
        if result.returncode != 0:
            return {}
        return dict(line.split("|", 1) for line in result.stdout.splitlines())

    def logs(self, limit=3000):
        """The tails of the daemons' logs, for a failure's message."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for path in (self.path("log", name + ".log"), self.path("log", name + ".out")):
                try:
                    with open(path, "rb") as f:
                        f.seek(max(0, os.path.getsize(path) - limit))
                        parts.append("--- %s\n%s" % (path, f.read().decode("utf-8", "replace")))
                except FileNotFoundError:
                    pass
        return "\n".join(parts)

    def waitFor(self, predicate, what, timeout=None):
        """Poll ``predicate`` until it holds; fail with the logs past ``timeout``
        (``startTimeout``) or as soon as a daemon of this cluster has ended."""
        deadline = time.monotonic() + (timeout or self.startTimeout)
        while not predicate():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError("%s exited with %s while waiting for %s:\n%s" % (
                        name, process.returncode, what, self.logs()))
            if time.monotonic() > deadline:
                raise RuntimeError("no %s within %s s:\n%s" % (what, timeout or self.startTimeout, self.logs()))
            time.sleep(0.1)

    # -- the parts --------------------------------------------------------------------

    def _writeMungeKey(self):
        """A fresh key: owned by root and 0600, or munged refuses it."""
        keyFile = self.path("munge", "munge.key")
        descriptor = os.open(keyFile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(keyFile, 0o600)

    def _startMunged(self):
        # --force: munged refuses a socket under a directory others cannot enter
        # (mkdtemp's and pytest's are 0700); only this cluster's daemons use it.
        self._spawn("munged", [program("munged"), "--foreground", "--force",
                               "--socket", self.mungeSocket,
                               "--key-file", self.path("munge", "munge.key"),
                               "--pid-file", self.path("munge", "munged.pid"),
                               "--seed-file", self.path("munge", "munged.seed"),
                               "--log-file", self.path("log", "munged.log")])
        self.waitFor(lambda: os.path.exists(self.mungeSocket), "munged's socket")

    def _writeConf(self):
        lines = [
            "ClusterName=reflservd-test",
            "SlurmctldHost=%s(127.0.0.1)" % (self.hostname,),
            "SlurmctldPort=%d" % (self.controllerPort,),
            "SlurmdPort=%d" % (self.slurmdPort,),
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",     # listen on 127.0.0.1 only
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=socket=%s,cred_expire=%d" % (self.mungeSocket, self.credExpire),
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=%d" % (self.memory // self.cpus,),
            "MpiDefault=%s" % (self.mpiDefault,),
            "SchedulerParameters=sched_interval=2",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdTimeout=%d" % (self.slurmdTimeout,),
            "MessageTimeout=%d" % (self.messageTimeout,),
            "MinJobAge=600",
            "StateSaveLocation=%s" % (self.path("state"),),
            "SlurmdSpoolDir=%s" % (self.path("spool"),),
            "SlurmctldPidFile=%s" % (self.path("slurmctld.pid"),),
            "SlurmdPidFile=%s" % (self.path("slurmd.pid"),),
            "SlurmctldLogFile=%s" % (self.path("log", "slurmctld.log"),),
            "SlurmdLogFile=%s" % (self.path("log", "slurmd.log"),),
            "PlugStackConfig=%s" % (self.path("plugstack.conf"),),
            "NodeName=%s NodeAddr=127.0.0.1 CPUs=%d RealMemory=%d State=UNKNOWN"
            % (self.hostname, self.cpus, self.memory),
            "PartitionName=%s Nodes=%s Default=YES MaxTime=INFINITE State=UP"
            % (self.partition, self.hostname),
        ]
        with open(self.path("plugstack.conf"), "w"):
            pass        # not /etc/slurm's SPANK plugins
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _halt(self):
        for name in ("slurmd", "slurmctld", "munged"):
            self._end(name)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self, name, command):
        with open(self.path("log", name + ".out"), "ab") as out:
            self.processes[name] = subprocess.Popen(command, env=self.env, cwd=self.directory,
                                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def _running(self, name):
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def _end(self, name, signum=signal.SIGTERM):
        """Signal the daemon this cluster started and reap it (SIGKILL past ``stopTimeout``)."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(self.stopTimeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _runFirstJob(self):
        """Run one job to its end: slurmctld schedules nothing before its first pass
        (about 3 s after it starts), and ``sbatch --wait`` backs off to 10 s meanwhile."""
        jobId = self.run("sbatch", "--parsable", "--job-name=ready", "--output=/dev/null",
                         "--wrap", "true").stdout.strip()

        def completed():
            listed = self.run("squeue", "--states=all", "-h", "-o", "%T", "-j", jobId, check=False, timeout=15)
            return listed.stdout.strip() == "COMPLETED"
        self.waitFor(completed, "a first job COMPLETED")

    def _controllerUp(self):
        result = self.run("scontrol", "ping", check=False, timeout=15)
        return result.returncode == 0 and "is UP" in result.stdout
