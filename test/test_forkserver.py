"""The fork server, for real: a preloaded fork host process, forked fits, real signals.

Each test starts its own fork server (a real ``python -m reflworkerd.forkhost``
spawned by the reactor) and stops it; the fits are the nickel film of
refl1d's examples, run like ``refl1d --batch`` would.
"""

import json
import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer, reactor, utils
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from reflworkerd import sandbox
from reflworkerd.local import LocalBackend
from reflworkerd.sandbox import SandboxUnavailable
from test.support import sessionGenerations

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable
REFL1D = os.path.join(os.path.dirname(sys.executable), "refl1d")
NIFILM = os.path.join(HERE, "models", "nifilm.py")
DATA_NAMES = ["nifilm-tof-%d.dat" % i for i in (1, 2, 3, 4)]


def exampleData():
    """The refl1d example data: shared/ beside the checkout (as in CI), or $REFL1D_EXAMPLES."""
    candidates = [
        os.environ.get("REFL1D_EXAMPLES", ""),
        os.path.join(ROOT, "..", "shared", "data", "refl1d-examples"),
        "/work/shared/data/refl1d-examples",
    ]
    for path in candidates:
        if path and all(os.path.exists(os.path.join(path, name)) for name in DATA_NAMES):
            return path
    raise unittest.SkipTest("refl1d example data (nifilm-tof-*.dat) not found")


SLOW_DREAM = {"fit": "dream", "samples": 10**7, "burn": 10**5, "seed": 1}


class LocalBackendTestCase(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="reflworkerd-test-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.jobs = 0

    def makeJob(self, model=NIFILM, modelText=None, modelName="nifilm.py", data=True):
        self.jobs += 1
        jobDir = os.path.abspath(os.path.join(self.base, "job%d" % self.jobs))
        os.makedirs(jobDir)
        if modelText is not None:
            with open(os.path.join(jobDir, modelName), "w") as f:
                f.write(modelText)
        elif model is not None:
            shutil.copy(model, os.path.join(jobDir, modelName))
        if data:
            source = exampleData()
            for name in DATA_NAMES:
                shutil.copy(os.path.join(source, name), jobDir)
        return jobDir

    @defer.inlineCallbacks
    def startServer(self, **kw):
        backend = LocalBackend(reactor, python=PYTHON, env=dict(os.environ), **kw)
        self.addCleanup(backend.stop)
        yield backend.start()
        return backend

    def firstProgress(self, progressList):
        """A Deferred that fires with the first progress message, and a callback that feeds it."""
        first = defer.Deferred()

        def onProgress(progress):
            progressList.append(progress)
            if not first.called:
                first.callback(progress)

        return first, onProgress

    def assertNear(self, value, expected, tolerance):
        self.assertTrue(abs(value - expected) <= tolerance, "%r is not within %r of %r" % (value, tolerance, expected))

    def assertGroupGone(self, pgid):
        with self.assertRaises(ProcessLookupError):
            os.killpg(pgid, 0)

    def assertProcessGone(self, pid):
        """Gone, or at most a zombie waiting for init to reap it."""
        try:
            with open("/proc/%d/stat" % (pid,)) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        self.assertEqual(state, "Z", "process %d is still running" % (pid,))


def readPar(path):
    values = {}
    with open(path) as f:
        for line in f:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


class FitTests(LocalBackendTestCase):
    @defer.inlineCallbacks
    def test_nickelFilmLMMatchesRefl1dBatch(self):
        """The LM fit of the nickel film through the fork server completes with χ² ≈ 1 and
        thickness ≈ 100 Å, reports progress, and its best parameters and exported files are
        those of a real ``refl1d --batch`` of the same model and data."""
        backend = yield self.startServer()
        jobDir = self.makeJob()
        progress = []
        fitRun = backend.run(1, jobDir, {"service": "refl1d", "data": {"model": "nifilm.py", "options": {"fit": "lm"}}}, progress.append)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "COMPLETE", outcome)
        result = outcome["result"]
        self.assertEqual(result["fitter"], "lm")
        self.assertNear(result["chisq"], 1.0, 0.1)
        thickness = result["parameters"]["Ni thickness"]
        self.assertNear(thickness["value"], 100.0, 1.0)
        self.assertGreater(thickness["uncertainty"], 0.0)
        self.assertIsInstance(result["seed"], int)
        self.assertIn("nice19", outcome["confinement"])
        self.assertTrue(progress)
        self.assertEqual(set(progress[-1]), {"step", "chisq", "parameters", "elapsed"})
        self.assertEqual(progress[-1]["parameters"]["Ni thickness"], thickness["value"])
        self.assertGroupGone(fitRun.pid)

        batchDir = self.makeJob()
        os.makedirs(os.path.join(batchDir, "results"))
        out, err, code = yield utils.getProcessOutputAndValue(
            REFL1D,
            ["--batch", "nifilm.py", "--fit=lm", "--export=results", "--session=results/session.h5"],
            env=dict(os.environ),
            path=batchDir,
        )
        self.assertEqual(code, 0, err)
        ours = readPar(os.path.join(jobDir, "results", "nifilm.par"))
        theirs = readPar(os.path.join(batchDir, "results", "nifilm.par"))
        self.assertEqual(set(ours), {"Si interface", "Ni interface", "Ni thickness"})
        self.assertEqual(set(ours), set(theirs))
        for name in ours:
            self.assertNear(ours[name], theirs[name], 1e-9 * abs(theirs[name]))
            self.assertNear(result["parameters"][name]["value"], theirs[name], 1e-9 * abs(theirs[name]))
        exported = set(os.listdir(os.path.join(jobDir, "results")))
        self.assertEqual(exported - {"stdout.txt", "stderr.txt"}, set(os.listdir(os.path.join(batchDir, "results"))))
        with open(os.path.join(jobDir, "results", "stdout.txt")) as f:
            self.assertIn("[final]", f.read())

    @defer.inlineCallbacks
    def test_nickelFilmLMInNamespaces(self):
        """Confined in namespaces (where the host has them), the preloaded fit still runs:
        the child finds everything it needs in memory or in the sandbox's root, and the job
        record says what confined it."""
        try:
            sandbox.choose("namespaces")
        except sandbox.SandboxUnavailable as exc:
            raise unittest.SkipTest(str(exc))
        backend = yield self.startServer(sandboxMode="namespaces")
        jobDir = self.makeJob()
        outcome = yield backend.run(1, jobDir, {"service": "refl1d", "data": {"model": "nifilm.py", "options": {"fit": "lm", "seed": 2}}}, lambda p: None).done
        self.assertEqual(outcome["status"], "COMPLETE", outcome)
        self.assertTrue(outcome["confinement"].startswith("namespaces("), outcome["confinement"])
        self.assertNear(outcome["result"]["parameters"]["Ni thickness"]["value"], 100.0, 1.0)
        self.assertTrue(os.path.exists(os.path.join(jobDir, "results", "nifilm-model0.png")))

    @defer.inlineCallbacks
    def test_dreamWithSeedIsBitIdentical(self):
        """Two DREAM fits with the same seed give identical results, parameter files and
        uncertainty reports, byte for byte (numpy and numba both seeded)."""
        backend = yield self.startServer()
        request = {
            "service": "refl1d",
            "data": {"model": "nifilm.py", "options": {"fit": "dream", "samples": 2000, "burn": 20, "seed": 4321}},
        }
        outcomes, dirs = [], []
        for jobId in (1, 2):
            jobDir = self.makeJob()
            outcome = yield backend.run(jobId, jobDir, request, lambda p: None).done
            self.assertEqual(outcome["status"], "COMPLETE", outcome)
            outcomes.append(outcome["result"])
            dirs.append(jobDir)
        first, second = outcomes
        self.assertEqual(first["seed"], 4321)
        first.pop("elapsed"), second.pop("elapsed")
        self.assertEqual(first, second)
        for name in ("nifilm.par", "nifilm.err"):
            with open(os.path.join(dirs[0], "results", name), "rb") as a, open(os.path.join(dirs[1], "results", name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        self.assertIsNotNone(first["parameters"]["Ni thickness"]["uncertainty"])

    @defer.inlineCallbacks
    def test_jobWithoutSeedGetsOneRecorded(self):
        """A job that names no seed gets one drawn by the worker, recorded in its result."""
        backend = yield self.startServer()
        seeds = []
        for jobId in (1, 2):
            outcome = yield backend.run(
                jobId, self.makeJob(), {"service": "refl1d", "data": {"model": "nifilm.py", "options": {"fit": "lm"}}}, lambda p: None
            ).done
            self.assertEqual(outcome["status"], "COMPLETE", outcome)
            seeds.append(outcome["result"]["seed"])
        for seed in seeds:
            self.assertIsInstance(seed, int)
            self.assertTrue(1 <= seed < 2**32)
        self.assertNotEqual(seeds[0], seeds[1])


COUNTING_MODEL = """
import os
exec(open("nifilm-model.py").read())
FIT_PID = os.getpid()
HERE = os.getcwd()


class CountedExperiment(Experiment):
    def nllf(self):
        if os.getpid() != FIT_PID:
            with open(os.path.join(HERE, "evaluations-%d" % os.getpid()), "a") as f:
                f.write(".")
        return Experiment.nllf(self)


problem = FitProblem(CountedExperiment(probe=probe, sample=sample))
"""
"""The nickel film, each evaluation made outside the fit process (the one that
loaded the model) noting its pid: one dot per evaluation in evaluations-PID."""

UNCOPYABLE_MODEL = """
exec(open("nifilm-model.py").read())


class Handle:
    def __deepcopy__(self, memo):
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError("a Handle stays in its process")


experiment.handle = Handle()
"""
"""The nickel film holding something that bumps can deep-copy (as it does with
every model) but not pickle to another process (an open handle, say)."""

PARALLEL_DREAM = {"fit": "dream", "samples": 2000, "burn": 20, "seed": 4321}
PARALLEL_UID = 61710


class ParallelTests(LocalBackendTestCase):
    """``parallel: N`` evaluates the model in N processes of bumps' own mapper,
    inside the fit's confinement, and gives the seeded fit the same answer."""

    def countedJob(self):
        jobDir = self.makeJob(modelText=COUNTING_MODEL, modelName="model.py")
        shutil.copy(NIFILM, os.path.join(jobDir, "nifilm-model.py"))
        return jobDir

    def evaluations(self, jobDir):
        """``{pid: evaluations}`` made outside the fit process."""
        return {int(name.split("-")[1]): os.path.getsize(os.path.join(jobDir, name))
                for name in os.listdir(jobDir) if name.startswith("evaluations-")}

    @defer.inlineCallbacks
    def fit(self, backend, jobId, parallel, uid=None):
        jobDir = self.countedJob()
        options = dict(PARALLEL_DREAM, parallel=parallel)
        outcome = yield backend.run(jobId, jobDir, {"service": "refl1d", "data": {"model": "model.py", "options": options}},
                                   lambda p: None, uid=uid).done
        self.assertEqual(outcome["status"], "COMPLETE", outcome)
        self.assertEqual(outcome["result"]["parallel"], parallel)
        return outcome, jobDir

    @defer.inlineCallbacks
    def test_parallelTwoEvaluatesInTwoProcessesInItsNamespacesWithTheSameResult(self):
        """In namespaces, as a slot's uid under a process limit: parallel 2 makes its
        evaluations in two processes besides the fit's, parallel 1 in none; the seeded
        DREAM fit ends with the same parameters, uncertainties and files either way
        (bumps' mapper returns the values in the order of the points)."""
        try:
            sandbox.choose("namespaces")
        except sandbox.SandboxUnavailable as exc:
            raise unittest.SkipTest(str(exc))
        backend = yield self.startServer(sandboxMode="namespaces", limits={"nproc": 64})
        serial, serialDir = yield self.fit(backend, 1, 1, uid=PARALLEL_UID)
        parallel, parallelDir = yield self.fit(backend, 2, 2, uid=PARALLEL_UID)
        self.assertTrue(parallel["confinement"].startswith("namespaces("), parallel["confinement"])
        self.assertIn("nproc=64", parallel["confinement"])
        self.assertEqual(self.evaluations(serialDir), {})
        evaluations = self.evaluations(parallelDir)
        self.assertEqual(len(evaluations), 2, evaluations)
        self.assertTrue(all(count > 100 for count in evaluations.values()), evaluations)
        first, second = serial["result"], parallel["result"]
        for result in (first, second):
            result.pop("elapsed"), result.pop("parallel"), result["provenance"]["options"].pop("parallel")
        self.assertEqual(first, second)
        for name in ("model.par", "model.err"):
            with open(os.path.join(serialDir, "results", name), "rb") as a, \
                    open(os.path.join(parallelDir, "results", name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

    @defer.inlineCallbacks
    def test_parallelTwoEvaluatesInTwoProcessesUnderSandboxNoneAndRefusesWhatItCannotCopy(self):
        """Under --sandbox none (the manager's socket in the job directory) the mapper
        runs too: two evaluating processes. A model bumps cannot copy to them
        (cloudpickle) ends ERROR saying so, where bumps would quietly evaluate it in
        one process."""
        backend = yield self.startServer(sandboxMode="none")
        outcome, jobDir = yield self.fit(backend, 1, 2)
        evaluations = self.evaluations(jobDir)
        self.assertEqual(len(evaluations), 2, evaluations)
        self.assertTrue(all(count > 100 for count in evaluations.values()), evaluations)
        jobDir = self.makeJob(modelText=UNCOPYABLE_MODEL, modelName="model.py")
        shutil.copy(NIFILM, os.path.join(jobDir, "nifilm-model.py"))
        options = dict(PARALLEL_DREAM, parallel=2)
        outcome = yield backend.run(2, jobDir, {"service": "refl1d", "data": {"model": "model.py", "options": options}},
                                   lambda p: None).done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertIn("option parallel=2: the model cannot be copied to other processes (cloudpickle:",
                      outcome["error"])
        self.assertIn("run it with parallel 1", outcome["error"])


STRAY_MODEL = """
import subprocess
stray = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 600"])
with open("stray.pid", "w") as f:
    f.write(str(stray.pid))
exec(open("nifilm-model.py").read())
"""


class CancelTests(LocalBackendTestCase):
    @defer.inlineCallbacks
    def test_cancelRunningDreamEndsCancelAndGroupGone(self):
        """Cancelling a running DREAM fit ends it CANCEL, and its whole process group,
        including a process the model itself started, is gone when ``done`` fires."""
        backend = yield self.startServer()
        jobDir = self.makeJob(modelText=STRAY_MODEL, modelName="model.py")
        shutil.copy(NIFILM, os.path.join(jobDir, "nifilm-model.py"))
        progress = []
        first, onProgress = self.firstProgress(progress)
        fitRun = backend.run(1, jobDir, {"service": "refl1d", "data": {"model": "model.py", "options": SLOW_DREAM}}, onProgress)
        yield first
        with open(os.path.join(jobDir, "stray.pid")) as f:
            stray = int(f.read())
        self.assertEqual(os.getpgid(stray), fitRun.pid)
        fitRun.cancel(grace=2.0)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "CANCEL")
        self.assertIsNone(outcome["result"])
        self.assertGroupGone(fitRun.pid)
        self.assertProcessGone(stray)

    @defer.inlineCallbacks
    def test_checkpointedFitResumesAfterCancel(self):
        """A long fit checkpoints its session file every ``checkpointEvery`` seconds and says so;
        after it is cancelled (once a checkpoint holds two generations), a retry in the same job directory with ``resume`` goes on from
        the checkpoint (its first step is past the first) and completes."""
        backend = yield self.startServer(checkpointEvery=1)
        jobDir = self.makeJob()
        checkpoints = []
        enough = defer.Deferred()

        def onCheckpoint(path):
            # Cancel once a checkpoint holds sampler state: on a busy machine
            # the first few may all come before the first generation.
            checkpoints.append(path)
            if not enough.called and sessionGenerations(os.path.join(jobDir, path)) >= 2:
                enough.callback(None)

        fitRun = backend.run(1, jobDir, {"service": "refl1d", "data": {"model": "nifilm.py", "options": SLOW_DREAM}},
                            lambda p: None, onCheckpoint=onCheckpoint)
        yield enough
        fitRun.cancel()
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "CANCEL")
        session = os.path.join(jobDir, "results", "session.h5")
        self.assertEqual(set(checkpoints), {"results/session.h5"})     # relative to the job
        self.assertTrue(os.path.getsize(session) > 0)

        progress = []
        # More samples than the checkpoint holds, however long the first run took,
        # so that the resumed fit has generations left to run and report.
        options = {"fit": "dream", "samples": 20000, "burn": 0, "seed": 1, "resume": True}
        outcome = yield backend.run(2, jobDir, {"service": "refl1d", "data": {"model": "nifilm.py", "options": options}}, progress.append).done
        self.assertEqual(outcome["status"], "COMPLETE", outcome)
        self.assertGreater(progress[0]["step"], 1)
        self.assertNear(outcome["result"]["parameters"]["Ni thickness"]["value"], 100.0, 5.0)

    @defer.inlineCallbacks
    def test_wallClockLimitEndsError(self):
        """A fit that outlives the wall-clock limit is ended and its job is an ERROR saying so."""
        backend = yield self.startServer(limits={"wall": 1})
        fitRun = backend.run(1, self.makeJob(), {"service": "refl1d", "data": {"model": "nifilm.py", "options": SLOW_DREAM}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "wall-clock limit of 1 s exceeded")
        self.assertGroupGone(fitRun.pid)

    @defer.inlineCallbacks
    def test_cpuLimitEndsErrorSayingSo(self):
        """A model that spins past the CPU-seconds limit is killed and its job is an ERROR naming the limit."""
        backend = yield self.startServer(limits={"cpu": 1})
        fitRun = backend.run(1, self.makeJob(modelText="while True:\n    pass\n", modelName="spin.py", data=False),
                            {"service": "refl1d", "data": {"model": "spin.py", "options": {"fit": "lm"}}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "CPU time limit of 1 s exceeded")

    @defer.inlineCallbacks
    def test_memoryLimitEndsErrorSayingSo(self):
        """A model that allocates past the memory limit ends ERROR naming the limit."""
        limit = 2 * 1024**3
        backend = yield self.startServer(limits={"memory": limit})
        model = "import numpy\nbig = numpy.ones(4 * 1024**3 // 8)\n"
        fitRun = backend.run(1, self.makeJob(modelText=model, modelName="big.py", data=False),
                            {"service": "refl1d", "data": {"model": "big.py", "options": {"fit": "lm"}}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertTrue(outcome["error"].startswith("memory limit of %d bytes exceeded (" % (limit,)), outcome["error"])
        self.assertIn("Unable to allocate 4.00 GiB", outcome["error"])


RAISING_MODEL = """\
def buildSample(thickness):
    raise ValueError("no such layer: %r" % (thickness,))

sample = buildSample(-1)
"""

RAISING_DURING_FIT_MODEL = """\
import numpy as np
from bumps.names import Curve, FitProblem

calls = [0]
ERROR = RuntimeError

def line(x, m, b):
    calls[0] += 1
    if calls[0] > 5:
        raise ERROR("the model broke at call %d" % calls[0])
    return m * x + b

x = np.linspace(0, 1, 10)
curve = Curve(line, x, 2 * x + 1, 0.1 * np.ones_like(x), m=1.0, b=0.0)
curve.m.range(0, 5)
curve.b.range(-2, 2)
problem = FitProblem(curve)
"""


FLOOD_MODEL = """\
import json, os, stat
def isPipe(fd):
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False
pipes = [fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and isPipe(fd)]
line = lambda n: (json.dumps({"type": "progress", "progress": {"step": n}}) + "\\n").encode()
for fd in pipes:
    for n in range(100000):
        os.write(fd, line(n))
    os.write(fd, b"not json\\n" + b"x" * 100000 + b"\\n")
raise SystemExit("flooded %d pipe(s)" % len(pipes))
"""


class ErrorTests(LocalBackendTestCase):
    @defer.inlineCallbacks
    def test_floodedMessagesAreThinnedToTheLatest(self):
        """A model that floods its message pipe with 100000 progress lines (and garbage) reaches
        the worker as a few messages, the last one written among them; the job still ends."""
        backend = yield self.startServer()
        progress = []
        outcome = yield backend.run(1, self.makeJob(modelText=FLOOD_MODEL, modelName="flood.py", data=False),
                                   {"service": "refl1d", "data": {"model": "flood.py", "options": {"fit": "lm"}}}, progress.append).done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "SystemExit: flooded 1 pipe(s)")
        self.assertLess(len(progress), 1000)
        self.assertEqual(progress[-1], {"step": 99999, "chisq": None, "parameters": {}, "elapsed": 0.0})

    @defer.inlineCallbacks
    def test_modelThatRaisesGivesItsTraceback(self):
        """A model script that raises while loading ends ERROR with its own message and a
        traceback that starts in the model (no worker, asyncio or bumps batch frames)."""
        backend = yield self.startServer()
        fitRun = backend.run(1, self.makeJob(modelText=RAISING_MODEL, modelName="bad.py", data=False),
                            {"service": "refl1d", "data": {"model": "bad.py", "options": {"fit": "lm"}}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "ValueError: no such layer: -1")
        trace = outcome["trace"]
        self.assertTrue(trace.startswith('Traceback (most recent call last):\n  File "bad.py", line 4, in <module>'), trace)
        self.assertIn('File "bad.py", line 2, in buildSample', trace)
        self.assertTrue(trace.endswith("ValueError: no such layer: -1\n"), trace)
        for plumbing in ("reflworkerd", "asyncio", "webview"):
            self.assertNotIn(plumbing, trace)

    @defer.inlineCallbacks
    def test_modelThatRaisesDuringTheFitGivesItsTraceback(self):
        """A model that raises inside the fit (bumps' fit thread) ends ERROR with that exception
        and a traceback ending in the model's function."""
        backend = yield self.startServer()
        fitRun = backend.run(1, self.makeJob(modelText=RAISING_DURING_FIT_MODEL, modelName="curve.py", data=False),
                            {"service": "refl1d", "data": {"model": "curve.py", "options": {"fit": "lm"}}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR", outcome)
        self.assertTrue(outcome["error"].startswith("RuntimeError: the model broke at call"), outcome["error"])
        self.assertIn('File "curve.py", line 10, in line', outcome["trace"])
        self.assertNotIn("reflworkerd", outcome["trace"])

    @defer.inlineCallbacks
    def test_modelThatExitsDuringTheFitEndsError(self):
        """A model that calls sys.exit inside the fit (which bumps' fit thread does not catch)
        ends ERROR with that exit instead of leaving the batch loop waiting."""
        backend = yield self.startServer()
        model = RAISING_DURING_FIT_MODEL.replace("ERROR = RuntimeError", "ERROR = SystemExit")
        fitRun = backend.run(1, self.makeJob(modelText=model, modelName="curve.py", data=False),
                            {"service": "refl1d", "data": {"model": "curve.py", "options": {"fit": "lm"}}}, lambda p: None)
        outcome = yield fitRun.done
        self.assertEqual(outcome["status"], "ERROR", outcome)
        self.assertTrue(outcome["error"].startswith("SystemExit: the model broke at call"), outcome["error"])
        self.assertIn('File "curve.py", line 10, in line', outcome["trace"])

    @defer.inlineCallbacks
    def test_unknownServiceNamesTheOfferedOnes(self):
        """A job asking for a service the worker does not offer ends ERROR naming the ones it offers."""
        backend = yield self.startServer()
        outcome = yield backend.run(1, self.makeJob(model=None, data=False), {"service": "fitter", "data": {}}, lambda p: None).done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "unknown service 'fitter': this worker offers count, refl1d")
        self.assertIsNone(outcome["trace"])

    @defer.inlineCallbacks
    def test_unknownFitOptionIsRefused(self):
        """A misspelt fit option is refused with an error naming it, before any fitting."""
        backend = yield self.startServer()
        outcome = yield backend.run(
            1, self.makeJob(), {"service": "refl1d", "data": {"model": "nifilm.py", "options": {"fit": "dream", "sampels": 10}}}, lambda p: None
        ).done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertIn("unknown fit option 'sampels'", outcome["error"])

    @defer.inlineCallbacks
    def test_countServiceCounts(self):
        """The count service (the old jobqueue test service) counts to its data and returns it."""
        backend = yield self.startServer()
        outcome = yield backend.run(1, self.makeJob(model=None, data=False), {"service": "count", "data": "2500"}, lambda p: None).done
        self.assertEqual(outcome["status"], "COMPLETE")
        self.assertEqual(outcome["result"], 2500)


class RestartTests(LocalBackendTestCase):
    @defer.inlineCallbacks
    def test_killedForkHostRestartsAndOnlyItsJobFails(self):
        """Killing the fork server fails only the fit that was in it (its process group gone);
        a new fork host is started and a job given afterwards completes."""
        backend = yield self.startServer(restartDelay=0.1)
        progress = []
        first, onProgress = self.firstProgress(progress)
        running = backend.run(1, self.makeJob(), {"service": "refl1d", "data": {"model": "nifilm.py", "options": SLOW_DREAM}}, onProgress)
        yield first
        oldPid = backend.pid
        os.kill(oldPid, signal.SIGKILL)
        outcome = yield running.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertIn("the fork server ended (killed by SIGKILL)", outcome["error"])
        self.assertGroupGone(running.pid)

        later = backend.run(2, self.makeJob(model=None, data=False), {"service": "count", "data": 10}, lambda p: None)
        outcome = yield later.done
        self.assertEqual(outcome["status"], "COMPLETE")
        self.assertEqual(outcome["result"], 10)
        self.assertNotEqual(backend.pid, oldPid)

    @defer.inlineCallbacks
    def test_stopEndsTheForkHostAndItsFits(self):
        """``stop`` ends the fork host process and the fit running in it (ERROR, saying the worker
        stopped, its process group gone); nothing is left of either."""
        backend = LocalBackend(reactor, python=PYTHON, env=dict(os.environ))
        yield backend.start()
        pid = backend.pid
        progress = []
        first, onProgress = self.firstProgress(progress)
        running = backend.run(1, self.makeJob(), {"service": "refl1d", "data": {"model": "nifilm.py", "options": SLOW_DREAM}}, onProgress)
        yield first
        yield backend.stop()
        outcome = yield running.done
        self.assertEqual(outcome["status"], "ERROR")
        self.assertEqual(outcome["error"], "the worker stopped while this fit ran")
        self.assertGroupGone(running.pid)
        self.assertIsNone(backend.pid)
        self.assertProcessGone(pid)


class FakeServerProcess:
    """The transport spawnProcess would return: records what the worker writes and signals."""

    def __init__(self, pid):
        self.pid = pid
        self.commands = []
        self.closed = []
        self.signals = []

    def writeToChild(self, fd, data):
        assert fd == 3
        self.commands.extend(json.loads(line) for line in data.decode().splitlines())

    def closeStdin(self):
        pass

    def closeChildFD(self, fd):
        self.closed.append(fd)

    def signalProcess(self, name):
        self.signals.append(name)


class FakeProcessReactor(Clock):
    """A clock that also spawns fake processes, for the worker-side logic of LocalBackend."""

    def __init__(self):
        Clock.__init__(self)
        self.spawned = []

    def spawnProcess(self, processProtocol, executable, args, env=None, path=None, childFDs=None, **kw):
        process = FakeServerProcess(40000 + len(self.spawned))
        self.spawned.append((processProtocol, process, args, env, childFDs))
        processProtocol.makeConnection(process)
        return process


def event(proto, **fields):
    proto.childDataReceived(4, json.dumps(fields).encode() + b"\n")


class LocalBackendLogicTests(unittest.SynchronousTestCase):
    """LocalBackend's own policy (timers, signals, restarts), on a fake process and a Clock."""

    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.jobDir = tempfile.mkdtemp(prefix="reflworkerd-logic-")
        self.addCleanup(shutil.rmtree, self.jobDir, True)

    def startedServer(self, **kw):
        kw.setdefault("inThread", lambda f, *args: defer.maybeDeferred(f, *args))
        backend = LocalBackend(self.reactor, python="/usr/bin/python3", env={"PATH": "/usr/bin"}, **kw)
        started = backend.start()
        proto, process, args, env, childFDs = self.reactor.spawned[-1]
        self.assertEqual(args, ["/usr/bin/python3", "-m", "reflworkerd.forkhost"])
        self.assertEqual(childFDs, {0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        self.assertEqual(env["PATH"], "/usr/bin")
        self.assertEqual(env["OPENBLAS_NUM_THREADS"], "1")
        self.assertNoResult(started)
        event(proto, event="ready", pid=process.pid, preload=1.0, threads=1)
        self.successResultOf(started)
        return backend, proto, process

    def test_theSandboxIsTheOneChosenAtStartNotChosenAgain(self):
        """The fork server takes the mode sandbox.choose returned once, at the worker's
        start: it probes nothing itself, sends that mode with each fit, and refuses a
        mode that is not a choice made (``auto``)."""
        chosen = []
        original = sandbox.choose
        sandbox.choose = lambda mode: chosen.append(mode) or mode
        self.addCleanup(setattr, sandbox, "choose", original)
        backend, proto, process = self.startedServer(sandboxMode="namespaces")
        backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        self.assertEqual((process.commands[0]["sandbox"], chosen), ("namespaces", []))
        with self.assertRaises(SandboxUnavailable):
            LocalBackend(self.reactor, sandboxMode="auto")

    def test_cancelSendsTermThenKillAfterGraceOnTheClock(self):
        """cancel TERMs the fit's group through the fork host at once and KILLs it when the grace
        period has passed on the injected clock; the run ends CANCEL when the fork host reports it gone."""
        backend, proto, process = self.startedServer()
        fitRun = backend.run(7, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        [command] = process.commands
        self.assertEqual((command["op"], command["jobId"], command["jobDir"]), ("run", 7, self.jobDir))
        event(proto, event="started", run=command["run"], pid=1234)
        fitRun.cancel(grace=5.0)
        self.assertEqual(process.commands[-1], {"op": "signal", "run": command["run"], "signal": signal.SIGTERM})
        self.reactor.advance(4.9)
        self.assertEqual(len(process.commands), 2)
        self.reactor.advance(0.1)
        self.assertEqual(process.commands[-1], {"op": "signal", "run": command["run"], "signal": signal.SIGKILL})
        self.assertNoResult(fitRun.done)
        event(proto, event="exited", run=command["run"], code=None, signal=9, cpu=0.1, leftover=False)
        self.assertEqual(self.successResultOf(fitRun.done)["status"], "CANCEL")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_wallClockLimitEndsErrorFromTheParent(self):
        """The wall-clock limit is kept by the worker: when it passes, the fit is TERMed (KILLed after
        the grace) and ends ERROR naming the limit."""
        backend, proto, process = self.startedServer(limits={"wall": 30, "cpu": 100})
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        command = process.commands[0]
        self.assertEqual(command["limits"], {"cpu": 100})
        event(proto, event="started", run=command["run"], pid=1234)
        self.reactor.advance(30)
        self.assertEqual(process.commands[-1]["signal"], signal.SIGTERM)
        self.reactor.advance(5)
        self.assertEqual(process.commands[-1]["signal"], signal.SIGKILL)
        event(proto, event="exited", run=command["run"], code=None, signal=9, cpu=29.0, leftover=False)
        outcome = self.successResultOf(fitRun.done)
        self.assertEqual((outcome["status"], outcome["error"]), ("ERROR", "wall-clock limit of 30 s exceeded"))

    def test_progressAndConfinementReachTheRun(self):
        """Messages relayed from the child reach onProgress (typed fields only) and the
        run's confinement, in the reactor thread. The confinement is the one the worker
        applies, whatever the child says; a later, forged one changes nothing."""
        backend, proto, process = self.startedServer(limits={"cpu": 10, "wall": 20})
        progress = []
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, progress.append)
        run = process.commands[0]["run"]
        event(proto, event="started", run=run, pid=1234)
        self.assertEqual(fitRun.confinement, "")
        event(proto, event="message", run=run, message={"type": "confined", "confinement": "apparmor(forged)"})
        event(proto, event="message", run=run, message={"type": "progress", "progress": {
            "step": 3, "chisq": 2.0, "parameters": {"a": 1}, "elapsed": 0.5, "extra": "x" * 1000}})
        applied = sandbox.describe("none", {"cpu": 10, "wall": 20}, None, os.geteuid() == 0)
        self.assertEqual(fitRun.confinement, applied)
        self.assertIn("rlimits(cpu=10s)+wall(20s)", applied)
        event(proto, event="message", run=run, message={"type": "confined", "confinement": "apparmor(forged)"})
        self.assertEqual(fitRun.confinement, applied)
        self.assertEqual(progress, [{"step": 3, "chisq": 2.0, "parameters": {"a": 1.0}, "elapsed": 0.5}])

    def test_aForgedOutcomeConfinementIsNotTaken(self):
        """An outcome that claims a confinement (a fit can write any) ends with the
        worker's own description of what it applied."""
        backend, proto, process = self.startedServer()
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        run = process.commands[0]["run"]
        event(proto, event="started", run=run, pid=1234)
        event(proto, event="message", run=run, message={"type": "confined", "confinement": "x"})
        with open(os.path.join(self.jobDir, ".outcome.json"), "w") as f:
            json.dump({"status": "COMPLETE", "result": 1, "confinement": "apparmor(reflworkerd-fit)+uid 60001"}, f)
        event(proto, event="exited", run=run, code=0, signal=None, cpu=0.1, leftover=False)
        outcome = self.successResultOf(fitRun.done)
        self.assertEqual((outcome["status"], outcome["confinement"]),
                         ("COMPLETE", sandbox.describe("none", {}, None, os.geteuid() == 0)))

    def test_eventsThatCannotBeHandledDoNotEndTheServer(self):
        """A deep, broken or unexpected event line is dropped; the pipe stays open and
        the next job's events still arrive."""
        backend, proto, process = self.startedServer()
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        run = process.commands[0]["run"]
        proto.childDataReceived(4, b"[" * 200000 + b"\n")
        event(proto, event="started", run=run, pid="not a pid")
        event(proto, event="message", run=run, message={"type": "checkpoint", "path": "/etc/shadow"})
        event(proto, event="started", run=run, pid=1234)
        self.assertEqual(fitRun.pid, 1234)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)    # logged, not raised

    def test_abortEndsTheFitErrorWithItsReason(self):
        """abort TERMs the fit and ends it ERROR saying why, whatever outcome it left."""
        backend, proto, process = self.startedServer()
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        run = process.commands[0]["run"]
        event(proto, event="started", run=run, pid=1234)
        fitRun.abort("its checkpoint cannot be used: results is a symbolic link")
        self.assertEqual(process.commands[-1], {"op": "signal", "run": run, "signal": signal.SIGTERM})
        event(proto, event="exited", run=run, code=None, signal=15, cpu=0.1, leftover=False)
        outcome = self.successResultOf(fitRun.done)
        self.assertEqual((outcome["status"], outcome["error"]),
                         ("ERROR", "its checkpoint cannot be used: results is a symbolic link"))

    def test_deathWithoutOutcomeIsDescribed(self):
        """A child that leaves no outcome is described by how it ended: the CPU limit by name, other signals by name."""
        backend, proto, process = self.startedServer(limits={"cpu": 10})
        first = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        second = backend.run(2, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        runs = [c["run"] for c in process.commands]
        event(proto, event="exited", run=runs[0], code=None, signal=9, cpu=10.01, leftover=False)
        event(proto, event="exited", run=runs[1], code=None, signal=11, cpu=0.5, leftover=False)
        self.assertEqual(self.successResultOf(first.done)["error"], "CPU time limit of 10 s exceeded")
        self.assertEqual(self.successResultOf(second.done)["error"], "the fit process was killed by SIGSEGV without a result")

    def test_runsGivenWhileRestartingWaitForTheNewServer(self):
        """After the fork host ends it is started again after restartDelay on the clock; a job given
        meanwhile is sent to the new fork host once it is ready."""
        backend, proto, process = self.startedServer(restartDelay=2.0)
        proto.processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
        self.assertIsNone(backend.pid)
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(2.0)
        self.assertEqual(len(self.reactor.spawned), 2)
        newProto, newProcess = self.reactor.spawned[-1][:2]
        self.assertEqual(newProcess.commands, [])
        event(newProto, event="ready", pid=newProcess.pid, preload=1.0, threads=1)
        self.assertEqual([c["op"] for c in newProcess.commands], ["run"])
        self.assertNoResult(fitRun.done)

    def test_cancelBeforeSendingEndsAtOnce(self):
        """A run cancelled before the fork host got it is never sent and ends CANCEL at once."""
        backend, proto, process = self.startedServer(restartDelay=2.0)
        proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
        fitRun = backend.run(1, self.jobDir, {"service": "count", "data": 1}, lambda p: None)
        fitRun.cancel()
        self.assertEqual(self.successResultOf(fitRun.done)["status"], "CANCEL")
        self.reactor.advance(2.0)
        newProto, newProcess = self.reactor.spawned[-1][:2]
        event(newProto, event="ready", pid=newProcess.pid, preload=1.0, threads=1)
        self.assertEqual(newProcess.commands, [])

    def test_stopClosesTheCommandPipeAndKillsAfterTimeout(self):
        """stop closes the fork host's command pipe (it then ends its fits and exits), KILLs it if it
        has not ended after stopTimeout, and fires once it has ended."""
        backend, proto, process = self.startedServer(stopTimeout=10.0)
        stopped = backend.stop()
        self.assertEqual(process.closed, [3])
        self.reactor.advance(10.0)
        self.assertEqual(process.signals, ["KILL"])
        self.assertNoResult(stopped)
        proto.processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
        self.successResultOf(stopped)
        self.assertEqual(len(self.reactor.spawned), 1)
