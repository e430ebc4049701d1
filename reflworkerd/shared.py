"""Names the worker shares with reflservd: the worker's copies, gathered here.

The server keeps its own copies; once the shared module of both exists these
become one import from it. Nothing else in ``reflworkerd`` spells them out.
"""

RESULTS_DIR = "results"
"""The folder of a job directory whose regular files are the job's results."""

SESSION_NAME = "session.h5"
"""The fit's session file in ``results/``, and the result name of its checkpoint."""

STDOUT_NAME = "stdout.txt"
STDERR_NAME = "stderr.txt"
"""The fit's standard output and error, in ``results/``."""

RESUMABLE_FITTERS = ("dream", "de")
"""Fitters whose session file lets a later attempt resume the fit (bumps ``--resume``)."""

QUEUE_NAME_MAX = 100


def isQueueName(name):
    """A queue name is 1-100 letters, digits, '-', '_' or '.'."""
    return (bool(name) and len(name) <= QUEUE_NAME_MAX
            and name.replace("-", "").replace("_", "").replace(".", "").isalnum())


def isResumable(request):
    """Whether a job's fit can go on from a checkpoint (a DREAM or DE fit of refl1d)."""
    request = request if isinstance(request, dict) else {}
    data = request.get("data")
    options = data.get("options") if isinstance(data, dict) else None
    return (request.get("service") == "refl1d" and isinstance(options, dict)
            and options.get("fit") in RESUMABLE_FITTERS)


def readSecret(path):
    """The secret held in the file at ``path``, stripped; raises OSError, or
    ValueError where the file is empty."""
    with open(path) as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError("%s is empty" % (path,))
    return secret
