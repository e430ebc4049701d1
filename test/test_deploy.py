"""What a site installs from etc/: the LSB init scripts, the log they rotate,
the defaults files and the systemd units.

The init scripts run for real, as root, against a temporary installation: a
defaults file (``REFLSERVD_DEFAULTS``) pointing at this checkout's twistd, a
state directory, a pidfile and a log under a scratch directory. The server
runs as ``nobody`` where that user can run this checkout's Python (else as
root, said in the test's output); the worker runs as root, as it ships.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from test.conftest import ROOT, TWISTD, Api, freePort, nifilmFiles
from test.test_worker_e2e import LM, nifilmRequest, processGone

INIT_D = os.path.join(ROOT, "etc", "init.d")
FUNCTIONS = os.path.join(ROOT, "etc", "init-functions")

needsRoot = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("start-stop-daemon") is None,
    reason="the init scripts start daemons as another user: needs root and start-stop-daemon")


def canRunAs(user):
    return subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import reflservd"],
                          cwd="/", capture_output=True).returncode == 0


class Installed:
    """One init script with its own defaults file, pidfile and log in ``scratch``."""

    def __init__(self, name, scratch, opts, user):
        self.name = name
        self.pidfile = os.path.join(scratch, "run", name + ".pid")
        self.logfile = os.path.join(scratch, "log", name + ".log")
        prefix = name.upper()
        self.defaults = os.path.join(scratch, name + ".default")
        with open(self.defaults, "w") as f:
            f.write("%s_OPTS=%r\n%s_USER=%s\n%s_TWISTD=%s\n%s_PIDFILE=%s\n%s_LOGFILE=%s\n"
                    "%s_STOP_TIMEOUT=60\nREFLSERVD_INIT_FUNCTIONS=%s\n" % (
                        prefix, " ".join(opts), prefix, user, prefix, TWISTD, prefix, self.pidfile,
                        prefix, self.logfile, prefix, FUNCTIONS))
        self.environment = dict(os.environ, **{prefix + "_DEFAULTS": self.defaults})

    def run(self, action):
        """``(exit status, output)`` of ``etc/init.d/NAME ACTION``."""
        done = subprocess.run([os.path.join(INIT_D, self.name), action], env=self.environment,
                              cwd="/", capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    def pid(self):
        with open(self.pidfile) as f:
            return int(f.read())

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()


@pytest.fixture
def scratch():
    """A directory others may enter (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="reflservd-deploy-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needsRoot
def test_the_init_scripts_start_stop_and_report_the_server_and_a_worker_that_runs_a_fit(scratch):
    user = "nobody" if canRunAs("nobody") else "root"
    print("the server runs as", user)
    state = os.path.join(scratch, "state")
    os.mkdir(state)
    shutil.chown(state, user)
    port = freePort()
    server = Installed("reflservd", scratch, [
        "--listen", "tcp:%d:interface=127.0.0.1" % port, "--state-dir", state,
        "--max-pending", "0", "--submits-per-minute", "0"], user)
    api = Api("http://127.0.0.1:%d" % port)

    assert server.run("status")[0] == 3                     # LSB: not running
    status, output = server.run("start")
    assert status == 0, output
    first = server.pid()
    assert server.run("status") == (0, "reflservd is running (pid %d)\n" % first)
    assert api.ok("GET", "/healthz")
    with open("/proc/%d/status" % first) as f:
        uid = [line.split()[1] for line in f if line.startswith("Uid:")][0]
    assert int(uid) == int(subprocess.check_output(["id", "-u", user]))
    assert server.run("start")[0] == 0                      # already running: still 0
    assert server.pid() == first

    status, output = server.run("restart")
    assert status == 0, output
    assert server.pid() != first and processGone(first)
    assert api.ok("GET", "/healthz")

    worker = Installed("reflworkerd", scratch, [
        "--server", api.url, "--queue", "test", "--work-dir", os.path.join(scratch, "work"),
        "--sandbox", "none", "--slot-uid-base", "0", "--poll-timeout", "5"], "root")
    status, output = worker.run("start")
    assert status == 0, output
    job = api.submit(nifilmRequest(LM), nifilmFiles())
    assert api.waitStatus(job["id"], "COMPLETE")["status"] == "COMPLETE"
    workerPid = worker.pid()
    status, output = worker.run("stop")
    assert (status, output) == (0, "reflworkerd stopped\n")
    assert processGone(workerPid) and not os.path.exists(worker.pidfile)
    assert worker.run("status")[0] == 3

    serverPid = server.pid()
    assert server.run("stop") == (0, "reflservd stopped\n")
    assert processGone(serverPid)
    assert server.run("status") == (3, "reflservd is not running\n")
    assert server.run("stop") == (0, "reflservd is not running\n")

    # The journal kept the job across the restart and the stop.
    status, output = server.run("start")
    assert status == 0, output
    assert api.job(job["id"])["status"] == "COMPLETE"
    assert server.run("stop")[0] == 0


@needsRoot
def test_a_stale_pidfile_is_reported_and_replaced_and_a_reused_pid_is_left_alone(scratch):
    state = os.path.join(scratch, "state")
    port = freePort()
    server = Installed("reflservd", scratch, [
        "--listen", "tcp:%d:interface=127.0.0.1" % port, "--state-dir", state], "root")
    os.makedirs(os.path.dirname(server.pidfile))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (dead.pid, os.getpid()):          # a dead pid; a live pid that is not ours
        with open(server.pidfile, "w") as f:
            f.write(str(stale))
        assert server.run("status") == (1, "reflservd is not running, but its pidfile %s remains\n"
                                        % server.pidfile)
    status, output = server.run("start")
    assert status == 0, output
    assert "removing the stale pidfile" in output
    assert server.pid() not in (dead.pid, os.getpid())
    assert server.run("stop")[0] == 0                # and the test process is still here


@needsRoot
def test_the_log_is_opened_again_after_logrotate_moves_it(scratch):
    port = freePort()
    server = Installed("reflservd", scratch, [
        "--listen", "tcp:%d:interface=127.0.0.1" % port,
        "--state-dir", os.path.join(scratch, "state")], "root")
    status, output = server.run("start")
    assert status == 0, output
    try:
        assert "reflservd" in server.log()
        os.rename(server.logfile, server.logfile + ".1")     # what logrotate does (nocreate)
        os.kill(server.pid(), __import__("signal").SIGUSR1)  # its postrotate
        Api("http://127.0.0.1:%d" % port).ok("GET", "/healthz")
    finally:
        assert server.run("stop")[0] == 0
    assert "Main loop terminated" in server.log()                # the new file got the rest
    with open(server.logfile + ".1") as f:
        assert "Main loop terminated" not in f.read()


def test_an_unknown_action_is_a_usage_error_and_reload_is_not_offered(scratch):
    server = Installed("reflservd", scratch, [], "root")
    assert server.run("frobnicate")[0] == 2
    assert server.run("reload")[0] == 3


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_init_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", "-x", "etc/init.d/reflservd", "etc/init.d/reflworkerd",
                           "etc/init-functions"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# ---- upgrades: the state directory's format

STATES = os.path.join(ROOT, "test", "states")


def copyState(name, tmp_path):
    target = str(tmp_path / "server1" / "state")
    shutil.copytree(os.path.join(STATES, name), target)
    return target


def treeBytes(path):
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return found


def test_a_state_directory_of_the_previous_format_is_read_and_marked(tmp_path, serverProcess):
    """test/states/format-1 was written by the server before the state had a
    format file (test/states/write.py): this one reads every job of it, the
    result files too, and marks the directory with its own format."""
    from reflservd.journalfiles import STATE_FORMAT, stateFormat
    state = copyState("format-1", tmp_path)
    assert stateFormat(state) == 1
    server = serverProcess()
    assert server.stateDir == state
    statuses = {job["name"]: job["status"] for job in server.api.ok("GET", "/api/v1/jobs")["jobs"]}
    assert statuses == {"complete": "COMPLETE", "error": "ERROR", "cancel": "CANCEL",
                        "running": "ACTIVE", "pending": "PENDING"}
    assert server.api.download(1, "nifilm.par").startswith(b"Ni thickness")
    assert stateFormat(state) == STATE_FORMAT
    with open(os.path.join(state, "journal", "format")) as f:
        assert '"version":%d' % STATE_FORMAT in f.read()
    server.restart()
    assert server.api.job(1)["status"] == "COMPLETE"


def test_a_state_directory_of_a_newer_format_is_refused_naming_both_and_left_alone(tmp_path):
    from reflservd.journalfiles import STATE_FORMAT
    from reflservd.names import VERSION
    state = copyState("format-1", tmp_path)
    with open(os.path.join(state, "journal", "format"), "w") as f:
        f.write('{"format":"reflservd-state","version":%d,"writer":"9.9"}' % (STATE_FORMAT + 1))
    before = treeBytes(state)
    words = ("written by reflservd 9.9 in state format %d; this reflservd %s reads state formats "
             "up to %d" % (STATE_FORMAT + 1, VERSION, STATE_FORMAT))
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "--logfile=-", "reflservd", "--state-dir", state,
                           "--listen", "tcp:%d:interface=127.0.0.1" % freePort()],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert done.returncode != 0 and words in done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "reflservd.journalctl", state, "verify"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and words in done.stdout + done.stderr
    after = treeBytes(state)
    after.pop("journal/lock", None)            # the lock taken to read it; no state
    assert after == before


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["reflservd.service", "reflworkerd.service"])
def test_the_systemd_units_verify(unit, tmp_path):
    """``systemd-analyze verify`` on each unit, its twistd put at this
    checkout's (it checks that the command exists)."""
    with open(os.path.join(ROOT, "etc", "systemd", unit)) as f:
        text = f.read()
    assert "ExecStart=/opt/reflservd/bin/twistd --nodaemon" in text
    (tmp_path / unit).write_text(text.replace("/opt/reflservd/bin/twistd", TWISTD))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# ---- the defaults files list every option

DEFAULTS_BEGIN = "# ---- every option, with its default (twistd %s --help)\n"
DEFAULTS_END = "# ---- end of the options\n"


def optionLines(options):
    """One comment line per option of a plugin: ``# --name=DEFAULT  what it does``."""
    import textwrap as _textwrap
    lines = []
    for spelled in sorted(options.longOpt):
        name = spelled.rstrip("=")
        if name in ("help", "version"):
            continue
        default = options.opts.get(name)
        doc = " ".join(options.docs.get(name, "").split())
        doc = re.sub(r"\s*\[default: [^]]*\]$", "", doc)
        if not spelled.endswith("="):
            shown = "--%s (off)" % (name,)
        elif default is None or default == []:
            shown = "--%s=" % (name,) + ("tcp:8080:interface=127.0.0.1" if name == "listen" else "(unset)")
        else:
            shown = "--%s=%s" % (name, default)
        lines.append(_textwrap.shorten("# %s  %s" % (shown, doc), 200, placeholder=" …") + "\n")
    return lines


def pluginOptions(plugin):
    if plugin == "reflservd":
        from reflservd.tap import Options
    else:
        from reflworkerd.tap import Options
    return Options()


def expectedBlock(plugin):
    return [DEFAULTS_BEGIN % plugin] + optionLines(pluginOptions(plugin)) + [DEFAULTS_END]


def writeDefaults(plugin):
    path = os.path.join(ROOT, "etc", "default", plugin)
    with open(path) as f:
        text = f.read()
    begin, end = DEFAULTS_BEGIN % plugin, DEFAULTS_END
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    with open(path, "w") as f:
        f.write(head + "".join(expectedBlock(plugin)) + tail)


@pytest.mark.parametrize("plugin", ["reflservd", "reflworkerd"])
def test_the_defaults_file_lists_every_option_with_its_default(plugin):
    """etc/default/PLUGIN names every option of ``twistd PLUGIN`` with its
    default and what it does (regenerate with ``python -m test.test_deploy``),
    and its own OPTS line parses."""
    path = os.path.join(ROOT, "etc", "default", plugin)
    with open(path) as f:
        lines = f.readlines()
    expected = expectedBlock(plugin)
    start = lines.index(expected[0]) if expected[0] in lines else -1
    assert lines[start:start + len(expected)] == expected, \
        "etc/default/%s is out of date: python -m test.test_deploy" % (plugin,)
    shell = subprocess.run(["sh", "-c", '. "$0" && printf %%s "$%s_OPTS"' % plugin.upper(), path],
                           capture_output=True, text=True, check=True).stdout
    assert shell.startswith("--")


if __name__ == "__main__":
    for name in ("reflservd", "reflworkerd"):
        writeDefaults(name)
