"""``make bench``: run every benchmark and print one table of figures,
references and goals.

``python -m bench [--only server --only sandbox …] [--markdown FILE]``

Each module ``bench/NAME.py`` that exists and has ``main(argv)`` is run with
no arguments; a ``main`` that returns :class:`bench.Result` rows puts them in
the table. A module that is missing, or has no ``main``, is skipped with a
note; one that fails is reported and the others still run (the exit status
is then 1). Goals not met do not fail the run: the table says so.
"""

import argparse
import importlib
import os
import platform
import sys
import time
import traceback

from bench import formatMarkdown, formatTable

MODULES = ("server", "forkserver", "sandbox", "worker", "slurm", "parallel", "mpi", "cache", "series")


def machineDescription():
    """One line saying what this machine is, for the table's heading."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        memory = ", %.0f GiB" % (kib / 2 ** 20,)
    except (OSError, ValueError, IndexError):
        pass
    return "%d cores (%s)%s, Linux %s, Python %s" % (
        os.cpu_count() or 0, model, memory, platform.release(), platform.python_version())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=MODULES,
                        help="run only this module (repeatable)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    args = parser.parse_args(argv)
    results, notes, failed = [], [], False
    started = time.monotonic()
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    for name in args.only or MODULES:
        print("==== bench.%s" % (name,), flush=True)
        try:
            module = importlib.import_module("bench." + name)
        except ModuleNotFoundError as e:
            if e.name != "bench." + name:
                raise
            notes.append("bench.%s: not written yet, skipped" % (name,))
            print(notes[-1])
            continue
        entry = getattr(module, "main", None)
        if entry is None:
            notes.append("bench.%s: has no main(), skipped" % (name,))
            print(notes[-1])
            continue
        moduleStarted = time.monotonic()
        try:
            rows = entry([])
        except Exception:
            failed = True
            traceback.print_exc()
            notes.append("bench.%s: FAILED (traceback above)" % (name,))
            continue
        if rows:
            results.extend(rows)
        notes.append("bench.%s: %.0f s" % (name, time.monotonic() - moduleStarted))
    print()
    print("reflservd benchmarks, %s, %s; %.0f s in all" % (when, machineDescription(),
                                                             time.monotonic() - started))
    print(formatTable(results))
    for note in notes:
        print("  " + note)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("Run of %s on %s.\n\n%s\n" % (when, machineDescription(), formatMarkdown(results)))
        print("Markdown table written to %s" % (args.markdown,))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
