"""What every fit needs, imported once in the fork host so that each fork
inherits it: numpy, matplotlib (Agg), bumps and refl1d, multiprocessing's pool
and manager (bumps' process mapper), and (``warm``) numba's compiled kernels."""

import os


_preloaded = False


def preload(warm=False):
    """Import what fits need, once, and (``warm``) compile numba's kernels.

    Run in the fork server so that every fork inherits it all: numpy, matplotlib
    with the Agg backend, bumps and refl1d with refl1d's plugin installed the
    way the ``refl1d`` command installs it. ``warm`` runs a tiny refl1d DREAM fit
    in memory and saves its profiles to a scratch directory, so that the
    numba-compiled reflectivity, profile and DREAM kernels and the numba
    seeding function are compiled before the first fork (a confined child may
    not be able to read or write numba's on-disk cache). It draws no text:
    FreeType fonts opened here would be shared, broken, by every fork.
    """
    global _preloaded
    if not _preloaded:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        # pyplot.savefig draws the whole figure again after saving it (for an
        # interactive window). A batch export shows nothing: that second draw
        # was a fifth of an LM job's time. The saved files are the same.
        FigureCanvasAgg.draw_idle = _noDraw
        import numpy  # noqa: F401
        import h5py  # noqa: F401
        import multiprocessing.managers  # noqa: F401 (bumps' process mapper, for parallel: N)
        import multiprocessing.pool  # noqa: F401
        import multiprocessing.synchronize  # noqa: F401
        import refl1d
        from refl1d.webview.server import cli as refl1dCli  # installs refl1d's model loader
        from bumps.webview.server import api

        api.state.app_name = "refl1d"
        api.state.app_version = refl1d.__version__
        api.state.client_path = refl1dCli.CLIENT_PATH
        _preloaded = True
    if warm:
        _warm()


def _noDraw(canvas, *args, **kwargs):
    """``FigureCanvasAgg.draw_idle`` in a fit: nothing is shown, so nothing to redraw."""


def _warm():
    import contextlib
    import io
    import shutil
    import tempfile

    import numpy as np
    from bumps.fitters import fit
    from bumps import errplot
    from refl1d.names import Experiment, FitProblem, Material, NeutronProbe, air, silicon

    state = np.random.get_state()
    try:
        T = np.linspace(0.2, 2.0, 20)
        probe = NeutronProbe(T=T, dT=0.01, L=4.75, dL=0.0475, data=(np.ones_like(T) * 0.5, np.ones_like(T) * 0.05))
        sample = silicon(0, 5) | Material("Ni")(100, 5) | air
        sample[1].thickness.range(50, 150)
        sample[1].interface.range(0, 10)
        problem = FitProblem(Experiment(probe=probe, sample=sample))
        scratch = tempfile.mkdtemp(prefix="reflworkerd-warm-")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sampled = fit(problem, method="dream", samples=200, burn=1, pop=4, steps=0)
                problem.save(os.path.join(scratch, "warm"))
                errplot.calc_errors(problem, errplot.error_points_from_state(state=sampled.state))
                fit(problem, method="lm", steps=2)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        from reflworkerd.runner import seedAll

        seedAll(1)
    finally:
        np.random.set_state(state)
