"""Tests for resilient.shardmap: mapping behaviour, get_or_create races, LRU bound."""

from __future__ import annotations

import copy
import functools
import pickle
import random
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future
from types import FrameType
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resilient.shardmap import ShardedMap


def start_call(call: Callable[[], Any]) -> tuple[threading.Thread, Future[Any]]:
    """Run ``call`` in a new thread; the future holds its result or exception."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, future


def _waiting_inside_get_or_create(frame: FrameType | None) -> bool:
    if frame is None or frame.f_code.co_filename != threading.__file__:
        return False
    if frame.f_code.co_name != "wait":
        return False
    while frame is not None:
        if frame.f_code.co_name == "get_or_create":
            return True
        frame = frame.f_back
    return False


def wait_until_parked(threads: list[threading.Thread]) -> None:
    """Return once every thread is blocked in an Event/Condition wait under get_or_create.

    That is the only place a caller can wait: the creator waits inside its (test) factory,
    everyone else waits for the creator. Polling the threads' frames makes the race tests
    deterministic instead of relying on a sleep being long enough.
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        frames = sys._current_frames()
        if all(_waiting_inside_get_or_create(frames.get(t.ident or -1)) for t in threads):
            return
        time.sleep(0.001)
    raise AssertionError("threads never all reached a wait inside get_or_create")


class CountingFactory:
    """A factory that blocks until released and counts how often it ran."""

    def __init__(self, result: Callable[[], object] = object) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self._result = result

    def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        assert self.release.wait(5), "test never released the factory"
        return self._result()


# --- behaves like a dict --------------------------------------------------------------------


class LruModel:
    """The reference behaviour: a dict, plus exact LRU eviction when ``capacity`` is set."""

    def __init__(self, capacity: int | None) -> None:
        self.items: OrderedDict[object, int] = OrderedDict()
        self.capacity = capacity
        self.evicted: list[tuple[object, int]] = []

    def touch(self, key: object) -> None:
        if key in self.items:
            self.items.move_to_end(key)

    def store(self, key: object, value: int) -> None:
        full = self.capacity is not None and len(self.items) >= self.capacity
        if key not in self.items and full:
            self.evicted.append(self.items.popitem(last=False))
        self.items[key] = value
        self.items.move_to_end(key)


keys = st.one_of(st.integers(-6, 6), st.sampled_from(["a", "b", "c", "d"]))
values = st.integers(-1000, 1000)


class MapMachine(RuleBasedStateMachine):
    """Drives a ShardedMap and an LruModel with the same random operations."""

    shards = 4
    max_items: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.model = LruModel(self.max_items)
        self.evicted: list[tuple[object, int]] = []
        self.map: ShardedMap[object, int] = ShardedMap(
            shards=self.shards,
            max_items=self.max_items,
            on_evict=lambda key, value: self.evicted.append((key, value)),
        )

    @rule(key=keys, value=values)
    def assign(self, key: object, value: int) -> None:
        self.map[key] = value
        self.model.store(key, value)

    @rule(key=keys)
    def getitem(self, key: object) -> None:
        if key in self.model.items:
            assert self.map[key] == self.model.items[key]
            self.model.touch(key)
        else:
            with pytest.raises(KeyError):
                self.map[key]

    @rule(key=keys)
    def get(self, key: object) -> None:
        assert self.map.get(key) == self.model.items.get(key)
        assert self.map.get(key, "default") == self.model.items.get(key, "default")
        self.model.touch(key)

    @rule(key=keys)
    def contains(self, key: object) -> None:
        assert (key in self.map) == (key in self.model.items)

    @rule(key=keys, value=values)
    def get_or_create(self, key: object, value: int) -> None:
        calls: list[None] = []

        def factory() -> int:
            calls.append(None)
            return value

        expected = self.model.items.get(key, value)
        assert self.map.get_or_create(key, factory) == expected
        assert len(calls) == (0 if key in self.model.items else 1)
        if key in self.model.items:
            self.model.touch(key)
        else:
            self.model.store(key, value)

    @rule(key=keys, value=values)
    def setdefault(self, key: object, value: int) -> None:
        assert self.map.setdefault(key, value) == self.model.items.get(key, value)
        if key in self.model.items:
            self.model.touch(key)
        else:
            self.model.store(key, value)

    @rule(key=keys)
    def delete(self, key: object) -> None:
        if key in self.model.items:
            del self.map[key]
            del self.model.items[key]
        else:
            with pytest.raises(KeyError):
                del self.map[key]

    @rule(key=keys)
    def pop(self, key: object) -> None:
        assert self.map.pop(key, None) == self.model.items.pop(key, None)

    @rule(key=keys)
    def pop_without_default(self, key: object) -> None:
        if key in self.model.items:
            assert self.map.pop(key) == self.model.items.pop(key)
        else:
            with pytest.raises(KeyError):
                self.map.pop(key)

    @rule()
    def popitem(self) -> None:
        if not self.model.items:
            with pytest.raises(KeyError):
                self.map.popitem()
            return
        key, value = self.map.popitem()
        if self.max_items is not None and self.shards == 1:
            # One shard means one LRU order: popitem must take the least recently used item.
            assert (key, value) == self.model.items.popitem(last=False)
        else:
            assert self.model.items.pop(key) == value

    @rule(pairs=st.lists(st.tuples(keys, values), max_size=4))
    def update(self, pairs: list[tuple[object, int]]) -> None:
        self.map.update(pairs)
        for key, value in pairs:
            self.model.store(key, value)

    @precondition(lambda self: len(self.model.items) > 2)
    @rule()
    def clear(self) -> None:
        self.map.clear()
        self.model.items.clear()

    @invariant()
    def same_contents(self) -> None:
        assert len(self.map) == len(self.model.items)
        assert dict(self.map.items()) == dict(self.model.items)
        assert sorted(map(repr, self.map)) == sorted(map(repr, self.model.items))
        assert self.map == dict(self.model.items)
        assert self.map.snapshot() == dict(self.model.items)
        assert self.evicted == self.model.evicted


class BoundedMapMachine(MapMachine):
    """With one shard the bound is global, so evictions must follow exact LRU order."""

    shards = 1
    max_items = 3


test_behaves_like_a_dict = MapMachine.TestCase
test_behaves_like_a_dict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_evicts_exactly_like_an_lru_cache = BoundedMapMachine.TestCase
test_evicts_exactly_like_an_lru_cache.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)


def test_is_a_mutable_mapping_usable_as_a_generic_type() -> None:
    """ShardedMap passes isinstance checks for MutableMapping and can be subscripted."""
    shardmap = ShardedMap[str, int]()
    assert isinstance(shardmap, MutableMapping)


def test_views_are_snapshots_unaffected_by_later_changes() -> None:
    """items(), keys() and values() are copies: mutating the map afterwards leaves them as is."""
    shardmap: ShardedMap[str, int] = ShardedMap()
    shardmap.update(a=1, b=2)
    items, keys, values = shardmap.items(), shardmap.keys(), shardmap.values()
    shardmap["c"] = 3
    del shardmap["a"]
    assert dict(items) == {"a": 1, "b": 2}
    assert set(keys) == {"a", "b"}
    assert sorted(values) == [1, 2]


def test_repr_shows_size_and_configuration() -> None:
    """repr() summarises the map instead of dumping possibly thousands of items."""
    shardmap: ShardedMap[str, int] = ShardedMap(shards=4, max_items=100)
    shardmap["a"] = 1
    assert repr(shardmap) == "<ShardedMap len=1 shards=4 max_items=100>"


# --- get_or_create --------------------------------------------------------------------------


def test_concurrent_get_or_create_runs_factory_once_and_shares_its_object() -> None:
    """32 threads racing for one missing key: one factory call, every caller gets its object."""
    shardmap: ShardedMap[str, object] = ShardedMap()
    factory = CountingFactory()
    barrier = threading.Barrier(32)

    def call() -> object:
        barrier.wait()
        return shardmap.get_or_create("host", factory)

    started = [start_call(call) for _ in range(32)]
    wait_until_parked([thread for thread, _ in started])
    factory.release.set()
    results = [future.result(timeout=5) for _, future in started]

    assert factory.calls == 1
    assert all(result is results[0] for result in results)
    assert shardmap["host"] is results[0]


def test_get_or_create_races_on_many_keys_create_each_key_once(
    frequent_thread_switches: None,
) -> None:
    """Threads creating 200 keys in different orders: one factory call per key, shared values."""
    shardmap: ShardedMap[int, object] = ShardedMap(shards=4)
    calls: list[int] = []  # list.append is atomic, so it is a safe call log

    def create_all(seed: int) -> dict[int, object]:
        order = list(range(200))
        random.Random(seed).shuffle(order)
        seen = {}
        for key in order:

            def factory(key: int = key) -> object:
                calls.append(key)
                return object()

            seen[key] = shardmap.get_or_create(key, factory)
        return seen

    started = [start_call(functools.partial(create_all, seed)) for seed in range(16)]
    results = [future.result(timeout=10) for _, future in started]

    assert sorted(calls) == list(range(200))
    for key in range(200):
        assert all(seen[key] is shardmap[key] for seen in results)


def test_slow_factory_does_not_block_other_keys_in_its_shard() -> None:
    """While a factory runs, other keys of the same shard can still be written and created."""
    shardmap: ShardedMap[str, object] = ShardedMap(shards=1)
    factory = CountingFactory()
    _, created = start_call(lambda: shardmap.get_or_create("slow", factory))
    assert factory.started.wait(5)

    def use_same_shard() -> object:
        shardmap["other"] = 1
        del shardmap["other"]
        return shardmap.get_or_create("fast", lambda: "fast value")

    other, other_result = start_call(use_same_shard)
    other.join(timeout=2)
    assert not other.is_alive(), "a write to the shard waited for another key's factory"
    assert other_result.result() == "fast value"
    assert "slow" not in shardmap

    factory.release.set()
    slow_value = created.result(timeout=5)
    assert shardmap["slow"] is slow_value


def test_failing_factory_stores_nothing_and_its_waiters_get_the_same_error() -> None:
    """A factory error reaches its caller and the callers waiting on it; a later call retries."""
    shardmap: ShardedMap[str, object] = ShardedMap()
    error = ConnectionError("backend down")

    def failing() -> object:
        raise error

    factory = CountingFactory(result=failing)
    started = [start_call(lambda: shardmap.get_or_create("host", factory)) for _ in range(8)]
    wait_until_parked([thread for thread, _ in started])
    factory.release.set()

    for _, future in started:
        assert future.exception(timeout=5) is error
    assert factory.calls == 1
    assert "host" not in shardmap
    assert shardmap.get_or_create("host", lambda: "recovered") == "recovered"


def test_interrupted_creator_hands_creation_to_a_waiter() -> None:
    """A BaseException in the creating thread stays there; a waiter runs its own factory."""

    class Interrupted(BaseException):
        pass

    def interrupt() -> object:
        raise Interrupted

    shardmap: ShardedMap[str, object] = ShardedMap()
    interrupted_factory = CountingFactory(result=interrupt)
    creator, creator_result = start_call(
        lambda: shardmap.get_or_create("host", interrupted_factory)
    )
    assert interrupted_factory.started.wait(5)
    waiter, waiter_result = start_call(lambda: shardmap.get_or_create("host", lambda: "waiter"))
    wait_until_parked([creator, waiter])
    interrupted_factory.release.set()

    assert isinstance(creator_result.exception(timeout=5), Interrupted)
    assert waiter_result.result(timeout=5) == "waiter"
    assert shardmap["host"] == "waiter"


def test_factory_asking_for_its_own_key_raises_instead_of_deadlocking() -> None:
    """Recursion on the key being created is reported as RuntimeError, and nothing is stored."""
    shardmap: ShardedMap[str, object] = ShardedMap()

    def recursive() -> object:
        return shardmap.get_or_create("host", recursive)

    with pytest.raises(RuntimeError, match="own factory"):
        shardmap.get_or_create("host", recursive)
    assert "host" not in shardmap


# --- LRU bound ------------------------------------------------------------------------------


def test_evicts_least_recently_used_and_reports_it_once() -> None:
    """Reads and writes refresh a key; `in` does not; on_evict gets each evicted item once."""
    evicted: list[tuple[str, int]] = []
    shardmap: ShardedMap[str, int] = ShardedMap(
        shards=1, max_items=3, on_evict=lambda key, value: evicted.append((key, value))
    )
    shardmap.update(a=1, b=2, c=3)
    assert shardmap.get("a") == 1
    assert "b" in shardmap  # membership tests are not use
    shardmap["d"] = 4
    assert evicted == [("b", 2)]
    shardmap["c"] = 30  # assignment refreshes c, so a is now the oldest
    shardmap["e"] = 5
    assert evicted == [("b", 2), ("a", 1)]
    assert dict(shardmap) == {"c": 30, "d": 4, "e": 5}


def test_many_lock_free_reads_keep_exact_lru_order() -> None:
    """More reads than the read buffer holds still leave the eviction order exact."""
    evicted: list[str] = []
    shardmap: ShardedMap[str, int] = ShardedMap(
        shards=1, max_items=3, on_evict=lambda key, value: evicted.append(key)
    )
    shardmap.update(a=1, b=2, c=3)
    for _ in range(100):
        assert shardmap["a"] == 1
    assert shardmap.get_or_create("b", lambda: 0) == 2
    shardmap["d"] = 4
    shardmap["e"] = 5
    assert evicted == ["c", "a"]


def test_eviction_is_lru_within_a_shard_not_across_shards() -> None:
    """Documented trade-off: a full shard evicts even while the map as a whole has room."""
    evicted: list[int] = []
    # Two shards of capacity 2; small ints hash to themselves, so even keys share shard 0.
    shardmap: ShardedMap[int, str] = ShardedMap(
        shards=2, max_items=4, on_evict=lambda key, value: evicted.append(key)
    )
    for key in (0, 2, 4):
        shardmap[key] = "v"
    assert evicted == [0]
    assert len(shardmap) == 2  # half of max_items, yet the map already evicted


def test_max_items_smaller_than_shards_still_stores_every_key() -> None:
    """With fewer items than shards the map drops shards so that no key is unstorable."""
    shardmap: ShardedMap[int, int] = ShardedMap(shards=32, max_items=3)
    assert (shardmap.shards, shardmap.max_items) == (2, 3)
    for key in range(100):
        shardmap[key] = key
        assert shardmap[key] == key
        assert len(shardmap) <= 3


def test_deliberate_removals_do_not_call_on_evict() -> None:
    """del, pop, popitem, clear and overwriting hand nothing to on_evict."""
    evicted: list[object] = []
    shardmap: ShardedMap[str, int] = ShardedMap(
        shards=1, max_items=10, on_evict=lambda key, value: evicted.append(key)
    )
    shardmap.update(a=1, b=2, c=3, d=4)
    shardmap["a"] = 10
    del shardmap["a"]
    assert shardmap.pop("b") == 2
    shardmap.popitem()
    shardmap.clear()
    assert evicted == []
    assert len(shardmap) == 0


def test_on_evict_runs_outside_the_lock_after_the_map_is_updated() -> None:
    """on_evict can use the map, and by then the evicted key is gone and the new one present."""
    observed: list[tuple[bool, bool]] = []
    shardmap: ShardedMap[str, int] = ShardedMap(shards=1, max_items=2)

    def on_evict(key: str, value: int) -> None:
        observed.append((key in shardmap, "new" in shardmap))
        shardmap.pop("unrelated", None)  # takes the shard lock: deadlocks if still held

    shardmap = ShardedMap(shards=1, max_items=2, on_evict=on_evict)
    shardmap.update(old=1, kept=2)
    inserter, inserted = start_call(lambda: shardmap.__setitem__("new", 3))
    inserter.join(timeout=2)
    assert not inserter.is_alive(), "on_evict was called while the shard lock was held"
    inserted.result()
    assert observed == [(False, True)]


def test_on_evict_error_propagates_after_the_insert_completed() -> None:
    """If on_evict raises, the caller sees it, but the map is consistent and within bounds."""

    def on_evict(key: str, value: int) -> None:
        raise RuntimeError(f"could not close {key}")

    shardmap: ShardedMap[str, int] = ShardedMap(shards=1, max_items=2, on_evict=on_evict)
    shardmap.update(a=1, b=2)
    with pytest.raises(RuntimeError, match="could not close a"):
        shardmap["c"] = 3
    assert dict(shardmap) == {"b": 2, "c": 3}


def test_bound_holds_and_each_eviction_is_reported_once_under_concurrent_inserts(
    frequent_thread_switches: None,
) -> None:
    """8 threads inserting distinct keys: len never exceeds max_items, nothing lost or doubled."""
    evicted: list[tuple[int, str]] = []
    shardmap: ShardedMap[int, str] = ShardedMap(
        shards=8, max_items=50, on_evict=lambda key, value: evicted.append((key, value))
    )
    inserting = threading.Event()
    inserting.set()
    largest_seen = 0

    def watch() -> None:
        nonlocal largest_seen
        while inserting.is_set():
            largest_seen = max(largest_seen, len(shardmap))

    def insert(first: int) -> None:
        for key in range(first, first + 1000):
            shardmap[key] = f"value {key}"
            shardmap.get(key - 7)  # reads interleave with writes, as in real use

    watcher, _ = start_call(watch)
    inserters = [start_call(functools.partial(insert, first)) for first in range(0, 8000, 1000)]
    for _, future in inserters:
        future.result(timeout=10)
    inserting.clear()
    watcher.join(timeout=5)

    assert largest_seen <= 50
    assert len(shardmap) == 50
    evicted_keys = [key for key, _ in evicted]
    assert len(evicted_keys) == len(set(evicted_keys)) == 8000 - 50
    assert set(evicted_keys).isdisjoint(shardmap)
    assert set(evicted_keys) | set(shardmap) == set(range(8000))
    assert all(value == f"value {key}" for key, value in evicted)


# --- iteration and configuration ------------------------------------------------------------


def test_iterating_while_other_threads_mutate_never_raises(
    frequent_thread_switches: None,
) -> None:
    """Iteration, views and len work on snapshots, so concurrent writers cannot break them."""
    shardmap: ShardedMap[int, int] = ShardedMap(shards=4)
    shardmap.update((key, key) for key in range(2000))
    mutating = threading.Event()
    mutating.set()

    def mutate() -> None:
        # Grow and shrink in batches so the size differs from the start size most of the time.
        extra = range(2000, 2100)
        while mutating.is_set():
            for key in extra:
                shardmap[key] = key
            for key in extra:
                del shardmap[key]

    mutator, mutated = start_call(mutate)
    try:
        for _ in range(100):
            assert 2000 <= sum(1 for _ in shardmap) <= 2100
            assert 2000 <= len(shardmap.items()) <= 2100
            assert 2000 <= len(shardmap.keys()) <= 2100
            assert 2000 <= len(shardmap.snapshot()) <= 2100
    finally:
        mutating.clear()
    mutator.join(timeout=5)
    mutated.result()


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"shards": 0}, ValueError),
        ({"shards": -4}, ValueError),
        ({"shards": 3}, ValueError),
        ({"shards": 48}, ValueError),
        ({"shards": 2.0}, TypeError),
        ({"shards": True}, TypeError),
        ({"max_items": 0}, ValueError),
        ({"max_items": "100"}, TypeError),
        ({"on_evict": 42}, TypeError),
    ],
)
def test_invalid_configuration_names_the_parameter_and_value(
    config: dict[str, object], error: type[Exception]
) -> None:
    """Each bad setting fails at construction with a message naming it and the bad value."""
    ((name, value),) = config.items()
    with pytest.raises(error, match=rf"{name}\b.*{re.escape(repr(value))}"):
        ShardedMap(**config)  # type: ignore[arg-type]


def test_configuration_is_keyword_only() -> None:
    """ShardedMap(8) is rejected, so a positional number cannot be mistaken for max_items."""
    with pytest.raises(TypeError):
        ShardedMap(8)  # type: ignore[call-arg]


# -- pickling and forking ------------------------------------------------------------------


def test_does_not_pickle_or_copy_and_says_what_to_do_instead() -> None:
    """Pickling or copying raises TypeError saying why and pointing to snapshot()."""
    mapping: ShardedMap[str, int] = ShardedMap(shards=2)
    mapping["a"] = 1
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied: .*m\.snapshot\(\)"):
            attempt(mapping)
    rebuilt: ShardedMap[str, int] = ShardedMap(shards=2)
    rebuilt.update(pickle.loads(pickle.dumps(mapping.snapshot())))
    assert rebuilt.snapshot() == {"a": 1}


def test_after_fork_shard_locks_are_new_and_other_threads_creations_are_forgotten() -> None:
    """The fork hook frees every shard lock and keeps only the forking thread's creations."""
    from resilient.shardmap import _Creation

    mapping: ShardedMap[str, str] = ShardedMap(shards=1, max_items=10)
    (shard,) = mapping._shards
    mine: _Creation[str] = _Creation()
    theirs: _Creation[str] = _Creation()
    theirs.creator = -1  # another thread of the parent: it does not exist in a child
    shard.pending.update({"mine": mine, "theirs": theirs})
    shard.lock.acquire()  # as if a parent thread held it
    mapping._after_fork_in_child()
    assert not shard.lock.locked()
    assert shard.pending == {"mine": mine}
    assert not mine.done.is_set()
    assert mapping.get_or_create("theirs", lambda: "made in the child") == "made in the child"
    del shard.pending["mine"]  # what the forking thread's own get_or_create does when done
    mine.done.set()
    mapping["k"] = "v"
    assert mapping.snapshot() == {"theirs": "made in the child", "k": "v"}
