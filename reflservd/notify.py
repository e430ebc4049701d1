"""Notification mails: a short mail when a job starts and when it ends.

A job whose ``notify`` is an e-mail address gets one mail when it first
becomes ACTIVE and one when it ends (COMPLETE, ERROR or CANCEL), each with a
link to the job's page. The members of a fit series are not mailed one by
one: the series' owner gets one mail once every member has ended
(`Notifier.seriesChanged`), with each member's status and χ² and a link to
the series' page. The queue server calls `Notifier.jobChanged` on every
status event; sending happens in the background through
``twisted.mail.smtp.sendmail``, and a mail that cannot be sent is logged and
forgotten: it never changes the job, nor delays the answer to anyone (the old
jobqueue answered 500 to a worker when its notification failed).
"""

import re
import socket
from collections import Counter, OrderedDict
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from twisted.internet import defer
from twisted.logger import Logger

from reflservd.format import displayText, formatDuration, formatParameter, formatValue, lastLine

MAILED = ("ACTIVE", "COMPLETE", "ERROR", "CANCEL")
ENDED = MAILED[1:]
MAX_MEMBERS = 200
"""Members a series' mail lists (the rest are on its page)."""
ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\\x00-\x1f\x7f\ud800-\udfff]{1,64}"
                     r"@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
SEND_TIMEOUT = 120.0
REMEMBERED = 10_000
MAX_PARAMETERS = 30


def isAddress(text):
    """Whether ``notify`` is one plain e-mail address (the owner may also be
    a client address or anything else the old protocol carried)."""
    return isinstance(text, str) and ADDRESS.match(text) is not None


def defaultBaseUrl(listen):
    """A URL for links when ``--base-url`` is not given: this host's name and
    the port of the first ``--listen`` endpoint (``ssl:``: https)."""
    if isinstance(listen, list):
        listen = listen[0] if listen else ""
    parts = (listen or "").split(":")
    port = next((p for p in parts[1:] if p.isdigit()), "8080")
    interface = next((p.split("=", 1)[1] for p in parts if p.startswith("interface=")), "")
    host = interface if interface in ("127.0.0.1", "::1", "localhost") else socket.getfqdn()
    if ":" in host:
        host = "[%s]" % (host,)
    return "%s://%s:%s" % ("https" if parts[0] == "ssl" else "http", host, port)


class Notifier:
    """Mails a job's owner when it starts and when it ends.

    @param sendmail: ``twisted.mail.smtp.sendmail`` unless a test gives another.
    """

    _log = Logger()

    def __init__(self, reactor, smtpHost, smtpPort, sender, baseUrl, sendmail=None):
        self.reactor = reactor
        self.smtpHost = smtpHost
        self.smtpPort = int(smtpPort)
        self.sender = sender
        self.baseUrl = (baseUrl or "").rstrip("/")
        self._sendmail = sendmail
        self._mailed = OrderedDict()        # jobId -> the last status mailed
        self._seriesMailed = OrderedDict()  # the series whose end was mailed
        self.sending = set()

    @classmethod
    def fromConfig(cls, config, reactor):
        """The notifier ``--smtp``, ``--smtp-from`` and ``--base-url`` ask
        for, or None when ``--smtp`` is not set."""
        if not config.get("smtp"):
            return None
        host, _, port = config["smtp"].rpartition(":")
        baseUrl = config.get("base-url") or defaultBaseUrl(config.get("listen"))
        return cls(reactor, host, int(port), config.get("smtp-from") or "reflservd@localhost", baseUrl)

    def jobChanged(self, job):
        """A job's status changed: mail its owner if this is a start or an
        end not mailed yet. Never raises (it runs inside the queue's commit)."""
        try:
            status = job.status
            if status not in MAILED or not isAddress(job.notify):
                return None
            if self._mailed.get(job.id) == status:
                return None
            self._mailed[job.id] = status
            self._mailed.move_to_end(job.id)
            while len(self._mailed) > REMEMBERED:
                self._mailed.popitem(last=False)
            return self.send(job.id, job.notify, self.message(job))
        except Exception:
            self._log.failure("notification for job {jobId} not sent", jobId=getattr(job, "id", None))
            return None

    def seriesChanged(self, series, members):
        """A member of ``series`` changed status (``members``: its jobs, None
        for a deleted one): its owner gets one mail when the last member has
        ended, not two per member (a series of 500 would send 1,000). Never
        raises."""
        try:
            live = [job for job in members if job is not None]
            if (not live or any(job.status not in ENDED for job in live)
                    or not isAddress(live[0].notify) or series.id in self._seriesMailed):
                return None
            self._seriesMailed[series.id] = True
            while len(self._seriesMailed) > REMEMBERED:
                self._seriesMailed.popitem(last=False)
            return self.send(live[0].id, live[0].notify, self.seriesMessage(series, members, live[0].notify))
        except Exception:
            self._log.failure("notification for series {seriesId} not sent", seriesId=getattr(series, "id", None))
            return None

    def seriesMessage(self, series, members, address):
        """The mail (bytes) saying that every member of ``series`` has ended."""
        name = " ".join(displayText(series.name).split())[:200]
        label = "series %d%s" % (series.id, " (%s)" % (name,) if name else "")
        counts = Counter(job.status if job is not None else "DELETED" for job in members)
        said = ", ".join("%d %s" % (counts[status], status) for status in ENDED + ("DELETED",)
                         if counts[status])
        lines = ["Every member of your refl1d %s has ended: %s." % (label, said), ""]
        for k, (job, dataName) in enumerate(zip(members, series.labels), 1):
            if k > MAX_MEMBERS:
                lines.append("(%d more on the page)" % (len(members) - MAX_MEMBERS,))
                break
            status = job.status if job is not None else "DELETED"
            result = job.result if job is not None and isinstance(job.result, dict) else {}
            chisq = result.get("chisq") if status == "COMPLETE" else None
            lines.append("%4d  job %-6s %-9s %s%s" % (
                k, job.id if job is not None else "-", status, displayText(dataName, limit=100),
                "  chi^2 = %s" % (formatValue(chisq, digits=4),) if chisq is not None else ""))
        lines.extend(["", "Its page: %s/series/%d" % (self.baseUrl, series.id), "",
                      "-- ", "reflservd (you asked for these mails with notify=%s)" % (address,)])
        return self._mail(address, "%s ended" % (label,), "reflservd-series-%d" % (series.id,), lines)

    def pageURL(self, jobId):
        return "%s/jobs/%d" % (self.baseUrl, jobId)

    def message(self, job):
        """The mail (bytes) for the job's present status."""
        name = " ".join(displayText(job.name).split())[:200]
        label = "job %d%s" % (job.id, " (%s)" % (name,) if name else "")
        lines = []
        if job.status == "ACTIVE":
            subject = "%s started" % (label,)
            lines.append("Your refl1d fit %s started on queue %s (attempt %d)."
                         % (label, displayText(job.queue) or "-", job.attempts or 1))
        else:
            word = {"COMPLETE": "finished", "ERROR": "failed", "CANCEL": "was cancelled"}[job.status]
            subject = "%s %s" % (label, word)
            lines.append("Your refl1d fit %s %s (%s)." % (label, word, job.status))
            if job.started and job.finished:
                lines.append("Run time: %s." % (formatDuration(job.finished - job.started),))
            result = job.result
            if job.status == "COMPLETE" and result is not None and not isinstance(result, dict):
                lines.extend(["", "Result: %s" % (displayText(result, limit=500),)])
            result = result if isinstance(result, dict) else {}
            if job.status == "COMPLETE" and result.get("chisq") is not None:
                lines.append("")
                lines.append("chi^2 = %s" % (formatValue(result["chisq"], digits=4),))
                parameters = result.get("parameters")
                if isinstance(parameters, dict):
                    for pname, value in list(parameters.items())[:MAX_PARAMETERS]:
                        lines.append("  %s = %s" % (displayText(pname, limit=200),
                                                    displayText(formatParameter(value), limit=500)))
                    if len(parameters) > MAX_PARAMETERS:
                        lines.append("  (%d more on the page)" % (len(parameters) - MAX_PARAMETERS,))
            if job.status == "ERROR" and job.error:
                lines.append("")
                lines.append("Error: %s" % (lastLine(job.error)[:500],))
        lines.extend(["", "Its page: %s" % (self.pageURL(job.id),), "",
                      "-- ", "reflservd (you asked for these mails with notify=%s)" % (job.notify,)])
        return self._mail(job.notify, subject, "reflservd-%d" % (job.id,), lines)

    def _mail(self, address, subject, idString, lines):
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = address
        mail["Subject"] = "[reflservd] " + subject
        mail["Date"] = formatdate(self.reactor.seconds(), localtime=True)
        mail["Message-ID"] = make_msgid(idString)
        mail["Auto-Submitted"] = "auto-generated"
        mail.set_content("\n".join(lines) + "\n")
        return mail.as_bytes()

    def send(self, jobId, address, message):
        """Send one mail in the background; the Deferred always succeeds."""
        sendmail = self._sendmail
        if sendmail is None:
            from twisted.mail.smtp import sendmail
        try:
            d = sendmail(self.smtpHost, self.sender, [address], message,
                         port=self.smtpPort, reactor=self.reactor)
        except Exception as e:
            d = defer.fail(e)
        d.addTimeout(SEND_TIMEOUT, self.reactor)
        self.sending.add(d)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(jobId, address),
                       errbackArgs=(jobId, address))
        d.addBoth(self._done, d)
        return d

    def _sent(self, result, jobId, address):
        self._log.info("job {jobId}: mailed {address}", jobId=jobId, address=address)

    def _failed(self, failure, jobId, address):
        self._log.warn("job {jobId}: the mail to {address} was not sent ({why}); the job is unaffected",
                       jobId=jobId, address=address, why=failure.getErrorMessage() or failure.type.__name__)

    def _done(self, result, d):
        self.sending.discard(d)
        return None
