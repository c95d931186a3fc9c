"""FaultMiddleware: server-side faults per path prefix, under a real uvicorn."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from rpc_live import serve

import resilient
from resilient import rpc
from resilient.chaos import FaultMiddleware, ServerFault
from resilient.chaos.middleware import _covers


def echo_server() -> rpc.Server:
    server = rpc.Server()

    @server.method(idempotent=True)
    def echo(text: str) -> str:
        return text

    return server


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: lifespan events are recorded on the app, HTTP requests echo the path."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            hello.events.append(message["type"])  # type: ignore[attr-defined]
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def no_wait_retry(attempts: int = 3) -> resilient.Retry:
    return resilient.Retry(attempts=attempts, backoff=resilient.Backoff(initial=0.0, jitter="none"))


def test_with_no_routes_it_passes_everything_through_lifespan_included() -> None:
    """Off unless configured: answers and lifespan events reach the app unchanged."""
    hello.events = []  # type: ignore[attr-defined]
    with serve(FaultMiddleware(hello)) as base, httpx.Client() as client:
        assert client.get(base + "/x").text == "/x"
    assert hello.events == ["lifespan.startup", "lifespan.shutdown"]  # type: ignore[attr-defined]


def test_one_node_fails_a_share_of_rpc_requests_and_the_client_retries_them() -> None:
    """A node failing 30% of requests (503, Retry-After 0): the RPC client's calls still succeed."""
    app = FaultMiddleware(echo_server(), random=3)
    app.set("/", status_rate=0.3, retry_after=0)
    with (
        serve(app) as base,
        rpc.Client(base + "/", idempotent={"echo"}, retry=no_wait_retry(5)) as c,
    ):
        for number in range(20):
            assert c.call("echo", f"#{number}") == f"#{number}"
    assert 2 <= app.injected["status"] <= 14


def test_injected_status_carries_retry_after_and_keeps_the_connection(
    server_url: str, app: FaultMiddleware
) -> None:
    """A 503 with Retry-After, a JSON body, and the same keep-alive connection serves on."""
    app.set("/fail", status_rate=1.0, retry_after=2)
    with httpx.Client() as client:
        failed = client.post(server_url + "/fail", content=b"x" * 100_000)
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "2"
        assert "injected by resilient.chaos.FaultMiddleware" in failed.json()["detail"]
        assert client.get(server_url + "/fine").text == "/fine"
        assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]


async def test_a_client_gone_before_the_injected_answer_gets_none() -> None:
    """The body ends in http.disconnect: nothing is sent (an ASGI server may raise on it)."""
    app = FaultMiddleware(hello, routes={"/": ServerFault(status_rate=1.0)})
    messages = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        if not messages:  # as the ASGI spec lets a server do after a disconnect
            raise ConnectionResetError("the client disconnected")
        sent.append(message)

    await app({"type": "http", "path": "/x", "method": "POST"}, receive, send)
    assert sent == []
    assert app.injected["status"] == 1


def test_latency_per_prefix_and_the_longest_prefix_wins(
    server_url: str, app: FaultMiddleware
) -> None:
    """/slow waits; /slow/fast has its own faults (none that apply); other paths are quick."""
    app.set("/slow", latency_rate=1.0, delay=0.2)
    app.set("/slow/fast", status_rate=0.0)
    with httpx.Client() as client:
        started = time.monotonic()
        assert client.get(server_url + "/slow/x").text == "/slow/x"
        assert time.monotonic() - started >= 0.18
        assert client.get(server_url + "/slow/fast/x").text == "/slow/fast/x"
        assert client.get(server_url + "/other").text == "/other"
    assert app.injected["latency"] == 1  # only /slow/x waited


def test_faults_change_while_the_server_runs(server_url: str, app: FaultMiddleware) -> None:
    """set, remove and clear take effect on the next request."""
    with httpx.Client() as client:
        app.set("/", status_rate=1.0, status=500)
        assert client.get(server_url + "/a").status_code == 500
        app.remove("/")
        assert client.get(server_url + "/a").status_code == 200
        app.set("/a", status_rate=1.0, status=429)
        assert client.get(server_url + "/a/b").status_code == 429
        assert client.get(server_url + "/ab").status_code == 200  # whole segments only
        app.clear()
        assert client.get(server_url + "/a").status_code == 200
    with pytest.raises(KeyError, match="no faults are set"):
        app.remove("/nothing")


def test_enabled_switches_the_faults_off() -> None:
    """enabled=False (or a callable saying so) lets every request through."""
    app = FaultMiddleware(hello, routes={"/": ServerFault(status_rate=1.0)}, enabled=lambda: False)
    with serve(app, lifespan="off") as base, httpx.Client() as client:
        assert client.get(base + "/x").status_code == 200
    assert app.routes == {"/": ServerFault(status_rate=1.0)}


def test_a_seed_reproduces_which_requests_fail() -> None:
    """Two servers with the same seed fail the same requests of the same sequence."""

    def statuses() -> list[int]:
        app = FaultMiddleware(hello, routes={"/": ServerFault(status_rate=0.5)}, random=11)
        with serve(app, lifespan="off") as base, httpx.Client() as client:
            return [client.get(base + "/").status_code for _ in range(12)]

    first = statuses()
    assert first == statuses()
    assert set(first) == {200, 503}


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"status_rate": 1.1}, ValueError, "status_rate must be a probability"),
        ({"status_rate": 0.1, "status": 302}, ValueError, "at least 400"),
        ({"status_rate": 0.1, "status": 700}, ValueError, "4xx or 5xx"),
        ({"retry_after": 1}, ValueError, "give status_rate too"),
        ({"status": 500}, ValueError, "status=500 is answered only to a share status_rate"),
        ({"status_rate": 0.1, "retry_after": -1}, ValueError, "retry_after must be at least 0"),
        ({"latency_rate": 0.5}, ValueError, "go together"),
        ({"delay": 0.5}, ValueError, "go together"),
        ({"latency_rate": 0.5, "delay": "1"}, TypeError, "delay must be seconds"),
    ],
)
def test_bad_faults_are_refused_naming_the_setting(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """ServerFault checks each setting at construction."""
    with pytest.raises(error, match=match):
        ServerFault(**settings)


def test_bad_routes_and_apps_are_refused() -> None:
    """A prefix must start with '/', a fault must be a ServerFault, the app a callable."""
    with pytest.raises(ValueError, match="starting with '/'"):
        FaultMiddleware(hello).set("api", status_rate=0.1)
    with pytest.raises(TypeError, match=r"must be a resilient\.chaos\.ServerFault"):
        FaultMiddleware(hello, routes={"/": {"status_rate": 0.1}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="ASGI application"):
        FaultMiddleware(None)  # type: ignore[arg-type]


def test_prefixes_match_whole_segments() -> None:
    """'/api' covers /api and /api/x, not /apis; '/api/' covers /api too; '/' covers all."""
    assert _covers("/api", "/api")
    assert _covers("/api", "/api/x")
    assert not _covers("/api", "/apis")
    assert _covers("/api/", "/api")
    assert _covers("/", "/anything")


@pytest.fixture
def app() -> FaultMiddleware:
    return FaultMiddleware(hello, random=1)


@pytest.fixture
def server_url(app: FaultMiddleware) -> Any:
    with serve(app, lifespan="off") as base:
        yield base
