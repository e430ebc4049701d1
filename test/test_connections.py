"""The server under a flood of connections (issue 8 §4): a cap per address
and in all, a total deadline for a request to arrive that trickling bytes do
not extend, and running out of file descriptors logged, not spun on.

The end-to-end tests hold a few hundred idle and slow connections against a
real ``twistd reflservd`` on loopback (other clients come from 127.0.0.2: the
whole of 127/8 is loopback); the deadline arithmetic is shown on a `Clock`.
"""

import http.client
import json
import select
import socket
import time
import uuid

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource

from reflservd import tap
from reflservd.web import Site

OTHER = "127.0.0.2"


# ---- helpers


def connect(port, source="127.0.0.1", timeout=10.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def openMany(port, count, source="127.0.0.1", timeout=20.0, batch=20):
    """``count`` connected sockets, connected ``batch`` at a time without
    blocking (bounded), so as not to overflow the listening backlog (50):
    those the server closes at once come back too."""
    sockets = []
    deadline = time.monotonic() + timeout
    while len(sockets) < count:
        pending = []
        for _ in range(min(batch, count - len(sockets))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            pending.append(s)
        waiting = list(pending)
        while waiting:
            assert time.monotonic() < deadline, "%d of %d connects did not finish within %s s" % (
                count - len(sockets) - len(pending) + len(waiting), count, timeout)
            _, writable, _ = select.select([], waiting, [], 0.5)
            waiting = [s for s in waiting if s not in writable]
        sockets.extend(pending)
    return sockets


def readUntilClosed(sockets, timeout):
    """``{socket: bytes received}`` once every socket has seen EOF (or a
    reset); AssertionError past ``timeout``."""
    received = {s: b"" for s in sockets}
    open_ = set(sockets)
    deadline = time.monotonic() + timeout
    while open_:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "%d of %d connections still open after %s s" % (len(open_), len(sockets), timeout)
        readable, _, _ = select.select(list(open_), [], [], min(remaining, 0.5))
        for s in readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                received[s] += data
            else:
                open_.discard(s)
    return received


def stillOpen(s):
    """True while the server has neither closed ``s`` nor sent on it."""
    readable, _, _ = select.select([s], [], [], 0)
    return not readable


def request(port, method, path, body=b"", headers=None, source=OTHER, timeout=10.0):
    """(status, decoded JSON body) of one request on a fresh connection from ``source``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    return response.status, json.loads(payload) if payload else None


def submitFrom(port, source=OTHER):
    boundary = uuid.uuid4().hex
    job = {"name": "under siege", "notify": "a@example.org", "service": "refl1d",
           "data": {"model": "model.py", "options": {"fit": "lm"}}}
    body = (b'--%s\r\nContent-Disposition: form-data; name="request"\r\n\r\n%s\r\n'
            b'--%s\r\nContent-Disposition: form-data; name="file"; filename="model.py"\r\n\r\nx = 1\r\n'
            b"--%s--\r\n" % (boundary.encode(), json.dumps(job).encode(), boundary.encode(), boundary.encode()))
    return request(port, "POST", "/api/v1/jobs", body,
                   {"Content-Type": "multipart/form-data; boundary=" + boundary,
                    "X-Requested-With": "test"}, source)


def closeAll(sockets):
    for s in sockets:
        s.close()


# ---- end to end


def test_connectionsOverThePerAddressCapAreRefusedAndLoggedOnce(serverProcess):
    """40 connections held from one address against a cap of 40, then 260
    more (half of them sending a request at once): each of those is answered
    503 with a JSON error and closed, the
    refusals logged in one line (not 260); another address still gets
    ``/healthz`` and a submit answered; once the held ones close, the first
    address is served again."""
    server = serverProcess(args=["--max-connections-per-address", "40", "--request-deadline", "600"])
    held = [connect(server.port) for _ in range(40)]
    floods = []
    try:
        # One request on a held connection shows that the server took them all in.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert held[-1].recv(65536).startswith(b"HTTP/1.1 200 ")
        for _ in range(13):
            batch = openMany(server.port, 20)
            floods += batch
            for s in batch[::2]:     # a request sent before the answer is read: the answer still comes
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            for answer in readUntilClosed(batch, 30.0).values():
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503 "), answer[:200]
                assert "the most this server takes from one address" in json.loads(body)["error"]
        assert all(stillOpen(s) for s in held[:-1])

        status, health = request(server.port, "GET", "/healthz")
        assert (status, health["status"]) == (200, "ok")
        status, job = submitFrom(server.port)
        assert (status, job["status"]) == (201, "PENDING"), job
    finally:
        closeAll(held + floods)
    deadline = time.monotonic() + 20
    while True:
        status, _ = request(server.port, "GET", "/healthz", source="127.0.0.1")
        if status == 200 or time.monotonic() > deadline:
            break
    assert status == 200
    refusals = [line for line in server.log(sinceStart=True).splitlines()
                if "refused a connection from 127.0.0.1" in line]
    assert len(refusals) == 1, refusals
    assert "40 open from that address (cap 40)" in refusals[0]


def test_silentAndTricklingConnectionsAreClosedAtTheDeadline(serverProcess):
    """Against a 2 s request deadline, 40 connections that send nothing or a
    header byte every 0.2 s (each well inside twisted.web's idle timeout) are
    all closed by the server: the trickling ones with a 408 saying why. The
    closings are logged in one line."""
    server = serverProcess(args=["--request-deadline", "2"])
    held = [connect(server.port) for _ in range(40)]
    slow, silent = held[:20], held[20:]
    try:
        for s in slow:
            s.sendall(b"POST /api/v1/jobs HTTP/1.1\r\n")
        trickle = iter(b"X-Slow: " + b"a" * 10_000)
        received = {s: b"" for s in held}
        deadline = time.monotonic() + 30.0
        open_ = set(held)
        while open_ and time.monotonic() < deadline:
            byte = bytes([next(trickle)])
            for s in slow:
                if s in open_:
                    try:
                        s.send(byte)
                    except OSError:
                        pass
            readable, _, _ = select.select(list(open_), [], [], 0.2)
            for s in readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                received[s] += data
                if not data:
                    open_.discard(s)
        assert not open_, "%d connections were not closed by the server" % (len(open_),)
        for s in slow:
            assert received[s].startswith(b"HTTP/1.1 408 "), received[s][:200]
            assert "did not arrive within 2.0 s" in received[s].decode()
        assert all(received[s] == b"" for s in silent)
    finally:
        closeAll(held)
    status, health = request(server.port, "GET", "/healthz", source="127.0.0.1")
    assert status == 200
    closings = [line for line in server.log(sinceStart=True).splitlines()
                if "closed a connection from 127.0.0.1" in line]
    assert len(closings) == 1 and "no whole request within the 2.0 s allowed" in closings[0], closings


def test_connectionsOverTheTotalCapAreAnswered503(serverProcess):
    """With ``--max-connections 30``, the 31st connection (from any address)
    is answered 503 naming the limit; once connections close, it is served."""
    server = serverProcess(args=["--max-connections", "30", "--request-deadline", "30"])
    held = [connect(server.port, "127.0.0.%d" % (3 + i % 5)) for i in range(30)]
    try:
        # One request on a held connection proves the server took them all in.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert readUntilClosed([held[-1]], 10.0)[held[-1]].startswith(b"HTTP/1.1 200 ")
        held.append(connect(server.port, "127.0.0.9"))
        status, answer = request(server.port, "GET", "/healthz")
        assert status == 503 and "limit of 30 connections" in answer["error"]
    finally:
        closeAll(held)
    deadline = time.monotonic() + 20
    while True:
        status, _ = request(server.port, "GET", "/healthz")
        if status == 200 or time.monotonic() > deadline:
            break
    assert status == 200
    server.waitForLog("connections open (cap 30)")


def test_runningOutOfFileDescriptorsIsLoggedAndTheServerRecovers(serverProcess):
    """A server limited to 128 open files and told to take more connections
    than that: 300 idle connections exhaust its descriptors. It logs the
    EMFILE in a line or two (not one per connection), keeps running, closes
    the idle ones at the deadline, and then answers ``/healthz`` again."""
    server = serverProcess(nofile=128, args=[
        "--max-connections", "10000", "--max-connections-per-address", "10000",
        "--request-deadline", "3"])
    idle = openMany(server.port, 300)
    try:
        server.waitForLog("out of file descriptors (EMFILE)", timeout=30)
        readUntilClosed(idle, 60.0)
    finally:
        closeAll(idle)
    assert server.running
    deadline = time.monotonic() + 30
    while True:
        try:
            status, health = request(server.port, "GET", "/healthz", timeout=5)
            break
        except (OSError, IndexError, ValueError):
            assert time.monotonic() < deadline, "/healthz did not answer after the idle connections closed"
    assert (status, health["status"]) == (200, "ok")
    log = server.log(sinceStart=True)
    lines = [line for line in log.splitlines() if "out of file descriptors" in line]
    assert 1 <= len(lines) <= 8, lines
    assert "EMFILE recovery" not in log


# ---- the deadline, on a clock


class _Echo(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        return b"%d" % (len(request.content.read()),)

    def render_GET(self, request):
        return b"ok"


def clockSite(**kwargs):
    clock = Clock()
    site = Site(_Echo(), maxBody=1 << 30, reactor=clock, **kwargs)
    return clock, site


class HalfClosingTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


def openChannel(site):
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfClosingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_aByteAMinuteDoesNotExtendTheDeadline():
    """A request whose header arrives a byte at a time, each well inside
    twisted.web's idle timeout, is answered 408 and closed once the request
    deadline passes since the connection opened."""
    clock, site = clockSite(requestDeadline=60.0)
    protocol, transport = openChannel(site)
    for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
        protocol.dataReceived(bytes([byte]))
        clock.advance(2.5)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert clock.seconds() <= 62.5
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_theBodyDeadlineScalesWithTheDeclaredLength():
    """A body declared as 10 MB may take 60 s plus 10 MB at the minimum rate
    (64 KiB/s: 213 s in all): sent at 70 KiB/s, which takes 140 s, it is
    answered; the same body at 30 KiB/s is cut off with a 408 at that deadline."""
    size = 10 * 1000 * 1000
    for rate, answered in ((70 * 1024, True), (30 * 1024, False)):
        clock, site = clockSite(requestDeadline=60.0, minUploadRate=64 * 1024)
        protocol, transport = openChannel(site)
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (size,))
        sent = 0
        while sent < size and not transport.disconnecting:
            chunk = min(rate, size - sent)
            protocol.dataReceived(b"x" * chunk)
            sent += chunk
            clock.advance(1.0)
        allowed = 60.0 + size / (64 * 1024)
        if answered:
            assert transport.value().startswith(b"HTTP/1.1 200 ") and transport.value().endswith(b"%d" % (size,))
            assert not transport.disconnecting
        else:
            assert transport.value().startswith(b"HTTP/1.1 408 "), transport.value()[:100]
            assert allowed <= clock.seconds() <= allowed + 1.0
            assert ("within %.1f s" % (allowed,)).encode() in transport.value()


def test_anIdleKeptAliveConnectionIsClosedSilentlyAndAHandlerIsNotTimed():
    """After a response, the next request is awaited for the deadline again:
    an idle kept-alive connection is closed without a 408. The time a
    handler takes is not counted."""
    clock, site = clockSite(requestDeadline=10.0)
    protocol, transport = openChannel(site)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert transport.value().endswith(b"ok")
    transport.clear()
    clock.advance(9.0)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting and transport.value() == b""


def test_theCountPerAddressFallsWhenConnectionsClose():
    """The per-address cap counts open connections: the third from one
    address is refused with a 503, its side closed at once and the whole
    connection when the client closes its own; a new one is taken once one of
    the two closes."""
    clock, site = clockSite(maxPerAddress=2)
    channels = [openChannel(site) for _ in range(2)]
    refused, refusedTransport = openChannel(site)
    assert refusedTransport.value().startswith(b"HTTP/1.1 503 ")
    assert refusedTransport.writeClosed and not refusedTransport.disconnecting
    refused.readConnectionLost()
    assert refusedTransport.disconnecting
    refused.connectionLost(None)
    channels[0][0].connectionLost(None)
    again, transport = openChannel(site)
    assert transport.value() == b""
    assert site.openConnections["127.0.0.1"] == 2
    clock.advance(120)
    assert transport.disconnecting


# ---- the options


def test_theConnectionOptionsHaveSafeDefaultsAndRefuseNonsense():
    """The defaults take the test suite's and the bench's 64 clients from one
    address and a total below the open-file limit; zero, negative or NaN
    values are usage errors that name the option."""
    import resource as rlimit
    options = tap.Options()
    options.parseOptions([])
    soft, _ = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    assert options["max-connections-per-address"] == 64
    assert options["request-deadline"] == 60.0 and options["min-upload-rate"] == 64 * 1024
    assert 16 <= options["max-connections"] < soft
    for args, name in ((["--max-connections-per-address", "0"], "--max-connections-per-address"),
                       (["--max-connections", "0"], "--max-connections"),
                       (["--request-deadline", "nan"], "--request-deadline"),
                       (["--request-deadline", "-1"], "--request-deadline"),
                       (["--request-deadline", "inf"], "--request-deadline"),
                       (["--min-upload-rate", "0"], "--min-upload-rate")):
        with pytest.raises(tap.usage.UsageError, match=name):
            tap.Options().parseOptions(args)
