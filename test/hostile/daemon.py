"""Hostile model: leave a daemon running after the job.

Double-forks, ``setsid``, closes every descriptor and sleeps for ever in the
grandchild, which first writes its pid (as it sees it) to ``daemon.pid`` in
the job directory. The script waits until the daemon is set up, then writes
``hostile-report.json`` and prints it after ``HOSTILE-REPORT``. Whoever runs
it checks after the job that no such process is left.
"""

import os
import sys
import time

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import save  # noqa: E402


report = {"script": "daemon", "finished": False}
ready, readyWrite = os.pipe()
first = os.fork()
if first == 0:
    try:
        os.setsid()
        if os.fork() == 0:
            with open("daemon.pid", "w") as f:
                f.write("%d\n" % os.getpid())
            os.write(readyWrite, b"ok")
            os.closerange(0, 65536)
            while True:
                time.sleep(3600)
    finally:
        os._exit(0)
os.close(readyWrite)
report["daemonReady"] = os.read(ready, 2) == b"ok"
os.waitpid(first, 0)
with open("daemon.pid") as f:
    report["daemonPid"] = int(f.read())
report["finished"] = True
save(report)
