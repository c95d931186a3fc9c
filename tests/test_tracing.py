"""OpenTelemetry spans and metrics of Policy calls and circuit breakers.

The SDK is used through ``tracer_provider=`` / ``meter_provider=`` with in-memory
exporters, so no global provider is ever set in this process; what happens when one
is set globally (later, or by environment variable) is tested in a subprocess.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, NoOpTracerProvider, SpanKind, StatusCode
from telemetry import attributes, events, points, run_python

import resilient
from resilient import tracing
from resilient.testing import FakeClock

WAIT = 0.25  # the first retry's wait with the backoff below; the second is twice that


@pytest.fixture(autouse=True)
def waits(record_waits: list[float]) -> list[float]:
    """Retry waits are recorded, not slept."""
    return record_waits


def retry(attempts: int = 3) -> resilient.Retry:
    return resilient.Retry(
        attempts=attempts,
        on=ConnectionError,
        backoff=resilient.Backoff(initial=WAIT, jitter="none"),
        budget=None,
    )


def failing(times: int) -> Any:
    """A function that raises ConnectionError ``times`` times, then returns "ok"."""
    calls = {"n": 0}

    def call_service() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise ConnectionError(f"failure {calls['n']}")
        return "ok"

    return call_service


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = exporter.get_finished_spans()
    return span


def call_key(policy: str, outcome: str) -> frozenset[tuple[str, Any]]:
    return frozenset({("resilient.policy", policy), ("resilient.outcome", outcome)})


def breaker_key(breaker: str, state: str) -> frozenset[tuple[str, Any]]:
    return frozenset({("resilient.breaker", breaker), ("resilient.breaker.state", state)})


# Spans ----------------------------------------------------------------------------------


def test_a_call_is_one_span_named_after_the_function(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Name, kind, outcome, attempts and the budget the call started with."""

    @resilient.Policy(timeout=2.0, tracer_provider=tracer_provider)
    def load_prices() -> str:
        return "ok"

    assert load_prices() == "ok"
    span = only(exporter)
    assert span.name == load_prices.__qualname__
    assert span.name.endswith("<locals>.load_prices")
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    seen = attributes(span)
    assert seen["resilient.outcome"] == "success"
    assert seen["resilient.attempts"] == 1
    assert 1.9 < seen["resilient.deadline.budget"] <= 2.0
    assert "error.type" not in seen
    assert span.events == ()


def test_name_overrides_the_qualname_and_the_budget_is_the_tighter_deadline(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """An enclosing deadline shorter than the timeout is the budget; no deadline, no attribute."""
    policy = resilient.Policy(timeout=60, name="prices", tracer_provider=tracer_provider)
    with resilient.deadline(0.5):
        policy.call(int, "1")
    resilient.Policy(name="unbounded", tracer_provider=tracer_provider).call(int, "2")
    bounded, unbounded = exporter.get_finished_spans()
    assert bounded.name == "prices"
    assert 0.4 < attributes(bounded)["resilient.deadline.budget"] <= 0.5
    assert unbounded.name == "unbounded"
    assert "resilient.deadline.budget" not in attributes(unbounded)


def test_each_retry_is_an_event_with_attempt_error_type_and_wait(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, waits: list[float]
) -> None:
    """Attempt number, error type and wait of every retry are on the call's span."""
    wrapped = resilient.Policy(retry=retry(), tracer_provider=tracer_provider)(failing(2))
    assert wrapped() == "ok"
    span = only(exporter)
    assert events(span, "resilient.retry") == [
        {"resilient.attempt": 1, "error.type": "ConnectionError", "resilient.retry.wait": WAIT},
        {"resilient.attempt": 2, "error.type": "ConnectionError", "resilient.retry.wait": 2 * WAIT},
    ]
    assert waits == [WAIT, 2 * WAIT]
    assert attributes(span)["resilient.attempts"] == 3
    assert attributes(span)["resilient.outcome"] == "success"
    assert span.status.status_code is StatusCode.UNSET


def test_a_retried_result_is_an_event_with_error_type_result(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A retry asked for by on_result names no exception: its error.type is "result"."""
    results = iter([None, "ok", None, "ok"])
    on_result = resilient.Retry(attempts=2, on_result=lambda value: value is None, budget=None)
    policy = resilient.Policy(retry=on_result, tracer_provider=tracer_provider)

    async def next_result() -> str | None:
        return next(results)

    assert policy.call(lambda: next(results)) == "ok"
    assert asyncio.run(policy.acall(next_result)) == "ok"
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        [event] = events(span, "resilient.retry")
        assert event["error.type"] == "result"
        assert attributes(span)["resilient.attempts"] == 2


def test_a_failed_call_is_an_error_span_with_the_exception(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Status ERROR, an exception event with the retry notes, error.type, outcome failure."""
    wrapped = resilient.Policy(retry=retry(), tracer_provider=tracer_provider)(failing(5))
    with pytest.raises(ConnectionError):
        wrapped()
    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ConnectionError: failure 3"
    seen = attributes(span)
    assert seen["resilient.outcome"] == "failure"
    assert seen["resilient.attempts"] == 3
    assert seen["error.type"] == "ConnectionError"
    assert len(events(span, "resilient.retry")) == 2
    [exception] = events(span, "exception")
    assert exception["exception.type"] == "ConnectionError"
    assert exception["exception.message"] == "failure 3"
    assert "gave up after 3 attempts" in exception["exception.stacktrace"]


def test_breaker_trip_and_rejection_are_events_and_the_rejected_call_made_no_attempt(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The trip is an event where it happens, the refused attempt too; opening logs a WARNING."""
    breaker = resilient.CircuitBreaker(
        name="payments", failure_threshold=2, reset_timeout=30, clock=FakeClock()
    )
    policy = resilient.Policy(retry=retry(5), breaker=breaker, tracer_provider=tracer_provider)
    wrapped = policy(failing(10))
    with (
        caplog.at_level(logging.INFO, logger="resilient.breaker"),
        pytest.raises(resilient.CircuitOpenError),
    ):
        wrapped()  # two failures trip it; the third attempt is refused
    with pytest.raises(resilient.CircuitOpenError):
        wrapped()
    tripped, rejected = exporter.get_finished_spans()

    assert [event.name for event in tripped.events] == [
        "resilient.retry",
        "resilient.breaker.state_change",
        "resilient.retry",
        "resilient.circuit_open",
        "exception",
    ]
    assert events(tripped, "resilient.breaker.state_change") == [
        {
            "resilient.breaker": "payments",
            "resilient.breaker.state": "open",
            "resilient.breaker.previous_state": "closed",
            "resilient.breaker.reason": "failure_threshold",
        }
    ]
    assert events(tripped, "resilient.circuit_open") == [
        {"resilient.breaker": "payments", "resilient.retry_after": 30.0}
    ]
    assert attributes(tripped)["resilient.outcome"] == "circuit_open"
    assert attributes(tripped)["resilient.attempts"] == 2

    assert attributes(rejected)["resilient.outcome"] == "circuit_open"
    assert attributes(rejected)["resilient.attempts"] == 0
    assert attributes(rejected)["error.type"] == "resilient.errors.CircuitOpenError"
    assert rejected.status.status_code is StatusCode.ERROR
    assert [event.name for event in rejected.events] == ["resilient.circuit_open", "exception"]

    [record] = caplog.records
    assert record.name == "resilient.breaker"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "circuit breaker 'payments': closed -> open (failure_threshold)"


def test_an_isolated_breaker_rejection_has_no_retry_after(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """retry_after is infinite when held open: the attribute is left out, not inf."""
    breaker = resilient.CircuitBreaker(name="held")
    breaker.isolate()
    with pytest.raises(resilient.CircuitOpenError):
        resilient.Policy(breaker=breaker, tracer_provider=tracer_provider).call(int, "1")
    assert events(only(exporter), "resilient.circuit_open") == [{"resilient.breaker": "held"}]


def test_deadline_and_bulkhead_rejections_have_their_outcomes(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """retry_after is infinite when held open: the attribute is left out, not inf."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, name="db")
    policy = resilient.Policy(bulkhead=bulkhead, tracer_provider=tracer_provider)
    bulkhead.acquire()
    try:
        with pytest.raises(resilient.BulkheadFull):
            policy.call(int, "1")
    finally:
        bulkhead.release()
    with resilient.deadline(0), pytest.raises(resilient.DeadlineExceeded):
        policy.call(int, "1")
    full, expired = exporter.get_finished_spans()
    assert attributes(full)["resilient.outcome"] == "bulkhead_full"
    assert attributes(full)["resilient.attempts"] == 0
    assert attributes(full)["error.type"] == "resilient.errors.BulkheadFull"
    assert full.status.status_code is StatusCode.ERROR
    assert attributes(expired)["resilient.outcome"] == "deadline_exceeded"
    assert attributes(expired)["resilient.attempts"] == 0
    assert attributes(expired)["resilient.deadline.budget"] <= 0


def test_a_call_inside_a_span_is_its_child_and_the_function_sees_the_policy_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The Policy span nests under the caller's span, and the function's spans under it."""
    """A full bulkhead and a spent deadline are outcomes of their own, with no attempt made."""
    tracer = tracer_provider.get_tracer("test")

    @resilient.Policy(name="load", tracer_provider=tracer_provider)
    def load() -> None:
        with tracer.start_as_current_span("query"):
            pass

    with tracer.start_as_current_span("checkout"):
        load()
    query, policy_span, checkout = exporter.get_finished_spans()
    assert policy_span.name == "load"
    assert policy_span.parent is not None
    assert checkout.context is not None
    assert policy_span.parent.span_id == checkout.context.span_id
    assert query.parent is not None
    assert policy_span.context is not None
    assert query.parent.span_id == policy_span.context.span_id
    assert not trace.get_current_span().get_span_context().is_valid  # detached again


# Async ----------------------------------------------------------------------------------


async def test_async_calls_make_the_same_spans(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, waits: list[float]
) -> None:
    """Retries, outcome, attempts and nesting, with a coroutine that suspends."""
    tracer = tracer_provider.get_tracer("test")
    calls = {"n": 0}

    @resilient.Policy(timeout=5, retry=retry(), tracer_provider=tracer_provider)
    async def fetch_stock() -> int:
        calls["n"] += 1
        await asyncio.sleep(0)
        with tracer.start_as_current_span("inner"):
            if calls["n"] == 1:
                raise ConnectionError("reset")
        return 7

    with tracer.start_as_current_span("outer"):
        assert await fetch_stock() == 7
    spans = {span.name: span for span in exporter.get_finished_spans()}
    policy_span = spans[fetch_stock.__qualname__]
    assert attributes(policy_span)["resilient.attempts"] == 2
    assert attributes(policy_span)["resilient.outcome"] == "success"
    assert 4.9 < attributes(policy_span)["resilient.deadline.budget"] <= 5
    assert events(policy_span, "resilient.retry") == [
        {"resilient.attempt": 1, "error.type": "ConnectionError", "resilient.retry.wait": WAIT}
    ]
    assert policy_span.parent is not None
    assert spans["outer"].context is not None
    assert policy_span.parent.span_id == spans["outer"].context.span_id
    inner = [span for span in exporter.get_finished_spans() if span.name == "inner"]
    assert len(inner) == 2
    assert policy_span.context is not None
    assert {span.parent.span_id for span in inner if span.parent} == {policy_span.context.span_id}


async def test_async_failures_rejections_and_cancellation(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A cancelled call is outcome "cancelled", and not an error of the dependency."""
    breaker = resilient.CircuitBreaker(name="inventory", failure_threshold=1)
    bulkhead = resilient.Bulkhead(max_concurrent=1)
    policy = resilient.Policy(
        bulkhead=bulkhead, breaker=breaker, attempt_timeout=5, tracer_provider=tracer_provider
    )
    started = asyncio.Event()

    @policy
    async def slow() -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await started.wait()
    with pytest.raises(resilient.BulkheadFull):
        await slow()  # the running call holds the only slot
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    @policy
    async def broken() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await broken()
    with pytest.raises(resilient.CircuitOpenError):
        await broken()
    full, cancelled, failed, rejected = exporter.get_finished_spans()
    assert attributes(full)["resilient.outcome"] == "bulkhead_full"
    assert attributes(cancelled)["resilient.outcome"] == "cancelled"
    assert attributes(cancelled)["resilient.attempts"] == 1
    assert cancelled.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes(cancelled)
    assert attributes(failed)["resilient.outcome"] == "failure"
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == [
        "resilient.breaker.state_change",
        "exception",
    ]
    assert attributes(rejected)["resilient.outcome"] == "circuit_open"
    assert attributes(rejected)["resilient.attempts"] == 0


async def test_async_bulkhead_wait_that_times_out_is_recorded(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A call that waited for a slot in vain still ends its span, as bulkhead_full."""
    bulkhead = resilient.Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.01)
    policy = resilient.Policy(bulkhead=bulkhead, tracer_provider=tracer_provider)
    bulkhead.acquire()
    try:
        with pytest.raises(resilient.BulkheadFull):
            await policy.acall(asyncio.sleep, 0)
    finally:
        bulkhead.release()
    assert attributes(only(exporter))["resilient.outcome"] == "bulkhead_full"


# Circuit breaker state changes ----------------------------------------------------------


def test_state_changes_are_events_on_the_current_span_and_logged(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Opening logs a WARNING, half-open and closed INFO; each is an event where it happens."""
    clock = FakeClock()
    breaker = resilient.CircuitBreaker(
        name="search", failure_threshold=1, reset_timeout=10, clock=clock
    )
    policy = resilient.Policy(breaker=breaker, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("test")
    with caplog.at_level(logging.INFO, logger="resilient.breaker"):
        with pytest.raises(ConnectionError):
            policy(failing(1))()
        clock.now += 10
        assert policy.call(str, 1) == "1"  # half-open, then a successful probe closes it
        with tracer.start_as_current_span("maintenance"):
            breaker.isolate()
        breaker.reset()  # no span: logged and counted all the same
    opened, probe, maintenance = exporter.get_finished_spans()
    assert [
        e["resilient.breaker.state"] for e in events(opened, "resilient.breaker.state_change")
    ] == ["open"]
    assert [
        (
            e["resilient.breaker.previous_state"],
            e["resilient.breaker.state"],
            e["resilient.breaker.reason"],
        )
        for e in events(probe, "resilient.breaker.state_change")
    ] == [
        ("open", "half_open", "reset_timeout elapsed"),
        ("half_open", "closed", "probes succeeded"),
    ]
    assert events(maintenance, "resilient.breaker.state_change")[0]["resilient.breaker.state"] == (
        "isolated"
    )
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", "circuit breaker 'search': closed -> open (failure_threshold)"),
        ("INFO", "circuit breaker 'search': open -> half_open (reset_timeout elapsed)"),
        ("INFO", "circuit breaker 'search': half_open -> closed (probes succeeded)"),
        ("WARNING", "circuit breaker 'search': closed -> isolated (isolate())"),
        ("INFO", "circuit breaker 'search': isolated -> closed (reset())"),
    ]


# Metrics --------------------------------------------------------------------------------


def test_metrics_after_successes_failures_and_a_breaker_trip(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Counters, histograms and the state gauge after a scripted sequence, then recovery."""
    clock = FakeClock()
    breaker = resilient.CircuitBreaker(
        name="ledger", failure_threshold=3, reset_timeout=10, clock=clock
    )
    policy = resilient.Policy(
        name="ledger call", retry=retry(2), breaker=breaker, meter_provider=meter_provider
    )
    assert policy.call(failing(0)) == "ok"  # one attempt
    assert policy.call(failing(1)) == "ok"  # two attempts
    with pytest.raises(ConnectionError):
        policy.call(failing(2))  # two failed attempts: the breaker is at 2 of 3
    with pytest.raises(resilient.CircuitOpenError):
        policy.call(failing(2))  # the first failure trips it; the retry is refused
    with pytest.raises(resilient.CircuitOpenError):
        policy.call(failing(0))  # rejected, no attempt

    seen = points(reader)
    assert seen["resilient.calls"] == {
        call_key("ledger call", "success"): 2,
        call_key("ledger call", "failure"): 1,
        call_key("ledger call", "circuit_open"): 2,
    }
    assert seen["resilient.retries"] == {
        frozenset({("resilient.policy", "ledger call"), ("error.type", "ConnectionError")}): 3
    }
    durations = seen["resilient.call.duration"]
    assert durations[call_key("ledger call", "success")][0] == 2
    assert durations[call_key("ledger call", "circuit_open")][0] == 2
    assert all(total >= 0 for _, total in durations.values())
    # attempts: 1 + 2 + 2 + 1 + 0 over 5 calls
    assert seen["resilient.call.attempts"] == {
        frozenset({("resilient.policy", "ledger call")}): (5, 6)
    }
    transitions = seen["resilient.breaker.transitions"]
    assert transitions[breaker_key("ledger", "open")] == 1
    gauge = seen["resilient.breaker.state"]
    assert [gauge[breaker_key("ledger", state.value)] for state in resilient.BreakerState] == [
        0,
        1,
        0,
        0,
    ]

    clock.now += 10
    assert policy.call(failing(0)) == "ok"  # the probe closes it again
    seen = points(reader)
    transitions = seen["resilient.breaker.transitions"]
    assert transitions[breaker_key("ledger", "half_open")] == 1
    assert transitions[breaker_key("ledger", "closed")] == 1
    assert seen["resilient.breaker.state"][breaker_key("ledger", "closed")] == 1
    assert seen["resilient.breaker.state"][breaker_key("ledger", "open")] == 0
    assert seen["resilient.calls"][call_key("ledger call", "success")] == 3


async def test_async_metrics_and_the_other_outcomes(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Async calls count the same way; bulkhead and deadline rejections are outcomes."""
    bulkhead = resilient.Bulkhead(max_concurrent=1)
    policy = resilient.Policy(bulkhead=bulkhead, timeout=1, meter_provider=meter_provider)

    async def quick() -> int:
        return 1

    assert await policy.acall(quick) == 1
    bulkhead.acquire()
    try:
        with pytest.raises(resilient.BulkheadFull):
            await policy.acall(quick)
    finally:
        bulkhead.release()
    with resilient.deadline(0), pytest.raises(resilient.DeadlineExceeded):
        await policy.acall(quick)
    name = quick.__qualname__
    assert points(reader)["resilient.calls"] == {
        call_key(name, "success"): 1,
        call_key(name, "bulkhead_full"): 1,
        call_key(name, "deadline_exceeded"): 1,
    }


def test_the_state_gauge_does_not_keep_breakers_alive(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """The gauge reports a live breaker and forgets it once it is collected: no leak."""
    resilient.Policy(meter_provider=meter_provider)  # registers the gauge on this provider
    breaker = resilient.CircuitBreaker(name="short-lived")
    assert points(reader)["resilient.breaker.state"][breaker_key("short-lived", "closed")] == 1
    del breaker
    gc.collect()
    gauge = points(reader).get("resilient.breaker.state", {})
    assert breaker_key("short-lived", "closed") not in gauge


def test_the_limit_gauge_follows_adaptive_bulkheads_and_forgets_them(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """resilient.bulkhead.limit: one series per adaptive bulkhead, its current limit; no leak."""
    from resilient.adaptive import AdaptiveLimit

    resilient.Policy(meter_provider=meter_provider)  # registers the gauges on this provider
    clock = FakeClock()
    limit = AdaptiveLimit.aimd(initial_limit=30, min_limit=1, clock=clock)
    bulkhead = resilient.Bulkhead(max_concurrent=limit, name="db")
    resilient.Bulkhead(max_concurrent=5, name="fixed")  # a fixed limit is configuration
    key = frozenset({("resilient.bulkhead", "db")})
    gauge = points(reader)["resilient.bulkhead.limit"]
    assert gauge[key] == 30
    assert frozenset({("resilient.bulkhead", "fixed")}) not in gauge
    ticket = bulkhead.acquire_ticket()
    bulkhead.release_ticket(ticket, TimeoutError())
    assert points(reader)["resilient.bulkhead.limit"][key] == 27
    del bulkhead, limit
    gc.collect()
    assert key not in points(reader).get("resilient.bulkhead.limit", {})


def test_instruments_are_made_once_per_provider(meter_provider: MeterProvider) -> None:
    """Two policies on one provider share instruments; a provider without weakrefs works too."""

    class Slotted:
        __slots__ = ("inner",)

        def __init__(self, inner: MeterProvider) -> None:
            self.inner = inner

        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner.get_meter(*args, **kwargs)

    first = tracing.instruments_for(meter_provider)
    assert first is not None
    assert tracing.instruments_for(meter_provider) is first
    other = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    slotted = Slotted(other)
    pinned = tracing.instruments_for(slotted)
    assert pinned is not None
    assert tracing.instruments_for(slotted) is pinned
    assert pinned is not first
    assert tracing.instruments_for(NoOpMeterProvider()) is None


# Off ------------------------------------------------------------------------------------


def test_tracing_false_records_nothing(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not even inside a recording span: no child span, the recorder is never asked."""

    def refuse(self: tracing.CallSite) -> None:
        raise AssertionError("tracing=False asked for a recorder")

    monkeypatch.setattr(tracing.CallSite, "begin", refuse)
    policy = resilient.Policy(retry=retry(), tracing=False)
    with tracer_provider.get_tracer("test").start_as_current_span("outer"):
        assert policy(failing(1))() == "ok"
    assert [span.name for span in exporter.get_finished_spans()] == ["outer"]
    assert "tracing=False" in repr(policy)
    with pytest.raises(ValueError, match="tracing=False"):
        resilient.Policy(tracing=False, tracer_provider=tracer_provider)


async def test_without_a_configured_provider_no_recorder_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API's default providers: the drivers do not even call into tracing."""

    def refuse(self: tracing.CallSite) -> None:
        raise AssertionError("asked for a recorder with no provider configured")

    monkeypatch.setattr(tracing.CallSite, "begin", refuse)
    seen: list[bool] = []

    @resilient.Policy(retry=retry())
    def sync() -> None:
        seen.append(trace.get_current_span().get_span_context().is_valid)

    @resilient.Policy(retry=retry())
    async def asynchronous() -> None:
        seen.append(trace.get_current_span().get_span_context().is_valid)

    sync()
    await asynchronous()
    assert seen == [False, False]
    assert not resilient.Policy()._telemetry.wanted()  # type: ignore[union-attr]


def test_no_op_providers_given_explicitly_record_nothing() -> None:
    """No-op providers count as off even when given explicitly: no tracer, no instruments."""
    telemetry = tracing.Telemetry(NoOpTracerProvider(), NoOpMeterProvider())
    assert telemetry.wanted()  # an explicit provider means: ask
    assert telemetry.tracer() is None
    assert telemetry.instruments() is None
    site = tracing.CallSite("f", telemetry, None)
    assert site.begin() is None
    policy = resilient.Policy(tracer_provider=NoOpTracerProvider())
    assert policy.call(int, "3") == 3

    class Disabled:
        """The SDK's providers with OTEL_SDK_DISABLED=true hand out no-op tracers and meters."""

        def get_tracer(self, *args: Any) -> Any:
            return NoOpTracer()

        def get_meter(self, *args: Any) -> Any:
            return NoOpMeter("disabled")

    disabled = tracing.Telemetry(Disabled(), Disabled())  # type: ignore[arg-type]
    assert disabled.tracer() is None
    assert disabled.instruments() is None


def test_values_of_error_type_and_outcome() -> None:
    """error.type is the qualified class name; outcomes come from the documented set."""
    assert tracing.error_type(ValueError()) == "ValueError"
    assert tracing.error_type(resilient.DeadlineExceeded()) == "resilient.errors.DeadlineExceeded"
    assert tracing.outcome_of(None) == "success"
    assert tracing.outcome_of(KeyboardInterrupt()) == "cancelled"
    assert set(map(tracing.outcome_of, [None, ValueError()])) <= set(tracing.OUTCOMES)


def test_policy_name_and_tracing_are_checked() -> None:
    """Bad name= and tracing= values are refused at construction; repr shows the name."""
    with pytest.raises(ValueError, match="name"):
        resilient.Policy(name="")
    with pytest.raises(TypeError, match="name"):
        resilient.Policy(name=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tracing"):
        resilient.Policy(tracing=None)  # type: ignore[arg-type]
    assert "name='prices'" in repr(resilient.Policy(name="prices"))


# Global providers, in a fresh interpreter -----------------------------------------------

LATE_GLOBAL_PROVIDERS = """
import json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient

@resilient.Policy(name="quote")
def quote() -> int:
    return 1

@resilient.Policy(name="silent", tracing=False)
def silent() -> int:
    return 1

quote()  # nothing configured yet
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
quote()  # metrics only
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
quote()
silent()
calls = [
    point.value
    for resource in reader.get_metrics_data().resource_metrics
    for scope in resource.scope_metrics
    for metric in scope.metrics
    if metric.name == "resilient.calls"
    for point in metric.data.data_points
]
print(json.dumps({"spans": [s.name for s in exporter.get_finished_spans()], "calls": calls}))
"""

ENVIRONMENT_PROVIDER = """
import json
from opentelemetry import trace
import resilient

spans = []

class Exporter:
    def export(self, batch):
        spans.extend(s.name for s in batch)
    def shutdown(self):
        pass

resilient.Policy(name="configured").call(int, "1")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(Exporter()))
resilient.Policy(name="configured").call(int, "1")
print(json.dumps({"spans": spans}))
"""


def test_providers_set_globally_after_the_policy_was_built_are_picked_up() -> None:
    """Metrics once a meter provider is set, spans once a tracer provider is set."""
    assert run_python(LATE_GLOBAL_PROVIDERS) == {"spans": ["quote"], "calls": [2]}


def test_a_provider_named_by_environment_variable_is_used() -> None:
    """OTEL_PYTHON_TRACER_PROVIDER names a provider the API loads lazily; Policies see it."""
    found = run_python(ENVIRONMENT_PROVIDER, OTEL_PYTHON_TRACER_PROVIDER="sdk_tracer_provider")
    assert found == {"spans": ["configured"]}
