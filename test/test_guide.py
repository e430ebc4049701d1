"""docs/server-installation.md, run: every shell block of the guide, in order,
as root, on a copy-on-write copy of this host.

The copy is an overlay of ``/`` (the host's files read, every write kept in a
scratch directory) in a mount namespace of its own, so the guide's commands
run as written (``adduser``, ``/etc/init.d``, ``/opt/reflservd``) and leave
the host's files as they were. It shares the host's network, for pip's
downloads: the guide's ports (8080, 8443 on loopback) must be free. Each block
runs in its own ``bash -eu -o pipefail`` from the top of this checkout. The
blocks that call ``systemctl`` run only where systemd is PID 1. Afterwards the
daemons the guide started are stopped by its init scripts, and whatever else
still runs in the copy is killed by pid.
"""

import os
import re
import shutil
import socket
import subprocess
import textwrap

import pytest

from test.conftest import ROOT

GUIDE = os.path.join(ROOT, "docs", "server-installation.md")
SYSTEMD = os.path.isdir("/run/systemd/system")


def blocks():
    with open(GUIDE) as f:
        return re.findall(r"^```sh\n(.*?)^```$", f.read(), re.MULTILINE | re.DOTALL)


def portFree(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as twistd binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_guide_has_blocks_for_every_part():
    text = open(GUIDE).read()
    for heading in ("## The components", "## Installing the server", "## Setting up a cluster's worker",
                    "## Tokens and job keys", "## TLS, or a reverse proxy", "## Confinement",
                    "## Backups", "## Monitoring", "## Inspecting the journal", "## Upgrading"):
        assert heading in text
    assert len(blocks()) >= 10


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="the guide runs as root in namespaces of its own: needs root and unshare")
def test_every_command_of_the_installation_guide_runs(tmp_path):
    for tool in ("python3", "adduser", "update-rc.d", "openssl", "curl", "logrotate", "apparmor_parser"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip("the guide uses %s, which this host lacks (make test installs it as root)" % tool)
    busy = [port for port in (8080, 8443) if not portFree(port)]
    assert not busy, "the guide's ports %s are in use on this host" % (busy,)
    upper, work, root = (tmp_path / n for n in ("upper", "work", "root"))
    for folder in (upper, work, root):
        folder.mkdir()
    steps = []
    for number, block in enumerate(blocks(), 1):
        if "systemctl" in block and not SYSTEMD:
            steps.append("echo '## block %d: skipped, systemd is not PID 1 here'" % number)
            continue
        path = tmp_path / ("block-%02d.sh" % number)
        path.write_text(block)
        steps.append(textwrap.dedent("""\
            echo '## block {n}'
            chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
                PIP_DISABLE_PIP_VERSION_CHECK=1 \\
                bash -eu -o pipefail -c 'cd {checkout} && . {script}' || {{ echo "## block {n} failed: $?"; exit 1; }}
            """).format(n=number, root=root, checkout=ROOT, script=path))
    driver = tmp_path / "driver.sh"
    driver.write_text(textwrap.dedent("""\
        set -u
        mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {root}
        mount -t proc proc {root}/proc
        mount --rbind /dev {root}/dev
        mount --rbind /sys {root}/sys
        cleanUp() {{
            for script in reflworkerd reflservd; do
                [ -x {root}/etc/init.d/$script ] && chroot {root} /etc/init.d/$script stop
            done
            for proc in /proc/[0-9]*; do
                [ "$(readlink $proc/root 2>/dev/null)" = {root} ] && kill -KILL "${{proc#/proc/}}"
            done
            true
        }}
        trap cleanUp EXIT
        {steps}
        echo '## the guide ran'
        """).format(upper=upper, work=work, root=root, steps="\n".join(steps)))
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(driver)],
                          capture_output=True, text=True, timeout=1200)
    output = "".join(line for line in (done.stdout + done.stderr).splitlines(True)
                     if "WARNING: Location" not in line)     # pip on the mirror this host configures
    assert done.returncode == 0 and "## the guide ran" in output, output[-6000:]
    assert "reflservd is running" in output and "COMPLETE" in output
