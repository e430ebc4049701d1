"""
Tests for reflworkerd.sandbox: what a confined fit can and cannot do.

The confinement tests do what the fork server does: fork a plain Python
process, call ``confine`` in it, then run a hostile model script from
``test/hostile/`` (copied into the job directory and read only after
``confine``, as a real model is). The script writes what it managed to
``hostile-report.json``; the test checks the report and, for what cannot be
seen from inside (files written, signals received, processes left), the host.
They need root (mounts, per-slot uids) and are skipped otherwise.
"""

import errno
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import pytest
from twisted.logger import Logger

from reflworkerd import sandbox
from reflworkerd.sandbox import limits, namespaces, probe, seccomp

HOSTILE = Path(__file__).parent / "hostile"
PROFILES = Path(__file__).parent.parent / "apparmor.d"
BOUND = 60
"""Seconds any confined run may take before the test gives up on it."""

needsRoot = pytest.mark.skipif(
    os.geteuid() != 0, reason="confine needs root in these tests (mounts, per-slot uids)")
needsAppArmorKernel = pytest.mark.skipif(
    not os.path.isdir("/sys/module/apparmor"), reason="kernel has no AppArmor")

_uids = iter(range(61300, 61400))


def slotUid():
    """A uid of its own for each test: RLIMIT_NPROC counts per uid, and
    'no process of this uid is left' must mean this test's processes."""
    return next(_uids)


def processesOf(uid):
    """Host pids whose real uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/status" % name) as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(name))
                        break
        except OSError:
            pass
    return found


def processesIn(pidNamespace):
    """Host pids (with their state letter) in the pid namespace whose
    inode is ``pidNamespace``."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat("/proc/%s/ns/pid" % name).st_ino == pidNamespace:
                with open("/proc/%s/stat" % name) as f:
                    found[int(name)] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass
    return found


def placeHostile(script, jobDir):
    """Put a hostile script in a job directory as its ``model.py``, with the
    ``hostile_common.py`` it imports."""
    shutil.copy(script, Path(jobDir) / "model.py")
    shutil.copy(HOSTILE / "hostile_common.py", Path(jobDir) / "hostile_common.py")


class ConfinedRun:
    """
    A fit process as the fork server makes one: forked from this (the
    'preloaded') process, confined, then running ``model.py`` from its job
    directory. The first line on the pipe is what ``confine`` returned.
    """

    def __init__(self, jobDir, script, mode="namespaces", limits=None, uid=None,
                 config=None, keepFds=None):
        self.jobDir = Path(jobDir)
        self.jobDir.mkdir(parents=True, exist_ok=True)
        placeHostile(script, self.jobDir)
        (self.jobDir / "hostile.json").write_text(json.dumps(config or {}))
        self.buffer = b""
        self.info = None
        sys.stdout.flush()
        sys.stderr.flush()
        readEnd, writeEnd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 3
            try:
                os.close(readEnd)
                description = sandbox.confine(
                    str(self.jobDir), mode, limits, uid=uid,
                    keepFds=None if keepFds is None else list(keepFds) + [writeEnd])
                info = {"description": description, "cwd": os.getcwd(), "pid": os.getpid(),
                        "uid": os.getuid(), "pidNamespace": os.stat("/proc/self/ns/pid").st_ino,
                        "openFds": sorted(int(n) for n in os.listdir("/proc/self/fd"))}
                os.write(writeEnd, (json.dumps(info) + "\n").encode())
                runpy.run_path("model.py", run_name="__main__")
                code = 0
            except BaseException:
                try:
                    os.write(writeEnd, (json.dumps({"error": traceback.format_exc()}) + "\n").encode())
                finally:
                    os._exit(code)
            finally:
                os._exit(code)
        os.close(writeEnd)
        self.readEnd = readEnd
        self.deadline = time.monotonic() + BOUND

    def _read(self, untilLine):
        """Read until a whole first line (``untilLine``) or end of file, within
        the bound; past it the run is killed and the test fails."""
        while not (untilLine and b"\n" in self.buffer):
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.readEnd], [], [], max(remaining, 0))
            if not ready:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                pytest.fail("confined run did not finish within %d s" % BOUND)
            chunk = os.read(self.readEnd, 65536)
            if not chunk:
                return True
            self.buffer += chunk
        return False

    def confined(self):
        """What the fit process reported once confined."""
        if self.info is None:
            self._read(untilLine=True)
            self.info = json.loads(self.buffer.split(b"\n", 1)[0] or b"{}")
            assert "error" not in self.info, self.info["error"]
        return self.info

    def fitPid(self):
        """The fit's host pid: the reaper's only child."""
        with open("/proc/%d/task/%d/children" % (self.pid, self.pid)) as f:
            return int(f.read().split()[0])

    def finish(self):
        """Wait for the run to end (everything holding the pipe gone) and
        return its wait status."""
        self.confined()
        self._read(untilLine=False)
        os.close(self.readEnd)
        _, self.status = os.waitpid(self.pid, 0)
        return self.status

    def succeed(self):
        """Finish, and fail the test with what the fit said unless it exited 0."""
        status = self.finish()
        assert status == 0, "status %#x: %s" % (status, self.buffer.decode(errors="replace"))

    def report(self):
        path = self.jobDir / "hostile-report.json"
        return json.loads(path.read_text()) if path.exists() else None


def failedAttempts(report):
    """The names of the attempts that succeeded (should be none)."""
    return sorted(name for name, outcome in report["attempts"].items() if outcome["succeeded"])


@pytest.fixture
def site(tmp_path):
    """A worker's layout: jobs side by side, the worker's own state and token."""
    jobs = tmp_path / "jobs"
    (jobs / "other").mkdir(parents=True)
    (jobs / "other" / "secret.txt").write_text("other job's secret\n")
    worker = tmp_path / "worker"
    worker.mkdir()
    (worker / "state.json").write_text("{}\n")
    (worker / "token").write_text("worker-token\n")
    return tmp_path


def test_chooseRejectsUnknownMode():
    """An unknown --sandbox value is refused, not treated as 'none'."""
    with pytest.raises(sandbox.SandboxUnavailable, match="unknown sandbox mode"):
        sandbox.choose("chroot")


def test_chooseNoneIsAlwaysAvailableAndLogged(monkeypatch):
    """'none' is always possible, and the worker says it runs unconfined."""
    events = []
    monkeypatch.setattr(probe, "_log", Logger(observer=events.append))
    assert sandbox.choose("none") == "none"
    assert any("sandbox: none" in e["log_format"] for e in events)


@pytest.mark.skipif(os.path.isdir("/sys/module/apparmor"), reason="this kernel has AppArmor")
def test_chooseAppArmorRefusedWithoutKernelSupport():
    """--sandbox=apparmor refuses to run where the kernel has no AppArmor."""
    with pytest.raises(sandbox.SandboxUnavailable, match="kernel has no AppArmor"):
        sandbox.choose("apparmor")


@needsRoot
def test_chooseAutoPicksStrongestAndLogsWhy(monkeypatch):
    """auto gives namespaces on a host with namespaces but no AppArmor, and
    logs the reason AppArmor was passed over."""
    events = []
    monkeypatch.setattr(probe, "_log", Logger(observer=events.append))
    expected = "namespaces" if probe._appArmorMissing() else "apparmor"
    assert sandbox.choose("auto") == expected
    assert sandbox.choose("namespaces") == "namespaces"
    messages = [e["log_format"].format(**e) for e in events]
    assert any(m.startswith("sandbox: " + expected) for m in messages), messages
    if expected == "namespaces":
        assert any("no apparmor: " in m for m in messages), messages


def test_chooseNamespacesRefusedWhereTheyCannotBeMade(monkeypatch):
    """Where unshare fails, --sandbox=namespaces refuses to start and auto
    falls back to 'none' with a warning naming the reason."""
    def refuse(flags):
        raise OSError(errno.EPERM, "unshare: Operation not permitted")

    monkeypatch.setattr(namespaces, "_unshare", refuse)
    events = []
    monkeypatch.setattr(probe, "_log", Logger(observer=events.append))
    with pytest.raises(sandbox.SandboxUnavailable, match="Operation not permitted"):
        sandbox.choose("namespaces")
    assert sandbox.choose("auto") == "none"
    messages = [e["log_format"].format(**e) for e in events]
    assert any("no namespaces: " in m and "not permitted" in m for m in messages), messages


def test_confineRefusesUnresolvedModeAndUnknownLimits(tmp_path):
    """confine takes what choose returned, and refuses a misspelt limit
    before it changes anything."""
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.confine(str(tmp_path), "auto", {})
    with pytest.raises(ValueError, match="cpus"):
        sandbox.confine(str(tmp_path), "none", {"cpus": 1})
    assert os.getcwd() != str(tmp_path)


def test_rootPlanBindsTheVenvButNotWhatHoldsIt(tmp_path):
    """The fit sees the Python installation and the venv read-only, but not
    the venv's parent (the checkout, maybe the worker's state), not home
    directories, and not the directory that holds the job directories."""
    jobDir = tmp_path / "jobs" / "mine"
    jobDir.mkdir(parents=True)
    plan = namespaces.RootPlan(str(jobDir))
    venv = os.path.realpath(sys.prefix)
    assert any(namespaces._under(venv, p) for p in plan.readOnly)
    assert any(namespaces._under(os.path.realpath(sys.base_prefix), p) for p in plan.readOnly)
    for hidden in (os.path.dirname(venv), "/root", "/home", "/work", str(tmp_path),
                   str(tmp_path / "jobs"), "/var", "/tmp"):
        assert hidden not in plan.readOnly
    package = os.path.dirname(os.path.dirname(os.path.realpath(sandbox.__file__)))
    assert any(namespaces._under(package, p) for p in plan.readOnly)
    assert "shadow" not in plan.etc and "passwd" not in plan.etc
    assert plan.jobDir == os.path.realpath(jobDir)


def test_rootPlanRefusesJobDirectoryInsideLibraries(tmp_path):
    """A job directory inside a read-only library path would be seen with
    all its siblings: refused."""
    with pytest.raises(sandbox.SandboxUnavailable, match="read-only"):
        namespaces.RootPlan(os.path.join(os.path.realpath(sys.prefix), "lib"))


def test_syntheticPasswdNamesOnlyTheFit():
    """The fit's /etc/passwd lists root, nobody and the fit's own uid."""
    passwd, group = namespaces.RootPlan.passwd(61000, 61000)
    assert [line.split(":")[2] for line in passwd.splitlines()] == ["0", "61000", "65534"]
    assert "fit:x:61000:" in group


def runSeccomp(program, nr, arch, arg0=0):
    """What the classic-BPF ``program`` answers for one system call."""
    data = {0: nr, 4: arch, 16: arg0}
    pc = accumulator = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            accumulator, pc = data[k], pc + 1
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: accumulator == k, 0x35: accumulator >= k,
                     0x45: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)
        else:
            assert code == 0x06
            return k


@pytest.mark.parametrize("machine", sorted(seccomp.SECCOMP_ARCH))
def test_seccompFilterDeniesNamespacesAndKernelSurfaceOnly(machine):
    """The filter lets ordinary calls and a plain fork through; refuses
    clone with a CLONE_NEW* flag, unshare, keyctl, bpf, ptrace, mount and
    other calls of another architecture; and answers clone3 with ENOSYS so
    that the C library falls back to clone."""
    column = 0 if machine == "x86_64" else 1
    arch = seccomp.SECCOMP_ARCH[machine]
    program = seccomp.seccompProgram(machine)
    allow, eperm = 0x7FFF0000, 0x50000 | errno.EPERM
    assert runSeccomp(program, 0, arch) == allow
    assert runSeccomp(program, seccomp.SECCOMP_CLONE[column], arch, 0x01200011) == allow
    assert runSeccomp(program, seccomp.SECCOMP_CLONE[column], arch, namespaces.CLONE_NEWUSER) == eperm
    assert runSeccomp(program, seccomp.SECCOMP_CLONE3[column], arch) == 0x50000 | errno.ENOSYS
    for name in ("unshare", "setns", "keyctl", "bpf", "ptrace", "mount", "userfaultfd"):
        assert runSeccomp(program, seccomp.SECCOMP_DENIED[name][column], arch) == eperm, name
    assert runSeccomp(program, 0, 0x40000003) == eperm
    if machine == "x86_64":
        assert runSeccomp(program, 0x40000000 | 1, arch) == eperm
    assert seccomp.seccompProgram("mips") is None


@needsRoot
def test_confinedFitCanStillUseThreadsAndProcesses(site, tmp_path):
    """What a real fit needs still works confined: threads (clone3 falls
    back to clone), fork, a multiprocessing pool (bumps' mapper), the
    private /tmp, numpy."""
    script = tmp_path / "workers.py"
    script.write_text(
        "import json, multiprocessing, os, tempfile, threading\n"
        "import numpy\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(1)); t.start(); t.join()\n"
        "pid = os.fork()\n"
        "if pid == 0: os._exit(7)\n"
        "status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
        "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "    squares = pool.map(abs, [-1, -2, -3])\n"
        "with tempfile.NamedTemporaryFile() as f: tmp = f.name\n"
        "report = {'thread': box, 'fork': status, 'pool': squares, 'tmp': tmp,\n"
        "          'numpy': float(numpy.linalg.norm(numpy.ones(4)))}\n"
        "open('hostile-report.json', 'w').write(json.dumps(report))\n")
    run = ConfinedRun(site / "jobs" / "mine", script, uid=slotUid(), limits={"nproc": 32})
    run.succeed()
    assert run.report() == {"thread": [1], "fork": 7, "pool": [1, 2, 3],
                            "tmp": run.report()["tmp"], "numpy": 2.0}
    assert run.report()["tmp"].startswith("/tmp/")


@needsRoot
def test_confineReturnsInTheFitProcessInItsNamespaces(site, tmp_path):
    """confine returns in pid 1 of a new pid namespace, with the job
    directory as working directory, as the slot's uid, with only the kept
    descriptors, and says what confines it."""
    uid = slotUid()
    spare = os.open(os.devnull, os.O_RDONLY)
    quiet = tmp_path / "quiet.py"
    quiet.write_text("pass\n")
    try:
        run = ConfinedRun(site / "jobs" / "mine", quiet,
                          limits={"nofile": 64}, uid=uid, keepFds=[])
    finally:
        os.close(spare)
    info = run.confined()
    run.succeed()
    assert info["description"] == ("namespaces(mount,pid,net,ipc,uts)+seccomp+rlimits(nofile=64)+nice19+uid %d"
                                   % uid)
    assert info["description"] == sandbox.describe("namespaces", {"nofile": 64}, uid, isRoot=True)
    assert info["pid"] == 1
    assert info["uid"] == uid
    assert info["cwd"] == os.path.realpath(site / "jobs" / "mine")
    assert spare not in info["openFds"]
    assert len(info["openFds"]) == 5  # 0, 1, 2, the pipe, and listdir's own


@needsRoot
def test_chownOfTheJobLeavesHardLinksAlone(site):
    """Giving the job directory to the slot's uid does not give away a file
    elsewhere that a hard link (left by an earlier attempt) points at, nor
    what a symlink points at."""
    outside = site / "worker" / "state.json"
    mine = site / "jobs" / "mine"
    mine.mkdir()
    os.link(outside, mine / "linked")
    os.symlink(site / "worker" / "token", mine / "pointer")
    (mine / "data.dat").write_text("1 2 3\n")
    uid = slotUid()
    limits.chownTree(str(mine), uid, uid)
    assert os.stat(outside).st_uid == 0
    assert os.stat(site / "worker" / "token").st_uid == 0
    assert os.stat(mine / "data.dat").st_uid == uid
    assert os.stat(mine).st_uid == uid


@needsRoot
def test_fitCannotReachOtherFiles(site):
    """Another job's directory, the work directory, homes, the host's /tmp
    and /dev/shm, the worker's files and token: none can be read or written
    from the fit; its own job directory can."""
    nonce = uuid.uuid4().hex
    marker = Path(tempfile.gettempdir()) / ("reflsandbox-marker-" + nonce)
    marker.write_text("host /tmp\n")
    try:
        run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "escape_files.py", uid=slotUid(), config={
            "siblingSecret": str(site / "jobs" / "other" / "secret.txt"),
            "workDir": str(site / "jobs"),
            "workerFiles": [str(site / "worker" / "state.json")],
            "tokenFile": str(site / "worker" / "token"),
            "hostMarker": str(marker),
            "nonce": nonce})
        run.succeed()
    finally:
        marker.unlink()
    report = run.report()
    assert report["finished"]
    # The private /tmp and /dev/shm, and the fit's home, which is its own job directory.
    private = ("/tmp/hostile-" + nonce, "/dev/shm/hostile-" + nonce,
               os.path.join(os.path.realpath(site / "jobs" / "mine"), "hostile-" + nonce))
    escaped = [name for name in failedAttempts(report)
               if report["attempts"][name]["detail"] not in private]
    assert escaped == [], report
    assert report["ownJobWritable"]
    assert (site / "jobs" / "mine" / ("hostile-" + nonce)).exists()
    for path in report["written"]:
        if not namespaces._under(path, os.path.realpath(site / "jobs" / "mine")):
            assert not os.path.exists(path), "%s was written on the host" % path
    for host in ("/tmp", "/dev/shm", "/root", "/home", str(site / "jobs"), str(site / "worker")):
        assert not os.path.exists(os.path.join(host, "hostile-" + nonce))
    assert (site / "worker" / "state.json").read_text() == "{}\n"
    assert "work" not in report["rootListing"] or os.path.realpath(sys.prefix).startswith("/work")
    assert "home" not in report["rootListing"]


@needsRoot
def test_fitHasNoNetworkNotEvenLoopback(site):
    """No TCP connection to a port listening on the host's loopback, no UDP
    datagram to it, no abstract or file-system unix socket: the fit's
    network namespace has only its own loopback."""
    nonce = uuid.uuid4().hex
    with socket.socket() as tcp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_UNIX) as abstract, \
            socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(5)
        udp.bind(("127.0.0.1", 0))
        abstract.bind("\0reflsandbox-" + nonce)
        abstract.listen(5)
        unixPath = str(site / "worker" / "control.sock")
        unix.bind(unixPath)
        unix.listen(5)
        run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "escape_network.py", uid=slotUid(), config={
            "tcpPorts": [tcp.getsockname()[1]], "udpPorts": [udp.getsockname()[1]],
            "abstractSockets": ["reflsandbox-" + nonce], "unixSockets": [unixPath],
            "hosts": [["192.0.2.1", 80]]})
        run.succeed()
        report = run.report()
        assert report["finished"]
        reached = [n for n in failedAttempts(report) if not n.startswith("udp:")]
        assert reached == [], report
        assert report["interfaces"] == ["lo"]
        pending, _, _ = select.select([tcp, udp, abstract, unix], [], [], 0)
        assert pending == []


@needsRoot
def test_fitCannotSignalOrTraceOutsideItsJob(site):
    """The fit sees no process but its own: it cannot signal the test
    process, ptrace it or read its /proc entries."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "escape_signals.py", uid=slotUid(),
                          config={"pids": [os.getpid()], "signal": "SIGUSR1"})
        run.succeed()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    report = run.report()
    assert report["finished"]
    assert failedAttempts(report) == [], report
    assert report["visiblePids"] == []
    assert report["parent"] == 0
    assert received == []


@needsRoot
@pytest.mark.parametrize("slot", [True, False], ids=["slot uid", "root without capabilities"])
def test_fitCannotGainPrivileges(site, slot):
    """No mount, remount, chroot, mknod, sethostname, raw socket, nested user
    namespace or session keyring; /proc/sys and sysrq are read-only, kcore
    masked; no capabilities and no new privileges, whether the fit runs as
    the slot's uid or as root."""
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "escape_privileges.py",
                      uid=slotUid() if slot else None)
    info = run.confined()
    run.succeed()
    report = run.report()
    allowed = [n for n in failedAttempts(report) if slot or n != "setuid0"]
    assert allowed == [], report
    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(report["status"][name], 16) == 0, report["status"]
    assert report["status"]["NoNewPrivs"] == "1"
    assert info["description"].endswith("uid %d" % info["uid"] if slot else "uid 0 without capabilities")


@needsRoot
def test_forkBombHeldByProcessLimit(site):
    """A fork bomb stops at the slot uid's process limit, and its processes
    end with the job."""
    uid = slotUid()
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "fork_bomb.py", uid=uid,
                      limits={"nproc": 12}, config={"ceiling": 100})
    run.succeed()
    report = run.report()
    assert report["finished"]
    assert report["forks"] < 12
    assert "Resource temporarily unavailable" in report["refused"]
    assert processesOf(uid) == []


@needsRoot
def test_memoryHeldByAddressSpaceLimit(site):
    """Allocating past the memory limit fails inside the fit."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = size + 256 * 1024 * 1024
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "memory_hog.py", uid=slotUid(),
                      limits={"memory": limit}, config={"bytes": 2 * 1024 ** 3})
    run.succeed()
    report = run.report()
    assert report["finished"]
    assert failedAttempts(report) == [], report
    assert report["largest"] < 512 * 1024 * 1024  # the 256 MiB headroom, give or take the fork


@needsRoot
def test_cpuSpinKilledAtCpuLimit(site):
    """A fit that ignores SIGXCPU and spins is killed at its CPU limit;
    whoever forked it sees it killed."""
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "cpu_spin.py", uid=slotUid(),
                      limits={"cpu": 1}, config={"seconds": 60})
    status = run.finish()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGKILL, signal.SIGXCPU)
    assert run.report()["finished"] is False


@needsRoot
def test_writesHeldByFileSizeLimit(site):
    """No file grows past the file-size limit, in the job directory or in
    the private /tmp."""
    limit = 1024 * 1024
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "file_size.py", uid=slotUid(),
                      limits={"fsize": limit}, config={"bytes": 8 * limit})
    run.succeed()
    report = run.report()
    assert report["finished"]
    for place, outcome in report["attempts"].items():
        assert not outcome["succeeded"], (place, outcome)
        assert outcome["written"] <= limit
        assert "File too large" in outcome["error"]


@needsRoot
def test_daemonDoesNotOutliveItsJob(site):
    """A daemon the fit leaves behind is gone when the fit ends: its pid
    namespace is empty and no process of the slot's uid is left."""
    uid = slotUid()
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "daemon.py", uid=uid)
    info = run.confined()
    run.succeed()
    assert run.report()["daemonReady"]
    assert processesIn(info["pidNamespace"]) == {}
    assert processesOf(uid) == []


@needsRoot
def test_daemonOutlivesUnconfinedJob(site):
    """The daemon check above can see a daemon: without namespaces the same
    script leaves one behind (which this test then kills)."""
    run = ConfinedRun(site / "jobs" / "mine", HOSTILE / "daemon.py", mode="none")
    run.succeed()
    daemon = run.report()["daemonPid"]
    try:
        assert os.readlink("/proc/%d/cwd" % daemon) == os.path.realpath(site / "jobs" / "mine")
    finally:
        os.kill(daemon, signal.SIGKILL)


@needsRoot
def test_terminateReachesTheFitAndComesBack(site, tmp_path):
    """TERM sent to the process the fork server forked reaches the fit
    (pid 1 of its namespace, which would otherwise ignore it), and that
    process then ends by TERM itself."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\nwhile True:\n    time.sleep(3600)\n")
    run = ConfinedRun(site / "jobs" / "mine", sleeper, uid=slotUid())
    run.confined()
    os.kill(run.pid, signal.SIGTERM)
    status = run.finish()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


@needsRoot
def test_killingTheReaperEndsTheWholeJob(site, tmp_path):
    """SIGKILL to the process the fork server forked takes the fit and
    everything in its pid namespace with it."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import os, time\nos.fork() or os.fork()\nwhile True:\n    time.sleep(3600)\n")
    run = ConfinedRun(site / "jobs" / "mine", sleeper, uid=slotUid())
    info = run.confined()
    fit = run.fitPid()
    fitExited = os.pidfd_open(fit)
    try:
        os.kill(run.pid, signal.SIGKILL)
        status = run.finish()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        ready, _, _ = select.select([fitExited], [], [], BOUND)
        assert ready == [fitExited]
    finally:
        os.close(fitExited)
    left = processesIn(info["pidNamespace"])
    assert set(left) <= {fit} and set(left.values()) <= {"Z"}, left


@needsRoot
def test_unprivilegedWorkerConfinesWithAUserNamespace(tmp_path):
    """A worker that is not root gets the same namespaces through a user
    namespace: another job's file stays out of reach even where the host
    would let that uid read it."""
    python = "/usr/bin/python3"
    venv = os.path.realpath(sys.prefix)
    sitePackages = os.path.join(venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
    checkout = str(Path(sandbox.__file__).resolve().parent.parent.parent)
    env = {"PYTHONPATH": os.pathsep.join([checkout, sitePackages]), "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run([python, "-c", "import reflworkerd.sandbox"], env=env, user=65534,
                           group=65534, extra_groups=[], capture_output=True) \
        if os.path.exists(python) else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no system Python that user nobody can run reflworkerd.sandbox with")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="reflsandbox-"))
    try:
        base.chmod(0o755)
        mine = base / "jobs" / "mine"
        other = base / "jobs" / "other"
        for d in (base / "jobs", mine, other):
            d.mkdir()
            d.chmod(0o755)
        (other / "secret.txt").write_text("readable by all on the host\n")
        (other / "secret.txt").chmod(0o644)
        placeHostile(HOSTILE / "escape_files.py", mine)
        (mine / "hostile.json").write_text(json.dumps({
            "siblingSecret": str(other / "secret.txt"), "workDir": str(base / "jobs"),
            "nonce": uuid.uuid4().hex}))
        os.chown(mine, 65534, 65534)
        driver = ("import json, os, runpy, sys\n"
                  "from reflworkerd import sandbox\n"
                  "d = sandbox.confine(sys.argv[1], 'namespaces', {'nproc': 200})\n"
                  "open('confined.json', 'w').write(json.dumps({'description': d, 'pid': os.getpid()}))\n"
                  "runpy.run_path('model.py', run_name='__main__')\n")
        done = subprocess.run([python, "-c", driver, str(mine)], env=env, user=65534, group=65534,
                              extra_groups=[], capture_output=True, timeout=BOUND)
        assert done.returncode == 0, done.stderr.decode()
        confined = json.loads((mine / "confined.json").read_text())
        assert confined["description"].startswith("namespaces(user,mount,pid,net,ipc,uts)")
        assert confined["pid"] == 1
        report = json.loads((mine / "hostile-report.json").read_text())
        assert report["attempts"]["readSiblingJob"]["succeeded"] is False, report
        assert report["attempts"]["listWorkDir"]["succeeded"] is False, report
        assert report["attempts"]["readShadow"]["succeeded"] is False, report
    finally:
        shutil.rmtree(base)


def _profiles():
    return sorted(p for p in PROFILES.iterdir() if p.is_file()) if PROFILES.is_dir() else []


@pytest.mark.skipif(shutil.which("apparmor_parser") is None,
                    reason="apparmor_parser is not installed (Debian package apparmor)")
@pytest.mark.parametrize("profile", _profiles(), ids=lambda p: p.name)
def test_appArmorProfileCompiles(profile):
    """Each profile in apparmor.d/ compiles without an error or a warning
    (apparmor_parser -Q -K: parse and compile, load nothing; the only line
    allowed on stderr is the parser's note that this kernel has no AppArmor
    cache interface)."""
    done = subprocess.run(["apparmor_parser", "-Q", "-K", "-I", str(PROFILES), str(profile)],
                          capture_output=True, text=True, timeout=BOUND)
    complaints = [line for line in done.stderr.splitlines()
                  if not line.startswith("Cache read/write disabled")]
    assert done.returncode == 0, done.stderr
    assert complaints == []


def test_thereAreProfilesForTheWorkerAndTheFit():
    """apparmor.d/ holds the worker's profile and the fit's."""
    assert {"reflworkerd", sandbox.FIT_PROFILE} <= {p.name for p in _profiles()}


@needsRoot
@needsAppArmorKernel
def test_fitRunsUnderItsAppArmorProfile(site, tmp_path):
    """In apparmor mode the fit runs confined by reflworkerd-fit."""
    missing = probe._appArmorMissing()
    if missing:
        pytest.skip(missing)
    script = tmp_path / "label.py"
    script.write_text("import json\nlabel = open('/proc/self/attr/current').read()\n"
                      "open('hostile-report.json', 'w').write(json.dumps({'label': label}))\n")
    run = ConfinedRun(site / "jobs" / "mine", script, mode="apparmor", uid=slotUid())
    run.succeed()
    assert run.report()["label"].startswith(sandbox.FIT_PROFILE)
