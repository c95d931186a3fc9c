"""One deadline that flows everywhere, Go-``context`` style.

A deadline is an absolute ``time.monotonic()`` instant kept in a
:class:`contextvars.ContextVar`. :func:`deadline` opens a scope that sets it;
a nested scope can only shorten it (the earlier deadline wins), never extend
it. Every layer of `resilient` reads it: retries never sleep past it, each
attempt is clamped to it, and it crosses the wire as a header so a server can
honour the caller's budget.

In async code (``async with deadline(...)``) the scope cancels the awaited work
when the deadline passes and raises :class:`DeadlineExceeded` out of the scope;
a cancellation from outside still arrives as :class:`asyncio.CancelledError`.
Tasks created inside the scope copy the context, so they inherit the deadline.
The sync form ``with deadline(...)`` inside a coroutine sets the same deadline,
which every `resilient` driver honours (a Policy-wrapped async call is cancelled
at it), but it does not cancel plain awaits itself: only ``async with`` does.
Sync code cannot be interrupted: there the deadline is cooperative, read with
:func:`remaining` (``remaining(default=10.0)`` gives a finite timeout to hand to
a socket or an HTTP client when no deadline is in force) or enforced with
:func:`check_deadline`.

Threads do not inherit contextvars: work handed to ``executor.submit``,
``loop.run_in_executor`` or ``threading.Thread`` starts with no deadline.
Wrap it in :func:`carry` to take the caller's along (``asyncio.to_thread``
already does).

This module is the only one that touches the ContextVar. Drivers (the Policy's,
the transport's, yours) read and narrow the deadline through :func:`current`,
:func:`narrow` and :func:`restore`.

Public names: :func:`deadline` (relative, "within seconds"), :func:`deadline_at`
(absolute, "no later than"), :func:`remaining`, :func:`check_deadline`,
:func:`carry`, :func:`current`, :func:`narrow`, :func:`restore`,
:class:`DeadlineExceeded`, :data:`DEADLINE_HEADER`, :func:`format_deadline_header`,
:func:`parse_deadline_header`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import ParamSpec, TypeVar

from resilient._config import Duration, to_seconds
from resilient.errors import DeadlineExceeded

__all__ = [
    "CONNECT_TIMEOUT_HEADER",
    "DEADLINE_HEADER",
    "GRPC_TIMEOUT_HEADER",
    "DeadlineExceeded",
    "Scope",
    "carry",
    "check_deadline",
    "current",
    "deadline",
    "deadline_at",
    "format_deadline_header",
    "narrow",
    "parse_connect_timeout",
    "parse_deadline_header",
    "parse_grpc_timeout",
    "remaining",
    "restore",
]

_INF = math.inf

P = ParamSpec("P")
R = TypeVar("R")

#: The absolute monotonic deadline in force; ``inf`` when there is none.
_deadline: ContextVar[float] = ContextVar("resilient_deadline", default=_INF)


_get = _deadline.get
_set = _deadline.set


#: ``current()``: the deadline in force, an absolute ``time.monotonic()`` value
#: (``math.inf``: none). The ContextVar's own getter, so a driver reading it on every
#: call pays for no Python frame.
current: Callable[[], float] = _get


#: ``narrow(when)``: put ``when``, an absolute ``time.monotonic()`` instant no later
#: than :func:`current`, in force, and return the token for :func:`restore`. For
#: drivers bounding one attempt, which have just compared ``when`` with
#: :func:`current`: it is the ContextVar's own setter, so it checks nothing. Code
#: that opens a scope uses :func:`deadline` or :func:`deadline_at`, which never extend.
narrow: Callable[[float], Token[float]] = _set

#: ``restore(token)``: end a stretch begun with :func:`narrow`, in the same thread or
#: task; the deadline before it is in force again.
restore: Callable[[Token[float]], None] = _deadline.reset


def remaining(*, default: Duration | None = None) -> float:
    """Return the seconds left before the deadline in force: ``math.inf`` when there is none.

    Never negative: a deadline that has passed leaves ``0.0``.

    ``default`` (seconds, or a :class:`datetime.timedelta`; positive and finite)
    is returned instead of ``math.inf`` when no deadline is in force, for APIs
    that refuse an infinite timeout (sockets, httpx). It is a fallback, not a
    cap: under a deadline the seconds left are returned even if they are more
    (``min(remaining(), cap)`` caps)::

        response = httpx.get(url, timeout=resilient.remaining(default=10.0))

    ``socket.settimeout(0.0)`` means non-blocking, not "expired": call
    :func:`check_deadline` first where ``0.0`` would be taken that way.
    """
    when = _get()
    if default is not None:
        fallback = to_seconds("default", default, allow_zero=False)
        if when == _INF:
            return fallback
    elif when == _INF:
        return _INF
    left = when - time.monotonic()
    return left if left > 0.0 else 0.0


def check_deadline() -> None:
    """Raise :class:`DeadlineExceeded` if the deadline in force has passed.

    The cooperative check for sync code, which cannot be interrupted::

        with resilient.deadline(2.0):
            for row in rows:
                resilient.check_deadline()
                process(row)
    """
    when = _deadline.get()
    if when != _INF and time.monotonic() >= when:
        raise DeadlineExceeded(
            "the deadline passed; stop the work in progress or give the call a longer deadline"
        )


class Scope:
    """A deadline scope; use it through :func:`deadline`.

    ``deadline`` is the absolute monotonic instant in force inside the scope
    (the earlier of this scope's and the enclosing one's), computed on entry.
    """

    __slots__ = (
        "_at",
        "_cancelling",
        "_expired",
        "_handle",
        "_seconds",
        "_task",
        "_token",
        "deadline",
    )

    def __init__(self, seconds: float, at: float | None = None) -> None:
        self._seconds = seconds
        self._at = at
        self._token: Token[float] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False
        self.deadline = _INF

    def __repr__(self) -> str:
        return f"<resilient.deadline seconds={self._seconds!r} deadline={self.deadline!r}>"

    def _enter(self) -> None:
        if self._token is not None:
            raise RuntimeError("a deadline scope cannot be entered twice; create a new one")
        outer = _deadline.get()
        when = time.monotonic() + self._seconds if self._at is None else self._at
        self.deadline = when if when < outer else outer
        self._token = _deadline.set(self.deadline)

    def _exit(self) -> None:
        assert self._token is not None
        try:
            _deadline.reset(self._token)
        except ValueError:
            # The token belongs to the context the scope was entered in; another
            # thread or task runs in a context of its own.
            raise RuntimeError(
                "a deadline scope must be exited by the thread or task that entered it; "
                "close the with block where it was opened"
            ) from None

    def __enter__(self) -> Scope:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit()

    async def __aenter__(self) -> Scope:
        self._enter()
        if self.deadline != _INF:
            task = asyncio.current_task()
            if task is None:  # pragma: no cover - async with always runs inside a task
                raise RuntimeError("async with deadline() must run inside an asyncio task")
            loop = task.get_loop()
            self._task = task
            self._cancelling = task.cancelling()
            # The loop's clock need not be time.monotonic(), so convert through "seconds left".
            self._handle = loop.call_at(
                loop.time() + (self.deadline - time.monotonic()), self._on_deadline
            )
        return self

    def _on_deadline(self) -> None:
        # The loop runs this only while the task is suspended inside the scope: on exit
        # the handle is cancelled synchronously, before the task can suspend again.
        assert self._task is not None
        self._expired = True
        self._task.cancel(msg="resilient deadline exceeded")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            # First, whatever happens next: a timer left armed would cancel the
            # entering task later, wherever it had got to by then.
            self._handle.cancel()
        if self._task is not None and asyncio.current_task() is not self._task:
            raise RuntimeError(
                "a deadline scope must be exited by the task that entered it "
                f"({self._task.get_name()}); close the async with block where it was opened"
            )
        self._exit()
        if self._expired:
            assert self._task is not None
            # Only our own cancellation becomes DeadlineExceeded; one from outside
            # (counted in cancelling()) keeps propagating as CancelledError.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                what = f"of {self._seconds:g} s" if self._at is None else "set with deadline_at()"
                raise DeadlineExceeded(
                    f"the deadline {what} passed and the work inside the scope was cancelled"
                ) from exc


def deadline(seconds: Duration) -> Scope:
    """Open a scope in which the work must finish within ``seconds``.

    ``seconds`` is a number or a :class:`datetime.timedelta`; ``math.inf`` means no
    deadline of this scope's own (an enclosing one still applies). A nested scope
    never extends an enclosing one::

        with resilient.deadline(2.0):
            with resilient.deadline(10.0):
                resilient.remaining()   # <= 2.0

        async with resilient.deadline(0.5):
            await slow()                # cancelled at 0.5 s: DeadlineExceeded

    In a coroutine, prefer ``async with``: the sync form ``with deadline(...)``
    sets the deadline every `resilient` driver honours (a Policy-wrapped async
    call is cancelled at it), but does not itself cancel plain awaits such as
    ``await asyncio.sleep(5)``.
    """
    return Scope(to_seconds("seconds", seconds, allow_inf=True))


def deadline_at(when: float) -> Scope:
    """Open a scope that must finish no later than ``when``, a ``time.monotonic()`` instant.

    The absolute twin of :func:`deadline` (Go's ``WithDeadline``, trio's
    ``move_on_at``): a scope already past its instant expires at once. Like any
    scope it never extends an enclosing deadline; ``math.inf`` adds none::

        end = time.monotonic() + 5.0
        with resilient.deadline_at(end):
            ...
    """
    if not isinstance(when, int | float) or isinstance(when, bool):
        raise TypeError(
            f"when must be a time.monotonic() instant as a number, got {type(when).__name__}: "
            f"{when!r}"
        )
    if math.isnan(when):
        raise ValueError("when must be a time.monotonic() instant, got NaN")
    return Scope(math.inf, at=float(when))


def carry(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to the caller's contextvars, deadline included, to run in a thread.

    A thread starts with an empty context, so work handed to an executor or a
    thread would see no deadline. The context is copied when ``carry`` is
    called; each call of the result runs ``fn`` in a fresh copy of it, so calls
    may run concurrently and what one sets stays out of the others::

        with resilient.deadline(2.0):
            future = executor.submit(resilient.carry(fetch), key)
            threading.Thread(target=resilient.carry(fetch), args=(key,)).start()

        async with resilient.deadline(2.0):
            await loop.run_in_executor(None, resilient.carry(fetch), key)

    Coroutine functions are refused: a coroutine runs in the task that awaits
    it, and asyncio tasks copy the context already.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable, got {type(fn).__name__}: {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        raise TypeError(
            f"fn must be a plain function, got the coroutine function {fn!r}: asyncio tasks "
            "copy the context already; await it, or start it with asyncio.create_task()"
        )
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def carried(*args: P.args, **kwargs: P.kwargs) -> R:
        # A copy per call: one Context cannot be entered by two threads at once.
        return context.copy().run(fn, *args, **kwargs)

    return carried


# Deadline propagation over the wire -------------------------------------------------

#: The request header that carries the caller's remaining budget, in milliseconds.
DEADLINE_HEADER = "resilient-timeout-ms"

_MAX_HEADER_DIGITS = 12


def format_deadline_header(seconds: float) -> str:
    """Encode a remaining budget as the header value: whole milliseconds, rounded down.

    Rounding down keeps the server's budget within the caller's. ``inf`` has no
    encoding (send no header); negative and NaN are refused.
    """
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise TypeError(
            "seconds must be the budget left as a number of seconds, "
            f"got {type(seconds).__name__}: {seconds!r}"
        )
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
    if math.isinf(seconds):
        raise ValueError("an infinite budget has no header encoding; send no header instead")
    return str(int(seconds * 1000.0))


def _header_text(value: str | bytes, header: str) -> str:
    """A header value as text: bytes must be ASCII; any other type is a TypeError."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{header} must be ASCII, got {value!r}") from None
    if not isinstance(value, str):
        raise TypeError(
            f"value must be the {header} header value as str or bytes, "
            f"got {type(value).__name__}: {value!r}"
        )
    return value


#: gRPC's budget header: 1 to 8 ASCII digits and a unit, ``100m``, ``2S``.
GRPC_TIMEOUT_HEADER = "grpc-timeout"
#: The Connect protocol's budget header: 1 to 10 ASCII digits of milliseconds.
CONNECT_TIMEOUT_HEADER = "connect-timeout-ms"
_GRPC_UNITS: dict[str, float] = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}
_GRPC_DIGITS = 8
_CONNECT_DIGITS = 10


def parse_grpc_timeout(value: str | bytes, *, maximum: Duration = 300.0) -> float:
    """Decode a ``grpc-timeout`` value (``100m``, ``2S``) into seconds, clamped to ``maximum``.

    1 to 8 ASCII digits, then a unit: ``H``, ``M``, ``S``, ``m`` (milli), ``u``
    (micro) or ``n`` (nano), as gRPC's wire format has it.
    """
    limit = to_seconds("maximum", maximum, allow_zero=False)
    text = _header_text(value, GRPC_TIMEOUT_HEADER)
    digits, unit = text[:-1], _GRPC_UNITS.get(text[-1:])
    if unit is None or not (
        0 < len(digits) <= _GRPC_DIGITS and digits.isascii() and digits.isdigit()
    ):
        raise ValueError(
            f"{GRPC_TIMEOUT_HEADER} must be 1 to {_GRPC_DIGITS} ASCII digits and a unit "
            f"(H, M, S, m, u or n), got {text!r}"
        )
    seconds = int(digits) * unit
    return seconds if seconds < limit else limit


def parse_connect_timeout(value: str | bytes, *, maximum: Duration = 300.0) -> float:
    """Decode a ``connect-timeout-ms`` value (1 to 10 ASCII digits) into seconds, clamped."""
    limit = to_seconds("maximum", maximum, allow_zero=False)
    text = _header_text(value, CONNECT_TIMEOUT_HEADER)
    if not (0 < len(text) <= _CONNECT_DIGITS and text.isascii() and text.isdigit()):
        raise ValueError(
            f"{CONNECT_TIMEOUT_HEADER} must be 1 to {_CONNECT_DIGITS} ASCII digits "
            f"(milliseconds), got {text!r}"
        )
    seconds = int(text) / 1000.0
    return seconds if seconds < limit else limit


def parse_deadline_header(value: str | bytes, *, maximum: Duration = 300.0) -> float:
    """Decode a header value into seconds left, strictly.

    Only ASCII digits are accepted (no sign, spaces, underscores or other
    scripts' digits, which :func:`int` would take); the result is clamped to
    ``maximum`` seconds (positive and finite, or a :class:`datetime.timedelta`)
    so a caller cannot make a server hold work forever.
    ``0`` means the budget is already spent: the caller will not wait for the answer.
    """
    limit = to_seconds("maximum", maximum, allow_zero=False)
    value = _header_text(value, DEADLINE_HEADER)
    if not value or not (value.isascii() and value.isdigit()):
        raise ValueError(f"{DEADLINE_HEADER} must be ASCII digits (milliseconds), got {value!r}")
    if len(value) > _MAX_HEADER_DIGITS:
        return limit
    seconds = int(value) / 1000.0
    return seconds if seconds < limit else limit
