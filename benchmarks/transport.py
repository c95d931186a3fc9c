"""ResilientTransport against plain httpx and httpx-retries: per-request overhead and throughput.

Every figure is paired: the variants take turns in many short rounds, each is compared with
plain httpx (or with another variant) within the same round, and the median over rounds is
kept (the machine is shared and noisy: a slow moment moves both sides of a round together).
Each target is judged from such ratios measured in this run, and recorded with
``benchmarks/_targets.py``.

1. Overhead: GETs to an ``httpx.MockTransport`` that answers 200 at once, so what differs
   between variants is the transport wrapped around it. Overhead = variant - plain httpx in
   the same round. Measured twice:
   a. through ``client.get()``, as users call it. A request costs the client about 60 us, so
      the overhead, a microsecond or two, is a small difference of two large, noisy numbers;
   b. the transport's ``handle_request`` alone, on a request built once: the same overhead
      without the client's noise around it.
   Targets: resilient's default transport adds less overhead than httpx-retries'
   RetryTransport (a and b, sync and async); the full policy (timeout + attempt_timeout +
   bulkhead) adds at most 2x the default transport's overhead (b, sync and async).
2. Throughput: GETs over keep-alive to uvicorn on 127.0.0.1 (a raw ASGI app answering 200 "ok"),
   in a separate process that this script starts and stops. Every request is a round trip
   between two processes, whose time wanders a lot: see ``server_throughput``.
   Target: resilient keeps at least 97% of plain httpx's requests per second.
3. Tracing, on the transport alone as in 1b. With nothing configured (the OpenTelemetry
   API's no-op providers) against ``tracing=False``: the check must cost essentially
   nothing (target: at most 5% more overhead). With the SDK (in-memory exporter, under a
   current parent span, so each variant makes one CLIENT span per request) against
   opentelemetry-instrumentation-httpx's transport, which makes the same span: what
   resilient adds on top of the span itself (the policy's slow path, retry bookkeeping);
   no target.

The async figures need sniffio: without it httpcore tries and fails to import it on every
request (~420 us), which would drown every overhead measured here; the script refuses to run.

Run: ``make bench`` or ``.venv/bin/python benchmarks/transport.py`` (under a minute).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
from _servers import free_port, listening, stop
from _targets import record
from _timing import (
    Paired,
    median_paired_overhead,
    median_paired_ratio,
    paired_rounds,
    table,
    time_async,
    time_sync,
)
from httpx_retries import Retry as HttpxRetry
from httpx_retries import RetryTransport
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import (
    AsyncOpenTelemetryTransport,
    SyncOpenTelemetryTransport,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient import Bulkhead
from resilient.transport import AsyncResilientTransport, ResilientTransport

SCRIPT = "transport.py"
MOCK_CALLS = 150  # a client.get() costs ~70 us: a turn of ~10 ms
MOCK_ROUNDS = 120
DIRECT_CALLS = 1_000  # a handle_request costs ~8 us
DIRECT_ROUNDS = 120
SERVER_CALLS = 25  # per round: many short rounds, see server_throughput
SERVER_ROUNDS = 240
SERVER_WARMUP = 200
THROUGHPUT_TARGET = 0.97
FULL_LIMIT = 2.0  # full policy's overhead / the default transport's
MOCK_URL = "http://service.test/"
# httpx-retries counts retries, resilient counts attempts: both make at most 3 attempts.
THEIR_RETRY = HttpxRetry(total=2)

PLAIN = "plain httpx"
RESILIENT = "ResilientTransport (default)"
FULL = "ResilientTransport (full policy)"
THEIRS = "httpx-retries RetryTransport"

Message = dict[str, Any]


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The server under test: 200 "ok" to every request, as little work as ASGI allows."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


_targets: list[tuple[str, str, bool]] = []


def target(what: str, figure: str, met: bool) -> None:
    """Keep a target's verdict; ``main`` records them all at the end, in one block."""
    _targets.append((what, figure, met))


def _title(mode: str, direct: bool = False) -> str:
    if direct:
        method = "handle_request" if mode == "sync" else "handle_async_request"
        return f"\n{mode.capitalize()} ({method})"
    return f"\n{mode.capitalize()} (httpx.{'Client' if mode == 'sync' else 'AsyncClient'})"


def _ns(seconds: float) -> str:
    return f"{seconds * 1e9:,.0f}"


# 1. Overhead over a MockTransport ---------------------------------------------------------


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def _mock() -> httpx.MockTransport:
    return httpx.MockTransport(_answer)


def _full_policy() -> dict[str, Any]:
    return {
        "timeout": 10.0,
        "attempt_timeout": 5.0,
        "bulkhead": lambda origin: Bulkhead(max_concurrent=100, name=origin),
    }


def mock_transports() -> tuple[dict[str, httpx.BaseTransport], dict[str, httpx.AsyncBaseTransport]]:
    sync: dict[str, httpx.BaseTransport] = {
        PLAIN: _mock(),
        RESILIENT: ResilientTransport(_mock()),
        FULL: ResilientTransport(_mock(), **_full_policy()),
        THEIRS: RetryTransport(transport=_mock(), retry=THEIR_RETRY),
    }
    asynchronous: dict[str, httpx.AsyncBaseTransport] = {
        PLAIN: _mock(),
        RESILIENT: AsyncResilientTransport(_mock()),
        FULL: AsyncResilientTransport(_mock(), **_full_policy()),
        # One class for both: it sends through the inner transport's sync or async side.
        THEIRS: RetryTransport(transport=_mock(), retry=THEIR_RETRY),
    }
    return sync, asynchronous


def close_clients(
    sync_clients: dict[str, httpx.Client],
    async_clients: dict[str, httpx.AsyncClient],
    runner: asyncio.Runner,
) -> None:
    for client in sync_clients.values():
        client.close()
    for async_client in async_clients.values():
        runner.run(async_client.aclose())


Rounds = dict[str, list[float]]


def mock_overhead(runner: asyncio.Runner) -> tuple[Rounds, Rounds]:
    """Seconds per request of each variant through ``client.get()`` in each round, sync, async.

    A best round drifted by a microsecond from run to run here, as much as the overheads
    compared: hence many short rounds, paired.
    """
    sync_transports, async_transports = mock_transports()
    sync_clients = {name: httpx.Client(transport=t) for name, t in sync_transports.items()}
    async_clients = {name: httpx.AsyncClient(transport=t) for name, t in async_transports.items()}
    try:
        sync = paired_rounds(
            {name: partial(client.get, MOCK_URL) for name, client in sync_clients.items()},
            time_sync,
            MOCK_CALLS,
            MOCK_ROUNDS,
        )
        asynchronous = paired_rounds(
            {name: partial(client.get, MOCK_URL) for name, client in async_clients.items()},
            partial(time_async, runner=runner),
            MOCK_CALLS,
            MOCK_ROUNDS,
        )
    finally:
        close_clients(sync_clients, async_clients, runner)
    return sync, asynchronous


def direct_overhead(runner: asyncio.Runner) -> tuple[Rounds, Rounds]:
    """Seconds per ``handle_request`` / ``handle_async_request`` call in each round."""
    sync_transports, async_transports = mock_transports()
    with httpx.Client() as builder:
        request = builder.build_request("GET", MOCK_URL)
    sync = paired_rounds(
        {name: partial(t.handle_request, request) for name, t in sync_transports.items()},
        time_sync,
        DIRECT_CALLS,
        DIRECT_ROUNDS,
    )
    asynchronous = paired_rounds(
        {name: partial(t.handle_async_request, request) for name, t in async_transports.items()},
        partial(time_async, runner=runner),
        DIRECT_CALLS,
        DIRECT_ROUNDS,
    )
    return sync, asynchronous


def overhead_table(rounds: Rounds) -> None:
    """Median ns/request and paired overhead; this overhead / httpx-retries' and / default's."""
    rows: list[tuple[str, ...]] = []
    for name, times in rounds.items():
        seconds = Paired.of(times).median
        if name == PLAIN:
            rows.append((name, _ns(seconds), "(baseline)", "", ""))
            continue
        overhead = median_paired_overhead(rounds, name, PLAIN).median
        theirs = median_paired_ratio(rounds, name, THEIRS, PLAIN).median
        default = median_paired_ratio(rounds, name, RESILIENT, PLAIN).median
        rows.append(
            (name, _ns(seconds), f"{overhead * 1e9:+,.0f}", f"{theirs:.2f}x", f"{default:.2f}x")
        )
    table(
        rows,
        ("variant", "ns/request", "overhead ns", "of httpx-retries' overhead", "of default's"),
    )


def overhead_targets(part: str, mode: str, rounds: Rounds, full: bool) -> None:
    """Record the default transport against httpx-retries; with ``full``, the full policy too."""
    ratio = median_paired_ratio(rounds, RESILIENT, THEIRS, PLAIN)
    target(
        f"{part} {mode}: default transport's overhead < httpx-retries' (ratio < 1)",
        f"{ratio.ratio()}; {_ns(median_paired_overhead(rounds, RESILIENT, PLAIN).median)} vs "
        f"{_ns(median_paired_overhead(rounds, THEIRS, PLAIN).median)} ns",
        ratio.median < 1.0,
    )
    if full:
        ratio = median_paired_ratio(rounds, FULL, RESILIENT, PLAIN)
        target(
            f"{part} {mode}: timeout + attempt_timeout + bulkhead overhead <= {FULL_LIMIT:g}x "
            "the default transport's",
            f"{ratio.ratio()}; {_ns(median_paired_overhead(rounds, FULL, PLAIN).median)} vs "
            f"{_ns(median_paired_overhead(rounds, RESILIENT, PLAIN).median)} ns",
            ratio.median <= FULL_LIMIT,
        )


# 2. Throughput through a real server ------------------------------------------------------


@contextmanager
def uvicorn_server() -> Iterator[str]:
    """Run this module's ``app`` under uvicorn in a child process; yield its base URL."""
    here = Path(__file__).resolve()
    for _ in range(3):  # another process may take the free port before uvicorn binds it
        port = free_port()
        command = [
            *(sys.executable, "-m", "uvicorn", f"{here.stem}:app", "--app-dir", str(here.parent)),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning", "--no-access-log", "--lifespan", "off"),
        ]
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            if listening(server, port, time.monotonic() + 20.0):
                yield f"http://127.0.0.1:{port}/"
                return
        finally:
            stop(server)
    raise RuntimeError("uvicorn did not start listening; is it installed (the bench extra)?")


def server_clients() -> tuple[dict[str, httpx.Client], dict[str, httpx.AsyncClient]]:
    sync = {
        PLAIN: httpx.Client(),
        RESILIENT: httpx.Client(transport=ResilientTransport()),
        THEIRS: httpx.Client(transport=RetryTransport(retry=THEIR_RETRY)),
    }
    asynchronous = {
        PLAIN: httpx.AsyncClient(),
        RESILIENT: httpx.AsyncClient(transport=AsyncResilientTransport()),
        THEIRS: httpx.AsyncClient(transport=RetryTransport(retry=THEIR_RETRY)),
    }
    return sync, asynchronous


def server_throughput(url: str, runner: asyncio.Runner) -> tuple[Rounds, Rounds]:
    """Seconds per request of each variant in each round, sync then async.

    A round trip between two processes on a small VM wanders by +-20% from one moment to
    the next. Tried here, rounds of 3,000 requests with the best kept gave ratios that moved
    by 5 points from run to run, more than the overhead being measured. So rounds are short
    and many, the variants taking turns, and each variant is compared with plain httpx in
    the same round; the median of those paired ratios moved by about 1 point.
    """
    sync_clients, async_clients = server_clients()
    try:
        sync_gets = {name: partial(client.get, url) for name, client in sync_clients.items()}
        for get in sync_gets.values():
            get().raise_for_status()
            time_sync(get, SERVER_WARMUP)
        sync = paired_rounds(sync_gets, time_sync, SERVER_CALLS, SERVER_ROUNDS)
        # One event loop for every round: the clients' pooled connections belong to it.
        async_timer = partial(time_async, runner=runner)
        async_gets = {name: partial(client.get, url) for name, client in async_clients.items()}
        for async_get in async_gets.values():
            async_timer(async_get, SERVER_WARMUP)
        asynchronous = paired_rounds(async_gets, async_timer, SERVER_CALLS, SERVER_ROUNDS)
    finally:
        close_clients(sync_clients, async_clients, runner)
    return sync, asynchronous


def throughput_report(mode: str, rounds: Rounds) -> None:
    """Print the throughput table of ``mode``; keep resilient's paired req/s ratio target."""
    rows: list[tuple[str, ...]] = []
    for name, times in rounds.items():
        seconds = Paired.of(times).median
        # plain's time / this variant's, per round: this variant's share of plain's req/s.
        share = median_paired_ratio(rounds, PLAIN, name).median
        rows.append((name, f"{1 / seconds:,.0f}", f"{seconds * 1e6:,.1f}", f"{share:.1%}"))
    print(_title(mode))
    table(rows, ("variant", "req/s", "us/request", "vs plain"))
    share = median_paired_ratio(rounds, PLAIN, RESILIENT)
    target(
        f"2 {mode}: default transport keeps >= {THROUGHPUT_TARGET:.0%} of plain httpx's req/s",
        f"{share.median:.1%} (middle half of rounds {share.low:.1%}-{share.high:.1%})",
        share.median >= THROUGHPUT_TARGET,
    )


# 3. Tracing -------------------------------------------------------------------------------

# The API-only check costs tens of ns, a few % of the overhead: many short rounds, paired.
TRACING_CALLS = 1_500
TRACING_ROUNDS = 150
SDK_CALLS = 200  # an SDK span costs ~10x the transport: fewer calls a turn
SDK_ROUNDS = 60
API_ONLY_LIMIT = 1.05  # overhead with the API's no-op providers, relative to tracing=False
OFF = "ResilientTransport (tracing=False)"
API_ONLY = "ResilientTransport (API only, no SDK)"
THEIR_SPAN = "instrumentation-httpx transport (SDK)"
OUR_SPAN = "ResilientTransport (SDK)"


def tracing_overhead(runner: asyncio.Runner) -> list[tuple[Rounds, Rounds]]:
    """``[(no SDK, SDK)]`` seconds per request in each round, sync then async."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with httpx.Client() as builder:
        request = builder.build_request("GET", MOCK_URL)

    def sync(transports: dict[str, httpx.BaseTransport]) -> dict[str, Callable[[], Any]]:
        return {name: partial(t.handle_request, request) for name, t in transports.items()}

    def asynchronous(
        transports: dict[str, httpx.AsyncBaseTransport],
    ) -> dict[str, Callable[[], Any]]:
        return {name: partial(t.handle_async_request, request) for name, t in transports.items()}

    async_timer = partial(time_async, runner=runner)

    def cleared(timer: Callable[[Any, int], float], fn: Any, calls: int) -> float:
        exporter.clear()  # finished spans pile up in memory otherwise
        return timer(fn, calls)

    sync_cheap = sync(
        {
            PLAIN: _mock(),
            OFF: ResilientTransport(_mock(), tracing=False),
            API_ONLY: ResilientTransport(_mock()),
        }
    )
    async_cheap = asynchronous(
        {
            PLAIN: _mock(),
            OFF: AsyncResilientTransport(_mock(), tracing=False),
            API_ONLY: AsyncResilientTransport(_mock()),
        }
    )
    sync_sdk = sync(
        {
            PLAIN: _mock(),
            THEIR_SPAN: SyncOpenTelemetryTransport(_mock(), tracer_provider=provider),
            OUR_SPAN: ResilientTransport(_mock(), tracer_provider=provider),
        }
    )
    async_sdk = asynchronous(
        {
            PLAIN: _mock(),
            THEIR_SPAN: AsyncOpenTelemetryTransport(_mock(), tracer_provider=provider),
            OUR_SPAN: AsyncResilientTransport(_mock(), tracer_provider=provider),
        }
    )
    cheap = [
        paired_rounds(sync_cheap, time_sync, TRACING_CALLS, TRACING_ROUNDS),
        paired_rounds(async_cheap, async_timer, TRACING_CALLS, TRACING_ROUNDS),
    ]
    # A service's outbound calls happen under its own span: make one current.
    token = otel_context.attach(
        trace.set_span_in_context(provider.get_tracer("benchmark").start_span("parent"))
    )
    try:
        sdk = [
            paired_rounds(sync_sdk, partial(cleared, time_sync), SDK_CALLS, SDK_ROUNDS),
            paired_rounds(async_sdk, partial(cleared, async_timer), SDK_CALLS, SDK_ROUNDS),
        ]
    finally:
        otel_context.detach(token)
        exporter.clear()
        provider.shutdown()
    return list(zip(cheap, sdk, strict=True))


def tracing_report(mode: str, cheap: Rounds, sdk: Rounds) -> None:
    """Print the tracing tables of ``mode``; keep the API-only target."""
    headers = ("variant", "ns/request", "overhead ns", "paired ratio of overheads")

    def rows(rounds: Rounds, reference: str, label: str) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = [
            (PLAIN, _ns(Paired.of(rounds[PLAIN]).median), "(baseline)", "")
        ]
        for name in rounds:
            if name == PLAIN:
                continue
            overhead = median_paired_overhead(rounds, name, PLAIN).median
            ratio = median_paired_ratio(rounds, name, reference, PLAIN).median
            out.append(
                (
                    name,
                    _ns(Paired.of(rounds[name]).median),
                    f"{overhead * 1e9:+,.0f}",
                    "(reference)" if name == reference else f"{ratio:.3f}x of {label}",
                )
            )
        return out

    print(f"\n{mode.capitalize()}, nothing configured")
    table(rows(cheap, OFF, "tracing=False"), headers)
    print(f"\n{mode.capitalize()}, SDK span per request (in-memory exporter)")
    table(rows(sdk, THEIR_SPAN, "instrumentation-httpx"), headers)
    ratio = median_paired_ratio(cheap, API_ONLY, OFF, PLAIN)
    target(
        f"3 {mode}: API only (no SDK) adds <= {API_ONLY_LIMIT}x tracing=False's overhead",
        ratio.ratio(3),
        ratio.median <= API_ONLY_LIMIT,
    )


def require_sniffio() -> None:
    """Exit 1 unless sniffio imports: without it, async figures measure failed imports."""
    try:
        import sniffio  # noqa: F401
    except ImportError:
        print(
            "transport.py: sniffio is not importable. Without it httpcore tries to import it "
            "on every async request (~420 us of failed imports), which would swamp every "
            "async figure here. Install the bench extra: pip install -e '.[bench]'",
            file=sys.stderr,
        )
        sys.exit(1)


def main() -> None:
    require_sniffio()
    started = time.perf_counter()
    cores = os.cpu_count()
    server_stack = (
        f"{'httptools' if find_spec('httptools') else 'h11'}, "
        f"{'uvloop' if find_spec('uvloop') else 'asyncio'}"
    )
    print(
        f"Python {sys.version.split()[0]}, httpx {version('httpx')}, "
        f"httpx-retries {version('httpx-retries')}, uvicorn {version('uvicorn')} "
        f"({server_stack}); {cores} cores"
    )
    print(
        "Figures: median over interleaved rounds of the figure paired within a round "
        "(overhead = variant - plain httpx in that round; ratios of two overheads per round)"
    )
    with asyncio.Runner() as runner:
        print("\n1. Overhead per request over httpx.MockTransport")
        print("   full policy: timeout=10, attempt_timeout=5 and a bulkhead(100) on top of that")
        print(f"\n1a. Through client.get(): {MOCK_ROUNDS} rounds of {MOCK_CALLS:,} calls a turn")
        for mode, rounds in zip(("sync", "async"), mock_overhead(runner), strict=True):
            print(_title(mode))
            overhead_table(rounds)
            overhead_targets("1a", mode, rounds, full=False)
        print(
            "\n1b. The transport alone (handle_request on a built request): "
            f"{DIRECT_ROUNDS} rounds of {DIRECT_CALLS:,} calls a turn"
        )
        for mode, rounds in zip(("sync", "async"), direct_overhead(runner), strict=True):
            print(_title(mode, direct=True))
            overhead_table(rounds)
            overhead_targets("1b", mode, rounds, full=True)

        print(
            "\n2. Requests per second to uvicorn on 127.0.0.1, keep-alive, one GET at a time: "
            f"{SERVER_ROUNDS} interleaved rounds of {SERVER_CALLS} GETs per variant"
        )
        print(
            f"   client and server are two processes on {cores} cores: they compete for CPU "
            "and each waits for the other,\n   so this is a floor, and noisy. req/s and "
            "us/request: median round; vs plain: median over rounds\n   of plain's time / "
            "this variant's time in the same round"
        )
        with uvicorn_server() as url:
            measured = server_throughput(url, runner)
        for mode, rounds in zip(("sync", "async"), measured, strict=True):
            throughput_report(mode, rounds)

        print(
            f"\n3. Tracing, the transport alone as in 1b. No SDK: {TRACING_ROUNDS} rounds of "
            f"{TRACING_CALLS:,} calls a turn.\n   SDK: {SDK_ROUNDS} rounds of {SDK_CALLS:,} "
            "calls a turn, under a current parent span"
        )
        for mode, (cheap, sdk) in zip(("sync", "async"), tracing_overhead(runner), strict=True):
            tracing_report(mode, cheap, sdk)

    print("\nTargets")
    for what, figure, met in _targets:
        record(SCRIPT, what, figure, met)
    print(f"\nTotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
