"""``twistd reflservd``'s plugin as data: the options ``Options`` parses
(defaults, each option's effect, the usage errors) and the service tree
``makeService`` builds on a memory reactor. Nothing listens, nothing starts."""

import os

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from reflservd import limits, tap
from reflservd.access import ANY_QUEUE, digest
from reflservd.listen import GuardedListeners
from reflservd.notify import Notifier
from reflservd.queue import LEGACY_LEASE_TIMEOUT
from reflservd.server import QueueServer
from reflservd.tap import DEFAULT_LISTEN, Options, defaultMaxConnections, makeService

LOCAL_HOSTS = frozenset(["localhost", "127.0.0.1", "::1"])


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def refused(*args):
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    return str(caught.value)


def secret(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


# ---- options


def test_the_defaults(tmp_path, monkeypatch):
    """With no options: one loopback listener, the state directory
    var/reflservd made absolute, the documented limits, no tokens, no mail,
    and only local Host names answered."""
    monkeypatch.chdir(tmp_path)
    config = parse()
    assert config["listen"] == [DEFAULT_LISTEN] == ["tcp:8080:interface=127.0.0.1"]
    assert config["state-dir"] == os.path.join(str(tmp_path), "var", "reflservd")
    assert os.path.isabs(config["state-dir"])
    assert {name: config[name] for name in (
        "max-upload", "lease-timeout", "legacy-lease-timeout", "max-attempts", "snapshot-every",
        "max-files", "max-file-bytes", "max-result-files", "max-result-bytes", "max-pending",
        "submits-per-minute", "max-connections-per-address", "request-deadline",
        "min-upload-rate", "open-workers", "salvage")} == {
        "max-upload": 200 << 20, "lease-timeout": 60.0, "legacy-lease-timeout": LEGACY_LEASE_TIMEOUT,
        "max-attempts": 3, "snapshot-every": 100_000, "max-files": limits.MAX_FILES,
        "max-file-bytes": 200 << 20, "max-result-files": 1000, "max-result-bytes": 1 << 30,
        "max-pending": 500, "submits-per-minute": 120, "max-connections-per-address": 64,
        "request-deadline": 60.0, "min-upload-rate": 64 * 1024, "open-workers": 0, "salvage": 0}
    assert config["max-connections"] == defaultMaxConnections() >= 16
    assert config["smtp"] is None and config["smtp-from"] == "reflservd@localhost"
    assert config["base-url"] is None
    access = config["access"]
    assert (access.workerTokens, access.adminTokens, access.submitTokens) == (None, None, None)
    assert access.trustedProxies == frozenset()
    assert access.publicHosts == LOCAL_HOSTS


@pytest.mark.parametrize("args, name, value", [
    (["--state-dir", "/srv/refl"], "state-dir", "/srv/refl"),
    (["-d", "/srv/refl"], "state-dir", "/srv/refl"),
    (["--max-upload", "1000"], "max-upload", 1000),
    (["--lease-timeout", "2.5"], "lease-timeout", 2.5),
    (["--legacy-lease-timeout", "7"], "legacy-lease-timeout", 7.0),
    (["--max-attempts", "1"], "max-attempts", 1),
    (["--snapshot-every", "10"], "snapshot-every", 10),
    (["--max-files", "5"], "max-files", 5),
    (["--max-file-bytes", "100"], "max-file-bytes", 100),
    (["--max-result-files", "9"], "max-result-files", 9),
    (["--max-result-bytes", "4096"], "max-result-bytes", 4096),
    (["--max-pending", "0"], "max-pending", 0),
    (["--submits-per-minute", "0"], "submits-per-minute", 0),
    (["--max-connections", "40"], "max-connections", 40),
    (["--max-connections-per-address", "3"], "max-connections-per-address", 3),
    (["--request-deadline", "0.5"], "request-deadline", 0.5),
    (["--min-upload-rate", "1"], "min-upload-rate", 1),
    (["--smtp", "mail.example.org:25"], "smtp", "mail.example.org:25"),
    (["--smtp", "[::1]:2525"], "smtp", "[::1]:2525"),
    (["--smtp-from", "queue@example.org"], "smtp-from", "queue@example.org"),
    (["--base-url", "https://refl.example.org/"], "base-url", "https://refl.example.org/"),
    (["--salvage"], "salvage", 1),
    (["--open-workers"], "open-workers", 1),
])
def test_each_option_sets_its_value(args, name, value):
    """Each option lands in the config under its name, coerced to its type."""
    config = parse(*args)
    assert config[name] == value
    assert type(config[name]) is type(value)


def test_a_relative_state_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("--state-dir", "here/state")["state-dir"] == str(tmp_path / "here" / "state")


def test_listen_given_twice_keeps_both_in_order_and_drops_the_default():
    """Each --listen (or -l) adds a listener, in the order given; the default
    listener is there only when none is given."""
    config = parse("--listen", "tcp:8081:interface=127.0.0.1", "-l", "unix:/run/refl.sock")
    assert config["listen"] == ["tcp:8081:interface=127.0.0.1", "unix:/run/refl.sock"]
    assert parse()["listen"] == [DEFAULT_LISTEN]


def test_a_second_options_object_does_not_share_the_first_ones_listeners():
    parse("--listen", "tcp:8081:interface=127.0.0.1")
    assert parse()["listen"] == [DEFAULT_LISTEN]


@pytest.mark.parametrize("endpoint", ["tcp:8080", "tcp:8080:interface=0.0.0.0",
                                      "tcp:8080:interface=192.0.2.7",
                                      "ssl:8443:privateKey=k.pem:certKey=c.pem"])
def test_a_listener_beyond_loopback_needs_worker_tokens(endpoint):
    """Without --worker-token-file or --open-workers, a listener others can
    reach is a usage error that names it and both ways out."""
    message = refused("--listen", "tcp:8081:interface=127.0.0.1", "--listen", endpoint)
    assert endpoint in message
    assert "--worker-token-file" in message and "--open-workers" in message


@pytest.mark.parametrize("endpoint", ["tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.9.9.9",
                                      "tcp:8080:interface=localhost", "unix:/run/refl.sock",
                                      "tcp:interface=127.0.0.1:port=8080"])
def test_a_loopback_or_unix_listener_needs_no_tokens(endpoint):
    """Loopback and UNIX listeners start without worker tokens and answer
    only the local Host names."""
    config = parse("--listen", endpoint)
    assert config["access"].workerTokens is None
    assert config["access"].publicHosts == LOCAL_HOSTS


def test_beyond_loopback_with_tokens_or_open_workers(tmp_path):
    """--worker-token-file or --open-workers lets a listener reach the
    network; then any Host name is answered unless --public-host says which
    (lower-cased, blanks dropped)."""
    tokens = secret(tmp_path / "workers", "cluster-a sekrit-a\n# a comment\n\nbare-token\n")
    config = parse("--listen", "tcp:8080", "--worker-token-file", tokens)
    assert config["access"].workerTokens == {digest("sekrit-a"): "cluster-a",
                                             digest("bare-token"): ANY_QUEUE}
    assert config["access"].publicHosts is None
    config = parse("--listen", "tcp:8080", "--open-workers", "--public-host", "Refl.Example.org, ,b.org")
    assert config["access"].workerTokens is None
    assert config["access"].publicHosts == frozenset(["refl.example.org", "b.org"])


def test_public_host_and_trusted_proxy_on_loopback():
    """--public-host replaces the local names; --trusted-proxy is a comma list."""
    config = parse("--public-host", "refl.example.org", "--trusted-proxy", "10.0.0.1, 10.0.0.2,")
    assert config["access"].publicHosts == frozenset(["refl.example.org"])
    assert config["access"].trustedProxies == frozenset(["10.0.0.1", "10.0.0.2"])


def test_admin_and_submit_token_files(tmp_path):
    """The admin and submit token files are read into the access rules by digest."""
    admin = secret(tmp_path / "admin", "alice admin-secret\n")
    submit = secret(tmp_path / "submit", "bob submit-secret\nsolo\n")
    config = parse("--admin-token-file", admin, "--submit-token-file", submit)
    assert config["access"].adminTokens == {digest("admin-secret"): "alice"}
    assert config["access"].submitTokens == {digest("submit-secret"): "bob", digest("solo"): ANY_QUEUE}
    assert config["access"].workerTokens is None


@pytest.mark.parametrize("option", ["--worker-token-file", "--admin-token-file", "--submit-token-file"])
def test_a_token_file_that_cannot_be_used_is_a_usage_error(tmp_path, option):
    """Missing, readable by others, or holding no token: refused with the reason."""
    assert "cannot read" in refused(option, str(tmp_path / "missing"))
    assert "chmod 600" in refused(option, secret(tmp_path / "open", "t\n", mode=0o644))
    assert "holds no token" in refused(option, secret(tmp_path / "empty", "# none\n\n"))
    assert "line 1" in refused(option, secret(tmp_path / "three", "a b c\n"))


@pytest.mark.parametrize("name", ["max-upload", "max-attempts", "snapshot-every", "max-files",
                                  "max-file-bytes", "max-result-files", "max-result-bytes",
                                  "max-connections-per-address", "min-upload-rate",
                                  "max-connections"])
def test_counts_below_one_are_refused(name):
    assert refused("--" + name, "0") == "--%s must be at least 1" % (name,)
    assert refused("--" + name, "-5") == "--%s must be at least 1" % (name,)
    parse("--" + name, "1")


@pytest.mark.parametrize("name", ["max-pending", "submits-per-minute"])
def test_no_limit_is_zero_and_below_is_refused(name):
    assert refused("--" + name, "-1") == "--%s must be 0 (no limit) or more" % (name,)


@pytest.mark.parametrize("name", ["lease-timeout", "legacy-lease-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeouts_must_be_positive(name, value):
    assert refused("--" + name, value) == "--%s must be positive" % (name,)


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan"])
def test_the_request_deadline_is_a_finite_positive_number(value):
    assert "--request-deadline must be a positive number" in refused("--request-deadline", value)


@pytest.mark.parametrize("value", ["mail.example.org", "mail.example.org:", ":25", "mail:smtp"])
def test_smtp_takes_host_and_port(value):
    assert refused("--smtp", value) == "--smtp takes HOST:PORT"


@pytest.mark.parametrize("args", [["--max-upload", "2G"], ["--lease-timeout", "soon"],
                                  ["--max-connections", "many"], ["--no-such-option"]])
def test_values_of_the_wrong_type_and_unknown_options_are_usage_errors(args):
    refused(*args)


def test_a_repeated_interface_is_judged_by_the_one_twisted_binds():
    refused("--listen", "tcp:8080:interface=127.0.0.1:interface=0.0.0.0")


def test_an_ipv6_loopback_listener_needs_no_tokens():
    assert parse("--listen", r"tcp6:8080:interface=\:\:1")["access"].publicHosts == LOCAL_HOSTS


# ---- the service tree


def test_the_service_tree_of_one_listener(tmp_path):
    """makeService: the queue first, then the web listener, on the reactor it
    is given; nothing is started and nothing listens yet."""
    reactor = MemoryReactorClock()
    config = parse("--state-dir", str(tmp_path / "state"), "--lease-timeout", "5",
                   "--max-attempts", "2", "--snapshot-every", "50", "--legacy-lease-timeout", "9",
                   "--salvage", "--max-files", "4", "--max-pending", "7")
    top = makeService(config, reactor=reactor)
    assert [child.name for child in top] == ["queue", "web"]
    queue, web = list(top)
    assert isinstance(queue, QueueServer)
    assert queue.reactor is reactor
    assert queue.stateDir == str(tmp_path / "state")
    assert (queue.leaseTimeout, queue.legacyLeaseTimeout, queue.maxAttempts,
            queue.snapshotEvery, queue.salvage) == (5.0, 9.0, 2, 50, 1)
    assert (queue.quotas.maxFiles, queue.quotas.maxPending, queue.quotas.maxJobBytes) == (4, 7, 200 << 20)
    assert queue.notifier is None and queue.metrics is not None
    assert isinstance(web, StreamServerEndpointService)
    assert isinstance(web.endpoint, TCP4ServerEndpoint)
    assert (web.endpoint._port, web.endpoint._interface) == (8080, "127.0.0.1")
    assert isinstance(web.endpoint._reactor, GuardedListeners)
    assert web.endpoint._reactor._reactor is reactor
    assert not top.running and not queue.running and not web.running
    assert reactor.tcpServers == [] and reactor.unixServers == []


def test_the_site_carries_the_options(tmp_path):
    reactor = MemoryReactorClock()
    config = parse("--state-dir", str(tmp_path), "--max-upload", "1000", "--max-connections", "30",
                   "--max-connections-per-address", "3", "--request-deadline", "12",
                   "--min-upload-rate", "100")
    site = makeService(config, reactor=reactor).getServiceNamed("web").factory
    assert site.access is config["access"]
    assert site.reactor is reactor
    assert (site.maxBody, site.maxConnections, site.maxPerAddress, site.requestDeadline,
            site.minUploadRate) == (1000 + (1 << 20), 30, 3, 12.0, 100)


def test_each_listener_is_a_web_child_in_order_sharing_one_site(tmp_path):
    """Listeners are named web, web-2, web-3 … in the order of --listen, after
    the queue, and serve the one site."""
    reactor = MemoryReactorClock()
    socket = str(tmp_path / "refl.sock")
    config = parse("--state-dir", str(tmp_path), "--listen", "tcp:8081:interface=127.0.0.1",
                   "--listen", "unix:" + socket, "--listen", r"tcp6:8082:interface=\:\:1",
                   "--open-workers")
    top = makeService(config, reactor=reactor)
    assert [child.name for child in top] == ["queue", "web", "web-2", "web-3"]
    webs = list(top)[1:]
    assert all(isinstance(web, StreamServerEndpointService) for web in webs)
    assert [type(web.endpoint) for web in webs] == [TCP4ServerEndpoint, UNIXServerEndpoint,
                                                    TCP6ServerEndpoint]
    assert webs[0].endpoint._port == 8081
    assert webs[1].endpoint._address == socket
    assert (webs[2].endpoint._port, webs[2].endpoint._interface) == (8082, "::1")
    assert len({id(web.factory) for web in webs}) == 1
    assert reactor.tcpServers == [] and reactor.unixServers == []


def test_smtp_gives_the_queue_a_notifier(tmp_path):
    config = parse("--state-dir", str(tmp_path), "--smtp", "mail.example.org:2525")
    queue = makeService(config, reactor=MemoryReactorClock()).getServiceNamed("queue")
    assert isinstance(queue.notifier, Notifier)


def test_default_max_connections_is_half_the_files_left(monkeypatch):
    """Half of the soft RLIMIT_NOFILE past 64, at least 16; an unlimited soft
    limit counts as 2**20."""
    unlimited = tap.resource.RLIM_INFINITY
    for soft, expected in ((1024, 480), (100, 18), (80, 16), (unlimited, ((1 << 20) - 64) // 2)):
        monkeypatch.setattr(tap.resource, "getrlimit", lambda which, soft=soft: (soft, soft))
        assert defaultMaxConnections() == expected


# ---- batch mode


def test_batch_mode_runs_the_slurm_worker_in_the_server(tmp_path):
    """--batch-queue slurm: the worker's own options from --batch-options (the
    slurm backend, its queue named for it), a 'batch' child after the listeners;
    it would reach the server on loopback, so 127.0.0.1 is an accepted Host."""
    from reflservd.batch import BatchWorker

    config = parse("--state-dir", str(tmp_path / "state"), "--batch-queue", "slurm",
                   "--batch-options", "--slurm-partition debug --shared-dir '%s' --slots 3 "
                   "--sandbox none --slot-uid-base 0" % (tmp_path / "shared"))
    worker = config["batch-worker"]
    assert (worker["backend"], worker["queue"], worker["slurm-partition"], worker["slots"]) == (
        "slurm", "slurm", "debug", 3)
    assert worker["work-dir"] == str(tmp_path / "shared")
    assert "127.0.0.1" in config["access"].publicHosts
    top = makeService(config, reactor=MemoryReactorClock())
    assert [child.name for child in top] == ["queue", "web", "batch"]
    assert isinstance(top.getServiceNamed("batch"), BatchWorker)


@pytest.mark.parametrize("args, message", [
    (["--batch-queue", "pbs"], "--batch-queue is slurm, not 'pbs'"),
    (["--batch-queue", "slurm", "--batch-options", "--shared-dir /srv"],
     "--batch-options: --backend slurm needs --slurm-partition NAME"),
    (["--batch-queue", "slurm", "--batch-options", "--server http://elsewhere/ --slurm-partition p"],
     "--batch-options: --server is set by the server in batch mode"),
    (["--batch-queue", "slurm", "--batch-options", "--slurm-partition 'p"],
     "--batch-options: No closing quotation"),
    (["--batch-options", "--slots 2"], "--batch-options is for --batch-queue"),
])
def test_batch_mode_usage_errors(tmp_path, args, message):
    assert refused("--state-dir", str(tmp_path), *args) == message
