"""What every hostile model shares: its configuration, its attempts, its report.

Shipped beside the hostile script in the job directory (the harnesses copy or
upload it); a script imports it from its working directory.

``load()`` reads ``hostile.json`` (``{}`` when there is none); ``attempt``
records whether one escape succeeded, as seen from inside; ``save`` writes
``hostile-report.json`` atomically and prints it on one line after
``HOSTILE-REPORT``.
"""

import json
import os


def load():
    try:
        with open("hostile.json") as f:
            return json.load(f)
    except OSError:
        return {}


def attempt(report, name, action):
    try:
        detail = action()
        report["attempts"][name] = {"succeeded": True, "detail": str(detail)[:500]}
    except Exception as e:
        report["attempts"][name] = {"succeeded": False, "detail": "%s: %s" % (type(e).__name__, e)}


def save(report):
    text = json.dumps(report, sort_keys=True)
    with open("hostile-report.json.tmp", "w") as f:
        f.write(text)
    os.replace("hostile-report.json.tmp", "hostile-report.json")
    print("HOSTILE-REPORT " + text, flush=True)


def announce(message):
    """Write ``message`` as a JSON line on the fit's message pipe to the fork server
    (a pipe among the fit's descriptors past 2), as the worker's own code does."""
    import stat

    line = (json.dumps(message) + "\n").encode() if not isinstance(message, bytes) else message
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, line)
        except OSError:
            pass


def waitToBeKilled(seconds=120):
    """Sleep until the worker ends this fit (bounded: it ends by itself after ``seconds``)."""
    import time

    time.sleep(seconds)
