"""The worker's own state files (a held lease's ``jobs/<id>.json``, a Slurm
fit's control files): written whole or not at all, so that a worker killed
while writing one finds the old file or the new one at its next start."""

import json
import os


def writeDurably(path, value):
    """Write ``value`` as JSON to ``path``: to a temporary file beside it,
    fsynced, then renamed over it. Raises OSError where the disk refuses."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temporary, path)
