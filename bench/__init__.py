"""Benchmarks of reflservd and reflworkerd (``make bench``; not part of ``make test``).

Every benchmark reports its figures as :class:`Result` rows: the figure, the
reference it is measured against in the same run (where there is one), the
goal and whether the goal was met. ``python -m bench`` runs them all and
prints one table (see ``bench/README.md``).
"""

from collections import namedtuple

Result = namedtuple("Result", "name figure reference goal met")
Result.__doc__ = """One line of the benchmark table.

@ivar name: what was measured ("submit, 64 clients").
@ivar figure: the measured figure, as text with its unit.
@ivar reference: the same figure for the reference, measured in the same run
    ("" where there is none).
@ivar goal: the goal, as text ("" where the row is only informative).
@ivar met: True / False, or None where there is no goal.
"""

COLUMNS = ("benchmark", "figure", "reference (same run)", "goal", "met")


def metText(met):
    return {True: "met", False: "NOT MET", None: "-"}[met]


def rowsOf(results):
    return [(r.name, r.figure, r.reference or "-", r.goal or "-", metText(r.met)) for r in results]


def formatTable(results):
    """The results as a fixed-width text table."""
    rows = [COLUMNS] + rowsOf(results)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def formatMarkdown(results):
    """The results as a Markdown table (for bench/README.md)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rowsOf(results):
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)
