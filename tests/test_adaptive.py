"""AdaptiveLimit: AIMD and Gradient2 rules, misuse errors, the adaptive bulkhead, and a simulation.

The simulation drives a real adaptive Bulkhead on a FakeClock against a simulated
dependency whose latency is flat up to a knee of concurrency and rises steeply past it,
with more clients than the knee can serve, and checks that each algorithm settles near
the knee, backs off when the knee moves down and comes back when it moves up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import heapq
import math
import pickle
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from resilient.adaptive import (
    AIMD,
    AdaptiveLimit,
    Gradient2,
    LimitAlgorithm,
    live_limits,
    overloaded,
)
from resilient.bulkhead import Bulkhead
from resilient.deadline import deadline, deadline_at
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded
from resilient.policy import Policy
from resilient.retry import Backoff, Retry
from resilient.rpc.errors import InvalidParams, Overloaded, RemoteBulkheadFull
from resilient.stages import MeasuredAdmission
from resilient.testing import FakeClock


@dataclass
class Scripted:
    """A LimitAlgorithm whose next limit the test sets, recording every sample it is given."""

    limit: int = 4
    max_limit: int = 10
    next: int | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def update(
        self, *, now: float, started: float, rtt: float, inflight: int, dropped: bool
    ) -> int:
        self.samples.append(
            {"now": now, "started": started, "rtt": rtt, "inflight": inflight, "dropped": dropped}
        )
        if self.next is not None:
            self.limit = self.next
        return self.limit


def scripted_bulkhead(
    limit: int = 4, max_limit: int = 10, clock: FakeClock | None = None, **config: Any
) -> tuple[Bulkhead, Scripted, FakeClock]:
    clock = FakeClock() if clock is None else clock
    algorithm = Scripted(limit=limit, max_limit=max_limit)
    adaptive = AdaptiveLimit(algorithm=algorithm, clock=clock)
    return Bulkhead(max_concurrent=adaptive, **config), algorithm, clock


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    give_up_at = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up_at:
            raise AssertionError("condition was not reached in time")
        time.sleep(0.0005)


def sample(algorithm: AIMD | Gradient2, now: float, rtt: float, inflight: int, **kw: Any) -> int:
    started = kw.pop("started", now - rtt)
    dropped = kw.pop("dropped", False)
    return algorithm.update(now=now, started=started, rtt=rtt, inflight=inflight, dropped=dropped)


# -- AIMD ---------------------------------------------------------------------------------


def test_aimd_defaults_are_netflixs() -> None:
    """Out of the box: initial 20, min 20, max 200, backoff 0.9, a 5 s call counts as a drop."""
    aimd = AIMD()
    assert (aimd.limit, aimd.min_limit, aimd.max_limit) == (20, 20, 200)
    assert (aimd.backoff_ratio, aimd.drop_after) == (0.9, 5.0)


def test_aimd_drop_multiplies_the_limit_by_the_backoff_ratio_down_to_the_minimum() -> None:
    """Each congestion event cuts the limit by 10%, never below min_limit."""
    aimd = AIMD(initial_limit=100, min_limit=80)
    assert sample(aimd, 1.0, 0.01, 100, dropped=True) == 90
    assert sample(aimd, 2.0, 0.01, 90, dropped=True) == 81
    assert sample(aimd, 3.0, 0.01, 81, dropped=True) == 80
    assert sample(aimd, 4.0, 0.01, 80, dropped=True) == 80


def test_aimd_cuts_once_per_congestion_event() -> None:
    """Drops of calls that started before the last cut are the same event: no second cut."""
    aimd = AIMD(initial_limit=100, min_limit=1)
    assert sample(aimd, 1.0, 0.5, 100, dropped=True) == 90
    # A burst of calls that were already in flight when the limit was cut time out too.
    for _ in range(50):
        assert sample(aimd, 1.2, 0.5, 100, dropped=True, started=0.7) == 90
    # A call that started after the cut and still drops is new evidence.
    assert sample(aimd, 1.5, 0.2, 90, dropped=True, started=1.3) == 81


def test_aimd_grows_by_one_per_round_trip_of_successes_while_the_limit_is_used() -> None:
    """Each success at half the limit or more adds 1/limit: `limit` successes add one."""
    aimd = AIMD(initial_limit=20, min_limit=1)
    successes = 0
    while aimd.limit == 20:
        sample(aimd, 1.0, 0.01, 20)
        successes += 1
    assert aimd.limit == 21
    assert 20 <= successes <= 22  # a round trip's worth of calls at a limit of 20


def test_aimd_does_not_grow_when_the_caller_limits_the_load() -> None:
    """Below half the limit in flight, success proves nothing about capacity: no growth."""
    aimd = AIMD(initial_limit=20, min_limit=1)
    for _ in range(1000):
        assert sample(aimd, 1.0, 0.01, 9) == 20


def test_aimd_stops_at_max_limit() -> None:
    """Growth never passes max_limit."""
    aimd = AIMD(initial_limit=5, min_limit=1, max_limit=6)
    for _ in range(1000):
        sample(aimd, 1.0, 0.01, 6)
    assert aimd.limit == 6


def test_aimd_a_success_slower_than_drop_after_is_a_drop() -> None:
    """A call that took longer than drop_after cuts the limit though it returned."""
    aimd = AIMD(initial_limit=50, min_limit=1, drop_after=0.2)
    assert sample(aimd, 1.0, 0.2, 50) == 50  # exactly at the threshold: not slower
    assert sample(aimd, 2.0, 0.25, 50) == 45


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"initial_limit": 0, "min_limit": 1}, ValueError, "initial_limit"),
        ({"min_limit": 0}, ValueError, "min_limit"),
        ({"max_limit": 1.5}, TypeError, "max_limit"),
        ({"min_limit": 30, "max_limit": 20, "initial_limit": 20}, ValueError, "exceed"),
        ({"initial_limit": 10}, ValueError, "initial_limit must be between"),
        ({"initial_limit": 300}, ValueError, "initial_limit must be between"),
        ({"backoff_ratio": 0.4}, ValueError, "backoff_ratio"),
        ({"backoff_ratio": 1.0}, ValueError, "never back off"),
        ({"backoff_ratio": "0.9"}, TypeError, "backoff_ratio"),
        ({"drop_after": 0}, ValueError, "drop_after"),
        ({"drop_after": -1}, ValueError, "drop_after"),
        ({"drop_after": "5s"}, TypeError, "drop_after"),
    ],
)
def test_aimd_rejects_bad_settings(
    config: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Every bad setting fails at construction with the parameter's name."""
    with pytest.raises(error, match=match):
        AIMD(**config)


# -- Gradient2 ----------------------------------------------------------------------------


def feed_window(g: Gradient2, start: float, rtt: float, inflight: int, calls: int = 10) -> int:
    """Feed ``calls`` samples spread over one window starting at ``start``, plus the closing one."""
    step = g.window / calls
    for i in range(calls):
        sample(g, start + i * step, rtt, inflight)
    return sample(g, start + g.window, rtt, inflight)


def test_gradient2_defaults_are_netflixs() -> None:
    """Out of the box: 20/20/200, smoothing 0.2, queue 4, tolerance 1.5, 600 windows of 1 s."""
    g = Gradient2()
    assert (g.limit, g.min_limit, g.max_limit) == (20, 20, 200)
    assert (g.smoothing, g.queue_size, g.rtt_tolerance) == (0.2, 4, 1.5)
    assert (g.long_window, g.window, g.window_samples) == (600, 1.0, 10)


def test_gradient2_decides_once_per_window() -> None:
    """Within a window nothing moves; the window's end applies one step."""
    g = Gradient2(initial_limit=20, min_limit=1, window=1.0)
    for i in range(100):
        assert sample(g, 10.0 + i * 0.005, 0.01, 20) == 20
    # Steady latency: gradient 1, so the limit grows by queue_size * smoothing = 0.8.
    assert sample(g, 11.0, 0.01, 20) == 20
    assert g._estimate == pytest.approx(20.8)
    assert g.long_rtt == pytest.approx(0.01)


def test_gradient2_a_window_with_too_few_calls_is_not_used() -> None:
    """Fewer than window_samples calls in a window: dropped, nothing learnt."""
    g = Gradient2(initial_limit=20, min_limit=1, window_samples=10)
    for i in range(5):
        sample(g, 1.0 + i * 0.1, 0.01, 20)
    assert sample(g, 2.0, 0.01, 20) == 20
    assert g.long_rtt == 0.0


def test_gradient2_shrinks_when_calls_queue_up() -> None:
    """A short RTT above tolerance x the long one lowers the limit, by at most half, smoothed."""
    g = Gradient2(initial_limit=100, min_limit=1, max_limit=200)
    start = 0.0
    for _ in range(10):  # warm the long RTT up at 10 ms
        feed_window(g, start, 0.01, 100)
        start += 2.0
    before = g._estimate
    feed_window(g, start, 0.1, 100)  # ten times slower: gradient clamps at 0.5
    expected = before * 0.8 + (before * 0.5 + 4) * 0.2
    assert g._estimate == pytest.approx(expected, rel=1e-6)
    assert g.limit < int(before)


def test_gradient2_tolerates_latency_within_rtt_tolerance() -> None:
    """Up to 1.5x the long RTT counts as no queueing: the limit still grows."""
    g = Gradient2(initial_limit=50, min_limit=1)
    start = 0.0
    for _ in range(10):
        feed_window(g, start, 0.01, 50)
        start += 2.0
    before = g._estimate
    feed_window(g, start, 0.014, 50)  # 1.4x: within tolerance
    assert g._estimate > before


def test_gradient2_does_not_move_when_the_callers_limit_the_load() -> None:
    """With under half the limit in flight the limit stays, whatever the latency does."""
    g = Gradient2(initial_limit=40, min_limit=1)
    start = 0.0
    for _ in range(20):
        feed_window(g, start, 0.01 * (1 + start), 19)
        start += 2.0
    assert g.limit == 40


def test_gradient2_long_rtt_decays_once_the_load_has_gone() -> None:
    """When the short RTT falls under half the long one, the long RTT loses 5% a window."""
    g = Gradient2(initial_limit=40, min_limit=1, long_window=600)
    start = 0.0
    for _ in range(10):
        feed_window(g, start, 0.1, 40)  # a long stretch of slow calls
        start += 2.0
    assert g.long_rtt == pytest.approx(0.1)
    feed_window(g, start, 0.01, 40)
    factor = 2.0 / 601
    assert g.long_rtt == pytest.approx((0.1 + (0.01 - 0.1) * factor) * 0.95)


def test_gradient2_stays_within_min_and_max() -> None:
    """The limit never leaves [min_limit, max_limit]."""
    g = Gradient2(initial_limit=10, min_limit=8, max_limit=12)
    start = 0.0
    for _ in range(50):
        feed_window(g, start, 0.01, 12)
        start += 2.0
    assert g.limit == 12
    for _ in range(50):
        feed_window(g, start, 1.0, 12)
        start += 2.0
    assert g.limit == 8


def test_gradient2_ignores_a_window_of_zero_round_trips() -> None:
    """Calls timed at 0 s (a clock that did not move) cannot be divided by: no decision."""
    g = Gradient2(initial_limit=20, min_limit=1)
    assert feed_window(g, 0.0, 0.0, 20) == 20
    assert g.long_rtt == 0.0


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"smoothing": 0}, ValueError, "smoothing"),
        ({"smoothing": 1.5}, ValueError, "smoothing"),
        ({"queue_size": -1}, ValueError, "queue_size"),
        ({"queue_size": 1.5}, TypeError, "queue_size"),
        ({"rtt_tolerance": 0.9}, ValueError, "rtt_tolerance"),
        ({"long_window": 0}, ValueError, "long_window"),
        ({"window": 0}, ValueError, "window"),
        ({"window": math.inf}, ValueError, "window"),
        ({"window_samples": 0}, ValueError, "window_samples"),
        ({"min_limit": 0}, ValueError, "min_limit"),
    ],
)
def test_gradient2_rejects_bad_settings(
    config: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Every bad setting fails at construction with the parameter's name."""
    with pytest.raises(error, match=match):
        Gradient2(**config)


def test_algorithms_pickle_and_copy_as_their_configuration() -> None:
    """A copy has the same settings and starts over at its initial limit."""
    aimd = AIMD(initial_limit=30, min_limit=5, max_limit=50, drop_after=1.0)
    sample(aimd, 1.0, 0.1, 30, dropped=True)
    assert aimd.limit == 27
    for fresh in (copy.copy(aimd), pickle.loads(pickle.dumps(aimd))):
        assert isinstance(fresh, AIMD)
        assert (fresh.limit, fresh.min_limit, fresh.max_limit, fresh.drop_after) == (30, 5, 50, 1.0)
    gradient = Gradient2(initial_limit=25, window=0.5)
    fresh_gradient = pickle.loads(pickle.dumps(gradient))
    assert (fresh_gradient.limit, fresh_gradient.window) == (25, 0.5)
    assert "limit=27" in repr(aimd)
    assert "Gradient2(limit=25" in repr(gradient)


# -- AdaptiveLimit --------------------------------------------------------------------------


def test_overloaded_counts_timeouts_and_remote_refusals_only() -> None:
    """The default drop_on: timeouts and the other side's refusals; not errors or local ones."""
    assert overloaded(TimeoutError())
    assert overloaded(DeadlineExceeded())
    assert overloaded(TimeoutError())
    assert overloaded(Overloaded())
    assert overloaded(RemoteBulkheadFull())
    assert not overloaded(ValueError("bad input"))
    assert not overloaded(InvalidParams())  # the server answered: a remote error, no refusal
    assert not overloaded(CircuitOpenError("local", 1.0))  # never reached the dependency
    assert not overloaded(BulkheadFull("local", 1, 0))


def test_drop_on_takes_types_or_a_predicate() -> None:
    """drop_on=(types) or a predicate replaces the default; a cancellation is never a sample."""
    limit = AdaptiveLimit(algorithm=AIMD(), drop_on=(ConnectionError, TimeoutError))
    assert limit.is_drop(ConnectionResetError())
    assert not limit.is_drop(ValueError())
    assert limit._judge(None) is False
    assert limit._judge(ConnectionError()) is True
    assert limit._judge(ValueError()) is None
    assert limit._judge(asyncio.CancelledError()) is None
    assert limit._judge(KeyboardInterrupt()) is None
    single = AdaptiveLimit(algorithm=AIMD(), drop_on=ConnectionError)
    assert single.is_drop(ConnectionRefusedError())
    predicate = AdaptiveLimit(algorithm=AIMD(), drop_on=lambda error: "503" in str(error))
    assert predicate.is_drop(RuntimeError("HTTP 503"))
    assert not predicate.is_drop(RuntimeError("HTTP 500"))


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"algorithm": 20}, TypeError, "algorithm must be"),
        ({"algorithm": AIMD(), "drop_on": ()}, ValueError, "at least one"),
        ({"algorithm": AIMD(), "drop_on": (ValueError, "x")}, TypeError, "tuple of exception"),
        ({"algorithm": AIMD(), "drop_on": int}, TypeError, "exception type"),
        ({"algorithm": AIMD(), "drop_on": "TimeoutError"}, TypeError, "drop_on must be"),
        ({"algorithm": AIMD(), "clock": 5}, TypeError, "clock"),
        ({"algorithm": Scripted(limit=0)}, ValueError, "algorithm.limit"),
        ({"algorithm": Scripted(limit=11, max_limit=10)}, ValueError, "must not exceed"),
    ],
)
def test_adaptive_limit_rejects_bad_settings(
    config: dict[str, Any], error: type[Exception], match: str
) -> None:
    """A wrong algorithm, drop_on or clock fails at construction, saying what to pass."""
    with pytest.raises(error, match=match):
        AdaptiveLimit(**config)


def test_factories_build_the_named_algorithm() -> None:
    """AdaptiveLimit.aimd() and .gradient2() pass their settings to the algorithm."""
    aimd = AdaptiveLimit.aimd(initial_limit=8, min_limit=2, max_limit=16)
    assert isinstance(aimd.algorithm, AIMD)
    assert (aimd.limit, aimd.max_limit, aimd.owner) == (8, 16, None)
    gradient = AdaptiveLimit.gradient2(window=0.25, queue_size=2)
    assert isinstance(gradient.algorithm, Gradient2)
    assert (gradient.algorithm.window, gradient.algorithm.queue_size) == (0.25, 2)
    assert gradient.clock is time.monotonic
    assert "drop_on=overloaded" in repr(gradient)
    assert "drop_on=(TimeoutError,)" in repr(
        AdaptiveLimit(algorithm=AIMD(), drop_on=(TimeoutError,))
    )


def test_one_limit_belongs_to_one_bulkhead() -> None:
    """Sharing a limit between two bulkheads is refused; copy.copy makes a fresh one."""
    limit = AdaptiveLimit.aimd()
    first = Bulkhead(max_concurrent=limit, name="db")
    assert limit.owner == "db"
    assert first.adaptive_limit is limit
    with pytest.raises(ValueError, match="already limits bulkhead 'db'"):
        Bulkhead(max_concurrent=limit, name="cache")
    second = Bulkhead(max_concurrent=copy.copy(limit), name="cache")
    assert second.adaptive_limit is not limit
    assert {item.owner for item in live_limits()} >= {"db", "cache"}


def test_adaptive_limit_pickles_fresh_and_unattached() -> None:
    """A pickled limit has the same settings, its initial limit and no bulkhead."""
    clock = FakeClock()
    limit = AdaptiveLimit.aimd(initial_limit=30, min_limit=1, drop_on=(TimeoutError,), clock=clock)
    bulkhead = Bulkhead(max_concurrent=limit)
    ticket = bulkhead.acquire_ticket()
    bulkhead.release_ticket(ticket, TimeoutError())
    assert limit.limit == 27
    fresh = pickle.loads(pickle.dumps(limit))
    assert (fresh.limit, fresh.owner, fresh.clock.now) == (30, None, clock.now)
    assert fresh.is_drop(TimeoutError())
    assert not fresh.is_drop(ValueError())


# -- the adaptive bulkhead ----------------------------------------------------------------


def test_adaptive_bulkhead_is_a_bulkhead_with_a_moving_max_concurrent() -> None:
    """Bulkhead(max_concurrent=AdaptiveLimit) reports the current limit and its limit object."""
    bulkhead, _, _ = scripted_bulkhead(limit=4, max_waiting=2, name="db")
    assert isinstance(bulkhead, Bulkhead)
    assert isinstance(bulkhead, MeasuredAdmission)
    assert (bulkhead.max_concurrent, bulkhead.available, bulkhead.active) == (4, 4, 0)
    assert bulkhead.slot_pool() is None  # the driver takes the ticket path
    assert "max_concurrent=AdaptiveLimit(bulkhead='db', limit=4" in repr(bulkhead)
    fixed = Bulkhead(max_concurrent=3)
    assert fixed.adaptive_limit is None
    assert fixed.slot_pool() is not None


def test_tickets_time_each_call_and_pass_its_outcome() -> None:
    """The slot's hold time is the RTT; success, drop and in-flight count reach the algorithm."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=4)
    first = bulkhead.try_acquire_ticket()
    second = bulkhead.try_acquire_ticket()
    assert first == second == clock.now
    clock.advance(0.25)
    bulkhead.release_ticket(first, None)
    clock.advance(0.25)
    bulkhead.release_ticket(second, DeadlineExceeded())
    assert [(s["rtt"], s["inflight"], s["dropped"]) for s in algorithm.samples] == [
        (0.25, 2, False),
        (0.5, 1, True),
    ]
    third = bulkhead.acquire_ticket()
    bulkhead.release_ticket(third, ValueError("not a drop"))  # ignored: no sample
    fourth = bulkhead.acquire_ticket()
    bulkhead.release_ticket(fourth, asyncio.CancelledError())  # no outcome at all
    assert len(algorithm.samples) == 2
    assert bulkhead.available == 4


def test_shrinking_below_in_flight_disturbs_nobody_and_admits_no_one_until_below() -> None:
    """Calls in flight finish; new calls get a slot only once in-flight is under the new limit."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=4)
    tickets = [bulkhead.try_acquire_ticket() for _ in range(4)]
    algorithm.next = 2
    bulkhead.release_ticket(tickets.pop(), None)
    assert (bulkhead.max_concurrent, bulkhead.active, bulkhead.available) == (2, 3, 0)
    assert bulkhead.try_acquire_ticket() is None
    bulkhead.release_ticket(tickets.pop(), None)
    assert (bulkhead.active, bulkhead.available) == (2, 0)
    assert bulkhead.try_acquire_ticket() is None
    assert not bulkhead.try_acquire()
    bulkhead.release_ticket(tickets.pop(), None)
    assert (bulkhead.active, bulkhead.available) == (1, 1)
    assert bulkhead.try_acquire_ticket() is not None
    assert bulkhead.try_acquire_ticket() is None
    with pytest.raises(BulkheadFull, match="is full: 2 calls running"):
        bulkhead.acquire()


def test_growing_wakes_thread_and_task_waiters() -> None:
    """When the limit grows, waiting threads and tasks get the new slots at once."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=1, max_waiting=3)
    held = bulkhead.acquire_ticket()
    got: list[str] = []

    def thread_waiter() -> None:
        ticket = bulkhead.acquire_ticket()
        got.append("thread")
        bulkhead.release_ticket(ticket, ValueError())

    async def task_waiter() -> None:
        async with bulkhead:
            got.append("task")

    thread = threading.Thread(target=thread_waiter)
    thread.start()
    wait_until(lambda: bulkhead.waiting == 1)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    try:
        future = asyncio.run_coroutine_threadsafe(task_waiter(), loop)
        wait_until(lambda: bulkhead.waiting == 2)
        assert bulkhead.try_acquire_ticket() is None  # others wait first
        algorithm.next = 3
        bulkhead.release_ticket(held, None)
        future.result(5)
        thread.join(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert sorted(got) == ["task", "thread"]
    assert (bulkhead.max_concurrent, bulkhead.available, bulkhead.waiting) == (3, 3, 0)


def test_a_waiter_that_gives_up_while_the_limit_shrinks_leaks_no_slot() -> None:
    """A waiter handed a slot that gives it back while a debt is booked pays the debt."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=2, max_waiting=1)
    held = [bulkhead.acquire_ticket(), bulkhead.acquire_ticket()]

    async def main() -> None:
        task = asyncio.create_task(bulkhead.acquire_ticket_async())
        await asyncio.sleep(0)
        assert bulkhead.waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    algorithm.next = 1
    bulkhead.release_ticket(held.pop(), None)
    assert (bulkhead.active, bulkhead.available) == (1, 0)
    bulkhead._debt = 1  # as if a slot in transit to a waiter came back during the shrink
    bulkhead.wake()
    bulkhead._tokens.append(None)
    with bulkhead._lock:
        bulkhead._hand_out_tokens()
    assert (bulkhead._debt, bulkhead.available) == (0, 0)
    bulkhead._debt = 1  # and a debt with no free token to settle it stays booked
    with bulkhead._lock:
        bulkhead._hand_out_tokens()
    assert bulkhead._debt == 1


def test_plain_acquire_and_release_teach_nothing_and_over_release_is_an_error() -> None:
    """acquire()/release() still work on an adaptive bulkhead, without samples: it warns once."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=2, name="db")
    bulkhead.acquire()
    assert bulkhead.try_acquire()
    with pytest.warns(RuntimeWarning, match="'db' has an adaptive limit.*learnt nothing"):
        bulkhead.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the first time
        bulkhead.release()
    assert algorithm.samples == []
    with pytest.raises(RuntimeError, match="released more times than it was acquired"):
        bulkhead.release()
    with pytest.raises(RuntimeError, match="released more times"):
        bulkhead.release_ticket(1000.0, None)
    assert bulkhead.available == 2


def test_a_ticket_that_is_not_the_bulkheads_frees_the_slot_unmeasured() -> None:
    """A ticket of a fixed bulkhead, or any non-float, gives the slot back without a sample."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=2)
    assert bulkhead.try_acquire()
    bulkhead.release_ticket(object(), None)
    assert (algorithm.samples, bulkhead.available) == ([], 2)


def test_a_raising_drop_predicate_still_frees_the_slot() -> None:
    """drop_on's own error propagates, after the slot went back."""

    def broken(error: Exception) -> bool:
        raise LookupError("predicate bug")

    bulkhead = Bulkhead(max_concurrent=AdaptiveLimit.aimd(drop_on=broken))
    ticket = bulkhead.acquire_ticket()
    with pytest.raises(LookupError, match="predicate bug"):
        bulkhead.release_ticket(ticket, ValueError())
    assert bulkhead.available == 20


def test_an_algorithm_returning_a_bad_limit_is_reported_and_the_limit_kept() -> None:
    """A custom algorithm's out-of-range limit raises after the slot went back; nothing moves."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=2, max_limit=4)
    algorithm.next = 5
    ticket = bulkhead.acquire_ticket()
    with pytest.raises(ValueError, match="returned 5, not an int from 1 to max_limit=4"):
        bulkhead.release_ticket(ticket, None)
    assert (bulkhead.max_concurrent, bulkhead.available) == (2, 2)


def test_with_blocks_are_measured_sync_and_async() -> None:
    """``with`` and ``async with`` time the block and report how it ended."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=3)
    with bulkhead:
        clock.advance(0.1)
        with bulkhead:  # nested: each block its own sample
            clock.advance(0.1)
    with pytest.raises(TimeoutError), bulkhead:
        raise TimeoutError

    async def main() -> None:
        async with bulkhead:
            clock.advance(0.3)
        with pytest.raises(ValueError, match="app"):
            async with bulkhead:
                raise ValueError("app")

    asyncio.run(main())
    assert [(round(s["rtt"], 6), s["dropped"]) for s in algorithm.samples] == [
        (0.1, False),
        (0.2, False),
        (0.0, True),
        (0.3, False),
    ]
    assert bulkhead.available == 3


def test_a_with_block_left_in_another_context_frees_its_slot_unmeasured() -> None:
    """__exit__ without the matching __enter__ in this context still gives the slot back."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=1)
    contextvars.copy_context().run(bulkhead.__enter__)  # not this test's own context
    with pytest.warns(RuntimeWarning, match="learnt nothing"):
        contextvars.Context().run(bulkhead.__exit__, None, None, None)
    assert (bulkhead.available, algorithm.samples) == (1, [])


def test_with_blocks_that_do_not_nest_each_find_their_own_slot() -> None:
    """A generator's block left after its caller's block: each is measured, nothing stays held."""
    from resilient.bulkhead import _held

    first, first_algorithm, clock = scripted_bulkhead(limit=2)
    second, second_algorithm, _ = scripted_bulkhead(limit=2, clock=clock)

    def rows() -> Any:
        with first:
            yield 1
            clock.advance(0.5)
            yield 2

    reader = rows()
    next(reader)  # first's block is open
    with second:  # second's opens inside it in this context, and closes after it
        clock.advance(0.25)
        assert next(reader) == 2
        with contextlib.suppress(StopIteration):
            next(reader)  # first's block closes while second's is still open
    assert [s["rtt"] for s in first_algorithm.samples] == [0.75]
    assert [s["rtt"] for s in second_algorithm.samples] == [0.75]
    assert (first.available, second.available, _held.get()) == (2, 2, None)


def test_policy_and_decorator_report_each_call_sync() -> None:
    """Through the driver a call's RTT (retries included) and outcome reach the limit."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=2)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        clock.advance(0.05)
        if len(attempts) == 1:
            raise ConnectionError("first try")
        return "ok"

    policy = Policy(bulkhead=bulkhead, retry=Retry(attempts=2, backoff=Backoff(initial=0.0)))
    assert policy(flaky)() == "ok"

    @bulkhead
    def slow() -> None:
        clock.advance(0.2)
        raise DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        slow()
    with pytest.raises(KeyError):
        bulkhead.call(lambda: {}["missing"])
    assert [(round(s["rtt"], 6), s["dropped"]) for s in algorithm.samples] == [
        (0.1, False),
        (0.2, True),
    ]
    assert bulkhead.available == 2


def test_the_driver_waits_for_an_adaptive_slot_and_measures_from_when_it_got_it() -> None:
    """A call that waited for a slot is timed from the slot, not from its arrival."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=1, max_waiting=1)
    held = bulkhead.acquire_ticket()
    done = threading.Event()

    def call() -> None:
        bulkhead.call(clock.advance, 0.5)
        done.set()

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: bulkhead.waiting == 1)
    clock.advance(10.0)  # the waiter's wait: not part of its RTT
    bulkhead.release_ticket(held, None)
    assert done.wait(5)
    thread.join(5)
    assert [s["rtt"] for s in algorithm.samples] == [10.0, 0.5]


async def test_policy_and_decorator_report_each_call_async() -> None:
    """Async calls report alike; a call cancelled while running is no sample."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=1, max_waiting=1)
    started = asyncio.Event()

    async def work(seconds: float) -> str:
        clock.advance(seconds)
        return "done"

    async def hangs() -> None:
        started.set()
        await asyncio.sleep(30)

    assert await Policy(bulkhead=bulkhead)(work)(0.25) == "done"
    task = asyncio.create_task(bulkhead.acall(hangs))
    await started.wait()
    waiter = asyncio.create_task(bulkhead.acall(work, 0.5))  # waits for the slot
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await waiter == "done"
    assert [s["rtt"] for s in algorithm.samples] == [0.25, 0.5]
    assert bulkhead.available == 1


async def test_deadline_bounds_the_wait_for_an_adaptive_slot() -> None:
    """Waiting for an adaptive slot ends at the deadline, as for a fixed one."""
    bulkhead, _, _ = scripted_bulkhead(limit=1, max_waiting=1)
    held = bulkhead.acquire_ticket()

    async def work() -> None:
        return None

    with deadline(0.05), pytest.raises(DeadlineExceeded, match="slot"):
        await bulkhead.acall(work)
    bulkhead.release_ticket(held, None)
    assert bulkhead.available == 1


def test_threads_hammering_an_adaptive_bulkhead_keep_its_books_straight() -> None:
    """Many threads, a limit that moves on every release: no slot lost or made up."""
    clock = FakeClock()
    limit = AdaptiveLimit.aimd(initial_limit=8, min_limit=2, max_limit=16, clock=clock)
    bulkhead = Bulkhead(max_concurrent=limit, max_waiting=64)
    peak = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        nonlocal peak
        try:
            for i in range(600):
                with contextlib.suppress(TimeoutError), bulkhead:
                    with lock:
                        peak = max(peak, bulkhead.active)
                        clock.advance(0.001)
                    if (i + seed) % 7 == 0:
                        raise TimeoutError
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert peak <= 16
    assert bulkhead.active == 0
    assert bulkhead.available == bulkhead.max_concurrent == limit.limit
    assert bulkhead._debt == 0


def test_pickled_adaptive_bulkhead_is_fresh() -> None:
    """A pickled or copied adaptive bulkhead has a fresh limit of the same settings."""
    bulkhead = Bulkhead(
        max_concurrent=AdaptiveLimit.aimd(initial_limit=30, min_limit=1), max_waiting=2, name="db"
    )
    ticket = bulkhead.acquire_ticket()
    bulkhead.release_ticket(ticket, TimeoutError())
    assert bulkhead.max_concurrent == 27
    for twin in (pickle.loads(pickle.dumps(bulkhead)), copy.copy(bulkhead)):
        assert isinstance(twin, Bulkhead)
        assert twin.adaptive_limit is not None
        assert twin.adaptive_limit is not bulkhead.adaptive_limit
        assert (twin.max_concurrent, twin.available, twin.max_waiting, twin.name) == (
            30,
            30,
            2,
            "db",
        )


def test_after_fork_every_slot_is_free_the_limit_is_kept_and_stale_releases_accepted() -> None:
    """The fork hook frees slots (debt too) but keeps what the limit learnt."""
    bulkhead, algorithm, clock = scripted_bulkhead(limit=4)
    tickets = [bulkhead.acquire_ticket() for _ in range(4)]
    algorithm.next = 2
    bulkhead.release_ticket(tickets.pop(), None)  # limit 2, three held, one owed
    assert (bulkhead.active, bulkhead._debt) == (3, 1)
    bulkhead._after_fork_in_child()
    assert (bulkhead.max_concurrent, bulkhead.available, bulkhead.active) == (2, 2, 0)
    for ticket in tickets:  # the parent's three slots, given back by the forking thread
        bulkhead.release_ticket(ticket, None)
    with pytest.raises(RuntimeError, match="released more times"):
        bulkhead.release_ticket(clock.now, None)
    assert bulkhead.available == 2


def test_a_forked_child_gets_every_adaptive_slot_free_and_keeps_the_learnt_limit() -> None:
    """A real fork while another thread holds a slot: the child has every slot, same limit."""
    from test_fork import run_in_fork

    limit = AdaptiveLimit.aimd(initial_limit=3, min_limit=1)
    bulkhead = Bulkhead(max_concurrent=limit, max_waiting=1)
    bulkhead.release_ticket(bulkhead.acquire_ticket(), TimeoutError())  # learnt: 3 -> 2
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with bulkhead:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(5)

    def child() -> None:
        assert (bulkhead.max_concurrent, bulkhead.available, bulkhead.active) == (2, 2, 0)
        with bulkhead:
            assert bulkhead.available == 1
        assert bulkhead.available == 2

    try:
        run_in_fork(child)
    finally:
        done.set()
        thread.join(5)
    assert (bulkhead.available, bulkhead.active) == (2, 0)  # the parent is unaffected


def test_a_subclass_of_bulkhead_takes_only_a_fixed_limit() -> None:
    """A user's subclass of Bulkhead cannot take an AdaptiveLimit: it says so."""

    class Mine(Bulkhead):
        __slots__ = ()

    assert Mine(max_concurrent=2).max_concurrent == 2
    with pytest.raises(TypeError, match="takes max_concurrent as an int"):
        Mine(max_concurrent=AdaptiveLimit.aimd())
    from resilient.bulkhead import _AdaptiveBulkhead

    with pytest.raises(TypeError, match="must be an AdaptiveLimit"):
        _AdaptiveBulkhead(max_concurrent=3)


def test_fixed_bulkhead_tickets_are_a_formality() -> None:
    """A fixed bulkhead speaks the ticket protocol too, and its healthy path is unchanged."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=0)
    assert bulkhead.try_acquire_ticket() == 0.0
    assert bulkhead.try_acquire_ticket() is None
    bulkhead.release_ticket(0.0, TimeoutError())
    assert bulkhead.acquire_ticket() == 0.0
    bulkhead.release_ticket(0.0, None)

    async def main() -> float:
        return await bulkhead.acquire_ticket_async()

    assert asyncio.run(main()) == 0.0
    bulkhead.release()
    assert bulkhead.available == 1


# -- the simulation -----------------------------------------------------------------------


class Dependency:
    """A service shared by processor sharing: each call needs ``base`` seconds of work alone.

    Up to ``knee`` calls in flight every call runs at full speed; past it each runs
    ``exp((in flight - knee) / steepness)`` times slower (thrashing), so latency is flat
    up to the knee and then rises steeply. All calls progress at the same rate, so one
    virtual work clock serves them all and the next to finish is the earliest in a heap.
    """

    def __init__(self, base: float = 0.010, knee: int = 40, steepness: float = 4.0) -> None:
        self.base = base
        self.knee = knee
        self.steepness = steepness
        self.work = 0.0  # virtual seconds of work done by each call in flight since t=0
        self.finishing: list[tuple[float, int]] = []  # (work at which it is done, call)
        self.running: set[int] = set()

    def rate(self) -> float:
        excess = len(self.running) - self.knee
        return 1.0 if excess <= 0 else math.exp(-excess / self.steepness)

    def start(self, call: int) -> None:
        self.running.add(call)
        heapq.heappush(self.finishing, (self.work + self.base, call))

    def cancel(self, call: int) -> None:
        self.running.discard(call)  # its heap entry is skipped when it comes up

    def next_done(self, now: float) -> tuple[float, int] | None:
        """When the next call finishes (if nothing changes before) and which."""
        finishing = self.finishing
        while finishing and finishing[0][1] not in self.running:
            heapq.heappop(finishing)
        if not finishing:
            return None
        work, call = finishing[0]
        return now + (work - self.work) / self.rate(), call

    def advance(self, seconds: float) -> None:
        self.work += seconds * self.rate()

    def finish(self, call: int) -> None:
        heapq.heappop(self.finishing)
        self.running.discard(call)


def simulate(
    limit: AdaptiveLimit,
    clock: FakeClock,
    phases: list[tuple[float, int]],
    *,
    clients: int = 80,
    timeout: float | None = None,
    retry_after: float = 0.005,
) -> list[tuple[float, int]]:
    """Run ``clients`` callers through an adaptive bulkhead against a Dependency.

    Each client calls again as soon as its call ends; one refused (no slot) tries again
    ``retry_after`` later. With ``timeout``, a call still running then is abandoned (its
    work stops) and ends in DeadlineExceeded, as a client's deadline would end it.
    ``phases`` are (seconds, knee). Returns (time, limit) after every finished call.
    """
    bulkhead = Bulkhead(max_concurrent=limit, name="simulated")
    dependency = Dependency(knee=phases[0][1])
    begin = clock.now
    ends, elapsed = [], 0.0
    for seconds, knee in phases:
        elapsed += seconds
        ends.append((begin + elapsed, knee))
    tickets: dict[int, float] = {}
    deadlines: list[tuple[float, int, float]] = []  # (when, client, its ticket)
    tries = [(begin + client * 1e-4, client) for client in range(clients)]
    heapq.heapify(tries)
    trace: list[tuple[float, int]] = []
    phase = 0
    while True:
        done = dependency.next_done(clock.now)
        while deadlines and tickets.get(deadlines[0][1]) != deadlines[0][2]:
            heapq.heappop(deadlines)
        events = [
            (done[0], 0) if done else (math.inf, 0),
            (deadlines[0][0], 1) if deadlines else (math.inf, 1),
            (tries[0][0], 2) if tries else (math.inf, 2),
        ]
        when, kind = min(events)
        if when >= ends[-1][0]:
            return trace
        dependency.advance(when - clock.now)
        clock.advance(when - clock.now)
        while clock.now >= ends[phase][0]:
            phase += 1
        dependency.knee = ends[phase][1]
        if kind == 2:
            _, client = heapq.heappop(tries)
            ticket = bulkhead.try_acquire_ticket()
            if ticket is None:
                heapq.heappush(tries, (clock.now + retry_after, client))
                continue
            tickets[client] = ticket
            dependency.start(client)
            if timeout is not None:
                heapq.heappush(deadlines, (clock.now + timeout, client, ticket))
            continue
        if kind == 0:
            assert done is not None
            client = done[1]
            dependency.finish(client)
            error: BaseException | None = None
        else:
            _, client, _ = heapq.heappop(deadlines)
            dependency.cancel(client)
            error = DeadlineExceeded()
        bulkhead.release_ticket(tickets.pop(client), error)
        trace.append((clock.now - begin, bulkhead.max_concurrent))
        heapq.heappush(tries, (clock.now, client))


def settled(trace: list[tuple[float, int]], start: float, end: float) -> tuple[int, int]:
    """The lowest and highest limit over the second half of [start, end)."""
    middle = (start + end) / 2
    limits = [limit for when, limit in trace if middle <= when < end]
    assert limits, "no call finished in that stretch"
    return min(limits), max(limits)


def within(band: tuple[int, int], knee: int, low: float, high: float) -> bool:
    """Whether the (lowest, highest) limit stayed within [low, high] x the knee."""
    return low * knee <= band[0] and band[1] <= high * knee


PHASES = [(10.0, 40), (10.0, 20), (10.0, 40)]


def test_simulated_aimd_settles_near_the_knee_backs_off_and_recovers() -> None:
    """AIMD with 80 clients and a 25 ms client timeout holds within [0.9, 1.25] x the knee.

    The knee starts at 40 calls, drops to 20 (the dependency slows at the same load)
    and goes back to 40; in the second half of each phase the limit stays in the band.
    """
    clock = FakeClock()
    limit = AdaptiveLimit.aimd(initial_limit=20, min_limit=5, clock=clock)
    trace = simulate(limit, clock, PHASES, timeout=0.025)
    assert within(settled(trace, 0, 10), 40, 0.9, 1.25)
    assert within(settled(trace, 10, 20), 20, 0.9, 1.25)
    assert within(settled(trace, 20, 30), 40, 0.9, 1.25)


def test_simulated_gradient2_settles_near_the_knee_backs_off_and_recovers() -> None:
    """Gradient2 (0.1 s windows, no client timeout) holds within [0.9, 1.5] x the knee.

    The server-side case: the bulkhead is the server's limit, refused callers come
    back 5 ms later. Gradient2's long-term RTT carries some of the slow phase into
    the next one, so its band is wider than AIMD's.
    """
    clock = FakeClock()
    limit = AdaptiveLimit.gradient2(initial_limit=20, min_limit=5, window=0.1, clock=clock)
    trace = simulate(limit, clock, PHASES)
    assert within(settled(trace, 0, 10), 40, 0.9, 1.5)
    assert within(settled(trace, 10, 20), 20, 0.9, 1.5)
    assert within(settled(trace, 20, 30), 40, 0.9, 1.5)


def test_simulated_limit_is_the_one_the_load_needs_not_the_offered_load() -> None:
    """With fewer clients than the knee, AIMD does not grow past what is used."""
    clock = FakeClock()
    limit = AdaptiveLimit.aimd(initial_limit=20, min_limit=5, clock=clock)
    trace = simulate(limit, clock, [(5.0, 40)], clients=8, timeout=0.025)
    assert {limit for _, limit in trace} == {20}


def test_limit_algorithm_protocol_is_runtime_checkable() -> None:
    """The built-in algorithms and a duck-typed one are LimitAlgorithms."""
    assert isinstance(AIMD(), LimitAlgorithm)
    assert isinstance(Gradient2(), LimitAlgorithm)
    assert isinstance(Scripted(), LimitAlgorithm)
    assert not isinstance(object(), LimitAlgorithm)


def test_calls_whose_deadline_passed_before_they_started_teach_the_limit_nothing() -> None:
    """Late callers (their deadline gone on arrival) are refused before taking a slot.

    They never reach the dependency, so their DeadlineExceeded is no drop: twenty of them
    used to cut an AIMD limit from 50 to 6, once per late caller.
    """
    limit = AdaptiveLimit.aimd(initial_limit=50, min_limit=1, max_limit=100)
    bulkhead = Bulkhead(max_concurrent=limit)
    ran = []

    @Policy(bulkhead=bulkhead)
    def call() -> None:
        ran.append(1)

    for _ in range(20):
        with deadline_at(time.monotonic() - 1.0), pytest.raises(DeadlineExceeded, match="start"):
            call()
    assert (ran, bulkhead.max_concurrent, bulkhead.available) == ([], 50, 50)


async def test_late_async_callers_teach_the_limit_nothing_either() -> None:
    """The async driver refuses a caller whose deadline passed before it takes a slot."""
    bulkhead, algorithm, _ = scripted_bulkhead(limit=2)

    @bulkhead
    async def call() -> None:
        return None

    with deadline_at(time.monotonic() - 1.0), pytest.raises(DeadlineExceeded, match="start"):
        await call()
    assert (algorithm.samples, bulkhead.available) == ([], 2)
    await call()  # with time left, a call is measured as before
    assert len(algorithm.samples) == 1


async def test_an_algorithm_that_raises_still_hands_the_freed_slot_to_a_waiter() -> None:
    """A custom algorithm's exception reaches the releasing caller; the waiter still gets in.

    The slot went back before the algorithm ran; a waiter used to be left waiting beside it.
    """

    class Broken(Scripted):
        def update(self, **sample: Any) -> int:
            raise ZeroDivisionError("a bug in the algorithm")

    bulkhead = Bulkhead(
        max_concurrent=AdaptiveLimit(algorithm=Broken(limit=1), clock=FakeClock()), max_waiting=1
    )
    ticket = bulkhead.acquire_ticket()
    waiter = asyncio.ensure_future(bulkhead.acquire_ticket_async())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    with pytest.raises(ZeroDivisionError):
        bulkhead.release_ticket(ticket, None)
    assert isinstance(await asyncio.wait_for(waiter, 2.0), float)
    assert (bulkhead.active, bulkhead.waiting) == (1, 0)


def test_a_clock_that_does_not_return_float_seconds_is_refused() -> None:
    """Tickets are the clock's readings; one returning ints used to make the limit learn nothing."""
    ticks = iter(range(0, 1000, 10))
    with pytest.raises(TypeError, match=r"clock must return seconds as a float.*int: 0"):
        AdaptiveLimit.aimd(clock=lambda: next(ticks))
