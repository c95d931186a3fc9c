"""Tiny helpers shared by the benchmark scripts: best-of and interleaved timing, a text table.

The machines benchmarks run on are shared and noisy, so a measurement is repeated and its
minimum kept: the least disturbed run is the best estimate of what the code costs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "best_of",
    "best_of_interleaved",
    "interleaved_rounds",
    "table",
    "time_async",
    "time_sync",
]

Variant = TypeVar("Variant")


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


def time_sync(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls in a row."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def time_async(
    fn: Callable[[], Awaitable[Any]], calls: int, runner: asyncio.Runner | None = None
) -> float:
    """Seconds per awaited call of ``fn``; in a new event loop, or ``runner``'s if given."""

    async def loop() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await fn()
        return (time.perf_counter() - started) / calls

    return asyncio.run(loop()) if runner is None else runner.run(loop())


def interleaved_rounds(
    variants: dict[str, Variant],
    timer: Callable[[Variant, int], float],
    calls: int,
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``rounds`` rounds, the variants taking turns.

    Each round times ``calls`` calls of every variant with ``timer`` (:func:`time_sync`,
    :func:`time_async`), after a warm-up of a tenth of that for caches and lazy state.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        timer(fn, max(calls // 10, 1))
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timer(fn, calls))
    return times


def best_of_interleaved(
    variants: dict[str, Variant],
    timer: Callable[[Variant, int], float],
    calls: int,
    rounds: int,
) -> dict[str, float]:
    """Seconds per call of each variant: its best of :func:`interleaved_rounds`."""
    return {
        name: min(times)
        for name, times in interleaved_rounds(variants, timer, calls, rounds).items()
    }


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
