"""How a result was made, as the worker and its fit process know it
(docs/api.md, "Provenance").

Three parts make a result's provenance: the fit process's (``fitProvenance``:
the versions it imported, the options after bumps' defaults, the seed), the
worker's (``workerFacts``: its host, backend, confinement mode and limits,
sent with the outcome) and the server's (``reflservd.provenance``: the
inputs' sha256, the queue, the times and attempts, which it knows itself).

``serviceVersions`` is also what a worker reports with each lease long-poll:
the server's result cache (``reflservd.resultcache``) answers a job from an
earlier one only while every worker it hears from reports the versions that
earlier fit process saw. Only the standard library at import time.
"""

import importlib
import platform
import socket
import sys

from reflservd.names import VERSION

SERVICE_PACKAGES = ("refl1d", "bumps", "numpy", "scipy")
"""The packages whose versions decide a fit's numbers (with Python's and the machine's)."""


def serviceVersions(imported=False):
    """``{package: version, "python", "implementation", "machine",
    "reflservd"}`` (the runner's code decides how a fit is seeded). With ``imported``
    (in the fit process) each package's own ``__version__``, as the fit saw
    it; else the installed distribution's (the worker daemon does not import
    refl1d). The two agree for an ordinary install; where they do not, the
    cache does not answer (its versions never match)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in SERVICE_PACKAGES:
        try:
            if imported:
                versions[name] = str(importlib.import_module(name).__version__)
            else:
                versions[name] = version(name)
        except (ImportError, PackageNotFoundError, AttributeError):
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["implementation"] = sys.implementation.name
    versions["machine"] = platform.machine()
    versions["reflservd"] = VERSION
    return versions


def fitProvenance(fitterId, options, seed, parallel):
    """The fit process's part: its versions, the seed, and the options after
    bumps' defaults for the fitter (what ran, not only what was asked)."""
    from bumps.webview.server import fit_options

    fitter = fit_options.lookup_fitter(fitterId)
    effective = dict(fitter.settings)
    effective.update(options)
    effective.update(fit=fitterId, seed=seed, parallel=parallel)
    return {"versions": serviceVersions(imported=True), "seed": seed, "options": effective}


def workerFacts(config):
    """The worker's part, from its options (``reflworkerd.tap.Options``):
    sent with every outcome; the confinement a fit applied comes with it."""
    limits = config.get("limits") or {}
    return {
        "host": socket.gethostname(),
        "reflservd": VERSION,
        "backend": config.get("backend", "local"),
        "sandbox": config.get("sandbox-effective"),
        "limits": {name: value for name, value in sorted(limits.items()) if value is not None},
        "versions": serviceVersions(),
    }
