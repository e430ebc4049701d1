"""TLS end to end: a certificate made here (self-signed, for 127.0.0.1) on a
server's ``ssl:`` listener carries a submit from ``reflq`` and the Python
client, a worker's lease, heartbeats and uploads, and a download; a client
that does not trust it is refused with a clear message, and changes nothing."""

import json
import subprocess
import sys

from test.conftest import freePort, nifilmFiles
from test.test_worker_e2e import LM, nifilmRequest

REFLQ = [sys.executable, "-m", "reflservd.cli"]


def selfSigned(folder):
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return key, cert


def test_a_submit_a_lease_and_a_download_over_tls(tmp_path, serverProcess, workerProcess):
    from reflservd.client import Client, ServerUnreachable
    key, cert = selfSigned(tmp_path)
    port = freePort()
    server = serverProcess(args=["--listen", "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s"
                                 % (port, key, cert)])
    url = "https://127.0.0.1:%d" % port

    try:
        Client(url).health()
    except ServerUnreachable as e:
        assert "CERTIFICATE_VERIFY_FAILED" in e.message
    else:
        raise AssertionError("a certificate nobody vouches for was trusted")
    assert server.api.ok("GET", "/api/v1/jobs")["total"] == 0

    request = nifilmRequest(LM)
    files = nifilmFiles()
    model = [path for name, path in files.items() if name.endswith(".py")][0]
    data = [path for name, path in files.items() if not name.endswith(".py")]
    job = Client(url, caFile=cert).submit(model, data, fit="lm", steps=200, queue="test",
                                          name=request["name"])
    done = subprocess.run(REFLQ + ["--server", url, "--ca-file", cert, "--json", "submit", model]
                          + data + ["--fit", "lm", "--queue", "test"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)["id"]

    workerProcess(server=url, args=["--ca-file", cert])
    assert server.api.waitStatus(job.id, "COMPLETE")["status"] == "COMPLETE"
    assert server.api.waitStatus(second, "COMPLETE")["status"] == "COMPLETE"
    out = tmp_path / "fetched"
    done = subprocess.run(REFLQ + ["--server", url, "--ca-file", cert, "fetch", str(job.id), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "nifilm.par").read_bytes() == server.api.download(job.id, "nifilm.par")


def test_the_worker_refuses_a_ca_file_it_cannot_use(tmp_path):
    from twisted.python import usage
    from reflworkerd.tap import Options
    notPem = tmp_path / "not.pem"
    notPem.write_text("hello\n")
    key, cert = selfSigned(tmp_path)
    cases = [("https://127.0.0.1:1/", str(tmp_path / "missing.pem"), "cannot read --ca-file"),
             ("https://127.0.0.1:1/", str(notPem), "holds no PEM certificate"),
             ("http://127.0.0.1:1/", cert, "--ca-file is for an https:// --server")]
    for server, caFile, message in cases:
        options = Options()
        try:
            options.parseOptions(["--server", server, "--queue", "q", "--ca-file", caFile,
                                  "--sandbox", "none", "--slot-uid-base", "0",
                                  "--work-dir", str(tmp_path / "w")])
        except usage.UsageError as e:
            assert message in str(e), (caFile, str(e))
        else:
            raise AssertionError("--ca-file %s with %s was taken" % (caFile, server))
    options = Options()
    options.parseOptions(["--server", "https://127.0.0.1:1/", "--queue", "q", "--ca-file", cert,
                          "--sandbox", "none", "--slot-uid-base", "0", "--work-dir", str(tmp_path / "w")])
    assert options["trust-root"] is not None
