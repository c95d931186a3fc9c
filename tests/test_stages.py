"""The stage contract: stages of your own plug into Policy, and the driver keeps its rules."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from typing import Any

import httpx
import pytest

import resilient
from resilient import _driver
from resilient.deadline import current as current_deadline
from resilient.testing import FakeClock, instant_retries, record_sleeps


class Denied(resilient.ResilientError):
    """A refusal by the gate below."""


class CountingGate:
    """A gate of our own: refuses while ``closed_for_maintenance`` is set, counts outcomes."""

    def __init__(self) -> None:
        self.closed_for_maintenance = False
        self.outcomes: list[str] = []
        self.tickets: list[object] = []

    def before_call(self) -> object:
        if self.closed_for_maintenance:
            raise Denied("down for maintenance")
        ticket = object()
        self.tickets.append(ticket)
        return ticket

    def on_success(self, ticket: object) -> None:
        assert ticket is self.tickets.pop()
        self.outcomes.append("success")

    def on_failure(self, ticket: object, error: Exception) -> None:
        assert ticket is self.tickets.pop()
        self.outcomes.append(f"failure:{type(error).__name__}")

    def on_abort(self, ticket: object) -> None:
        assert ticket is self.tickets.pop()
        self.outcomes.append("abort")


class OneAtATime:
    """An admission stage of our own: one call at a time, refusing the rest at once."""

    def __init__(self) -> None:
        self.busy = False
        self.released = 0

    def try_acquire(self) -> bool:
        if self.busy:
            return False
        self.busy = True
        return True

    def acquire(self) -> None:
        raise resilient.BulkheadFull("one-at-a-time", 1, 0)

    async def acquire_async(self) -> None:
        self.acquire()

    def release(self) -> None:
        self.busy = False
        self.released += 1


class TwiceRetrier:
    """A retrier of our own: exactly one retry for ConnectionError, no wait."""

    def __init__(self) -> None:
        self.calls = 0
        self.gave_up: list[str | None] = []

    @property
    def clock(self) -> Any:
        return time.monotonic

    @property
    def judges_results(self) -> bool:
        return False

    def count_call(self, now: float) -> None:
        self.calls += 1

    def begin(self, started: float) -> dict[str, int]:
        return {"attempts": 0}

    def next_delay(
        self,
        state: Any,
        *,
        now: float,
        deadline: float,
        error: Exception | None = None,
        result: object = None,
    ) -> float | None:
        state["attempts"] += 1
        if isinstance(error, ConnectionError) and state["attempts"] < 2:
            return 0.0
        return None

    def give_up(self, state: Any, error: BaseException, reason: str | None = None) -> None:
        self.gave_up.append(reason)
        error.add_note(f"TwiceRetrier gave up after {state['attempts']} attempts")


def failing_then(value: object, failures: int) -> Any:
    calls = {"n": 0}

    def fn() -> object:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise ConnectionError(f"failure {calls['n']}")
        return value

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_user_written_stages_plug_into_policy() -> None:
    """A gate, an admission stage and a retrier of one's own are driven like the built-in ones."""
    gate, admission, retrier = CountingGate(), OneAtATime(), TwiceRetrier()
    policy = resilient.Policy(bulkhead=admission, retry=retrier, breaker=gate)
    assert policy.call(failing_then("ok", 1)) == "ok"
    assert gate.outcomes == ["failure:ConnectionError", "success"]
    assert retrier.calls == 1
    assert admission.released == 1
    assert not admission.busy

    with pytest.raises(ConnectionError, match="failure 2") as caught:
        policy.call(failing_then("never", 5))
    assert "TwiceRetrier gave up after 2 attempts" in caught.value.__notes__
    assert not gate.tickets
    assert admission.released == 2


def test_a_user_gate_refusing_during_retries_ends_them_with_its_error() -> None:
    """The refusal ends the retries at once, chained to the failure that came before it."""
    gate, retrier = CountingGate(), TwiceRetrier()

    def fail_and_close() -> None:
        gate.closed_for_maintenance = True
        raise ConnectionError("down")

    with pytest.raises(Denied) as caught:
        resilient.Policy(retry=retrier, breaker=gate).call(fail_and_close)
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert retrier.gave_up == ["circuit open"]


async def test_user_written_stages_drive_async_calls_and_hear_cancellation() -> None:
    """In async code the same stages are driven, and a cancelled attempt is an abort."""
    gate = CountingGate()
    admission = OneAtATime()
    started = asyncio.Event()

    @resilient.Policy(bulkhead=admission, breaker=gate, timeout=5.0)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await started.wait()
    assert admission.busy
    with pytest.raises(resilient.BulkheadFull):
        await slow()  # the stage's own refusal, as its acquire_async raised it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.outcomes == ["abort"]
    assert not admission.busy


def test_policy_refuses_objects_that_are_no_stage() -> None:
    """Passing something that is not a stage names the protocol it should implement."""
    with pytest.raises(TypeError, match="Admission stage"):
        resilient.Policy(bulkhead=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Retrier stage"):
        resilient.Policy(retry=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Gate stage"):
        resilient.Policy(breaker=object())


class Ledger:
    """A measured admission stage of our own: it records each ticket and how its call ended."""

    def __init__(self, free: int = 1) -> None:
        self.free = free
        self.issued = 0
        self.ended: list[tuple[object, BaseException | None]] = []

    def try_acquire(self) -> bool:
        raise AssertionError("the driver uses the ticket methods of a MeasuredAdmission")

    acquire = acquire_async = release = try_acquire  # type: ignore[assignment]

    def try_acquire_ticket(self) -> object | None:
        if not self.free:
            return None
        self.free -= 1
        self.issued += 1
        return f"ticket-{self.issued}"

    def acquire_ticket(self) -> object:
        self.issued += 1
        return f"waited-{self.issued}"

    async def acquire_ticket_async(self) -> object:
        return self.acquire_ticket()

    def release_ticket(self, ticket: object, error: BaseException | None) -> None:
        self.ended.append((ticket, error))


def test_a_measured_admission_hears_each_calls_ticket_and_outcome() -> None:
    """A MeasuredAdmission gets tickets taken and handed back once, with how the call ended."""
    ledger = Ledger(free=1)
    assert isinstance(ledger, resilient.stages.MeasuredAdmission)
    policy = resilient.Policy(bulkhead=ledger, retry=resilient.Retry(attempts=2, budget=None))
    assert policy(lambda: "ok")() == "ok"  # the one free slot: try_acquire_ticket
    refused = ValueError("bad input")

    def fails() -> None:
        raise refused

    with pytest.raises(ValueError, match="bad input"):
        policy.call(fails)  # no slot free now: acquire_ticket
    assert ledger.ended == [("ticket-1", None), ("waited-2", refused)]


async def test_a_measured_admission_hears_an_async_cancellation_as_such() -> None:
    """An async call cancelled while running hands its ticket back with the CancelledError."""
    ledger = Ledger(free=0)
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(resilient.Policy(bulkhead=ledger, retry=None).acall(hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [(ticket, error)] = ledger.ended
    assert ticket == "waited-1"
    assert isinstance(error, asyncio.CancelledError)


def test_built_in_stages_implement_the_protocols() -> None:
    """Bulkhead, CircuitBreaker and Retry are instances of the public protocols."""
    assert isinstance(resilient.Bulkhead(max_concurrent=1), resilient.Admission)
    assert isinstance(resilient.CircuitBreaker(), resilient.Gate)
    assert isinstance(resilient.Retry(), resilient.Retrier)


def test_a_policy_is_immutable() -> None:
    """Setting a stage on a Policy raises instead of silently diverging from decorated functions."""
    policy = resilient.Policy(retry=resilient.Retry())
    with pytest.raises(AttributeError, match="immutable"):
        policy.retry = None  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del policy.timeout


@pytest.mark.parametrize("kind", ["breaker", "bulkhead"])
def test_a_rejected_call_under_a_timeout_leaves_no_deadline_behind(kind: str) -> None:
    """An open breaker or full bulkhead under timeout= leaves the caller's deadline as it was."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=0)
    if kind == "breaker":
        breaker.isolate()
        expected: type[Exception] = resilient.CircuitOpenError
    else:
        bulkhead.try_acquire()
        expected = resilient.BulkheadFull
    policy = resilient.Policy(
        bulkhead=bulkhead, breaker=breaker, timeout=0.01, attempt_timeout=0.01
    )
    for _ in range(3):
        with pytest.raises(expected):
            policy.call(lambda: None)
    assert resilient.remaining() == math.inf
    assert current_deadline() == math.inf


async def test_an_async_rejection_under_a_timeout_leaves_no_deadline_behind() -> None:
    """The same holds in a task: the next, healthy call is not refused for a stale deadline."""
    breaker = resilient.CircuitBreaker(failure_threshold=1)
    breaker.isolate()

    async def ok() -> str:
        return "ok"

    with pytest.raises(resilient.CircuitOpenError):
        await resilient.Policy(breaker=breaker, timeout=0.01).acall(ok)
    await asyncio.sleep(0.02)
    assert resilient.remaining() == math.inf
    assert await resilient.Policy(timeout=1.0).acall(ok) == "ok"


def test_policy_timeout_bounds_the_wait_for_a_bulkhead_slot() -> None:
    """timeout= covers the whole call: a caller waiting for a slot gives up at it."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.try_acquire()
    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded):
        resilient.Policy(bulkhead=bulkhead, timeout=0.05).call(lambda: None)
    assert 0.04 < time.monotonic() - started < 1.0
    assert bulkhead.active == 1
    assert bulkhead.waiting == 0


def test_deadline_at_is_the_absolute_twin_of_deadline() -> None:
    """deadline_at(when) puts `when` in force, never extends an outer deadline, checks its input."""
    end = time.monotonic() + 5.0
    with resilient.deadline_at(end) as scope:
        assert scope.deadline == end
        assert 4.0 < resilient.remaining() <= 5.0
        with resilient.deadline_at(end + 100.0):
            assert current_deadline() == end
    with resilient.deadline_at(time.monotonic() - 1.0):
        assert resilient.remaining() == 0.0
        with pytest.raises(resilient.DeadlineExceeded):
            resilient.check_deadline()
    with pytest.raises(ValueError, match="NaN"):
        resilient.deadline_at(math.nan)
    with pytest.raises(TypeError, match="monotonic"):
        resilient.deadline_at("soon")  # type: ignore[arg-type]


async def test_async_deadline_at_cancels_the_work_at_the_instant() -> None:
    """async with deadline_at() cancels at the instant and says so."""
    with pytest.raises(resilient.DeadlineExceeded, match="deadline_at"):
        async with resilient.deadline_at(time.monotonic() + 0.01):
            await asyncio.sleep(1)


def test_testing_helpers_fake_clock_cap_and_sleep_recorder() -> None:
    """FakeClock moves only forward; instant_retries(cap=) caps attempts; sleeps are recorded."""
    clock = FakeClock(10.0)
    clock.advance(2.5)
    assert clock() == 12.5
    with pytest.raises(ValueError, match="cannot move back"):
        clock.advance(-1)

    fn = failing_then("ok", 100)
    with instant_retries(cap=2), pytest.raises(ConnectionError, match="failure 2") as caught:
        resilient.Retry(attempts=10, budget=None).call(fn)
    assert fn.calls["n"] == 2
    assert "attempts exhausted" in caught.value.__notes__[0]
    with pytest.raises(ValueError, match="cap"):
        instant_retries(cap=0).__enter__()

    retry = resilient.Retry(
        attempts=3, budget=None, backoff=resilient.Backoff(initial=5.0, jitter="none")
    )
    with record_sleeps() as waits:
        assert retry.call(failing_then("ok", 2)) == "ok"
        with pytest.raises(RuntimeError, match="already active"), record_sleeps():
            pass
    assert waits == [5.0, 10.0]
    assert _driver.sleep is time.sleep


async def test_sleep_recorder_records_async_waits() -> None:
    """The recorder stands in for asyncio.sleep too."""
    retry = resilient.Retry(
        attempts=2, budget=None, backoff=resilient.Backoff(initial=3.0, jitter="none")
    )
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError
        return "ok"

    with record_sleeps() as waits:
        assert await retry.acall(flaky) == "ok"
    assert waits == [3.0]


def test_breaker_events_reach_subscribers_and_live_breakers_are_listed() -> None:
    """subscribe() hears every breaker's state changes; live_breakers() lists breakers weakly."""
    from resilient import breaker as breaker_module

    events: list[resilient.BreakerEvent] = []
    breaker_module.subscribe(events.append)
    breaker_module.subscribe(events.append)  # twice is once
    try:
        breaker = resilient.CircuitBreaker(name="subscribed", failure_threshold=1)
        with pytest.raises(ConnectionError):
            breaker.call(failing_then(None, 1))
        assert [(e.name, e.new_state) for e in events] == [
            ("subscribed", resilient.BreakerState.OPEN)
        ]
        assert breaker in breaker_module.live_breakers()
    finally:
        breaker_module.unsubscribe(events.append)
    with pytest.raises(ValueError, match="not subscribed"):
        breaker_module.unsubscribe(events.append)
    with pytest.raises(TypeError, match="callable"):
        breaker_module.subscribe("print")  # type: ignore[arg-type]


def test_budget_spawn_and_retry_accepts() -> None:
    """spawn() gives an empty budget of the same shape; accepts() applies `on`, tenacity's too."""
    import tenacity

    budget = resilient.RetryBudget(ratio=0.5, min_retries_per_second=0, window=2.0)
    budget.deposit(0.0)
    assert budget.available(0.0) == 0
    twin = budget.spawn()
    assert repr(twin) == repr(budget)
    assert twin.available(0.0) == 0
    assert twin is not budget
    twin.deposit(0.0)
    twin.deposit(0.0)
    assert twin.available(0.0) == 1
    assert budget.available(0.0) == 0

    plain = resilient.Retry(on=ConnectionError)
    assert plain.accepts(ConnectionError())
    assert not plain.accepts(ValueError())
    tenacious = resilient.Retry(on=tenacity.retry_if_exception_type(ConnectionError))
    assert tenacious.accepts(ConnectionError())
    assert not tenacious.accepts(ValueError())


async def test_outside_cancellation_in_the_same_iteration_as_the_attempt_deadline() -> None:
    """An outside cancel landing with the Policy's own stays CancelledError, counts balanced."""

    @resilient.Policy(attempt_timeout=0.001)
    async def slow() -> None:
        await asyncio.sleep(1)

    task = asyncio.create_task(slow())
    await asyncio.sleep(0)  # the attempt is now suspended, its deadline queued
    time.sleep(0.005)  # block the loop past that deadline...
    task.cancel()  # ...so this cancel and the deadline's land before the task runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1  # only the outside cancel is still counted


async def test_attempt_deadlines_share_one_timer_and_leave_nothing_behind() -> None:
    """Many bounded suspending calls neither pile up deadline entries nor leak timers."""

    @resilient.Policy(timeout=30.0)
    async def quick() -> int:
        await asyncio.sleep(0)
        return 1

    assert sum(await asyncio.gather(*(quick() for _ in range(3000)))) == 3000
    for _ in range(3000):
        await quick()
    queue = _driver._queues[asyncio.get_running_loop()]
    assert len(queue.heap) <= 1024 + 1  # compacted: finished attempts do not accumulate
    assert all(entry[2] is None for entry in queue.heap)


async def test_an_attempt_that_swallows_its_cancellation_is_not_left_cancelling() -> None:
    """A coroutine that catches the attempt's cancellation and returns leaves the task clean."""

    @resilient.Policy(attempt_timeout=0.01)
    async def stubborn() -> str:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    assert await stubborn() == "swallowed"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # and no cancellation is pending for the next await


def test_policy_driver_runs_in_threads_with_their_own_deadlines() -> None:
    """Each thread narrows and restores its own deadline; none leaks into another."""
    policy = resilient.Policy(timeout=5.0, retry=resilient.Retry(attempts=2, budget=None))
    seen: list[float] = []

    def work() -> None:
        seen.append(policy.call(resilient.remaining))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8
    assert all(4.0 < left <= 5.0 for left in seen)
    assert resilient.remaining() == math.inf


def test_transport_uses_a_user_breaker_factory_through_the_contract() -> None:
    """A ResilientTransport drives the built-in breaker per origin through the same driver."""
    seen: list[str] = []

    def factory(origin: str) -> resilient.CircuitBreaker:
        seen.append(origin)
        return resilient.CircuitBreaker(name=origin, failure_threshold=1)

    transport = resilient.ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)), breaker=factory, retry=None
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://a.test/").status_code == 503
        with pytest.raises(resilient.CircuitOpenError):
            client.get("http://a.test/")
    assert seen == ["http://a.test:80"]


def test_a_call_that_waited_for_a_slot_gets_a_fresh_attempt_deadline() -> None:
    """After waiting for a bulkhead slot, the attempt's deadline counts from when it starts."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.try_acquire()
    threading.Timer(0.05, bulkhead.release).start()
    policy = resilient.Policy(bulkhead=bulkhead, timeout=5.0, attempt_timeout=0.5)
    left = policy.call(resilient.remaining)
    assert 0.4 < left <= 0.5
    assert bulkhead.active == 0


async def test_an_async_call_that_waited_for_a_slot_runs_within_its_deadlines() -> None:
    """The async driver waits for a slot within timeout=, then bounds the attempt afresh."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.try_acquire()
    asyncio.get_running_loop().call_later(0.05, bulkhead.release)

    @resilient.Policy(bulkhead=bulkhead, timeout=5.0, attempt_timeout=0.5)
    async def budget() -> float:
        await asyncio.sleep(0)
        return resilient.remaining()

    assert 0.4 < await budget() <= 0.5
    assert bulkhead.active == 0


async def test_a_retry_attempt_cancelled_from_outside_is_an_abort_for_the_gate() -> None:
    """Cancelling the task during a retry frees the gate's ticket as an abort, not a failure."""
    gate = CountingGate()
    attempts = {"n": 0}
    second = asyncio.Event()

    @resilient.Policy(retry=TwiceRetrier(), breaker=gate)
    async def flaky() -> None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ConnectionError("first")
        second.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(flaky())
    await second.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.outcomes == ["failure:ConnectionError", "abort"]
    assert not gate.tickets


async def test_the_deadline_timer_rearms_for_earlier_and_later_attempts() -> None:
    """A shorter deadline queued after a longer one fires first; the longer still fires later."""

    @resilient.Policy(attempt_timeout=0.2)
    async def long() -> None:
        await asyncio.sleep(1)

    @resilient.Policy(attempt_timeout=0.02)
    async def short() -> None:
        await asyncio.sleep(1)

    slow_task = asyncio.create_task(long())
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded, match=r"attempt_timeout=0\.02 s"):
        await short()
    assert time.monotonic() - started < 0.15
    with pytest.raises(resilient.DeadlineExceeded, match=r"attempt_timeout=0\.2 s"):
        await slow_task


def test_a_retried_result_runs_out_of_deadline_with_a_clear_error() -> None:
    """When the wait before retrying a returned value outlasts the deadline, say so."""

    def slow_hook(event: resilient.RetryEvent) -> None:
        time.sleep(0.06)

    retry = resilient.Retry(
        attempts=5,
        budget=None,
        backoff=resilient.Backoff(initial=0.0, max_delay=0.0),
        on_result=lambda value: value is None,
        on_retry=slow_hook,
    )
    with pytest.raises(resilient.DeadlineExceeded, match=r"timeout of 0\.05 s"):
        resilient.Policy(timeout=0.05, retry=retry).call(lambda: None)


def test_inline_calls_with_new_lambdas_keep_a_bounded_cache() -> None:
    """policy.call(lambda: ...) in a loop does not grow the policy's driver cache without end."""
    policy = resilient.Policy(retry=resilient.Retry(attempts=2))
    assert [policy.call(lambda i=i: i) for i in range(300)] == list(range(300))
    assert len(policy._drivers) <= 64


def test_the_quiet_gate_path_still_resets_consecutive_failures() -> None:
    """fail, fail, succeed, fail does not trip a threshold-3 breaker driven on its quiet path."""
    breaker = resilient.CircuitBreaker(failure_threshold=3)
    assert breaker.quiet() is not None
    policy = resilient.Policy(breaker=breaker)
    for outcome in ("fail", "fail", "ok", "fail"):
        if outcome == "ok":
            assert policy.call(lambda: "ok") == "ok"
        else:
            with pytest.raises(ConnectionError):
                policy.call(failing_then(None, 1))
    assert breaker.state is resilient.BreakerState.CLOSED
    assert breaker.metrics().consecutive_failures == 1
    with pytest.raises(ConnectionError):
        policy.call(failing_then(None, 1))
    with pytest.raises(ConnectionError):
        policy.call(failing_then(None, 1))
    assert breaker.state is resilient.BreakerState.OPEN


def test_an_inline_slot_release_wakes_the_caller_waiting_for_it() -> None:
    """A slot given back on the bulkhead's inline path reaches the thread queued for it."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1)
    assert bulkhead.slot_pool() is not None
    policy = resilient.Policy(bulkhead=bulkhead, timeout=5.0)
    holding, release = threading.Event(), threading.Event()
    results: list[str] = []

    def hold() -> str:
        holding.set()
        release.wait(5)
        return "first"

    first = threading.Thread(target=lambda: results.append(policy.call(hold)))
    first.start()
    holding.wait(5)
    second = threading.Thread(target=lambda: results.append(policy.call(lambda: "second")))
    second.start()
    while bulkhead.waiting == 0:
        time.sleep(0.001)
    release.set()
    first.join(5)
    second.join(5)
    assert sorted(results) == ["first", "second"]
    assert bulkhead.active == 0
    assert bulkhead.waiting == 0


def test_calls_counted_inline_fund_the_retry_budget() -> None:
    """Healthy calls counted on the inline path buy retries: ratio * calls, no more."""
    budget = resilient.RetryBudget(ratio=0.5, min_retries_per_second=0)
    retry = resilient.Retry(attempts=2, budget=budget, backoff=resilient.Backoff(initial=0))
    assert retry.tally().holder is not None
    policy = resilient.Policy(retry=retry)
    for _ in range(10):
        policy.call(lambda: None)
    assert budget.available() == 5
    retried = 0
    for _ in range(8):
        fn = failing_then(None, 1)
        policy.call(fn)
        retried += fn.calls["n"] == 2
    # 18 calls counted by now: 9 retries allowed in all, 0 spent before these 8 calls.
    assert retried == 8
    assert budget.available() == 1


def test_a_retrier_with_its_own_clock_counts_elapsed_time_from_the_call_start() -> None:
    """stop_after_delay measures from when the call began, on the Retry's injected clock."""
    import tenacity

    clock = FakeClock()
    retry = resilient.Retry(
        attempts=None, stop=tenacity.stop_after_delay(5.0), budget=None, clock=clock
    )
    calls = {"n": 0}

    def slow_failure() -> None:
        calls["n"] += 1
        clock.advance(3.0)  # each attempt takes 3 s on the retry's clock
        raise ConnectionError(f"failure {calls['n']}")

    with instant_retries(), pytest.raises(ConnectionError, match="failure 2"):
        resilient.Policy(retry=retry).call(slow_failure)
    assert calls["n"] == 2  # 3 s elapsed after the first: retry; 6 s after the second: stop


async def test_the_async_quiet_gate_path_still_resets_consecutive_failures() -> None:
    """fail, fail, succeed, fail keeps a threshold-3 breaker closed in async code too."""
    breaker = resilient.CircuitBreaker(failure_threshold=3)

    async def outcome(fail: bool) -> str:
        if fail:
            raise ConnectionError("down")
        return "ok"

    policy = resilient.Policy(breaker=breaker)
    for fail in (True, True, False, True):
        if fail:
            with pytest.raises(ConnectionError):
                await policy.acall(outcome, True)
        else:
            assert await policy.acall(outcome, False) == "ok"
    assert breaker.state is resilient.BreakerState.CLOSED


async def test_attempts_returning_futures_are_bounded_and_retried() -> None:
    """A callable returning a Future (run_in_executor, say) is awaited, timed and retried."""
    loop = asyncio.get_running_loop()
    answers = iter([ConnectionError("first"), "second"])

    def blocking() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    policy = resilient.Policy(
        retry=resilient.Retry(attempts=2, budget=None), attempt_timeout=5.0, timeout=10.0
    )
    with instant_retries():
        assert await policy.acall(lambda: loop.run_in_executor(None, blocking)) == "second"

    never = loop.create_future()
    with pytest.raises(resilient.DeadlineExceeded, match="attempt_timeout"):
        await resilient.Policy(attempt_timeout=0.01).acall(lambda: never)
    assert never.cancelled()


class _Payload:
    """A stand-in for a large argument: only its lifetime matters."""


@pytest.fixture
def no_cyclic_gc() -> Any:
    """Only reference counting frees objects while the test runs."""
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_cyclic_gc")
@pytest.mark.parametrize("ends", ["raises", "returns"])
def test_a_retried_calls_arguments_are_freed_without_the_cyclic_gc(ends: str) -> None:
    """No reference cycle through the driver keeps a retried call's arguments alive."""
    import weakref

    calls = {"n": 0}

    @resilient.Retry(attempts=2, budget=None)
    def work(payload: _Payload) -> str:
        calls["n"] += 1
        if ends == "raises" or calls["n"] == 1:
            raise ConnectionError(f"failure {calls['n']}")
        return "done"

    payload = _Payload()
    alive = weakref.ref(payload)
    with instant_retries(), contextlib.suppress(ConnectionError):
        work(payload)
    del payload
    assert calls["n"] == 2
    assert alive() is None


@pytest.mark.usefixtures("no_cyclic_gc")
def test_a_failed_calls_arguments_are_freed_through_an_adaptive_bulkhead() -> None:
    """The error handed to release_ticket is not kept: no cycle holds the call's arguments."""
    import weakref

    from resilient.adaptive import AdaptiveLimit

    @resilient.Bulkhead(max_concurrent=AdaptiveLimit.aimd())
    def work(payload: _Payload) -> None:
        raise TimeoutError("slow")

    payload = _Payload()
    alive = weakref.ref(payload)
    with contextlib.suppress(TimeoutError):
        work(payload)
    del payload
    assert alive() is None


@pytest.mark.usefixtures("no_cyclic_gc")
async def test_an_async_retried_calls_arguments_are_freed_without_the_cyclic_gc() -> None:
    """The async driver leaves no cycle either, with a timeout and tracing's check on."""
    import weakref

    @resilient.Policy(retry=resilient.Retry(attempts=2, budget=None), timeout=5.0)
    async def work(payload: _Payload) -> None:
        await asyncio.sleep(0)
        raise ConnectionError("down")

    payload = _Payload()
    alive = weakref.ref(payload)
    with instant_retries(), contextlib.suppress(ConnectionError):
        await work(payload)
    del payload
    assert alive() is None


def test_give_up_notes_do_not_pile_onto_an_exception_raised_again_and_again() -> None:
    """A module-level exception instance raised on every call keeps one note, not thousands."""
    import pickle

    shared = ConnectionError("the one instance")
    shared.add_note("a note of the caller's own")

    @resilient.Retry(attempts=2, budget=None)
    def work() -> None:
        raise shared

    with instant_retries():
        for _ in range(50):
            with contextlib.suppress(ConnectionError):
                work()
    assert shared.__notes__[0] == "a note of the caller's own"
    assert len(shared.__notes__) == 2
    assert "gave up after 2 attempts" in shared.__notes__[1]
    assert pickle.loads(pickle.dumps(shared)).__notes__ == shared.__notes__


def test_a_full_bulkhead_refusal_carries_no_internal_exception_context() -> None:
    """BulkheadFull from a Policy reads as itself: no internal IndexError in its traceback."""
    bulkhead = resilient.Bulkhead(max_concurrent=1)
    bulkhead.try_acquire()
    with pytest.raises(resilient.BulkheadFull) as refused:
        resilient.Policy(bulkhead=bulkhead).call(lambda: None)
    assert refused.value.__context__ is None
    assert refused.value.__cause__ is None


# Found by a second reader: each would fail on the first cut of the new driver ----------


def test_inline_calls_tell_equal_callables_apart_and_take_unhashable_ones() -> None:
    """.call() caches drivers by identity: equal objects run their own code."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Job:
        name: str
        payload: str = dataclasses.field(compare=False)

        def __call__(self) -> str:
            return self.payload

    @dataclasses.dataclass
    class Unhashable:
        value: str

        def __call__(self) -> str:
            return self.value

    policy = resilient.Policy(retry=resilient.Retry(attempts=2))
    assert policy.call(Job("send", "first")) == "first"
    assert policy.call(Job("send", "second")) == "second"
    for wrapper in (policy, resilient.Retry(), resilient.CircuitBreaker()):
        assert wrapper.call(Unhashable("ok")) == "ok"


def test_policy_resume_ends_its_span_and_counts_the_first_attempt(
    tracer_provider: Any, exporter: Any
) -> None:
    """A resumed call's span ends, with both attempts, and does not stay current."""
    from opentelemetry import trace

    policy = resilient.Policy(
        retry=resilient.Retry(attempts=2, budget=None), tracer_provider=tracer_provider
    )

    def fetch() -> str:
        return "ok"

    with instant_retries():
        assert (
            policy.resume(fetch, False)(
                0.0,
                ConnectionError("first"),
            )
            == "ok"
        )
    [span] = exporter.get_finished_spans()
    assert span.attributes["resilient.attempts"] == 2
    assert not trace.get_current_span().is_recording()


def test_an_admission_stage_refusing_by_raising_ends_the_calls_span(
    tracer_provider: Any, exporter: Any
) -> None:
    """try_acquire may refuse by raising (the contract says stages refuse by raising)."""
    from opentelemetry import trace

    class Shedder(OneAtATime):
        def try_acquire(self) -> bool:
            raise resilient.BulkheadFull("shed", 0, 0)

    policy = resilient.Policy(bulkhead=Shedder(), tracer_provider=tracer_provider)
    with pytest.raises(resilient.BulkheadFull):
        policy.call(lambda: None)
    [span] = exporter.get_finished_spans()
    assert span.attributes["resilient.outcome"] == "bulkhead_full"
    assert not trace.get_current_span().is_recording()


@pytest.mark.usefixtures("no_cyclic_gc")
def test_unclosed_event_loops_are_not_kept_alive_by_the_deadline_queue() -> None:
    """A loop dropped without close() is freed, with its queue (and its file descriptors)."""
    import weakref

    @resilient.Policy(attempt_timeout=5.0)
    async def bounded() -> int:
        await asyncio.sleep(0)
        return 1

    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(bounded()) == 1
    alive = weakref.ref(loop)
    del loop
    import gc

    gc.collect()  # the loop's own reference cycles need one pass; ours must not pin it
    assert alive() is None


def test_a_resumed_failure_after_the_breaker_turned_half_open_is_no_probe() -> None:
    """The fast path's late failure does not take the probe slot and re-open the breaker."""
    clock = FakeClock()
    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=10, clock=clock)
    events: list[str] = []
    breaker_with_events = resilient.CircuitBreaker(
        failure_threshold=1,
        reset_timeout=10,
        clock=clock,
        listeners=[lambda event: events.append(event.new_state.value)],
    )
    for gate in (breaker, breaker_with_events):
        resume = resilient.Policy(retry=resilient.Retry(attempts=3), breaker=gate).resume(
            lambda: "retried", False
        )
        with pytest.raises(ConnectionError):
            gate.call(failing_then(None, 1))  # another request opens it...
        clock.advance(11)  # ...and reset_timeout passes while this one is out
        with pytest.raises(ConnectionError, match="late"):
            resume(clock(), ConnectionError("late"))
    assert events == ["open"]  # never half_open -> open on the late failure


class Drained:
    """A gate of our own that describes its refusals as plain reads (RefusingGate)."""

    def __init__(self, clock: FakeClock) -> None:
        self.state: object = "draining"
        self.opened_at: float | None = clock()
        self.rejections = [0]
        self.asked = 0
        self.clock = clock

    def refusing(self) -> resilient.stages.RefusingGate:
        return resilient.stages.RefusingGate(
            self, "draining", 10.0, self.clock, self.refusal, "drained", self.rejections
        )

    @staticmethod
    def refusal(name: str, retry_after: float) -> Denied:
        return Denied(f"{name}: back in {retry_after:.1f} s")

    def before_call(self) -> object:
        self.asked += 1
        return None

    def on_success(self, ticket: object) -> None:
        pass

    def on_failure(self, ticket: object, error: Exception) -> None:
        pass

    def on_abort(self, ticket: object) -> None:
        pass


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_refusing_gate_is_read_inline_and_asked_once_it_would_not_refuse(
    asynchronous: bool,
) -> None:
    """While described as refusing, calls get its error and its count, the gate unasked."""
    clock = FakeClock()
    gate = Drained(clock)
    policy = resilient.Policy(breaker=gate)

    async def work_async() -> str:
        return "done"

    def call() -> object:
        if asynchronous:
            return asyncio.run(policy.acall(work_async))
        return policy.call(lambda: "done")

    clock.advance(4.0)
    with pytest.raises(Denied, match=r"drained: back in 6\.0 s"):
        call()
    assert (gate.rejections, gate.asked) == ([1], 0)
    clock.advance(6.0)  # reset_timeout passed: the gate itself decides
    assert call() == "done"
    gate.opened_at = None  # no time to count from: ask the gate
    assert call() == "done"
    gate.state = "serving"
    assert call() == "done"
    assert (gate.rejections, gate.asked) == ([1], 3)


def test_an_open_breaker_rejects_inline_with_its_clock_and_counts() -> None:
    """The breaker's RefusingGate gives the rejection before_call would: same error, same count."""
    clock = FakeClock()
    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=30, clock=clock)
    with pytest.raises(ConnectionError):
        breaker.call(failing_then(None, 1))
    clock.advance(12.0)
    for driven in (breaker.call, resilient.Policy(breaker=breaker).call):
        with pytest.raises(resilient.CircuitOpenError) as caught:
            driven(lambda: "never")
        assert caught.value.retry_after == pytest.approx(18.0)
        assert caught.value.__context__ is None
    with resilient.deadline(5.0), pytest.raises(resilient.CircuitOpenError):
        breaker.call(lambda: "never")  # a deadline in force: asked through before_call
    assert breaker.metrics().total_rejections == 3
    clock.advance(18.0)
    assert breaker.call(lambda: "probe") == "probe"
    assert breaker.state is resilient.BreakerState.CLOSED


class Misdescribed(Drained):
    """A gate whose refusing() describes something the driver cannot read."""

    def __init__(self, clock: FakeClock, description: object) -> None:
        super().__init__(clock)
        self.state = "serving"  # not refusing yet: a mistake would lie in wait for an outage
        self.description = description

    def refusing(self) -> Any:
        return self.description


def _misdescriptions(clock: FakeClock) -> list[object]:
    fine = Drained(clock).refusing()
    return [
        ("draining", 10.0),
        dataclasses.replace(fine, holder=object()),  # no state, no opened_at
        dataclasses.replace(fine, clock=None),  # type: ignore[arg-type]
        dataclasses.replace(fine, rejections=None),  # type: ignore[arg-type]
        dataclasses.replace(fine, reset_timeout="10"),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize(
    "index", range(5), ids=["tuple", "holder", "clock", "rejections", "reset_timeout"]
)
def test_a_gate_whose_refusing_describes_nothing_readable_is_refused_when_built(
    index: int,
) -> None:
    """A wrong description fails at decoration, naming refusing(), not when the gate opens."""
    clock = FakeClock()
    gate = Misdescribed(clock, _misdescriptions(clock)[index])
    with pytest.raises(TypeError, match=r"Misdescribed\.refusing\(\)"):
        resilient.Policy(breaker=gate)(lambda: "done")
