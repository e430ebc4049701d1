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
