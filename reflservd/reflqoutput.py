"""What ``reflq`` prints: text for people (a live progress line on a
terminal) or JSON for programs, and how its columns are written."""

import json
import sys
import time

from reflservd.format import displayText, formatDuration, formatValue


class Output:
    """Where a command writes: text for people, JSON for programs, and a
    live line on stderr when it is a terminal."""

    def __init__(self, asJSON, stdout=None, stderr=None):
        self.asJSON = asJSON
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.live = self.stderr.isatty()
        self._liveWidth = 0
        encoding = getattr(self.stdout, "encoding", None) or "utf-8"
        try:
            "χ²±".encode(encoding)
            self.chisq, self.pm = "χ²", "±"
        except (UnicodeEncodeError, LookupError):
            self.chisq, self.pm = "chisq", "+/-"

    def text(self, line=""):
        if not self.asJSON:
            self.clearLive()
            self.stdout.write(self.plain(line) + "\n")
            self.stdout.flush()

    def json(self, value):
        if self.asJSON:
            self.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
            self.stdout.flush()

    def table(self, rows):
        """Rows of text cells as columns, each as wide as its widest cell."""
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.text("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

    def note(self, line):
        """A message for the person (on stderr), in either mode."""
        self.clearLive()
        self.stderr.write(self.plain(line) + "\n")
        self.stderr.flush()

    def plain(self, line):
        """The line as this terminal can show it (and a job's text with a lone
        surrogate as any can)."""
        return displayText(line).replace("χ²", self.chisq).replace("±", self.pm)

    def showLive(self, line):
        line = self.plain(line)
        self.stderr.write("\r" + line + " " * max(0, self._liveWidth - len(line)))
        self.stderr.flush()
        self._liveWidth = len(line)

    def clearLive(self):
        if self._liveWidth:
            self.stderr.write("\r" + " " * self._liveWidth + "\r")
            self.stderr.flush()
            self._liveWidth = 0


def when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def runTime(record, now=None):
    if not record.get("started"):
        return None
    end = record.get("finished") or (now if now is not None else time.time())
    return end - record["started"] if record["status"] not in ("PENDING",) else None


def chisqText(value):
    return "-" if value is None else formatValue(value, digits=4)


def progressLine(jobId, progress, total, width=24):
    progress = progress if isinstance(progress, dict) else {}
    step = progress.get("step")
    parts = ["job %d" % (jobId,)]
    if total and isinstance(step, int) and not isinstance(step, bool):
        done = min(width, max(0, width * step // total))
        parts.append("[%s%s] step %d/%d" % ("#" * done, "." * (width - done), step, total))
    else:
        parts.append("step %s" % (displayText(step, "-"),))
    parts.append("χ² %s" % (chisqText(progress.get("chisq")),))
    parts.append("elapsed %s" % (formatDuration(progress.get("elapsed")),))
    return "  ".join(parts)
