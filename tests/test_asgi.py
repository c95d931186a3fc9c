"""DeadlineMiddleware: budget headers, early answers, and 504s that keep the connection alive.

In-process through httpx.ASGITransport (or raw ASGI calls) for the parsing and the
branches; against a real uvicorn server on 127.0.0.1 for what a client sees on the wire.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from rpc_live import serve

import resilient
from resilient.asgi import DeadlineMiddleware
from resilient.deadline import current
from resilient.errors import DeadlineExceeded

Message = dict[str, Any]


def remaining_app(**options: Any) -> DeadlineMiddleware:
    """A FastAPI app whose endpoint reports the budget it was given, wrapped in the middleware."""
    api = FastAPI()

    @api.get("/")
    async def left() -> dict[str, float | None]:
        seconds = resilient.remaining()
        return {"remaining": None if seconds == math.inf else seconds}

    return DeadlineMiddleware(api, **options)


async def get(app: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/", headers=headers)


class Recorder:
    """A bare ASGI app that records how it was called and answers 200 at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": headers or []}


async def call(app: Any, scope: dict[str, Any]) -> list[Message]:
    """Call ``app`` as a server would and return every message it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}  # pragma: no cover - never reached

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


# Reading the budget ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "seconds"),
    [
        ("resilient-timeout-ms", "1500", 1.5),
        ("resilient-timeout-ms", "9" * 20, 300.0),  # clamped
        ("grpc-timeout", "2S", 2.0),
        ("grpc-timeout", "100m", 0.1),
        ("grpc-timeout", "2M", 120.0),
        ("grpc-timeout", "1H", 300.0),  # clamped
        ("grpc-timeout", "2000000u", 2.0),
        ("grpc-timeout", "90000000n", 0.09),
        ("grpc-timeout", "99999999S", 300.0),  # the longest form, clamped
        ("connect-timeout-ms", "1500", 1.5),
        ("connect-timeout-ms", "9999999999", 300.0),  # clamped
    ],
)
async def test_each_header_form_sets_the_deadline_the_endpoint_sees(
    header: str, value: str, seconds: float
) -> None:
    """Every header form and unit is read, clamped to max_deadline, and in force in the endpoint."""
    response = await get(remaining_app(max_deadline=300.0), {header: value})
    assert response.status_code == 200
    assert seconds - 0.05 < response.json()["remaining"] <= seconds


async def test_max_deadline_clamps_a_long_budget() -> None:
    """A caller asking for an hour gets max_deadline, given as a timedelta too."""
    response = await get(
        remaining_app(max_deadline=timedelta(seconds=2)), {"resilient-timeout-ms": "3600000"}
    )
    assert 1.9 < response.json()["remaining"] <= 2.0


async def test_the_shortest_of_several_budgets_wins() -> None:
    """With several budget headers the strictest one is in force."""
    headers = [
        ("resilient-timeout-ms", "5000"),
        ("grpc-timeout", "1S"),
        ("connect-timeout-ms", "3000"),
    ]
    transport = httpx.ASGITransport(app=remaining_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/", headers=headers)
    assert 0.9 < response.json()["remaining"] <= 1.0


async def test_every_value_counts_whatever_the_order_repeats_included() -> None:
    """The documented rule: the shortest of all values wins, a repeated header included."""
    headers = [
        ("connect-timeout-ms", "4000"),
        ("resilient-timeout-ms", "5000"),
        ("connect-timeout-ms", "1000"),  # repeated: the second, shorter value counts
    ]
    transport = httpx.ASGITransport(app=remaining_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/", headers=headers)
    assert 0.9 < response.json()["remaining"] <= 1.0


async def test_one_malformed_value_is_refused_even_beside_a_valid_one() -> None:
    """A valid budget does not excuse a malformed one sent with it: 400 naming the bad header."""
    headers = [(b"resilient-timeout-ms", b"1000"), (b"grpc-timeout", b"soon")]
    app = Recorder()
    sent = await call(DeadlineMiddleware(app), http_scope(headers))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"].startswith("grpc-timeout: must be ")
    assert app.calls == []


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("resilient-timeout-ms", "-5"),
        ("resilient-timeout-ms", "1.5"),
        ("resilient-timeout-ms", ""),
        ("resilient-timeout-ms", "١٢"),  # Arabic-Indic digits: int() would take them
        ("grpc-timeout", "100"),
        ("grpc-timeout", "100x"),
        ("grpc-timeout", "123456789m"),  # nine digits
        ("grpc-timeout", "m"),
        ("grpc-timeout", ""),
        ("grpc-timeout", "+1S"),
        ("connect-timeout-ms", "abc"),
        ("connect-timeout-ms", "12345678901"),  # eleven digits
        ("connect-timeout-ms", ""),
    ],
)
async def test_a_malformed_header_is_refused_with_400_naming_it(header: str, value: str) -> None:
    """A budget that cannot be read gets 400 with a JSON detail naming the header; no app call."""
    app = Recorder()
    sent = await call(
        DeadlineMiddleware(app), http_scope([(header.encode(), value.encode("utf-8"))])
    )
    assert sent[0]["status"] == 400
    detail = json.loads(sent[1]["body"])["detail"]
    assert detail.startswith(f"{header}: must be ")
    assert app.calls == []
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


async def test_the_400_echoes_only_the_start_of_a_long_value() -> None:
    """A huge malformed value is not reflected back whole."""
    response = await get(DeadlineMiddleware(Recorder()), {"grpc-timeout": "x" * 5000})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert (
        detail == f"grpc-timeout: must be 1 to 8 ASCII digits and a unit (H, M, S, m, u or n), "
        f"got '{'x' * 40}...'"
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [("resilient-timeout-ms", "0"), ("grpc-timeout", "0m"), ("connect-timeout-ms", "0")],
)
async def test_a_spent_budget_is_answered_at_once_without_calling_the_app(
    header: str, value: str
) -> None:
    """0 ms left: the caller will not wait, so the app is not called and `status` comes back."""
    app = Recorder()
    response = await get(DeadlineMiddleware(app, status=503), {header: value})
    assert response.status_code == 503
    assert "no time left" in response.json()["detail"]
    assert app.calls == []


async def test_without_a_header_or_default_the_app_gets_the_servers_own_callables() -> None:
    """The fast path: no deadline, no wrapping; the app sees the very receive and send."""
    app = Recorder()
    scope = http_scope([(b"accept", b"*/*")])

    async def receive() -> Message:  # pragma: no cover - not called
        return {}

    async def send(message: Message) -> None:
        pass

    await DeadlineMiddleware(app)(scope, receive, send)
    assert app.calls == [(scope, receive, send)]
    assert (await get(remaining_app())).json() == {"remaining": None}


async def test_default_applies_only_without_a_header() -> None:
    """default= is the budget of requests that send none; a header still wins."""
    app = remaining_app(default=0.5)
    assert 0.45 < (await get(app)).json()["remaining"] <= 0.5
    assert 1.9 < (await get(app, {"grpc-timeout": "2S"})).json()["remaining"] <= 2.0


async def test_default_deadline_expires_into_504() -> None:
    """A request with no header runs out of the default budget and gets 504."""
    cancelled = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    response = await get(DeadlineMiddleware(slow, default=0.05))
    assert time.monotonic() - started < 0.5
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "detail": "the deadline of 0.05 s passed before the response was ready"
    }
    assert cancelled.is_set()


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
async def test_websocket_and_lifespan_scopes_pass_through_untouched(kind: str) -> None:
    """Other scopes reach the app as they are, even with a header that would be refused."""
    app = Recorder()
    scope = {"type": kind, "headers": [(b"grpc-timeout", b"bad")]}

    async def receive() -> Message:  # pragma: no cover - not called
        return {}

    async def send(message: Message) -> None:  # pragma: no cover - not called
        pass

    await DeadlineMiddleware(app)(scope, receive, send)
    assert app.calls == [(scope, receive, send)]


# What happens at the deadline (in-process) -------------------------------------------


async def test_a_deadline_after_the_response_started_cuts_it_and_raises() -> None:
    """A started response cannot become a 504: the rest is not sent, DeadlineExceeded is raised."""
    cancelled = asyncio.Event()

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await send({"type": "http.response.body", "body": b"rest"})  # pragma: no cover

    scope = http_scope([(b"resilient-timeout-ms", b"50")])
    with pytest.raises(DeadlineExceeded, match="after the response had started"):
        await call(DeadlineMiddleware(streaming), scope)
    assert cancelled.is_set()


async def test_a_started_response_whose_app_swallows_the_cancel_still_ends_cut() -> None:
    """An app that ignores its cancellation cannot send any more; the middleware still raises."""
    sent: list[Message] = []

    async def stubborn(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await send({"type": "http.response.body", "body": b"late"})

    async def record(message: Message) -> None:
        sent.append(message)

    scope = http_scope([(b"resilient-timeout-ms", b"30")])
    with pytest.raises(DeadlineExceeded):
        await DeadlineMiddleware(stubborn)(scope, None, record)  # type: ignore[arg-type]
    assert [message["type"] for message in sent] == ["http.response.start"]


async def test_sends_after_the_504_are_dropped() -> None:
    """An app that answers after its deadline is muted: the client sees only the 504."""
    finished = asyncio.Event()

    async def late(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"too late"})
            finished.set()

    sent = await call(DeadlineMiddleware(late), http_scope([(b"grpc-timeout", b"30m")]))
    assert [message.get("status") for message in sent] == [504, None]
    assert finished.is_set()  # the middleware waited for the endpoint to end


@pytest.mark.parametrize(
    ("raised", "reported"), [(RuntimeError("cleanup failed"), True), (DeadlineExceeded(), False)]
)
async def test_an_error_while_unwinding_after_the_504_goes_to_the_loop_handler(
    raised: BaseException, reported: bool
) -> None:
    """Raising after the 504 would close the kept-alive connection: errors are reported instead."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise raised from None

    try:
        sent = await call(DeadlineMiddleware(failing), http_scope([(b"grpc-timeout", b"30m")]))
    finally:
        loop.set_exception_handler(None)
    assert sent[0]["status"] == 504
    assert [context["exception"] for context in seen] == ([raised] if reported else [])


async def test_background_work_after_a_complete_response_is_not_cancelled() -> None:
    """Once the answer is out, work the app does afterwards runs to the end."""
    finished: list[float] = []

    async def with_background(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await asyncio.sleep(0.1)  # past the deadline
        finished.append(resilient.remaining())

    sent = await call(DeadlineMiddleware(with_background), http_scope([(b"grpc-timeout", b"30m")]))
    assert sent[0]["status"] == 200
    assert finished == [0.0]  # it ran on, with the passed deadline still in force


async def test_an_app_that_finishes_as_the_deadline_fires_keeps_its_answer() -> None:
    """The app's own outcome wins when it completes in the same loop step as the deadline."""

    async def blocking(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.06)  # holds the loop past the deadline, then finishes
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = await call(DeadlineMiddleware(blocking), http_scope([(b"grpc-timeout", b"20m")]))
    assert [message.get("status") for message in sent] == [201, None]


async def test_the_apps_own_errors_propagate_unchanged() -> None:
    """An error from the app, a DeadlineExceeded of its own included, is not turned into a 504."""
    for error in (ValueError("boom"), DeadlineExceeded("the app's own")):

        async def failing(scope: Any, receive: Any, send: Any, error: Exception = error) -> None:
            raise error

        scope = http_scope([(b"resilient-timeout-ms", b"5000")])
        with pytest.raises(type(error)) as caught:
            await call(DeadlineMiddleware(failing), scope)
        assert caught.value is error


async def test_an_endpoint_timer_firing_just_before_the_middlewares_still_gets_504() -> None:
    """The endpoint's own timer for the inherited deadline may fire first: still a 504, not 500."""

    async def own_scope(scope: Any, receive: Any, send: Any) -> None:
        # Set a hair before the middleware's (as float rounding or a clamped call does),
        # so the task ends with DeadlineExceeded before the middleware's timer fires.
        async with resilient.deadline_at(current() - 0.0005):
            await asyncio.sleep(5)

    sent = await call(DeadlineMiddleware(own_scope), http_scope([(b"grpc-timeout", b"20m")]))
    assert [message.get("status") for message in sent] == [504, None]
    assert "0.02 s passed" in json.loads(sent[1]["body"])["detail"]


@pytest.mark.parametrize(
    ("raised", "reported"), [(DeadlineExceeded("its own"), False), (ValueError("late"), True)]
)
async def test_an_endpoint_that_raises_once_the_deadline_passed_gets_504(
    raised: Exception, reported: bool
) -> None:
    """Ending with an error, before the response, after the deadline is the deadline's 504."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))

    async def blocking(scope: Any, receive: Any, send: Any) -> None:
        time.sleep(0.03)  # holds the loop past the deadline, so no timer has run yet
        raise raised

    try:
        sent = await call(DeadlineMiddleware(blocking), http_scope([(b"grpc-timeout", b"20m")]))
    finally:
        loop.set_exception_handler(None)
    assert [message.get("status") for message in sent] == [504, None]
    assert [context["exception"] for context in seen] == ([raised] if reported else [])


async def test_an_endpoint_deadline_scope_never_turns_the_504_into_a_500() -> None:
    """The reviewer's race: 50 requests whose endpoint scope is clamped to the budget, all 504."""

    async def api(scope: Any, receive: Any, send: Any) -> None:
        async with resilient.deadline(60):  # clamped to the caller's 20 ms
            await asyncio.sleep(10)

    transport = httpx.ASGITransport(app=DeadlineMiddleware(api), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        statuses = [
            (await client.get("/", headers={"resilient-timeout-ms": "20"})).status_code
            for _ in range(50)
        ]
    assert statuses == [504] * 50


async def test_added_to_fastapi_its_error_middleware_never_answers_500_at_the_deadline() -> None:
    """With add_middleware, FastAPI's ServerErrorMiddleware sits outside: every answer is 504."""
    api = FastAPI()

    @api.get("/")
    async def endpoint() -> None:
        async with resilient.deadline(60):
            await asyncio.sleep(10)

    api.add_middleware(DeadlineMiddleware, max_deadline=30.0)
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        statuses = [
            (await client.get("/", headers={"resilient-timeout-ms": "20"})).status_code
            for _ in range(50)
        ]
    assert statuses == [504] * 50


async def test_the_apps_error_before_the_deadline_and_after_the_start_propagates() -> None:
    """Only an error before the response starts becomes the 504; after the start it propagates."""

    async def started_then_failed(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        time.sleep(0.03)  # past the deadline
        raise ValueError("after the start")

    with pytest.raises(ValueError, match="after the start"):
        await call(DeadlineMiddleware(started_then_failed), http_scope([(b"grpc-timeout", b"20m")]))


async def test_cancelling_the_request_from_outside_cancels_the_endpoint() -> None:
    """A server cancelling the request (shutdown) takes the endpoint task along."""
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scope = http_scope([(b"resilient-timeout-ms", b"5000")])
    request = asyncio.ensure_future(call(DeadlineMiddleware(slow), scope))
    await entered.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.sleep(0)
    assert cancelled.is_set()


# Configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_deadline": 0}, ValueError, "max_deadline must be greater than zero"),
        ({"max_deadline": math.inf}, ValueError, "max_deadline must be finite"),
        ({"max_deadline": math.nan}, ValueError, "max_deadline must be a number"),
        ({"default": 0}, ValueError, "default must be greater than zero"),
        ({"default": 61.0}, ValueError, "default must not exceed max_deadline"),
        ({"default": "1s"}, TypeError, "default must be seconds"),
        ({"status": 200}, ValueError, "status must be an HTTP error status"),
        ({"status": True}, TypeError, "status must be an HTTP status code"),
        ({"status": "504"}, TypeError, "status must be an HTTP status code"),
    ],
)
def test_bad_configuration_is_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Invalid settings fail at construction with the parameter's name."""
    with pytest.raises(error, match=message):
        DeadlineMiddleware(Recorder(), **options)


def test_app_must_be_callable_and_repr_shows_the_settings() -> None:
    """A non-callable app is refused; the repr shows what is in force."""
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        DeadlineMiddleware(None)  # type: ignore[arg-type]
    middleware = DeadlineMiddleware(Recorder(), default=timedelta(seconds=2), status=503)
    assert "max_deadline=60.0, default=2.0, status=503" in repr(middleware)


# Against a real uvicorn server ---------------------------------------------------------


class Live:
    """What the live app's endpoints report, and the client address of each request."""

    def __init__(self) -> None:
        self.peers: dict[str, list[tuple[str, int]]] = {}
        self.cancelled = threading.Event()
        self.release = threading.Event()
        self.thread_done = threading.Event()
        self.port = 0

    def reset(self) -> None:
        self.peers.clear()
        for event in (self.cancelled, self.release, self.thread_done):
            event.clear()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5.0)


def live_app(state: Live) -> Any:
    api = FastAPI()

    @api.get("/slow")
    async def slow() -> dict[str, bool]:
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        return {"finished": True}  # pragma: no cover - the tests cut it short

    @api.get("/sync")
    def sync() -> dict[str, bool]:
        state.release.wait(5)  # a thread cannot be cancelled: it waits for the test
        state.thread_done.set()
        return {"finished": True}

    @api.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            try:
                await asyncio.sleep(2)
            except asyncio.CancelledError:
                state.cancelled.set()
                raise
            yield b"rest"  # pragma: no cover - the tests cut it short

        return StreamingResponse(body(), media_type="text/plain")

    @api.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}

    middleware = DeadlineMiddleware(api)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            state.peers.setdefault(scope["path"], []).append(scope["client"])
        await middleware(scope, receive, send)

    return app


@pytest.fixture(scope="module")
def uvicorn_server() -> Iterator[Live]:
    """One uvicorn server on an ephemeral 127.0.0.1 port for the module, always stopped."""
    state = Live()
    try:
        with serve(live_app(state), log_config=None, lifespan="off") as url:
            state.port = httpx.URL(url).port or 0
            yield state
    finally:
        state.release.set()


@pytest.fixture
def live(uvicorn_server: Live) -> Iterator[Live]:
    uvicorn_server.reset()
    yield uvicorn_server
    uvicorn_server.release.set()


def test_a_slow_endpoint_gets_504_on_time_and_the_connection_serves_the_next_request(
    live: Live,
) -> None:
    """200 ms budget, 2 s endpoint: 504 in ~0.2 s, endpoint cancelled, same connection reused."""
    with live.client() as client:
        started = time.monotonic()
        response = client.get("/slow", headers={"resilient-timeout-ms": "200"})
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert 0.19 < elapsed < 0.35
        assert "0.2 s passed" in response.json()["detail"]
        assert live.cancelled.wait(0.5)  # set only in the endpoint's `except CancelledError`
        following = client.get("/fast")
    assert following.json() == {"ok": True}
    assert live.peers["/fast"] == live.peers["/slow"]  # same local port: same connection


def test_a_sync_endpoint_gets_504_on_time_while_its_thread_runs_on(live: Live) -> None:
    """A `def` endpoint cannot be interrupted: the 504 is on time, the thread finishes later."""
    with live.client() as client:
        started = time.monotonic()
        response = client.get("/sync", headers={"grpc-timeout": "200m"})
        assert response.status_code == 504
        assert time.monotonic() - started < 0.35
        assert client.get("/fast").status_code == 200  # same connection, thread still running
        assert not live.thread_done.is_set()
        live.release.set()
        assert live.thread_done.wait(2)
    assert live.peers["/fast"] == live.peers["/sync"]


def test_a_stream_started_before_the_deadline_is_cut_and_its_connection_closed(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets the start, then a truncated body error at the deadline; never a short OK."""
    with live.client() as client:
        started = time.monotonic()
        with client.stream("GET", "/stream", headers={"connect-timeout-ms": "200"}) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            assert next(chunks) == b"first"
            with pytest.raises(httpx.RemoteProtocolError):
                list(chunks)
        assert 0.19 < time.monotonic() - started < 0.35
        assert live.cancelled.wait(0.5)
        assert client.get("/fast").status_code == 200  # on a fresh connection
    assert live.peers["/fast"] != live.peers["/stream"]
    assert "passed after the response had started" in caplog.text
