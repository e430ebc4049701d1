"""``make demo``: a first fit, end to end, on this machine.

Starts a server and a worker on 127.0.0.1 (state under ``./var/demo``),
simulates a nickel-film reflectivity curve with refl1d (seeded, so every run
fits the same data), submits the fit with ``reflq``, shows its progress,
fetches the results into ``./demo-results/``, prints the best parameters and
the job page's address, and leaves both daemons running until Ctrl-C, so that
the page can be opened; then it stops them and exits 0 when the fit was
COMPLETE. ``--once`` (``make demo ARGS=--once``) stops them as soon as the fit
has ended. It needs nothing outside the repository.
"""

import argparse

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources

BIN = os.path.dirname(sys.executable)
SEED = 20261128


def simulate(path, seed=SEED, thickness=100.0):
    """Write a simulated neutron reflectivity curve of a nickel film on
    silicon (columns Q, R, dR, dQ) with 3 % Gaussian noise."""
    import numpy as np
    from refl1d.names import SLD, Experiment, QProbe

    rng = np.random.default_rng(seed)
    q = np.linspace(0.008, 0.18, 150)
    dq = 0.02 * q
    sample = SLD("Si", rho=2.07)(0, 6.5) | SLD("Ni", rho=9.41)(thickness, 4.0) | SLD("air", rho=0.0)
    _, r = Experiment(probe=QProbe(q, dq, data=None), sample=sample).reflectivity()
    dr = 0.03 * r + 1e-7
    noisy = r + rng.normal(0.0, dr)
    np.savetxt(path, np.column_stack([q, noisy, dr, dq]),
               header="Q R dR dQ: a %g A nickel film on silicon, simulated (seed %d)" % (thickness, seed))


def freePort(preferred=8080):
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


class Daemon:
    """A twistd daemon started in the background, stopped by its pid."""

    def __init__(self, name, base, args):
        self.name = name
        self.pidfile = os.path.join(base, name + ".pid")
        self.logfile = os.path.join(base, name + ".log")
        self.args = args

    def start(self):
        subprocess.run([os.path.join(BIN, "twistd"), "--pidfile", self.pidfile,
                        "--logfile", self.logfile, self.name] + self.args, check=True)

    def stop(self, bound=60.0):
        try:
            with open(self.pidfile) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + bound
        while os.path.exists(self.pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)


def waitFor(url, bound=60.0):
    deadline = time.monotonic() + bound
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("demo: %s did not answer within %d s" % (url, bound))
            time.sleep(0.2)


def reflq(server, *args, capture=False):
    command = [os.path.join(BIN, "reflq"), "--server", server] + list(args)
    print("$ reflq " + " ".join(args), flush=True)
    if capture:
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return subprocess.run(command).returncode


def writeInputs(folder):
    """Write the demo's model and its simulated data into ``folder``: their paths."""
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, "nifilm.py")
    data = os.path.join(folder, "nifilm-demo.refl")
    with open(model, "wb") as f:
        f.write(resources.files("reflservd").joinpath("demodata/nifilm.py").read_bytes())
    simulate(data)
    return model, data


def untilInterrupted(server, jobId):
    """Keep the daemons up until Ctrl-C (SIGINT) or SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print("\nThe server and the worker keep running: open %s/jobs/%d, or submit more with\n"
          "  %s --server %s submit MODEL.py DATA…\nPress Ctrl-C to stop them." % (
              server, jobId, os.path.join(BIN, "reflq"), server), flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true",
                        help="stop the server and the worker as soon as the fit has ended")
    parser.add_argument("--inputs", metavar="DIR",
                        help="only write the demo's model and data into DIR (a first fit for "
                             "a new site: reflq submit DIR/nifilm.py DIR/nifilm-demo.refl)")
    args = parser.parse_args(argv)
    if args.inputs:
        writeInputs(args.inputs)
        return 0
    base = os.path.abspath(os.path.join("var", "demo"))
    results = os.path.abspath("demo-results")
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    model, data = writeInputs(os.path.join(base, "input"))

    port = freePort()
    server = "http://127.0.0.1:%d" % (port,)
    daemons = [
        Daemon("reflservd", base, ["--listen", "tcp:%d:interface=127.0.0.1" % port,
                                   "--state-dir", os.path.join(base, "server")]),
        Daemon("reflworkerd", base, ["--server", server, "--queue", "demo",
                                     "--work-dir", os.path.join(base, "worker"),
                                     "--sandbox", "auto"]),
    ]
    try:
        daemons[0].start()
        waitFor(server + "/healthz")
        daemons[1].start()
        print("demo: server at %s, worker on queue 'demo' (logs in %s)" % (server, base), flush=True)
        record = json.loads(reflq(server, "--json", "submit", model, data, "--fit", "lm",
                                  "--name", "demo: nickel film", capture=True))
        jobId = record["id"]
        print("demo: job %d submitted" % (jobId,), flush=True)
        status = reflq(server, "wait", str(jobId))
        reflq(server, "fetch", str(jobId), "-o", results)
        reflq(server, "status", str(jobId))
        job = waitFor("%s/api/v1/jobs/%d" % (server, jobId))
        if job["status"] != "COMPLETE":
            print("demo: the fit ended %s: %s" % (job["status"], job.get("error")))
            return 1
        print("\nThe job's page: %s/jobs/%d" % (server, jobId))
        print("Its files:      %s" % (results,), flush=True)
        if not args.once:
            untilInterrupted(server, jobId)
        return status
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        print("demo: server and worker stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
