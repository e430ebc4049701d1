"""``make demo`` runs a first fit end to end, leaves its page open until Ctrl-C, and exits 0."""

import os
import re
import signal
import subprocess
import sys
import urllib.request

from test.support import reaped


def test_demo_fits_the_nickel_film_serves_its_page_until_ctrl_c_and_stops(tmp_path):
    with reaped(subprocess.Popen([sys.executable, "-m", "reflservd.demo"], cwd=str(tmp_path),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) as demo:
        seen = []
        for line in demo.stdout:        # ends when the demo ends or waits for Ctrl-C
            seen.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        output = "".join(seen)
        assert "COMPLETE" in output and "Press Ctrl-C" in output, output
        page = re.search(r"open (http://127\.0\.0\.1:\d+/jobs/\d+)", output).group(1)
        with urllib.request.urlopen(page, timeout=30) as answer:
            assert answer.status == 200 and b"demo: nickel film" in answer.read()
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, output + rest
    assert "server and worker stopped" in rest
    files = os.listdir(tmp_path / "demo-results")
    assert "nifilm.par" in files and "nifilm-model0.png" in files
    thickness = [line for line in open(tmp_path / "demo-results" / "nifilm.par")
                 if line.startswith("Ni thickness")]
    assert abs(float(thickness[0].split()[-1]) - 100.0) < 1.0
    assert not os.path.exists(tmp_path / "var" / "demo" / "reflservd.pid")
    assert not os.path.exists(tmp_path / "var" / "demo" / "reflworkerd.pid")
    try:
        urllib.request.urlopen(page, timeout=5)
    except OSError:
        pass
    else:
        raise AssertionError("the server still answers after Ctrl-C")
