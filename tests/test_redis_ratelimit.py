"""resilient.redis.RedisRateStore: one GCRA limit for a fleet, on Redis's clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from redis_live import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

from resilient import DeadlineExceeded, RateLimited, RateLimiter
from resilient.deadline import deadline
from resilient.redis import RedisRateStore
from resilient.testing import FakeClock

_made: list[RedisRateStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Every store a test made stops its syncer with the test."""
    yield
    while _made:
        _made.pop().close()


def make(server: RedisServer, name: str = "api", **options: Any) -> RedisRateStore:
    store = RedisRateStore(server.client(), name=name, **options)
    _made.append(store)
    return store


def test_processes_share_one_limit(redis_server: RedisServer) -> None:
    """Three limiters on one name admit the burst once between them, then refuse."""
    limiters = [RateLimiter(rate=1, per=60, burst=5, store=make(redis_server)) for _ in range(3)]
    admitted = sum(limiter.try_acquire() for limiter in limiters for _ in range(4))
    assert admitted == 5
    with pytest.raises(RateLimited) as refused:
        limiters[0].acquire()
    assert 55.0 < refused.value.retry_after <= 60.0


def test_host_clocks_do_not_matter(redis_server: RedisServer) -> None:
    """Limiters whose clocks disagree by hours still share one limit: Redis keeps the time."""
    early = RateLimiter(rate=1, per=60, burst=2, clock=FakeClock(0.0), store=make(redis_server))
    late = RateLimiter(rate=1, per=60, burst=2, clock=FakeClock(7200.0), store=make(redis_server))
    assert early.try_acquire()
    assert late.try_acquire()
    assert not early.try_acquire()
    assert not late.try_acquire()


def test_the_key_expires_once_its_instant_has_passed(redis_server: RedisServer) -> None:
    """An idle limit costs no memory: its key lives only until its instant is past."""
    store = make(redis_server)
    RateLimiter(rate=100, per=1.0, burst=1, store=store).acquire()
    ttl = redis_server.client().pttl(store.key)
    assert 0 < ttl <= 20


def test_keyed_limits_have_their_own_keys(redis_server: RedisServer) -> None:
    """for_key gives each key its own Redis key under the limit's name."""
    limiter = RateLimiter(rate=1, per=60, burst=1, store=make(redis_server, "tenants"))
    assert limiter.for_key("a").try_acquire()
    assert limiter.for_key("b").try_acquire()
    assert not limiter.for_key("a").try_acquire()
    assert limiter.for_key("a").store.key == "resilient:rate:{tenants['a']}"  # type: ignore[attr-defined]


def test_waiting_turns_and_giving_back(redis_server: RedisServer) -> None:
    """wait=True reserves a turn in Redis; a cancelled waiter gives it back."""
    store = make(redis_server)
    limiter = RateLimiter(rate=10, per=1.0, burst=1, wait=True, store=store)
    limiter.acquire()
    wait, reserved = store.take(0.0, 0.1, 0.0, 10.0)
    assert 0.0 < wait <= 0.1
    store.give_back(reserved, 0.1)
    wait_again, _ = store.take(0.0, 0.1, 0.0, 10.0)
    assert abs(wait_again - wait) < 0.05  # the same turn again, not the one after it


def test_redis_down_limits_locally_and_comes_back(redis_server: RedisServer) -> None:
    """No call fails for Redis: each process limits on its own until Redis returns."""
    store = make(redis_server, retry_interval=0.05)
    limiter = RateLimiter(rate=1, per=60, burst=2, store=store)
    assert limiter.try_acquire()
    redis_server.kill()
    assert [limiter.try_acquire() for _ in range(3)] == [True, True, False]
    assert not store.redis_available
    store.give_back(1.0, 1.0)  # harmless while down
    redis_server.start()
    started = time.monotonic()
    while not store.redis_available:
        assert time.monotonic() - started < 5
        time.sleep(0.01)
    assert limiter.try_acquire()  # a fresh, empty server: the full burst again


def test_configuration_errors() -> None:
    """Impatient clients, empty names and bad prefixes are refused with a reason."""
    with pytest.raises(ValueError, match="retries each failed command"):
        RedisRateStore(redis.asyncio.Redis(port=1), name="x")
    with pytest.raises(ValueError, match="socket_timeout=None"):
        RedisRateStore(
            redis.asyncio.Redis(port=1, socket_timeout=None, retry=RedisRetry(NoBackoff(), 0)),
            name="x",
        )
    with pytest.raises(ValueError, match="name"):
        RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="")
    with pytest.raises(ValueError, match="prefix"):
        RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="x", prefix="{")
    store = RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="x")
    assert "resilient:rate:{x}" in repr(store)
    assert store.sync_request() is None
    assert not hasattr(store, "take_async")  # a sync client's store decides synchronously
    with pytest.raises(TypeError, match="each process"):
        pickle.dumps(store)


# -- async clients ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def async_store(
    server: RedisServer, name: str = "api", **options: Any
) -> AsyncIterator[RedisRateStore]:
    """A store on a redis.asyncio client of its own, its syncer stopped and client closed after."""
    client = redis.asyncio.Redis(
        port=server.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=RedisRetry(NoBackoff(), 0),
    )
    store = RedisRateStore(client, name=name, **options)
    try:
        yield store
    finally:
        store.close()
        await client.aclose()


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_async_store_admits_and_refuses_as_the_memory_one(
    redis_server: RedisServer,
) -> None:
    """acquire_async on a redis.asyncio store: the burst, then RateLimited as in memory."""
    async with async_store(redis_server) as store:
        shared = RateLimiter(rate=1, per=60, burst=3, store=store, name="api")
        local = RateLimiter(rate=1, per=60, burst=3)
        outcomes: list[list[str]] = []
        waits: list[float] = []
        for limit in (shared, local):
            seen = []
            for _ in range(5):
                try:
                    async with limit:
                        seen.append("admitted")
                except RateLimited as refused:
                    waits.append(refused.retry_after)
                    seen.append("refused")
            outcomes.append(seen)
        assert outcomes[0] == outcomes[1] == ["admitted"] * 3 + ["refused"] * 2
        assert all(55.0 < wait <= 60.0 for wait in waits)
        assert int(redis_server.client().pttl(store.key)) > 100_000  # the instant is in Redis


async def test_two_async_limiters_share_one_limit(redis_server: RedisServer) -> None:
    """Two processes' limiters (two clients, one name) admit the burst once between them."""
    async with async_store(redis_server) as first, async_store(redis_server) as second:
        limiters = [RateLimiter(rate=1, per=60, burst=4, store=s) for s in (first, second)]
        results = await asyncio.gather(
            *(_admitted(limiters[n % 2]) for n in range(10)), return_exceptions=True
        )
        assert results.count(True) == 4
        assert all(isinstance(r, RateLimited) for r in results if r is not True)


async def _admitted(limit: RateLimiter) -> bool:
    await limit.acquire_async()
    return True


async def test_a_decorated_async_function_is_admitted_through_the_async_store(
    redis_server: RedisServer,
) -> None:
    """The driver's try_acquire defers on the loop; acquire_async asks Redis; keys stay apart."""
    async with async_store(redis_server, "tenants") as store:
        limit = RateLimiter(rate=1, per=60, burst=1, store=store)
        assert limit.try_acquire() is False  # on the loop: "await acquire_async"

        @limit
        async def work() -> str:
            return "done"

        assert await work() == "done"
        with pytest.raises(RateLimited):
            await work()
        view = limit.for_key("a")
        await view.acquire_async()
        with pytest.raises(RateLimited):
            await view.acquire_async()
        assert view.store.key == "resilient:rate:{tenants['a']}"  # type: ignore[attr-defined]
        assert redis_server.client().exists(view.store.key)  # type: ignore[attr-defined]


async def test_wait_true_tasks_wait_their_turns_in_redis(redis_server: RedisServer) -> None:
    """Three tasks on two limiters, 10 a second, burst 1: they pass about 0.1 s apart."""
    async with async_store(redis_server) as first, async_store(redis_server) as second:
        limiters = [RateLimiter(rate=10, burst=1, wait=True, store=s) for s in (first, second)]
        started = time.monotonic()
        passed: list[float] = []

        async def one(limit: RateLimiter) -> None:
            await limit.acquire_async()
            passed.append(time.monotonic() - started)

        await asyncio.gather(one(limiters[0]), one(limiters[1]), one(limiters[0]))
        passed.sort()
        assert passed[2] >= 0.15  # the third turn is 0.2 s after the first (Redis time)
        assert passed[2] - passed[0] >= 0.15
        with deadline(0.05), pytest.raises(DeadlineExceeded):
            await asyncio.gather(*(limiters[1].acquire_async() for _ in range(2)))


async def test_an_async_waiter_cancelled_gives_its_turn_back(redis_server: RedisServer) -> None:
    """A task cancelled while waiting in Redis's queue frees its turn for the next caller."""
    async with async_store(redis_server) as store:
        limit = RateLimiter(rate=1, per=10, burst=1, wait=True, store=store)
        await limit.acquire_async()
        waiter = asyncio.create_task(limit.acquire_async())  # reserves the turn 10 s away
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        wait, _ = await store.take_async(0.0, 10.0, 0.0, math.inf)  # type: ignore[attr-defined]
        assert 9.0 < wait <= 10.0  # the cancelled waiter's turn, not the one after it


async def test_redis_killed_mid_run_fails_no_call_and_resyncs(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead Redis: every call still admitted (locally), one warning; restarted, Redis again."""
    async with async_store(redis_server, retry_interval=0.05) as store:
        limit = RateLimiter(rate=1, per=600, burst=100, store=store)  # 60 calls all pass
        with caplog.at_level(logging.WARNING, "resilient.redis"):
            for n in range(60):
                if n == 20:
                    redis_server.kill()
                await limit.acquire_async()  # never raises: no call fails for Redis
            assert not store.redis_available
            await store.give_back_async(1.0, 600.0)  # type: ignore[attr-defined]  # harmless
            assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
            redis_server.start()
            await _until(lambda: store.redis_available)  # the syncer task found it again
            await limit.acquire_async()
            assert redis_server.client().pttl(store.key) > 1000  # back on the fleet's count
            assert any("reachable again" in r.getMessage() for r in caplog.records)


async def test_sync_use_of_an_async_store_says_to_use_a_sync_client(
    redis_server: RedisServer,
) -> None:
    """acquire(), a sync decorated call, and sync code off the loop get a TypeError saying why."""
    async with async_store(redis_server) as store:
        limit = RateLimiter(rate=1, per=60, burst=5, store=store)
        with pytest.raises(TypeError, match=r"sync client \(redis.Redis\)"):
            limit.acquire()
        with pytest.raises(TypeError, match="acquire_async"):
            limit.call(lambda: None)
        with pytest.raises(TypeError, match="sync client"):
            await asyncio.to_thread(limit.try_acquire)
        with pytest.raises(TypeError, match="async client"):
            store.give_back(1.0, 1.0)
        assert type(store.for_key("k")) is type(store)
        assert "RedisRateStore" in repr(store)


async def test_a_sync_store_still_decides_synchronously_in_async_code(
    redis_server: RedisServer,
) -> None:
    """A store on redis.Redis keeps its blocking decisions, try_acquire included, on the loop."""
    limit = RateLimiter(rate=1, per=60, burst=2, store=make(redis_server))
    assert limit.try_acquire()
    await limit.acquire_async()
    assert not limit.try_acquire()
