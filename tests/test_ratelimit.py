"""RateLimiter: GCRA rate and burst, refusing or waiting, deadlines, keys, the store, Policy."""

from __future__ import annotations

import asyncio
import math
import pickle
import threading
import time
from collections.abc import Hashable
from datetime import timedelta
from typing import Any

import pytest
from test_fork import held_by_another_thread, run_in_fork

from resilient import _driver
from resilient.bulkhead import Bulkhead
from resilient.deadline import deadline
from resilient.errors import BulkheadFull, DeadlineExceeded, RateLimited, ResilientError
from resilient.policy import Policy
from resilient.ratelimit import MemoryRateStore, RateLimiter, RateStore
from resilient.stages import Admission
from resilient.testing import FakeClock


def limiter(clock: FakeClock, **config: Any) -> RateLimiter:
    config.setdefault("rate", 10)
    return RateLimiter(clock=clock, **config)


def refusal(limit: RateLimiter) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        limit.acquire()
    return caught.value


# -- GCRA: rate and burst -------------------------------------------------------------


@pytest.mark.parametrize("burst", [1, 3, 10])
def test_a_burst_passes_at_once_then_one_call_per_interval(burst: int) -> None:
    """An idle limiter admits exactly `burst` calls at once, then one each per / rate seconds."""
    clock = FakeClock()
    limit = limiter(clock, rate=10, burst=burst)
    assert [limit.try_acquire() for _ in range(burst + 2)] == [True] * burst + [False] * 2
    for _ in range(5):
        clock.advance(0.1)
        assert [limit.try_acquire(), limit.try_acquire()] == [True, False]


def test_retry_after_is_the_time_until_the_next_call_would_pass() -> None:
    """retry_after counts down to the next free instant, and a call then passes."""
    clock = FakeClock()
    limit = limiter(clock, rate=4, per=2.0, burst=2, name="api")  # interval 0.5 s
    limit.acquire()
    limit.acquire()
    first = refusal(limit)
    assert first.retry_after == pytest.approx(0.5)
    assert first.name == "api"
    clock.advance(0.2)
    assert refusal(limit).retry_after == pytest.approx(0.3)
    clock.advance(0.3)
    limit.acquire()
    assert refusal(limit).retry_after == pytest.approx(0.5)


def test_an_idle_limiter_earns_its_burst_back_one_call_per_interval_and_no_more() -> None:
    """After k idle intervals k calls pass (at most burst): idle time is not banked forever."""
    clock = FakeClock()
    limit = limiter(clock, rate=10, burst=5)
    assert sum(limit.try_acquire() for _ in range(10)) == 5
    clock.advance(0.2)
    assert sum(limit.try_acquire() for _ in range(10)) == 2
    clock.advance(60.0)
    assert sum(limit.try_acquire() for _ in range(10)) == 5


def test_refused_calls_spend_nothing() -> None:
    """Hammering a limiter while refused does not push its next free instant further out."""
    clock = FakeClock()
    limit = limiter(clock, rate=10)
    assert limit.try_acquire()
    for _ in range(100):
        assert not limit.try_acquire()
        with pytest.raises(RateLimited):
            limit.acquire()
    clock.advance(0.1)
    assert limit.try_acquire()


def test_a_steady_rate_over_a_long_run_admits_exactly_rate_times_seconds() -> None:
    """Polled every millisecond for 10 s at 50/s with burst 5: 5 + 500 admitted, no drift."""
    clock = FakeClock()
    limit = limiter(clock, rate=50, burst=5)
    admitted = 0
    for _ in range(10_000):
        admitted += limit.try_acquire()
        clock.advance(0.001)
    admitted += limit.try_acquire()
    assert admitted == 5 + 500


def test_per_takes_a_timedelta_and_the_config_is_read_only() -> None:
    """per= accepts a timedelta; the properties report the configuration and cannot be set."""
    limit = RateLimiter(rate=30, per=timedelta(minutes=1), burst=3, name="mail")
    assert (limit.rate, limit.per, limit.burst, limit.wait) == (30.0, 60.0, 3, False)
    assert limit.interval == pytest.approx(2.0)
    assert (limit.name, limit.max_keys, limit.tracked_keys) == ("mail", 10_000, 0)
    assert isinstance(limit.store, MemoryRateStore)
    assert RateLimiter(rate=1).name == "unnamed"
    with pytest.raises(AttributeError):
        limit.rate = 5  # type: ignore[misc]
    assert repr(limit) == "RateLimiter(name='mail', rate=30, per=60, burst=3, wait=False)"


# -- refusing and waiting -------------------------------------------------------------


def test_rate_limited_is_a_resilient_error_that_pickles_and_says_what_to_do() -> None:
    """The refusal names the limiter and the wait, and crosses process boundaries intact."""
    error = refusal_of_fresh_limiter()
    assert isinstance(error, ResilientError)
    assert "'search' refused the call" in str(error)
    assert "retry in 0.100 s" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.name, copy.retry_after) == (RateLimited, "search", error.retry_after)
    unknown = RateLimited("remote", None)  # type: ignore[arg-type]
    assert "retry in" not in str(unknown)
    assert "slow down" in str(unknown)


def refusal_of_fresh_limiter() -> RateLimited:
    limit = limiter(FakeClock(), name="search")
    limit.acquire()
    return refusal(limit)


def test_wait_true_sleeps_until_each_callers_turn(record_waits: list[float]) -> None:
    """Waiting callers reserve successive turns: they sleep one interval apart, in order."""
    clock = FakeClock()
    limit = limiter(clock, rate=10, burst=2, wait=True)
    for _ in range(5):
        limit.acquire()
    assert record_waits == pytest.approx([0.1, 0.2, 0.3])
    assert not limit.try_acquire()
    clock.advance(0.4)
    assert limit.try_acquire()


async def test_wait_true_tasks_sleep_their_turns_with_asyncio(record_waits: list[float]) -> None:
    """Ten tasks at once on a limiter with burst 1: one passes, nine wait 0.1 s ... 0.9 s."""
    limit = limiter(FakeClock(), rate=10, wait=True)
    await asyncio.gather(*(limit.acquire_async() for _ in range(10)))
    assert sorted(record_waits) == pytest.approx([0.1 * n for n in range(1, 10)])


async def test_wait_false_refuses_tasks_at_once() -> None:
    """acquire_async with wait=False raises RateLimited without suspending."""
    limit = limiter(FakeClock(), rate=10)
    await limit.acquire_async()
    with pytest.raises(RateLimited) as caught:
        await limit.acquire_async()
    assert caught.value.retry_after == pytest.approx(0.1)


def test_a_wait_within_the_deadline_is_slept(record_waits: list[float]) -> None:
    """With 5 s left, a 1 s turn is waited for."""
    limit = limiter(FakeClock(), rate=1, wait=True)
    with deadline(5.0):
        limit.acquire()
        limit.acquire()
    assert record_waits == pytest.approx([1.0])


def test_a_wait_past_the_deadline_raises_at_once_and_reserves_nothing(
    record_waits: list[float],
) -> None:
    """A turn 1 s away under a 0.5 s deadline: DeadlineExceeded now, no sleep, no turn taken."""
    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True, name="slow")
    limit.acquire()
    with deadline(0.5), pytest.raises(DeadlineExceeded) as caught:
        limit.acquire()
    assert record_waits == []
    assert "'slow' would admit this call in 1.000 s" in str(caught.value)
    clock.advance(1.0)
    assert limit.try_acquire()  # the refused caller reserved nothing


async def test_an_async_wait_past_the_deadline_raises_at_once(record_waits: list[float]) -> None:
    """The same for a task: DeadlineExceeded before any asyncio.sleep."""
    limit = limiter(FakeClock(), rate=1, wait=True)
    await limit.acquire_async()
    with deadline(0.5), pytest.raises(DeadlineExceeded):
        await limit.acquire_async()
    assert record_waits == []


def test_a_free_admission_is_taken_even_when_the_deadline_has_passed() -> None:
    """A call that need not wait costs no time: a spent deadline does not refuse it."""
    limit = limiter(FakeClock(), rate=1, wait=True)
    with deadline(1e-9):
        threading.Event().wait(0.001)
        limit.acquire()


async def test_a_task_cancelled_while_waiting_gives_its_turn_back() -> None:
    """The cancelled waiter's turn is free again: the next caller gets it, not the one after."""
    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True)
    await limit.acquire_async()
    waiter = asyncio.create_task(limit.acquire_async())  # reserves the turn 1 s away
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.advance(1.0)
    assert limit.try_acquire()
    assert not limit.try_acquire()


async def test_a_turn_given_back_behind_a_later_waiter_stays_a_gap() -> None:
    """A (1 s) and B (2 s) wait; A is cancelled: at B's turn B alone may start, no newcomer."""
    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True)
    await limit.acquire_async()
    a = asyncio.create_task(limit.acquire_async())  # reserves the turn 1 s away
    await asyncio.sleep(0)
    b = asyncio.create_task(limit.acquire_async())  # reserves the turn 2 s away
    await asyncio.sleep(0)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    clock.advance(2.0)
    assert not limit.try_acquire()  # the instant is B's: a caller now would start with B
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert limit.try_acquire()  # B was the last reservation: its turn came back


def test_a_thread_interrupted_while_waiting_gives_its_turn_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KeyboardInterrupt during the sleep propagates, and the turn it reserved is free again."""

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True)
    limit.acquire()
    monkeypatch.setattr(_driver, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        limit.acquire()
    clock.advance(1.0)
    assert limit.try_acquire()
    assert not limit.try_acquire()


async def test_a_sync_wait_on_an_event_loops_thread_is_refused(record_waits: list[float]) -> None:
    """`with limiter:`, acquire() and a decorated sync function raise rather than block the loop."""
    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True, name="api")
    limit.acquire()  # no wait needed: a free admission is taken even here

    @limit
    def call() -> str:
        return "called"

    for attempt in (limit.acquire, limit.__enter__, call):
        with pytest.raises(RuntimeError, match=r"'api'.*block this thread's running event loop"):
            attempt()
    assert record_waits == []
    clock.advance(1.0)
    assert call() == "called"  # the refused waiters gave their turns back
    await limit.acquire_async()
    assert record_waits == pytest.approx([1.0])


def test_context_managers_take_an_admission(record_waits: list[float]) -> None:
    """`with limiter:` refuses over the limit; exiting gives nothing back (release is a no-op)."""
    limit = limiter(FakeClock(), rate=10)
    with limit:
        pass
    limit.release()
    with pytest.raises(RateLimited), limit:
        pass


async def test_async_context_manager_waits_its_turn(record_waits: list[float]) -> None:
    """`async with` a waiting limiter sleeps for the turn."""
    limit = limiter(FakeClock(), rate=10, wait=True)
    async with limit:
        pass
    async with limit:
        pass
    assert record_waits == pytest.approx([0.1])


def test_a_clock_stepping_back_costs_no_more_than_the_last_reading_implies(
    record_waits: list[float],
) -> None:
    """After the clock jumps 100 s back, calls are refused and wait as at the last reading."""
    clock = FakeClock()
    limit = limiter(clock, rate=1)
    assert limit.try_acquire()
    clock.now -= 100.0
    assert refusal(limit).retry_after == pytest.approx(1.0)
    clock.now += 101.0
    assert limit.try_acquire()
    waiting = limiter(clock, rate=1, wait=True)
    waiting.acquire()
    clock.now -= 100.0
    waiting.acquire()
    assert record_waits == pytest.approx([1.0])


# -- threads ----------------------------------------------------------------------------


@pytest.mark.usefixtures("frequent_thread_switches")
def test_many_threads_at_once_get_exactly_the_burst() -> None:
    """16 threads x 200 tries at one instant: exactly burst admitted, none lost or doubled."""
    limit = limiter(FakeClock(), rate=1, burst=500)
    admitted = [0] * 16
    start = threading.Barrier(16)

    def hammer(index: int) -> None:
        start.wait()
        for _ in range(200):
            admitted[index] += limit.try_acquire()

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 500


class Yielding(float):
    """A clock reading whose comparison lets other threads run in the middle of a decision."""

    def __gt__(self, other: object) -> bool:
        time.sleep(0)  # releases the GIL: without the store's lock, two threads read one TAT
        return float(self) > float(other)  # type: ignore[arg-type]


def test_the_decision_is_atomic_even_when_threads_switch_inside_it() -> None:
    """With a thread switch forced mid-decision, 8 threads still get exactly the burst."""
    clock = FakeClock()
    limit = RateLimiter(rate=1, burst=40, clock=lambda: Yielding(clock.now))
    admitted = [0] * 8
    start = threading.Barrier(8)

    def hammer(index: int) -> None:
        start.wait()
        for _ in range(20):
            admitted[index] += limit.try_acquire()

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 40


@pytest.mark.usefixtures("frequent_thread_switches")
def test_threads_over_real_time_stay_within_the_limit() -> None:
    """8 threads polling a real-clock limiter for 0.2 s admit no more than burst + rate * t."""
    limit = RateLimiter(rate=500, burst=10)
    stop = threading.Event()
    admitted = [0] * 8
    started = _driver._monotonic()

    def poll(index: int) -> None:
        while not stop.is_set():
            admitted[index] += limit.try_acquire()

    threads = [threading.Thread(target=poll, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = _driver._monotonic() - started
    assert 10 <= sum(admitted) <= 10 + 500 * elapsed + 1


# -- as a decorator ---------------------------------------------------------------------


def test_decorating_a_sync_function_limits_its_calls() -> None:
    """@RateLimiter(...) keeps the function's name and refuses calls over the limit."""
    clock = FakeClock()
    calls: list[int] = []

    @RateLimiter(rate=10, burst=2, clock=clock)
    def work(n: int) -> int:
        """Do work."""
        calls.append(n)
        return n * 2

    assert (work.__name__, work.__doc__) == ("work", "Do work.")
    assert [work(1), work(2)] == [2, 4]
    with pytest.raises(RateLimited):
        work(3)
    assert calls == [1, 2]
    clock.advance(0.1)
    assert work(4) == 8


async def test_decorating_an_async_function_limits_its_calls(record_waits: list[float]) -> None:
    """An async function decorated with a waiting limiter awaits its turn."""

    @RateLimiter(rate=10, wait=True, clock=FakeClock())
    async def work(n: int) -> int:
        return n + 1

    assert [await work(1), await work(2)] == [2, 3]
    assert record_waits == pytest.approx([0.1])


async def test_call_and_acall_run_one_call_through_the_limiter() -> None:
    """limiter.call(fn) / await limiter.acall(fn) without decorating."""
    limit = limiter(FakeClock(), rate=10, burst=2)

    async def double(n: int) -> int:
        return n * 2

    assert limit.call(lambda: "sync") == "sync"
    assert await limit.acall(double, 4) == 8
    with pytest.raises(RateLimited):
        limit.call(lambda: "refused")


def test_decorating_without_configuration_says_what_to_write() -> None:
    """@RateLimiter with no parentheses fails with the spelling to use."""
    with pytest.raises(TypeError, match=r"write @RateLimiter\(rate=...\)"):

        @RateLimiter  # type: ignore[call-arg]
        def work() -> None: ...


def test_it_is_an_admission_stage() -> None:
    """The limiter satisfies the public Admission protocol, so the driver takes it."""
    assert isinstance(RateLimiter(rate=1), Admission)
    assert isinstance(MemoryRateStore(), RateStore)


# -- Policy(rate_limit=...) ---------------------------------------------------------------


def test_policy_asks_the_limiter_before_the_bulkhead() -> None:
    """A rate-limited call never takes a bulkhead slot and never runs."""
    clock = FakeClock()
    bulkhead = Bulkhead(max_concurrent=1)
    seen: list[int] = []
    policy = Policy(rate_limit=limiter(clock, rate=1), bulkhead=bulkhead, retry=None)

    @policy
    def work() -> str:
        seen.append(bulkhead.available)
        return "ran"

    assert work() == "ran"
    assert seen == [0]  # it ran holding the slot
    with pytest.raises(RateLimited):
        work()
    assert (seen, bulkhead.available) == ([0], 1)


def test_with_only_a_limiter_the_policy_drives_the_limiter_itself() -> None:
    """Policy(rate_limit=) alone: the limiter is the admission stage."""
    policy = Policy(rate_limit=limiter(FakeClock(), rate=10), retry=None)
    assert policy.call(lambda: 1) == 1
    with pytest.raises(RateLimited):
        policy.call(lambda: 2)


def test_an_admission_spent_on_a_full_bulkhead_is_not_given_back() -> None:
    """Limiter admits, bulkhead refuses: that admission is spent, and spent exactly once."""
    bulkhead = Bulkhead(max_concurrent=1)
    policy = Policy(rate_limit=limiter(FakeClock(), rate=1, burst=2), bulkhead=bulkhead, retry=None)
    bulkhead.acquire()
    with pytest.raises(BulkheadFull):
        policy.call(lambda: "no slot")
    bulkhead.release()
    assert policy.call(lambda: "second admission") == "second admission"
    with pytest.raises(RateLimited):
        policy.call(lambda: "burst spent")
    assert bulkhead.available == 1


async def test_a_call_admitted_by_the_limiter_waits_for_the_bulkhead_only() -> None:
    """The limiter admits, the bulkhead queues the call: it later runs, one admission spent."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    limit = limiter(FakeClock(), rate=1, burst=2)
    policy = Policy(rate_limit=limit, bulkhead=bulkhead, retry=None)
    release = asyncio.Event()

    async def hold() -> str:
        await release.wait()
        return "held"

    async def quick() -> str:
        return "quick"

    holder = asyncio.create_task(policy.acall(hold))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(policy.acall(quick))
    await asyncio.sleep(0)
    assert bulkhead.waiting == 1
    release.set()
    assert await asyncio.gather(holder, waiter) == ["held", "quick"]
    assert not limit.try_acquire()  # two admissions spent: one each, none twice


def test_a_sync_call_admitted_by_the_limiter_waits_for_the_bulkhead_only() -> None:
    """The same in threads: the waiting call asks the limiter once."""
    bulkhead = Bulkhead(max_concurrent=1, max_waiting=1)
    limit = limiter(FakeClock(), rate=1, burst=2)
    policy = Policy(rate_limit=limit, bulkhead=bulkhead, retry=None)
    bulkhead.acquire()
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(policy.call(lambda: "waited")))
    thread.start()
    while bulkhead.waiting != 1:
        threading.Event().wait(0.001)
    bulkhead.release()
    thread.join(5)
    assert result == ["waited"]
    assert [limit.try_acquire(), limit.try_acquire()] == [True, False]  # one spent, not two


async def test_policy_refuses_over_the_limit_before_waiting_for_the_bulkhead() -> None:
    """A limiter's refusal on the slow path (try_acquire False) comes from acquire_async."""
    bulkhead = Bulkhead(max_concurrent=1)
    policy = Policy(rate_limit=limiter(FakeClock(), rate=1), bulkhead=bulkhead, retry=None)

    async def work() -> str:
        return "ran"

    assert await policy.acall(work) == "ran"
    with pytest.raises(RateLimited):
        await policy.acall(work)
    assert bulkhead.available == 1


def test_policy_timeout_bounds_a_waiting_limiter(record_waits: list[float]) -> None:
    """Policy(timeout=0.5) with a 1 s turn: DeadlineExceeded at once, nothing slept, no slot."""
    bulkhead = Bulkhead(max_concurrent=1)
    limit = limiter(FakeClock(), rate=1, wait=True)
    policy = Policy(rate_limit=limit, bulkhead=bulkhead, timeout=0.5, retry=None)
    assert policy.call(lambda: 1) == 1
    with pytest.raises(DeadlineExceeded):
        policy.call(lambda: 2)
    assert (record_waits, bulkhead.available) == ([], 1)


def test_policy_repr_pickle_and_immutability_include_the_rate_limit() -> None:
    """rate_limit shows in repr, survives pickling as configuration, and cannot be replaced."""
    limit = RateLimiter(rate=5, burst=2, name="api")
    policy = Policy(rate_limit=limit, bulkhead=Bulkhead(max_concurrent=2))
    assert repr(policy).startswith("Policy(rate_limit=RateLimiter(name='api', rate=5")
    copy = pickle.loads(pickle.dumps(policy))
    assert isinstance(copy.rate_limit, RateLimiter)
    assert (copy.rate_limit.name, copy.rate_limit.rate, copy.rate_limit.burst) == ("api", 5, 2)
    assert copy.rate_limit is not limit
    with pytest.raises(AttributeError, match="immutable"):
        policy.rate_limit = None  # type: ignore[misc]


def test_policy_checks_its_rate_limit_and_resume_refuses_one() -> None:
    """rate_limit must be an Admission stage; resume() cannot honour a limit it never asked."""
    with pytest.raises(TypeError, match=r"rate_limit must be a resilient\.RateLimiter"):
        Policy(rate_limit="10/s")  # type: ignore[arg-type]
    policy = Policy(rate_limit=RateLimiter(rate=1))
    with pytest.raises(ValueError, match="attempt_timeout, rate_limit"):
        policy.resume(lambda: None, False)


# -- keyed limits -----------------------------------------------------------------------


def test_each_key_has_its_own_limit_with_the_same_configuration() -> None:
    """for_key(k): same object per key, own state, same rate and burst, name ending in [k]."""
    clock = FakeClock()
    limit = limiter(clock, rate=10, burst=2, name="tenant")
    alice = limit.for_key("alice")
    assert limit.for_key("alice") is alice
    assert (alice.name, alice.rate, alice.burst) == ("tenant['alice']", 10, 2)
    assert [alice.try_acquire() for _ in range(3)] == [True, True, False]
    bob = limit.for_key("bob")
    assert [bob.try_acquire() for _ in range(3)] == [True, True, False]
    assert limit.try_acquire()  # the limiter's own state is separate too
    with pytest.raises(RateLimited) as caught:
        alice.acquire()
    assert caught.value.name == "tenant['alice']"
    clock.advance(0.1)
    assert alice.try_acquire()


def test_keyed_state_is_bounded_by_max_keys() -> None:
    """3 x max_keys distinct keys leave at most max_keys per-key limiters in memory."""
    limit = RateLimiter(rate=1, max_keys=100)
    for key in range(300):
        assert limit.for_key(key).try_acquire()
    assert 0 < limit.tracked_keys <= 100


def test_an_evicted_key_starts_afresh_with_its_full_burst() -> None:
    """Past max_keys the least recently used key is forgotten: it comes back as if idle."""
    limit = RateLimiter(rate=1, max_keys=1)
    first = limit.for_key("a")
    assert first.try_acquire()
    assert not limit.for_key("a").try_acquire()
    assert limit.for_key("b").try_acquire()  # evicts "a"
    again = limit.for_key("a")
    assert again is not first
    assert again.try_acquire()
    assert limit.tracked_keys == 1


@pytest.mark.parametrize(
    "keys",
    [[f"tenant-{n}" for n in range(80)], list(range(0, 80 * 32, 32))],
    ids=["strings", "ints-of-one-hash-bucket"],
)
def test_fewer_active_keys_than_max_keys_never_lose_their_state(keys: list[Hashable]) -> None:
    """80 keys under max_keys=100, three rounds at 1 a minute: only the first round passes."""
    limit = limiter(FakeClock(), rate=1, per=60.0, max_keys=100)
    admitted = sum(limit.for_key(key).try_acquire() for _ in range(3) for key in keys)
    assert admitted == 80
    assert limit.tracked_keys == 80


def test_a_view_cannot_be_keyed_again_or_pickled() -> None:
    """for_key on a view and pickling a view raise TypeError saying what to do instead."""
    view = RateLimiter(rate=1).for_key(("tenant", 7))
    with pytest.raises(TypeError, match="already the limiter of one key"):
        view.for_key("again")
    with pytest.raises(TypeError, match="pickle the limiter and call for_key"):
        pickle.dumps(view)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_threads_asking_for_new_keys_at_once_share_one_view_per_key() -> None:
    """The map of keys is made once and each key's view is created once."""
    limit = RateLimiter(rate=1)
    views: list[RateLimiter] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        views.append(limit.for_key("shared"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(view) for view in views}) == 1
    assert sum(view.try_acquire() for view in views) == 1


# -- the store seam -----------------------------------------------------------------------


class CountingStore:
    """A RateStore over a MemoryRateStore that records what it was asked."""

    def __init__(self, key: Hashable = None) -> None:
        self.inner = MemoryRateStore()
        self.key = key
        self.asked: list[tuple[float, float, float, float]] = []
        self.children: list[CountingStore] = []

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        self.asked.append((now, interval, tolerance, max_wait))
        return self.inner.take(now, interval, tolerance, max_wait)

    def give_back(self, reserved: float, interval: float) -> None:
        self.inner.give_back(reserved, interval)

    def for_key(self, key: Hashable) -> CountingStore:
        child = CountingStore(key)
        self.children.append(child)
        return child


def test_a_custom_store_gets_the_whole_decision_as_one_take() -> None:
    """The limiter hands take() the clock reading, interval, tolerance and the wait allowed."""
    clock = FakeClock()
    store = CountingStore()
    limit = RateLimiter(rate=4, burst=3, clock=clock, store=store)
    assert limit.store is store
    limit.try_acquire()
    with deadline(2.0):
        RateLimiter(rate=4, wait=True, clock=clock, store=store).acquire()
    assert store.asked[0] == (1000.0, 0.25, 0.5, 0.0)
    assert store.asked[1][:3] == (1000.0, 0.25, 0.0)
    assert 1.9 < store.asked[1][3] <= 2.0
    limit.for_key("k").try_acquire()
    assert [child.key for child in store.children] == ["k"]
    assert len(store.children[0].asked) == 1


def test_the_memory_store_refuses_without_writing_and_pickles_empty() -> None:
    """take() over max_wait returns the wait and leaves the instant; a pickled store is empty."""
    store = MemoryRateStore()
    assert store.take(10.0, 1.0, 0.0, 0.0) == (0.0, 11.0)
    assert store.take(10.0, 1.0, 0.0, 0.0) == (1.0, 11.0)
    assert store.take(10.0, 1.0, 0.0, 0.5) == (1.0, 11.0)
    assert store.take(10.0, 1.0, 0.0, 5.0) == (1.0, 12.0)  # reserved: the instant moves on
    assert store.take(10.0, 1.0, 0.0, 0.0) == (2.0, 12.0)
    store.give_back(12.0, 1.0)
    assert store.take(10.0, 1.0, 0.0, 0.0) == (1.0, 11.0)
    assert repr(store) == "MemoryRateStore(tat=11.0)"
    assert pickle.loads(pickle.dumps(store)).take(10.0, 1.0, 0.0, 0.0) == (0.0, 11.0)


def test_the_memory_store_gives_back_only_the_latest_reservation() -> None:
    """A turn given back after later turns were reserved is left as a gap, not handed out twice."""
    store = MemoryRateStore()
    store.take(10.0, 1.0, 0.0, 0.0)
    _, a = store.take(10.0, 1.0, 0.0, math.inf)  # turn at 11
    _, b = store.take(10.0, 1.0, 0.0, math.inf)  # turn at 12
    store.give_back(a, 1.0)  # b reserved after a: a's turn stays a gap
    assert store.take(10.0, 1.0, 0.0, 0.0) == (3.0, 13.0)  # a newcomer waits behind b
    store.give_back(b, 1.0)  # b is the latest reservation: its turn comes back
    assert store.take(10.0, 1.0, 0.0, 0.0) == (2.0, 12.0)


def test_a_limiter_pickles_as_its_configuration_with_a_full_burst() -> None:
    """The copy has the same configuration (custom store and clock included) and fresh state."""
    clock = FakeClock()
    limit = RateLimiter(rate=2, per=3.0, burst=2, wait=True, name="x", clock=clock, max_keys=7)
    limit.try_acquire()
    limit.try_acquire()
    copy = pickle.loads(pickle.dumps(limit))
    assert (copy.rate, copy.per, copy.burst, copy.wait, copy.name, copy.max_keys) == (
        2,
        3.0,
        2,
        True,
        "x",
        7,
    )
    assert copy.try_acquire()
    assert copy.try_acquire()
    assert not limit.try_acquire()
    stored = pickle.loads(pickle.dumps(RateLimiter(rate=1, store=MemoryRateStore())))
    assert isinstance(stored.store, MemoryRateStore)


# -- forking ------------------------------------------------------------------------------


def test_a_limiter_works_in_a_child_forked_while_another_thread_held_its_lock() -> None:
    """The store's lock is remade in the child, which then decides as the parent would have."""
    clock = FakeClock()
    limit = limiter(clock, rate=10, burst=2)
    limit.try_acquire()
    keyed = limit.for_key("k")
    store = limit.store
    assert isinstance(store, MemoryRateStore)

    def child() -> None:
        assert [limit.try_acquire(), limit.try_acquire()] == [True, False]
        assert keyed.try_acquire()
        assert limit.for_key("other").try_acquire()

    with held_by_another_thread(store._lock):
        run_in_fork(child)


# -- bad configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"rate": 0}, ValueError, "rate must be strictly between 0 and inf, got 0"),
        ({"rate": -1}, ValueError, "rate must be"),
        ({"rate": math.nan}, ValueError, "rate must be a finite number"),
        ({"rate": math.inf}, ValueError, "rate must be a finite number"),
        ({"rate": "10"}, TypeError, "rate must be a number"),
        ({"rate": True}, TypeError, "rate must be a number"),
        ({"rate": 1, "per": 0}, ValueError, "per must be greater than zero"),
        ({"rate": 1, "per": -1}, ValueError, "per must not be negative"),
        ({"rate": 1, "per": "1s"}, TypeError, "per must be seconds"),
        ({"rate": 5e-324, "per": 1e10}, ValueError, "interval"),
        ({"rate": 1e-300, "burst": 10**9}, ValueError, "rate=1e-300 per=1.0 burst=1000000000"),
        ({"rate": 1, "burst": 10**400}, ValueError, "burst=1000"),
        ({"rate": 1e9, "clock": lambda: 1.7e9}, ValueError, "rate=1000000000.0 per=1.0"),
        ({"rate": 1, "per": 1e-300}, ValueError, "too small to move"),
        ({"rate": 1, "burst": 0}, ValueError, "burst must be at least 1, got 0"),
        ({"rate": 1, "burst": 1.5}, TypeError, "burst must be an int"),
        ({"rate": 1, "wait": "yes"}, TypeError, "wait must be True or False"),
        ({"rate": 1, "name": 3}, TypeError, "name must be a str or None"),
        ({"rate": 1, "clock": 5}, TypeError, "clock must be a callable"),
        ({"rate": 1, "store": {}}, TypeError, "store must be a RateStore"),
        ({"rate": 1, "max_keys": 0}, ValueError, "max_keys must be at least 1"),
    ],
)
def test_bad_configuration_is_refused_naming_the_parameter(
    config: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Every parameter is checked at construction, with its name and value in the message."""
    with pytest.raises(error, match=message.replace("(", r"\(")):
        RateLimiter(**config)


def test_positional_configuration_is_refused() -> None:
    """RateLimiter takes keywords only."""
    with pytest.raises(TypeError, match="keyword arguments only"):
        RateLimiter(10, 1.0)  # type: ignore[misc]


# -- the async seam: stores that decide by awaiting ------------------------------------


class AsyncMemoryStore:
    """The in-memory store behind the optional async methods, counting each kind of call.

    With ``sync=False`` it has no sync path, as a store on an async-only client has none.
    """

    def __init__(self, *, sync: bool = True) -> None:
        self.inner = MemoryRateStore()
        self.sync = sync
        self.calls: list[str] = []

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        self.calls.append("take")
        if not self.sync:
            raise TypeError("this store has an async client only: use a sync client")
        return self.inner.take(now, interval, tolerance, max_wait)

    def give_back(self, reserved: float, interval: float) -> None:
        self.calls.append("give_back")
        self.inner.give_back(reserved, interval)

    def for_key(self, key: Hashable) -> AsyncMemoryStore:
        return AsyncMemoryStore(sync=self.sync)

    async def take_async(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        self.calls.append("take_async")
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        return self.inner.take(now, interval, tolerance, max_wait)

    async def give_back_async(self, reserved: float, interval: float) -> None:
        self.calls.append("give_back_async")
        await asyncio.sleep(0)
        self.inner.give_back(reserved, interval)


async def test_acquire_async_awaits_the_store_and_limits_as_in_memory() -> None:
    """acquire_async on an async store admits the burst, then refuses with the same retry_after."""
    clock = FakeClock()
    store = AsyncMemoryStore()
    on_store = limiter(clock, rate=4, per=2.0, burst=2, store=store, name="api")
    in_memory = limiter(clock, rate=4, per=2.0, burst=2)
    for limit in (on_store, in_memory):
        await limit.acquire_async()
        async with limit:
            pass
    caught = []
    for limit in (on_store, in_memory):
        with pytest.raises(RateLimited) as refused:
            await limit.acquire_async()
        caught.append(refused.value)
    assert caught[0].retry_after == pytest.approx(caught[1].retry_after) == pytest.approx(0.5)
    assert caught[0].name == "api"
    assert caught[0].__context__ is None  # no internal exception chained to the refusal
    assert set(store.calls) == {"take_async"}  # the loop never waited on a sync take
    clock.advance(0.5)
    await on_store.acquire_async()


async def test_try_acquire_on_the_loop_defers_to_acquire_async() -> None:
    """On a loop try_acquire takes nothing and says False; a decorated function is admitted."""
    store = AsyncMemoryStore()
    limit = limiter(FakeClock(), rate=1, per=60, burst=2, store=store)
    assert limit.try_acquire() is False
    assert store.calls == []  # nothing taken: the burst is whole

    @limit
    async def work() -> str:
        return "done"

    assert [await work(), await work()] == ["done", "done"]
    with pytest.raises(RateLimited):
        await work()
    assert store.calls == ["take_async"] * 3


def test_off_the_loop_an_async_capable_store_is_used_through_its_sync_methods() -> None:
    """In threads (no loop) the limiter calls take as ever, also through the driver."""
    store = AsyncMemoryStore()
    limit = limiter(FakeClock(), rate=1, per=60, burst=2, store=store)
    assert limit.try_acquire()
    limit.acquire()
    with pytest.raises(RateLimited):
        limit.call(lambda: None)  # the driver's try_acquire, then acquire: refused
    assert store.calls == ["take"] * 4


async def test_sync_use_on_the_loop_takes_the_sync_path_of_a_store_that_has_one() -> None:
    """A sync function on the loop: try_acquire defers, then acquire blocks on the sync take."""
    store = AsyncMemoryStore()
    limit = limiter(FakeClock(), rate=1, per=60, burst=1, store=store)
    assert limit.call(lambda: "ok") == "ok"
    assert store.calls == ["take"]


async def test_a_sync_wait_on_the_loop_is_refused_with_an_async_capable_store(
    record_waits: list[float],
) -> None:
    """wait=True, sync acquire on the loop: RuntimeError, as in memory, and the turn goes back."""
    clock = FakeClock()
    store = AsyncMemoryStore()
    limit = limiter(clock, rate=1, wait=True, store=store)
    limit.acquire()
    with pytest.raises(RuntimeError, match="block this thread's running event loop"):
        limit.acquire()
    assert store.calls == ["take", "take", "give_back"]
    clock.advance(1.0)
    await limit.acquire_async()  # the refused turn came back: no wait
    assert record_waits == []
    assert store.calls[-1] == "take_async"


async def test_a_store_without_a_sync_path_refuses_sync_use_with_its_reason() -> None:
    """An async-only store: sync acquire (on the loop or not) raises its TypeError; async works."""
    store = AsyncMemoryStore(sync=False)
    limit = limiter(FakeClock(), rate=1, per=60, burst=1, store=store)
    with pytest.raises(TypeError, match="use a sync client") as refused:
        limit.acquire()
    assert refused.value.__context__ is None
    with pytest.raises(TypeError, match="use a sync client"):
        limit.call(lambda: None)  # try_acquire defers, acquire refuses
    assert limit.try_acquire() is False
    await limit.acquire_async()
    with pytest.raises(RateLimited):
        await limit.acquire_async()

    def in_a_thread() -> BaseException | None:
        try:
            limit.try_acquire()
        except TypeError as error:
            return error
        return None

    error = await asyncio.to_thread(in_a_thread)
    assert isinstance(error, TypeError)
    assert "use a sync client" in str(error)


async def test_wait_true_on_an_async_store_waits_its_turn(record_waits: list[float]) -> None:
    """Ten tasks, burst 1, wait=True: one passes, nine wait 0.1 s ... 0.9 s, all awaited."""
    store = AsyncMemoryStore()
    limit = limiter(FakeClock(), rate=10, wait=True, store=store)
    await asyncio.gather(*(limit.acquire_async() for _ in range(10)))
    assert sorted(record_waits) == pytest.approx([0.1 * n for n in range(1, 10)])
    assert set(store.calls) == {"take_async"}


async def test_an_async_store_wait_past_the_deadline_raises_at_once(
    record_waits: list[float],
) -> None:
    """A turn 1 s away under a 0.5 s deadline: DeadlineExceeded, no sleep, no turn reserved."""
    clock = FakeClock()
    limit = limiter(clock, rate=1, wait=True, store=AsyncMemoryStore(), name="slow")
    await limit.acquire_async()
    with deadline(0.5), pytest.raises(DeadlineExceeded, match="'slow' would admit"):
        await limit.acquire_async()
    assert record_waits == []
    clock.advance(1.0)
    await limit.acquire_async()  # the refused caller reserved nothing: no wait now
    assert record_waits == []


async def test_a_task_cancelled_waiting_on_an_async_store_gives_back_by_awaiting() -> None:
    """The cancelled waiter's turn goes back through give_back_async; the next caller gets it."""
    clock = FakeClock()
    store = AsyncMemoryStore()
    limit = limiter(clock, rate=1, wait=True, store=store)
    await limit.acquire_async()
    waiter = asyncio.create_task(limit.acquire_async())
    for _ in range(3):
        await asyncio.sleep(0)  # it takes its turn (1 s away) and sleeps
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert store.calls[-1] == "give_back_async"
    clock.advance(1.0)
    limit_now = limiter(clock, rate=1, store=store)  # the same instant, wait=False
    await limit_now.acquire_async()
    with pytest.raises(RateLimited):
        await limit_now.acquire_async()


async def test_keyed_limits_on_an_async_store_are_awaited_per_key() -> None:
    """for_key views keep the async path: each key its own burst."""
    limit = limiter(FakeClock(), rate=1, per=60, burst=1, store=AsyncMemoryStore(sync=False))
    await limit.for_key("a").acquire_async()
    await limit.for_key("b").acquire_async()
    with pytest.raises(RateLimited):
        await limit.for_key("a").acquire_async()
    assert limit.for_key("a").try_acquire() is False


def test_a_store_with_half_of_the_async_seam_is_refused() -> None:
    """take_async without give_back_async (or not callable) is a TypeError naming both."""

    class HalfAsync(MemoryRateStore):
        async def take_async(self, *args: float) -> tuple[float, float]:
            raise AssertionError("never called")

    class NotCallable(MemoryRateStore):
        take_async = 1
        give_back_async = 2

    for store in (HalfAsync(), NotCallable()):
        with pytest.raises(TypeError, match="both take_async and give_back_async"):
            RateLimiter(rate=1, store=store)


async def test_a_policy_with_a_bulkhead_awaits_an_async_store_then_takes_a_slot() -> None:
    """Policy(rate_limit=, bulkhead=) in async code: the limiter awaits its store, then the slot."""
    store = AsyncMemoryStore(sync=False)
    bulkhead = Bulkhead(max_concurrent=1)
    limit = limiter(FakeClock(), rate=1, per=60, burst=1, store=store)
    policy = Policy(rate_limit=limit, bulkhead=bulkhead, retry=None)

    async def work() -> str:
        return "ran"

    assert await policy.acall(work) == "ran"
    with pytest.raises(RateLimited):
        await policy.acall(work)
    assert bulkhead.available == 1
    assert store.calls == ["take_async", "take_async"]
