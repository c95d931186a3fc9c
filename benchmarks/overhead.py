"""Success-path overhead of resilient's wrappers against the libraries users pick instead.

Every wrapper guards a function that returns at once, so what is timed is the
wrapper itself. Each variant is timed in several rounds, interleaved with the
others, and its best round is kept (the machine is shared and noisy: the
minimum is the least disturbed estimate). Overhead = wrapped call - bare call.

Run: ``make bench`` or ``.venv/bin/python benchmarks/overhead.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import backoff
import pybreaker
import stamina
import tenacity

import resilient

CALLS = 20_000
ROUNDS = 7


def _time_sync(fn: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def _time_async(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
    async def loop() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await fn()
        return (time.perf_counter() - started) / calls

    return asyncio.run(loop())


def best_of(
    variants: dict[str, Callable[[], Any]], timer: Callable[[Callable[[], Any], int], float]
) -> dict[str, float]:
    """Seconds per call for each variant: the best of ROUNDS interleaved rounds."""
    best = dict.fromkeys(variants, math.inf)
    for fn in variants.values():  # warm up caches and lazy state
        timer(fn, CALLS // 10)
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            best[name] = min(best[name], timer(fn, CALLS))
    return best


def _full_policy() -> resilient.Policy:
    return resilient.Policy(
        bulkhead=resilient.Bulkhead(max_concurrent=100),
        timeout=10.0,
        retry=resilient.Retry(attempts=3),
        breaker=resilient.CircuitBreaker(failure_threshold=5),
        attempt_timeout=5.0,
    )


def sync_variants() -> dict[str, Callable[[], Any]]:
    def bare() -> int:
        return 1

    retry_only = resilient.Retry(attempts=3)(bare)
    breaker_only = resilient.CircuitBreaker(failure_threshold=5)(bare)
    policy = _full_policy()(bare)
    ten = tenacity.retry(
        stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
    )(bare)
    pyb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(bare)
    ten_pyb = tenacity.retry(
        stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
    )(pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)(bare))
    sta = stamina.retry(on=Exception, attempts=3)(bare)
    bo = backoff.on_exception(backoff.expo, Exception, max_tries=3)(bare)
    return {
        "bare call": bare,
        "resilient Retry": retry_only,
        "resilient CircuitBreaker": breaker_only,
        "resilient Policy (5 stages)": policy,
        "tenacity": ten,
        "pybreaker": pyb,
        "tenacity + pybreaker": ten_pyb,
        "stamina": sta,
        "backoff": bo,
    }


def async_variants() -> dict[str, Callable[[], Awaitable[Any]]]:
    async def bare() -> int:
        return 1

    async def suspends() -> int:
        await asyncio.sleep(0)
        return 1

    return {
        "bare call": bare,
        "resilient Retry": resilient.Retry(attempts=3)(bare),
        "resilient CircuitBreaker": resilient.CircuitBreaker(failure_threshold=5)(bare),
        "resilient Policy (5 stages)": _full_policy()(bare),
        "tenacity": tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )(bare),
        "stamina": stamina.retry(on=Exception, attempts=3)(bare),
        "backoff": backoff.on_exception(backoff.expo, Exception, max_tries=3)(bare),
        # A call that suspends once: the Policy then arms its cancellation timer.
        "bare call, suspending": suspends,
        "resilient Policy (5 stages), suspending": _full_policy()(suspends),
        "tenacity, suspending": tenacity.retry(stop=tenacity.stop_after_attempt(3))(suspends),
    }


def rejection_variants() -> dict[str, Callable[[], Any]]:
    def failing() -> int:
        raise ConnectionError("down")

    ours = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=3600)
    theirs = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    wrapped_ours = ours(failing)
    wrapped_theirs = theirs(failing)
    for wrapped, error in ((wrapped_ours, ConnectionError), (wrapped_theirs, Exception)):
        with contextlib.suppress(error):
            wrapped()

    def reject(wrapped: Callable[[], Any], error: type[BaseException]) -> Callable[[], None]:
        def attempt() -> None:
            with contextlib.suppress(error):
                wrapped()

        return attempt

    def baseline() -> None:
        try:
            raise resilient.CircuitOpenError("x", 1.0)
        except resilient.CircuitOpenError:
            pass

    return {
        "raise + catch (baseline)": baseline,
        "resilient CircuitBreaker, open": reject(wrapped_ours, resilient.CircuitOpenError),
        "pybreaker, open": reject(wrapped_theirs, pybreaker.CircuitBreakerError),
    }


def table(title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> None:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    print(f"\n{title}")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def overhead_rows(best: dict[str, float], bare: str, reference: str) -> list[tuple[str, ...]]:
    rows = []
    base = best[bare]
    ref = best[reference] - base
    for name, seconds in best.items():
        if name.startswith("bare call"):
            rows.append((name, f"{seconds * 1e9:,.0f}", "(baseline)", ""))
            continue
        baseline = best[bare + ", suspending"] if "suspending" in name else base
        overhead = max(seconds - baseline, 0.0)
        ratio = ref / overhead if overhead > 0 else math.inf
        rows.append((name, f"{seconds * 1e9:,.0f}", f"{overhead * 1e9:,.0f}", f"{ratio:,.1f}x"))
    return rows


def main() -> None:
    print(
        f"Python {sys.version.split()[0]}; best of {ROUNDS} interleaved rounds of {CALLS:,} calls"
    )
    headers = ("variant", "ns/call", "overhead ns", "less overhead than ref")
    sync = best_of(sync_variants(), _time_sync)
    table(
        "Sync success path (ref: tenacity + pybreaker)",
        overhead_rows(sync, "bare call", "tenacity + pybreaker"),
        headers,
    )
    asynchronous = best_of(async_variants(), _time_async)
    table(
        "Async success path (ref: tenacity)",
        overhead_rows(asynchronous, "bare call", "tenacity"),
        headers,
    )
    rejected = best_of(rejection_variants(), _time_sync)
    base = rejected["raise + catch (baseline)"]
    table(
        "Open breaker: cost of a rejected call",
        [
            (name, f"{seconds * 1e9:,.0f}", f"{(seconds - base) * 1e9:,.0f}")
            for name, seconds in rejected.items()
        ],
        ("variant", "ns/call", "over raise+catch"),
    )


if __name__ == "__main__":
    main()
