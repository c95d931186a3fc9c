"""Scatter/gather to a quorum: run calls at once, return when ``k`` succeed, stop when they cannot.

A replicated store writes to N replicas and returns after W acknowledgements, and reads
from R; a fan-out search wants the first few shards' answers. :func:`quorum` is that
pattern on its own::

    result = await resilient.quorum(
        {node: functools.partial(client_for(node).call, "kv.get", key) for node in nodes},
        k=2,
    )
    result.results       # {node: answer, ...}: at least k successes, in the order they came

It starts the calls concurrently (at most ``limit`` at once: the seed's ``par.Limit``), and
returns as soon as ``k`` have succeeded. It raises :class:`~resilient.QuorumError` as soon
as success is impossible (too many failed to leave ``k`` possible, or the deadline in
force passed), saying which calls answered and why each other one did not. Either way
the calls still running are cancelled, and awaited, before it returns: no task outlives
the call, and cancelling the caller cancels them all.

**Spares and hedging.** ``start`` calls are started first (default: all of them); the
others are spares, in order. A spare starts when a started call fails (so a failure
costs one more call, not the quorum), when fewer than ``k`` are left running, and, with
``hedge_after``, each time that many seconds pass without the quorum: the hedge, a
request to a replica not yet asked when the first ones are slow (Dean and Barroso, "The
Tail at Scale"). ``quorum(calls, k=R, start=R, hedge_after=0.05)`` asks R replicas, then
one more every 50 ms while the answers are missing.

**The deadline** (:func:`resilient.deadline`) bounds the whole gather: calls inherit it
(tasks copy the context), and when it passes the gather gives up with a
``QuorumError`` (the calls then running are reported ``"no answer before the
deadline"``). A deadline that has already passed starts nothing. Inside an
``async with resilient.deadline(...)`` block the scope's own cancellation comes at the
same instant and usually first: the caller then gets the scope's
:class:`~resilient.DeadlineExceeded`, and the calls are cancelled all the same. The
plain ``with resilient.deadline(...)`` (or a deadline set further up) gets the
``QuorumError`` with its reasons.

:func:`quorum_sync` is the same for blocking calls, over threads (an executor of your own,
or one made for the call). Threads cannot be cancelled: calls still running when it
returns are left to finish in their threads (reported in
:attr:`QuorumResult.unfinished`), bounded only by their own timeouts and the deadline
they carry (:func:`resilient.deadline.carry` gives them the caller's); calls not yet
started are never started.

The scheduling decisions are one sans-I/O core (:class:`_Gather`); the two drivers only
wait differently.

Public names: :func:`quorum`, :func:`quorum_sync`, :class:`QuorumResult`,
:class:`~resilient.QuorumError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from resilient._config import Duration, check_int, to_seconds
from resilient.deadline import carry
from resilient.deadline import current as _current_deadline
from resilient.errors import QuorumError

__all__ = ["QuorumError", "QuorumResult", "quorum", "quorum_sync"]

L = TypeVar("L", bound=Hashable)
T = TypeVar("T")

_INF = math.inf


@dataclass(frozen=True, slots=True)
class QuorumResult(Generic[L, T]):
    """What a successful :func:`quorum` gathered.

    * ``results``: every call that succeeded, label to value, in the order they did
      (at least ``k``; more when several finished at the same moment).
    * ``failures``: the calls that failed before the quorum was reached, label to error.
    * ``unfinished``: calls still running when it was reached: cancelled by
      :func:`quorum`, left to finish in their threads by :func:`quorum_sync`.
    * ``not_started``: spares that were never needed.
    """

    results: dict[L, T]
    failures: dict[L, BaseException]
    unfinished: tuple[L, ...]
    not_started: tuple[L, ...]

    @property
    def values(self) -> list[T]:
        """The successful calls' values, in the order they came."""
        return list(self.results.values())


def _reason(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Gather(Generic[L]):
    """Which calls to start, and whether the gather is done or hopeless: no I/O, no clock."""

    __slots__ = (
        "failures",
        "hedge_after",
        "k",
        "labels",
        "limit",
        "next",
        "next_hedge",
        "owed",
        "results",
        "running",
    )

    def __init__(
        self,
        labels: list[L],
        k: int,
        limit: int,
        start: int,
        hedge_after: float | None,
        now: float,
    ) -> None:
        self.labels = labels
        self.k = k
        self.limit = limit
        self.next = 0  # index of the next call to start
        self.owed = start  # starts wanted and not yet made (waiting for a free slot)
        self.running: list[L] = []
        self.results: dict[L, Any] = {}
        self.failures: dict[L, BaseException] = {}
        self.hedge_after = hedge_after
        self.next_hedge = _INF if hedge_after is None else now + hedge_after

    def launches(self) -> list[L]:
        """The calls to start now."""
        left = len(self.labels) - self.next
        # Never fewer in flight than successes still missing: a quorum cannot wait on
        # calls nobody started.
        missing = self.k - len(self.results) - len(self.running)
        self.owed = min(max(self.owed, missing), left)
        started: list[L] = []
        while self.owed > 0 and len(self.running) < self.limit:
            label = self.labels[self.next]
            self.next += 1
            self.owed -= 1
            self.running.append(label)
            started.append(label)
        return started

    def succeeded(self, label: L, value: Any) -> None:
        self.running.remove(label)
        self.results[label] = value

    def failed(self, label: L, error: BaseException) -> None:
        self.running.remove(label)
        self.failures[label] = error
        self.owed += 1  # replace it with the next spare

    @property
    def done(self) -> bool:
        return len(self.results) >= self.k

    @property
    def hopeless(self) -> bool:
        possible = len(self.results) + len(self.running) + len(self.labels) - self.next
        return possible < self.k

    def hedge(self, now: float) -> None:
        """Start one more spare if ``hedge_after`` passed since the last hedge (or the start)."""
        if now >= self.next_hedge:
            assert self.hedge_after is not None
            self.owed += 1
            self.next_hedge = now + self.hedge_after

    def wait(self, now: float, deadline: float) -> float | None:
        """Seconds to wait for a call to finish before looking again (``None``: no bound)."""
        until = self.next_hedge if self.next < len(self.labels) else _INF
        until = min(until, deadline)
        return None if until == _INF else max(0.0, until - now)

    def result(self) -> QuorumResult[L, Any]:
        return QuorumResult(
            results=dict(self.results),
            failures=dict(self.failures),
            unfinished=tuple(self.running),
            not_started=tuple(self.labels[self.next :]),
        )

    def error(self, what: str, expired: bool) -> QuorumError:
        reasons = {label: _reason(error) for label, error in self.failures.items()}
        if expired:
            running, waiting = "no answer before the deadline", "not asked: the deadline passed"
        else:
            running = "cancelled: too many others had failed for a quorum"
            waiting = "not asked: too many others had failed for a quorum"
        for label in self.running:
            reasons[label] = running
        for label in self.labels[self.next :]:
            reasons[label] = waiting
        return QuorumError(self.k, list(self.results), reasons, what=what, errors=self.failures)


def _prepare(
    calls: object, k: object, limit: object, start: object, hedge_after: object
) -> tuple[list[Any], list[Callable[[], Any]], int, int, int, float | None]:
    """Check the arguments once; the labels and calls in order, and the numbers."""
    if isinstance(calls, Mapping):
        labels, functions = list(calls.keys()), list(calls.values())
    elif isinstance(calls, Sequence) and not isinstance(calls, str | bytes):
        labels, functions = list(range(len(calls))), list(calls)
    else:
        raise TypeError(
            "calls must be a mapping of labels to zero-argument callables, or a sequence of "
            f"them, got {type(calls).__name__}: {calls!r}"
        )
    for label, function in zip(labels, functions, strict=True):
        if not callable(function):
            raise TypeError(
                f"calls[{label!r}] must be a zero-argument callable that makes the call "
                f"(functools.partial(fn, ...) or a lambda), got {function!r}"
            )
    count = check_int("k", k, minimum=1)
    if count > len(labels):
        raise ValueError(
            f"k={count} can never be reached with {len(labels)} calls; pass at most "
            f"{len(labels)}, or more calls"
        )
    at_once = len(labels) if limit is None else check_int("limit", limit, minimum=1)
    first = len(labels) if start is None else check_int("start", start, minimum=1)
    if first > len(labels):
        raise ValueError(f"start={first} is more than the {len(labels)} calls given")
    hedge = (
        None if hedge_after is None else to_seconds("hedge_after", hedge_after, allow_zero=False)
    )
    return labels, functions, count, at_once, first, hedge


async def _run(function: Callable[[], Awaitable[T]]) -> T:
    return await function()


@overload
async def quorum(
    calls: Mapping[L, Callable[[], Awaitable[T]]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    what: str = "the calls",
) -> QuorumResult[L, T]: ...
@overload
async def quorum(
    calls: Sequence[Callable[[], Awaitable[T]]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    what: str = "the calls",
) -> QuorumResult[int, T]: ...
async def quorum(
    calls: Mapping[Any, Callable[[], Awaitable[Any]]] | Sequence[Callable[[], Awaitable[Any]]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    what: str = "the calls",
) -> QuorumResult[Any, Any]:
    """Run ``calls`` concurrently; return once ``k`` succeed, raise once they cannot.

    ``calls`` maps labels (node names, say) to zero-argument callables returning an
    awaitable (``functools.partial(client.call, "kv.get", key)``), or is a sequence of
    them (labelled 0, 1, ...); each is called only when its call starts. ``limit``
    bounds how many run at once; ``start`` how many start first, the rest being spares
    (see the module docstring, also for ``hedge_after``); ``what`` names the operation
    in the :class:`~resilient.QuorumError` message.

    Returns a :class:`QuorumResult`; raises :class:`~resilient.QuorumError` when fewer
    than ``k`` can succeed or the deadline in force passes first. The calls still
    running are cancelled and awaited before it returns or raises.
    """
    labels, functions, count, at_once, first, hedge = _prepare(calls, k, limit, start, hedge_after)
    deadline = _current_deadline()
    clock = time.monotonic
    gather: _Gather[Any] = _Gather(labels, count, at_once, first, hedge, clock())
    if deadline <= clock():
        raise gather.error(what, expired=True)
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[Any], Any] = {}
    by_label = dict(zip(labels, functions, strict=True))
    try:
        while True:
            for label in gather.launches():
                task = loop.create_task(_run(by_label[label]), name=f"resilient.quorum {label!r}")
                tasks[task] = label
            if gather.done:
                return gather.result()
            if gather.hopeless:
                raise gather.error(what, expired=False)
            now = clock()
            if now >= deadline:
                raise gather.error(what, expired=True)
            finished, _ = await asyncio.wait(
                tasks, timeout=gather.wait(now, deadline), return_when=asyncio.FIRST_COMPLETED
            )
            # In the order they started: a set has none, and results should not vary.
            for task in [task for task in tasks if task in finished]:
                label = tasks.pop(task)
                if task.cancelled():
                    gather.failed(label, asyncio.CancelledError("the call cancelled itself"))
                elif (error := task.exception()) is not None:
                    if not isinstance(error, Exception):
                        raise error  # KeyboardInterrupt, SystemExit: not a failed call
                    gather.failed(label, error)
                else:
                    gather.succeeded(label, task.result())
            if hedge is not None:
                gather.hedge(clock())
    finally:
        if tasks:
            for task in tasks:
                task.cancel()
            # Awaited so that none outlives the gather; a call that ignores cancellation
            # holds the caller here, as in a TaskGroup.
            await asyncio.wait(tasks)


@overload
def quorum_sync(
    calls: Mapping[L, Callable[[], T]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    executor: concurrent.futures.Executor | Mapping[Any, concurrent.futures.Executor] | None = None,
    what: str = "the calls",
) -> QuorumResult[L, T]: ...
@overload
def quorum_sync(
    calls: Sequence[Callable[[], T]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    executor: concurrent.futures.Executor | Mapping[Any, concurrent.futures.Executor] | None = None,
    what: str = "the calls",
) -> QuorumResult[int, T]: ...
def quorum_sync(
    calls: Mapping[Any, Callable[[], Any]] | Sequence[Callable[[], Any]],
    k: int,
    *,
    limit: int | None = None,
    start: int | None = None,
    hedge_after: Duration | None = None,
    executor: concurrent.futures.Executor | Mapping[Any, concurrent.futures.Executor] | None = None,
    what: str = "the calls",
) -> QuorumResult[Any, Any]:
    """The blocking twin of :func:`quorum`: each call runs in a thread of ``executor``.

    Without an ``executor``, one is made for this call and shut down (without waiting)
    when it returns. ``executor`` may also map each call's label to the executor it
    runs in (a pool per node, say: a slow node's stragglers then hold only its own
    threads, and calls to the others never queue behind them). Each call carries the
    caller's deadline into its thread. Calls still running when the quorum is reached,
    or found impossible, cannot be cancelled: they finish in their threads
    (:attr:`QuorumResult.unfinished`); calls not yet started are cancelled.
    """
    labels, functions, count, at_once, first, hedge = _prepare(calls, k, limit, start, hedge_after)
    pools = _executors(executor, labels)
    deadline = _current_deadline()
    clock = time.monotonic
    gather: _Gather[Any] = _Gather(labels, count, at_once, first, hedge, clock())
    if deadline <= clock():
        raise gather.error(what, expired=True)
    own = None
    if pools is None:
        own = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(at_once, len(labels)), thread_name_prefix="resilient-quorum"
        )
        pools = dict.fromkeys(labels, own)
    futures: dict[concurrent.futures.Future[Any], Any] = {}
    by_label = dict(zip(labels, functions, strict=True))
    try:
        while True:
            for label in gather.launches():
                futures[pools[label].submit(carry(by_label[label]))] = label
            if gather.done:
                return gather.result()
            if gather.hopeless:
                raise gather.error(what, expired=False)
            now = clock()
            if now >= deadline:
                raise gather.error(what, expired=True)
            finished, _ = concurrent.futures.wait(
                futures,
                timeout=gather.wait(now, deadline),
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
            for future in [future for future in futures if future in finished]:
                label = futures.pop(future)
                error = future.exception()
                if error is None:
                    result = future.result()
                    if inspect.isawaitable(result):
                        _refuse_awaitable(label, result)
                    gather.succeeded(label, result)
                elif isinstance(error, Exception):
                    gather.failed(label, error)
                else:  # pragma: no cover - a thread's KeyboardInterrupt is not a failed call
                    raise error
            if hedge is not None:
                gather.hedge(clock())
    finally:
        for future in futures:
            future.cancel()  # only those not yet started; threads cannot be interrupted
        if own is not None:
            own.shutdown(wait=False, cancel_futures=True)


def _refuse_awaitable(label: Any, result: Any) -> None:
    """An async call given to quorum_sync: its answer was never awaited, so refuse it."""
    if inspect.iscoroutine(result):
        result.close()  # no "never awaited" warning on top of this error
    raise TypeError(
        f"quorum_sync's call {label!r} returned an awaitable ({result!r}), not its answer: "
        "quorum_sync runs blocking calls in threads; for async calls, await "
        "resilient.quorum(...) instead"
    )


def _executors(
    executor: object, labels: list[Any]
) -> dict[Any, concurrent.futures.Executor] | None:
    """The executor of each label, from one executor or a mapping; ``None``: make one."""
    if executor is None:
        return None
    if isinstance(executor, concurrent.futures.Executor):
        return dict.fromkeys(labels, executor)
    if not isinstance(executor, Mapping):
        raise TypeError(
            "executor must be a concurrent.futures.Executor or a mapping of each call's "
            f"label to one, got {executor!r}"
        )
    pools: dict[Any, concurrent.futures.Executor] = {}
    for label in labels:
        if label not in executor:
            raise ValueError(f"executor maps no executor to the call labelled {label!r}")
        pool = executor[label]
        if not isinstance(pool, concurrent.futures.Executor):
            raise TypeError(
                f"executor[{label!r}] must be a concurrent.futures.Executor, got {pool!r}"
            )
        pools[label] = pool
    return pools
