"""CircuitBreaker, driven through its core protocol with a fake clock.

The tests call ``_before_call`` / ``_on_success`` / ``_on_failure`` / ``_on_abort``
the way ``resilient.policy`` does; the decorator and ``call``/``acall`` sugar
are the Policy's and are tested with it.

Fast-path cost, closed state, default configuration (not a test; measured on
the development machine, CPython 3.11):

    .venv/bin/python -m timeit -s "from resilient.breaker import CircuitBreaker" \\
        -s "b = CircuitBreaker(); before = b._before_call; after = b._on_success" \\
        "after(before())"
    # about 100 ns per loop (budget: 150 ns)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from resilient.breaker import (
    BreakerEvent,
    BreakerSpec,
    BreakerState,
    BreakerStore,
    CircuitBreaker,
    InMemoryBreakerStore,
    WindowSpec,
)
from resilient.errors import CircuitOpenError
from resilient.testing import FakeClock

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
ISOLATED = BreakerState.ISOLATED


class Recorder:
    """A listener that keeps every event (module-level, so breakers using it pickle)."""

    def __init__(self) -> None:
        self.events: list[BreakerEvent] = []

    def __call__(self, event: BreakerEvent) -> None:
        self.events.append(event)

    def transitions(self) -> list[tuple[BreakerState, BreakerState, str]]:
        return [(e.old_state, e.new_state, e.reason) for e in self.events]


def make(**config: Any) -> tuple[CircuitBreaker, FakeClock, Recorder]:
    clock = FakeClock()
    recorder = Recorder()
    config.setdefault("name", "svc")
    breaker = CircuitBreaker(clock=clock, listeners=[recorder], **config)
    return breaker, clock, recorder


def succeed(breaker: CircuitBreaker, duration: float = 0.0, clock: FakeClock | None = None) -> None:
    """One call that returns after ``duration`` seconds."""
    ticket = breaker.before_call()
    if clock is not None:
        clock.advance(duration)
    breaker.on_success(ticket)


def fail(breaker: CircuitBreaker, exc: Exception | None = None) -> None:
    """One call that raises ``exc`` (a RuntimeError by default)."""
    ticket = breaker.before_call()
    breaker.on_failure(ticket, RuntimeError("boom") if exc is None else exc)


def drive(breaker: CircuitBreaker, fn: Callable[[], object]) -> object:
    """Run ``fn`` as the Policy driver does: Exception is a failure, anything else an abort."""
    ticket = breaker.before_call()
    try:
        result = fn()
    except Exception as exc:
        breaker.on_failure(ticket, exc)
        raise
    except BaseException:
        breaker.on_abort(ticket)
        raise
    breaker.on_success(ticket)
    return result


def trip(breaker: CircuitBreaker) -> None:
    """Fail calls until the breaker opens."""
    while breaker.state is CLOSED:
        fail(breaker)


def rejection(breaker: CircuitBreaker) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as caught:
        breaker.before_call()
    return caught.value


# Tripping ---------------------------------------------------------------------------------


def test_consecutive_failures_trip_and_a_success_restarts_the_count() -> None:
    """failure_threshold consecutive failures open it; a success in between resets the count."""
    breaker, _, recorder = make(failure_threshold=3)
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN
    assert recorder.transitions() == [(CLOSED, OPEN, "failure_threshold")]


def test_failure_rate_waits_for_minimum_calls() -> None:
    """The rate is judged only once the window holds minimum_calls calls, even on a success."""
    breaker, _, recorder = make(
        failure_threshold=None, failure_rate=0.5, window_size=10, minimum_calls=4
    )
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    assert breaker.state is CLOSED  # 2 of 3 failed, but 3 < minimum_calls
    succeed(breaker)
    assert breaker.state is OPEN  # 2 of 4 reaches 0.5
    assert recorder.transitions() == [(CLOSED, OPEN, "failure_rate")]


def test_count_window_forgets_outcomes_beyond_its_size() -> None:
    """Only the last window_size calls count: old failures slide out of the rate."""
    breaker, _, _ = make(failure_threshold=None, failure_rate=0.75, window_size=4)
    fail(breaker)
    for _ in range(4):
        succeed(breaker)
    metrics = breaker.metrics()
    assert (metrics.window_calls, metrics.window_failures) == (4, 0)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CLOSED  # [S, S, F, F]: 0.5
    fail(breaker)
    assert breaker.state is OPEN  # [S, F, F, F]: 0.75


def test_minimum_calls_defaults_to_window_size_when_smaller() -> None:
    """With window_size below 10 and no minimum_calls, a full window is judged."""
    breaker, _, _ = make(failure_threshold=None, failure_rate=1.0, window_size=3)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_time_window_trips_on_rate() -> None:
    """A time window trips when the failures of the last window_duration reach the rate."""
    breaker, clock, recorder = make(
        failure_threshold=None, failure_rate=0.5, window_duration=10, minimum_calls=3
    )
    for _ in range(2):
        fail(breaker)
        clock.advance(1)
    succeed(breaker)
    assert breaker.state is OPEN
    assert recorder.transitions() == [(CLOSED, OPEN, "failure_rate")]


def test_time_window_forgets_old_outcomes() -> None:
    """Outcomes older than window_duration leave the window; newer ones stay."""
    breaker, clock, _ = make(
        failure_threshold=None,
        failure_rate=0.5,
        window_duration=timedelta(seconds=10),
        minimum_calls=3,
    )
    fail(breaker)  # t = 0
    clock.advance(5)
    succeed(breaker)  # t = 5
    clock.advance(5)
    metrics = breaker.metrics()  # t = 10: the failure is gone, the success is not
    assert (metrics.window_calls, metrics.window_failures) == (1, 0)
    fail(breaker)
    assert breaker.state is CLOSED  # [S, F]: had the first failure stayed, 2 of 3 would trip
    clock.advance(100)
    metrics = breaker.metrics()
    assert (metrics.window_calls, metrics.window_failures) == (0, 0)


def test_slow_calls_count_as_failures() -> None:
    """A call that returns after more than slow_call_duration counts as a failure."""
    breaker, clock, recorder = make(failure_threshold=2, slow_call_duration=1.0)
    succeed(breaker, 2.0, clock)
    succeed(breaker, 0.5, clock)  # fast: restarts the count
    succeed(breaker, 1.5, clock)
    assert breaker.state is CLOSED
    succeed(breaker, 1.5, clock)
    assert breaker.state is OPEN
    assert recorder.transitions() == [(CLOSED, OPEN, "failure_threshold")]
    assert breaker.metrics().total_failures == 3


def test_slow_calls_feed_the_rate_window() -> None:
    """Slow successes count as failures in the failure rate too."""
    breaker, clock, _ = make(
        failure_threshold=None, failure_rate=0.5, window_size=2, slow_call_duration=1.0
    )
    succeed(breaker, 0.1, clock)
    assert breaker.state is CLOSED
    succeed(breaker, 3.0, clock)
    assert breaker.state is OPEN


def test_call_admitted_before_opening_does_not_count_after() -> None:
    """An outcome of a call admitted while closed is ignored once the breaker has opened."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=5)
    straggler = breaker.before_call()
    fail(breaker)
    breaker.on_failure(straggler, RuntimeError("late"))
    clock.advance(5)
    assert breaker.state is HALF_OPEN  # the late failure did not re-open or restart the clock
    assert breaker.metrics().total_failures == 2


# Open and half-open ------------------------------------------------------------------------


def test_open_rejects_with_seconds_until_half_open() -> None:
    """An open breaker rejects at once, telling the caller when probes resume."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=30)
    fail(breaker)
    clock.advance(10)
    error = rejection(breaker)
    assert error.name == "svc"
    assert error.retry_after == pytest.approx(20.0)
    assert breaker.metrics().total_rejections == 1


def test_half_open_after_reset_timeout_admits_one_probe() -> None:
    """After reset_timeout the next call is a probe; others are rejected with retry_after 0."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=timedelta(seconds=30))
    fail(breaker)
    clock.advance(29.9)
    assert breaker.state is OPEN
    clock.advance(0.1)
    probe = breaker.before_call()
    assert rejection(breaker).retry_after == 0.0
    assert breaker.state is HALF_OPEN
    breaker.on_success(probe)
    assert breaker.state is CLOSED
    assert recorder.transitions() == [
        (CLOSED, OPEN, "failure_threshold"),
        (OPEN, HALF_OPEN, "reset_timeout elapsed"),
        (HALF_OPEN, CLOSED, "probes succeeded"),
    ]


def test_reading_state_makes_the_half_open_transition() -> None:
    """The state property reports half-open once reset_timeout passed, and says so to listeners."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=1)
    fail(breaker)
    clock.advance(1)
    assert breaker.state is HALF_OPEN
    assert recorder.transitions()[-1] == (OPEN, HALF_OPEN, "reset_timeout elapsed")
    assert recorder.events[-1].at == clock.now


def test_success_threshold_probes_close_it() -> None:
    """It closes only after success_threshold successful probes, one at a time."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=1, success_threshold=3)
    fail(breaker)
    clock.advance(1)
    succeed(breaker)
    succeed(breaker)
    assert breaker.state is HALF_OPEN
    succeed(breaker)
    assert breaker.state is CLOSED


def test_a_failed_probe_reopens_for_a_full_reset_timeout() -> None:
    """Any probe failure opens it again, and the wait starts over."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=10, success_threshold=2)
    fail(breaker)
    clock.advance(10)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is OPEN
    assert rejection(breaker).retry_after == pytest.approx(10.0)
    assert recorder.transitions()[-1] == (HALF_OPEN, OPEN, "probe failed")


def test_a_slow_probe_reopens() -> None:
    """A probe slower than slow_call_duration is a failed probe."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=1, slow_call_duration=2)
    fail(breaker)
    clock.advance(1)
    succeed(breaker, 5.0, clock)
    assert breaker.state is OPEN
    assert recorder.transitions()[-1] == (HALF_OPEN, OPEN, "probe failed")


def test_probe_that_finishes_after_its_half_open_ended_is_ignored() -> None:
    """Of two probes, the first success closes it; the other failing afterwards changes nothing."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=1, half_open_max_calls=2)
    fail(breaker)
    clock.advance(1)
    first = breaker.before_call()
    second = breaker.before_call()
    breaker.on_success(first)
    assert breaker.state is CLOSED
    breaker.on_failure(second, RuntimeError("late probe"))
    assert breaker.state is CLOSED
    assert breaker.metrics().consecutive_failures == 0


class Probes:
    """Admits probes and keeps those still running, to count how many run at once."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.running: list[object] = []
        self.most = 0

    def admit_all(self) -> int:
        """Start probes until the breaker refuses one; return how many started."""
        started = 0
        while True:
            try:
                self.running.append(self.breaker.before_call())
            except CircuitOpenError:
                return started
            started += 1
            self.most = max(self.most, len(self.running))

    def fail_newest(self) -> None:
        self.breaker.on_failure(self.running.pop(), RuntimeError("probe failed"))


@pytest.mark.parametrize("limit", [2, 3])
def test_half_open_max_calls_holds_across_half_open_stays(limit: int) -> None:
    """Probes still running from earlier half-open stays keep their slots: however often the
    breaker reopens and half-opens again, no more than half_open_max_calls probes run at once."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=10, half_open_max_calls=limit)
    probes = Probes(breaker)
    fail(breaker)
    for _ in range(5):
        clock.advance(10)
        probes.admit_all()
        assert breaker.metrics().probes_in_flight == limit
        probes.fail_newest()  # reopens; the stay's other probes are still running
        assert breaker.state is OPEN
    assert probes.most == limit
    assert len(probes.running) == limit - 1
    clock.advance(10)
    assert probes.admit_all() == 1  # the only free slot


def test_a_probe_from_an_earlier_stay_frees_its_slot_however_it_ends() -> None:
    """An old probe's late success, failure or cancellation changes no state but frees its slot."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=10, half_open_max_calls=4)
    probes = Probes(breaker)
    fail(breaker)
    clock.advance(10)
    assert probes.admit_all() == 4
    probes.fail_newest()
    clock.advance(10)
    assert probes.admit_all() == 1
    newest = probes.running.pop()
    late_success, late_failure, late_abort = probes.running
    breaker.on_success(late_success)
    breaker.on_failure(late_failure, RuntimeError("late"))
    breaker.on_abort(late_abort)
    assert breaker.state is HALF_OPEN  # none of them speaks for this stay
    assert breaker.metrics().probes_in_flight == 1
    assert probes.admit_all() == 3
    breaker.on_success(newest)
    assert breaker.state is CLOSED
    assert recorder.transitions()[-1] == (HALF_OPEN, CLOSED, "probes succeeded")


@pytest.mark.parametrize("max_calls", [1, 3])
def test_threads_racing_a_half_open_breaker_admit_exactly_max_calls(max_calls: int) -> None:
    """50 threads released at once: exactly half_open_max_calls become probes, the rest are
    rejected without waiting for the probes (which are still running when they are turned away)."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=1, half_open_max_calls=max_calls)
    fail(breaker)
    clock.advance(1)
    start = threading.Barrier(50, timeout=10)
    everyone_tried = threading.Barrier(51, timeout=10)
    admitted: list[object] = []
    rejected: list[float] = []

    def caller() -> None:
        start.wait()
        try:
            ticket = breaker.before_call()
        except CircuitOpenError as error:
            rejected.append(error.retry_after)
            everyone_tried.wait()
            return
        admitted.append(ticket)
        everyone_tried.wait()  # the probe is "running" until every caller has been answered
        breaker.on_success(ticket)

    threads = [threading.Thread(target=caller) for _ in range(50)]
    for thread in threads:
        thread.start()
    everyone_tried.wait()
    assert len(admitted) == max_calls
    assert rejected == [0.0] * (50 - max_calls)
    for thread in threads:
        thread.join(timeout=10)
    assert breaker.state is CLOSED


@pytest.mark.parametrize("max_calls", [1, 3])
async def test_tasks_racing_a_half_open_breaker_admit_exactly_max_calls(max_calls: int) -> None:
    """50 asyncio tasks: exactly half_open_max_calls become probes; the rest are rejected at once
    while those probes are still awaiting."""
    breaker, clock, _ = make(failure_threshold=1, reset_timeout=1, half_open_max_calls=max_calls)
    fail(breaker)
    clock.advance(1)
    start = asyncio.Barrier(50)
    everyone_tried = asyncio.Barrier(51)
    admitted: list[object] = []
    rejected: list[float] = []

    async def caller() -> None:
        await start.wait()
        try:
            ticket = breaker.before_call()
        except CircuitOpenError as error:
            rejected.append(error.retry_after)
            await everyone_tried.wait()
            return
        admitted.append(ticket)
        await everyone_tried.wait()
        breaker.on_success(ticket)

    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(caller()) for _ in range(50)]
        await everyone_tried.wait()
        assert len(admitted) == max_calls
        assert rejected == [0.0] * (50 - max_calls)
        await asyncio.gather(*tasks)
    assert breaker.state is CLOSED


# Aborts and exclusions ---------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_abort_is_neither_success_nor_failure(interrupt: type[BaseException]) -> None:
    """A cancelled or interrupted call leaves the consecutive-failure count as it was."""
    breaker, _, _ = make(failure_threshold=2)
    fail(breaker)

    def interrupted() -> None:
        raise interrupt

    with pytest.raises(interrupt):
        drive(breaker, interrupted)
    assert breaker.metrics().consecutive_failures == 1  # not reset as a success would
    assert breaker.state is CLOSED  # not tripped as a failure would


def test_aborted_probe_frees_its_slot() -> None:
    """A cancelled probe neither closes nor re-opens the breaker, and the next caller may probe."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=1)
    fail(breaker)
    clock.advance(1)

    def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        drive(breaker, cancelled)
    assert breaker.state is HALF_OPEN
    assert breaker.metrics().probes_in_flight == 0
    assert drive(breaker, lambda: "ok") == "ok"
    assert breaker.state is CLOSED
    assert [r for _, _, r in recorder.transitions()] == [
        "failure_threshold",
        "reset_timeout elapsed",
        "probes succeeded",
    ]


def test_excluded_exception_types_count_as_success() -> None:
    """Exceptions listed in exclude are the caller's fault: they reset the failure count."""
    breaker, _, _ = make(failure_threshold=2, exclude=(KeyError, ValueError))
    for _ in range(5):
        fail(breaker, KeyError("no such user"))
    fail(breaker)
    fail(breaker, ValueError("bad input"))
    fail(breaker)
    assert breaker.state is CLOSED
    assert breaker.metrics().total_failures == 2
    fail(breaker)
    assert breaker.state is OPEN


def test_excluded_exception_type_alone() -> None:
    """A single exception type works as exclude, subclasses included."""
    breaker, _, _ = make(failure_threshold=1, exclude=LookupError)
    fail(breaker, KeyError("missing"))
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_excluded_by_predicate_counts_as_success_also_for_probes() -> None:
    """A predicate decides exclusion; an excluded probe outcome is a successful probe."""
    breaker, clock, _ = make(
        failure_threshold=1, reset_timeout=1, exclude=lambda exc: "404" in str(exc)
    )
    fail(breaker, RuntimeError("HTTP 404"))
    assert breaker.state is CLOSED
    fail(breaker, RuntimeError("HTTP 503"))
    assert breaker.state is OPEN
    clock.advance(1)
    fail(breaker, RuntimeError("HTTP 404"))
    assert breaker.state is CLOSED


def test_exclude_predicate_that_raises_is_logged_and_counts_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken exclude predicate does not break the call path; the outcome counts as a failure."""

    def broken(exc: BaseException) -> bool:
        raise AttributeError("oops")

    breaker, _, _ = make(failure_threshold=1, exclude=broken)
    with caplog.at_level(logging.ERROR, logger="resilient.breaker"):
        fail(breaker)
    assert breaker.state is OPEN
    assert any("exclude predicate" in record.getMessage() for record in caplog.records)


# Manual control ----------------------------------------------------------------------------


def test_isolate_holds_open_until_reset() -> None:
    """isolate() rejects with retry_after inf however long it lasts; reset() closes and clears."""
    breaker, clock, recorder = make(failure_threshold=2, reset_timeout=1)
    fail(breaker)
    breaker.isolate()
    breaker.isolate()  # already isolated: no second event
    clock.advance(3600)
    assert breaker.state is ISOLATED
    assert math.isinf(rejection(breaker).retry_after)
    assert math.isinf(breaker.metrics().retry_after)
    breaker.reset()
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is CLOSED  # the failure before isolate() was cleared
    assert recorder.transitions() == [
        (CLOSED, ISOLATED, "isolate()"),
        (ISOLATED, CLOSED, "reset()"),
    ]


def test_reset_clears_counters_when_already_closed_without_an_event() -> None:
    """reset() on a closed breaker clears the failure count but reports no state change."""
    breaker, _, recorder = make(failure_threshold=2)
    fail(breaker)
    breaker.reset()
    fail(breaker)
    assert breaker.state is CLOSED
    assert recorder.events == []


def test_reset_closes_an_open_breaker() -> None:
    """reset() closes an open breaker at once, without waiting for reset_timeout."""
    breaker, _, recorder = make(failure_threshold=1)
    fail(breaker)
    breaker.reset()
    assert breaker.state is CLOSED
    succeed(breaker)
    assert recorder.transitions()[-1] == (OPEN, CLOSED, "reset()")


# Listeners and metrics ---------------------------------------------------------------------


def test_listeners_see_every_state_change_in_order() -> None:
    """A full cycle produces one frozen event per change, with reasons and clock times."""
    breaker, clock, recorder = make(failure_threshold=1, reset_timeout=5)
    fail(breaker)
    clock.advance(5)
    fail(breaker)
    clock.advance(5)
    succeed(breaker)
    breaker.isolate()
    breaker.reset()
    assert recorder.transitions() == [
        (CLOSED, OPEN, "failure_threshold"),
        (OPEN, HALF_OPEN, "reset_timeout elapsed"),
        (HALF_OPEN, OPEN, "probe failed"),
        (OPEN, HALF_OPEN, "reset_timeout elapsed"),
        (HALF_OPEN, CLOSED, "probes succeeded"),
        (CLOSED, ISOLATED, "isolate()"),
        (ISOLATED, CLOSED, "reset()"),
    ]
    assert [e.at for e in recorder.events] == [
        1000.0,
        1005.0,
        1005.0,
        1010.0,
        1010.0,
        1010.0,
        1010.0,
    ]
    assert {e.name for e in recorder.events} == {"svc"}
    with pytest.raises(AttributeError):
        recorder.events[0].reason = "edited"  # type: ignore[misc]


def test_a_listener_that_raises_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A raising listener neither stops the state change, nor the call, nor later listeners."""
    clock = FakeClock()
    recorder = Recorder()

    def broken(event: BreakerEvent) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(
        name="svc", failure_threshold=1, clock=clock, listeners=[broken, recorder]
    )
    with caplog.at_level(logging.ERROR, logger="resilient.breaker"):
        fail(breaker)
    assert breaker.state is OPEN
    assert recorder.transitions() == [(CLOSED, OPEN, "failure_threshold")]
    [record] = caplog.records
    assert record.name == "resilient.breaker"
    assert "listener" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


def test_metrics_snapshot() -> None:
    """metrics() reports state, counters, window, open time and totals."""
    breaker, clock, _ = make(
        failure_threshold=3, failure_rate=0.9, window_size=10, minimum_calls=10, reset_timeout=30
    )
    succeed(breaker)
    fail(breaker)
    fail(breaker)
    metrics = breaker.metrics()
    assert metrics.name == "svc"
    assert metrics.state is CLOSED
    assert metrics.consecutive_failures == 2
    assert (metrics.window_calls, metrics.window_failures) == (3, 2)
    assert metrics.failure_rate == pytest.approx(2 / 3)
    assert metrics.opened_at is None
    assert metrics.retry_after == 0.0
    fail(breaker)
    clock.advance(12)
    rejection(breaker)
    metrics = breaker.metrics()
    assert metrics.state is OPEN
    assert metrics.opened_at == 1000.0
    assert metrics.retry_after == pytest.approx(18.0)
    assert (metrics.window_calls, metrics.failure_rate) == (0, 0.0)  # fresh counters once open
    assert (metrics.total_failures, metrics.total_rejections) == (3, 1)
    clock.advance(18)
    breaker.before_call()
    metrics = breaker.metrics()
    assert (metrics.state, metrics.probes_in_flight) == (HALF_OPEN, 1)


def test_repr_shows_name_and_state() -> None:
    """repr names the breaker and its state."""
    breaker, _, _ = make(failure_threshold=1)
    assert repr(breaker) == "CircuitBreaker(name='svc', state=closed)"
    fail(breaker)
    assert repr(breaker) == "CircuitBreaker(name='svc', state=open)"


def test_default_names_are_distinct() -> None:
    """Unnamed breakers get distinct names, so their errors and events can be told apart."""
    first, second = CircuitBreaker(), CircuitBreaker()
    assert first.name != second.name
    assert first.name.startswith("breaker-")


# Pickling ----------------------------------------------------------------------------------


def test_pickle_keeps_configuration_and_starts_closed() -> None:
    """A pickled breaker comes back with the same rules and a fresh closed state."""
    breaker, _, _ = make(
        failure_threshold=2,
        failure_rate=0.5,
        window_duration=timedelta(minutes=1),
        minimum_calls=5,
        slow_call_duration=2,
        reset_timeout=timedelta(seconds=7),
        exclude=KeyError,
    )
    trip(breaker)
    copy = pickle.loads(pickle.dumps(breaker))
    assert copy.name == "svc"
    assert copy.state is CLOSED
    fail(copy, KeyError("excluded"))
    fail(copy)
    assert copy.state is CLOSED
    fail(copy)
    assert copy.state is OPEN
    assert rejection(copy).retry_after == pytest.approx(7.0)


def test_pickle_with_default_clock_and_store() -> None:
    """The defaults (time.monotonic, InMemoryBreakerStore) pickle."""
    breaker = CircuitBreaker(name="plain", failure_threshold=1)
    fail(breaker)
    copy = pickle.loads(pickle.dumps(breaker))
    assert repr(copy) == "CircuitBreaker(name='plain', state=closed)"


@pytest.mark.parametrize(
    ("config", "culprit"),
    [
        ({"clock": lambda: 0.0}, "clock"),
        ({"listeners": [print, lambda event: None]}, "listeners[1]"),
        ({"exclude": lambda exc: False}, "exclude"),
    ],
)
def test_unpicklable_parts_make_a_clear_pickling_error(
    config: dict[str, Any], culprit: str
) -> None:
    """Pickling a breaker with a lambda names the parameter that holds it."""
    breaker = CircuitBreaker(name="svc", **config)
    with pytest.raises(pickle.PicklingError, match=rf"'svc'.*its {re.escape(culprit)} "):
        pickle.dumps(breaker)


def test_circuit_open_error_pickles() -> None:
    """The rejection crosses process boundaries with its name and retry_after."""
    breaker, _, _ = make(failure_threshold=1, reset_timeout=4)
    fail(breaker)
    error = pickle.loads(pickle.dumps(rejection(breaker)))
    assert isinstance(error, CircuitOpenError)
    assert (error.name, error.retry_after) == ("svc", 4.0)


# Configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "names"),
    [
        ({"name": 3}, TypeError, ["name"]),
        ({"name": ""}, ValueError, ["name", "empty or blank"]),
        ({"name": " \t"}, ValueError, ["name", "empty or blank"]),
        ({"failure_threshold": 0}, ValueError, ["failure_threshold"]),
        ({"failure_threshold": 2.5}, TypeError, ["failure_threshold"]),
        ({"failure_threshold": None}, ValueError, ["failure_threshold", "failure_rate"]),
        ({"failure_rate": 0}, ValueError, ["failure_rate"]),
        ({"failure_rate": 1.5}, ValueError, ["failure_rate"]),
        ({"failure_rate": "half"}, TypeError, ["failure_rate"]),
        ({"window_size": 10}, ValueError, ["window_size", "failure_rate"]),
        ({"window_duration": 10}, ValueError, ["window_duration", "failure_rate"]),
        ({"minimum_calls": 10}, ValueError, ["minimum_calls", "failure_rate"]),
        (
            {"failure_rate": 0.5, "window_size": 10, "window_duration": 10},
            ValueError,
            ["window_size", "window_duration"],
        ),
        ({"failure_rate": 0.5, "window_size": 0}, ValueError, ["window_size"]),
        ({"failure_rate": 0.5, "window_duration": 0}, ValueError, ["window_duration"]),
        ({"failure_rate": 0.5, "window_duration": "1m"}, TypeError, ["window_duration"]),
        ({"failure_rate": 0.5, "minimum_calls": 0}, ValueError, ["minimum_calls"]),
        (
            {"failure_rate": 0.5, "window_size": 5, "minimum_calls": 6},
            ValueError,
            ["minimum_calls", "window_size"],
        ),
        ({"slow_call_duration": 0}, ValueError, ["slow_call_duration"]),
        ({"slow_call_duration": -1}, ValueError, ["slow_call_duration"]),
        ({"reset_timeout": 0}, ValueError, ["reset_timeout"]),
        ({"reset_timeout": math.inf}, ValueError, ["reset_timeout"]),
        ({"reset_timeout": timedelta(seconds=-1)}, ValueError, ["reset_timeout"]),
        ({"half_open_max_calls": 0}, ValueError, ["half_open_max_calls"]),
        ({"success_threshold": 0}, ValueError, ["success_threshold"]),
        ({"exclude": "KeyError"}, TypeError, ["exclude"]),
        ({"exclude": (KeyError, int)}, TypeError, ["exclude"]),
        ({"listeners": print}, TypeError, ["listeners"]),
        ({"listeners": 3}, TypeError, ["listeners"]),
        ({"listeners": [print, 3]}, TypeError, ["listeners[1]"]),
        ({"store": "redis"}, TypeError, ["store"]),
        ({"clock": 0.0}, TypeError, ["clock"]),
    ],
)
def test_config_errors_name_the_parameter(
    config: dict[str, Any], error: type[Exception], names: list[str]
) -> None:
    """Every bad setting fails at construction with a message naming the parameter(s)."""
    with pytest.raises(error) as caught:
        CircuitBreaker(**config)
    for name in names:
        assert name in str(caught.value)


def test_config_is_keyword_only() -> None:
    """Positional configuration is refused, so call sites stay readable."""
    with pytest.raises(TypeError, match="keyword arguments only, got positional 'svc'"):
        CircuitBreaker("svc")  # type: ignore[call-arg]


def test_breaker_without_parentheses_says_to_add_them() -> None:
    """@CircuitBreaker over a function is a TypeError that shows the fix."""
    with pytest.raises(TypeError, match=r"^CircuitBreaker is a class: write @CircuitBreaker\(\)"):

        @CircuitBreaker  # type: ignore[call-arg]
        def charge() -> None: ...


def test_empty_exclude_tuple_excludes_nothing() -> None:
    """exclude=() is allowed and every exception counts as a failure."""
    breaker, _, _ = make(failure_threshold=1, exclude=())
    fail(breaker, KeyError("x"))
    assert breaker.state is OPEN


# The store ---------------------------------------------------------------------------------


def test_breaker_builds_its_store_from_the_factory_with_its_window() -> None:
    """The store factory gets the window shape and the breaker keeps all its state there."""
    built: list[InMemoryBreakerStore] = []
    specs: list[WindowSpec] = []

    def factory(window: WindowSpec) -> BreakerStore:
        specs.append(window)
        store = InMemoryBreakerStore(window)
        built.append(store)
        return store

    breaker = CircuitBreaker(failure_rate=0.5, window_size=20, store=factory, clock=FakeClock())
    assert specs == [WindowSpec(size=20)]
    fail(breaker)
    snapshot = built[0].load(0.0)
    assert (snapshot.consecutive_failures, snapshot.window_calls, snapshot.window_failures) == (
        1,
        1,
        1,
    )


def test_custom_factories_keep_working_and_for_breaker_gets_the_spec() -> None:
    """The seam: plain factories get the window; for_breaker factories get the whole spec."""
    windows: list[WindowSpec] = []

    def plain(window: WindowSpec) -> InMemoryBreakerStore:
        windows.append(window)
        return InMemoryBreakerStore(window)

    CircuitBreaker(failure_rate=0.5, window_size=7, store=plain)
    assert windows == [WindowSpec(size=7)]

    specs: list[BreakerSpec] = []

    class Named:
        def for_breaker(self, spec: BreakerSpec) -> InMemoryBreakerStore:
            specs.append(spec)
            return InMemoryBreakerStore(spec.window)

    CircuitBreaker(name="x", reset_timeout=3, half_open_max_calls=2, store=Named())
    assert specs[0].name == "x"
    assert specs[0].reset_timeout == 3.0
    assert specs[0].half_open_max_calls == 2
    with pytest.raises(TypeError, match="for_breaker"):
        CircuitBreaker(store=object())  # type: ignore[arg-type]


def test_a_store_can_be_seeded_with_a_stay_from_elsewhere() -> None:
    """A shared store's local fallback takes over the state, epoch and counts it was given."""
    store = InMemoryBreakerStore(WindowSpec(size=4))
    store.record(True, 0.0)
    store._seed(OPEN, 7, 3.5, 2, 1)
    snapshot = store.load(4.0)
    assert (snapshot.state, snapshot.epoch, snapshot.opened_at) == (OPEN, 7, 3.5)
    assert (snapshot.consecutive_failures, snapshot.probe_successes) == (2, 1)
    assert snapshot.window_calls == 0  # the window stayed where it was kept
    assert store.compare_and_set_state(7, HALF_OPEN, 5.0)


def test_store_compare_and_set_needs_the_current_epoch_and_clears_counters() -> None:
    """compare_and_set_state acts only on the epoch it names, and starts the new state fresh."""
    store = InMemoryBreakerStore(WindowSpec(size=5))
    store.record(True, 0.0)
    before = store.load(0.0)
    assert (before.state, before.consecutive_failures, before.window_calls) == (CLOSED, 1, 1)
    assert store.compare_and_set_state(before.epoch, OPEN, 5.0)
    assert not store.compare_and_set_state(before.epoch, HALF_OPEN, 6.0)
    after = store.load(6.0)
    assert (after.state, after.opened_at, after.epoch) == (OPEN, 5.0, before.epoch + 1)
    assert (after.consecutive_failures, after.window_calls, after.window_failures) == (0, 0, 0)
    assert store.state is OPEN
    assert "state=open" in repr(store)


def test_store_records_only_while_closed() -> None:
    """record counts outcomes in the closed state and refuses in any other."""
    store = InMemoryBreakerStore()
    counts = store.record(True, 0.0)
    assert counts is not None
    assert (counts.consecutive_failures, counts.window_calls) == (1, 0)  # no window configured
    store.record(False, 0.0)
    assert store.consecutive_failures == 0
    assert store.compare_and_set_state(store.load(0.0).epoch, OPEN, 0.0)
    assert store.record(True, 0.0) is None
    assert store.load(0.0).consecutive_failures == 0


def test_store_probe_slots() -> None:
    """Probes are admitted up to the limit, only in the named half-open stay; releases count."""
    store = InMemoryBreakerStore()
    closed_epoch = store.load(0.0).epoch
    assert not store.acquire_probe(closed_epoch, 1)  # not half-open
    store.compare_and_set_state(closed_epoch, HALF_OPEN, 0.0)
    epoch = store.load(0.0).epoch
    assert store.acquire_probe(epoch, 2)
    assert store.acquire_probe(epoch, 2)
    assert not store.acquire_probe(epoch, 2)
    assert not store.acquire_probe(closed_epoch, 2)  # stale epoch
    assert store.release_probe(epoch, False) == 0
    assert store.release_probe(epoch, True) == 1
    assert store.load(0.0).probes_in_flight == 0
    store.compare_and_set_state(epoch, CLOSED, 0.0)
    assert store.release_probe(epoch, True) is None  # that half-open stay is over


def test_store_probe_slots_outlast_the_stay_that_took_them() -> None:
    """A state change keeps the slots of probes still running; releasing one frees it later."""
    store = InMemoryBreakerStore()
    store.compare_and_set_state(store.load(0.0).epoch, HALF_OPEN, 0.0)
    first = store.load(0.0).epoch
    assert store.acquire_probe(first, 2)
    assert store.compare_and_set_state(first, OPEN, 1.0)
    assert store.compare_and_set_state(store.load(1.0).epoch, HALF_OPEN, 2.0)
    second = store.load(2.0).epoch
    assert store.load(2.0).probes_in_flight == 1
    assert store.acquire_probe(second, 2)
    assert not store.acquire_probe(second, 2)
    assert store.release_probe(first, True) is None  # too late to count, but the slot is free
    assert store.load(2.0).probe_successes == 0
    assert store.acquire_probe(second, 2)


def test_store_time_window_files_a_backwards_clock_under_the_newest_bucket() -> None:
    """A clock that steps back does not lose outcomes or corrupt the totals."""
    store = InMemoryBreakerStore(WindowSpec(duration=10.0))
    store.record(True, 50.0)
    store.record(False, 45.0)
    snapshot = store.load(50.0)
    assert (snapshot.window_calls, snapshot.window_failures) == (2, 1)
    snapshot = store.load(60.0)
    assert (snapshot.window_calls, snapshot.window_failures) == (0, 0)


def test_a_count_window_of_successes_counted_lock_free_still_judges_the_rate() -> None:
    """Successes with no failure in the window are counted without the lock, capped at its size.

    After 20 successes a 10-call window holds 10 of them; 4 failures make 4/10 (closed),
    the 5th makes 5/10 and trips a failure_rate=0.5 breaker.
    """
    breaker = CircuitBreaker(
        failure_threshold=None, failure_rate=0.5, window_size=10, minimum_calls=10
    )
    for _ in range(20):
        succeed(breaker)
    assert breaker.metrics().window_calls == 10
    for _ in range(4):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.metrics().window_failures == 4
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_a_time_window_forgets_successes_counted_lock_free() -> None:
    """Lock-free successes land in the newest bucket and expire with it."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate=0.5,
        window_duration=10.0,
        minimum_calls=10,
        clock=clock,
    )
    for _ in range(30):
        succeed(breaker)
    clock.advance(5.0)
    for _ in range(5):
        succeed(breaker)
    assert breaker.metrics().window_calls == 35
    clock.advance(5.0)  # the first 30 fall out with their bucket; the 5 stay
    assert breaker.metrics().window_calls == 5
    clock.advance(10.0)  # and now those too
    assert breaker.metrics().window_calls == 0
    for _ in range(5):
        succeed(breaker)
    for _ in range(4):
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED  # 9 calls: below minimum_calls
    fail(breaker)
    assert breaker.state is BreakerState.OPEN  # 5 of 10


def test_lock_free_successes_racing_failures_keep_the_window_consistent(
    frequent_thread_switches: None,
) -> None:
    """Threads counting successes lock-free while others fail never corrupt the window.

    Lost counts may make it a call or two short, never more than its size, never
    more failures than calls; and a run of failures still trips it afterwards.
    """
    breaker = CircuitBreaker(
        failure_threshold=None, failure_rate=0.9, window_size=50, minimum_calls=20
    )

    def healthy() -> None:
        with contextlib.suppress(CircuitOpenError):  # it may trip mid-run: then stop
            for _ in range(2_000):
                succeed(breaker)

    def sick() -> None:
        with contextlib.suppress(CircuitOpenError):
            for _ in range(200):
                fail(breaker)

    threads = [threading.Thread(target=healthy) for _ in range(3)]
    threads.append(threading.Thread(target=sick))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics = breaker.metrics()
    assert 0 <= metrics.window_failures <= metrics.window_calls <= 50
    for _ in range(50):
        if breaker.state is not BreakerState.CLOSED:
            break
        fail(breaker)
    assert breaker.state is BreakerState.OPEN


# The driver's inline rejection (RefusingGate) against before_call ------------------------


def _outcome(call: Callable[[], object]) -> tuple[str, float | None]:
    try:
        return ("admitted", None) if call() == "ran" else ("?", None)
    except CircuitOpenError as refused:
        return "rejected", refused.retry_after


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_drivers_inline_rejection_is_before_calls_in_every_state(asynchronous: bool) -> None:
    """Open, open past reset_timeout, isolated, half-open with its probe out: same verdict."""

    async def ran_async() -> str:
        return "ran"

    def through_driver(breaker: CircuitBreaker) -> Callable[[], object]:
        if asynchronous:
            return lambda: asyncio.run(breaker.acall(ran_async))
        return lambda: breaker.call(lambda: "ran")

    def through_before_call(breaker: CircuitBreaker) -> Callable[[], object]:
        return lambda: drive(breaker, lambda: "ran")

    seen = []
    for caller in (through_driver, through_before_call):
        breaker, clock, recorder = make(failure_threshold=1, reset_timeout=30)
        call = caller(breaker)
        trip(breaker)
        clock.advance(10.0)
        verdicts = [_outcome(call)]  # open: rejected, 20 s to go
        breaker.isolate()
        verdicts.append(_outcome(call))  # isolated: rejected, for ever
        breaker.reset()
        trip(breaker)
        clock.advance(30.0)
        probe = breaker.before_call()  # open past reset_timeout: the probe goes out
        verdicts.append(_outcome(call))  # half-open, its one probe taken: rejected
        breaker.on_success(probe)
        verdicts.append(_outcome(call))  # closed again
        seen.append((verdicts, breaker.metrics().total_rejections, recorder.transitions()))
    assert seen[0] == seen[1]
    assert seen[0][0] == [
        ("rejected", 20.0),
        ("rejected", math.inf),
        ("rejected", 0.0),
        ("admitted", None),
    ]


def test_a_subclass_deciding_calls_itself_is_asked_by_the_driver() -> None:
    """Overriding before_call/on_success turns off the plain-read paths that would skip them."""
    asked: list[str] = []

    class Audited(CircuitBreaker):
        __slots__ = ()

        def before_call(self) -> object:
            asked.append("before_call")
            return super().before_call()

        def on_success(self, ticket: object) -> None:
            asked.append("on_success")
            super().on_success(ticket)

    breaker = Audited(failure_threshold=1, reset_timeout=60)
    assert breaker.quiet() is None
    assert breaker.refusing() is None
    assert breaker.call(lambda: "ok") == "ok"
    with pytest.raises(ConnectionError):
        breaker.call(_raise_connection_error)
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "never")
    assert asked == ["before_call", "on_success", "before_call", "before_call"]
    assert CircuitBreaker(failure_threshold=1).refusing() is not None


def _raise_connection_error() -> None:
    raise ConnectionError("down")
