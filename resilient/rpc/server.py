"""A JSON-RPC 2.0 server as an ASGI application, honouring the caller's deadline.

:class:`Server` answers JSON-RPC 2.0 POSTs at one path (``/`` by default). Handlers
are registered with :meth:`Server.method`; their params are bound to the signature
and validated by the annotations (msgspec), positional (array) or named (object)::

    server = Server()

    @server.method
    def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    @server.method(name="kv.get", idempotent=True)
    async def get(key: str) -> str | None:
        ...

    # uvicorn module:server

What a request goes through, cheapest refusal first: path (404; below the ASGI
``root_path`` when mounted, as under Starlette's ``Mount``), method (405 with
``Allow: POST``), content type (415), size (400 for a ``Content-Length`` that is
not digits, 413 when over, refused from ``Content-Length`` or while streaming,
never read to the end), the deadline headers (400 when malformed), then the body:
UTF-8, nesting depth, JSON, the request objects, batch length. A request that
arrives with no budget left is answered
:class:`~resilient.rpc.errors.RemoteDeadlineExceeded` without running its handler;
one that finds every one of ``max_concurrent`` slots taken is shed at once with
:class:`~resilient.rpc.errors.Overloaded` (HTTP 503, ``Retry-After``). The
handler then runs inside ``resilient.deadline``: an async handler is cancelled
when the deadline passes; a sync one runs in a worker thread that sees the
deadline (:func:`resilient.remaining`, :func:`resilient.check_deadline`) and
keeps its slot until it returns, though its answer is sent at the deadline.

Errors a handler raises become error objects: a :class:`RemoteError` with an
application code as it is (``-32603`` if its ``data`` cannot be encoded); the
toolkit's own refusals (``DeadlineExceeded``, ``CircuitOpenError``,
``BulkheadFull``, ``RateLimited``) as the server codes of
:data:`~resilient.rpc.errors.SERVER_ERRORS`;
anything else as ``-32603 Internal error``, logged on
``logging.getLogger("resilient.rpc")`` with its traceback and never sent. That
includes a ``CancelledError`` that is not the request's own cancellation and a
``SystemExit`` or ``KeyboardInterrupt`` raised in a worker thread: neither ends
the request or the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from datetime import timedelta
from typing import Any, Final, TypeVar, overload

import msgspec

from resilient._compat.otel import provider_globals
from resilient._config import check_int, to_seconds
from resilient._driver import resume_stepped
from resilient.adaptive import AdaptiveLimit
from resilient.bulkhead import Bulkhead
from resilient.deadline import DEADLINE_HEADER, Scope, current, deadline_at, narrow, restore
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, RateLimited
from resilient.rpc import _protocol
from resilient.rpc._protocol import ABSENT, NULL, Request, Signature, error_body, result_body
from resilient.rpc.errors import (
    RESERVED,
    SERVER_ERRORS,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    Overloaded,
    RemoteBulkheadFull,
    RemoteCircuitOpen,
    RemoteDeadlineExceeded,
    RemoteError,
    RemoteRateLimited,
    ServerError,
    retry_after_header,
)
from resilient.tracing import Telemetry

__all__ = ["Server"]

logger = logging.getLogger("resilient.rpc")

ASGIScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

F = TypeVar("F", bound=Callable[..., Any])

_INF: Final = math.inf
_monotonic = time.monotonic
_encode = msgspec.json.encode

#: Seconds an overloaded server asks callers to wait (``Retry-After``).
OVERLOAD_RETRY_AFTER: Final = 1.0

_JSON: Final = (b"content-type", b"application/json")
_DEADLINE_HEADER: Final = DEADLINE_HEADER.encode()
_NOT_FOUND_OBJECT: Final = _protocol.error_object(MethodNotFound())
_DISCOVER: Final = "rpc.discover"


def _canned(status: int, why: str, *headers: tuple[bytes, bytes]) -> tuple[int, list[Any], bytes]:
    """An HTTP-level refusal, with a JSON-RPC error body saying why (id null)."""
    body = error_body(NULL, InvalidRequest(data=why))
    return status, [_JSON, (b"content-length", str(len(body)).encode()), *headers], body


_NOT_POST: Final = _canned(405, "JSON-RPC requests are HTTP POSTs", (b"allow", b"POST"))
_BAD_LENGTH: Final = _canned(400, "Content-Length must be ASCII digits")
_BAD_TYPE: Final = _canned(
    415, "the Content-Type must be application/json (charset utf-8, if given)"
)


class _Method:
    """One registered handler and everything decided about it at registration."""

    __slots__ = (
        "description",
        "fn",
        "idempotent",
        "is_async",
        "name",
        "run_in_thread",
        "signature",
    )

    def __init__(
        self, name: str, fn: Callable[..., Any], *, idempotent: bool, run_in_thread: bool
    ) -> None:
        self.name = name
        self.fn = fn
        self.idempotent = idempotent
        # An object with ``async def __call__`` is an async handler too.
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__
        )
        self.run_in_thread = run_in_thread and not self.is_async
        self.signature = Signature(fn, name)
        doc = (getattr(fn, "__doc__", None) or "").strip()
        self.description = doc.split("\n\n")[0].replace("\n", " ") if doc else ""


class Server:
    """A JSON-RPC 2.0 ASGI application; see the module docstring.

    ``path`` is where it answers. Limits, each refused with a clear error and
    the server still serving:

    ========================  ========  ===============================================
    ``max_concurrent``        100       handler calls at once (a batch entry is one);
                                        beyond it: -32001, HTTP 503, ``Retry-After: 1``;
                                        or an :class:`~resilient.AdaptiveLimit`
                                        (``AdaptiveLimit.gradient2()``) that moves with
                                        the handlers' latency
    ``max_body_size``         1 MiB     bytes of request body; beyond it: HTTP 413
    ``max_depth``             32        nesting of arrays and objects; beyond: -32600
    ``max_batch``             100       requests in a batch; beyond it: -32600
    ``max_deadline``          60 s      the longest budget a request gets, with or
                                        without a deadline header (``inf``: no cap)
    ========================  ========  ===============================================

    ``title`` and ``version`` name the API in the ``rpc.discover`` document;
    ``tracer_provider`` records SERVER spans there instead of the global provider.
    """

    def __init__(
        self,
        path: str = "/",
        *,
        max_concurrent: int | AdaptiveLimit = 100,
        max_body_size: int = 1 << 20,
        max_depth: int = 32,
        max_batch: int = 100,
        max_deadline: float | timedelta = 60.0,
        title: str = "resilient.rpc",
        version: str = "0.0.0",
        tracer_provider: Any = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must be a URL path starting with '/', got {path!r}")
        self.path = path
        self.max_concurrent: int | AdaptiveLimit = max_concurrent
        if not isinstance(max_concurrent, AdaptiveLimit):
            check_int("max_concurrent", max_concurrent, minimum=1)
        self.max_body_size = check_int("max_body_size", max_body_size, minimum=1)
        self.max_depth = check_int("max_depth", max_depth, minimum=2)
        self.max_batch = check_int("max_batch", max_batch, minimum=1)
        self.max_deadline = to_seconds(
            "max_deadline", max_deadline, allow_zero=False, allow_inf=True
        )
        self.title = title
        self.version = version
        self._bulkhead = Bulkhead(max_concurrent=max_concurrent, max_waiting=0, name="rpc-server")
        self._release = self._bulkhead.release_ticket
        self._methods: dict[str, _Method] = {}
        self._register(_Method(_DISCOVER, self._discover, idempotent=True, run_in_thread=False))
        self._document: dict[str, Any] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._telemetry = Telemetry(tracer_provider)
        self._traces = provider_globals()[0]
        overload: dict[str, Any] = {"retry_after": OVERLOAD_RETRY_AFTER}
        if not isinstance(max_concurrent, AdaptiveLimit):  # an adaptive one would go stale
            overload["max_concurrent"] = max_concurrent
        self._overloaded = Overloaded(data=overload)
        self._too_large = _canned(
            413,
            f"the body is over max_body_size={max_body_size} bytes",
            (b"connection", b"close"),
        )

    def __repr__(self) -> str:
        return f"<resilient.rpc.Server path={self.path!r} methods={sorted(self._methods)!r}>"

    # Registration ----------------------------------------------------------------

    @overload
    def method(self, fn: F, /) -> F: ...

    @overload
    def method(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        idempotent: bool = False,
        run_in_thread: bool = True,
    ) -> Callable[[F], F]: ...

    def method(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        idempotent: bool = False,
        run_in_thread: bool = True,
    ) -> F | Callable[[F], F]:
        """Register a handler, sync or async, under ``name`` (its ``__name__`` by default).

        ``idempotent=True`` tells callers (through ``rpc.discover``) that the method
        is safe to retry or hedge. A sync handler runs in a worker thread, so it may
        block; ``run_in_thread=False`` runs it on the event loop instead, for a
        handler that never blocks (it saves the thread hand-off). Returns the
        function unchanged::

            @server.method(name="kv.get", idempotent=True)
            async def get(key: str) -> str | None: ...

        Names starting with ``rpc.`` are reserved by the specification, and names
        starting with ``_`` are refused: give such a function a public ``name=``.
        """

        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"a handler must be callable, got {type(fn).__name__}: {fn!r}")
            method_name = getattr(fn, "__name__", None) if name is None else name
            if not isinstance(method_name, str) or not method_name:
                raise ValueError(f"a method name must be a non-empty string, got {method_name!r}")
            if method_name.startswith("rpc."):
                raise ValueError(
                    f"method names starting with 'rpc.' are reserved by JSON-RPC 2.0, got "
                    f"{method_name!r}; pick another name"
                )
            if method_name.startswith("_"):
                raise ValueError(
                    f"method names starting with '_' are refused, got {method_name!r}; "
                    "give the handler a public name with name="
                )
            self._register(
                _Method(method_name, fn, idempotent=idempotent, run_in_thread=run_in_thread)
            )
            return fn

        return register if fn is None else register(fn)

    def _register(self, method: _Method) -> None:
        if method.name in self._methods:
            raise ValueError(f"a method named {method.name!r} is registered already")
        self._methods[method.name] = method
        self._document = None

    def is_idempotent(self, name: str) -> bool:
        """Whether the method ``name`` was registered ``idempotent=True`` (``False`` if unknown)."""
        method = self._methods.get(name)
        return method is not None and method.idempotent

    # ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        """The ASGI entry point: ``http`` requests, ``lifespan`` events."""
        kind = scope["type"]
        if kind != "http":
            await self._not_http(kind, receive, send)
            return
        if scope["path"] != self.path and not self._mounted_here(scope):
            await _respond(
                send,
                *_canned(404, f"no JSON-RPC endpoint at {scope['path']!r}; POST to {self.path!r}"),
            )
            return
        if scope["method"] != "POST":
            await _respond(send, *_NOT_POST)
            return
        content_type = length = resilient_timeout = grpc_timeout = connect_timeout = None
        headers = scope["headers"]
        for key, value in headers:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length = value
            elif key == _DEADLINE_HEADER:
                resilient_timeout = value
            elif key == b"grpc-timeout":
                grpc_timeout = value
            elif key == b"connect-timeout-ms":
                connect_timeout = value
        if not _protocol.content_type_ok(content_type):
            await _respond(send, *_BAD_TYPE)
            return
        if length is not None:
            if not length.isdigit():
                await _respond(send, *_BAD_LENGTH)
                return
            if int(length) > self.max_body_size:
                await _respond(send, *self._too_large)
                return
        when = _INF
        if resilient_timeout is None and grpc_timeout is None and connect_timeout is None:
            if self.max_deadline != _INF:
                when = _monotonic() + self.max_deadline
        else:
            try:
                budget = _protocol.deadline_from_headers(
                    resilient_timeout, grpc_timeout, connect_timeout, maximum=self.max_deadline
                )
            except ValueError as malformed:
                await _respond(send, *_canned(400, str(malformed)))
                return
            when = _monotonic() + budget  # finite: the header forms cap it
        body = await self._read(receive)
        if body is None:
            await _respond(send, *self._too_large)
            return
        parsed = _protocol.parse(body, max_depth=self.max_depth, max_batch=self.max_batch)
        if isinstance(parsed, Request):
            answer, error = await self._answer(parsed, when, headers)
            if answer is None:
                await _respond(send, 204, [], b"")
                return
            status = 200
            extra: list[tuple[bytes, bytes]] = [_JSON, (b"content-length", b"%d" % len(answer))]
            if isinstance(error, ServerError):
                status = error.HTTP_STATUS
                retry_after = retry_after_header(error)
                if retry_after is not None:
                    extra.append((b"retry-after", retry_after.encode()))
            await _respond(send, status, extra, answer)
        elif isinstance(parsed, bytes):
            await _respond(send, 200, [_JSON, (b"content-length", b"%d" % len(parsed))], parsed)
        else:
            await self._batch(parsed, when, headers, send)

    def _mounted_here(self, scope: ASGIScope) -> bool:
        """Whether ``path`` is this server's under the ``root_path`` it is mounted at.

        Starlette's ``Mount`` and ``uvicorn --root-path`` keep the prefix in ``path``
        (as the ASGI specification now says); older routers strip it. Both are served.
        """
        root = scope.get("root_path", "")
        path: str = scope["path"]
        if not root or not path.startswith(root):
            return False
        return (path[len(root) :] or "/") == self.path

    async def _not_http(self, kind: str, receive: Receive, send: Send) -> None:
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:  # lifespan.shutdown, the only other event
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003})  # JSON-RPC is HTTP only here
        else:
            raise ValueError(f"resilient.rpc.Server serves HTTP, got an ASGI {kind!r} scope")

    def close(self) -> None:
        """Let the worker threads of sync handlers go (done on ASGI lifespan shutdown)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` once it runs over ``max_body_size``."""
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return body if len(body) <= self.max_body_size else None
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _batch(
        self, entries: list[_protocol.Parsed], when: float, headers: Any, send: Send
    ) -> None:
        outcomes = iter(await self._run_batch(entries, when, headers))
        answers: list[bytes] = []
        retry_after = None
        for entry in entries:  # answers in the order of the requests
            if isinstance(entry, bytes):
                answers.append(entry)
                continue
            answer, error = next(outcomes)
            if answer is not None:
                answers.append(answer)
                if isinstance(error, Overloaded):
                    retry_after = retry_after_header(error)
        if not answers:
            await _respond(send, 204, [], b"")
            return
        body = b"[" + b",".join(answers) + b"]"
        extra = [_JSON, (b"content-length", b"%d" % len(body))]
        if retry_after is not None:
            extra.append((b"retry-after", retry_after.encode()))
        await _respond(send, 200, extra, body)

    async def _run_batch(
        self, entries: list[_protocol.Parsed], when: float, headers: Any
    ) -> list[tuple[bytes | None, RemoteError | None]]:
        """Run a batch's requests, concurrently where they wait; their outcomes, in order.

        A task per entry costs more than a handler that answers at once (gathering 100
        trivial calls took ~260 us, running them inline ~7 us), so entries run here, one
        after another, while they finish without waiting. The first that waits is driven
        on by this task, and every later entry gets a task of its own (in a copy of the
        batch's context as it was before any entry ran), so waiting entries overlap.
        """
        requests = [entry for entry in entries if type(entry) is Request]
        base = contextvars.copy_context()
        outcomes: list[tuple[bytes | None, RemoteError | None]] = []
        for index, request in enumerate(requests):
            coroutine = self._answer(request, when, headers)
            try:
                waiting_on = coroutine.send(None)
            except StopIteration as finished:
                outcomes.append(finished.value)
                continue
            loop = asyncio.get_running_loop()
            rest = [
                loop.create_task(self._answer(later, when, headers), context=base.copy())
                for later in requests[index + 1 :]
            ]
            try:
                outcomes.append(await resume_stepped(coroutine, waiting_on))
                outcomes.extend(await asyncio.gather(*rest))
            except BaseException:
                for task in rest:
                    task.cancel()
                raise
            break
        return outcomes

    # One request -------------------------------------------------------------------

    async def _answer(
        self, request: Request, when: float, headers: Any
    ) -> tuple[bytes | None, RemoteError | None]:
        """Run one request: its answer (``None`` for a notification) and its error, if any."""
        id = None if request.id is ABSENT else bytes(request.id)
        method = self._methods.get(request.method)
        if method is None:
            if id is None:
                return None, None
            return error_body(id, _NOT_FOUND_OBJECT), MethodNotFound()
        traces = self._traces
        if self._telemetry.explicit or traces._TRACER_PROVIDER is not None:
            tracer = self._telemetry.tracer()
            if tracer is not None:
                return await self._traced(tracer, method, request, id, when, headers)
        try:
            result = await self._call(method, request.params, when)
        except BaseException as raised:
            return _failed(raised, method.name, id)
        return (None if id is None else result_body(id, result)), None

    async def _traced(
        self,
        tracer: Any,
        method: _Method,
        request: Request,
        id: bytes | None,
        when: float,
        headers: Any,
    ) -> tuple[bytes | None, RemoteError | None]:
        from opentelemetry import propagate, trace

        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
        attributes: dict[str, str] = {
            "rpc.system": "jsonrpc",
            "rpc.method": method.name,
            "rpc.jsonrpc.version": "2.0",
        }
        if id is not None:
            attributes["rpc.jsonrpc.request_id"] = id.decode().strip('"')
        with tracer.start_as_current_span(
            method.name,
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self._call(method, request.params, when)
            except BaseException as raised:
                answer, error = _failed(raised, method.name, id)
                span.set_attribute("rpc.jsonrpc.error_code", error.code)
                span.set_attribute("rpc.jsonrpc.error_message", error.message)
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                if isinstance(error, InternalError):
                    span.record_exception(raised)
                return answer, error
            return (None if id is None else result_body(id, result)), None

    async def _call(self, method: _Method, params: msgspec.Raw, when: float) -> bytes:
        """Bind, admit and run one call; its encoded result, or it raises."""
        if when != _INF and when <= _monotonic():
            raise RemoteDeadlineExceeded(
                data="the request arrived with no time left; the handler did not run"
            )
        args, kwargs = method.signature.bind(params)
        ticket = self._bulkhead.try_acquire_ticket()
        if ticket is None:
            raise self._overloaded.with_traceback(None)
        if method.run_in_thread:
            return _encode(await self._in_thread(method.fn, args, kwargs, when, ticket))
        failed = None  # an adaptive limit learns from how the handler ended
        try:
            if when == _INF:
                result = method.fn(*args, **kwargs)
                if method.is_async:
                    result = await result
            else:
                token = narrow(when if when < current() else current())
                try:
                    result = method.fn(*args, **kwargs)
                    if method.is_async:
                        result = await _until(result, when)
                finally:
                    restore(token)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._release(ticket, failed)
            failed = None  # this frame is on its traceback
        return _encode(result)

    async def _in_thread(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        when: float,
        ticket: float,
    ) -> Any:
        """Run a sync handler in a worker thread; its slot is freed when the thread is done."""
        executor = self._executor
        if executor is None:
            executor = self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(32, (os.cpu_count() or 1) + 4),
                thread_name_prefix="resilient-rpc",
            )
        # Copied inside the deadline scope (when there is one): the thread sees it.
        try:
            if when == _INF:
                return await asyncio.wrap_future(self._submit(executor, fn, args, kwargs, ticket))
            async with deadline_at(when):
                return await asyncio.wrap_future(self._submit(executor, fn, args, kwargs, ticket))
        except (SystemExit, KeyboardInterrupt) as stopped:
            # Raised in the worker thread (sys.exit() in a handler), not at this
            # process: re-raised here, it would stop the event loop and the server.
            raise RuntimeError(
                f"the handler raised {type(stopped).__name__} in its worker thread"
            ) from stopped

    def _submit(
        self,
        executor: concurrent.futures.Executor,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ticket: float,
    ) -> concurrent.futures.Future[Any]:
        try:
            future = executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)
        except BaseException as exc:
            self._release(ticket, exc)
            raise
        # Cancelling the wait (the deadline) cannot stop a running thread: the slot
        # stays taken until the handler really returns.
        future.add_done_callback(lambda done: self._released(ticket, done))
        return future

    def _released(self, ticket: float, future: concurrent.futures.Future[Any]) -> None:
        # The executor's shutdown may cancel a queued handler: no outcome, as a cancellation.
        cancelled = future.cancelled()
        self._release(ticket, asyncio.CancelledError() if cancelled else future.exception())

    # rpc.discover ----------------------------------------------------------------

    def _discover(self) -> dict[str, Any]:
        """The OpenRPC document describing every registered method."""
        if self._document is None:
            self._document = _openrpc(self)
        return self._document


def _failed(raised: BaseException, name: str, id: bytes | None) -> tuple[bytes | None, RemoteError]:
    """The answer and error object for what a call raised; re-raises what must not be answered."""
    error = _as_remote(raised, name)
    if id is None:
        return None, error
    try:
        return error_body(id, error), error
    except Exception:  # the handler's own error data: anything msgspec cannot encode
        logger.error(
            "the handler for %r raised %r, whose data cannot be encoded as JSON; "
            "answered -32603 instead",
            name,
            raised,
            exc_info=True,
        )
        error = InternalError()
        return error_body(id, error), error


def _as_remote(raised: BaseException, name: str) -> RemoteError:
    """The error object for what a call raised; re-raises what must not be answered."""
    if isinstance(raised, RemoteError):
        code = raised.code
        if code not in RESERVED or code in SERVER_ERRORS or code == InvalidParams.CODE:
            return raised
        logger.error(
            "the handler for %r raised %r with the reserved code %d; answered -32603 instead "
            "(use a code outside -32768..-32000)",
            name,
            raised,
            code,
        )
        return InternalError()
    if isinstance(raised, DeadlineExceeded):
        return RemoteDeadlineExceeded(data="the deadline passed before the call finished")
    if isinstance(raised, CircuitOpenError):
        retry_after = raised.retry_after if math.isfinite(raised.retry_after) else None
        data = {"breaker": raised.name}
        if retry_after is not None:
            data["retry_after"] = retry_after  # type: ignore[assignment]
        return RemoteCircuitOpen(data=data, retry_after=retry_after)
    if isinstance(raised, BulkheadFull):
        return RemoteBulkheadFull(data={"bulkhead": raised.name})
    if isinstance(raised, RateLimited):
        retry_after = raised.retry_after
        if retry_after is not None and not math.isfinite(retry_after):
            retry_after = None
        data = {"limiter": raised.name}
        if retry_after is not None:
            data["retry_after"] = retry_after  # type: ignore[assignment]
        return RemoteRateLimited(data=data, retry_after=retry_after)
    if isinstance(raised, Exception):
        logger.error("the handler for %r failed", name, exc_info=raised)
        return InternalError()
    if isinstance(raised, asyncio.CancelledError) and not _being_cancelled():
        # Not this task's cancellation: the handler awaited something another task
        # cancelled, or raised it itself. Propagated, it would end the whole request.
        logger.error(
            "the handler for %r raised CancelledError while its task was not being cancelled",
            name,
            exc_info=raised,
        )
        return InternalError()
    raise raised  # this task's cancellation, KeyboardInterrupt: not an answer


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (``Task.cancelling()``).

    Counted when the error is, not before each call: that keeps the healthy path free
    of it, and a count already pending before the call only makes this re-raise.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _until(coroutine: Coroutine[Any, Any, Any], when: float) -> Any:
    """Await ``coroutine`` under the deadline ``when``, arming the timer only if it suspends.

    Most handlers of a fast service finish without ever waiting (a dict lookup, a
    computation): their first step runs here, under the deadline already set, and
    no timer is armed. Only one that suspends gets the cancelling scope, which
    then drives the rest of it in this same task.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    except BaseException:
        coroutine.close()
        raise
    async with Scope(_INF, at=when):
        return await resume_stepped(coroutine, waiting_on)


async def _respond(send: Send, status: int, headers: list[Any], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _openrpc(server: Server) -> dict[str, Any]:
    """Build the OpenRPC 1.2.6 document from the registered signatures."""
    methods = [m for m in server._methods.values() if m.name != _DISCOVER]
    types: list[Any] = []
    for method in methods:
        types.extend(method.signature.described)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    described = []
    position = 0
    for method in methods:
        signature = method.signature
        params = []
        for name in signature.parameters:
            params.append(
                {"name": name, "required": name in signature.required, "schema": schemas[position]}
            )
            position += 1
        entry: dict[str, Any] = {
            "name": method.name,
            "params": params,
            "result": {"name": "result", "schema": schemas[position]},
            "paramStructure": "either" if signature.by_position else "by-name",
            "x-idempotent": method.idempotent,
        }
        position += 1
        if method.description:
            entry["description"] = method.description
        described.append(entry)
    document: dict[str, Any] = {
        "openrpc": "1.2.6",
        "info": {"title": server.title, "version": server.version},
        "methods": described,
    }
    if components:
        document["components"] = {"schemas": components}
    return document
