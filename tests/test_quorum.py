"""resilient.quorum: gather k successes, fail fast, cancel the rest, within the deadline."""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import resilient
from resilient.errors import QuorumError, ResilientError
from resilient.quorum import QuorumResult, quorum, quorum_sync


def value(result: Any) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return result

    return call


def failing(message: str = "boom") -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        raise ConnectionError(message)

    return call


def blocked(event: asyncio.Event, result: Any = "late") -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        await event.wait()
        return result

    return call


def only_this_task_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_returns_as_soon_as_k_succeed_and_cancels_the_rest() -> None:
    """Two fast answers make a quorum of 2 without the hung third, which is cancelled."""
    never = asyncio.Event()
    result = await quorum({"a": value(1), "b": blocked(never), "c": value(3)}, 2)
    assert result.results == {"a": 1, "c": 3}
    assert result.values == [1, 3]
    assert result.unfinished == ("b",)
    assert result.failures == {}
    assert only_this_task_left()


async def test_sequence_calls_are_labelled_by_position() -> None:
    """A list of calls gets the labels 0, 1, 2..."""
    result = await quorum([value("x"), failing(), value("z")], 2)
    assert result.results == {0: "x", 2: "z"}
    assert isinstance(result.failures[1], ConnectionError)


async def test_raises_as_soon_as_success_is_impossible() -> None:
    """Two failures of three make k=2 impossible: QuorumError at once, not at the hung end."""
    never = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(QuorumError) as caught:
        await quorum(
            {"a": failing("refused"), "b": failing("reset"), "c": blocked(never)}, 2, what="kv.get"
        )
    assert time.monotonic() - started < 1.0
    error = caught.value
    assert error.needed == 2
    assert error.answered == ()
    assert error.reasons["a"] == "ConnectionError: refused"
    assert error.reasons["c"].startswith("cancelled")
    assert isinstance(error.errors["b"], ConnectionError)
    assert "kv.get: 0 of 3 answered, 2 needed" in str(error)
    assert only_this_task_left()


async def test_the_error_pickles_with_its_reasons() -> None:
    """A QuorumError crosses a process boundary: needed, answered and reasons intact."""
    with pytest.raises(QuorumError) as caught:
        await quorum({"a": value(1), "b": failing(), "c": failing()}, 2)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(copy, ResilientError)
    assert (copy.needed, copy.answered, copy.reasons) == (2, ("a",), caught.value.reasons)
    assert str(copy) == str(caught.value)
    assert copy.errors == {}  # the live exceptions stay in the raising process
    assert QuorumError.refusal is False


async def test_a_failure_starts_the_next_spare() -> None:
    """With start=2, a failed call is replaced by the first spare, so the quorum still forms."""
    calls = {"a": failing(), "b": value("b"), "c": value("c"), "d": value("d")}
    result = await quorum(calls, 2, start=2)
    assert result.results == {"b": "b", "c": "c"}
    assert result.not_started == ("d",)


async def test_hedge_asks_one_more_when_the_first_are_slow() -> None:
    """After hedge_after with the quorum missing, a spare is asked, and its answer completes it."""
    never = asyncio.Event()
    calls = {"slow": blocked(never), "fast": value("fast"), "spare": value("spare")}
    started = time.monotonic()
    result = await quorum(calls, 2, start=2, hedge_after=0.05)
    assert time.monotonic() - started < 2.0
    assert set(result.results) == {"fast", "spare"}
    assert result.unfinished == ("slow",)
    assert only_this_task_left()


async def test_no_hedge_without_hedge_after() -> None:
    """Without hedging, spares wait for failures: a hung first call holds until the deadline."""
    never = asyncio.Event()
    calls = {"slow": blocked(never), "fast": value("fast"), "spare": value("spare")}
    with resilient.deadline(0.2), pytest.raises(QuorumError) as caught:
        await quorum(calls, 2, start=2)
    assert caught.value.reasons == {
        "slow": "no answer before the deadline",
        "spare": "not asked: the deadline passed",
    }


async def test_limit_bounds_calls_in_flight() -> None:
    """limit=2 never runs more than two calls at once, and still gathers all it needs."""
    running = peak = 0

    async def call() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return 1

    result = await quorum([call] * 6, 6, limit=2)
    assert len(result.results) == 6
    assert peak == 2


async def test_deadline_bounds_the_gather() -> None:
    """Calls slower than the deadline end in a QuorumError inside it, and are cancelled."""
    never = asyncio.Event()
    started = time.monotonic()
    with resilient.deadline(0.2), pytest.raises(QuorumError) as caught:
        await quorum({"a": value(1), "b": blocked(never), "c": blocked(never)}, 2)
    assert time.monotonic() - started < 1.5
    assert caught.value.answered == ("a",)
    assert "no answer before the deadline" in str(caught.value)
    assert only_this_task_left()


async def test_calls_inherit_the_deadline() -> None:
    """Each call runs inside the caller's deadline (tasks copy the context)."""
    seen: list[float] = []

    async def call() -> None:
        seen.append(resilient.remaining())

    with resilient.deadline(5.0):
        await quorum([call, call], 2)
    assert all(0 < left <= 5.0 for left in seen)


async def test_a_passed_deadline_starts_nothing() -> None:
    """When the deadline has already passed, no call starts and every one says why."""
    started: list[str] = []

    async def call() -> None:
        started.append("x")

    with resilient.deadline_at(time.monotonic() - 1), pytest.raises(QuorumError) as caught:
        await quorum({"a": call, "b": call}, 1)
    assert started == []
    assert set(caught.value.reasons.values()) == {"not asked: the deadline passed"}


async def test_cancelling_the_caller_cancels_every_call() -> None:
    """A cancelled caller leaves no call running: each is cancelled and awaited."""
    never = asyncio.Event()
    cancelled: list[str] = []

    def tracked(name: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return call

    task = asyncio.create_task(quorum({"a": tracked("a"), "b": tracked("b")}, 1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["a", "b"]
    assert only_this_task_left()


async def test_a_call_that_cancels_itself_counts_as_failed() -> None:
    """A call ending in its own cancellation is a failure of that call, not of the caller."""

    async def gives_up() -> None:
        raise asyncio.CancelledError

    with pytest.raises(QuorumError) as caught:
        await quorum({"a": gives_up, "b": value(1)}, 2)
    assert caught.value.reasons["a"].startswith("CancelledError")


async def test_a_call_raising_a_base_exception_propagates() -> None:
    """KeyboardInterrupt-like exceptions are not failed calls: they propagate, rest cancelled."""

    class Stop(BaseException):
        pass

    async def stops() -> None:
        raise Stop

    never = asyncio.Event()
    with pytest.raises(Stop):
        await quorum({"a": stops, "b": blocked(never)}, 2)
    assert only_this_task_left()


async def test_a_factory_raising_synchronously_is_a_failed_call() -> None:
    """A call that raises before returning an awaitable counts as that call's failure."""

    def broken() -> Awaitable[int]:
        raise ConnectionError("no route")

    with pytest.raises(QuorumError) as caught:
        await quorum({"a": broken, "b": value(2)}, 2)
    assert caught.value.reasons == {"a": "ConnectionError: no route"}


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"calls": "abc", "k": 1}, TypeError, "calls must be a mapping"),
        ({"calls": {"a": 1}, "k": 1}, TypeError, "calls['a'] must be a zero-argument callable"),
        ({"calls": [value(1)], "k": 2}, ValueError, "k=2 can never be reached with 1 calls"),
        ({"calls": [value(1)], "k": 0}, ValueError, "k must be at least 1"),
        ({"calls": [value(1)], "k": 1, "limit": 0}, ValueError, "limit must be at least 1"),
        ({"calls": [value(1)], "k": 1, "start": 2}, ValueError, "start=2 is more than"),
        ({"calls": [value(1)], "k": 1, "hedge_after": 0}, ValueError, "hedge_after must be"),
    ],
)
async def test_bad_arguments_are_refused(kwargs: dict[str, Any], error: type, text: str) -> None:
    """Every bad argument is refused before any call starts, naming the parameter."""
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        await quorum(**kwargs)
    with pytest.raises(error):
        quorum_sync(**kwargs)


# The thread driver ----------------------------------------------------------------------


def test_sync_quorum_returns_at_k_and_leaves_stragglers_running() -> None:
    """In threads the quorum returns at k; a straggler cannot be cancelled: it finishes later."""
    release = threading.Event()
    finished: list[str] = []

    def slow() -> str:
        release.wait(5)
        finished.append("slow")
        return "slow"

    result = quorum_sync({"a": lambda: 1, "b": lambda: 2, "slow": slow}, 2)
    assert set(result.results) == {"a", "b"}
    assert result.unfinished == ("slow",)
    release.set()
    deadline = time.monotonic() + 5
    while not finished and time.monotonic() < deadline:
        time.sleep(0.005)
    assert finished == ["slow"]


def test_sync_quorum_raises_when_impossible_and_carries_the_deadline() -> None:
    """Failures make k impossible at once; each call ran inside the caller's deadline."""
    seen: list[float] = []

    def fails() -> None:
        seen.append(resilient.remaining())
        raise ConnectionError("refused")

    with resilient.deadline(5.0), pytest.raises(QuorumError) as caught:
        quorum_sync([fails, fails, lambda: 3], 2)
    assert caught.value.reasons[0] == "ConnectionError: refused"
    assert seen
    assert all(0 < left <= 5.0 for left in seen)


def test_sync_quorum_hedges_and_honours_the_deadline() -> None:
    """A hedge asks the spare after hedge_after; a hung quorum gives up at the deadline."""
    release = threading.Event()
    try:
        result = quorum_sync(
            {"hung": lambda: release.wait(5), "fast": lambda: 1, "spare": lambda: 2},
            2,
            start=2,
            hedge_after=0.05,
        )
        assert set(result.results) == {"fast", "spare"}
        started = time.monotonic()
        with resilient.deadline(0.2), pytest.raises(QuorumError) as caught:
            quorum_sync({"hung": lambda: release.wait(5), "fast": lambda: 1}, 2)
        assert time.monotonic() - started < 1.5
        assert caught.value.reasons == {"hung": "no answer before the deadline"}
        with resilient.deadline_at(time.monotonic() - 1), pytest.raises(QuorumError):
            quorum_sync([lambda: 1], 1)
    finally:
        release.set()


def test_sync_quorum_with_an_executor_of_ones_own() -> None:
    """A given executor runs the calls and stays open; limit still bounds this gather."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        result: QuorumResult[int, int] = quorum_sync(
            [lambda: 1, lambda: 2, lambda: 3], 3, limit=1, executor=pool
        )
        assert sorted(result.values) == [1, 2, 3]
        assert pool.submit(lambda: "open").result() == "open"
        with pytest.raises(TypeError, match="executor must be"):
            quorum_sync([lambda: 1], 1, executor="pool")  # type: ignore[call-overload]


def test_sync_quorum_runs_each_call_in_the_executor_of_its_label() -> None:
    """With a pool per label, calls stuck in one label's pool never hold up the others."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    with ThreadPoolExecutor(1) as stuck, ThreadPoolExecutor(1) as free:
        stuck.submit(release.wait)  # the stuck pool's only thread is taken
        try:
            pools = {"slow": stuck, "a": free, "b": free}
            calls = {"slow": lambda: "late", "a": lambda: 1, "b": lambda: 2}
            with resilient.deadline(5.0):
                result = quorum_sync(calls, 2, executor=pools)
            assert result.results == {"a": 1, "b": 2}
            assert result.unfinished == ("slow",)
            with pytest.raises(ValueError, match="no executor to the call labelled 'b'"):
                quorum_sync(calls, 1, executor={"slow": stuck, "a": free})
            with pytest.raises(TypeError, match=r"executor\['a'\] must be"):
                quorum_sync(calls, 1, executor={**pools, "a": "pool"})  # type: ignore[dict-item]
        finally:
            release.set()


def test_sync_quorum_refuses_async_calls_instead_of_returning_coroutines() -> None:
    """A call returning a coroutine is the caller's mistake: a TypeError, not a result.

    Its coroutine is closed, so no "never awaited" warning follows the error.
    """

    async def lookup() -> str:
        return "never awaited"

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"returned an awaitable.*resilient\.quorum"):
            quorum_sync({"a": lambda: lookup(), "b": lambda: lookup()}, k=1)
        gc.collect()
    assert not [w for w in warned if issubclass(w.category, RuntimeWarning)]
