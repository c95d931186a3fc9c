"""``Policy``: bulkhead, deadline, retry, breaker and attempt timeout fused into one wrapper.

The stages always apply in this order, outermost first::

    bulkhead → total deadline (timeout) → retry → breaker → attempt deadline → call

Any subset may be given. The stages are not a stack of nested decorators: one
driver loop runs them, consulting each stage's decision core (see
:mod:`resilient.retry` and :mod:`resilient.breaker`), so a healthy call pays for
a few attribute reads and no per-call allocation. There is one driver for sync
functions and one for async functions; they differ only where one sleeps and
the other awaits, and in how an attempt is bounded: a sync attempt gets a
cooperative deadline (sync code cannot be interrupted), an async attempt is
cancelled when its deadline passes.

``Retry`` and ``CircuitBreaker`` used alone as decorators are a ``Policy`` with
one stage.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from resilient import tracing as _tracing
from resilient._config import Duration, to_seconds
from resilient.breaker import CircuitBreaker
from resilient.bulkhead import Bulkhead
from resilient.deadline import _deadline
from resilient.errors import CircuitOpenError, DeadlineExceeded
from resilient.retry import Retry, RetryState, refuse_generators

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["Policy"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_INF = math.inf
_CoroutineType = types.CoroutineType
_monotonic = time.monotonic
# Looked up at call time, so this project's tests can replace them.
_sleep = time.sleep
_async_sleep = asyncio.sleep


class BreakerStage(Protocol):
    """The core protocol a circuit breaker offers the driver (see :mod:`resilient.breaker`)."""

    def _before_call(self) -> object: ...
    def _on_success(self, ticket: object) -> None: ...
    def _on_failure(self, ticket: object, exc: BaseException) -> None: ...
    def _on_abort(self, ticket: object) -> None: ...


class _Canceller:
    """Cancels a task when an async attempt's deadline passes, and remembers that it did."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel(msg="resilient attempt deadline exceeded")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Await the rest of ``coro``, whose first step already ran and yielded ``pending``.

    The driver steps a coroutine once by hand: most healthy async calls that
    finish without suspending never need a cancellation timer, which costs more
    than the rest of the Policy together. Only a coroutine that suspends gets one.
    """
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return cast(T, stop.value)
            continue
        # The task resumes a suspended coroutine with send(None); `yield from` does that.
        return (yield from coro.__await__())


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


class Policy:
    """Resilience stages fused into one wrapper, for sync and async functions.

    >>> policy = Policy(
    ...     bulkhead=Bulkhead(max_concurrent=10),
    ...     timeout=2.0,                  # total budget for the call, retries included
    ...     retry=Retry(attempts=3),
    ...     breaker=CircuitBreaker(failure_threshold=5),
    ...     attempt_timeout=0.5,          # each try, clamped to the total budget
    ... )
    >>> @policy
    ... def fetch(key: str) -> str: ...

    ``breaker`` may also be a ``pybreaker.CircuitBreaker``: its own rules,
    listeners and storage keep working.

    Each call makes an OpenTelemetry span and records metrics (see
    :mod:`resilient.tracing`) when a real provider is configured: globally, at
    any time, or as ``tracer_provider=`` / ``meter_provider=``. The span is named
    ``name``, by default the wrapped function's ``__qualname__``. With nothing
    configured this costs about 30 ns a call; ``tracing=False`` turns it
    off for this Policy.
    """

    __slots__ = (
        "_breaker",
        "_telemetry",
        "attempt_timeout",
        "breaker",
        "bulkhead",
        "name",
        "retry",
        "timeout",
        "tracing",
    )

    def __init__(
        self,
        *,
        bulkhead: Bulkhead | None = None,
        timeout: Duration | None = None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | Any | None = None,
        attempt_timeout: Duration | None = None,
        name: str | None = None,
        tracing: bool = True,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if bulkhead is not None and not isinstance(bulkhead, Bulkhead):
            raise TypeError(f"bulkhead must be a resilient.Bulkhead, got {bulkhead!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a resilient.Retry, got {retry!r}")
        self.bulkhead = bulkhead
        self.timeout = None if timeout is None else to_seconds("timeout", timeout, allow_inf=True)
        self.retry = retry
        self.attempt_timeout = (
            None
            if attempt_timeout is None
            else to_seconds("attempt_timeout", attempt_timeout, allow_zero=False, allow_inf=True)
        )
        if self.timeout == _INF:
            self.timeout = None
        if self.attempt_timeout == _INF:
            self.attempt_timeout = None
        self.breaker = breaker
        self._breaker: BreakerStage | None = _breaker_stage(breaker)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
        if name == "":
            raise ValueError("name must not be empty: it names the Policy's spans and metrics")
        if not isinstance(tracing, bool):
            raise TypeError(f"tracing must be True or False, got {tracing!r}")
        if not tracing and (tracer_provider is not None or meter_provider is not None):
            raise ValueError(
                "tracing=False contradicts the tracer_provider or meter_provider given; "
                "pass one or the other"
            )
        self.name = name
        self.tracing = tracing
        self._telemetry = _tracing.Telemetry(tracer_provider, meter_provider) if tracing else None

    def __repr__(self) -> str:
        stages = [
            f"{name}={value!r}"
            for name in ("bulkhead", "timeout", "retry", "breaker", "attempt_timeout", "name")
            if (value := getattr(self, name)) is not None
        ]
        if not self.tracing:
            stages.append("tracing=False")
        return f"Policy({', '.join(stages)})"

    # Decorating ---------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Wrap ``fn``; the wrapper keeps its name, docstring, signature and sync/async kind."""
        refuse_generators(fn, "Policy")
        if inspect.iscoroutinefunction(fn):
            return cast("Callable[P, R]", functools.wraps(fn)(self._async_driver(fn)))
        return cast("Callable[P, R]", functools.wraps(fn)(self._sync_driver(fn)))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call sync ``fn(*args, **kwargs)`` through the policy, without decorating it."""
        return cast(R, self._sync_driver(fn)(*args, **kwargs))

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await async ``fn(*args, **kwargs)`` through the policy, without decorating it."""
        return cast(R, await self._async_driver(fn)(*args, **kwargs))

    # The drivers ----------------------------------------------------------------------
    #
    # Each driver is a closure over the stages, built once per decorated function:
    # closure cells are cheaper to read than attributes, and the wrapper *is* the
    # driver, so a call pays for one Python frame. The two drivers are the same loop;
    # they differ in sleeping vs awaiting and in how an attempt is bounded. What
    # happens after an attempt (breaker bookkeeping, the retry decision) lives in
    # _after_error and _after_result, shared by both.
    #
    # ``replayed_start`` serves a caller that runs a healthy call's first attempt
    # itself and hands only a failed one to the driver (the httpx transport does):
    # it returns when that call began, on the retry's clock, so elapsed times count
    # from then; ``None`` for a call the driver runs from the start.

    def _sync_driver(
        self, fn: Callable[..., Any], replayed_start: Callable[[], float | None] | None = None
    ) -> Callable[..., Any]:
        bulkhead = self.bulkhead
        retry = self.retry
        breaker = self._breaker
        timeout = self.timeout
        attempt_timeout = self.attempt_timeout
        clock = None if retry is None else retry.clock
        admit = None if retry is None else retry._admit
        shared_clock = clock is _monotonic
        site, explicit, traces, meters = self._call_site(fn)
        bounded = timeout is not None or attempt_timeout is not None

        def run(*args: Any, **kwargs: Any) -> Any:
            call = None
            if site is not None and (
                explicit
                or traces._TRACER_PROVIDER is not None
                or meters._METER_PROVIDER is not None
            ):
                call = site.begin()
            if bulkhead is not None:
                try:
                    bulkhead.acquire()
                except BaseException as exc:
                    if call is not None:
                        call.error = exc
                        call.end()
                    raise
            try:
                outer = total = _deadline.get()
                now = 0.0
                if bounded or total != _INF:
                    now = _monotonic()
                    if timeout is not None and now + timeout < total:
                        total = now + timeout
                if admit is not None:
                    # A healthy call reads the clock once when the retry shares it.
                    started = now if now and shared_clock else clock()  # type: ignore[misc]
                    if replayed_start is not None:
                        replayed = replayed_start()
                        if replayed is not None:
                            started = replayed
                    admit(started)
                state: Any = None
                last_error: Exception | None = None
                while True:
                    token = None
                    if bounded or total != _INF:
                        if state is not None:
                            now = _monotonic()
                        if now >= total:
                            raise _deadline_error(state, last_error, timeout, retry)
                        limit = total
                        if attempt_timeout is not None and now + attempt_timeout < total:
                            limit = now + attempt_timeout
                        if limit < outer:
                            token = _deadline.set(limit)
                    try:
                        ticket = None if breaker is None else breaker._before_call()
                    except CircuitOpenError as rejected:
                        if call is not None:
                            call.rejected(rejected)
                        if last_error is None:
                            raise
                        raise _rejected(rejected, retry, state) from last_error
                    if call is not None:
                        call.attempts += 1
                    try:
                        result = fn(*args, **kwargs)
                    except Exception as exc:
                        if breaker is not None:
                            breaker._on_failure(ticket, exc)
                        if retry is None:
                            raise
                        state, delay = _after_error(retry, state, started, total, exc)
                        if delay is None:
                            raise
                        if call is not None:
                            call.retrying(state.attempt, exc, delay)
                        last_error = exc
                    except BaseException:
                        if breaker is not None:
                            breaker._on_abort(ticket)
                        raise
                    else:
                        if breaker is not None:
                            breaker._on_success(ticket)
                        if retry is None or retry.on_result is None:
                            return result
                        state, delay = _after_result(retry, state, started, total, result)
                        if delay is None:
                            return result
                        if call is not None:
                            call.retrying(state.attempt, None, delay)
                        last_error = None
                    finally:
                        if token is not None:
                            _deadline.reset(token)
                    if delay > 0.0:
                        _sleep(delay)
            except BaseException as exc:
                if call is not None:
                    call.error = exc
                raise
            finally:
                if bulkhead is not None:
                    bulkhead.release()
                if call is not None:
                    call.end()

        return run

    def _async_driver(
        self,
        fn: Callable[..., Awaitable[Any]],
        replayed_start: Callable[[], float | None] | None = None,
    ) -> Callable[..., Awaitable[Any]]:
        bulkhead = self.bulkhead
        retry = self.retry
        breaker = self._breaker
        timeout = self.timeout
        attempt_timeout = self.attempt_timeout
        clock = None if retry is None else retry.clock
        admit = None if retry is None else retry._admit
        shared_clock = clock is _monotonic
        site, explicit, traces, meters = self._call_site(fn)
        # Only the policy's own limits need a cancellation timer: an enclosing
        # `async with deadline()` scope cancels the work itself.
        bounded = timeout is not None or attempt_timeout is not None

        async def run(*args: Any, **kwargs: Any) -> Any:
            call = None
            if site is not None and (
                explicit
                or traces._TRACER_PROVIDER is not None
                or meters._METER_PROVIDER is not None
            ):
                call = site.begin()
            if bulkhead is not None and not bulkhead.try_acquire():
                try:
                    await bulkhead.acquire_async()
                except BaseException as exc:
                    if call is not None:
                        call.error = exc
                        call.end()
                    raise
            try:
                outer = total = _deadline.get()
                now = 0.0
                if bounded or total != _INF:
                    now = _monotonic()
                    if timeout is not None and now + timeout < total:
                        total = now + timeout
                if admit is not None:
                    # A healthy call reads the clock once when the retry shares it.
                    started = now if now and shared_clock else clock()  # type: ignore[misc]
                    if replayed_start is not None:
                        replayed = replayed_start()
                        if replayed is not None:
                            started = replayed
                    admit(started)
                state: Any = None
                last_error: Exception | None = None
                while True:
                    token = None
                    limit = total
                    if bounded or total != _INF:
                        if state is not None:
                            now = _monotonic()
                        if now >= total:
                            raise _deadline_error(state, last_error, timeout, retry)
                        if attempt_timeout is not None and now + attempt_timeout < total:
                            limit = now + attempt_timeout
                        if limit < outer:
                            token = _deadline.set(limit)
                    try:
                        ticket = None if breaker is None else breaker._before_call()
                    except CircuitOpenError as rejected:
                        if call is not None:
                            call.rejected(rejected)
                        if last_error is None:
                            raise
                        raise _rejected(rejected, retry, state) from last_error
                    if call is not None:
                        call.attempts += 1
                    try:
                        awaitable = fn(*args, **kwargs)
                        if bounded:
                            # Step the coroutine once by hand: one that finishes without
                            # suspending (a cache hit, say) never needs the cancellation
                            # timer, which costs more than the rest of the Policy together.
                            if type(awaitable) is not _CoroutineType:
                                awaitable = _as_coroutine(awaitable)
                            try:
                                pending = awaitable.send(None)
                            except StopIteration as stop:
                                result = stop.value
                            else:
                                result = await _timed_rest(
                                    awaitable,
                                    pending,
                                    limit,
                                    attempt_timeout,
                                    total,
                                )
                        else:
                            result = await awaitable
                    except Exception as exc:
                        if breaker is not None:
                            breaker._on_failure(ticket, exc)
                        if retry is None:
                            raise
                        state, delay = _after_error(retry, state, started, total, exc)
                        if delay is None:
                            raise
                        if call is not None:
                            call.retrying(state.attempt, exc, delay)
                        last_error = exc
                    except BaseException:
                        if breaker is not None:
                            breaker._on_abort(ticket)
                        raise
                    else:
                        if breaker is not None:
                            breaker._on_success(ticket)
                        if retry is None or retry.on_result is None:
                            return result
                        state, delay = _after_result(retry, state, started, total, result)
                        if delay is None:
                            return result
                        if call is not None:
                            call.retrying(state.attempt, None, delay)
                        last_error = None
                    finally:
                        if token is not None:
                            _deadline.reset(token)
                    if delay > 0.0:
                        await _async_sleep(delay)
            except BaseException as exc:
                if call is not None:
                    call.error = exc
                raise
            finally:
                if bulkhead is not None:
                    bulkhead.release()
                if call is not None:
                    call.end()

        return run

    def _call_site(self, fn: Callable[..., Any]) -> tuple[_tracing.CallSite | None, bool, Any, Any]:
        """``(site, explicit, traces, meters)``: what a driver needs to record calls of ``fn``.

        A call asks ``site`` for a recorder when a provider was given (``explicit``)
        or ``traces._TRACER_PROVIDER`` or ``meters._METER_PROVIDER`` is not ``None``
        (see :func:`resilient.tracing.provider_globals`); ``site`` is ``None`` with
        ``tracing=False``.
        """
        telemetry = self._telemetry
        if telemetry is None:
            return None, False, None, None
        name = self.name or str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
        traces, meters = _tracing.provider_globals()
        site = _tracing.CallSite(name, telemetry, self.timeout)
        return site, telemetry.explicit, traces, meters


@types.coroutine
def _timed_rest(
    coro: Coroutine[Any, Any, T],
    pending: Any,
    limit: float,
    attempt_timeout: float | None,
    total: float,
) -> Generator[Any, Any, T]:
    """Finish a suspended attempt, cancelling it when ``limit`` passes."""
    task = asyncio.current_task()
    assert task is not None
    loop = task.get_loop()
    canceller = _Canceller(task)
    cancelling = task.cancelling()
    handle = loop.call_at(loop.time() + (limit - _monotonic()), canceller)
    try:
        return (yield from _resume(coro, pending))
    except asyncio.CancelledError:
        # Ours became a timeout; a cancellation from outside keeps propagating.
        if canceller.fired and task.uncancel() <= cancelling:
            if limit < total:
                raise DeadlineExceeded(
                    f"the attempt took longer than attempt_timeout={attempt_timeout:g} s "
                    "and was cancelled"
                ) from None
            raise DeadlineExceeded(
                "the call's deadline passed while an attempt was running; it was cancelled"
            ) from None
        raise
    finally:
        handle.cancel()
        if canceller.fired and task.cancelling() > cancelling:
            # The timer fired but the coroutine swallowed the cancellation and returned.
            task.uncancel()


def _after_error(
    retry: Retry, state: RetryState | None, started: float, total: float, exc: Exception
) -> tuple[RetryState, float | None]:
    """Decide on a failed attempt: the wait before the next one, or ``None`` to give up."""
    if state is None:
        state = retry._new_state(started)
    now = retry.clock()
    delay = retry._next_delay(state, now=now, deadline=_on_clock(now, total), exc=exc)
    if delay is None:
        retry._give_up(state, exc)
    return state, delay


def _after_result(
    retry: Retry, state: RetryState | None, started: float, total: float, result: Any
) -> tuple[RetryState, float | None]:
    """Decide on a returned value: the wait before retrying it, or ``None`` to return it."""
    if state is None:
        state = retry._new_state(started)
    now = retry.clock()
    return state, retry._next_delay(state, now=now, deadline=_on_clock(now, total), result=result)


def _on_clock(now: float, total: float) -> float:
    """Express the monotonic deadline ``total`` on the retry's own (injectable) clock."""
    return _INF if total == _INF else now + (total - _monotonic())


def _deadline_error(
    state: Any, last_error: Exception | None, timeout: float | None, retry: Retry | None
) -> Exception:
    """What to raise when the deadline has passed before the next attempt could start."""
    if last_error is not None and retry is not None:
        # Retries ran out of time: the caller gets the last original error, annotated.
        retry._give_up(state, last_error)
        return last_error
    if timeout is not None:
        message = f"the call's timeout of {timeout:g} s passed before an attempt could start"
    else:
        message = "the deadline passed before an attempt could start"
    return DeadlineExceeded(message)


def _rejected(rejected: CircuitOpenError, retry: Retry | None, state: Any) -> CircuitOpenError:
    """An open breaker ends the retries at once; say so on its error."""
    if retry is not None and state is not None:
        state.stop_reason = "circuit open"
        retry._give_up(state, rejected)
    return rejected


def _breaker_stage(breaker: object) -> BreakerStage | None:
    if breaker is None:
        return None
    if isinstance(breaker, CircuitBreaker):
        return breaker
    import pybreaker

    if isinstance(breaker, pybreaker.CircuitBreaker):
        from resilient._pybreaker import PyBreakerStage

        return PyBreakerStage(breaker)
    raise TypeError(
        f"breaker must be a resilient.CircuitBreaker or a pybreaker.CircuitBreaker, got {breaker!r}"
    )
