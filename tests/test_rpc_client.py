"""resilient.rpc.client: requests built, answers checked strictly, errors typed, retries safe.

The unit tests answer through ``httpx.MockTransport`` (wrapped in the resilient
transport where retries or breakers matter); the integration tests at the end run
against the real server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from rpc_live import serve

from resilient.breaker import CircuitBreaker
from resilient.deadline import DEADLINE_HEADER, deadline, remaining
from resilient.errors import DeadlineExceeded, RateLimited
from resilient.retry import Retry
from resilient.rpc.client import AsyncClient, Client, Method, Pending, Proxy
from resilient.rpc.errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    Overloaded,
    ParseError,
    ProtocolError,
    RemoteBulkheadFull,
    RemoteCircuitOpen,
    RemoteDeadlineExceeded,
    RemoteError,
    RemoteRateLimited,
)
from resilient.rpc.server import Server
from resilient.transport import AsyncResilientTransport, ResilientTransport

URL = "http://rpc.test/"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def waits(record_waits: list[float]) -> list[float]:
    """Retry waits are recorded, not slept."""
    return record_waits


class Recorder:
    """A MockTransport handler: answers each request with ``answer(body)``; keeps requests."""

    def __init__(self, answer: Callable[[Any], httpx.Response] | None = None) -> None:
        self.answer = answer or echo
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(json.loads(request.content))

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(request.content) for request in self.requests]


def echo(body: Any) -> httpx.Response:
    """A tiny server: a call's result is its params; notifications get 204."""
    if isinstance(body, list):
        answers = [
            {"jsonrpc": "2.0", "result": entry.get("params"), "id": entry["id"]}
            for entry in body
            if "id" in entry
        ]
        return httpx.Response(200, json=answers) if answers else httpx.Response(204)
    if "id" not in body:
        return httpx.Response(204)
    return httpx.Response(
        200, json={"jsonrpc": "2.0", "result": body.get("params"), "id": body["id"]}
    )


def replying(status: int, payload: Any = None, *, content: bytes | None = None) -> Handler:
    """A handler answering every request with ``payload`` (``"ID"`` becomes the request's id)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content)
        sent = json.loads(request.content)
        text = json.dumps(payload).replace('"ID"', json.dumps(sent.get("id")))
        return httpx.Response(status, content=text.encode())

    return answer


def client_for(handler: Handler, **options: Any) -> Client:
    return Client(URL, transport=httpx.MockTransport(handler), **options)


def error_reply(code: int, message: str = "m", data: Any = None, id: Any = "ID") -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": id}


# Requests -----------------------------------------------------------------------------------


def test_positional_and_named_params_become_an_array_and_an_object() -> None:
    """call(m, 42, 23) sends params [42, 23]; call(m, a=..) an object; no params, no member."""
    recorder = Recorder()
    with client_for(recorder) as client:
        assert client.call("subtract", 42, 23) == [42, 23]
        assert client.call("subtract", minuend=42, subtrahend=23) == {
            "minuend": 42,
            "subtrahend": 23,
        }
        assert client.call("ping") is None
    first, second, third = recorder.bodies
    assert first == {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}
    assert second["params"] == {"minuend": 42, "subtrahend": 23}
    assert "params" not in third
    assert [first["id"], second["id"], third["id"]] == [1, 2, 3]
    assert recorder.requests[0].method == "POST"
    assert recorder.requests[0].headers["content-type"] == "application/json"


def test_a_keyword_named_like_an_option_is_still_a_param() -> None:
    """No keyword of call() is the client's: idempotent=, method=, timeout= all go to the server."""
    recorder = Recorder()
    with client_for(recorder) as client:
        client.call("m", idempotent=True, timeout=3, method="x")
    assert recorder.bodies[0]["params"] == {"idempotent": True, "timeout": 3, "method": "x"}
    assert "resilient" not in recorder.requests[0].extensions


def test_mixing_positional_and_named_params_is_a_type_error_naming_the_rule() -> None:
    """JSON-RPC params are an array or an object: both at once cannot be sent."""
    recorder = Recorder()
    with client_for(recorder) as client, pytest.raises(TypeError, match="either positional"):
        client.call("subtract", 42, subtrahend=23)
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("method", "error", "match"),
    [(42, TypeError, "method must be a str, got int"), ("", ValueError, "non-empty")],
)
def test_a_method_that_is_not_a_name_is_refused(
    method: Any, error: type[Exception], match: str
) -> None:
    """A method must be a non-empty str; nothing is sent otherwise."""
    with client_for(Recorder()) as client, pytest.raises(error, match=match):
        client.call(method)


def test_an_unencodable_param_is_a_type_error_naming_it() -> None:
    """msgspec's error is wrapped in a TypeError that says which param (by name or position)."""
    with client_for(Recorder()) as client:
        with pytest.raises(TypeError, match=r"param 'when' of 'm' is not JSON-encodable") as named:
            client.call("m", ok=1, when=object())
        assert isinstance(named.value.__cause__, TypeError)
        with pytest.raises(TypeError, match=r"positional param #1 of 'm'"):
            client.call("m", 1, {(1, 2): "tuple key"})
        with pytest.raises(TypeError, match=r"positional param #0 of 'n'"):
            client.notify("n", object())


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://rpc.test/", ValueError),
        ("/relative", ValueError),
        ("http:///no-host", ValueError),
        (b"http://rpc.test/", TypeError),
        (None, TypeError),
    ],
)
def test_a_url_that_is_not_http_is_refused(url: Any, error: type[Exception]) -> None:
    """Only absolute http:// and https:// URLs are endpoints."""
    with pytest.raises(error, match="url must be"):
        Client(url)
    with pytest.raises(error, match="url must be"):
        AsyncClient(url)


def test_an_httpx_url_is_accepted() -> None:
    """url may be an httpx.URL; https works as http."""
    client = Client(httpx.URL("https://rpc.test/api"))
    assert client.url == "https://rpc.test/api"
    assert repr(client) == "<resilient.rpc.Client 'https://rpc.test/api'>"
    client.close()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"idempotent": "kv.get"}, TypeError, "collection of method names"),
        ({"idempotent": [1]}, TypeError, "collection of method names"),
        ({"timeout": -1}, ValueError, "timeout must not be negative"),
        ({"timeout": 0}, ValueError, "timeout must be greater than zero"),
        ({"timeout": "1"}, TypeError, "timeout must be seconds"),
        ({"transport": object()}, TypeError, "transport must be an httpx"),
    ],
)
def test_bad_options_are_refused_naming_them(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Configuration is checked at construction, for both clients."""
    with pytest.raises(error, match=match):
        Client(URL, **options)
    with pytest.raises(error, match=match):
        AsyncClient(URL, **options)


def test_the_wrong_kind_of_transport_is_refused() -> None:
    """A sync transport cannot serve the async client, nor the other way round."""
    with pytest.raises(TypeError, match=r"httpx\.BaseTransport or an httpx\.Client"):
        Client(URL, transport=httpx.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"httpx\.AsyncBaseTransport or an httpx\.AsyncClient"):
        AsyncClient(URL, transport=httpx.Client())  # type: ignore[arg-type]


def test_transport_options_with_a_transport_given_are_refused() -> None:
    """retry=/breaker=/bulkhead= shape the transport the client builds, not one passed in."""
    with pytest.raises(TypeError, match=r"\['retry'\] configure the transport the client builds"):
        Client(URL, retry=None, transport=httpx.MockTransport(echo))
    with pytest.raises(TypeError, match=r"\['breaker', 'bulkhead'\]"):
        AsyncClient(URL, breaker=None, bulkhead=None, transport=httpx.MockTransport(echo))


def test_the_built_transport_takes_the_options() -> None:
    """With no transport given, the client builds a ResilientTransport with the options."""
    client = Client(URL, retry=None, breaker=None)
    transport = client._http._transport
    assert isinstance(transport, ResilientTransport)
    assert transport.origins() == {}
    client.close()


def test_extra_headers_are_sent() -> None:
    """headers= goes with every request, beside the JSON content type."""
    recorder = Recorder()
    with client_for(recorder, headers={"authorization": "Bearer t"}) as client:
        client.call("m")
    assert recorder.requests[0].headers["authorization"] == "Bearer t"
    assert recorder.requests[0].headers["accept"] == "application/json"
    # The default timeout of 10 s is a deadline, sent to the server.
    assert 9000 < int(recorder.requests[0].headers[DEADLINE_HEADER]) <= 10_000


# The deadline on the wire ------------------------------------------------------------------


def test_the_remaining_deadline_is_sent_with_each_call() -> None:
    """Under deadline(2), the header holds at most 2000 ms; timeout= bounds it when shorter."""
    recorder = Recorder()
    with client_for(recorder, timeout=None) as client:
        client.call("m")
        with deadline(2.0):
            client.call("m")
    with client_for(recorder, timeout=0.5) as client:
        client.call("m")
    no_deadline, under_two, under_half = recorder.requests
    assert DEADLINE_HEADER not in no_deadline.headers
    assert 1500 < int(under_two.headers[DEADLINE_HEADER]) <= 2000
    assert 0 < int(under_half.headers[DEADLINE_HEADER]) <= 500


def test_a_passed_deadline_sends_nothing() -> None:
    """A call made after the deadline raises DeadlineExceeded without a request."""
    recorder = Recorder()
    with client_for(recorder) as client, deadline(0.0), pytest.raises(DeadlineExceeded):
        client.call("m")
    assert recorder.requests == []


def test_the_resilient_transport_refreshes_the_header_on_each_attempt(waits: list[float]) -> None:
    """A retried idempotent call sends the budget left at each attempt, not the first one's."""
    recorder = Recorder(
        lambda body: httpx.Response(503) if len(recorder.requests) == 1 else echo(body)
    )
    transport = ResilientTransport(httpx.MockTransport(recorder), propagate_deadline=True)
    with Client(URL, transport=transport, idempotent={"kv.get"}) as client:
        assert client.call("kv.get", "k") == ["k"]
    assert len(recorder.requests) == 2
    first, second = (int(request.headers[DEADLINE_HEADER]) for request in recorder.requests)
    assert second <= first <= 10_000


# Answers checked strictly --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (200, b"not json", r"HTTP 200 OK from http://rpc.test/: the body is not JSON"),
        (200, b"", "the body is not JSON"),
        (200, b"[1, 2]", "must be a JSON object"),
        (200, b"42", "must be a JSON object"),
        (200, b'{"jsonrpc": "1.0", "result": 1, "id": 1}', '"jsonrpc" member is not "2.0"'),
        (200, b'{"result": 1, "id": 1}', '"jsonrpc" member is not "2.0"'),
        (200, b'{"jsonrpc": 2.0, "result": 1, "id": 1}', '"jsonrpc" member is not "2.0"'),
        (200, b'{"jsonrpc": "2.0", "result": 1}', 'has no "id" member'),
        (200, b'{"jsonrpc": "2.0", "id": 1}', 'exactly one of "result" and "error"'),
        (
            200,
            b'{"jsonrpc": "2.0", "result": 1, "error": {"code": 1, "message": "m"}, "id": 1}',
            'exactly one of "result" and "error"',
        ),
        (200, b'{"jsonrpc": "2.0", "error": "boom", "id": 1}', "an integer code and a message"),
        (
            200,
            b'{"jsonrpc": "2.0", "error": {"code": "1", "message": "m"}, "id": 1}',
            "integer code",
        ),
        (
            200,
            b'{"jsonrpc": "2.0", "error": {"code": true, "message": "m"}, "id": 1}',
            "integer code",
        ),
        (
            200,
            b'{"jsonrpc": "2.0", "error": {"code": 1.0, "message": "m"}, "id": 1}',
            "integer code",
        ),
        (200, b'{"jsonrpc": "2.0", "error": {"code": 1}, "id": 1}', "integer code and a message"),
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": 2}', "id 2 is not the request's 1"),
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": "1"}', "id '1' is not the request's 1"),
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": true}', "id True is not the request's 1"),
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": 1.0}', "id 1.0 is not the request's 1"),
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": null}', "id None is not the request's 1"),
        (
            200,
            b'{"jsonrpc": "2.0", "error": {"code": 1, "message": "m"}, "id": 7}',
            "id 7 is not the request's 1",
        ),
        (
            500,
            b'{"jsonrpc": "2.0", "result": 1, "id": 1}',
            "HTTP 500 .*a result came with a failing",
        ),
        (502, b"<html>Bad Gateway</html>", r"HTTP 502 Bad Gateway .*body: b'<html>Bad Gateway"),
        (503, b"upstream overloaded", r"HTTP 503 Service Unavailable .*not JSON"),
        (413, b"", r"HTTP 413 .*not JSON"),
    ],
)
def test_an_answer_that_is_not_json_rpc_is_a_protocol_error(
    status: int, body: bytes, match: str
) -> None:
    """Each way an answer can break the specification gets a ProtocolError saying which."""
    with (
        client_for(replying(status, content=body)) as client,
        pytest.raises(ProtocolError, match=match) as caught,
    ):
        client.call("m")
    assert f"HTTP {status}" in str(caught.value)


DEEP_BODIES = [
    pytest.param(b"[" * 200_000, id="unterminated"),
    pytest.param(b"[" * 5_000 + b"]" * 5_000, id="valid-but-5000-deep"),
]


@pytest.mark.parametrize("body", DEEP_BODIES)
def test_a_deeply_nested_answer_is_a_protocol_error_not_a_recursion_error(body: bytes) -> None:
    """A body nested past the decoder's stack fails the call, the batch and the notification."""
    with client_for(replying(200, content=body)) as client:
        with pytest.raises(ProtocolError, match=r"HTTP 200 OK .*nested too deeply"):
            client.call("m")
        with pytest.raises(ProtocolError, match="nested too deeply"):
            client.notify("n")
        pending: list[Pending] = []
        with pytest.raises(ProtocolError, match="nested too deeply"):
            send_batch(client, pending, "a", "b")
        with pytest.raises(ProtocolError, match="nested too deeply"):
            pending[1].result()


def test_a_long_body_is_quoted_only_in_part() -> None:
    """The ProtocolError quotes the first 200 bytes of a long body and says there was more."""
    body = b"x" * 5000
    with client_for(replying(502, content=body)) as client, pytest.raises(ProtocolError) as caught:
        client.call("m")
    message = str(caught.value)
    assert message.endswith("...")
    assert "x" * 200 in message
    assert "x" * 201 not in message


def test_members_beyond_the_specification_are_ignored() -> None:
    """A response with an extra member still gives its result (forward compatible)."""
    payload = {"jsonrpc": "2.0", "result": 19, "id": "ID", "server": "x"}
    with client_for(replying(200, payload)) as client:
        assert client.call("subtract", 42, 23) == 19


def test_null_and_falsy_results_are_results() -> None:
    """A result of null, 0, false or "" is returned as such, not taken as missing."""
    values: list[Any] = [None, 0, False, "", [], {}]
    for value in values:
        payload = {"jsonrpc": "2.0", "result": value, "id": "ID"}
        with client_for(replying(200, payload)) as client:
            assert client.call("m") == value


# Errors typed by code ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (-32700, ParseError),
        (-32600, InvalidRequest),
        (-32601, MethodNotFound),
        (-32602, InvalidParams),
        (-32603, InternalError),
        (-32000, RemoteDeadlineExceeded),
        (-32001, Overloaded),
        (-32002, RemoteCircuitOpen),
        (-32003, RemoteBulkheadFull),
        (-32004, RemoteRateLimited),
        (42, RemoteError),
        (-32099, RemoteError),
    ],
)
def test_an_error_object_raises_the_class_of_its_code(code: int, cls: type[RemoteError]) -> None:
    """error_for picks the class; code, message and data are kept."""
    reply = error_reply(code, "went wrong", data={"why": "because"})
    with client_for(replying(200, reply)) as client, pytest.raises(RemoteError) as caught:
        client.call("m")
    assert type(caught.value) is cls
    assert (caught.value.code, caught.value.message) == (code, "went wrong")
    assert caught.value.data == {"why": "because"}


def test_a_remote_deadline_is_caught_as_a_deadline_exceeded() -> None:
    """except resilient.DeadlineExceeded catches the server's deadline error too."""
    reply = error_reply(-32000, "Deadline exceeded")
    with client_for(replying(504, reply)) as client, pytest.raises(DeadlineExceeded) as caught:
        client.call("slow")
    assert isinstance(caught.value, RemoteDeadlineExceeded)
    assert isinstance(caught.value, TimeoutError)


def test_a_remote_rate_limit_is_caught_as_a_rate_limited() -> None:
    """except resilient.RateLimited catches the server's -32004 too, with its retry_after."""
    reply = error_reply(-32004, "Rate limited", data={"limiter": "api", "retry_after": 1.5})
    with client_for(replying(429, reply)) as client, pytest.raises(RateLimited) as caught:
        client.call("busy")
    assert isinstance(caught.value, RemoteRateLimited)
    assert (caught.value.retry_after, caught.value.name) == (1.5, "api")
    assert "Rate limited (JSON-RPC error -32004)" in str(caught.value)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), copy.retry_after, copy.name) == (RemoteRateLimited, 1.5, "api")
    assert RemoteRateLimited().name == "remote"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (413, -32600, InvalidRequest),
        (415, -32600, InvalidRequest),
        (429, -32004, RemoteRateLimited),
        (503, -32001, Overloaded),
        (503, -32002, RemoteCircuitOpen),
        (504, -32000, RemoteDeadlineExceeded),
        (400, -32700, ParseError),
    ],
)
def test_an_error_object_is_read_whatever_the_http_status(
    status: int, code: int, cls: type[RemoteError]
) -> None:
    """The server answers its own errors with 413/415/429/503/504; the typed error still comes."""
    reply = error_reply(code, "refused", data={"retry_after": 2}, id=None)
    with client_for(replying(status, reply)) as client, pytest.raises(cls) as caught:
        client.call("m")
    if hasattr(caught.value, "retry_after"):
        assert caught.value.retry_after == 2.0


def test_an_error_with_the_request_id_is_raised() -> None:
    """The usual case: the error echoes the id."""
    reply = error_reply(-32602, "Invalid params", data="x")
    with client_for(replying(200, reply)) as client, pytest.raises(InvalidParams, match="params"):
        client.call("m", 1)


# Notifications --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202, 204])
def test_a_notification_has_no_id_and_takes_an_empty_answer(status: int) -> None:
    """notify() sends no id and returns None on an empty 2xx answer."""
    recorder = Recorder(lambda body: httpx.Response(status))
    with client_for(recorder) as client:
        client.notify("update", 1, 2)
        client.notify("update", a=1)
    assert recorder.bodies == [
        {"jsonrpc": "2.0", "method": "update", "params": [1, 2]},
        {"jsonrpc": "2.0", "method": "update", "params": {"a": 1}},
    ]


def test_a_notification_refused_by_the_server_raises_its_error() -> None:
    """A shed notification (503 with an error object) was not delivered: the caller learns so."""
    reply = error_reply(-32001, id=None)
    with client_for(replying(503, reply)) as client, pytest.raises(Overloaded):
        client.notify("update")


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": null}', "notifications get no response"),
        (500, b"", r"HTTP 500 .*not JSON"),
        (200, b"ok", "not JSON"),
    ],
)
def test_a_notification_answered_otherwise_is_a_protocol_error(
    status: int, body: bytes, match: str
) -> None:
    """Anything but an empty 2xx or an error object breaks the protocol."""
    with (
        client_for(replying(status, content=body)) as client,
        pytest.raises(ProtocolError, match=match),
    ):
        client.notify("update")


# Retries and the breaker ----------------------------------------------------------------------


def overloaded_then_echo(recorder: Recorder, failures: int = 1) -> Callable[[Any], httpx.Response]:
    def answer(body: Any) -> httpx.Response:
        if len(recorder.requests) <= failures:
            reply = error_reply(-32001, "Server overloaded", id=body["id"])
            return httpx.Response(503, json=reply, headers={"retry-after": "1"})
        return echo(body)

    return answer


def test_an_idempotent_method_is_retried_on_503(waits: list[float]) -> None:
    """A method in the registry goes with idempotent=True: the transport retries the 503."""
    recorder = Recorder()
    recorder.answer = overloaded_then_echo(recorder)
    transport = ResilientTransport(httpx.MockTransport(recorder))
    with Client(URL, transport=transport, idempotent={"kv.get"}) as client:
        assert client.call("kv.get", "k") == ["k"]
    assert len(recorder.requests) == 2
    assert recorder.requests[0].extensions["resilient"] == {"idempotent": True}
    assert waits == [1.0]  # the server's Retry-After


def test_a_method_not_declared_idempotent_is_not_retried(waits: list[float]) -> None:
    """A non-idempotent call gets the 503's typed error after one attempt."""
    recorder = Recorder()
    recorder.answer = overloaded_then_echo(recorder)
    transport = ResilientTransport(httpx.MockTransport(recorder))
    client = Client(URL, transport=transport, idempotent={"kv.get"})
    with client, pytest.raises(Overloaded) as caught:
        client.call("kv.put", "k", "v")
    assert len(recorder.requests) == 1
    assert "resilient" not in recorder.requests[0].extensions
    assert caught.value.retry_after is None  # no data: the header alone said 1 s
    assert waits == []


def test_an_idempotent_method_gets_the_last_error_when_retries_run_out() -> None:
    """Every attempt overloaded: the caller gets the typed error of the last answer."""
    recorder = Recorder()
    recorder.answer = overloaded_then_echo(recorder, failures=10)
    transport = ResilientTransport(httpx.MockTransport(recorder), retry=Retry(attempts=3))
    client = Client(URL, transport=transport, idempotent={"kv.get"})
    with client, pytest.raises(Overloaded):
        client.call("kv.get", "k")
    assert len(recorder.requests) == 3


def test_method_overrides_the_registry_both_ways() -> None:
    """client.method(name, idempotent=...) marks one method, or unmarks a registered one."""
    recorder = Recorder()
    with client_for(recorder, idempotent={"kv.get"}) as client:
        get = client.method("kv.get")
        put = client.method("kv.put", idempotent=True)
        unsafe_get = client.method("kv.get", idempotent=False)
        assert (get.idempotent, put.idempotent, unsafe_get.idempotent) == (True, True, False)
        assert isinstance(get, Method)
        assert repr(put) == "<resilient.rpc.Method 'kv.put' idempotent=True>"
        assert put("k", "v") == ["k", "v"]
        unsafe_get("k")
        with pytest.raises(TypeError, match="name must be a str"):
            client.method(1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="idempotent must be True, False or None"):
            client.method("m", idempotent=1)  # type: ignore[arg-type]
    assert recorder.requests[0].extensions["resilient"] == {"idempotent": True}
    assert "resilient" not in recorder.requests[1].extensions


def breaker_transport(answer: Handler) -> ResilientTransport:
    return ResilientTransport(
        httpx.MockTransport(answer),
        retry=None,
        breaker=lambda origin: CircuitBreaker(name=origin, failure_threshold=2),
    )


def test_an_overloaded_answer_counts_against_the_breaker_and_invalid_params_does_not() -> None:
    """503 "overloaded" is a failure of the origin; 200 "invalid params" is the caller's."""
    answers = iter(
        [
            (200, error_reply(-32602, "Invalid params")),
            (200, error_reply(-32602, "Invalid params")),
            (503, error_reply(-32001, "Server overloaded")),
        ]
    )

    def answer(request: httpx.Request) -> httpx.Response:
        status, payload = next(answers)
        payload["id"] = json.loads(request.content)["id"]
        return httpx.Response(status, json=payload)

    transport = breaker_transport(answer)
    with Client(URL, transport=transport) as client:
        for _ in range(2):
            with pytest.raises(InvalidParams):
                client.call("m")
        breaker = transport.breaker_for(URL)
        assert isinstance(breaker, CircuitBreaker)
        assert breaker.metrics().consecutive_failures == 0
        with pytest.raises(Overloaded):
            client.call("m")
        assert breaker.metrics().consecutive_failures == 1


# Batches ---------------------------------------------------------------------------------------


def send_batch(
    client: Client, pending: list[Pending], *methods: str, abandon: bool = False
) -> None:
    """One batch calling each method, its Pendings appended; ``abandon`` raises inside the block."""
    with client.batch() as batch:
        pending.extend(batch.call(method) for method in methods)
        if abandon:
            raise KeyError("abandoned")


async def send_async_batch(
    client: AsyncClient, pending: list[Pending], *methods: str, abandon: bool = False
) -> None:
    """The async twin of send_batch."""
    async with client.batch() as batch:
        pending.extend(batch.call(method) for method in methods)
        if abandon:
            raise KeyError("abandoned")


def test_a_batch_round_trip_matches_answers_by_id() -> None:
    """Results and errors reach their own Pending, whatever order the server answers in."""

    def answer(body: Any) -> httpx.Response:
        first, _, third = body
        return httpx.Response(
            200,
            json=[
                {"jsonrpc": "2.0", "error": {"code": -32601, "message": "nope"}, "id": third["id"]},
                {"jsonrpc": "2.0", "result": 19, "id": first["id"]},
            ],
        )

    recorder = Recorder(answer)
    with client_for(recorder) as client:
        with client.batch() as batch:
            difference = batch.call("subtract", 42, 23)
            batch.notify("log", "hi")
            missing = batch.call("missing", x=1)
        assert difference.result() == 19
        with pytest.raises(MethodNotFound, match="nope"):
            missing.result()
    (body,) = recorder.bodies
    assert body == [
        {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1},
        {"jsonrpc": "2.0", "method": "log", "params": ["hi"]},
        {"jsonrpc": "2.0", "method": "missing", "params": {"x": 1}, "id": 2},
    ]
    assert repr(difference) == "<resilient.rpc.Pending 'subtract' id=1 sent>"


def test_a_batch_of_notifications_takes_a_204_and_an_empty_batch_sends_nothing() -> None:
    """All-notification batches expect no answer; an empty builder makes no request."""
    recorder = Recorder()
    with client_for(recorder) as client:
        with client.batch() as batch:
            batch.notify("a")
            batch.notify("b", 1)
        with client.batch():
            pass
    assert recorder.bodies == [
        [{"jsonrpc": "2.0", "method": "a"}, {"jsonrpc": "2.0", "method": "b", "params": [1]}]
    ]


def test_a_batch_refused_whole_raises_at_the_end_of_the_block_and_from_each_result() -> None:
    """A single error object for a batch (the server shed it) ends every call in it."""
    with client_for(
        replying(503, content=json.dumps(error_reply(-32001, id=None)).encode())
    ) as client:
        pending: list[Pending] = []
        with pytest.raises(Overloaded):
            send_batch(client, pending, "a", "b")
        assert len(pending) == 2
        for entry in pending:
            with pytest.raises(Overloaded):
                entry.result()


def test_a_batch_ended_by_the_connection_raises_it_from_each_result() -> None:
    """A transport error while sending the batch is raised, and kept by each Pending."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with client_for(refuse) as client:
        pending: list[Pending] = []
        with pytest.raises(httpx.ConnectError):
            send_batch(client, pending, "a")
        with pytest.raises(httpx.ConnectError):
            pending[0].result()


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (200, b'{"jsonrpc": "2.0", "result": 1, "id": 1}', "answered with an array, not a single"),
        (200, b"42", "a batch is answered with an array"),
        (200, b"nope", "not JSON"),
        (500, b'[{"jsonrpc": "2.0", "result": 1, "id": 1}]', "HTTP 500 .*failing HTTP status"),
        (200, b'[{"jsonrpc": "2.0", "result": 1, "id": 9}]', "sent no request with id 9"),
        (200, b'[{"jsonrpc": "2.0", "result": 1, "id": "1"}]', "sent no request with id '1'"),
        (200, b'[{"jsonrpc": "2.0", "result": 1, "id": null}]', "sent no request with id None"),
        (
            200,
            b'[{"jsonrpc": "2.0", "result": 1, "id": 1}, {"jsonrpc": "2.0", "result": 2, "id": 1}]',
            "holds id 1 twice",
        ),
        (200, b'[{"jsonrpc": "2.0", "result": 1}]', 'no "id" member'),
        (200, b"[7]", "must be a JSON object"),
    ],
)
def test_a_batch_answer_that_breaks_the_protocol_is_a_protocol_error(
    status: int, body: bytes, match: str
) -> None:
    """Each broken batch answer is a ProtocolError for the whole batch, saying which."""
    with client_for(replying(status, content=body)) as client:
        pending: list[Pending] = []
        with pytest.raises(ProtocolError, match=match):
            send_batch(client, pending, "a")
        with pytest.raises(ProtocolError, match=match):
            pending[0].result()


def test_an_unanswered_call_in_a_batch_gets_a_protocol_error_of_its_own() -> None:
    """The answered entries keep their results; the missing one says so, naming id-less errors."""
    body = json.dumps(
        [
            {"jsonrpc": "2.0", "result": 1, "id": 1},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        ]
    ).encode()
    with client_for(replying(200, content=body)) as client:
        with client.batch() as batch:
            answered = batch.call("a")
            unanswered = batch.call("b")
        assert answered.result() == 1
        with pytest.raises(ProtocolError, match=r"no response for id 2; .*errors without an id"):
            unanswered.result()


def test_a_batch_of_notifications_answered_with_a_body_is_a_protocol_error() -> None:
    """Notifications get no answer, in a batch as alone."""
    body = b'{"jsonrpc": "2.0", "result": 1, "id": null}'
    with client_for(replying(200, content=body)) as client:
        batch = client.batch()
        batch.notify("a")
        with pytest.raises(ProtocolError, match="notifications get no response"), batch:
            pass


def test_a_batch_whose_block_raises_sends_nothing() -> None:
    """An exception inside the block abandons the batch; its results say it was not sent."""
    recorder = Recorder()
    with client_for(recorder) as client:
        pending: list[Pending] = []
        with pytest.raises(KeyError, match="abandoned"):
            send_batch(client, pending, "a", abandon=True)
        assert repr(pending[0]) == "<resilient.rpc.Pending 'a' id=1 not sent>"
        with pytest.raises(RuntimeError, match="was not sent"):
            pending[0].result()
    assert recorder.requests == []


def test_a_sent_batch_takes_no_more_entries() -> None:
    """A builder is used once: adding to it after its block ended is a RuntimeError."""
    with client_for(Recorder()) as client:
        with client.batch() as batch:
            batch.call("a")
        with pytest.raises(RuntimeError, match="already sent"):
            batch.call("late")


def test_a_result_read_inside_the_block_is_an_error() -> None:
    """The batch goes when the block ends: a result read before then raises RuntimeError."""
    with client_for(Recorder()) as client, client.batch() as batch:
        pending = batch.call("a")
        with pytest.raises(RuntimeError, match="after its with block ends"):
            pending.result()


def test_a_batch_is_idempotent_only_when_all_its_methods_are() -> None:
    """One non-idempotent entry makes the whole batch unsafe to retry."""
    recorder = Recorder()
    with client_for(recorder, idempotent={"kv.get"}) as client:
        with client.batch() as batch:
            batch.call("kv.get", "a")
            batch.call("kv.get", "b")
        with client.batch() as batch:
            batch.call("kv.get", "a")
            batch.notify("kv.put", "b", 1)
    assert recorder.requests[0].extensions["resilient"] == {"idempotent": True}
    assert "resilient" not in recorder.requests[1].extensions


def test_a_bad_entry_is_refused_when_added() -> None:
    """Bad input fails at batch.call(), where it was written, not at the end of the block."""
    with client_for(Recorder()) as client, client.batch() as batch:
        with pytest.raises(TypeError, match="param 'x' of 'a'"):
            batch.call("a", x=object())
        with pytest.raises(TypeError, match="either positional"):
            batch.notify("a", 1, x=2)


# The proxy --------------------------------------------------------------------------------------


def test_the_proxy_calls_methods_by_attribute_with_dotted_names() -> None:
    """client.proxy.subtract(..) and client.proxy.kv.get(..) are calls; the registry applies."""
    recorder = Recorder()
    with client_for(recorder, idempotent={"kv.get"}) as client:
        assert client.proxy.subtract(42, 23) == [42, 23]
        assert client.proxy.kv.get(key="k") == {"key": "k"}
        assert client.proxy.rpc.discover() is None
    assert [body["method"] for body in recorder.bodies] == ["subtract", "kv.get", "rpc.discover"]
    assert "resilient" not in recorder.requests[0].extensions
    assert recorder.requests[1].extensions["resilient"] == {"idempotent": True}


def test_the_proxy_never_turns_underscore_names_into_calls() -> None:
    """_private and __dunder__ lookups raise AttributeError; Python's protocols keep working."""
    recorder = Recorder()
    with client_for(recorder) as client:
        proxy = client.proxy
        for name in ("_private", "__wrapped__", "__deepcopy__"):
            with pytest.raises(AttributeError, match="not remote methods"):
                getattr(proxy.kv, name)
        assert not hasattr(proxy, "_x")
        copy.copy(proxy.kv)
        assert isinstance(proxy.kv, Proxy)
        assert repr(proxy.kv.get) == "<resilient.rpc.Proxy kv.get>"
        with pytest.raises(TypeError, match="name the method first"):
            proxy(1)
    assert recorder.requests == []


# Closing -----------------------------------------------------------------------------------------


class Closing(httpx.MockTransport):
    closed = False

    def close(self) -> None:
        self.closed = True


class AsyncClosing(httpx.MockTransport):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


def test_closing_the_client_closes_its_transport_but_not_a_borrowed_httpx_client() -> None:
    """A transport given is owned (as httpx does); an httpx.Client given is the caller's."""
    transport = Closing(echo_request)
    with Client(URL, transport=transport) as client:
        client.call("m")
    assert transport.closed
    borrowed = httpx.Client(transport=httpx.MockTransport(echo_request))
    with Client(URL, transport=borrowed) as client:
        assert client.call("m", 1) == [1]
    assert not borrowed.is_closed
    borrowed.close()


def echo_request(request: httpx.Request) -> httpx.Response:
    return echo(json.loads(request.content))


def test_a_closed_client_refuses_to_call() -> None:
    """After close(), a call raises rather than opening new connections."""
    client = client_for(echo_request)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.call("m")


# The async client ------------------------------------------------------------------------------


def async_client_for(handler: Handler, **options: Any) -> AsyncClient:
    return AsyncClient(URL, transport=httpx.MockTransport(handler), **options)


async def test_the_async_client_calls_notifies_and_proxies() -> None:
    """Same requests and answers as the sync client, awaited."""
    recorder = Recorder()
    async with async_client_for(recorder, idempotent={"kv.get"}) as client:
        assert await client.call("subtract", 42, 23) == [42, 23]
        assert await client.proxy.kv.get("k") == ["k"]
        assert await client.method("kv.put", idempotent=True)("k", 1) == ["k", 1]
        await client.notify("log", "x")
    assert [body.get("id") for body in recorder.bodies] == [1, 2, 3, None]
    assert recorder.requests[1].extensions["resilient"] == {"idempotent": True}
    assert repr(client) == "<resilient.rpc.AsyncClient 'http://rpc.test/'>"


async def test_the_async_client_raises_typed_errors() -> None:
    """Error objects and broken answers are raised as by the sync client."""
    async with async_client_for(replying(504, error_reply(-32000))) as client:
        with pytest.raises(DeadlineExceeded):
            await client.call("slow")
    async with async_client_for(replying(503, error_reply(-32001, id=None))) as client:
        with pytest.raises(Overloaded):
            await client.notify("n")
    async with async_client_for(replying(200, content=b"oops")) as client:
        with pytest.raises(ProtocolError, match=r"HTTP 200 OK .*not JSON"):
            await client.call("m")


@pytest.mark.parametrize("body", DEEP_BODIES)
async def test_the_async_client_turns_a_deeply_nested_answer_into_a_protocol_error(
    body: bytes,
) -> None:
    """As the sync client: a ProtocolError from a call and a batch, never a RecursionError."""
    async with async_client_for(replying(200, content=body)) as client:
        with pytest.raises(ProtocolError, match=r"HTTP 200 OK .*nested too deeply"):
            await client.call("m")
        pending: list[Pending] = []
        with pytest.raises(ProtocolError, match="nested too deeply"):
            await send_async_batch(client, pending, "a")
        with pytest.raises(ProtocolError, match="nested too deeply"):
            pending[0].result()


async def test_the_async_batch_round_trip() -> None:
    """async with client.batch(): sent at the end of the block; results by id."""
    recorder = Recorder()
    async with async_client_for(recorder) as client:
        async with client.batch() as batch:
            first = batch.call("a", 1)
            batch.notify("n")
            second = batch.call("b", x=2)
        assert (first.result(), second.result()) == ([1], {"x": 2})
        async with client.batch():
            pass  # empty: nothing sent
        abandoned: list[Pending] = []
        with pytest.raises(KeyError, match="abandoned"):
            await send_async_batch(client, abandoned, "c", abandon=True)
        with pytest.raises(RuntimeError, match="was not sent"):
            abandoned[0].result()
    assert len(recorder.requests) == 1


async def test_an_async_batch_ended_by_an_error_raises_it_from_each_result() -> None:
    """The whole batch refused: the end of the block raises, and so does each result."""
    async with async_client_for(
        replying(503, content=json.dumps(error_reply(-32001, id=None)).encode())
    ) as client:
        pending: list[Pending] = []
        with pytest.raises(Overloaded):
            await send_async_batch(client, pending, "a")
        with pytest.raises(Overloaded):
            pending[0].result()


async def test_the_async_client_owns_its_transport_but_not_a_borrowed_client() -> None:
    """aclose() closes a given transport, not a given httpx.AsyncClient."""
    transport = AsyncClosing(echo_request)
    async with AsyncClient(URL, transport=transport) as client:
        await client.call("m")
    assert transport.closed
    borrowed = httpx.AsyncClient(transport=httpx.MockTransport(echo_request))
    async with AsyncClient(URL, transport=borrowed) as client:
        assert await client.call("m", 1) == [1]
    assert not borrowed.is_closed
    await borrowed.aclose()


async def test_the_async_client_builds_an_async_resilient_transport(waits: list[float]) -> None:
    """With no transport given, the async client sends through AsyncResilientTransport."""
    client = AsyncClient(URL, retry=None)
    assert isinstance(client._http._transport, AsyncResilientTransport)
    await client.aclose()


async def test_the_async_client_retries_idempotent_methods_only(waits: list[float]) -> None:
    """The registry decides, as for the sync client."""
    recorder = Recorder()
    recorder.answer = overloaded_then_echo(recorder, failures=1)
    transport = AsyncResilientTransport(httpx.MockTransport(recorder))
    async with AsyncClient(URL, transport=transport, idempotent={"kv.get"}) as client:
        assert await client.call("kv.get", "k") == ["k"]
        assert len(recorder.requests) == 2
        recorder.requests.clear()
        recorder.answer = overloaded_then_echo(recorder, failures=1)
        with pytest.raises(Overloaded):
            await client.call("kv.put", "k")
        assert len(recorder.requests) == 1


async def test_the_async_client_cancels_a_call_at_its_timeout_on_any_transport() -> None:
    """Even over a plain httpx transport, an async call still running at its deadline stops."""
    started = asyncio.Event()

    async def stall(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(5)
        return httpx.Response(204)  # pragma: no cover - cancelled before

    client = AsyncClient(URL, transport=httpx.MockTransport(stall), timeout=0.2)
    begun = time.monotonic()
    async with client:
        with pytest.raises(DeadlineExceeded):
            await client.call("m")
    assert started.is_set()
    assert time.monotonic() - begun < 1.0


async def test_the_async_client_sends_the_deadline() -> None:
    """The header holds the budget left under the caller's deadline."""
    recorder = Recorder()
    async with async_client_for(recorder) as client, deadline(1.0):
        await client.call("m")
    assert 500 < int(recorder.requests[0].headers[DEADLINE_HEADER]) <= 1000


def test_msgspec_is_the_encoder() -> None:
    """Values msgspec encodes beyond plain JSON (a Struct, say) go as their JSON form."""

    class Point(msgspec.Struct):
        x: int
        y: int

    recorder = Recorder()
    with client_for(recorder) as client:
        client.call("m", Point(1, 2))
    assert recorder.bodies[0]["params"] == [{"x": 1, "y": 2}]


# Against the real server, over a socket ---------------------------------------------------------


class Handlers:
    """A server with the methods the integration tests call, and what its handlers saw."""

    def __init__(self, **options: Any) -> None:
        self.server = Server(**options)
        self.runs: dict[str, int] = {}
        self.budgets: list[float] = []
        self.cancelled = threading.Event()
        self.release = threading.Event()
        self.holding = threading.Event()
        server = self.server

        @server.method
        def subtract(minuend: int, subtrahend: int) -> int:
            return minuend - subtrahend

        @server.method(name="kv.get", idempotent=True)
        async def get(key: str) -> str:
            return f"value of {key}"

        @server.method
        async def sleep(seconds: float) -> str:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "slept"

        @server.method
        async def hold() -> str:
            self.holding.set()
            while not self.release.is_set():
                await asyncio.sleep(0.005)
            return "released"

        def flaky(name: str) -> Callable[[], Any]:
            async def handler() -> str:
                self.runs[name] = self.runs.get(name, 0) + 1
                if self.runs[name] == 1:
                    raise Overloaded(data={"retry_after": 0})
                return "ok"

            return handler

        @server.method(name="slow.read", idempotent=True)
        async def slow_read() -> float:
            # The budget this attempt arrived with; the first attempt spends 0.3 s, then fails.
            self.budgets.append(remaining())
            if len(self.budgets) == 1:
                await asyncio.sleep(0.3)
                raise Overloaded(data={"retry_after": 0})
            return self.budgets[-1]

        server.method(name="flaky.read", idempotent=True)(flaky("flaky.read"))
        server.method(name="flaky.write")(flaky("flaky.write"))


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def url(handlers: Handlers) -> Iterator[str]:
    with serve(handlers.server) as base:
        yield base + "/"


def test_live_calls_notifications_batches_and_proxy(url: str) -> None:
    """Every form of call round-trips through uvicorn and the real server."""
    with Client(url) as client:
        assert client.call("subtract", 42, 23) == 19
        assert client.call("subtract", minuend=42, subtrahend=23) == 19
        assert client.proxy.subtract(23, 42) == -19
        assert client.proxy.kv.get("k") == "value of k"
        client.notify("subtract", 1, 2)
        with client.batch() as batch:
            first = batch.call("subtract", 42, 23)
            batch.notify("subtract", 1, 1)
            bad = batch.call("subtract", "x", 1)
            unknown = batch.call("no.such.method")
        assert first.result() == 19
        with pytest.raises(InvalidParams) as caught:
            bad.result()
        assert caught.value.data["param"] == "minuend"
        with pytest.raises(MethodNotFound):
            unknown.result()
        with client.batch() as batch:
            batch.notify("subtract", 1, 2)  # all notifications: HTTP 204
        assert client.call("rpc.discover")["openrpc"].startswith("1.")


async def test_live_async_calls_notifications_batches_and_proxy(url: str) -> None:
    """The async client against the real server."""
    async with AsyncClient(url) as client:
        assert await client.call("subtract", 42, 23) == 19
        assert await client.proxy.kv.get(key="k") == "value of k"
        await client.notify("subtract", 1, 2)
        async with client.batch() as batch:
            first = batch.call("subtract", minuend=1, subtrahend=2)
            missing = batch.call("nope")
        assert first.result() == -1
        with pytest.raises(MethodNotFound):
            missing.result()


def test_live_deadline_reaches_the_server_and_stops_the_handler(
    url: str, handlers: Handlers
) -> None:
    """0.2 s left, a 2 s handler: a DeadlineExceeded within ~0.3 s, the handler cancelled."""
    with Client(url) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded), deadline(0.2):
            client.call("sleep", 2.0)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 0.5
        assert handlers.cancelled.wait(1.0)
        assert client.call("subtract", 2, 1) == 1  # the client still works


async def test_live_async_deadline_reaches_the_server_and_stops_the_handler(
    url: str, handlers: Handlers
) -> None:
    """The async client under async with deadline(0.2): the same, and the handler cancelled."""
    async with AsyncClient(url) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.2):
                await client.call("sleep", 2.0)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 0.5
        assert await asyncio.to_thread(handlers.cancelled.wait, 1.0)
        assert await client.call("subtract", 2, 1) == 1


def test_live_idempotent_methods_are_retried_on_503_and_others_are_not(
    url: str, handlers: Handlers, waits: list[float]
) -> None:
    """The first run of each flaky method answers Overloaded (503): only the idempotent retries."""
    with Client(url, idempotent={"flaky.read"}) as client:
        assert client.call("flaky.read") == "ok"
        with pytest.raises(Overloaded):
            client.call("flaky.write")
    assert handlers.runs == {"flaky.read": 2, "flaky.write": 1}


def test_live_each_retry_carries_the_budget_left_then(
    url: str, handlers: Handlers, waits: list[float]
) -> None:
    """The client's own transport refreshes the deadline header on every attempt."""
    with Client(url) as client, deadline(5.0):
        client.method("slow.read", idempotent=True)()
    first, second = handlers.budgets
    assert 4.5 < first <= 5.0
    assert second <= first - 0.3


async def test_live_async_idempotent_methods_are_retried_on_503_and_others_are_not(
    url: str, handlers: Handlers, waits: list[float]
) -> None:
    """The async twin of the retry rule, against the real server."""
    async with AsyncClient(url) as client:
        assert await client.method("flaky.read", idempotent=True)() == "ok"
        with pytest.raises(Overloaded):
            await client.call("flaky.write")
    assert handlers.runs == {"flaky.read": 2, "flaky.write": 1}


def test_live_shedding_counts_against_the_breaker_and_invalid_params_does_not() -> None:
    """A real shed (max_concurrent=1, 503) is a breaker failure; invalid params (200) is not."""
    handlers = Handlers(max_concurrent=1)
    transport = ResilientTransport(
        propagate_deadline=True,
        retry=None,
        breaker=lambda origin: CircuitBreaker(name=origin, failure_threshold=5),
    )
    with serve(handlers.server) as base, Client(base + "/", transport=transport) as client:
        with pytest.raises(InvalidParams):
            client.call("subtract", "x", 1)
        breaker = transport.breaker_for(base)
        assert isinstance(breaker, CircuitBreaker)
        assert breaker.metrics().consecutive_failures == 0

        def hold() -> None:
            with Client(base + "/") as other:
                other.call("hold")

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert handlers.holding.wait(2.0)
            with pytest.raises(Overloaded) as caught:
                client.call("subtract", 2, 1)
            assert caught.value.retry_after is not None
            assert breaker.metrics().consecutive_failures == 1
        finally:
            handlers.release.set()
            holder.join(5)


def test_live_a_stopped_server_gives_the_transports_connection_error(
    handlers: Handlers, waits: list[float]
) -> None:
    """Server gone mid-test: the call raises httpx.ConnectError, as the transport raised it."""
    with serve(handlers.server) as base:
        client = Client(base + "/")
        assert client.call("subtract", 2, 1) == 1
    try:
        with pytest.raises(httpx.ConnectError):
            client.call("subtract", 2, 1)
    finally:
        client.close()


async def test_live_async_a_stopped_server_gives_the_transports_connection_error(
    handlers: Handlers, waits: list[float]
) -> None:
    """The async twin: the server stopped, the next call raises httpx.ConnectError."""
    with serve(handlers.server) as base:
        client = AsyncClient(base + "/")
        assert await client.call("subtract", 2, 1) == 1
    try:
        with pytest.raises(httpx.ConnectError):
            await client.call("subtract", 2, 1)
    finally:
        await client.aclose()
