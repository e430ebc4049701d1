"""Confinement of a fit process.

The interface the fork server uses (see docs/api.md and DESIGN.md "Confinement"):

- ``choose(mode)`` at worker start: the effective mode for ``auto``,
  ``apparmor``, ``namespaces`` or ``none``; raises ``SandboxUnavailable`` when
  the host cannot give what was asked.
- ``confine(jobDir, mode, limits)`` in the forked child, before the model is
  read. It returns only in the process that will run the fit, with its working
  directory set to ``jobDir``, and returns the description of what confines it
  (recorded in the job record).

This first version applies resource limits and nice 19 only.
"""

import os
import resource


class SandboxUnavailable(Exception):
    """The host cannot provide the confinement that was asked for."""


MODES = ("auto", "apparmor", "namespaces", "none")


def choose(mode):
    if mode not in MODES:
        raise SandboxUnavailable("unknown sandbox mode %r (one of %s)" % (mode, ", ".join(MODES)))
    if mode in ("apparmor", "namespaces"):
        raise SandboxUnavailable("--sandbox=%s is not implemented yet" % (mode,))
    return "none"


def confine(jobDir, mode, limits):
    """Confine this (forked) process to run one fit in ``jobDir``."""
    os.chdir(jobDir)
    os.nice(19)
    for name, value in (limits or {}).items():
        rlimit = {"cpu": resource.RLIMIT_CPU, "memory": resource.RLIMIT_AS,
                  "fsize": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC,
                  "nofile": resource.RLIMIT_NOFILE}[name]
        resource.setrlimit(rlimit, (value, value))
    return "rlimits"
