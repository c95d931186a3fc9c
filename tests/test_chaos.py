"""The chaos stages (resilient.chaos.faults): Fault, Latency, Outcome, Behavior."""

from __future__ import annotations

import asyncio
import pickle
import random
import threading
import time
from typing import Any

import pytest

import resilient
from resilient import chaos
from resilient.testing import FakeClock, record_sleeps


def no_wait_retry(attempts: int = 3) -> resilient.Retry:
    return resilient.Retry(attempts=attempts, backoff=resilient.Backoff(initial=0.0, jitter="none"))


# Fault ---------------------------------------------------------------------------------


def test_a_retry_outside_retries_an_injected_fault_and_the_call_then_succeeds() -> None:
    """Fault sits inside the retry: an injected failure is retried, a later attempt gets through."""
    calls: list[int] = []
    # Seed 1's first draws: 0.134, 0.847, ... so rate=0.5 hits the first attempt only.
    fault = chaos.Fault(rate=0.5, exception=ConnectionError, random=1)
    policy = resilient.Policy(retry=no_wait_retry(), chaos=[fault])

    @policy
    def fetch() -> str:
        calls.append(1)
        return "ok"

    assert fetch() == "ok"
    assert fault.injected == 1
    assert len(calls) == 1  # the injected attempt never reached the function


def test_a_breaker_counts_injected_faults_and_opens() -> None:
    """Injected failures count like real ones: enough of them open the breaker."""
    clock = FakeClock()
    breaker = resilient.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)
    policy = resilient.Policy(breaker=breaker, chaos=[chaos.Fault(rate=1.0, exception=OSError)])
    call = policy(lambda: "never")
    for _ in range(3):
        with pytest.raises(OSError, match="injected"):
            call()
    with pytest.raises(resilient.CircuitOpenError):
        call()
    assert breaker.state is resilient.BreakerState.OPEN


def test_every_injection_raises_a_fresh_exception_that_says_it_was_injected() -> None:
    """An instance given is copied per raise: no shared traceback, a note names the stage."""
    template = ConnectionError("backend down")
    fault = chaos.Fault(rate=1.0, exception=template)
    call = fault(lambda: None)
    raised = []
    for _ in range(2):
        with pytest.raises(ConnectionError, match="backend down") as info:
            call()
        raised.append(info.value)
    assert raised[0] is not raised[1]
    assert template.__traceback__ is None
    assert not getattr(template, "__notes__", None)
    assert raised[1].__notes__ == [
        "injected by chaos.Fault(rate=1.0, exception=ConnectionError('backend down'))"
    ]


def test_notes_already_on_the_instance_given_do_not_pile_up() -> None:
    """A template with a note of its own: each injected copy has that note and one of chaos."""
    template = ConnectionError("backend down")
    template.add_note("configured in the game-day plan")
    call = chaos.Fault(rate=1.0, exception=template)(lambda: None)
    raised = []
    for _ in range(3):
        with pytest.raises(ConnectionError) as info:
            call()
        raised.append(info.value)
    assert template.__notes__ == ["configured in the game-day plan"]
    for error in raised:
        assert len(error.__notes__) == 2
        assert error.__notes__[0] == "configured in the game-day plan"
        assert error.__notes__[1].startswith("injected by chaos.Fault")


def test_a_factory_is_called_per_injection_and_a_class_gets_a_message() -> None:
    """A zero-arg factory makes each exception; a class is built with a message naming chaos."""
    made: list[int] = []

    def factory() -> Exception:
        made.append(1)
        return TimeoutError(f"slow #{len(made)}")

    call = chaos.Fault(rate=1.0, exception=factory)(lambda: None)
    with pytest.raises(TimeoutError, match="slow #1"):
        call()
    with pytest.raises(TimeoutError, match="slow #2"):
        call()
    with pytest.raises(OSError, match=r"injected by resilient\.chaos\.Fault: OSError"):
        chaos.Fault(rate=1.0, exception=OSError)(lambda: None)()


def test_a_factory_returning_no_exception_or_a_raised_one_is_a_clear_error() -> None:
    """A factory that returns a non-exception, or the same raised instance again, is refused."""
    bad = chaos.Fault(rate=1.0, exception=lambda: "oops")(lambda: None)
    with pytest.raises(TypeError, match="not an exception"):
        bad()
    shared = ValueError("shared")
    reused = chaos.Fault(rate=1.0, exception=lambda: shared)(lambda: None)
    with pytest.raises(ValueError, match="shared"):
        reused()
    with pytest.raises(TypeError, match="raised before"):
        reused()


def test_exceptions_that_cannot_be_copied_or_built_are_refused_at_construction() -> None:
    """exception= is checked where it is written, with what to pass instead."""

    class NeedsTwo(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a)  # copy.copy rebuilds it as NeedsTwo(a): TypeError

    with pytest.raises(TypeError, match="cannot be copied"):
        chaos.Fault(rate=1.0, exception=NeedsTwo(1, 2))
    with pytest.raises(TypeError, match="cannot be built"):
        chaos.Fault(rate=1.0, exception=NeedsTwo)
    with pytest.raises(TypeError, match="exception must be"):
        chaos.Fault(rate=1.0, exception="ConnectionError")  # type: ignore[arg-type]


async def test_fault_in_an_async_policy_is_retried() -> None:
    """Async calls see the same injected faults, and the retry retries them."""
    fault = chaos.Fault(rate=0.5, exception=ConnectionError, random=1)
    policy = resilient.Policy(retry=no_wait_retry(), chaos=[fault])

    @policy
    async def fetch() -> str:
        return "ok"

    assert await fetch() == "ok"
    assert fault.injected == 1
    with pytest.raises(ConnectionError):
        await chaos.Fault(rate=1.0, exception=ConnectionError)(fetch)()


# Seeds, rates, switches ------------------------------------------------------------------


def pattern(stage: Any, calls: int = 40) -> list[bool]:
    results = []
    call = stage(lambda: None)
    for _ in range(calls):
        try:
            call()
        except OSError:
            results.append(True)
        else:
            results.append(False)
    return results


def test_a_seed_makes_a_run_reproducible_and_the_rate_holds() -> None:
    """The same seed hits the same calls; over many calls the share is close to the rate."""
    first = pattern(chaos.Fault(rate=0.3, exception=OSError, random=42))
    again = pattern(chaos.Fault(rate=0.3, exception=OSError, random=random.Random(42)))
    assert first == again
    many = pattern(chaos.Fault(rate=0.3, exception=OSError, random=7), calls=2000)
    assert 0.25 < sum(many) / 2000 < 0.35
    assert not any(pattern(chaos.Fault(rate=0.0, exception=OSError)))
    assert all(pattern(chaos.Fault(rate=1.0, exception=OSError)))


def test_enabled_switches_injection_on_and_off_while_running() -> None:
    """A callable enabled= is read on every call: a game day flips it without rebuilding."""
    switch = threading.Event()
    fault = chaos.Fault(rate=1.0, exception=OSError, enabled=switch.is_set)
    call = fault(lambda: "ok")
    assert call() == "ok"
    switch.set()
    with pytest.raises(OSError, match="injected"):
        call()
    switch.clear()
    assert call() == "ok"
    assert fault.injected == 1
    assert chaos.Fault(rate=1.0, exception=OSError, enabled=False)(lambda: "ok")() == "ok"


def test_an_enabled_callable_that_returns_no_bool_is_named() -> None:
    """enabled= returning something other than True/False is a TypeError, not a guess."""
    call = chaos.Fault(rate=1.0, exception=OSError, enabled=lambda: 1)(lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return True or False"):
        call()


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"rate": 1.5}, ValueError, "rate must be a probability"),
        ({"rate": -0.1}, ValueError, "rate must be a probability"),
        ({"rate": float("nan")}, ValueError, "rate must be a probability"),
        ({"rate": "0.5"}, TypeError, "rate must be"),
        ({"rate": True}, TypeError, "rate must be"),
        ({"rate": 0.5, "enabled": "yes"}, TypeError, "enabled must be"),
        ({"rate": 0.5, "random": 1.5}, TypeError, "random must be"),
        ({"rate": 0.5, "random": True}, TypeError, "random must be"),
    ],
)
def test_bad_settings_are_refused_naming_the_parameter(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """rate, enabled and random are validated at construction, each with a clear error."""
    with pytest.raises(error, match=match):
        chaos.Fault(exception=OSError, **settings)


def test_settings_are_keyword_only_and_required() -> None:
    """@chaos.Fault without settings says what to write; positional settings are refused."""
    with pytest.raises(TypeError, match=r"@Fault\(rate=..., exception=...\)"):
        chaos.Fault(lambda: None)  # type: ignore[misc]
    with pytest.raises(TypeError, match="keyword arguments only"):
        chaos.Latency(0.5, 1.0)  # type: ignore[misc]


def test_draws_are_safe_across_threads(frequent_thread_switches: None) -> None:
    """Threads share one stage: every call is decided, and the count matches the faults seen."""
    fault = chaos.Fault(rate=0.5, exception=OSError, random=3)
    call = fault(lambda: None)
    seen: list[int] = []

    def worker() -> None:
        hits = 0
        for _ in range(500):
            try:
                call()
            except OSError:
                hits += 1
        seen.append(hits)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(seen) == fault.injected
    assert 800 < fault.injected < 1200


def test_stages_pickle_as_their_configuration_inside_a_policy() -> None:
    """A Policy with chaos stages pickles; the copies start counting from zero."""
    fault = chaos.Fault(rate=1.0, exception=OSError, random=5)
    with pytest.raises(OSError, match="injected"):
        fault(lambda: None)()
    policy = resilient.Policy(chaos=[fault, chaos.Outcome(rate=0.5, result=[1])])
    copy = pickle.loads(pickle.dumps(policy))
    copied = copy.chaos[0]
    assert isinstance(copied, chaos.Fault)
    assert (copied.rate, copied.exception, copied.injected) == (1.0, OSError, 0)
    assert "chaos.Fault(rate=1.0, exception=OSError, random=5)" in repr(copy)


# Latency -------------------------------------------------------------------------------


def test_latency_waits_through_the_drivers_sleep_then_calls() -> None:
    """record_sleeps sees injected latency, and the call still happens."""
    slow = chaos.Latency(rate=1.0, delay=0.25)
    with record_sleeps() as waits:
        assert slow(lambda: "ok")() == "ok"
    assert waits == [0.25]
    assert slow.injected == 1


def test_latency_never_sleeps_past_the_deadline_and_then_times_out() -> None:
    """With less time left than the delay it waits out the deadline, raises, makes no call."""
    calls: list[int] = []
    slow = chaos.Latency(rate=1.0, delay=5.0)
    call = slow(lambda: calls.append(1))
    expected = pytest.raises(resilient.DeadlineExceeded, match="injected latency of 5 s")
    with record_sleeps() as waits, resilient.deadline(1.0), expected as info:
        call()
    assert len(waits) == 1
    assert 0.9 < waits[0] <= 1.0
    assert calls == []
    assert "injected by chaos.Latency" in info.value.__notes__[0]


def test_latency_at_a_passed_deadline_raises_without_sleeping() -> None:
    """No time left: DeadlineExceeded at once."""
    passed = resilient.deadline_at(time.monotonic() - 1.0)
    with record_sleeps() as waits, passed, pytest.raises(resilient.DeadlineExceeded):
        chaos.Latency(rate=1.0, delay=1.0)(lambda: None)()
    assert waits == []


def test_sync_attempt_timeout_bounds_injected_latency_and_retry_tries_again() -> None:
    """Inside a Policy the attempt's deadline is the one in force: each try waits at most it."""
    slow = chaos.Latency(rate=1.0, delay=10.0)
    policy = resilient.Policy(retry=no_wait_retry(attempts=2), attempt_timeout=0.05, chaos=[slow])
    started = time.monotonic()
    with pytest.raises(resilient.DeadlineExceeded):
        policy.call(lambda: "never")
    assert time.monotonic() - started < 2.0
    assert slow.injected == 2


async def test_async_attempt_timeout_cuts_injected_latency() -> None:
    """An async attempt is cancelled at attempt_timeout; the retry then tries again."""
    slow = chaos.Latency(rate=0.5, delay=10.0, random=1)  # hits the first attempt only
    policy = resilient.Policy(retry=no_wait_retry(), attempt_timeout=0.05, chaos=[slow])

    @policy
    async def fetch() -> str:
        return "ok"

    started = time.monotonic()
    assert await fetch() == "ok"
    assert time.monotonic() - started < 2.0
    assert slow.injected == 1


async def test_async_latency_waits_through_the_async_sleep_seam() -> None:
    """The async wait is recorded too, and past the deadline it raises DeadlineExceeded."""

    async def fetch() -> str:
        return "ok"

    with record_sleeps() as waits:
        assert await chaos.Latency(rate=1.0, delay=0.5)(fetch)() == "ok"
        with resilient.deadline(0.2), pytest.raises(resilient.DeadlineExceeded):
            await chaos.Latency(rate=1.0, delay=0.5)(fetch)()
    assert waits[0] == 0.5
    assert 0.0 < waits[1] <= 0.2


def test_latency_refuses_a_delay_that_is_not_a_positive_duration() -> None:
    """delay must be seconds > 0 (or a timedelta); zero or negative would inject nothing."""
    with pytest.raises(ValueError, match="delay must be greater than zero"):
        chaos.Latency(rate=1.0, delay=0)
    with pytest.raises(TypeError, match="delay must be seconds"):
        chaos.Latency(rate=1.0, delay="1s")  # type: ignore[arg-type]


# Outcome -------------------------------------------------------------------------------


def test_outcome_replaces_the_result_and_a_result_retry_judges_it() -> None:
    """An injected empty answer is retried by Retry(on_result=...), like a real one."""
    calls: list[int] = []
    empty = chaos.Outcome(rate=0.5, result=None, random=1)  # the first attempt only
    retry = resilient.Retry(
        attempts=3,
        backoff=resilient.Backoff(initial=0.0, jitter="none"),
        on_result=lambda r: r is None,
    )

    @resilient.Policy(retry=retry, chaos=[empty])
    def fetch() -> str:
        calls.append(1)
        return "data"

    assert fetch() == "data"
    assert empty.injected == 1
    assert calls == [1]


async def test_outcome_in_async_calls() -> None:
    """Async: the value comes back without the call being awaited."""

    async def fetch() -> str:
        raise AssertionError("not called")

    assert await chaos.Outcome(rate=1.0, result="cached")(fetch)() == "cached"


# Behavior ------------------------------------------------------------------------------


def test_behavior_runs_the_action_before_the_call() -> None:
    """The action runs first; the call then proceeds, and an action's error is the failure."""
    order: list[str] = []
    act = chaos.Behavior(rate=1.0, action=lambda: order.append("action"))
    assert act(lambda: order.append("call") or "ok")() == "ok"
    assert order == ["action", "call"]

    def drop() -> None:
        raise ConnectionResetError("dropped by the action")

    with pytest.raises(ConnectionResetError):
        chaos.Behavior(rate=1.0, action=drop)(lambda: order.append("no"))()
    assert order == ["action", "call"]


async def test_behavior_awaits_an_async_action_around_async_calls() -> None:
    """Around an async call, the action may be sync or async; an async one is awaited."""
    order: list[str] = []

    async def action() -> None:
        await asyncio.sleep(0)
        order.append("async action")

    async def fetch() -> str:
        order.append("call")
        return "ok"

    assert await chaos.Behavior(rate=1.0, action=action)(fetch)() == "ok"
    assert await chaos.Behavior(rate=1.0, action=lambda: order.append("sync"))(fetch)() == "ok"
    assert order == ["async action", "call", "sync", "call"]


def test_behavior_refuses_async_actions_around_sync_calls() -> None:
    """An async action around a sync call could never be awaited: refused when wrapping."""

    async def action() -> None: ...

    with pytest.raises(TypeError, match="is async, but the call"):
        chaos.Behavior(rate=1.0, action=action)(lambda: None)
    sneaky = chaos.Behavior(rate=1.0, action=lambda: action())(lambda: None)
    with pytest.raises(TypeError, match="returned an awaitable"):
        sneaky()
    with pytest.raises(TypeError, match="action must be"):
        chaos.Behavior(rate=1.0, action=None)  # type: ignore[arg-type]


# As decorators, and the stage contract -------------------------------------------------


def test_a_stage_decorates_keeping_metadata_and_is_an_injector() -> None:
    """@stage keeps the function's name; each stage implements resilient.stages.Injector."""

    @chaos.Latency(rate=0.0, delay=1.0)
    def fetch(key: str) -> str:
        """Fetch a key."""
        return key

    assert fetch("k") == "k"
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a key."
    for stage in (
        chaos.Fault(rate=0.1, exception=OSError),
        chaos.Latency(rate=0.1, delay=1.0),
        chaos.Outcome(rate=0.1, result=1),
        chaos.Behavior(rate=0.1, action=print),
    ):
        assert isinstance(stage, resilient.stages.Injector)
    with pytest.raises(TypeError, match="generator"):

        @chaos.Fault(rate=0.1, exception=OSError)
        def items() -> Any:
            yield 1


async def test_an_async_wrapper_refuses_a_function_that_returns_no_awaitable() -> None:
    """Driven as async, a sync function's plain result is the drivers' NotAwaitable error."""
    policy = resilient.Policy(chaos=[chaos.Fault(rate=0.0, exception=OSError)])
    with pytest.raises(TypeError, match="not an awaitable"):
        await policy.acall(lambda: 1)  # type: ignore[arg-type,return-value]


def test_repr_shows_the_settings_given() -> None:
    """A stage's repr shows what it was built with, for logs and the Policy's repr."""
    assert repr(chaos.Outcome(rate=0.2, result="x")) == "chaos.Outcome(rate=0.2, result='x')"
    assert repr(chaos.Behavior(rate=0.2, action=print, enabled=False)) == (
        "chaos.Behavior(rate=0.2, action=print, enabled=False)"
    )
