"""resilient.RateLimiter's healthy path beside aiolimiter and pyrate-limiter.

What is measured is the cost of one admitted acquire, the price every call pays while
under the limit: each limiter is built with a limit (10^9 calls a second) that nothing
here can reach, so no call is ever refused or made to wait. The peers are asked the way
their users ask them:

    resilient        sync  limiter.try_acquire()         async  await limiter.acquire_async()
                                                                 async with limiter: pass
    pyrate-limiter   sync  limiter.try_acquire("bench", blocking=False), with its token
                           bucket (GCRA, constant state: the same algorithm) and with its
                           default in-memory bucket (a sliding-window log)
    aiolimiter       async async with limiter: pass      (a leaky bucket; asyncio only)

"empty call" is the loop calling a function that does nothing (sync) or awaiting a
coroutine that does nothing (async): the floor under every row. The machine is shared and
noisy, so the variants take turns in many short paired rounds (see ``_timing.py``) and each
figure judged is the median over rounds of resilient's time per call divided by the peer's
in the same round, whole times, floor included (which can only flatter the slower side).

Targets. resilient's admitted acquire costs less than each peer's: sync try_acquire below
pyrate-limiter's (both buckets), async acquire_async below aiolimiter's ``async with``
(ratio < 1).

Run: ``make bench`` or ``.venv/bin/python benchmarks/ratelimit.py`` (a few seconds).
"""

from __future__ import annotations

import asyncio
import platform
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from importlib.metadata import version
from typing import Any

import aiolimiter
from _targets import record
from _timing import median_paired_ratio, paired_rounds, table, time_async, time_sync
from pyrate_limiter import Duration, Limiter, Rate, limiter_factory

from resilient.ratelimit import RateLimiter

SCRIPT = "ratelimit.py"
LIMIT = 10**9  # calls a second: never reached, so every acquire is admitted at once
ROUNDS = 41
EMPTY = "empty call"
OURS = "resilient try_acquire"
OURS_ASYNC = "resilient acquire_async"
OURS_WITH = "resilient async with"
PYRATE_BUCKET = "pyrate-limiter token bucket"
PYRATE_LOG = "pyrate-limiter default bucket"
AIOLIMITER = "aiolimiter async with"


def sync_variants() -> dict[str, Callable[[], Any]]:
    ours = RateLimiter(rate=LIMIT)
    bucket = limiter_factory.create_token_bucket_limiter(LIMIT, Duration.SECOND)
    log = Limiter(Rate(LIMIT, Duration.SECOND))
    variants: dict[str, Callable[[], Any]] = {
        EMPTY: lambda: True,
        OURS: ours.try_acquire,
        PYRATE_BUCKET: partial(bucket.try_acquire, "bench", blocking=False),
        PYRATE_LOG: partial(log.try_acquire, "bench", blocking=False),
    }
    for name, fn in variants.items():
        assert all(fn() is True for _ in range(100)), f"{name} refused a call"
    return variants


def async_variants() -> dict[str, Callable[[], Awaitable[Any]]]:
    ours = RateLimiter(rate=LIMIT)
    peer = aiolimiter.AsyncLimiter(LIMIT, 1)

    async def empty() -> None:
        return None

    async def ours_with() -> None:
        async with ours:
            pass

    async def peer_with() -> None:
        async with peer:
            pass

    return {
        EMPTY: empty,
        OURS_ASYNC: ours.acquire_async,
        OURS_WITH: ours_with,
        AIOLIMITER: peer_with,
    }


def per_call_table(rounds: Mapping[str, Sequence[float]]) -> None:
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    floor = medians[EMPTY]
    table(
        [
            [name, round(seconds * 1e9), round((seconds - floor) * 1e9)]
            for name, seconds in medians.items()
        ],
        ("variant", "ns per call", "ns over empty call"),
    )


def main() -> None:
    print(
        f"Python {platform.python_version()}, aiolimiter {version('aiolimiter')}, "
        f"pyrate-limiter {version('pyrate-limiter')}"
    )
    calls = {EMPTY: 40_000, OURS: 20_000, PYRATE_BUCKET: 1_500, PYRATE_LOG: 1_500}
    sync = paired_rounds(sync_variants(), time_sync, calls, ROUNDS)
    print("\n== Sync: one admitted acquire, median round")
    per_call_table(sync)

    with asyncio.Runner() as runner:
        async_calls = {EMPTY: 40_000, OURS_ASYNC: 20_000, OURS_WITH: 20_000, AIOLIMITER: 10_000}
        timer = partial(time_async, runner=runner)
        measured = paired_rounds(async_variants(), timer, async_calls, ROUNDS)
    print("\n== Async: one admitted acquire, median round")
    per_call_table(measured)

    judged = [
        (sync, OURS, PYRATE_BUCKET, "sync try_acquire"),
        (sync, OURS, PYRATE_LOG, "sync try_acquire"),
        (measured, OURS_ASYNC, AIOLIMITER, "async acquire_async"),
    ]
    for rounds, ours, peer, what in judged:
        ratio = median_paired_ratio(rounds, ours, peer)
        record(
            SCRIPT,
            f"resilient {what} costs less than {peer} (time ratio < 1)",
            ratio.ratio(),
            ratio.median < 1.0,
        )


if __name__ == "__main__":
    main()
