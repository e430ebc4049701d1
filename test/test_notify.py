"""Notification mails: which status changes are mailed, what a mail says,
that a failure to send is logged and changes nothing; and end to end, a real
server mailing a real SMTP sink (aiosmtpd) on loopback."""

import email
import email.policy
import threading
import types

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from reflservd.client import Client
from reflservd.notify import Notifier, defaultBaseUrl, isAddress
from test.conftest import freePort
from test.support import RESULT, FakeWorker, writeModel

MAIL_TIMEOUT = 30.0


def fakeJob(**fields):
    job = dict(id=7, name="ni film", notify="ann@example.org", status="PENDING", queue=None,
               attempts=0, started=None, finished=None, result=None, error=None)
    job.update(fields)
    return types.SimpleNamespace(**job)


class Outbox:
    """A sendmail that keeps what it was asked to send."""

    def __init__(self, fail=None):
        self.sent = []
        self.fail = fail

    def __call__(self, host, sender, recipients, message, port, reactor):
        self.sent.append((host, port, sender, recipients, email.message_from_bytes(message, policy=email.policy.default)))
        if self.fail is not None:
            raise self.fail
        return defer.succeed((1, [(recipients[0], 250, b"ok")]))


def notifier(outbox):
    return Notifier(Clock(), "smtp.example.org", 2525, "queue@example.org", "http://fits.example.org:8080/",
                    sendmail=outbox)


def test_mailsOnceWhenAJobStartsAndOnceWhenItEnds():
    """PENDING is not mailed; the first ACTIVE and the end are, once each, even
    when the queue reports the same status again (a requeue and a second
    start, a worker completing a cancelled job)."""
    outbox = Outbox()
    n = notifier(outbox)
    job = fakeJob()
    n.jobChanged(job)
    assert outbox.sent == []
    job.status, job.queue, job.attempts, job.started = "ACTIVE", "cluster-a", 1, 100.0
    n.jobChanged(job)
    job.status = "PENDING"
    n.jobChanged(job)
    job.status, job.attempts = "ACTIVE", 2
    n.jobChanged(job)
    job.status, job.finished, job.result = "COMPLETE", 163.0, RESULT
    n.jobChanged(job)
    n.jobChanged(job)
    subjects = [mail["Subject"] for _, _, _, _, mail in outbox.sent]
    assert subjects == ["[reflservd] job 7 (ni film) started", "[reflservd] job 7 (ni film) finished"]
    host, port, sender, recipients, mail = outbox.sent[1]
    assert (host, port, sender, recipients) == ("smtp.example.org", 2525, "queue@example.org", ["ann@example.org"])
    assert mail["To"] == "ann@example.org" and mail["From"] == "queue@example.org"
    body = mail.get_content()
    assert "Its page: http://fits.example.org:8080/jobs/7" in body
    assert "chi^2 = 1.031" in body
    assert "Ni thickness = 100.12 ± 0.31" in body
    assert "Run time: 0:01:03." in body


def test_aSeriesIsMailedOnceWhenItsLastMemberEnds():
    """A series' members are not mailed one by one (500 members would be 1,000
    mails): nothing while they start and end, then one mail once the last has
    ended, with each member's status and χ², and the series' page; a later
    change (a member deleted) mails nothing more."""
    outbox = Outbox()
    n = notifier(outbox)
    members = [fakeJob(id=10 + k, series=3) for k in range(3)]
    series = types.SimpleNamespace(id=3, name="temperature\nscan", members=[10, 11, 12],
                                   labels=["run-1.refl", "run-2.refl", "run-3.refl"])
    for job in members:
        job.status, job.started = "ACTIVE", 100.0
        n.seriesChanged(series, members)
    members[0].status, members[0].result = "COMPLETE", RESULT
    n.seriesChanged(series, members)
    members[1].status, members[1].error = "ERROR", "Traceback\nValueError: bad"
    n.seriesChanged(series, members)
    assert outbox.sent == []
    members[2].status = "CANCEL"
    n.seriesChanged(series, members)
    n.seriesChanged(series, members[:2] + [None])
    assert len(outbox.sent) == 1
    _, _, _, recipients, mail = outbox.sent[0]
    assert recipients == ["ann@example.org"]
    assert mail["Subject"] == "[reflservd] series 3 (temperature scan) ended"
    body = mail.get_content()
    assert "has ended: 1 COMPLETE, 1 ERROR, 1 CANCEL." in body
    assert "job 10     COMPLETE  run-1.refl  chi^2 = 1.031" in body
    assert "job 11     ERROR     run-2.refl" in body
    assert "Its page: http://fits.example.org:8080/series/3" in body


def test_errorMailSaysWhyAndCancelIsMailed():
    """An ERROR mail carries the error's last line; a CANCEL is mailed as an end."""
    outbox = Outbox()
    n = notifier(outbox)
    n.jobChanged(fakeJob(id=8, status="ERROR", error="Traceback...\nValueError: bad data"))
    n.jobChanged(fakeJob(id=9, status="CANCEL"))
    assert outbox.sent[0][4]["Subject"] == "[reflservd] job 8 (ni film) failed"
    assert "Error: ValueError: bad data" in outbox.sent[0][4].get_content()
    assert outbox.sent[1][4]["Subject"] == "[reflservd] job 9 (ni film) was cancelled"


def test_noMailWithoutAnAddress():
    """A notify that is empty, a client address or not one plain address is not mailed."""
    outbox = Outbox()
    n = notifier(outbox)
    for notify in ("", None, "127.0.0.1", "ann@example.org, bob@example.org", "x@y\nBcc: z@w"):
        n.jobChanged(fakeJob(notify=notify, status="ACTIVE"))
    assert outbox.sent == []
    assert isAddress("ann@example.org") and isAddress("ann@localhost")


def test_aNameWithNewlinesCannotAddHeaders():
    """The job's name goes into the subject on one line."""
    outbox = Outbox()
    notifier(outbox).jobChanged(fakeJob(name="fit\r\nBcc: eve@example.org", status="ACTIVE"))
    mail = outbox.sent[0][4]
    assert mail["Bcc"] is None
    assert mail["Subject"] == "[reflservd] job 7 (fit Bcc: eve@example.org) started"


def test_aFailureToSendIsLoggedAndNeverRaised():
    """sendmail failing (at once or later) is logged as a warning; jobChanged
    returns normally and its Deferred succeeds."""
    n = notifier(Outbox(fail=ConnectionRefusedError("connection refused")))
    with capturedLogs() as events:
        d = n.jobChanged(fakeJob(status="ACTIVE"))
    results = []
    d.addBoth(results.append)
    assert results == [None]
    warnings = [e for e in events if e.get("log_level").name == "warn"]
    assert len(warnings) == 1 and warnings[0]["jobId"] == 7


def test_aMailThatHangsIsGivenUpAfterTheTimeout():
    """A sendmail that never answers is cancelled by the timeout and logged."""
    clock = Clock()
    hanging = defer.Deferred()
    n = Notifier(clock, "smtp", 25, "q@example.org", "http://x", sendmail=lambda *a, **k: hanging)
    with capturedLogs() as events:
        n.jobChanged(fakeJob(status="ACTIVE"))
        assert len(n.sending) == 1
        clock.advance(1000)
    assert n.sending == set()
    assert any(e.get("log_level").name == "warn" for e in events)


def test_defaultBaseUrlFollowsTheListenPort():
    """Without --base-url, links use the listen port (and loopback when that is the interface)."""
    assert defaultBaseUrl("tcp:8123:interface=127.0.0.1") == "http://127.0.0.1:8123"
    assert defaultBaseUrl("tcp:9000").endswith(":9000")


# ---- end to end


class Sink:
    """An aiosmtpd handler that keeps each message and lets a test wait for them."""

    def __init__(self):
        self.messages = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        with self.arrived:
            self.messages.append((envelope.rcpt_tos, email.message_from_bytes(
                envelope.original_content or envelope.content, policy=email.policy.default)))
            self.arrived.notify_all()
        return "250 OK"

    def waitFor(self, count, timeout=MAIL_TIMEOUT):
        with self.arrived:
            ok = self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
        assert ok, "%d mails arrived, not %d, within %g s" % (len(self.messages), count, timeout)
        return self.messages


@pytest.fixture
def sink():
    from aiosmtpd.controller import Controller
    handler = Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=freePort())
    controller.start()
    yield handler, controller.port
    controller.stop()


def test_aRealServerMailsTheStartAndTheEndToARealSMTPSink(sink, serverProcess, tmp_path):
    """``twistd reflservd --smtp`` mails a job's owner through a real SMTP
    server when the job starts and when it ends, with a link built from
    --base-url."""
    handler, port = sink
    server = serverProcess(args=["--smtp", "127.0.0.1:%d" % (port,), "--smtp-from", "queue@example.org",
                                 "--base-url", "http://fits.example.org/"])
    model, data = writeModel(str(tmp_path / "fit"))
    job = Client(server.url).submit(model, data=data, notify="ann@example.org", name="ni film")
    worker = FakeWorker(server.url)
    lease = worker.lease()
    rcpt, started = handler.waitFor(1)[0]
    assert rcpt == ["ann@example.org"]
    assert started["Subject"] == "[reflservd] job %d (ni film) started" % (job.id,)
    assert started["From"] == "queue@example.org"
    worker.runFit(lease)
    _, ended = handler.waitFor(2)[1]
    assert ended["Subject"] == "[reflservd] job %d (ni film) finished" % (job.id,)
    assert "Its page: http://fits.example.org/jobs/%d" % (job.id,) in ended.get_content()
    server.stop()
    assert len(handler.messages) == 2


def test_aServerWhoseMailFailsStillRunsTheJob(serverProcess, tmp_path):
    """With the SMTP server unreachable the job is leased and completes as
    usual; the failure shows in the log."""
    server = serverProcess(args=["--smtp", "127.0.0.1:%d" % (freePort(),)])
    model, data = writeModel(str(tmp_path / "fit"))
    job = Client(server.url).submit(model, data=data, notify="ann@example.org")
    worker = FakeWorker(server.url)
    record = worker.runFit(worker.lease())
    assert record["status"] == "COMPLETE"
    assert job.status == "COMPLETE"
    server.waitForLog("job %d: the mail to ann@example.org was not sent" % (job.id,), timeout=MAIL_TIMEOUT)


# ---- values of every shape


NAN = float("nan")
ODD_RESULT = {"chisq": 10 ** 400, "parameters": {"thickness": {"value": 1.5, "uncertainty": 5e-5},
                                                 "p\ud800": {"value": NAN, "uncertainty": 1.0},
                                                 "listed": [1, 2], "odd": {"value": {"a": 1}}}}


@pytest.mark.parametrize("fields, expected", [
    (dict(name="fit \ud800 one", status="ACTIVE", queue="q\udfff"), "fit \ufffd one"),
    (dict(name={"an": "object"}, status="ACTIVE"), '{"an":"object"}'),
    (dict(status="COMPLETE", result=ODD_RESULT), "thickness = 1.500000 ± 0.000050"),
    (dict(status="COMPLETE", result=ODD_RESULT), "p\ufffd = nan"),
    (dict(status="COMPLETE", result=ODD_RESULT), "chi^2 = %d" % (10 ** 400,)),
    (dict(status="COMPLETE", result=[1, "two", NAN]), 'Result: [1,"two",NaN]'),
    (dict(status="COMPLETE", result={"chisq": "low", "parameters": "none"}), "chi^2 = low"),
    (dict(status="COMPLETE", result=42), "Result: 42"),
    (dict(status="ERROR", error="Traceback\nValueError: bad \ud800"), "Error: ValueError: bad \ufffd"),
])
def test_aJobOfAnyShapeIsMailed(fields, expected):
    """A job whose name, queue, result or error holds a lone surrogate, an
    object, NaN, a huge integer or a result that is not an object is mailed
    all the same, its values written out as text."""
    outbox = Outbox()
    with capturedLogs() as events:
        notifier(outbox).jobChanged(fakeJob(started=100.0, finished=160.0, **fields))
    assert [e for e in events if e.get("log_failure") is not None] == []
    assert len(outbox.sent) == 1
    mail = outbox.sent[0][4]
    assert expected in mail["Subject"] + "\n" + mail.get_content()


def test_aNotifyThatIsNotAnAddressIsNotMailedAndNothingFails():
    """A notify with a lone surrogate or a control character, or that is not a string, is no address."""
    outbox = Outbox()
    with capturedLogs() as events:
        for notify in ("\ud800@example.org", "ann\x00@example.org", {"to": "ann@example.org"}, 7):
            notifier(outbox).jobChanged(fakeJob(notify=notify, status="ACTIVE"))
    assert outbox.sent == [] and [e for e in events if e.get("log_failure") is not None] == []


def test_aRealServerMailsJobsOfOddShapes(sink, serverProcess):
    """Through the real API (the legacy route takes any JSON as data): a job
    whose data.model is an object, whose progress elapsed is huge and
    whose result is 1.5 ± 5e-5 beside NaN and a huge integer, and a count
    job whose result is a list, are each mailed when they start and end."""
    handler, port = sink
    server = serverProcess(args=["--smtp", "127.0.0.1:%d" % (port,), "--base-url", "http://fits.example.org/"])
    ids = []
    for name, data in (("object model", {"model": {"layers": [1, 2]}}), ("count", 7)):
        status, answer = server.api.call("POST", "/jobs.json", body={
            "name": name, "notify": "ann@example.org", "service": "refl1d", "data": data})
        assert status == 200, answer
        ids.append(answer["id"])
    worker = FakeWorker(server.url)
    results = {ids[0]: {"chisq": NAN, "steps": 10 ** 30,
                        "parameters": {"thickness": {"value": 1.5, "uncertainty": 5e-5}}},
               ids[1]: [1, 2, "three"]}
    for count in (1, 2):
        lease = worker.lease()
        worker.heartbeat(lease, {"step": 1, "elapsed": 1e300, "chisq": None})
        worker.complete(lease, result=results[lease["id"]])
        handler.waitFor(2 * count)
    subjects = {mail["Subject"]: mail for _, mail in handler.messages}
    for jobId, name in zip(ids, ("object model", "count")):
        assert "[reflservd] job %d (%s) started" % (jobId, name) in subjects
        assert "[reflservd] job %d (%s) finished" % (jobId, name) in subjects
    first = subjects["[reflservd] job %d (object model) finished" % (ids[0],)].get_content()
    assert "chi^2 = nan" in first and "thickness = 1.500000 ± 0.000050" in first
    assert 'Result: [1,2,"three"]' in subjects["[reflservd] job %d (count) finished" % (ids[1],)].get_content()
