"""resilient.rpc.Server: the JSON-RPC 2.0 spec, typed params, deadlines, overload, hostile input.

The vectors in ``rpc_vectors.json`` run twice: in-process through ``httpx.ASGITransport``
and against a real uvicorn server (``rpc_live.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from rpc_live import live_asgi, serve
from telemetry import attributes

import resilient
import resilient.adaptive
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, RateLimited
from resilient.rpc import _protocol
from resilient.rpc.errors import RemoteError, RemoteRateLimited
from resilient.rpc.server import Server

__all__ = ["live_asgi"]  # the fixture, imported to be found by pytest

VECTORS = json.loads(
    (pathlib.Path(__file__).parent / "rpc_vectors.json").read_text(encoding="utf-8")
)["vectors"]


def vector_server(**config: Any) -> Server:
    """The handlers the vectors call: the specification's examples and a few more."""
    server = Server(**config)

    @server.method
    def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    @server.method
    def update(a: int, b: int, c: int, d: int, e: int) -> None:
        pass

    @server.method(name="sum")
    def add(a: int, b: int, c: int = 0) -> int:
        return a + b + c

    @server.method
    def notify_hello(n: int) -> None:
        pass

    @server.method
    def notify_sum(a: int, b: int, c: int) -> None:
        pass

    @server.method(run_in_thread=False)
    def get_data() -> list[Any]:
        return ["hello", 5]

    @server.method
    async def echo(value: Any) -> Any:
        return value

    @server.method
    def fail() -> None:
        raise ValueError("secret detail of the failure")

    @server.method
    async def app_error() -> None:
        raise RemoteError(42, "no such key", {"key": "k"})

    @server.method
    async def reserved_error() -> None:
        raise RemoteError(-32601, "pretending the method is missing")

    return server


def request_of(vector: dict[str, Any]) -> tuple[str, str, dict[str, str], bytes]:
    if "body_hex" in vector:
        body = bytes.fromhex(vector["body_hex"])
    elif "body" in vector:
        body = vector["body"].encode()
    elif vector["request"] is None:
        body = b""
    else:
        body = json.dumps(vector["request"]).encode()
    headers = {"content-type": "application/json"}
    for key, value in vector.get("headers", {}).items():
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    return vector.get("http_method", "POST"), vector.get("path", "/"), headers, body


def without_unasked_data(expected: Any, actual: Any) -> Any:
    """``actual`` with each error's ``data`` dropped where the vector does not give one."""
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [without_unasked_data(e, a) for e, a in zip(expected, actual, strict=True)]
    if isinstance(expected, dict) and isinstance(actual, dict) and "error" in expected:
        error = dict(actual.get("error", {}))
        if "data" not in expected["error"]:
            error.pop("data", None)
        return {**actual, "error": error}
    return actual


def check(vector: dict[str, Any], response: httpx.Response) -> None:
    assert response.status_code == vector["status"], response.text
    for key, value in vector.get("response_headers", {}).items():
        assert response.headers[key] == value
    if vector["response"] is None:
        assert response.content == b""
        return
    assert response.headers["content-type"] == "application/json"
    actual = response.json()
    assert without_unasked_data(vector["response"], actual) == vector["response"]
    assert "Traceback" not in response.text
    assert "secret detail" not in response.text


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=vector_server())
    async with httpx.AsyncClient(transport=transport, base_url="http://rpc") as client:
        yield client


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    with serve(vector_server()) as url:
        yield url


@pytest.fixture(scope="module")
def live_client(live_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_url) as client:
        yield client


def test_vectors_hold_every_example_of_section_7() -> None:
    """The vector file has the specification's examples (12 cases, 15 requests) and more."""
    spec = [vector for vector in VECTORS if vector["source"] == "spec 7"]
    assert len(spec) == 15
    assert len(VECTORS) > 60
    assert len({vector["name"] for vector in VECTORS}) == len(VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])
async def test_vector_in_process(client: httpx.AsyncClient, vector: dict[str, Any]) -> None:
    """Each vector, through httpx.ASGITransport."""
    method, path, headers, body = request_of(vector)
    check(vector, await client.request(method, path, headers=headers, content=body))


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])
def test_vector_over_uvicorn(live_client: httpx.Client, vector: dict[str, Any]) -> None:
    """Each vector, against a real uvicorn server on 127.0.0.1."""
    method, path, headers, body = request_of(vector)
    check(vector, live_client.request(method, path, headers=headers, content=body))


# Registration and typed params ---------------------------------------------------------


async def call(server: Server, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=server)
    async with httpx.AsyncClient(transport=transport, base_url="http://rpc") as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post("/", content=content, headers=headers or {})


def req(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


def test_decorator_forms_register_and_return_the_function() -> None:
    """``@server.method`` and ``@server.method(name=, idempotent=)`` register and return fn."""
    server = Server()

    def plain(a: int) -> int:
        return a

    assert server.method(plain) is plain

    @server.method(name="kv.get", idempotent=True)
    async def get(key: str) -> str:
        return key

    assert get.__name__ == "get"
    assert server.is_idempotent("kv.get")
    assert not server.is_idempotent("plain")
    assert not server.is_idempotent("missing")
    assert "kv.get" in repr(server)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rpc.mine", "reserved by JSON-RPC 2.0"),
        ("rpc.discover", "reserved by JSON-RPC 2.0"),
        ("_private", "starting with '_'"),
        ("__call__", "starting with '_'"),
        ("", "non-empty string"),
    ],
)
def test_reserved_and_private_names_are_refused(name: str, message: str) -> None:
    """``rpc.`` names (even rpc.discover, the server's own) and ``_`` names are refused."""
    server = Server()
    with pytest.raises(ValueError, match=message):
        server.method(name=name)(lambda: None)


def test_bad_registrations_are_refused() -> None:
    """Duplicates, *args/**kwargs, unresolvable or undecodable annotations, non-callables."""
    server = Server()

    @server.method
    def once() -> None:
        pass

    with pytest.raises(ValueError, match="registered already"):
        server.method(name="once")(lambda: None)

    def varargs(*numbers: int) -> int:
        return 0

    with pytest.raises(TypeError, match=r"\*numbers"):
        server.method(varargs)

    def unresolved(x: NotAType) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(TypeError, match="do not resolve"):
        server.method(unresolved)

    def undecodable(x: threading.Lock) -> None:
        pass

    with pytest.raises(TypeError, match="msgspec cannot decode"):
        server.method(undecodable)

    with pytest.raises(TypeError, match="must be callable"):
        server.method(name="x")(42)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"path": "rpc"}, "path"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_body_size": 0}, "max_body_size"),
        ({"max_depth": 1}, "max_depth"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_deadline": 0}, "max_deadline"),
    ],
)
def test_configuration_is_validated(arguments: dict[str, Any], message: str) -> None:
    """Each limit is checked at construction, the error naming the parameter."""
    with pytest.raises(ValueError, match=message):
        Server(**arguments)


class Point(msgspec.Struct):
    x: int
    y: int


async def test_params_are_decoded_by_annotation_and_kinds_are_respected() -> None:
    """Structs, keyword-only and positional-only params bind; errors name the parameter."""
    server = Server()

    @server.method
    def norm(p: Point, /, *, scale: int = 1) -> int:
        return (p.x + p.y) * scale

    @server.method
    def needs_name(a: int, *, b: int) -> int:
        return a - b

    assert (await call(server, req("norm", [{"x": 1, "y": 2}]))).json()["result"] == 3
    assert (await call(server, req("norm", {"p": {"x": 1, "y": 2}, "scale": 2}))).json()[
        "result"
    ] == 6
    nested = (await call(server, req("norm", [{"x": 1, "y": "2"}]))).json()["error"]
    assert nested["code"] == -32602
    assert nested["data"] == {"param": "p", "reason": "Expected `int`, got `str`"}
    assert (await call(server, req("needs_name", {"a": 5, "b": 2}))).json()["result"] == 3
    by_position = (await call(server, req("needs_name", [5, 2]))).json()["error"]
    assert by_position["data"]["param"] == "b"
    assert "by name" in by_position["data"]["reason"]


async def test_sync_handlers_run_in_a_thread_with_the_deadline_and_contextvars() -> None:
    """A sync handler runs off the event loop's thread and sees the caller's deadline."""
    server = Server()
    loop_thread = threading.get_ident()

    @server.method
    def where() -> dict[str, Any]:
        return {"off_loop": threading.get_ident() != loop_thread, "left": resilient.remaining()}

    @server.method(run_in_thread=False)
    def inline() -> dict[str, Any]:
        return {"off_loop": threading.get_ident() != loop_thread, "left": resilient.remaining()}

    threaded = (await call(server, req("where"), {"resilient-timeout-ms": "5000"})).json()
    assert threaded["result"]["off_loop"] is True
    assert 4.0 < threaded["result"]["left"] <= 5.0
    on_loop = (await call(server, req("inline"), {"resilient-timeout-ms": "3000"})).json()
    assert on_loop["result"]["off_loop"] is False
    assert 2.0 < on_loop["result"]["left"] <= 3.0


async def test_internal_errors_are_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    """A failing handler and a reserved code are logged on resilient.rpc; neither leaks."""
    server = vector_server()
    with caplog.at_level(logging.ERROR, logger="resilient.rpc"):
        failed = await call(server, req("fail"))
        refused = await call(server, req("reserved_error"))
    assert failed.json()["error"] == {"code": -32603, "message": "Internal error"}
    assert refused.json()["error"] == {"code": -32603, "message": "Internal error"}
    messages = [record.getMessage() for record in caplog.records]
    assert any("'fail' failed" in message for message in messages)
    assert any("reserved code -32601" in message for message in messages)
    assert any("secret detail" in str(record.exc_info) for record in caplog.records)


async def test_unencodable_result_is_an_internal_error() -> None:
    """A result msgspec cannot encode answers -32603 instead of breaking the connection."""
    server = Server()

    @server.method(run_in_thread=False)
    def odd() -> object:
        return object()

    assert (await call(server, req("odd"))).json()["error"]["code"] == -32603


# Deadlines -------------------------------------------------------------------------------


async def test_deadline_crosses_a_real_socket_and_cancels_the_handler(
    live_asgi: Any,
) -> None:
    """0.2 s left, a handler sleeping 2 s: -32000 in ~0.2 s, HTTP 504, handler cancelled."""
    server = Server()
    cancelled = threading.Event()

    @server.method
    async def slow() -> str:
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished"

    url = live_asgi(server)
    async with httpx.AsyncClient(base_url=url) as client:
        started = time.monotonic()
        response = await client.post("/", json=req("slow"), headers={"resilient-timeout-ms": "200"})
        took = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == -32000
    assert response.json()["id"] == 1
    assert 0.18 < took < 0.35  # ~0.3 s: the budget and one round trip
    assert cancelled.wait(1)


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"grpc-timeout": "100m"}, 0.05, 0.1),
        ({"grpc-timeout": "2S"}, 1.9, 2.0),
        ({"grpc-timeout": "1H"}, 9.0, 10.0),  # clamped to max_deadline
        ({"connect-timeout-ms": "1500"}, 1.4, 1.5),
        ({"resilient-timeout-ms": "99999999"}, 9.0, 10.0),  # clamped
        ({}, 9.0, 10.0),  # no header: max_deadline
        ({"resilient-timeout-ms": "300", "grpc-timeout": "5S"}, 0.2, 0.3),  # the shortest
        ({"resilient-timeout-ms": "5000", "grpc-timeout": "300m"}, 0.2, 0.3),
        ({"resilient-timeout-ms": "5000", "connect-timeout-ms": "300"}, 0.2, 0.3),
    ],
)
async def test_deadline_headers_and_the_server_maximum(
    headers: dict[str, str], low: float, high: float
) -> None:
    """Every header form is read, the shortest budget wins, and the server maximum clamps it."""
    server = Server(max_deadline=10.0)

    @server.method
    async def left() -> float:
        return resilient.remaining()

    response = await call(server, req("left"), headers)
    assert low < response.json()["result"] <= high


async def test_no_maximum_and_no_header_means_no_deadline() -> None:
    """``max_deadline=inf`` and no header: the handler runs with no deadline at all."""
    server = Server(max_deadline=math.inf)

    @server.method
    async def unbounded() -> bool:
        return math.isinf(resilient.remaining())

    @server.method
    def unbounded_sync() -> bool:
        return math.isinf(resilient.remaining())

    @server.method(run_in_thread=False)
    def unbounded_inline() -> bool:
        return math.isinf(resilient.remaining())

    for name in ("unbounded", "unbounded_sync", "unbounded_inline"):
        assert (await call(server, req(name))).json()["result"] is True
    bounded = await call(server, req("unbounded"), {"grpc-timeout": "5S"})
    assert bounded.json()["result"] is False


@pytest.mark.parametrize(
    "headers",
    [
        {"resilient-timeout-ms": "-5"},
        {"grpc-timeout": "100"},
        {"grpc-timeout": "123456789m"},
        {"connect-timeout-ms": "1.5"},
        {"connect-timeout-ms": "12345678901"},  # more digits than the Connect protocol allows
        {"grpc-timeout": "soon", "resilient-timeout-ms": "500"},  # refused beside a valid one
    ],
)
async def test_malformed_deadline_headers_are_refused(headers: dict[str, str]) -> None:
    """A deadline header that cannot be read is HTTP 400 naming it, not silently ignored."""
    response = await call(vector_server(), req("get_data"), headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600
    name = next(iter(headers))
    assert name in response.json()["error"]["data"]


async def test_an_expired_request_is_rejected_before_dispatch() -> None:
    """0 ms left: -32000 with HTTP 504 (200 in a batch), and the handler never runs."""
    server = Server()
    runs: list[int] = []

    @server.method
    async def work(n: int) -> int:
        runs.append(n)
        return n

    single = await call(server, req("work", [1]), {"resilient-timeout-ms": "0"})
    assert single.status_code == 504
    assert single.json()["error"]["code"] == -32000
    batch = await call(
        server,
        [req("work", [2], id=1), req("work", [3], id=2), {"jsonrpc": "2.0", "method": "work"}],
        {"resilient-timeout-ms": "0"},
    )
    assert batch.status_code == 200
    assert [entry["error"]["code"] for entry in batch.json()] == [-32000, -32000]
    assert runs == []


async def test_a_sync_handler_past_its_deadline_answers_504_at_the_deadline() -> None:
    """A blocking handler cannot be stopped, but the caller is answered at its deadline."""
    server = Server(max_concurrent=1)
    release = threading.Event()

    @server.method
    def blocking() -> str:
        release.wait(5)
        return "late"

    @server.method(run_in_thread=False)
    def quick() -> str:
        return "ok"

    started = time.monotonic()
    response = await call(server, req("blocking"), {"resilient-timeout-ms": "100"})
    assert response.status_code == 504
    assert time.monotonic() - started < 0.5
    # The thread still holds the only slot until it really returns.
    assert (await call(server, req("quick"))).status_code == 503
    release.set()
    for _ in range(100):
        answer = await call(server, req("quick"))
        if answer.status_code == 200:
            break
        await asyncio.sleep(0.01)
    assert answer.json()["result"] == "ok"
    server.close()


async def test_batch_entries_run_concurrently_and_each_gets_the_deadline() -> None:
    """Entries of a batch run at once; an entry past the deadline alone answers -32000."""
    server = Server()

    @server.method
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    started = time.monotonic()
    response = await call(
        server,
        [req("nap", [0.1], id=i) for i in range(5)] + [req("nap", [3], id=9)],
        {"resilient-timeout-ms": "300"},
    )
    took = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert [entry.get("result") for entry in body[:5]] == [0.1] * 5
    assert body[5]["error"]["code"] == -32000
    assert took < 0.5  # five 0.1 s naps at once, the long one stopped at 0.3 s


# Overload and the toolkit's own errors ---------------------------------------------------


async def test_overload_is_shed_at_once_with_503_and_retry_after() -> None:
    """At max_concurrent, the next call gets -32001 + HTTP 503 + Retry-After at once."""
    server = Server(max_concurrent=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    @server.method
    async def hold() -> str:
        entered.set()
        await release.wait()
        return "held"

    transport = httpx.ASGITransport(app=server)
    async with httpx.AsyncClient(transport=transport, base_url="http://rpc") as client:
        first = asyncio.create_task(client.post("/", json=req("hold")))
        await entered.wait()
        started = time.monotonic()
        shed = await client.post("/", json=req("hold", id=2))
        assert time.monotonic() - started < 0.1
        batch = await client.post("/", json=[req("hold", id=3), req("hold", id=4)])
        release.set()
        assert (await first).json()["result"] == "held"
        again = await client.post("/", json=req("hold", id=5))
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["error"]["code"] == -32001
    assert shed.json()["error"]["data"]["retry_after"] == 1.0
    assert batch.status_code == 200
    assert batch.headers["retry-after"] == "1"
    assert [entry["error"]["code"] for entry in batch.json()] == [-32001, -32001]
    assert again.json()["result"] == "held"


@pytest.mark.parametrize(
    ("raised", "code", "status", "retry_after"),
    [
        (CircuitOpenError("db", 2.5), -32002, 503, "3"),
        (CircuitOpenError("db", math.inf), -32002, 503, None),
        (BulkheadFull("db", 4, 0), -32003, 503, None),
        (DeadlineExceeded("inner deadline"), -32000, 504, None),
        (RemoteRateLimited(data={"retry_after": 7}), -32004, 429, "7"),
        (RateLimited("api", 2.2), -32004, 429, "3"),
        (RateLimited("api", math.inf), -32004, 429, None),
        (RemoteError(-32050, "not ours"), -32603, 200, None),
    ],
)
async def test_toolkit_errors_raised_by_handlers_map_to_server_codes(
    raised: Exception, code: int, status: int, retry_after: str | None
) -> None:
    """CircuitOpenError, BulkheadFull, DeadlineExceeded, RateLimited, server errors: their codes."""
    server = Server()

    @server.method
    async def stage() -> None:
        raise raised

    response = await call(server, req("stage"))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.headers.get("retry-after") == retry_after
    if isinstance(raised, RateLimited) and not isinstance(raised, RemoteError):
        assert response.json()["error"]["data"]["limiter"] == "api"


def test_an_adaptive_limit_sheds_and_learns_over_uvicorn(live_asgi: Any) -> None:
    """Server(max_concurrent=AdaptiveLimit): handlers' outcomes move the limit, which sheds.

    A handler that runs out of its deadline is a drop (the limit falls from 2 to 1);
    one that fails with an application error teaches nothing; with the one slot held
    by a sync handler in its worker thread, the next call is shed with -32001, and
    that handler's success, once it returns, lets the limit grow again.
    """
    limit = resilient.adaptive.AdaptiveLimit.aimd(initial_limit=2, min_limit=1, max_limit=4)
    server = Server(max_concurrent=limit)
    entered, release = threading.Event(), threading.Event()

    @server.method
    async def too_slow() -> None:
        raise DeadlineExceeded("the handler's dependency timed out")

    @server.method
    async def wrong() -> None:
        raise ValueError("a bug, not overload")

    @server.method
    def hold() -> str:
        entered.set()
        release.wait(10)
        return "held"

    url = live_asgi(server)
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/", json=req("too_slow")).json()["error"]["code"] == -32000
        assert limit.limit == 1
        assert client.post("/", json=req("wrong")).json()["error"]["code"] == -32603
        assert limit.limit == 1
        held: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: held.append(client.post("/", json=req("hold"))))
        holder.start()
        try:
            assert entered.wait(10)
            shed = client.post("/", json=req("hold", id=2))
        finally:
            release.set()
            holder.join(10)
    assert shed.status_code == 503
    assert shed.json()["error"]["code"] == -32001
    assert "max_concurrent" not in shed.json()["error"]["data"]  # it moves: not announced
    assert held[0].json()["result"] == "held"
    assert limit.limit == 2  # one success with the whole limit in use: +1/limit
    assert server.max_concurrent is limit


# Hostile input -----------------------------------------------------------------------


def test_oversized_bodies_get_413_and_the_server_keeps_serving(live_asgi: Any) -> None:
    """Over max_body_size by Content-Length or streamed: 413 early; the next call works."""
    url = live_asgi(vector_server(max_body_size=10_000))
    big = b'{"jsonrpc":"2.0","method":"echo","params":["' + b"x" * 100_000 + b'"],"id":1}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    with httpx.Client(base_url=url) as client:
        sized = client.post("/", content=big)
        assert sized.status_code == 413
        assert "max_body_size=10000" in sized.json()["error"]["data"]
        streamed = client.post("/", content=chunks())
        assert streamed.status_code == 413
        assert client.post("/", json=req("get_data")).json()["result"] == ["hello", 5]


async def test_streamed_body_is_counted_while_reading() -> None:
    """Without Content-Length the server stops reading at the limit, not at the end."""
    server = Server(max_body_size=100)
    served: list[int] = []
    parts = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 10

    async def receive() -> dict[str, Any]:
        served.append(1)
        return parts[len(served) - 1]

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await server(scope, receive, send)
    assert sent[0]["status"] == 413
    assert len(served) == 2
    ok = [
        {"type": "http.request", "body": b'{"jsonrpc":"2.0",', "more_body": True},
        {"type": "http.request", "body": b'"method":"rpc.discover","id":1}', "more_body": False},
    ]
    sent.clear()

    async def receive_ok() -> dict[str, Any]:
        return ok.pop(0)

    await server(scope, receive_ok, send)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["result"]["openrpc"] == "1.2.6"


@pytest.mark.parametrize("length", [b"x", b"abc", b"-1", b"1e3", b" 12"])
async def test_bad_content_length_is_400_not_413(length: bytes) -> None:
    """A Content-Length that is not digits is a malformed request (400), refused unread."""
    server = Server()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:  # pragma: no cover - never read
        raise AssertionError("the body must not be read")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", length)],
    }
    await server(scope, receive, send)
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == -32600
    assert error["data"] == "Content-Length must be ASCII digits"


async def test_batch_limit_and_deep_batches() -> None:
    """Over max_batch is one -32600; a batch of max_batch with many brackets is fine."""
    server = vector_server()
    over = await call(server, [req("get_data", id=i) for i in range(101)])
    assert over.json()["error"]["code"] == -32600
    assert "max_batch=100" in over.json()["error"]["data"]
    full = await call(server, [req("sum", [i, 1], id=i) for i in range(100)])
    assert [entry["result"] for entry in full.json()] == [i + 1 for i in range(100)]
    deep = await call(server, b"[" * 100_000 + b"]" * 100_000)
    assert deep.json()["error"]["code"] == -32600
    assert "max_depth=32" in deep.json()["error"]["data"]


def test_depth_check_edges() -> None:
    """The depth walk ignores brackets in strings, escaped quotes included."""
    assert not _protocol.depth_over(b'["' + b"[" * 50 + b'\\"' + b"{" * 50 + b'"]', 3)
    assert _protocol.depth_over(b"[[[[1]]]]", 3)
    assert not _protocol.depth_over(b"[[[1]]]" * 5, 3)


async def test_lifespan_and_other_scopes() -> None:
    """Lifespan startup/shutdown complete; websockets are closed; unknown scopes refused."""
    server = Server()
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await server({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    sent.clear()
    inbox.append({"type": "websocket.connect"})
    await server({"type": "websocket", "path": "/"}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1003}]
    with pytest.raises(ValueError, match="serves HTTP"):
        await server({"type": "other"}, receive, send)


# rpc.discover ----------------------------------------------------------------------------


async def test_rpc_discover_describes_the_registered_methods() -> None:
    """An OpenRPC 1.2.6 document with params schemas, required flags and idempotency."""
    server = Server(title="kv", version="1.2")

    @server.method(name="kv.get", idempotent=True)
    async def get(key: str, default: int | None = None) -> int | None:
        """Read a key.

        More words.
        """
        return default

    @server.method
    def move(to: Point, *, speed: float) -> None:
        pass

    document = (await call(server, req("rpc.discover"))).json()["result"]
    assert document["openrpc"] == "1.2.6"
    assert document["info"] == {"title": "kv", "version": "1.2"}
    methods = {method["name"]: method for method in document["methods"]}
    assert set(methods) == {"kv.get", "move"}
    assert methods["kv.get"]["params"] == [
        {"name": "key", "required": True, "schema": {"type": "string"}},
        {
            "name": "default",
            "required": False,
            "schema": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
    ]
    assert methods["kv.get"]["x-idempotent"] is True
    assert methods["kv.get"]["description"] == "Read a key."
    assert methods["kv.get"]["paramStructure"] == "either"
    assert methods["move"]["paramStructure"] == "by-name"
    assert methods["move"]["params"][0]["schema"] == {"$ref": "#/components/schemas/Point"}
    assert document["components"]["schemas"]["Point"]["required"] == ["x", "y"]
    assert methods["move"]["result"]["schema"] == {"type": "null"}

    @server.method
    def later() -> None:
        pass

    again = (await call(server, req("rpc.discover"))).json()["result"]
    assert "later" in {method["name"] for method in again["methods"]}


# OpenTelemetry -----------------------------------------------------------------------------


async def test_server_spans_follow_the_rpc_conventions_and_the_callers_trace(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A SERVER span per call, continuing traceparent, with error codes on failures."""
    server = Server(tracer_provider=tracer_provider)

    @server.method
    async def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    @server.method
    async def broken() -> None:
        raise RuntimeError("no")

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    parent = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    await call(server, req("subtract", [3, 1], id="a"), parent)
    await call(server, [req("broken", id=7), req("subtract", ["x"], id=8)])
    spans = {
        span.name + str(attributes(span).get("rpc.jsonrpc.request_id")): span
        for span in exporter.get_finished_spans()
    }
    ok = spans["subtracta"]
    assert ok.kind is SpanKind.SERVER
    assert format(ok.context.trace_id, "032x") == trace_id
    assert attributes(ok) == {
        "rpc.system": "jsonrpc",
        "rpc.method": "subtract",
        "rpc.jsonrpc.version": "2.0",
        "rpc.jsonrpc.request_id": "a",
    }
    failed = spans["broken7"]
    assert attributes(failed)["rpc.jsonrpc.error_code"] == -32603
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    assert attributes(spans["subtract8"])["rpc.jsonrpc.error_code"] == -32602
    assert len(exporter.get_finished_spans()) == 3


async def test_no_span_work_without_a_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no SDK provider configured the traced path is never entered."""
    server = vector_server()

    async def traced(*args: Any) -> Any:  # pragma: no cover - must not run
        raise AssertionError("traced without a provider")

    monkeypatch.setattr(server, "_traced", traced)
    assert (await call(server, req("subtract", [2, 1]))).json()["result"] == 1


async def test_a_noop_provider_records_nothing() -> None:
    """An explicit no-op provider is honoured: calls are answered, no span path taken."""
    from opentelemetry.trace import NoOpTracerProvider

    server = Server(tracer_provider=NoOpTracerProvider())

    @server.method
    async def one() -> int:
        return 1

    assert (await call(server, req("one"))).json()["result"] == 1


async def test_notifications_get_spans_without_a_request_id(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A notification is traced too, with no rpc.jsonrpc.request_id."""
    server = Server(tracer_provider=tracer_provider)

    @server.method
    async def ping() -> None:
        pass

    response = await call(server, {"jsonrpc": "2.0", "method": "ping"})
    assert response.status_code == 204
    (span,) = exporter.get_finished_spans()
    assert "rpc.jsonrpc.request_id" not in attributes(span)
    assert attributes(span)["rpc.method"] == "ping"


async def test_a_failed_thread_hand_off_frees_the_slot() -> None:
    """If the worker pool refuses the call, the answer is -32603 and the slot comes back."""
    import concurrent.futures

    server = Server(max_concurrent=1)

    @server.method
    def work() -> str:
        return "done"

    closed = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    server._executor = closed
    assert (await call(server, req("work"))).json()["error"]["code"] == -32603
    server.close()
    assert (await call(server, req("work"))).json()["result"] == "done"
    server.close()


async def test_a_cancelled_request_is_not_answered_and_frees_its_slot() -> None:
    """Cancelling the ASGI task (client gone, shutdown) propagates; the slot is freed."""
    server = Server(max_concurrent=1)
    entered = asyncio.Event()

    @server.method
    async def hang() -> None:
        entered.set()
        await asyncio.sleep(10)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(req("hang")).encode()}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    task = asyncio.create_task(server(scope, receive, send))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == []
    entered.clear()
    second = asyncio.create_task(server(scope, receive, send))
    await entered.wait()  # it got the slot
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_a_cancelled_batch_cancels_the_entries_still_running() -> None:
    """Cancelling a batch while an entry waits cancels the later entries' tasks too."""
    server = Server()
    entered: list[str] = []
    cancelled: list[str] = []

    @server.method
    async def hang(name: str) -> None:
        entered.append(name)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    @server.method
    async def quick() -> int:
        return 1

    batch = [req("quick", id=1), req("hang", ["a"], id=2), req("hang", ["b"], id=3)]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(batch).encode()}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"a cancelled batch sent {message}")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    task = asyncio.create_task(server(scope, receive, send))
    while len(entered) < 2:  # both waiting entries are running at once
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert sorted(cancelled) == ["a", "b"]


async def test_discover_document_is_cached_until_a_registration() -> None:
    """rpc.discover builds its document once, and again after a new method."""
    server = vector_server()
    first = (await call(server, req("rpc.discover"))).json()["result"]
    assert (await call(server, req("rpc.discover"))).json()["result"] == first
    assert server._document is not None


# resilient.rpc.errors ---------------------------------------------------------------------


def test_remote_errors_validate_print_and_pickle() -> None:
    """RemoteError checks its fields, prints code and data, pickles to the class of its code."""
    import pickle

    from resilient.rpc.errors import InvalidParams, Overloaded, error_for

    with pytest.raises(TypeError, match="code must be an int"):
        RemoteError(True, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="message must be a str"):
        RemoteError(1, 2)  # type: ignore[arg-type]
    assert str(RemoteError(7, "nope")) == "nope (JSON-RPC error 7)"
    assert str(RemoteError(7, "nope", [1])) == "nope (JSON-RPC error 7): [1]"
    copy = pickle.loads(pickle.dumps(Overloaded(data={"retry_after": 2})))
    assert isinstance(copy, Overloaded)
    assert copy.retry_after == 2.0
    assert isinstance(error_for(-32602, "Invalid params"), InvalidParams)
    unknown = error_for(12, "mine", {"a": 1})
    assert type(unknown) is RemoteError
    assert (unknown.code, unknown.data) == (12, {"a": 1})


async def test_a_handler_may_catch_the_deadline_and_answer() -> None:
    """A handler that catches its cancellation at the deadline and returns is answered."""
    server = Server()

    @server.method
    async def careful() -> str:
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            return "partial"
        return "whole"  # pragma: no cover - the deadline comes first

    response = await call(server, req("careful"), {"resilient-timeout-ms": "50"})
    assert response.json()["result"] == "partial"


async def test_closing_a_suspended_call_closes_the_handler() -> None:
    """If the server's await is closed (its task dropped), the handler's finally runs."""
    from resilient.rpc.server import _until

    cleaned = []

    async def handler() -> None:
        try:
            await asyncio.sleep(1)
        finally:
            cleaned.append(True)

    waiting = _until(handler(), time.monotonic() + 5)
    waiting.send(None)  # runs up to the handler's first suspension
    waiting.close()
    assert cleaned == [True]


async def test_an_object_with_async_call_is_an_async_handler() -> None:
    """A callable object whose __call__ is async is awaited on the loop, not threaded."""
    server = Server()

    class Doubler:
        async def __call__(self, n: int) -> int:
            await asyncio.sleep(0)
            return 2 * n

    server.method(name="double")(Doubler())
    response = await call(server, req("double", [21]), {"resilient-timeout-ms": "1000"})
    assert response.json()["result"] == 42


# Defects found in review -------------------------------------------------------------------

MIB = 1 << 20


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 40 + b'"' + b'\\"' * ((MIB - 41) // 2),  # one unclosed string of escapes
        b'["' * (MIB // 2),  # a quote after every bracket, the last unclosed
        b'"\\' * (MIB // 2),  # alternating quotes and backslashes
        b"[" * 40 + b'"' + b'\\"' * ((MIB - 42) // 2) + b"\\",  # ending in a lone backslash
        b'["' + b"\\\\" * (MIB // 2),  # backslash pairs to the end
    ],
    ids=["escaped-quotes", "bracket-quote", "quote-backslash", "lone-backslash", "backslashes"],
)
def test_the_depth_check_is_linear_for_hostile_strings(body: bytes) -> None:
    """1 MiB bodies built to make the string scan quadratic parse in well under a second."""
    started = time.perf_counter()
    answer = _protocol.parse(body, max_depth=32, max_batch=100)
    assert time.perf_counter() - started < 2.0  # a generous guard: quadratic took minutes
    assert answer == _protocol.PARSE_ERROR


@pytest.mark.parametrize(
    "body",
    [b"[" * 200, b"[" * MIB, b'{"a":' * 1000, b"[" * 100 + b'"]]]', b"]" * 100 + b"[" * 99],
)
def test_unbalanced_deep_brackets_are_a_parse_error_not_too_deep(body: bytes) -> None:
    """Brackets that never close (or close too often) are not JSON: -32700, not -32600."""
    assert not _protocol.depth_over(body, 32)
    assert _protocol.parse(body, max_depth=32, max_batch=100) == _protocol.PARSE_ERROR
    assert _protocol.depth_over(b"[" * 40 + b"]" * 40, 32)  # closed, it is too deep


async def test_an_id_out_of_float_range_in_a_bad_request_is_an_invalid_request() -> None:
    """A bad request whose id msgspec cannot decode is -32600 (batch: that entry), not a 500."""
    server = vector_server()
    bad = b'{"jsonrpc":"1.0","method":"x","id":1e400}'
    single = (await call(server, bad)).json()
    batch = await call(server, b"[" + bad + b"," + json.dumps(req("get_data")).encode() + b"]")
    assert batch.status_code == 200
    first, second = batch.json()
    for answer in (single, first):
        assert answer["error"]["code"] == -32600
        assert answer["error"]["data"].startswith("not a valid JSON-RPC 2.0 request object: ")
        assert "out of range" in answer["error"]["data"]
        assert answer["id"] is None
    assert second["result"] == ["hello", 5]


async def test_a_duplicate_member_is_reported_with_the_decoders_reason() -> None:
    """{"jsonrpc":1,"jsonrpc":"2.0",...} says what the strict decoder refused, not a guess."""
    body = b'{"jsonrpc":1,"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":1}'
    answer = (await call(vector_server(), body)).json()
    assert answer["error"]["code"] == -32600
    data = answer["error"]["data"]
    assert data.startswith("not a valid JSON-RPC 2.0 request object: ")
    assert "`$.jsonrpc`" in data
    assert "method" not in data
    assert answer["id"] == 1


async def test_an_unknown_param_named_missing_is_unexpected() -> None:
    """Classification goes by the signature's names, not by words in msgspec's message."""
    server = Server()

    @server.method(run_in_thread=False)
    def pair(a: int, b: int = 0) -> int:
        return a + b

    unknown = (await call(server, req("pair", {"a": 1, "missing": 2}))).json()["error"]
    assert unknown["data"] == {"param": "missing", "reason": "unexpected: no such parameter"}
    absent = (await call(server, req("pair", {"b": 1}))).json()["error"]
    assert absent["data"] == {"param": "a", "reason": "missing"}
    too_few = (await call(server, req("pair", []))).json()["error"]
    assert too_few["data"] == {"param": "a", "reason": "missing"}
    wrong = (await call(server, req("pair", [1, "x"]))).json()["error"]
    assert wrong["data"] == {"param": "b", "reason": "Expected `int`, got `str`"}


class Opaque:
    """A plain class: msgspec has no way to decode or describe it."""


class Tree(msgspec.Struct):
    """A recursive Struct: the registration check must not walk it forever."""

    children: list[Tree] = []


@pytest.mark.parametrize(
    ("annotation", "shown"),
    [
        (Opaque, "x: Opaque"),
        (Callable[[int], int], "x: collections.abc.Callable[[int], int]"),
        (list[Opaque], "x: list[test_rpc_server.Opaque]"),
        (dict[str, msgspec.msgpack.Ext], "x: dict[str, msgspec.msgpack.Ext]"),
    ],
)
def test_parameter_types_msgspec_cannot_decode_are_refused_at_registration(
    annotation: Any, shown: str
) -> None:
    """Not every call -32602 blaming the caller: a TypeError naming parameter and type."""
    server = Server()

    def handler(x: Any) -> int:
        return 1

    handler.__annotations__ = {"x": annotation, "return": int}
    with pytest.raises(TypeError, match="msgspec cannot decode") as refused:
        server.method(handler)
    assert shown in str(refused.value)
    assert "'handler'" in str(refused.value)


async def test_types_without_a_schema_do_not_break_rpc_discover() -> None:
    """``object`` params and returns msgspec cannot describe get ``{}``; discover answers.

    Recursive Structs register and decode.
    """
    server = Server()

    @server.method(run_in_thread=False)
    def anything(x: object, items: list[object]) -> Opaque:
        return Opaque()

    @server.method(run_in_thread=False)
    def loose() -> object:
        return 1

    @server.method(run_in_thread=False)
    def size(tree: Tree) -> int:
        return 1 + sum(size(child) for child in tree.children)

    answer = await call(server, req("rpc.discover"))
    methods = {method["name"]: method for method in answer.json()["result"]["methods"]}
    assert [param["schema"] for param in methods["anything"]["params"]] == [{}, {}]
    assert methods["anything"]["result"]["schema"] == {}
    assert methods["loose"]["result"]["schema"] == {}
    assert (await call(server, req("anything", [1, [2]]))).json()["error"]["code"] == -32603
    assert (await call(server, req("loose"))).json()["result"] == 1
    tree = {"children": [{"children": []}, {"children": [{}]}]}
    assert (await call(server, req("size", [tree]))).json()["result"] == 4


async def test_error_data_that_cannot_be_encoded_is_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RemoteError(data=object()) answers -32603 and is logged; in a batch, that entry only."""
    server = Server()

    @server.method
    def bad() -> None:
        raise RemoteError(5, "x", data=object())

    with caplog.at_level(logging.ERROR, logger="resilient.rpc"):
        single = await call(server, req("bad"))
        batch = await call(server, [req("bad", id=1), req("rpc.discover", id=2)])
        notification = await call(server, {"jsonrpc": "2.0", "method": "bad"})
    assert single.json()["error"] == {"code": -32603, "message": "Internal error"}
    first, second = batch.json()
    assert first == {"jsonrpc": "2.0", "error": single.json()["error"], "id": 1}
    assert second["result"]["openrpc"] == "1.2.6"
    assert notification.status_code == 204
    assert any("cannot be encoded" in record.getMessage() for record in caplog.records)


async def test_error_data_that_cannot_be_encoded_is_an_internal_error_in_a_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The traced path answers the same, and its span carries -32603, not the lost code."""
    server = Server(tracer_provider=tracer_provider)

    @server.method
    async def bad() -> None:
        raise RemoteError(5, "x", data=object())

    answer = await call(server, req("bad"))
    assert answer.json()["error"]["code"] == -32603
    (span,) = exporter.get_finished_spans()
    assert attributes(span)["rpc.jsonrpc.error_code"] == -32603


async def test_a_handler_raising_cancelled_error_itself_is_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Awaiting a future another task cancelled is the handler's failure, not the request's."""
    server = Server()

    @server.method
    async def awaits_cancelled() -> int:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        return await future  # type: ignore[no-any-return]

    @server.method(run_in_thread=False)
    def raises_cancelled() -> int:
        raise asyncio.CancelledError

    @server.method
    async def ok() -> int:
        await asyncio.sleep(0)
        return 1

    internal = {"code": -32603, "message": "Internal error"}
    with caplog.at_level(logging.ERROR, logger="resilient.rpc"):
        for headers in ({}, {"resilient-timeout-ms": "1000"}):
            single = await call(server, req("awaits_cancelled"), headers)
            assert single.json()["error"] == internal
            batch = await call(
                server,
                [req("ok", id=1), req("awaits_cancelled", id=2), req("raises_cancelled", id=3)],
                headers,
            )
            assert [entry.get("result", entry.get("error")) for entry in batch.json()] == [
                1,
                internal,
                internal,
            ]
    assert any("CancelledError" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("stop", [SystemExit(3), KeyboardInterrupt()], ids=repr)
async def test_sys_exit_in_a_threaded_handler_does_not_stop_the_server(
    stop: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """SystemExit / KeyboardInterrupt raised in a worker thread answer -32603 and are logged."""
    server = Server()

    @server.method
    def leave() -> None:
        raise stop

    @server.method
    def fine() -> int:
        return 1

    with caplog.at_level(logging.ERROR, logger="resilient.rpc"):
        for headers in ({}, {"resilient-timeout-ms": "1000"}):
            answer = await call(server, req("leave"), headers)
            assert answer.json()["error"] == {"code": -32603, "message": "Internal error"}
    assert (await call(server, req("fine"))).json()["result"] == 1
    assert any(f"raised {type(stop).__name__}" in str(record.exc_info) for record in caplog.records)
    server.close()


async def test_mounted_under_starlette_it_serves_under_the_mount() -> None:
    """Starlette's Mount keeps the prefix in path and sets root_path; the server strips it."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/rpc", app=vector_server())])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rpc") as client:
        mounted = await client.post("/rpc/", json=req("get_data"))
        elsewhere = await client.post("/rpc/other", json=req("get_data"))
    assert mounted.status_code == 200
    assert mounted.json()["result"] == ["hello", 5]
    assert elsewhere.status_code == 404


@pytest.mark.parametrize(
    ("path", "root_path", "status"),
    [
        ("/", "/rpc", 200),  # a router that strips the prefix
        ("/rpc", "/rpc", 200),  # the mount point itself
        ("/rpc/", "/rpc", 200),
        ("/api/v1/", "/api/v1", 200),
        ("/rpcx", "/rpc", 404),
        ("/other/", "/rpc", 404),
        ("/rpc/", "", 404),
    ],
)
async def test_the_path_is_compared_below_root_path(path: str, root_path: str, status: int) -> None:
    """Both ASGI forms of a mounted app's path: with the root_path prefix and without."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(req("get_data")).encode()}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "headers": []}
    await vector_server()(scope, receive, send)
    assert sent[0]["status"] == status
