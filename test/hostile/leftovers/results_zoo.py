"""Hostile model: leave in ``results/`` one of every kind of file a worker must
not read or upload, beside one plain file: a FIFO, a unix socket, a symbolic
link to a host file (``/etc/shadow``, dangling inside the sandbox, real
outside), a link to another job's file, a hard link to the job's own model, a
directory; and make ``.outcome.json`` a directory. Then it ends like a model
that defines no problem.

``hostile.json``: ``{"otherFile": "/…/jobs/OTHER/results/session.h5"}``.
"""

import os
import socket
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import load  # noqa: E402

config = load()
os.makedirs("results", exist_ok=True)
with open("results/plain.txt", "w") as f:
    f.write("an ordinary result\n")
os.mkfifo("results/fifo")
listening = socket.socket(socket.AF_UNIX)
listening.bind("results/socket")
os.symlink("/etc/shadow", "results/shadow")
os.symlink(config.get("otherFile") or "/nonexistent", "results/other-session.h5")
os.link("model.py", "results/model-link.py")
os.mkdir("results/directory")
os.mkdir(".outcome.json")
