"""A thread-safe mapping split into independently locked shards, with optional LRU bound.

Services keep per-host state -- circuit breakers, HTTP clients, rate limiters -- in a map that
many threads read on every request and that occasionally gains a new host. :class:`ShardedMap`
is a :class:`collections.abc.MutableMapping` for that job. Keys are spread over ``shards`` plain
dicts by ``hash(key)``, each shard guarded by its own lock. Reads look the key up without taking
any lock; writes lock only the key's shard. :meth:`ShardedMap.get_or_create` builds a missing
value by calling a factory exactly once per key, however many threads ask at the same moment,
and runs that factory without holding a lock, so a slow factory delays only the callers waiting
for the same key. With ``max_items`` the map evicts its least recently used items and hands each
evicted item to ``on_evict``, so state for an unbounded set of hosts cannot grow without bound.

When sharding pays, honestly: under the GIL one dict operation is already atomic and only one
thread runs Python code at a time, so shards buy no parallel CPU work. What the design buys is
reads that never wait for a lock, and compound operations (get-or-create, LRU bookkeeping) that
lock one shard rather than the whole map. A lock shared by busy threads is costly under the GIL:
if the interpreter switches a thread out while it holds the lock, the others block, and the lock
can settle into a convoy that cuts its throughput severalfold (CPython 3.13 shows this readily
for a dict behind one lock). Lock-free reads avoid it; unbounded reads are also about 1.4x as
fast as a locked dict's with one thread, simply because they skip the lock. Writes cost about
twice a locked dict's (a Python ``__setitem__`` cannot match dict's C one), and writes to a
bounded map, which reorder the LRU under the shard lock, can convoy when several threads write
at once. So use it for shared, read-mostly state; for state one thread owns, use a plain dict.
On free-threaded CPython dicts synchronise internally, so the lock-free reads stay safe, and
writers to different shards run in parallel. ``benchmarks/shardmap.py`` measures these claims.

A map does not pickle or copy (:class:`TypeError`): what it holds is this process's state --
clients, breakers, locks -- and ``on_evict`` is usually a closure, while a copy with the
configuration but none of the contents would silently start cold. Pickle ``m.snapshot()`` and
``update()`` a new map from it where the values do pickle. A forked child can use the map:
each shard's lock is made anew there, and creations that other threads of the parent had in
flight, which can never finish in the child, are forgotten so the child creates those values
itself.

Public names: :class:`ShardedMap`.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import Final, Generic, NoReturn, TypeVar, overload

from resilient import _fork
from resilient._config import check_int

__all__ = ["ShardedMap"]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class _Missing(enum.Enum):
    MISSING = enum.auto()


# A sentinel rather than None, because None is a legitimate stored value.
_MISSING: Final = _Missing.MISSING


class _Creation(Generic[V]):
    """One in-flight ``get_or_create`` call; callers for the same key wait on ``done``."""

    __slots__ = ("creator", "done", "error", "value")

    def __init__(self) -> None:
        self.creator = threading.get_ident()
        self.done = threading.Event()
        self.value: V | _Missing = _MISSING
        self.error: Exception | None = None


# How many lock-free reads a bounded shard buffers before a reader folds them into the recency
# order under the lock (if it is free); small enough to bound memory, large enough to amortise
# taking the lock.
_READ_BUFFER_LIMIT: Final = 64


class _Shard(Generic[K, V]):
    """One dict with its lock. Every mutation holds ``lock``; lookups of ``data`` need not."""

    __slots__ = ("capacity", "data", "lock", "pending", "reads", "recency")

    def __init__(self, capacity: int | None) -> None:
        self.data: dict[K, V] = {}
        self.lock = threading.Lock()
        self.capacity = capacity
        # Recency lives beside ``data`` instead of reordering it: moving a key to the end of a
        # plain dict means delete-then-insert, and a lock-free reader could see it missing.
        self.recency: OrderedDict[K, None] | None = None if capacity is None else OrderedDict()
        # Reads append here (deque.append is atomic) instead of locking to reorder ``recency``;
        # every write replays the buffer before it changes the order, so LRU stays exact.
        self.reads: deque[K] = deque()
        self.pending: dict[K, _Creation[V]] = {}

    def record_read(self, key: K) -> None:
        """Note a lock-free hit on ``key``; call only when bounded."""
        reads = self.reads
        reads.append(key)
        # Tidy up only if the lock is free, so a reader never waits: a writer replays the buffer
        # itself before touching the order, and otherwise a later read gets the lock.
        if len(reads) >= _READ_BUFFER_LIMIT and self.lock.acquire(blocking=False):
            try:
                self.replay_reads_locked()
            finally:
                self.lock.release()

    def replay_reads_locked(self) -> None:
        recency = self.recency
        if recency is None:
            return
        reads = self.reads
        # Bounded by the length now, so readers appending meanwhile cannot keep us here.
        for _ in range(len(reads)):
            key = reads.popleft()
            # The key may have been removed after the lookup that found it.
            if key in recency:
                recency.move_to_end(key)

    def touch_locked(self, key: K) -> None:
        if self.recency is not None:
            self.replay_reads_locked()
            self.recency.move_to_end(key)

    def store_locked(self, key: K, value: V) -> tuple[K, V] | None:
        """Insert or replace ``key``; return the item evicted to make room, if any."""
        data = self.data
        recency = self.recency
        if recency is None:
            data[key] = value
            return None
        if self.reads:
            self.replay_reads_locked()
        if key in data:
            data[key] = value
            recency.move_to_end(key)
            return None
        evicted = None
        # Evict before inserting so that even an unlocked len() never sees the shard over its
        # capacity.
        if self.capacity is not None and len(data) >= self.capacity:
            oldest, _ = recency.popitem(last=False)
            evicted = (oldest, data.pop(oldest))
        data[key] = value
        recency[key] = None
        return evicted

    def remove_locked(self, key: K) -> V | _Missing:
        value = self.data.pop(key, _MISSING)
        if value is not _MISSING and self.recency is not None:
            # Buffered reads of this key are skipped on replay because it is no longer there.
            del self.recency[key]
        return value

    def pop_oldest_locked(self) -> tuple[K, V]:
        """Remove the least recently used item (any item when unbounded); shard non-empty."""
        if self.recency is None:
            return self.data.popitem()
        self.replay_reads_locked()
        key, _ = self.recency.popitem(last=False)
        return key, self.data.pop(key)

    def clear_locked(self) -> None:
        self.data.clear()
        if self.recency is not None:
            self.recency.clear()
            self.reads.clear()


class ShardedMap(MutableMapping[K, V]):
    """A mutable mapping split into ``shards`` independently locked dicts.

    Args:
        shards: Number of shards, a power of two >= 1. A key lives in shard
            ``hash(key) & (shards - 1)``. More shards mean less contention between writers and
            concurrent ``get_or_create`` calls; 32 suits a few dozen threads.
        max_items: If set (>= 1), the map never holds more than this many items. The bound is
            split across the shards so that the shard capacities sum to exactly ``max_items``;
            inserting a new key into a full shard evicts that shard's least recently used item.
            So the total never exceeds ``max_items``, but eviction is LRU *within a shard*: a
            full shard evicts even when other shards have room, and the evicted item need not
            be the globally oldest. That approximates global LRU well when each shard holds
            dozens of items; with only a few per shard, choose fewer shards, or ``shards=1`` for
            exact global LRU. When ``max_items`` is smaller than ``shards``, the map uses the
            largest power of two <= ``max_items`` shards, so every shard can hold an item.
        on_evict: Called as ``on_evict(key, value)`` exactly once for every item evicted to
            respect ``max_items``, after the map is updated and outside any lock, so it may
            close clients or use this map. It is not called for items removed on purpose --
            by ``del``, ``pop``, ``popitem`` or ``clear`` -- nor for a value replaced by
            assignment. If it raises, the exception propagates to the caller whose insertion
            caused the eviction, after the map is consistent; the insertion stands.

    Reads (``m[key]``, ``get``, ``in``, the hit path of ``get_or_create``) take no lock. With
    ``max_items`` set, hits by ``m[key]``, ``get``, ``get_or_create`` and ``setdefault`` and
    every assignment count as use; ``in``, ``len`` and iteration do not. A lock-free hit is
    noted in a per-shard buffer that the shard's next write replays before it reorders or
    evicts anything, so reads never wait for a lock (a reader folds the buffer in itself once
    it holds 64 hits, but only if the lock is free) and eviction is still exact LRU within the
    shard.

    ``len()`` sums the shards without locking, and ``items()``, ``keys()``, ``values()`` and
    iteration work on a copy taken one shard at a time: each shard's part is consistent, the
    whole is not one atomic snapshot, and mutating the map while iterating never raises.
    Order is unspecified. To copy the map use :meth:`snapshot`, not ``dict(m)`` (see there).
    """

    def __init__(
        self,
        *,
        shards: int = 32,
        max_items: int | None = None,
        on_evict: Callable[[K, V], object] | None = None,
    ) -> None:
        check_int("shards", shards, minimum=1)
        if shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards!r}")
        if max_items is not None:
            check_int("max_items", max_items, minimum=1)
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable or None, got {on_evict!r}")

        if max_items is None:
            capacities: list[int | None] = [None] * shards
        else:
            # A shard with capacity 0 could never store its keys, so give up shards instead.
            shards = min(shards, 1 << (max_items.bit_length() - 1))
            base, remainder = divmod(max_items, shards)
            capacities = [base + (index < remainder) for index in range(shards)]
        self._shards: tuple[_Shard[K, V], ...] = tuple(_Shard(c) for c in capacities)
        # Unbounded reads need nothing but the shard's dict: keep the dicts at hand.
        self._unbounded_data: tuple[dict[K, V], ...] | None = (
            tuple(shard.data for shard in self._shards) if max_items is None else None
        )
        self._mask = shards - 1
        self._max_items = max_items
        self._on_evict = on_evict
        # One registration for all the shards: a map may have many.
        _fork.register(self)

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or copied: it holds this process's "
            "state (clients, breakers, an on_evict callback), and a copy without it would "
            "start cold unnoticed; pickle or copy m.snapshot() and update() a new map from it"
        )

    def _after_fork_in_child(self) -> None:
        # In a forked child only the forking thread lives on: a shard lock another thread
        # held stays held, and a creation another thread had in flight never finishes, so
        # its waiters would wait forever. The forking thread's own creations still finish.
        me = threading.get_ident()
        for shard in self._shards:
            shard.lock = threading.Lock()
            pending = shard.pending
            for key, creation in list(pending.items()):
                if creation.creator == me:
                    creation.done = threading.Event()
                else:
                    del pending[key]

    @property
    def shards(self) -> int:
        """Number of shards in use (fewer than requested when ``max_items`` is smaller)."""
        return len(self._shards)

    @property
    def max_items(self) -> int | None:
        """The bound on the number of items, or None when unbounded."""
        return self._max_items

    def _shard_for(self, key: K) -> _Shard[K, V]:
        return self._shards[hash(key) & self._mask]

    def _report_eviction(self, evicted: tuple[K, V]) -> None:
        if self._on_evict is not None:
            self._on_evict(*evicted)

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """Return the value for ``key``, calling ``factory()`` to create it if it is missing.

        Among concurrent callers for a missing key, one runs ``factory`` -- outside any lock --
        and the others wait for it and receive the very same object. ``factory`` therefore runs
        once per key unless the key is later removed or evicted. If ``factory`` raises an
        ``Exception``, nothing is stored, and the caller that ran it and every caller waiting
        on it get that same exception object (as with ``concurrent.futures.Future.result``)
        rather than queueing up to retry a failing factory one after another; the next call
        tries again. If the creating thread is interrupted by a ``BaseException`` such as
        ``KeyboardInterrupt``, that thread alone sees it and one of the waiters creates the
        value instead.

        If the key is assigned or deleted, or the map cleared, while its factory runs, the
        factory's value is still stored when done. A factory must not call ``get_or_create``
        for its own key (that raises ``RuntimeError`` instead of deadlocking), and factories
        must not wait on each other in a cycle.
        """
        # Inlined shard lookup: this is the hot path for callers that keep per-key state.
        shard = self._shards[hash(key) & self._mask]
        value = shard.data.get(key, _MISSING)
        if value is not _MISSING:
            if shard.recency is not None:
                shard.record_read(key)
            return value

        while True:
            with shard.lock:
                value = shard.data.get(key, _MISSING)
                if value is not _MISSING:
                    shard.touch_locked(key)
                    return value
                creation = shard.pending.get(key)
                if creation is None:
                    creation = _Creation()
                    shard.pending[key] = creation
                    break
            if creation.creator == threading.get_ident():
                raise RuntimeError(
                    f"get_or_create({key!r}) was called from inside its own factory; "
                    "it would wait for itself forever"
                )
            creation.done.wait()
            outcome = creation.value
            if outcome is not _MISSING:
                return outcome
            if creation.error is not None:
                raise creation.error
            # The creator was interrupted rather than failing; loop so one of us takes over.

        try:
            created = factory()
        except BaseException as exc:
            # Only an Exception is the factory's verdict; an interrupt belongs to this thread.
            if isinstance(exc, Exception):
                creation.error = exc
            with shard.lock:
                del shard.pending[key]
            creation.done.set()
            raise
        try:
            with shard.lock:
                del shard.pending[key]
                evicted = shard.store_locked(key, created)
            creation.value = created
        finally:
            # Waiters must wake even if storing failed; finding no value, they retry.
            creation.done.set()
        if evicted is not None:
            self._report_eviction(evicted)
        return created

    def __getitem__(self, key: K) -> V:
        shard = self._shards[hash(key) & self._mask]
        value = shard.data[key]
        if shard.recency is not None:
            shard.record_read(key)
        return value

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V, /) -> V: ...
    @overload
    def get(self, key: K, default: T, /) -> V | T: ...
    def get(self, key: K, default: object = None, /) -> object:
        data = self._unbounded_data
        if data is not None:
            return data[hash(key) & self._mask].get(key, default)
        shard = self._shards[hash(key) & self._mask]
        value = shard.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        shard.record_read(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & self._mask].data

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._shards[hash(key) & self._mask]
        with shard.lock:
            if shard.recency is None:
                # No call inside the lock: the GIL switches threads only at calls and loops, so
                # this holder cannot be switched out mid-section and start a lock convoy.
                shard.data[key] = value
                return
            evicted = shard.store_locked(key, value)
        if evicted is not None:
            self._report_eviction(evicted)

    def __delitem__(self, key: K) -> None:
        shard = self._shard_for(key)
        with shard.lock:
            value = shard.remove_locked(key)
        if value is _MISSING:
            raise KeyError(key)

    @overload
    def pop(self, key: K, /) -> V: ...
    @overload
    def pop(self, key: K, default: V, /) -> V: ...
    @overload
    def pop(self, key: K, default: T, /) -> V | T: ...
    def pop(self, key: K, default: object = _MISSING, /) -> object:
        shard = self._shard_for(key)
        with shard.lock:
            value = shard.remove_locked(key)
        if value is not _MISSING:
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[K, V]:
        """Remove and return some item (the least recently used of its shard when bounded)."""
        for shard in self._shards:
            with shard.lock:
                if shard.data:
                    return shard.pop_oldest_locked()
        raise KeyError("popitem(): ShardedMap is empty")

    @overload
    def setdefault(self: ShardedMap[K, T | None], key: K, default: None = None, /) -> T | None: ...
    @overload
    def setdefault(self, key: K, default: V, /) -> V: ...
    def setdefault(self, key: K, default: object = None, /) -> object:
        """Like ``dict.setdefault`` but atomic: concurrent callers all get the stored value."""
        shard = self._shard_for(key)
        with shard.lock:
            value = shard.data.get(key, _MISSING)
            if value is not _MISSING:
                shard.touch_locked(key)
                return value
            evicted = shard.store_locked(key, default)  # type: ignore[arg-type]
        if evicted is not None:
            self._report_eviction(evicted)
        return default

    def clear(self) -> None:
        for shard in self._shards:
            with shard.lock:
                shard.clear_locked()

    def __len__(self) -> int:
        return sum(len(shard.data) for shard in self._shards)

    def snapshot(self) -> dict[K, V]:
        """Return a plain dict copy, taken one shard at a time under each shard's lock.

        Prefer this (or ``dict(m.items())``) to ``dict(m)``: ``dict()`` copies a mapping by
        listing its keys and then looking each one up again, which raises ``KeyError`` if
        another thread removes a key in between.
        """
        snapshot: dict[K, V] = {}
        for shard in self._shards:
            with shard.lock:
                snapshot.update(shard.data)
        return snapshot

    def __iter__(self) -> Iterator[K]:
        keys: list[K] = []
        for shard in self._shards:
            with shard.lock:
                keys.extend(shard.data)
        return iter(keys)

    def items(self) -> ItemsView[K, V]:
        """A view of a copy of the items: later changes to the map do not show up in it."""
        return self.snapshot().items()

    def keys(self) -> KeysView[K]:
        """A view of a copy of the keys: later changes to the map do not show up in it."""
        return self.snapshot().keys()

    def values(self) -> ValuesView[V]:
        """A view of a copy of the values: later changes to the map do not show up in it."""
        return self.snapshot().values()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} len={len(self)} shards={self.shards} "
            f"max_items={self._max_items!r}>"
        )
