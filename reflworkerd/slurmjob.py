"""The program a Slurm job of the ``slurm`` backend runs on its compute node.

``python -m reflworkerd.slurmjob CONTROL_DIR``, where the worker
(``slurm.SlurmBackend``) left ``command.json``: the same ``run`` command the
fork server sends its fork host (``wire``). It runs the fork host's own loop
(``forkhost.serve``) for that one fit, so the fit is preloaded, forked,
confined (``sandbox.confine``), reaped and its process group emptied exactly
as on the worker's own machine; only the events go to ``CONTROL_DIR/events``
instead of a pipe, for the worker to read through the shared directory.

The control directory belongs to the worker (mode 0700, beside the job
directories, not in them): the fit never sees it, and what is in ``events``
before the fit's ``started`` is the worker's own code's. The fit's messages
come through its own pipe, as on the local backend, relayed with the same
bounds.

A Slurm TERM (``scancel --signal=TERM --full``) reaches the fit's processes
directly; this program ignores it and reports how the fit ended.
"""

import json
import os
import signal
import sys

from reflworkerd import forkhost
from reflworkerd.wire import encode

COMMAND_NAME = "command.json"
EVENTS_NAME = "events"


def main(controlDir):
    with open(os.path.join(controlDir, COMMAND_NAME)) as f:
        command = json.load(f)
    events = os.open(os.path.join(controlDir, EVENTS_NAME),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    commands, feed = os.pipe()
    os.write(feed, encode(command))     # a few KB: within the pipe's buffer; feed stays open
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forkhost.serve(commands, events, once=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
