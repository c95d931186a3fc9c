"""Where a circuit breaker keeps its state: the :class:`BreakerStore` seam.

The breaker's state machine (:mod:`resilient.breaker`) only decides; a store
remembers the state, the counters and the sliding window, and makes each step
atomic. :class:`InMemoryBreakerStore` is the default. A store shared between
processes (Redis, say) implements the same protocol and keeps a locally cached
``state`` for the breaker's fast path to read, refreshed by its own mechanism.

A breaker builds its store from its ``store`` factory. A plain factory (a class
such as :class:`InMemoryBreakerStore`, or any callable) is called with the
:class:`WindowSpec` alone. A factory that must know more, such as which breaker
it serves (a shared store derives its keys from the breaker's name), is a
:class:`BreakerStoreFactory`: an object with a ``for_breaker(spec)`` method, given
a :class:`BreakerSpec` with the breaker's name, window and timing. The breaker
prefers ``for_breaker`` when the factory has one, so existing factories keep working.

Public names: :class:`BreakerState`, :class:`BreakerStore`,
:class:`InMemoryBreakerStore`, :class:`StoreSnapshot`, :class:`WindowSpec`,
:class:`BreakerSpec`, :class:`BreakerStoreFactory`, :data:`StoreFactory`.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol, TypeAlias, runtime_checkable

from resilient import _fork

__all__ = [
    "BreakerSpec",
    "BreakerState",
    "BreakerStore",
    "BreakerStoreFactory",
    "InMemoryBreakerStore",
    "StoreFactory",
    "StoreSnapshot",
    "WindowSpec",
]


class BreakerState(enum.Enum):
    """Where a circuit breaker is in its cycle; see :mod:`resilient.breaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"


# Module globals are cheaper to read than class attributes on the fast path.
_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_ISOLATED: Final = BreakerState.ISOLATED


# The store seam ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """The shape of the sliding window a store keeps.

    The last ``size`` calls, or the last ``duration`` seconds, or neither (no
    window: the breaker has no ``failure_rate``). At most one is set.
    """

    size: int | None = None
    duration: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSpec:
    """What a :class:`BreakerStoreFactory` learns about the breaker it builds a store for.

    ``name`` is the breaker's (a shared store derives its keys from it), ``window``
    the shape of its sliding window, ``reset_timeout`` the seconds it stays open
    before probing, ``half_open_max_calls`` how many probes it lets run at once, and
    ``clock`` the clock its ``now`` arguments come from. ``generated_name`` is true
    when the breaker was given no name and made one up (``breaker-1``, ...): other
    processes make up the same names for unrelated breakers, so a shared store must
    not key state by such a name.
    """

    name: str
    window: WindowSpec
    reset_timeout: float
    half_open_max_calls: int
    clock: Callable[[], float]
    generated_name: bool = False


@runtime_checkable
class BreakerStoreFactory(Protocol):
    """A store factory told which breaker it serves: ``store=`` objects with ``for_breaker``.

    The breaker calls ``for_breaker`` once, in its constructor. Building the store
    must not change any shared state: a breaker constructed in one process must not
    reset the breaker its fleet shares.
    """

    def for_breaker(self, spec: BreakerSpec) -> BreakerStore:
        """Build the store of the breaker that ``spec`` describes."""
        ...


# A NamedTuple, not a frozen dataclass: one is built per recorded outcome, and a
# frozen dataclass costs about three times as much to build.
class StoreSnapshot(NamedTuple):
    """A consistent view of a :class:`BreakerStore`.

    ``epoch`` identifies one stay in one state: it changes on every state
    change, so an operation that names the epoch it saw cannot act on a state
    that has since been left and entered again. ``probes_in_flight`` counts every
    probe still running, whichever half-open stay admitted it.
    """

    state: BreakerState
    epoch: int
    opened_at: float | None
    consecutive_failures: int
    window_calls: int
    window_failures: int
    probes_in_flight: int
    probe_successes: int


class BreakerStore(Protocol):
    """Where a :class:`CircuitBreaker` keeps all its mutable state.

    The breaker decides; the store remembers, and makes each operation atomic.
    A breaker builds its store by calling its ``store`` factory with a
    :class:`WindowSpec`, or its ``for_breaker`` with a :class:`BreakerSpec` (see
    :class:`BreakerStoreFactory`). ``now`` is always the breaker's clock reading.

    ``state`` and ``consecutive_failures`` are read on every call, and
    ``opened_at`` on every rejected call, without any other operation, so they
    must be plain, cheap reads. A store shared between
    processes keeps local cached copies that its own mechanism refreshes.
    """

    @property
    def state(self) -> BreakerState:
        """The current state, possibly a locally cached copy."""
        ...

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success in the closed state, possibly cached."""
        ...

    @property
    def opened_at(self) -> float | None:
        """When the current open or isolated stay began, possibly cached; else ``None``."""
        ...

    def load(self, now: float) -> StoreSnapshot:
        """Return the current state and counters, the window as it stands at ``now``."""
        ...

    def compare_and_set_state(self, epoch: int, new_state: BreakerState, now: float) -> bool:
        """If the store is still in ``epoch``, move to ``new_state`` with fresh counters.

        Returns whether it moved. ``opened_at`` becomes ``now`` when
        ``new_state`` is ``OPEN`` or ``ISOLATED``, ``None`` otherwise. Moving to the
        state it is already in is allowed and just clears the counters. Probes in
        flight are not a counter of the stay: they keep their slots until released.
        """
        ...

    def record(self, failed: bool, now: float) -> StoreSnapshot | None:
        """In the closed state, count one outcome and return the counts after it.

        Returns ``None`` when there is nothing to judge: without counting anything
        when the state is not closed (a call admitted before the breaker opened
        says nothing new), and, if the store likes, for a success counted while
        the window holds no failure (it cannot trip the breaker).
        """
        ...

    def acquire_probe(self, epoch: int, limit: int) -> bool:
        """Take a probe slot in the half-open stay ``epoch`` if fewer than ``limit`` are taken.

        Slots still held by probes of earlier stays count as taken: however often the
        breaker reopens and half-opens, no more than ``limit`` probes run at once.
        """
        ...

    def release_probe(self, epoch: int, succeeded: bool) -> int | None:
        """Give back the slot of a probe admitted in stay ``epoch``, even if that stay is over.

        Counts a success for the stay if ``succeeded`` and it is still current.
        Returns the successful probes of that stay so far, or ``None`` if the
        store has left it (the outcome came too late to count).
        """
        ...


class _CountWindow:
    """The last ``size`` outcomes as a ring buffer, with running totals: O(1) per outcome."""

    __slots__ = ("_next", "_outcomes", "calls", "failures")

    def __init__(self, size: int) -> None:
        self._outcomes = bytearray(size)
        self._next = 0
        self.calls = 0
        self.failures = 0

    def add_success_unlocked(self, now: float) -> bool:
        """Count a success while the window holds no failure, without the store's lock.

        Every stored outcome is a success, so where the ring's next position is does
        not matter: only the count grows, up to the size. Returns ``True``.
        """
        # Read once, write once: racing threads may lose a count, but never write more
        # than the size (a count past it would stop add() from ever evicting again).
        calls = self.calls
        if calls < len(self._outcomes):
            self.calls = calls + 1
        return True

    def add(self, failed: bool, now: float) -> None:
        outcomes = self._outcomes
        position = self._next
        if self.calls >= len(outcomes):
            self.failures -= outcomes[position]
        else:
            self.calls += 1
        outcomes[position] = failed
        self.failures += failed
        self._next = (position + 1) % len(outcomes)

    def counts(self, now: float) -> tuple[int, int]:
        return self.calls, self.failures


class _TimeWindow:
    """Outcomes of the last ``duration`` seconds, in buckets of ``duration / BUCKETS``.

    An outcome is forgotten when its bucket falls out of the newest
    ``BUCKETS``, that is between ``duration * (1 - 1/BUCKETS)`` and ``duration``
    seconds after it happened. Each bucket is emptied once per pass of the
    clock over it, so upkeep is O(1) amortised per outcome.
    """

    BUCKETS: Final = 10

    __slots__ = (
        "_bucket_calls",
        "_bucket_failures",
        "_newest",
        "_newest_end",
        "_width",
        "calls",
        "failures",
    )

    def __init__(self, duration: float) -> None:
        self._width = duration / self.BUCKETS
        self._bucket_calls = [0] * self.BUCKETS
        self._bucket_failures = [0] * self.BUCKETS
        self._newest: int | None = None
        # When the newest bucket ends: before then, an outcome goes in it as it stands.
        self._newest_end = -math.inf
        self.calls = 0
        self.failures = 0

    def add_success_unlocked(self, now: float) -> bool:
        """Count a success in the newest bucket without the store's lock, if ``now`` is in it.

        ``False`` when the window must move on first (under the lock).
        """
        newest = self._newest
        if newest is None or now >= self._newest_end:
            return False
        self._bucket_calls[newest % self.BUCKETS] += 1
        self.calls += 1
        return True

    def _advance(self, now: float) -> int:
        """Empty the buckets that fell out of the window by ``now``; return the current slot."""
        bucket = math.floor(now / self._width)
        newest = self._newest
        if newest is None or bucket - newest >= self.BUCKETS:
            self._bucket_calls = [0] * self.BUCKETS
            self._bucket_failures = [0] * self.BUCKETS
            self.calls = self.failures = 0
            self._newest = newest = bucket
            self._newest_end = (bucket + 1) * self._width
        elif bucket > newest:
            for passed in range(newest + 1, bucket + 1):
                slot = passed % self.BUCKETS
                self.calls -= self._bucket_calls[slot]
                self.failures -= self._bucket_failures[slot]
                self._bucket_calls[slot] = self._bucket_failures[slot] = 0
            self._newest = newest = bucket
            self._newest_end = (bucket + 1) * self._width
        # A clock that stepped back files the outcome under the newest bucket.
        return newest % self.BUCKETS

    def add(self, failed: bool, now: float) -> None:
        slot = self._advance(now)
        self._bucket_calls[slot] += 1
        self._bucket_failures[slot] += failed
        self.calls += 1
        self.failures += failed

    def counts(self, now: float) -> tuple[int, int]:
        self._advance(now)
        return self.calls, self.failures


class InMemoryBreakerStore:
    """The default :class:`BreakerStore`: state in this process, guarded by one lock.

    The lock is held only for the few operations that change the state or the
    counters, never while a protected call runs. ``state`` and
    ``consecutive_failures`` are plain attributes, read without the lock by the
    breaker's fast path.

    A success recorded while the failure-rate window holds no failure takes no lock
    either: it can trip nothing. Two threads counting such successes at the same
    instant may lose one of the two counts. The rate is then judged on a call or
    two fewer: very slightly stricter, never looser (``minimum_calls`` is reached a
    call or two later). The same trade the retry budget makes, for the same reason:
    a healthy call should not contend on a lock.
    """

    __slots__ = (
        "_epoch",
        "_lock",
        "_probe_successes",
        "_probes_in_flight",
        "_window",
        "_window_spec",
        "consecutive_failures",
        "opened_at",
        "state",
    )

    def __init__(self, window: WindowSpec | None = None) -> None:
        self._window_spec = WindowSpec() if window is None else window
        self._lock = threading.Lock()
        _fork.register_lock(self._lock)
        self.state = _CLOSED
        self._epoch = 0
        self.opened_at: float | None = None
        self.consecutive_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._window = self._new_window()

    def __repr__(self) -> str:
        return f"InMemoryBreakerStore(state={self.state.value}, window={self._window_spec!r})"

    def _new_window(self) -> _CountWindow | _TimeWindow | None:
        spec = self._window_spec
        if spec.size is not None:
            return _CountWindow(spec.size)
        if spec.duration is not None:
            return _TimeWindow(spec.duration)
        return None

    def _snapshot(self, now: float) -> StoreSnapshot:
        calls, failures = (0, 0) if self._window is None else self._window.counts(now)
        return StoreSnapshot(
            self.state,
            self._epoch,
            self.opened_at,
            self.consecutive_failures,
            calls,
            failures,
            self._probes_in_flight,
            self._probe_successes,
        )

    def load(self, now: float) -> StoreSnapshot:
        with self._lock:
            return self._snapshot(now)

    def compare_and_set_state(self, epoch: int, new_state: BreakerState, now: float) -> bool:
        with self._lock:
            if epoch != self._epoch:
                return False
            self._epoch += 1
            self.opened_at = now if new_state is _OPEN or new_state is _ISOLATED else None
            self.consecutive_failures = 0
            # _probes_in_flight is kept: a probe still running holds its slot into the
            # next half-open stay, until it is released.
            self._probe_successes = 0
            self._window = self._new_window()
            # Last, so a lock-free reader that sees the new state also sees fresh counters.
            self.state = new_state
            return True

    def record(self, failed: bool, now: float) -> StoreSnapshot | None:
        if not failed and self.state is _CLOSED and not self.consecutive_failures:
            # The healthy case: a success while the window holds no failure cannot trip
            # anything. It is counted without the lock (see the class docstring).
            window = self._window
            if window is None or (not window.failures and window.add_success_unlocked(now)):
                return None
        with self._lock:
            if self.state is not _CLOSED:
                return None
            self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
            window = self._window
            if window is not None:
                window.add(failed, now)
            if not failed and (window is None or not window.failures):
                # The healthy case: a success with no failure in the window cannot trip
                # anything, so spare it the snapshot and the breaker's judgement.
                return None
            return self._snapshot(now)

    def acquire_probe(self, epoch: int, limit: int) -> bool:
        with self._lock:
            if epoch != self._epoch or self.state is not _HALF_OPEN:
                return False
            if self._probes_in_flight >= limit:
                return False
            self._probes_in_flight += 1
            return True

    def release_probe(self, epoch: int, succeeded: bool) -> int | None:
        with self._lock:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            if epoch != self._epoch:
                return None
            if succeeded:
                self._probe_successes += 1
            return self._probe_successes

    def _seed(
        self,
        state: BreakerState,
        epoch: int,
        opened_at: float | None,
        consecutive_failures: int,
        probe_successes: int,
    ) -> None:
        """Take over a stay from elsewhere (a shared store falling back to this one).

        The window starts empty: its counts stayed where they were kept.
        """
        with self._lock:
            self._epoch = epoch
            self.opened_at = opened_at
            self.consecutive_failures = consecutive_failures
            self._probe_successes = probe_successes
            self._window = self._new_window()
            self.state = state


def _build_store(factory: StoreFactory, spec: BreakerSpec) -> BreakerStore:
    """A breaker's store: ``factory.for_breaker(spec)`` if it has one, else ``factory(window)``."""
    # A class is called as it always was, even one that happens to define for_breaker.
    if not isinstance(factory, type) and isinstance(factory, BreakerStoreFactory):
        return factory.for_breaker(spec)
    return factory(spec.window)


StoreFactory: TypeAlias = "Callable[[WindowSpec], BreakerStore] | BreakerStoreFactory"
"""Builds a breaker's store: ``InMemoryBreakerStore``, any ``factory(window)``, or a
:class:`BreakerStoreFactory` (``for_breaker(spec)``) such as ``resilient.redis.RedisStore``."""
