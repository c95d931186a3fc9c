"""Hedge: a slow attempt gets a second one beside it; the first success wins."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient
from resilient import AdaptiveDelay, Hedge, HedgeBudget, Policy
from resilient.testing import FakeClock
from tests.telemetry import events, points

HANG = 30.0  # an attempt that would hang: it must be cancelled long before


class Dependency:
    """An async dependency whose n-th call (from 1) behaves as scripted."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.started = 0
        self.cancelled: list[int] = []
        self.deadlines: list[float] = []

    async def __call__(self, key: str = "k") -> str:
        self.started += 1
        number = self.started
        self.deadlines.append(resilient.remaining())
        step = self.script[min(number, len(self.script)) - 1]
        try:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, type) and issubclass(step, BaseException):
                raise step(f"attempt {number}")
            await asyncio.sleep(step)
        except asyncio.CancelledError:
            self.cancelled.append(number)
            raise
        return f"{key} from attempt {number}"


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    """Wait, polling, until ``condition()`` holds (generous: the machine may be busy)."""
    give_up_at = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up_at, "the condition was not reached in time"
        await asyncio.sleep(0.005)


class Heard:
    """A HedgeListener that writes down what it hears."""

    def __init__(self) -> None:
        self.hedges: list[int] = []
        self.winners: list[tuple[int, int]] = []

    def hedged(self, attempt: int, elapsed: float) -> None:
        self.hedges.append(attempt)

    def won(self, attempt: int, attempts: int) -> None:
        self.winners.append((attempt, attempts))


async def test_a_fast_call_sends_no_hedge_and_spends_no_budget() -> None:
    """An attempt that answers within the delay is the only one."""
    dependency = Dependency(0)
    hedge = Hedge(delay=1.0)
    heard = Heard()
    assert await hedge.wrap(dependency, listener=heard)("a") == "a from attempt 1"
    assert dependency.started == 1
    assert heard.hedges == []
    assert heard.winners == [(1, 1)]
    assert hedge.budget is not None
    assert hedge.budget.tokens == hedge.budget.max_tokens


async def test_a_slow_attempt_gets_a_hedge_that_wins_and_the_slow_one_is_cancelled() -> None:
    """After the delay a second attempt starts; its answer is returned, the first cancelled."""
    dependency = Dependency(HANG, 0)
    heard = Heard()
    began = time.monotonic()
    result = await Hedge(delay=0.02).wrap(dependency, listener=heard)("b")
    assert result == "b from attempt 2"
    assert time.monotonic() - began < 5.0
    assert dependency.cancelled == [1]
    assert heard.hedges == [2]
    assert heard.winners == [(2, 2)]


async def test_a_non_fatal_failure_starts_the_next_attempt_at_once() -> None:
    """A failure `on` accepts does not wait out the delay: the next attempt starts now."""
    dependency = Dependency(ConnectionError, 0)
    began = time.monotonic()
    assert await Hedge(delay=HANG, on=ConnectionError).acall(dependency) == "k from attempt 2"
    assert time.monotonic() - began < 5.0


async def test_a_fatal_failure_ends_the_call_and_cancels_the_other_attempts() -> None:
    """A failure `on` rejects is raised as it is, and the attempt still running is cancelled."""
    dependency = Dependency(HANG, ValueError("bad request"))
    with pytest.raises(ValueError, match="bad request") as raised:
        await Hedge(delay=0.01, on=ConnectionError).acall(dependency)
    assert dependency.cancelled == [1]
    assert not any("gave up" in note for note in getattr(raised.value, "__notes__", []))


async def test_when_every_attempt_fails_the_last_failure_says_so_and_a_fallback_takes_it() -> None:
    """All attempts failing raises the last failure with a note the default Fallback reads."""
    dependency = Dependency(ConnectionError, ConnectionError, ConnectionError)
    with pytest.raises(ConnectionError, match="attempt 3") as raised:
        await Hedge(delay=HANG, max_attempts=3).acall(dependency)
    assert dependency.started == 3
    assert any("3 hedged attempt(s)" in note for note in raised.value.__notes__)
    assert resilient.fallback.gave_up(raised.value)

    policy = Policy(fallback=resilient.Fallback(value="stale"), hedge=Hedge(delay=HANG))
    assert await policy(Dependency(ConnectionError))() == "stale"


async def test_hedges_stop_at_max_attempts_and_the_deadline_cancels_them_all() -> None:
    """At most max_attempts run; the call's timeout ends them all with DeadlineExceeded."""
    dependency = Dependency(HANG)
    policy = Policy(timeout=0.3, hedge=Hedge(delay=0.02, max_attempts=3, budget=None))
    with pytest.raises(resilient.DeadlineExceeded):
        await policy(dependency)()
    assert dependency.started == 3
    assert sorted(dependency.cancelled) == [1, 2, 3]
    # Every attempt ran inside the call's one deadline.
    assert all(0 < left <= 0.3 for left in dependency.deadlines)


async def test_each_attempt_has_its_own_attempt_timeout() -> None:
    """An attempt that overruns attempt_timeout fails non-fatally, so another starts."""
    dependency = Dependency(HANG, 0)
    policy = Policy(timeout=5.0, attempt_timeout=0.05, hedge=Hedge(delay=HANG))
    assert await policy(dependency)() == "k from attempt 2"
    assert dependency.cancelled == [1]


async def test_the_budget_stops_hedging_when_it_runs_low() -> None:
    """With half the tokens gone, a slow call waits for its one attempt."""
    budget = HedgeBudget(max_tokens=2, token_ratio=0.5)
    hedge = Hedge(delay=0.01, budget=budget)
    assert await hedge.acall(Dependency(HANG, 0)) == "k from attempt 2"  # 2 - 1 + 0.5
    assert budget.tokens == 1.5
    assert await hedge.acall(Dependency(HANG, 0)) == "k from attempt 2"  # 1.5 - 1 + 0.5
    assert budget.tokens == 1.0
    slow = Dependency(0.1, 0)
    assert await hedge.acall(slow) == "k from attempt 1"  # 1 of 2 left: no hedge
    assert slow.started == 1
    assert budget.tokens == 1.5


async def test_failed_calls_drain_the_budget_so_an_outage_is_not_hedged() -> None:
    """Each failed call takes a token; below half, a failure no longer starts another attempt."""
    budget = HedgeBudget(max_tokens=4, token_ratio=0.1)
    hedge = Hedge(delay=HANG, budget=budget)
    down = Dependency(ConnectionError)
    with pytest.raises(ConnectionError):
        await hedge.acall(down)  # 2 attempts: -1 for the second, -1 for the failure
    assert down.started == 2
    assert budget.tokens == 2
    with pytest.raises(ConnectionError):
        await hedge.acall(down)  # 2 * 2 <= 4: no second attempt
    assert down.started == 3
    assert budget.tokens == 1
    # A fatal failure is the caller's, not an outage: it costs no token.
    with pytest.raises(TypeError):
        await Hedge(delay=HANG, budget=budget).acall(Dependency(TypeError))
    assert budget.tokens == 1


async def test_an_open_breaker_refuses_the_call_and_sends_no_hedge() -> None:
    """A gate that refuses the first attempt ends the call with its refusal."""
    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=60)
    breaker.isolate()
    dependency = Dependency(0)
    with pytest.raises(resilient.CircuitOpenError):
        await Policy(breaker=breaker, hedge=Hedge(delay=0.01))(dependency)()
    assert dependency.started == 0


async def test_a_breaker_that_opens_mid_call_stops_further_hedges_but_not_the_first() -> None:
    """A refused hedge starts no more; the attempt already in flight still answers."""
    breaker = resilient.CircuitBreaker(failure_threshold=1, reset_timeout=60)
    dependency = Dependency(0.2, ConnectionError, 0)
    policy = Policy(breaker=breaker, hedge=Hedge(delay=0.02, max_attempts=3, budget=None))
    # Attempt 2 fails at once and opens the breaker; attempt 3 is refused by it.
    assert await policy(dependency)() == "k from attempt 1"
    assert dependency.started == 2


async def test_cancelling_the_caller_cancels_every_attempt_and_leaves_no_task() -> None:
    """The caller's cancellation reaches each attempt; no task outlives the call."""
    dependency = Dependency(HANG)
    before = len(asyncio.all_tasks())
    call = asyncio.ensure_future(Hedge(delay=0.01, budget=None).acall(dependency))
    await asyncio.sleep(0.1)
    assert dependency.started == 2
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert sorted(dependency.cancelled) == [1, 2]
    assert len(asyncio.all_tasks()) == before


async def test_results_that_lose_are_handed_to_discard() -> None:
    """Two attempts answering together: the caller gets one, discard gets the other."""
    release = asyncio.Event()

    async def both(key: str) -> str:
        await release.wait()
        return key + str(id(asyncio.current_task()))

    discarded: list[Any] = []

    async def discard(result: Any) -> None:
        discarded.append(result)

    async def opener() -> None:
        await asyncio.sleep(0.05)
        release.set()

    opening = asyncio.ensure_future(opener())
    result = await Hedge(delay=0.01, budget=None, discard=discard).wrap(both)("r")
    await opening
    assert len(discarded) == 1
    assert discarded[0] != result


async def test_failures_left_behind_are_handed_to_discard() -> None:
    """A non-fatal failure that a later one replaces is discarded; the last is raised."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    dependency = Dependency(ConnectionError, ConnectionError)
    with pytest.raises(ConnectionError, match="attempt 2"):
        await Hedge(delay=HANG, discard=discard).wrap(dependency)()
    assert [str(error) for error in discarded] == ["attempt 1"]


async def test_an_attempt_that_cancels_itself_is_an_interruption_not_a_failure() -> None:
    """CancelledError raised inside an attempt propagates; it is never retried."""
    with pytest.raises(asyncio.CancelledError):
        await Hedge(delay=HANG).acall(Dependency(asyncio.CancelledError))


async def test_a_decorated_function_keeps_its_name_and_is_hedged() -> None:
    """@Hedge() over an async function returns an async function with its metadata."""
    dependency = Dependency(HANG, 0)

    @Hedge(delay=0.01)
    async def lookup(key: str) -> str:
        """Look a key up."""
        return await dependency(key)

    assert lookup.__name__ == "lookup"
    assert lookup.__doc__ == "Look a key up."
    assert await lookup("x") == "x from attempt 2"


def test_sync_functions_are_refused_with_the_reason() -> None:
    """Sync code cannot cancel a losing attempt: Hedge and Policy(hedge=) say so."""

    def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match=r"needs an async function.*cannot be cancelled"):
        Hedge()(fetch)
    with pytest.raises(TypeError, match="needs an async function"):
        Policy(hedge=Hedge())(fetch)
    with pytest.raises(TypeError, match="needs an async function"):
        Policy(hedge=Hedge()).call(fetch)


async def test_acall_refuses_a_sync_function() -> None:
    """hedge.acall(sync_fn) fails before calling it."""
    with pytest.raises(TypeError, match="needs an async function"):
        await Hedge().acall(lambda: 1)  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"max_attempts": 1}, ValueError, "max_attempts must be at least 2"),
        ({"max_attempts": 6}, ValueError, "at most 5"),
        ({"max_attempts": 2.0}, TypeError, "max_attempts must be an int"),
        ({"delay": -1}, ValueError, "delay must not be negative"),
        ({"delay": "fast"}, TypeError, "delay must be seconds"),
        ({"on": ()}, ValueError, "at least one exception type"),
        ({"on": (ValueError, 3)}, TypeError, "tuple of exception types"),
        ({"on": int}, TypeError, "on must be an exception type"),
        ({"on": KeyboardInterrupt}, TypeError, "Exception or a subclass of it"),
        ({"on": 3}, TypeError, "on must be an exception type"),
        ({"budget": 10}, TypeError, "budget must be a resilient.HedgeBudget"),
        ({"clock": 1.0}, TypeError, "clock must be a callable"),
        ({"discard": print}, TypeError, "discard must be an async function"),
    ],
)
def test_bad_settings_are_refused_naming_them(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each bad setting is a clear error at construction."""
    with pytest.raises(error, match=match):
        Hedge(**settings)


def test_a_policy_takes_a_hedge_or_a_retry_not_both() -> None:
    """Retry and hedge would both make second attempts; the Policy refuses the pair."""
    with pytest.raises(ValueError, match="retry= or hedge=, not both"):
        Policy(retry=resilient.Retry(), hedge=Hedge())
    with pytest.raises(TypeError, match=r"hedge must be a resilient\.Hedge"):
        Policy(hedge=0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hedge"):
        Policy(hedge=Hedge()).resume(Dependency(0), True)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"quantile": 1.0}, ValueError, "quantile must be strictly between"),
        ({"quantile": 0}, ValueError, "quantile"),
        ({"max_delay": 0}, ValueError, "max_delay must be greater than zero"),
        ({"min_delay": 0.2, "max_delay": 0.1}, ValueError, "must not exceed max_delay"),
        ({"window": 10}, ValueError, "window must be at least 20"),
        ({"min_samples": 0}, ValueError, "min_samples must be at least 1"),
        ({"min_samples": 50, "window": 20}, ValueError, "must not exceed window"),
    ],
)
def test_bad_adaptive_delays_are_refused(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """AdaptiveDelay checks its settings like every stage."""
    with pytest.raises(error, match=match):
        AdaptiveDelay(**settings)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"max_tokens": 0}, "max_tokens must be between"),
        ({"token_ratio": 0}, "token_ratio must be greater than 0"),
        ({"token_ratio": 2}, "token_ratio must be between"),
    ],
)
def test_bad_budgets_are_refused(settings: dict[str, Any], match: str) -> None:
    """HedgeBudget checks its settings."""
    with pytest.raises(ValueError, match=match):
        HedgeBudget(**settings)


def test_the_adaptive_delay_follows_a_quantile_of_recent_latency_with_a_cap() -> None:
    """Until min_samples it is the cap; then the quantile of the window, clamped."""
    delay = AdaptiveDelay(quantile=0.9, max_delay=0.05, min_delay=0.002, window=100, min_samples=20)
    assert delay.current() == 0.05
    for _ in range(19):
        delay.record(0.010)
    assert delay.current() == 0.05  # 19 samples: not enough yet
    delay.record(0.010)
    assert delay.current() == 0.010
    # 100 samples, 10% of them slow: the 90th percentile is still the fast latency...
    for index in range(80):
        delay.record(0.030 if index % 8 == 0 else 0.010)
    assert delay.current() == 0.010
    # ...and once a fifth of the window is slow, the delay rises to it.
    for _ in range(20):
        delay.record(0.030)
    assert delay.current() == 0.030
    # One sick host drags the quantile up: the cap holds it.
    for _ in range(100):
        delay.record(2.0)
    assert delay.current() == 0.05
    for _ in range(100):
        delay.record(0.0)
    assert delay.current() == 0.002  # and the floor
    assert "now 0.002 s" in repr(delay)


async def test_a_hedge_with_an_adaptive_delay_learns_from_its_calls() -> None:
    """Each successful call's first-attempt latency feeds the delay."""
    delay = AdaptiveDelay(quantile=0.5, max_delay=10.0, window=20, min_samples=20)
    hedge = Hedge(delay=delay)
    for _ in range(20):
        await hedge.acall(Dependency(0))
    assert delay.current() < 1.0  # learnt: instant calls, not the 10 s cap


def test_hedge_budget_and_delay_pickle_as_configuration_and_read_well() -> None:
    """Copies start fresh (a full budget, no samples); the reprs show the settings."""
    budget = HedgeBudget(max_tokens=6, token_ratio=0.2)
    budget.failed()
    hedge = Hedge(
        delay=timedelta(milliseconds=20), max_attempts=3, on=ConnectionError, budget=budget
    )
    copy = pickle.loads(pickle.dumps(hedge))
    assert copy.delay == 0.02
    assert copy.max_attempts == 3
    assert copy.on is ConnectionError
    assert copy.budget is not None
    assert copy.budget.tokens == 6
    adaptive = pickle.loads(pickle.dumps(AdaptiveDelay(quantile=0.99, window=50)))
    assert adaptive.quantile == 0.99
    assert adaptive.window == 50
    assert repr(hedge) == (
        "Hedge(delay=0.02, max_attempts=3, on=ConnectionError, "
        "budget=HedgeBudget(max_tokens=6, token_ratio=0.2; 5 left))"
    )
    assert "AdaptiveDelay(quantile=0.95" in repr(Hedge())
    with pytest.raises(AttributeError, match="immutable"):
        hedge.delay = 1.0  # type: ignore[misc]


async def test_the_injected_clock_times_the_hedges() -> None:
    """With a fake clock that never moves, the hedge waits its delay measured on it."""
    clock = FakeClock()
    dependency = Dependency(HANG, 0)
    # The loop's own timer still fires; the delay is computed on the fake clock.
    assert await Hedge(delay=0.01, clock=clock).acall(dependency) == "k from attempt 2"


async def test_hedges_are_span_events_and_counted(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    """Each hedge sent is an event on the call's span; sent and won hedges are counted."""
    policy = Policy(
        hedge=Hedge(delay=0.01),
        name="lookup",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    assert await policy(Dependency(HANG, 0))() == "k from attempt 2"
    (span,) = exporter.get_finished_spans()
    assert [event["resilient.attempt"] for event in events(span, "resilient.hedge")] == [2]
    assert events(span, "resilient.hedge.won") == [{"resilient.attempt": 2}]
    hedges = points(reader)["resilient.hedges"]
    policy_name = ("resilient.policy", "lookup")
    assert hedges[frozenset({policy_name, ("resilient.hedge.outcome", "sent")})] == 1
    assert hedges[frozenset({policy_name, ("resilient.hedge.outcome", "won")})] == 1


async def test_a_hedged_calls_span_and_metrics_count_every_attempt_it_started(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    """resilient.attempts and resilient.call.attempts count the hedges, not just the first.

    A nested hedged call inside an attempt counts its own attempts, not its caller's.
    """
    inner = Policy(
        hedge=Hedge(delay=0.01, max_attempts=3, budget=None),
        name="inner",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    outer = Policy(
        hedge=Hedge(delay=0.01, max_attempts=3, budget=None),
        name="outer",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    assert await outer(Dependency(HANG, 0))() == "k from attempt 2"
    failing = Dependency(ConnectionError)
    with pytest.raises(ConnectionError):
        await outer(failing)()
    assert failing.started == 3
    patient = Policy(  # never hedges here: its one attempt is the inner call
        hedge=Hedge(delay=HANG),
        name="outer",
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    assert await patient(inner(Dependency(HANG, HANG, 0)))() == "k from attempt 3"
    spans: dict[str, list[Any]] = {}
    for span in exporter.get_finished_spans():
        assert span.attributes is not None
        spans.setdefault(span.name, []).append(span.attributes["resilient.attempts"])
    assert spans == {"outer": [2, 3, 1], "inner": [3]}
    attempts = points(reader)["resilient.call.attempts"]
    assert attempts[frozenset({("resilient.policy", "outer")})] == (3, 6)
    assert attempts[frozenset({("resilient.policy", "inner")})] == (1, 3)


async def test_on_takes_a_tuple_or_a_predicate() -> None:
    """`on` as a tuple of types or a predicate decides what starts the next attempt."""
    by_types = Hedge(delay=HANG, on=(ConnectionError, TimeoutError))
    assert await by_types.acall(Dependency(TimeoutError, 0)) == "k from attempt 2"
    by_predicate = Hedge(delay=HANG, on=lambda error: "retry me" in str(error))
    assert await by_predicate.acall(Dependency(OSError("retry me"), 0)) == "k from attempt 2"
    with pytest.raises(OSError, match="final"):
        await by_predicate.acall(Dependency(OSError("final"), 0))


async def test_an_attempt_that_swallows_its_cancellation_is_awaited_and_discarded() -> None:
    """A loser that ignores cancel() and returns anyway is waited for; its result is discarded."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    calls = 0

    async def stubborn() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(HANG)
            except asyncio.CancelledError:
                return "late"  # misbehaves: swallows the cancellation
        return "fast"

    assert await Hedge(delay=0.01, discard=discard).wrap(stubborn)() == "fast"
    assert discarded == ["late"]


async def test_a_failure_left_while_a_hedge_runs_is_discarded_when_the_hedge_wins() -> None:
    """The first attempt fails once every hedge is out; the hedge wins: discard gets the failure.

    It is no one's else: an HTTP failure left undiscarded holds its connection for good.
    """
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    calls = 0

    async def first_fails_late() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.05)
            raise ConnectionError("attempt 1")
        await asyncio.sleep(0.2)
        return "from attempt 2"

    hedge = Hedge(delay=0.01, max_attempts=2, budget=None, discard=discard)
    assert await hedge.acall(first_fails_late) == "from attempt 2"
    assert [str(left) for left in discarded] == ["attempt 1"]


async def test_a_fatal_failure_discards_a_failure_left_from_before() -> None:
    """A non-fatal failure kept while a hedge runs is discarded when the hedge fails fatally."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    calls = 0

    async def dependency() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.05)
            raise ConnectionError("attempt 1")
        await asyncio.sleep(0.2)
        raise KeyError("attempt 2")

    hedge = Hedge(delay=0.01, on=ConnectionError, budget=None, discard=discard)
    with pytest.raises(KeyError, match="attempt 2"):
        await hedge.acall(dependency)
    assert [str(left) for left in discarded] == ["attempt 1"]


class Stubborn:
    """Attempts that finish with a result even when cancelled, once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        number = self.calls
        if number > 1:
            return f"fast {number}"
        try:
            await asyncio.sleep(HANG)
        except asyncio.CancelledError:
            await self.release.wait()
        return f"late {number}"


async def test_a_caller_cancelled_twice_leaves_and_the_losers_are_still_discarded() -> None:
    """Cancelled again while the losers unwind, the caller leaves at once; what they return later
    is still discarded, not leaked."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    release = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        number = calls
        try:
            await asyncio.sleep(HANG)
        except asyncio.CancelledError:
            await release.wait()  # unwinds slowly, then answers anyway
        return f"late {number}"

    call = asyncio.ensure_future(Hedge(delay=0.01, budget=None, discard=discard).acall(slow))
    await eventually(lambda: calls == 2)
    call.cancel()
    await asyncio.sleep(0.01)
    assert not call.done()  # waiting for the losers to unwind
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 1.0)
    release.set()
    await eventually(lambda: len(discarded) == 2)
    assert sorted(discarded) == ["late 1", "late 2"]


async def test_a_caller_cancelled_after_the_win_discards_the_winner_too() -> None:
    """Cancelled while a loser unwinds, the caller never gets the winner's result: discard does."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    stubborn = Stubborn()
    call = asyncio.ensure_future(Hedge(delay=0.01, budget=None, discard=discard).acall(stubborn))
    await eventually(lambda: stubborn.calls == 2)
    await asyncio.sleep(0.01)
    assert not call.done()  # attempt 2 won; attempt 1 unwinds
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 1.0)
    stubborn.release.set()
    await eventually(lambda: len(discarded) == 2)
    assert discarded == ["late 1", "fast 2"]


async def test_a_discard_that_raises_neither_replaces_the_answer_nor_stops_the_others() -> None:
    """The caller keeps the winner; each leftover still reaches discard; the error is reported."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)
        raise RuntimeError("discard is broken")

    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:

        class LastIsFast(Stubborn):
            async def __call__(self) -> str:
                if self.calls == 2:
                    self.calls += 1
                    return "fast 3"
                self.calls += 1
                number = self.calls
                with contextlib.suppress(asyncio.CancelledError):  # answers anyway
                    await asyncio.sleep(HANG)
                return f"late {number}"

        hedge = Hedge(delay=0.01, max_attempts=3, budget=None, discard=discard)
        assert await hedge.acall(LastIsFast()) == "fast 3"
    finally:
        loop.set_exception_handler(None)
    assert discarded == ["late 1", "late 2"]
    assert [str(context["exception"]) for context in reported] == ["discard is broken"] * 2
    assert "discard=" in reported[0]["message"]


async def test_failures_of_hedges_already_out_are_discarded_but_the_last() -> None:
    """Every attempt out before any failed: each failure another replaced goes to discard."""
    discarded: list[Any] = []

    async def discard(left: Any) -> None:
        discarded.append(left)

    calls = 0

    async def dependency() -> str:
        nonlocal calls
        calls += 1
        number = calls
        await asyncio.sleep(0.1 * number)
        raise ConnectionError(f"attempt {number}")

    hedge = Hedge(delay=0.01, max_attempts=3, budget=None, discard=discard)
    with pytest.raises(ConnectionError, match="attempt 3"):
        await hedge.acall(dependency)
    assert [str(left) for left in discarded] == ["attempt 1", "attempt 2"]


async def test_a_deadline_firing_while_a_failure_is_discarded_lets_the_discard_finish() -> None:
    """The call ends at its deadline; the discard it was awaiting still runs to its end."""
    events: list[str] = []

    async def discard(left: Any) -> None:
        events.append(f"releasing {left}")
        await asyncio.sleep(0.2)  # e.g. draining a response body
        events.append(f"released {left}")

    calls = 0

    async def dependency() -> str:
        nonlocal calls
        calls += 1
        number = calls
        await asyncio.sleep(0.05 + 0.01 * number if number < 3 else HANG)
        raise ConnectionError(f"attempt {number}")

    policy = Policy(
        timeout=0.1, hedge=Hedge(delay=0.01, max_attempts=3, budget=None, discard=discard)
    )
    with pytest.raises(resilient.DeadlineExceeded):
        await policy(dependency)()
    await eventually(lambda: len(events) == 4)
    assert sorted(events) == [
        "released attempt 1",
        "released attempt 2",
        "releasing attempt 1",
        "releasing attempt 2",
    ]
