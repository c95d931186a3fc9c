"""Rate limiting: how often calls may start, by GCRA, for threads and asyncio tasks alike.

A :class:`RateLimiter` admits ``rate`` calls every ``per`` seconds, up to ``burst`` of
them at once::

    api_limit = RateLimiter(rate=100, per=1.0, burst=20, name="api")

    @api_limit                      # or Policy(rate_limit=api_limit, ...)
    def call_api(path): ...

The rule is GCRA, the generic cell rate algorithm (a token bucket's exact twin that
stores one number): a limiter keeps a single instant, the *theoretical arrival time*
(TAT) of the next call if calls came exactly one ``interval = per / rate`` apart. A
call at ``now`` is admitted when ``now >= TAT - (burst - 1) * interval``, and then
moves the TAT to ``max(TAT, now) + interval``. So ``burst`` calls pass at once, then
one per interval; an idle limiter earns its burst back at one call per interval.

Over the limit a limiter built with ``wait=False`` (the default) raises
:class:`~resilient.RateLimited` at once, its ``retry_after`` saying how many seconds
until a call would pass. With ``wait=True`` the caller instead waits for its turn
(``time.sleep`` in a thread, ``asyncio.sleep`` in a task): it reserves the next free
instant and sleeps until then, so waiters pass in the order they came, one interval
apart. Waiting honours the deadline in force (:func:`resilient.deadline.remaining`):
when the turn would come after the deadline, :class:`~resilient.DeadlineExceeded` is
raised at once, without sleeping and without reserving anything. A waiter cancelled
(or interrupted) while asleep gives its reserved turn back, if no later caller reserved
a turn meanwhile (else it stays an unused gap, so no two callers ever start together). A
sync wait (``with limiter:``, :meth:`~RateLimiter.acquire`, a decorated sync function) on
a thread running an event loop raises ``RuntimeError`` rather than block the loop: use
``async with limiter:`` or :meth:`~RateLimiter.acquire_async` there.

The limiter is an :class:`~resilient.stages.Admission` stage: :meth:`RateLimiter.try_acquire`
(never waits), :meth:`~RateLimiter.acquire`, :meth:`~RateLimiter.acquire_async` and a
:meth:`~RateLimiter.release` that does nothing (an admission is spent, not held). So it
decorates on its own (``@limiter``, :meth:`~RateLimiter.call`, :meth:`~RateLimiter.acall`)
and plugs into ``Policy(rate_limit=...)``, which asks it before the bulkhead.

Keyed limits
------------
``limiter.for_key(key)`` is the limiter for one key (a tenant, a user, a host): same
configuration, its own state. The per-key limiters live in a one-shard
:class:`~resilient.ShardedMap` bounded by ``max_keys`` (least recently used of all keys
first out), so an unbounded set of keys cannot grow memory without bound. An evicted key starts
afresh with its full burst, as if idle: choose ``max_keys`` above the number of keys
active within ``burst * interval``. Call ``for_key`` per call rather than keeping its
result: a view kept across its key's eviction no longer counts with the key's new one.

The state store seam
--------------------
The one instant lives in a :class:`RateStore`; the default, :class:`MemoryRateStore`,
keeps it in this process behind a lock held only for the compare-and-set. A store for
a fleet (Redis, say) implements the same three methods: :meth:`RateStore.take` is the
whole decision, done atomically where the state lives (a Lua script: read the TAT,
compare, write it back), so the limiter itself never reads or writes state;
:meth:`RateStore.give_back` is a compare-and-set too (the instant moves back only if it is
still the one the cancelled caller's take stored).

A store whose state is behind a network may also decide asynchronously, so that async
callers do not hold their event loop for a round trip: it adds two coroutine methods,
``take_async`` and ``give_back_async``, with the contracts of :meth:`~RateStore.take`
and :meth:`~RateStore.give_back` (both or neither: ``TypeError`` otherwise). In code
running on an event loop a limiter on such a store then decides only by awaiting them:
:meth:`~RateLimiter.acquire_async` (``async with``, decorated async functions) awaits
``take_async``, and :meth:`~RateLimiter.try_acquire`, which cannot await, takes nothing
and answers ``False``, meaning "ask ``acquire_async``" (the driver does, so a decorated
async function is admitted as usual). Off the loop the limiter calls the sync methods as
ever; a store that has no sync path (``resilient.redis.RedisRateStore`` on an
``redis.asyncio`` client) raises ``TypeError`` from ``take``, saying to use a sync client
there. Stores without them (the in-memory one) are unchanged and cost nothing more.

Clocks, pickling and forking
----------------------------
``clock`` is :func:`time.monotonic` unless injected (:class:`resilient.testing.FakeClock`
in tests); a shared store must use a clock all its processes share (Redis's own, for
``resilient.redis.RedisRateStore``). A reading earlier
than the latest one the limiter saw (a clock stepped back) counts as that latest one, so
the step does not add to anyone's wait. A limiter pickles as
its configuration: the copy starts with its full burst (a per-key view does not pickle:
pickle the limiter and call ``for_key`` in the other process). A forked child keeps a
copy of the state, its own from then on, and the store's lock is made anew there (see
:mod:`resilient._fork`): with an in-memory store, each process has its own limit.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Final, Protocol, cast, runtime_checkable

from resilient import _driver, _fork
from resilient._config import Duration, check_int, check_number, rebuild, to_seconds
from resilient.deadline import remaining
from resilient.errors import DeadlineExceeded, RateLimited
from resilient.shardmap import ShardedMap

__all__ = ["MemoryRateStore", "RateLimiter", "RateStore"]

# Waits this short count as none: clock readings that are a multiple of the interval
# apart can miss it by a rounding error, and a call must not be refused for that.
_SLACK: Final = 1e-9
# Makes a limiter's map of keys on first use only (most limiters are never keyed).
_KEYS_LOCK: Final = _fork.register_lock(threading.Lock())


class _Deferred(Exception):
    """Raised by a limiter's own ``take`` on an event loop when its store decides by awaiting.

    Caught at once by the limiter (``try`` costs nothing until it raises): never seen by
    callers.
    """


_Take = Callable[[float, float, float, float], tuple[float, float]]
# What acquire and acquire_async read after a _Deferred: a negative wait, which no take
# returns, tested only on the slow path (wait > 0 needs a test there anyway).
_DEFERRED_TURN: Final = (-1.0, math.nan)


@runtime_checkable
class RateStore(Protocol):
    """Where a limiter keeps its one instant: the seam for state shared across processes.

    All times are seconds on the limiter's clock, unless the store keeps its own: a
    store shared by hosts may ignore ``now`` and read a clock they all share, as
    ``resilient.redis.RedisRateStore`` reads Redis ``TIME``; the waits it returns are
    durations either way. An implementation must make :meth:`take` atomic: two callers
    must never both read the same instant and both write it forward.

    Optionally (both or neither, outside the ``isinstance`` check) a store may decide
    without blocking an event loop: ``async def take_async(now, interval, tolerance,
    max_wait)`` and ``async def give_back_async(reserved, interval)``, with the contracts
    of :meth:`take` and :meth:`give_back`. A limiter on it awaits them in async code
    (see "The state store seam" in the module docstring).
    """

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """Take one admission at ``now`` if it can be had within ``max_wait`` seconds.

        With ``tat = max(stored instant, now)`` and ``wait = tat - tolerance - now``
        (``0.0`` when at most a nanosecond): if ``wait <= max_wait``, store ``tat +
        interval`` and return ``(wait, tat + interval)``: the seconds the caller must
        wait for its turn (``0.0``: now) and the instant stored, which identifies this
        reservation to :meth:`give_back`. Otherwise store nothing and return ``(wait,
        stored instant)``; ``wait`` is then the refusal's ``retry_after``. ``max_wait``
        may be ``math.inf``.
        """
        ...

    def give_back(self, reserved: float, interval: float) -> None:
        """Return a turn reserved by the :meth:`take` that stored ``reserved``, never waited out.

        Atomically: if the stored instant is still exactly ``reserved`` (no later take
        moved it on), store ``reserved - interval``. Otherwise leave it: later callers
        hold the turns after this one, and moving the instant back would hand the last
        of them to a newcomer too; the turn given back stays an unused gap. (A store that
        keeps the instant as text must write and compare it exactly, e.g. as ``repr``.)
        """
        ...

    def for_key(self, key: Hashable) -> RateStore:
        """A store for the key ``key``'s own instant (a new, empty one for each call)."""
        ...


class MemoryRateStore:
    """The in-process :class:`RateStore`: one float behind a lock held for the compare-and-set.

    It pickles as a new, empty store: its instant is this process's.
    """

    __slots__ = ("__weakref__", "_lock", "_tat")

    def __init__(self) -> None:
        self._tat = -math.inf
        # Held for a few float operations, never across a wait: threads and the tasks of
        # any event loop share it without blocking one another for long.
        self._lock = _fork.register_lock(threading.Lock())

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """Take one admission within ``max_wait`` seconds; see :meth:`RateStore.take`."""
        with self._lock:
            tat = self._tat
            if tat < now:
                tat = now
            wait = tat - tolerance - now
            if wait <= _SLACK:
                wait = 0.0
            elif wait > max_wait:
                return wait, self._tat
            tat = self._tat = tat + interval
        return wait, tat

    def give_back(self, reserved: float, interval: float) -> None:
        """Move the instant back if it is still ``reserved``; see :meth:`RateStore.give_back`."""
        with self._lock:
            if self._tat == reserved:
                self._tat = reserved - interval

    def for_key(self, key: Hashable) -> MemoryRateStore:
        """A new, empty store for one key's instant."""
        return MemoryRateStore()

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryRateStore, ())

    def __repr__(self) -> str:
        return f"MemoryRateStore(tat={self._tat!r})"


class RateLimiter(_driver.Decorating):
    """Admits ``rate`` calls every ``per`` seconds, ``burst`` at once; see the module docstring.

    >>> limiter = RateLimiter(rate=2, per=1.0, burst=2)
    >>> limiter.try_acquire(), limiter.try_acquire(), limiter.try_acquire()
    (True, True, False)

    ``wait=False`` refuses a call over the limit with :class:`~resilient.RateLimited`
    (``retry_after`` seconds); ``wait=True`` makes it wait its turn, within the deadline
    in force. ``clock`` is read for every decision; ``store`` keeps the state (a new
    :class:`MemoryRateStore` by default); ``max_keys`` bounds how many per-key limiters
    :meth:`for_key` keeps. The configuration is read-only (properties).
    """

    _needs = "rate=..."  # for the error of @RateLimiter without parentheses
    _fills = "admission"  # @limiter, limiter.call(): the driver with this one stage

    __slots__ = (
        "__weakref__",
        "_burst",
        "_clock",
        "_drivers",
        "_give_back_async",
        "_given_store",
        "_interval",
        "_key",
        "_keys",
        "_latest_now",
        "_max_keys",
        "_name",
        "_per",
        "_rate",
        "_store",
        "_take",
        "_take_async",
        "_tolerance",
        "_wait",
    )

    def __init__(
        self,
        *,
        rate: float,
        per: Duration = 1.0,
        burst: int = 1,
        wait: bool = False,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        store: RateStore | None = None,
        max_keys: int = 10_000,
    ) -> None:
        self._rate = check_number("rate", rate, minimum=0.0, inclusive=False)
        self._per = to_seconds("per", per, allow_zero=False)
        self._interval = self._per / self._rate
        if not 0.0 < self._interval < math.inf:
            raise ValueError(
                f"rate={rate!r} per={per!r} gives an interval of {self._interval!r} s between "
                "calls, which a float clock cannot measure; pick a rate and per closer together"
            )
        self._burst = check_int("burst", burst, minimum=1)
        try:
            self._tolerance = (self._burst - 1) * self._interval
        except OverflowError:  # an int burst too large for a float
            self._tolerance = math.inf
        if not math.isfinite(self._tolerance + self._interval):
            raise ValueError(
                f"rate={rate!r} per={per!r} burst={burst!r} gives a burst window of "
                f"{self._tolerance!r} s, which a float cannot hold; pick a smaller burst "
                "or a higher rate"
            )
        if not isinstance(wait, bool):
            raise TypeError(f"wait must be True or False, got {type(wait).__name__}: {wait!r}")
        self._wait = wait
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}: {name!r}")
        self._name = "unnamed" if name is None else name
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._latest_now = -math.inf
        reading = clock()
        if not reading + self._interval > reading:
            raise ValueError(
                f"rate={rate!r} per={per!r} gives an interval of {self._interval!r} s between "
                f"calls, too small to move this clock's reading ({reading!r}) in a float; "
                "pick a lower rate or a longer per"
            )
        if store is not None and not isinstance(store, RateStore):
            raise TypeError(
                "store must be a RateStore (take, give_back, for_key) or None, "
                f"got {type(store).__name__}: {store!r}"
            )
        self._given_store = store
        self._store: RateStore = MemoryRateStore() if store is None else store
        take_async = getattr(self._store, "take_async", None)
        give_back_async = getattr(self._store, "give_back_async", None)
        if (take_async is None) != (give_back_async is None) or not (
            take_async is None or (callable(take_async) and callable(give_back_async))
        ):
            raise TypeError(
                "store must define both take_async and give_back_async (to decide in "
                f"async code by awaiting) or neither, got {type(self._store).__name__}: "
                f"{self._store!r} with take_async={take_async!r}, "
                f"give_back_async={give_back_async!r}"
            )
        self._take_async: Callable[..., Awaitable[tuple[float, float]]] | None = take_async
        self._give_back_async: Callable[..., Awaitable[None]] | None = give_back_async
        # On the healthy path the store's own method; with an async-capable store, a
        # wrapper that defers to acquire_async on an event loop (see _take_or_defer).
        self._take: _Take = self._store.take if take_async is None else self._take_or_defer
        self._max_keys = check_int("max_keys", max_keys, minimum=1)
        self._keys: ShardedMap[Hashable, RateLimiter] | None = None
        self._key: tuple[Hashable] | None = None  # set on a view made by for_key
        self._drivers: _driver.DriverCache = {}

    def __reduce__(self) -> tuple[Any, ...]:
        if self._key is not None:
            raise TypeError(
                f"a per-key view of a RateLimiter ({self._name!r}) cannot be pickled: it "
                "belongs to its limiter's bounded map of keys; pickle the limiter and call "
                "for_key() in the other process"
            )
        # As its configuration: the instant belongs to this process's callers.
        return (rebuild, (type(self), self._config()))

    def _config(self) -> dict[str, Any]:
        return {
            "rate": self._rate,
            "per": self._per,
            "burst": self._burst,
            "wait": self._wait,
            "name": self._name,
            "clock": self._clock,
            "store": self._given_store,
            "max_keys": self._max_keys,
        }

    # -- configuration -----------------------------------------------------

    @property
    def name(self) -> str:
        """The name shown in errors and in ``repr`` (a view's ends in ``[key]``)."""
        return self._name

    @property
    def rate(self) -> float:
        """How many calls are admitted every ``per`` seconds."""
        return self._rate

    @property
    def per(self) -> float:
        """The seconds ``rate`` calls are spread over."""
        return self._per

    @property
    def burst(self) -> int:
        """How many calls an idle limiter admits at once."""
        return self._burst

    @property
    def interval(self) -> float:
        """Seconds between two calls at the steady rate: ``per / rate``."""
        return self._interval

    @property
    def wait(self) -> bool:
        """Whether a call over the limit waits its turn (else it is refused)."""
        return self._wait

    @property
    def max_keys(self) -> int:
        """How many per-key limiters :meth:`for_key` keeps at most."""
        return self._max_keys

    @property
    def store(self) -> RateStore:
        """Where this limiter's instant is kept."""
        return self._store

    @property
    def tracked_keys(self) -> int:
        """How many per-key limiters :meth:`for_key` holds now (at most ``max_keys``)."""
        return 0 if self._keys is None else len(self._keys)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(name={self._name!r}, rate={self._rate:g}, per={self._per:g}, "
            f"burst={self._burst}, wait={self._wait})"
        )

    # -- keyed limits --------------------------------------------------------

    def for_key(self, key: Hashable) -> RateLimiter:
        """The limiter for ``key``: this one's configuration, its own state.

        The same object comes back for a key while it stays among the ``max_keys`` most
        recently used; see "Keyed limits" in the module docstring.
        """
        if self._key is not None:
            raise TypeError(
                f"{self._name!r} is already the limiter of one key; call for_key() on the "
                "limiter it came from"
            )
        keys = self._keys
        if keys is None:
            with _KEYS_LOCK:
                keys = self._keys
                if keys is None:  # pragma: no branch - else another thread just made it
                    # One shard: its LRU is exact over all keys, so fewer than max_keys
                    # active keys never lose their state (per-shard LRU would evict a
                    # key whose shard filled up while others had room).
                    keys = self._keys = ShardedMap(shards=1, max_items=self._max_keys)
        view = keys.get(key)
        if view is None:
            view = keys.get_or_create(key, lambda: self._view(key))
        return view

    def _view(self, key: Hashable) -> RateLimiter:
        config = self._config()
        config.update(name=f"{self._name}[{key!r}]", store=self._store.for_key(key))
        view = type(self)(**config)
        view._key = (key,)
        return view

    # -- the Admission stage ---------------------------------------------------

    def try_acquire(self) -> bool:
        """Take an admission if one is free now; never wait. Returns whether one was taken.

        With a store that decides asynchronously (see "The state store seam"), on an
        event loop this takes nothing and returns ``False``: "await :meth:`acquire_async`".
        """
        try:
            return self._take(self._now(), self._interval, self._tolerance, 0.0)[0] <= 0.0
        except _Deferred:
            return False

    def acquire(self) -> None:
        """Take an admission: refuse with ``RateLimited``, or (``wait=True``) sleep for it.

        Raises :class:`~resilient.RateLimited` over the limit with ``wait=False``, and
        :class:`~resilient.DeadlineExceeded` at once with ``wait=True`` when the turn
        would come after the deadline in force.
        """
        try:
            wait, reserved = self._turn(self._take)
        except _Deferred:
            wait, reserved = _DEFERRED_TURN
        if wait:
            if wait < 0.0:
                # On an event loop, with an async-capable store: its sync take, which
                # blocks for a round trip, or says (TypeError) that it has no sync path.
                # Outside the handler, so that its errors do not chain to _Deferred.
                wait, reserved = self._turn(self._store.take)
                if not wait:
                    return
            if asyncio._get_running_loop() is not None:
                self._store.give_back(reserved, self._interval)
                raise RuntimeError(
                    f"rate limiter {self._name!r} would admit this call in {wait:.3f} s, and "
                    "waiting for it here would block this thread's running event loop, and "
                    "with it every task on it; use 'async with limiter:' or "
                    "'await limiter.acquire_async()' in async code"
                )
            try:
                _driver.sleep(wait)
            except BaseException:
                self._store.give_back(reserved, self._interval)
                raise

    async def acquire_async(self) -> None:
        """Take an admission like :meth:`acquire`, suspending this task while it waits.

        A task cancelled while waiting gives its turn back; ``CancelledError`` propagates.
        With a store that decides asynchronously, the decision and the giving back are
        awaited (``take_async``, ``give_back_async``), so the loop never blocks on them.
        """
        try:
            wait, reserved = self._turn(self._take)
        except _Deferred:
            wait, reserved = _DEFERRED_TURN
        if wait:
            if wait < 0.0:  # outside the handler: errors must not chain to _Deferred
                await self._acquire_deferred()
                return
            try:
                await _driver.async_sleep(wait)
            except BaseException:
                self._store.give_back(reserved, self._interval)
                raise

    async def _acquire_deferred(self) -> None:
        """:meth:`acquire_async` on a store that decides by awaiting."""
        # Deferred only when the store has both (checked at construction).
        take_async = cast("Callable[..., Awaitable[tuple[float, float]]]", self._take_async)
        give_back_async = cast("Callable[..., Awaitable[None]]", self._give_back_async)
        if not self._wait:
            retry_after, _ = await take_async(self._now(), self._interval, self._tolerance, 0.0)
            if retry_after > 0.0:
                raise RateLimited(self._name, retry_after)
            return
        left = remaining()
        wait, reserved = await take_async(self._now(), self._interval, self._tolerance, left)
        if wait > left:
            raise self._late(wait, left)
        if wait:
            try:
                await _driver.async_sleep(wait)
            except BaseException:
                await give_back_async(reserved, self._interval)
                raise

    def _take_or_defer(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """The ``take`` of a limiter whose store can await: defer on a loop, else decide."""
        if asyncio._get_running_loop() is not None:
            raise _Deferred  # a new one each time: a reused one would grow its traceback
        return self._store.take(now, interval, tolerance, max_wait)

    def release(self) -> None:
        """Nothing to give back: an admission is spent when taken (the Admission contract)."""

    def _now(self) -> float:
        """The clock's reading, but never before the latest one seen (a clock stepped back)."""
        # Without this a clock stepped back by s would refuse or delay callers by s more
        # than GCRA implies. Racing threads may store a slightly older reading: harmless.
        now = self._clock()
        if now < self._latest_now:
            return self._latest_now
        self._latest_now = now
        return now

    def _turn(self, take: _Take) -> tuple[float, float]:
        """Take an admission now or reserve a later one: ``(seconds to wait, reserved)``."""
        if not self._wait:
            retry_after, reserved = take(self._now(), self._interval, self._tolerance, 0.0)
            if retry_after > 0.0:
                raise RateLimited(self._name, retry_after)
            return 0.0, reserved
        left = remaining()
        wait, reserved = take(self._now(), self._interval, self._tolerance, left)
        if wait > left:
            raise self._late(wait, left)
        return wait, reserved

    def _late(self, wait: float, left: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"rate limiter {self._name!r} would admit this call in {wait:.3f} s, after "
            f"the deadline in force ({left:.3f} s left), so it did not wait"
        )

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    async def __aenter__(self) -> None:
        await self.acquire_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None
