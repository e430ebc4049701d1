"""``reflq``: submit refl1d fits to a reflservd server and follow them.

Built on `reflservd.client`. Every command takes ``--server URL`` (or
``REFLQ_SERVER``; default http://127.0.0.1:8080), ``--json`` (print what
the server answered, as JSON, instead of text), ``--ca-file PEM``
(``REFLQ_CA_FILE``: the CA an https:// server's certificate chains to) and
``--token-file FILE`` (``REFLQ_TOKEN_FILE``: a submit or admin token).

Exit codes, for scripts: 0 done; 1 the job ended ERROR or CANCEL (status,
wait, submit --wait); 2 usage, or a request the server refused; 3 the server
cannot be reached (or cannot serve now); 4 no such job; 130 interrupted
(Ctrl-C while waiting leaves the job running). Errors are one line on stderr.
"""

import argparse
import ast
import glob
import os
import re
import sys
import tempfile
import time

from reflservd.client import (
    DEFAULT_SERVER, FINISHED, Client, ClientError, ServerUnreachable, UnknownJob)
from reflservd.fitoptions import OPTION_FIELDS, OPTION_NAMES
from reflservd.format import (
    displayText, field, fitSteps, formatDuration, formatParameter, lastLine, provenanceLines)
from reflservd.names import LOG_NAMES, readSecret
from reflservd.reflqoutput import Output, chisqText, progressLine, runTime, when
from reflservd.rerun import compare, rerun
from reflservd.viewer import ViewerUnavailable, view
from reflservd.seriescli import addSeriesCommand, submitEach

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNKNOWN = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


class UsageError(Exception):
    """A command line that cannot be run as given (exit 2)."""


# ---- commands


def cmdSubmit(client, args, out):
    if args.each:
        return submitEach(client, args, out)
    if not os.path.isfile(args.model):
        raise UsageError("no such model file: %s" % (args.model,))
    if not args.model.endswith((".py", ".json")):
        raise UsageError("the model must be a refl1d .py script or a .json FitProblem: %s" % (args.model,))
    for path in args.data:
        if not os.path.isfile(path):
            raise UsageError("no such data file: %s" % (path,))
    for path in unlistedDataFiles(args.model, args.data):
        out.note("reflq: warning: %s names %s, which is in its folder but not among the files "
                 "sent; add it to the command line if the fit reads it"
                 % (os.path.basename(args.model), os.path.basename(path)))
    options = {name: getattr(args, name) for name in OPTION_NAMES}
    job = client.submit(args.model, data=args.data, fit=args.fit, name=args.name,
                        notify=args.notify, queue=args.queue, cache=not args.no_cache, **options)
    if not args.wait:
        out.json(job.record)
        out.text("job %d submitted: %s" % (job.id, job.url))
        return EXIT_OK
    out.note("job %d submitted: %s" % (job.id, job.url))
    return follow(job, out)


def unlistedDataFiles(model, data):
    """Files in the model's folder that the script seems to name (a string
    literal, with ``%d``-style or ``{}`` holes taken as wildcards) but that
    are not among ``data``."""
    if not model.endswith(".py"):
        return []
    try:
        with open(model, encoding="utf-8", errors="replace") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    folder = os.path.dirname(os.path.abspath(model))
    sent = {os.path.abspath(p) for p in data} | {os.path.abspath(model)}
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value
        if len(text) > 255 or "\n" in text or not re.search(r"\.\w{1,8}$", text):
            continue
        pattern = re.sub(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgeEx]|\{[^{}]*\}", "*", glob.escape(text))
        for path in glob.glob(os.path.join(folder, pattern)):
            path = os.path.abspath(path)
            if os.path.isfile(path) and path not in sent and os.path.dirname(path) == folder:
                found.add(path)
    return sorted(found)


def cmdList(client, args, out):
    if client.legacy:
        jobs = client.jobs(status=args.status, limit=args.limit)
        rows = [(job.id, job.status) for job in jobs]
        out.json([{"id": i, "status": s} for i, s in rows])
        for jobId, status in rows:
            out.text("%6d  %s" % (jobId, status))
        return EXIT_OK
    if args.mine:
        held = client.keys.held(client.url)
        jobs = [job for job in client.jobs(status=args.status, owner=args.owner, queue=args.queue)
                if job.id in held][:args.limit]
    else:
        jobs = client.jobs(status=args.status, owner=args.owner, queue=args.queue, limit=args.limit)
    records = [job.record for job in jobs]
    out.json(records)
    if not records:
        out.text("no jobs")
        return EXIT_OK
    now = time.time()
    rows = [("ID", "STATUS", "NAME", "OWNER", "QUEUE", "SUBMITTED", "RUN TIME")]
    for r in records:
        rows.append((str(r["id"]), r["status"], _clip(displayText(r.get("name")), 30),
                     _clip(displayText(r.get("owner")), 28), displayText(r.get("queue")) or "-",
                     when(r.get("submitted")), formatDuration(runTime(r, now))))
    out.table(rows)
    return EXIT_OK


def _clip(text, width):
    return text if len(text) <= width else text[:width - 1] + "…"


def cmdStatus(client, args, out):
    job = client.job(args.id)
    record = job.record
    out.json(record)
    if client.legacy:
        out.text("job %d: %s" % (job.id, record["status"]))
        return exitFor(record["status"])
    progress = record.get("progress") if isinstance(record.get("progress"), dict) else {}
    lines = [
        ("job", "%d  %s" % (record["id"], displayText(record.get("name")))),
        ("status", record["status"] + ("  (cancel requested)" if record.get("cancelRequested")
                                       and record["status"] == "CANCEL" and not record.get("finished") else "")),
        ("owner", displayText(record.get("owner")) or "-"),
        ("queue", displayText(record.get("queue")) or "-"),
        ("attempts", str(record.get("attempts", 0))),
        ("submitted", when(record.get("submitted"))),
        ("started", when(record.get("started"))),
        ("finished", when(record.get("finished"))),
        ("run time", formatDuration(runTime(record))),
        ("confinement", displayText(record.get("confinement")) or "-"),
    ]
    if progress and record["status"] == "ACTIVE":
        lines.append(("progress", "step %s  χ² %s  elapsed %s" % (
            displayText(progress.get("step"), "-"), chisqText(progress.get("chisq")),
            formatDuration(progress.get("elapsed")))))
    result = record.get("result")
    if isinstance(result, dict):
        lines.append(("χ²", chisqText(result.get("chisq"))))
        if result.get("fitter"):
            lines.append(("fitter", "%s%s" % (displayText(result["fitter"]), "  seed %s" % (
                displayText(result["seed"]),) if result.get("seed") else "")))
    elif result is not None:
        lines.append(("result", displayText(result, limit=2000)))
    if record.get("error") and record["status"] in ("ERROR", "CANCEL"):
        lines.append(("error", lastLine(record["error"]) or "-"))
    if record.get("cachedFrom") is not None:
        lines.append(("cached from", "job %d (the same inputs; no fit ran)" % (record["cachedFrom"],)))
    if getattr(args, "provenance", False):
        lines += provenanceLines(field(result, "provenance"), when)
    lines.append(("page", job.url))
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        out.text("%s  %s" % (label.ljust(width), value))
    parameters = field(result, "parameters")
    if isinstance(parameters, dict) and parameters:
        out.text()
        nameWidth = max(len(name) for name in parameters)
        for name, value in parameters.items():
            out.text("  %s  %s" % (name.ljust(nameWidth), formatParameter(value)))
    return exitFor(record["status"])


def cmdRerun(client, args, out):
    old = client.job(args.id)
    new = rerun(client, old.id)
    out.note("job %d submitted: a rerun of job %d with seed %s, without the cache"
             % (new.id, old.id, field(new.record, "request", "data", "options", "seed")))
    status = follow(new, out) if not out.asJSON else exitFor(new.wait())
    if status != EXIT_OK:
        return status
    identical, differences, compared = compare(old, new, tempfile.mkdtemp(prefix="reflq-rerun-"))
    out.json({"id": new.id, "rerunOf": old.id, "identical": identical, "differences": differences,
              "compared": compared})
    out.text("job %d %s job %d (compared: the fitted values, χ² and %s)"
             % (new.id, "is bit-identical to" if identical else "DIFFERS from", old.id,
                ", ".join(compared) or "no result file"))
    for line in differences:
        out.text("  " + line)
    return EXIT_OK if identical else EXIT_FAILED


def cmdView(client, args, out):
    try:
        return view(client.job(args.id), port=args.port, browser=not args.no_browser, trust=args.trust,
                    note=out.note)
    except ViewerUnavailable as e:
        raise UsageError(e.message) from None


def exitFor(status):
    return EXIT_FAILED if status in ("ERROR", "CANCEL") else EXIT_OK


def cmdWait(client, args, out):
    job = client.job(args.id)
    return follow(job, out)


def follow(job, out):
    """Watch a job until it ends, with a live line (step, χ², elapsed) on a
    terminal and a line per status change otherwise. Ctrl-C stops watching
    only."""
    total = fitSteps(field(job.record, "request"))
    state = {"status": field(job.record, "status"), "progress": None}

    def onEvent(event):
        if event["type"] == "status" and event["status"] != state["status"]:
            state["status"] = event["status"]
            if not out.asJSON:
                out.note("job %d %s" % (job.id, event["status"]))
        if event["type"] == "progress" and event.get("progress"):
            state["progress"] = event["progress"]
        if out.live and not out.asJSON and state["status"] == "ACTIVE":
            out.showLive(progressLine(job.id, state["progress"], total))

    try:
        out.note("watching job %d (%s); Ctrl-C stops watching, the job goes on" % (job.id, state["status"]))
        status = job.wait(callback=onEvent)
    except KeyboardInterrupt:
        out.clearLive()
        out.note("stopped watching job %d; it goes on (reflq wait %d to watch again)" % (job.id, job.id))
        return EXIT_INTERRUPTED
    out.clearLive()
    record = job.record
    out.json(record)
    summary = "job %d %s" % (job.id, status)
    if status == "COMPLETE" and field(record, "result", "chisq") is not None:
        summary += "  χ² %s" % (chisqText(record["result"]["chisq"]),)
    if runTime(record) is not None:
        summary += "  in %s" % (formatDuration(runTime(record)),)
    out.text(summary)
    if status == "ERROR" and record.get("error"):
        out.note("reflq: job %d failed: %s" % (job.id, lastLine(record["error"])))
    return exitFor(status)


def cmdFetch(client, args, out):
    job = client.job(args.id)
    directory = args.output or "job-%d" % (job.id,)
    paths = job.download(directory)
    out.json({"id": job.id, "status": job.record["status"], "directory": directory, "files": paths})
    if not paths:
        out.text("job %d (%s) has no result files" % (job.id, job.record["status"]))
    for path in paths:
        out.text("%s  (%d bytes)" % (path, os.path.getsize(path)))
    return EXIT_OK


def cmdCancel(client, args, out):
    job = client.job(args.id)
    status = job.cancel()
    out.json(job.record)
    if job.record.get("cancelRequested") and not job.record.get("finished"):
        out.text("job %d: %s (its worker stops the fit at its next heartbeat)" % (job.id, status))
    else:
        out.text("job %d: %s" % (job.id, status))
    return EXIT_OK


def cmdDelete(client, args, out):
    job = client.job(args.id)
    job.delete()
    out.json({"deleted": job.id})
    out.text("job %d deleted" % (job.id,))
    return EXIT_OK


def cmdLogs(client, args, out):
    job = client.job(args.id)
    if not args.follow:
        present = {f["name"] for f in job.files()}
        logs = {name: job.read(name).decode("utf-8", "replace") for name in LOG_NAMES if name in present}
        out.json({"id": job.id, "status": job.record["status"], "logs": logs})
        if not logs:
            out.note("job %d (%s) has no logs yet" % (job.id, job.record["status"]))
        for name, text in logs.items():
            if len(logs) > 1:
                out.text("==> %s <==" % (name,))
            if not out.asJSON:
                out.stdout.write(text)
                if text and not text.endswith("\n"):
                    out.stdout.write("\n")
        return EXIT_OK
    if out.asJSON:
        raise UsageError("logs --follow streams text; leave out --json")
    offsets, current, after = {}, None, 0
    status = job.record["status"]
    while True:
        ended = status in FINISHED
        sizes = {f["name"]: f["size"] for f in job.files()}
        for name in LOG_NAMES:
            have = offsets.get(name, 0)
            if name not in sizes or sizes[name] == have:
                continue
            if sizes[name] < have:
                have = 0
                out.note("reflq: %s was replaced; from its start:" % (name,))
            data = job.read(name, have)
            if name != current:
                out.text("==> %s <==" % (name,))
                current = name
            out.stdout.write(data.decode("utf-8", "replace"))
            out.stdout.flush()
            offsets[name] = have + len(data)
        if ended:
            out.note("job %d %s" % (job.id, status))
            return exitFor(status)
        try:
            answer = job.events(after, 25)
        except KeyboardInterrupt:
            out.note("stopped following job %d; it goes on" % (job.id,))
            return EXIT_INTERRUPTED
        after, status = answer["next"], answer["status"]


# ---- the command line


def parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=argparse.SUPPRESS, metavar="URL",
                        help="the reflservd server (default: $REFLQ_SERVER or %s)" % (DEFAULT_SERVER,))
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the server's answer as JSON")
    common.add_argument("--legacy", action="store_true", default=argparse.SUPPRESS,
                        help="speak the old jobqueue protocol (/jobs.json)")
    common.add_argument("--ca-file", default=argparse.SUPPRESS, metavar="PEM",
                        help="trust this CA (or self-signed certificate) for an https:// server "
                             "(default: $REFLQ_CA_FILE, else the system's store)")
    common.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="send the token in FILE (a submit or admin token) with every "
                             "request (default: $REFLQ_TOKEN_FILE)")

    top = argparse.ArgumentParser(
        prog="reflq", parents=[common],
        description="Submit refl1d fits to a reflservd server and follow them.",
        epilog="exit codes: 0 done, 1 the job ended ERROR or CANCEL, 2 usage, "
               "3 server unreachable, 4 unknown job, 130 interrupted")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    submit = commands.add_parser("submit", parents=[common], help="submit a fit",
                                 description="Submit MODEL (.py or .json) and its DATA files.")
    submit.add_argument("model", metavar="MODEL")
    submit.add_argument("data", metavar="DATA", nargs="*")
    submit.add_argument("--fit", metavar="NAME", help="fitter: lm, amoeba, de, dream, newton, pt")
    for name, _, kind, _, _ in OPTION_FIELDS:
        if name == "time":
            submit.add_argument("--time", type=float, metavar="H", help="stop the fit after H hours")
        elif isinstance(kind, tuple):
            submit.add_argument("--" + name, metavar="NAME")
        else:
            submit.add_argument("--" + name, type=kind, metavar="N")
    submit.add_argument("--name", metavar="NAME", help="the job's name (default: the model's)")
    submit.add_argument("--queue", metavar="NAME", default=os.environ.get("REFLQ_QUEUE"),
                        help="the queue (cluster) to run it on (default: $REFLQ_QUEUE, else the "
                             "server's default queue)")
    submit.add_argument("--notify", metavar="ADDRESS", default=os.environ.get("REFLQ_NOTIFY", ""),
                        help="mail this address when the job starts and ends (default: $REFLQ_NOTIFY)")
    submit.add_argument("--wait", action="store_true", help="then watch it until it ends")
    submit.add_argument("--no-cache", action="store_true",
                        help="run it even if an earlier job of the same inputs can answer it")
    submit.add_argument("--each", metavar="PATTERN",
                        help="a fit series: one job per data file matching PATTERN (quote it), each "
                             "given its file as the model's first argument; DATA files are shared")
    submit.set_defaults(run=cmdSubmit)

    listing = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--status", type=str.upper, choices=["PENDING", "ACTIVE", "COMPLETE", "ERROR", "CANCEL"],
                         metavar="S")
    listing.add_argument("--mine", action="store_true",
                         help="only the jobs this user submitted (whose keys it holds)")
    listing.add_argument("--owner", metavar="O")
    listing.add_argument("--queue", metavar="Q")
    listing.add_argument("--limit", type=int, default=50, metavar="N")
    listing.set_defaults(run=cmdList)

    for name, run, text in (("status", cmdStatus, "a job's status and result"),
                            ("wait", cmdWait, "watch a job until it ends (Ctrl-C stops watching)"),
                            ("cancel", cmdCancel, "cancel a job"),
                            ("delete", cmdDelete, "delete a job and its files")):
        command = commands.add_parser(name, parents=[common], help=text,
                                      aliases=["show"] if name == "status" else [])
        command.add_argument("id", type=int, metavar="ID")
        command.set_defaults(run=run)
        if name == "status":
            command.add_argument("--provenance", action="store_true",
                                 help="also how its result was made (versions, inputs' sha256, seed…)")

    rerunning = commands.add_parser("rerun", parents=[common], help="run a fit again, same inputs and seed, "
                                    "and say whether the result is bit-identical")
    rerunning.add_argument("id", type=int, metavar="ID")
    rerunning.set_defaults(run=cmdRerun)

    viewing = commands.add_parser("view", parents=[common], help="open a job's session in refl1d's webview")
    viewing.add_argument("id", type=int, metavar="ID")
    viewing.add_argument("--port", type=int, default=0, metavar="N", help="the webview's port on localhost")
    viewing.add_argument("--no-browser", action="store_true", help="do not open a browser")
    viewing.add_argument("--trust", action="store_true",
                         help="open the session of a job not submitted from here (it runs the fit's code)")
    viewing.set_defaults(run=cmdView)

    fetch = commands.add_parser("fetch", parents=[common], help="download a job's result files")
    fetch.add_argument("id", type=int, metavar="ID")
    fetch.add_argument("-o", "--output", metavar="DIR", help="where (default: job-ID)")
    fetch.set_defaults(run=cmdFetch)

    logs = commands.add_parser("logs", parents=[common], help="print a job's stdout and stderr")
    logs.add_argument("id", type=int, metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(run=cmdLogs)
    addSeriesCommand(commands, common)
    return top


def main(argv=None, stdout=None, stderr=None):
    """Run reflq; returns (and, as a console script, exits with) its exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = parser().parse_args(argv)
    server = getattr(args, "server", None) or os.environ.get("REFLQ_SERVER") or DEFAULT_SERVER
    out = Output(getattr(args, "json", False), stdout, stderr)
    try:
        tokenFile = getattr(args, "token_file", None) or os.environ.get("REFLQ_TOKEN_FILE")
        try:
            token = readSecret(tokenFile) if tokenFile else None
        except (OSError, ValueError) as e:
            raise UsageError("cannot read the token file: %s" % (e,)) from None
        client = Client(server, legacy=getattr(args, "legacy", False), token=token,
                        caFile=getattr(args, "ca_file", None) or os.environ.get("REFLQ_CA_FILE"))
        return args.run(client, args, out)
    except UsageError as e:
        out.note("reflq: %s" % (e,))
        return EXIT_USAGE
    except UnknownJob as e:
        out.note("reflq: %s" % (e.message,))
        return EXIT_UNKNOWN
    except ServerUnreachable as e:
        out.note("reflq: %s" % (e.message,))
        return EXIT_UNREACHABLE
    except ClientError as e:
        out.note("reflq: the server refused: %s" % (e.message,) if e.code else "reflq: %s" % (e.message,))
        return EXIT_USAGE
    except KeyboardInterrupt:
        out.note("reflq: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:
        if os.environ.get("REFLQ_DEBUG"):
            raise
        out.note("reflq: internal error: %s: %s (REFLQ_DEBUG=1 shows where)" % (type(e).__name__, e))
        return EXIT_INTERNAL


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
