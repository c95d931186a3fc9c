"""Hedged requests: when an attempt is slow, send another and take the first answer.

A slow minority of calls sets a service's tail latency ("The Tail at Scale": a hedge
sent after 10 ms cut BigTable's p99.9 from 1,800 ms to 74 ms for about 2% more
requests). :class:`Hedge` starts the call; if it has not answered after ``delay``, it
starts another attempt beside it, up to ``max_attempts`` in all (gRPC's hedging
policy, gRFC A6, caps them at 5). The first success wins and the others are
cancelled. A failure that ``on`` calls non-fatal starts the next attempt at once; a
fatal one ends the call and cancels the rest. All attempts run inside the call's one
deadline.

Hedging doubles the work of every call it touches, so two things keep it honest:

* :class:`AdaptiveDelay` hedges at a latency quantile of recent calls, with a cap
  (Cassandra's ``MIN(99p, 50ms)``: one sick host drags a bare percentile up), so
  only the slowest few percent of calls are hedged;
* :class:`HedgeBudget` (gRPC's retry throttling): tokens that a failed call or a
  hedge sent takes and a successful call gives back a fraction of; hedges go out
  only while more than half remain, so hedging stops in an outage or a slowdown.

Only idempotent work may be hedged: two attempts may both reach the server. In
:class:`~resilient.Policy` (``Policy(hedge=Hedge(...))``) declaring the hedge is
that promise; the async httpx transport hedges only idempotent requests. Hedging is
for async code only: a sync attempt cannot be cancelled, so the losers would run on
in threads, holding connections, after the caller has its answer. A sync function
given a hedge is refused with a ``TypeError`` that says so.

Public names: :class:`Hedge`, :class:`AdaptiveDelay`, :class:`HedgeBudget`,
:class:`HedgeListener`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast

from resilient import _driver, _fork
from resilient._config import (
    DEFAULT,
    Default,
    Duration,
    check_int,
    check_number,
    describe,
    exception_types,
    rebuild,
    to_seconds,
)
from resilient.errors import PROGRAMMING_ERRORS, DeadlineExceeded, ResilientError

__all__ = ["AdaptiveDelay", "Hedge", "HedgeBudget", "HedgeListener", "refuse_sync"]

P = ParamSpec("P")
R = TypeVar("R")

# gRPC's cap: more attempts in flight add load without cutting the tail further.
MAX_ATTEMPTS: Final = 5
# The note a hedged call that failed carries (resilient.fallback's gave_up reads it).
GAVE_UP: Final = "resilient.Hedge: gave up after "


class HedgeListener(Protocol):
    """Hears what a hedged call did: resilient's tracing is one (span events, counters)."""

    def hedged(self, attempt: int, elapsed: float) -> None:
        """Attempt number ``attempt`` (2 or more) started, ``elapsed`` seconds into the call."""
        ...

    def won(self, attempt: int, attempts: int) -> None:
        """Attempt ``attempt`` of the ``attempts`` started answered first."""
        ...


class HedgeBudget:
    """How many hedges a stream of calls may send: gRPC's retry throttling.

    >>> budget = HedgeBudget(max_tokens=10, token_ratio=0.1)

    The budget starts full at ``max_tokens``. A hedge sent takes one token, and so
    does a call that failed; a call that succeeded gives back ``token_ratio``. A
    hedge goes out only while more than half the tokens remain. So in steady state
    at most about ``token_ratio`` hedges go out per successful call, with bursts of
    up to ``max_tokens / 2``, and in an outage (every call failing) or a slowdown
    (every call hedging) hedging stops within a few calls, and resumes as calls
    succeed again. Thread-safe; one budget may serve several :class:`Hedge` stages.
    """

    __slots__ = ("_lock", "_tokens", "max_tokens", "token_ratio")

    max_tokens: float
    token_ratio: float

    def __init__(self, *, max_tokens: float = 10, token_ratio: float = 0.1) -> None:
        self.max_tokens = check_number("max_tokens", max_tokens, minimum=1)
        self.token_ratio = check_number("token_ratio", token_ratio, minimum=0, maximum=1)
        if self.token_ratio == 0:
            raise ValueError(
                "token_ratio must be greater than 0, got 0: a budget nothing refills would "
                "stop hedging for good after max_tokens / 2 hedges"
            )
        self._tokens = self.max_tokens
        self._lock = _fork.register_lock(threading.Lock())

    @property
    def tokens(self) -> float:
        """The tokens left now."""
        return self._tokens

    def try_spend(self) -> bool:
        """Take a token for one hedge, if more than half remain; return whether it was taken."""
        with self._lock:
            if self._tokens * 2 <= self.max_tokens:
                return False
            self._tokens -= 1
            return True

    def succeeded(self) -> None:
        """A call succeeded: give back ``token_ratio``."""
        with self._lock:
            self._tokens = min(self.max_tokens, self._tokens + self.token_ratio)

    def failed(self) -> None:
        """A call failed: take a token."""
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1)

    def spawn(self) -> HedgeBudget:
        """A new, full budget with this one's settings (the httpx transport's per origin)."""
        return HedgeBudget(max_tokens=self.max_tokens, token_ratio=self.token_ratio)

    def __repr__(self) -> str:
        return (
            f"HedgeBudget(max_tokens={self.max_tokens:g}, token_ratio={self.token_ratio:g}; "
            f"{self._tokens:g} left)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration: the tokens are this process's recent traffic.
        config = {"max_tokens": self.max_tokens, "token_ratio": self.token_ratio}
        return (rebuild, (type(self), config))


class AdaptiveDelay:
    """A hedging delay that follows recent latency: a quantile of it, capped.

    >>> delay = AdaptiveDelay(quantile=0.95, max_delay=0.05)

    The delay is the ``quantile`` of the last ``window`` calls' latencies, at least
    ``min_delay`` and at most ``max_delay``. Until ``min_samples`` calls have been
    seen it is ``max_delay``. The quantile is recomputed every ``window // 20``
    samples, so recording a sample costs an append, not a sort.

    What is sampled is the first attempt's latency of each successful call; when a
    hedge won, the first attempt was cancelled, and the sample is how long it had run
    by then (a lower bound of its latency). So the share of calls above the delay,
    the share that hedge, stays near ``1 - quantile``.
    """

    __slots__ = (
        "_count",
        "_current",
        "_lock",
        "_next",
        "_refresh",
        "_samples",
        "max_delay",
        "min_delay",
        "min_samples",
        "quantile",
        "window",
    )

    quantile: float
    max_delay: float
    min_delay: float
    window: int
    min_samples: int

    def __init__(
        self,
        *,
        quantile: float = 0.95,
        max_delay: Duration = 0.05,
        min_delay: Duration = 0.0,
        window: int = 1000,
        min_samples: int = 20,
    ) -> None:
        self.quantile = check_number("quantile", quantile, minimum=0, maximum=1, inclusive=False)
        self.max_delay = to_seconds("max_delay", max_delay, allow_zero=False)
        self.min_delay = to_seconds("min_delay", min_delay)
        if self.min_delay > self.max_delay:
            raise ValueError(
                f"min_delay ({self.min_delay:g} s) must not exceed max_delay ({self.max_delay:g} s)"
            )
        self.window = check_int("window", window, minimum=20)
        self.min_samples = check_int("min_samples", min_samples, minimum=1)
        if self.min_samples > self.window:
            raise ValueError(
                f"min_samples ({min_samples}) must not exceed window ({window}): the "
                "window could never hold that many"
            )
        self._samples: list[float] = []
        self._next = 0  # where the next sample goes once the window is full
        self._count = 0
        self._refresh = max(1, self.window // 20)
        self._current = self.max_delay
        self._lock = _fork.register_lock(threading.Lock())

    def current(self) -> float:
        """The delay now, in seconds."""
        return self._current

    def record(self, seconds: float) -> None:
        """Record one call's first-attempt latency."""
        with self._lock:
            samples = self._samples
            if len(samples) < self.window:
                samples.append(seconds)
            else:
                samples[self._next] = seconds
                self._next = (self._next + 1) % self.window
            self._count += 1
            if len(samples) < self.min_samples or self._count % self._refresh:
                return
            ordered = sorted(samples)
        # Nearest rank: the smallest sample with at least `quantile` of them at or below it.
        rank = max(0, math.ceil(self.quantile * len(ordered)) - 1)
        self._current = min(self.max_delay, max(self.min_delay, ordered[rank]))

    def spawn(self) -> AdaptiveDelay:
        """A new delay with these settings and no samples (the httpx transport's per origin)."""
        return rebuild(type(self), self._config())

    def _config(self) -> dict[str, Any]:
        return {
            "quantile": self.quantile,
            "max_delay": self.max_delay,
            "min_delay": self.min_delay,
            "window": self.window,
            "min_samples": self.min_samples,
        }

    def __repr__(self) -> str:
        return (
            f"AdaptiveDelay(quantile={self.quantile:g}, max_delay={self.max_delay:g}, "
            f"min_delay={self.min_delay:g}, window={self.window}; now {self._current:g} s)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (type(self), self._config()))  # as its settings: no samples


HedgeFilter = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
Discard = Callable[[Any], Awaitable[None]]


class Hedge(_driver.Configured):
    """Send another attempt when the one in flight is slow; the first success wins.

    >>> hedge = Hedge(delay=0.02, max_attempts=3)
    >>> @hedge
    ... async def lookup(key: str) -> str: ...

    * ``delay``: how long an attempt may run before the next starts: seconds (a
      number or ``timedelta``) or an :class:`AdaptiveDelay` (the default: the 95th
      percentile of recent calls, at most 50 ms).
    * ``max_attempts``: attempts a call makes at most, the first included (2 to 5),
      whether they were hedges after the delay or followed a non-fatal failure.
    * ``on``: which failures of an attempt are non-fatal: the next attempt starts at
      once, and the call fails only when every attempt did. Exception types or a
      predicate; by default every ``Exception`` but programming errors
      (:data:`resilient.errors.PROGRAMMING_ERRORS`). A fatal failure ends the call at
      once and cancels the other attempts. A local refusal (an open breaker refusing
      a hedge) starts no more hedges; the attempts in flight go on.
    * ``budget``: a :class:`HedgeBudget` (by default a fresh one per ``Hedge``), or
      ``None`` for hedging without a budget.
    * ``discard``: an async function awaited with each result that lost (two
      attempts answered at once, or a loser that finished as it was cancelled) and
      each failure a later one replaced, so results holding resources (an HTTP
      response) are released; the winner's result and the failure raised are the
      caller's. Each discard runs to its end, even when the caller is cancelled or
      its deadline fires meanwhile; what a discard raises goes to the event loop's
      exception handler, never in place of the call's outcome. By default the
      results are dropped.
    * ``clock``: monotonic seconds, injectable for tests.

    Use it in ``Policy(hedge=...)`` (instead of ``retry=``: a hedged call has its
    second attempts already), over an async function as ``@hedge``, or with
    ``await hedge.acall(fn, ...)``. Each attempt is the function call with the
    policy's breaker and ``attempt_timeout`` around it, so an open breaker stops
    hedges too and each attempt has its own timeout. A call whose every attempt
    failed raises the last failure, with a note saying how many attempts were made.
    """

    __slots__ = ("_accepts", "budget", "clock", "delay", "discard", "max_attempts", "on")

    delay: float | AdaptiveDelay
    max_attempts: int
    on: HedgeFilter
    budget: HedgeBudget | None
    discard: Discard | None
    clock: Callable[[], float]
    _accepts: Callable[[Exception], bool]

    def __init__(
        self,
        *,
        delay: Duration | AdaptiveDelay | Default = DEFAULT,
        max_attempts: int = 2,
        on: HedgeFilter | Default = DEFAULT,
        budget: HedgeBudget | Default | None = DEFAULT,
        discard: Discard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(delay, Default):
            delay = AdaptiveDelay()
        elif not isinstance(delay, AdaptiveDelay):
            delay = to_seconds("delay", delay)
        check_int("max_attempts", max_attempts, minimum=2)
        if max_attempts > MAX_ATTEMPTS:
            raise ValueError(
                f"max_attempts must be at most {MAX_ATTEMPTS} (gRPC's cap: more attempts in "
                f"flight add load without cutting the tail further), got {max_attempts}"
            )
        accepts = _filter(on)
        if isinstance(budget, Default):
            budget = HedgeBudget()
        elif budget is not None and not isinstance(budget, HedgeBudget):
            raise TypeError(f"budget must be a resilient.HedgeBudget or None, got {budget!r}")
        if discard is not None and not _driver.is_async(discard):
            raise TypeError(
                f"discard must be an async function taking the lost result, got {discard!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        setattr_ = object.__setattr__
        setattr_(self, "delay", delay)
        setattr_(self, "max_attempts", max_attempts)
        setattr_(self, "on", Exception if isinstance(on, Default) else on)
        setattr_(self, "budget", budget)
        setattr_(self, "discard", discard)
        setattr_(self, "clock", clock)
        setattr_(self, "_accepts", accepts)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Hedge is immutable; build a new one instead of setting {name!r}")

    def __repr__(self) -> str:
        delay = self.delay if isinstance(self.delay, AdaptiveDelay) else f"{self.delay:g}"
        parts = [f"delay={delay}", f"max_attempts={self.max_attempts}"]
        if self.on is not Exception:
            parts.append(f"on={describe(self.on)}")
        parts.append(f"budget={self.budget!r}")
        return f"Hedge({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        config = {
            "delay": self.delay,
            "max_attempts": self.max_attempts,
            "on": self.on,
            "budget": self.budget,
            "discard": self.discard,
            "clock": self.clock,
        }
        return (rebuild, (type(self), config))

    # Decorating -----------------------------------------------------------------------

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Decorate async ``fn`` so that each call is hedged; a sync ``fn`` is refused."""
        refuse_sync(fn)
        return cast("Callable[P, Awaitable[R]]", _driver.wrap(fn, "Hedge", self._driver))

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await async ``fn(*args, **kwargs)``, hedged."""
        refuse_sync(fn)
        return cast(R, await self.wrap(fn)(*args, **kwargs))

    def _driver(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        return self.wrap(fn)  # __call__ refused a sync fn already

    # The hedged call -------------------------------------------------------------------

    def accepts(self, error: Exception) -> bool:
        """Whether ``on`` takes ``error`` as non-fatal: the next attempt may answer."""
        return self._accepts(error)

    def wrap(
        self, attempt: Callable[..., Awaitable[Any]], *, listener: HedgeListener | None = None
    ) -> Callable[..., Awaitable[Any]]:
        """An async function that runs ``attempt(*args, **kwargs)`` hedged.

        ``listener`` hears each hedge sent and which attempt won.
        """
        discard = self.discard

        async def hedged(*args: Any, **kwargs: Any) -> Any:
            return await self._run(attempt, args, kwargs, listener, discard)

        return hedged

    async def _run(
        self,
        attempt: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        listener: HedgeListener | None,
        discard: Discard | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        clock = self.clock
        budget = self.budget
        adaptive = self.delay if isinstance(self.delay, AdaptiveDelay) else None
        delay = adaptive.current() if adaptive is not None else cast(float, self.delay)
        started = clock()
        tasks: list[asyncio.Task[Any]] = []
        pending: set[asyncio.Task[Any]] = set()
        failure: BaseException | None = None
        failed: asyncio.Task[Any] | None = None  # the attempt whose failure is `failure`
        # The attempts whose outcome went to the caller or to discard already: the
        # finally block hands every other attempt's outcome to discard.
        consumed: set[asyncio.Task[Any]] = set()
        may_hedge = True
        answered: asyncio.Task[Any] | None = None  # the winner, once the call has one

        def launch() -> None:
            task = loop.create_task(_awaited(attempt, args, kwargs))
            tasks.append(task)
            pending.add(task)

        def may_launch() -> bool:
            """Whether another attempt may start now (taking a budget token if so)."""
            nonlocal may_hedge
            if len(tasks) >= self.max_attempts or (budget is not None and not budget.try_spend()):
                may_hedge = False
            return may_hedge

        def hedge() -> None:
            launch()
            if listener is not None:
                listener.hedged(len(tasks), clock() - started)

        launch()
        next_at = started + delay
        try:
            while pending:
                timeout = max(0.0, next_at - clock()) if may_hedge else None
                done, _ = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if may_launch():
                        hedge()
                        next_at = clock() + delay
                    continue
                pending.difference_update(done)
                finished = [task for task in tasks if task in done]
                winners = [
                    task for task in finished if not task.cancelled() and not task.exception()
                ]
                if winners:
                    winner = winners[0]
                    consumed.add(winner)  # the others finished go to discard (finally)
                    # The first attempt's latency, or how long it had run when a hedge
                    # won (a lower bound); a first attempt that failed says nothing.
                    if adaptive is not None and (winner is tasks[0] or tasks[0] in pending):
                        adaptive.record(clock() - started)
                    if budget is not None:
                        budget.succeeded()
                    answered = winner
                    if listener is not None:
                        listener.won(tasks.index(winner) + 1, len(tasks))
                    return winner.result()
                for task in finished:
                    if task.cancelled():
                        # Nobody but this function cancels an attempt: the attempt
                        # cancelled itself, which is an interruption, not a failure.
                        raise asyncio.CancelledError(
                            f"hedged attempt {tasks.index(task) + 1} was cancelled"
                        )
                    error = cast(BaseException, task.exception())
                    if not isinstance(error, Exception) or not self._accepts(error):
                        consumed.add(task)
                        raise error
                    if failed is not None and failed not in consumed:
                        consumed.add(failed)
                        if discard is not None:
                            await _discard_now(loop, failed, discard)
                    failure, failed = error, task
                    if _refusal(error):
                        may_hedge = False
                    elif may_hedge and may_launch():
                        # The attempt started now will replace this failure with its own
                        # outcome: release it first (an HTTP response gives its
                        # connection back to the pool, which the next attempt may need).
                        consumed.add(task)
                        if discard is not None:
                            await _discard_now(loop, task, discard)
                        hedge()
                        next_at = clock() + delay
            assert failure is not None
            assert failed is not None
            consumed.add(failed)
            raise failure
        except BaseException as error:
            if (
                answered is None
                and budget is not None
                and isinstance(error, Exception)
                and self._accepts(error)
            ):
                budget.failed()
            if error is failure:
                failure.add_note(
                    f"{GAVE_UP}{len(tasks)} hedged attempt(s) (max_attempts="
                    f"{self.max_attempts}): each failed; this is the last failure"
                )
            raise
        finally:
            failure = None
            if len(consumed) < len(tasks):
                for task in pending:
                    task.cancel()
                left = [task for task in tasks if task not in consumed]
                # Wait for the losers to unwind (close their connections) and hand what
                # they and the attempts that lost or failed left behind to discard; the
                # caller already has an answer or an error. Shielded: a caller cancelled
                # (again) meanwhile leaves at once, and the clean-up still ends.
                cleanup = _release_later(loop, left, discard)
                try:
                    await asyncio.shield(cleanup)
                except asyncio.CancelledError:
                    if answered is not None:  # the winner's result will reach nobody now
                        won = [answered]
                        cleanup.add_done_callback(lambda _: _release_later(loop, won, discard))
                    raise


# Clean-ups running on after their caller was cancelled: a strong reference each.
_CLEANUPS: set[asyncio.Task[None]] = set()


async def _clean_up(left: list[asyncio.Task[Any]], discard: Discard | None) -> None:
    """Wait for the attempts ``left`` to end, then hand each one's outcome to ``discard``.

    A failing discard does not stop the others; what it raised goes to the event
    loop's exception handler, as the caller has its own answer already.
    """
    unfinished = [task for task in left if not task.done()]
    if unfinished:
        await asyncio.wait(unfinished)
    for task in left:
        if task.cancelled():
            continue
        outcome = _outcome(task)  # retrieves a failure, so asyncio never logs it as lost
        if discard is None:
            continue
        try:
            await discard(outcome)
        except Exception as error:
            # No "task": the loop would run a custom handler in this task's context, which
            # is entered already (Python 3.13.0 then fails with a RuntimeError of its own).
            asyncio.get_running_loop().call_exception_handler(
                {
                    "message": f"resilient.Hedge: discard={discard!r} raised on {outcome!r}",
                    "exception": error,
                }
            )


def _release_later(
    loop: asyncio.AbstractEventLoop, left: list[asyncio.Task[Any]], discard: Discard | None
) -> asyncio.Task[None]:
    """Run :func:`_clean_up` as a task of its own, which outlives a cancelled caller."""
    cleanup = loop.create_task(_clean_up(left, discard))
    _CLEANUPS.add(cleanup)
    cleanup.add_done_callback(_CLEANUPS.discard)
    return cleanup


async def _discard_now(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], discard: Discard
) -> None:
    """Hand a finished attempt's outcome to ``discard`` and wait; cancelled meanwhile (the
    deadline), the caller leaves and the discard still ends, as in the clean-up."""
    await asyncio.shield(_release_later(loop, [task], discard))


async def _awaited(
    attempt: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return await attempt(*args, **kwargs)


def _outcome(task: asyncio.Task[Any]) -> Any:
    """What a finished, not cancelled, task produced: its result or its exception."""
    error = task.exception()
    return task.result() if error is None else error


def _refusal(error: Exception) -> bool:
    """A local stage refused the attempt (an open breaker): send no more hedges.

    An attempt that overran its ``attempt_timeout`` is no refusal: it failed, and
    the next attempt may answer in time.
    """
    return (
        isinstance(error, ResilientError)
        and error.refusal
        and not error.remote
        and not isinstance(error, DeadlineExceeded)
    )


def _filter(on: object) -> Callable[[Exception], bool]:
    if isinstance(on, Default):
        return lambda error: not isinstance(error, PROGRAMMING_ERRORS)
    types = exception_types("on", on)
    if types is None:
        predicate = cast("Callable[[Exception], bool]", on)
        return lambda error: bool(predicate(error))
    for item in types:
        if not issubclass(item, Exception):
            raise TypeError(
                "on must be an exception type, Exception or a subclass of it (a cancellation "
                f"or an interrupt always ends the call), got the class {item!r}"
            )
    return lambda error: isinstance(error, types)


def refuse_sync(fn: Callable[..., Any]) -> None:
    """Raise the ``TypeError`` for a sync function given a hedge."""
    if not _driver.is_async(getattr(fn, "__func__", fn)):
        raise TypeError(
            f"a Hedge needs an async function, got {getattr(fn, '__qualname__', fn)!r}: a "
            "sync attempt "
            "cannot be cancelled, so the losing attempts would run on in threads after "
            "the caller had its answer; use retry= and attempt_timeout= for sync code"
        )
