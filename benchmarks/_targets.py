"""Every benchmark's targets, gathered into the one table ``make bench`` ends with.

A script calls :func:`record` once per target it judges. Records go, one JSON object
a line, to the file named by ``$RESILIENT_BENCH_RESULTS`` (``make bench`` points it at
a fresh file per run); with the variable unset (a script run by hand) they are only
printed. ``python benchmarks/_targets.py FILE`` prints the summary table of a run and,
with ``--check``, exits 1 when a target was missed (``make bench-check``).
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["record", "summarize"]

_ENV = "RESILIENT_BENCH_RESULTS"


def record(script: str, target: str, figure: str, met: bool) -> None:
    """Record one target of ``script``: what it asks, the figure measured, whether it is met."""
    line = {"script": script, "target": target, "figure": figure, "met": bool(met)}
    path = os.environ.get(_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as results:
            results.write(json.dumps(line) + "\n")
    print(f"  target [{'met' if met else 'MISSED'}] {target}: {figure}")


def summarize(path: str) -> int:
    """Print the summary table of the records in ``path``; return how many were missed."""
    try:
        with open(path, encoding="utf-8") as results:
            rows = [json.loads(line) for line in results if line.strip()]
    except FileNotFoundError:
        rows = []
    if not rows:
        print("no targets were recorded")
        return 0
    widths = [max(len(row[key]) for row in rows) for key in ("script", "target", "figure")]
    widths = [
        max(width, len(title))
        for width, title in zip(widths, ("script", "target", "figure"), strict=True)
    ]
    print("\n== Targets")
    header = ("script", "target", "figure", "verdict")
    print("  ".join(title.ljust(width) for title, width in zip(header, [*widths, 7], strict=True)))
    print("  ".join("-" * width for width in [*widths, 7]))
    missed = 0
    for row in rows:
        verdict = "met" if row["met"] else "MISSED"
        missed += not row["met"]
        cells = (row["script"], row["target"], row["figure"])
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)), verdict
        )
    print(f"{len(rows) - missed} of {len(rows)} targets met")
    return missed


if __name__ == "__main__":
    arguments = sys.argv[1:]
    check = "--check" in arguments
    files = [argument for argument in arguments if argument != "--check"]
    if len(files) != 1:
        sys.exit("usage: python benchmarks/_targets.py RESULTS_FILE [--check]")
    missed = summarize(files[0])
    sys.exit(1 if check and missed else 0)
