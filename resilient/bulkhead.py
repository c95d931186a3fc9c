"""Bulkheads: cap how many calls run at once, for threads and asyncio tasks alike.

A :class:`Bulkhead` has ``max_concurrent`` slots. A caller takes a slot before
the protected work and gives it back afterwards::

    db_bulkhead = Bulkhead(max_concurrent=8, max_waiting=32, max_wait=0.5, name="db")

    with db_bulkhead:               # in a thread
        run_query()

    async with db_bulkhead:         # in an asyncio task
        await run_query_async()

When every slot is taken, up to ``max_waiting`` more callers wait their turn in
one first-in-first-out queue; anyone beyond that gets :class:`BulkheadFull` at
once, so overload is shed instead of piling up. A waiter waits at most until
the deadline in force (:func:`resilient.deadline.remaining`) and at most
``max_wait`` seconds when that is given. If its wait ends without a slot it
gets :class:`DeadlineExceeded` when the deadline ended it and
:class:`BulkheadFull` when ``max_wait`` did. With neither limit it waits until a
slot frees.

The same object serves threads and asyncio tasks, on any number of event
loops in any threads, all queued in one FIFO order. For the explicit form use
:meth:`Bulkhead.acquire` / :meth:`Bulkhead.acquire_async` and
:meth:`Bulkhead.release`; :attr:`Bulkhead.active`, :attr:`Bulkhead.waiting` and
:attr:`Bulkhead.available` report the current state.

How it stays correct without a lock on the fast path
----------------------------------------------------
Free slots are tokens in a ``collections.deque``: taking one is ``pop()``,
giving one back is ``append()``, and both are atomic. A lock is taken only when
somebody has to wait. The one race that matters is a caller going to sleep
just as the last busy slot comes back. Both sides write first and read second:
a waiter *enqueues itself, then looks for a token*; a releaser *appends its
token, then looks for waiters*. Whichever goes second sees what the other
wrote, so a token is never left in the pool while a waiter sleeps. Handing a
token to a waiter, and a waiter giving up, both happen under the lock, so a
waiter that times out or is cancelled at the moment it is handed a token gives
that token back to the next waiter or to the pool. A token in flight to a task
on an event loop that is closed comes back as well: at once when the loop is
already closed, otherwise when the abandoned task is cancelled or collected.

The queue order is strict among waiters. A newcomer that arrives in the very
instant a slot is released, before the releaser has seen the queue, can take
that slot ahead of it; the waiters then keep their order and nothing is lost.
Taking a free slot ignores the deadline: it costs no time, and the protected
work is what the deadline is for.

As a decorator
--------------
A bulkhead also decorates a function, sync or async, as :class:`~resilient.Retry`
and :class:`~resilient.CircuitBreaker` do: every call takes a slot first and
gives it back when done, exactly as through ``Policy(bulkhead=..., retry=None)``
(the same driver runs it)::

    @Bulkhead(max_concurrent=8, max_waiting=32, name="db")
    async def run_query_async(sql):
        ...

:meth:`Bulkhead.call` and :meth:`Bulkhead.acall` do the same for one call
without decorating.

Blocking on an event loop's thread
----------------------------------
A thread waiting in :meth:`Bulkhead.acquire` (or ``with bulkhead:``) blocks. On
a thread that runs an event loop that blocks the loop, and with it the tasks
holding the slots, which can then never release them. So there, where it would
have to wait, ``acquire`` raises ``RuntimeError`` pointing to ``async with`` /
:meth:`Bulkhead.acquire_async` instead of hanging. Taking a free slot never
blocks, so it still works there, and the check is made only on the way to
waiting: the healthy path pays nothing for it.

An adaptive limit
-----------------
``max_concurrent`` may be an :class:`~resilient.AdaptiveLimit` instead of a
number: the limit then moves with the round-trip times and drops of the calls
the bulkhead admits (see :mod:`resilient.adaptive`)::

    db_bulkhead = Bulkhead(max_concurrent=AdaptiveLimit.aimd(), max_waiting=32, name="db")

Each call reports how long it held its slot and how it ended: through the
driver (``Policy(bulkhead=...)``, ``@bulkhead``, :meth:`Bulkhead.call`), through
``with`` / ``async with``, or explicitly with :meth:`Bulkhead.acquire_ticket` and
:meth:`Bulkhead.release_ticket`. A slot taken with plain :meth:`Bulkhead.acquire`
and given back with :meth:`Bulkhead.release` teaches the limit nothing. When
the limit shrinks below the calls in flight none of them is disturbed; new
callers wait (or are refused, as ``max_waiting`` and ``max_wait`` say) until
enough have finished. When it grows, waiters are woken at once. An adaptive
bulkhead gives back every slot under its lock (the algorithm's update must be
serialised), so its healthy path costs a lock and a clock reading more than a
fixed one's; a fixed limit's healthy path is exactly what it was.

Pickling and forking
--------------------
A bulkhead pickles as its configuration: the copy has the same limits and
every slot free, because slots and waiters are this process's callers (an
adaptive limit is copied fresh, back at its initial limit). A forked
child keeps the same object but starts it afresh, every slot free and nobody
waiting (see :mod:`resilient._fork`): the threads that held slots or waited in
the parent do not exist there. The child's thread that forked may still give
back a slot it took before the fork; those releases are accepted even when
they find every slot free.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import math
import threading
import time
import warnings
from collections import OrderedDict, deque
from types import TracebackType
from typing import Any, Final, Self, cast

from resilient import _driver, _fork
from resilient._config import Duration, check_int, rebuild, to_seconds
from resilient.adaptive import AdaptiveLimit
from resilient.deadline import remaining
from resilient.errors import BulkheadFull, DeadlineExceeded
from resilient.stages import SlotPool

__all__ = ["Bulkhead"]


# A waiter's life: WAITING in the queue, then GRANTED a token (which it then
# owns, even before it has woken up) or GONE (gave up, or could not be handed
# one). Changes happen only under the bulkhead's lock.
_WAITING: Final = 0
_GRANTED: Final = 1
_GONE: Final = 2


class _Waiter:
    """One caller waiting in the queue: a thread or an asyncio task."""

    __slots__ = ("future", "loop", "state", "wakeup")

    def __init__(
        self,
        *,
        wakeup: threading.Lock | None = None,
        future: asyncio.Future[bool] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # A thread sleeps on `wakeup`, a lock it already holds, until the
        # releaser unlocks it; a task awaits `future`, which lives on `loop`.
        self.wakeup = wakeup
        self.future = future
        self.loop = loop
        self.state = _WAITING


def _resolve(future: asyncio.Future[bool], granted: bool) -> None:
    # Runs on the future's own loop; the waiter may have been cancelled or
    # timed out already, and then it has given any token back itself.
    if not future.done():
        future.set_result(granted)


class Bulkhead(_driver.Decorating):
    """Lets at most ``max_concurrent`` callers run at once; see the module docstring.

    ``max_concurrent`` is a number, or an :class:`~resilient.AdaptiveLimit` that
    moves with the calls' round-trip times and drops.

    ``max_waiting`` callers beyond those may wait for a slot, first come first
    served; more are refused with :class:`BulkheadFull`. ``max_wait`` (seconds
    or a ``timedelta``) bounds each wait; ``None`` leaves only the deadline in
    force. A wait that ends without a slot raises :class:`DeadlineExceeded`
    if the deadline ended it, :class:`BulkheadFull` if ``max_wait`` did.
    Cancelling a waiting task raises ``CancelledError`` and frees its place.

    Used as a decorator (``@Bulkhead(max_concurrent=...)``) or through :meth:`call`
    and :meth:`acall`, it runs each call in a slot.
    """

    _needs = "max_concurrent=..."  # for the error of @Bulkhead without parentheses
    _fills = "admission"  # @bulkhead, bulkhead.call(): the driver with this one stage

    __slots__ = (
        "__weakref__",
        "_drivers",
        "_forked_slots",
        "_lock",
        "_max_concurrent",
        "_max_wait",
        "_max_waiting",
        "_name",
        "_tokens",
        "_waiters",
    )

    def __new__(cls, *args: object, **config: object) -> Self:
        # An adaptive limit gets a subclass of its own, so that a fixed limit's code
        # paths stay exactly as they are, without a branch for the adaptive case.
        if cls is Bulkhead and not args and isinstance(config.get("max_concurrent"), AdaptiveLimit):
            return cast(Self, _driver.Configured.__new__(_AdaptiveBulkhead, **config))
        return super().__new__(cls, *args, **config)

    def __init__(
        self,
        *,
        max_concurrent: int | AdaptiveLimit,
        max_waiting: int = 0,
        max_wait: Duration | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(max_concurrent, AdaptiveLimit):
            if not isinstance(self, _AdaptiveBulkhead):
                raise TypeError(
                    f"{type(self).__name__}, a subclass of Bulkhead, takes max_concurrent as an "
                    "int; an AdaptiveLimit needs resilient.Bulkhead itself"
                )
            # Slots for the most the limit can ever be; the current limit's are free.
            limit, capacity = max_concurrent.limit, max_concurrent.max_limit
        else:
            if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool):
                raise TypeError(
                    "max_concurrent must be an int or a resilient.AdaptiveLimit, got "
                    f"{type(max_concurrent).__name__}: {max_concurrent!r}"
                )
            limit = capacity = check_int("max_concurrent", max_concurrent, minimum=1)
        self._max_concurrent = limit
        self._max_waiting = check_int("max_waiting", max_waiting, minimum=0)
        self._max_wait = None if max_wait is None else to_seconds("max_wait", max_wait)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}: {name!r}")
        self._name = "unnamed" if name is None else name
        # maxlen is a backstop: even racing over-releases cannot add a slot.
        self._tokens: deque[None] = deque([None] * limit, maxlen=capacity)
        # An OrderedDict is a FIFO queue that can also drop a waiter who gives
        # up from the middle in O(1).
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        # Reentrant because a task abandoned on a closed loop gives its token
        # back from the garbage collector, which may run while this very
        # thread holds the lock.
        self._lock = threading.RLock()
        # Slots taken when this process forked (in the child; see _after_fork_in_child).
        self._forked_slots = 0
        self._drivers: _driver.DriverCache = {}
        _fork.register(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration: the slots and the waiters belong to this process's callers.
        config = {
            "max_concurrent": self._max_concurrent,
            "max_waiting": self._max_waiting,
            "max_wait": self._max_wait,
            "name": self._name,
        }
        return (rebuild, (type(self), config))

    def _after_fork_in_child(self) -> None:
        # Only the forking thread lives on in a forked child: the other threads, and the
        # event loops they ran, that waited or held slots in the parent are gone, and would
        # keep their places and slots forever. Tasks of a loop running in the forking thread
        # itself live on (Python < 3.12) and keep their places. Mutated in place: drivers
        # hold these very objects.
        tokens, waiters = self._tokens, self._waiters
        self._lock = threading.RLock()
        loop = asyncio._get_running_loop()
        for waiter in [waiter for waiter in waiters if loop is None or waiter.loop is not loop]:
            del waiters[waiter]
        self._forked_slots = self._max_concurrent - len(tokens)
        tokens.extend([None] * self._forked_slots)
        with self._lock:
            self._hand_out_tokens()

    # -- configuration and state ------------------------------------------

    @property
    def name(self) -> str:
        """The name shown in errors and in ``repr``."""
        return self._name

    @property
    def max_concurrent(self) -> int:
        """How many callers may run at once (with an adaptive limit: now)."""
        return self._max_concurrent

    @property
    def adaptive_limit(self) -> AdaptiveLimit | None:
        """The :class:`~resilient.AdaptiveLimit` moving ``max_concurrent``, or ``None``."""
        return None

    @property
    def max_waiting(self) -> int:
        """How many more callers may wait for a slot."""
        return self._max_waiting

    @property
    def max_wait(self) -> float | None:
        """The most seconds one caller waits, or ``None`` for only the deadline."""
        return self._max_wait

    @property
    def active(self) -> int:
        """How many slots are taken (including ones being handed to a waiter)."""
        return self._max_concurrent - len(self._tokens)

    @property
    def waiting(self) -> int:
        """How many callers are waiting for a slot."""
        return len(self._waiters)

    @property
    def available(self) -> int:
        """How many slots are free."""
        return len(self._tokens)

    def __repr__(self) -> str:
        return (
            f"Bulkhead(name={self._name!r}, active={self.active}, waiting={self.waiting}, "
            f"max_concurrent={self._max_concurrent}, max_waiting={self._max_waiting})"
        )

    # -- taking and giving back slots --------------------------------------

    def try_acquire(self) -> bool:
        """Take a free slot if there is one and nobody is waiting; never wait.

        Returns whether a slot was taken (give it back with :meth:`release`).
        """
        # Skipping the free slot while others wait keeps the queue first-come.
        if not self._waiters:
            try:
                self._tokens.pop()
            except IndexError:
                return False
            return True
        return False

    def acquire(self) -> None:
        """Take a slot, blocking this thread while waiting for one.

        Raises :class:`BulkheadFull` or :class:`DeadlineExceeded` as described
        in the class docstring. On a thread running an event loop it takes a
        free slot but raises ``RuntimeError`` rather than wait for one, which
        would block the loop; use :meth:`acquire_async` there.
        """
        if not self.try_acquire():
            self._acquire_waiting()

    async def acquire_async(self) -> None:
        """Take a slot, suspending this task while waiting for one.

        Raises like :meth:`acquire`; if the task is cancelled while waiting,
        ``CancelledError`` propagates and no slot is taken.
        """
        if not self.try_acquire():
            await self._acquire_waiting_async()

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire` or :meth:`acquire_async`.

        Raises ``RuntimeError`` when every slot is already free, because then
        the caller is releasing a slot it never took.
        """
        tokens = self._tokens
        if len(tokens) >= self._max_concurrent:
            if self._forked_slots:
                # The forking thread giving back a slot it took before a fork.
                self._forked_slots -= 1
                return
            raise RuntimeError(
                f"bulkhead {self._name!r} was released more times than it was acquired: "
                f"all {self._max_concurrent} slots are already free"
            )
        tokens.append(None)
        # Appending before looking is what keeps a sleeping waiter from being
        # missed (see the module docstring).
        if self._waiters:
            with self._lock:
                self._hand_out_tokens()

    def slot_pool(self) -> SlotPool | None:
        """This bulkhead's healthy path as plain objects (:class:`~resilient.stages.SlotPool`).

        ``None`` for an adaptive limit, whose slots are given back through
        :meth:`release_ticket`.
        """
        return SlotPool(self._tokens, self._waiters, self.wake)

    # -- with a ticket: what an adaptive limit learns from ----------------------
    # (stages.MeasuredAdmission; a fixed limit learns nothing, so its tickets are 0.0)

    def try_acquire_ticket(self) -> float | None:
        """:meth:`try_acquire`, returning a ticket for :meth:`release_ticket` (``None``: no slot).

        The ticket is the instant the slot was taken, on the adaptive limit's clock.
        """
        return 0.0 if self.try_acquire() else None

    def acquire_ticket(self) -> float:
        """:meth:`acquire`, returning a ticket for :meth:`release_ticket`."""
        self.acquire()
        return 0.0

    async def acquire_ticket_async(self) -> float:
        """:meth:`acquire_async`, returning a ticket for :meth:`release_ticket`."""
        await self.acquire_async()
        return 0.0

    def release_ticket(self, ticket: object, error: BaseException | None) -> None:
        """Give back the slot of ``ticket``, saying how its call ended (``error``, or ``None``).

        An adaptive limit learns from it: the slot's hold time is the call's
        round-trip time, and ``error`` a drop, or no sample (see
        :class:`~resilient.AdaptiveLimit`). A fixed limit just frees the slot.
        """
        self.release()

    def wake(self) -> None:
        """Hand free slots to waiters, first come first served (after a token went back)."""
        with self._lock:
            self._hand_out_tokens()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> None:
        await self.acquire_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    # -- the slow path: waiting -------------------------------------------

    def _acquire_waiting(self) -> None:
        started = time.monotonic()
        limit, deadline_is_limit = self._wait_limit()
        wakeup = threading.Lock()
        wakeup.acquire()
        waiter = _Waiter(wakeup=wakeup)
        if self._join_queue(waiter, limit, deadline_is_limit, started):
            return
        # Lock.acquire cannot take timeouts beyond TIMEOUT_MAX (centuries).
        timeout = -1.0 if limit > threading.TIMEOUT_MAX else limit
        try:
            woken = wakeup.acquire(timeout=timeout)
        except BaseException:  # e.g. KeyboardInterrupt while blocked
            self._give_up(waiter)
            raise
        if not woken:
            self._give_up(waiter)
            raise self._wait_ended(deadline_is_limit, started)

    async def _acquire_waiting_async(self) -> None:
        started = time.monotonic()
        limit, deadline_is_limit = self._wait_limit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = _Waiter(future=future, loop=loop)
        if self._join_queue(waiter, limit, deadline_is_limit, started):
            return
        timer = None if math.isinf(limit) else loop.call_later(limit, _resolve, future, False)
        try:
            granted = await future
        except BaseException:
            # Cancelled, or GeneratorExit when the task is collected after its
            # loop was closed: either way, put back any token we were handed.
            self._give_up(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not granted:
            self._give_up(waiter)
            raise self._wait_ended(deadline_is_limit, started)

    def _wait_limit(self) -> tuple[float, bool]:
        """Return how long a waiter may wait, and whether the deadline sets that."""
        deadline_left = remaining()
        max_wait = self._max_wait
        if max_wait is None or deadline_left <= max_wait:
            return deadline_left, True
        return max_wait, False

    def _join_queue(
        self, waiter: _Waiter, limit: float, deadline_is_limit: bool, started: float
    ) -> bool:
        """Take a free slot (True) or put ``waiter`` in the queue (False), or raise."""
        with self._lock:
            # Serve those already queued first, so that neither a token in
            # transit nor a queue that is about to shrink turns us away.
            self._hand_out_tokens()
            if not self._waiters:
                try:
                    self._tokens.pop()
                except IndexError:
                    pass
                else:
                    return True
            if len(self._waiters) >= self._max_waiting:
                raise BulkheadFull(self._name, self._max_concurrent, self._max_waiting)
            if limit <= 0:
                raise self._wait_ended(deadline_is_limit, started)
            if waiter.wakeup is not None and asyncio._get_running_loop() is not None:
                raise RuntimeError(
                    f"bulkhead {self._name!r} has no free slot, and waiting for one here "
                    "would block this thread's running event loop, and with it any task "
                    "that holds a slot; use 'async with bulkhead:' or "
                    "'await bulkhead.acquire_async()' in async code"
                )
            self._waiters[waiter] = None
            # Enqueue first, then look for a token: pairs with release(), which
            # appends first and then looks for waiters.
            self._hand_out_tokens()
            return False

    def _hand_out_tokens(self) -> None:
        """Give free tokens to waiters, first come first served. Hold the lock."""
        tokens, waiters = self._tokens, self._waiters
        while waiters:
            try:
                tokens.pop()
            except IndexError:
                return
            waiter, _ = waiters.popitem(last=False)
            if not self._hand_over(waiter):
                tokens.append(None)

    def _hand_over(self, waiter: _Waiter) -> bool:
        """Wake ``waiter`` with a token; False if it cannot take one. Hold the lock."""
        if waiter.wakeup is not None:
            waiter.state = _GRANTED
            waiter.wakeup.release()
            return True
        future, loop = waiter.future, waiter.loop
        assert future is not None
        assert loop is not None
        if asyncio._get_running_loop() is loop:
            # On the waiter's own thread the future can be settled directly,
            # and a cancelled waiter is seen at once.
            if future.done():
                waiter.state = _GONE
                return False
            future.set_result(True)
            waiter.state = _GRANTED
            return True
        # From another thread the waiter owns the token from now on; if it
        # turns out to be cancelled or timed out it gives the token back.
        waiter.state = _GRANTED
        try:
            loop.call_soon_threadsafe(_resolve, future, True)
        except RuntimeError:  # its loop is closed: nobody will ever take it
            waiter.state = _GONE
            return False
        return True

    def _give_up(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue, or give back the token it was handed."""
        with self._lock:
            state, waiter.state = waiter.state, _GONE
            if state == _WAITING:
                del self._waiters[waiter]
            elif state == _GRANTED:
                self._tokens.append(None)
                self._hand_out_tokens()

    def _wait_ended(self, deadline_is_limit: bool, started: float) -> Exception:
        waited = time.monotonic() - started
        if deadline_is_limit:
            return DeadlineExceeded(
                f"waited {waited:.3f} s for a slot in bulkhead {self._name!r} until the "
                f"deadline ran out; all {self._max_concurrent} slots stayed taken"
            )
        error = BulkheadFull(self._name, self._max_concurrent, self._max_waiting)
        error.add_note(f"waited max_wait={self._max_wait:g} s and no slot was freed")
        return error


# The slots an adaptive bulkhead's ``with`` blocks hold in this context, innermost
# first: (bulkhead, ticket, the rest). __exit__ gets no value from __enter__, so the
# ticket waits here; a block that ends in another context frees its slot unmeasured.
_held: contextvars.ContextVar[tuple[Any, float, Any] | None] = contextvars.ContextVar(
    "resilient_bulkhead_held", default=None
)


class _AdaptiveBulkhead(Bulkhead):
    """What ``Bulkhead(max_concurrent=AdaptiveLimit(...))`` makes: a bulkhead whose limit moves.

    The slots are the same tokens as a fixed bulkhead's, in a deque sized for the
    limit's ``max_limit``. Taking one is the same lock-free ``pop()``. Giving one
    back happens under the lock, where the algorithm learns from the call and the
    limit changes: growing appends tokens (and wakes waiters); shrinking takes free
    tokens away and, for slots still held, books a debt that the next releases pay
    by not returning their token. So ``active = max_concurrent + debt - free``.
    """

    __slots__ = ("_adaptive", "_algorithm", "_clock", "_debt", "_told")

    def __init__(
        self,
        *,
        max_concurrent: int | AdaptiveLimit,
        max_waiting: int = 0,
        max_wait: Duration | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(max_concurrent, AdaptiveLimit):
            raise TypeError(f"max_concurrent must be an AdaptiveLimit here, got {max_concurrent!r}")
        self._debt = 0
        self._told = False  # whether a slot given back unmeasured was warned about
        self._adaptive = max_concurrent
        self._algorithm = max_concurrent.algorithm
        self._clock = max_concurrent.clock
        super().__init__(
            max_concurrent=max_concurrent, max_waiting=max_waiting, max_wait=max_wait, name=name
        )
        max_concurrent._attach(self._name)  # last: a bulkhead refused above claims nothing

    def __reduce__(self) -> tuple[Any, ...]:
        config = {
            "max_concurrent": copy.copy(self._adaptive),
            "max_waiting": self._max_waiting,
            "max_wait": self._max_wait,
            "name": self._name,
        }
        return (rebuild, (Bulkhead, config))

    def _after_fork_in_child(self) -> None:
        held = self.active
        self._debt = 0
        super()._after_fork_in_child()
        self._forked_slots = held

    @property
    def adaptive_limit(self) -> AdaptiveLimit:
        """The :class:`~resilient.AdaptiveLimit` moving ``max_concurrent``."""
        return self._adaptive

    @property
    def active(self) -> int:
        """How many slots are taken (including ones being handed to a waiter)."""
        return self._max_concurrent + self._debt - len(self._tokens)

    def __repr__(self) -> str:
        return (
            f"Bulkhead(name={self._name!r}, active={self.active}, waiting={self.waiting}, "
            f"max_concurrent={self._adaptive!r}, max_waiting={self._max_waiting})"
        )

    def slot_pool(self) -> SlotPool | None:
        """``None``: an adaptive bulkhead's slots go back through :meth:`release_ticket`."""
        return None

    def try_acquire_ticket(self) -> float | None:
        """:meth:`try_acquire`, returning a ticket (``None``: no slot free)."""
        if not self._waiters:
            try:
                self._tokens.pop()
            except IndexError:
                return None
            return self._clock()
        return None

    def acquire_ticket(self) -> float:
        """:meth:`acquire`, returning a ticket for :meth:`release_ticket`."""
        self.acquire()
        return self._clock()

    async def acquire_ticket_async(self) -> float:
        """:meth:`acquire_async`, returning a ticket for :meth:`release_ticket`."""
        await self.acquire_async()
        return self._clock()

    def release_ticket(self, ticket: object, error: BaseException | None) -> None:
        """Give back the slot of ``ticket``; the limit learns how long the call held it and how
        it ended (see :class:`~resilient.AdaptiveLimit` for what is a drop)."""
        dropped: bool | None = False
        if error is not None:
            try:
                dropped = self._adaptive._judge(error)
            except BaseException:
                self._give_back(None, None)  # a drop_on predicate that raised
                raise
        if dropped is None or type(ticket) is not float:
            self._give_back(None, None)  # no sample: ignored, cancelled, or not our ticket
        else:
            self._give_back(ticket, dropped)

    def release(self) -> None:
        """Give back a slot, teaching the limit nothing (use :meth:`release_ticket` for that).

        The first time, a ``RuntimeWarning`` says so: a limit that never hears how
        calls went cannot adapt, and that should not go unnoticed.
        """
        if not self._told:
            self._told = True
            warnings.warn(
                f"bulkhead {self._name!r} has an adaptive limit, but a slot was given back "
                "with release(), which does not say how the call went, so the limit learnt "
                "nothing from it; take and give back slots with acquire_ticket() and "
                "release_ticket(ticket, error), or with 'with bulkhead:'",
                RuntimeWarning,
                stacklevel=2,
            )
        self._give_back(None, None)

    def __enter__(self) -> None:
        ticket = self.acquire_ticket()
        _held.set((self, ticket, _held.get()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit(exc)

    async def __aenter__(self) -> None:
        ticket = await self.acquire_ticket_async()
        _held.set((self, ticket, _held.get()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit(exc)

    def _exit(self, error: BaseException | None) -> None:
        held = _held.get()
        if held is not None and held[0] is self:  # the innermost block: the usual case
            _held.set(held[2])
            self.release_ticket(held[1], error)
            return
        # Blocks that did not nest (a generator's, left after its caller's): ours is deeper.
        above = []
        while held is not None and held[0] is not self:
            above.append(held)
            held = held[2]
        if held is None:  # entered in another context: the slot goes back unmeasured
            self.release()
            return
        rest = held[2]
        for entry in reversed(above):
            rest = (entry[0], entry[1], rest)
        _held.set(rest)
        self.release_ticket(held[1], error)

    def _give_back(self, started: float | None, dropped: bool | None) -> None:
        """Free one slot; with ``started``, the algorithm learns from the call first."""
        now = 0.0 if started is None else self._clock()
        with self._lock:
            tokens = self._tokens
            active = self._max_concurrent + self._debt - len(tokens)
            if active <= 0:
                if self._forked_slots:
                    # The forking thread giving back a slot it took before a fork.
                    self._forked_slots -= 1
                    return
                raise RuntimeError(
                    f"bulkhead {self._name!r} was released more times than it was acquired: "
                    "no slot is taken"
                )
            if self._debt:
                self._debt -= 1
            else:
                tokens.append(None)
            refused = None
            try:
                if started is not None:
                    assert dropped is not None
                    limit = self._algorithm.update(
                        now=now,
                        started=started,
                        rtt=now - started,
                        inflight=active,
                        dropped=dropped,
                    )
                    if limit != self._max_concurrent:
                        if type(limit) is int and 1 <= limit <= self._adaptive.max_limit:
                            self._resize(limit)
                        else:
                            refused = limit
            finally:  # an algorithm that raised must not keep the freed slot from a waiter
                if self._waiters:
                    self._hand_out_tokens()
        if refused is not None:
            raise ValueError(
                f"the limit algorithm {self._algorithm!r} of bulkhead {self._name!r} returned "
                f"{refused!r}, not an int from 1 to max_limit={self._adaptive.max_limit}; "
                f"the limit stays at {self._max_concurrent}"
            )

    def _resize(self, limit: int) -> None:
        """Move the limit to ``limit``, disturbing no call in flight. Hold the lock."""
        grow = limit - self._max_concurrent
        self._max_concurrent = limit
        tokens = self._tokens
        if grow > 0:
            paid = min(grow, self._debt)
            self._debt -= paid
            for _ in range(grow - paid):
                tokens.append(None)
            return
        for _ in range(-grow):
            try:
                tokens.pop()
            except IndexError:
                self._debt += 1

    def _hand_out_tokens(self) -> None:
        """Settle the debt from free tokens, then serve the waiters. Hold the lock."""
        tokens = self._tokens
        while self._debt:
            try:
                tokens.pop()
            except IndexError:
                break
            self._debt -= 1
        super()._hand_out_tokens()
