"""Circuit breakers: stop calling a dependency that keeps failing, and probe it to see it recover.

A :class:`CircuitBreaker` watches the outcomes of the calls it guards and moves
between the states of :class:`BreakerState`::

    CLOSED ──trip──▶ OPEN ──reset_timeout──▶ HALF_OPEN ──success_threshold probes──▶ CLOSED
                      ▲                          │
                      └──────any probe fails─────┘

    isolate(): any state ──▶ ISOLATED (held open)      reset(): any state ──▶ CLOSED

* **Closed**: calls go through. It *trips* when ``failure_threshold``
  consecutive calls fail, or when the share of failures among the recent calls
  (a sliding window of ``window_size`` calls or ``window_duration`` seconds)
  reaches ``failure_rate``, once at least ``minimum_calls`` are in the window.
  Calls slower than ``slow_call_duration`` count as failures even if they
  returned. Exceptions matched by ``exclude`` are the caller's fault, not the
  dependency's, and count as successes.
* **Open**: calls are rejected at once with :class:`~resilient.CircuitOpenError`,
  whose ``retry_after`` says how many seconds remain until a probe is let through.
* **Half-open**: ``reset_timeout`` after opening (checked lazily, by the next
  call or :attr:`CircuitBreaker.state` read), up to ``half_open_max_calls``
  probe calls run at once, across all threads and asyncio tasks (a probe still
  running from an earlier half-open stay counts against it); everyone else
  is rejected at once with ``retry_after == 0.0``, because a probe slot may free
  up at any moment and nobody can say when. ``success_threshold`` successful
  probes close the breaker; one failed probe opens it again.
* **Isolated**: held open by :meth:`CircuitBreaker.isolate` until
  :meth:`CircuitBreaker.reset`; rejections carry ``retry_after == math.inf``.

Every state change starts the new state with fresh counters and is reported to
the breaker's ``listeners`` as a :class:`BreakerEvent`, and to every subscriber
of all breakers (:func:`subscribe`): the ``resilient.breaker`` logger is one
(WARNING when a breaker opens or is isolated, INFO otherwise), and
:mod:`resilient.tracing` another (an event on the current span, a metric).
:meth:`CircuitBreaker.metrics` returns a :class:`BreakerMetrics` snapshot, and
:func:`live_breakers` lists the breakers alive in this process.

How calls are driven
--------------------
The breaker never runs or awaits the protected call: it is a
:class:`~resilient.stages.Gate`, and :class:`resilient.Policy` drives it through
four methods around each attempt: ``before_call()`` admits the attempt (or
raises ``CircuitOpenError``) and returns a ticket, and exactly one of
``on_success(ticket)``, ``on_failure(ticket, exc)`` or ``on_abort(ticket)``
reports how it ended. ``on_abort`` is for cancellation and interrupts, which say
nothing about the dependency. No lock is held while the call runs. A closed
breaker with the default configuration takes no lock, reads no clock and
allocates nothing on a successful call: locks and the clock are for failures,
timing and state changes. Calling the breaker directly
(``@breaker``, :meth:`CircuitBreaker.call`, :meth:`CircuitBreaker.acall`) is the
same driver with this one stage.

Where the state lives
---------------------
All mutable state goes through a :class:`BreakerStore` (:mod:`resilient.breaker.store`);
the default is :class:`InMemoryBreakerStore`. The state machine here only decides;
the store keeps state, counters and the sliding window, and makes each step atomic.
A fleet shares one breaker through ``store=resilient.redis.RedisStore(client)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from resilient import _driver, _fork
from resilient._config import (
    DEFAULT,
    Default,
    Duration,
    check_int,
    check_number,
    rebuild,
    to_seconds,
)

# The states as module globals (cheaper to read than class attributes), shared with the store.
from resilient.breaker.store import (
    _CLOSED,
    _HALF_OPEN,
    _ISOLATED,
    _OPEN,
    BreakerSpec,
    BreakerState,
    BreakerStore,
    BreakerStoreFactory,
    InMemoryBreakerStore,
    StoreFactory,
    StoreSnapshot,
    WindowSpec,
    _build_store,
)
from resilient.errors import PROGRAMMING_ERRORS, CircuitOpenError
from resilient.stages import QuietGate, RefusingGate

__all__ = [
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerSpec",
    "BreakerState",
    "BreakerStore",
    "BreakerStoreFactory",
    "CircuitBreaker",
    "ExcludeRule",
    "InMemoryBreakerStore",
    "StoreFactory",
    "StoreSnapshot",
    "WindowSpec",
    "live_breakers",
    "subscribe",
    "unsubscribe",
]


_logger = logging.getLogger("resilient.breaker")


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A state change, as passed to each of a breaker's ``listeners``.

    ``reason`` is one of ``"failure_threshold"``, ``"failure_rate"``,
    ``"reset_timeout elapsed"``, ``"probe failed"``, ``"probes succeeded"``,
    ``"isolate()"`` and ``"reset()"``. ``at`` is the breaker's clock reading.
    """

    name: str
    old_state: BreakerState
    new_state: BreakerState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of a breaker, from :meth:`CircuitBreaker.metrics`.

    The window and consecutive counts belong to the current state and start
    from zero at each state change. ``failure_rate`` is ``window_failures /
    window_calls`` (0.0 for an empty window). ``opened_at`` is the clock
    reading when the breaker opened or was isolated (``None`` otherwise) and
    ``retry_after`` the seconds a rejected caller is told to wait.

    ``total_failures`` and ``total_rejections`` count since the breaker was
    created, in this process. They are counted without a lock, so under heavy
    contention between threads they may fall slightly short. Successes are not
    counted at all: that would cost every healthy call a write.
    """

    name: str
    state: BreakerState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    failure_rate: float
    probes_in_flight: int
    opened_at: float | None
    retry_after: float
    total_failures: int
    total_rejections: int


# The breaker --------------------------------------------------------------------------

ExcludeRule: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None
)
"""Exceptions that are the caller's fault: a type, a tuple of types, or a predicate."""


class _Ticket:
    """What ``before_call`` hands the report methods when ``None`` is not enough."""

    __slots__ = ("probe_epoch", "started_at")

    def __init__(self, started_at: float | None, probe_epoch: int | None) -> None:
        self.started_at = started_at
        self.probe_epoch = probe_epoch


# A closed-state call that needs no timing but whose success must be recorded.
_UNTIMED: Final = _Ticket(None, None)

_names = itertools.count(1)


class CircuitBreaker(_driver.Decorating):
    """Stops calls to a failing dependency and lets probes find out when it recovers.

    >>> payments = CircuitBreaker(name="payments", failure_threshold=5, reset_timeout=30)
    >>> @payments
    ... def charge(order): ...

    Keyword-only configuration, checked here:

    * ``name`` — shown in errors, events and ``repr``; default ``"breaker-N"``.
    * ``failure_threshold`` — consecutive failures that trip it (default 5;
      ``None`` turns the rule off).
    * ``failure_rate`` — share of failures, in (0, 1], in the sliding window that
      trips it (default ``None``: off). The window is the last ``window_size``
      calls (default 100) or, instead, the last ``window_duration`` seconds. The
      rate is judged once the window holds ``minimum_calls`` calls (default 10,
      or ``window_size`` if that is smaller).
    * ``slow_call_duration`` — calls taking longer than this many seconds count
      as failures even if they returned (default ``None``: off).
    * ``reset_timeout`` — seconds from opening until probes are let in (default 30).
    * ``half_open_max_calls`` — probes allowed to run at once (default 1),
      counting those still running from an earlier half-open stay.
    * ``success_threshold`` — successful probes that close it (default 1).
    * ``exclude`` — exception types, or a predicate taking the exception, that
      are the caller's fault: such a call counts as though it returned (so a
      slow one is still a slow call). A predicate that raises is logged and
      taken as ``False``. Default: the programming errors of
      :data:`resilient.errors.PROGRAMMING_ERRORS` (``TypeError``,
      ``AttributeError``, ...); ``None`` counts every exception.
    * ``listeners`` — callables given a :class:`BreakerEvent` on each state
      change, outside any lock, in the thread that caused it. One that raises
      is logged to the ``resilient.breaker`` logger and ignored.
    * ``store`` — factory of the :class:`BreakerStore` (default
      :class:`InMemoryBreakerStore`): called with the :class:`WindowSpec`, or, if it
      has a ``for_breaker`` method (a :class:`BreakerStoreFactory` such as
      ``resilient.redis.RedisStore``), given a :class:`BreakerSpec` instead.
    * ``clock`` — monotonic seconds (default :func:`time.monotonic`).

    Durations are seconds or :class:`datetime.timedelta`. At least one of
    ``failure_threshold`` and ``failure_rate`` must be on.

    A breaker pickles as its configuration: the copy starts closed with fresh
    counters. ``clock``, ``listeners``, ``exclude`` and ``store`` must then be
    picklable (module-level functions, not lambdas or closures).
    """

    _fills = "gate"  # @breaker, breaker.call(): the driver with this one stage

    __slots__ = (
        "__weakref__",
        "_clock",
        "_config",
        "_drivers",
        "_failure_rate",
        "_failure_threshold",
        "_half_open_max_calls",
        "_is_excluded",
        "_listeners",
        "_minimum_calls",
        "_name",
        "_plain",
        "_rejections",
        "_reset_timeout",
        "_slow_call_duration",
        "_store",
        "_success_threshold",
        "_total_failures",
    )

    def __init__(
        self,
        *,
        name: str | None = None,
        failure_threshold: int | None = 5,
        failure_rate: float | None = None,
        window_size: int | None = None,
        window_duration: Duration | None = None,
        minimum_calls: int | None = None,
        slow_call_duration: Duration | None = None,
        reset_timeout: Duration = 30.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        exclude: ExcludeRule | Default = DEFAULT,
        listeners: Iterable[Callable[[BreakerEvent], object]] = (),
        store: StoreFactory = InMemoryBreakerStore,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        generated_name = name is None
        if name is None:
            name = f"breaker-{next(_names)}"
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
        elif not name.strip():
            raise ValueError(
                f"name must not be empty or blank, got {name!r}: it names the breaker in "
                "errors, events and metrics; pass None for a generated one"
            )

        if failure_threshold is not None:
            failure_threshold = check_int("failure_threshold", failure_threshold, minimum=1)
        if failure_rate is None:
            if failure_threshold is None:
                raise ValueError(
                    "failure_threshold and failure_rate are both None: the breaker could never "
                    "trip; set at least one"
                )
            for unused, value in (
                ("window_size", window_size),
                ("window_duration", window_duration),
                ("minimum_calls", minimum_calls),
            ):
                if value is not None:
                    raise ValueError(
                        f"{unused}={value!r} has no effect without failure_rate; set failure_rate"
                    )
            window = WindowSpec()
        else:
            failure_rate = check_number("failure_rate", failure_rate, minimum=0.0, maximum=1.0)
            if failure_rate == 0.0:
                raise ValueError("failure_rate must be greater than 0, got 0.0")
            window, minimum_calls = _check_window(window_size, window_duration, minimum_calls)

        slow_seconds = (
            None
            if slow_call_duration is None
            else to_seconds("slow_call_duration", slow_call_duration, allow_zero=False)
        )
        reset_seconds = to_seconds("reset_timeout", reset_timeout, allow_zero=False)
        half_open_max_calls = check_int("half_open_max_calls", half_open_max_calls, minimum=1)
        success_threshold = check_int("success_threshold", success_threshold, minimum=1)
        listener_tuple = _check_listeners(listeners)
        if not callable(store) and not isinstance(store, BreakerStoreFactory):
            raise TypeError(
                "store must be a callable that builds a BreakerStore from a WindowSpec, or an "
                f"object with for_breaker(spec) (a BreakerStoreFactory), got {store!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")

        self._name = name
        self._failure_threshold = failure_threshold
        self._failure_rate = failure_rate
        self._minimum_calls = 0 if minimum_calls is None else minimum_calls
        self._slow_call_duration = slow_seconds
        self._reset_timeout = reset_seconds
        self._half_open_max_calls = half_open_max_calls
        self._success_threshold = success_threshold
        if isinstance(exclude, Default):
            exclude = PROGRAMMING_ERRORS  # bugs in the calling code say nothing of the dependency
        self._is_excluded = _exclusion_test(exclude)
        self._listeners = listener_tuple
        self._clock = clock
        # The factory learns whom it serves (a shared store keys its state by the name).
        spec = BreakerSpec(
            name=name,
            window=window,
            reset_timeout=reset_seconds,
            half_open_max_calls=half_open_max_calls,
            clock=clock,
            generated_name=generated_name,
        )
        self._store: BreakerStore = _build_store(store, spec)
        # Closed with nothing to time and no window to feed: a success is a no-op.
        self._plain = slow_seconds is None and failure_rate is None
        self._total_failures = 0
        self._rejections = [0]  # a list: RefusingGate readers add to it too
        self._drivers: _driver.DriverCache = {}
        self._config: dict[str, Any] = {
            "name": name,
            "failure_threshold": failure_threshold,
            "failure_rate": failure_rate,
            "window_size": window.size,
            "window_duration": window.duration,
            "minimum_calls": minimum_calls,
            "slow_call_duration": slow_seconds,
            "reset_timeout": reset_seconds,
            "half_open_max_calls": half_open_max_calls,
            "success_threshold": success_threshold,
            "exclude": exclude,
            "listeners": listener_tuple,
            "store": store,
            "clock": clock,
        }
        with _live_lock:
            _live.add(self)

    # Reading ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name shown in errors, events and ``repr``."""
        return self._name

    @property
    def store(self) -> BreakerStore:
        """The store holding this breaker's state (see :class:`BreakerStore`)."""
        return self._store

    @property
    def stored_state(self) -> BreakerState:
        """The state as stored, read without side effects (``state`` may turn OPEN half-open)."""
        return self._store.state

    @property
    def counts_successes(self) -> bool:
        """Whether a success of a closed breaker with no failure counted is recorded at all.

        ``False`` (no failure-rate window, no slow-call timing) means such a success
        changes nothing, so a caller that sees the breaker closed with no failure
        counted may skip :meth:`before_call` and :meth:`on_success` for a call that
        then succeeds (the httpx transport's fast path does).
        """
        return not self._plain

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose ``reset_timeout`` has passed turns half-open."""
        state = self._store.state
        if state is not _OPEN:
            return state
        return self._settle(self._clock()).state

    def metrics(self) -> BreakerMetrics:
        """A snapshot of the state and counters (see :class:`BreakerMetrics`)."""
        now = self._clock()
        snapshot = self._settle(now)
        calls = snapshot.window_calls
        return BreakerMetrics(
            name=self._name,
            state=snapshot.state,
            consecutive_failures=snapshot.consecutive_failures,
            window_calls=calls,
            window_failures=snapshot.window_failures,
            failure_rate=snapshot.window_failures / calls if calls else 0.0,
            probes_in_flight=snapshot.probes_in_flight,
            opened_at=snapshot.opened_at,
            retry_after=self._retry_after(snapshot, now),
            total_failures=self._total_failures,
            total_rejections=self._rejections[0],
        )

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self._name!r}, state={self.state.value})"

    def __reduce__(self) -> tuple[Any, ...]:
        parts: list[tuple[str, object]] = [
            ("clock", self._clock),
            ("store", self._config["store"]),
            ("exclude", self._config["exclude"]),
        ]
        parts += [(f"listeners[{i}]", listener) for i, listener in enumerate(self._listeners)]
        # Pickle's own error would only say "Can't pickle local object"; name the parameter.
        for parameter, value in parts:
            try:
                pickle.dumps(value)
            except Exception as exc:
                raise pickle.PicklingError(
                    f"circuit breaker {self._name!r} cannot be pickled: its {parameter} "
                    f"{value!r} is not picklable ({exc}); if it is a lambda or closure, use "
                    "a module-level function or class instead"
                ) from exc
        return (rebuild, (type(self), dict(self._config)))

    # Manual control -----------------------------------------------------------------------

    def isolate(self) -> None:
        """Hold the breaker open, rejecting every call, until :meth:`reset`."""
        self._force(_ISOLATED, "isolate()")

    def reset(self) -> None:
        """Close the breaker and clear its counters, whatever its state."""
        self._force(_CLOSED, "reset()")

    def _force(self, new_state: BreakerState, reason: str) -> None:
        store = self._store
        while True:  # again if another thread changed the state between load and set
            now = self._clock()
            snapshot = store.load(now)
            if new_state is _ISOLATED and snapshot.state is _ISOLATED:
                return  # keep the original opened_at
            if store.compare_and_set_state(snapshot.epoch, new_state, now):
                if snapshot.state is not new_state:
                    self._emit(snapshot.state, new_state, reason, now)
                return

    # The Gate protocol (resilient.stages) -------------------------------------------------

    def quiet(self) -> QuietGate | None:
        """The healthy path as plain reads of the store, or ``None`` when successes count.

        See :class:`~resilient.stages.QuietGate`: only a breaker that records nothing
        on a healthy success (no failure-rate window, no slow-call timing) has one,
        and not a subclass that decides calls or successes in methods of its own.
        """
        if not self._plain or self._overrides("before_call", "on_success"):
            return None
        return QuietGate(self._store, _CLOSED)

    def refusing(self) -> RefusingGate | None:
        """Its open state as plain reads (:class:`~resilient.stages.RefusingGate`).

        ``None`` for a subclass with a ``before_call`` of its own: the driver asks it.
        """
        if self._overrides("before_call"):
            return None
        return RefusingGate(
            self._store,
            _OPEN,
            self._reset_timeout,
            self._clock,
            CircuitOpenError,
            self._name,
            self._rejections,
        )

    def _overrides(self, *methods: str) -> bool:
        return any(
            getattr(type(self), name) is not getattr(CircuitBreaker, name) for name in methods
        )

    def before_call(self) -> object:
        """Admit one call or raise ``CircuitOpenError``; return the ticket for the report.

        The ticket is ``None`` for a closed-state call with nothing to time or
        record on success, else an object only this breaker reads.
        """
        store = self._store
        state = store.state
        if state is _CLOSED:
            if self._plain:
                return None
            if self._slow_call_duration is None:
                return _UNTIMED  # a failure-rate window: the outcome is recorded, not timed
        elif state is _OPEN:
            # Rejections are the common case while open: decided here, in this frame, and
            # without the lock (frames are most of a rejection's cost).
            opened_at = store.opened_at
            if opened_at is not None:
                retry_after = opened_at + self._reset_timeout - self._clock()
                if retry_after > 0.0:
                    self._rejections[0] += 1
                    raise CircuitOpenError(self._name, retry_after)
        return self._admit()

    def on_success(self, ticket: object) -> None:
        """The admitted call returned."""
        if ticket is None:
            # Most calls end here: nothing to write unless failures are being counted.
            if self._store.consecutive_failures:
                self._finish(None, False)
            return
        if ticket is _UNTIMED:
            # A failure-rate window's healthy success: the store counts it, lock-free
            # while the window holds no failure, and returns nothing to judge.
            now = self._clock()
            snapshot = self._store.record(False, now)
            if snapshot is not None:
                self._judge(snapshot, now)
            return
        self._finish(ticket, False)

    def on_failure(self, ticket: object, error: Exception) -> None:
        """The admitted call raised ``error``; excluded ones count as success."""
        is_excluded = self._is_excluded
        if is_excluded is not None and self._excluded(is_excluded, error):
            self.on_success(ticket)
            return
        self._finish(ticket, True)

    def on_abort(self, ticket: object) -> None:
        """The call was cancelled or interrupted: not an outcome at all; frees a probe slot."""
        if isinstance(ticket, _Ticket) and ticket.probe_epoch is not None:
            self._store.release_probe(ticket.probe_epoch, False)

    # The state machine ------------------------------------------------------------------

    def _admit(self) -> object:
        store = self._store
        state = store.state
        if state is _CLOSED:
            return self._closed_ticket()
        now = self._clock()
        if state is _OPEN or state is _ISOLATED:
            # Rejections are the common case while open: decide them without the lock.
            opened_at = store.opened_at
            if opened_at is not None:
                retry_after = (
                    math.inf if state is _ISOLATED else opened_at + self._reset_timeout - now
                )
                if retry_after > 0.0:
                    self._rejections[0] += 1
                    raise CircuitOpenError(self._name, retry_after)
        snapshot = self._settle(now)
        state = snapshot.state
        if state is _CLOSED:
            return self._closed_ticket()
        if state is _HALF_OPEN and store.acquire_probe(snapshot.epoch, self._half_open_max_calls):
            started_at = None if self._slow_call_duration is None else now
            return _Ticket(started_at, snapshot.epoch)
        self._rejections[0] += 1
        raise CircuitOpenError(self._name, self._retry_after(snapshot, now))

    def _closed_ticket(self) -> object:
        if self._slow_call_duration is None:
            return _UNTIMED if not self._plain else None
        return _Ticket(self._clock(), None)

    def _settle(self, now: float) -> StoreSnapshot:
        """Load the store's snapshot, first turning an open breaker half-open if it is time."""
        store = self._store
        snapshot = store.load(now)
        if snapshot.state is _OPEN and self._retry_after(snapshot, now) == 0.0:
            if store.compare_and_set_state(snapshot.epoch, _HALF_OPEN, now):
                self._emit(_OPEN, _HALF_OPEN, "reset_timeout elapsed", now)
            snapshot = store.load(now)
        return snapshot

    def _retry_after(self, snapshot: StoreSnapshot, now: float) -> float:
        if snapshot.state is _ISOLATED:
            return math.inf
        if snapshot.state is _OPEN and snapshot.opened_at is not None:
            return max(0.0, snapshot.opened_at + self._reset_timeout - now)
        return 0.0

    def _excluded(self, is_excluded: Callable[[BaseException], bool], exc: BaseException) -> bool:
        try:
            return is_excluded(exc)
        except Exception:
            # A broken predicate must not break the call; counting a failure is the safe side.
            _logger.exception(
                "exclude predicate of circuit breaker %r raised on %r; counting a failure",
                self._name,
                exc,
            )
            return False

    def _finish(self, ticket: object, failed: bool) -> None:
        """Record the outcome of a call that was not aborted."""
        now = self._clock()
        probe_epoch = None
        if isinstance(ticket, _Ticket):
            probe_epoch = ticket.probe_epoch
            started_at = ticket.started_at
            slow_call_duration = self._slow_call_duration
            if not failed and started_at is not None and slow_call_duration is not None:
                failed = now - started_at > slow_call_duration
        if failed:
            self._total_failures += 1
        if probe_epoch is not None:
            self._finish_probe(probe_epoch, failed, now)
            return
        snapshot = self._store.record(failed, now)
        if snapshot is not None:
            self._judge(snapshot, now)

    def _judge(self, snapshot: StoreSnapshot, now: float) -> None:
        """Trip the breaker if the counts after an outcome call for it."""
        reason = self._trip_reason(snapshot)
        if reason is not None and self._store.compare_and_set_state(snapshot.epoch, _OPEN, now):
            self._emit(_CLOSED, _OPEN, reason, now)

    def _trip_reason(self, snapshot: StoreSnapshot) -> str | None:
        threshold = self._failure_threshold
        if threshold is not None and snapshot.consecutive_failures >= threshold:
            return "failure_threshold"
        rate = self._failure_rate
        calls = snapshot.window_calls
        # Divide rather than multiply: 3 / 10 >= 0.3 holds, 3 >= 0.3 * 10 does not.
        if (
            rate is not None
            and calls >= self._minimum_calls
            and snapshot.window_failures / calls >= rate
        ):
            return "failure_rate"
        return None

    def _finish_probe(self, epoch: int, failed: bool, now: float) -> None:
        store = self._store
        if failed:
            # Reopen first, then free the slot: the other order could let a new probe in.
            if store.compare_and_set_state(epoch, _OPEN, now):
                self._emit(_HALF_OPEN, _OPEN, "probe failed", now)
            store.release_probe(epoch, False)
            return
        successes = store.release_probe(epoch, True)
        if (
            successes is not None
            and successes >= self._success_threshold
            and store.compare_and_set_state(epoch, _CLOSED, now)
        ):
            self._emit(_HALF_OPEN, _CLOSED, "probes succeeded", now)

    def _emit(self, old: BreakerState, new: BreakerState, reason: str, now: float) -> None:
        event = BreakerEvent(self._name, old, new, reason, now)
        for listener in (*_subscribers, *self._listeners):
            try:
                listener(event)
            except Exception:
                # Observers must not change what the breaker or the call does.
                _logger.exception(
                    "listener %r of circuit breaker %r raised on %s; ignored",
                    listener,
                    self._name,
                    event,
                )


# Every breaker's events, and every live breaker ------------------------------------------

_subscribers: tuple[Callable[[BreakerEvent], object], ...] = ()
_subscribers_lock = threading.Lock()
_fork.register_lock(_subscribers_lock)
_live: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_live_lock = threading.Lock()
_fork.register_lock(_live_lock)


def subscribe(listener: Callable[[BreakerEvent], object]) -> None:
    """Give ``listener`` every state change of every breaker, present and future.

    Subscribers run before a breaker's own ``listeners``, outside any lock, in the
    thread that caused the change; one that raises is logged and ignored.
    Subscribing the same listener twice is a no-op.
    """
    global _subscribers
    if not callable(listener):
        raise TypeError(f"listener must be callable, got {listener!r}")
    with _subscribers_lock:
        if listener not in _subscribers:
            _subscribers = (*_subscribers, listener)


def unsubscribe(listener: Callable[[BreakerEvent], object]) -> None:
    """Stop giving ``listener`` breaker events; ``ValueError`` if it was not subscribed."""
    global _subscribers
    with _subscribers_lock:
        if listener not in _subscribers:
            raise ValueError(f"{listener!r} is not subscribed to breaker events")
        _subscribers = tuple(item for item in _subscribers if item != listener)


def live_breakers() -> list[CircuitBreaker]:
    """The circuit breakers alive in this process (held weakly: listing keeps none alive)."""
    with _live_lock:
        return list(_live)


def _log(event: BreakerEvent) -> None:
    # Opening means calls are being refused: worth a warning; the rest is news.
    _logger.log(
        logging.WARNING
        if event.new_state is _OPEN or event.new_state is _ISOLATED
        else logging.INFO,
        "circuit breaker %r: %s -> %s (%s)",
        event.name,
        event.old_state.value,
        event.new_state.value,
        event.reason,
    )


subscribe(_log)


def _check_window(
    window_size: int | None, window_duration: Duration | None, minimum_calls: int | None
) -> tuple[WindowSpec, int]:
    """Validate the failure-rate window; return its shape and the minimum_calls in force."""
    if window_size is not None and window_duration is not None:
        raise ValueError(
            f"window_size={window_size!r} and window_duration={window_duration!r} "
            "both given; the window counts either calls or seconds, pass one"
        )
    if window_duration is not None:
        window = WindowSpec(
            duration=to_seconds("window_duration", window_duration, allow_zero=False)
        )
    else:
        size = 100 if window_size is None else check_int("window_size", window_size, minimum=1)
        window = WindowSpec(size=size)
    if minimum_calls is None:
        return window, 10 if window.size is None else min(10, window.size)
    minimum_calls = check_int("minimum_calls", minimum_calls, minimum=1)
    if window.size is not None and minimum_calls > window.size:
        raise ValueError(
            f"minimum_calls={minimum_calls!r} exceeds window_size={window.size!r}: "
            "the rate would never be judged; lower minimum_calls"
        )
    return window, minimum_calls


def _check_listeners(
    listeners: Iterable[Callable[[BreakerEvent], object]],
) -> tuple[Callable[[BreakerEvent], object], ...]:
    if callable(listeners):
        raise TypeError(f"listeners must be an iterable of callables, got {listeners!r}")
    try:
        listener_tuple = tuple(listeners)
    except TypeError:
        raise TypeError(f"listeners must be an iterable of callables, got {listeners!r}") from None
    for i, listener in enumerate(listener_tuple):
        if not callable(listener):
            raise TypeError(f"listeners[{i}] must be callable, got {listener!r}")
    return listener_tuple


def _exclusion_test(exclude: ExcludeRule) -> Callable[[BaseException], bool] | None:
    """Turn ``exclude`` into a predicate, or ``None`` when nothing is excluded."""
    if exclude is None:
        return None
    if isinstance(exclude, type):
        types: tuple[type[BaseException], ...] = (exclude,)
    elif isinstance(exclude, tuple):
        types = exclude
    elif callable(exclude):
        return exclude
    else:
        raise TypeError(
            "exclude must be an exception type, a tuple of them, or a predicate, "
            f"got {type(exclude).__name__}: {exclude!r}"
        )
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise TypeError(f"exclude must name exception types, got {kind!r} in {exclude!r}")
    if not types:
        return None

    def is_excluded(exc: BaseException) -> bool:
        return isinstance(exc, types)

    return is_excluded
