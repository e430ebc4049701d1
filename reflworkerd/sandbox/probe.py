"""The probe behind ``--sandbox auto``: what this host can confine a fit with,
tried once at worker start (``choose``)."""

import os
import tempfile

from twisted.logger import Logger

from reflworkerd.sandbox import FIT_PROFILE, confine
from reflworkerd.sandbox.syscalls import SandboxUnavailable

_log = Logger(namespace="reflworkerd.sandbox")
MODES = ("auto", "apparmor", "namespaces", "none")
APPLIED = MODES[1:]
"""The modes a fit is confined in: what ``choose`` returns for ``auto``."""


def checkApplied(mode):
    """``mode`` if it is one ``choose`` returns; ``SandboxUnavailable`` if not
    (``auto`` is chosen once, at the worker's start, never per fit)."""
    if mode not in APPLIED:
        raise SandboxUnavailable("the sandbox mode must be what choose() returned (%s), not %r"
                                 % (", ".join(APPLIED), mode))
    return mode


def _appArmorMissing():
    """Why this host cannot apply the fit profile, or ``None`` if it can."""
    if not os.path.isdir("/sys/module/apparmor"):
        return "kernel has no AppArmor"
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            if f.read().strip() != "Y":
                return "AppArmor is disabled in the kernel"
    except OSError as e:
        return "cannot read AppArmor state: %s" % (e,)
    try:
        with open("/sys/kernel/security/apparmor/profiles") as f:
            loaded = [line.split(" (")[0] for line in f]
    except OSError as e:
        return "cannot list AppArmor profiles: %s" % (e,)
    if FIT_PROFILE not in loaded:
        return ("profile %s is not loaded (apparmor_parser -r apparmor.d/%s)"
                % (FIT_PROFILE, FIT_PROFILE))
    return None


def _namespacesMissing():
    """
    Why this host cannot confine a fit in namespaces, or ``None`` if it can:
    a trial ``confine`` in a throw-away child, so that every step (unshare,
    /proc, pivot_root) is tried at worker start and not first on a user's job.
    """
    jobDir = tempfile.mkdtemp(prefix="reflworkerd-probe-")
    readEnd, writeEnd = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readEnd)
                confine(jobDir, "namespaces", {})
                os._exit(0)
            except BaseException as e:
                try:
                    os.write(writeEnd, ("%s: %s" % (type(e).__name__, e)).encode()[:4000])
                finally:
                    os._exit(1)
        os.close(writeEnd)
        writeEnd = None
        message = b""
        while True:
            chunk = os.read(readEnd, 4096)
            if not chunk:
                break
            message += chunk
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            return None
        return message.decode(errors="replace") or "probe ended with status %d" % (status,)
    finally:
        os.close(readEnd)
        if writeEnd is not None:
            os.close(writeEnd)
        os.rmdir(jobDir)


def choose(mode):
    """
    The effective sandbox mode for the worker's ``--sandbox`` option.

    ``auto`` is the strongest of ``apparmor``, ``namespaces`` and ``none``
    that this host can give, and is logged with the reason the stronger ones
    were passed over. An explicit mode the host cannot give raises
    ``SandboxUnavailable``: a worker asked for confinement must not run fits
    without it.
    """
    if mode not in MODES:
        raise SandboxUnavailable("unknown sandbox mode %r (one of %s)"
                                 % (mode, ", ".join(MODES)))
    if mode == "none":
        _log.warn("sandbox: none (fits run with resource limits only)")
        return "none"
    nsMissing = _namespacesMissing()
    if mode in ("apparmor", "auto"):
        aaMissing = _appArmorMissing() or (
            nsMissing and "namespaces unavailable: %s" % (nsMissing,))
        if aaMissing is None:
            _log.info("sandbox: apparmor ({profile} over namespaces)", profile=FIT_PROFILE)
            return "apparmor"
        if mode == "apparmor":
            raise SandboxUnavailable("--sandbox=apparmor: %s" % (aaMissing,))
    if nsMissing is None:
        if mode == "auto":
            _log.info("sandbox: namespaces (no apparmor: {reason})", reason=aaMissing)
        else:
            _log.info("sandbox: namespaces")
        return "namespaces"
    if mode == "namespaces":
        raise SandboxUnavailable("--sandbox=namespaces: %s" % (nsMissing,))
    _log.warn("sandbox: none (no apparmor: {aaReason}; no namespaces: {nsReason})",
              aaReason=aaMissing, nsReason=nsMissing)
    return "none"
