"""``make demo`` runs a first fit end to end and exits 0."""

import os
import subprocess
import sys


def test_demo_fits_the_nickel_film_and_fetches_its_results(tmp_path):
    result = subprocess.run([sys.executable, "-m", "reflservd.demo"], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETE" in result.stdout
    assert "server and worker stopped" in result.stdout
    files = os.listdir(tmp_path / "demo-results")
    assert "nifilm.par" in files and "nifilm-model0.png" in files
    thickness = [line for line in open(tmp_path / "demo-results" / "nifilm.par")
                 if line.startswith("Ni thickness")]
    assert abs(float(thickness[0].split()[-1]) - 100.0) < 1.0
    assert not os.path.exists(tmp_path / "var" / "demo" / "reflservd.pid")
    assert not os.path.exists(tmp_path / "var" / "demo" / "reflworkerd.pid")
