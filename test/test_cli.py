"""``reflq`` against a real server: the commands, their output, their exit
codes (0 done, 1 ERROR/CANCEL, 2 usage, 3 unreachable, 4 unknown job) and
one-line errors. Some tests run the installed console script as a process
(what a user runs); the rest call ``main()`` in this process."""

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error

from reflservd import cli
from reflservd.client import Client
from reflservd.clientfiles import KeyStore
from test.conftest import freePort
from test.support import RESULT, reaped, resultFiles, runInThread, writeModel

REFLQ = os.path.join(os.path.dirname(sys.executable), "reflq")


class TTY(io.StringIO):
    """A stderr that says it is a terminal, to see the live progress line."""

    def isatty(self):
        return True


def reflq(server, *argv, stderr=None):
    """Run ``main()`` in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
    code = cli.main(["--server", server.url] + list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def reflqProcess(url, *argv, **kwargs):
    env = dict(os.environ, REFLQ_SERVER=url)
    env.pop("REFLQ_DEBUG", None)
    return subprocess.run([REFLQ] + list(argv), env=env, capture_output=True, text=True, timeout=120, **kwargs)


def test_submitPrintsTheJobAndWarnsOfUnlistedDataFiles(server, worker, tmp_path):
    """``reflq submit`` (the console script, server from REFLQ_SERVER) prints
    the job's id and page, and warns about a file in the model's folder that
    the script names through a %d pattern but that was not sent."""
    worker.drain()
    modelPath, dataPaths = writeModel(str(tmp_path / "fit"), ("nifilm-1.dat", "nifilm-2.dat", "nifilm-3.dat"))
    with open(modelPath, "w") as f:
        f.write('files = ["nifilm-%d.dat" % i for i in (1, 2, 3)]\nother = "notes.txt"\n')
    done = reflqProcess(server.url, "submit", modelPath, dataPaths[0], dataPaths[1], "--fit", "lm",
                        "--steps", "20", "--name", "ni film")
    assert done.returncode == 0, done.stderr
    jobId = int(done.stdout.split()[1])
    assert done.stdout.strip() == "job %d submitted: %s/jobs/%d" % (jobId, server.url, jobId)
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "nifilm-3.dat" in warnings[0]
    request = Client(server.url).job(jobId).record["request"]
    assert request["name"] == "ni film"
    assert request["data"]["options"] == {"fit": "lm", "steps": 20}
    Client(server.url).job(jobId).cancel()


def test_submitWaitShowsProgressAndEndsZeroWhenComplete(server, worker, model):
    """``submit --wait`` follows the job to COMPLETE: exit 0, the live line
    on a terminal shows step/total and χ², the summary gives χ²."""
    worker.drain()
    join = runInThread(lambda: worker.runFit(worker.lease()))
    err = TTY()
    code, out, _ = reflq(server, "submit", model[0], *model[1], "--fit", "lm", "--steps", "3", "--wait",
                         stderr=err)
    join()
    assert code == 0
    assert "step 2/3" in err.getvalue() and "χ²" in err.getvalue()
    assert "[################........] step 2/3" in err.getvalue()
    last = out.strip().splitlines()[-1]
    assert last.startswith("job ") and "COMPLETE" in last and "χ² 1.031" in last


def test_waitEndsOneWithTheErrorWhenTheJobFails(server, worker, model):
    """``reflq wait`` on a job that ends ERROR exits 1 and says why in one line."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])

    def fail():
        lease = worker.lease()
        worker.heartbeat(lease, {"step": 1, "chisq": 3.0, "elapsed": 0.1})
        worker.complete(lease, "ERROR", error="Traceback ...\nNameError: name 'nikel' is not defined")

    join = runInThread(fail)
    code, out, err = reflq(server, "wait", str(job.id))
    join()
    assert code == 1
    assert "job %d ERROR" % (job.id,) in out
    assert "reflq: job %d failed: NameError: name 'nikel' is not defined" % (job.id,) in err.splitlines()


def test_statusJSONIsTheRecordAndStatusTextShowsTheParameters(server, worker, model):
    """``status --json`` prints the job record; the text form lists the
    parameters with their uncertainties; a COMPLETE job exits 0."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    worker.runFit(worker.lease())
    code, out, _ = reflq(server, "status", str(job.id), "--json")
    assert code == 0
    record = json.loads(out)
    assert record["id"] == job.id and record["status"] == "COMPLETE"
    assert record["result"]["chisq"] == RESULT["chisq"]
    code, out, _ = reflq(server, "status", str(job.id))
    assert code == 0
    assert "Ni thickness  100.12 ± 0.31" in out
    assert "confinement  namespaces+rlimits" in out
    assert "queue        q" in out


def test_unknownJobExitsFourWithOneLine(server):
    """A job the server does not have: exit 4, one line, no traceback."""
    done = reflqProcess(server.url, "status", "987654")
    assert done.returncode == 4
    assert done.stderr.strip() == "reflq: no job 987654"
    assert done.stdout == ""


def test_unreachableServerExitsThreeWithOneLine():
    """Nothing listening: exit 3, one line naming the server, no traceback."""
    url = "http://127.0.0.1:%d" % (freePort(),)
    done = reflqProcess(url, "list")
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("reflq: cannot reach the server at %s" % (url,))


def test_usageErrorsExitTwo(server, tmp_path):
    """A bad option, a missing model file, or a request the server refuses exit 2."""
    assert reflqProcess(server.url, "submit").returncode == 2
    assert reflqProcess(server.url, "status", "seven").returncode == 2
    code, _, err = reflq(server, "submit", str(tmp_path / "nothing.py"))
    assert code == 2 and err.strip() == "reflq: no such model file: %s" % (tmp_path / "nothing.py",)
    model = tmp_path / "model.txt"
    model.write_text("x")
    code, _, err = reflq(server, "submit", str(model))
    assert code == 2 and "must be a refl1d .py script or a .json" in err


def test_listFiltersByStatusAndMine(server, worker, model, tmp_path):
    """``list --status`` shows only that status; ``--mine`` the jobs this
    user submitted (whose keys it keeps), not another user's; newest first."""
    worker.drain()
    client = Client(server.url)
    first = client.submit(model[0], data=model[1], name="first fit")
    second = client.submit(model[0], data=model[1], name="second fit")
    ann = Client(server.url, keys=KeyStore(str(tmp_path / "ann-keys.json")))
    other = ann.submit(model[0], data=model[1], name="ann's fit", notify="ann@example.org")
    code, out, _ = reflq(server, "list", "--status", "pending")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "NAME"]
    ids = [int(line.split()[0]) for line in lines[1:]]
    assert ids[:3] == [other.id, second.id, first.id]
    assert all(line.split()[1] == "PENDING" for line in lines[1:])
    code, out, _ = reflq(server, "list", "--mine", "--status", "PENDING", "--json")
    mine = [r["id"] for r in json.loads(out)]
    assert second.id in mine and first.id in mine and other.id not in mine
    for job in (first, second):
        job.cancel()
    other.cancel()


def test_fetchDownloadsTheResultFiles(server, worker, model, tmp_path):
    """``fetch ID -o DIR`` writes every result file into DIR."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    worker.runFit(worker.lease())
    code, out, _ = reflq(server, "fetch", str(job.id), "-o", str(tmp_path / "res"))
    assert code == 0
    assert sorted(os.listdir(tmp_path / "res")) == sorted(resultFiles())
    assert "nifilm.par" in out


def test_cancelThenDeleteThenTheJobIsUnknown(server, worker, model):
    """``cancel`` makes a pending job CANCEL (status then exits 1);
    ``delete`` removes it (status then exits 4)."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    code, out, _ = reflq(server, "cancel", str(job.id))
    assert code == 0 and out.strip() == "job %d: CANCEL" % (job.id,)
    assert reflq(server, "status", str(job.id))[0] == 1
    code, out, _ = reflq(server, "delete", str(job.id))
    assert code == 0 and out.strip() == "job %d deleted" % (job.id,)
    assert reflq(server, "status", str(job.id))[0] == 4


def test_logsPrintsStdoutAndStderr(server, worker, model):
    """``logs ID`` prints the fit's stdout.txt and stderr.txt under headers."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    worker.runFit(worker.lease())
    code, out, _ = reflq(server, "logs", str(job.id))
    assert code == 0
    assert out.startswith("==> stdout.txt <==\nline 0 of the fit\n")
    assert "==> stderr.txt <==\na warning\n" in out


def test_logsFollowPrintsWhatArrivesUntilTheJobEnds(server, worker, model):
    """``logs --follow`` prints stdout.txt as the worker sends it and
    returns when the job ends."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])

    def fit():
        lease = worker.lease()
        worker.putFile(lease, "stdout.txt", b"first part\n")
        worker.heartbeat(lease, {"step": 1, "chisq": 2.0, "elapsed": 0.1})
        worker.putFile(lease, "stdout.txt", b"first part\nsecond part\n")
        worker.complete(lease, result=RESULT)

    join = runInThread(fit)
    code, out, err = reflq(server, "logs", str(job.id), "--follow")
    join()
    assert code == 0
    assert out == "==> stdout.txt <==\nfirst part\nsecond part\n"
    assert "job %d COMPLETE" % (job.id,) in err


def test_ctrlCStopsWatchingAndLeavesTheJobRunning(server, worker, model):
    """SIGINT to ``reflq wait`` ends it with 130 and a note; the job is untouched."""
    worker.drain()
    job = Client(server.url).submit(model[0], data=model[1])
    env = dict(os.environ, REFLQ_SERVER=server.url)
    with reaped(subprocess.Popen([REFLQ, "wait", str(job.id)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)) as process:
        first = process.stderr.readline()
        assert first.startswith("watching job %d" % (job.id,))
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "stopped watching job %d; it goes on" % (job.id,) in err
    assert "Traceback" not in err
    assert Client(server.url).job(job.id).status == "PENDING"
    job.cancel()


def test_legacyStatusAndList(server, worker, model):
    """``--legacy`` talks the old protocol: submit, list, status."""
    worker.drain()
    code, out, _ = reflq(server, "--legacy", "submit", model[0], *model[1])
    assert code == 0
    jobId = int(out.split()[1])
    code, out, _ = reflq(server, "--legacy", "list", "--status", "pending")
    assert code == 0 and ("%6d  PENDING" % (jobId,)) in out.splitlines()
    code, out, _ = reflq(server, "status", str(jobId), "--legacy")
    assert code == 0 and out.strip() == "job %d: PENDING" % (jobId,)
    Client(server.url).job(jobId).cancel()


# ---- jobs whose data, progress and result are of any JSON type


def legacySubmit(server, name, data, notify=""):
    """``POST /jobs.json``, whose ``data`` may be any JSON (a count job's is a number): the id."""
    status, answer = server.api.call("POST", "/jobs.json", body={"name": name, "notify": notify,
                                                                 "service": "count", "data": data})
    assert status == 200, answer
    return answer["id"]


def test_waitFollowsJobsWhoseDataIsNotAnObject(server, worker):
    """``reflq wait`` follows a job whose data is a number (a count job), a
    string, a list, or an object whose options or steps are of another type,
    through progress of odd types shown on the live line, to the end: exit 0
    and the summary line, never an internal error."""
    worker.drain()
    for data in (7, "text", [1, 2], {"options": "fast"}, {"options": {"steps": "many"}},
                 {"options": {"steps": True}}, {"options": {"steps": 4}}, None):
        jobId = legacySubmit(server, "count", data)

        def fit():
            lease = worker.lease()
            try:    # progress of odd types is refused at the server's door now
                worker.heartbeat(lease, {"step": "three", "chisq": {"x": 1}, "elapsed": "a while"})
            except urllib.error.HTTPError as e:
                assert e.code == 400
            worker.heartbeat(lease, {"step": 2 ** 52, "chisq": 10 ** 30, "elapsed": 1e30})
            worker.complete(lease, result={"chisq": "low"})

        join = runInThread(fit)
        err = TTY()
        code, out, _ = reflq(server, "wait", str(jobId), stderr=err)
        join()
        assert code == 0, (data, err.getvalue())
        assert out.strip().splitlines()[-1].startswith("job %d COMPLETE  χ² low" % (jobId,)), data
        assert "internal error" not in err.getvalue()


def test_statusShowsAResultThatIsNotAnObject(server, worker):
    """``reflq status`` shows a result that is a list, a number or a string
    (it hid them), and one whose chisq and parameters are of odd types."""
    worker.drain()
    for result, line in (([1, 2, "three"], 'result       [1,2,"three"]'), (42, "result       42"),
                         ("only text", "result       only text"),
                         ({"chisq": 10 ** 30, "parameters": {"p": {"value": 1.5, "uncertainty": 5e-5}, "q": [1]}},
                          "χ²           %d" % (10 ** 30,))):
        jobId = legacySubmit(server, "count", 7)
        lease = worker.lease()
        assert lease["id"] == jobId
        worker.complete(lease, result=result)
        code, out, err = reflq(server, "status", str(jobId))
        assert code == 0, err
        assert line in out.splitlines(), out
    assert "  p  1.500000 ± 0.000050" in out.splitlines() and "  q  [1]" in out.splitlines()


def test_aNameWithALoneSurrogateIsPrintedNotACrash(server, worker):
    """The console script prints a job whose name and error hold lone
    surrogates (kept from before the server refused them) with U+FFFD, in
    ``status`` and ``list``; where the server refuses such a name, nothing
    was submitted."""
    worker.drain()
    before = len(Client(server.url).jobs())
    status, answer = server.api.call("POST", "/jobs.json", body={
        "name": "fit \ud800 one", "notify": "", "service": "count", "data": 1})
    if status == 400:
        assert len(Client(server.url).jobs()) == before
        return
    assert status == 200, answer
    jobId = answer["id"]
    lease = worker.lease()
    worker.complete(lease, "ERROR", error="Traceback\nValueError: bad \udfff")
    done = reflqProcess(server.url, "status", str(jobId))
    assert done.returncode == 1, done.stderr
    assert "job          %d  fit \ufffd one" % (jobId,) in done.stdout.splitlines()
    assert "error        ValueError: bad \ufffd" in done.stdout.splitlines()
    done = reflqProcess(server.url, "list", "--status", "ERROR")
    assert done.returncode == 0, done.stderr
    assert "fit \ufffd one" in done.stdout
