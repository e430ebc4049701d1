"""Who may do what: worker tokens per queue, job keys, admin and submit
tokens, the submitter's identity, and the same-origin and Host rules.

Secrets are read from files that only their owner may read, and kept as
SHA-256 digests, compared in constant time. A job's key is made at submit,
answered once, and kept by the queue as its digest.
"""

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import urllib.parse

from reflservd.errors import Forbidden, Unauthenticated, WrongHost

JOB_KEY_HEADER = b"x-job-key"
KEY_COOKIE = "reflservd-key-%d"
"""The cookie that holds a job's key in the browser that submitted it from the page."""
ANY_QUEUE = "*"
NON_SIMPLE_HEADERS = (b"x-requested-with", JOB_KEY_HEADER, b"authorization")
"""A browser sends none of these to another site without asking it first
(CORS preflight, which this server never grants): a request with one of them
was not forged by a page elsewhere."""


def digest(secret):
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def newJobKey():
    """``(key, digest)`` of a new job key."""
    key = secrets.token_urlsafe(24)
    return key, digest(key)


class TokenFileError(Exception):
    """A token file that cannot be used, and why."""


def readTokenFile(path, what, named=True):
    """``{digest: name}`` of the tokens in ``path``: lines ``NAME TOKEN``
    (``#`` comments and blank lines skipped); a line with one field is a
    token named ``*``. Refused when group or others may read the file, or
    when it holds no token."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TokenFileError("cannot read %s %s: %s" % (what, path, e.strerror)) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError("%s %s may be read by others (mode %03o): chmod 600 it"
                                 % (what, path, stat.S_IMODE(mode)))
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise TokenFileError("%s %s is not UTF-8 text" % (what, path)) from None
    tokens = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 1:
            name, token = ANY_QUEUE, fields[0]
        elif len(fields) == 2 and named:
            name, token = fields
        else:
            raise TokenFileError("%s %s line %d: expected %s" % (
                what, path, number, "NAME TOKEN" if named else "one token"))
        tokens[digest(token)] = name
    if not tokens:
        raise TokenFileError("%s %s holds no token" % (what, path))
    return tokens


def isLoopbackListen(description):
    """Whether a Twisted endpoint string listens on loopback (or a UNIX socket) only."""
    from twisted.internet.endpoints import _parse

    # Read as Twisted reads it: escapes undone, and of a repeated keyword the
    # last, which is the one it binds.
    args, kwargs = _parse(description)
    kind = str(args[0]).lower() if args else ""
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    value = str(kwargs.get("interface", "")).strip("[]")
    if value == "localhost":
        return True
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def _bearer(request):
    raw = request.getHeader(b"authorization") or b""
    scheme, _, value = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not value:
        return None
    return value.strip().decode("latin-1")


def _lookup(tokens, secret):
    """The name of ``secret`` in ``{digest: name}``, in constant time per entry."""
    if not tokens or secret is None:
        return None
    given = digest(secret)
    found = None
    for known, name in tokens.items():
        if hmac.compare_digest(known, given):
            found = name
    return found


class Access:
    """The rules of one site; the web layer asks it about each request.

    @param workerTokens: ``{digest: queue}``, or None for open worker routes.
    @param adminTokens: ``{digest: name}`` of admin tokens, or None.
    @param submitTokens: ``{digest: identity}``, or None for open submission.
    @param trustedProxies: addresses whose ``X-Forwarded-For`` is believed.
    @param publicHosts: the Host names (without port) accepted, or None for any.
    """

    def __init__(self, workerTokens=None, adminTokens=None, submitTokens=None,
                 trustedProxies=(), publicHosts=None):
        self.workerTokens = workerTokens
        self.adminTokens = adminTokens
        self.submitTokens = submitTokens
        self.trustedProxies = frozenset(trustedProxies)
        self.publicHosts = None if publicHosts is None else frozenset(
            h.lower() for h in publicHosts)

    # ---- who is asking

    def address(self, request):
        """The client's address: the peer's, or behind a trusted proxy the
        last address it forwarded."""
        peer = request.getClientAddress()
        host = getattr(peer, "host", None) or "local"
        if host in self.trustedProxies:
            forwarded = (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
            hops = [h.strip() for h in forwarded.split(",") if h.strip()]
            if hops:
                return hops[-1][:100]
        return host

    def submitter(self, request):
        """Who submits: the submit token's identity in token mode (``Forbidden``
        without one), else the client's address."""
        if self.submitTokens is None:
            return self.address(request)
        identity = _lookup(self.submitTokens, _bearer(request))
        if identity is None:
            raise Forbidden("this site takes submissions with a submit token only "
                            "('Authorization: Bearer TOKEN')")
        return "token:" + identity

    def isAdmin(self, request):
        return _lookup(self.adminTokens, _bearer(request)) is not None

    def addWorkerToken(self, token, queueName):
        """A worker token for ``queueName`` only, made by this process (batch mode's worker)."""
        self.workerTokens[digest(token)] = queueName

    def checkWorker(self, request, queueName):
        """``Forbidden`` unless the request may act as a worker of ``queueName``."""
        if self.workerTokens is None:
            return
        name = _lookup(self.workerTokens, _bearer(request))
        if name is None:
            raise Unauthenticated("worker routes need 'Authorization: Bearer TOKEN' with a "
                                  "worker token of this site")
        if name != ANY_QUEUE and name != queueName:
            raise Forbidden("this worker token serves queue %r, not %r" % (name, queueName))

    def jobKey(self, request, jobId):
        """The job key the request presents: its header, or the cookie the
        page's submit set in this browser."""
        raw = request.getHeader(JOB_KEY_HEADER)
        if raw:
            return raw.decode("latin-1").strip()
        cookie = request.getCookie((KEY_COOKIE % (jobId,)).encode())
        return cookie.decode("latin-1") if cookie else None

    def holdsKey(self, request, job):
        """Whether the request presents ``job``'s key."""
        key = self.jobKey(request, job.id)
        return key is not None and job.keyHash is not None and hmac.compare_digest(
            digest(key), job.keyHash)

    def mayControl(self, request, job, byAddress=False):
        """Whether the request may cancel or delete ``job``: its key, an admin
        token, or its submitting address where the job has no key (submitted
        before keys) or ``byAddress`` (the old client, which keeps no key)."""
        if self.holdsKey(request, job) or self.isAdmin(request):
            return True
        return (byAddress or job.keyHash is None) and job.origin == self.address(request)

    def checkControl(self, request, job, what):
        if not self.mayControl(request, job):
            raise Forbidden("%s job %d needs its key (the %r header the submit answered) "
                            "or an admin token" % (what, job.id, JOB_KEY_HEADER.decode()))

    def maySeeNotify(self, request, job):
        return self.holdsKey(request, job) or self.isAdmin(request)

    # ---- where it comes from

    def checkHost(self, request):
        """``WrongHost`` when the Host header is not one this site answers to
        (a DNS rebinding page reaches a server under a name of its own)."""
        if self.publicHosts is None:
            return
        host = _hostName(request.getHeader(b"host"))
        if host not in self.publicHosts:
            raise WrongHost("this server answers to %s, not %r"
                            % (", ".join(sorted(self.publicHosts)), host))

    def checkSameOrigin(self, request, simpleAllowed=False, bodiless=False):
        """A state-changing request must come from this site's own pages
        (``Origin`` or ``Sec-Fetch-Site``) or be one that a page elsewhere
        cannot send without asking (a JSON body, or an ``Authorization`` or
        job key header). ``simpleAllowed`` takes a request that carries no
        browser's marks at all (the old worker's ``postjob``, which is held
        to its lease holder's address). ``bodiless`` takes a request with no
        body and no content type, which no form sends (a worker's lease)."""
        site = (request.getHeader(b"sec-fetch-site") or b"").lower()
        origin = request.getHeader(b"origin")
        if site in (b"cross-site", b"same-site"):
            raise Forbidden("a page of another site (Sec-Fetch-Site: %s) cannot change this "
                            "server's jobs" % (site.decode("latin-1"),))
        if origin is not None and origin != b"null":
            netloc = urllib.parse.urlsplit(origin.decode("latin-1")).netloc.lower()
            if netloc != (request.getHeader(b"host") or b"").decode("latin-1").lower():
                raise Forbidden("a page of another site (%s) cannot change this server's jobs"
                                % (origin.decode("latin-1")[:200],))
            return
        if origin == b"null":
            raise Forbidden("a page of no origin cannot change this server's jobs")
        if site in (b"same-origin", b"none"):
            return
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if bodiless and not ctype and not request.content.read(1):
            request.content.seek(0)
            return
        if (ctype == b"application/json" or simpleAllowed
                or request.method not in (b"POST", b"GET", b"HEAD")
                or any(request.getHeader(h) for h in NON_SIMPLE_HEADERS)):
            return
        raise Forbidden("send this as JSON, with an 'X-Requested-With' header, or from this "
                        "site's pages: a plain form from anywhere is refused (a page of "
                        "another site could send it: cross-site request forgery)")


def _hostName(raw):
    text = (raw or b"").decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text

