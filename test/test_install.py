"""``pip install .`` gives working twistd plugins and console scripts.

A fresh venv sees the project's dependencies through a .pth file pointing at
this venv's site-packages (so the test needs no network), and installs the
project itself from the source tree without them."""

import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pip_install_puts_both_plugins_and_scripts_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                    "--no-deps", ROOT], check=True, cwd=str(tmp_path))
    plugins = os.path.join(purelib, "twisted", "plugins")
    assert {"reflservd_plugin.py", "reflworkerd_plugin.py"} <= set(os.listdir(plugins))
    assert not os.path.exists(os.path.join(purelib, "twisted", "plugins", "__init__.py")) or \
        "twisted" in open(os.path.join(plugins, "__init__.py")).read()
    env = dict(os.environ, PYTHONPATH="")
    helptext = subprocess.run([python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                              check=True, cwd=str(tmp_path), capture_output=True, text=True,
                              env=env).stdout
    assert "reflservd" in helptext and "reflworkerd" in helptext
    for script in ("reflq", "reflservd-journal"):
        assert os.access(venv / "bin" / script, os.X_OK), script
    where = subprocess.run([python, "-c", "import reflservd; print(reflservd.__file__)"],
                           check=True, cwd=str(tmp_path), capture_output=True, text=True, env=env).stdout
    assert where.startswith(purelib), where
