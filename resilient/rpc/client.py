"""JSON-RPC 2.0 clients over the resilient transport: :class:`Client` and :class:`AsyncClient`.

One call is one HTTP POST of a request object encoded with ``msgspec.json``; the
answer is checked strictly and becomes a value or the
:class:`~resilient.rpc.errors.RemoteError` subclass of its code::

    with Client("http://127.0.0.1:8000/", idempotent={"kv.get"}) as client:
        client.call("subtract", 42, 23)                    # 19
        client.call("subtract", minuend=42, subtrahend=23)
        client.proxy.kv.get("k")                           # the same as call("kv.get", "k")
        client.notify("log", "hello")                      # no id, no answer: None
        with client.batch() as batch:                      # one POST, sent when the block ends
            difference = batch.call("subtract", 42, 23)
            batch.notify("log", "batched")
        difference.result()                                # 19, or raises the entry's error

The client sends through a :class:`~resilient.ResilientTransport` (the async client
an :class:`~resilient.AsyncResilientTransport`) it builds itself, so every call gets
the per-origin breaker and retries, and the deadline in force (the caller's
:func:`resilient.deadline`, and at most ``timeout``) travels in the
``resilient-timeout-ms`` header of every attempt, for the server to run the handler
inside it.

**Retries.** A POST is not idempotent, so a call is retried only when the request
never left (a refused connection, say), unless its method is declared idempotent:
in the client's ``idempotent=`` registry, or with :meth:`Client.method`. Such a call
is sent with ``extensions={"resilient": {"idempotent": True}}``, and the transport
retries it on timeouts and on the statuses it retries (429, 502, 503, 504), as the
server's "overloaded", "circuit open" and "deadline exceeded" answers come. There is
no per-call ``idempotent=`` keyword: every keyword of :meth:`Client.call` is a named
param of the remote method, whatever its name. A batch is idempotent when all its
entries are.

**Errors.** An error object raises the class :func:`~resilient.rpc.errors.error_for`
picks for its code, so ``except resilient.DeadlineExceeded`` also catches the
server's :class:`~resilient.rpc.errors.RemoteDeadlineExceeded`. An error object is
read whatever the HTTP status it came with (the server answers its own errors with
413, 415, 429, 503 or 504). Anything that is not a JSON-RPC 2.0 answer to the
request sent (not JSON, a wrong ``jsonrpc`` member, another id, both or neither of
``result`` and ``error``, a result with a failing status) raises
:class:`~resilient.rpc.errors.ProtocolError` naming the HTTP status and quoting the
start of the body. Errors from below (``httpx.ConnectError``,
:class:`~resilient.TransportCircuitOpen`, :class:`~resilient.TransportDeadlineExceeded`)
come as the transport raised them. Members of a response other than those of the
specification are ignored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Generic, NoReturn, TypeVar

import httpx
import msgspec

from resilient._config import DEFAULT, Default, Duration, to_seconds
from resilient.deadline import DEADLINE_HEADER, deadline, format_deadline_header, remaining
from resilient.errors import DeadlineExceeded
from resilient.retry import Retry
from resilient.rpc.errors import ProtocolError, RemoteError, error_for
from resilient.stages import Admission, Gate
from resilient.transport import AsyncResilientTransport, ResilientTransport

__all__ = ["AsyncBatch", "AsyncClient", "Batch", "Client", "Method", "Pending", "Proxy"]

_ENCODER: Final = msgspec.json.Encoder()
_decode: Final = msgspec.json.Decoder().decode
_HEADERS: Final = {"content-type": "application/json", "accept": "application/json"}
_IDEMPOTENT: Final[Mapping[str, bool]] = MappingProxyType({"idempotent": True})
#: How much of an unexpected body a ProtocolError quotes.
_EXCERPT: Final = 200
_INF: Final = math.inf

H = TypeVar("H", httpx.Client, httpx.AsyncClient)


# Requests ---------------------------------------------------------------------------------


def _encode_request(
    method: object, args: tuple[Any, ...], params: dict[str, Any], request_id: int | None
) -> bytes:
    """One request object (a notification when ``request_id`` is None), encoded, or refused."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}: {method!r}")
    if not method:
        raise ValueError("method must be a non-empty str")
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if args and params:
        raise TypeError(
            "JSON-RPC 2.0 params are either positional (an array) or named (an object), "
            f"not both: {method!r} was given {len(args)} positional and named {sorted(params)}"
        )
    if args:
        message["params"] = args
    elif params:
        message["params"] = params
    if request_id is not None:
        message["id"] = request_id
    try:
        return _ENCODER.encode(message)
    except (TypeError, ValueError, OverflowError) as error:
        _unencodable(method, args, params, error)


def _unencodable(
    method: str, args: tuple[Any, ...], params: dict[str, Any], error: Exception
) -> NoReturn:
    """Raise a TypeError naming the first param msgspec cannot encode (the failure path)."""
    labelled = (
        [(f"param {name!r}", value) for name, value in params.items()]
        if params
        else [(f"positional param #{index}", value) for index, value in enumerate(args)]
    )
    for label, value in labelled:
        try:
            _ENCODER.encode(value)
        except (TypeError, ValueError, OverflowError) as culprit:
            raise TypeError(
                f"{label} of {method!r} is not JSON-encodable "
                f"({type(value).__name__}: {culprit}); pass JSON values, dataclasses, "
                "msgspec Structs or other types msgspec encodes"
            ) from culprit
    raise TypeError(
        f"the params of {method!r} are not JSON-encodable"
    ) from error  # pragma: no cover


def _headers(base: Mapping[str, str]) -> Mapping[str, str]:
    """The headers of a POST sent now: the budget left, when a deadline is in force.

    The resilient transport refreshes the header before each attempt; sending it
    here also tells the server when the client goes through another transport.
    """
    left = remaining()
    if left == _INF:
        return base
    if left <= 0.0:
        raise DeadlineExceeded("the deadline passed before the JSON-RPC request could be sent")
    return {**base, DEADLINE_HEADER: format_deadline_header(left)}


def _check_url(url: object) -> str:
    if not isinstance(url, str | httpx.URL):
        raise TypeError(f"url must be a str or an httpx.URL, got {type(url).__name__}: {url!r}")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must be an absolute http:// or https:// URL, got {str(url)!r}")
    return str(parsed)


# Responses --------------------------------------------------------------------------------


def _excerpt(response: httpx.Response) -> str:
    body = response.content
    quoted = repr(body[:_EXCERPT])
    return f"{quoted}..." if len(body) > _EXCERPT else quoted


def _protocol_error(response: httpx.Response, what: str) -> ProtocolError:
    reason = f" {response.reason_phrase}" if response.reason_phrase else ""
    return ProtocolError(
        f"HTTP {response.status_code}{reason} from {response.request.url}: {what}; "
        f"body: {_excerpt(response)}"
    )


def _body(response: httpx.Response) -> Any:
    """The decoded JSON body; a ProtocolError when it is not JSON or nested too deeply."""
    try:
        return _decode(response.content)
    except RecursionError:
        # msgspec recurses once per array or object level: a hostile or broken body
        # of thousands of ``[`` must fail the call, not the caller's stack.
        raise _protocol_error(response, "the body is nested too deeply to decode") from None
    except msgspec.MsgspecError as error:
        raise _protocol_error(response, f"the body is not JSON ({error})") from None


def _entry(obj: object, response: httpx.Response) -> tuple[Any, Any, RemoteError | None]:
    """``(id, result, error)`` of one response object, checked against the specification."""
    if not isinstance(obj, dict):
        raise _protocol_error(response, "a JSON-RPC response must be a JSON object")
    if obj.get("jsonrpc") != "2.0":
        raise _protocol_error(response, 'the response\'s "jsonrpc" member is not "2.0"')
    if "id" not in obj:
        raise _protocol_error(response, 'the response has no "id" member')
    if ("result" in obj) == ("error" in obj):
        raise _protocol_error(response, 'a response holds exactly one of "result" and "error"')
    if "result" in obj:
        return obj["id"], obj["result"], None
    error = obj["error"]
    if (
        not isinstance(error, dict)
        or type(error.get("code")) is not int
        or not isinstance(error.get("message"), str)
    ):
        raise _protocol_error(
            response, 'the "error" member must be an object with an integer code and a message'
        )
    return obj["id"], None, error_for(error["code"], error["message"], error.get("data"))


def _same_id(got: object, sent: int) -> bool:
    return type(got) is int and got == sent  # True == 1 and 1.0 == 1, but neither is the id


def _result(response: httpx.Response, sent: int) -> Any:
    """The result of the call ``sent`` answered by ``response``, or its error raised."""
    got, result, error = _entry(_body(response), response)
    if error is not None:
        if got is not None and not _same_id(got, sent):
            raise _protocol_error(
                response, f"the response's id {got!r} is not the request's {sent}"
            )
        raise error
    if not _same_id(got, sent):
        raise _protocol_error(response, f"the response's id {got!r} is not the request's {sent}")
    if not response.is_success:
        raise _protocol_error(response, "a result came with a failing HTTP status")
    return result


def _notified(response: httpx.Response) -> None:
    """Check the answer to notifications: nothing, or an error object about all of them."""
    if response.is_success and not response.content:
        return
    _, _, error = _entry(_body(response), response)
    if error is None:
        raise _protocol_error(response, "notifications get no response, but one came")
    raise error


def _outcomes(response: httpx.Response, sent: Collection[int]) -> dict[int, Any]:
    """Each id of ``sent`` mapped to its result or its error, from a batch's answer.

    An error object instead of an array (the server refused the whole batch) is
    raised; an id the batch did not send, or sent once and answered twice, is a
    ProtocolError for the whole batch. An id left unanswered gets a ProtocolError
    of its own.
    """
    body = _body(response)
    if isinstance(body, dict):
        _, _, error = _entry(body, response)
        raise (
            error
            if error is not None
            else _protocol_error(response, "a batch is answered with an array, not a single result")
        )
    if not isinstance(body, list):
        raise _protocol_error(response, "a batch is answered with an array")
    if not response.is_success:
        raise _protocol_error(response, "a batch's answer came with a failing HTTP status")
    outcomes: dict[int, Any] = {}
    anonymous: list[RemoteError] = []
    for obj in body:
        got, result, error = _entry(obj, response)
        if got is None and error is not None:
            anonymous.append(error)  # the server could not read that entry's id
            continue
        if type(got) is not int or got not in sent:
            raise _protocol_error(response, f"the batch sent no request with id {got!r}")
        if got in outcomes:
            raise _protocol_error(response, f"the batch's answer holds id {got} twice")
        outcomes[got] = result if error is None else error
    for missing in sent:
        if missing not in outcomes:
            also = f"; the server also sent errors without an id: {anonymous}" if anonymous else ""
            outcomes[missing] = _protocol_error(
                response, f"the batch's answer holds no response for id {missing}{also}"
            )
    return outcomes


# Batches ----------------------------------------------------------------------------------


class Pending:
    """The outcome of one call in a batch: :meth:`result` once the batch is sent."""

    __slots__ = ("_outcome", "_sent", "id", "method")

    def __init__(self, method: str, id: int) -> None:
        self.method = method
        self.id = id
        self._sent = False
        self._outcome: Any = None

    def __repr__(self) -> str:
        state = "sent" if self._sent else "not sent"
        return f"<resilient.rpc.Pending {self.method!r} id={self.id} {state}>"

    def result(self) -> Any:
        """The call's result; raises its error (or the error that ended the batch)."""
        if not self._sent:
            raise RuntimeError(
                f"the batch holding {self.method!r} was not sent: read results after its "
                "with block ends (a block that raised sends nothing)"
            )
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def _settle(self, outcome: Any) -> None:
        self._sent = True
        self._outcome = outcome


class _BatchCore:
    """What a batch builder collects; the sync and async builders only send differently."""

    def __init__(self, client: _Core[Any]) -> None:
        self._client = client
        self._parts: list[bytes] = []
        self._pending: list[Pending] = []
        self._idempotent = True
        self._closed = False

    def _add(
        self, method: str, args: tuple[Any, ...], params: dict[str, Any], call: bool
    ) -> Pending | None:
        if self._closed:
            raise RuntimeError("this batch was already sent (or abandoned); start a new one")
        request_id = next(self._client._ids) if call else None
        self._parts.append(_encode_request(method, args, params, request_id))
        self._idempotent = self._idempotent and method in self._client.idempotent
        if request_id is None:
            return None
        pending = Pending(method, request_id)
        self._pending.append(pending)
        return pending

    def call(self, method: str, /, *args: Any, **params: Any) -> Pending:
        """Add a call; its :class:`Pending` holds the outcome once the batch is sent."""
        pending = self._add(method, args, params, call=True)
        assert pending is not None
        return pending

    def notify(self, method: str, /, *args: Any, **params: Any) -> None:
        """Add a notification: sent with the batch, never answered."""
        self._add(method, args, params, call=False)

    def _content(self) -> bytes | None:
        """The batch's body, or None for an empty batch (nothing is sent); closes the builder."""
        self._closed = True
        return b"[" + b",".join(self._parts) + b"]" if self._parts else None

    def _settle(self, response: httpx.Response) -> None:
        if not self._pending:
            _notified(response)
            return
        outcomes = _outcomes(response, {pending.id for pending in self._pending})
        for pending in self._pending:
            pending._settle(outcomes[pending.id])

    def _fail(self, error: BaseException) -> None:
        for pending in self._pending:
            pending._settle(error)


class Batch(_BatchCore):
    """Calls and notifications sent as one JSON-RPC batch when the ``with`` block ends.

    >>> with client.batch() as batch:
    ...     total = batch.call("sum", 1, 2, 3)
    ...     batch.notify("log", "summed")
    >>> total.result()
    6

    A block that raises sends nothing. An error that ends the whole batch (the
    connection, the server refusing the batch) is raised at the end of the block,
    and by each :meth:`Pending.result`. An empty batch sends nothing.
    """

    _client: Client

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        content = self._content()
        if exc_type is not None or content is None:
            return
        try:
            self._settle(self._client._post(content, self._idempotent))
        except BaseException as error:
            self._fail(error)
            raise


class AsyncBatch(_BatchCore):
    """The async twin of :class:`Batch`: ``async with client.batch() as batch:``."""

    _client: AsyncClient

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        content = self._content()
        if exc_type is not None or content is None:
            return
        try:
            self._settle(await self._client._post(content, self._idempotent))
        except BaseException as error:
            self._fail(error)
            raise


# Ergonomics -------------------------------------------------------------------------------


class Method:
    """One remote method bound to a client: ``get = client.method("kv.get", idempotent=True)``.

    Calling it is :meth:`Client.call` (awaitable on an :class:`AsyncClient`);
    ``idempotent`` overrides the client's registry for calls made through it.
    """

    __slots__ = ("_client", "idempotent", "name")

    def __init__(self, client: _Core[Any], name: str, idempotent: bool) -> None:
        self._client = client
        self.name = name
        self.idempotent = idempotent

    def __repr__(self) -> str:
        return f"<resilient.rpc.Method {self.name!r} idempotent={self.idempotent}>"

    def __call__(self, *args: Any, **params: Any) -> Any:
        return self._client._invoke(self.name, args, params, self.idempotent)


class Proxy:
    """Remote methods as attributes: ``client.proxy.subtract(42, 23)``, ``proxy.kv.get("k")``.

    Each attribute adds a dotted segment to the method name; calling sends it
    through :meth:`Client.call` (the registry decides idempotency). Attribute names
    starting with ``_`` are never methods (``AttributeError``), so Python's own
    protocols stay Python's; a method named so, or named a Python keyword, is
    called with :meth:`Client.call`.
    """

    __slots__ = ("_client", "_name")

    def __init__(self, client: _Core[Any], name: str = "") -> None:
        self._client = client
        self._name = name

    def __repr__(self) -> str:
        return f"<resilient.rpc.Proxy {self._name or '(no method yet)'}>"

    def __getattr__(self, name: str) -> Proxy:
        if name.startswith("_"):
            raise AttributeError(
                f"{name!r}: names starting with '_' are not remote methods; "
                f"use client.call({name!r}, ...) for such a method"
            )
        return Proxy(self._client, f"{self._name}.{name}" if self._name else name)

    def __call__(self, *args: Any, **params: Any) -> Any:
        if not self._name:
            raise TypeError("name the method first: client.proxy.subtract(42, 23)")
        client = self._client
        return client._invoke(self._name, args, params, self._name in client.idempotent)


# The clients ------------------------------------------------------------------------------


class _Core(Generic[H]):
    """Configuration shared by both clients, validated once; see :class:`Client`."""

    # What the twin takes and builds: its httpx client, transport and resilient transport.
    _http_type: type[H]
    _transport_type: type[httpx.BaseTransport | httpx.AsyncBaseTransport]
    _resilient_type: type[ResilientTransport | AsyncResilientTransport]
    _http: H
    _owns_http: bool

    def __init__(
        self,
        url: str | httpx.URL,
        *,
        idempotent: Collection[str],
        timeout: Duration | None,
        headers: Mapping[str, str] | None,
        retry: Retry | Default | None,
        breaker: Callable[[str], Gate] | Default | None,
        bulkhead: Callable[[str], Admission] | Default | None,
        transport: object,
    ) -> None:
        self.url = _check_url(url)
        if isinstance(idempotent, str) or not all(isinstance(name, str) for name in idempotent):
            raise TypeError(f"idempotent must be a collection of method names, got {idempotent!r}")
        #: The methods retried like idempotent requests (see :meth:`method` for one more).
        self.idempotent: frozenset[str] = frozenset(idempotent)
        self.timeout = (
            _INF
            if timeout is None
            else to_seconds("timeout", timeout, allow_zero=False, allow_inf=True)
        )
        self._headers: Mapping[str, str] = {**_HEADERS, **(headers or {})}
        self._ids = itertools.count(1)
        self.proxy = Proxy(self)
        options = {"retry": retry, "breaker": breaker, "bulkhead": bulkhead}
        given = {name: value for name, value in options.items() if value is not DEFAULT}
        self._owns_http = not isinstance(transport, self._http_type)
        if transport is None:
            # propagate_deadline: the header is refreshed before every attempt.
            built = self._resilient_type(propagate_deadline=True, **given)  # type: ignore[arg-type]
            self._http = self._http_type(transport=built, timeout=None)  # type: ignore[arg-type]
        elif given:
            raise TypeError(
                f"{sorted(given)} configure the transport the client builds; with transport= "
                "given, configure that transport instead"
            )
        elif isinstance(transport, self._http_type):
            self._http = transport
        elif isinstance(transport, self._transport_type):
            self._http = self._http_type(transport=transport, timeout=None)  # type: ignore[arg-type]
        else:
            raise TypeError(
                f"transport must be an httpx.{self._transport_type.__name__} or an "
                f"httpx.{self._http_type.__name__}, got {transport!r}"
            )

    def __repr__(self) -> str:
        return f"<resilient.rpc.{type(self).__name__} {self.url!r}>"

    def method(self, name: str, *, idempotent: bool | None = None) -> Method:
        """The remote method ``name`` as a callable; ``idempotent`` overrides the registry."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
        if idempotent is not None and not isinstance(idempotent, bool):
            raise TypeError(f"idempotent must be True, False or None, got {idempotent!r}")
        return Method(self, name, name in self.idempotent if idempotent is None else idempotent)

    def _invoke(
        self, method: str, args: tuple[Any, ...], params: dict[str, Any], idempotent: bool
    ) -> Any:
        raise NotImplementedError  # pragma: no cover

    def _request(self, content: bytes, idempotent: bool) -> dict[str, Any]:
        return {
            "content": content,
            "headers": _headers(self._headers),
            "extensions": {"resilient": _IDEMPOTENT} if idempotent else None,
        }


class Client(_Core[httpx.Client]):
    """A JSON-RPC 2.0 client over a :class:`~resilient.ResilientTransport`.

    >>> with Client("http://127.0.0.1:8000/", idempotent={"kv.get"}) as client:
    ...     client.call("subtract", 42, 23)
    19

    * ``url``: the server's endpoint, ``http://`` or ``https://``.
    * ``idempotent``: names of the methods safe to retry (see the module docstring).
    * ``timeout``: the longest a call may take, retries included (default 10 s;
      ``None`` for no bound of the client's own): a deadline the call runs under,
      within any deadline already in force, sent to the server.
    * ``headers``: sent with every request (authorization, say).
    * ``retry``, ``breaker``, ``bulkhead``: for the transport the client builds, as
      :class:`~resilient.ResilientTransport` takes them.
    * ``transport``: instead, an ``httpx.BaseTransport`` to send through (closed with
      the client), or an ``httpx.Client`` to send with (the caller closes it). To
      keep the deadline fresh on retries, give a ResilientTransport
      ``propagate_deadline=True``.
    """

    _http_type = httpx.Client
    _transport_type = httpx.BaseTransport
    _resilient_type = ResilientTransport

    # unasync: twin client
    def __init__(
        self,
        url: str | httpx.URL,
        *,
        idempotent: Collection[str] = (),
        timeout: Duration | None = 10.0,
        headers: Mapping[str, str] | None = None,
        retry: Retry | Default | None = DEFAULT,
        breaker: Callable[[str], Gate] | Default | None = DEFAULT,
        bulkhead: Callable[[str], Admission] | Default | None = DEFAULT,
        transport: httpx.BaseTransport | httpx.Client | None = None,
    ) -> None:
        super().__init__(
            url,
            idempotent=idempotent,
            timeout=timeout,
            headers=headers,
            retry=retry,
            breaker=breaker,
            bulkhead=bulkhead,
            transport=transport,
        )

    def call(self, method: str, /, *args: Any, **params: Any) -> Any:
        """Call ``method`` with positional or named params (not both) and return its result.

        Raises the method's error as the :class:`~resilient.rpc.errors.RemoteError`
        subclass of its code.
        """
        return self._invoke(method, args, params, method in self.idempotent)

    def notify(self, method: str, /, *args: Any, **params: Any) -> None:
        """Send a notification: the server runs ``method`` and answers nothing."""
        content = _encode_request(method, args, params, None)
        _notified(self._post(content, method in self.idempotent))

    def batch(self) -> Batch:
        """A builder whose calls go as one batch when its ``with`` block ends."""
        return Batch(self)

    def _invoke(
        self, method: str, args: tuple[Any, ...], params: dict[str, Any], idempotent: bool
    ) -> Any:
        request_id = next(self._ids)
        content = _encode_request(method, args, params, request_id)
        return _result(self._post(content, idempotent), request_id)

    def _post(self, content: bytes, idempotent: bool) -> httpx.Response:
        with deadline(self.timeout):
            return self._http.post(self.url, **self._request(content, idempotent))

    def close(self) -> None:
        """Close the connections (and the transport), unless the httpx client was given."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # unasync: end generated


class AsyncClient(_Core[httpx.AsyncClient]):
    """The async twin of :class:`Client`, over an :class:`~resilient.AsyncResilientTransport`.

    Same options; ``transport`` is an ``httpx.AsyncBaseTransport`` or an
    ``httpx.AsyncClient``. :meth:`call`, :meth:`notify`, the proxy's calls and
    :meth:`aclose` are awaited; the batch is ``async with client.batch() as batch``.
    A call still running at its deadline is cancelled.
    """

    _http_type = httpx.AsyncClient
    _transport_type = httpx.AsyncBaseTransport
    _resilient_type = AsyncResilientTransport

    # unasync: begin client
    def __init__(
        self,
        url: str | httpx.URL,
        *,
        idempotent: Collection[str] = (),
        timeout: Duration | None = 10.0,
        headers: Mapping[str, str] | None = None,
        retry: Retry | Default | None = DEFAULT,
        breaker: Callable[[str], Gate] | Default | None = DEFAULT,
        bulkhead: Callable[[str], Admission] | Default | None = DEFAULT,
        transport: httpx.AsyncBaseTransport | httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            url,
            idempotent=idempotent,
            timeout=timeout,
            headers=headers,
            retry=retry,
            breaker=breaker,
            bulkhead=bulkhead,
            transport=transport,
        )

    async def call(self, method: str, /, *args: Any, **params: Any) -> Any:
        """Call ``method`` with positional or named params (not both) and return its result.

        Raises the method's error as the :class:`~resilient.rpc.errors.RemoteError`
        subclass of its code.
        """
        return await self._invoke(method, args, params, method in self.idempotent)

    async def notify(self, method: str, /, *args: Any, **params: Any) -> None:
        """Send a notification: the server runs ``method`` and answers nothing."""
        content = _encode_request(method, args, params, None)
        _notified(await self._post(content, method in self.idempotent))

    def batch(self) -> AsyncBatch:
        """A builder whose calls go as one batch when its ``async with`` block ends."""
        return AsyncBatch(self)

    async def _invoke(
        self, method: str, args: tuple[Any, ...], params: dict[str, Any], idempotent: bool
    ) -> Any:
        request_id = next(self._ids)
        content = _encode_request(method, args, params, request_id)
        return _result(await self._post(content, idempotent), request_id)

    async def _post(self, content: bytes, idempotent: bool) -> httpx.Response:
        async with deadline(self.timeout):
            return await self._http.post(self.url, **self._request(content, idempotent))

    async def aclose(self) -> None:
        """Close the connections (and the transport), unless the httpx client was given."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # unasync: end
