"""resilient.redis.RedisRateStore: one GCRA limit for a fleet, on Redis's clock."""

from __future__ import annotations

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

from resilient import RateLimited, RateLimiter
from resilient.redis import RedisRateStore
from resilient.testing import FakeClock

_made: list[RedisRateStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Every store a test made stops its syncer with the test."""
    yield
    while _made:
        _made.pop()._link.close()


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
    """Async clients, empty names and bad prefixes are refused with a reason."""
    with pytest.raises(TypeError, match="sync client"):
        RedisRateStore(redis.asyncio.Redis(port=1), name="x")
    with pytest.raises(ValueError, match="name"):
        RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="")
    with pytest.raises(ValueError, match="prefix"):
        RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="x", prefix="{")
    store = RedisRateStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), name="x")
    assert "resilient:rate:{x}" in repr(store)
    assert store.sync_request() is None
    with pytest.raises(TypeError, match="each process"):
        pickle.dumps(store)
