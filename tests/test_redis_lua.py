"""The breaker's Lua scripts against the in-memory store, on fakeredis (no server needed),
and the lock-free counting of the outcomes waiting for a report.

The count window in Lua (a ring of '0'/'1' in a hash field, with batched successes)
must count exactly what :class:`~resilient.InMemoryBreakerStore` counts, for any
sequence of outcomes. fakeredis runs the real scripts through Lua (lupa); the
integration tests run them on a real redis-server.
"""

from __future__ import annotations

import itertools
import threading

import fakeredis
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.breaker import BreakerSpec, InMemoryBreakerStore, WindowSpec
from resilient.redis import RedisStore
from resilient.redis.breaker import _Pending

_server = fakeredis.FakeServer()
_names = itertools.count()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=12),
    outcomes=st.lists(st.booleans(), max_size=60),
)
def test_the_lua_count_window_counts_what_memory_counts(size: int, outcomes: list[bool]) -> None:
    """Window calls, window failures and consecutive failures agree after every outcome."""
    factory = RedisStore(fakeredis.FakeRedis(server=_server), sync_interval=3600)
    spec = BreakerSpec(
        name=f"lua-{next(_names)}",
        window=WindowSpec(size=size),
        reset_timeout=30.0,
        half_open_max_calls=1,
        clock=lambda: 0.0,
    )
    shared = factory.for_breaker(spec)
    memory = InMemoryBreakerStore(WindowSpec(size=size))
    try:
        for failed in outcomes:
            shared.record(failed, 0.0)
            memory.record(failed, 0.0)
            if failed:  # a failure's reply is the whole truth at once
                got, want = shared.load(0.0), memory.load(0.0)
                assert got.window_calls == want.window_calls
                assert got.window_failures == want.window_failures
                assert got.consecutive_failures == want.consecutive_failures
        shared.sync()  # the batched successes
        got, want = shared.load(0.0), memory.load(0.0)
        assert (got.window_calls, got.window_failures) == (want.window_calls, want.window_failures)
        assert got.consecutive_failures == want.consecutive_failures
    finally:
        factory.close()


def test_pending_counts_are_neither_lost_nor_doubled_across_threads() -> None:
    """Healthy successes counted by racing threads while the syncer takes them add up."""
    pending = _Pending()
    taken = [0]
    stop = threading.Event()

    def taker() -> None:
        while not stop.is_set():
            taken[0] += pending.take()[0]

    def counter() -> None:
        for _ in range(20_000):
            next(pending.successes)

    thread = threading.Thread(target=taker)
    thread.start()
    workers = [threading.Thread(target=counter) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    thread.join()
    pending.restore(3, 1)
    successes, failures = pending.take()
    assert taken[0] + successes == 80_003
    assert failures == 1
