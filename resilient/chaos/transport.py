"""httpx transports that inject the failures of a network and a sick server.

:class:`ChaosTransport` wraps an ``httpx.BaseTransport`` and
:class:`AsyncChaosTransport` an ``httpx.AsyncBaseTransport``. Put one *under* the
resilient transport, so its retries, breakers and ``Retry-After`` handling meet the
faults::

    chaos = AsyncChaosTransport(status_rate=0.3, status=503, retry_after=1, random=7)
    client = httpx.AsyncClient(transport=AsyncResilientTransport(chaos))

Per request, at most one of three failures, with these probabilities (their sum
at most 1, one draw picks):

* ``connect_error_rate``: ``httpx.ConnectError``; the request is not sent.
* ``read_timeout_rate``: the request *is* sent (the server sees and may act on it),
  its answer is dropped and ``httpx.ReadTimeout`` raised: what a too-slow answer
  does, and why only idempotent requests may be retried after one.
* ``status_rate``: a ``status`` answer (default 503; any 4xx or 5xx), with a
  ``Retry-After: retry_after`` header when ``retry_after`` is given (whole
  seconds); the request is not sent.

And, drawn separately, ``latency_rate`` of the requests wait ``delay`` seconds
first. The wait is bounded like a slow server's: by the deadline in force and by
the request's read timeout (the resilient transport clamps it to the attempt's
budget). When ``delay`` would pass either, the transport waits until then and
raises ``httpx.ReadTimeout`` (the request is not sent). Waits go through the
drivers' sleep, so :func:`resilient.testing.record_sleeps` records them.

``enabled`` and ``random`` are as for the chaos stages (:mod:`resilient.chaos.faults`);
``injected`` counts what was injected, per kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

import httpx

from resilient import _driver
from resilient._config import Duration, check_int, to_seconds
from resilient.chaos._dice import Dice, check_rate
from resilient.deadline import remaining

__all__ = ["AsyncChaosTransport", "ChaosTransport"]

_CONNECT: Final = "connect_error"
_READ: Final = "read_timeout"
_STATUS: Final = "status"
_LATENCY: Final = "latency"
_KINDS: Final = (_CONNECT, _READ, _STATUS, _LATENCY)


class _Plan:
    """The decisions, sans I/O: what to do to one request. Both transports drive it."""

    def __init__(
        self,
        *,
        connect_error_rate: float,
        read_timeout_rate: float,
        status_rate: float,
        status: int,
        retry_after: int | None,
        latency_rate: float,
        delay: Duration | None,
        enabled: bool | Callable[[], bool],
        random: Any,
    ) -> None:
        self.connect_error_rate = check_rate("connect_error_rate", connect_error_rate)
        self.read_timeout_rate = check_rate("read_timeout_rate", read_timeout_rate)
        self.status_rate = check_rate("status_rate", status_rate)
        failing = self.connect_error_rate + self.read_timeout_rate + self.status_rate
        if failing > 1.0 + 1e-12:
            raise ValueError(
                "connect_error_rate + read_timeout_rate + status_rate must be at most 1 (each "
                f"request gets at most one of them), got {failing:g}"
            )
        self.status = check_int("status", status, minimum=400)
        if self.status > 599:
            raise ValueError(f"status must be a 4xx or 5xx status code, got {status!r}")
        if self.status != 503 and self.status_rate == 0.0:
            raise ValueError(
                f"status={status!r} is answered only to a share status_rate of the requests; "
                "give status_rate too (1.0 for every request)"
            )
        if retry_after is not None:
            retry_after = check_int("retry_after", retry_after, minimum=0)
            if self.status_rate == 0.0:
                raise ValueError(
                    f"retry_after={retry_after!r} is sent only with an injected status; "
                    "give status_rate too"
                )
        self.retry_after = retry_after
        self.latency_rate = check_rate("latency_rate", latency_rate)
        if delay is None:
            if self.latency_rate:
                raise ValueError(
                    f"latency_rate={latency_rate!r} needs delay= (the seconds to wait)"
                )
            self.delay = 0.0
        else:
            self.delay = to_seconds("delay", delay, allow_zero=False)
            if not self.latency_rate:
                raise ValueError(
                    f"delay={delay!r} is waited only with latency_rate greater than 0; "
                    "give latency_rate too"
                )
        self._dice = Dice(enabled=enabled, random=random)
        self._counts = dict.fromkeys(_KINDS, 0)
        self._bounds = (
            self.connect_error_rate,
            self.connect_error_rate + self.read_timeout_rate,
            failing,
        )

    def decide(self, request: httpx.Request) -> tuple[float, bool, str | None]:
        """``(seconds to wait first, whether that wait times out, the failure or None)``."""
        draw = self._dice.roll()
        if draw is None:
            return 0.0, False, None
        wait, overran = 0.0, False
        # The latency's own draw follows the failure's (only when latency is configured).
        if self.latency_rate and self._dice.uniform(0.0, 1.0) < self.latency_rate:
            self._count(_LATENCY)
            timeouts = request.extensions.get("timeout") or {}
            read = timeouts.get("read")
            limit = remaining()
            if read is not None and read < limit:
                limit = read
            wait, overran = (self.delay, False) if self.delay < limit else (limit, True)
        connect, read_timeout, status = self._bounds
        if draw < connect:
            failure: str | None = _CONNECT
        elif draw < read_timeout:
            failure = _READ
        elif draw < status:
            failure = _STATUS
        else:
            return wait, overran, None
        if not overran:
            self._count(failure)  # type: ignore[arg-type]  # one of the three by now
        return wait, overran, failure

    def _count(self, kind: str) -> None:
        with self._dice._lock:
            self._counts[kind] += 1

    @property
    def injected(self) -> Mapping[str, int]:
        return MappingProxyType(dict(self._counts))

    def fail_before(self, request: httpx.Request, failure: str | None) -> httpx.Response | None:
        """Raise or answer for a failure that does not send the request; ``None``: send it."""
        if failure == _CONNECT:
            raise httpx.ConnectError(
                "injected by resilient.chaos.ChaosTransport: connection refused", request=request
            )
        if failure == _STATUS:
            headers = {"content-type": "text/plain"}
            if self.retry_after is not None:
                headers["retry-after"] = str(self.retry_after)
            return httpx.Response(
                self.status,
                headers=headers,
                content=b"injected by resilient.chaos.ChaosTransport",
                request=request,
            )
        return None

    @staticmethod
    def too_slow(request: httpx.Request, seconds: float) -> httpx.ReadTimeout:
        return httpx.ReadTimeout(
            f"injected by resilient.chaos.ChaosTransport: latency ran past the deadline or the "
            f"read timeout, after {seconds:.3f} s",
            request=request,
        )

    @staticmethod
    def timed_out(request: httpx.Request) -> httpx.ReadTimeout:
        return httpx.ReadTimeout(
            "injected by resilient.chaos.ChaosTransport: the answer did not come in time",
            request=request,
        )

    def describe(self) -> str:
        shown = [
            f"{name}={value!r}"
            for name, value in (
                ("connect_error_rate", self.connect_error_rate),
                ("read_timeout_rate", self.read_timeout_rate),
                ("status_rate", self.status_rate),
                ("latency_rate", self.latency_rate),
            )
            if value
        ]
        if self.status_rate:
            shown.append(f"status={self.status}")
        if self.retry_after is not None:
            shown.append(f"retry_after={self.retry_after}")
        if self.latency_rate:
            shown.append(f"delay={self.delay:g}")
        if self._dice.enabled is not True:
            shown.append(f"enabled={self._dice.enabled!r}")
        return ", ".join(shown)


Inner = TypeVar("Inner", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _Configured(Generic[Inner]):
    """The options both transports take; see :mod:`resilient.chaos.transport`."""

    _inner_type: type[Inner]
    _plan: _Plan

    def __init__(
        self,
        transport: Inner | None = None,
        *,
        connect_error_rate: float = 0.0,
        read_timeout_rate: float = 0.0,
        status_rate: float = 0.0,
        status: int = 503,
        retry_after: int | None = None,
        latency_rate: float = 0.0,
        delay: Duration | None = None,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        if transport is not None and not isinstance(transport, self._inner_type):
            raise TypeError(
                f"transport must be an httpx.{self._inner_type.__name__}, got {transport!r}"
            )
        self._plan = _Plan(
            connect_error_rate=connect_error_rate,
            read_timeout_rate=read_timeout_rate,
            status_rate=status_rate,
            status=status,
            retry_after=retry_after,
            latency_rate=latency_rate,
            delay=delay,
            enabled=enabled,
            random=random,
        )
        self._transport: Inner = self._default_inner() if transport is None else transport

    def _default_inner(self) -> Inner:
        raise NotImplementedError  # pragma: no cover

    @property
    def injected(self) -> Mapping[str, int]:
        """Counts so far: ``connect_error``, ``read_timeout``, ``status``, ``latency``."""
        return self._plan.injected

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._plan.describe()})"


class ChaosTransport(_Configured[httpx.BaseTransport], httpx.BaseTransport):
    """An httpx transport that injects failures into the requests it sends through another.

    ``transport`` is the one that sends (default ``httpx.HTTPTransport()``), closed
    with this one; the fault settings are in :mod:`resilient.chaos.transport`.
    """

    _inner_type = httpx.BaseTransport

    def _default_inner(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport, or fail it as planned."""
        plan = self._plan
        wait, overran, failure = plan.decide(request)
        if wait > 0.0:
            _driver.sleep(wait)
        if overran:
            raise plan.too_slow(request, wait)
        answer = plan.fail_before(request, failure)
        if answer is not None:
            return answer
        response = self._transport.handle_request(request)
        if failure == _READ:
            response.close()
            raise plan.timed_out(request)
        return response

    def close(self) -> None:
        """Close the inner transport."""
        self._transport.close()


class AsyncChaosTransport(_Configured[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """The async twin of :class:`ChaosTransport`, over an ``httpx.AsyncBaseTransport``."""

    _inner_type = httpx.AsyncBaseTransport

    def _default_inner(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport, or fail it as planned."""
        plan = self._plan
        wait, overran, failure = plan.decide(request)
        if wait > 0.0:
            await _driver.async_sleep(wait)
        if overran:
            raise plan.too_slow(request, wait)
        answer = plan.fail_before(request, failure)
        if answer is not None:
            return answer
        response = await self._transport.handle_async_request(request)
        if failure == _READ:
            await response.aclose()
            raise plan.timed_out(request)
        return response

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()
