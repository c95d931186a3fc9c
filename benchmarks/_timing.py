"""Helpers shared by the benchmark scripts: paired interleaved rounds and a text table.

The machines benchmarks run on are shared and noisy: their speed wanders from one moment
to the next, by more than many of the differences measured. :func:`paired_rounds` times
many short rounds in which the variants take turns, so that every variant of a round ran
at nearly the same moment, on nearly the same machine. A comparison is then made within
each round (variant - baseline, or the ratio of two overheads) and the median over rounds
is kept: :func:`median_paired_overhead`, :func:`median_paired_ratio`. A slow moment moves
both sides of a round together and cancels out; a hiccup that hits one side of one round
moves the median by at most one rank.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Paired",
    "median_paired_overhead",
    "median_paired_ratio",
    "paired_rounds",
    "table",
    "time_async",
    "time_sync",
]

Variant = TypeVar("Variant")


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


def paired_rounds(
    variants: Mapping[str, Variant],
    timer: Callable[[Variant, int], float],
    calls: int | Mapping[str, int],
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``rounds`` rounds, the variants taking turns.

    Each round times ``calls`` calls of every variant with ``timer`` (:func:`time_sync`,
    :func:`time_async`); ``calls`` may name a count per variant, so that a slow peer's turn
    lasts about as long as a fast one's. Which variant goes first rotates from round to
    round, so none always runs right after the same neighbour. Before the first round each
    variant is warmed up with a tenth of its calls (caches, lazy state).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}")
    names = list(variants)
    counts = {
        name: calls if isinstance(calls, int) else calls.get(name, max(calls.values()))
        for name in names
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        timer(variants[name], max(counts[name] // 10, 1))
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(variants[name], counts[name]))
    return times


@dataclass(frozen=True, slots=True)
class Paired:
    """The median over rounds of a paired figure, and its quartiles (the spread of rounds)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Paired:
        """Median and quartiles of ``values`` (nearest rank: an infinite value stays one)."""
        ranked = sorted(values)
        last = len(ranked) - 1
        return cls(
            statistics.median(ranked), ranked[round(last * 0.25)], ranked[round(last * 0.75)]
        )

    def ratio(self, digits: int = 2) -> str:
        """``1.23x (rounds 1.10-1.40x)``: the median and the middle half of the rounds."""
        return (
            f"{self.median:.{digits}f}x (middle half of rounds "
            f"{self.low:.{digits}f}-{self.high:.{digits}f}x)"
        )


def median_paired_overhead(
    rounds: Mapping[str, Sequence[float]], variant: str, baseline: str
) -> Paired:
    """Median over rounds of ``variant``'s time minus ``baseline``'s in the same round."""
    return Paired.of([v - b for v, b in zip(rounds[variant], rounds[baseline], strict=True)])


def median_paired_ratio(
    rounds: Mapping[str, Sequence[float]],
    numerator: str,
    denominator: str,
    baseline: str | None = None,
) -> Paired:
    """Median over rounds of ``numerator``'s time / ``denominator``'s in the same round.

    With ``baseline``, of their overheads instead: (numerator - baseline) / (denominator -
    baseline), each round's baseline subtracted from both. A round whose denominator came
    out at or below zero (noise swamping a tiny overhead) counts as an infinite ratio: it
    can only move the median up, never make a small overhead look smaller.
    """
    base = rounds[baseline] if baseline is not None else [0.0] * len(rounds[numerator])
    values = []
    for top, bottom, zero in zip(rounds[numerator], rounds[denominator], base, strict=True):
        over = bottom - zero
        values.append((top - zero) / over if over > 0 else math.inf)
    return Paired.of(values)


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
