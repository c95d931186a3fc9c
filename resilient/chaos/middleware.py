"""Server-side faults for any ASGI app: some requests answered late, some with an error.

:class:`FaultMiddleware` wraps an ASGI app (a :class:`resilient.rpc.Server`, FastAPI,
Starlette, a bare one). Each path prefix may get a :class:`ServerFault`: a share of
its requests wait ``delay`` seconds before the app sees them, and a share are
answered with ``status`` (503 by default, with ``Retry-After`` when asked) without
calling the app::

    app = FaultMiddleware(rpc_server, random=1)
    app.set("/", status_rate=0.3, retry_after=1)      # this node fails 30% of requests
    other = FaultMiddleware(rpc_server, routes={"/": ServerFault(latency_rate=1.0, delay=0.2)})

With no routes it does nothing but pass requests on: faults are off unless
configured. :meth:`FaultMiddleware.set`, :meth:`~FaultMiddleware.remove` and
:meth:`~FaultMiddleware.clear` change them while the server runs, from any thread
(a game day's control endpoint, a test); a request reads them once, when it
arrives. The longest matching prefix wins, matched on whole path segments
(``/api`` covers ``/api`` and ``/api/users``, not ``/apis``).

An injected answer drains the request body first and carries ``content-length``,
so the keep-alive connection serves the next request. Lifespan and WebSocket scopes
pass through untouched, and whatever the app raises reaches the server as before.
Latency is real time (``asyncio.sleep``): it is a slow server, not a test double.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from resilient._config import Duration, check_int, to_seconds
from resilient.chaos._dice import Dice, check_rate

__all__ = ["FaultMiddleware", "ServerFault"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerFault:
    """What one path prefix suffers: ``latency_rate`` wait ``delay``, ``status_rate`` fail.

    The latency and the status are drawn separately, so a request may be both late
    and failed. ``status`` is any 4xx or 5xx code; ``retry_after`` (whole seconds)
    adds a ``Retry-After`` header to it.
    """

    status_rate: float = 0.0
    status: int = 503
    retry_after: int | None = None
    latency_rate: float = 0.0
    delay: Duration = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "status_rate", check_rate("status_rate", self.status_rate))
        set_(self, "latency_rate", check_rate("latency_rate", self.latency_rate))
        status = check_int("status", self.status, minimum=400)
        if status > 599:
            raise ValueError(f"status must be a 4xx or 5xx status code, got {status!r}")
        if status != 503 and not self.status_rate:
            raise ValueError(
                f"status={status!r} is answered only to a share status_rate of the requests; "
                "give status_rate too (1.0 for every request)"
            )
        if self.retry_after is not None:
            check_int("retry_after", self.retry_after, minimum=0)
            if not self.status_rate:
                raise ValueError(
                    f"retry_after={self.retry_after!r} is sent only with an injected status; "
                    "give status_rate too"
                )
        delay = to_seconds("delay", self.delay)
        if bool(delay) != bool(self.latency_rate):
            raise ValueError(
                "latency_rate and delay go together: a share of requests waits delay seconds; "
                f"got latency_rate={self.latency_rate!r}, delay={self.delay!r}"
            )
        set_(self, "delay", delay)


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"a route is a URL path prefix starting with '/', got {prefix!r}")
    return prefix


def _covers(prefix: str, path: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


class FaultMiddleware:
    """Inject server-side faults per path prefix into an ASGI app; see the module docstring.

    * ``routes``: ``{prefix: ServerFault(...)}`` to start with (default none: off).
    * ``enabled``: ``True``, ``False`` or a zero-argument callable read per request.
    * ``random``: a ``random.Random`` or an ``int`` seed, for a reproducible run.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, ServerFault] | None = None,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {app!r}")
        self.app = app
        self._dice = Dice(enabled=enabled, random=random)
        self._lock = threading.Lock()
        self._routes: tuple[tuple[str, ServerFault], ...] = ()
        self._counts = {"status": 0, "latency": 0}
        for prefix, fault in (routes or {}).items():
            if not isinstance(fault, ServerFault):
                raise TypeError(
                    f"routes[{prefix!r}] must be a resilient.chaos.ServerFault, got {fault!r}"
                )
            self._put(_check_prefix(prefix), fault)

    # Run-time control ------------------------------------------------------------------

    def set(self, prefix: str, /, **settings: Any) -> ServerFault:
        """Give ``prefix`` the faults ``ServerFault(**settings)``, replacing any it had.

        >>> middleware.set("/", status_rate=0.3, status=503, retry_after=1)
        """
        fault = ServerFault(**settings)
        self._put(_check_prefix(prefix), fault)
        return fault

    def remove(self, prefix: str) -> None:
        """Take ``prefix``'s faults away (``KeyError`` if it has none)."""
        with self._lock:
            kept = tuple(entry for entry in self._routes if entry[0] != prefix)
            if len(kept) == len(self._routes):
                raise KeyError(f"no faults are set for {prefix!r}")
            self._routes = kept

    def clear(self) -> None:
        """Take every route's faults away: requests pass straight through."""
        with self._lock:
            self._routes = ()

    @property
    def routes(self) -> Mapping[str, ServerFault]:
        """The faults in force, per prefix (a read-only snapshot)."""
        return MappingProxyType(dict(self._routes))

    @property
    def injected(self) -> Mapping[str, int]:
        """How many requests got an injected ``status`` and how many a ``latency``."""
        return MappingProxyType(dict(self._counts))

    def _put(self, prefix: str, fault: ServerFault) -> None:
        with self._lock:
            routes = {**dict(self._routes), prefix: fault}
            # Longest first, so the first match is the most specific one.
            self._routes = tuple(sorted(routes.items(), key=lambda entry: -len(entry[0])))

    # ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self._routes
        if not routes or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        fault = next((fault for prefix, fault in routes if _covers(prefix, path)), None)
        if fault is None:
            await self.app(scope, receive, send)
            return
        dice = self._dice
        if fault.latency_rate and dice.hit(fault.latency_rate):
            self._count("latency")
            await asyncio.sleep(fault.delay)  # type: ignore[arg-type]  # seconds by now
        if fault.status_rate and dice.hit(fault.status_rate):
            self._count("status")
            await self._answer(fault, receive, send)
            return
        await self.app(scope, receive, send)

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1

    @staticmethod
    async def _answer(fault: ServerFault, receive: Receive, send: Send) -> None:
        while True:  # drain the body, so the connection can serve the next request
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: an answer now is an error in the server
            if not message.get("more_body", False):
                break
        body = json.dumps(
            {"detail": f"injected by resilient.chaos.FaultMiddleware: {fault.status}"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if fault.retry_after is not None:
            headers.append((b"retry-after", str(fault.retry_after).encode()))
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
