"""Tiny helpers shared by the benchmark scripts: best-of timing and a plain-text table.

The machines benchmarks run on are shared and noisy, so a measurement is repeated and its
minimum kept: the least disturbed run is the best estimate of what the code costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["best_of", "table"]


def best_of(fn: Callable[[], Any], repeat: int = 5, number: int = 1) -> float:
    """Call ``fn`` ``number`` times per run, ``repeat`` runs; return the best seconds per call."""
    if repeat < 1 or number < 1:
        raise ValueError(f"repeat and number must be at least 1, got {repeat!r} and {number!r}")
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / number


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    """Print ``rows`` under ``headers`` as aligned columns: text left, numbers right."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max([len(header), *(len(row[column]) for row in cells)])
        for column, header in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[column], int | float) for row in rows) and bool(rows)
        for column in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric, strict=True)
        ).rstrip()

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print(line(row))
