"""Hostile model: JSON nested 200,000 deep where the worker and the fork server
parse what a fit says: as a line on the message pipe, and as ``.outcome.json``
(then it exits at once). A parser without a bound on depth raises
RecursionError; uncaught, that ends the fork server and every fit in it.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import announce  # noqa: E402

announce(b"[" * 200000 + b"\n")
announce(b'{"type": "progress", "progress": ' + b"[" * 100000 + b"\n")
with open(".outcome.json", "w") as f:
    f.write("[" * 200000)
os._exit(0)
