"""What a job's request may ask of the runner, checked before anything of it runs.

``checkOptions`` holds refl1d's fit options to bumps' own table (names, the
fitter they apply to, types and ranges) and the runner options to
``reflservd.fitoptions`` with what only the fit's own process knows: its
CPUs (``fitCpus``), its process limit (``fitProcessLimit``) and the
worker's backend. ``modelPath`` checks the model the request names. Every
refusal is a `JobError` whose message says what is wrong.
"""

import math
import os
import resource

from reflservd.errors import Refused
from reflservd.fitoptions import RUNNER_OPTIONS, runnerOption, runnerOptions

class JobError(Exception):
    """The request cannot be run as given; the message says why (no traceback is useful)."""



def fitCpus():
    """The CPUs this process may run on (its affinity: what Slurm or taskset gave it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fitProcessLimit():
    """This process's RLIMIT_NPROC, or None where none holds (unlimited, or uid 0,
    which the kernel does not hold to it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY or os.getuid() == 0:
        return None
    return soft


def checkOptions(options, cpus=None, processLimit=None, backend=None):
    """Check refl1d fit options by bumps' own names and types; return them cleaned.

    Unknown names, options the chosen fitter does not use, values of the wrong
    type or out of range are refused with a `JobError` naming the problem
    (where the command line would warn and carry on, a queued job would
    silently run something else than asked). The runner options (``seed``,
    ``parallel``, ``mpi``, ``resume``) follow ``reflservd.fitoptions``,
    ``parallel`` and ``mpi`` bounded by ``cpus`` and ``processLimit`` (by
    default this process's: ``fitCpus()``, ``fitProcessLimit()``), ``mpi``
    refused unless the worker's ``backend`` runs it.
    """
    from bumps.fitters import FIT_AVAILABLE_IDS
    from bumps.webview.server import fit_options

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise JobError("options must be an object of refl1d fit options, not %s" % (type(options).__name__,))
    fitterId = options.get("fit", fit_options.DEFAULT_FITTER_ID)
    if fitterId not in FIT_AVAILABLE_IDS:
        raise JobError("unknown fitter fit=%r (one of %s)" % (fitterId, ", ".join(FIT_AVAILABLE_IDS)))
    fitter = fit_options.lookup_fitter(fitterId)
    usable = ["fit", "time"] + [name for name, _ in fitter.settings]
    cleaned = {"fit": fitterId}
    for name, value in options.items():
        if name == "fit":
            continue
        if name in RUNNER_OPTIONS:
            try:
                cleaned[name] = runnerOption(
                    name, value, cpus=fitCpus() if cpus is None else cpus,
                    processLimit=fitProcessLimit() if processLimit is None else processLimit,
                    backend=backend or "local")
            except Refused as refused:
                raise JobError(refused.message)
            continue
        if name not in fit_options.FIT_OPTIONS:
            raise JobError(
                "unknown fit option %r (refl1d's options for fit=%s: %s)"
                % (name, fitterId, ", ".join(sorted(usable[1:] + list(RUNNER_OPTIONS))))
            )
        if name not in usable:
            raise JobError(
                "fit option %r does not apply to fit=%s (its options: %s)"
                % (name, fitterId, ", ".join(sorted(usable[1:] + list(RUNNER_OPTIONS))))
            )
        cleaned[name] = _checkFitValue(name, value, fit_options.FIT_OPTIONS[name].stype, fit_options.Range)
    try:
        return runnerOptions(cleaned)
    except Refused as refused:
        raise JobError(refused.message)


def _checkFitValue(name, value, stype, Range):
    if isinstance(stype, list):
        if value not in stype:
            raise JobError("option %s=%r is not one of %s" % (name, value, ", ".join(stype)))
        return value
    if stype is bool:
        if not isinstance(value, bool):
            raise JobError("option %s must be true or false, not %r" % (name, value))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError("option %s must be a number, not %r" % (name, value))
    if not math.isfinite(value):
        raise JobError("option %s must be finite, not %r" % (name, value))
    if stype is int:
        if isinstance(value, float) and not value.is_integer():
            raise JobError("option %s must be an integer, not %r" % (name, value))
        value = int(value)
        if value < 0:
            raise JobError("option %s must not be negative (%d)" % (name, value))
        return value
    value = float(value)
    if isinstance(stype, Range) and not stype.min <= value <= stype.max:
        raise JobError("option %s=%g is outside [%g, %g]" % (name, value, stype.min, stype.max))
    if name == "time" and value < 0:
        raise JobError("option time (hours) must not be negative (%g)" % (value,))
    return value


def modelPath(jobDir, data):
    if not isinstance(data, dict):
        raise JobError('refl1d: data must be {"model": NAME, "options": {...}}, not %s' % (type(data).__name__,))
    unknown = sorted(set(data) - {"model", "options", "args"})
    if unknown:
        raise JobError("refl1d: unknown data field(s) %s (expected model, options, args)" % (", ".join(unknown),))
    model = data.get("model")
    if not isinstance(model, str) or not model or "/" in model or "\\" in model or model.startswith("."):
        raise JobError("refl1d: model must be the name of an uploaded .py or .json file, not %r" % (model,))
    if not model.endswith((".py", ".json")):
        raise JobError("refl1d: model %r must be a .py script or a .json serialized FitProblem" % (model,))
    path = os.path.join(jobDir, model)
    if not os.path.isfile(path):
        raise JobError("refl1d: model file %r was not uploaded" % (model,))
    return path
