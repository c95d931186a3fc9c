"""Fork safety: a child forked while other threads hold resilient's locks can use every object.

``os.fork()`` copies only the forking thread, so a lock another thread holds at that moment
would stay held in the child forever. Each test here has a thread hold the locks, forks from
the main thread, and has the child use the objects; the parent waits for it with a timeout.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import resilient.breaker as breaker_module
import resilient.retry as retry_module
import resilient.testing as testing_module
import resilient.tracing.metrics as metrics_module
from resilient import _driver, _fork
from resilient.breaker import CircuitBreaker, live_breakers, subscribe, unsubscribe
from resilient.bulkhead import Bulkhead
from resilient.hashring import HashRing
from resilient.policy import Policy
from resilient.retry import RetryBudget, instant_retries
from resilient.shardmap import ShardedMap
from resilient.testing import record_sleeps

CHILD_TIMEOUT = 10.0


def run_in_fork(child: Callable[[], object]) -> None:
    """Fork; the child runs ``child`` and exits 0 if it returns; assert that it did in time."""
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock the child:
        # that is the very thing under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which coverage does not follow
        status = 1
        try:
            child()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)  # never back into pytest, whatever happened
    give_up_at = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > give_up_at:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child was still stuck after {CHILD_TIMEOUT} s")
        time.sleep(0.005)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the child failed; see its traceback"


@contextmanager
def held_by_another_thread(*locks: Any) -> Iterator[None]:
    """Have a second thread hold ``locks`` for the duration of the block."""
    holding = threading.Event()
    done = threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.acquire()
        holding.set()
        done.wait(30)
        for lock in reversed(locks):
            lock.release()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(5)
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def test_bulkhead_in_a_child_has_every_slot_free_and_nobody_waiting() -> None:
    """A slot holder, a waiter and the bulkhead's lock in parent threads do not stop the child."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, name="db")
    slot_taken, may_leave = threading.Event(), threading.Event()

    def hold_slot() -> None:
        with bulkhead:
            slot_taken.set()
            may_leave.wait(30)

    def wait_for_slot() -> None:
        with bulkhead:
            pass

    threads = [threading.Thread(target=hold_slot, daemon=True)]
    threads[0].start()
    assert slot_taken.wait(5)
    threads.append(threading.Thread(target=wait_for_slot, daemon=True))
    threads[1].start()
    give_up_at = time.monotonic() + 5
    while bulkhead.waiting != 1:
        assert time.monotonic() < give_up_at
        time.sleep(0.001)

    @bulkhead
    def work() -> str:
        return "ran"

    async def work_async() -> str:
        async with bulkhead:
            return "ran"

    def child() -> None:
        bulkhead.acquire()
        bulkhead.release()
        assert work() == "ran"
        assert asyncio.run(work_async()) == "ran"
        assert (bulkhead.available, bulkhead.waiting) == (1, 0)

    try:
        with held_by_another_thread(bulkhead._lock):
            run_in_fork(child)
    finally:
        may_leave.set()
        for thread in threads:
            thread.join(5)
    assert (bulkhead.available, bulkhead.waiting) == (1, 0)  # the parent is unaffected


def test_a_slot_the_forking_thread_holds_can_be_given_back_in_the_child() -> None:
    """Forking inside ``with bulkhead:`` works: the child's exit from the block is accepted."""
    bulkhead = Bulkhead(max_concurrent=1)

    def child() -> None:
        bulkhead.release()  # the parent's slot, as the with block would give it back
        with bulkhead:
            pass
        assert bulkhead.available == 1

    with bulkhead:
        run_in_fork(child)
    assert bulkhead.available == 1


def test_rings_and_bounded_views_work_in_a_child() -> None:
    """A ring's writer lock and a bounded view's lock held in the parent are free in the child."""
    ring = HashRing(["a", "b", "c"])
    view = ring.bounded()

    def child() -> None:
        ring.add("d")
        ring.remove("a")
        assert ring.get("user:1") in {"b", "c", "d"}
        assert view.assign("user:1") in view.nodes
        view.release("user:1")

    with held_by_another_thread(ring._write_lock, view._lock):
        run_in_fork(child)
    assert ring.nodes == ("a", "b", "c")


@pytest.mark.parametrize("max_items", [None, 100])
def test_sharded_map_works_in_a_child(max_items: int | None) -> None:
    """A held shard lock and another thread's creation in flight do not stop the child."""
    mapping: ShardedMap[str, str] = ShardedMap(shards=4, max_items=max_items)
    mapping["k"] = "parent"
    creating, may_finish = threading.Event(), threading.Event()

    def slow_factory() -> str:
        creating.set()
        may_finish.wait(30)
        return "parent"

    creator = threading.Thread(
        target=mapping.get_or_create, args=("slow", slow_factory), daemon=True
    )
    creator.start()
    assert creating.wait(5)
    shard_locks = [shard.lock for shard in mapping._shards]

    def child() -> None:
        mapping["k"] = "child"
        assert mapping.get("k") == mapping["k"] == "child"
        assert mapping.get_or_create("slow", lambda: "child") == "child"
        del mapping["k"]
        assert mapping.snapshot() == {"slow": "child"}

    try:
        with held_by_another_thread(*shard_locks):
            run_in_fork(child)
    finally:
        may_finish.set()
        creator.join(5)
    assert mapping.snapshot() == {"k": "parent", "slow": "parent"}


def test_retry_budget_and_breaker_record_outcomes_in_a_child() -> None:
    """A retry budget's and a breaker store's locks held in the parent are free in the child."""
    budget = RetryBudget()
    breaker = CircuitBreaker(failure_threshold=2, name="svc")
    store_lock = breaker.store._lock  # type: ignore[attr-defined]

    def fail() -> None:
        raise ConnectionError("down")

    def child() -> None:
        now = time.monotonic()
        budget.deposit(now + 100)  # a new slice: the lock is taken
        assert budget.try_withdraw(now + 100)
        assert breaker.call(lambda: "ok") == "ok"
        for _ in range(2):
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        assert breaker.state.value == "open"

    with held_by_another_thread(budget._lock, store_lock):
        run_in_fork(child)
    assert breaker.state.value == "closed"


def test_module_locks_are_free_in_a_child() -> None:
    """The process-wide locks (subscribers, live breakers, testing switches, caches) too."""
    locks = [
        _driver._queues_lock,
        retry_module._instant_lock,
        breaker_module._subscribers_lock,
        breaker_module._live_lock,
        testing_module._recording_lock,
        metrics_module._instruments_lock,
    ]
    policy = Policy(attempt_timeout=5, retry=None, tracing=False)

    async def work() -> str:
        await asyncio.sleep(0)  # suspends, so the attempt deadline is queued
        return "ran"

    def listener(event: object) -> None:
        pass

    def child() -> None:
        assert asyncio.run(policy.acall(work)) == "ran"  # a new loop's deadline queue
        with instant_retries(), record_sleeps():
            pass
        subscribe(listener)
        unsubscribe(listener)
        breaker = CircuitBreaker(name="made-in-child")
        assert breaker in live_breakers()
        metrics_module.live_instruments()
        for lock in locks:
            assert lock.acquire(timeout=1)
            lock.release()

    with held_by_another_thread(*locks):
        run_in_fork(child)


def test_pybreaker_probe_is_free_in_a_child() -> None:
    """The pybreaker adapter's half-open probe, taken by a parent thread, is free in the child."""
    pybreaker = pytest.importorskip("pybreaker")
    from resilient._compat.pybreaker import PyBreakerStage

    stage = PyBreakerStage(pybreaker.CircuitBreaker(name="legacy"))

    def child() -> None:
        assert stage._probe.acquire(blocking=False)
        stage._probe.release()

    with held_by_another_thread(stage._probe):
        run_in_fork(child)


# -- the registry itself ---------------------------------------------------------------


class Resettable:
    """A fork-aware object that counts how often the hook reset it."""

    def __init__(self) -> None:
        self.resets = 0

    def _after_fork_in_child(self) -> None:
        self.resets += 1


def test_hook_reinitialises_locks_and_calls_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child hook unlocks every registered lock and resets every live registered object."""
    monkeypatch.setattr(_fork, "_locks", weakref.WeakSet())
    monkeypatch.setattr(_fork, "_objects", {})
    lock, rlock = threading.Lock(), threading.RLock()
    assert _fork.register_lock(lock) is lock
    _fork.register_lock(rlock)
    obj = Resettable()
    _fork.register(obj)
    gone = Resettable()
    dead = weakref.ref(gone)  # registered without the callback that would drop it
    _fork._objects[id(dead)] = dead
    del gone
    gc.collect()
    lock.acquire()
    rlock.acquire()
    _fork._after_fork_in_child()
    assert not lock.locked()
    assert rlock.acquire(blocking=False)  # its count and owner were reset too
    assert obj.resets == 1


def test_registration_keeps_nothing_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered objects and locks are held weakly and leave the registry when collected."""
    monkeypatch.setattr(_fork, "_locks", weakref.WeakSet())
    monkeypatch.setattr(_fork, "_objects", {})
    obj = Resettable()
    _fork.register(obj)
    lock = _fork.register_lock(threading.Lock())
    bulkhead, mapping = Bulkhead(max_concurrent=1), ShardedMap[str, int](shards=64)
    ring = HashRing(["a"])
    # One entry per map, not per shard; a ring registers its lock.
    assert (len(_fork._objects), len(_fork._locks)) == (3, 2)
    del obj, lock, bulkhead, mapping, ring
    gc.collect()
    assert (len(_fork._objects), len(_fork._locks)) == (0, 0)
