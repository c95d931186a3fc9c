"""ResilientTransport and AsyncResilientTransport: what httpx users get from them.

Two kinds of tests. Unit tests drive the transports over ``httpx.MockTransport``
(the decision logic) and under ``respx`` (the default inner transports, whose
httpcore pool respx patches), each for the sync and the async client. Integration
tests run against a real HTTP/1.1 server on 127.0.0.1, started and stopped per
test, for what only a real network shows: connection pooling, streamed bodies,
clamped socket timeouts, and a host that goes down and comes back.

No test sleeps for a retry: the ``sleeps`` fixture records each wait instead,
which is also how the Retry-After tests see the wait that was used.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import respx
import tenacity
from live_server import LiveServer, Reply

import resilient
from resilient import (
    AsyncResilientTransport,
    Backoff,
    BreakerState,
    Bulkhead,
    CircuitBreaker,
    ResilientTransport,
    Retry,
    RetryBudget,
    RetryEvent,
    TransportBulkheadFull,
    TransportCircuitOpen,
    TransportDeadlineExceeded,
)
from resilient.testing import FakeClock
from resilient.transport import DRAIN_LIMIT, ResponseFailure, parse_retry_after

BASE = "http://api.test"
IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]
NOT_IDEMPOTENT = ["POST", "PATCH"]
# Fixed waits, so a test can tell the backoff's wait from the one Retry-After asked for.
BACKOFF = Backoff(initial=0.25, multiplier=2.0, jitter="none")


def retry(attempts: int = 3, **options: Any) -> Retry:
    """A Retry with fixed waits and no budget (budgets have their own test)."""
    options.setdefault("backoff", BACKOFF)
    options.setdefault("budget", None)
    return Retry(attempts=attempts, **options)


# Fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sleeps(record_waits: list[float]) -> list[float]:
    """Retry waits are recorded, not slept."""
    return record_waits


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breakers(clock: FakeClock, threshold: int = 2) -> Callable[[str], CircuitBreaker]:
    """A breaker factory: `threshold` consecutive failures open an origin's breaker for 30 s."""
    return lambda origin: CircuitBreaker(
        name=origin, failure_threshold=threshold, reset_timeout=30, clock=clock
    )


Outcome = httpx.Response | int | Exception | type[Exception]


class Script:
    """A MockTransport handler answering from a list of outcomes (then 200s); keeps requests.

    An int is a status, an exception class is raised without a request attached (as
    httpx.HTTPTransport raises its errors), an exception instance is raised as is.
    """

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome: Outcome = self.outcomes.pop(0) if self.outcomes else 200
        if isinstance(outcome, int):
            return httpx.Response(outcome, text=f"answer {len(self.requests)}")
        if isinstance(outcome, type):
            raise outcome(f"scripted {outcome.__name__}")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @property
    def calls(self) -> int:
        return len(self.requests)


def sync_chunks() -> Iterator[bytes]:
    yield b"a"
    yield b"b"


async def async_chunks() -> AsyncIterator[bytes]:
    yield b"a"
    yield b"b"


class Harness:
    """One client, sync or async, over a resilient transport; ``send`` is awaitable for both.

    ``inner`` is a handler for ``httpx.MockTransport``, or ``None`` for the transport's
    default inner transport (which respx intercepts).
    """

    def __init__(
        self, kind: str, inner: Callable[[httpx.Request], Any] | None, **options: Any
    ) -> None:
        self.kind = kind
        mock = None if inner is None else httpx.MockTransport(inner)
        self.transport: ResilientTransport | AsyncResilientTransport
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None
        if kind == "sync":
            self.transport = ResilientTransport(mock, **options)
            self._sync = httpx.Client(transport=self.transport, base_url=BASE)
        else:
            self.transport = AsyncResilientTransport(mock, **options)
            self._async = httpx.AsyncClient(transport=self.transport, base_url=BASE)

    async def send(self, method: str = "GET", url: str = "/", **kwargs: Any) -> httpx.Response:
        if self._sync is not None:
            return self._sync.request(method, url, **kwargs)
        assert self._async is not None
        return await self._async.request(method, url, **kwargs)

    def stream_body(self) -> Any:
        """A body that can be sent only once: a generator of the client's kind."""
        return sync_chunks() if self.kind == "sync" else async_chunks()

    @property
    def hosts(self) -> Any:
        return self.transport._core.hosts

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        if self._async is not None:
            await self._async.aclose()


MakeHarness = Callable[..., Harness]


@pytest.fixture(params=["sync", "async"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeHarness]:
    """Build harnesses of one kind (the test runs once per kind); closes them afterwards."""
    made: list[Harness] = []

    def build(inner: Callable[[httpx.Request], Any] | None = None, **options: Any) -> Harness:
        harness = Harness(request.param, inner, **options)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.close()


def report(response: httpx.Response) -> dict[str, Any]:
    info: dict[str, Any] = response.extensions["resilient"]
    return info


# Configuration ------------------------------------------------------------------------

CONFIG_ERRORS = [
    ({"retry": "3 times"}, TypeError, "retry"),
    ({"retry": Retry(on_result=lambda r: True)}, ValueError, "on_result"),
    ({"retry_statuses": [503, 600]}, ValueError, "retry_statuses"),
    ({"retry_statuses": [True]}, ValueError, "retry_statuses"),
    ({"retry_statuses": "503"}, ValueError, "retry_statuses"),
    ({"internal_hosts": "api.internal"}, TypeError, "internal_hosts"),
    ({"breaker": 5}, TypeError, "breaker"),
    ({"bulkhead": 5}, TypeError, "bulkhead"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"attempt_timeout": 0}, ValueError, "attempt_timeout"),
    ({"max_retry_after": -1}, ValueError, "max_retry_after"),
    ({"max_retry_after": "60"}, TypeError, "max_retry_after"),
    ({"max_hosts": 0}, ValueError, "max_hosts"),
]


@pytest.mark.parametrize("cls", [ResilientTransport, AsyncResilientTransport])
@pytest.mark.parametrize(("options", "error", "parameter"), CONFIG_ERRORS)
def test_a_bad_option_fails_at_construction_naming_the_parameter(
    cls: type[Any], options: dict[str, Any], error: type[Exception], parameter: str
) -> None:
    """A misconfigured transport fails where it is built, and says which parameter is wrong."""
    with pytest.raises(error, match=parameter):
        cls(httpx.MockTransport(Script()), **options)


@pytest.mark.parametrize(
    ("cls", "inner", "expected"),
    [
        (ResilientTransport, httpx.AsyncHTTPTransport(), "BaseTransport"),
        (ResilientTransport, "http://api.test", "BaseTransport"),
        (AsyncResilientTransport, httpx.HTTPTransport(), "AsyncBaseTransport"),
        (AsyncResilientTransport, object(), "AsyncBaseTransport"),
    ],
)
def test_a_transport_of_the_wrong_kind_is_refused(
    cls: type[Any], inner: Any, expected: str
) -> None:
    """The sync transport wraps only sync transports, the async one only async ones."""
    with pytest.raises(TypeError, match=f"transport must be an httpx.{expected}"):
        cls(inner)


@pytest.mark.parametrize(
    ("option", "message"),
    [("breaker", "breaker factory must return"), ("bulkhead", "bulkhead factory must return")],
)
async def test_a_factory_returning_the_wrong_type_fails_the_first_request(
    make: MakeHarness, option: str, message: str
) -> None:
    """A per-origin factory is checked when it is first used, with a message naming it."""
    script = Script()
    harness = make(script, **{option: lambda origin: "not the right thing"})
    with pytest.raises(TypeError, match=message):
        await harness.send()
    assert script.calls == 0


class OwnGate:
    """A gate of one's own that admits every attempt; ``reset()`` is counted."""

    def __init__(self, origin: str = "") -> None:
        self.origin = origin
        self.resets = 0

    def before_call(self) -> object:
        return None

    def on_success(self, ticket: object) -> None: ...
    def on_failure(self, ticket: object, error: Exception) -> None: ...
    def on_abort(self, ticket: object) -> None: ...

    def reset(self) -> None:
        self.resets += 1


def stage_instances() -> list[Any]:
    import pybreaker

    return [
        pytest.param("breaker", CircuitBreaker(name="shared"), id="CircuitBreaker"),
        pytest.param("breaker", OwnGate(), id="own-gate"),
        pytest.param("breaker", pybreaker.CircuitBreaker(), id="pybreaker"),
        pytest.param("bulkhead", Bulkhead(max_concurrent=2), id="Bulkhead"),
    ]


@pytest.mark.parametrize("cls", [ResilientTransport, AsyncResilientTransport])
@pytest.mark.parametrize(("option", "instance"), stage_instances())
def test_a_stage_instance_given_for_a_factory_is_refused_at_construction(
    cls: type[Any], option: str, instance: Any
) -> None:
    """``breaker=CircuitBreaker()`` fails where it is written, saying a factory is expected,
    instead of on the first request with a message about decorating a string."""
    with pytest.raises(
        TypeError, match=rf"^{option} expects a factory .* not a {option}"
    ) as raised:
        cls(httpx.MockTransport(Script()), **{option: instance})
    assert "lambda origin" in str(raised.value)


async def test_a_stage_class_is_a_factory(make: MakeHarness) -> None:
    """A gate class whose constructor takes the origin is a factory like any other."""
    harness = make(Script(200), breaker=OwnGate)
    assert (await harness.send()).status_code == 200
    gate = harness.transport.breaker_for(BASE)
    assert isinstance(gate, OwnGate)
    assert gate.origin == "http://api.test:80"


def test_close_closes_the_inner_transport() -> None:
    """Closing the client closes the transport it wraps (and its connection pool)."""
    closed: list[str] = []

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            closed.append("close")

    with httpx.Client(transport=ResilientTransport(Inner(Script()))) as client:
        client.get(BASE)
    assert closed == ["close"]


async def test_aclose_closes_the_inner_transport() -> None:
    """Closing the async client closes the async transport it wraps."""
    closed: list[str] = []

    class Inner(httpx.MockTransport):
        async def aclose(self) -> None:
            closed.append("aclose")

    async with httpx.AsyncClient(transport=AsyncResilientTransport(Inner(Script()))) as client:
        await client.get(BASE)
    assert closed == ["aclose"]


# What is retried ---------------------------------------------------------------------


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
async def test_failures_before_sending_are_retried_for_any_method(
    make: MakeHarness, error: type[Exception], method: str
) -> None:
    """Nothing reached the server, so even a POST is safe to send again."""
    script = Script(error, 200)
    response = await make(script, retry=retry()).send(method, content=b"order")
    assert response.status_code == 200
    assert report(response)["attempts"] == 2
    assert [r.content for r in script.requests] == [b"order", b"order"]


@pytest.mark.parametrize("method", IDEMPOTENT)
async def test_every_idempotent_method_is_retried_on_503(make: MakeHarness, method: str) -> None:
    """RFC 9110's idempotent methods may be sent twice, so a 503 is retried for each."""
    script = Script(503, 200)
    response = await make(script, retry=retry()).send(method)
    assert response.status_code == 200
    assert script.calls == 2


AFTER_SENDING: list[Outcome] = [
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    429,
    502,
    503,
    504,
]


@pytest.mark.parametrize("outcome", AFTER_SENDING)
async def test_failures_after_sending_are_retried_for_idempotent_requests(
    make: MakeHarness, outcome: Outcome
) -> None:
    """Timeouts, broken connections, protocol errors and retry statuses get another GET."""
    script = Script(outcome, 200)
    response = await make(script, retry=retry()).send("GET")
    assert response.status_code == 200
    assert script.calls == 2


@pytest.mark.parametrize("outcome", AFTER_SENDING)
@pytest.mark.parametrize("method", NOT_IDEMPOTENT)
async def test_failures_after_sending_are_not_retried_for_post_and_patch(
    make: MakeHarness, method: str, outcome: Outcome
) -> None:
    """The server may have acted on a POST: the caller gets the first outcome, unrepeated."""
    script = Script(outcome, 200)
    harness = make(script, retry=retry())
    if isinstance(outcome, int):
        response = await harness.send(method, content=b"charge")
        assert response.status_code == outcome
        assert report(response)["attempts"] == 1
    else:
        assert isinstance(outcome, type)
        with pytest.raises(outcome):
            await harness.send(method, content=b"charge")
    assert script.calls == 1


@pytest.mark.parametrize(
    ("options", "request_kwargs"),
    [
        ({}, {"headers": {"Idempotency-Key": "order-42"}}),
        ({}, {"extensions": {"resilient": {"idempotent": True}}}),
        ({"retry_non_idempotent": True}, {}),
    ],
    ids=["idempotency-key", "idempotent-extension", "retry_non_idempotent"],
)
@pytest.mark.parametrize("outcome", [503, httpx.ReadTimeout])
@pytest.mark.parametrize("method", NOT_IDEMPOTENT)
async def test_post_and_patch_marked_safe_are_retried(
    make: MakeHarness,
    method: str,
    outcome: Outcome,
    options: dict[str, Any],
    request_kwargs: dict[str, Any],
) -> None:
    """An Idempotency-Key, the per-request mark or retry_non_idempotent makes POST retryable."""
    script = Script(outcome, 200)
    harness = make(script, retry=retry(), **options)
    response = await harness.send(method, content=b"charge", **request_kwargs)
    assert response.status_code == 200
    assert [r.content for r in script.requests] == [b"charge", b"charge"]


@pytest.mark.parametrize("status", [500, 501, 400, 404, 409, 422])
async def test_other_error_statuses_are_returned_without_a_retry(
    make: MakeHarness, status: int
) -> None:
    """500 and 501 mean the server cannot do it, 4xx that the request is wrong: no retry."""
    script = Script(status, 200)
    response = await make(script, retry=retry()).send("GET")
    assert response.status_code == status
    assert script.calls == 1


async def test_when_retries_run_out_the_caller_gets_the_last_response(
    make: MakeHarness, sleeps: list[float]
) -> None:
    """Retried statuses end as a response, not an exception: the last 503, with its body."""
    script = Script(
        httpx.Response(503, text="first"),
        httpx.Response(503, text="second"),
        httpx.Response(503, text="third"),
    )
    response = await make(script, retry=retry(attempts=3)).send("GET")
    assert response.status_code == 503
    assert response.text == "third"
    assert report(response) == {"attempts": 3, "waited": 0.75, "breaker": "closed"}
    assert sleeps == [0.25, 0.5]
    with pytest.raises(httpx.HTTPStatusError):
        response.raise_for_status()


async def test_the_last_failed_response_is_a_complete_httpx_response(make: MakeHarness) -> None:
    """The response the retries end with behaves like any other: body, stream and elapsed.

    The bodies are streams, unread as a real transport's are (a response built from
    ``text=`` is read at once, and then httpx never sets ``elapsed``, with or without
    this transport)."""
    script = Script(
        httpx.Response(503, stream=httpx.ByteStream(b"busy")),
        httpx.Response(503, stream=httpx.ByteStream(b"still busy")),
    )
    response = await make(script, retry=retry(attempts=2)).send("GET")
    assert response.text == "still busy"
    assert b"".join(response.iter_bytes()) == b"still busy"
    assert response.elapsed >= timedelta(0)


async def test_when_retries_run_out_on_errors_the_caller_gets_the_last_error(
    make: MakeHarness,
) -> None:
    """The last original httpx error propagates, with a note saying why retrying stopped."""
    script = Script(httpx.ReadTimeout, httpx.ReadTimeout, httpx.ReadError("reset by peer"))
    with pytest.raises(httpx.ReadError, match="reset by peer") as raised:
        await make(script, retry=retry(attempts=3)).send("GET")
    assert any("gave up after 3 attempts" in note for note in raised.value.__notes__)
    assert script.calls == 3


async def test_the_response_reports_attempts_waits_and_the_breaker_state(
    make: MakeHarness, clock: FakeClock
) -> None:
    """``response.extensions["resilient"]`` says what the request went through."""
    harness = make(Script(503, 200, 200), retry=retry(), breaker=breakers(clock, threshold=5))
    first = await harness.send()
    assert report(first) == {"attempts": 2, "waited": 0.25, "breaker": "closed"}
    second = await harness.send()
    assert report(second) == {"attempts": 1, "waited": 0.0, "breaker": "closed"}

    unguarded = make(Script(200), breaker=None)
    assert report(await unguarded.send())["breaker"] is None


async def test_retry_none_sends_each_request_once(make: MakeHarness) -> None:
    """``retry=None`` turns retries off for the whole client."""
    script = Script(503, 200)
    response = await make(script, retry=None).send("GET")
    assert response.status_code == 503
    assert report(response)["attempts"] == 1


async def test_retry_false_turns_retries_off_for_one_request(make: MakeHarness) -> None:
    """The per-request switch affects only the request that carries it."""
    script = Script(503, 503, 200)
    harness = make(script, retry=retry())
    once = await harness.send(extensions={"resilient": {"retry": False}})
    assert once.status_code == 503
    assert script.calls == 1
    again = await harness.send()
    assert again.status_code == 200
    assert script.calls == 3


async def test_an_unknown_request_option_is_an_error_naming_it(make: MakeHarness) -> None:
    """A typo in the per-request options fails loudly instead of being ignored."""
    script = Script()
    harness = make(script)
    with pytest.raises(ValueError, match="retries"):
        await harness.send(extensions={"resilient": {"retries": False}})
    with pytest.raises(TypeError, match="mapping"):
        await harness.send(extensions={"resilient": ["retry"]})
    assert script.calls == 0


async def test_retry_statuses_replaces_the_default_set(make: MakeHarness) -> None:
    """With ``retry_statuses={503}`` a 502 is returned at once and a 503 still retried."""
    script = Script(502, 503, 200)
    harness = make(script, retry=retry(), retry_statuses={503})
    assert (await harness.send()).status_code == 502
    assert (await harness.send()).status_code == 200
    assert script.calls == 3


async def test_every_status_in_retry_statuses_is_retried(make: MakeHarness) -> None:
    """A status the caller lists (here 408 Request Timeout) is retried like the defaults."""
    script = Script(408, 200)
    response = await make(script, retry=retry(), retry_statuses={408, 503}).send("GET")
    assert response.status_code == 200
    assert script.calls == 2


async def test_a_users_on_narrows_what_is_retried(make: MakeHarness) -> None:
    """``Retry(on=httpx.ConnectTimeout)`` keeps retrying connect timeouts and nothing else."""
    script = Script(httpx.ConnectError, 200)
    harness = make(script, retry=retry(on=httpx.ConnectTimeout))
    with pytest.raises(httpx.ConnectError):
        await harness.send()
    assert script.calls == 1

    script.outcomes = [httpx.ConnectTimeout, 200]
    assert (await harness.send()).status_code == 200
    assert script.calls == 3


async def test_a_users_on_cannot_widen_what_is_retried(make: MakeHarness) -> None:
    """Matching everything in ``on`` does not make a POST's read timeout or a 500 retryable."""
    script = Script(httpx.ReadTimeout, 500)
    harness = make(script, retry=retry(on=lambda exc: True))
    with pytest.raises(httpx.ReadTimeout):
        await harness.send("POST", content=b"x")
    assert (await harness.send("GET")).status_code == 500
    assert script.calls == 2


async def test_a_tenacity_on_strategy_narrows_what_is_retried(make: MakeHarness) -> None:
    """Retry accepts tenacity strategies for ``on``; the transport honours them too."""
    script = Script(httpx.ConnectError, 200)
    harness = make(script, retry=retry(on=tenacity.retry_if_exception_type(httpx.ConnectError)))
    assert (await harness.send()).status_code == 200
    assert script.calls == 2


async def test_retry_hooks_see_the_failed_response(make: MakeHarness) -> None:
    """An ``on_retry`` hook gets the retried response (status, request) on the event."""
    events: list[RetryEvent] = []
    harness = make(Script(503, 200), retry=retry(on_retry=events.append))
    await harness.send("GET", "/orders")
    [event] = events
    assert isinstance(event.exception, ResponseFailure)
    assert event.exception.response.status_code == 503
    assert event.exception.request.url.path == "/orders"
    assert event.delay == 0.25


async def test_a_failing_response_is_closed_when_an_error_ends_the_request(
    make: MakeHarness,
) -> None:
    """A retry hook that raises ends the request with its error: the 503 it was shown, which
    the caller never gets, is closed rather than left holding its connection."""
    unread = httpx.Response(503, stream=httpx.ByteStream(b"busy"))

    def broken_hook(event: RetryEvent) -> None:
        assert isinstance(event.exception, ResponseFailure)
        assert event.exception.response is unread
        assert not unread.is_closed  # the hook sees it as it came, unread
        raise RuntimeError("the hook failed")

    harness = make(Script(unread), retry=retry(on_retry=broken_hook))
    with pytest.raises(RuntimeError, match="the hook failed"):
        await harness.send()
    assert unread.is_closed


async def test_each_origin_has_its_own_retry_budget(make: MakeHarness) -> None:
    """A budget spent on one sick host leaves another host's retries alone."""
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10)  # one retry
    script = Script(503, 503, 503, 503, 200)
    harness = make(script, retry=Retry(attempts=3, backoff=BACKOFF, budget=budget))
    first = await harness.send("GET", "http://sick.test/")
    assert report(first)["attempts"] == 2  # one retry, then the budget is spent
    second = await harness.send("GET", "http://sick.test/")
    assert report(second)["attempts"] == 1
    other = await harness.send("GET", "http://other.test/")
    assert other.status_code == 200
    assert report(other)["attempts"] == 2


# The healthy fast path --------------------------------------------------------------------
#
# A request to a healthy origin, with no deadline, bulkhead or timeouts in play, is sent
# without the policy's driver; a failure hands that first attempt over to the driver.


async def test_a_success_between_failures_restarts_the_consecutive_count(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Fail, fail, succeed, fail leaves a threshold-3 breaker closed: the success counts."""
    harness = make(Script(503, 503, 200, 503, 503), retry=None, breaker=breakers(clock, 3))
    statuses = [(await harness.send()).status_code for _ in range(5)]
    assert statuses == [503, 503, 200, 503, 503]
    breaker = harness.transport.breaker_for(BASE)
    assert breaker is not None
    assert breaker.state is BreakerState.CLOSED
    assert breaker.metrics().consecutive_failures == 2
    # Three failures in a row, and only then, open it.
    tripped = make(Script(503, 503, 503), retry=None, breaker=breakers(clock, 3))
    for _ in range(3):
        await tripped.send()
    assert tripped.transport.origins() == {"http://api.test:80": BreakerState.OPEN}


async def test_the_retry_budget_counts_each_request_once(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Healthy requests earn retries, and one that fails is counted once, not twice.

    Five requests at ratio 0.5 allow two retries: the failing fifth makes 3 attempts.
    Counting it twice (fast path and driver) would allow a fourth, not counting it at all
    none.
    """
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0.0, window=10, clock=clock)
    script = Script(200, 200, 200, 200, *[503] * 10)
    harness = make(script, retry=Retry(attempts=10, backoff=BACKOFF, budget=budget, clock=clock))
    for _ in range(4):
        assert report(await harness.send())["attempts"] == 1
    failed = await harness.send()
    assert failed.status_code == 503
    assert report(failed)["attempts"] == 3


async def test_a_retried_request_counts_its_time_from_the_first_send(
    make: MakeHarness, clock: FakeClock
) -> None:
    """A first attempt that took 2 s before failing counts in the elapsed time retries see."""
    events: list[RetryEvent] = []

    def slow_then_fine(request: httpx.Request) -> httpx.Response:
        if not events and not slow_then_fine.sent:  # type: ignore[attr-defined]
            slow_then_fine.sent = True  # type: ignore[attr-defined]
            clock.advance(2.0)
            return httpx.Response(503)
        return httpx.Response(200)

    slow_then_fine.sent = False  # type: ignore[attr-defined]
    harness = make(slow_then_fine, retry=retry(on_retry=events.append, clock=clock))
    response = await harness.send()
    assert response.status_code == 200
    [event] = events
    assert event.elapsed == 2.0


async def test_a_stop_after_delay_counts_the_first_attempt(
    make: MakeHarness, clock: FakeClock
) -> None:
    """tenacity's stop_after_delay sees the time the first attempt took."""
    script = Script(503, 503, 200)

    def slow(request: httpx.Request) -> httpx.Response:
        clock.advance(5.0)
        return script(request)

    harness = make(
        slow, retry=retry(attempts=None, stop=tenacity.stop_after_delay(4.0), clock=clock)
    )
    response = await harness.send()
    assert response.status_code == 503
    assert script.calls == 1


@pytest.mark.parametrize("outcome", [503, httpx.ConnectError], ids=["503", "ConnectError"])
async def test_a_breaker_opening_while_the_first_attempt_is_out_keeps_its_outcome(
    make: MakeHarness, clock: FakeClock, outcome: Outcome
) -> None:
    """Another request opened the breaker meanwhile: this one was sent all the same, so its
    caller gets its answer (or error), not a CircuitOpenError."""
    made: list[CircuitBreaker] = []

    def breaker(origin: str) -> CircuitBreaker:
        made.append(CircuitBreaker(name=origin, failure_threshold=5, clock=clock))
        return made[-1]

    script = Script(outcome)

    def opening(request: httpx.Request) -> httpx.Response:
        made[0].isolate()
        return script(request)

    harness = make(opening, retry=retry(), breaker=breaker)
    if outcome == 503:
        response = await harness.send()
        assert response.status_code == 503
        assert report(response)["attempts"] == 1
        assert report(response)["breaker"] == "isolated"
    else:
        with pytest.raises(httpx.ConnectError) as raised:
            await harness.send()
        assert not isinstance(raised.value, resilient.CircuitOpenError)
    assert script.calls == 1


async def test_the_report_is_read_only(make: MakeHarness) -> None:
    """Reports are shared between responses, so they cannot be changed."""
    harness = make(Script(200, 503, 200), retry=retry())
    for _ in range(2):
        info = report(await harness.send())
        with pytest.raises(TypeError):
            info["attempts"] = 7  # type: ignore[index]
    assert report(await harness.send()) == {"attempts": 1, "waited": 0.0, "breaker": "closed"}


# Retry-After -------------------------------------------------------------------------

NOW = 1_700_000_000.0  # a fixed wall-clock instant for parse_retry_after


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("999999999", 999999999.0),
        (http_date(NOW + 30), 30.0),
        (http_date(NOW - 3600), 0.0),
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850, obsolete but valid
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime, obsolete but valid (GMT)
        ("-5", None),
        ("1.5", None),
        ("+5", None),
        ("1e3", None),
        ("٣", None),  # an Arabic-Indic digit: isdigit() but not delay-seconds
        ("99999999999999", None),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    """Delay-seconds and the three HTTP-date forms parse; anything else is ``None``."""
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_replaces_the_backoff(
    make: MakeHarness, sleeps: list[float], status: int
) -> None:
    """The server said when to come back; that is the wait used, and reported."""
    script = Script(httpx.Response(status, headers={"Retry-After": "3"}), 200)
    response = await make(script, retry=retry()).send("GET")
    assert response.status_code == 200
    assert sleeps == [3.0]
    assert report(response)["waited"] == 3.0


async def test_retry_after_date_is_honoured(make: MakeHarness, sleeps: list[float]) -> None:
    """An HTTP date 30 s ahead means a wait of about 30 s (the date has 1 s resolution)."""
    later = http_date(time.time() + 30)
    script = Script(httpx.Response(503, headers={"Retry-After": later}), 200)
    response = await make(script, retry=retry()).send("GET")
    assert response.status_code == 200
    [waited] = sleeps
    assert 28.0 < waited <= 30.0


async def test_retry_after_date_in_the_past_means_retry_now(make: MakeHarness) -> None:
    """A date already past asks for no wait at all, not for the backoff."""
    events: list[RetryEvent] = []
    earlier = http_date(time.time() - 3600)
    script = Script(httpx.Response(503, headers={"Retry-After": earlier}), 200)
    response = await make(script, retry=retry(on_retry=events.append)).send("GET")
    assert response.status_code == 200
    assert [event.delay for event in events] == [0.0]


@pytest.mark.parametrize("value", ["-1", "1.5", "soon", "99999999999999", ""])
async def test_an_invalid_retry_after_falls_back_to_the_backoff(
    make: MakeHarness, sleeps: list[float], value: str
) -> None:
    """Negative, fractional, garbage or absurd values are ignored, not obeyed or fatal."""
    script = Script(httpx.Response(503, headers={"Retry-After": value}), 200)
    response = await make(script, retry=retry()).send("GET")
    assert response.status_code == 200
    assert sleeps == [0.25]


@pytest.mark.parametrize("status", [502, 504])
async def test_retry_after_counts_only_on_429_and_503(
    make: MakeHarness, sleeps: list[float], status: int
) -> None:
    """On other retried statuses the backoff decides the wait."""
    script = Script(httpx.Response(status, headers={"Retry-After": "7"}), 200)
    await make(script, retry=retry()).send("GET")
    assert sleeps == [0.25]


async def test_retry_after_beyond_the_deadline_returns_the_response_at_once(
    make: MakeHarness, sleeps: list[float]
) -> None:
    """Waiting 10 s with 5 s left is pointless: the caller gets the 503 now."""
    script = Script(httpx.Response(503, headers={"Retry-After": "10"}, text="later"), 200)
    harness = make(script, retry=retry())
    started = time.monotonic()
    with resilient.deadline(5):
        response = await harness.send("GET")
    assert time.monotonic() - started < 1.0
    assert response.status_code == 503
    assert response.text == "later"
    assert script.calls == 1
    assert sleeps == []


@pytest.mark.parametrize(("max_retry_after", "value"), [(5, "10"), (60, "120")])
async def test_retry_after_beyond_max_retry_after_returns_the_response_at_once(
    make: MakeHarness, sleeps: list[float], max_retry_after: float, value: str
) -> None:
    """A server asking for too long a wait is answered with its own 503, not a stalled call."""
    script = Script(httpx.Response(503, headers={"Retry-After": value}), 200)
    harness = make(script, retry=retry(), max_retry_after=max_retry_after)
    response = await harness.send("GET")
    assert response.status_code == 503
    assert script.calls == 1
    assert sleeps == []


# Bodies that cannot be sent twice ------------------------------------------------------


async def test_a_bytes_body_is_sent_again_intact(make: MakeHarness) -> None:
    """A body held in memory is replayed byte for byte on the retry."""
    script = Script(503, 200)
    response = await make(script, retry=retry()).send("PUT", content=b"payload")
    assert response.status_code == 200
    assert [r.content for r in script.requests] == [b"payload", b"payload"]


async def test_a_streamed_body_is_not_retried_after_a_retry_status(make: MakeHarness) -> None:
    """A generator body is gone after one send: the caller gets the 503, not StreamConsumed."""
    harness = make(retry=retry())
    with respx.mock(base_url=BASE) as mock:
        route = mock.put("/upload").mock(side_effect=[httpx.Response(503), httpx.Response(200)])
        response = await harness.send("PUT", "/upload", content=harness.stream_body())
    assert response.status_code == 503
    assert route.call_count == 1


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
async def test_a_streamed_body_is_not_retried_after_an_error(
    make: MakeHarness, error: type[Exception]
) -> None:
    """A generator body is never sent twice: the caller gets the original error."""
    harness = make(retry=retry())
    with respx.mock(base_url=BASE) as mock:
        route = mock.put("/upload").mock(side_effect=[error, httpx.Response(200)])
        with pytest.raises(error):
            await harness.send("PUT", "/upload", content=harness.stream_body())
    assert route.call_count == 1


async def test_respx_intercepts_the_default_inner_transport(make: MakeHarness) -> None:
    """With no inner transport given, respx still sees every attempt the transport makes."""
    harness = make(retry=retry())
    with respx.mock(base_url=BASE) as mock:
        route = mock.get("/x").mock(side_effect=[httpx.Response(503), httpx.Response(200)])
        response = await harness.send("GET", "/x")
    assert response.status_code == 200
    assert route.call_count == 2


# Circuit breakers, per origin ----------------------------------------------------------


async def test_an_open_breaker_for_one_host_leaves_other_hosts_alone(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Each origin has its own breaker; open ones fail fast with a catchable, informative error."""
    script = Script(503, 503)
    harness = make(script, retry=None, breaker=breakers(clock))
    for _ in range(2):
        assert (await harness.send("GET", "http://sick.test/")).status_code == 503

    clock.advance(10)
    with pytest.raises(TransportCircuitOpen) as raised:
        await harness.send("GET", "http://sick.test/")
    error = raised.value
    assert isinstance(error, resilient.CircuitOpenError)
    assert isinstance(error, httpx.TransportError)
    assert isinstance(error, httpx.HTTPError)
    assert error.retry_after == pytest.approx(20.0)
    assert error.request.url.host == "sick.test"
    assert script.calls == 2  # the rejected request never reached the inner transport

    for url in ("http://well.test/", "http://sick.test:8080/", "https://sick.test/"):
        response = await harness.send("GET", url)
        assert response.status_code == 200
        assert report(response)["breaker"] == "closed"


async def test_after_reset_timeout_a_probe_closes_the_breaker(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Once reset_timeout has passed, one request probes the host; its success closes it."""
    script = Script(503, 503)
    harness = make(script, retry=None, breaker=breakers(clock))
    for _ in range(2):
        await harness.send()
    with pytest.raises(TransportCircuitOpen):
        await harness.send()

    clock.advance(31)
    probe = await harness.send()
    assert probe.status_code == 200
    assert report(probe)["breaker"] == "closed"
    assert (await harness.send()).status_code == 200


@pytest.mark.parametrize(
    ("status", "opens"), [(500, True), (503, True), (429, True), (501, False), (404, False)]
)
async def test_which_responses_count_against_the_host(
    make: MakeHarness, clock: FakeClock, status: int, opens: bool
) -> None:
    """5xx (501 aside) and 429 are the host's failures; other 4xx are the caller's problem."""
    harness = make(Script(status, status, 200), retry=None, breaker=breakers(clock))
    await harness.send()
    second = await harness.send()
    assert report(second)["breaker"] == ("open" if opens else "closed")


async def test_the_callers_own_mistakes_do_not_trip_the_default_breaker(
    make: MakeHarness,
) -> None:
    """A malformed request says nothing about the host: the default breaker stays closed."""
    script = Script(*[httpx.LocalProtocolError("bad header")] * 20)
    harness = make(script, retry=None)
    for _ in range(20):  # more than the default breaker's threshold
        with pytest.raises(httpx.LocalProtocolError):
            await harness.send()
    assert report(await harness.send())["breaker"] == "closed"


async def test_two_requests_failing_every_attempt_leave_the_default_breaker_closed(
    make: MakeHarness,
) -> None:
    """Two requests that each failed three attempts (six failures in a row) do not lock the
    host out: the next request is sent, and its success is the caller's."""
    script = Script(*[503] * 6)
    harness = make(script, retry=retry(attempts=3))
    for _ in range(2):
        response = await harness.send()
        assert response.status_code == 503
        assert report(response)["attempts"] == 3
        assert report(response)["breaker"] == "closed"
    assert (await harness.send()).status_code == 200
    assert script.calls == 7


async def test_the_default_breaker_opens_after_five_requests_failing_every_attempt(
    make: MakeHarness,
) -> None:
    """Five requests in a row that each fail all three attempts open it, for 10 s."""
    script = Script(*[503] * 15)
    harness = make(script, retry=retry(attempts=3))
    for _ in range(4):
        assert report(await harness.send())["breaker"] == "closed"
    fifth = await harness.send()
    assert fifth.status_code == 503
    assert report(fifth) == {"attempts": 3, "waited": 0.75, "breaker": "open"}
    with pytest.raises(TransportCircuitOpen) as raised:
        await harness.send()
    assert raised.value.retry_after == pytest.approx(10.0, abs=1.0)
    assert script.calls == 15


async def test_the_default_breaker_counts_requests_sent_once_one_each(make: MakeHarness) -> None:
    """Without retries every request is one attempt: fifteen failures in a row open it."""
    script = Script(*[httpx.ConnectError] * 15)
    harness = make(script, retry=None)
    for _ in range(15):
        with pytest.raises(httpx.ConnectError):
            await harness.send()
    with pytest.raises(TransportCircuitOpen):
        await harness.send()
    assert script.calls == 15


async def test_a_breaker_opening_during_retries_returns_the_last_response(
    make: MakeHarness, clock: FakeClock
) -> None:
    """The request was sent and answered 503 twice: the caller gets that answer, not an error
    claiming the call was never made."""
    script = Script(503, 503, 200)
    harness = make(script, retry=retry(attempts=3), breaker=breakers(clock))
    response = await harness.send()
    assert response.status_code == 503
    assert report(response)["breaker"] == "open"
    assert script.calls == 2


async def test_a_breaker_opening_during_retries_stops_them(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Connection failures that open the breaker end the retries with CircuitOpenError."""
    script = Script(httpx.ConnectError, httpx.ConnectError, 200)
    harness = make(script, retry=retry(attempts=3), breaker=breakers(clock))
    with pytest.raises(TransportCircuitOpen) as raised:
        await harness.send()
    assert isinstance(raised.value.__cause__, resilient.CircuitOpenError)
    assert isinstance(raised.value.__cause__.__cause__, httpx.ConnectError)
    assert script.calls == 2


async def test_host_state_is_bounded_by_max_hosts(make: MakeHarness) -> None:
    """Requests to many hosts keep at most ``max_hosts`` origins' breakers and budgets."""
    harness = make(Script(), max_hosts=2)
    for n in range(5):
        assert (await harness.send("GET", f"http://host{n}.test/")).status_code == 200
        assert len(harness.hosts) <= 2
        assert ("http", f"host{n}.test", None) in harness.hosts  # the newest origin is kept


# Per-origin state, read and reset through the public API ------------------------------------


async def test_origins_maps_every_origin_kept_to_its_breaker_state(
    make: MakeHarness, clock: FakeClock
) -> None:
    """One sick and one healthy host: each is listed by its full origin, with its state."""
    harness = make(Script(503, 503), retry=None, breaker=breakers(clock))
    for _ in range(2):
        await harness.send("GET", "http://sick.test/")
    await harness.send("GET", "https://well.test/orders")
    assert harness.transport.origins() == {
        "http://sick.test:80": BreakerState.OPEN,
        "https://well.test:443": BreakerState.CLOSED,
    }
    clock.advance(31)  # read as the breaker itself reads it: due for a probe
    assert harness.transport.origins()["http://sick.test:80"] is BreakerState.HALF_OPEN


async def test_breaker_for_takes_an_origin_string_or_an_httpx_url(make: MakeHarness) -> None:
    """Default port or not, a path or not, a string or a request's URL: one origin, one breaker."""
    harness = make(Script())
    response = await harness.send("GET", "https://api.test/orders?page=2")
    transport = harness.transport
    breaker = transport.breaker_for("https://api.test:443")
    assert isinstance(breaker, CircuitBreaker)
    assert breaker.name == "https://api.test:443"
    for same in ("https://api.test", "https://API.test/other", response.request.url):
        assert transport.breaker_for(same) is breaker
    assert transport.breaker_for(httpx.URL("https://api.test/")) is breaker


async def test_an_ipv6_origin_is_named_so_that_it_reads_back(make: MakeHarness) -> None:
    """An IPv6 host is bracketed in the origin's name, which breaker_for accepts as is."""
    harness = make(Script())
    await harness.send("GET", "http://[::1]:8080/")
    [origin] = harness.transport.origins()
    assert origin == "http://[::1]:8080"
    assert harness.transport.breaker_for(origin) is not None


@pytest.mark.parametrize(
    ("origin", "error", "message"),
    [
        ("https://never.test", KeyError, r"no state for https://never\.test:443.*max_hosts=1024"),
        ("http://api.test:8080", KeyError, r"no state for http://api\.test:8080"),
        ("api.test", ValueError, "absolute URL"),
        ("http://[::1", ValueError, "must be a URL"),
        (5, TypeError, "URL string or an httpx.URL"),
    ],
)
async def test_an_origin_without_state_or_not_a_url_is_a_clear_error(
    make: MakeHarness, origin: Any, error: type[Exception], message: str
) -> None:
    """breaker_for and reset refuse an origin never seen (or evicted), naming it."""
    harness = make(Script())
    await harness.send("GET", "http://api.test/")
    with pytest.raises(error, match=message):
        harness.transport.breaker_for(origin)
    with pytest.raises(error, match=message):
        harness.transport.reset(origin)


async def test_an_evicted_origin_has_no_state_to_read(make: MakeHarness) -> None:
    """With max_hosts=1, the second host evicts the first: its breaker is gone."""
    harness = make(Script(), max_hosts=1)
    await harness.send("GET", "http://first.test/")
    await harness.send("GET", "http://second.test/")
    assert list(harness.transport.origins()) == ["http://second.test:80"]
    with pytest.raises(KeyError, match="evicted"):
        harness.transport.breaker_for("http://first.test")


async def test_reset_closes_one_origins_breaker_and_leaves_the_others(
    make: MakeHarness, clock: FakeClock
) -> None:
    """Resetting the sick host lets its requests through at once; the other stays open."""
    harness = make(Script(*[503] * 4), retry=None, breaker=breakers(clock))
    for url in ("http://a.test/", "http://a.test/", "http://b.test/", "http://b.test/"):
        await harness.send("GET", url)
    assert set(harness.transport.origins().values()) == {BreakerState.OPEN}
    harness.transport.reset(httpx.URL("http://a.test/"))
    assert harness.transport.origins() == {
        "http://a.test:80": BreakerState.CLOSED,
        "http://b.test:80": BreakerState.OPEN,
    }
    assert (await harness.send("GET", "http://a.test/")).status_code == 200
    with pytest.raises(TransportCircuitOpen):
        await harness.send("GET", "http://b.test/")


async def test_reset_gives_the_origin_a_fresh_retry_budget(make: MakeHarness) -> None:
    """A budget spent on a host is full again after reset(): its next failure is retried."""
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10)  # one retry
    script = Script(503, 503, 503, 200, 503, 200)
    harness = make(script, retry=Retry(attempts=2, backoff=BACKOFF, budget=budget))
    assert report(await harness.send())["attempts"] == 2  # the one retry
    assert report(await harness.send())["attempts"] == 1  # spent
    breaker = harness.transport.breaker_for(BASE)
    harness.transport.reset(BASE)
    assert harness.transport.breaker_for(BASE) is breaker  # the same breaker, reset
    assert report(await harness.send())["attempts"] == 1  # a 200
    assert report(await harness.send())["attempts"] == 2  # retried again
    assert script.calls == 6


async def test_reset_without_an_origin_resets_every_origin(
    make: MakeHarness, clock: FakeClock
) -> None:
    """transport.reset() closes every origin's breaker."""
    harness = make(Script(*[503] * 4), retry=None, breaker=breakers(clock))
    for url in ("http://a.test/", "http://a.test/", "http://b.test/", "http://b.test/"):
        await harness.send("GET", url)
    harness.transport.reset()
    assert set(harness.transport.origins().values()) == {BreakerState.CLOSED}


async def test_without_built_in_breakers_the_state_reads_none(make: MakeHarness) -> None:
    """breaker=None: no state to read; a gate of one's own: its own, reset if it can be."""
    plain = make(Script(), breaker=None)
    await plain.send()
    assert plain.transport.origins() == {"http://api.test:80": None}
    assert plain.transport.breaker_for(BASE) is None
    plain.transport.reset(BASE)  # only the budget: nothing else to reset

    own = make(Script(), breaker=OwnGate, retry=None)
    await own.send()
    assert own.transport.origins() == {"http://api.test:80": None}
    gate = own.transport.breaker_for(BASE)
    assert isinstance(gate, OwnGate)
    own.transport.reset()
    assert gate.resets == 1
    assert own.transport.breaker_for(BASE) is gate

    class Unresettable(OwnGate):
        reset = None  # type: ignore[assignment]

    bare = make(Script(), breaker=Unresettable, retry=None)
    await bare.send()
    bare.transport.reset()  # nothing to reset, and no error for it


def test_a_full_bulkhead_rejects_with_an_httpx_error() -> None:
    """With the origin's one slot taken, the next request fails fast, catchable by httpx users."""
    inside = threading.Event()
    release = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            inside.set()
            release.wait(5)
        return httpx.Response(200)

    transport = ResilientTransport(
        httpx.MockTransport(handler), bulkhead=lambda origin: Bulkhead(max_concurrent=1)
    )
    held: list[int] = []
    with httpx.Client(transport=transport, base_url=BASE) as client:
        holder = threading.Thread(target=lambda: held.append(client.get("/slow").status_code))
        holder.start()
        try:
            assert inside.wait(5)
            with pytest.raises(TransportBulkheadFull) as raised:
                client.get("/")
            assert isinstance(raised.value, resilient.BulkheadFull)
            assert isinstance(raised.value, httpx.TransportError)
            assert client.get("http://other.test/").status_code == 200
        finally:
            release.set()
            holder.join(5)
    assert held == [200]  # the request holding the slot was not disturbed


async def test_a_full_bulkhead_rejects_async_requests() -> None:
    """The async transport sheds load the same way while the slot is held by another task."""
    inside = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            inside.set()
            await release.wait()
        return httpx.Response(200)

    transport = AsyncResilientTransport(
        httpx.MockTransport(handler), bulkhead=lambda origin: Bulkhead(max_concurrent=1)
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        holder = asyncio.create_task(client.get("/slow"))
        await inside.wait()
        with pytest.raises(TransportBulkheadFull):
            await client.get("/")
        assert (await client.get("http://other.test/")).status_code == 200
        release.set()
        assert (await holder).status_code == 200


# Deadlines ------------------------------------------------------------------------------


async def test_each_attempt_is_clamped_to_the_time_left(make: MakeHarness) -> None:
    """Under a deadline, no attempt's connect/read/write/pool timeout exceeds the time left."""
    script = Script(503, 200)
    harness = make(script, retry=retry())
    with resilient.deadline(2.0):
        await harness.send(timeout=httpx.Timeout(10.0, read=0.5))
    first, second = (request.extensions["timeout"] for request in script.requests)
    assert first["read"] == second["read"] == 0.5  # already shorter: kept
    for key in ("connect", "write", "pool"):
        assert 1.0 < second[key] <= first[key] <= 2.0


async def test_without_a_deadline_the_clients_timeouts_are_untouched(make: MakeHarness) -> None:
    """No deadline, no clamping: the attempt carries the client's own timeouts."""
    script = Script()
    await make(script).send(timeout=httpx.Timeout(10.0, read=0.5))
    assert script.requests[0].extensions["timeout"] == {
        "connect": 10.0,
        "read": 0.5,
        "write": 10.0,
        "pool": 10.0,
    }


async def test_the_transport_timeout_bounds_every_request(make: MakeHarness) -> None:
    """``timeout=`` is a total budget of the transport's own, applied like a deadline."""
    script = Script()
    await make(script, timeout=3.0).send(timeout=30.0)
    assert all(0 < value <= 3.0 for value in script.requests[0].extensions["timeout"].values())


async def test_an_expired_deadline_fails_without_sending(make: MakeHarness) -> None:
    """A spent budget raises at once, as an httpx timeout and a resilient DeadlineExceeded."""
    script = Script()
    harness = make(script)
    with pytest.raises(TransportDeadlineExceeded) as raised, resilient.deadline(0):
        await harness.send()
    error = raised.value
    assert isinstance(error, httpx.TimeoutException)
    assert isinstance(error, resilient.DeadlineExceeded)
    assert isinstance(error, TimeoutError)
    assert error.request.url == BASE + "/"
    assert script.calls == 0


async def test_a_timeout_caused_by_the_deadline_is_a_deadline_error(make: MakeHarness) -> None:
    """When the clamped timeout fires because the deadline passed, the caller is told so."""

    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        time.sleep(resilient.remaining() + 0.01)
        raise httpx.ReadTimeout("timed out")

    harness = make(handler, retry=retry())
    with pytest.raises(TransportDeadlineExceeded), resilient.deadline(0.05):
        await harness.send()
    assert len(calls) == 1  # no retry: no time was left for one


async def test_a_timeout_without_a_deadline_stays_an_httpx_timeout(make: MakeHarness) -> None:
    """A plain read timeout is retried, then surfaces as the httpx error it was."""
    script = Script(httpx.ReadTimeout, httpx.ReadTimeout, httpx.ReadTimeout)
    with pytest.raises(httpx.ReadTimeout) as raised:
        await make(script, retry=retry()).send()
    assert not isinstance(raised.value, resilient.DeadlineExceeded)
    assert script.calls == 3


def test_a_connect_timeout_at_attempt_timeout_is_retried_for_post() -> None:
    """Running out of attempt_timeout while connecting sent nothing: a POST may try again."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            time.sleep(resilient.remaining() + 0.005)  # the clamped connect timeout fires
            raise httpx.ConnectTimeout("connect timed out")
        return httpx.Response(200)

    transport = ResilientTransport(
        httpx.MockTransport(handler), retry=retry(), attempt_timeout=0.03
    )
    with httpx.Client(transport=transport, base_url=BASE) as client:
        response = client.post("/orders", content=b"order")
    assert response.status_code == 200
    assert calls == ["POST", "POST"]


async def test_a_hung_async_attempt_is_cancelled_at_attempt_timeout() -> None:
    """An async attempt still running at attempt_timeout is cancelled, then retried (GET)."""
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        await asyncio.sleep(10)
        return httpx.Response(200)  # pragma: no cover - always cancelled

    transport = AsyncResilientTransport(
        httpx.MockTransport(handler), retry=retry(), attempt_timeout=0.03
    )
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        with pytest.raises(TransportDeadlineExceeded, match="attempt_timeout"):
            await client.get("/")
    assert calls == ["GET", "GET", "GET"]
    assert time.monotonic() - started < 1.0


async def test_a_deadline_passing_just_before_the_send_stops_it(
    make: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the budget runs out between the policy's check and the send, nothing is sent."""
    script = Script()
    harness = make(script, retry=None)
    # The transport's own reading of the clock, just before it sends, is past the deadline.
    monkeypatch.setattr("resilient.transport._monotonic", lambda: math.inf)
    with (
        resilient.deadline(60),
        pytest.raises(TransportDeadlineExceeded, match="before the request could be sent"),
    ):
        await harness.send()
    assert script.calls == 0


@pytest.mark.parametrize(
    ("options", "url", "sent"),
    [
        ({"propagate_deadline": True}, "http://api.test/", True),
        ({}, "http://api.test/", False),
        ({"internal_hosts": ["API.internal"]}, "http://api.internal/", True),
        ({"internal_hosts": ["api.internal"]}, "http://api.test/", False),
    ],
    ids=["propagate", "default", "internal-host", "external-host"],
)
async def test_the_deadline_header_goes_only_where_configured(
    make: MakeHarness, options: dict[str, Any], url: str, sent: bool
) -> None:
    """The remaining budget is announced to every host, to internal hosts, or to none."""
    script = Script()
    harness = make(script, **options)
    with resilient.deadline(2.0):
        await harness.send("GET", url)
    header = script.requests[0].headers.get(resilient.DEADLINE_HEADER)
    if sent:
        assert header is not None
        assert 1000 < int(header) <= 2000
    else:
        assert header is None


async def test_no_deadline_no_header(make: MakeHarness) -> None:
    """Without a deadline there is no budget to announce, even with propagate_deadline."""
    script = Script()
    await make(script, propagate_deadline=True).send()
    assert resilient.DEADLINE_HEADER not in script.requests[0].headers


# Integration: a real HTTP/1.1 server on 127.0.0.1 (tests/live_server.py) --------------------


def busy(**headers: str) -> Reply:
    return Reply(503, headers=headers, body=b"busy, come back later")


def test_failed_responses_go_back_to_the_pool(server: LiveServer) -> None:
    """With one pooled connection, three 503s then a 200 arrive over that one connection.

    Each 503 must be read and released before the retry, or the retry would wait for
    the pool (and fail with PoolTimeout after 1 s).
    """
    server.plan("/", busy(), busy(), busy())
    inner = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    transport = ResilientTransport(inner, retry=retry(attempts=4))
    with httpx.Client(transport=transport, timeout=httpx.Timeout(5.0, pool=1.0)) as client:
        response = client.get(server.url("/"))
    assert response.status_code == 200
    assert report(response)["attempts"] == 4
    assert len({seen.peer for seen in server.seen}) == 1  # one keep-alive connection


async def test_failed_responses_go_back_to_the_async_pool(server: LiveServer) -> None:
    """The async transport releases each failed response's connection too."""
    server.plan("/", busy(), busy(), busy())
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    transport = AsyncResilientTransport(inner, retry=retry(attempts=4))
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(5.0, pool=1.0)
    ) as client:
        response = await client.get(server.url("/"))
    assert response.status_code == 200
    assert report(response)["attempts"] == 4
    assert len({seen.peer for seen in server.seen}) == 1


def test_retry_after_end_to_end(server: LiveServer, sleeps: list[float]) -> None:
    """The server's Retry-After values, not the backoff, decide the waits."""
    server.plan("/", busy(**{"Retry-After": "2"}), busy(**{"Retry-After": "0"}))
    transport = ResilientTransport(retry=retry(attempts=3, backoff=Backoff(initial=5.0)))
    with httpx.Client(transport=transport) as client:
        response = client.get(server.url("/"))
    assert response.status_code == 200
    assert sleeps == [2.0]  # a zero wait is not slept at all
    assert report(response) == {"attempts": 3, "waited": 2.0, "breaker": "closed"}


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_a_streamed_body_is_sent_once(server: LiveServer, method: str) -> None:
    """A generator body answered 503 is not replayed: the caller gets the 503."""
    server.plan("/upload", busy())
    with httpx.Client(transport=ResilientTransport(retry=retry())) as client:
        response = client.request(method, server.url("/upload"), content=sync_chunks())
    assert response.status_code == 503
    assert [(seen.method, seen.body) for seen in server.seen] == [(method, b"ab")]


async def test_a_streamed_body_is_sent_once_async(server: LiveServer) -> None:
    """The same holds for an async generator body."""
    server.plan("/upload", busy())
    async with httpx.AsyncClient(transport=AsyncResilientTransport(retry=retry())) as client:
        response = await client.put(server.url("/upload"), content=async_chunks())
    assert response.status_code == 503
    assert [seen.body for seen in server.seen] == [b"ab"]


def test_a_bytes_body_is_replayed_to_a_real_server(server: LiveServer) -> None:
    """An in-memory body reaches the server intact on every attempt."""
    server.plan("/upload", busy())
    with httpx.Client(transport=ResilientTransport(retry=retry())) as client:
        response = client.put(server.url("/upload"), content=b"payload")
    assert response.status_code == 200
    assert [seen.body for seen in server.seen] == [b"payload", b"payload"]


def test_a_slow_server_is_cut_off_at_the_deadline(server: LiveServer) -> None:
    """The socket read timeout is clamped to the deadline: 0.1 s, not the client's 5 s."""
    server.plan("/slow", Reply(delay=0.5))
    with httpx.Client(transport=ResilientTransport(), timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(TransportDeadlineExceeded), resilient.deadline(0.1):
            client.get(server.url("/slow"))
        assert time.monotonic() - started < 0.3
    assert len(server.seen) == 1


async def test_a_slow_server_is_cut_off_at_the_deadline_async(server: LiveServer) -> None:
    """An async request still waiting at the deadline is cancelled."""
    server.plan("/slow", Reply(delay=0.5))
    async with httpx.AsyncClient(transport=AsyncResilientTransport(), timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(resilient.DeadlineExceeded):
            async with resilient.deadline(0.1):
                await client.get(server.url("/slow"))
        assert time.monotonic() - started < 0.3
    assert len(server.seen) == 1


async def test_a_deadline_cancelling_an_async_request_is_an_httpx_timeout(
    server: LiveServer,
) -> None:
    """``async with resilient.deadline()`` cancels the request at the deadline; its caller
    catches that as an ``httpx.TimeoutException``, as on the sync path. Five rounds: the
    scope's cancellation and the driver's race, and either may land first."""
    server.plan("/slow", *[Reply(delay=0.5)] * 5)
    async with httpx.AsyncClient(transport=AsyncResilientTransport(), timeout=5.0) as client:
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException) as raised:
                async with resilient.deadline(0.1):
                    await client.get(server.url("/slow"))
            assert time.monotonic() - started < 0.4
            assert isinstance(raised.value, TransportDeadlineExceeded)
            assert isinstance(raised.value, resilient.DeadlineExceeded)
            assert raised.value.request.url.path == "/slow"
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


def hanging(started: asyncio.Event, also_cancel: bool = False) -> Callable[..., Any]:
    """An async MockTransport handler that never answers; it may add a cancellation of its own."""

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if also_cancel:  # a cancellation from elsewhere lands with the deadline's
                asyncio.current_task().cancel()  # type: ignore[union-attr]
            raise
        raise AssertionError("not reached")  # pragma: no cover

    return handler


async def test_a_cancellation_from_outside_stays_a_cancellation_under_a_deadline() -> None:
    """Cancelling the task before the deadline is the canceller's: CancelledError, unchanged."""
    started = asyncio.Event()
    transport = AsyncResilientTransport(httpx.MockTransport(hanging(started)))
    async with httpx.AsyncClient(transport=transport) as client:

        async def call() -> None:
            async with resilient.deadline(5.0):
                await client.get(BASE)

        task = asyncio.create_task(call())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_cancellation_landing_with_the_deadlines_stays_a_cancellation() -> None:
    """Another cancellation pending beside the deadline's: the task is being cancelled, and
    that must not be swallowed into a timeout."""
    started = asyncio.Event()
    transport = AsyncResilientTransport(httpx.MockTransport(hanging(started, also_cancel=True)))
    async with httpx.AsyncClient(transport=transport) as client:

        async def call() -> None:
            async with resilient.deadline(0.05):
                await client.get(BASE)

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(call())


MiB = 1024 * 1024


def huge(hold: threading.Event) -> Reply:
    """A 503 whose first KiB comes at once and whose other 300 MiB wait for ``hold``."""
    return Reply(503, body=b"x" * 1024, more=300 * MiB, hold=hold)


RUNS_OUT = [
    pytest.param(1, {"resilient": {"retry": False}}, id="retry-off"),
    pytest.param(2, {}, id="retries-run-out"),
]


@pytest.mark.parametrize(("attempts", "extensions"), RUNS_OUT)
def test_a_huge_failing_response_streams_to_the_caller_unread(
    server: LiveServer, attempts: int, extensions: dict[str, Any]
) -> None:
    """The last 503 comes back as plain httpx returns it: at once, its body unread, while the
    server still holds back the rest. The earlier one, too long to drain, was closed, so the
    retry went out on a new connection."""
    hold = threading.Event()
    server.plan("/big", *[huge(hold)] * attempts)
    transport = ResilientTransport(retry=retry(attempts=attempts))
    try:
        with httpx.Client(transport=transport, timeout=2.0) as client:
            started = time.monotonic()
            with client.stream("GET", server.url("/big"), extensions=extensions) as response:
                assert time.monotonic() - started < 1.0
                assert not hold.is_set()  # so the body cannot have been read in full
                assert response.status_code == 503
                assert report(response)["attempts"] == attempts
                assert next(response.iter_raw()).startswith(b"x")
    finally:
        hold.set()
    assert len({seen.peer for seen in server.seen}) == attempts


@pytest.mark.parametrize(("attempts", "extensions"), RUNS_OUT)
async def test_a_huge_failing_response_streams_to_the_async_caller_unread(
    server: LiveServer, attempts: int, extensions: dict[str, Any]
) -> None:
    """The async transport returns the last 503 unread too."""
    hold = threading.Event()
    server.plan("/big", *[huge(hold)] * attempts)
    transport = AsyncResilientTransport(retry=retry(attempts=attempts))
    try:
        async with httpx.AsyncClient(transport=transport, timeout=2.0) as client:
            started = time.monotonic()
            request = client.build_request("GET", server.url("/big"), extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                assert time.monotonic() - started < 1.0
                assert not hold.is_set()
                assert response.status_code == 503
                assert report(response)["attempts"] == attempts
                assert (await anext(response.aiter_raw())).startswith(b"x")
            finally:
                await response.aclose()
    finally:
        hold.set()
    assert len({seen.peer for seen in server.seen}) == attempts


def long_chunked(hold: threading.Event) -> Reply:
    """A 503 with no length: twice the drain limit at once, then more held back."""
    return Reply(503, body=b"x" * (2 * DRAIN_LIMIT), more=MiB, hold=hold, chunked=True)


def test_before_a_retry_a_long_failing_body_is_read_no_further_than_the_limit(
    server: LiveServer,
) -> None:
    """Draining stops past DRAIN_LIMIT and drops the connection: it does not wait for the
    rest of the body (which would only come after the read timeout)."""
    hold = threading.Event()
    server.plan("/", long_chunked(hold))
    try:
        with httpx.Client(transport=ResilientTransport(retry=retry()), timeout=2.0) as client:
            started = time.monotonic()
            response = client.get(server.url("/"))
            elapsed = time.monotonic() - started
    finally:
        hold.set()
    assert response.status_code == 200
    assert elapsed < 1.0
    assert len({seen.peer for seen in server.seen}) == 2


async def test_before_an_async_retry_a_long_failing_body_is_read_no_further_than_the_limit(
    server: LiveServer,
) -> None:
    """The async transport stops draining at the limit too."""
    hold = threading.Event()
    server.plan("/", long_chunked(hold))
    try:
        transport = AsyncResilientTransport(retry=retry())
        async with httpx.AsyncClient(transport=transport, timeout=2.0) as client:
            started = time.monotonic()
            response = await client.get(server.url("/"))
            elapsed = time.monotonic() - started
    finally:
        hold.set()
    assert response.status_code == 200
    assert elapsed < 1.0
    assert len({seen.peer for seen in server.seen}) == 2


def trickling() -> Reply:
    """A 503 whose body comes 100 bytes every 0.1 s, for 4 s."""
    return Reply(503, body=b"x" * 100, more=4000, piece=100, interval=0.1, chunked=True)


def test_a_failing_body_is_never_read_past_the_deadline(server: LiveServer) -> None:
    """A body trickling in is drained only until the deadline; then the request ends with
    the deadline's error, not 4 s later."""
    server.plan("/", trickling())
    with httpx.Client(transport=ResilientTransport(retry=retry()), timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException), resilient.deadline(0.5):
            client.get(server.url("/"))
        assert time.monotonic() - started < 1.0


async def test_a_failing_body_is_never_read_past_the_deadline_async(server: LiveServer) -> None:
    """The async drain is cancelled at the deadline."""
    server.plan("/", trickling())
    async with httpx.AsyncClient(transport=AsyncResilientTransport(retry=retry())) as client:
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            async with resilient.deadline(0.5):
                await client.get(server.url("/"))
        assert time.monotonic() - started < 1.0


def stalled(hold: threading.Event) -> Reply:
    """A 503 whose body stops after its first KiB until ``hold`` is set."""
    return Reply(503, body=b"x" * 1024, more=1024, hold=hold, chunked=True)


def test_a_stalled_failing_body_is_given_up_at_the_read_timeout(server: LiveServer) -> None:
    """The drain's read times out: the connection is dropped and the retry goes ahead."""
    hold = threading.Event()
    server.plan("/", stalled(hold))
    timeout = httpx.Timeout(5.0, read=0.3)
    try:
        with httpx.Client(transport=ResilientTransport(retry=retry()), timeout=timeout) as client:
            response = client.get(server.url("/"))
    finally:
        hold.set()
    assert response.status_code == 200
    assert len({seen.peer for seen in server.seen}) == 2


async def test_a_stalled_failing_body_is_given_up_at_the_read_timeout_async(
    server: LiveServer,
) -> None:
    """The async drain gives up at the read timeout too."""
    hold = threading.Event()
    server.plan("/", stalled(hold))
    timeout = httpx.Timeout(5.0, read=0.3)
    try:
        transport = AsyncResilientTransport(retry=retry())
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            response = await client.get(server.url("/"))
    finally:
        hold.set()
    assert response.status_code == 200
    assert len({seen.peer for seen in server.seen}) == 2


def test_a_head_answer_announcing_a_huge_body_keeps_its_connection(server: LiveServer) -> None:
    """A HEAD response has no body whatever its Content-Length says: nothing to drop."""
    server.plan("/", Reply(503, body=b"", more=300 * MiB))
    inner = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    with httpx.Client(transport=ResilientTransport(inner, retry=retry())) as client:
        response = client.head(server.url("/"))
    assert response.status_code == 200
    assert len({seen.peer for seen in server.seen}) == 1


def test_the_deadline_header_reaches_the_server(server: LiveServer) -> None:
    """The downstream service learns how long the caller will wait, in milliseconds."""
    transport = ResilientTransport(propagate_deadline=True)
    with httpx.Client(transport=transport) as client, resilient.deadline(2.0):
        client.get(server.url("/"))
    [seen] = server.seen
    assert 1000 < int(seen.headers[resilient.DEADLINE_HEADER]) <= 2000


def test_a_host_going_down_and_coming_back(server: LiveServer, clock: FakeClock) -> None:
    """Down: connection failures open the breaker and later calls fail fast, off the network.
    Back on the same port: after reset_timeout one probe succeeds and closes the breaker."""
    sends: list[str] = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sends.append(request.url.path)
            return super().handle_request(request)

    url = server.url("/")
    transport = ResilientTransport(Counting(), retry=retry(attempts=3), breaker=breakers(clock))
    with httpx.Client(transport=transport, timeout=2.0) as client:
        assert client.get(url).status_code == 200

        server.stop()
        sends.clear()
        with pytest.raises(TransportCircuitOpen) as raised:
            client.get(url)  # two connection failures open the breaker; the third is refused
        opened = raised.value.__cause__
        assert isinstance(opened, resilient.CircuitOpenError)
        assert isinstance(opened.__cause__, httpx.ConnectError)
        assert len(sends) == 2
        with pytest.raises(httpx.TransportError):
            client.get(url)
        assert len(sends) == 2  # failed fast, without touching the network

        server.start()
        assert server.url("/") == url
        with pytest.raises(resilient.CircuitOpenError):
            client.get(url)  # the host is back, but the breaker waits for reset_timeout
        assert len(sends) == 2

        clock.advance(31)
        probe = client.get(url)
        assert probe.status_code == 200
        assert report(probe)["breaker"] == "closed"
        assert client.get(url).status_code == 200
    assert len(sends) == 4


def test_busy_origins_stay_in_the_bounded_state_map() -> None:
    """Reads go through an index, yet a busy origin is still kept over idle ones."""
    transport = ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)), max_hosts=2
    )
    hosts = transport._core.hosts
    with httpx.Client(transport=transport) as client:
        for _ in range(64):
            client.get("http://busy.test/")
        client.get("http://idle.test/")
        for _ in range(64):
            client.get("http://busy.test/")
        client.get("http://newcomer.test/")  # the map is full: the least recently used goes
    assert ("http", "busy.test", None) in hosts
    assert ("http", "idle.test", None) not in hosts
    assert set(transport._core.index) == set(hosts.keys())


def test_a_stranded_index_is_rebuilt_from_the_map() -> None:
    """Entries an eviction race left in the index are dropped once it outgrows the bound."""
    transport = ResilientTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)), max_hosts=2
    )
    core = transport._core
    with httpx.Client(transport=transport) as client:
        client.get("http://kept.test/")
        stale = core.index[("http", "kept.test", None)]
        for n in range(5):  # as if evictions had raced with lookups
            core.index[("http", f"stale{n}.test", None)] = stale
        client.get("http://fresh.test/")
    assert set(core.index) == set(core.hosts.keys())
    assert len(core.index) <= 2


@pytest.mark.parametrize(
    ("options", "name"), [({"retry": "no"}, "retry"), ({"idempotent": 1}, "idempotent")]
)
async def test_per_request_options_must_be_booleans(
    make: MakeHarness, options: dict[str, Any], name: str
) -> None:
    """{"retry": "no"} is refused, naming the option, instead of being read as true."""
    harness = make(Script(503))
    with pytest.raises(TypeError, match=rf'\["{name}"\] must be True or False'):
        await harness.send(extensions={"resilient": options})


async def test_requests_in_flight_together_are_each_judged_by_their_own_method() -> None:
    """A GET and a POST failing at the same time on one origin: only the GET is retried."""
    statuses = {"GET": [503, 200], "POST": [503, 200]}
    both_sent = asyncio.Event()
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) == 2:
            both_sent.set()
        await asyncio.wait_for(both_sent.wait(), 5)  # both first attempts are out at once
        return httpx.Response(statuses[request.method].pop(0))

    transport = AsyncResilientTransport(httpx.MockTransport(handler), retry=retry())
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        got, posted = await asyncio.gather(client.get("/"), client.post("/", content=b"x"))
    assert got.status_code == 200
    assert report(got)["attempts"] == 2
    assert posted.status_code == 503
    assert report(posted)["attempts"] == 1
    assert sorted(seen) == ["GET", "GET", "POST"]


def test_policy_resume_takes_over_a_first_attempt_made_elsewhere() -> None:
    """Policy.resume counts the attempt in the budget and breaker, then retries as usual."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    budget = resilient.RetryBudget(ratio=0.0, min_retries_per_second=0.1, clock=clock)
    policy = resilient.Policy(retry=retry(attempts=3, budget=budget), breaker=breaker)
    calls: list[str] = []

    def again(key: str) -> str:
        calls.append(key)
        return f"value of {key}"

    resume = policy.resume(again, False)
    assert resume(clock(), ConnectionError("first try"), "k") == "value of k"
    assert calls == ["k"]
    assert breaker.metrics().consecutive_failures == 0  # the retry's success reset it
    assert budget.available() == 0  # the one retry the reserve allowed was spent
    with pytest.raises(ValueError, match="without a bulkhead, timeout"):
        resilient.Policy(timeout=1.0).resume(again, False)


async def test_a_retry_after_years_ahead_returns_the_response_instead_of_sleeping(
    make: MakeHarness,
) -> None:
    """Retry-After in year 9999 with max_retry_after=inf: no OverflowError, no endless sleep."""
    far = httpx.Response(503, headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    harness = make(Script(far), retry=retry(), max_retry_after=math.inf)
    response = await harness.send()
    assert response.status_code == 503
    assert report(response)["attempts"] == 1


async def test_a_gate_of_ones_own_refusing_is_not_its_own_cause(make: MakeHarness) -> None:
    """A custom gate's error reaches the caller as raised; its __cause__ chain ends."""

    class Closed(resilient.ResilientError):
        pass

    class ClosedGate:
        def before_call(self) -> object:
            raise Closed("closed for maintenance")

        def on_success(self, ticket: object) -> None: ...
        def on_failure(self, ticket: object, error: Exception) -> None: ...
        def on_abort(self, ticket: object) -> None: ...

    harness = make(Script(200), breaker=lambda origin: ClosedGate())
    with pytest.raises(Closed) as refused:
        await harness.send()
    assert refused.value.__cause__ is None


@pytest.mark.parametrize("options", [{}, {"resilient": {"retry": False}}], ids=["fast", "driver"])
def test_transport_errors_are_freed_without_the_cyclic_gc(options: dict[str, Any]) -> None:
    """A failed request's error (and so its request) is freed by reference counting alone."""
    import gc
    import weakref

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("boom", request=request)

    transport = ResilientTransport(httpx.MockTransport(handler))
    gc.collect()
    gc.disable()
    try:
        request = httpx.Request("POST", "http://c.test/", content=b"x", extensions=options)
        refs: list[weakref.ref[BaseException]] = []
        try:
            transport.handle_request(request)
        except httpx.ReadError as error:
            refs.append(weakref.ref(error))
        assert refs
        assert refs[0]() is None
    finally:
        gc.enable()
