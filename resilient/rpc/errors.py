"""JSON-RPC 2.0 errors, as the server sends them and the client raises them.

One class per error code, on both sides of the wire: a handler raises
:class:`RemoteError` (or a subclass) to answer with an error object, and the
client raises the same class when it reads one. The tree::

    ResilientError
    └── RPCError                          anything resilient.rpc decided to raise
        ├── ProtocolError                 the peer's answer is not JSON-RPC 2.0
        └── RemoteError (.code, .message, .data)   an error object, sent or received
            ├── ParseError                -32700  the body is not JSON
            ├── InvalidRequest            -32600  not a JSON-RPC 2.0 request object
            ├── MethodNotFound            -32601
            ├── InvalidParams             -32602  data names the parameter and why
            ├── InternalError             -32603  the handler failed (logged server side)
            ├── RemoteDeadlineExceeded    -32000  also a DeadlineExceeded   HTTP 504
            ├── Overloaded                -32001  .retry_after              HTTP 503
            ├── RemoteCircuitOpen         -32002  .retry_after              HTTP 503
            ├── RemoteBulkheadFull        -32003  .retry_after              HTTP 503
            └── RemoteRateLimited         -32004  also a RateLimited        HTTP 429

The server's own codes sit in the range the specification reserves for
implementation-defined server errors (-32000 to -32099); :data:`SERVER_ERRORS`
maps each to its class and the HTTP status a single request answered with it
gets (a batch is always HTTP 200: its entries may differ). Application errors
use any other code outside -32768 to -32000.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Final, NamedTuple

from resilient.errors import DeadlineExceeded, RateLimited, ResilientError

__all__ = [
    "RESERVED",
    "SERVER_ERRORS",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "Overloaded",
    "ParseError",
    "ProtocolError",
    "RPCError",
    "RemoteBulkheadFull",
    "RemoteCircuitOpen",
    "RemoteDeadlineExceeded",
    "RemoteError",
    "RemoteRateLimited",
    "ServerError",
    "error_for",
    "retry_after_header",
]

#: The codes the JSON-RPC 2.0 specification reserves (inclusive): an application error
#: may not use them.
RESERVED: Final = range(-32768, -32000 + 1)


class RPCError(ResilientError):
    """Base class of every error :mod:`resilient.rpc` raises."""

    # About the other side of the wire: a Retry may retry one when its ``on`` says so.
    remote = True
    # An application's or a protocol's error, not a refusal: a Fallback's default
    # leaves it alone (the server's own refusals, ServerError, are refusals).
    refusal = False


class ProtocolError(RPCError):
    """The peer's answer is not a JSON-RPC 2.0 response (bad JSON, wrong shape, wrong id)."""


class RemoteError(RPCError):
    """A JSON-RPC error object: ``code``, ``message`` and optional ``data``.

    A handler raises it to answer with an application error (any integer code
    outside :data:`RESERVED`); the client raises it (or the subclass for the
    code) when the answer is an error. ``data`` is any JSON value, ``None`` when
    absent.
    """

    #: The code of this class's errors; ``None`` on RemoteError itself (any code).
    CODE: ClassVar[int | None] = None

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        if not isinstance(code, int) or isinstance(code, bool):
            raise TypeError(f"code must be an int, got {type(code).__name__}: {code!r}")
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, got {type(message).__name__}: {message!r}")
        # Exception's own __init__: a subclass may also be a DeadlineExceeded, whose
        # __init__ takes a message only.
        Exception.__init__(self, code, message, data)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        text = f"{self.message} (JSON-RPC error {self.code})"
        return text if self.data is None else f"{text}: {self.data!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (error_for, (self.code, self.message, self.data), self.__dict__)


class _Coded(RemoteError):
    """A RemoteError whose class fixes the code."""

    CODE: ClassVar[int | None]
    #: The message sent when none is given.
    MESSAGE: ClassVar[str]

    def __init__(self, message: str | None = None, data: Any = None) -> None:
        assert self.CODE is not None
        super().__init__(self.CODE, self.MESSAGE if message is None else message, data)


class ParseError(_Coded):
    """The request body is not valid JSON (or not UTF-8)."""

    CODE = -32700
    MESSAGE = "Parse error"


class InvalidRequest(_Coded):
    """The JSON is not a valid JSON-RPC 2.0 request object."""

    CODE = -32600
    MESSAGE = "Invalid Request"


class MethodNotFound(_Coded):
    """No method of that name is registered (or the name is reserved)."""

    CODE = -32601
    MESSAGE = "Method not found"


class InvalidParams(_Coded):
    """The params do not bind to the method's signature or its annotations."""

    CODE = -32602
    MESSAGE = "Invalid params"


class InternalError(_Coded):
    """The server failed while handling the request; the details are in its log."""

    CODE = -32603
    MESSAGE = "Internal error"


class ServerError(_Coded):
    """Base of the server's own errors (codes -32000 to -32099), each with an HTTP status."""

    refusal = True  # the server shed or stopped the call

    CODE: ClassVar[int | None] = None
    #: The HTTP status a single request answered with this error gets.
    HTTP_STATUS: ClassVar[int]

    def __init__(
        self, message: str | None = None, data: Any = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message, data)
        if retry_after is None and isinstance(data, dict):
            sent = data.get("retry_after")
            if isinstance(sent, int | float) and not isinstance(sent, bool) and sent >= 0:
                retry_after = float(sent)
        #: Seconds the server asked the caller to wait before trying again, if it said.
        self.retry_after = retry_after


class RemoteDeadlineExceeded(ServerError, DeadlineExceeded):
    """The caller's deadline passed on the server: the handler was stopped or never ran.

    Also a :class:`~resilient.DeadlineExceeded`, so ``except DeadlineExceeded``
    catches a deadline that ran out on either side of the wire.
    """

    CODE = -32000
    MESSAGE = "Deadline exceeded"
    HTTP_STATUS = 504


class Overloaded(ServerError):
    """The server is at its concurrency limit and shed the request without running it."""

    CODE = -32001
    MESSAGE = "Server overloaded"
    HTTP_STATUS = 503


class RemoteCircuitOpen(ServerError):
    """A circuit breaker on the server refused the call without running it."""

    CODE = -32002
    MESSAGE = "Circuit open"
    HTTP_STATUS = 503


class RemoteBulkheadFull(ServerError):
    """A bulkhead on the server had no free slot for the call."""

    CODE = -32003
    MESSAGE = "Bulkhead full"
    HTTP_STATUS = 503


class RemoteRateLimited(ServerError, RateLimited):
    """The server's rate limit refused the call; ``retry_after`` says when to try again.

    Also a :class:`~resilient.RateLimited`, so ``except RateLimited`` catches a limit
    hit on either side of the wire. ``retry_after`` is ``None`` when the server did not
    say; ``name`` is the server's limiter, or ``"remote"`` when it did not say.
    """

    CODE = -32004
    MESSAGE = "Rate limited"
    HTTP_STATUS = 429

    def __init__(
        self, message: str | None = None, data: Any = None, *, retry_after: float | None = None
    ) -> None:
        # ServerError's __init__ alone: RemoteError calls Exception.__init__ directly, so
        # RateLimited's (name, retry_after) __init__ is never reached through the MRO.
        super().__init__(message, data, retry_after=retry_after)
        limiter = data.get("limiter") if isinstance(data, dict) else None
        self.name = limiter if isinstance(limiter, str) else "remote"


class _Entry(NamedTuple):
    cls: type[RemoteError]
    http_status: int


_STANDARD: Final[tuple[type[_Coded], ...]] = (
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    InternalError,
)
_SERVER: Final[tuple[type[ServerError], ...]] = (
    RemoteDeadlineExceeded,
    Overloaded,
    RemoteCircuitOpen,
    RemoteBulkheadFull,
    RemoteRateLimited,
)

#: The server's own error codes: code -> (class, HTTP status of a single request).
SERVER_ERRORS: Final[dict[int, _Entry]] = {
    cls.CODE: _Entry(cls, cls.HTTP_STATUS) for cls in _SERVER if cls.CODE is not None
}

_BY_CODE: Final[dict[int, type[_Coded]]] = {
    cls.CODE: cls for cls in (*_STANDARD, *_SERVER) if cls.CODE is not None
}


def error_for(code: int, message: str, data: Any = None) -> RemoteError:
    """The error for an error object read off the wire: the class of its code, if known."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message, data)
    return cls(message, data)


def retry_after_header(error: RemoteError) -> str | None:
    """The ``Retry-After`` value (whole seconds, rounded up) for a server error, if any."""
    seconds = getattr(error, "retry_after", None)
    if seconds is None or not math.isfinite(seconds):
        return None
    return str(max(0, math.ceil(seconds)))
