"""Hedged requests against a dependency with a heavy tail: latency percentiles and extra load.

The dependency is simulated in one asyncio loop: each attempt sleeps FAST seconds, or,
for SLOW_SHARE of attempts (drawn independently, from a seeded generator), SLOW seconds:
1% of attempts 50x slower, the shape "The Tail at Scale" describes. Calls run WORKERS at
a time, so the loop is busy as a client's would be.

Variants, in interleaved rounds of CALLS_PER_ROUND calls each (the machine is noisy;
taking turns keeps drift from favouring one side):

    plain              await dependency()                      (no resilience at all)
    Policy, no hedge   Policy(timeout=1)(dependency)           (the same stages minus hedging)
    hedge, adaptive    Policy(timeout=1, hedge=Hedge())         delay = min(p95, 50 ms), the default
    hedge, fixed 10ms  Policy(timeout=1, hedge=Hedge(delay=0.01))

For each: p50, p99 and p99.9 of call latency over every call of every round, and the
extra attempts hedging sent, as a share of calls.

Target (the new-stages issue): the default hedge's p99.9 at least 5x lower than the
plain call's, for at most 5% more calls.

Run: ``make bench`` or ``.venv/bin/python benchmarks/hedge.py`` (about 30 seconds).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _targets import record
from _timing import table

from resilient import Hedge, Policy

SCRIPT = "hedge.py"
FAST = 0.002
SLOW = 0.100  # 50x
SLOW_SHARE = 0.01
WORKERS = 16
CALLS_PER_ROUND = 2_000
ROUNDS = 6


class Dependency:
    """The simulated dependency: a heavy-tailed sleep per attempt; counts attempts."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.attempts = 0

    async def __call__(self) -> None:
        self.attempts += 1
        await asyncio.sleep(SLOW if self.random.random() < SLOW_SHARE else FAST)


def variants(dependency: Dependency) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "plain": dependency,
        "Policy, no hedge": Policy(timeout=1.0)(dependency),
        "hedge, adaptive": Policy(timeout=1.0, hedge=Hedge())(dependency),
        "hedge, fixed 10ms": Policy(timeout=1.0, hedge=Hedge(delay=0.01))(dependency),
    }


async def one_round(call: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    """Run ``calls`` calls WORKERS at a time; return each call's latency in seconds."""
    latencies: list[float] = []
    left = calls

    async def worker() -> None:
        nonlocal left
        clock = time.perf_counter
        while left > 0:
            left -= 1
            began = clock()
            await call()
            latencies.append(clock() - began)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return latencies


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


async def measure() -> dict[str, tuple[list[float], float]]:
    dependencies = {name: Dependency(seed) for seed, name in enumerate(variants(Dependency(0)))}
    calls = {name: variants(dependencies[name])[name] for name in dependencies}
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for round_number in range(ROUNDS):
        order = list(calls)
        if round_number % 2:
            order.reverse()
        for name in order:
            latencies[name] += await one_round(calls[name], CALLS_PER_ROUND)
    made = ROUNDS * CALLS_PER_ROUND
    return {
        name: (sorted(latencies[name]), dependencies[name].attempts / made - 1.0) for name in calls
    }


def main() -> None:
    print(__doc__.split("\n\n")[0])
    print(
        f"\n{ROUNDS} rounds x {CALLS_PER_ROUND} calls, {WORKERS} at a time; attempts take "
        f"{FAST * 1000:g} ms, {SLOW_SHARE:.0%} of them {SLOW * 1000:g} ms"
    )
    results = asyncio.run(measure())
    rows = []
    for name, (ordered, extra) in results.items():
        rows.append(
            [
                name,
                f"{percentile(ordered, 0.50) * 1000:.2f}",
                f"{percentile(ordered, 0.99) * 1000:.2f}",
                f"{percentile(ordered, 0.999) * 1000:.2f}",
                f"{statistics.fmean(ordered) * 1000:.2f}",
                f"{extra:+.1%}",
            ]
        )
    print()
    table(rows, ["variant", "p50 ms", "p99 ms", "p99.9 ms", "mean ms", "extra calls"])
    plain = percentile(results["plain"][0], 0.999)
    hedged, extra = results["hedge, adaptive"]
    lower = plain / percentile(hedged, 0.999)
    record(
        SCRIPT,
        "default Hedge: p99.9 >= 5x lower than plain, for <= 5% more calls",
        f"{lower:.1f}x lower, {extra:+.1%} calls",
        lower >= 5.0 and extra <= 0.05,
    )


if __name__ == "__main__":
    main()
