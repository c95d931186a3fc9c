"""resilient.redis.RedisStore: one circuit breaker for a fleet, on a real redis-server.

Each ``RedisStore`` with its own client stands for one process; the multiprocessing
test runs real OS processes. Redis is killed mid-test to prove the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from redis_live import RedisServer, redis_server_fixture  # noqa: F401 - the fixture

from resilient import CircuitBreaker, CircuitOpenError
from resilient.breaker import BreakerState
from resilient.redis import RedisBudgetStore, RedisRateStore, RedisStore
from resilient.redis.breaker import _LOAD
from resilient.testing import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def fail() -> None:
    raise ConnectionError("dependency down")


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises((ConnectionError, CircuitOpenError)):
            breaker.call(fail)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)
    return time.monotonic() - started


_made: list[RedisStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Any:
    """Every store a test made stops its syncer with the test."""
    yield
    while _made:
        _made.pop().close()


def make(server: RedisServer, **options: Any) -> RedisStore:
    store = RedisStore(server.client(), **options)
    _made.append(store)
    return store


def test_constructing_a_breaker_writes_nothing_to_redis(redis_server: RedisServer) -> None:
    """pybreaker #26: building a breaker must not reset the fleet's state (or touch it)."""
    client = redis_server.client()
    opener = CircuitBreaker(name="payments", failure_threshold=1, store=make(redis_server))
    trip(opener, 1)
    before = client.hgetall("resilient:breaker:{payments}")
    late = CircuitBreaker(name="payments", failure_threshold=1, store=make(redis_server))
    assert client.hgetall("resilient:breaker:{payments}") == before
    assert before[b"st"] == b"open"
    wait_for(lambda: late.stored_state is OPEN)
    other = CircuitBreaker(name="fresh", store=make(redis_server))
    assert other.state is CLOSED
    assert client.keys("resilient:breaker:{fresh}*") == []


def test_keys_use_the_prefix_and_the_name_as_hash_tag(redis_server: RedisServer) -> None:
    """Each breaker's keys share one hash tag (one cluster slot); breakers never share keys."""
    store = make(redis_server, prefix="svc:")
    assert store.keys("payments") == ("svc:breaker:{payments}", "svc:breaker:{payments}:probes")
    a = CircuitBreaker(name="a", failure_threshold=1, store=store)
    b = CircuitBreaker(name="b", failure_threshold=1, store=store)
    trip(a, 1)
    assert a.stored_state is OPEN
    assert b.state is CLOSED  # pybreaker #88: no shared keys between breakers
    assert redis_server.client().exists("svc:breaker:{a}") == 1


def test_a_trip_in_one_process_rejects_in_the_others_within_the_bound(
    redis_server: RedisServer,
) -> None:
    """Opened by failures through one store, the breaker rejects through another in ~50 ms."""
    one = CircuitBreaker(name="api", failure_threshold=3, store=make(redis_server))
    other = CircuitBreaker(name="api", failure_threshold=3, store=make(redis_server))
    assert other.call(lambda: "ok") == "ok"
    trip(one, 3)
    seen_after = wait_for(lambda: other.stored_state is OPEN)
    assert seen_after < 0.5  # the bound is sync_interval (50 ms) + a round-trip; margin for CI
    with pytest.raises(CircuitOpenError) as refused:
        other.call(lambda: "never")
    assert 0.0 < refused.value.retry_after <= 30.0


def test_skewed_host_clocks_agree_on_when_to_probe(redis_server: RedisServer) -> None:
    """opened_at is Redis time, read back on each host's own clock: hours of skew change nothing."""
    here = CircuitBreaker(
        name="skew", failure_threshold=1, reset_timeout=30, store=make(redis_server)
    )
    elsewhere = CircuitBreaker(
        name="skew",
        failure_threshold=1,
        reset_timeout=30,
        store=make(redis_server),
        clock=FakeClock(time.monotonic() + 7200.0),
    )
    trip(here, 1)
    wait_for(lambda: elsewhere.stored_state is OPEN)
    for breaker in (here, elsewhere):
        with pytest.raises(CircuitOpenError) as refused:
            breaker.call(lambda: None)
        assert 29.0 < refused.value.retry_after <= 30.0


def test_failures_from_many_processes_add_up_and_trip_once(redis_server: RedisServer) -> None:
    """Failures are counted fleet-wide; of racing processes exactly one trips (one event)."""
    events: list[Any] = []
    breakers = [
        CircuitBreaker(
            name="shared",
            failure_threshold=8,
            store=make(redis_server),
            listeners=[events.append],
        )
        for _ in range(4)
    ]
    barrier = threading.Barrier(4)

    def run(breaker: CircuitBreaker) -> None:
        barrier.wait()
        trip(breaker, 2)

    threads = [threading.Thread(target=run, args=(b,)) for b in breakers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(e.old_state, e.new_state) for e in events] == [(CLOSED, OPEN)]
    assert events[0].reason == "failure_threshold"


def test_half_open_admits_exactly_the_limit_across_processes(redis_server: RedisServer) -> None:
    """Probe slots are fleet-wide leases: four processes get two probes between them."""
    breakers = [
        CircuitBreaker(
            name="probe",
            failure_threshold=1,
            reset_timeout=0.2,
            half_open_max_calls=2,
            store=make(redis_server),
        )
        for _ in range(4)
    ]
    trip(breakers[0], 1)
    time.sleep(0.3)
    admitted, refusals = [], []
    for breaker in breakers:
        try:
            admitted.append(breaker.before_call())
        except CircuitOpenError as refused:
            refusals.append(refused.retry_after)
    assert len(admitted) == 2
    assert refusals == [0.0, 0.0]
    client = redis_server.client()
    assert client.zcard("resilient:breaker:{probe}:probes") == 2
    # Both probes succeed: the breaker closes for everyone.
    for ticket, breaker in zip(admitted, breakers, strict=False):
        breaker.on_success(ticket)
    assert client.hget("resilient:breaker:{probe}", "st") == b"closed"
    assert client.zcard("resilient:breaker:{probe}:probes") == 0
    for breaker in breakers:
        wait_for(lambda b=breaker: b.stored_state is CLOSED)


def test_a_probe_that_dies_frees_its_slot_when_its_lease_expires(
    redis_server: RedisServer,
) -> None:
    """A probe whose process vanished holds its slot only for probe_lease seconds."""
    dying = CircuitBreaker(
        name="lease",
        failure_threshold=1,
        reset_timeout=0.1,
        store=make(redis_server, probe_lease=0.3),
    )
    survivor = CircuitBreaker(
        name="lease", failure_threshold=1, reset_timeout=0.1, store=make(redis_server)
    )
    trip(dying, 1)
    time.sleep(0.15)
    dying.before_call()  # a probe that never reports back
    with pytest.raises(CircuitOpenError):
        survivor.before_call()
    time.sleep(0.35)
    ticket = survivor.before_call()
    survivor.on_success(ticket)
    assert survivor.state is CLOSED


def test_failure_rate_window_counts_batched_successes_fleet_wide(
    redis_server: RedisServer,
) -> None:
    """Healthy successes are batched, yet a fleet's failure rate counts every process's calls."""
    client = redis_server.client()
    a = CircuitBreaker(
        name="rate",
        failure_threshold=None,
        failure_rate=0.5,
        window_size=20,
        minimum_calls=10,
        store=make(redis_server),
    )
    b = CircuitBreaker(
        name="rate",
        failure_threshold=None,
        failure_rate=0.5,
        window_size=20,
        minimum_calls=10,
        store=make(redis_server),
    )
    for _ in range(6):
        a.call(lambda: None)  # no round-trip: counted locally, reported by the syncer
    wait_for(lambda: client.hget("resilient:breaker:{rate}", "wc") == b"6")
    trip(b, 5)
    assert b.metrics().window_calls == 11
    assert b.stored_state is CLOSED  # 5 of 11 < 50%
    b.call(lambda: None)  # with failures in the window, a success is counted at once
    assert b.metrics().window_calls == 12
    trip(b, 2)
    assert b.stored_state is OPEN  # 7 of 14


def test_time_window_in_redis_time(redis_server: RedisServer) -> None:
    """A window of seconds is kept in Redis's own clock buckets."""
    breaker = CircuitBreaker(
        name="timed",
        failure_threshold=None,
        failure_rate=0.5,
        window_duration=60,
        minimum_calls=2,
        store=make(redis_server),
    )
    breaker.call(lambda: None)
    trip(breaker, 1)
    assert breaker.stored_state is OPEN


def test_killing_redis_fails_no_call_and_restarting_resyncs(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis dies: calls go on under local state, logged once; back: a local trip is shared."""
    store = make(redis_server, retry_interval=0.1)
    breaker = CircuitBreaker(name="outage", failure_threshold=3, reset_timeout=30, store=store)
    assert breaker.call(lambda: 1) == 1
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="resilient.redis"):
        started = time.monotonic()
        for _ in range(200):
            assert breaker.call(lambda: 2) == 2  # never a Redis error
        trip(breaker, 3)  # counted locally: trips the local breaker
        elapsed = time.monotonic() - started
        time.sleep(0.35)  # the syncer tries the dead server again, every 0.1 s
    assert breaker.stored_state is OPEN
    assert not store.redis_available
    assert elapsed < 2.0  # one refused connection, not a timeout per call
    outage_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_logs) == 1
    redis_server.start()
    wait_for(lambda: store.redis_available, timeout=5)
    client = redis_server.client()
    wait_for(lambda: client.hget("resilient:breaker:{outage}", "st") == b"open")
    late = CircuitBreaker(name="outage", failure_threshold=3, store=make(redis_server))
    wait_for(lambda: late.stored_state is OPEN)


def test_outage_open_mode_opens_each_process_breaker(redis_server: RedisServer) -> None:
    """outage="open": losing Redis opens the local breaker rather than letting calls through."""
    store = make(redis_server, outage="open", retry_interval=0.1)
    breaker = CircuitBreaker(name="strict", reset_timeout=30, store=store)
    breaker.call(lambda: None)
    redis_server.kill()
    wait_for(lambda: breaker.stored_state is OPEN)
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)
    redis_server.start()
    wait_for(lambda: store.redis_available)
    wait_for(lambda: breaker.stored_state is CLOSED)  # the artificial open is not shared


def test_noscript_falls_back_to_eval(redis_server: RedisServer) -> None:
    """A flushed script cache (restart, new node) costs one EVAL, not an error."""
    breaker = CircuitBreaker(name="flush", failure_threshold=2, store=make(redis_server))
    trip(breaker, 1)
    redis_server.client().script_flush()
    trip(breaker, 1)
    assert breaker.stored_state is OPEN


def test_the_syncer_survives_a_flushed_script_cache(redis_server: RedisServer) -> None:
    """The syncer's pipeline meets NOSCRIPT: it loads the script and keeps the copy fresh."""
    watcher = CircuitBreaker(name="flushed-sync", failure_threshold=1, store=make(redis_server))
    wait_for(lambda: redis_server.client().script_exists(_LOAD.sha)[0])
    redis_server.client().script_flush()
    peer = CircuitBreaker(name="flushed-sync", failure_threshold=1, store=make(redis_server))
    trip(peer, 1)
    wait_for(lambda: watcher.stored_state is OPEN)


def test_reset_and_isolate_are_shared(redis_server: RedisServer) -> None:
    """isolate() and reset() in one process move the fleet's breaker."""
    a = CircuitBreaker(name="manual", store=make(redis_server))
    b = CircuitBreaker(name="manual", store=make(redis_server))
    a.isolate()
    wait_for(lambda: b.stored_state is BreakerState.ISOLATED)
    with pytest.raises(CircuitOpenError) as refused:
        b.call(lambda: None)
    assert refused.value.retry_after == float("inf")
    b.reset()
    wait_for(lambda: a.stored_state is CLOSED)


def test_bad_configuration_is_refused_at_construction() -> None:
    """Wrong clients, prefixes, names and durations fail with errors naming them."""
    client = redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0))
    with pytest.raises(TypeError, match="client"):
        RedisStore(object())
    with pytest.raises(ValueError, match="outage"):
        RedisStore(client, outage="closed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(client, prefix="a{b}")
    with pytest.raises(TypeError, match="prefix"):
        RedisStore(client, prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync_interval"):
        RedisStore(client, sync_interval=0)
    store = RedisStore(client)
    with pytest.raises(ValueError, match="braces"):
        CircuitBreaker(name="a{b}", store=store)
    with pytest.raises(pickle.PicklingError, match="store") as refused:
        pickle.dumps(CircuitBreaker(name="pickled", store=store))
    assert "each process" in str(refused.value.__cause__)
    assert "each process" in str(refused.value)  # what to do, in the message itself
    store.close()


def test_a_client_that_would_hold_calls_on_a_dead_redis_is_refused(
    redis_server: RedisServer,
) -> None:
    """redis-py's default client retries 10 times: every call meeting a dead Redis waited
    seconds (a minute if it does not answer) before the fallback. Each store refuses it."""
    patient = redis.Redis(port=redis_server.port)  # redis-py's defaults
    for build in (
        lambda: RedisStore(patient),
        lambda: RedisBudgetStore(patient, name="b"),
        lambda: RedisRateStore(patient, name="r"),
        lambda: RedisStore(redis.asyncio.Redis(port=redis_server.port)),
    ):
        with pytest.raises(ValueError, match=r"retries each failed command \d+ times.*retry="):
            build()
    forever = redis.Redis(port=1, socket_timeout=None, retry=RedisRetry(NoBackoff(), 0))
    with pytest.raises(ValueError, match=r"socket_timeout=None"):
        RedisStore(forever)
    # The client the stores ask for: a dead Redis costs one fast failure, then none.
    store = make(redis_server, sync_interval=60)
    breaker = CircuitBreaker(name="patience", failure_threshold=100, store=store)
    trip(breaker, 1)
    redis_server.kill()
    started = time.monotonic()
    trip(breaker, 5)
    assert time.monotonic() - started < 0.5
    assert not store.redis_available


def test_a_breaker_without_a_name_is_refused() -> None:
    """Unnamed breakers get 'breaker-1', 'breaker-2'... in every process: unrelated ones
    would share one fleet state, so a RedisStore asks for a name (and starts nothing)."""
    store = RedisStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)))
    try:
        threads = threading.active_count()
        with pytest.raises(ValueError, match=r"needs a name .*'breaker-\d+'.*name=") as refused:
            CircuitBreaker(failure_threshold=1, store=store)
        assert "other processes" in str(refused.value)
        assert threading.active_count() == threads
        assert CircuitBreaker(name="breaker-1", failure_threshold=1, store=store).name == (
            "breaker-1"
        )  # a name chosen on purpose is the user's to share
    finally:
        store.close()


def test_an_isolated_breaker_outlives_key_ttl(redis_server: RedisServer) -> None:
    """isolate() holds until reset(): the keys' expiry, which forgets idle breakers, must
    not quietly close a breaker an operator isolated (no call writes while isolated)."""
    client = redis_server.client()
    store = make(redis_server, key_ttl=0.3)
    breaker = CircuitBreaker(name="isolated", failure_threshold=1, reset_timeout=0.1, store=store)
    breaker.isolate()
    assert client.pttl("resilient:breaker:{isolated}") == -1  # no expiry
    time.sleep(0.5)
    late = CircuitBreaker(name="isolated", failure_threshold=1, store=make(redis_server))
    wait_for(lambda: late.stored_state is BreakerState.ISOLATED)
    with pytest.raises(CircuitOpenError):
        late.call(lambda: None)
    breaker.reset()
    assert 0 < client.pttl("resilient:breaker:{isolated}") <= 300  # forgotten when idle again


def test_a_key_ttl_shorter_than_the_reset_timeout_is_refused() -> None:
    """An open breaker writes nothing while it waits: keys expiring first would close it."""
    store = RedisStore(redis.Redis(port=1, retry=RedisRetry(NoBackoff(), 0)), key_ttl=10)
    try:
        with pytest.raises(ValueError, match=r"key_ttl=10 s .*reset_timeout=30 s .*'slow'"):
            CircuitBreaker(name="slow", failure_threshold=1, reset_timeout=30, store=store)
        CircuitBreaker(name="quick", failure_threshold=1, reset_timeout=5, store=store)
    finally:
        store.close()


def test_breakers_of_two_window_shapes_under_one_name_never_misread_a_window(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A deploy changing window_size (or a name shared by mistake): the hash holds one
    shape's window at a time, counts stay true for the reader's shape, and each process
    logs the clash once, naming both shapes."""
    with caplog.at_level(logging.ERROR, logger="resilient.redis"):
        sized = CircuitBreaker(
            name="reshaped",
            failure_threshold=None,
            failure_rate=0.9,
            window_size=10,
            store=make(redis_server, sync_interval=60),
        )
        timed = CircuitBreaker(
            name="reshaped",
            failure_threshold=None,
            failure_rate=0.9,
            window_duration=60,
            minimum_calls=100,
            store=make(redis_server, sync_interval=60),
        )
        for _ in range(4):
            trip(sized, 1)
            sized.call(lambda: None)
        trip(timed, 1)  # the time window's own count: one failure, nothing else
        assert (timed.metrics().window_calls, timed.metrics().window_failures) == (1, 1)
        for _ in range(9):  # the size window starts again from its own first failure
            trip(sized, 1)
            metrics = sized.metrics()
            assert 0 <= metrics.window_failures <= metrics.window_calls <= 10
        assert (metrics.window_calls, metrics.window_failures) == (9, 9)
        trip(sized, 1)  # ten of ten
        assert sized.stored_state is OPEN
        trip(timed, 1)
    clashes = [r.getMessage() for r in caplog.records if r.name == "resilient.redis"]
    assert len(clashes) == 2  # once in each process
    assert all("'reshaped'" in m and "window_size=10" in m for m in clashes)
    assert all("window_duration=60.0" in m for m in clashes)


async def test_async_client_shares_state_through_the_background_task(
    redis_server: RedisServer,
) -> None:
    """redis.asyncio: decisions stay local, the syncer task shares trips both ways."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisStore(client, sync_interval=0.02)
        mine = CircuitBreaker(name="aio", failure_threshold=2, store=store)
        sync_peer = CircuitBreaker(name="aio", failure_threshold=2, store=make(redis_server))

        async def boom() -> None:
            raise ConnectionError

        for _ in range(2):
            with pytest.raises(ConnectionError):
                await mine.acall(boom)
        assert mine.stored_state is OPEN  # at once, locally
        started = time.monotonic()
        while sync_peer.stored_state is not OPEN:
            assert time.monotonic() - started < 5
            await _sleep(0.01)
        sync_peer.reset()
        started = time.monotonic()
        while mine.stored_state is not CLOSED:
            assert time.monotonic() - started < 5
            await _sleep(0.01)
        store.close()
    finally:
        await client.aclose()


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_async_client_with_a_key_in_trouble_keeps_redis_for_the_rest(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """redis.asyncio: a foreign key stops only its breaker's syncing, logged once, and it
    resumes once the key is gone."""
    sync_client = redis_server.client()
    sync_client.set("resilient:breaker:{aio-clash}", "not a hash")
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="resilient.redis"):
            store = RedisStore(client, sync_interval=0.01, retry_interval=0.05)
            clash = CircuitBreaker(name="aio-clash", failure_threshold=1, store=store)
            healthy = CircuitBreaker(name="aio-healthy", failure_threshold=1, store=store)
            assert await clash.acall(_nothing) is None
            await _sleep(0.2)
            trip(
                CircuitBreaker(name="aio-healthy", failure_threshold=1, store=make(redis_server)), 1
            )
            await _until(lambda: healthy.stored_state is OPEN)
            assert store.redis_available
            sync_client.delete("resilient:breaker:{aio-clash}")
            with pytest.raises(ConnectionError):
                await clash.acall(_refuse)
            await _until(lambda: sync_client.hget("resilient:breaker:{aio-clash}", "st") == b"open")
            store.close()
        logged = [r.getMessage() for r in caplog.records if r.name == "resilient.redis"]
        assert len(logged) == 2, logged
        assert "WRONGTYPE" in logged[0]
    finally:
        await client.aclose()


async def _nothing() -> None:
    return None


async def _refuse() -> None:
    raise ConnectionError("dependency down")


async def test_a_lease_taken_ahead_is_kept_alive_until_its_probe_uses_it(
    redis_server: RedisServer,
) -> None:
    """redis.asyncio leases a probe slot before the probe comes: if the next call comes
    later than probe_lease, the slot must still be this process's, or the fleet would
    run two probes (a peer's, once the lease expired, and this one's)."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    checker = redis_server.client()
    try:
        store = RedisStore(client, sync_interval=0.02, probe_lease=0.3)
        ahead = CircuitBreaker(
            name="aio-ahead", failure_threshold=1, reset_timeout=0.1, store=store
        )
        peer = CircuitBreaker(
            name="aio-ahead", failure_threshold=1, reset_timeout=0.1, store=make(redis_server)
        )
        assert ahead.stored_state is CLOSED  # starts the task
        trip(peer, 1)
        await _until(lambda: ahead.stored_state is OPEN)
        await _sleep(0.15)
        with pytest.raises(CircuitOpenError):
            ahead.before_call()  # no lease in hand yet: the task fetches one
        await _until(lambda: checker.zcard("resilient:breaker:{aio-ahead}:probes") == 1)
        await _sleep(0.6)  # twice the lease, and no call here meanwhile
        with pytest.raises(CircuitOpenError):
            peer.before_call()  # the one slot is still taken
        checker.delete("resilient:breaker:{aio-ahead}:probes")  # as if lost while Redis was away
        await _sleep(0.1)  # a few syncs: the task finds the lease gone and drops it
        with pytest.raises(CircuitOpenError):
            ahead.before_call()  # no probe on a lost lease: it asks for a new one
        await _until(lambda: checker.zcard("resilient:breaker:{aio-ahead}:probes") == 1)
        ticket = ahead.before_call()  # the probe, with the lease it holds
        ahead.on_success(ticket)
        await _until(lambda: checker.hget("resilient:breaker:{aio-ahead}", "st") == b"closed")
        store.close()
    finally:
        await client.aclose()


async def test_async_client_outage_is_local_then_resynced(redis_server: RedisServer) -> None:
    """redis.asyncio and a dead server: local decisions, one warning, then the trip is shared."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisStore(client, sync_interval=0.02, retry_interval=0.05)
        breaker = CircuitBreaker(name="aio-outage", failure_threshold=1, store=store)
        await breaker.acall(_async_ok)
        await _sleep(0.05)
        redis_server.kill()
        await _until(lambda: not store.redis_available)
        with pytest.raises(ConnectionError):
            await breaker.acall(_async_fail)
        assert breaker.stored_state is OPEN
        await _sleep(0.15)  # the task tries the dead server again, every 0.05 s
        redis_server.start()
        await _until(lambda: store.redis_available)
        checker = redis_server.client()
        await _until(lambda: checker.hget("resilient:breaker:{aio-outage}", "st") == b"open")
        store.close()
    finally:
        await client.aclose()


async def test_async_clients_share_the_fleet_probe_limit(redis_server: RedisServer) -> None:
    """redis.asyncio: probe slots are leased ahead by the task; three stores, one probe."""
    clients = [
        redis.asyncio.Redis(
            port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
        )
        for _ in range(3)
    ]
    stores = [RedisStore(client, sync_interval=0.02) for client in clients]
    try:
        breakers = [
            CircuitBreaker(name="aio-probe", failure_threshold=1, reset_timeout=0.2, store=store)
            for store in stores
        ]
        for breaker in breakers:
            assert breaker.stored_state is CLOSED  # starts each store's syncer task
        with pytest.raises(ConnectionError):
            await breakers[0].acall(_async_fail)
        for breaker in breakers:
            await _until(lambda b=breaker: b.stored_state is OPEN)
        await _sleep(0.25)
        tickets: list[tuple[CircuitBreaker, object]] = []
        waits: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # everyone keeps asking for a probe
            for breaker in breakers:
                try:
                    tickets.append((breaker, breaker.before_call()))
                except CircuitOpenError as refused:
                    waits.append(refused.retry_after)
            await _sleep(0.01)
        assert len(tickets) == 1
        assert max(waits) < 0.2
        breaker, ticket = tickets[0]
        breaker.on_success(ticket)
        for other in breakers:
            await _until(lambda b=other: b.stored_state is CLOSED)
        checker = redis_server.client()
        await _until(lambda: checker.zcard("resilient:breaker:{aio-probe}:probes") == 0)
    finally:
        for store in stores:
            store.close()
        for client in clients:
            await client.aclose()


def test_async_store_built_outside_a_loop_starts_its_task_in_one() -> None:
    """Breakers made at import time (no loop yet) sync once a loop uses them."""
    with RedisServer() as server:
        client = redis.asyncio.Redis(
            port=server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
        )
        store = RedisStore(client, sync_interval=0.02)
        breaker = CircuitBreaker(name="import-time", failure_threshold=1, store=store)
        peer = CircuitBreaker(name="import-time", failure_threshold=1, store=make(server))
        trip(peer, 1)

        async def main() -> None:
            await breaker.acall(_async_ok)  # starts the syncer task on this loop
            await _until(lambda: breaker.stored_state is OPEN)
            store.close()
            await client.aclose()

        asyncio.run(main())


async def test_async_outage_open_mode_opens_the_local_breaker(redis_server: RedisServer) -> None:
    """outage="open" with redis.asyncio: the task opens the local breaker when Redis is lost."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisStore(client, sync_interval=0.02, retry_interval=0.05, outage="open")
        breaker = CircuitBreaker(name="aio-open", reset_timeout=30, store=store)
        await breaker.acall(_async_ok)
        redis_server.kill()
        await _until(lambda: breaker.stored_state is OPEN)
        with pytest.raises(CircuitOpenError):
            await breaker.acall(_async_ok)
        redis_server.start()
        await _until(lambda: breaker.stored_state is CLOSED)  # not shared: the fleet's stays
        store.close()
    finally:
        await client.aclose()


async def _async_ok() -> str:
    return "ok"


async def _async_fail() -> None:
    raise ConnectionError


# Several OS processes ------------------------------------------------------------------


def _fleet_member(
    port: int, start: Any, opened: Any, attempted: Any, results: Any, index: int
) -> None:
    client = redis.Redis(port=port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0))
    breaker = CircuitBreaker(
        name="fleet",
        failure_threshold=3,
        reset_timeout=0.5,
        half_open_max_calls=2,
        store=RedisStore(client),
    )
    breaker.call(lambda: None)
    start.wait()
    if index == 0:
        for _ in range(3):
            with contextlib.suppress(ConnectionError):
                breaker.call(fail)
        opened.set()
    opened.wait()
    began = time.monotonic()
    while breaker.stored_state is not OPEN:
        time.sleep(0.001)
    seen = time.monotonic() - began
    rejected = False
    try:
        breaker.call(lambda: None)
    except CircuitOpenError:
        rejected = True
    # Half-open: every process asks for a probe slot; the probes hold theirs until all asked.
    time.sleep(0.6)
    try:
        ticket = breaker.before_call()
    except CircuitOpenError:
        ticket = probed = False
    else:
        probed = True
    attempted.wait()
    if probed:
        breaker.on_success(ticket)
    results.put((index, seen, rejected, probed))


def test_several_os_processes_share_one_breaker(redis_server: RedisServer) -> None:
    """Four processes: a trip in one rejects in all within the bound; two probes in all."""
    context = multiprocessing.get_context("spawn")
    start, opened, results = context.Event(), context.Event(), context.Queue()
    attempted = context.Barrier(4)
    members = [
        context.Process(
            target=_fleet_member,
            args=(redis_server.port, start, opened, attempted, results, i),
        )
        for i in range(4)
    ]
    for member in members:
        member.start()
    try:
        start.set()
        outcomes = [results.get(timeout=60) for _ in members]
    finally:
        for member in members:
            member.join(timeout=10)
            if member.is_alive():  # pragma: no cover - only on a failure
                member.kill()
    assert all(rejected for _, _, rejected, _ in outcomes)
    assert max(seen for _, seen, _, _ in outcomes) < 0.5  # bound 50 ms + a round-trip
    assert sum(probed for *_, probed in outcomes) == 2


# Redis dying under each operation ---------------------------------------------------------


def _half_open(breaker: CircuitBreaker) -> int:
    trip(breaker, 1)
    time.sleep(0.1)  # reset_timeout by Redis's clock: a fake one cannot hurry it
    assert breaker.state is HALF_OPEN
    return breaker.store.load(time.monotonic()).epoch


@pytest.mark.parametrize("operation", ["load", "cas", "record", "acquire", "release", "sync"])
def test_redis_dying_under_any_operation_falls_back_without_failing(
    redis_server: RedisServer, operation: str
) -> None:
    """Whichever script meets the dead server, the call gets a local answer, not an error."""
    store = make(redis_server, sync_interval=60)  # the syncer stays out of the way
    breaker = CircuitBreaker(
        name=f"dies-{operation}", failure_threshold=1, reset_timeout=0.05, store=store
    )
    shared = breaker.store
    epoch = _half_open(breaker) if operation in ("acquire", "release") else 0
    if operation == "release":
        assert shared.acquire_probe(epoch, 1)
    redis_server.kill()
    if operation == "load":
        assert breaker.metrics().state is CLOSED
    elif operation == "cas":
        assert shared.compare_and_set_state(0, BreakerState.ISOLATED, time.monotonic())
        assert breaker.stored_state is BreakerState.ISOLATED
    elif operation == "record":
        trip(breaker, 1)
        assert breaker.stored_state is OPEN
    elif operation == "acquire":
        assert shared.acquire_probe(epoch, 1)  # the local breaker's own slot
    elif operation == "release":
        assert shared.release_probe(epoch, True) == 1
    else:
        shared.sync()
    assert not store.redis_available
    assert "via=local" in repr(shared)


def test_failures_counted_during_an_outage_reach_the_fleet(redis_server: RedisServer) -> None:
    """Loses no local accounting: closed-state failures made offline are added on return."""
    store = make(redis_server, retry_interval=0.05)
    breaker = CircuitBreaker(name="offline-count", failure_threshold=5, store=store)
    trip(breaker, 1)
    redis_server.kill()
    trip(breaker, 2)  # the first meets the dead server, both are counted locally
    assert breaker.store.consecutive_failures == 3
    redis_server.start()  # empty: the shared count is gone, the local one is not
    wait_for(lambda: store.redis_available)
    client = redis_server.client()
    wait_for(lambda: client.hget("resilient:breaker:{offline-count}", "cf") == b"2")


def test_a_breaker_that_recovered_offline_shares_its_new_stay(redis_server: RedisServer) -> None:
    """Tripped and closed again during the outage: the fleet is told it is closed."""
    clock = FakeClock()
    store = make(redis_server, retry_interval=0.05)
    breaker = CircuitBreaker(
        name="offline-cycle", failure_threshold=1, reset_timeout=1, store=store, clock=clock
    )
    peer = CircuitBreaker(name="offline-cycle", failure_threshold=1, store=make(redis_server))
    trip(peer, 1)
    wait_for(lambda: breaker.stored_state is OPEN)
    redis_server.kill()
    wait_for(lambda: not store.redis_available)
    clock.advance(2.0)
    assert breaker.call(lambda: "probe") == "probe"  # a local probe closes the local breaker
    redis_server.start()
    wait_for(lambda: store.redis_available)
    wait_for(lambda: breaker.store.load(clock()).state is CLOSED)


def test_one_dead_redis_falls_back_every_breaker_of_the_store(
    redis_server: RedisServer,
) -> None:
    """Redis found dead by one breaker: the store's other breakers never try it either."""
    store = make(redis_server, sync_interval=60)
    first = CircuitBreaker(name="first", failure_threshold=2, store=store)
    second = CircuitBreaker(name="second", failure_threshold=2, slow_call_duration=10, store=store)
    redis_server.kill()
    trip(first, 1)  # finds Redis dead
    started = time.monotonic()
    trip(second, 2)
    assert second.stored_state is OPEN
    assert time.monotonic() - started < 0.1  # no connection attempted
    assert "via=local" in repr(second.store)


def test_successes_counted_during_an_outage_reach_the_window(redis_server: RedisServer) -> None:
    """A failure-rate window's outcomes made offline are added to the shared window."""
    store = make(redis_server, retry_interval=0.05)
    breaker = CircuitBreaker(
        name="offline-window",
        failure_threshold=None,
        failure_rate=0.9,
        window_size=50,
        store=store,
    )
    redis_server.kill()
    breaker.call(lambda: None)  # batched; the syncer finds Redis dead
    wait_for(lambda: not store.redis_available)
    for _ in range(3):
        breaker.call(lambda: None)
    trip(breaker, 1)
    redis_server.start()
    wait_for(lambda: store.redis_available)
    client = redis_server.client()
    wait_for(lambda: client.hget("resilient:breaker:{offline-window}", "wc") == b"5")
    assert client.hget("resilient:breaker:{offline-window}", "wf") == b"1"


def test_a_closed_store_keeps_working_on_its_last_state(redis_server: RedisServer) -> None:
    """close() stops the syncer; the breaker still answers (Redis on its failure path)."""
    store = make(redis_server)
    breaker = CircuitBreaker(name="closed-store", failure_threshold=1, store=store)
    store.close()
    assert breaker.call(lambda: 1) == 1
    trip(breaker, 1)
    assert breaker.metrics().state is OPEN


def test_a_forgotten_store_stops_its_syncer(redis_server: RedisServer) -> None:
    """No leaked thread: a store nobody holds any more ends its syncer thread."""
    before = {t.name for t in threading.enumerate()}
    store = RedisStore(redis_server.client(), sync_interval=0.01)
    breaker = CircuitBreaker(name="forgotten", store=store)
    started = {t.name for t in threading.enumerate()} - before
    assert len(started) == 1
    del breaker, store
    gc.collect()
    wait_for(lambda: not started & {t.name for t in threading.enumerate()})


def test_a_foreign_key_of_the_wrong_type_fails_no_call(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program's key where the breaker's should be: a fallback, logged once."""
    redis_server.client().set("resilient:breaker:{clash}", "not a hash")
    with caplog.at_level(logging.WARNING, logger="resilient.redis"):
        store = make(redis_server, retry_interval=0.02)
        breaker = CircuitBreaker(name="clash", failure_threshold=1, store=store)
        wait_for(lambda: "via=local" in repr(breaker.store))  # the syncer met WRONGTYPE
        assert breaker.call(lambda: "fine") == "fine"
        trip(breaker, 1)
        assert breaker.stored_state is OPEN
        time.sleep(0.2)  # scripts on that key keep failing: still one message
    logged = [r.getMessage() for r in caplog.records if r.name == "resilient.redis"]
    assert len(logged) == 1
    assert "'resilient:breaker:{clash}'" in logged[0]
    assert "WRONGTYPE" in logged[0]
    assert store.redis_available  # Redis is fine: only that key is not


def test_one_foreign_key_leaves_the_stores_other_breakers_shared(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key in trouble is no outage: the store's other breakers keep the fleet's state,
    and the troubled one takes it back once the key is fixed."""
    client = redis_server.client()
    client.set("resilient:breaker:{clash}", "not a hash")
    with caplog.at_level(logging.WARNING, logger="resilient.redis"):
        store = make(redis_server, retry_interval=0.05)
        clash = CircuitBreaker(name="clash", failure_threshold=1, store=store)
        healthy = CircuitBreaker(name="healthy", failure_threshold=1, store=store)
        wait_for(lambda: "via=local" in repr(clash.store))
        time.sleep(0.2)  # several rounds of the syncer
        peer = CircuitBreaker(name="healthy", failure_threshold=1, store=make(redis_server))
        trip(peer, 1)
        wait_for(lambda: healthy.stored_state is OPEN)  # still the fleet's state
        assert "via=redis" in repr(healthy.store)
        assert store.redis_available
        client.delete("resilient:breaker:{clash}")
        wait_for(lambda: "via=redis" in repr(clash.store))
        trip(clash, 1)
        assert client.hget("resilient:breaker:{clash}", "st") == b"open"
    logged = [r.getMessage() for r in caplog.records if r.name == "resilient.redis"]
    assert len(logged) == 2, logged  # the trouble, and its end: no outage, no flapping
    assert "{clash}" in logged[0]
    assert "{clash}" in logged[1]


def test_a_resync_that_meets_a_dead_server_again_keeps_the_counts(
    redis_server: RedisServer,
) -> None:
    """Redis gone again as the store resynchronises: local counts wait for the next try."""
    store = make(redis_server, sync_interval=60)
    breaker = CircuitBreaker(name="flaky-return", failure_threshold=5, store=store)
    redis_server.kill()
    trip(breaker, 2)
    store._link.up = True  # as if the syncer's ping had just succeeded
    breaker.store.sync()
    assert "via=local" in repr(breaker.store)
    assert breaker.store._take_pending() == (0, 2)  # type: ignore[attr-defined]


async def test_a_forgotten_async_store_ends_its_task(redis_server: RedisServer) -> None:
    """No leaked task: an async store nobody holds any more ends its syncer task."""
    client = redis.asyncio.Redis(
        port=redis_server.port, socket_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    try:
        store = RedisStore(client, sync_interval=0.01)
        breaker = CircuitBreaker(name="forgotten-aio", store=store)
        assert breaker.stored_state is CLOSED
        task = store._link._task
        assert task is not None
        del breaker, store
        gc.collect()
        await _until(task.done)
    finally:
        await client.aclose()


def test_a_client_that_decodes_responses_works_too(redis_server: RedisServer) -> None:
    """decode_responses=True changes every reply's type; the scripts' replies still parse."""
    store = RedisStore(redis_server.client(decode_responses=True))
    _made.append(store)
    breaker = CircuitBreaker(name="decoded", failure_threshold=1, store=store)
    trip(breaker, 1)
    assert breaker.metrics().state is OPEN
    assert "RedisStore(" in repr(store)


def _forked_child(breaker: CircuitBreaker, out: Any) -> None:
    out.put(wait_for(lambda: breaker.stored_state is OPEN))


def test_a_forked_child_keeps_its_copy_fresh(redis_server: RedisServer) -> None:
    """After fork the parent's syncer thread is gone; the child starts its own."""
    store = make(redis_server)
    breaker = CircuitBreaker(name="forked", failure_threshold=1, store=store)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_forked_child, args=(breaker, out))
    child.start()
    try:
        time.sleep(0.1)
        peer = CircuitBreaker(name="forked", failure_threshold=1, store=make(redis_server))
        trip(peer, 1)
        assert out.get(timeout=20) < 5
    finally:
        child.join(timeout=10)
        if child.is_alive():  # pragma: no cover - only on a failure
            child.kill()


def _steady_caller(port: int, ready: Any, start: Any, stop: Any, results: Any) -> None:
    client = redis.Redis(
        port=port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=RedisRetry(NoBackoff(), 0)
    )
    store = RedisStore(client, retry_interval=0.05)
    breaker = CircuitBreaker(
        name="steady", failure_threshold=None, failure_rate=0.5, window_size=50, store=store
    )
    calls, unexpected = 0, []
    breaker.call(lambda: None)
    ready.release()
    start.wait()
    while not stop.is_set():
        try:
            breaker.call(lambda: None)
            calls += 1
        except Exception as error:  # any error at all is a failed call
            unexpected.append(repr(error))
        time.sleep(0.001)
    wait_for(lambda: store.redis_available, timeout=10)
    results.put((calls, unexpected))


def test_killing_redis_under_several_processes_fails_no_call(redis_server: RedisServer) -> None:
    """Four processes call through a shared breaker while Redis dies and comes back."""
    context = multiprocessing.get_context("spawn")
    ready, start, stop = context.Semaphore(0), context.Event(), context.Event()
    results = context.Queue()
    members = [
        context.Process(
            target=_steady_caller, args=(redis_server.port, ready, start, stop, results)
        )
        for _ in range(4)
    ]
    for member in members:
        member.start()
    try:
        for _ in members:
            assert ready.acquire(timeout=60)
        start.set()
        time.sleep(0.3)
        redis_server.kill()
        time.sleep(0.3)
        redis_server.start()
        time.sleep(0.3)
        stop.set()
        outcomes = [results.get(timeout=60) for _ in members]
    finally:
        for member in members:
            member.join(timeout=10)
            if member.is_alive():  # pragma: no cover - only on a failure
                member.kill()
    assert all(calls > 0 for calls, _ in outcomes)
    assert [unexpected for _, unexpected in outcomes] == [[], [], [], []]
    # Back in Redis: the window counts the calls made since it returned.
    client = redis_server.client()
    wait_for(lambda: int(client.hget("resilient:breaker:{steady}", "wc") or 0) > 0)
