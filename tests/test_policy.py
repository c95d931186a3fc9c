"""Policy: the fused driver of bulkhead, deadline, retry, breaker and attempt timeout."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pybreaker
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider

import resilient
import resilient.chaos
from resilient._compat.pybreaker import PyBreakerOpenError


@pytest.fixture(autouse=True)
def waits(record_waits: list[float]) -> list[float]:
    """Retry waits are recorded, not slept (tests that need real time parametrize it away)."""
    return record_waits


def flaky(failures: int, error: type[Exception] = ConnectionError) -> Any:
    """A function that fails `failures` times, then returns the number of calls."""
    calls = {"n": 0}

    def fn() -> int:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise error(f"failure {calls['n']}")
        return calls["n"]

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


async def cancel_once_started(fn: Any, started: asyncio.Event) -> None:
    """Run fn() as a task, cancel it from outside once it has started, expect CancelledError."""
    task = asyncio.create_task(fn())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def no_budget_retry(**kwargs: Any) -> resilient.Retry:
    kwargs.setdefault("attempts", 3)
    return resilient.Retry(budget=None, **kwargs)


# Decorating -----------------------------------------------------------------------------


def test_wrapper_keeps_name_doc_signature_and_kind() -> None:
    """Introspection sees the wrapped function, sync and async alike."""
    policy = resilient.Policy(retry=no_budget_retry())

    @policy
    def fetch(key: str, *, fresh: bool = False) -> str:
        """Fetch a key."""
        return key

    @policy
    async def afetch(key: str) -> str:
        """Fetch a key, async."""
        return key

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a key."
    assert inspect.signature(fetch) == inspect.signature(fetch.__wrapped__)
    assert list(inspect.signature(fetch).parameters) == ["key", "fresh"]
    assert not inspect.iscoroutinefunction(fetch)
    assert inspect.iscoroutinefunction(afetch)
    assert afetch.__name__ == "afetch"
    assert fetch("k", fresh=True) == "k"


def test_methods_bind_self() -> None:
    """A decorated method receives its instance."""

    class Client:
        def __init__(self) -> None:
            self.base = "x"

        @resilient.Policy(retry=no_budget_retry())
        def get(self, key: str) -> str:
            return self.base + key

        @resilient.Policy(retry=no_budget_retry())
        async def aget(self, key: str) -> str:
            return self.base + key

    client = Client()
    assert client.get("1") == "x1"
    assert asyncio.run(client.aget("2")) == "x2"


def test_generators_are_refused() -> None:
    """A retried generator would replay items it already yielded."""

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        resilient.Policy(retry=no_budget_retry())(gen)
    with pytest.raises(TypeError, match="generator"):
        resilient.Policy(retry=no_budget_retry())(agen)


def test_call_and_acall_run_inline() -> None:
    """policy.call / policy.acall apply the stages without decorating."""
    policy = resilient.Policy(retry=no_budget_retry())
    fn = flaky(2)
    assert policy.call(fn) == 3

    async def add(a: int, b: int) -> int:
        return a + b

    assert asyncio.run(policy.acall(add, 1, b=2)) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": timedelta(seconds=-1)}, "timeout"),
        ({"attempt_timeout": -0.5}, "attempt_timeout"),
        ({"attempt_timeout": float("nan")}, "attempt_timeout"),
        ({"name": "  "}, "name"),
        ({"retry": 3}, "retry"),
        ({"bulkhead": 3}, "bulkhead"),
        ({"breaker": object()}, "breaker"),
    ],
)
def test_bad_configuration_names_the_parameter(kwargs: dict[str, Any], match: str) -> None:
    """Every bad value is refused at construction, naming the parameter."""
    with pytest.raises((TypeError, ValueError), match=match):
        resilient.Policy(**kwargs)


@pytest.mark.parametrize("name", ["timeout", "attempt_timeout"])
@pytest.mark.parametrize("zero", [0, 0.0, timedelta(0)])
def test_a_zero_time_limit_is_refused_because_nothing_could_succeed(name: str, zero: Any) -> None:
    """timeout=0 (or attempt_timeout=0) would fail every call: refused, naming the parameter."""
    with pytest.raises(ValueError, match=rf"^{name} must be greater than zero.*never succeed"):
        resilient.Policy(**{name: zero})


# Retry through the driver --------------------------------------------------------------


def test_retry_until_success_sync(waits: list[float]) -> None:
    """Two failures then a success: the caller sees the result, after two waits."""
    fn = flaky(2)
    assert resilient.Policy(retry=no_budget_retry())(fn)() == 3
    assert len(waits) == 2


async def test_retry_until_success_async() -> None:
    """The async driver retries the same way."""
    calls = 0

    @resilient.Policy(retry=no_budget_retry())
    async def fn() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls < 3:
            raise ConnectionError("down")
        return calls

    assert await fn() == 3


def test_exhausted_retries_raise_the_last_original_error_with_notes() -> None:
    """No wrapper: the last exception itself, annotated with what happened."""
    fn = flaky(10)
    with pytest.raises(ConnectionError, match="failure 3") as caught:
        resilient.Policy(retry=no_budget_retry())(fn)()
    notes = "\n".join(caught.value.__notes__)
    assert "3 attempts" in notes
    assert fn.calls["n"] == 3


def test_errors_not_matching_on_are_not_retried() -> None:
    """Only the configured exception types are retried."""
    fn = flaky(1, error=KeyError)
    with pytest.raises(KeyError):
        resilient.Policy(retry=no_budget_retry(on=ConnectionError))(fn)()
    assert fn.calls["n"] == 1


def test_result_retry_returns_last_result_when_exhausted() -> None:
    """A result predicate retries; when attempts run out the last result is returned."""
    results = iter([None, None, None, 4])

    @resilient.Policy(retry=no_budget_retry(on_result=lambda r: r is None))
    def fn() -> int | None:
        return next(results)

    assert fn() is None
    assert next(results) == 4


def test_keyboard_interrupt_is_neither_retried_nor_counted() -> None:
    """Interrupts pass straight through; the breaker does not count them."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    calls = 0

    @resilient.Policy(retry=no_budget_retry(), breaker=breaker)
    def fn() -> None:
        nonlocal calls
        calls += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fn()
    assert calls == 1
    assert breaker.state == resilient.BreakerState.CLOSED


async def test_cancellation_is_neither_retried_nor_counted() -> None:
    """A cancelled call propagates CancelledError; breaker and bulkhead are left clean."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    bulkhead = resilient.Bulkhead(max_concurrent=1)
    started = asyncio.Event()
    calls = 0

    @resilient.Policy(bulkhead=bulkhead, retry=no_budget_retry(), breaker=breaker)
    async def fn() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(10)

    await cancel_once_started(fn, started)
    assert calls == 1
    assert breaker.state == resilient.BreakerState.CLOSED
    assert bulkhead.available == 1


def test_concurrent_threads_keep_their_own_attempt_counts() -> None:
    """Per-call state is per call: 16 threads each fail twice then succeed with attempts=3."""
    local = threading.local()
    barrier = threading.Barrier(16)
    policy = resilient.Policy(retry=no_budget_retry())

    @policy
    def fn() -> int:
        local.calls = getattr(local, "calls", 0) + 1
        if local.calls == 1:
            barrier.wait()
        if local.calls < 3:
            raise ConnectionError("down")
        return local.calls

    results: list[int] = []

    def worker() -> None:
        results.append(fn())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [3] * 16


async def test_concurrent_tasks_keep_their_own_attempt_counts() -> None:
    """The same for 50 asyncio tasks interleaving their attempts."""
    policy = resilient.Policy(retry=no_budget_retry())

    async def one() -> int:
        calls = 0

        async def attempt() -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            if calls < 3:
                raise ConnectionError("down")
            return calls

        return await policy.acall(attempt)

    assert await asyncio.gather(*(one() for _ in range(50))) == [3] * 50


# Breaker inside retry ------------------------------------------------------------------


def test_breaker_sees_every_attempt_and_stops_the_retries() -> None:
    """Retry wraps the breaker: each attempt counts, and once open the call fails fast."""
    breaker = resilient.CircuitBreaker(failure_threshold=2, reset_timeout=60)
    fn = flaky(10)
    with pytest.raises(resilient.CircuitOpenError) as caught:
        resilient.Policy(retry=no_budget_retry(attempts=5), breaker=breaker)(fn)()
    assert fn.calls["n"] == 2
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert breaker.state == resilient.BreakerState.OPEN


def test_open_breaker_rejects_without_calling() -> None:
    """An open circuit fails fast with retry_after, and the function is not called."""
    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=30)
    fn = flaky(10)
    wrapped = resilient.Policy(breaker=breaker)(fn)
    with pytest.raises(ConnectionError):
        wrapped()
    with pytest.raises(resilient.CircuitOpenError) as caught:
        wrapped()
    assert 0 < caught.value.retry_after <= 30
    assert fn.calls["n"] == 1


# Deadlines -----------------------------------------------------------------------------


def test_attempt_timeout_is_a_cooperative_deadline_for_sync_code() -> None:
    """A sync attempt sees the shorter of its own and the total deadline."""
    seen: list[float] = []

    @resilient.Policy(timeout=5.0, attempt_timeout=0.5)
    def fn() -> None:
        seen.append(resilient.remaining())

    fn()
    assert 0.4 < seen[0] <= 0.5
    assert resilient.remaining() == float("inf")


def test_timeout_clamps_to_an_enclosing_deadline() -> None:
    """The policy's timeout never extends the caller's deadline."""
    seen: list[float] = []

    @resilient.Policy(timeout=5.0)
    def fn() -> None:
        seen.append(resilient.remaining())

    with resilient.deadline(0.3):
        fn()
    assert seen[0] <= 0.3


def test_expired_deadline_raises_before_calling() -> None:
    """No attempt starts once the deadline has passed."""
    fn = flaky(0)
    with resilient.deadline(0), pytest.raises(resilient.DeadlineExceeded):
        resilient.Policy(retry=no_budget_retry())(fn)()
    assert fn.calls["n"] == 0


@pytest.mark.parametrize("waits", [None])
def test_sync_retries_stay_within_the_deadline_plus_one_attempt(waits: None) -> None:
    """A 1 s deadline around a slowly failing sync call ends by 1 s + the attempt in flight."""
    attempt_seconds = 0.15

    @resilient.Policy(
        timeout=1.0,
        retry=resilient.Retry(
            attempts=100,
            budget=None,
            backoff=resilient.Backoff(initial=0.05, max_delay=0.2, jitter="none"),
        ),
    )
    def slow_failure() -> None:
        time.sleep(attempt_seconds)
        raise ConnectionError("slow failure")

    started = time.monotonic()
    with pytest.raises(ConnectionError) as caught:
        slow_failure()
    elapsed = time.monotonic() - started
    assert elapsed <= 1.0 + attempt_seconds + 0.05
    assert "deadline" in "\n".join(caught.value.__notes__)


@pytest.mark.parametrize("waits", [None])
async def test_async_retries_end_within_the_deadline(waits: None) -> None:
    """A 1 s deadline around a slowly failing async call ends within 1 s: the attempt is cut."""

    @resilient.Policy(
        retry=resilient.Retry(
            attempts=100,
            budget=None,
            backoff=resilient.Backoff(initial=0.05, max_delay=0.2, jitter="none"),
        )
    )
    async def slow_failure() -> None:
        await asyncio.sleep(0.3)
        raise ConnectionError("slow failure")

    started = time.monotonic()
    with pytest.raises((ConnectionError, resilient.DeadlineExceeded)):
        async with resilient.deadline(1.0):
            await slow_failure()
    assert time.monotonic() - started <= 1.05


async def test_async_attempt_timeout_cancels_and_retries() -> None:
    """Each async attempt is cancelled at attempt_timeout; the breaker counts it as a failure."""
    breaker = resilient.CircuitBreaker(failure_threshold=10)
    calls = 0

    @resilient.Policy(retry=no_budget_retry(attempts=3), breaker=breaker, attempt_timeout=0.02)
    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded, match="attempt_timeout") as caught:
        await hangs()
    assert calls == 3
    assert time.monotonic() - started < 1.0
    assert "3 attempts" in "\n".join(caught.value.__notes__)
    assert breaker.metrics().consecutive_failures == 3
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_async_timeout_bounds_the_whole_call() -> None:
    """timeout= cancels a hanging async call even without retries."""

    @resilient.Policy(timeout=0.03)
    async def hangs() -> None:
        await asyncio.sleep(10)

    with pytest.raises(resilient.DeadlineExceeded, match="deadline"):
        await hangs()


async def test_suspending_coroutines_get_values_and_errors_back() -> None:
    """A coroutine that suspends many times sees awaited values and exceptions as usual."""

    async def produce(value: int) -> int:
        await asyncio.sleep(0)
        return value

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("inner")

    @resilient.Policy(timeout=5.0, attempt_timeout=1.0)
    async def fn() -> int:
        total = 0
        for i in range(5):
            total += await produce(i)
        try:
            await fail()
        except ValueError:
            total += 100
        return total

    assert await fn() == 110


async def test_swallowed_timeout_leaves_no_pending_cancellation() -> None:
    """If the function swallows the attempt's cancellation, no stray cancel leaks out."""

    @resilient.Policy(attempt_timeout=0.01)
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"  # pragma: no cover

    assert await stubborn() == "swallowed"
    await asyncio.sleep(0.02)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_outer_cancellation_is_not_a_timeout() -> None:
    """A cancel from outside stays CancelledError even with an attempt timer armed."""
    started = asyncio.Event()

    @resilient.Policy(attempt_timeout=5.0, retry=no_budget_retry())
    async def fn() -> None:
        started.set()
        await asyncio.sleep(10)

    await cancel_once_started(fn, started)


async def test_awaitable_returned_by_plain_function_works_with_acall() -> None:
    """acall accepts a plain function that returns an awaitable (e.g. a future)."""
    loop = asyncio.get_running_loop()

    def make_future() -> asyncio.Future[int]:
        future: asyncio.Future[int] = loop.create_future()
        loop.call_soon(future.set_result, 7)
        return future

    assert await resilient.Policy(attempt_timeout=1.0).acall(make_future) == 7


# Bulkhead ------------------------------------------------------------------------------


def test_bulkhead_limits_concurrency_and_sheds_load() -> None:
    """max_concurrent run, the rest are rejected at once with BulkheadFull."""
    bulkhead = resilient.Bulkhead(max_concurrent=2)
    release = threading.Event()
    inside = threading.Barrier(3)

    @resilient.Policy(bulkhead=bulkhead)
    def hold() -> None:
        inside.wait()
        release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()
    with pytest.raises(resilient.BulkheadFull):
        hold()
    release.set()
    for thread in threads:
        thread.join()
    assert bulkhead.available == 2


# pybreaker as the breaker stage --------------------------------------------------------


class Recorder(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.failures = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append((old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.failures += 1


def test_pybreaker_rules_and_listeners_keep_working() -> None:
    """A pybreaker breaker trips by its own fail_max and tells its listeners."""
    listener = Recorder()
    breaker = pybreaker.CircuitBreaker(
        fail_max=2, reset_timeout=60, listeners=[listener], throw_new_error_on_trip=False
    )
    fn = flaky(10)
    wrapped = resilient.Policy(breaker=breaker)(fn)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            wrapped()
    with pytest.raises(pybreaker.CircuitBreakerError) as caught:
        wrapped()
    assert isinstance(caught.value, resilient.CircuitOpenError)
    assert isinstance(caught.value, PyBreakerOpenError)
    assert 0 < caught.value.retry_after <= 60
    assert fn.calls["n"] == 2
    assert listener.failures == 2
    assert listener.changes == [("closed", "open")]


def test_pybreaker_trip_error_and_excluded_exceptions() -> None:
    """throw_new_error_on_trip and exclude keep pybreaker's meaning."""
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60, exclude=[KeyError])
    wrapped = resilient.Policy(breaker=breaker)(flaky(10, error=KeyError))
    for _ in range(3):
        with pytest.raises(KeyError):
            wrapped()
    assert breaker.current_state == "closed"
    failing = resilient.Policy(breaker=breaker)(flaky(10))
    with pytest.raises(resilient.CircuitOpenError) as caught:
        failing()
    assert isinstance(caught.value.__cause__, pybreaker.CircuitBreakerError)
    assert breaker.current_state == "open"


def test_pybreaker_half_open_admits_one_probe_and_closes() -> None:
    """After reset_timeout one trial call runs; concurrent callers are rejected, not queued."""
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60)
    breaker.open()
    breaker.half_open()
    probing = threading.Event()
    release = threading.Event()

    @resilient.Policy(breaker=breaker)
    def probe() -> str:
        probing.set()
        release.wait()
        return "ok"

    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(probe()))
    thread.start()
    probing.wait()
    with pytest.raises(resilient.CircuitOpenError):
        probe()
    release.set()
    thread.join()
    assert results == ["ok"]
    assert breaker.current_state == "closed"


# Standalone stages are one-stage policies ----------------------------------------------


def test_retry_and_breaker_work_alone_sync_and_async() -> None:
    """@Retry, @CircuitBreaker, .call and .acall behave like a Policy with that stage."""
    retry = no_budget_retry()
    assert retry(flaky(2))() == 3
    assert retry.call(flaky(1)) == 2
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    assert breaker.call(lambda: "ok") == "ok"

    async def answer(value: int) -> int:
        await asyncio.sleep(0)
        return value

    assert asyncio.run(retry.acall(answer, 5)) == 5
    assert asyncio.run(breaker.acall(answer, 6)) == 6
    assert inspect.iscoroutinefunction(retry(answer))
    assert inspect.iscoroutinefunction(breaker(answer))


def test_policy_repr_names_its_stages() -> None:
    """repr shows the configured stages and nothing else."""
    text = repr(resilient.Policy(timeout=2.0, attempt_timeout=0.5))
    assert text.startswith("Policy(")
    assert "timeout=2.0" in text
    assert "attempt_timeout=0.5" in text
    assert "retry" not in text


def test_infinite_timeouts_mean_none() -> None:
    """math.inf for timeout or attempt_timeout is the same as not setting it."""
    policy = resilient.Policy(timeout=float("inf"), attempt_timeout=float("inf"))
    assert policy.timeout is None
    assert policy.attempt_timeout is None
    assert policy.call(lambda: resilient.remaining()) == float("inf")


def test_deadline_passing_during_a_wait_returns_the_last_error() -> None:
    """If the deadline passes while waiting, the caller gets the last error, annotated."""

    def overrun(event: resilient.RetryEvent) -> None:
        time.sleep(0.06)  # with the wait, this overruns the 50 ms budget left

    retry = resilient.Retry(
        attempts=5,
        budget=None,
        backoff=resilient.Backoff(initial=0.001, jitter="none"),
        on_retry=overrun,
    )
    fn = flaky(10)
    with pytest.raises(ConnectionError, match="failure 1") as caught:
        resilient.Policy(timeout=0.05, retry=retry)(fn)()
    assert fn.calls["n"] == 1
    assert "deadline" in "\n".join(caught.value.__notes__)


async def test_async_result_retry_and_open_breaker_after_retries() -> None:
    """The async driver retries on results, and stops at once when the breaker opens."""
    values = iter([None, 2])

    @resilient.Policy(retry=no_budget_retry(on_result=lambda value: value is None))
    async def eventually() -> int | None:
        return next(values)

    assert await eventually() == 2

    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=60)
    calls = 0

    @resilient.Policy(retry=no_budget_retry(attempts=5), breaker=breaker)
    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(resilient.CircuitOpenError) as caught:
        await down()
    assert calls == 1
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert "circuit breaker opened" in "\n".join(caught.value.__notes__)


async def test_async_deadline_passed_before_the_first_attempt() -> None:
    """An async call under an expired deadline raises without running."""
    calls = 0

    @resilient.Policy(timeout=5.0)
    async def fn() -> None:
        nonlocal calls
        calls += 1

    with resilient.deadline(0), pytest.raises(resilient.DeadlineExceeded, match="before"):
        await fn()
    assert calls == 0


async def test_async_bulkhead_waits_for_a_slot() -> None:
    """A task that finds the bulkhead busy waits for a slot instead of failing."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1)
    release = asyncio.Event()

    @resilient.Policy(bulkhead=bulkhead)
    async def hold(tag: str) -> str:
        await release.wait()
        return tag

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("second"))
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    release.set()
    assert await asyncio.gather(first, second) == ["first", "second"]
    assert bulkhead.available == 1


async def test_closing_a_suspended_attempt_closes_the_inner_coroutine() -> None:
    """Closing the outer coroutine mid-attempt closes the wrapped one (its finally runs)."""
    cleaned = []
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()

    @resilient.Policy(attempt_timeout=5.0)
    async def fn() -> None:
        try:
            await never
        finally:
            cleaned.append(True)

    coro = fn()
    coro.send(None)  # runs until the attempt suspends on `never`
    coro.close()
    assert cleaned == [True]


async def test_exceptions_thrown_into_a_suspended_attempt_reach_it() -> None:
    """A future failing while the attempt waits raises inside the wrapped coroutine."""
    loop = asyncio.get_running_loop()

    @resilient.Policy(attempt_timeout=5.0)
    async def fn() -> str:
        future: asyncio.Future[None] = loop.create_future()
        loop.call_soon(future.set_exception, KeyError("inner"))
        try:
            await future
        except KeyError:
            await asyncio.sleep(0)
            return "handled"
        return "not reached"  # pragma: no cover

    assert await fn() == "handled"


async def test_bounded_call_that_never_suspends_returns_its_value() -> None:
    """With a timeout, a coroutine that finishes at once still returns (no timer needed)."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)

    @resilient.Policy(timeout=5.0, attempt_timeout=1.0, breaker=breaker)
    async def cached(key: str) -> str:
        return key.upper()

    assert await cached("hit") == "HIT"
    with pytest.raises(ZeroDivisionError):
        await resilient.Policy(timeout=5.0, breaker=breaker).acall(_divide_by_zero)
    with pytest.raises(resilient.CircuitOpenError):
        await cached("rejected")


async def _divide_by_zero() -> float:
    return 1 / 0


def test_pybreaker_goes_half_open_after_its_reset_timeout() -> None:
    """Once pybreaker's reset_timeout has passed, the next call is the trial call."""
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=0.01)
    stage = resilient.Policy(breaker=breaker)
    with pytest.raises(resilient.CircuitOpenError):
        stage.call(flaky(10))
    assert breaker.current_state == "open"
    time.sleep(0.02)
    assert stage.call(lambda: "recovered") == "recovered"
    assert breaker.current_state == "closed"
    assert stage.breaker is breaker


# Sync and async mix-ups -------------------------------------------------------------


@pytest.mark.parametrize(
    "wrapper",
    [
        resilient.Policy(retry=resilient.Retry(attempts=3)),
        resilient.Retry(attempts=3),
        resilient.CircuitBreaker(failure_threshold=3),
    ],
    ids=["Policy", "Retry", "CircuitBreaker"],
)
def test_call_given_an_async_function_points_to_acall(wrapper: Any) -> None:
    """.call(async_fn) is refused before running it: nothing would be retried or timed."""
    ran: list[int] = []

    async def fetch() -> int:
        ran.append(1)
        return 1

    with pytest.raises(TypeError, match=r"acall\(\) instead"):
        wrapper.call(fetch)
    assert ran == []


async def test_acall_given_a_sync_function_runs_it_once_and_refuses() -> None:
    """acall(sync_fn) fails at once with a TypeError: no retry repeats its side effects."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    policy = resilient.Policy(retry=resilient.Retry(attempts=5, budget=None), breaker=breaker)
    ran: list[int] = []

    def charge() -> str:
        ran.append(1)
        return "charged"

    with pytest.raises(TypeError, match="not an awaitable"):
        await policy.acall(charge)
    assert ran == [1]
    assert breaker.state is resilient.BreakerState.CLOSED  # the caller's mistake, not a failure


async def test_an_object_with_async_call_is_driven_as_async() -> None:
    """A callable object whose __call__ is async gets retries and timeouts like an async def."""

    class Client:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self) -> str:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("reset")
            return "ok"

    client = Client()
    wrapped = resilient.Policy(retry=resilient.Retry(attempts=2, budget=None), timeout=1.0)(client)
    assert inspect.iscoroutinefunction(wrapped)
    with resilient.instant_retries():
        assert await wrapped() == "ok"
    assert client.calls == 2


def test_a_sync_wrapper_around_an_async_function_is_refused_not_counted_healthy() -> None:
    """An async function behind a decorator without wraps is caught at its first call."""
    breaker = resilient.CircuitBreaker(failure_threshold=1, failure_rate=None)

    async def real() -> str:
        return "never awaited"

    def hides_it(fn: Any) -> Any:
        def wrapper() -> Any:  # no functools.wraps: looks like a plain function
            return fn()

        return wrapper

    wrapped = resilient.Policy(breaker=breaker, timeout=1.0)(hides_it(real))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, never left un-awaited
        with pytest.raises(TypeError, match="it is async"):
            wrapped()
    assert breaker.metrics().total_failures == 0


def test_decorating_something_that_is_not_callable_is_refused() -> None:
    """@Policy(...) over a non-callable fails at decoration, naming what it got."""
    with pytest.raises(TypeError, match="decorates callables, got int"):
        resilient.Policy()(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorates callables, got str"):
        resilient.Retry()("fetch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorates callables, got NoneType"):
        resilient.CircuitBreaker()(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("decorator", [resilient.Retry, resilient.CircuitBreaker, resilient.Policy])
def test_a_decorator_written_without_parentheses_says_to_add_them(decorator: type) -> None:
    """@Retry, @CircuitBreaker and @Policy over a function fail at once, showing the fix."""
    name = decorator.__name__
    with pytest.raises(TypeError, match=rf"^{name} is a class: write @{name}\(\) \(with paren"):

        @decorator
        def fetch() -> None: ...

    with pytest.raises(TypeError, match=rf"^{name} is a class: .* to decorate \S*Holder\.fetch,"):

        class Holder:
            @decorator
            @classmethod
            def fetch(cls) -> None: ...


def _decorators() -> list[Any]:
    """One of each decorator, retrying (where it can) so that a failure shows it applies."""
    return [
        pytest.param(lambda: no_budget_retry(), id="Retry"),
        pytest.param(lambda: resilient.CircuitBreaker(failure_threshold=1), id="CircuitBreaker"),
        pytest.param(lambda: resilient.Policy(retry=no_budget_retry()), id="Policy"),
    ]


@pytest.mark.parametrize("make", _decorators())
def test_decorators_over_staticmethod_and_classmethod_keep_the_binding(make: Any) -> None:
    """@Retry() over @staticmethod / @classmethod: called on the class or an instance, the
    function gets no self (static) or the class (classmethod), sync and async alike."""
    decorator = make()

    class Service:
        @decorator
        @staticmethod
        def double(value: int) -> int:
            """Twice the value."""
            return 2 * value

        @decorator
        @classmethod
        def kind(cls, suffix: str) -> str:
            return cls.__name__ + suffix

        @decorator
        @staticmethod
        async def later(value: int) -> int:
            await asyncio.sleep(0)
            return value

        @decorator
        @classmethod
        async def later_kind(cls) -> str:
            return cls.__name__

    class Special(Service):
        pass

    assert isinstance(vars(Service)["double"], staticmethod)
    assert isinstance(vars(Service)["kind"], classmethod)
    assert Service.double(2) == Service().double(2) == 4
    assert Service.double.__doc__ == "Twice the value."
    assert Service.kind("!") == Service().kind("!") == "Service!"
    assert Special.kind("?") == "Special?"
    assert inspect.iscoroutinefunction(Service.later)
    assert asyncio.run(Service().later(3)) == 3
    assert asyncio.run(Special.later_kind()) == "Special"


def test_the_driver_applies_to_the_function_inside_a_staticmethod() -> None:
    """The retries happen: a staticmethod that fails twice is retried to success."""
    fn = flaky(2)

    class Service:
        fetch = no_budget_retry()(staticmethod(fn))

    assert Service().fetch() == 3


# Pickling -------------------------------------------------------------------------------


def test_policy_pickles_as_its_stages_with_fresh_state() -> None:
    """A pickled Policy keeps its settings; its breaker comes back closed, its budget empty."""
    breaker = resilient.CircuitBreaker(name="svc", failure_threshold=2, reset_timeout=60)
    budget = resilient.RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10)
    policy = resilient.Policy(
        timeout=2.0,
        retry=resilient.Retry(attempts=3, budget=budget),
        breaker=breaker,
        attempt_timeout=0.5,
        name="prices",
        tracing=False,
    )
    with pytest.raises(ConnectionError):
        policy(flaky(5))()  # retried once (all the budget allows), and the breaker opens
    assert (budget.available(), breaker.state) == (0, resilient.BreakerState.OPEN)
    copy = pickle.loads(pickle.dumps(policy))
    assert repr(copy) == repr(policy).replace("state=open", "state=closed")
    assert (copy.timeout, copy.attempt_timeout, copy.name, copy.tracing) == (
        2.0,
        0.5,
        "prices",
        False,
    )
    assert copy.breaker.state is resilient.BreakerState.CLOSED
    assert copy.retry.budget.available() == 1
    assert copy(flaky(1))() == 2  # its own stages, working


def test_policy_pickles_a_picklable_tracer_provider() -> None:
    """An explicit provider that pickles is kept; the copy still records explicitly."""
    copy = pickle.loads(pickle.dumps(resilient.Policy(tracer_provider=NoOpTracerProvider())))
    assert copy.telemetry is not None
    assert isinstance(copy.telemetry.tracer_provider, NoOpTracerProvider)
    assert copy.telemetry.explicit


def test_policy_with_a_process_bound_provider_names_it_when_pickled() -> None:
    """An SDK TracerProvider holds locks: the error names tracer_provider and what to do."""
    policy = resilient.Policy(tracer_provider=TracerProvider())
    with pytest.raises(pickle.PicklingError, match=r"its tracer_provider .* global provider"):
        pickle.dumps(policy)


def test_a_rate_limit_stage_is_released_like_the_bulkhead() -> None:
    """Policy(rate_limit=X, bulkhead=Y): X is released after each call, and when Y refuses."""
    outer = resilient.Bulkhead(max_concurrent=2)  # any Admission may be the rate_limit stage
    inner = resilient.Bulkhead(max_concurrent=1)
    policy = resilient.Policy(rate_limit=outer, bulkhead=inner, retry=None)
    for _ in range(3):
        assert policy.call(int, "1") == 1
    assert (outer.active, inner.active) == (0, 0)
    with inner, pytest.raises(resilient.BulkheadFull):  # the slot is taken: Y refuses
        policy.call(int, "1")
    assert outer.active == 0  # X, which had admitted the call, was given back


class _Tagging:
    """An injector of one's own: it records the order it runs in and passes the call on."""

    def __init__(self, tag: str, seen: list[str]) -> None:
        self.tag, self.seen = tag, seen

    def wrap(self, fn: Any, asynchronous: bool) -> Any:
        if asynchronous:

            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                self.seen.append(self.tag)
                return await fn(*args, **kwargs)

            return wrapped_async

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(self.tag)
            return fn(*args, **kwargs)

        return wrapped


def test_chaos_injectors_run_innermost_first_listed_outermost_on_every_attempt() -> None:
    """Each attempt, retries included, passes through the injectors in list order."""
    seen: list[str] = []
    policy = resilient.Policy(
        retry=resilient.Retry(attempts=2),
        chaos=[_Tagging("a", seen), _Tagging("b", seen)],
    )
    fn = flaky(1)
    assert policy(fn)() == 2
    assert seen == ["a", "b", "a", "b"]
    assert "chaos=" in repr(policy)


async def test_chaos_injectors_wrap_async_calls() -> None:
    """An async function gets the injectors' async wrappers; one injector alone needs no list."""
    seen: list[str] = []
    policy = resilient.Policy(chaos=_Tagging("only", seen))

    @policy
    async def fetch() -> str:
        return "ok"

    assert await fetch() == "ok"
    assert seen == ["only"]


@pytest.mark.parametrize(
    "chaos", ["fault", 3, [object()], [None], _Tagging, [_Tagging], [resilient.chaos.Fault]]
)
def test_chaos_refuses_what_is_not_an_injector(chaos: Any) -> None:
    """A string, a number, a stage's class (not an instance), or a list holding one is refused."""
    with pytest.raises(TypeError, match="chaos"):
        resilient.Policy(chaos=chaos)


def test_a_chaos_stage_whose_wrap_returns_no_callable_is_named() -> None:
    """An injector whose wrap() returns no callable is named in a TypeError."""

    class Broken:
        def wrap(self, fn: Any, asynchronous: bool) -> Any:
            return None

    policy = resilient.Policy(chaos=[Broken()])
    with pytest.raises(TypeError, match="returned None from wrap"):
        policy(lambda: 1)()


def test_an_empty_chaos_list_is_no_chaos_and_resume_refuses_chaos() -> None:
    """chaos=[] injects nothing; resume() cannot honour injectors, so it says so."""
    assert resilient.Policy(chaos=[]).chaos == ()
    assert repr(resilient.Policy(chaos=[])) == "Policy()"
    with pytest.raises(ValueError, match="chaos"):
        resilient.Policy(chaos=[_Tagging("x", [])]).resume(lambda: 1, False)


def test_rate_limit_and_adaptive_bulkhead_together_still_teach_the_limit() -> None:
    """Behind a rate limiter the adaptive bulkhead still hears each call's outcome."""
    limit = resilient.AdaptiveLimit.aimd(initial_limit=30, min_limit=1)
    policy = resilient.Policy(
        rate_limit=resilient.RateLimiter(rate=1000, per=1.0, burst=10),
        bulkhead=resilient.Bulkhead(max_concurrent=limit),
    )

    def slow() -> None:
        raise TimeoutError

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain release() would warn that nothing was learnt
        with pytest.raises(TimeoutError):
            policy.call(slow)
    assert limit.limit == 27  # the timeout was a drop: 30 * 0.9


async def test_rate_limit_and_adaptive_bulkhead_teach_the_limit_in_async_code() -> None:
    """The async driver passes the tickets through the rate limiter too."""
    limit = resilient.AdaptiveLimit.aimd(initial_limit=30, min_limit=1)
    policy = resilient.Policy(
        rate_limit=resilient.RateLimiter(rate=1000, per=1.0, burst=10),
        bulkhead=resilient.Bulkhead(max_concurrent=limit),
    )

    @policy
    async def slow() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await slow()
    assert limit.limit == 27
