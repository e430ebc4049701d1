"""The log file of a daemon an init script starts: one file that logrotate rotates.

``twistd --logger reflservd.logfile.observer`` with ``REFLSERVD_LOGFILE=PATH``
in the environment (``etc/init-functions`` sets both) appends the log to PATH
and opens PATH again on SIGUSR1, so logrotate moves the file aside and sends
SIGUSR1 (``etc/logrotate.d/``). twistd's own ``--logfile`` rotates the file by
itself every megabyte and, on SIGUSR1, renames a file logrotate has already
moved, so logrotate cannot drive it. The server and the worker both use this.
"""

import os
import signal

from twisted.logger import textFileLogObserver

ENVIRONMENT = "REFLSERVD_LOGFILE"


class ReopenableFile:
    """A text file opened for appending (O_APPEND) that can be opened again by name."""

    def __init__(self, path):
        self.path = path
        self._file = None
        self.reopen()

    def reopen(self):
        opened = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        previous, self._file = self._file, opened
        if previous is not None:
            previous.close()

    def write(self, text):
        self._file.write(text)

    def flush(self):
        self._file.flush()


def observer():
    """The log observer twistd's ``--logger`` makes: the file ``$REFLSERVD_LOGFILE``."""
    path = os.environ.get(ENVIRONMENT)
    if not path:
        raise SystemExit("--logger reflservd.logfile.observer needs %s=PATH in the environment"
                         % (ENVIRONMENT,))
    logFile = ReopenableFile(path)

    def reopen(signum, frame):
        from twisted.internet import reactor
        reactor.callFromThread(logFile.reopen)

    signal.signal(signal.SIGUSR1, reopen)
    return textFileLogObserver(logFile)
