"""Write a state directory with the reflservd on ``PYTHONPATH``, for the upgrade tests.

    PYTHONPATH=OLD_CHECKOUT python -m test.states.write test/states/format-N

runs that checkout's ``twistd reflservd`` on loopback with a snapshot every 4
records, and leaves behind: a COMPLETE job with its result and result files,
an ERROR job, a CANCEL job, a RUNNING job and a PENDING one, some in the
snapshot and some in records after it. test/states/format-1 was written by
a994668, the last commit before the state directory had a ``format`` file.
"""

import os
import subprocess
import sys
import time
import urllib.request

from test.conftest import Api, freePort
from test.support import FakeWorker


def main(stateDir):
    port = freePort()
    url = "http://127.0.0.1:%d" % port
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    server = subprocess.Popen([twistd, "-n", "--pidfile=", "reflservd", "--listen",
                               "tcp:%d:interface=127.0.0.1" % port, "--state-dir", stateDir,
                               "--snapshot-every", "4", "--lease-timeout", "3600"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        api, worker = Api(url), FakeWorker(url, queue="q")
        files = {"model.py": b"# a model\n", "data.dat": b"0.01 1.0 0.1\n"}

        def submit(name):
            return api.submit({"name": name, "queue": "q", "service": "refl1d", "notify": "old@example.org",
                               "data": {"model": "model.py", "options": {"fit": "lm"}}}, files)
        done = submit("complete")
        worker.runFit(worker.lease())
        failed = submit("error")
        worker.complete(worker.lease(), "ERROR", error="the model raised ValueError")
        cancelled = submit("cancel")
        api.cancel(cancelled["id"])
        submit("running")
        worker.heartbeat(worker.lease())
        submit("pending")
        print("jobs", done["id"], failed["id"], cancelled["id"], "and two more")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
