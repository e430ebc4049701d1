"""``reflq view ID``: a job's fit in refl1d's own viewer, on the user's machine
(docs/client.md, "The fit in refl1d's viewer").

The job's latest session file (``names.SESSION_NAME``: the final one of a
finished fit, or the newest checkpoint of a running DREAM or DE fit) is
downloaded to a folder of its own, made read-only, and opened with
``refl1d --read-session FILE`` (refl1d 1.0's webview: bumps' aiohttp and
socket.io server on ``localhost``, with ``--headless`` when no browser should
open). Read with ``--read-session`` and no ``--session``, bumps does not
autosave; the copy is read-only and nothing the viewer does reaches the
server.

A session file is not data only: bumps rebuilds the fit problem from it by
importing the classes it names and may unpickle functions (``bumps.serialize``),
so opening one runs what the fit that wrote it chose. The fit ran the job's
model; a job the user did not submit (whose key ``reflq`` does not hold) is
therefore opened only with ``trust=True`` (``--trust``).
"""

import importlib.util
import os
import stat
import subprocess
import sys
import tempfile

from reflservd.client import ClientError
from reflservd.names import SESSION_NAME

WEBVIEW_MODULES = ("refl1d.webview.server", "bumps.webview.server", "aiohttp", "socketio")


class ViewerUnavailable(ClientError):
    """The installed refl1d offers no webview."""


def checkWebview():
    """Raise `ViewerUnavailable` naming what is missing, unless refl1d's webview can run here."""
    for module in WEBVIEW_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ViewerUnavailable(
                "the installed refl1d has no webview (%s is missing): refl1d 1.0 or later with its "
                "webview (pip install 'refl1d[webview]') opens a session; reflq fetch downloads it" % (module,))


def fetchSession(job, directory, trust=False):
    """Download ``job``'s latest session file into ``directory``, read-only; its path."""
    if not trust and job.client.keys.get(job.client.url, job.id) is None:
        raise ClientError(
            "job %d was not submitted from here (reflq holds no key for it): its session file rebuilds "
            "objects its fit chose, which runs code on this machine; give --trust to open it anyway" % (job.id,))
    if SESSION_NAME not in {f["name"] for f in job.files()}:
        raise ClientError("job %d has no session file (yet): a fit saves it when it ends, and a DREAM or DE "
                          "fit at each checkpoint" % (job.id,))
    path, = job.download(directory, names=[SESSION_NAME])
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return path


def webviewCommand(session, port=0, browser=True):
    """The command that opens ``session`` in refl1d's webview on ``localhost:port``."""
    command = [sys.executable, "-m", "refl1d.webview.server", "--read-session", session,
               "--port", str(int(port))]
    return command + ([] if browser else ["--headless"])


def view(job, port=0, browser=True, trust=False, directory=None, note=print):
    """Open ``job``'s latest session in refl1d's webview and wait until it is
    closed (Ctrl-C); the viewer's exit code."""
    checkWebview()
    directory = directory or tempfile.mkdtemp(prefix="reflq-view-%d-" % (job.id,))
    session = fetchSession(job, directory, trust)
    note("reflq: job %d's session %s opens in refl1d's webview%s (Ctrl-C ends it)"
         % (job.id, session, " on port %d" % (port,) if port else ""))
    process = subprocess.Popen(webviewCommand(session, port, browser), cwd=directory)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
