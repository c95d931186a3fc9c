"""Tests for resilient.retry: backoff, the retry budget, and the retry decision core.

The core is driven directly, the way resilient.Policy drives it, with a fake
clock and a fixed random source; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import logging
import math
import pickle
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta

import pytest
import tenacity
from hypothesis import assume, given
from hypothesis import strategies as st

import resilient
from resilient import _driver
from resilient._driver import refuse_generators
from resilient.deadline import deadline, deadline_at
from resilient.errors import DeadlineExceeded
from resilient.retry import (
    Attempt,
    Backoff,
    Retry,
    RetryBudget,
    RetryEvent,
    instant_retries,
)
from resilient.testing import FakeClock, record_sleeps


def fixed(value: float):  # type: ignore[no-untyped-def]
    """A random source that always returns ``value``."""
    return lambda: value


def failures(retry: Retry, exc: BaseException, *, now: float = 0.0) -> list[float | None]:
    """Feed ``exc`` to a fresh state until the core stops; return every decision."""
    state = retry.begin(now)
    decisions: list[float | None] = []
    while True:
        delay = retry.next_delay(state, now=now, deadline=math.inf, error=exc)
        decisions.append(delay)
        if delay is None or len(decisions) > 50:
            return decisions


# Backoff ----------------------------------------------------------------------------


def test_backoff_without_jitter_grows_exponentially_up_to_max_delay() -> None:
    """jitter='none' waits initial * multiplier**(n-1), never decreasing, capped at max_delay."""
    backoff = Backoff(initial=0.5, multiplier=3.0, max_delay=10.0, jitter="none")
    delays = [backoff.delay(n, 0.0, fixed(0.7)) for n in range(1, 7)]
    assert delays == [0.5, 1.5, 4.5, 10.0, 10.0, 10.0]
    assert delays == sorted(delays)


def test_full_jitter_is_uniform_between_zero_and_the_exponential_value() -> None:
    """jitter='full' scales the exponential value by the random draw, so 0 <= wait < value."""
    backoff = Backoff(initial=1.0, multiplier=2.0, max_delay=100.0, jitter="full")
    assert backoff.delay(3, 0.0, fixed(0.0)) == 0.0
    assert backoff.delay(3, 0.0, fixed(0.25)) == 1.0
    assert backoff.delay(3, 0.0, fixed(0.999)) == pytest.approx(3.996)


def test_equal_jitter_keeps_at_least_half_the_exponential_value() -> None:
    """jitter='equal' waits half the exponential value plus a random share of the other half."""
    backoff = Backoff(initial=1.0, multiplier=2.0, max_delay=100.0, jitter="equal")
    assert backoff.delay(3, 0.0, fixed(0.0)) == 2.0
    assert backoff.delay(3, 0.0, fixed(0.5)) == 3.0
    assert backoff.delay(3, 0.0, fixed(0.999)) < 4.0


def test_decorrelated_jitter_grows_from_three_times_the_previous_wait() -> None:
    """jitter='decorrelated' draws between initial and 3 * previous, capped at max_delay."""
    backoff = Backoff(initial=1.0, max_delay=20.0, jitter="decorrelated")
    # Before the first retry there is no previous wait: the range is [initial, 3 * initial].
    assert backoff.delay(1, 0.0, fixed(0.0)) == 1.0
    assert backoff.delay(1, 0.0, fixed(0.5)) == 2.0
    assert backoff.delay(2, 4.0, fixed(0.5)) == 6.5  # 1 + 0.5 * (12 - 1)
    assert backoff.delay(5, 15.0, fixed(0.9)) == 20.0  # 1 + 0.9 * 44, capped
    assert backoff.delay(5, 15.0, fixed(0.0)) == 1.0  # attempt and multiplier play no part


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated", "none"])
@pytest.mark.parametrize("attempt", [10_000, 10**9])
def test_huge_attempt_numbers_neither_overflow_nor_exceed_max_delay(
    jitter: str, attempt: int
) -> None:
    """The exponent is capped, so attempt 10**9 yields a wait within max_delay, not an error."""
    backoff = Backoff(initial=0.1, multiplier=2.0, max_delay=30.0, jitter=jitter)  # type: ignore[arg-type]
    delay = backoff.delay(attempt, 30.0, fixed(0.999999))
    assert 0.0 <= delay <= 30.0
    assert delay > 29.0  # the exponential value has reached the cap long ago


def test_extreme_growth_settings_do_not_overflow() -> None:
    """Even when multiplier**n overflows before reaching max_delay, the wait is max_delay."""
    backoff = Backoff(initial=1e-300, multiplier=1e200, max_delay=1e300, jitter="none")
    assert backoff.delay(2, 0.0, fixed(0.5)) == pytest.approx(1e-100)
    assert backoff.delay(4, 0.0, fixed(0.5)) == 1e300
    assert backoff.delay(10**9, 0.0, fixed(0.5)) == 1e300
    decorrelated = Backoff(initial=1.0, max_delay=1e308, jitter="decorrelated")
    assert decorrelated.delay(2, 1e308, fixed(0.5)) <= 1e308


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated", "none"])
@pytest.mark.parametrize("draw", [-0.5, 1.5, math.nan])
def test_a_misbehaving_random_source_cannot_break_the_bounds(jitter: str, draw: float) -> None:
    """Draws outside [0, 1), or NaN, still give a wait between 0 and max_delay."""
    backoff = Backoff(initial=1.0, multiplier=2.0, max_delay=5.0, jitter=jitter)  # type: ignore[arg-type]
    for attempt in (0, 1, 2, 5):
        assert 0.0 <= backoff.delay(attempt, 4.0, fixed(draw)) <= 5.0


def test_zero_initial_backoff_never_waits() -> None:
    """initial=0 means no waiting (multiplying zero stays zero), for every attempt."""
    backoff = Backoff(initial=0, jitter="none")
    assert [backoff.delay(n, 0.0, fixed(0.5)) for n in (1, 2, 10**9)] == [0.0, 0.0, 0.0]


@given(
    initial=st.floats(min_value=0.0, max_value=1e6),
    multiplier=st.floats(min_value=1.0, max_value=1e6),
    extra=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.sampled_from(["full", "equal", "decorrelated", "none"]),
    attempt=st.integers(min_value=-5, max_value=10**12),
    previous=st.floats(min_value=0.0, max_value=1e308),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_delay_is_always_between_zero_and_max_delay(
    initial: float,
    multiplier: float,
    extra: float,
    jitter: str,
    attempt: int,
    previous: float,
    draw: float,
) -> None:
    """For any valid settings and any attempt, the wait is in [0, max_delay] and finite."""
    assume(not (jitter == "decorrelated" and initial == 0.0))
    backoff = Backoff(
        initial=initial,
        multiplier=multiplier,
        max_delay=initial + extra,
        jitter=jitter,  # type: ignore[arg-type]
    )
    delay = backoff.delay(attempt, previous, fixed(draw))
    assert 0.0 <= delay <= backoff.max_delay


@given(
    initial=st.floats(min_value=1e-6, max_value=10.0),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=1e4),
)
def test_backoff_without_jitter_never_shrinks(
    initial: float, multiplier: float, extra: float
) -> None:
    """Without jitter each retry waits at least as long as the one before."""
    backoff = Backoff(
        initial=initial, multiplier=multiplier, max_delay=initial + extra, jitter="none"
    )
    delays = [backoff.delay(n, 0.0, fixed(0.5)) for n in range(1, 80)]
    assert delays == sorted(delays)


def test_backoff_accepts_timedelta_and_is_frozen() -> None:
    """Durations may be timedeltas; the object cannot be changed after construction."""
    backoff = Backoff(initial=timedelta(milliseconds=250), max_delay=timedelta(seconds=2))
    assert (backoff.initial, backoff.max_delay) == (0.25, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backoff.initial = 1.0  # type: ignore[misc]
    assert backoff == Backoff(initial=0.25, max_delay=2)
    assert "initial=0.25" in repr(backoff)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"initial": -1}, ValueError, r"initial must not be negative, got -1"),
        ({"initial": "1"}, TypeError, r"initial must be seconds"),
        ({"multiplier": 0.5}, ValueError, r"multiplier must be between 1 and .*got 0\.5"),
        ({"multiplier": math.inf}, ValueError, r"multiplier must be a finite number"),
        ({"initial": 5, "max_delay": 1}, ValueError, r"max_delay must be at least initial.*got 1"),
        ({"max_delay": math.inf}, ValueError, r"max_delay must be finite"),
        ({"jitter": "gaussian"}, ValueError, r"jitter must be one of .*'full'.*got 'gaussian'"),
        ({"jitter": None}, TypeError, r"jitter must be a string, got NoneType"),
        (
            {"initial": 0, "jitter": "decorrelated"},
            ValueError,
            r"initial must be greater than zero with jitter='decorrelated'",
        ),
    ],
)
def test_backoff_config_errors_name_the_parameter(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    """Each bad Backoff setting fails at construction with a message naming it."""
    with pytest.raises(error, match=pattern):
        Backoff(**kwargs)  # type: ignore[arg-type]


# Retry budget -----------------------------------------------------------------------


def test_budget_reserve_allows_min_retries_per_second_times_window() -> None:
    """With no calls at all, min_retries_per_second * window retries are allowed."""
    budget = RetryBudget(ratio=0.2, min_retries_per_second=1, window=5.0)
    assert [budget.try_withdraw(0.0) for _ in range(6)] == [True] * 5 + [False]


def test_budget_allows_ratio_of_calls_in_the_window() -> None:
    """Each call deposits `ratio` of a retry: 10 calls at 20% allow exactly 2 retries."""
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0, window=10.0)
    for _ in range(10):
        budget.deposit(1.0)
    assert budget.available(1.0) == 2
    assert [budget.try_withdraw(1.5) for _ in range(3)] == [True, True, False]
    assert budget.available(1.5) == 0


def test_budget_allowance_is_not_lost_to_float_rounding() -> None:
    """0.29 * 100 calls allow 29 retries, although the product rounds to 28.999..."""
    budget = RetryBudget(ratio=0.29, min_retries_per_second=0)
    for _ in range(100):
        budget.deposit(0.0)
    assert budget.available(0.0) == 29


def test_budget_old_calls_and_retries_expire_slice_by_slice() -> None:
    """Calls older than the window stop earning retries; spent retries stop counting too."""
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0, window=10.0)
    for _ in range(4):
        budget.deposit(0.5)  # slice [0, 1)
    for _ in range(2):
        budget.deposit(5.5)  # slice [5, 6)
    assert budget.available(9.9) == 3
    # At 10.0 the ring moves to slice [10, 11), which reuses the oldest one: its 4 calls go.
    assert budget.available(10.0) == 1
    assert budget.try_withdraw(10.0)
    assert not budget.try_withdraw(10.0)
    # Much later everything has expired: nothing earned, nothing spent.
    assert budget.available(100.0) == 0
    for _ in range(2):
        budget.deposit(100.0)
    assert budget.try_withdraw(100.0)


def test_budget_spent_retries_expire_with_their_slice() -> None:
    """Retries spent more than a window ago stop counting against the budget."""
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.5, window=10.0)
    assert [budget.try_withdraw(0.5) for _ in range(6)] == [True] * 5 + [False]
    assert not budget.try_withdraw(5.0)
    assert budget.available(9.9) == 0
    assert budget.available(10.0) == 5


def test_budget_skipping_a_few_slices_clears_only_those() -> None:
    """Moving on by less than a window keeps the slices still inside it."""
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0, window=10.0)
    budget.deposit(0.0)
    budget.deposit(3.0)
    budget.deposit(6.0)
    assert budget.available(6.0) == 3
    assert budget.available(13.5) == 1  # slices [0,1) and [3,4) expired, [6,7) remains


def test_budget_call_at_a_slice_end_lands_in_the_next_slice_despite_rounding() -> None:
    """A call exactly at a slice's end counts in the next slice even when now / width rounds down.

    With 0.1 s slices, 4.3 / 0.1 == 42.99999999999999 although 4.3 is where slice 42 ends.
    """
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0, window=1.0)
    budget.deposit(4.25)  # slice 42
    budget.deposit(4.3)  # slice 43
    assert budget.available(5.25) == 1  # slice 42 has expired, slice 43 has not


def test_budget_available_reads_its_clock_when_not_given_now() -> None:
    """available() without `now` uses the budget's clock."""
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0, window=1.0, clock=clock)
    budget.deposit(0.0)
    assert budget.available() == 1
    clock.now = 5.0
    assert budget.available() == 0
    assert budget.clock is clock


def test_budget_exposes_its_settings() -> None:
    """The settings are readable, window accepts a timedelta, and repr shows them."""
    budget = RetryBudget(ratio=0.1, min_retries_per_second=2, window=timedelta(seconds=30))
    assert (budget.ratio, budget.min_retries_per_second, budget.window) == (0.1, 2.0, 30.0)
    assert repr(budget) == "RetryBudget(ratio=0.1, min_retries_per_second=2, window=30)"


def test_budget_counts_deposits_from_many_threads_without_over_counting() -> None:
    """Lock-free deposits may lose an increment under a race but never invent one."""
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0, window=10.0)

    def deposit_many() -> None:
        for _ in range(2000):
            budget.deposit(1.0)

    threads = [threading.Thread(target=deposit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0 < budget.available(1.0) <= 8000


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"ratio": -0.1}, ValueError, r"ratio must be between 0 and"),
        ({"ratio": "0.2"}, TypeError, r"ratio must be a number"),
        ({"min_retries_per_second": -1}, ValueError, r"min_retries_per_second must be between"),
        ({"window": 0}, ValueError, r"window must be greater than zero"),
        ({"clock": 5}, TypeError, r"clock must be a callable"),
    ],
)
def test_budget_config_errors_name_the_parameter(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    """Each bad RetryBudget setting fails at construction with a message naming it."""
    with pytest.raises(error, match=pattern):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


# Retry: attempts, predicates, waits -------------------------------------------------


def test_attempts_counts_total_tries() -> None:
    """attempts=3 allows two retries; the third failure stops with 'attempts exhausted'."""
    retry = Retry(attempts=3, backoff=Backoff(initial=1.0, jitter="none"), budget=None)
    state = retry.begin(0.0)
    exc = ConnectionError("down")
    assert retry.next_delay(state, now=0.0, error=exc) == 1.0
    assert retry.next_delay(state, now=1.0, error=exc) == 2.0
    assert retry.next_delay(state, now=3.0, error=exc) is None
    assert (state.attempt, state.waited, state.stop_reason) == (3, 3.0, "attempts exhausted")


def test_one_attempt_means_no_retries() -> None:
    """attempts=1 never retries, even a retryable error."""
    assert failures(Retry(attempts=1), ConnectionError()) == [None]


def test_default_is_three_attempts_retrying_any_exception() -> None:
    """Retry() retries any Exception, up to 3 attempts in total."""
    retry = Retry(random=fixed(0.5))
    decisions = failures(retry, LookupError())
    assert decisions == [0.05, 0.1, None]


@pytest.mark.parametrize(
    "on",
    [
        ConnectionError,
        (KeyError, ConnectionError),
        lambda exc: "retry me" in str(exc),
        tenacity.retry_if_exception_type(ConnectionError),
        tenacity.retry_if_exception_message(match="retry me"),
    ],
)
def test_every_form_of_on_selects_retryable_exceptions(on: object) -> None:
    """on= as a type, tuple, predicate or tenacity strategy retries matching errors only."""
    retry = Retry(attempts=2, on=on, budget=None, random=fixed(0.5))  # type: ignore[arg-type]
    assert failures(retry, ConnectionError("retry me")) == [0.05, None]
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=ValueError("no")) is None
    assert state.stop_reason == "not retryable"


@pytest.mark.parametrize(
    "on_result",
    [lambda value: value is None, tenacity.retry_if_result(lambda value: value is None)],
)
def test_on_result_retries_matching_return_values(on_result: object) -> None:
    """on_result (predicate or tenacity strategy) retries unwanted results, not others."""
    retry = Retry(attempts=3, on_result=on_result, budget=None, random=fixed(0.5))  # type: ignore[arg-type]
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, result=None) == 0.05
    assert retry.next_delay(state, now=0.1, result="ok") is None
    assert state.stop_reason == "not retryable"
    exhausted = retry.begin(0.0)
    assert [retry.next_delay(exhausted, now=0.0, result=None) for _ in range(3)] == [
        0.05,
        0.1,
        None,
    ]
    assert exhausted.stop_reason == "attempts exhausted"


def test_results_are_not_retried_without_on_result() -> None:
    """With on_result=None a returned value is never a reason to retry."""
    retry = Retry()
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, result=None) is None
    assert retry.on_result is None


def test_tenacity_exception_strategy_does_not_retry_results() -> None:
    """A tenacity exception strategy given as on_result sees a successful outcome: no retry."""
    retry = Retry(on_result=tenacity.retry_if_exception_type(), budget=None)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, result=None) is None


@pytest.mark.parametrize(
    "exc",
    [
        KeyboardInterrupt(),
        SystemExit(1),
        GeneratorExit(),
        asyncio.CancelledError(),
    ],
)
@pytest.mark.parametrize(
    "on", [BaseException, lambda exc: True, tenacity.retry_always, (BaseException,)]
)
def test_base_exceptions_are_never_retried(exc: BaseException, on: object) -> None:
    """Cancellation and interpreter exits are refused whatever `on` says."""
    retry = Retry(on=on)  # type: ignore[arg-type]
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=exc) is None
    assert state.stop_reason == "not retryable"
    retry.give_up(state, exc)
    assert not getattr(exc, "__notes__", [])


def test_tenacity_wait_fixed_and_wait_exponential_set_the_delays() -> None:
    """wait= uses tenacity's wait strategy, with tenacity's attempt numbering."""
    fixed_wait = Retry(attempts=3, wait=tenacity.wait_fixed(0.3), budget=None)
    assert failures(fixed_wait, OSError()) == [0.3, 0.3, None]
    exponential = Retry(
        attempts=5, wait=tenacity.wait_exponential(multiplier=0.5, max=3), budget=None
    )
    assert exponential.backoff is None
    assert failures(exponential, OSError()) == [0.5, 1.0, 2.0, 3.0, None]


def test_tenacity_stop_after_attempt_replaces_the_attempts_default() -> None:
    """With stop= and no attempts=, the stop strategy alone decides when to stop."""
    retry = Retry(stop=tenacity.stop_after_attempt(5), random=fixed(0.0), budget=None)
    assert retry.attempts is None
    decisions = failures(retry, OSError())
    assert decisions == [0.0, 0.0, 0.0, 0.0, None]


def test_attempts_none_means_no_limit_with_a_stop_strategy() -> None:
    """attempts=None passed explicitly with stop= leaves the limit to the stop strategy."""
    retry = Retry(attempts=None, stop=tenacity.stop_after_attempt(3), random=fixed(0.0))
    assert failures(retry, OSError()) == [0.0, 0.0, None]


def test_attempts_and_stop_both_apply_when_both_given() -> None:
    """attempts= passed explicitly keeps applying next to stop=; the first to stop wins."""
    retry = Retry(attempts=2, stop=tenacity.stop_after_attempt(5), random=fixed(0.0))
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=OSError()) == 0.0
    assert retry.next_delay(state, now=0.0, error=OSError()) is None
    assert state.stop_reason == "attempts exhausted"


def test_tenacity_stop_after_delay_counts_from_the_state_start_on_the_retry_clock() -> None:
    """stop_after_delay measures seconds since _new_state(started), on the injected clock."""
    retry = Retry(stop=tenacity.stop_after_delay(10), wait=tenacity.wait_fixed(1), budget=None)
    state = retry.begin(100.0)
    assert retry.next_delay(state, now=105.0, error=OSError()) == 1.0
    assert retry.next_delay(state, now=109.9, error=OSError()) == 1.0
    assert retry.next_delay(state, now=110.0, error=OSError()) is None
    assert state.stop_reason == "stop condition"


def test_tenacity_strategies_see_a_faithful_call_state() -> None:
    """A tenacity strategy sees attempt number, outcome, idle time, upcoming sleep, elapsed."""
    seen: list[tuple[object, ...]] = []

    class Recording(tenacity.stop.stop_base):
        def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
            outcome = retry_state.outcome
            assert outcome is not None
            seen.append(
                (
                    retry_state.attempt_number,
                    outcome.failed,
                    outcome.exception() if outcome.failed else outcome.result(),
                    retry_state.idle_for,
                    retry_state.upcoming_sleep,
                    retry_state.seconds_since_start,
                    isinstance(retry_state.retry_object, tenacity.BaseRetrying),
                )
            )
            return False

    error = OSError("boom")
    retry = Retry(
        attempts=3,
        on_result=lambda value: value == "again",
        stop=Recording(),
        wait=tenacity.wait_fixed(2),
        budget=None,
    )
    state = retry.begin(10.0)
    assert retry.next_delay(state, now=11.0, error=error) == 2.0
    assert retry.next_delay(state, now=14.0, result="again") == 2.0
    assert seen == [
        (1, True, error, 0.0, 2.0, 1.0, True),
        (2, False, "again", 2.0, 2.0, 4.0, True),
    ]


def test_a_wait_strategy_returning_a_negative_wait_is_reported() -> None:
    """A wait strategy must return finite seconds >= 0; anything else is a ValueError."""
    retry = Retry(wait=tenacity.wait_fixed(-1), budget=None)
    state = retry.begin(0.0)
    with pytest.raises(ValueError, match=r"wait strategy .*wait_fixed.* returned -1\.0"):
        retry.next_delay(state, now=0.0, error=OSError())


def test_decorrelated_jitter_grows_from_this_call_previous_wait() -> None:
    """The Retry feeds each call's own previous wait to decorrelated jitter."""
    retry = Retry(
        attempts=4,
        backoff=Backoff(initial=1.0, max_delay=100.0, jitter="decorrelated"),
        random=fixed(0.5),
        budget=None,
    )
    assert failures(retry, OSError()) == [2.0, 3.5, 5.75, None]


def test_per_call_states_are_independent_when_interleaved() -> None:
    """Two calls failing at the same time keep their own attempt counts and waits."""
    retry = Retry(
        attempts=3,
        backoff=Backoff(initial=1.0, jitter="decorrelated", max_delay=100.0),
        random=fixed(0.5),
        budget=None,
    )
    first, second = retry.begin(0.0), retry.begin(0.0)
    assert retry.next_delay(first, now=0.0, error=OSError()) == 2.0
    assert retry.next_delay(first, now=2.0, error=OSError()) == 3.5
    assert retry.next_delay(second, now=2.0, error=OSError()) == 2.0
    assert retry.next_delay(first, now=5.5, error=OSError()) is None
    assert retry.next_delay(second, now=5.5, error=OSError()) == 3.5
    assert (first.attempt, first.waited) == (3, 5.5)
    assert (second.attempt, second.waited) == (2, 5.5)
    assert second.stop_reason is None
    assert repr(first) == "<RetryState attempt=3 waited=5.5 stop_reason='attempts exhausted'>"


# Deadline and budget ------------------------------------------------------------------


def test_a_wait_that_would_end_at_or_after_the_deadline_stops_now() -> None:
    """The core never grants a wait that ends at or after the deadline: it stops at once."""
    budget = RetryBudget(min_retries_per_second=1, window=10.0)
    retry = Retry(attempts=5, backoff=Backoff(initial=1.0, jitter="none"), budget=budget)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, deadline=1.5, error=OSError()) == 1.0
    assert retry.next_delay(state, now=1.0, deadline=3.0, error=OSError()) is None
    assert state.stop_reason == "deadline"
    assert budget.available(1.0) == 9  # the refused retry took nothing from the budget


def test_exhausted_budget_stops_retries_at_once() -> None:
    """When the shared budget is spent, the next failure is not retried."""
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0)
    retry = Retry(attempts=10, budget=budget, random=fixed(0.0))
    retry.count_call(0.0)
    retry.count_call(0.0)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=OSError()) == 0.0
    assert retry.next_delay(state, now=0.0, error=OSError()) is None
    assert state.stop_reason == "retry budget exhausted"


def test_budget_is_shared_by_calls_through_the_same_retry_only() -> None:
    """The default budget belongs to one Retry: its calls share it, another Retry has its own."""
    clock = FakeClock(0.0)
    retry = Retry(attempts=1000, clock=clock, random=fixed(0.0))
    other = Retry()
    assert retry.budget is not None
    assert retry.budget is not other.budget
    assert retry.budget.clock is clock
    # Default budget: 10 retries/s over 10 s, and nothing earned from calls yet.
    granted = 0
    for _ in range(200):
        state = retry.begin(0.0)
        if retry.next_delay(state, now=0.0, error=OSError()) is not None:
            granted += 1
    assert granted == 100


def test_admit_without_a_budget_does_nothing() -> None:
    """budget=None disables the budget; count_call still works and retries are unlimited by it."""
    retry = Retry(attempts=500, budget=None, random=fixed(0.0))
    retry.count_call(0.0)
    decisions = failures(retry, OSError())
    assert len(decisions) == 51  # failures() gives up after 50 retries


# Notes ----------------------------------------------------------------------------------


def test_give_up_notes_how_many_attempts_and_how_long() -> None:
    """Running out of attempts adds a note with the count, the time waited and the reason."""
    retry = Retry(attempts=3, backoff=Backoff(initial=0.1, jitter="none"), budget=None)
    exc = ConnectionError("down")
    state = retry.begin(0.0)
    while retry.next_delay(state, now=0.0, error=exc) is not None:
        pass
    retry.give_up(state, exc)
    assert exc.__notes__ == [
        "resilient.Retry: gave up after 3 attempts (0.30 s waiting in total): "
        "attempts exhausted (attempts=3)"
    ]


@pytest.mark.parametrize(
    ("retry", "deadline", "expected"),
    [
        (
            Retry(attempts=1),
            math.inf,
            "gave up after 1 attempt (0.00 s waiting in total): attempts exhausted (attempts=1)",
        ),
        (
            Retry(budget=RetryBudget(ratio=0, min_retries_per_second=0)),
            math.inf,
            "retry budget exhausted: too many recent calls through this Retry were retried "
            "(RetryBudget(ratio=0, min_retries_per_second=0, window=10))",
        ),
        (Retry(), 0.0, "the deadline would pass before the next attempt could start"),
        (
            Retry(stop=tenacity.stop_after_attempt(1)),
            math.inf,
            "the stop strategy tenacity.stop.stop_after_attempt(...) said to stop",
        ),
    ],
)
def test_give_up_note_says_why_retrying_stopped(
    retry: Retry, deadline: float, expected: str
) -> None:
    """Each way of running out (attempts, budget, deadline, stop strategy) is named."""
    exc = OSError()
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, deadline=deadline, error=exc) is None
    retry.give_up(state, exc)
    assert len(exc.__notes__) == 1
    assert exc.__notes__[0].startswith("resilient.Retry: gave up after 1 attempt")
    assert exc.__notes__[0].endswith(expected)


def test_no_note_when_the_first_failure_is_not_retryable() -> None:
    """An error that was never retryable propagates untouched."""
    retry = Retry(on=ConnectionError)
    exc = ValueError("bad input")
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=exc) is None
    retry.give_up(state, exc)
    assert not hasattr(exc, "__notes__")


def test_note_when_a_later_failure_is_not_retryable() -> None:
    """After retries, a non-retryable error still says how many attempts were made."""
    retry = Retry(on=ConnectionError, random=fixed(0.5), budget=None)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=ConnectionError()) == 0.05
    exc = ValueError("bad input")
    assert retry.next_delay(state, now=0.0, error=exc) is None
    retry.give_up(state, exc)
    assert exc.__notes__ == [
        "resilient.Retry: gave up after 2 attempts (0.05 s waiting in total): "
        "ValueError is not retryable (on=ConnectionError)"
    ]


def test_give_up_after_a_granted_wait_blames_the_deadline() -> None:
    """When the driver gives up although the core granted a wait, the deadline passed."""
    retry = Retry(random=fixed(0.5))
    state = retry.begin(0.0)
    exc = OSError()
    assert retry.next_delay(state, now=0.0, error=exc) == 0.05
    retry.give_up(state, exc)
    assert exc.__notes__ == [
        "resilient.Retry: gave up after 1 attempt (0.05 s waiting in total): "
        "the deadline would pass before the next attempt could start"
    ]


# Hooks ----------------------------------------------------------------------------------


def test_on_retry_hooks_receive_a_frozen_event_before_each_wait() -> None:
    """Every hook gets a RetryEvent per retry, in order; none when the core gives up."""
    events: list[RetryEvent] = []
    also: list[int] = []
    retry = Retry(
        attempts=3,
        on_result=lambda value: value == "bad",
        on_retry=[events.append, lambda event: also.append(event.attempt)],
        backoff=Backoff(initial=1.0, jitter="none"),
        budget=None,
    )
    error = OSError("first")
    state = retry.begin(10.0)
    assert retry.next_delay(state, now=10.5, error=error) == 1.0
    assert retry.next_delay(state, now=12.0, result="bad") == 2.0
    assert retry.next_delay(state, now=14.0, error=error) is None
    assert events == [
        RetryEvent(attempt=1, delay=1.0, exception=error, result=None, elapsed=0.5),
        RetryEvent(attempt=2, delay=2.0, exception=None, result="bad", elapsed=2.0),
    ]
    assert also == [1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].delay = 0.0  # type: ignore[misc]


def test_a_failing_hook_propagates() -> None:
    """An exception raised by a hook reaches the caller instead of being swallowed."""

    def broken(event: RetryEvent) -> None:
        raise RuntimeError("hook bug")

    retry = Retry(on_retry=broken)
    with pytest.raises(RuntimeError, match="hook bug"):
        retry.next_delay(retry.begin(0.0), now=0.0, error=OSError())


# instant_retries ----------------------------------------------------------------------


def test_instant_retries_makes_every_wait_zero_but_keeps_the_rules() -> None:
    """Inside instant_retries() waits are 0; attempts still apply; afterwards waits return."""
    retry = Retry(attempts=3, backoff=Backoff(initial=5.0, jitter="none"), budget=None)
    tenacious = Retry(attempts=2, wait=tenacity.wait_fixed(7), budget=None)
    with instant_retries():
        assert failures(retry, OSError()) == [0.0, 0.0, None]
        with instant_retries():
            assert failures(tenacious, OSError()) == [0.0, None]
        assert failures(tenacious, OSError()) == [0.0, None]
    assert failures(retry, OSError()) == [5.0, 10.0, None]


def test_instant_retries_applies_to_other_threads_and_keeps_the_deadline() -> None:
    """The switch is process-wide; an already-passed deadline still stops retries."""
    retry = Retry(backoff=Backoff(initial=5.0, jitter="none"), budget=None)
    seen: list[float | None] = []

    def worker() -> None:
        state = retry.begin(0.0)
        seen.append(retry.next_delay(state, now=0.0, deadline=1.0, error=OSError()))
        seen.append(retry.next_delay(state, now=1.0, deadline=1.0, error=OSError()))

    with instant_retries():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == [0.0, None]


# Generators -----------------------------------------------------------------------------


def generate() -> Iterator[int]:
    yield 1


async def agenerate() -> AsyncIterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("fn", "kind"),
    [(generate, "a generator function"), (agenerate, "an async generator function")],
)
def test_generators_are_refused_because_retrying_would_replay_items(
    fn: Callable[[], object], kind: str
) -> None:
    """Retry() and refuse_generators refuse generator functions, saying why."""
    name = fn.__qualname__
    with pytest.raises(TypeError, match=rf"^Retry cannot wrap {name}: it is {kind}, .*replay"):
        Retry()(fn)
    with pytest.raises(TypeError, match=rf"^Policy cannot wrap {name}: it is {kind}"):
        refuse_generators(fn, "Policy")


def test_regular_and_coroutine_functions_are_not_refused() -> None:
    """Plain functions and coroutine functions pass the generator check."""

    async def coroutine() -> int:
        return 1

    refuse_generators(len, "Retry")
    refuse_generators(coroutine, "Retry")


# Configuration ---------------------------------------------------------------------------


def not_a_wait(retry_state: object) -> float:
    return 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"attempts": 0}, ValueError, r"attempts must be at least 1, got 0"),
        ({"attempts": 2.5}, TypeError, r"attempts must be an int, got float"),
        ({"attempts": None}, ValueError, r"attempts=None \(no limit\) needs a stop strategy"),
        ({"on": int}, TypeError, r"on must be an exception type, got the class <class 'int'>"),
        ({"on": ()}, ValueError, r"on must name at least one exception type, got \(\)"),
        ({"on": (ValueError, "x")}, TypeError, r"on must be a tuple of exception types.*'x'"),
        ({"on": 42}, TypeError, r"on must be an exception type, .* got 42"),
        ({"on_result": 42}, TypeError, r"on_result must be a predicate .* got 42"),
        ({"on_result": ValueError}, TypeError, r"on_result must be a predicate"),
        ({"backoff": 1.0}, TypeError, r"backoff must be a resilient.Backoff, got 1.0"),
        ({"wait": not_a_wait}, TypeError, r"wait must be a tenacity wait strategy"),
        (
            {"wait": tenacity.wait_fixed(1), "backoff": Backoff()},
            ValueError,
            r"give backoff or wait, not both: got backoff=Backoff\(",
        ),
        ({"stop": lambda state: True}, TypeError, r"stop must be a tenacity stop strategy"),
        ({"budget": 0.2}, TypeError, r"budget must be a resilient.RetryBudget or None, got 0.2"),
        ({"on_retry": 42}, TypeError, r"on_retry must be a callable .* got 42"),
        ({"on_retry": [print, 42]}, TypeError, r"on_retry must be a callable .* got \["),
        ({"clock": 0}, TypeError, r"clock must be a callable returning seconds, got 0"),
        ({"random": 0.5}, TypeError, r"random must be a callable returning floats"),
    ],
)
def test_retry_config_errors_name_the_parameter(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    """Each bad Retry setting fails at construction with a message naming it."""
    with pytest.raises(error, match=pattern):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_is_frozen_and_its_repr_shows_the_settings() -> None:
    """Retry cannot be changed after construction, and its repr reads like its config."""
    retry = Retry(
        attempts=4,
        on=(ConnectionError, TimeoutError),
        on_result=tenacity.retry_if_result(lambda value: value is None),
        wait=tenacity.wait_fixed(1),
        stop=tenacity.stop_after_delay(5),
        budget=None,
        on_retry=print,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.attempts = 5  # type: ignore[misc]
    assert repr(retry) == (
        "Retry(attempts=4, on=(ConnectionError, TimeoutError), "
        "on_result=tenacity.retry.retry_if_result(...), wait=tenacity.wait.wait_fixed(...), "
        "stop=tenacity.stop.stop_after_delay(...), budget=None, on_retry=print)"
    )
    plain = Retry(on=lambda exc: True)
    assert repr(plain).startswith(
        "Retry(attempts=3, on=test_retry_is_frozen_and_its_repr_shows_the_settings.<locals>."
        "<lambda>, backoff=Backoff(initial=0.1, multiplier=2.0, max_delay=10.0, jitter='full'), "
        "budget=RetryBudget(ratio=0.2, min_retries_per_second=10, window=10))"
    )


def test_signature_shows_which_defaults_depend_on_other_parameters() -> None:
    """help(Retry) shows attempts and budget as <default>: they depend on stop and clock."""
    parameters = inspect.signature(Retry).parameters
    assert repr(parameters["attempts"].default) == "<default>"
    assert repr(parameters["budget"].default) == "<default>"


def test_non_builtin_exception_types_are_shown_with_their_module() -> None:
    """Notes and repr name an exception type the way it is imported."""
    retry = Retry(on=tenacity.TryAgain, budget=None)
    assert "on=tenacity.TryAgain" in repr(retry)


# retry_after: the dependency's own wait ------------------------------------------------


def test_retry_after_replaces_the_backoff_wait() -> None:
    """A wait the dependency asked for is used instead of the backoff's."""
    retry = Retry(
        attempts=3,
        budget=None,
        backoff=Backoff(initial=5.0, jitter="none"),
        retry_after=lambda exc: 0.25 if isinstance(exc, ConnectionError) else None,
    )
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=ConnectionError()) == 0.25
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, error=TimeoutError()) == 5.0
    assert "retry_after=" in repr(retry)


def test_retry_after_beyond_the_deadline_stops_at_once() -> None:
    """If the dependency asks for more time than the deadline leaves, stop now."""
    retry = Retry(attempts=3, budget=None, retry_after=lambda exc: 30.0)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, deadline=10.0, error=ConnectionError()) is None
    assert state.stop_reason == "deadline"


def test_retry_after_sees_results_and_is_zero_under_instant_retries() -> None:
    """Result retries get the hint from the result; the testing switch still wins."""
    retry = Retry(attempts=3, budget=None, on_result=lambda value: value == 503, retry_after=float)
    state = retry.begin(0.0)
    assert retry.next_delay(state, now=0.0, result=503) == 503.0
    with instant_retries():
        state = retry.begin(0.0)
        assert retry.next_delay(state, now=0.0, result=503) == 0.0


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_retry_after_returning_nonsense_is_an_error(bad: float) -> None:
    """A hint that is not a finite, non-negative number is a bug in the hint function."""
    retry = Retry(attempts=3, budget=None, retry_after=lambda exc: bad)
    with pytest.raises(ValueError, match="retry_after"):
        retry.next_delay(retry.begin(0.0), now=0.0, error=ConnectionError())


def test_retry_after_must_be_callable() -> None:
    """Configuration errors name the parameter."""
    with pytest.raises(TypeError, match="retry_after"):
        Retry(retry_after=5)  # type: ignore[arg-type]


# Safe defaults -----------------------------------------------------------------------


def test_a_retry_stacked_over_a_breaker_never_retries_its_refusals() -> None:
    """@Retry over @breaker: an open breaker ends the retries at once, as the README says."""
    import resilient

    breaker = resilient.CircuitBreaker(failure_threshold=1)
    calls = {"n": 0}

    @Retry(attempts=5, budget=None)
    @breaker
    def fetch() -> None:
        calls["n"] += 1
        raise ConnectionError("down")

    with instant_retries(), pytest.raises(resilient.CircuitOpenError):
        fetch()
    assert calls["n"] == 1  # the first failure opened it
    assert breaker.metrics().total_rejections == 1  # and no retry hammered the refusal


@pytest.mark.parametrize("bug", [TypeError, AttributeError, NameError, AssertionError])
def test_the_default_on_never_retries_programming_errors(bug: type[Exception]) -> None:
    """A bug in the calling code is not retried by default, nor counted by a default breaker."""
    import resilient

    breaker = resilient.CircuitBreaker(failure_threshold=1)
    calls = {"n": 0}

    @Retry(attempts=3, budget=None)
    def buggy() -> None:
        calls["n"] += 1
        raise bug("a bug")

    with instant_retries(), pytest.raises(bug):
        breaker.call(buggy)
    assert calls["n"] == 1
    assert breaker.state is resilient.BreakerState.CLOSED
    # Asking for it explicitly still works.
    with instant_retries(), pytest.raises(bug):
        Retry(attempts=3, budget=None, on=Exception).call(buggy)
    assert calls["n"] == 4
    counting = resilient.CircuitBreaker(failure_threshold=1, exclude=None)
    with pytest.raises(bug):
        counting.call(buggy)
    assert counting.state is resilient.BreakerState.OPEN


def test_a_wait_too_long_to_sleep_gives_up_with_the_last_error() -> None:
    """A hint of 1e12 s ends the retries at once, saying why, instead of sleeping for ever."""
    retry = Retry(attempts=3, budget=None, retry_after=lambda exc: 1e12)
    state = retry.begin(0.0)
    error = ConnectionError("come back in 30,000 years")
    assert retry.next_delay(state, now=0.0, error=error) is None
    retry.give_up(state, error)
    assert "longer than 30 days" in error.__notes__[0]


def test_a_retry_after_hook_returning_text_is_refused_clearly() -> None:
    """retry_after returning "5" is a TypeError naming the hook's mistake."""
    retry = Retry(attempts=3, budget=None, retry_after=lambda exc: "5")
    with pytest.raises(TypeError, match="must return seconds as a number"):
        retry.next_delay(retry.begin(0.0), now=0.0, error=ConnectionError())


def test_retries_are_logged_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Each scheduled retry is an INFO record on resilient.retry: off in a default WARNING log."""
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("reset")
        return "ok"

    with caplog.at_level(logging.INFO, logger="resilient.retry"), instant_retries():
        assert Retry(attempts=3, budget=None).call(flaky) == "ok"
    messages = [r.getMessage() for r in caplog.records if r.name == "resilient.retry"]
    assert len(messages) == 2
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "resilient.retry")
    assert messages[0] == "attempt 1 failed with ConnectionError; retrying in 0.000 s"


# Pickling ----------------------------------------------------------------------------


def half(value: object) -> float | None:
    """A module-level retry_after (so a Retry using it pickles)."""
    return 0.5


def quarter() -> float:
    """A module-level random source that always returns 0.25."""
    return 0.25


class Hooked:
    """A module-level on_retry hook that keeps the attempts it saw."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    def __call__(self, event: RetryEvent) -> None:
        self.attempts.append(event.attempt)


def test_budget_pickles_as_its_configuration_with_fresh_counts() -> None:
    """A pickled RetryBudget keeps its ratio, reserve, window and clock, not its counts."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_retries_per_second=1, window=4, clock=clock)
    for _ in range(4):
        budget.deposit(clock())
    while budget.try_withdraw(clock()):
        pass
    assert budget.available() == 0
    copy = pickle.loads(pickle.dumps(budget))
    assert repr(copy) == repr(budget)
    assert isinstance(copy.clock, FakeClock)
    assert copy.clock() == clock()
    assert copy.available() == 4  # the reserve alone: no calls, no retries counted yet


def test_retry_pickles_as_its_configuration_with_a_fresh_budget() -> None:
    """Every setting survives the round trip; the budget's counts do not."""
    clock = FakeClock()
    hook = Hooked()
    retry = Retry(
        attempts=5,
        on=(ConnectionError, TimeoutError),
        on_result=math.isnan,
        backoff=Backoff(initial=1.0, jitter="none"),
        budget=RetryBudget(ratio=0.0, min_retries_per_second=0.25, window=4, clock=clock),
        retry_after=half,
        on_retry=hook,
        clock=clock,
        random=quarter,
    )
    spent = retry.begin(clock())
    assert retry.next_delay(spent, now=clock(), error=ConnectionError()) == 0.5
    assert retry.budget is not None
    assert retry.budget.available() == 0
    copy = pickle.loads(pickle.dumps(retry))
    assert repr(copy) == repr(retry)
    assert (copy.attempts, copy.on_result) == (5, math.isnan)
    assert copy.on == (ConnectionError, TimeoutError)
    assert (copy.retry_after, copy.random) == (half, quarter)
    assert copy.budget is not None
    assert copy.budget.available() == 1
    assert isinstance(copy.on_retry, Hooked)
    assert copy.on_retry.attempts == [1]
    assert failures(copy, ConnectionError(), now=clock()) == [0.5, None]  # budget: one retry
    assert not copy.accepts(ValueError())


def test_pickled_retry_keeps_what_the_defaults_mean() -> None:
    """The default on still skips programming errors (unlike on=Exception), budget=None stays
    off, a stop strategy still drops the attempts default, and jitter is each copy's own."""
    default = pickle.loads(pickle.dumps(Retry()))
    assert not default.accepts(TypeError("a bug"))
    assert default.accepts(ConnectionError())
    assert default.random is random.random  # the process's generator, not a copy of its state
    everything = pickle.loads(pickle.dumps(Retry(on=Exception, budget=None)))
    assert everything.accepts(TypeError("retried on purpose"))
    assert everything.budget is None
    stopped = pickle.loads(
        pickle.dumps(Retry(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(3)))
    )
    assert (stopped.attempts, stopped.backoff) == (None, None)
    assert failures(stopped, ConnectionError()) == [3.0, None]


def test_a_retry_holding_a_lambda_fails_to_pickle_with_pickles_own_error() -> None:
    """Configuration that cannot be pickled is reported by pickle, not silently dropped."""
    retry = Retry(on=lambda exc: True)
    with pytest.raises((pickle.PicklingError, AttributeError), match=r"lambda|local"):
        pickle.dumps(retry)


# Misuse ------------------------------------------------------------------------------


def test_retry_without_parentheses_says_to_add_them() -> None:
    """@Retry over a function is a TypeError that shows the fix, not Python's arity message."""
    with pytest.raises(TypeError, match=r"Retry is a class: write @Retry\(\) \(with parentheses\)"):

        @Retry  # type: ignore[call-arg]
        def fetch() -> None: ...

    with pytest.raises(TypeError, match=r"keyword arguments only, got positional 3"):
        Retry(3)  # type: ignore[call-arg]


def test_a_retry_instance_shows_the_decorator_signature() -> None:
    """inspect.signature(Retry) is the configuration; an instance's is the decorator's."""
    assert "attempts" in inspect.signature(Retry).parameters
    assert list(inspect.signature(Retry()).parameters) == ["fn"]


# The attempt loop: for attempt in retry -------------------------------------------------


class Down(ConnectionError):
    """A dependency's failure (a subclass, so that tests can hold weak references to one)."""


class Flaky:
    """A block that fails with :class:`Down` ``failures`` times, then returns "ok"."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            # Not held in a local: this frame, on the error's traceback, would keep it alive.
            self.raised.append(Down(f"down ({self.calls})"))
            raise self.raised[-1]
        return "ok"

    async def run_async(self) -> str:
        await asyncio.sleep(0)
        return self()


def run_attempts(retry: Retry, block: Callable[[], object]) -> list[object]:
    """Run ``block`` in ``for attempt in retry: with attempt:``; return each attempt's number,
    then the block's value."""
    seen: list[object] = []
    for attempt in retry:
        seen.append(attempt.number)
        with attempt:
            value = block()
    seen.append(value)
    return seen


async def run_attempts_async(retry: Retry, block: Callable[[], Awaitable[object]]) -> list[object]:
    """:func:`run_attempts` with ``async for``."""
    seen: list[object] = []
    async for attempt in retry:
        seen.append(attempt.number)
        with attempt:
            value = await block()
    seen.append(value)
    return seen


def fail_with(error: BaseException) -> Callable[[], object]:
    def block() -> object:
        raise error

    return block


NO_JITTER = Backoff(initial=0.1, jitter="none")


def test_attempt_loop_retries_a_block_until_it_succeeds() -> None:
    """Failed blocks are retried after the backoff's waits (recorded, not slept); success ends."""
    with record_sleeps() as waits:
        seen = run_attempts(Retry(attempts=5, on=ConnectionError, backoff=NO_JITTER), Flaky(2))
    assert seen == [1, 2, 3, "ok"]
    assert waits == [0.1, 0.2]

    loop = iter(Retry())
    attempt = next(loop)
    with attempt:
        pass
    with pytest.raises(StopIteration):
        next(loop)  # a successful block ends the loop for good
    assert repr(attempt) == "<Attempt number=1>"
    assert "1 handed out" in repr(loop)


async def test_async_attempt_loop_retries_a_block_until_it_succeeds() -> None:
    """async for waits through asyncio.sleep's seam (record_sleeps sees it) and ends on success."""
    flaky = Flaky(2)
    with record_sleeps() as waits:
        retry = Retry(attempts=5, on=ConnectionError, backoff=NO_JITTER)
        seen = await run_attempts_async(retry, flaky.run_async)
    assert (seen, waits) == ([1, 2, 3, "ok"], [0.1, 0.2])


def test_attempt_loop_out_of_attempts_reraises_the_last_error_with_the_note() -> None:
    """The with block re-raises the last attempt's own exception, noted, with a clean traceback."""
    flaky = Flaky(10)
    retry = Retry(attempts=3, on=ConnectionError, backoff=NO_JITTER)
    with record_sleeps() as waits, pytest.raises(Down) as caught:
        run_attempts(retry, flaky)
    assert caught.value is flaky.raised[-1]
    assert flaky.calls == 3
    assert waits == [0.1, 0.2]
    assert caught.value.__notes__ == [
        "resilient.Retry: gave up after 3 attempts (0.30 s waiting in total): "
        "attempts exhausted (attempts=3)"
    ]
    # Raised from the user's block: no frame of the loop's machinery on top of it.
    frames = [entry.name for entry in caught.traceback]
    assert frames[1:] == ["run_attempts", "__call__"]


async def test_async_attempt_loop_out_of_attempts_reraises_the_last_error() -> None:
    """Same give-up in async for: the last original exception, with the note."""
    flaky = Flaky(10)
    with record_sleeps(), pytest.raises(Down) as caught:
        await run_attempts_async(Retry(attempts=2, on=ConnectionError), flaky.run_async)
    assert caught.value is flaky.raised[-1]
    assert "gave up after 2 attempts" in caught.value.__notes__[0]


def test_attempt_loop_lets_an_error_it_does_not_retry_propagate_at_once() -> None:
    """An exception `on` does not match leaves the first with block unchanged: no wait, no note."""
    events: list[RetryEvent] = []
    error = ValueError("bad input")
    retry = Retry(on=ConnectionError, on_retry=events.append)
    with record_sleeps() as waits, pytest.raises(ValueError, match="bad input") as caught:
        run_attempts(retry, fail_with(error))
    assert caught.value is error
    assert not hasattr(error, "__notes__")
    assert (waits, events) == ([], [])


def test_attempt_loop_shares_the_budget_with_the_decorator() -> None:
    """Loops and decorated calls of one Retry draw on one budget: counted once, spent by either."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0, clock=clock)
    retry = Retry(on=ConnectionError, budget=budget, clock=clock)
    flaky = Flaky(5)
    with record_sleeps():
        assert retry.call(Flaky(1)) == "ok"  # spends the one retry the budget holds
        with pytest.raises(Down) as caught:
            run_attempts(retry, flaky)
    assert flaky.calls == 1
    assert "retry budget exhausted" in caught.value.__notes__[0]

    counting = RetryBudget(ratio=1.0, min_retries_per_second=0.0, clock=clock)
    run_attempts(Retry(budget=counting, clock=clock), Flaky(0))
    assert counting.available() == 1  # the loop counted its call once


def test_attempt_loop_never_waits_past_the_deadline_and_blames_it() -> None:
    """A wait that would end after the deadline in force ends the loop at once, noted so."""
    flaky = Flaky(5)
    retry = Retry(on=ConnectionError, backoff=Backoff(initial=1.0, jitter="none"))
    with record_sleeps() as waits, deadline(0.5), pytest.raises(Down) as caught:
        run_attempts(retry, flaky)
    assert (flaky.calls, waits) == (1, [])
    assert "the deadline would pass before the next attempt" in caught.value.__notes__[0]


def test_a_deadline_passing_during_the_wait_is_raised_by_the_for_statement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the deadline passes while waiting, the next step re-raises the last error, noted."""
    shift = [0.0]

    def overrunning_sleep(seconds: float) -> None:
        shift[0] += seconds + 5.0  # the wait ran long: the deadline is gone

    monkeypatch.setattr(_driver, "_monotonic", lambda: time.monotonic() + shift[0])
    monkeypatch.setattr(_driver, "sleep", overrunning_sleep)
    flaky = Flaky(5)
    retry = Retry(on=ConnectionError, backoff=Backoff(initial=1.0, jitter="none"))
    with deadline(3.0), pytest.raises(Down) as caught:
        run_attempts(retry, flaky)
    assert caught.value is flaky.raised[0]
    assert flaky.calls == 1
    assert caught.value.__notes__ == [
        "resilient.Retry: gave up after 1 attempt (1.00 s waiting in total): "
        "the deadline would pass before the next attempt could start"
    ]


def test_attempt_loop_past_its_deadline_runs_no_attempt() -> None:
    """A loop started after the deadline raises DeadlineExceeded before running the block."""
    flaky = Flaky(0)
    with deadline_at(time.monotonic() - 1.0), pytest.raises(DeadlineExceeded):
        run_attempts(Retry(), flaky)
    assert flaky.calls == 0


def test_attempt_loop_calls_the_hooks_honours_retry_after_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """on_retry gets one event per retry; retry_after sets the wait; resilient.retry logs it."""
    events: list[RetryEvent] = []
    flaky = Flaky(2)
    retry = Retry(on=ConnectionError, on_retry=events.append, retry_after=lambda error: 2.5)
    with caplog.at_level(logging.INFO, "resilient.retry"), record_sleeps() as waits:
        run_attempts(retry, flaky)
    assert waits == [2.5, 2.5]
    assert [(event.attempt, event.delay, event.exception) for event in events] == [
        (1, 2.5, flaky.raised[0]),
        (2, 2.5, flaky.raised[1]),
    ]
    assert [record.getMessage() for record in caplog.records] == [
        f"attempt 1 failed with {__name__}.Down; retrying in 2.500 s",
        f"attempt 2 failed with {__name__}.Down; retrying in 2.500 s",
    ]


def test_a_failing_hook_stops_the_loop_chained_to_the_attempts_error() -> None:
    """A hook's exception leaves the with block, with the attempt's error as its context."""

    def broken(event: RetryEvent) -> None:
        raise LookupError("metrics down")

    flaky = Flaky(5)
    loop = iter(Retry(on=ConnectionError, on_retry=broken))
    attempt = next(loop)
    with pytest.raises(LookupError, match="metrics down") as caught, attempt:
        flaky()
    assert caught.value.__context__ is flaky.raised[0]
    with pytest.raises(StopIteration):
        next(loop)


def test_attempt_loop_obeys_instant_retries_and_its_cap() -> None:
    """instant_retries(cap=2): a 10-attempt loop makes 2 attempts and never waits."""
    flaky = Flaky(10)
    retry = Retry(attempts=10, on=ConnectionError)
    with instant_retries(cap=2), record_sleeps() as waits, pytest.raises(Down) as caught:
        run_attempts(retry, flaky)
    assert (flaky.calls, waits) == (2, [])
    assert "capped at 2 for tests" in caught.value.__notes__[0]


async def test_attempt_loop_never_swallows_cancellation() -> None:
    """CancelledError (a BaseException) leaves the with block at once, even after retries."""
    flaky = Flaky(1)

    async def block() -> object:
        await flaky.run_async()
        raise asyncio.CancelledError

    with record_sleeps(), pytest.raises(asyncio.CancelledError):
        await run_attempts_async(Retry(on=Exception), block)
    assert flaky.calls == 2  # one retry, then the cancellation went straight through

    loop = aiter(Retry(on=BaseException))
    with pytest.raises(asyncio.CancelledError), await anext(loop):
        raise asyncio.CancelledError
    with pytest.raises(StopAsyncIteration):
        await anext(loop)


def test_attempt_loop_never_swallows_keyboard_interrupt() -> None:
    """KeyboardInterrupt propagates from the first attempt, with no note, whatever `on` says."""
    with pytest.raises(KeyboardInterrupt) as caught:
        run_attempts(Retry(on=BaseException), fail_with(KeyboardInterrupt()))
    assert not hasattr(caught.value, "__notes__")


def test_using_an_attempt_twice_is_an_error() -> None:
    """A second with block over one attempt raises, whether after the first or nested in it."""
    loop = iter(Retry())
    attempt = next(loop)
    with attempt:
        pass
    with pytest.raises(RuntimeError, match="each attempt must be used exactly once"), attempt:
        pass

    # Nested: the misuse is not taken for a failure to retry, though on= takes RuntimeError.
    attempt = next(iter(Retry(on=RuntimeError)))
    with attempt, pytest.raises(RuntimeError, match="attempt 1 was used again"), attempt:
        pass


def test_skipping_the_with_block_is_an_error() -> None:
    """Asking for the next attempt before the last one ran in a with block raises."""
    loop = iter(Retry())
    next(loop)
    with pytest.raises(RuntimeError, match="attempt 1 was never entered"):
        next(loop)
    with pytest.raises(StopIteration):
        next(loop)  # the misuse ended the loop

    loop = iter(Retry())
    with next(loop), pytest.raises(RuntimeError, match="attempt 1 is still in its with block"):
        next(loop)


async def test_mixing_for_and_async_for_is_an_error() -> None:
    """One loop is sync or async from its first step; it is its own iterator either way."""
    loop = iter(Retry(on=ConnectionError))
    assert iter(loop) is loop
    assert aiter(loop) is loop
    with next(loop):
        pass
    with pytest.raises(RuntimeError, match="started with 'for'"):
        await anext(loop)


async def test_a_sync_attempt_loop_in_a_coroutine_refuses_to_block_the_event_loop() -> None:
    """for (not async for) inside a coroutine raises before its first wait, even an instant one."""
    assert run_attempts(Retry(), Flaky(0)) == [1, "ok"]  # a loop that never waits is harmless
    for instant in (False, True):
        flaky = Flaky(5)
        with contextlib.ExitStack() as stack:
            if instant:
                stack.enter_context(instant_retries())
            with pytest.raises(RuntimeError, match="write 'async for attempt in retry'") as caught:
                run_attempts(Retry(on=ConnectionError), flaky)
        assert caught.value.__context__ is flaky.raised[0]
        assert flaky.calls == 1
    # Refused before the failure path decides: no hook runs, no retry is withdrawn.
    hooked: list[RetryEvent] = []
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1, window=10)
    with pytest.raises(RuntimeError):
        run_attempts(Retry(on=ConnectionError, on_retry=hooked.append, budget=budget), Flaky(5))
    assert hooked == []
    assert budget.available() == 10


def test_attempt_loop_refuses_on_result() -> None:
    """A with block has no return value: a Retry with on_result cannot drive the loop."""
    with pytest.raises(TypeError, match="on_result cannot drive"):
        iter(Retry(on_result=lambda value: value is None))


def test_attempt_loop_frees_its_errors_without_the_cyclic_gc() -> None:
    """Each error (and what its traceback holds) is freed by reference counting once handled."""
    flaky = Flaky(10)
    gc.disable()
    try:
        with instant_retries(), contextlib.suppress(Down):
            run_attempts(Retry(attempts=3, on=ConnectionError), flaky)
        refs = [weakref.ref(error) for error in flaky.raised]
        flaky.raised.clear()
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


def test_attempt_is_a_public_type_of_the_retry_module() -> None:
    """Loops hand out resilient.retry.Attempt objects, usable in type hints."""
    assert isinstance(next(iter(Retry())), Attempt)


def test_a_remote_rate_limit_is_retried_when_on_names_it_and_a_local_one_never() -> None:
    """A server's 429 (remote) may be retried; this process's own limiter refusal may not."""
    from resilient.rpc import RemoteRateLimited

    calls: list[str] = []

    def remote() -> str:
        calls.append("remote")
        if len(calls) < 3:
            raise RemoteRateLimited(retry_after=0.0)
        return "ok"

    def local() -> str:
        calls.append("local")
        raise resilient.RateLimited("search", 0.5)

    with instant_retries():
        assert Retry(attempts=3, on=RemoteRateLimited)(remote)() == "ok"
        with pytest.raises(resilient.RateLimited):
            Retry(attempts=3, on=resilient.RateLimited)(local)()
    assert calls == ["remote", "remote", "remote", "local"]
