"""The backend seam: where a leased job's fit runs.

The poller holds the leases; a backend runs the fits. It is given a job's
directory (its uploads already in it), its request and the slot's uid, and
gives back progress events and one outcome (``outcome``). It is a
`service.IService` child of the worker, so the service tree starts it before
the poller asks for work and stops it after the poller has drained.

``local`` (`local.LocalBackend`) forks each fit from a preloaded fork host on
this machine; its fits end with the worker. ``slurm`` (`slurm.SlurmBackend`)
submits each fit as a Slurm batch job that runs the same fork host on a
compute node; its fits outlive the worker, which adopts them again when it
restarts.
"""

from twisted.internet import threads
from zope.interface import Attribute, Interface


def reactorThreads(reactor):
    """``f(*args) -> Deferred``: ``f`` run in the reactor's thread pool, where
    the backends and the poller do what blocks on the disk."""
    return lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class IBackend(Interface):
    """Runs fits; limits and the sandbox mode are given when it is made."""

    def whenReady():
        """A Deferred that fires when fits can start, or fails when they never will."""

    def run(jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        """Start the fit of the job in ``jobDir``; an `IFitRun`.

        ``onProgress(dict)`` gets its progress (typed fields only, see
        ``jobfiles.cleanProgress``), ``onCheckpoint(path)`` the path of the
        session file relative to ``jobDir`` each time the fit saved it. Both
        are called in the reactor thread. ``uid``/``gid``: the slot's user.
        """

    def survivors():
        """The job ids whose fits survived the last stop of the worker (read when
        the backend starts): the poller adopts those it still holds."""

    def adopt(jobId, jobDir, request, onProgress, onCheckpoint=None, uid=None, gid=None):
        """The `IFitRun` of a survivor's fit, watched again as ``run`` would."""

    def forgetSurvivors():
        """Cancel and remove the survivors no held job adopted (once, after adopting)."""


class IFitRun(Interface):
    """One fit in a backend."""

    done = Attribute("A Deferred firing once with the fit's outcome record, "
                     "after everything the fit started is gone.")
    confinement = Attribute("What confines the fit, as the worker applied it "
                            "(empty until the fit is confined).")
    survives = Attribute("Whether the fit goes on when the worker stops (the next start adopts it).")

    def cancel(grace=5.0):
        """Stop the fit (TERM, KILL after ``grace`` seconds); it ends CANCEL."""

    def abort(why):
        """Stop the fit; it ends ERROR saying ``why``."""
