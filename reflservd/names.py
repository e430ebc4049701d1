"""The names the server, the worker and ``reflq`` share: the files a fit
leaves among a job's results, the fitters whose fits resume from a
checkpoint, and this package's version. Only the standard library, so that
``reflworkerd`` (and any script) may import it.
"""

RESULTS_DIR = "results"
"""The folder of a job's directory whose files are sent as its results."""
SESSION_NAME = "session.h5"
"""The result file a worker sends as a fit's checkpoint (bumps' session file);
named in the lease answer of a later attempt of the same job, so that its
worker resumes from it."""
STDOUT_NAME = "stdout.txt"
STDERR_NAME = "stderr.txt"
LOG_NAMES = (STDOUT_NAME, STDERR_NAME)
"""A fit's output, among its result files (shown on its page, ``reflq logs``)."""
RESUMABLE_FITTERS = ("dream", "de")
"""The fitters whose fit resumes from a checkpoint on another attempt."""


def _version():
    try:
        from importlib.metadata import version
        return version("reflservd")
    except Exception:
        return "0"


VERSION = _version()
"""This package's version (sent with a job, shown on the pages)."""


def readSecret(path):
    """The secret held in the file at ``path`` (a token), stripped; raises
    OSError, or ValueError where the file is empty. The worker reads its
    token with it, ``reflq`` its ``--token-file``."""
    with open(path) as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError("%s is empty" % (path,))
    return secret
