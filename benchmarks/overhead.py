"""Success-path overhead of resilient's wrappers against the libraries users pick instead.

Every wrapper guards a function that returns at once, so what is timed is the
wrapper itself. Each variant is timed in several rounds, interleaved with the
others, and its best round is kept (the machine is shared and noisy: the
minimum is the least disturbed estimate). Overhead = wrapped call - bare call.

The tracing section times the five-stage Policy with ``tracing=False``, with the
OpenTelemetry API alone (no SDK: the default no-op providers), and with an SDK
tracer provider exporting to memory, against one bare SDK span per call.

Run: ``make bench`` or ``.venv/bin/python benchmarks/overhead.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import backoff
import pybreaker
import stamina
import tenacity
from _timing import best_of_interleaved, table, time_async, time_sync
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient

CALLS = 20_000
ROUNDS = 7


def _full_policy(**telemetry: Any) -> resilient.Policy:
    return resilient.Policy(
        bulkhead=resilient.Bulkhead(max_concurrent=100),
        timeout=10.0,
        retry=resilient.Retry(attempts=3),
        breaker=resilient.CircuitBreaker(failure_threshold=5),
        attempt_timeout=5.0,
        **telemetry,
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


def overhead_rows(best: dict[str, float], bare: str, reference: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
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


# Tracing ---------------------------------------------------------------------------------

TRACING_ROUNDS = 15  # the API-only verdict is about a few percent: more rounds, less noise
SDK_CALLS = 2_000  # an SDK span costs ~20x the Policy; fewer calls keep the run short
API_ONLY_LIMIT = 1.05  # API-only overhead, relative to tracing=False
SDK_LIMIT = 1.3  # Policy with an SDK span, relative to one bare SDK span


def _sdk() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def tracing_variants(
    provider: TracerProvider,
) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]]]:
    """``(without SDK, with SDK)`` variants of the sync five-stage Policy."""

    def bare() -> int:
        return 1

    tracer = provider.get_tracer("benchmark")

    def bare_span() -> int:
        with tracer.start_as_current_span("bare"):
            return bare()

    cheap = {
        "bare call": bare,
        "Policy, tracing=False": _full_policy(tracing=False)(bare),
        "Policy, API only (no SDK)": _full_policy()(bare),
    }
    sdk = {
        "bare SDK span": bare_span,
        "Policy, SDK span": _full_policy(tracer_provider=provider)(bare),
    }
    return cheap, sdk


def async_tracing_variants(
    provider: TracerProvider,
) -> tuple[dict[str, Callable[[], Awaitable[Any]]], dict[str, Callable[[], Awaitable[Any]]]]:
    """``(without SDK, with SDK)`` variants of the async five-stage Policy."""

    async def bare() -> int:
        return 1

    tracer = provider.get_tracer("benchmark")

    async def bare_span() -> int:
        with tracer.start_as_current_span("bare"):
            return await bare()

    cheap = {
        "bare call": bare,
        "Policy, tracing=False": _full_policy(tracing=False)(bare),
        "Policy, API only (no SDK)": _full_policy()(bare),
    }
    sdk = {
        "bare SDK span": bare_span,
        "Policy, SDK span": _full_policy(tracer_provider=provider)(bare),
    }
    return cheap, sdk


def tracing_report(kind: str, cheap: dict[str, float], sdk: dict[str, float]) -> list[str]:
    """Print the tracing table for ``kind`` (sync/async); return its two verdict lines."""
    base = cheap["bare call"]
    off = cheap["Policy, tracing=False"] - base
    api = cheap["Policy, API only (no SDK)"] - base
    span = sdk["bare SDK span"]
    traced = sdk["Policy, SDK span"]

    def row(name: str, seconds: float, ratio: str) -> tuple[str, ...]:
        return (name, f"{seconds * 1e9:,.0f}", f"{(seconds - base) * 1e9:,.0f}", ratio)

    rows = [
        ("bare call", f"{base * 1e9:,.0f}", "(baseline)", ""),
        row("Policy, tracing=False", base + off, "1.00x of tracing=False"),
        row("Policy, API only (no SDK)", base + api, f"{api / off:.3f}x of tracing=False"),
        row("bare SDK span", span, "1.00x of a bare SDK span"),
        row("Policy, SDK span", traced, f"{traced / span:.3f}x of a bare SDK span"),
    ]
    print(f"\n{kind} five-stage Policy and OpenTelemetry (SDK: in-memory span exporter)")
    table(rows, ("variant", "ns/call", "overhead ns", "ratio"))

    def verdict(what: str, ratio: float, limit: float) -> str:
        return f"  {kind} {what}: {ratio:.3f}x <= {limit}x: {'yes' if ratio <= limit else 'NO'}"

    return [
        verdict("API only vs tracing=False (overhead)", api / off, API_ONLY_LIMIT),
        verdict("Policy with SDK span vs bare SDK span", traced / span, SDK_LIMIT),
    ]


def tracing_rows() -> list[str]:
    """Time the tracing variants, sync and async; print their tables; return the verdicts."""
    provider, exporter = _sdk()

    def cleared_sync(fn: Callable[[], Any], calls: int) -> float:
        exporter.clear()  # finished spans pile up in memory otherwise
        return time_sync(fn, calls)

    def cleared_async(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
        exporter.clear()
        return time_async(fn, calls)

    verdicts: list[str] = []
    cheap, sdk = tracing_variants(provider)
    verdicts += tracing_report(
        "Sync",
        best_of_interleaved(cheap, time_sync, CALLS, TRACING_ROUNDS),
        best_of_interleaved(sdk, cleared_sync, SDK_CALLS, TRACING_ROUNDS),
    )
    async_cheap, async_sdk = async_tracing_variants(provider)
    verdicts += tracing_report(
        "Async",
        best_of_interleaved(async_cheap, time_async, CALLS, TRACING_ROUNDS),
        best_of_interleaved(async_sdk, cleared_async, SDK_CALLS, TRACING_ROUNDS),
    )
    exporter.clear()
    provider.shutdown()
    return verdicts


SLOW_FAILURE = 0.3  # seconds each failing attempt takes
BUDGET = 1.0


def _deadline_contenders() -> dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Each library configured for 'retry until 1 s have passed', backoff 0.1 s to 0.2 s."""
    return {
        "resilient Policy(timeout=1)": resilient.Policy(
            timeout=BUDGET,
            retry=resilient.Retry(
                attempts=1000, budget=None, backoff=resilient.Backoff(initial=0.1, max_delay=0.2)
            ),
        ),
        "tenacity stop_after_delay(1)": tenacity.retry(
            stop=tenacity.stop_after_delay(BUDGET),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=0.2, jitter=0.1),
        ),
        "stamina timeout=1": stamina.retry(
            on=Exception, attempts=None, timeout=BUDGET, wait_initial=0.1, wait_max=0.2
        ),
        "backoff max_time=1": backoff.on_exception(
            backoff.expo, Exception, max_time=BUDGET, factor=0.1, max_value=0.2
        ),
    }


def deadline_rows() -> list[tuple[str, ...]]:
    """How far past a 1 s budget each library lets a slowly failing call run."""

    def slow_failure() -> None:
        time.sleep(SLOW_FAILURE)
        raise ConnectionError("slow failure")

    async def slow_failure_async() -> None:
        await asyncio.sleep(SLOW_FAILURE)
        raise ConnectionError("slow failure")

    def elapsed(call: Callable[[], Any]) -> float:
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            call()
        return time.perf_counter() - started

    stamina.instrumentation.set_on_retry_hooks([])  # its default logging would flood the table
    rows: list[tuple[str, ...]] = []
    for name, decorate in _deadline_contenders().items():
        sync = elapsed(decorate(slow_failure))
        wrapped = decorate(slow_failure_async)
        asynchronous = elapsed(lambda: asyncio.run(wrapped()))  # noqa: B023 - runs at once
        rows.append(
            (
                name,
                f"{sync:.2f} s",
                f"{(sync - BUDGET) / BUDGET:+.0%}",
                f"{asynchronous:.2f} s",
                f"{(asynchronous - BUDGET) / BUDGET:+.0%}",
            )
        )
    return rows


def main() -> None:
    # The open-breaker section trips breakers on purpose; their WARNING would land mid-table.
    logging.getLogger("resilient.breaker").setLevel(logging.ERROR)
    print(
        f"Python {sys.version.split()[0]}; best of {ROUNDS} interleaved rounds of {CALLS:,} calls"
    )
    headers = ("variant", "ns/call", "overhead ns", "less overhead than ref")
    sync = best_of_interleaved(sync_variants(), time_sync, CALLS, ROUNDS)
    print("\nSync success path (ref: tenacity + pybreaker)")
    table(overhead_rows(sync, "bare call", "tenacity + pybreaker"), headers)
    asynchronous = best_of_interleaved(async_variants(), time_async, CALLS, ROUNDS)
    print("\nAsync success path (ref: tenacity)")
    table(overhead_rows(asynchronous, "bare call", "tenacity"), headers)
    rejected = best_of_interleaved(rejection_variants(), time_sync, CALLS, ROUNDS)
    base = rejected["raise + catch (baseline)"]
    print("\nOpen breaker: cost of a rejected call")
    table(
        [
            (name, f"{seconds * 1e9:,.0f}", f"{(seconds - base) * 1e9:,.0f}")
            for name, seconds in rejected.items()
        ],
        ("variant", "ns/call", "over raise+catch"),
    )
    verdicts = tracing_rows()
    print("\nTracing verdicts")
    print("\n".join(verdicts))
    print(f"\nDeadline adherence: a call failing after {SLOW_FAILURE:g} s, retried on a 1 s budget")
    table(
        deadline_rows(),
        ("library", "sync elapsed", "sync overrun", "async elapsed", "async overrun"),
    )


if __name__ == "__main__":
    main()
