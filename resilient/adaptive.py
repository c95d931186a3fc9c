"""Adaptive concurrency limits: a bulkhead limit that finds itself from the calls it admits.

A fixed ``max_concurrent`` is a guess, and it goes stale as the dependency scales,
slows down or shares its capacity with other callers. An :class:`AdaptiveLimit`
measures instead: every call that held a slot reports how long it held it (its
round-trip time) and whether it was *dropped* (it timed out, or the other side said
it was overloaded), and the limit moves. It plugs into a bulkhead, or into the RPC
server's overload protection, where a fixed number would go::

    bulkhead = Bulkhead(max_concurrent=AdaptiveLimit.aimd(), max_waiting=32, name="db")
    server = resilient.rpc.Server(max_concurrent=AdaptiveLimit.gradient2())

Two algorithms, after Netflix's ``concurrency-limits`` (TCP congestion control
applied to RPC), each a sans-I/O core that takes ``now`` and never sleeps:

* :class:`AIMD`, for clients: additive increase while calls succeed with the limit
  in use, multiplicative decrease (``backoff_ratio`` 0.9) on a drop. It needs only
  drops, so it suits a caller that cannot tell a slow dependency from a busy one.
* :class:`Gradient2`, for servers: compares the recent round-trip time with a
  long-term average of it and shrinks the limit when calls queue up (the recent RTT
  rises past ``rtt_tolerance`` times the long-term one), growing it a little each
  window otherwise (``queue_size`` times ``smoothing``). It judges by latency alone.

What counts as a drop
---------------------
``drop_on`` decides, for a call that raised. By default (:func:`overloaded`) a
``TimeoutError`` (so :class:`~resilient.DeadlineExceeded`, the driver's attempt and
total timeouts, ``asyncio.TimeoutError``) and a refusal decided by the other side
of a wire (:class:`resilient.rpc.Overloaded` and the other remote refusals) are
drops. Any other error is *ignored*: the slot is freed and the limit learns nothing.
An application error says nothing about capacity, and a fast failure (a 404, a
validation error) would pass for a fast, healthy round trip and pull the latency
baseline down. A local refusal from a stage inside the bulkhead (an open breaker)
never reached the dependency, so it is ignored too. Pass exception types or a
predicate to change that, e.g. ``drop_on=(TimeoutError, httpx.TimeoutException)``.
A cancelled or interrupted call (``CancelledError``, ``KeyboardInterrupt``) is no
sample at all. A call that succeeded but took longer than AIMD's ``drop_after``
counts as a drop, as in Netflix's AIMD.

How the limit moves a bulkhead
------------------------------
A limit that shrinks below the calls in flight disturbs none of them: new callers
wait or are refused (as the bulkhead's ``max_waiting`` / ``max_wait`` say) until
enough calls have finished. A limit that grows wakes waiters at once. Each limit
belongs to one bulkhead; ``copy.copy(limit)`` makes a fresh one with the same
configuration. The current value is :attr:`AdaptiveLimit.limit`, and the metric
gauge ``resilient.bulkhead.limit`` when OpenTelemetry metrics are on
(:func:`live_limits` lists the limits in use).

Where it departs from Netflix
-----------------------------
Netflix's AIMD adds one to the limit for *every* successful call and divides it for
*every* drop. With many calls per round trip that doubles the limit each round trip
and then, when the burst of calls that started over the knee all time out together,
cuts it to the floor: run in a simulation like the one in ``tests/test_adaptive.py``,
it sawtoothed between the minimum and nearly twice the knee. :class:`AIMD` here does
what TCP Reno does: each success adds ``1 / limit`` (one per round trip's worth of
calls) and drops of calls that started before the last decrease are the same
congestion event, so they do not cut again (in that simulation it holds within
0.9-1.25 times the knee).
:class:`Gradient2` aggregates its samples into windows (``window`` seconds, at least
``window_samples`` calls), as Netflix's ``WindowedLimit`` does for it: a decision per
call, hundreds per round trip, only chases noise.

Public API: :class:`AdaptiveLimit`, :class:`AIMD`, :class:`Gradient2`, the
:class:`LimitAlgorithm` protocol for an algorithm of your own, :func:`overloaded`
(the default ``drop_on``) and :func:`live_limits`.
"""

from __future__ import annotations

import copy
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeAlias, cast, runtime_checkable

from resilient import _fork
from resilient._config import (
    DEFAULT,
    Default,
    Duration,
    check_int,
    check_number,
    describe,
    exception_types,
    rebuild,
    to_seconds,
)
from resilient.errors import ResilientError

__all__ = [
    "AIMD",
    "AdaptiveLimit",
    "DropFilter",
    "Gradient2",
    "LimitAlgorithm",
    "live_limits",
    "overloaded",
]

DropFilter: TypeAlias = (
    "type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]"
)
"""What ``drop_on=`` accepts: exception type(s), or a predicate taking the exception."""

_INF: Final = math.inf


def overloaded(error: Exception) -> bool:
    """Whether ``error`` says the dependency is overloaded: the default ``drop_on``.

    A ``TimeoutError`` (which :class:`~resilient.DeadlineExceeded` is), or a
    refusal the other side of a wire decided (``ResilientError`` with ``remote``
    and ``refusal`` set: :class:`resilient.rpc.Overloaded`, ``RemoteBulkheadFull``,
    ``RemoteRateLimited``, ``RemoteCircuitOpen``).
    """
    if isinstance(error, TimeoutError):
        return True
    return isinstance(error, ResilientError) and error.remote and error.refusal


@runtime_checkable
class LimitAlgorithm(Protocol):
    """A limit algorithm's core: pure decisions over samples, on an injected clock.

    :meth:`update` is called once per finished call, serialised by the bulkhead
    (never concurrently), and returns the new limit: an int from 1 to
    :attr:`max_limit`. ``copy.copy`` of an algorithm must give one with the same
    configuration and fresh state (the built-in ones pickle as their configuration).
    """

    @property
    def limit(self) -> int:
        """The current limit."""
        ...

    @property
    def max_limit(self) -> int:
        """The most the limit can ever be (a bulkhead sizes its slots by it)."""
        ...

    def update(
        self, *, now: float, started: float, rtt: float, inflight: int, dropped: bool
    ) -> int:
        """Learn from one call that took a slot at ``started`` and gave it back at ``now``.

        ``rtt`` is ``now - started``; ``inflight`` the calls holding slots as it
        ended, itself included; ``dropped`` whether it was a drop.
        """
        ...


def _check_bounds(initial_limit: object, min_limit: object, max_limit: object) -> None:
    check_int("min_limit", min_limit, minimum=1)
    check_int("max_limit", max_limit, minimum=1)
    check_int("initial_limit", initial_limit, minimum=1)
    assert isinstance(min_limit, int)
    assert isinstance(max_limit, int)
    assert isinstance(initial_limit, int)
    if min_limit > max_limit:
        raise ValueError(
            f"min_limit must not exceed max_limit, got min_limit={min_limit!r} "
            f"and max_limit={max_limit!r}"
        )
    if not min_limit <= initial_limit <= max_limit:
        raise ValueError(
            f"initial_limit must be between min_limit={min_limit!r} and "
            f"max_limit={max_limit!r}, got {initial_limit!r}"
        )


class AIMD:
    """Additive increase, multiplicative decrease: the client-side algorithm.

    On a drop (or a success slower than ``drop_after`` seconds) the limit is
    multiplied by ``backoff_ratio``, once per congestion event: drops of calls
    that had started before the last decrease do not cut it again. On a success
    while at least half the limit is in use (below that the caller, not the
    dependency, is what limits the calls, and success proves nothing) it grows by
    ``1 / limit``, so by one per round trip's worth of calls. It stays within
    ``min_limit`` and ``max_limit``. Defaults as Netflix's: 20, 20, 200, 0.9, 5 s.

    >>> aimd = AIMD(initial_limit=10, min_limit=1)
    >>> aimd.update(now=1.0, started=0.9, rtt=0.1, inflight=10, dropped=True)
    9
    """

    __slots__ = (
        "_backed_off_at",
        "_limit",
        "backoff_ratio",
        "drop_after",
        "initial_limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 20,
        max_limit: int = 200,
        backoff_ratio: float = 0.9,
        drop_after: Duration = 5.0,
    ) -> None:
        _check_bounds(initial_limit, min_limit, max_limit)
        self.initial_limit = initial_limit
        self.min_limit = min_limit
        self.max_limit = max_limit
        # Below 0.5 one drop would more than halve the limit (Netflix's bound too).
        self.backoff_ratio = check_number(
            "backoff_ratio", backoff_ratio, minimum=0.5, maximum=1.0, inclusive=True
        )
        if self.backoff_ratio == 1.0:
            raise ValueError("backoff_ratio must be below 1 (1 would never back off), got 1.0")
        self.drop_after = to_seconds("drop_after", drop_after, allow_zero=False, allow_inf=True)
        self._limit = float(initial_limit)
        self._backed_off_at = -_INF

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (type(self), self._config()))

    def _config(self) -> dict[str, Any]:
        return {
            "initial_limit": self.initial_limit,
            "min_limit": self.min_limit,
            "max_limit": self.max_limit,
            "backoff_ratio": self.backoff_ratio,
            "drop_after": self.drop_after,
        }

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"AIMD(limit={self.limit}, {settings})"

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._limit)

    def update(
        self, *, now: float, started: float, rtt: float, inflight: int, dropped: bool
    ) -> int:
        """Learn from one finished call (see :class:`LimitAlgorithm`); return the new limit."""
        limit = self._limit
        if dropped or rtt > self.drop_after:
            if started >= self._backed_off_at:
                self._limit = max(float(self.min_limit), limit * self.backoff_ratio)
                self._backed_off_at = now
        elif inflight * 2 >= limit:
            self._limit = min(float(self.max_limit), limit + 1.0 / limit)
        return int(self._limit)


class Gradient2:
    """Netflix's Gradient2: the server-side algorithm, judging by latency alone.

    Calls are gathered into windows of at least ``window`` seconds and
    ``window_samples`` calls (a shorter window is dropped, unused). At the end of
    each, its average RTT is the *short* RTT, and the *long* RTT is an exponential
    average of those over about ``long_window`` windows (a plain average over the
    first ten). Then, unless fewer than half the limit's calls were in flight (the
    callers limited the load, not the server)::

        gradient = clamp(rtt_tolerance * long / short, 0.5, 1.0)
        new = limit * gradient + queue_size
        limit = limit * (1 - smoothing) + new * smoothing      # within min / max

    so the limit grows by ``queue_size * smoothing`` a window while the short RTT
    stays within ``rtt_tolerance`` times the long one, and shrinks (by at most half,
    smoothed) once calls queue up. When the short RTT falls far below the long one
    (under half: the load that inflated it has gone) the long RTT decays by 5% a
    window, so the baseline comes back down. The long average does adapt: under
    load that lasts many windows it accepts the higher latency as normal.
    Defaults as Netflix's: 20, 20, 200, 0.2, 4, 1.5, 600 windows of 1 s and 10 calls.
    """

    __slots__ = (
        "_count",
        "_estimate",
        "_long",
        "_long_count",
        "_peak",
        "_sum",
        "_window_end",
        "initial_limit",
        "long_window",
        "max_limit",
        "min_limit",
        "queue_size",
        "rtt_tolerance",
        "smoothing",
        "window",
        "window_samples",
    )

    #: Windows over which the long RTT is a plain average before it turns exponential.
    WARMUP: Final = 10

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 20,
        max_limit: int = 200,
        smoothing: float = 0.2,
        queue_size: int = 4,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        window: Duration = 1.0,
        window_samples: int = 10,
    ) -> None:
        _check_bounds(initial_limit, min_limit, max_limit)
        self.initial_limit = initial_limit
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = check_number("smoothing", smoothing, minimum=0.0, maximum=1.0)
        if self.smoothing == 0.0:
            raise ValueError("smoothing must be greater than 0 (0 would never move), got 0")
        self.queue_size = check_int("queue_size", queue_size, minimum=0)
        self.rtt_tolerance = check_number("rtt_tolerance", rtt_tolerance, minimum=1.0)
        self.long_window = check_int("long_window", long_window, minimum=1)
        self.window = to_seconds("window", window, allow_zero=False)
        self.window_samples = check_int("window_samples", window_samples, minimum=1)
        self._estimate = float(initial_limit)
        self._long = 0.0
        self._long_count = 0
        self._count = 0
        self._sum = 0.0
        self._peak = 0
        self._window_end = _INF  # no window open until the first sample

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (type(self), self._config()))

    def _config(self) -> dict[str, Any]:
        return {
            "initial_limit": self.initial_limit,
            "min_limit": self.min_limit,
            "max_limit": self.max_limit,
            "smoothing": self.smoothing,
            "queue_size": self.queue_size,
            "rtt_tolerance": self.rtt_tolerance,
            "long_window": self.long_window,
            "window": self.window,
            "window_samples": self.window_samples,
        }

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"Gradient2(limit={self.limit}, {settings})"

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._estimate)

    @property
    def long_rtt(self) -> float:
        """The long-term RTT, in seconds (0 before the first window)."""
        return self._long

    def update(
        self, *, now: float, started: float, rtt: float, inflight: int, dropped: bool
    ) -> int:
        """Learn from one finished call (see :class:`LimitAlgorithm`); return the new limit."""
        if self._window_end == _INF:
            self._window_end = now + self.window
        self._count += 1
        self._sum += rtt
        if inflight > self._peak:
            self._peak = inflight
        if now < self._window_end:
            return int(self._estimate)
        count, total, peak = self._count, self._sum, self._peak
        self._count, self._sum, self._peak = 0, 0.0, 0
        self._window_end = now + self.window
        short = total / count
        if count < self.window_samples or short <= 0.0:
            return int(self._estimate)
        return self._close_window(short, peak)

    def _close_window(self, short: float, peak: int) -> int:
        if self._long_count < self.WARMUP:
            self._long_count += 1
            self._long += (short - self._long) / self._long_count
        else:
            factor = 2.0 / (self.long_window + 1)
            self._long += (short - self._long) * factor
        long = self._long
        if long > 2.0 * short:
            self._long = long = long * 0.95
        estimate = self._estimate
        if peak < estimate / 2:
            return int(estimate)
        gradient = max(0.5, min(1.0, self.rtt_tolerance * long / short))
        new = estimate * gradient + self.queue_size
        new = estimate * (1.0 - self.smoothing) + new * self.smoothing
        self._estimate = max(float(self.min_limit), min(float(self.max_limit), new))
        return int(self._estimate)


class AdaptiveLimit:
    """A concurrency limit that moves with the calls it admits; see the module docstring.

    ``algorithm`` decides (an :class:`AIMD`, a :class:`Gradient2`, or your own
    :class:`LimitAlgorithm`); ``drop_on`` says which errors are drops (exception
    types or a predicate; default :func:`overloaded`; other errors are ignored);
    ``clock`` is what round trips are timed with (inject a
    :class:`~resilient.testing.FakeClock` in tests). :meth:`aimd` and
    :meth:`gradient2` build one with their algorithm::

        Bulkhead(max_concurrent=AdaptiveLimit.aimd(min_limit=4, max_limit=64))

    It pickles as its configuration, with a fresh algorithm.
    """

    __slots__ = ("__weakref__", "_algorithm", "_clock", "_drop_on", "_drops", "_owner")

    def __init__(
        self,
        *,
        algorithm: LimitAlgorithm,
        drop_on: DropFilter | Default = DEFAULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(algorithm, LimitAlgorithm):
            raise TypeError(
                "algorithm must be a resilient.AIMD, a resilient.Gradient2 or a LimitAlgorithm "
                f"(limit, max_limit, update(...)), got {algorithm!r}"
            )
        check_int("algorithm.max_limit", algorithm.max_limit, minimum=1)
        limit = check_int("algorithm.limit", algorithm.limit, minimum=1)
        if limit > algorithm.max_limit:
            raise ValueError(
                f"algorithm.limit must not exceed algorithm.max_limit={algorithm.max_limit!r}, "
                f"got {limit!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        sample = clock()
        if type(sample) is not float:
            # A bulkhead's tickets are the clock's readings, and it takes only a float
            # for one of its own: any other would silently teach the limit nothing.
            raise TypeError(
                f"clock must return seconds as a float (as time.monotonic does), got "
                f"{type(sample).__name__}: {sample!r} from {clock!r}"
            )
        self._algorithm = algorithm
        self._clock = clock
        self._drop_on: DropFilter | Default = drop_on
        self._drops = _drop_predicate(drop_on)
        self._owner: str | None = None

    @classmethod
    def aimd(
        cls,
        *,
        initial_limit: int = 20,
        min_limit: int = 20,
        max_limit: int = 200,
        backoff_ratio: float = 0.9,
        drop_after: Duration = 5.0,
        drop_on: DropFilter | Default = DEFAULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> AdaptiveLimit:
        """An adaptive limit run by :class:`AIMD` (for clients); the settings are its."""
        algorithm = AIMD(
            initial_limit=initial_limit,
            min_limit=min_limit,
            max_limit=max_limit,
            backoff_ratio=backoff_ratio,
            drop_after=drop_after,
        )
        return cls(algorithm=algorithm, drop_on=drop_on, clock=clock)

    @classmethod
    def gradient2(
        cls,
        *,
        initial_limit: int = 20,
        min_limit: int = 20,
        max_limit: int = 200,
        smoothing: float = 0.2,
        queue_size: int = 4,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        window: Duration = 1.0,
        window_samples: int = 10,
        drop_on: DropFilter | Default = DEFAULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> AdaptiveLimit:
        """An adaptive limit run by :class:`Gradient2` (for servers); the settings are its."""
        algorithm = Gradient2(
            initial_limit=initial_limit,
            min_limit=min_limit,
            max_limit=max_limit,
            smoothing=smoothing,
            queue_size=queue_size,
            rtt_tolerance=rtt_tolerance,
            long_window=long_window,
            window=window,
            window_samples=window_samples,
        )
        return cls(algorithm=algorithm, drop_on=drop_on, clock=clock)

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration, with a fresh algorithm: what it learnt is about this
        # process's calls, and a copy is not attached to any bulkhead.
        config = {
            "algorithm": copy.copy(self._algorithm),
            "drop_on": self._drop_on,
            "clock": self._clock,
        }
        return (rebuild, (type(self), config))

    def __repr__(self) -> str:
        owner = "" if self._owner is None else f"bulkhead={self._owner!r}, "
        drop_on = "overloaded" if isinstance(self._drop_on, Default) else describe(self._drop_on)
        return (
            f"AdaptiveLimit({owner}limit={self.limit}, algorithm={self._algorithm!r}, "
            f"drop_on={drop_on})"
        )

    @property
    def limit(self) -> int:
        """The current limit: how many calls may hold a slot at once now."""
        return self._algorithm.limit

    @property
    def max_limit(self) -> int:
        """The most the limit can ever be."""
        return self._algorithm.max_limit

    @property
    def algorithm(self) -> LimitAlgorithm:
        """The algorithm moving the limit."""
        return self._algorithm

    @property
    def clock(self) -> Callable[[], float]:
        """The clock round trips are timed with."""
        return self._clock

    @property
    def owner(self) -> str | None:
        """The name of the bulkhead this limit belongs to, or ``None`` before it is used."""
        return self._owner

    def is_drop(self, error: Exception) -> bool:
        """Whether a call that raised ``error`` counts as a drop (else it is ignored)."""
        return self._drops(error)

    # -- for the bulkhead that owns it -------------------------------------------

    def _attach(self, owner: str) -> None:
        """Make this limit ``owner``'s; once only (two bulkheads cannot share one)."""
        with _live_lock:
            if self._owner is not None:
                raise ValueError(
                    f"this AdaptiveLimit already limits bulkhead {self._owner!r}: each bulkhead "
                    "needs its own, since the limit learns from its calls alone; "
                    "copy.copy(limit) makes a fresh one with the same settings"
                )
            self._owner = owner
            _live.add(self)

    def _judge(self, error: BaseException | None) -> bool | None:
        """A finished call's sample: ``False`` success, ``True`` drop, ``None`` no sample."""
        if error is None:
            return False
        if not isinstance(error, Exception):
            return None  # cancelled or interrupted: no outcome at all
        return True if self._drops(error) else None


def _drop_predicate(drop_on: object) -> Callable[[Exception], bool]:
    if isinstance(drop_on, Default):
        return overloaded
    types = exception_types(
        "drop_on",
        drop_on,
        if_empty="; to count no error as a drop, pass a predicate that returns False",
    )
    if types is None:
        return cast("Callable[[Exception], bool]", drop_on)
    return _instance_of(types)


class _instance_of:
    """``drop_on=`` exception types as a predicate (picklable, unlike a lambda)."""

    __slots__ = ("types",)

    def __init__(self, types: tuple[type[BaseException], ...]) -> None:
        self.types = types

    def __call__(self, error: Exception) -> bool:
        return isinstance(error, self.types)


# The limits attached to a bulkhead and alive, for the metrics gauge.
_live: weakref.WeakSet[AdaptiveLimit] = weakref.WeakSet()
_live_lock = threading.Lock()
_fork.register_lock(_live_lock)


def live_limits() -> list[AdaptiveLimit]:
    """The adaptive limits in use by a bulkhead (or an RPC server) in this process."""
    with _live_lock:
        return list(_live)
