"""resilient.redis on a real three-node Redis Cluster: hash tags keep each state in one slot."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from redis_live import RedisClusterNodes

from resilient import CircuitBreaker, CircuitOpenError, RateLimiter, RetryBudget
from resilient.breaker import BreakerState
from resilient.redis import RedisBudgetStore, RedisRateStore, RedisStore


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    """One cluster for the module (forming one takes a few seconds of gossip)."""
    with RedisClusterNodes() as nodes:
        yield nodes


def fail() -> None:
    raise ConnectionError


def test_breakers_on_every_node_trip_probe_and_close(cluster: RedisClusterNodes) -> None:
    """Breakers whose keys hash to all three nodes run every script (two keys, one slot)."""
    client = cluster.client()
    store = RedisStore(client)
    names = [f"svc-{i}" for i in range(6)]
    slots = {client.keyslot(store.keys(name)[0]) for name in names}
    assert len({client.get_node_from_key(store.keys(n)[0]).port for n in names}) == 3
    assert all(client.keyslot(store.keys(n)[1]) in slots for n in names)
    breakers = [
        CircuitBreaker(name=name, failure_threshold=1, reset_timeout=0.1, store=store)
        for name in names
    ]
    for breaker in breakers:
        with pytest.raises(ConnectionError):
            breaker.call(fail)
        assert breaker.stored_state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: None)
    time.sleep(0.15)
    for breaker in breakers:
        assert breaker.call(lambda: "probe") == "probe"
        assert breaker.stored_state is BreakerState.CLOSED
    assert store.redis_available
    store.close()


def test_budget_and_rate_limit_on_a_cluster(cluster: RedisClusterNodes) -> None:
    """The budget and the limiter scripts run against cluster nodes too."""
    client = cluster.client()
    budget_store = RedisBudgetStore(client, name="cluster-budget")
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10, store=budget_store)
    assert [budget.try_withdraw(time.monotonic()) for _ in range(2)] == [True, False]
    rate_store = RedisRateStore(client, name="cluster-rate")
    limiter = RateLimiter(rate=1, per=60, burst=1, store=rate_store)
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    assert limiter.for_key("tenant").try_acquire()
    assert budget_store.redis_available
    assert rate_store.redis_available
    budget_store.close()
