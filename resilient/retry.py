"""Retries that know when to stop: backoff, a shared retry budget, and the deadline.

A failed attempt is tried again only when all of these hold:

* the failure is worth retrying: the exception matches ``on`` (or the return
  value matches ``on_result``);
* attempts remain (``attempts``, and the tenacity ``stop`` strategy if given);
* the wait before the next attempt ends before the deadline in force;
* the :class:`RetryBudget` has room. The budget (Finagle's design) caps retries
  at a share of recent calls plus a small reserve, so when a dependency is down
  its callers stop multiplying the load on it with retries.

Otherwise the caller gets the *last original exception*, not a wrapper, with a
note (:meth:`BaseException.add_note`) saying how many attempts were made and
why retrying stopped. Exceptions that are not :class:`Exception` (cancellation,
``KeyboardInterrupt``, ``SystemExit``) are never retried.

Waits come from :class:`Backoff` (exponential growth with the jitter kinds of
the AWS Architecture Blog's "Exponential Backoff And Jitter") or from a tenacity
``wait`` strategy; ``on``, ``on_result`` and ``stop`` accept tenacity strategies
too, so existing tenacity configuration carries over.

:class:`Retry` holds configuration and the decision core only: it never calls
the function and never sleeps. It is a :class:`~resilient.stages.Retrier`: a
:class:`resilient.Policy` drives it, and ``@Retry(...)`` is that driver with this
one stage. :func:`instant_retries` makes every wait zero, so test suites that
exercise retries stay fast (also in :mod:`resilient.testing`).

A block that is not a function is retried with ``for attempt in retry: with
attempt: ...`` (``async for`` in a coroutine), under the same rules: see
:class:`Attempts`.

Public names: :class:`Retry`, :class:`Backoff`, :class:`RetryBudget` (and its
store seam, :class:`BudgetStore` / :class:`SharedBudget`), :class:`RetryEvent`,
:class:`RetryHook`, :class:`RetryState`, :class:`Attempt`, :class:`Attempts`,
:func:`instant_retries`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random as _random
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Literal,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
)

from resilient import _driver, _fork
from resilient._config import (
    DEFAULT,
    Default,
    Duration,
    check_int,
    check_number,
    describe,
    rebuild,
    to_seconds,
)
from resilient.errors import PROGRAMMING_ERRORS, BulkheadFull, CircuitOpenError, RateLimited
from resilient.stages import CallTally

if TYPE_CHECKING:
    from tenacity import BaseRetrying, RetryCallState
    from tenacity.retry import retry_base
    from tenacity.stop import stop_base
    from tenacity.wait import wait_base

__all__ = [
    "LONGEST_WAIT",
    "Attempt",
    "Attempts",
    "Backoff",
    "BudgetStore",
    "ExceptionFilter",
    "Jitter",
    "ResultFilter",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "RetryHook",
    "RetryState",
    "SharedBudget",
    "StopReason",
    "instant_retries",
]

_T = TypeVar("_T")

Jitter: TypeAlias = Literal["full", "equal", "decorrelated", "none"]
"""How :class:`Backoff` randomises waits; see :class:`Backoff`."""

ExceptionFilter: TypeAlias = (
    "type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]"
    " | retry_base"
)
"""What ``Retry(on=...)`` accepts: exception type(s), a predicate, or a tenacity strategy."""

ResultFilter: TypeAlias = "Callable[[Any], bool] | retry_base"
"""What ``Retry(on_result=...)`` accepts: a predicate on the return value or a tenacity strategy."""

StopReason: TypeAlias = Literal[
    "not retryable",
    "wait too long",
    "attempts exhausted",
    "stop condition",
    "deadline",
    "retry budget exhausted",
    "circuit open",
]
"""Why retrying stopped, as recorded on :class:`RetryState`.

:meth:`Retry.next_delay` records all but ``"circuit open"`` and ``"deadline"``, which
the driver gives :meth:`Retry.give_up` when it stops for one of its own reasons.
"""

_JITTERS: tuple[Jitter, ...] = ("full", "equal", "decorrelated", "none")
# This process's own refusals: never retried, whatever `on` says (retrying would only
# add load where a stage just shed it). A server's (`remote`) may be, if `on` says so.
_REJECTIONS = (CircuitOpenError, BulkheadFull, RateLimited)
#: The longest wait a retry is scheduled after; a longer one (a Retry-After date years
#: ahead, a hook returning 1e12) ends the retries instead of sleeping for ever.
LONGEST_WAIT: Final = 30 * 24 * 3600.0
_logger = logging.getLogger("resilient.retry")
_LARGEST_FLOAT = sys.float_info.max
_BUDGET_SLICES = 10


# Testing switch ---------------------------------------------------------------------

# How many instant_retries() blocks are open, in any thread. A plain int read on the
# failure path; the lock only guards the (rare) updates.
_instant_depth = 0
# The attempt caps of the open blocks that set one; the smallest applies.
_instant_caps: list[int] = []
_instant_cap: int | None = None
_instant_lock = threading.Lock()
_fork.register_lock(_instant_lock)


@contextmanager
def instant_retries(*, cap: int | None = None) -> Iterator[None]:
    """Make every retry wait zero seconds while the block runs, process-wide.

    Attempts, the stop strategy, the deadline and the retry budget still apply:
    only the waiting goes, so a test suite exercises the real retry decisions
    without sleeping. ``cap`` also limits every call to that many attempts (at
    least 1), so a test of a ``Retry(attempts=10)`` path makes, say, two. It
    affects every thread and task, which is what a test wants; blocks may nest,
    and the smallest cap in force applies. As a pytest fixture::

        @pytest.fixture(autouse=True)
        def _fast_retries():
            with resilient.instant_retries(cap=2):
                yield
    """
    global _instant_depth, _instant_cap
    if cap is not None:
        check_int("cap", cap, minimum=1)
    with _instant_lock:
        _instant_depth += 1
        if cap is not None:
            _instant_caps.append(cap)
            _instant_cap = min(_instant_caps)
    try:
        yield
    finally:
        with _instant_lock:
            _instant_depth -= 1
            if cap is not None:
                _instant_caps.remove(cap)
                _instant_cap = min(_instant_caps) if _instant_caps else None


# Backoff ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Backoff:
    """Exponentially growing waits between attempts, capped and jittered.

    The wait before retry ``n`` (1-based) grows from ``initial`` by
    ``multiplier`` per retry up to ``max_delay``: ``min(max_delay, initial *
    multiplier ** (n - 1))``, then ``jitter`` randomises it so that many clients
    failing together do not retry in lockstep (definitions from the AWS
    Architecture Blog, "Exponential Backoff And Jitter"):

    * ``"full"`` (default): uniform between 0 and the exponential value.
    * ``"equal"``: half the exponential value, plus uniform up to the other half.
    * ``"decorrelated"``: uniform between ``initial`` and three times the
      previous wait, capped at ``max_delay``; ``multiplier`` is not used.
    * ``"none"``: exactly the exponential value.

    Waits are never negative and never exceed ``max_delay``, however many retries.

    >>> Backoff(initial=0.5, jitter="none").delay(3, previous=0.0, random=lambda: 0.0)
    2.0
    """

    initial: float
    multiplier: float
    max_delay: float
    jitter: Jitter
    # Retries after which the exponential value has reached max_delay; capping the
    # exponent there keeps multiplier ** n from overflowing at huge attempt numbers.
    _growth_steps: int = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        *,
        initial: Duration = 0.1,
        multiplier: float = 2.0,
        max_delay: Duration = 10.0,
        jitter: Jitter = "full",
    ) -> None:
        initial_s = to_seconds("initial", initial)
        growth = check_number("multiplier", multiplier, minimum=1.0)
        cap = to_seconds("max_delay", max_delay)
        if cap < initial_s:
            raise ValueError(
                f"max_delay must be at least initial ({initial_s:g} s), got {max_delay!r}"
            )
        if not isinstance(jitter, str):
            raise TypeError(f"jitter must be a string, got {type(jitter).__name__}: {jitter!r}")
        if jitter not in _JITTERS:
            raise ValueError(
                f"jitter must be one of {', '.join(map(repr, _JITTERS))}, got {jitter!r}"
            )
        if jitter == "decorrelated" and initial_s == 0:
            raise ValueError(
                "initial must be greater than zero with jitter='decorrelated': "
                "its waits grow from initial, so they would all be 0"
            )
        if initial_s == 0 or growth == 1.0 or initial_s == cap:
            steps = 0
        else:
            # One step beyond the computed one, in case rounding leaves it a hair short.
            steps = math.ceil((math.log(cap) - math.log(initial_s)) / math.log(growth)) + 1
        object.__setattr__(self, "initial", initial_s)
        object.__setattr__(self, "multiplier", growth)
        object.__setattr__(self, "max_delay", cap)
        object.__setattr__(self, "jitter", jitter)
        object.__setattr__(self, "_growth_steps", steps)

    def delay(self, attempt: int, previous: float, random: Callable[[], float]) -> float:
        """Return the seconds to wait before retry number ``attempt`` (1-based).

        ``previous`` is the wait before the previous retry (0.0 before the first);
        only ``"decorrelated"`` jitter uses it. ``random`` returns floats in
        [0, 1), like :func:`random.random`.
        """
        cap = self.max_delay
        jitter = self.jitter
        if jitter == "decorrelated":
            low = self.initial
            high = (previous if previous > low else low) * 3.0
            if high > _LARGEST_FLOAT:
                high = _LARGEST_FLOAT
            value = low + random() * (high - low)
        else:
            steps = attempt - 1
            if steps > self._growth_steps:
                steps = self._growth_steps
            elif steps < 0:
                steps = 0
            try:
                ceiling = self.initial * self.multiplier**steps
            except OverflowError:
                # Only for extreme settings (say initial=1e-300, multiplier=1e200), where the
                # power overflows before the product reaches max_delay.
                ceiling = cap
            if ceiling > cap:
                ceiling = cap
            if jitter == "full":
                value = random() * ceiling
            elif jitter == "equal":
                half = ceiling / 2.0
                value = half + random() * half
            else:
                value = ceiling
        # Clamped here too, so a random source that strays outside [0, 1) (or returns
        # NaN) cannot break the bounds the driver relies on.
        if value > cap:
            return cap
        return value if value > 0.0 else 0.0


# Retry budget -----------------------------------------------------------------------


class SharedBudget(Protocol):
    """A budget's counts kept elsewhere (a fleet's), as a :class:`BudgetStore` builds it.

    ``calls`` is the number of calls the budget counted since it last reported them
    (it hands each call over once). A method returns ``None`` when the shared counts
    cannot be reached now: the budget then decides on its own counts, and hands the
    retries it allowed meanwhile over through :meth:`RetryBudget.take_unreported`.
    """

    def try_withdraw(self, calls: int, now: float) -> bool | None:
        """Add ``calls``, then take one retry if the shared budget allows it."""
        ...

    def available(self, calls: int, now: float) -> int | None:
        """Add ``calls``, then say how many retries the shared budget allows now."""
        ...


class BudgetStore(Protocol):
    """Where a :class:`RetryBudget` keeps its counts when they are shared (``store=``).

    ``for_budget`` is called once, by the budget's constructor, and must not change
    any shared count. A store that reports calls in the background calls the budget's
    :meth:`RetryBudget.take_unreported` for them.
    """

    def for_budget(self, budget: RetryBudget) -> SharedBudget:
        """The shared counts of ``budget`` (its ratio, reserve and window are its properties)."""
        ...


class RetryBudget:
    """A cap on retries shared by all calls through one :class:`Retry` (Finagle's design).

    Over a sliding ``window`` the budget allows ``ratio * calls +
    min_retries_per_second * window`` retries, counting every call made through
    the ``Retry`` in that window. With the defaults (Finagle's), 20% of calls may
    be retried, plus 10 retries a second so that a quiet service can still retry.
    When the budget is spent, a failing call's error propagates at once: when a
    dependency is down, retries would only multiply the load on it.

    The window is a ring of ``10`` slices; a slice's counts expire as a whole, so
    a call stops counting between ``0.9 * window`` and ``window`` after it was made.

    :meth:`deposit` (once per call, on the success path too) takes no lock, so
    two threads counting a call at the same instant may lose one of the two
    increments. That makes the budget very slightly stricter, never looser, and
    keeps a healthy call from contending on a lock. :meth:`try_withdraw` (once
    per retry) takes a lock, so retries are counted exactly.

    Pass ``now`` values from the same clock as ``clock``; ``clock`` is only read
    by :meth:`available` when it is called without ``now``.

    A budget pickles as its configuration: the copy starts empty, like :meth:`spawn`'s.

    ``store`` (a :class:`BudgetStore`, such as ``resilient.redis.RedisBudgetStore``)
    shares the counts with other processes: calls are still counted here, lock-free,
    and handed to the store in batches; each retry asks the store. When the store
    cannot be reached the budget decides on its own counts, and the store gets them
    later. :meth:`spawn` gives a budget on the same store: spawned budgets share the
    store's counts.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "_index",
        "_lock",
        "_min_retries_per_second",
        "_ratio",
        "_reported_current",
        "_reserve",
        "_retries",
        "_shared",
        "_slice_width",
        "_slices",
        "_store",
        "_unreported_calls",
        "_unreported_retries",
        "_window",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_second: float = 10,
        window: Duration = 10.0,
        clock: Callable[[], float] = time.monotonic,
        store: BudgetStore | None = None,
    ) -> None:
        self._ratio = check_number("ratio", ratio, minimum=0.0)
        self._min_retries_per_second = check_number(
            "min_retries_per_second", min_retries_per_second, minimum=0.0
        )
        self._window = to_seconds("window", window, allow_zero=False)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._reserve = self._min_retries_per_second * self._window
        self._slice_width = self._window / _BUDGET_SLICES
        self._retries = [0] * _BUDGET_SLICES
        # Absolute number of the current slice (now // slice width), its position in
        # the ring, and when it ends. The first deposit starts the ring.
        self._index = -(2**62)
        # The current slice's position, its end, and every slice's calls: plain data a
        # driver reads to count a healthy call inline (see resilient.stages.CallTally).
        self._slices = _Slices()
        self._lock = threading.Lock()
        _fork.register_lock(self._lock)
        # With a store: calls of the current slice already handed over, and the calls
        # and locally allowed retries not yet handed over.
        self._reported_current = 0
        self._unreported_calls = 0
        self._unreported_retries = 0
        if store is not None and not callable(getattr(store, "for_budget", None)):
            raise TypeError(
                f"store must be a BudgetStore (with for_budget(budget)) or None, got {store!r}"
            )
        self._store = store
        self._shared = None if store is None else store.for_budget(self)

    def spawn(self) -> RetryBudget:
        """A new, empty budget of the same shape, clock and store (one per origin, say)."""
        return RetryBudget(
            ratio=self._ratio,
            min_retries_per_second=self._min_retries_per_second,
            window=self._window,
            clock=self._clock,
            store=self._store,
        )

    @property
    def ratio(self) -> float:
        """The share of calls in the window that may be retried."""
        return self._ratio

    @property
    def min_retries_per_second(self) -> float:
        """Retries a second allowed whatever the traffic, so a quiet service can retry."""
        return self._min_retries_per_second

    @property
    def window(self) -> float:
        """Seconds over which calls and retries are counted."""
        return self._window

    @property
    def clock(self) -> Callable[[], float]:
        """The clock :meth:`available` reads when not given ``now``."""
        return self._clock

    @property
    def store(self) -> BudgetStore | None:
        """Where the counts are shared, or ``None``: this process's own."""
        return self._store

    def take_unreported(self) -> tuple[int, int]:
        """Hand the store the calls counted and retries allowed here since the last time.

        Returns ``(calls, retries)``; each is handed over once. For :class:`BudgetStore`
        implementations, which report them in the background.
        """
        with self._lock:
            return self._take_unreported()

    def _take_unreported(self) -> tuple[int, int]:
        """:meth:`take_unreported`, holding the lock."""
        retries, self._unreported_retries = self._unreported_retries, 0
        return self._take_calls(), retries

    def _take_calls(self) -> int:
        """The calls not yet handed to the store, handed over now. Hold the lock."""
        current = self._slices.calls[self._slices.current]
        calls = self._unreported_calls + max(0, current - self._reported_current)
        self._reported_current = current
        self._unreported_calls = 0
        return calls

    def _give_back(self, calls: int) -> None:
        """Calls the store could not take: hand them over again next time. Hold the lock."""
        self._unreported_calls += calls

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio:g}, "
            f"min_retries_per_second={self._min_retries_per_second:g}, window={self._window:g})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration: the counts are this process's recent traffic, not the copy's.
        config = {
            "ratio": self._ratio,
            "min_retries_per_second": self._min_retries_per_second,
            "window": self._window,
            "clock": self._clock,
            "store": self._store,
        }
        return (rebuild, (type(self), config))

    def deposit(self, now: float) -> None:
        """Count one call made at ``now``. O(1) and lock-free (see the class docstring)."""
        slices = self._slices
        if now >= slices.end:
            with self._lock:
                self._advance(now)
        slices.calls[slices.current] += 1

    def try_withdraw(self, now: float) -> bool:
        """Count one retry at ``now`` if the budget allows it; return whether it did."""
        shared = self._shared
        if shared is not None:
            with self._lock:
                self._advance(now)
                calls = self._take_calls()
            verdict = shared.try_withdraw(calls, now)  # outside the lock: a round-trip
            if verdict is not None:
                if verdict:
                    with self._lock:
                        self._retries[self._slices.current] += 1
                return verdict
            with self._lock:
                self._give_back(calls)
        with self._lock:
            self._advance(now)
            if sum(self._retries) + 1 > self._allowance():
                return False
            self._retries[self._slices.current] += 1
            if shared is not None:
                self._unreported_retries += 1
            return True

    def available(self, now: float | None = None) -> int:
        """Return how many retries the budget would allow now (for metrics and tests)."""
        if now is None:
            now = self._clock()
        shared = self._shared
        if shared is not None:
            with self._lock:
                self._advance(now)
                calls = self._take_calls()
            shared_room = shared.available(calls, now)
            if shared_room is not None:
                return shared_room
            with self._lock:
                self._give_back(calls)
        with self._lock:
            self._advance(now)
            room = self._allowance() - sum(self._retries)
        return max(0, math.floor(room))

    def _allowance(self) -> float:
        limit = self._ratio * sum(self._slices.calls) + self._reserve
        # ratio * calls is rounded (0.29 * 100 == 28.999999999999996); tolerate that
        # so the allowance is the whole number the formula means.
        return limit * (1.0 + 1e-12)

    def _advance(self, now: float) -> None:
        """Move the ring to the slice holding ``now``, clearing expired slices. Hold the lock."""
        if now < self._slices.end:
            return  # already current (another thread advanced it first)
        width = self._slice_width
        index = math.floor(now / width)
        if index <= self._index:
            # now is past the slice's end yet rounds into it: it belongs to the next one.
            index = self._index + 1
        passed = index - self._index
        calls = self._slices.calls
        retries = self._retries
        if self._shared is not None:
            # The slice ending holds calls the store has not had yet: keep them for it,
            # unless the window has moved past them (and all before them) altogether.
            if passed >= _BUDGET_SLICES:
                self._unreported_calls = 0
            else:
                finished = calls[self._slices.current] - self._reported_current
                self._unreported_calls += max(0, finished)
            self._reported_current = 0
        if passed >= _BUDGET_SLICES:
            for position in range(_BUDGET_SLICES):
                calls[position] = 0
                retries[position] = 0
        else:
            for step in range(1, passed + 1):
                position = (self._index + step) % _BUDGET_SLICES
                calls[position] = 0
                retries[position] = 0
        self._index = index
        self._slices.current = index % _BUDGET_SLICES
        self._slices.end = (index + 1) * width


class _Slices:
    """A budget's call counts per slice of its window, and where the current slice ends."""

    __slots__ = ("calls", "current", "end")

    def __init__(self) -> None:
        self.calls = [0] * _BUDGET_SLICES
        self.current = 0
        self.end = -math.inf


def _count_nothing(now: float) -> None:
    """``Retry.count_call`` when there is no budget to deposit into."""


# Events and per-call state ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryEvent:
    """What a :class:`RetryHook` learns before each retry."""

    attempt: int
    """The attempt that just failed, 1-based (the retry about to happen is ``attempt + 1``)."""
    delay: float
    """Seconds the driver will wait before the next attempt."""
    exception: Exception | None
    """The exception the attempt raised; ``None`` when its result was retried."""
    result: object
    """The value the attempt returned when ``on_result`` asked for a retry; else ``None``."""
    elapsed: float
    """Seconds since the call began (the ``started`` given to :meth:`Retry.begin`)."""


class RetryHook(Protocol):
    """A callable run before each retry sleep: ``Retry(on_retry=hook)``.

    It runs synchronously in the calling thread or task, before the wait, so
    keep it fast (log, count). An exception it raises propagates to the caller,
    chained to the attempt's error, and stops the retries.
    """

    def __call__(self, event: RetryEvent, /) -> object: ...


class RetryState:
    """One call's progress through its retries, from :meth:`Retry.begin` at its first failure.

    A driver threads it through :meth:`Retry.next_delay` and :meth:`Retry.give_up`.
    It belongs to one call, so calls running at the same time in different threads
    or tasks never share attempt numbers.
    """

    __slots__ = ("_tenacity", "attempt", "last_delay", "started", "stop_reason", "waited")

    def __init__(self, started: float) -> None:
        self.started = started
        #: Attempts made so far (each next_delay call records one).
        self.attempt = 0
        #: Seconds of waiting granted so far.
        self.waited = 0.0
        #: The last wait granted (decorrelated jitter grows from it).
        self.last_delay = 0.0
        #: Why the last decision was to stop; None while retrying.
        self.stop_reason: StopReason | None = None
        # The tenacity view of this call, made on first use and updated in place.
        self._tenacity: RetryCallState | None = None

    def __repr__(self) -> str:
        return (
            f"<RetryState attempt={self.attempt} waited={self.waited:g} "
            f"stop_reason={self.stop_reason!r}>"
        )


# Retry ------------------------------------------------------------------------------


class _Note(str):
    """A give-up note that knows which Retry wrote it (by id), so a later one can replace it."""

    source: int

    def __new__(cls, text: str, source: int) -> _Note:
        note = super().__new__(cls, text)
        note.source = source
        return note

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions cross process pools; in another process the note is plain text.
        return (str, (str(self),))


def _is_tenacity(value: object, module: str, base: str) -> bool:
    """Whether ``value`` is a ``module.base`` instance, e.g. a ``tenacity.stop.stop_base``.

    A tenacity strategy can only exist once tenacity has been imported, so
    recognising one never needs the import, which would add ~50 ms to ``import
    resilient`` for users who never touch tenacity.
    """
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, base))


def _tenacity() -> Any:
    """The tenacity module, once a tenacity strategy has shown that it is imported."""
    return sys.modules["tenacity"]


@dataclass(frozen=True, slots=True, kw_only=True, init=False, eq=False, repr=False)
class Retry(_driver.Decorating):
    """Retry a failing call, with backoff, a retry budget and respect for the deadline.

    >>> retry = Retry(attempts=4, on=(ConnectionError, TimeoutError))
    >>> @retry
    ... def fetch(key: str) -> bytes: ...

    * ``attempts``: total tries, at least 1 (1 means no retries). Default 3, or
      no limit when ``stop`` is given (the stop strategy then decides); pass
      both to apply both, whichever stops first.
    * ``on``: which exceptions to retry: an exception type, a tuple of types,
      a predicate ``(exception) -> bool``, or a tenacity retry strategy such as
      ``tenacity.retry_if_exception_type(...)``. The default retries every
      :class:`Exception` but the programming errors of
      :data:`resilient.errors.PROGRAMMING_ERRORS` (``TypeError``, ``AttributeError``,
      ...), which would only repeat the bug; ``on=Exception`` retries those too.
      Never retried, whatever ``on`` says: exceptions that are not
      :class:`Exception` (cancellation, ``KeyboardInterrupt``...) and the toolkit's
      own refusals (``CircuitOpenError``, ``BulkheadFull``), say from a breaker
      decorating the function this ``Retry`` wraps.
    * ``on_result``: retry when the call *returns* a value this predicate (or
      tenacity strategy such as ``tenacity.retry_if_result(...)``) accepts; when
      retries run out the last value is returned.
    * ``backoff``: the waits (default ``Backoff()``); or ``wait``, a tenacity
      wait strategy such as ``tenacity.wait_exponential(...)``, not both.
    * ``stop``: a tenacity stop strategy (``stop_after_attempt``,
      ``stop_after_delay``...), consulted after each failed attempt with the
      upcoming wait known, as tenacity does.
    * ``budget``: the :class:`RetryBudget`, shared by all calls through this
      ``Retry`` (default: a new one per ``Retry``, on ``clock``). ``None``
      disables it.
    * ``retry_after``: ``(exception or result) -> seconds | None``, the wait the
      dependency itself asked for (an HTTP ``Retry-After``, a gRPC pushback).
      A number replaces the backoff's wait for that retry; if it would end after
      the deadline, retrying stops at once. ``None`` keeps the backoff.
    * ``on_retry``: a :class:`RetryHook` or a sequence of them, called with a
      :class:`RetryEvent` before each wait.
    * ``clock`` and ``random``: time in seconds and uniform floats in [0, 1);
      inject them to test.

    Tenacity strategies see a ``tenacity.RetryCallState`` whose ``fn``, ``args``
    and ``kwargs`` are empty; its times come from ``clock``.

    ``Retry`` never sleeps or calls the function itself: :class:`resilient.Policy`
    drives it, and this object is a ``Policy`` stage (a :class:`~resilient.stages.Retrier`).

    A ``Retry`` pickles as its configuration: the copy has a fresh budget. Its
    callables (``on``, ``retry_after``, hooks, ``clock``...) must then be picklable:
    module-level functions, not lambdas. With the default ``random``, each copy
    draws its own jitter.
    """

    attempts: int | None
    on: ExceptionFilter
    on_result: ResultFilter | None
    backoff: Backoff | None
    wait: wait_base | None
    stop: stop_base | None
    budget: RetryBudget | None
    retry_after: Callable[[Any], float | None] | None
    on_retry: RetryHook | Sequence[RetryHook] | None
    clock: Callable[[], float]
    random: Callable[[], float]
    count_call: Callable[[float], None] = field(init=False)
    """Count one call made at ``now`` in the budget; the driver calls it once per call.

    The budget's own ``deposit``, bound at construction, so a healthy call pays
    for one call and nothing else.
    """
    _on_types: tuple[type[BaseException], ...] | None = field(init=False)
    # Types the default `on` leaves out (the programming errors); () for any other `on`.
    _skips: tuple[type[BaseException], ...] = field(init=False)
    _on_is_tenacity: bool = field(init=False)
    _on_result_is_tenacity: bool = field(init=False)
    _hooks: tuple[RetryHook, ...] = field(init=False)
    # Set when any strategy is tenacity's: the retry_object their call state carries.
    _tenacity_retrying: BaseRetrying | None = field(init=False)
    # The drivers behind call() and acall(), per function, built on first use.
    _fills: ClassVar[str] = "retrier"  # @retry, retry.call(): the driver with this stage
    _drivers: _driver.DriverCache = field(init=False)

    def __init__(
        self,
        *,
        attempts: int | Default | None = DEFAULT,
        on: ExceptionFilter | Default = DEFAULT,
        on_result: ResultFilter | None = None,
        backoff: Backoff | None = None,
        wait: wait_base | None = None,
        stop: stop_base | None = None,
        budget: RetryBudget | Default | None = DEFAULT,
        retry_after: Callable[[Any], float | None] | None = None,
        on_retry: RetryHook | Sequence[RetryHook] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        on_is_tenacity = on_result_is_tenacity = False

        if stop is not None and not _is_tenacity(stop, "tenacity.stop", "stop_base"):
            raise TypeError(
                "stop must be a tenacity stop strategy such as "
                f"tenacity.stop_after_delay(10), got {stop!r}"
            )
        if isinstance(attempts, Default):
            attempts = 3 if stop is None else None
        elif attempts is None:
            if stop is None:
                raise ValueError(
                    "attempts=None (no limit) needs a stop strategy, or the call could "
                    "retry forever; pass attempts=N or stop=..."
                )
        else:
            check_int("attempts", attempts, minimum=1)

        on_types: tuple[type[BaseException], ...] | None = None
        skips: tuple[type[BaseException], ...] = ()
        if isinstance(on, Default):
            on, on_types, skips = Exception, (Exception,), PROGRAMMING_ERRORS
        elif isinstance(on, type):
            if not issubclass(on, BaseException):
                raise TypeError(f"on must be an exception type, got the class {on!r}")
            on_types = (on,)
        elif isinstance(on, tuple):
            if not on:
                raise ValueError("on must name at least one exception type, got ()")
            for item in on:
                if not (isinstance(item, type) and issubclass(item, BaseException)):
                    raise TypeError(
                        f"on must be a tuple of exception types, got {on!r} (holding {item!r})"
                    )
            on_types = on
        elif _is_tenacity(on, "tenacity.retry", "retry_base"):
            on_is_tenacity = True
        elif not callable(on):
            raise TypeError(
                "on must be an exception type, a tuple of them, a predicate taking the "
                f"exception, or a tenacity retry strategy, got {on!r}"
            )

        if on_result is not None:
            if _is_tenacity(on_result, "tenacity.retry", "retry_base"):
                on_result_is_tenacity = True
            elif isinstance(on_result, type) or not callable(on_result):
                raise TypeError(
                    "on_result must be a predicate taking the return value, a tenacity retry "
                    f"strategy such as tenacity.retry_if_result(...), or None, got {on_result!r}"
                )

        if wait is not None:
            if not _is_tenacity(wait, "tenacity.wait", "wait_base"):
                raise TypeError(
                    "wait must be a tenacity wait strategy such as "
                    f"tenacity.wait_exponential(), got {wait!r}"
                )
            if backoff is not None:
                raise ValueError(
                    f"give backoff or wait, not both: got backoff={backoff!r} and wait={wait!r}"
                )
        elif backoff is None:
            backoff = DEFAULT_BACKOFF
        elif not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a resilient.Backoff, got {backoff!r}")

        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        if not callable(random):
            raise TypeError(f"random must be a callable returning floats in [0, 1), got {random!r}")

        if isinstance(budget, Default):
            budget = RetryBudget(clock=clock)
        elif budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a resilient.RetryBudget or None, got {budget!r}")

        if retry_after is not None and not callable(retry_after):
            raise TypeError(
                "retry_after must be a callable taking the exception or result and returning "
                f"seconds or None, got {retry_after!r}"
            )

        if on_retry is None:
            hooks: tuple[RetryHook, ...] = ()
        elif isinstance(on_retry, list | tuple):
            hooks = tuple(on_retry)
        else:
            hooks = (cast(RetryHook, on_retry),)
        for hook in hooks:
            if not callable(hook):
                raise TypeError(
                    f"on_retry must be a callable taking a RetryEvent, or a sequence of them, "
                    f"got {on_retry!r}"
                )

        retrying = None
        if on_is_tenacity or on_result_is_tenacity or wait is not None or stop is not None:
            tenacity = _tenacity()
            retrying = tenacity.Retrying(
                stop=stop if stop is not None else tenacity.stop_never,
                wait=wait if wait is not None else tenacity.wait_none(),
            )

        setattr_ = object.__setattr__
        setattr_(self, "attempts", attempts)
        setattr_(self, "on", on)
        setattr_(self, "on_result", on_result)
        setattr_(self, "backoff", backoff)
        setattr_(self, "wait", wait)
        setattr_(self, "stop", stop)
        setattr_(self, "budget", budget)
        setattr_(self, "retry_after", retry_after)
        setattr_(self, "on_retry", on_retry)
        setattr_(self, "clock", clock)
        setattr_(self, "random", random)
        setattr_(self, "count_call", _count_nothing if budget is None else budget.deposit)
        setattr_(self, "_on_types", on_types)
        setattr_(self, "_skips", skips)
        setattr_(self, "_on_is_tenacity", on_is_tenacity)
        setattr_(self, "_on_result_is_tenacity", on_result_is_tenacity)
        setattr_(self, "_hooks", hooks)
        setattr_(self, "_tenacity_retrying", retrying)
        setattr_(self, "_drivers", {})

    def __repr__(self) -> str:
        parts = [f"attempts={self.attempts!r}", f"on={describe(self.on)}"]
        if self.on_result is not None:
            parts.append(f"on_result={describe(self.on_result)}")
        if self.wait is not None:
            parts.append(f"wait={describe(self.wait)}")
        else:
            parts.append(f"backoff={self.backoff!r}")
        if self.stop is not None:
            parts.append(f"stop={describe(self.stop)}")
        parts.append(f"budget={self.budget!r}")
        if self.retry_after is not None:
            parts.append(f"retry_after={describe(self.retry_after)}")
        if self._hooks:
            parts.append(f"on_retry={', '.join(describe(hook) for hook in self._hooks)}")
        return f"Retry({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration, so the copy starts with a fresh budget and no cached drivers
        # (the lock in the budget could not be pickled anyway).
        config: dict[str, Any] = {
            "attempts": self.attempts,
            "on_result": self.on_result,
            "backoff": self.backoff,
            "wait": self.wait,
            "stop": self.stop,
            "budget": self.budget,
            "retry_after": self.retry_after,
            "on_retry": self.on_retry,
            "clock": self.clock,
        }
        if not self._skips:
            # The default `on` is stored as Exception but also skips the programming
            # errors; passing on=Exception would retry those too.
            config["on"] = self.on
        if self.random is not _random.random:
            # The module's generator would be pickled with its state, and every copy
            # would then draw the same jitter: leave each process its own.
            config["random"] = self.random
        return (rebuild, (type(self), config))

    # The attempt loop ---------------------------------------------------------------------

    def __iter__(self) -> Attempts:
        """Retry a block of code rather than a function: ``for attempt in retry``.

        ::

            for attempt in Retry(attempts=3, on=ConnectionError):
                with attempt:
                    rows = fetch_rows()

        Each pass of the loop is one call through this ``Retry``, with the decorator's
        rules (budget, deadline, ``on``, hooks): see :class:`Attempts`. A ``Retry``
        with ``on_result`` is refused (``TypeError``): a block has no return value.
        """
        return Attempts(self)

    def __aiter__(self) -> Attempts:
        """The same loop in a coroutine, waiting with ``asyncio.sleep``: ``async for``.

        ::

            async for attempt in Retry(attempts=3, on=ConnectionError):
                with attempt:
                    rows = await fetch_rows()
        """
        return Attempts(self)

    # The Retrier protocol (resilient.stages) ----------------------------------------------

    @property
    def judges_results(self) -> bool:
        """Whether returned values are judged too (``on_result`` is set)."""
        return self.on_result is not None

    def tally(self) -> CallTally:
        """How :meth:`count_call` counts, as plain data (:class:`~resilient.stages.CallTally`)."""
        budget = self.budget
        return CallTally(None if budget is None else budget._slices)

    def begin(self, started: float) -> RetryState:
        """The state of one call that began at ``started``, made at its first failure.

        ``started`` (on ``clock``) is when the call began; elapsed times and
        tenacity's ``stop_after_delay`` count from it.
        """
        return RetryState(started)

    def next_delay(
        self,
        state: object,
        *,
        now: float,
        deadline: float = math.inf,
        error: Exception | None = None,
        result: object = None,
    ) -> float | None:
        """Record one failed attempt; return the seconds to wait before the next, or ``None``.

        Pass ``error`` when the attempt raised, else ``result``. ``now`` and
        ``deadline`` (absolute, ``math.inf`` for none) are on ``clock``. ``None``
        means stop: ``state.stop_reason`` says why. Before returning a wait it
        calls the ``on_retry`` hooks.
        """
        assert isinstance(state, RetryState)
        exc: BaseException | None = error
        state.attempt = attempt = state.attempt + 1
        retrying = self._tenacity_retrying
        view = None if retrying is None else self._tenacity_view(retrying, state, now, exc, result)
        failure: Exception | None = None
        if exc is not None:
            if not isinstance(exc, Exception):
                # Cancellation and interpreter exits must propagate, whatever `on` says.
                state.stop_reason = "not retryable"
                return None
            failure = exc
            if isinstance(exc, _REJECTIONS) and not exc.remote:
                state.stop_reason = "not retryable"
                return None
            if self._on_is_tenacity:
                retryable = bool(cast("retry_base", self.on)(cast("RetryCallState", view)))
            else:
                retryable = self._accepts(exc)
        elif self.on_result is None:
            retryable = False
        elif self._on_result_is_tenacity:
            retryable = bool(cast("retry_base", self.on_result)(cast("RetryCallState", view)))
        else:
            retryable = bool(cast("Callable[[Any], bool]", self.on_result)(result))
        if not retryable:
            state.stop_reason = "not retryable"
            return None

        attempts = self.attempts
        cap = _instant_cap
        if cap is not None and (attempts is None or cap < attempts):
            attempts = cap
        if attempts is not None and attempt >= attempts:
            state.stop_reason = "attempts exhausted"
            return None

        wait = self.wait
        if _instant_depth:
            delay = 0.0
        elif wait is not None:
            delay = float(wait(cast("RetryCallState", view)))
            if not 0.0 <= delay < math.inf:
                raise ValueError(
                    f"wait strategy {describe(wait)} returned {delay!r}; "
                    "a wait must be a finite number of seconds, at least 0"
                )
        else:
            delay = cast(Backoff, self.backoff).delay(attempt, state.last_delay, self.random)
        retry_after = self.retry_after
        if retry_after is not None and not _instant_depth:
            asked = retry_after(failure if failure is not None else result)
            if asked is not None:
                if not isinstance(asked, int | float) or isinstance(asked, bool):
                    raise TypeError(
                        f"retry_after {describe(retry_after)} returned "
                        f"{type(asked).__name__} {asked!r}; it must return seconds as a "
                        "number, or None"
                    )
                if not 0.0 <= asked < math.inf:
                    raise ValueError(
                        f"retry_after {describe(retry_after)} returned {asked!r}; "
                        "it must return a finite number of seconds, at least 0, or None"
                    )
                delay = asked

        if delay > LONGEST_WAIT:
            state.stop_reason = "wait too long"
            return None

        stop = self.stop
        if stop is not None:
            checked = cast("RetryCallState", view)
            checked.upcoming_sleep = delay
            if stop(checked):
                state.stop_reason = "stop condition"
                return None

        # A retry that would start at or after the deadline could only fail with it.
        if now + delay >= deadline:
            state.stop_reason = "deadline"
            return None

        budget = self.budget
        if budget is not None and not budget.try_withdraw(now):
            state.stop_reason = "retry budget exhausted"
            return None

        state.waited += delay
        state.last_delay = delay
        state.stop_reason = None
        if _logger.isEnabledFor(logging.INFO):
            # INFO: a healthy service's log (WARNING and up) stays quiet; turn it on to see.
            _logger.info(
                "attempt %d failed with %s; retrying in %.3f s",
                attempt,
                "a retried result" if failure is None else describe(type(failure)),
                delay,
            )
        if self._hooks:
            event = RetryEvent(
                attempt=attempt,
                delay=delay,
                exception=failure,
                result=None if failure is not None else result,
                elapsed=now - state.started,
            )
            for hook in self._hooks:
                hook(event)
        return delay

    def accepts(self, error: Exception) -> bool:
        """Whether ``on`` takes ``error`` as worth retrying (attempts and budget aside)."""
        if self._on_is_tenacity:
            retrying = cast("BaseRetrying", self._tenacity_retrying)
            now = self.clock()
            view = self._tenacity_view(retrying, RetryState(now), now, error, None)
            return bool(cast("retry_base", self.on)(view))
        return self._accepts(error)

    def _accepts(self, exc: Exception) -> bool:
        """Whether ``on`` (exception types or a predicate, not tenacity's) takes ``exc``."""
        on_types = self._on_types
        if on_types is not None:
            return isinstance(exc, on_types) and not isinstance(exc, self._skips)
        return bool(cast("Callable[[Exception], bool]", self.on)(exc))

    def give_up(self, state: object, error: BaseException, reason: str | None = None) -> None:
        """Note on ``error`` why retrying stopped, unless it simply was not retryable at once.

        ``reason`` is the driver's, when it stopped for one of its own: ``"deadline"``
        (it passed during the wait) or ``"circuit open"`` (the breaker refused the
        next attempt).
        """
        assert isinstance(state, RetryState)
        exc = error
        if reason is not None:
            state.stop_reason = cast(StopReason, reason)
        reason = state.stop_reason or "deadline"
        attempts = state.attempt
        if reason == "not retryable" and attempts <= 1:
            return
        if reason == "attempts exhausted":
            cap = _instant_cap
            if cap is not None and (self.attempts is None or cap < self.attempts):
                why = f"attempts exhausted (attempts={self.attempts}, capped at {cap} for tests)"
            else:
                why = f"attempts exhausted (attempts={self.attempts})"
        elif reason == "retry budget exhausted":
            why = (
                "retry budget exhausted: too many recent calls through this Retry were "
                f"retried ({self.budget!r})"
            )
        elif reason == "deadline":
            why = "the deadline would pass before the next attempt could start"
        elif reason == "wait too long":
            why = f"the next wait was longer than {LONGEST_WAIT / 86400:g} days"
        elif reason == "circuit open":
            why = "the circuit breaker opened, so the next attempt was not made"
        elif reason == "stop condition":
            why = f"the stop strategy {describe(self.stop)} said to stop"
        else:
            why = f"{describe(type(exc))} is not retryable (on={describe(self.on)})"
        plural = "" if attempts == 1 else "s"
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):
            # One exception raised again and again (a module-level instance) carries this
            # Retry's latest note only, not one per call.
            notes[:] = [
                note for note in notes if not (isinstance(note, _Note) and note.source == id(self))
            ]
        exc.add_note(
            _Note(
                f"resilient.Retry: gave up after {attempts} attempt{plural} "
                f"({state.waited:.2f} s waiting in total): {why}",
                id(self),
            )
        )

    def _tenacity_view(
        self,
        retrying: BaseRetrying,
        state: RetryState,
        now: float,
        exc: BaseException | None,
        result: object,
    ) -> RetryCallState:
        """This attempt as a ``tenacity.RetryCallState``, for tenacity strategies."""
        tenacity = _tenacity()
        view = state._tenacity
        if view is None:
            view = tenacity.RetryCallState(retrying, None, (), {})
            view.start_time = state.started
            state._tenacity = view
        view.attempt_number = state.attempt
        if exc is not None:
            view.outcome = tenacity.Future.construct(state.attempt, exc, True)
        else:
            view.outcome = tenacity.Future.construct(state.attempt, result, False)
        view.outcome_timestamp = now
        view.idle_for = state.waited
        view.upcoming_sleep = 0.0
        return view


DEFAULT_BACKOFF = Backoff()


# The attempt iterator -----------------------------------------------------------------

_MISUSE: Final = "each attempt must be used exactly once in a with block"
# What an attempt loop does at its next step, besides waiting (a number) or ending.
_START: Final = object()  # count the call, then hand out attempt 1
_PENDING: Final = object()  # an attempt is out, its with block not entered yet
_INSIDE: Final = object()  # an attempt's with block is running
_DONE: Final = object()  # the loop is over: success, the error propagated, or misuse


class Attempt:
    """One attempt of a ``for attempt in retry`` loop; run its block in ``with attempt:``.

    The ``with`` block reports the attempt's outcome: leaving it normally ends the
    loop, an exception the :class:`Retry` retries is swallowed (the loop waits,
    then hands out the next attempt), any other propagates. Each attempt must be
    used in exactly one ``with`` block, else :class:`RuntimeError`.
    """

    __slots__ = ("_loop", "number")

    def __init__(self, loop: Attempts, number: int) -> None:
        self._loop = loop
        #: This attempt's number, 1-based.
        self.number = number

    def __repr__(self) -> str:
        return f"<Attempt number={self.number}>"

    def __enter__(self) -> Attempt:
        loop = self._loop
        if loop._command is not _PENDING or loop._number != self.number:
            loop._end()
            raise RuntimeError(
                f"{_MISUSE}: attempt {self.number} was used again (or after the loop moved on)"
            )
        loop._command = _INSIDE
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        return self._loop._finish(error)


class Attempts:
    """The attempts of one call through a :class:`Retry`: ``for`` or ``async for``, not both.

    Made by ``iter(retry)`` / ``aiter(retry)``, that is by ``for attempt in retry``
    and ``async for attempt in retry``; it yields :class:`Attempt` objects. The
    decisions are the decorator's own (the one failure path of
    :class:`resilient._driver.Recovery`): the call is counted in the budget when the
    loop starts, and each retry withdraws from it; the deadline in force when the
    loop starts bounds the waits; the ``on_retry`` hooks, ``retry_after`` and the
    logging on ``resilient.retry`` apply; waits go through the same sleep as the
    decorator's, so :func:`~resilient.testing.record_sleeps` and
    :func:`instant_retries` work.

    When the retries are over, the ``with`` block re-raises the attempt's own
    exception with the give-up note on it; if the deadline passes during a wait,
    the ``for`` statement raises it (the wait happens when the next attempt is
    asked for). A sync loop refuses to retry inside a running event loop (it would
    block the loop while it waits): use ``async for`` there.
    """

    __slots__ = ("_asynchronous", "_command", "_flow", "_number", "_outer", "_retry", "_started")

    def __init__(self, retry: Retry) -> None:
        if retry.on_result is not None:
            raise TypeError(
                "a Retry with on_result cannot drive a 'for attempt in retry' loop: a with "
                "block has no return value to judge. Decorate a function (or use "
                "retry.call()), or raise an exception that `on` retries instead"
            )
        self._retry = retry
        self._asynchronous: bool | None = None
        # What the next step does: _START, _PENDING, _INSIDE, _DONE, _driver._ATTEMPT
        # (hand out the next attempt) or a number of seconds to wait first.
        self._command: object = _START
        self._flow: Generator[object, Any, Any] | None = None
        self._number = 0
        self._outer = math.inf
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<Attempts of {self._retry!r}: {self._number} handed out>"

    def __iter__(self) -> Attempts:
        return self

    def __aiter__(self) -> Attempts:
        return self

    def __next__(self) -> Attempt:
        command = self._step(asynchronous=False)
        if command is _DONE:
            raise StopIteration
        if command is not _driver._ATTEMPT:
            _driver.sleep(cast(float, command))
            self._resume()
        return self._hand_out()

    async def __anext__(self) -> Attempt:
        command = self._step(asynchronous=True)
        if command is _DONE:
            raise StopAsyncIteration
        if command is not _driver._ATTEMPT:
            await _driver.async_sleep(cast(float, command))
            self._resume()
        return self._hand_out()

    def _step(self, *, asynchronous: bool) -> object:
        """What the next step must do: hand out an attempt, wait first, or end (``_DONE``)."""
        if self._asynchronous is None:
            self._asynchronous = asynchronous
        elif self._asynchronous is not asynchronous:
            self._end()
            used, other = ("async for", "for") if asynchronous else ("for", "async for")
            raise RuntimeError(
                f"this attempt loop was started with '{other}'; it cannot go on with '{used}'"
            )
        command = self._command
        if command is _PENDING or command is _INSIDE:
            self._end()
            why = "was never entered" if command is _PENDING else "is still in its with block"
            raise RuntimeError(f"{_MISUSE}: attempt {self._number} {why}")
        if command is _START:
            retry = self._retry
            self._started = started = retry.clock()
            retry.count_call(started)
            try:
                self._outer = _driver.deadline_in_force()
            except BaseException:
                self._end()
                raise
            command = _driver._ATTEMPT
        return command

    def _resume(self) -> None:
        """After a wait: the flow grants the next attempt, or raises the error (deadline)."""
        flow = cast("Generator[object, Any, Any]", self._flow)
        try:
            next(flow)  # _ATTEMPT: a flow yields one wait at a time
        except BaseException:
            self._end()
            raise

    def _hand_out(self) -> Attempt:
        self._number += 1
        self._command = _PENDING
        return Attempt(self, self._number)

    def _end(self) -> None:
        """End the loop, freeing the failure path (and the error it holds)."""
        self._command = _DONE
        flow, self._flow = self._flow, None
        if flow is not None:
            flow.close()

    def _finish(self, error: BaseException | None) -> bool:
        """The with block of the current attempt ended: whether to swallow ``error``."""
        if self._command is not _INSIDE:
            return False  # the loop already ended: a misuse inside the block
        if error is None or not isinstance(error, Exception):
            # Success ends the loop; cancellation and interpreter exits are never retried.
            self._end()
            return False
        if not self._asynchronous and _in_event_loop():
            # Refused before the failure path decides: no hook, log or budget withdrawal
            # for a retry this loop could only make by blocking the event loop.
            self._end()
            raise RuntimeError(
                "a 'for attempt in retry' loop would block the running event loop while it "
                "waits between attempts; in a coroutine write 'async for attempt in retry'"
            ) from error
        traceback = error.__traceback__
        flow = self._flow
        try:
            if flow is None:
                retry = self._retry
                outer = self._outer
                recovery = _driver.Recovery(retry, None, self._started, outer, outer, None, None)
                self._flow = flow = recovery.flow(error, None, None)
                command = next(flow)
            else:
                command = flow.throw(error)
        except BaseException as raised:
            self._end()
            if raised is error:
                # The give-up (with its note) or an error not retried: let it leave the
                # with block as raised there, without this machinery on its traceback.
                error.__traceback__ = traceback
                return False
            raise  # a hook or strategy failed: chained to the attempt's error
        finally:
            error = traceback = flow = None
        self._command = command
        return True


def _in_event_loop() -> bool:
    """Whether this thread is running an event loop (a sync wait would block it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
