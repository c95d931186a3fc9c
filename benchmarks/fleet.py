"""A fleet sharing state through Redis: resilient.redis beside pybreaker's CircuitRedisStorage.

One redis-server (started here on an ephemeral port, stopped at the end) serves every
figure, measured side by side in one run:

1. **Healthy-call overhead** of a closed breaker: ``CircuitBreaker(store=RedisStore(c))``
   (the state is a local copy, refreshed in the background) against
   ``pybreaker.CircuitBreaker(state_storage=CircuitRedisStorage(...))`` (every call reads
   the state, and a success writes a counter). Paired rounds (``_timing.py``), the empty
   call subtracted from both. Target: resilient's overhead at least 50x smaller. Beside
   it, the in-memory store, and ``acall`` with a ``redis.asyncio`` client (shown only).
2. **Propagation**: 8 OS processes each poll their own breaker; one trips it; the time
   until the last of the 8 rejects calls, over several trips. Target: within the
   documented bound, 100 ms (``sync_interval`` 50 ms + a round-trip).
3. **Half-open probes per reset interval**: the breaker is open, its dependency still
   dead; once ``reset_timeout`` has passed all 8 processes call at once. How many calls
   reach the dependency in that interval? Target: exactly ``half_open_max_calls`` (1)
   for resilient; pybreaker's breakers each go half-open on their own (one per process,
   and up to twice: it stores ``opened_at`` truncated to whole seconds, so a reopened
   breaker's 2 s reset timeout may pass after 1 s). ``RESET`` is whole seconds so that
   rounding does not decide the count.
4. **Retry amplification** of 16 processes against a dead dependency, each making 200
   calls through ``Retry(attempts=3)`` without waits: attempts per call, with the
   default budget (20% + 10/s over 10 s) counted fleet-wide in Redis, with one budget
   per process, and with no budget. Target: at most 1.3x fleet-wide.

The processes are forked before this process makes any store of its own (a store runs
a background thread). Run: ``make bench`` or ``.venv/bin/python benchmarks/fleet.py``
(about 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from typing import Any

import pybreaker
import redis
import redis.asyncio
from _servers import free_port, listening, stop
from _targets import record
from _timing import (
    median_paired_overhead,
    median_paired_ratio,
    paired_rounds,
    table,
    time_async,
    time_sync,
)
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry

from resilient import CircuitBreaker, CircuitOpenError, Retry, RetryBudget
from resilient.redis import RedisBudgetStore, RedisStore
from resilient.testing import instant_retries

SCRIPT = "fleet.py"
PROCESSES = 8
AMPLIFIERS = 16
CALLS_EACH = 200
# Whole seconds: pybreaker stores opened_at truncated to a second, so a sub-second
# reset_timeout would have it probe again at once after each failed probe, a count that
# measures that rounding rather than its design (one half-open stay per process).
RESET = 2.0
ROUNDS = 31
EMPTY, OURS, OURS_LOCAL, PYBREAKER, OURS_ASYNC = (
    "empty call",
    "resilient RedisStore",
    "resilient in-memory",
    "pybreaker CircuitRedisStorage",
    "resilient RedisStore, redis.asyncio",
)


def client(port: int) -> redis.Redis:
    return redis.Redis(
        port=port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=RedisRetry(NoBackoff(), 0)
    )


def noop() -> None:
    return None


class Dead(ConnectionError):
    """The dependency is down."""


# 2 and 3: several processes ---------------------------------------------------------


def _poller(port: int, name: str, ready: Any, tripped: Any, out: Any) -> None:
    breaker = CircuitBreaker(
        name=name, failure_threshold=1, reset_timeout=60, store=RedisStore(client(port))
    )
    breaker.call(noop)
    ready.release()
    tripped.wait()
    while breaker.stored_state is not breaker.stored_state.OPEN:
        time.sleep(0.0002)
    out.put(time.monotonic())


def propagation(port: int, trips: int) -> list[float]:
    """Seconds from a trip in this process until the last of PROCESSES others rejects."""
    context = multiprocessing.get_context("fork")
    lags = []
    for trip in range(trips):
        name = f"spread-{trip}"
        ready, tripped, out = context.Semaphore(0), context.Event(), context.Queue()
        members = [
            context.Process(target=_poller, args=(port, name, ready, tripped, out))
            for _ in range(PROCESSES)
        ]
        for member in members:
            member.start()
        for _ in members:
            ready.acquire()
        time.sleep(0.1)  # every poller settled into its loop
        # The trip: one failure through a breaker of this process's own.
        store = RedisStore(client(port))
        breaker = CircuitBreaker(name=name, failure_threshold=1, store=store)
        started = time.monotonic()
        with contextlib.suppress(Dead):
            breaker.call(_fail)
        tripped.set()
        seen = [out.get(timeout=30) for _ in members]
        lags.append(max(seen) - started)
        store.close()
        for member in members:
            member.join(timeout=10)
    return lags


def _fail() -> None:
    raise Dead


def _prober(kind: str, port: int, name: str, ready: Any, go: Any, out: Any) -> None:
    calls = 0

    def dependency() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.02)
        raise Dead

    if kind == "resilient":
        breaker: Any = CircuitBreaker(
            name=name, failure_threshold=1, reset_timeout=RESET, store=RedisStore(client(port))
        )
        refused: tuple[type[BaseException], ...] = (CircuitOpenError,)
    else:
        storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, client(port), namespace=name
        )
        breaker = pybreaker.CircuitBreaker(
            fail_max=1, reset_timeout=RESET, state_storage=storage, name=name
        )
        refused = (pybreaker.CircuitBreakerError,)
    ready.release()
    go.wait()
    # Within one reset interval: call as fast as possible, every process at once.
    until = time.monotonic() + RESET * 0.8
    while time.monotonic() < until:
        with contextlib.suppress(Dead, *refused):
            breaker.call(dependency)
    out.put(calls)


def probes_per_interval(kind: str, port: int, trials: int) -> list[int]:
    """Calls that reach a dead dependency in the first reset interval after it opened."""
    context = multiprocessing.get_context("fork")
    counts = []
    for trial in range(trials):
        name = f"probe-{kind}-{trial}"
        ready, go, out = context.Semaphore(0), context.Event(), context.Queue()
        members = [
            context.Process(target=_prober, args=(kind, port, name, ready, go, out))
            for _ in range(PROCESSES)
        ]
        for member in members:
            member.start()
        for _ in members:
            ready.acquire()
        _open(kind, port, name)
        time.sleep(RESET + 0.05)  # the reset timeout has passed for every process
        go.set()
        counts.append(sum(out.get(timeout=30) for _ in members))
        for member in members:
            member.join(timeout=10)
    return counts


def _open(kind: str, port: int, name: str) -> None:
    if kind == "resilient":
        store = RedisStore(client(port))
        breaker = CircuitBreaker(name=name, failure_threshold=1, reset_timeout=RESET, store=store)
        with contextlib.suppress(Dead):
            breaker.call(_fail)
        store.close()
        time.sleep(0.1)  # every process's copy has seen it
        return
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client(port), namespace=name)
    peer = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=RESET, state_storage=storage)
    with contextlib.suppress(Dead, pybreaker.CircuitBreakerError):
        peer.call(_fail)


# 4: retry amplification --------------------------------------------------------------


def _amplifier(kind: str, port: int, name: str, go: Any, out: Any) -> None:
    if kind == "fleet budget":
        budget: Any = RetryBudget(store=RedisBudgetStore(client(port), name=name))
    elif kind == "per-process budgets":
        budget = RetryBudget()
    else:
        budget = None
    attempts = 0

    @Retry(attempts=3, on=Dead, budget=budget)
    def call() -> None:
        nonlocal attempts
        attempts += 1
        raise Dead

    go.wait()
    with instant_retries():
        for _ in range(CALLS_EACH):
            with contextlib.suppress(Dead):
                call()
            time.sleep(0.002)  # ~0.5 s of traffic, interleaved across the fleet
    out.put(attempts)


def amplification(kind: str, port: int) -> float:
    context = multiprocessing.get_context("fork")
    go, out = context.Event(), context.Queue()
    name = f"amp-{kind.replace(' ', '-')}"
    members = [
        context.Process(target=_amplifier, args=(kind, port, name, go, out))
        for _ in range(AMPLIFIERS)
    ]
    for member in members:
        member.start()
    time.sleep(0.2)
    go.set()
    attempts = sum(out.get(timeout=60) for _ in members)
    for member in members:
        member.join(timeout=10)
    return attempts / (AMPLIFIERS * CALLS_EACH)


# 1: healthy calls, in this process (after the forks) -----------------------------------


def healthy(port: int) -> dict[str, list[float]]:
    ours = CircuitBreaker(name="healthy", store=RedisStore(client(port)))
    local = CircuitBreaker(name="healthy-local")
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client(port), namespace="h")
    peer = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, state_storage=storage)
    variants: dict[str, Callable[[], Any]] = {
        EMPTY: noop,
        OURS: lambda: ours.call(noop),
        OURS_LOCAL: lambda: local.call(noop),
        PYBREAKER: lambda: peer.call(noop),
    }
    calls = {EMPTY: 50_000, OURS: 20_000, OURS_LOCAL: 20_000, PYBREAKER: 200}
    return paired_rounds(variants, time_sync, calls, ROUNDS)


async def _nothing() -> None:
    return None


def healthy_async(port: int) -> dict[str, list[float]]:
    """The same with redis.asyncio: the state read also checks the syncer task is running."""
    with asyncio.Runner() as runner:
        aio = redis.asyncio.Redis(port=port, socket_timeout=1.0, retry=RedisRetry(NoBackoff(), 0))
        store = RedisStore(aio)
        ours = CircuitBreaker(name="healthy-aio", store=store)
        local = CircuitBreaker(name="healthy-aio-local")
        variants: dict[str, Callable[[], Any]] = {
            EMPTY: _nothing,
            OURS_ASYNC: lambda: ours.acall(_nothing),
            OURS_LOCAL: lambda: local.acall(_nothing),
        }
        calls = {EMPTY: 40_000, OURS_ASYNC: 20_000, OURS_LOCAL: 20_000}
        timer = partial(time_async, runner=runner)
        measured = paired_rounds(variants, timer, calls, ROUNDS)
        store.close()
        runner.run(aio.aclose())
    return measured


def main() -> None:
    # Every trip here is on purpose: the breakers' warnings would only bury the figures.
    logging.getLogger("resilient").setLevel(logging.ERROR)
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server is not on PATH: `make bench` installs it (apt-get)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="resilient-bench-redis-")
    server = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not listening(server, port, time.monotonic() + 10):
            sys.exit("redis-server did not start")
        info = client(port).info("server")
        print(
            f"Python {platform.python_version()}, redis-server {info['redis_version']}, "
            f"redis-py {version('redis')}, pybreaker {version('pybreaker')}"
        )
        lags = propagation(port, trips=5)
        ours_probes = probes_per_interval("resilient", port, trials=2)
        peer_probes = probes_per_interval("pybreaker", port, trials=2)
        kinds = ("fleet budget", "per-process budgets", "no budget")
        amplified = {kind: amplification(kind, port) for kind in kinds}
        rounds = healthy(port)
        async_rounds = healthy_async(port)
    finally:
        stop(server)
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n== 1. Healthy call through a closed breaker, median round")
    floor = statistics.median(rounds[EMPTY])
    table(
        [
            [
                name,
                round(statistics.median(times) * 1e9),
                round((statistics.median(times) - floor) * 1e9),
            ]
            for name, times in rounds.items()
        ],
        ("variant", "ns per call", "ns over empty call"),
    )
    over = median_paired_overhead(rounds, OURS, EMPTY)
    ratio = median_paired_ratio(rounds, PYBREAKER, OURS, baseline=EMPTY)
    record(
        SCRIPT,
        "healthy-call overhead: RedisStore >= 50x less than pybreaker CircuitRedisStorage",
        f"{over.median * 1e9:.0f} ns vs {(ratio.median * over.median) * 1e6:.0f} us: "
        f"{ratio.ratio(0)} less",
        ratio.median >= 50,
    )

    print("\n== 1b. The same awaited (acall), median round")
    floor = statistics.median(async_rounds[EMPTY])
    table(
        [
            [
                name,
                round(statistics.median(times) * 1e9),
                round((statistics.median(times) - floor) * 1e9),
            ]
            for name, times in async_rounds.items()
        ],
        ("variant", "ns per call", "ns over empty call"),
    )
    extra = median_paired_overhead(async_rounds, OURS_ASYNC, OURS_LOCAL)
    print(f"  async RedisStore over the in-memory store: {extra.median * 1e9:.0f} ns a call")

    print(f"\n== 2. A trip reaching {PROCESSES} processes (s, per trip)")
    print("  " + ", ".join(f"{lag * 1000:.1f} ms" for lag in lags))
    record(
        SCRIPT,
        f"an open breaker reaches all {PROCESSES} processes within 100 ms",
        f"slowest of {len(lags)} trips {max(lags) * 1000:.1f} ms, median "
        f"{statistics.median(lags) * 1000:.1f} ms",
        max(lags) <= 0.1,
    )

    print(f"\n== 3. Calls reaching a dead dependency in one reset interval, {PROCESSES} processes")
    table(
        [
            ["resilient RedisStore (half_open_max_calls=1)", *ours_probes],
            ["pybreaker CircuitRedisStorage", *peer_probes],
        ],
        ("breaker", *(f"trial {i + 1}" for i in range(len(ours_probes)))),
    )
    record(
        SCRIPT,
        "half-open probes per reset interval, fleet-wide: exactly half_open_max_calls (1)",
        f"resilient {ours_probes}, pybreaker {peer_probes}",
        all(count == 1 for count in ours_probes),
    )

    print(
        f"\n== 4. Attempts per call, {AMPLIFIERS} processes x {CALLS_EACH} calls, dead dependency"
    )
    table(
        [[kind, f"{value:.2f}x"] for kind, value in amplified.items()], ("budget", "amplification")
    )
    record(
        SCRIPT,
        f"retry amplification of {AMPLIFIERS} processes against a dead dependency <= 1.3x",
        ", ".join(f"{kind} {value:.2f}x" for kind, value in amplified.items()),
        amplified["fleet budget"] <= 1.3,
    )


if __name__ == "__main__":
    main()
