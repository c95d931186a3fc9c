"""Deadlines: scopes, nesting, async cancellation, and the wire header."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta

import pytest

import resilient
from resilient.deadline import (
    DEADLINE_HEADER,
    check_deadline,
    current,
    deadline,
    format_deadline_header,
    parse_deadline_header,
    remaining,
)


def test_no_deadline_means_infinite_remaining() -> None:
    """Outside any scope there is no deadline: remaining() is inf and check passes."""
    assert remaining() == math.inf
    assert current() == math.inf
    check_deadline()


def test_scope_sets_and_restores_the_deadline() -> None:
    """Inside a scope remaining() counts down from the given seconds; after it, no deadline."""
    with deadline(5.0) as scope:
        left = remaining()
        assert 4.9 < left <= 5.0
        assert scope.deadline == current()
    assert remaining() == math.inf


def test_timedelta_is_accepted() -> None:
    """A timedelta means the same as its seconds."""
    with deadline(timedelta(milliseconds=1500)):
        assert 1.4 < remaining() <= 1.5


def test_nested_scope_never_extends_the_outer_one() -> None:
    """The earlier deadline wins: a longer inner scope keeps the outer budget."""
    with deadline(1.0):
        with deadline(10.0):
            assert remaining() <= 1.0
        with deadline(0.2):
            assert remaining() <= 0.2
        assert 0.2 < remaining() <= 1.0


def test_infinite_seconds_adds_no_deadline() -> None:
    """math.inf opens a scope with no deadline of its own."""
    with deadline(math.inf):
        assert remaining() == math.inf
    with deadline(1.0), deadline(math.inf):
        assert remaining() <= 1.0


@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, timedelta(seconds=-1)])
def test_negative_or_nan_seconds_are_refused(bad: object) -> None:
    """Negative and NaN budgets are programming errors, reported with the value."""
    with pytest.raises(ValueError, match="seconds"):
        deadline(bad)  # type: ignore[arg-type]


def test_non_numeric_seconds_are_refused() -> None:
    """A string is not a duration."""
    with pytest.raises(TypeError, match="seconds"):
        deadline("5")  # type: ignore[arg-type]


def test_expired_deadline_leaves_zero_and_check_raises() -> None:
    """A passed deadline leaves 0.0, never a negative number, and check_deadline raises."""
    with deadline(0):
        assert remaining() == 0.0
        with pytest.raises(resilient.DeadlineExceeded):
            check_deadline()


def test_deadline_exceeded_is_a_timeout_error() -> None:
    """Existing `except TimeoutError` code catches DeadlineExceeded."""
    assert issubclass(resilient.DeadlineExceeded, TimeoutError)
    assert issubclass(resilient.DeadlineExceeded, resilient.ResilientError)


def test_scope_cannot_be_entered_twice() -> None:
    """Reusing a scope object would corrupt the context; it is refused."""
    scope = deadline(1.0)
    with scope, pytest.raises(RuntimeError, match="twice"), scope:
        pass  # pragma: no cover


async def test_async_scope_cancels_slow_work() -> None:
    """Awaited work is cancelled at the deadline and DeadlineExceeded leaves the scope."""
    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded, match="cancelled"):
        async with deadline(0.05):
            await asyncio.sleep(5)
    assert time.monotonic() - started < 1.0


async def test_async_scope_lets_fast_work_finish() -> None:
    """Work that ends in time returns normally and leaves no pending cancellation."""
    async with deadline(1.0):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)  # a stray cancel() would surface here
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_outside_cancellation_stays_cancelled_error() -> None:
    """A cancel from outside is not turned into a timeout."""
    entered = asyncio.Event()

    async def worker() -> None:
        async with deadline(10.0):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(worker())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_inner_async_scope_lets_outer_deadline_surface() -> None:
    """When the outer deadline fires, the outer scope raises DeadlineExceeded."""
    outer = deadline(0.05)
    with pytest.raises(resilient.DeadlineExceeded):
        async with outer, deadline(5.0):
            await asyncio.sleep(5)


async def test_inner_scope_timeout_is_catchable_inside_outer() -> None:
    """An inner deadline's DeadlineExceeded can be handled and the outer scope goes on."""
    async with deadline(5.0):
        with pytest.raises(resilient.DeadlineExceeded):
            async with deadline(0.02):
                await asyncio.sleep(5)
        await asyncio.sleep(0)
        assert remaining() > 4.0


async def test_spawned_tasks_inherit_the_deadline() -> None:
    """A task created inside the scope sees the scope's deadline."""
    async with deadline(2.0):
        seen = await asyncio.create_task(asyncio.to_thread(remaining))
        inner = await asyncio.create_task(_remaining_async())
    assert 0 < seen <= 2.0
    assert 0 < inner <= 2.0


async def _remaining_async() -> float:
    return remaining()


async def test_async_scope_without_deadline_sets_no_timer() -> None:
    """deadline(inf) in async code neither cancels nor raises."""
    async with deadline(math.inf):
        await asyncio.sleep(0.01)


# The wire header -----------------------------------------------------------------------


def test_header_round_trip_rounds_down_to_milliseconds() -> None:
    """The encoded budget never exceeds the real one."""
    assert format_deadline_header(1.2345) == "1234"
    assert parse_deadline_header("1234") == pytest.approx(1.234)
    assert format_deadline_header(0.0004) == "0"
    assert DEADLINE_HEADER == "resilient-timeout-ms"


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_header_refuses_budgets_it_cannot_encode(bad: float) -> None:
    """Negative, NaN and infinite budgets have no header form."""
    with pytest.raises(ValueError, match=r"budget|seconds"):
        format_deadline_header(bad)


@pytest.mark.parametrize(
    "bad", ["", " 5", "5 ", "+5", "-5", "1_000", "1.5", "\u0663", "0x10", "1e3", b"\xff", "\uff15"]
)
def test_header_parse_is_strict(bad: str | bytes) -> None:
    """Only plain ASCII digits are a budget; anything int() would also accept is refused."""
    with pytest.raises(ValueError, match=DEADLINE_HEADER):
        parse_deadline_header(bad)


def test_header_parse_clamps_and_treats_zero_as_expired() -> None:
    """Huge budgets are clamped to the maximum; 0 means already expired."""
    assert parse_deadline_header("999999999", maximum=30.0) == 30.0
    assert parse_deadline_header("9" * 4000, maximum=30.0) == 30.0
    assert parse_deadline_header(b"250") == 0.25
    assert parse_deadline_header("0") == 0.0
    assert parse_deadline_header("000") == 0.0
