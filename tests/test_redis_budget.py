"""resilient.redis.RedisBudgetStore: one retry budget for a fleet, on a real redis-server."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from redis_live import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

from resilient import Retry, RetryBudget
from resilient.redis import RedisBudgetStore
from resilient.testing import FakeClock

_made: list[RedisBudgetStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Every store a test made stops its syncer with the test."""
    yield
    while _made:
        _made.pop().close()


def make(server: RedisServer, name: str = "api", **options: Any) -> RedisBudgetStore:
    store = RedisBudgetStore(server.client(), name=name, **options)
    _made.append(store)
    return store


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.005)


def test_the_fleet_shares_one_reserve(redis_server: RedisServer) -> None:
    """Ten processes' budgets allow the fleet's 10 retries/s reserve once, not ten times."""
    budgets = [
        RetryBudget(ratio=0.0, min_retries_per_second=1, window=10, store=make(redis_server))
        for _ in range(10)
    ]
    granted = sum(budget.try_withdraw(0.0) for budget in budgets for _ in range(3))
    assert granted == 10  # 1/s over 10 s, fleet-wide
    assert all(budget.available(0.0) == 0 for budget in budgets)


def test_calls_from_every_process_earn_retries(redis_server: RedisServer) -> None:
    """Calls are counted locally (lock-free) and reported: 20% of the fleet's calls."""
    store_a, store_b = make(redis_server), make(redis_server)
    a = RetryBudget(ratio=0.2, min_retries_per_second=0, store=store_a)
    b = RetryBudget(ratio=0.2, min_retries_per_second=0, store=store_b)
    now = time.monotonic()
    for _ in range(50):
        a.deposit(now)
    for _ in range(50):
        b.deposit(now)
    assert a.take_unreported() == (50, 0)
    assert a.take_unreported() == (0, 0)  # handed over once
    a._give_back(50)  # as if the store could not take them
    # a's calls reach Redis with a's withdrawal; b's with b's.
    assert a.try_withdraw(now)
    assert b.available(now) == 19  # 0.2 * 100 - 1
    granted = sum(b.try_withdraw(now) for _ in range(30))
    assert granted == 19


def test_the_syncer_reports_calls_of_processes_that_never_retry(
    redis_server: RedisServer,
) -> None:
    """A healthy process's calls still count for the fleet (batched by the syncer)."""
    healthy = RetryBudget(ratio=0.5, min_retries_per_second=0, store=make(redis_server))
    failing = RetryBudget(ratio=0.5, min_retries_per_second=0, store=make(redis_server))
    now = time.monotonic()
    for _ in range(40):
        healthy.deposit(now)
    client = redis_server.client()

    def calls() -> int:
        fields = client.hgetall("resilient:budget:{api}")
        return sum(int(v) for k, v in fields.items() if k.startswith(b"c"))

    wait_for(lambda: calls() == 40)
    assert failing.available(now) == 20


def test_redis_down_falls_back_to_local_counts_and_reports_them_later(
    redis_server: RedisServer,
) -> None:
    """No call fails for Redis; local retries made during the outage reach the fleet after."""
    store = make(redis_server, retry_interval=0.05)
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.5, window=10, store=store)
    now = time.monotonic()
    assert budget.try_withdraw(now)
    redis_server.kill()
    # The local budget has its own reserve of 5, one of them used before the outage.
    local = [budget.try_withdraw(now) for _ in range(6)]
    assert local == [True] * 4 + [False] * 2
    assert not store.redis_available
    assert budget.available(now) == 0
    redis_server.start()
    wait_for(lambda: store.redis_available)
    client = redis_server.client()
    # The fresh server has lost its counts; the syncer reports the 4 retries made locally.
    wait_for(lambda: client.exists("resilient:budget:{api}") == 1)
    fields = client.hgetall("resilient:budget:{api}")
    assert sum(int(v) for k, v in fields.items() if k.startswith(b"r")) == 4


def test_retry_through_a_fleet_budget(redis_server: RedisServer) -> None:
    """Retry(budget=...) with a Redis store: retries stop when the fleet's budget is spent."""
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.2, window=10, store=make(redis_server))
    retry = Retry(attempts=5, budget=budget, backoff=None, on=ConnectionError)
    attempts = 0

    @retry
    def flaky() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    with pytest.raises(ConnectionError) as failure:
        flaky()
    assert attempts == 3  # two retries: the fleet's reserve
    assert any("budget" in note for note in failure.value.__notes__)


def test_spawned_budgets_share_the_store_and_pickles_keep_it() -> None:
    """spawn() keeps the store (shared counts); the store is validated at construction."""
    store = RedisBudgetStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="x")
    budget = RetryBudget(store=store)
    assert budget.spawn().store is store
    assert budget.store is store
    with pytest.raises(TypeError, match="BudgetStore"):
        RetryBudget(store=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        RedisBudgetStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name=" ")
    with pytest.raises(ValueError, match="braces"):
        RedisBudgetStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="{x}")
    assert "resilient:budget:{x}" in repr(store)
    with pytest.raises(TypeError, match="each process"):
        pickle.dumps(budget)
    store.close()


def test_local_budget_with_a_clock_is_unchanged() -> None:
    """Without a store the budget is what it was: in-process, no reports."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1, window=2, clock=clock)
    assert budget.store is None
    assert [budget.try_withdraw(clock()) for _ in range(3)] == [True, True, False]


async def test_async_client_decides_on_the_last_sync(redis_server: RedisServer) -> None:
    """redis.asyncio: withdrawals decide locally on fleet counts; the task reports them."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisBudgetStore(client, name="aio", sync_interval=0.02)
        budget = RetryBudget(ratio=0.0, min_retries_per_second=0.3, window=10, store=store)
        now = time.monotonic()
        assert [budget.try_withdraw(now) for _ in range(4)] == [True] * 3 + [False]
        sync_client = redis_server.client()
        for _ in range(250):
            fields = sync_client.hgetall("resilient:budget:{aio}")
            if sum(int(v) for k, v in fields.items() if k.startswith(b"r")) == 3:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the syncer task never reported the retries")
        peer = RetryBudget(
            ratio=0.0, min_retries_per_second=0.3, window=10, store=make(redis_server, "aio")
        )
        assert peer.available(now) == 0
        assert budget.available(now) == 0
        store.close()
    finally:
        await client.aclose()


def test_a_report_that_fails_is_kept_for_the_next(redis_server: RedisServer) -> None:
    """The syncer's batch meets a dead server: the calls are handed over again later."""
    store = make(redis_server, sync_interval=60)
    budget = RetryBudget(store=store)
    now = time.monotonic()
    for _ in range(7):
        budget.deposit(now)
    redis_server.kill()
    budget._shared.sync()  # type: ignore[union-attr]
    assert not store.redis_available
    assert budget.take_unreported() == (7, 0)
    assert store.key == "resilient:budget:{api}"


async def test_async_client_outage_keeps_the_counts(redis_server: RedisServer) -> None:
    """redis.asyncio and a dead server: what the task could not report, it reports later."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisBudgetStore(client, name="aio-down", sync_interval=0.02, retry_interval=0.05)
        budget = RetryBudget(ratio=0.0, min_retries_per_second=1, window=10, store=store)
        assert budget.try_withdraw(time.monotonic())
        redis_server.kill()
        shared = budget._shared
        await shared.async_sync()  # type: ignore[union-attr]
        assert not store.redis_available
        assert budget.try_withdraw(time.monotonic())  # decided on the last sync + its own
        redis_server.start()
        checker = redis_server.client()
        started = time.monotonic()
        while True:
            fields = checker.hgetall("resilient:budget:{aio-down}")
            if sum(int(v) for k, v in fields.items() if k.startswith(b"r")) == 2:
                break
            assert time.monotonic() - started < 5, fields
            await asyncio.sleep(0.02)
        store.close()
    finally:
        await client.aclose()


def test_unreported_calls_older_than_the_window_are_dropped() -> None:
    """Calls the store never got (a long outage) stop counting once the window has passed."""
    clock = FakeClock()
    store = RedisBudgetStore(
        redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="old", sync_interval=3600
    )
    budget = RetryBudget(window=10, clock=clock, store=store)
    for _ in range(5):
        budget.deposit(clock())
    clock.advance(1.5)
    budget.deposit(clock())  # the next slice: the first five wait for the store
    assert budget.take_unreported() == (6, 0)
    for _ in range(5):
        budget.deposit(clock())
    clock.advance(11)
    budget.deposit(clock())  # the window moved past them: they would count for nothing
    assert budget.take_unreported() == (1, 0)
    store.close()
