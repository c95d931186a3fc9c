"""The transports' OpenTelemetry client spans: one per attempt, HTTP semantic conventions.

Spans go to the SDK's in-memory exporter through ``tracer_provider=``, so no global
provider is set in this process (that case runs in a subprocess). The integration
tests use the real server of tests/live_server.py: the ``traceparent`` header must
reach it, and beside opentelemetry-instrumentation-httpx each attempt must still
have exactly one span.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from live_server import LiveServer, Reply
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from telemetry import attributes, events, points, run_python

from resilient import (
    AsyncResilientTransport,
    Backoff,
    CircuitBreaker,
    Policy,
    ResilientTransport,
    Retry,
    TransportCircuitOpen,
)
from resilient.tracing.metrics import MAX_POLICIES, PolicyAttributes, instruments_for

BASE = "http://api.test"
# Retry waits are recorded, not slept.
pytestmark = pytest.mark.usefixtures("record_waits")


@pytest.fixture(autouse=True)
def contexts_restored(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every span's context is detached where it was attached: OpenTelemetry logs if not."""
    yield
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.context")]
    assert not trace.get_current_span().get_span_context().is_valid


RETRY = Retry(attempts=3, backoff=Backoff(initial=0.25, jitter="none"), budget=None)


def client_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]


def answers(*statuses: int | type[Exception]) -> Callable[[httpx.Request], httpx.Response]:
    """A MockTransport handler answering from ``statuses`` (then 200s)."""
    planned = list(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        outcome = planned.pop(0) if planned else 200
        if isinstance(outcome, int):
            return httpx.Response(outcome)
        raise outcome(f"scripted {outcome.__name__}")

    return handler


class Client:
    """A sync or async client over a resilient transport; ``get`` is awaitable for both."""

    def __init__(self, kind: str, transport: Any = None, **options: Any) -> None:
        self.kind = kind
        if kind == "sync":
            self.sync = httpx.Client(
                transport=ResilientTransport(transport, **options), base_url=BASE
            )
        else:
            self.asynchronous = httpx.AsyncClient(
                transport=AsyncResilientTransport(transport, **options), base_url=BASE
            )

    async def get(self, url: str = "/") -> httpx.Response:
        return await self.request("GET", url)

    async def request(self, method: str, url: str) -> httpx.Response:
        if self.kind == "sync":
            return self.sync.request(method, url)
        return await self.asynchronous.request(method, url)

    async def close(self) -> None:
        if self.kind == "sync":
            self.sync.close()
        else:
            await self.asynchronous.aclose()


MakeClient = Callable[..., Client]


@pytest.fixture(params=["sync", "async"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    made: list[Client] = []

    def build(handler: Callable[[httpx.Request], httpx.Response] | None, **options: Any) -> Client:
        inner: Any = None
        if handler is not None:
            inner = httpx.MockTransport(handler)
        made.append(Client(request.param, inner, **options))
        return made[-1]

    yield build
    for client in made:
        await client.close()


# Spans per attempt -----------------------------------------------------------------------


async def test_each_attempt_is_one_client_span_with_http_attributes(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    client = make(answers(503, 200), retry=RETRY, tracer_provider=tracer_provider)
    response = await client.get("/prices?currency=eur")
    assert response.status_code == 200
    first, second = client_spans(exporter)
    for span in (first, second):
        assert span.name == "GET"
        assert span.attributes is not None
        assert span.attributes["http.request.method"] == "GET"
        assert span.attributes["server.address"] == "api.test"
        assert span.attributes["server.port"] == 80
        assert span.attributes["url.full"] == "http://api.test/prices?currency=eur"
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert "error.type" not in second.attributes
    assert second.status.status_code is StatusCode.UNSET
    # The retry is a new span in the same trace, sent after the first one ended.
    assert first.context is not None
    assert second.context is not None
    assert first.context.trace_id == second.context.trace_id
    assert first.end_time is not None
    assert second.start_time is not None
    assert first.end_time <= second.start_time


async def test_a_failed_attempt_records_the_error_type_and_the_exception(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    client = make(answers(httpx.ConnectError, 200), retry=RETRY, tracer_provider=tracer_provider)
    assert (await client.get()).status_code == 200
    failed, fine = client_spans(exporter)
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "httpx.ConnectError"
    assert "http.response.status_code" not in failed.attributes
    assert failed.status.status_code is StatusCode.ERROR
    [event] = [event for event in failed.events if event.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "httpx.ConnectError"
    assert fine.status.status_code is StatusCode.UNSET


async def test_a_client_error_status_is_an_error_on_the_client_span(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """HTTP semantic conventions: a 4xx is an error for the client, whatever the breaker says."""
    client = make(answers(404), tracer_provider=tracer_provider)
    assert (await client.get()).status_code == 404
    [span] = client_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["error.type"] == "404"
    assert span.status.status_code is StatusCode.ERROR


async def test_attempt_spans_are_children_of_the_current_span(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    client = make(answers(503, 200), retry=RETRY, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("checkout") as parent:
        await client.get()
    ids = parent.get_span_context()
    attempts = client_spans(exporter)
    assert len(attempts) == 2
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == ids.span_id
        assert span.context is not None
        assert span.context.trace_id == ids.trace_id


async def test_a_policy_span_is_the_parent_of_a_retried_requests_attempts(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A Policy-wrapped function calling the client: its span holds every attempt."""
    client = make(answers(503, 503, 200), retry=RETRY, tracer_provider=tracer_provider)
    policy = Policy(tracer_provider=tracer_provider, name="load prices")

    async def load() -> int:
        return (await client.get()).status_code

    assert await policy(load)() == 200
    [outer] = [span for span in exporter.get_finished_spans() if span.name == "load prices"]
    attempts = client_spans(exporter)
    assert len(attempts) == 3
    assert outer.context is not None
    assert all(span.parent is not None for span in attempts)
    assert {span.parent.span_id for span in attempts if span.parent} == {outer.context.span_id}


def test_telemetry_options_are_checked(tracer_provider: TracerProvider) -> None:
    with pytest.raises(ValueError, match="tracing=False contradicts"):
        ResilientTransport(tracing=False, tracer_provider=tracer_provider)
    with pytest.raises(TypeError, match="tracer_provider must be an OpenTelemetry"):
        AsyncResilientTransport(tracer_provider="console")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="meter_provider must be an OpenTelemetry"):
        ResilientTransport(meter_provider=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tracing must be True or False"):
        ResilientTransport(tracing="off")  # type: ignore[arg-type]


async def test_without_a_configured_provider_no_span_is_made(make: MakeClient) -> None:
    """The API's default provider: nothing is recorded, and nothing goes on the wire."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    client = make(handler)
    assert (await client.get()).status_code == 200
    assert "traceparent" not in seen[0].headers
    assert not trace.get_current_span().get_span_context().is_valid


async def test_without_a_current_span_the_request_has_a_span_over_its_attempts(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """No trace to join: an INTERNAL span for the request keeps its attempts in one trace."""
    client = make(answers(503, 200), retry=RETRY, tracer_provider=tracer_provider)
    assert (await client.get("/prices")).status_code == 200
    [logical] = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.INTERNAL]
    assert logical.name == "GET"
    assert logical.parent is None
    assert logical.context is not None
    found = attributes(logical)
    assert found["url.full"] == "http://api.test/prices"
    assert found["http.response.status_code"] == 200
    assert found["resilient.attempts"] == 2
    assert logical.status.status_code is StatusCode.UNSET
    parents = [span.parent.span_id for span in client_spans(exporter) if span.parent]
    assert parents == [logical.context.span_id] * 2


async def test_an_open_circuit_is_an_event_and_an_error_on_the_requests_span(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    def breaker(origin: str) -> CircuitBreaker:
        return CircuitBreaker(
            name=origin, failure_threshold=1, reset_timeout=30.0, clock=lambda: 100.0
        )

    client = make(answers(500), retry=None, breaker=breaker, tracer_provider=tracer_provider)
    assert (await client.get()).status_code == 500
    with pytest.raises(TransportCircuitOpen):
        await client.get()
    attempt, tripped, rejected = exporter.get_finished_spans()
    assert attempt.kind is SpanKind.CLIENT
    # The trip happened while the first request's span was current.
    [change] = events(tripped, "resilient.breaker.state_change")
    assert change["resilient.breaker"] == "http://api.test:80"
    assert change["resilient.breaker.state"] == "open"
    assert tripped.status.status_code is StatusCode.ERROR
    assert attributes(tripped)["error.type"] == "500"
    # The rejected request sent nothing: no attempt span, an event and an error instead.
    assert events(rejected, "resilient.circuit_open") == [
        {"resilient.breaker": "http://api.test:80", "resilient.retry_after": 30.0}
    ]
    found = attributes(rejected)
    assert found["resilient.attempts"] == 0
    assert found["error.type"] == "resilient.transport.TransportCircuitOpen"
    assert rejected.status.status_code is StatusCode.ERROR
    assert [event.name for event in rejected.events][-1] == "exception"


async def test_url_full_hides_credentials_and_signatures_and_odd_methods_are_other(
    make: MakeClient, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    client = make(answers(200), tracer_provider=tracer_provider)
    await client.request("PURGE", "https://user:secret@cdn.test/logo.png?sig=abc&size=2")
    [attempt] = client_spans(exporter)
    assert attempt.name == "HTTP"
    found = attributes(attempt)
    assert found["http.request.method"] == "_OTHER"
    assert found["http.request.method_original"] == "PURGE"
    assert found["server.address"] == "cdn.test"
    assert found["server.port"] == 443
    assert found["url.full"] == "https://REDACTED:REDACTED@cdn.test/logo.png?sig=REDACTED&size=2"


async def test_an_async_attempt_cut_off_by_attempt_timeout_ends_its_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    replies = [None, httpx.Response(200)]

    async def handler(request: httpx.Request) -> httpx.Response:
        reply = replies.pop(0)
        if reply is None:
            await asyncio.sleep(5)  # cancelled at attempt_timeout
        assert reply is not None
        return reply

    transport = AsyncResilientTransport(
        httpx.MockTransport(handler),
        retry=RETRY,
        attempt_timeout=0.05,
        tracer_provider=tracer_provider,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(f"{BASE}/")).status_code == 200
    cut, fine = client_spans(exporter)
    assert attributes(cut)["error.type"] == "asyncio.exceptions.CancelledError"
    assert cut.status.status_code is StatusCode.ERROR
    assert cut.end_time is not None
    assert attributes(fine)["http.request.resend_count"] == 1


# Metrics -------------------------------------------------------------------------------

ORIGIN = "http://api.test:80"


async def test_metrics_per_origin_after_successes_retries_failures_and_a_trip(
    make: MakeClient, meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    # The gauge has one series per breaker name: this test's breaker gets its own.
    name = f"{ORIGIN} (metrics test)"

    def breaker(origin: str) -> CircuitBreaker:
        assert origin == ORIGIN
        return CircuitBreaker(name=name, failure_threshold=3, reset_timeout=30.0)

    client = make(
        answers(200, httpx.ConnectError, 200, 503, 503, 503),
        retry=RETRY,
        breaker=breaker,
        meter_provider=meter_provider,
    )
    assert (await client.get()).status_code == 200  # at once
    assert (await client.get()).status_code == 200  # after a connection error
    assert (await client.get()).status_code == 503  # three 503s: retries spent, breaker open
    with pytest.raises(TransportCircuitOpen):
        await client.get()
    found = points(reader)
    outcome = "resilient.outcome"
    assert found["resilient.calls"] == {
        frozenset({("resilient.policy", ORIGIN), (outcome, "success")}): 2,
        frozenset({("resilient.policy", ORIGIN), (outcome, "failure")}): 1,
        frozenset({("resilient.policy", ORIGIN), (outcome, "circuit_open")}): 1,
    }
    assert found["resilient.retries"] == {
        frozenset({("resilient.policy", ORIGIN), ("error.type", "httpx.ConnectError")}): 1,
        frozenset({("resilient.policy", ORIGIN), ("error.type", "503")}): 2,
    }
    assert found["resilient.call.attempts"] == {
        frozenset({("resilient.policy", ORIGIN)}): (4, 1 + 2 + 3 + 0)
    }
    opened = frozenset({("resilient.breaker", name), ("resilient.breaker.state", "open")})
    assert found["resilient.breaker.transitions"] == {opened: 1}
    assert found["resilient.breaker.state"][opened] == 1


def live_attribute_sets(prefix: str) -> list[PolicyAttributes]:
    """The metric attribute sets alive in this process for policies named ``prefix...``."""
    gc.collect()
    return [
        found
        for found in gc.get_objects()
        if isinstance(found, PolicyAttributes) and found.name.startswith(prefix)
    ]


async def test_metric_attribute_sets_are_bounded_by_max_hosts(
    make: MakeClient, meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Requests to 3 x max_hosts hosts, each retried once: the attribute sets the metrics
    are recorded with go with each evicted origin, so no more than max_hosts stay."""
    max_hosts = 4
    failed: set[str] = set()

    def first_fails(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in failed:
            return httpx.Response(200)
        failed.add(host)
        return httpx.Response(503)

    client = make(first_fails, retry=RETRY, max_hosts=max_hosts, meter_provider=meter_provider)
    for n in range(3 * max_hosts):
        assert (await client.get(f"http://bounded-{n}.test/")).status_code == 200
    assert len(live_attribute_sets("http://bounded-")) <= max_hosts
    instruments = instruments_for(meter_provider)
    assert instruments is not None
    assert not instruments._policies  # the transport keeps its own, per origin
    calls = points(reader)["resilient.calls"]
    assert len(calls) == 3 * max_hosts  # every origin was still recorded
    assert set(calls.values()) == {1}


def test_instruments_keep_the_attribute_sets_of_a_bounded_number_of_names(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Policies named by the thousand (a name per tenant, say) do not grow the cache for good."""
    instruments = instruments_for(meter_provider)
    assert instruments is not None
    for n in range(2 * MAX_POLICIES + 1):
        instruments.record_call(f"policy-{n}", "success", 0.01, 1)
        instruments.record_retry(f"policy-{n}", "TimeoutError")
        assert len(instruments._policies) <= MAX_POLICIES
    instruments.record_call("policy-0", "success", 0.01, 1)  # made again as needed
    calls = points(reader)["resilient.calls"]
    assert (
        calls[frozenset({("resilient.policy", "policy-0"), ("resilient.outcome", "success")})] == 2
    )
    assert len(points(reader)["resilient.retries"]) == 2 * MAX_POLICIES + 1


# Against a real server -------------------------------------------------------------------


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_each_attempts_traceparent_reaches_the_server(
    server: LiveServer, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    server.plan("/", Reply(503), Reply(200))
    transport = ResilientTransport(retry=RETRY, tracer_provider=tracer_provider)
    with httpx.Client(transport=transport) as client:
        assert client.get(server.url("/")).status_code == 200
    attempts = client_spans(exporter)
    assert [seen.headers.get("traceparent") for seen in server.seen] == [
        traceparent_of(span) for span in attempts
    ]
    assert attempts[0].attributes is not None
    assert attempts[0].attributes["server.address"] == "127.0.0.1"
    assert attempts[0].attributes["server.port"] == server.port
    assert attempts[0].attributes["network.protocol.version"] == "1.1"


async def test_each_attempts_traceparent_reaches_the_server_async(
    server: LiveServer, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    server.plan("/", Reply(503), Reply(200))
    transport = AsyncResilientTransport(retry=RETRY, tracer_provider=tracer_provider)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(server.url("/"))).status_code == 200
    assert [seen.headers.get("traceparent") for seen in server.seen] == [
        traceparent_of(span) for span in client_spans(exporter)
    ]


# Beside opentelemetry-instrumentation-httpx ----------------------------------------------


@pytest.fixture
def instrumentor(tracer_provider: TracerProvider) -> Iterator[HTTPXClientInstrumentor]:
    instrumentor = HTTPXClientInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def test_instrumenting_httpx_globally_does_not_double_the_attempt_spans(
    server: LiveServer,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    instrumentor: HTTPXClientInstrumentor,
) -> None:
    """``HTTPXClientInstrumentor().instrument()`` patches httpx.HTTPTransport, which the
    resilient transport wraps: the transport's own span per attempt is the only one."""
    instrumentor.instrument(tracer_provider=tracer_provider)
    server.plan("/", Reply(503), Reply(200))
    with httpx.Client(
        transport=ResilientTransport(retry=RETRY, tracer_provider=tracer_provider)
    ) as c:
        assert c.get(server.url("/")).status_code == 200
    attempts = client_spans(exporter)
    assert len(attempts) == 2
    assert [seen.headers.get("traceparent") for seen in server.seen] == [
        traceparent_of(span) for span in attempts
    ]


async def test_instrumenting_httpx_globally_does_not_double_async_attempt_spans(
    server: LiveServer,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    instrumentor: HTTPXClientInstrumentor,
) -> None:
    instrumentor.instrument(tracer_provider=tracer_provider)
    server.plan("/", Reply(503), Reply(200))
    transport = AsyncResilientTransport(retry=RETRY, tracer_provider=tracer_provider)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(server.url("/"))).status_code == 200
    assert len(client_spans(exporter)) == 2


def test_an_instrumented_client_gets_one_span_over_the_attempts(
    server: LiveServer, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """``instrument_client(client)`` wraps the resilient transport itself: its span is the
    logical request, and the attempts are its children."""
    server.plan("/", Reply(503), Reply(200))
    with httpx.Client(
        transport=ResilientTransport(retry=RETRY, tracer_provider=tracer_provider)
    ) as c:
        HTTPXClientInstrumentor.instrument_client(c, tracer_provider=tracer_provider)
        try:
            assert c.get(server.url("/")).status_code == 200
        finally:
            HTTPXClientInstrumentor.uninstrument_client(c)
    *attempts, logical = client_spans(exporter)
    assert len(attempts) == 2
    assert logical.context is not None
    assert all(span.parent is not None for span in attempts)
    assert {span.parent.span_id for span in attempts if span.parent} == {logical.context.span_id}
    # The server saw the attempts' own trace context, not the logical span's.
    assert [seen.headers.get("traceparent") for seen in server.seen] == [
        traceparent_of(span) for span in attempts
    ]


# A provider set globally, in a fresh interpreter -------------------------------------------

GLOBAL_PROVIDER = """
import json

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import resilient

sent = []

def handler(request):
    sent.append("traceparent" in request.headers)
    return httpx.Response(200)

traced = httpx.Client(transport=resilient.ResilientTransport(httpx.MockTransport(handler)))
quiet = httpx.Client(
    transport=resilient.ResilientTransport(httpx.MockTransport(handler), tracing=False)
)
traced.get("http://api.test/")  # nothing configured yet
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
traced.get("http://api.test/")
quiet.get("http://api.test/")
spans = [f"{span.name} {span.kind.name}" for span in exporter.get_finished_spans()]
print(json.dumps({"sent": sent, "spans": spans}))
"""


def test_a_provider_set_globally_later_is_picked_up_unless_tracing_is_off() -> None:
    """Only the transport's own spans: its per-origin Policies make none."""
    assert run_python(GLOBAL_PROVIDER) == {
        "sent": [False, True, False],
        "spans": ["GET CLIENT", "GET INTERNAL"],
    }
