"""The fit itself: what runs inside the forked, confined child of the fork server.

``runJob(jobDir, request, progress)`` runs one job's service and returns its
result summary; ``outcomeOf`` wraps it into the outcome record the parent reads
(``{"status", "result", "error", "trace"}``, and ``"limit": "memory"|"fsize"``
when the error is a MemoryError or a file too large), turning exceptions into an
``ERROR`` with the model's own traceback; ``outcome.write``/``outcome.read`` move
that record through ``jobDir/.outcome.json`` (written by the child when it ends,
read by the worker when the child's process group is gone).

The ``refl1d`` service is the batch path of ``refl1d --batch MODEL [ARG…] --fit=…
--export=results --session=results/session.h5`` (``bumps.webview.server.cli.main``
with ``mode="batch"``, after refl1d's plugin is installed; ``data.args`` are the
model's ``sys.argv[1:]``), run in this process,
so the files in ``results/`` are the ones the command line writes. On top of it:
options checked before anything runs, a recorded seed that also seeds numba's
own random state in the fit thread (DREAM draws from it), progress from bumps'
fit events, and the fit thread's exception surfaced as the job's error.
``parallel: N`` (N >= 2) is refl1d's ``--parallel=N``: bumps' process mapper
(``bumps.mapper.MPMapper``: a multiprocessing pool of N forked processes and a
manager process) evaluates the model, inside the fit's own confinement and
limits; N is bounded by the fit's CPUs and process limit, and a model bumps
cannot copy to those processes is refused rather than quietly run in one.
``mpi: N`` (on the backends that offer it) runs the fit over N MPI ranks
started inside the same confinement (``mpifit``): rank 0 runs this same
function with bumps' ``MPIMapper``.

This module imports nothing heavy at import time: the fork server preloads
bumps and refl1d (``preload``) so that each forked child finds them in memory.
"""

import errno
import os
import secrets
import sys
import tempfile
import time
import traceback

from reflservd.errors import Refused
from reflservd.fitoptions import MAX_SEED, RUNNER_OPTIONS, modelArgs  # noqa: F401 (RUNNER_OPTIONS: the runner's too)
from reflworkerd import mpifit, outcome
from reflworkerd.requestcheck import JobError, checkOptions, fitCpus, fitProcessLimit, modelPath  # noqa: F401
from reflworkerd.preload import preload
from reflworkerd.provenance import fitProvenance
from reflworkerd.shared import RESULTS_DIR, RESUMABLE_FITTERS, SESSION_NAME, STDERR_NAME


PROGRESS_INTERVAL = 1.0
"""Seconds between progress reports from bumps' fit monitor (the worker rate-limits further)."""

SOCKET_PATH_MAX = 107
"""The longest AF_UNIX socket path (sun_path less its NUL): multiprocessing's
manager listens at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX."""
MANAGER_SOCKET_SUFFIX = len("/pymp-12345678/listener-12345678")


class _FitThreadError(Exception):
    """The fit thread raised: ``exc`` is the original exception, with its traceback."""

    def __init__(self, exc):
        Exception.__init__(self, str(exc))
        self.exc = exc


def runCount(jobDir, data, progress, **kw):
    """The old jobqueue test service: count to ``int(data)`` and return the count."""
    try:
        target = int(data)
    except (TypeError, ValueError):
        raise JobError("count: data must be an integer, not %r" % (data,))
    if target < 0:
        raise JobError("count: data must not be negative (%d)" % (target,))
    count = 0
    for _ in range(target):
        count += 1
    progress({"step": count, "chisq": None, "parameters": {}, "elapsed": 0.0})
    return count


def drawSeed():
    """A fresh seed for a job that did not ask for one (recorded in its result)."""
    return 1 + secrets.randbelow(MAX_SEED)


def _seedNumbaSource():
    """numba's random state is its own (and per thread): DREAM's steps draw from it."""
    import numba
    import numpy as np

    @numba.njit
    def seedNumba(seed):
        np.random.seed(seed)

    return seedNumba


_seedNumba = None


def seedAll(seed):
    """Seed numpy's global generator and numba's generator of the calling thread."""
    import numpy as np

    global _seedNumba
    if _seedNumba is None:
        _seedNumba = _seedNumbaSource()
    np.random.seed(seed)
    _seedNumba(seed)


class _FitEvents:
    """Receives bumps' fit-thread events; turns them into job progress; keeps the fit's error.

    bumps announces progress and completion through blinker signals
    (``fit_thread.EVT_FIT_PROGRESS``/``EVT_FIT_COMPLETE``) sent from the fit thread;
    the completion signal of a failed fit is sent while its exception is being
    handled, so ``sys.exc_info()`` still holds the exception with its traceback.
    """

    def __init__(self, progress, started):
        self.progress = progress
        self.started = started
        self.labels = None
        self.problem = None
        self.lastStep = 0
        self.error = None
        self.complete = None

    def onProgress(self, event):
        message = event.get("message")
        if message not in ("progress", "improvement"):
            return
        self.lastStep = max(self.lastStep, int(event.get("step", 0)))
        self._report(event["step"], event["value"], event["point"])

    def onComplete(self, event):
        if event.get("message") == "error":
            exc = sys.exc_info()[1]
            self.error = exc if exc is not None else RuntimeError(event.get("error_string", "fit failed"))
            self.errorTrace = event.get("traceback")
            return
        self.complete = event

    def _report(self, step, nllf, point):
        try:
            chisq = float(self.problem.chisq(nllf=nllf)) if self.problem is not None else None
        except Exception:
            chisq = None
        labels = self.labels or []
        self.progress(
            {
                "step": int(step),
                "chisq": chisq,
                "parameters": {label: float(v) for label, v in zip(labels, point)},
                "elapsed": time.monotonic() - self.started,
            }
        )


def runRefl1d(jobDir, data, progress, checkpointEvery=300, checkpoint=None, backend=None, rank=None):
    """Run ``refl1d --batch`` on the job's model, in this process; return the result summary.

    bumps saves the session file (``results/session.h5``, written to a
    temporary name and renamed) when the fit starts, every ``checkpointEvery``
    seconds while it runs, and at the end; ``checkpoint(relativePath)`` is
    called after each save during the fit, so that the worker can ship it
    and a retry can resume from it (option ``resume``). ``backend`` is the
    worker's; ``rank`` is 0 in rank 0 of a fit with ``mpi``.
    """
    path = modelPath(jobDir, data)
    try:
        args = modelArgs(data.get("args"))
    except Refused as refused:
        raise JobError("refl1d: " + refused.message)
    options = checkOptions(data.get("options"), backend=backend)
    mpi = options.pop("mpi", None)
    if mpi and rank is None:
        return mpifit.runRanks(jobDir, {"service": "refl1d", "data": data}, mpi, progress, checkpoint,
                               checkpointEvery, backend)
    seed = options.pop("seed", None) or drawSeed()
    parallel = options.pop("parallel", 1)
    resume = options.pop("resume", False)
    fitterId = options["fit"]

    resultsDir = os.path.join(jobDir, RESULTS_DIR)
    sessionPath = os.path.join(resultsDir, SESSION_NAME)
    if resume and not os.path.exists(sessionPath):
        raise JobError("resume: there is no session file %s/%s to resume from" % (RESULTS_DIR, SESSION_NAME))
    os.makedirs(resultsDir, exist_ok=True)

    if parallel > 1:
        _checkMapperSocket(tempfile.gettempdir(), parallel)
    preload()
    from bumps.webview.server import api, cli, fit_thread

    started = time.monotonic()
    events = _FitEvents(progress, started)
    fit_thread.PROGRESS_DELAY = PROGRESS_INTERVAL
    fit_thread.IMPROVEMENT_DELAY = PROGRESS_INTERVAL
    fit_thread.EVT_FIT_PROGRESS.connect(events.onProgress, weak=False)
    fit_thread.EVT_FIT_COMPLETE.connect(events.onComplete, weak=False)

    class SeededFitThread(fit_thread.FitThread):
        """bumps' fit thread, with numba's per-thread random state seeded as numpy's was."""

        def run(self):
            seedAll(seed)
            events.problem = self.problem
            events.labels = self.problem.labels()
            try:
                if parallel > 1:
                    _checkPicklable(self.problem, parallel)
                fit_thread.FitThread.run(self)
            except BaseException as exc:
                # bumps catches Exception only: a model's SystemExit would end the
                # thread without the completion event the batch loop waits for.
                fit_thread.EVT_FIT_COMPLETE.send(
                    {"message": "error", "error_string": str(exc), "traceback": traceback.format_exc()}
                )

    api.FitThread = SeededFitThread

    saveSession = api.state.save

    resumable = fitterId in RESUMABLE_FITTERS

    finalSaved = []

    def saveAndTell():
        if events.complete is None and not resumable:
            return  # a session saved mid-fit serves only to resume, which this fitter cannot
        if finalSaved:
            return  # bumps saves the finished state again as it shuts down: the same state
        saveSession()
        if events.complete is not None:
            finalSaved.append(True)
        if checkpoint is not None and events.complete is None and os.path.exists(sessionPath):
            checkpoint(os.path.join(RESULTS_DIR, SESSION_NAME))

    api.state.save = saveAndTell

    batch = cli.BumpsOptions(
        filename=path,
        args=args,
        fit_options=dict(options),
        session=sessionPath,
        export=resultsDir,
        seed=seed,
        parallel=parallel,
        mpi=bool(mpi),
        checkpoint=checkpointEvery,
        resume=resume,
        mode="batch",
    )
    seedAll(seed)
    cli.main(batch)

    if isinstance(events.error, JobError):
        raise events.error
    if events.error is not None:
        raise _FitThreadError(events.error)
    if events.complete is None:
        raise JobError("the fit ended without a result (see %s/%s)" % (RESULTS_DIR, STDERR_NAME))
    summary = _summary(api.state, fitterId, seed, events, started)
    summary["parallel"] = parallel
    summary["provenance"] = fitProvenance(fitterId, options, seed, parallel)
    progress(
        {
            "step": summary["steps"],
            "chisq": summary["chisq"],
            "parameters": {label: p["value"] for label, p in summary["parameters"].items()},
            "elapsed": summary["elapsed"],
        }
    )
    return summary


def _checkMapperSocket(tmp, parallel):
    """bumps' process mapper needs a multiprocessing manager, which listens on a
    socket in ``tmp`` (the job directory under ``--sandbox none``)."""
    if len(tmp) + MANAGER_SOCKET_SUFFIX > SOCKET_PATH_MAX:
        raise JobError(
            "option parallel=%d cannot run here: bumps' process mapper needs a socket in %s, whose path is "
            "too long (%d characters; at most %d) - the worker's --work-dir must be shorter"
            % (parallel, tmp, len(tmp), SOCKET_PATH_MAX - MANAGER_SOCKET_SUFFIX))


def _checkPicklable(problem, parallel):
    """bumps copies the model to its mapper's processes with cloudpickle, and
    quietly evaluates it in one process where it cannot: say so instead."""
    from cloudpickle import dumps

    try:
        dumps(problem)
    except Exception as exc:
        raise JobError("option parallel=%d: the model cannot be copied to other processes (cloudpickle: %s: %s); "
                       "run it with parallel 1" % (parallel, type(exc).__name__, exc))


def _summary(state, fitterId, seed, events, started):
    import numpy as np

    problem = state.problem.fitProblem
    x = np.array(problem.getp())
    labels = problem.labels()
    chisq = float(problem.chisq())
    uncertainties = [None] * len(labels)
    fitState = state.fitting.fit_state
    if fitState is not None and hasattr(fitState, "draw"):
        from bumps.dream.stats import var_stats

        uncertainties = [float(v.std) for v in var_stats(fitState.draw())]
    else:
        try:
            from bumps.lsqerror import stderr

            uncertainties = [float(u) if np.isfinite(u) else None for u in stderr(problem.cov(x))]
        except Exception:
            pass
        finally:
            problem.setp(x)
    convergence = state.fitting.convergence
    steps = max(events.lastStep, len(convergence) if convergence is not None else 0)
    return {
        "fitter": fitterId,
        "steps": int(steps),
        "chisq": chisq,
        "seed": seed,
        "elapsed": time.monotonic() - started,
        "parameters": {
            label: {"value": float(value), "uncertainty": u} for label, value, u in zip(labels, x, uncertainties)
        },
    }


SERVICES = {"refl1d": runRefl1d, "count": runCount}
"""The services a worker offers, by the name a job asks for."""


def runJob(jobDir, request, progress, checkpointEvery=300, checkpoint=None, **host):
    """Run the service a job asks for in ``jobDir``; return its result summary.

    ``request`` is ``{"service": NAME, "data": ...}``; ``progress(dict)`` is
    called with ``{"step", "chisq", "parameters", "elapsed"}`` as the fit goes,
    ``checkpoint(path)`` (path relative to ``jobDir``) after each checkpoint of
    the session file. ``host`` says where it runs (``backend``, ``rank``).
    """
    if not isinstance(request, dict):
        raise JobError("the request must be an object with service and data")
    service = request.get("service")
    if service not in SERVICES:
        raise JobError("unknown service %r: this worker offers %s" % (service, ", ".join(sorted(SERVICES))))
    return SERVICES[service](jobDir, request.get("data"), progress, checkpointEvery=checkpointEvery,
                             checkpoint=checkpoint, **host)


def outcomeOf(jobDir, request, progress, checkpointEvery=300, checkpoint=None, **host):
    """Run the job and return its outcome record; never raises for the job's own failures."""
    try:
        result = runJob(jobDir, request, progress, checkpointEvery=checkpointEvery, checkpoint=checkpoint, **host)
    except mpifit.RanksFailed as failed:
        return failed.outcome
    except JobError as exc:
        return outcome.error(str(exc))
    except _FitThreadError as exc:
        return errorOutcome(exc.exc, jobDir)
    except (Exception, SystemExit) as exc:
        return errorOutcome(exc, jobDir)
    return outcome.completed(result)


_PLUMBING = (
    os.sep + "reflworkerd" + os.sep,
    os.sep + "asyncio" + os.sep,
    os.sep + "threading.py",
    os.sep + os.path.join("bumps", "webview", "server") + os.sep,
)


def errorOutcome(exc, jobDir):
    message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    record = outcome.error(message, modelTraceback(exc, jobDir))
    if isinstance(exc, MemoryError):
        record["limit"] = "memory"
    elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        record["limit"] = "fsize"
    return record


def modelTraceback(exc, jobDir):
    """The traceback of ``exc`` as the model's author needs it.

    Frames before the first one in the job's own files (the worker, asyncio,
    bumps' batch plumbing) are dropped; where no frame is in the job directory
    (the model made refl1d or bumps fail), only the plumbing frames are dropped.
    Paths in the job directory are shown relative to it.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    prefix = os.path.realpath(jobDir) + os.sep
    inJob = [
        i for i, f in enumerate(frames) if not f.filename.startswith("<") and os.path.realpath(f.filename).startswith(prefix)
    ]
    if inJob:
        kept = frames[inJob[0]:]
    else:
        kept = [f for f in frames if not any(p in f.filename for p in _PLUMBING)]
    for frame in kept:
        real = os.path.realpath(frame.filename)
        if not frame.filename.startswith("<") and real.startswith(prefix):
            frame.filename = real[len(prefix):]
    lines = ["Traceback (most recent call last):\n"]
    lines.extend(traceback.StackSummary.from_list(kept).format())
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)
