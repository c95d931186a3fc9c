"""Bulkhead: concurrency cap, FIFO queue, limits on waiting, threads and tasks mixed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import pickle
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from resilient.adaptive import AdaptiveLimit
from resilient.bulkhead import Bulkhead
from resilient.deadline import deadline
from resilient.errors import BulkheadFull, DeadlineExceeded


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``condition`` (set by another thread) until it holds, or fail."""
    give_up_at = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up_at:
            raise AssertionError("condition was not reached in time")
        time.sleep(0.0005)


@contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread for the duration of the block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class PeakCounter:
    """Counts callers inside a section, across threads, remembering the most at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.peak = 0
        self.entries = 0

    def enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.entries += 1
            self.peak = max(self.peak, self.inside)

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def start_thread(target: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_for_waiters(bulkhead: Bulkhead, count: int) -> None:
    """Wait until ``count`` callers (started in other threads) are queued."""
    wait_until(lambda: bulkhead.waiting == count)


# -- configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "parameter"),
    [
        ({"max_concurrent": 0}, ValueError, "max_concurrent"),
        ({"max_concurrent": 2.0}, TypeError, "max_concurrent"),
        ({"max_concurrent": True}, TypeError, "max_concurrent"),
        ({"max_concurrent": "8"}, TypeError, "an int or a resilient.AdaptiveLimit"),
        ({"max_concurrent": 1, "max_waiting": -1}, ValueError, "max_waiting"),
        ({"max_concurrent": 1, "max_waiting": "3"}, TypeError, "max_waiting"),
        ({"max_concurrent": 1, "max_wait": -0.5}, ValueError, "max_wait"),
        ({"max_concurrent": 1, "max_wait": "1s"}, TypeError, "max_wait"),
        ({"max_concurrent": 1, "name": 7}, TypeError, "name"),
    ],
)
def test_bad_configuration_names_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], parameter: str
) -> None:
    """A bad value fails at construction with an error naming the parameter."""
    with pytest.raises(error, match=parameter):
        Bulkhead(**kwargs)


def test_a_bad_setting_beside_an_adaptive_limit_leaves_the_limit_free() -> None:
    """A bulkhead refused at construction does not claim the AdaptiveLimit it was given."""
    limit = AdaptiveLimit.aimd()
    with pytest.raises(ValueError, match="max_waiting"):
        Bulkhead(max_concurrent=limit, max_waiting=-1)
    assert limit.owner is None
    assert Bulkhead(max_concurrent=limit, name="db").adaptive_limit is limit


def test_configuration_is_readable_and_repr_shows_state() -> None:
    """Properties echo the configuration; repr shows the name, active and waiting counts."""
    bulkhead = Bulkhead(max_concurrent=2, max_waiting=3, max_wait=timedelta(seconds=1), name="db")
    assert (bulkhead.name, bulkhead.max_concurrent, bulkhead.max_waiting) == ("db", 2, 3)
    assert bulkhead.max_wait == 1.0
    bulkhead.acquire()
    assert (bulkhead.active, bulkhead.available, bulkhead.waiting) == (1, 1, 0)
    assert "name='db'" in repr(bulkhead)
    assert "active=1" in repr(bulkhead)
    assert "waiting=0" in repr(bulkhead)
    assert Bulkhead(max_concurrent=1).max_wait is None


# -- the cap -----------------------------------------------------------------


def test_threads_never_exceed_max_concurrent() -> None:
    """With 8 threads and 3 slots, exactly 3 run while the other 5 queue, then all finish."""
    bulkhead = Bulkhead(max_concurrent=3, max_waiting=10)
    counter = PeakCounter()
    go = threading.Event()

    def worker() -> None:
        with bulkhead:
            counter.enter()
            go.wait()
            counter.leave()

    threads = [start_thread(worker) for _ in range(8)]
    wait_for_waiters(bulkhead, 5)
    assert counter.inside == 3
    assert bulkhead.active == 3
    go.set()
    for thread in threads:
        thread.join()
    assert (counter.peak, counter.entries) == (3, 8)
    assert (bulkhead.available, bulkhead.waiting) == (3, 0)


async def test_tasks_never_exceed_max_concurrent() -> None:
    """With 8 tasks and 3 slots, exactly 3 run while the other 5 queue, then all finish."""
    bulkhead = Bulkhead(max_concurrent=3, max_waiting=10)
    counter = PeakCounter()
    go = asyncio.Event()

    async def worker() -> None:
        async with bulkhead:
            counter.enter()
            await go.wait()
            counter.leave()

    tasks = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.sleep(0)  # every task runs up to its first suspension
    assert (counter.inside, bulkhead.waiting) == (3, 5)
    go.set()
    await asyncio.gather(*tasks)
    assert (counter.peak, counter.entries) == (3, 8)
    assert (bulkhead.available, bulkhead.waiting) == (3, 0)


def test_threads_and_tasks_on_two_loops_share_the_cap() -> None:
    """Threads and tasks on two event loops competing for 2 slots never exceed 2 together."""
    bulkhead = Bulkhead(max_concurrent=2, max_waiting=100)
    counter = PeakCounter()
    rounds = 25

    def thread_worker() -> None:
        for _ in range(rounds):
            with bulkhead:
                counter.enter()
                time.sleep(0.0002)
                counter.leave()

    async def task_worker() -> None:
        for _ in range(rounds):
            async with bulkhead:
                counter.enter()
                await asyncio.sleep(0.0002)
                counter.leave()

    async def three_task_workers() -> None:
        await asyncio.gather(*(task_worker() for _ in range(3)))

    with loop_in_thread() as loop1, loop_in_thread() as loop2:
        runs = [asyncio.run_coroutine_threadsafe(three_task_workers(), loop1)]
        runs.append(asyncio.run_coroutine_threadsafe(three_task_workers(), loop2))
        threads = [start_thread(thread_worker) for _ in range(3)]
        for run in runs:
            run.result(timeout=10)
        for thread in threads:
            thread.join()
    assert counter.peak == 2
    assert counter.entries == 9 * rounds
    assert (bulkhead.available, bulkhead.waiting) == (2, 0)


# -- FIFO --------------------------------------------------------------------


def test_threads_get_slots_in_arrival_order() -> None:
    """Waiting threads are served first come, first served."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=10)
    order: list[int] = []
    bulkhead.acquire()

    def worker(number: int) -> None:
        with bulkhead:
            order.append(number)

    threads = []
    for number in range(6):
        threads.append(start_thread(worker, number))
        wait_for_waiters(bulkhead, number + 1)
    bulkhead.release()
    for thread in threads:
        thread.join()
    assert order == list(range(6))


async def test_tasks_get_slots_in_arrival_order() -> None:
    """Waiting tasks are served first come, first served."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=10)
    order: list[int] = []
    await bulkhead.acquire_async()

    async def worker(number: int) -> None:
        async with bulkhead:
            order.append(number)
            await asyncio.sleep(0)

    tasks = []
    for number in range(6):
        tasks.append(asyncio.create_task(worker(number)))
        await asyncio.sleep(0)
    assert bulkhead.waiting == 6
    bulkhead.release()
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert bulkhead.available == 1


def test_fifo_holds_across_threads_and_tasks_on_two_loops() -> None:
    """One queue serves threads and tasks on different loops strictly in arrival order."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=10)
    order: list[str] = []
    bulkhead.acquire()

    def thread_worker(label: str) -> None:
        with bulkhead:
            order.append(label)

    async def task_worker(label: str) -> None:
        async with bulkhead:
            order.append(label)

    with loop_in_thread() as loop1, loop_in_thread() as loop2:
        kinds: list[asyncio.AbstractEventLoop | None] = [None, loop1, None, loop2, loop1, None]
        threads, runs, labels = [], [], []
        for position, loop in enumerate(kinds):
            label = f"{position}-{'thread' if loop is None else 'task'}"
            labels.append(label)
            if loop is None:
                threads.append(start_thread(thread_worker, label))
            else:
                runs.append(asyncio.run_coroutine_threadsafe(task_worker(label), loop))
            wait_for_waiters(bulkhead, position + 1)
        bulkhead.release()
        for run in runs:
            run.result(timeout=2)
        for thread in threads:
            thread.join()
    assert order == labels
    assert bulkhead.available == 1


# -- refusing and giving up ------------------------------------------------


def test_full_queue_refuses_at_once() -> None:
    """Beyond max_waiting, acquire raises BulkheadFull without waiting or queueing."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, name="db")
    bulkhead.acquire()
    queued = start_thread(bulkhead.acquire)
    wait_for_waiters(bulkhead, 1)
    with pytest.raises(BulkheadFull) as caught:
        bulkhead.acquire()
    refusal = caught.value
    assert (refusal.name, refusal.max_concurrent, refusal.max_waiting) == ("db", 1, 1)
    assert bulkhead.waiting == 1
    bulkhead.release()
    queued.join()
    assert bulkhead.active == 1


async def test_no_queue_refuses_tasks_at_once() -> None:
    """With max_waiting=0 a task finding no free slot gets BulkheadFull immediately."""
    bulkhead = Bulkhead(max_concurrent=1)
    await bulkhead.acquire_async()
    with pytest.raises(BulkheadFull):
        await bulkhead.acquire_async()
    assert bulkhead.waiting == 0


def test_max_wait_ends_a_thread_wait_with_bulkhead_full() -> None:
    """A thread waits about max_wait, then gets BulkheadFull saying it waited max_wait."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.02)
    bulkhead.acquire()
    started = time.monotonic()
    with pytest.raises(BulkheadFull) as caught:
        bulkhead.acquire()
    assert time.monotonic() - started >= 0.02
    assert "max_wait=0.02" in "".join(caught.value.__notes__)
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)


async def test_max_wait_ends_a_task_wait_with_bulkhead_full() -> None:
    """A task waits about max_wait, then gets BulkheadFull and leaves the queue."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.02)
    await bulkhead.acquire_async()
    with pytest.raises(BulkheadFull):
        await bulkhead.acquire_async()
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)


def test_zero_max_wait_refuses_at_once() -> None:
    """max_wait=0 means never wait: BulkheadFull even with room in the queue."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=5, max_wait=0)
    bulkhead.acquire()
    with pytest.raises(BulkheadFull):
        bulkhead.acquire()
    assert bulkhead.waiting == 0


def test_deadline_ends_a_thread_wait_with_deadline_exceeded() -> None:
    """A deadline shorter than max_wait ends the wait with DeadlineExceeded saying so."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=5, name="db")
    bulkhead.acquire()
    with deadline(0.02), pytest.raises(DeadlineExceeded) as caught:
        bulkhead.acquire()
    message = str(caught.value)
    assert "slot in bulkhead 'db'" in message
    assert "until the deadline" in message
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)


def test_max_wait_shorter_than_the_deadline_wins() -> None:
    """When max_wait ends first the error is BulkheadFull, not DeadlineExceeded."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.01)
    bulkhead.acquire()
    with deadline(5), pytest.raises(BulkheadFull):
        bulkhead.acquire()


async def test_deadline_ends_a_task_wait_with_deadline_exceeded() -> None:
    """A task's wait ends at the deadline in its context, with DeadlineExceeded."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    await bulkhead.acquire_async()
    with deadline(0.02), pytest.raises(DeadlineExceeded, match="until the deadline"):
        await bulkhead.acquire_async()
    with pytest.raises(DeadlineExceeded):  # the async scope's own cancellation may win
        async with deadline(0.02):
            await bulkhead.acquire_async()
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)
    bulkhead.release()
    assert bulkhead.available == 1


def test_passed_deadline_refuses_at_once_but_a_free_slot_is_still_taken() -> None:
    """With the deadline already passed: a free slot is taken, a wait is refused unqueued."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    with deadline(0):
        bulkhead.acquire()
        with pytest.raises(DeadlineExceeded):
            bulkhead.acquire()
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)


async def test_cancelled_task_frees_its_place_and_takes_no_slot() -> None:
    """Cancelling a waiting task raises CancelledError, frees its queue place, leaks nothing."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    await bulkhead.acquire_async()
    cancelled = asyncio.create_task(bulkhead.acquire_async())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert bulkhead.waiting == 0
    successor = asyncio.create_task(bulkhead.acquire_async())  # the place is free again
    await asyncio.sleep(0)
    bulkhead.release()
    await successor
    bulkhead.release()
    assert (bulkhead.available, bulkhead.waiting) == (1, 0)


async def test_slot_skips_a_task_cancelled_on_the_releasing_loop() -> None:
    """A task cancelled but not yet resumed is passed over: the slot goes to the next waiter."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=2)
    await bulkhead.acquire_async()
    cancelled = asyncio.create_task(bulkhead.acquire_async())
    successor = asyncio.create_task(bulkhead.acquire_async())
    await asyncio.sleep(0)
    cancelled.cancel()
    bulkhead.release()  # before the cancelled task has run its cleanup
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await successor
    assert (bulkhead.active, bulkhead.waiting) == (1, 0)


async def test_task_cancelled_while_a_slot_is_on_its_way_gives_it_back() -> None:
    """A slot handed over from another thread to a task cancelled in that instant is returned."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    await bulkhead.acquire_async()
    waiter = asyncio.create_task(bulkhead.acquire_async())
    await asyncio.sleep(0)
    releaser = start_thread(bulkhead.release)
    releaser.join()
    assert (bulkhead.available, bulkhead.waiting) == (0, 0)  # handed over, not yet delivered
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.available == 1


def test_waiters_giving_up_as_slots_are_handed_over_lose_no_slot() -> None:
    """Hammer: threads with a tiny max_wait race releases; afterwards every slot is free."""
    bulkhead = Bulkhead(max_concurrent=3, max_waiting=32, max_wait=0.0003)
    counter = PeakCounter()
    refused = 0
    refused_lock = threading.Lock()

    def worker() -> None:
        nonlocal refused
        for _ in range(150):
            try:
                bulkhead.acquire()
            except BulkheadFull:
                with refused_lock:
                    refused += 1
                continue
            counter.enter()
            time.sleep(0)
            counter.leave()
            bulkhead.release()

    threads = [start_thread(worker) for _ in range(12)]
    for thread in threads:
        thread.join()
    assert refused > 0  # the race was exercised
    assert counter.peak <= 3
    assert (bulkhead.available, bulkhead.active, bulkhead.waiting) == (3, 0, 0)


def test_threads_and_tasks_giving_up_as_slots_are_handed_over_lose_no_slot() -> None:
    """Hammer across kinds: timed-out and cancelled tasks on two loops plus threads lose no slot."""
    bulkhead = Bulkhead(max_concurrent=2, max_waiting=64, max_wait=0.0003)
    counter = PeakCounter()

    def thread_worker() -> None:
        for _ in range(60):
            with contextlib.suppress(BulkheadFull), bulkhead:
                counter.enter()
                time.sleep(0)
                counter.leave()

    async def task_worker() -> None:
        for _ in range(60):
            with contextlib.suppress(BulkheadFull):
                async with bulkhead:
                    counter.enter()
                    await asyncio.sleep(0)
                    counter.leave()

    async def workers_and_cancelled_waiters() -> None:
        workers = [asyncio.create_task(task_worker()) for _ in range(3)]
        for _ in range(40):
            victim = asyncio.create_task(bulkhead.acquire_async())
            await asyncio.sleep(0)
            victim.cancel()
            try:
                await victim
            except (asyncio.CancelledError, BulkheadFull):
                continue
            bulkhead.release()  # it got the slot before the cancellation landed
        await asyncio.gather(*workers)

    with loop_in_thread() as loop1, loop_in_thread() as loop2:
        runs = [asyncio.run_coroutine_threadsafe(workers_and_cancelled_waiters(), loop1)]
        runs.append(asyncio.run_coroutine_threadsafe(workers_and_cancelled_waiters(), loop2))
        threads = [start_thread(thread_worker) for _ in range(4)]
        for run in runs:
            run.result(timeout=10)
        for thread in threads:
            thread.join()
    assert counter.peak <= 2
    assert counter.entries > 0
    assert (bulkhead.available, bulkhead.active, bulkhead.waiting) == (2, 0, 0)


def test_interrupted_thread_leaves_the_queue() -> None:
    """An exception raised into a waiting thread (e.g. Ctrl-C) removes it from the queue."""
    if not hasattr(signal, "pthread_kill"):
        pytest.skip("needs signal.pthread_kill")

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.acquire()
    main = threading.get_ident()

    def interrupt_main_once_queued() -> None:
        wait_for_waiters(bulkhead, 1)
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        interrupter = start_thread(interrupt_main_once_queued)
        with pytest.raises(Interrupted):
            bulkhead.acquire()
        interrupter.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert (bulkhead.waiting, bulkhead.active) == (0, 1)


# -- closed event loops ----------------------------------------------------


def queue_task_on_new_loop(
    bulkhead: Bulkhead,
) -> tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]:
    """Start a task waiting on ``bulkhead`` on a fresh loop, and leave the loop stopped."""
    loop = asyncio.new_event_loop()
    acquire: Coroutine[Any, Any, None] = bulkhead.acquire_async()
    task = loop.create_task(acquire)
    loop.run_until_complete(asyncio.sleep(0))
    assert bulkhead.waiting == 1
    return loop, task


def test_slot_for_a_task_on_a_closed_loop_goes_back_at_once() -> None:
    """Releasing to a task whose loop is already closed puts the slot back in the pool."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.acquire()
    loop, task = queue_task_on_new_loop(bulkhead)
    loop.close()
    bulkhead.release()
    assert (bulkhead.available, bulkhead.waiting) == (1, 0)
    task.get_coro().close()


def test_slot_in_flight_to_a_loop_that_closes_comes_back_with_the_task() -> None:
    """A slot sent to a task whose loop then closes is returned when the task is collected."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    bulkhead.acquire()
    loop, task = queue_task_on_new_loop(bulkhead)
    bulkhead.release()  # from outside the loop: the wake-up is scheduled on it
    loop.close()  # ... and dropped
    assert bulkhead.available == 0
    del task
    gc.collect()
    assert bulkhead.available == 1


# -- misuse ------------------------------------------------------------------


def test_release_without_acquire_is_an_error_and_adds_no_slot() -> None:
    """Releasing more often than acquiring raises RuntimeError and leaves the count alone."""
    bulkhead = Bulkhead(max_concurrent=2)
    with pytest.raises(RuntimeError, match="released more times than it was acquired"):
        bulkhead.release()
    with bulkhead:
        pass
    with pytest.raises(RuntimeError):
        bulkhead.release()
    assert bulkhead.available == 2


# -- as a decorator ------------------------------------------------------------


def test_decorated_function_runs_in_a_slot_and_keeps_its_metadata() -> None:
    """@Bulkhead(...) caps a sync function's concurrent calls; the wrapper looks like it."""
    bulkhead = Bulkhead(max_concurrent=2, max_waiting=8)
    counter = PeakCounter()

    @bulkhead
    def work(seconds: float) -> str:
        """Sleep a little inside the section."""
        counter.enter()
        time.sleep(seconds)
        counter.leave()
        return "done"

    threads = [start_thread(work, 0.01) for _ in range(8)]
    for thread in threads:
        thread.join()
    assert (counter.entries, counter.peak) == (8, 2)
    assert work(0) == "done"
    assert work.__name__ == "work"
    assert work.__doc__ == "Sleep a little inside the section."
    assert bulkhead.available == 2


async def test_decorated_coroutine_function_runs_in_a_slot() -> None:
    """An async function decorated with a bulkhead stays async and is capped across tasks."""
    bulkhead = Bulkhead(max_concurrent=2, max_waiting=8)
    counter = PeakCounter()

    @bulkhead
    async def work() -> int:
        counter.enter()
        await asyncio.sleep(0.005)
        counter.leave()
        return 7

    assert asyncio.iscoroutinefunction(work)
    assert await asyncio.gather(*(work() for _ in range(8))) == [7] * 8
    assert (counter.entries, counter.peak) == (8, 2)
    assert bulkhead.available == 2


def test_decorated_function_behaves_like_a_policy_with_only_the_bulkhead() -> None:
    """Refusals, errors and slot accounting match Policy(bulkhead=..., retry=None)."""
    from resilient.policy import Policy

    def fail() -> None:
        raise KeyError("boom")

    def refusal(run: Callable[[], object], bulkhead: Bulkhead) -> str:
        assert bulkhead.try_acquire()
        try:
            with pytest.raises(BulkheadFull) as refused:
                run()
        finally:
            bulkhead.release()
        return str(refused.value)

    alone, in_policy = Bulkhead(max_concurrent=1, name="db"), Bulkhead(max_concurrent=1, name="db")
    policy = Policy(bulkhead=in_policy, retry=None, tracing=False)
    assert refusal(alone(fail), alone) == refusal(policy(fail), in_policy)
    for run in (alone(fail), policy(fail)):
        with pytest.raises(KeyError, match="boom"):
            run()  # not retried: the bulkhead is the only stage
    assert alone.available == in_policy.available == 1


async def test_call_and_acall_run_one_call_in_a_slot() -> None:
    """call() and acall() run a function once in a slot without decorating it."""
    bulkhead = Bulkhead(max_concurrent=1)
    inside: list[int] = []

    def work(value: int) -> int:
        inside.append(bulkhead.available)
        return value * 2

    async def work_async(value: int) -> int:
        inside.append(bulkhead.available)
        return value * 3

    assert bulkhead.call(work, 2) == 4
    assert await bulkhead.acall(work_async, 2) == 6
    assert inside == [0, 0]
    assert bulkhead.available == 1
    with pytest.raises(TypeError, match=r"acall\(\)"):
        bulkhead.call(work_async, 1)


def test_decorator_refuses_generators_and_non_callables() -> None:
    """Generator functions and non-callables are refused at decoration, like Retry does."""
    bulkhead = Bulkhead(max_concurrent=1)

    def numbers() -> Iterator[int]:
        yield 1

    async def numbers_async() -> Any:
        yield 1

    with pytest.raises(TypeError, match=r"Bulkhead cannot wrap .*numbers: it is a generator"):
        bulkhead(numbers)
    with pytest.raises(TypeError, match="an async generator function"):
        bulkhead(numbers_async)
    with pytest.raises(TypeError, match="Bulkhead decorates callables, got int"):
        bulkhead(42)  # type: ignore[arg-type]


def test_bare_decorator_says_to_give_the_limits() -> None:
    """@Bulkhead without arguments fails at once, saying what to write instead."""
    with pytest.raises(TypeError, match=r"write @Bulkhead\(max_concurrent=\.\.\.\)"):

        @Bulkhead  # type: ignore[call-arg, arg-type]
        def work() -> None:
            pass

    with pytest.raises(TypeError, match="keyword arguments only"):
        Bulkhead(3)  # type: ignore[call-arg, misc]


# -- sync waiting on an event loop's thread ------------------------------------


async def test_sync_acquire_that_would_block_the_running_loop_raises() -> None:
    """A sync wait on a loop's thread raises RuntimeError instead of blocking the loop."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.2)
    with bulkhead:  # a free slot is taken here as anywhere: nothing waits
        pass
    holder_entered = asyncio.Event()
    holder_may_leave = asyncio.Event()

    async def holder() -> None:
        async with bulkhead:
            holder_entered.set()
            await holder_may_leave.wait()

    task = asyncio.create_task(holder())
    await holder_entered.wait()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"async with bulkhead:.*acquire_async\(\)"):
        bulkhead.acquire()
    with (
        pytest.raises(RuntimeError, match="would block this thread's running event loop"),
        bulkhead,
    ):
        pass
    assert time.monotonic() - started < 0.1  # refused, not waited for
    assert (bulkhead.waiting, bulkhead.available) == (0, 0)
    holder_may_leave.set()
    await task
    assert bulkhead.available == 1


async def test_sync_decorated_function_on_the_loop_raises_when_it_would_wait() -> None:
    """The driver's wait goes through acquire(), so a sync decorated call is refused too."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1, max_wait=0.2)

    @bulkhead
    def work() -> str:
        return "ran"

    assert work() == "ran"  # a free slot: fine on the loop's thread
    assert bulkhead.try_acquire()
    with pytest.raises(RuntimeError, match="acquire_async"):
        work()
    bulkhead.release()
    assert bulkhead.available == 1


async def test_full_bulkhead_without_a_queue_still_refuses_with_bulkhead_full_on_a_loop() -> None:
    """Where nothing would wait (no queue), the usual BulkheadFull comes, not RuntimeError."""
    bulkhead = Bulkhead(max_concurrent=1)
    assert bulkhead.try_acquire()
    with pytest.raises(BulkheadFull):
        bulkhead.acquire()
    bulkhead.release()


# -- pickling and forking --------------------------------------------------------


def test_pickles_as_its_limits_with_every_slot_free() -> None:
    """A pickled bulkhead comes back with the same limits and name, and nothing taken."""
    bulkhead = Bulkhead(max_concurrent=3, max_waiting=5, max_wait=timedelta(seconds=2), name="db")
    assert bulkhead.try_acquire()
    copy = pickle.loads(pickle.dumps(bulkhead))
    assert type(copy) is Bulkhead
    assert (copy.max_concurrent, copy.max_waiting, copy.max_wait, copy.name) == (3, 5, 2.0, "db")
    assert (copy.available, copy.waiting) == (3, 0)
    with copy:
        assert (copy.available, bulkhead.available) == (2, 2)
    unnamed = pickle.loads(pickle.dumps(Bulkhead(max_concurrent=1)))
    assert (unnamed.name, unnamed.max_wait) == ("unnamed", None)


def test_after_fork_every_slot_is_free_and_only_the_parents_threads_are_forgotten() -> None:
    """The fork hook frees the slots, drops thread waiters, and accepts stale releases."""
    from resilient.bulkhead import _Waiter

    bulkhead = Bulkhead(max_concurrent=3, max_waiting=2)
    assert bulkhead.try_acquire()
    assert bulkhead.try_acquire()
    # A thread of the parent, waiting: in a real child it does not exist.
    stale = threading.Lock()
    stale.acquire()
    bulkhead._waiters[_Waiter(wakeup=stale)] = None
    bulkhead._after_fork_in_child()
    assert (bulkhead.available, bulkhead.waiting) == (3, 0)
    assert stale.locked()  # not woken: nobody is there to wake
    with bulkhead:
        assert bulkhead.available == 2
    # The two slots taken before the fork come back without complaint; a third does not.
    bulkhead.release()
    bulkhead.release()
    with pytest.raises(RuntimeError, match="released more times"):
        bulkhead.release()
    assert bulkhead.available == 3


async def test_after_fork_tasks_of_the_forking_threads_loop_keep_their_place() -> None:
    """A task waiting on the loop that runs in the forking thread lives on: it gets a slot."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    assert bulkhead.try_acquire()
    task = asyncio.create_task(bulkhead.acquire_async())
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    bulkhead._after_fork_in_child()
    await asyncio.wait_for(task, 1)
    assert (bulkhead.available, bulkhead.waiting) == (0, 0)
    bulkhead.release()
    bulkhead.release()  # the slot taken before the "fork"
    assert bulkhead.available == 1
