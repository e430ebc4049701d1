"""Hostile model: results that cost nothing to make and much to store: sparse
files of ``hostile.json``'s ``"sparse"`` bytes each (``"sparseFiles"`` of
them) and ``"smallFiles"`` one-byte files. Then it ends like a model that
defines no problem.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import load  # noqa: E402

config = load()
os.makedirs("results", exist_ok=True)
for n in range(int(config.get("sparseFiles", 3))):
    with open("results/big-%d.bin" % n, "wb") as f:
        f.truncate(int(config.get("sparse", 1 << 30)))
for n in range(int(config.get("smallFiles", 2000))):
    with open("results/f%04d" % n, "wb") as f:
        f.write(b"x")
