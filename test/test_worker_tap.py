"""``twistd reflworkerd``'s plugin as data: the options ``Options`` parses
(defaults, each option's effect, the usage errors) and the service tree
``makeService`` builds on a memory reactor. No fork host starts, nothing
connects. ``--sandbox none --slot-uid-base 0`` keeps the sandbox probe and
the slot-uid checks out of the tests that are not about them."""

import os

import pytest
import twisted.test
from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from reflworkerd import sandbox, tap
from reflworkerd.jobfiles import RESULT_BYTES_QUOTA, RESULT_FILES_QUOTA
from reflworkerd.local import LocalBackend
from reflworkerd.poller import Poller
from reflworkerd.tap import DEFAULT_LIMITS, MAX_UID, SLOT_UID_BASE, Options, WorkerService, makeService

SERVER = "http://127.0.0.1:8080/"
QUOTAS = "--result-files-quota must be at least 1 and --result-bytes-quota 1M"
PEM = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")


def required(*args):
    return ["--server", SERVER, "--queue", "q"] + list(args)


def plain(workDir, *args):
    """The required options, no probe, no slot uids, the work directory in the test's tmp_path."""
    return required("--sandbox", "none", "--slot-uid-base", "0", "--work-dir", str(workDir), *args)


def parse(args):
    options = Options()
    options.parseOptions(args)
    return options


def refused(args):
    with pytest.raises(usage.UsageError) as caught:
        parse(args)
    return str(caught.value)


@pytest.fixture
def work(tmp_path):
    return tmp_path / "work"


# ---- defaults


def test_the_defaults(tmp_path, monkeypatch):
    """Only --server and --queue given: the work directory var/reflworkerd
    made absolute, one slot, a 30 s poll, drain by finishing, the local
    backend, the default limits (no process limit, the fits running as the
    worker's uid), no token, the system's trust roots."""
    monkeypatch.chdir(tmp_path)
    config = parse(required("--sandbox", "none", "--slot-uid-base", "0"))
    assert config["work-dir"] == os.path.join(str(tmp_path), "var", "reflworkerd")
    assert (config["server"], config["queue"]) == (SERVER, "q")
    assert (config["slots"], config["poll-timeout"], config["drain"], config["backend"]) == \
        (1, 30.0, "finish", "local")
    assert (config["name"], config["token"], config["trust-root"]) == (None, None, None)
    assert config["checkpoint-every"] == 60.0
    assert (config["result-files-quota"], config["result-bytes-quota"]) == \
        (RESULT_FILES_QUOTA, RESULT_BYTES_QUOTA)
    assert config["sandbox-effective"] == "none"
    assert config["slot-uids"] is None
    assert config["limits"] == {"cpu": 86400, "memory": 4 << 30, "wall": 86400.0, "fsize": 512 << 20}
    assert config["limits-described"] == "rlimits(cpu=86400s,memory=4G,fsize=512M)+wall(86400s)"


def test_as_root_each_slot_has_a_uid_and_a_process_limit(work, monkeypatch):
    """A root worker runs slot i's fits as SLOT_UID_BASE + i by default, and
    then (only then) RLIMIT_NPROC defaults to 512."""
    assert os.geteuid() == 0, "the tests run as root"
    monkeypatch.setattr(tap, "unreachable", lambda path: None)
    config = parse(required("--sandbox", "none", "--work-dir", str(work)))
    assert config["slot-uids"] == SLOT_UID_BASE == 60001
    assert config["limits"]["nproc"] == DEFAULT_LIMITS["nproc"] == 512
    assert config["limits-described"].startswith("rlimits(") and "nproc=512" in config["limits-described"]
    config = parse(required("--sandbox", "none", "--work-dir", str(work), "--slot-uid-base", "70000",
                            "--slots", "3", "--process-limit", "20"))
    assert (config["slot-uids"], config["limits"]["nproc"]) == (70000, 20)


def test_as_root_slot_uid_base_zero_runs_fits_as_root_with_a_warning(work):
    from twisted.logger import formatEvent, globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        config = parse(plain(work))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert config["slot-uids"] is None and "nproc" not in config["limits"]
    assert any("--slot-uid-base 0: fits run as root" in formatEvent(e) for e in events)


def test_as_root_without_a_sandbox_the_slot_uid_must_reach_python_and_the_work_dir(work, monkeypatch):
    """With --sandbox none a fit sees the host's files as its slot uid: a
    directory on the way that others cannot enter is a usage error naming it."""
    seen = []
    monkeypatch.setattr(tap, "unreachable", lambda path: seen.append(path) or "/closed")
    message = refused(required("--sandbox", "none", "--work-dir", str(work)))
    assert "--slot-uid-base 60001" in message and "/closed" in message
    assert os.path.join(str(work), "jobs") in seen


def test_not_as_root_fits_run_as_the_workers_uid(work, monkeypatch):
    """A worker that is not root cannot change uid: no slot uids (whatever
    --slot-uid-base says), no default process limit, no reachability check."""
    monkeypatch.setattr(tap.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tap, "unreachable", lambda path: "/closed")
    for base in ([], ["--slot-uid-base", "70000"]):
        config = parse(required("--sandbox", "none", "--work-dir", str(work), *base))
        assert config["slot-uids"] is None
        assert "nproc" not in config["limits"]
    assert parse(required("--sandbox", "none", "--work-dir", str(work), "--process-limit", "9")
                 )["limits"]["nproc"] == 9


@pytest.mark.parametrize("args", [["--slot-uid-base", "-1"],
                                  ["--slot-uid-base", str(MAX_UID), "--slots", "2"]])
def test_a_slot_uid_base_without_room_is_refused(work, args):
    message = refused(required("--sandbox", "none", "--work-dir", str(work), *args))
    assert message.startswith("--slot-uid-base must be 0 (off) or a uid with room for")


def test_the_last_uid_is_a_slot_uid_base_for_one_slot(work, monkeypatch):
    monkeypatch.setattr(tap, "unreachable", lambda path: None)
    config = parse(required("--sandbox", "none", "--work-dir", str(work), "--slot-uid-base", str(MAX_UID)))
    assert config["slot-uids"] == MAX_UID


# ---- each option


@pytest.mark.parametrize("args, name, value", [
    (["--slots", "4"], "slots", 4),
    (["--poll-timeout", "60"], "poll-timeout", 60.0),
    (["--poll-timeout", "0.5"], "poll-timeout", 0.5),
    (["--drain", "release"], "drain", "release"),
    (["--drain", "finish"], "drain", "finish"),
    (["--name", "node7:1"], "name", "node7:1"),
    (["--checkpoint-every", "5"], "checkpoint-every", 5.0),
    (["--result-files-quota", "10"], "result-files-quota", 10),
    (["--result-bytes-quota", "1.5G"], "result-bytes-quota", 3 << 29),
    (["--result-bytes-quota", "1M"], "result-bytes-quota", 1 << 20),
    (["--backend", "local"], "backend", "local"),
    (["-s", "https://refl.example.org", "-q", "cluster.a-1_b"], "queue", "cluster.a-1_b"),
])
def test_each_option_sets_its_value(work, args, name, value):
    config = parse(plain(work, *args))
    assert config[name] == value
    assert type(config[name]) is type(value)


def test_a_relative_work_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse(required("--sandbox", "none", "--slot-uid-base", "0", "-w", "w/here"))
    assert config["work-dir"] == str(tmp_path / "w" / "here")


@pytest.mark.parametrize("args, limits", [
    (["--memory-limit", "2G"], {"memory": 2 << 30}),
    (["--memory-limit", "1024K"], {"memory": 1 << 20}),
    (["--memory-limit", "512MiB"], {"memory": 512 << 20}),
    (["--memory-limit", "3000000000"], {"memory": 3000000000}),
    (["--memory-limit", "1T"], {"memory": 1 << 40}),
    (["--file-size-limit", "10M"], {"fsize": 10 << 20}),
    (["--file-size-limit", "1.5g"], {"fsize": 3 << 29}),
    (["--cpu-limit", "90"], {"cpu": 90}),
    (["--cpu-limit", "1.5"], {"cpu": 2}),
    (["--wall-limit", "90.5"], {"wall": 90.5}),
    (["--process-limit", "8"], {"nproc": 8}),
])
def test_limits(work, args, limits):
    """Sizes take K/M/G/T (powers of 1024, an optional i and B); CPU seconds
    are rounded up to whole seconds; each limit replaces only its default."""
    config = parse(plain(work, *args))
    expected = dict(DEFAULT_LIMITS)
    del expected["nproc"]
    expected.update(limits)
    assert config["limits"] == expected


def test_the_limits_are_described_for_the_log(work):
    config = parse(plain(work, "--memory-limit", "1G", "--process-limit", "4", "--wall-limit", "10"))
    assert config["limits-described"] == "rlimits(cpu=86400s,memory=1G,fsize=512M,nproc=4)+wall(10s)"


def test_the_token_file_is_read_and_stripped(work, tmp_path):
    path = tmp_path / "token"
    path.write_text("  the-token \n\n")
    assert parse(plain(work, "--token-file", str(path)))["token"] == "the-token"


def test_a_token_file_that_cannot_be_read_or_is_empty_is_refused(work, tmp_path):
    missing = str(tmp_path / "missing")
    assert refused(plain(work, "--token-file", missing)).startswith("cannot read --token-file %s: " % missing)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    assert refused(plain(work, "--token-file", str(empty))) == "--token-file %s is empty" % (empty,)


def test_ca_file_with_https_is_the_trust_root(work):
    """--ca-file's certificates become the trust root of the HTTPS agent
    (test_tls.py has the files it refuses)."""
    from twisted.internet.ssl import trustRootFromCertificates
    config = parse(plain(work, "--server", "https://127.0.0.1:8443/", "--ca-file", PEM))
    assert type(config["trust-root"]) is type(trustRootFromCertificates([]))


def test_ca_file_with_http_is_refused(work):
    assert refused(plain(work, "--ca-file", PEM)) == "--ca-file is for an https:// --server"


# ---- the sandbox


def test_sandbox_auto_takes_the_strongest_confinement_this_host_has(work):
    if sandbox.choose("auto") == "none":
        pytest.skip("this host cannot confine fits in namespaces")
    config = parse(required("--work-dir", str(work)))
    assert config["sandbox"] == "auto"
    assert config["sandbox-effective"] in ("apparmor", "namespaces")
    assert config["slot-uids"] == SLOT_UID_BASE and config["limits"]["nproc"] == 512


def test_sandbox_auto_without_confinement_needs_allow_unconfined(work, monkeypatch):
    """Where auto finds no namespaces the worker refuses to start unless
    --allow-unconfined says to run fits with --sandbox none's protection."""
    monkeypatch.setattr(sandbox, "choose", lambda mode: "none")
    message = refused(required("--work-dir", str(work), "--slot-uid-base", "0"))
    assert message.startswith("--sandbox=auto: this host cannot confine fits")
    assert "--allow-unconfined" in message
    config = parse(required("--work-dir", str(work), "--slot-uid-base", "0", "--allow-unconfined"))
    assert (config["sandbox-effective"], config["allow-unconfined"]) == ("none", 1)


def test_a_sandbox_the_host_cannot_give_is_a_usage_error(work, monkeypatch):
    def choose(mode):
        raise sandbox.SandboxUnavailable("no apparmor here")
    monkeypatch.setattr(sandbox, "choose", choose)
    assert refused(required("--work-dir", str(work), "--sandbox", "apparmor")) == \
        "--sandbox=apparmor: no apparmor here"


def test_an_unknown_sandbox_mode_is_refused(work):
    message = refused(required("--work-dir", str(work), "--sandbox", "chroot", "--slot-uid-base", "0"))
    assert message.startswith("--sandbox=chroot: unknown sandbox mode")


# ---- usage errors


@pytest.mark.parametrize("args, message", [
    (["--queue", "q"], "--server URL is required"),
    (["--server", SERVER], "--queue NAME is required"),
    (["--server", SERVER, "--queue", ""], "--queue NAME is required"),
])
def test_server_and_queue_are_required(work, args, message):
    assert refused(args + ["--sandbox", "none", "--slot-uid-base", "0", "--work-dir", str(work)]) == message


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://127.0.0.1/", "http://", "https:///jobs",
                                 "refl.example.org"])
def test_the_server_is_an_http_or_https_url(work, url):
    assert refused(plain(work, "--server", url)) == \
        "--server takes an http:// or https:// URL, not %r" % (url,)


@pytest.mark.parametrize("name", ["a b", "../q", "q/r", "x" * 101, "q:1", " ", "é", "q²"])
def test_a_bad_queue_name_is_refused(work, name):
    assert refused(plain(work, "--queue", name)) == "a queue name is 1-100 letters, digits, '-', '_' or '.'"


def test_a_hundred_character_queue_name_is_taken(work):
    assert parse(plain(work, "--queue", "x" * 100))["queue"] == "x" * 100


@pytest.mark.parametrize("backend, message", [
    ("docker", "--backend is local or slurm, not 'docker'"),
    ("", "--backend is local or slurm, not ''"),
])
def test_only_the_local_and_slurm_backends(work, backend, message):
    assert refused(plain(work, "--backend", backend)) == message


def test_the_slurm_options(work, tmp_path):
    """--backend slurm: its options as data; the shared directory holds the jobs."""
    shared = tmp_path / "shared"
    options = parse(plain(work, "--backend", "slurm", "--shared-dir", str(shared),
                          "--slurm-partition", "batch", "--slurm-account", "refl",
                          "--slurm-cpus-per-job", "4", "--slurm-time", "2:00:00",
                          "--slurm-extra", "--qos=low --constraint='a b'", "--slurm-poll", "5"))
    assert (options["backend"], options["slurm-partition"], options["slurm-account"]) == ("slurm", "batch", "refl")
    assert (options["slurm-cpus-per-job"], options["slurm-time"], options["slurm-poll"]) == (4, "2:00:00", 5.0)
    assert options["slurm-extra-args"] == ["--qos=low", "--constraint=a b"]
    assert options["shared-dir"] == options["work-dir"] == str(shared)


@pytest.mark.parametrize("args, message", [
    (["--backend", "slurm", "--slurm-partition", "p"],
     "--backend slurm needs --shared-dir DIR, a directory the compute nodes share"),
    (["--backend", "slurm", "--shared-dir", "/srv/shared"], "--backend slurm needs --slurm-partition NAME"),
    (["--backend", "slurm", "--shared-dir", "/srv/shared", "--slurm-partition", "p",
      "--slurm-cpus-per-job", "0"], "--slurm-cpus-per-job must be at least 1"),
    (["--backend", "slurm", "--shared-dir", "/srv/shared", "--slurm-partition", "p",
      "--slurm-extra", "--comment='open"], "--slurm-extra: No closing quotation"),
    (["--slurm-partition", "p"], "--slurm-partition is for --backend slurm"),
    (["--shared-dir", "/srv/shared"], "--shared-dir is for --backend slurm"),
])
def test_slurm_usage_errors(work, args, message):
    assert refused(plain(work, *args)) == message


@pytest.mark.parametrize("args, message", [
    (["--slots", "0"], "--slots must be at least 1"),
    (["--poll-timeout", "0"], "--poll-timeout must be in (0, 60] seconds"),
    (["--poll-timeout", "60.5"], "--poll-timeout must be in (0, 60] seconds"),
    (["--poll-timeout", "nan"], "--poll-timeout must be in (0, 60] seconds"),
    (["--drain", "abandon"], "--drain is finish or release, not 'abandon'"),
    (["--memory-limit", "1023K"], "--memory-limit below 1 MB leaves a fit no room to start"),
    (["--file-size-limit", "100"], "--file-size-limit below 1 MB leaves a fit no room for its results"),
    (["--process-limit", "0"], "--process-limit must be at least 1"),
    (["--result-files-quota", "0"], QUOTAS),
    (["--result-bytes-quota", "1023K"], QUOTAS),
])
def test_values_out_of_range(work, args, message):
    assert refused(plain(work, *args)) == message


@pytest.mark.parametrize("args", [
    ["--cpu-limit", "0"], ["--cpu-limit", "-1"], ["--cpu-limit", "nan"], ["--wall-limit", "0"],
    ["--checkpoint-every", "0"], ["--memory-limit", "2X"], ["--memory-limit", "-1G"],
    ["--file-size-limit", "lots"], ["--slots", "two"], ["--poll-timeout", "soon"],
    ["--no-such-option"],
])
def test_values_of_the_wrong_kind_are_usage_errors(work, args):
    assert refused(plain(work, *args))


@pytest.mark.parametrize("option", ["--cpu-limit", "--wall-limit", "--checkpoint-every"])
def test_an_infinite_limit_is_a_usage_error(work, option):
    assert "must be a positive number" in refused(plain(work, option, "inf"))


# ---- the service tree


def test_the_service_tree(work):
    """makeService: a WorkerService whose children are the backend (the
    local LocalBackend) then the poller that leases fits for it, on the reactor
    given, with the options passed through; nothing starts or connects."""
    reactor = MemoryReactorClock()
    config = parse(plain(work, "--slots", "3", "--poll-timeout", "12", "--drain", "release",
                         "--name", "w1", "--checkpoint-every", "7", "--memory-limit", "1G",
                         "--result-files-quota", "11", "--result-bytes-quota", "2M", "--queue", "cl"))
    top = makeService(config, reactor=reactor)
    assert isinstance(top, WorkerService)
    assert [child.name for child in top] == ["backend", "poller"]
    backend, poller = list(top)
    assert isinstance(backend, LocalBackend) and isinstance(poller, Poller)
    assert poller.backend is backend
    assert poller.reactor is reactor and backend._reactor is reactor
    assert (backend.sandboxMode, backend.limits, backend.checkpointEvery) == \
        ("none", config["limits"], 7.0)
    assert backend.limits["memory"] == 1 << 30
    assert (poller.queueName, poller.workDir, poller.slots, poller.pollTimeout, poller.drain,
            poller.workerName, poller.slotUidBase, poller.checkpointEvery) == \
        ("cl", str(work), 3, 12.0, "release", "w1", None, 7.0)
    assert (poller.resultFilesQuota, poller.resultBytesQuota) == (11, 2 << 20)
    assert (poller.client.baseURL, poller.client.token) == (SERVER.rstrip("/"), None)
    assert not top.running and backend.pid is None
    assert reactor.tcpClients == [] and reactor.sslClients == [] and reactor.getDelayedCalls() == []


def test_the_http_client_pools_a_connection_per_slot_and_two(work, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3\n")
    config = parse(plain(work, "--slots", "4", "--token-file", str(token),
                         "--server", "https://refl.example.org/", "--ca-file", PEM))
    client = makeService(config, reactor=MemoryReactorClock()).getServiceNamed("poller").client
    agent = client.http._agent
    assert agent._pool.maxPersistentPerHost == 6 and agent._pool.persistent
    assert agent._pool._factory.noisy is False
    assert agent._endpointFactory._policyForHTTPS._trustRoot is config["trust-root"]
    assert (client.baseURL, client.token) == ("https://refl.example.org", "s3")


def test_a_fatal_poller_stops_a_running_reactor(work):
    reactor = MemoryReactorClock()
    poller = makeService(parse(plain(work)), reactor=reactor).getServiceNamed("poller")
    poller.onFatal("not running yet")
    assert not reactor.hasStopped
    reactor.running = True
    poller.onFatal("the work directory is gone")
    assert reactor.hasStopped and not reactor.running


class Child(service.Service):
    def __init__(self, name, log):
        self.setName(name)
        self.log = log
        self.stopping = None

    def stopService(self):
        service.Service.stopService(self)
        self.log.append(self.name)
        self.stopping = defer.Deferred()
        return self.stopping


def test_the_worker_stops_its_children_last_first_one_after_another():
    """The poller (last) stops first, and the backend only once the poller's
    stop has finished: the fits drain before the backend that runs them goes."""
    log = []
    top = WorkerService()
    backend, poller = Child("backend", log), Child("poller", log)
    backend.setServiceParent(top)
    poller.setServiceParent(top)
    top.startService()
    done = top.stopService()
    assert log == ["poller"] and not top.running
    poller.stopping.callback(None)
    assert log == ["poller", "backend"]
    assert not done.called
    backend.stopping.callback(None)
    assert done.called


def test_a_child_that_fails_to_stop_does_not_keep_the_others_running():
    log = []
    top = WorkerService()
    backend, poller = Child("backend", log), Child("poller", log)
    backend.setServiceParent(top)
    poller.setServiceParent(top)
    top.startService()
    done = top.stopService()
    poller.stopping.errback(RuntimeError("drain failed"))
    assert log == ["poller", "backend"]
    backend.stopping.callback(None)
    assert done.called
    results = []
    done.addBoth(results.append)
    assert results == [None]
