"""Server-side deadlines for any ASGI app: answer 504 when the caller's budget runs out.

:class:`DeadlineMiddleware` wraps an ASGI app (FastAPI, Starlette, or a bare one).
For each HTTP request it reads the caller's remaining budget from a request header,
runs the app with that deadline in force (so ``resilient`` calls made by the
endpoint are clamped to it), and when the deadline passes before the response has
started it cancels the endpoint and answers ``504`` itself, framed with
``content-length`` so the keep-alive connection serves the client's next request::

    app = DeadlineMiddleware(bare_asgi_app, max_deadline=30.0)
    api.add_middleware(DeadlineMiddleware, max_deadline=30.0)  # FastAPI, Starlette

The budget headers, all milliseconds or less, all meaning "time left now":

- ``resilient-timeout-ms`` (:data:`resilient.deadline.DEADLINE_HEADER`, what
  `resilient` clients send): 1 or more ASCII digits, any length
  (:func:`resilient.deadline.parse_deadline_header`).
- ``grpc-timeout``: 1 to 8 ASCII digits then a unit, ``H`` ``M`` ``S`` ``m`` ``u``
  ``n`` (hours down to nanoseconds): ``100m``, ``2S``.
- ``connect-timeout-ms`` (the Connect protocol): 1 to 10 ASCII digits.

Every value sent counts, whatever the header order and a repeated header
included: the shortest budget wins, and one malformed value is refused (below)
even when another is valid. Every budget is clamped to ``max_deadline``. A
request without any of them gets ``default`` (``None``: no deadline, and the
request goes straight to the app: the cost is one scan of the header list). A
malformed value is refused with ``400`` and a JSON body
``{"detail": "<header>: <why>, got '<value>'"}`` without calling the app: a
client whose budget cannot be read has a bug worth hearing about, and guessing a
budget for it would hide that. A budget of ``0`` is already spent: the request is
answered with ``status`` at once, without calling the app. WebSocket and lifespan
scopes pass through untouched.

What happens when the deadline passes:

- **Before the response started**: the endpoint's task is cancelled, anything it
  still sends is dropped, and the client gets ``status`` (504) with
  ``{"detail": ...}`` at once, even while the endpoint is still unwinding; the
  middleware then waits for that task to end (an exception other than
  cancellation raised while unwinding goes to the event loop's exception handler,
  since the answer is already out). The endpoint inherits the deadline, so its own
  timer for it (a ``resilient.deadline(...)`` scope, a `resilient` call clamped
  to it) may fire first: an endpoint that ends with an exception, before starting
  a response, once the deadline has passed gets the same 504, not a 500.
  A sync endpoint (a FastAPI ``def`` run in a thread pool) cannot be interrupted:
  the 504 still goes out on time and the thread runs on until the function
  returns. The middleware's own call returns at once when the thread's awaiter
  is cancelled directly (a plain FastAPI app); when an anyio task group sits in
  between (Starlette's ``BaseHTTPMiddleware``, ``@app.middleware("http")``),
  anyio shields that wait, and the call returns only when the thread does.
  Either way the thread sees the deadline (Starlette copies the context into
  it), so :func:`resilient.remaining` or :func:`resilient.check_deadline` there
  stop it early.
- **After the response started**: its status and headers are gone, so it cannot
  become a 504. The endpoint is cancelled, the rest of the body is not sent, and
  the middleware raises :class:`~resilient.errors.DeadlineExceeded`: an ASGI
  server takes an error after the start as an aborted response (uvicorn logs it
  and closes that connection), so the client sees a truncated response (httpx:
  ``RemoteProtocolError``), never a short body that looks complete.
- **After the response completed** (Starlette background tasks run inside the
  app call, after the answer): nothing is cancelled; the work finishes, with the
  passed deadline still in force for any `resilient` call it makes.

Error handling inside the app sees an endpoint's ``DeadlineExceeded`` first, and
a response it starts cannot become a 504. When the endpoint's own timer fires
before the middleware's, Starlette's ``ServerErrorMiddleware`` (the outermost
layer of every FastAPI and Starlette app) answers ``500``. Wrapping the app
outermost does not avoid that, since ``ServerErrorMiddleware`` is inside the
wrapped app: add the middleware to the app instead, after its other middleware,
with ``api.add_middleware(DeadlineMiddleware, ...)``. Only
``ServerErrorMiddleware`` is then outside it, and never sees the deadline. An
exception handler registered for ``DeadlineExceeded`` (or a middleware that
catches it) runs inside either way, and its answer is the app's choice.

The endpoint runs in a task of its own while a deadline is in force (a task and a
timer per such request, about 16 us in-process): the middleware must be free to answer while
the endpoint is still unwinding, and must not cancel work that runs after a
complete response. That task copies the request's context, deadline included,
but contextvars it sets are not seen by middleware outside this one.

Public names: :class:`DeadlineMiddleware`, :data:`GRPC_TIMEOUT_HEADER`,
:data:`CONNECT_TIMEOUT_HEADER` (and :data:`~resilient.deadline.DEADLINE_HEADER`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from resilient._config import Duration, to_seconds
from resilient.deadline import (
    CONNECT_TIMEOUT_HEADER,
    DEADLINE_HEADER,
    GRPC_TIMEOUT_HEADER,
    deadline,
    parse_connect_timeout,
    parse_deadline_header,
    parse_grpc_timeout,
)
from resilient.errors import DeadlineExceeded

__all__ = ["CONNECT_TIMEOUT_HEADER", "GRPC_TIMEOUT_HEADER", "DeadlineMiddleware"]

# The ASGI interfaces as plain aliases (as starlette.types has them).
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_SHOWN = 40  # how much of a malformed value the 400 echoes back
# How early a timer set for the deadline may fire: asyncio runs timers due within its
# clock's resolution, and other loops keep time in whole milliseconds (uvloop).
_EARLY = 0.001


class _Malformed(ValueError):
    def __init__(self, header: str, why: str, value: bytes) -> None:
        shown = value[:_SHOWN].decode("latin-1") + ("..." if len(value) > _SHOWN else "")
        super().__init__(f"{header}: {why}, got {shown!r}")


def _resilient_budget(value: bytes, limit: float) -> float:
    try:
        return parse_deadline_header(value, maximum=limit)
    except ValueError:
        raise _Malformed(DEADLINE_HEADER, "must be ASCII digits (milliseconds)", value) from None


def _grpc_budget(value: bytes, limit: float) -> float:
    try:
        return parse_grpc_timeout(value, maximum=limit)
    except ValueError:
        why = "must be 1 to 8 ASCII digits and a unit (H, M, S, m, u or n)"
        raise _Malformed(GRPC_TIMEOUT_HEADER, why, value) from None


def _connect_budget(value: bytes, limit: float) -> float:
    try:
        return parse_connect_timeout(value, maximum=limit)
    except ValueError:
        why = "must be 1 to 10 ASCII digits (milliseconds)"
        raise _Malformed(CONNECT_TIMEOUT_HEADER, why, value) from None


_PARSERS: dict[bytes, Callable[[bytes, float], float]] = {
    DEADLINE_HEADER.encode(): _resilient_budget,
    GRPC_TIMEOUT_HEADER.encode(): _grpc_budget,
    CONNECT_TIMEOUT_HEADER.encode(): _connect_budget,
}


async def _answer(send: _Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Response:
    """The app's ``send``, recording how far the response got; mute once the middleware answers."""

    __slots__ = ("_send", "complete", "muted", "started")

    def __init__(self, send: _Send) -> None:
        self._send = send
        self.started = False
        self.complete = False
        self.muted = False

    async def send(self, message: _Message) -> None:
        if self.muted:
            return
        kind = message["type"]
        # Recorded before the await: a message half-sent when the deadline passes counts.
        if kind == "http.response.start":
            self.started = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)


class DeadlineMiddleware:
    """Run each HTTP request within the caller's deadline; answer ``status`` when it passes.

    ``max_deadline`` (seconds or a :class:`datetime.timedelta`, positive, finite)
    caps every budget, so a caller cannot make the server hold work for long.
    ``default`` is the budget of a request that sends no budget header (``None``:
    no deadline); it may not exceed ``max_deadline``. ``status`` (400 to 599) is
    the answer when the deadline passes before the response starts. See the
    module docstring for what happens at the deadline::

        from fastapi import FastAPI
        from resilient.asgi import DeadlineMiddleware

        api = FastAPI()
        api.add_middleware(DeadlineMiddleware, max_deadline=30.0, default=10.0)

        app = DeadlineMiddleware(bare_asgi_app, max_deadline=30.0)

    With FastAPI or Starlette, add it as above, after the app's other middleware,
    rather than wrapping the app: that keeps the other middleware inside the
    deadline and the app's ``ServerErrorMiddleware`` outside, so an endpoint's
    ``DeadlineExceeded`` at the deadline is answered 504 rather than 500 (see the
    module docstring).
    """

    __slots__ = ("app", "default", "max_deadline", "status")

    def __init__(
        self,
        app: _App,
        *,
        max_deadline: Duration = 60.0,
        default: Duration | None = None,
        status: int = 504,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {type(app).__name__}: {app!r}")
        self.max_deadline = to_seconds("max_deadline", max_deadline, allow_zero=False)
        self.default: float | None = None
        if default is not None:
            self.default = to_seconds("default", default, allow_zero=False)
            if self.default > self.max_deadline:
                raise ValueError(
                    f"default must not exceed max_deadline ({self.max_deadline:g} s), "
                    f"got {default!r}; raise max_deadline or lower default"
                )
        if not isinstance(status, int) or isinstance(status, bool):
            raise TypeError(f"status must be an HTTP status code, got {type(status).__name__}")
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400 to 599), got {status!r}")
        self.app = app
        self.status = status

    def __repr__(self) -> str:
        return (
            f"DeadlineMiddleware({self.app!r}, max_deadline={self.max_deadline!r}, "
            f"default={self.default!r}, status={self.status!r})"
        )

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seconds = math.inf
        try:
            for name, value in scope["headers"]:
                parse = _PARSERS.get(name)
                if parse is not None:
                    budget = parse(value, self.max_deadline)
                    if budget < seconds:
                        seconds = budget
        except _Malformed as malformed:
            return await _answer(send, 400, str(malformed))
        if seconds == math.inf:
            if self.default is None:
                return await self.app(scope, receive, send)
            seconds = self.default
        if seconds <= 0.0:
            return await _answer(send, self.status, "the request arrived with no time left")
        return await self._within(seconds, scope, receive, send)

    async def _within(self, seconds: float, scope: _Scope, receive: _Receive, send: _Send) -> None:
        response = _Response(send)
        task: asyncio.Future[None] | None = None
        try:
            async with deadline(seconds) as scope_deadline:
                # The task copies the context here, so the endpoint sees the deadline.
                task = asyncio.ensure_future(self.app(scope, receive, response.send))
                await asyncio.wait((task,))
        except DeadlineExceeded:
            assert task is not None
            if not task.done():
                return await self._expire(task, response, seconds, send)
        except BaseException:
            # Cancelled from outside (the server shutting down): take the endpoint along.
            assert task is not None
            task.cancel()
            raise
        assert task is not None
        if (
            not response.started
            and not task.cancelled()
            and task.exception() is not None
            and time.monotonic() >= scope_deadline.deadline - _EARLY
        ):
            # The endpoint's own timer, set for this same deadline (its deadline() scope
            # or a resilient call clamped to it), fired first: still the caller's deadline.
            return await self._expire(task, response, seconds, send)
        return task.result()

    async def _expire(
        self, task: asyncio.Future[None], response: _Response, seconds: float, send: _Send
    ) -> None:
        if response.complete:
            # The answer is out; what runs now (background tasks) is no longer the caller's wait.
            await asyncio.wait((task,))
            return task.result()
        task.cancel()
        response.muted = True
        if not response.started:
            detail = f"the deadline of {seconds:g} s passed before the response was ready"
            await _answer(send, self.status, detail)
            await asyncio.wait((task,))
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, DeadlineExceeded):
                # Raising now would make the server drop the connection the 504 kept alive.
                asyncio.get_running_loop().call_exception_handler(
                    {
                        "message": "the endpoint raised while being cancelled at its deadline",
                        "exception": error,
                        "future": task,
                    }
                )
            return None
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: the DeadlineExceeded below says what happened
        raise DeadlineExceeded(
            f"the deadline of {seconds:g} s passed after the response had started; "
            "its body was cut short, so the server closes the connection"
        )
