"""Deadlines: scopes, nesting, async cancellation, and the wire header."""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

import resilient
from resilient.deadline import (
    DEADLINE_HEADER,
    carry,
    check_deadline,
    current,
    deadline,
    format_deadline_header,
    parse_connect_timeout,
    parse_deadline_header,
    parse_grpc_timeout,
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


async def test_async_scope_exited_from_another_task_is_refused_and_disarmed() -> None:
    """Exiting from another task raises a clear error, and the timer never cancels the enterer."""
    scope = deadline(0.05)
    await scope.__aenter__()
    with pytest.raises(RuntimeError, match="must be exited by the task that entered it"):
        await asyncio.create_task(scope.__aexit__(None, None, None))
    await asyncio.sleep(0.1)  # past the deadline: an armed timer would cancel us here
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await scope.__aexit__(None, None, None)  # the entering task can still close it
    assert remaining() == math.inf


async def test_async_scope_without_timer_exited_from_another_task_is_refused() -> None:
    """With no deadline (no timer) a foreign exit is refused just as clearly."""
    scope = deadline(math.inf)
    await scope.__aenter__()
    with pytest.raises(RuntimeError, match="must be exited by the thread or task that entered it"):
        await asyncio.create_task(scope.__aexit__(None, None, None))
    await scope.__aexit__(None, None, None)


def test_sync_scope_exited_from_another_thread_is_refused() -> None:
    """A with-scope closed from another thread raises RuntimeError, not contextvars' ValueError."""
    scope = deadline(5.0)
    scope.__enter__()
    try:
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            pytest.raises(RuntimeError, match="must be exited by the thread or task"),
        ):
            pool.submit(scope.__exit__, None, None, None).result()
    finally:
        scope.__exit__(None, None, None)
    assert remaining() == math.inf


async def test_sync_scope_in_a_coroutine_bounds_an_async_policy_call() -> None:
    """`with deadline()` in a coroutine still cuts a Policy-wrapped async call at the deadline."""

    @resilient.Policy()
    async def slow() -> None:
        await asyncio.sleep(0.3)

    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded), deadline(0.05):
        await slow()
    assert time.monotonic() - started < 0.25


async def test_sync_scope_in_a_coroutine_does_not_cancel_plain_awaits() -> None:
    """As documented: only `async with` cancels; the sync form only sets the deadline."""
    with deadline(0.01):
        await asyncio.sleep(0.03)
        assert remaining() == 0.0


# remaining(default=...) ----------------------------------------------------------------


def test_remaining_default_replaces_inf_only_when_no_deadline() -> None:
    """default is the fallback with no deadline in force; under one, the seconds left win."""
    assert remaining(default=10.0) == 10.0
    assert remaining(default=timedelta(milliseconds=250)) == 0.25
    assert remaining(default=3) == 3.0
    with deadline(1.0):
        assert 0.9 < remaining(default=10.0) <= 1.0  # a fallback, not a cap
    with deadline(30.0):
        assert 29.0 < remaining(default=10.0) <= 30.0
    with deadline(0):
        assert remaining(default=10.0) == 0.0
    assert remaining(default=None) == math.inf


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, timedelta(0)])
def test_remaining_default_must_be_positive_and_finite(bad: object) -> None:
    """A zero, negative, NaN or infinite fallback is a bug, reported with the parameter name."""
    with pytest.raises(ValueError, match="default must"):
        remaining(default=bad)  # type: ignore[arg-type]
    with deadline(5.0), pytest.raises(ValueError, match="default must"):
        remaining(default=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, "10", b"10"])
def test_remaining_default_must_be_a_duration(bad: object) -> None:
    """bool and strings are not durations."""
    with pytest.raises(TypeError, match="default must be seconds as a number"):
        remaining(default=bad)  # type: ignore[arg-type]


# carry() -------------------------------------------------------------------------------


def test_carry_brings_the_callers_deadline_into_a_pool_worker() -> None:
    """A carried function sees the caller's deadline in an executor; a plain one sees none."""
    with deadline(2.0), ThreadPoolExecutor(max_workers=1) as pool:
        caller_left = remaining()
        carried = pool.submit(carry(remaining)).result()
        plain = pool.submit(remaining).result()
    assert 0 < carried <= caller_left
    assert plain == math.inf


def test_retry_in_a_pool_worker_honours_the_carried_deadline(record_waits: list[float]) -> None:
    """A Retry running in a worker stops for the caller's deadline only when carried there."""
    seen: list[float] = []

    @resilient.Retry(
        attempts=3, budget=None, backoff=resilient.Backoff(initial=10.0, jitter="none")
    )
    def fetch() -> None:
        seen.append(remaining())
        raise ConnectionError("down")

    with deadline(1.0), ThreadPoolExecutor(max_workers=1) as pool:
        caller_left = remaining()
        with pytest.raises(ConnectionError) as carried:
            pool.submit(carry(fetch)).result()
        assert len(seen) == 1
        assert seen[0] <= caller_left
        assert record_waits == []  # a 10 s wait would pass the deadline: no retry
        assert "deadline" in "\n".join(carried.value.__notes__)

        seen.clear()
        with pytest.raises(ConnectionError):
            pool.submit(fetch).result()
    assert seen == [math.inf] * 3  # uncarried, the worker knew of no deadline
    assert record_waits == [10.0, 10.0]


async def test_carry_works_with_run_in_executor_and_threads() -> None:
    """loop.run_in_executor and threading.Thread see the deadline through carry()."""
    seen: list[float] = []
    async with deadline(2.0):
        caller_left = remaining()
        in_executor = await asyncio.get_running_loop().run_in_executor(None, carry(remaining))
        thread = threading.Thread(target=carry(lambda: seen.append(remaining())))
        thread.start()
        thread.join()
    assert 0 < in_executor <= caller_left
    assert len(seen) == 1
    assert 0 < seen[0] <= caller_left


def test_carry_takes_the_context_at_carry_time_and_copies_it_per_call() -> None:
    """Concurrent calls of one carried function work, and one call's changes stay its own."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    barrier = threading.Barrier(4, timeout=2.0)

    def work(tag: int) -> str:
        before = var.get()
        var.set(f"changed by {tag}")
        barrier.wait()  # all four calls are inside the context at once
        return before

    token = var.set("caller's")
    carried = carry(work)
    var.reset(token)  # later changes in the caller are not seen: the copy was taken above
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(carried, range(4))) == ["caller's"] * 4
    assert var.get() == "unset"


def test_carry_keeps_the_wrapped_functions_metadata() -> None:
    """functools.wraps: name, docstring and __wrapped__ survive; arguments pass through."""

    def add(a: int, b: int = 0) -> int:
        """Add two numbers."""
        return a + b

    carried = carry(add)
    assert carried.__name__ == "add"
    assert carried.__doc__ == "Add two numbers."
    assert carried.__wrapped__ is add  # type: ignore[attr-defined]
    assert carried(2, b=3) == 5


class _AsyncCallable:
    async def __call__(self) -> None: ...


async def _coroutine_function() -> None: ...


@pytest.mark.parametrize("fn", [_coroutine_function, _AsyncCallable()])
def test_carry_refuses_coroutine_functions(fn: object) -> None:
    """Carrying a context into an un-awaited coroutine is pointless: tasks copy it already."""
    with pytest.raises(TypeError, match="coroutine function"):
        carry(fn)  # type: ignore[arg-type]


def test_carry_refuses_non_callables() -> None:
    """The error names the parameter and what was passed."""
    with pytest.raises(TypeError, match="fn must be a callable, got int: 5"):
        carry(5)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("bad", [100, 1.5, None, True, bytearray(b"100")])
def test_header_parse_refuses_non_strings(bad: object) -> None:
    """A header value is str or bytes; anything else is a TypeError naming value and its type."""
    with pytest.raises(
        TypeError, match=rf"value must be .* str or bytes, got {type(bad).__name__}"
    ):
        parse_deadline_header(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["5", b"5", None, True, False])
def test_header_format_refuses_non_numbers(bad: object) -> None:
    """format_deadline_header takes a number of seconds; strings and bools are TypeErrors."""
    with pytest.raises(TypeError, match=rf"seconds must be .* got {type(bad).__name__}"):
        format_deadline_header(bad)  # type: ignore[arg-type]


def test_header_format_accepts_ints() -> None:
    """An int budget is as good as a float."""
    assert format_deadline_header(2) == "2000"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("30", TypeError),
    ],
)
def test_header_parse_validates_maximum(bad: object, error: type[Exception]) -> None:
    """maximum must be a positive, finite duration; the error names it."""
    with pytest.raises(error, match="maximum"):
        parse_deadline_header("100", maximum=bad)  # type: ignore[arg-type]


def test_header_parse_maximum_accepts_a_timedelta() -> None:
    """maximum is a duration like any other."""
    assert parse_deadline_header("60000", maximum=timedelta(seconds=5)) == 5.0


def test_grpc_timeout_units() -> None:
    """Every grpc-timeout unit converts; more than 8 digits or no unit is refused."""

    def parse(value: str) -> float:
        return parse_grpc_timeout(value, maximum=86_400)

    assert parse("1H") == 3600
    assert parse("2M") == 120
    assert parse("3S") == 3
    assert parse("100m") == pytest.approx(0.1)
    assert parse("5u") == pytest.approx(5e-6)
    assert parse("7n") == pytest.approx(7e-9)
    for bad in ("123456789S", "5", "S", "5s", " 5S"):
        with pytest.raises(ValueError, match="grpc-timeout"):
            parse(bad)


def test_grpc_and_connect_timeouts_are_clamped_and_refuse_what_is_not_theirs() -> None:
    """Both budget headers clamp to maximum; wrong types and too many digits are refused."""
    assert parse_grpc_timeout(b"1H", maximum=60) == 60
    assert parse_connect_timeout("1500") == 1.5
    assert parse_connect_timeout(b"9999999999", maximum=60) == 60
    for bad in ("12345678901", "", "1.5", "-5", "١٢"):
        with pytest.raises(ValueError, match="connect-timeout-ms"):
            parse_connect_timeout(bad)
    with pytest.raises(ValueError, match="grpc-timeout must be ASCII"):
        parse_grpc_timeout("5S".encode("utf-16"))
    for parse in (parse_grpc_timeout, parse_connect_timeout):
        with pytest.raises(TypeError, match="value must be the"):
            parse(100)  # type: ignore[arg-type]
