"""``reflq submit MODEL --each PATTERN`` and ``reflq series ID``: fit series
on the command line (`reflservd.seriesclient`), beside ``cli.py``."""

import glob
import os
import re

from reflservd.fitoptions import OPTION_NAMES
from reflservd.format import displayText, formatValue
from reflservd.reflqoutput import chisqText


def naturalKey(path):
    """``run-2`` before ``run-10``: the digits in a name compared as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", path)]


def submitEach(client, args, out):
    """Submit one member per file matching ``args.each``, in natural order."""
    from reflservd import cli
    data = sorted((p for p in glob.glob(args.each) if os.path.isfile(p)), key=naturalKey)
    if not data:
        raise cli.UsageError("--each %s matches no file" % (args.each,))
    for path in [args.model] + args.data:
        if not os.path.isfile(path):
            raise cli.UsageError("no such file: %s" % (path,))
    options = {name: getattr(args, name) for name in OPTION_NAMES}
    series = client.submitSeries(args.model, data, fit=args.fit, name=args.name, notify=args.notify,
                                 queue=args.queue, shared=args.data, **options)
    out.note("series %d submitted: %d members, %s" % (series.id, len(data), series.url))
    if not args.wait:
        out.json(series.record)
        out.text("series %d: jobs %s" % (series.id, _idRanges([m["id"] for m in series.record["members"]])))
        return cli.EXIT_OK
    return _waitAndPrint(series, out)


def _idRanges(ids):
    """``1-4, 9``: consecutive ids as ranges."""
    ranges, start = [], None
    for k, jobId in enumerate(ids):
        if start is None:
            start = jobId
        if k + 1 == len(ids) or ids[k + 1] != jobId + 1:
            ranges.append(str(start) if start == jobId else "%d-%d" % (start, jobId))
            start = None
    return ", ".join(ranges)


def _waitAndPrint(series, out):
    from reflservd import cli
    try:
        series.wait(callback=lambda job: out.note("job %d %s" % (job.id, job.record["status"])))
    except KeyboardInterrupt:
        out.note("stopped watching series %d; it goes on (reflq series %d --wait)" % (series.id, series.id))
        return cli.EXIT_INTERRUPTED
    return printTable(series, out)


def printTable(series, out):
    """The series' table: a row per member, its χ² and each parameter's value ± uncertainty."""
    from reflservd import cli
    table = series.table()
    out.json(table)
    rows = [["MEMBER", "JOB", "DATA", "STATUS", "χ²"] + [displayText(name) for name in table["parameters"]]]
    for row in table["rows"]:
        cells = [str(row["member"]), str(row["id"]), displayText(row["data"]), row["status"],
                 chisqText(row["chisq"])]
        for name in table["parameters"]:
            fit = row["parameters"].get(name)
            cells.append(formatValue(fit["value"], fit["uncertainty"]) if fit and fit["value"] is not None
                         else "-")
        rows.append(cells)
    out.table(rows)
    failed = any(row["status"] in ("ERROR", "CANCEL") for row in table["rows"])
    return cli.EXIT_FAILED if failed else cli.EXIT_OK


def cmdSeries(client, args, out):
    from reflservd import cli
    series = client.series(args.id)
    if args.cancel:
        counts = series.cancel()
        out.json(series.record)
        out.text("series %d: %s" % (series.id, _countsText(counts)))
        return cli.EXIT_OK
    if args.delete:
        series.delete()
        out.json(series.record)
        out.text("series %d: its %d members deleted" % (series.id, len(series.record["members"])))
        return cli.EXIT_OK
    if args.csv:
        out.stdout.write(series.tableCSV())
        return cli.EXIT_OK
    if args.wait:
        return _waitAndPrint(series, out)
    out.note("series %d (%s): %s" % (series.id, _countsText(series.record["counts"]), series.url))
    return printTable(series, out)


def _countsText(counts):
    return ", ".join("%d %s" % (n, state.lower()) for state, n in sorted(counts.items()))


def addSeriesCommand(commands, common):
    """``reflq series ID [--wait | --csv | --cancel | --delete]``."""
    command = commands.add_parser("series", parents=[common], help="a fit series' table of results",
                                  description="Print a fit series' table: a row per member, its χ² "
                                              "and each fitted parameter's value ± uncertainty.")
    command.add_argument("id", type=int, metavar="ID")
    action = command.add_mutually_exclusive_group()
    action.add_argument("--wait", action="store_true", help="wait until every member has ended first")
    action.add_argument("--csv", action="store_true", help="print the table as CSV")
    action.add_argument("--cancel", action="store_true", help="cancel every member that has not ended")
    action.add_argument("--delete", action="store_true", help="delete every member and its files")
    command.set_defaults(run=cmdSeries)

