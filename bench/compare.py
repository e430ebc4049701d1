"""The server's benchmarks on this checkout and on another revision,
alternated, so that both see the same machine.

``python -m bench.compare REV [--rounds N] [NAME …]``

A figure such as the submit rate moves by a third from one minute to the
next on this VM (the disk's flush latency drifts, and a run that follows
another pays for the writeback of what that one deleted), so two ``make
bench`` runs made one after the other do not show whether a change made the
server slower. Here each round runs the named ``bench.server`` benchmarks
(default: submit and dispatch) against a ``twistd reflservd`` from each
checkout, in turn, the order swapped every round, with this checkout's load
generator; the table gives each figure per round and the medians of the
rates. REV is checked out with ``git worktree`` into a scratch directory
(removed at the end); its server must take the options ``bench.server``
passes (true of every revision since the connection limits, c9bd4f5).
"""

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile

from bench import server

DEFAULT_NAMES = ("submit", "dispatch")


def checkout(rev, where):
    """A detached worktree of ``rev`` at ``where``; its commit."""
    subprocess.run(["git", "-C", server.ROOT, "worktree", "add", "--detach", "--quiet", where, rev],
                   check=True)
    return subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def removeCheckout(where):
    subprocess.run(["git", "-C", server.ROOT, "worktree", "remove", "--force", where],
                   capture_output=True)


def rate(figure):
    """The first ``N/s`` of a figure's text, or None."""
    found = re.match(r"([\d.]+)/s", figure)
    return float(found.group(1)) if found else None


def runRound(root, names, scratch, say):
    """The result rows of ``names`` against the server of the checkout at ``root``."""
    here = server.ROOT
    server.ROOT = root
    try:
        bench = server.Bench(tempfile.mkdtemp(dir=scratch), say=lambda line: None)
        for name in names:
            getattr(bench, name)()
        return bench.results
    finally:
        server.ROOT = here


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the revision to compare this checkout with (e.g. c9bd4f5)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="bench.server benchmarks to run (default: %s)" % (" ".join(DEFAULT_NAMES),))
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running both (default 3)")
    args = parser.parse_args(argv)
    names = args.names or DEFAULT_NAMES
    unknown = set(names) - set(server.BENCHMARKS)
    if unknown:
        parser.error("no benchmark named %s" % (", ".join(sorted(unknown)),))
    server.raiseFileLimit()
    scratch = tempfile.mkdtemp(prefix="reflservd-compare-")
    other = scratch + "/checkout"
    try:
        commit = checkout(args.rev, other)
        sides = [("this checkout", server.ROOT), (commit, other)]
        figures = {label: {} for label, _ in sides}
        for round in range(args.rounds):
            for label, root in (sides if round % 2 == 0 else sides[::-1]):
                for row in runRound(root, names, scratch, print):
                    figures[label].setdefault(row.name, []).append(row.figure)
                    print("round %d  %-14s %-30s %s" % (round + 1, label, row.name, row.figure), flush=True)
        print()
        print("%-30s %-22s %-22s" % ("median rate over %d rounds" % (args.rounds,), sides[0][0], commit))
        for name in figures[sides[0][0]]:
            rates = [[rate(f) for f in figures[label].get(name, [])] for label, _ in sides]
            if all(r and None not in r for r in rates):
                print("%-30s %-22s %-22s" % (name, *("%.0f/s" % statistics.median(r) for r in rates)))
    finally:
        removeCheckout(other)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
