"""The pages' template elements (``twisted.web.template``, templates in
``reflservd/templates``): the frame every page shares, the job list, one
job, the submit form and an error. They render what they are given and
never touch the disk: ``pages.py`` reads a job's files in a thread first
(`JobFiles`).

Every value that comes from a job, whatever its JSON type, is made text
(`reflservd.format.displayText`, `formatValue`) before it is rendered.
"""

import datetime
import os
import time
import urllib.parse

from twisted.python.filepath import FilePath
from twisted.web.template import Element, XMLFile, renderer, tags

from reflservd import queue as Q
from reflservd.job import selectJobs
from reflservd.fitoptions import FITTERS, OPTION_FIELDS
from reflservd.format import (
    displayText, field, fitSteps, formatDuration, formatParameter, formatValue, provenanceLines)
from reflservd.names import VERSION

TEMPLATES = FilePath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates"))
PAGE_SIZE = 50
NAME_LIMIT = 200
"""A name or an owner is clipped to this many characters in the list and the title."""
VALUE_LIMIT = 4000
"""A value of a job's request or result shown as text is clipped to this many characters."""
LOG_TAIL = 8 * 1024
"""Bytes of the end of each log a job's page shows."""


class JobFiles:
    """What a job's page shows from the store: the request (``{}`` when it
    cannot be read or is not an object), the result and upload files as
    ``[(name, size)]``, and the logs' tails as ``[(name, text, size)]``."""

    def __init__(self, request, resultFiles, uploadFiles, logs):
        self.request = request if isinstance(request, dict) else {}
        self.resultFiles, self.uploadFiles, self.logs = resultFiles, uploadFiles, logs


def _timeTag(seconds):
    if not seconds:
        return "–"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return tags.time(moment.strftime("%Y-%m-%d %H:%M:%S UTC"),
                     datetime=moment.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _runTime(job, now):
    if job.started is None or job.status == Q.PENDING:
        return None
    return (job.finished or now) - job.started


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return "%d %s" % (n, unit) if unit == "bytes" else "%.1f %s" % (n, unit)
        n /= 1024.0


def _text(value, limit=None):
    """A job's value as page text: `displayText`, with "–" for nothing."""
    return displayText(value, "–", limit)


def _number(value):
    """A job's number as page text (`formatValue`), with "–" for nothing."""
    return "–" if value is None else formatValue(value)


def _badge(status):
    return tags.span(status, class_="badge status-%s" % (status,), id="status")


def _fileURL(jobId, name, kind="result", inline=False):
    query = []
    if kind == "upload":
        query.append("kind=upload")
    if inline:
        query.append("inline=1")
    return "/api/v1/jobs/%d/files/%s%s" % (jobId, urllib.parse.quote(name, safe="", errors="surrogatepass"),
                                           ("?" + "&".join(query)) if query else "")


def _plotOrder(name):
    lower = name.lower()
    for rank, word in enumerate(("refl", "profile", "residual", "convergence", "corr", "var")):
        if word in lower:
            return (rank, lower)
    return (9, lower)


def _plotCaption(name):
    lower = name.lower()
    for word, caption in (("refl", "Reflectivity"), ("profile", "Profile"), ("residual", "Residuals"),
                          ("convergence", "Convergence"), ("corr", "Parameter correlations"),
                          ("var", "Parameter distributions"), ("logp", "Log likelihood")):
        if word in lower:
            return "%s (%s)" % (caption, name)
    return name


class Page(Element):
    """The frame every page shares: header, navigation, the page's own body."""

    loader = XMLFile(TEMPLATES.child("layout.xml"))

    def __init__(self, title, body, scripts=(), section=None):
        Element.__init__(self)
        self._title = title
        self._body = body
        self._scripts = scripts
        self._section = section

    @renderer
    def title(self, request, tag):
        return tag("%s · reflservd" % (self._title,))

    @renderer
    def version(self, request, tag):
        return VERSION

    @renderer
    def content(self, request, tag):
        return tag(self._body)

    @renderer
    def scripts(self, request, tag):
        return [tags.script(src="/static/%s" % (name,), defer="defer") for name in self._scripts]

    @renderer
    def navJobs(self, request, tag):
        return tag(class_="here") if self._section == "jobs" else tag

    @renderer
    def navSubmit(self, request, tag):
        return tag(class_="here") if self._section == "submit" else tag


class JobsBody(Element):
    """The table of jobs, newest first, with filters and pages."""

    loader = XMLFile(TEMPLATES.child("jobs.xml"))

    def __init__(self, queue, status, owner, queueName, page):
        Element.__init__(self)
        self.queue = queue
        self.status, self.owner, self.queueName, self.page = status, owner, queueName, page
        self.jobs = selectJobs(queue, status or None, owner or None, queueName or None)
        self.now = time.time()

    @renderer
    def counts(self, request, tag):
        counts = self.queue.counts()
        parts = ["%d jobs" % (sum(counts.values()),)]
        parts += ["%d %s" % (counts[s], s.lower()) for s in (Q.PENDING, Q.ACTIVE) if counts[s]]
        return tag(" · ".join(parts))

    @renderer
    def statusOptions(self, request, tag):
        options = [tags.option("any", value="")]
        for status in Q.STATUSES:
            option = tags.option(status.lower(), value=status)
            if status == self.status:
                option(selected="selected")
            options.append(option)
        return tag(options)

    @renderer
    def ownerValue(self, request, tag):
        return tag(value=self.owner)

    @renderer
    def queueValue(self, request, tag):
        return tag(value=self.queueName)

    @renderer
    def rows(self, request, tag):
        start = (self.page - 1) * PAGE_SIZE
        shown = self.jobs[start:start + PAGE_SIZE]
        if not shown:
            return tag(tags.tr(tags.td("No jobs match.", colspan="7", class_="empty")))
        rows = []
        for job in shown:
            link = "/jobs/%d" % (job.id,)
            rows.append(tags.tr(
                tags.td(tags.a(str(job.id), href=link), class_="num"),
                tags.td(tags.a(displayText(job.name, limit=NAME_LIMIT) or "(no name)", href=link)),
                tags.td(_text(job.owner or None, NAME_LIMIT)),
                tags.td(_badge(job.status)(id="status-%d" % (job.id,))),
                tags.td(_text(job.queue or None)),
                tags.td(_timeTag(job.submitted)),
                tags.td(formatDuration(_runTime(job, self.now), "–"), class_="num"),
                class_="job"))
        return tag(rows)

    @renderer
    def pager(self, request, tag):
        total = len(self.jobs)
        if total == 0:
            return ""
        pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
        start = (self.page - 1) * PAGE_SIZE
        shown = "jobs %d–%d of %d" % (min(total, start + 1), min(total, start + PAGE_SIZE), total)

        def link(page, text):
            query = {k: v for k, v in (("status", self.status), ("owner", self.owner),
                                       ("queue", self.queueName)) if v}
            if page > 1:
                query["page"] = str(page)
            return tags.a(text, href="/?" + urllib.parse.urlencode(query) if query else "/")

        items = []
        if self.page > 1:
            items.append(link(self.page - 1, "← newer"))
        items.append(tags.span(shown))
        if self.page < pages:
            items.append(link(self.page + 1, "older →"))
        return tag(items)


class JobBody(Element):
    """One job: its summary, live progress, and when it is over the result,
    the plots, the files and the tail of its output."""

    loader = XMLFile(TEMPLATES.child("job.xml"))

    def __init__(self, job, files, ahead=0, control=False):
        """``files``: what the page shows from the store (`JobFiles`), read
        before, off the reactor. ``control``: the visitor may cancel the
        job (its browser holds the job's key, or it shows an admin token)."""
        Element.__init__(self)
        self.job = job
        self.control = control
        self.ahead = ahead
        self.now = time.time()
        self.request = files.request
        self.resultFiles = files.resultFiles
        self.uploadFiles = files.uploadFiles
        self.logTails = files.logs

    @renderer
    def jobId(self, request, tag):
        return str(self.job.id)

    @renderer
    def jobName(self, request, tag):
        return tag(displayText(self.job.name))

    @renderer
    def statusBadge(self, request, tag):
        return _badge(self.job.status)

    @renderer
    def cancelButton(self, request, tag):
        if self.job.status in Q.FINISHED or not self.control:
            return ""
        return tags.button("Cancel", type="button", class_="danger", id="cancel",
                           **{"data-job": str(self.job.id)})

    @renderer
    def notice(self, request, tag):
        job = self.job
        if job.status == Q.CANCEL and job.cancelRequested and not job.finished:
            return tag("Cancelled: the worker stops the fit at its next heartbeat and sends what it has.")
        if job.status == Q.PENDING:
            ahead = self.ahead
            return tag("Waiting for a worker%s." % (
                " (%d job%s ahead in the queue)" % (ahead, "" if ahead == 1 else "s") if ahead else ""))
        return ""

    @renderer
    def summary(self, request, tag):
        job = self.job
        data = self.request.get("data")
        if isinstance(data, dict) or data is None:
            model = _text(field(data, "model") or None, VALUE_LIMIT)
        else:
            model = "– (data: %s)" % (displayText(data, limit=VALUE_LIMIT),)
        options = field(data, "options")
        if isinstance(options, dict):
            options = " ".join("%s=%s" % (displayText(k), displayText(v)) for k, v in options.items())
        waited = (job.started - job.submitted) if job.started else None
        items = [
            ("Status", job.status),
            ("Owner", _text(job.owner or None)),
            ("Model", model),
            ("Options", displayText(options, limit=VALUE_LIMIT) or "refl1d's defaults"),
            ("Service", "%s %s" % (displayText(job.service), displayText(job.version))),
            ("Queue", _text(job.queue or None)),
            ("Attempts", _number(job.attempts)),
            ("Confinement", _text(job.confinement or None)),
            ("Submitted", _timeTag(job.submitted)),
            ("Started", _timeTag(job.started)),
            ("Finished", _timeTag(job.finished)),
            ("Waited", formatDuration(waited, "–")),
            ("Run time", formatDuration(_runTime(job, self.now), "–")),
        ]
        if job.cachedFrom is not None:
            items.append(("Answered from", tags.a("job %d (the result cache: no fit ran)" % (job.cachedFrom,),
                                                  href="/jobs/%d" % (job.cachedFrom,), id="cached-from")))
        if job.series is not None:
            items.insert(2, ("Series", tags.a("series %d" % (job.series,), href="/series/%d" % (job.series,))))
        out = []
        for label, value in items:
            dd = tags.dd(value)
            if label == "Status":
                dd = tags.dd(value, id="summary-status")
            out.extend([tags.dt(label), dd])
        return tag(out)

    @renderer
    def progress(self, request, tag):
        job = self.job
        progress = job.progress if isinstance(job.progress, dict) else {}
        if not progress and job.status in (Q.PENDING,) + Q.FINISHED:
            tag(hidden="hidden")
        tag(**{"data-job": str(job.id), "data-status": job.status,
               "data-steps": str(fitSteps(self.request) or "")})
        return tag.fillSlots(step=_number(progress.get("step")), chisq=_number(progress.get("chisq")),
                             elapsed=formatDuration(progress.get("elapsed"), "–") if progress else "–")

    @renderer
    def best(self, request, tag):
        return "" if self.job.status in Q.FINISHED else tag

    @renderer
    def bestRows(self, request, tag):
        progress = self.job.progress if isinstance(self.job.progress, dict) else {}
        parameters = progress.get("parameters") if isinstance(progress.get("parameters"), dict) else {}
        return tag([tags.tr(tags.th(displayText(name)), tags.td(_number(value), class_="num"))
                    for name, value in parameters.items()])

    @renderer
    def error(self, request, tag):
        job = self.job
        if job.status != Q.ERROR or not (job.error or job.trace):
            return ""
        section = tags.section(tags.h2("Error"), tags.pre(displayText(job.error), class_="errortext"),
                               class_="card failure")
        if job.trace:
            section(tags.details(tags.summary("Traceback"), tags.pre(displayText(job.trace))))
        return section

    @renderer
    def results(self, request, tag):
        job = self.job
        result = job.result
        if job.status != Q.COMPLETE or result is None:
            return ""
        section = tags.section(tags.h2("Result"), class_="card result")
        if not isinstance(result, dict):
            return section(tags.pre(displayText(result, limit=VALUE_LIMIT), class_="resulttext",
                                    id="result-text"))
        facts = []
        for label, key in (("χ²", "chisq"), ("Fitter", "fitter"), ("Steps", "steps"), ("Seed", "seed")):
            if result.get(key) is not None:
                facts.append(tags.span(label + " ", tags.b(_number(result[key]))))
        section(tags.p(facts, class_="figures", id="result-figures"))
        rows = []
        parameters = result.get("parameters") if isinstance(result.get("parameters"), dict) else {}
        for name, value in parameters.items():
            rows.append(tags.tr(tags.th(displayText(name)), tags.td(formatParameter(value), class_="num")))
        if rows:
            section(tags.table(tags.thead(tags.tr(tags.th("Parameter"), tags.th("Value ± uncertainty",
                                                                                class_="num"))),
                               tags.tbody(rows), class_="params", id="parameters"))
        plots = sorted((name for name, _ in self.resultFiles if name.lower().endswith(".png")), key=_plotOrder)
        if plots:
            figures = [tags.figure(tags.a(tags.img(src=_fileURL(job.id, name, inline=True),
                                                   alt=displayText(_plotCaption(name))),
                                          href=_fileURL(job.id, name, inline=True)),
                                   tags.figcaption(displayText(_plotCaption(name))))
                       for name in plots]
            section(tags.div(figures, class_="plots"))
        provenance = result.get("provenance")
        if isinstance(provenance, dict):
            section(tags.details(tags.summary("Provenance: how this result was made"), tags.dl(
                [[tags.dt(label), tags.dd(value)] for label, value in provenanceLines(provenance, _timeTag)],
                class_="provenance"), id="provenance"))
        return section

    @renderer
    def files(self, request, tag):
        job = self.job
        if not self.resultFiles and not self.uploadFiles:
            return ""
        rows = []
        for kind, files in (("result", self.resultFiles), ("upload", self.uploadFiles)):
            for name, size in files:
                rows.append(tags.tr(tags.td(tags.a(displayText(name), href=_fileURL(job.id, name, kind),
                                                   download=displayText(name))),
                                    tags.td(kind), tags.td(_size(size), class_="num")))
        return tags.section(tags.h2("Files"),
                            tags.table(tags.thead(tags.tr(tags.th("Name"), tags.th("Kind"),
                                                          tags.th("Size", class_="num"))),
                                       tags.tbody(rows), class_="files"),
                            class_="card")

    @renderer
    def logs(self, request, tag):
        parts = []
        for name, text, size in self.logTails:
            heading = tags.h3(displayText(name), " ", tags.a("(whole file)", href=_fileURL(self.job.id, name)))
            if size > LOG_TAIL:
                heading(" ", tags.span("last %s of %s" % (_size(LOG_TAIL), _size(size)), class_="hint"))
            parts.append(tags.div(heading, tags.pre(text or "(empty)", class_="log"), class_="logpart"))
        if not parts:
            return ""
        return tags.section(tags.h2("Output"), parts, class_="card logs")


class SubmitBody(Element):
    """The form that submits a refl1d fit."""

    loader = XMLFile(TEMPLATES.child("submit.xml"))

    def __init__(self, values=None, message=None):
        Element.__init__(self)
        self.values = values or {}
        self.message = message

    @renderer
    def formError(self, request, tag):
        return tag(self.message) if self.message else ""

    @renderer
    def value(self, request, tag):
        field = tag.attributes.get("data-field")
        return tag(value=self.values.get(field, ""))

    @renderer
    def fitOptions(self, request, tag):
        chosen = self.values.get("fit", "")
        options = []
        for value, label in FITTERS:
            option = tags.option(label, value=value)
            if value == chosen:
                option(selected="selected")
            options.append(option)
        return tag(options)

    @renderer
    def optionFields(self, request, tag):
        fields = []
        for name, label, kind, attributes, fitters in OPTION_FIELDS:
            value = self.values.get(name, "")
            if isinstance(kind, tuple):
                choices = [tags.option("default", value="")]
                for choice in kind:
                    option = tags.option(choice, value=choice)
                    if choice == value:
                        option(selected="selected")
                    choices.append(option)
                control = tags.select(choices, name=name)
            else:
                control = tags.input(type="number", name=name, value=value, **attributes)
            hint = "for %s" % (", ".join(fitters.split()),) if fitters else "any fitter"
            fields.append(tags.label(label, " ", tags.span(hint, class_="hint"), control,
                                     class_="option", **{"data-fitters": fitters}))
        return tags.div(fields, class_="options")


class ErrorBody(Element):
    loader = XMLFile(TEMPLATES.child("error.xml"))

    def __init__(self, heading, message):
        Element.__init__(self)
        self._heading, self._message = heading, message

    @renderer
    def heading(self, request, tag):
        return tag(self._heading)

    @renderer
    def message(self, request, tag):
        return tag(self._message)
