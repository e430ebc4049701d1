"""Names the worker shares with reflservd: the files of a job's results and
the resumable fitters come from ``reflservd.names`` (one definition for the
server, the worker and ``reflq``); the queue-name test, the resumable-request
test are the worker's. Nothing else in
``reflworkerd`` spells these out.
"""

from reflservd.errors import Refused
from reflservd.limits import checkQueueName
from reflservd.names import (  # noqa: F401 (the names the worker takes from here)
    RESUMABLE_FITTERS, RESULTS_DIR, SESSION_NAME, STDERR_NAME, STDOUT_NAME)

def isQueueName(name):
    """Whether the server takes ``name`` as a queue name (``limits.checkQueueName``,
    the one rule: 1-100 ASCII letters, digits, '-', '_' or '.')."""
    try:
        checkQueueName(name)
    except Refused:
        return False
    return True


def isResumable(request):
    """Whether a job's fit can go on from a checkpoint (a DREAM or DE fit of refl1d)."""
    request = request if isinstance(request, dict) else {}
    data = request.get("data")
    options = data.get("options") if isinstance(data, dict) else None
    return (request.get("service") == "refl1d" and isinstance(options, dict)
            and options.get("fit") in RESUMABLE_FITTERS)

