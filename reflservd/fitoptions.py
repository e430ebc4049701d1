"""refl1d's fit options as the server offers them: the fitters, and the
options a fit request may carry with their types and the fitters they apply
to. The submit page builds its form from them and reads it back with
``fitOptions``; ``reflq submit`` takes the same options.

The rules of the options that are not bumps' fit options but refl1d
command-line ones (``seed``, ``parallel``, ``mpi``, ``resume``:
``RUNNER_OPTIONS``) are here too, in ``runnerOption`` and
``runnerOptions``: the form applies what it can know, the worker's runner
the whole rule with the CPUs, the process limit and the backend of the fit.
bumps' own options are checked by the runner against bumps itself. Only the
standard library and ``reflservd.errors``, so that ``reflworkerd`` may
import it.
"""

import math

from reflservd.errors import Refused

DEFAULT_FITTER = "amoeba"
FITTERS = (("", "refl1d's default (amoeba)"), ("lm", "Levenberg-Marquardt (lm)"),
           ("amoeba", "Nelder-Mead simplex (amoeba)"), ("dream", "DREAM, Bayesian uncertainty (dream)"),
           ("de", "differential evolution (de)"), ("newton", "quasi-Newton BFGS (newton)"),
           ("pt", "parallel tempering (pt)"))
OPTION_FIELDS = (
    # name, label, type, input attributes, the fitters it applies to ("" = all)
    ("steps", "Steps", int, {"min": "0"}, "amoeba de dream newton lm pt"),
    ("samples", "Samples", int, {"min": "1"}, "dream"),
    ("burn", "Burn-in steps", int, {"min": "0"}, "dream pt"),
    ("pop", "Population", float, {"step": "any"}, "de dream"),
    ("init", "Initializer", ("eps", "lhs", "cov", "random"), {}, "dream"),
    ("seed", "Seed", int, {"min": "1"}, ""),
    ("parallel", "Processes", int, {"min": "1"}, ""),
    ("mpi", "MPI ranks (Slurm workers)", int, {"min": "2"}, ""),
    ("time", "Time limit (hours)", float, {"min": "0", "step": "any"}, ""),
)
OPTION_NAMES = tuple(name for name, *_ in OPTION_FIELDS)

MAX_SEED = 2**32 - 1
MAX_MODEL_ARGS = 100
"""Arguments a refl1d model is given (``data.args``: its ``sys.argv[1:]``)."""
MAX_MODEL_ARG = 1000
"""Characters in one model argument."""
RUNNER_OPTIONS = ("seed", "parallel", "mpi", "resume")
"""Request options that are not bumps fit options but refl1d command-line ones."""

MAPPER_TASKS = 10
"""Processes and threads of a fit with ``parallel: N`` beyond ``2 * N``
(bumps' MPMapper: N pool processes, each also served by a thread of the
multiprocessing manager, plus the manager, the pool's threads and the fit's
own; 11 to 17 counted for N = 2 to 4)."""


MPI_BACKENDS = ("slurm",)
"""The worker backends that run a fit with ``mpi: N``."""
MPI_RANK_TASKS = 4
MPI_LAUNCHER_TASKS = 8
"""Processes and threads of a fit with ``mpi: N``: each rank with the threads
of Open MPI and PMIx (``MPI_RANK_TASKS``), and the confined fit with
``mpirun`` and its threads (``MPI_LAUNCHER_TASKS``); at most 13 of the slot's
uid were seen at once for N = 2 (``ps -eLo uid`` every 0.2 s), against 16
counted."""


def parallelTasks(parallel):
    """The processes and threads a fit with ``parallel`` processes counts against RLIMIT_NPROC."""
    return 1 if parallel == 1 else 2 * parallel + MAPPER_TASKS


def mpiTasks(ranks):
    """The processes and threads a fit with ``mpi: ranks`` counts against RLIMIT_NPROC."""
    return MPI_RANK_TASKS * ranks + MPI_LAUNCHER_TASKS


def runnerOption(name, value, cpus=None, processLimit=None, backend=None):
    """The value of the runner option ``name`` (one of ``RUNNER_OPTIONS``), checked;
    ``Refused`` saying why it is not valid.

    ``parallel`` is the number of processes evaluating the model (bumps'
    process mapper for 2 or more, in the fit's own confinement; 1 evaluates
    in the fit process). refl1d's ``--parallel=0`` (every CPU) is refused: a
    worker's CPUs are shared by its slots and its other work. ``cpus`` is
    the number of CPUs the fit may run on and ``processLimit`` its
    RLIMIT_NPROC; each bounds ``parallel`` where it is given (the worker
    knows them, the server does not).

    ``mpi`` is the number of MPI ranks (2 or more: rank 0 drives the fit,
    the others evaluate the model with bumps' MPI mapper), bounded the same
    way; only the backends of ``MPI_BACKENDS`` run it, so a worker with
    another ``backend`` refuses it (the server, which does not know the
    backend, passes None).
    """
    if name == "resume":
        if not isinstance(value, bool):
            raise Refused("option resume must be true or false, not %r" % (value,))
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused("option %s must be an integer, not %r" % (name, value))
    if name == "seed":
        if not 1 <= value <= MAX_SEED:
            raise Refused("option seed must be in 1..%d, not %d" % (MAX_SEED, value))
        return value
    if name == "mpi":
        return _mpiRanks(value, cpus, processLimit, backend)
    if value < 1:
        raise Refused("option parallel must be a number of processes, 1 or more, not %d (refl1d's 0, "
                      "every CPU, is not offered: a worker's CPUs are shared)" % (value,))
    if cpus is not None and value > cpus:
        raise Refused("option parallel=%d is more than the %d CPUs this worker gives a fit" % (value, cpus))
    if processLimit is not None and parallelTasks(value) > processLimit:
        most = max(1, (processLimit - MAPPER_TASKS) // 2)
        raise Refused("option parallel=%d needs about %d processes and threads, past this worker's process "
                      "limit of %d (parallel=%d at most)" % (value, parallelTasks(value), processLimit, most))
    return value


def modelArgs(args):
    """A model's arguments (``data.args``, what ``refl1d MODEL ARG...`` gives the
    script as ``sys.argv[1:]``), checked: a list of at most ``MAX_MODEL_ARGS``
    non-empty strings of at most ``MAX_MODEL_ARG`` characters, without NUL
    (no argv holds one) and encodable; ``Refused`` saying which rule broke.
    The door checks them (``limits.checkModelArgs``), and the runner again."""
    if args is None:
        return []
    if not isinstance(args, list) or len(args) > MAX_MODEL_ARGS:
        raise Refused("the model's args must be a list of at most %d strings" % (MAX_MODEL_ARGS,))
    for arg in args:
        if not isinstance(arg, str) or not arg or len(arg) > MAX_MODEL_ARG or "\0" in arg:
            raise Refused("a model argument must be a non-empty string of at most %d characters "
                          "without NUL, not %r" % (MAX_MODEL_ARG, arg if not isinstance(arg, str) else arg[:50]))
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("a model argument holds text that is not valid Unicode (a lone surrogate)") from None
    return list(args)


def _mpiRanks(ranks, cpus, processLimit, backend):
    if ranks < 2:
        raise Refused("option mpi must be a number of MPI ranks, 2 or more, not %d (leave it out for a fit in "
                      "one process)" % (ranks,))
    if backend is not None and backend not in MPI_BACKENDS:
        raise Refused("option mpi runs a fit under MPI on a worker with the slurm backend (--backend slurm); "
                      "this worker's backend is %s: use parallel for processes on one machine" % (backend,))
    if cpus is not None and ranks > cpus:
        raise Refused("option mpi=%d is more than the %d CPUs this fit was given" % (ranks, cpus))
    if processLimit is not None and mpiTasks(ranks) > processLimit:
        most = (processLimit - MPI_LAUNCHER_TASKS) // MPI_RANK_TASKS
        raise Refused("option mpi=%d needs about %d processes and threads, past this worker's process limit "
                      "of %d (mpi=%d at most)" % (ranks, mpiTasks(ranks), processLimit, most))
    return ranks


def runnerOptions(options):
    """Check what the runner options of ``options`` (already each checked) ask
    together: ``mpi`` and ``parallel`` above 1 are two ways of spreading the
    evaluations, one at a time. ``Refused`` where both are asked."""
    if options.get("mpi") and options.get("parallel", 1) > 1:
        raise Refused("options mpi=%d and parallel=%d cannot be combined: ask for one of them"
                      % (options["mpi"], options["parallel"]))
    return options


MOST_CPUS_ASKED = 1024
"""A job asking for more CPUs than this is given 1 (and its runner says why it is refused)."""


def requestedCpus(request):
    """The CPUs a fit ``request`` asks for by its ``parallel`` or ``mpi`` option
    (1 where it asks for neither, or for something the runner will refuse)."""
    data = request.get("data") if isinstance(request, dict) else None
    options = data.get("options") if isinstance(data, dict) else None
    if not isinstance(options, dict):
        return 1
    cpus = 1
    for name in ("parallel", "mpi"):
        if name in options:
            try:
                asked = runnerOption(name, options[name])
            except Refused:
                continue
            if asked < MOST_CPUS_ASKED:
                cpus = max(cpus, asked)
    return cpus


def fitOptions(values):
    """The fit options of a form's text ``values`` (``{name: text}``): the
    fitter, and each option that is filled in and applies to that fitter,
    as its type; ``Refused`` naming the first that is not valid."""
    options = {}
    if values.get("fit"):
        if values["fit"] not in [value for value, _ in FITTERS if value]:
            raise Refused("unknown fitter %r" % (values["fit"],))
        options["fit"] = values["fit"]
    fitter = values.get("fit") or DEFAULT_FITTER
    for name, label, kind, _, fitters in OPTION_FIELDS:
        text = values.get(name, "")
        if not text or (fitters and fitter not in fitters.split()):
            continue
        if isinstance(kind, tuple):
            if text not in kind:
                raise Refused("%s must be one of %s" % (label, ", ".join(kind)))
            options[name] = text
            continue
        try:
            options[name] = kind(text)
        except ValueError:
            raise Refused("%s must be %s, not %r"
                          % (label, "a whole number" if kind is int else "a number", text))
        if kind is float and not math.isfinite(options[name]):
            raise Refused("%s must be a finite number" % (label,))
        if name in RUNNER_OPTIONS:
            options[name] = runnerOption(name, options[name])
    return runnerOptions(options)
