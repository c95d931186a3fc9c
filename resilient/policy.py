"""``Policy``: admission, deadline, retry, gate and attempt timeout fused into one wrapper.

The stages always apply in this order, outermost first::

    fallback → rate limit → bulkhead → total deadline (timeout) → retry | hedge
             → breaker → attempt deadline → chaos → call

Any subset may be given. The fallback (:class:`~resilient.Fallback`) wraps the rest
and answers for the failures it is for. The stages are not a stack of nested decorators: one
driver (:mod:`resilient._driver`) runs them through the stage contract of
:mod:`resilient.stages`, so a healthy call pays for a few attribute reads and no
per-call allocation, and a stage you write yourself plugs in like the built-in
ones. A sync attempt gets a cooperative deadline (sync code cannot be
interrupted); an async attempt is cancelled when its deadline passes.

A ``Policy`` is immutable: functions it decorated keep exactly the stages they
were decorated with. ``Retry``, ``CircuitBreaker`` and ``Bulkhead``-free
one-stage wrappers (``@Retry(...)``, ``@breaker``) use the same driver.
"""

from __future__ import annotations

import contextvars
import math
import pickle
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar, cast

from resilient import _driver
from resilient import fallback as _fallback
from resilient import hedge as _hedge
from resilient import tracing as _tracing
from resilient._config import Duration, rebuild, to_seconds
from resilient.stages import Admission, CallObserver, Gate, Injector, MeasuredAdmission, Retrier

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["Policy"]

P = ParamSpec("P")
R = TypeVar("R")

_INF = math.inf


class Policy(_driver.Configured):
    """Resilience stages fused into one wrapper, for sync and async functions.

    >>> policy = Policy(
    ...     rate_limit=RateLimiter(rate=100),   # at most 100 calls a second
    ...     bulkhead=Bulkhead(max_concurrent=10),
    ...     timeout=2.0,                  # total budget for the call, retries included
    ...     retry=Retry(attempts=3),
    ...     breaker=CircuitBreaker(failure_threshold=5),
    ...     attempt_timeout=0.5,          # each try, clamped to the total budget
    ... )
    >>> @policy
    ... def fetch(key: str) -> str: ...

    Each stage may be the built-in one or any object that implements its protocol
    in :mod:`resilient.stages`: ``rate_limit`` and ``bulkhead`` each an
    :class:`~resilient.stages.Admission`,
    ``retry`` a :class:`~resilient.stages.Retrier`, ``breaker`` a
    :class:`~resilient.stages.Gate` (or a ``pybreaker.CircuitBreaker``, whose own
    rules, listeners and storage keep working). ``timeout`` bounds the whole call,
    the wait for a bulkhead slot included; ``attempt_timeout`` each attempt.
    ``hedge`` (a :class:`~resilient.Hedge`, async functions only) takes the place of
    ``retry``: a slow attempt gets a second one beside it, each through the breaker
    and its own ``attempt_timeout``, all within ``timeout``. Giving a Policy a hedge
    declares the function idempotent: two attempts may both reach the dependency.
    ``chaos`` is a list of :class:`~resilient.stages.Injector` stages (the fault
    injectors of :mod:`resilient.chaos`), innermost, first in the list outermost:
    every attempt passes through them, so the outer stages see their faults.

    ``rate_limit`` (a :class:`~resilient.RateLimiter`) is asked before the bulkhead,
    so a call it refuses never takes a bulkhead slot. A call it admitted that the
    bulkhead then refuses (``BulkheadFull``, or a deadline while waiting for a slot)
    has still spent its admission: a rate limit counts calls that tried to start, and
    giving a GCRA admission back would let a refused flood through the limit.
    ``timeout`` bounds a ``wait=True`` limiter's wait as well.

    Each call makes an OpenTelemetry span and records metrics (see
    :mod:`resilient.tracing`) when a real provider is configured: globally, at
    any time, or as ``tracer_provider=`` / ``meter_provider=``. The span is named
    ``name``, by default the wrapped function's ``__qualname__``. With nothing
    configured this costs about 30 ns a call; ``tracing=False`` turns it
    off for this Policy.

    A Policy is immutable after construction; build another to change a stage.
    It pickles as its configuration: its stages pickle as theirs, so the copy has
    fresh budgets and closed breakers. ``tracer_provider`` and ``meter_provider``,
    which belong to one process, usually do not pickle: configure the other
    process's global providers instead.
    """

    __slots__ = (
        "_drivers",
        "_gate",
        "_telemetry",
        "attempt_timeout",
        "breaker",
        "bulkhead",
        "chaos",
        "fallback",
        "hedge",
        "name",
        "rate_limit",
        "retry",
        "timeout",
        "tracing",
    )

    fallback: _fallback.Fallback | None
    rate_limit: Admission | None
    bulkhead: Admission | None
    timeout: float | None
    retry: Retrier | None
    hedge: _hedge.Hedge | None
    breaker: Gate | Any | None
    attempt_timeout: float | None
    chaos: tuple[Injector, ...]
    name: str | None
    tracing: bool
    _gate: Gate | None
    _telemetry: _tracing.Telemetry | None
    _drivers: _driver.DriverCache

    def __init__(
        self,
        *,
        fallback: _fallback.Fallback | None = None,
        rate_limit: Admission | None = None,
        bulkhead: Admission | None = None,
        timeout: Duration | None = None,
        retry: Retrier | None = None,
        hedge: _hedge.Hedge | None = None,
        breaker: Gate | Any | None = None,
        attempt_timeout: Duration | None = None,
        chaos: Iterable[Injector] | None = None,
        name: str | None = None,
        tracing: bool = True,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if fallback is not None and not isinstance(fallback, _fallback.Fallback):
            raise TypeError(f"fallback must be a resilient.Fallback, got {fallback!r}")
        if rate_limit is not None and not isinstance(rate_limit, Admission):
            raise TypeError(
                "rate_limit must be a resilient.RateLimiter or an Admission stage "
                f"(try_acquire, acquire, acquire_async, release), got {rate_limit!r}"
            )
        if bulkhead is not None and not isinstance(bulkhead, Admission):
            raise TypeError(
                "bulkhead must be a resilient.Bulkhead or an Admission stage (try_acquire, "
                f"acquire, acquire_async, release), got {bulkhead!r}"
            )
        if retry is not None and not isinstance(retry, Retrier):
            raise TypeError(
                "retry must be a resilient.Retry or a Retrier stage (clock, judges_results, "
                f"count_call, begin, next_delay, give_up), got {retry!r}"
            )
        if hedge is not None and not isinstance(hedge, _hedge.Hedge):
            raise TypeError(f"hedge must be a resilient.Hedge, got {hedge!r}")
        if hedge is not None and retry is not None:
            raise ValueError(
                "give a Policy retry= or hedge=, not both: a hedge already makes the second "
                "attempts (a non-fatal failure starts the next one at once), as in gRPC, "
                "where a method has a retry policy or a hedging policy"
            )
        injectors = _injectors(chaos)
        total = _time_limit("timeout", timeout, "a call")
        per_attempt = _time_limit("attempt_timeout", attempt_timeout, "an attempt")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
        if name is not None and not name.strip():
            raise ValueError(
                f"name must not be empty or blank, got {name!r}: it names the Policy's "
                "spans and metrics; pass None to use the function's name"
            )
        if not isinstance(tracing, bool):
            raise TypeError(f"tracing must be True or False, got {tracing!r}")
        if not tracing and (tracer_provider is not None or meter_provider is not None):
            raise ValueError(
                "tracing=False contradicts the tracer_provider or meter_provider given; "
                "pass one or the other"
            )
        setattr_ = object.__setattr__
        setattr_(self, "fallback", fallback)
        setattr_(self, "rate_limit", rate_limit)
        setattr_(self, "bulkhead", bulkhead)
        setattr_(self, "timeout", total)
        setattr_(self, "retry", retry)
        setattr_(self, "hedge", hedge)
        setattr_(self, "breaker", breaker)
        setattr_(self, "attempt_timeout", per_attempt)
        setattr_(self, "chaos", injectors)
        setattr_(self, "name", name)
        setattr_(self, "tracing", tracing)
        setattr_(self, "_gate", _as_gate(breaker))
        telemetry = _tracing.Telemetry(tracer_provider, meter_provider) if tracing else None
        setattr_(self, "_telemetry", telemetry)
        setattr_(self, "_drivers", {})

    @property
    def telemetry(self) -> _tracing.Telemetry | None:
        """The providers this policy records to (``None`` with ``tracing=False``)."""
        return self._telemetry

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(
            f"a Policy is immutable (functions it decorated keep their stages); "
            f"build a new Policy instead of setting {name!r}"
        )

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"a Policy is immutable; cannot delete {name!r}")

    def __repr__(self) -> str:
        stages = [
            f"{name}={value!r}"
            for name in (
                "fallback",
                "rate_limit",
                "bulkhead",
                "timeout",
                "retry",
                "hedge",
                "breaker",
                "attempt_timeout",
                "chaos",
                "name",
            )
            if (value := getattr(self, name)) is not None and value != ()
        ]
        if not self.tracing:
            stages.append("tracing=False")
        return f"Policy({', '.join(stages)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration (the default would set attributes on an immutable object).
        config: dict[str, Any] = {
            "fallback": self.fallback,
            "rate_limit": self.rate_limit,
            "bulkhead": self.bulkhead,
            "timeout": self.timeout,
            "retry": self.retry,
            "hedge": self.hedge,
            "breaker": self.breaker,
            "attempt_timeout": self.attempt_timeout,
            "chaos": self.chaos,
            "name": self.name,
            "tracing": self.tracing,
        }
        telemetry = self._telemetry
        if telemetry is not None:
            for parameter in ("tracer_provider", "meter_provider"):
                provider = getattr(telemetry, parameter)
                if provider is None:
                    continue
                # Pickle's own error would only name a lock deep inside the provider.
                try:
                    pickle.dumps(provider)
                except Exception as exc:
                    raise pickle.PicklingError(
                        f"this Policy cannot be pickled: its {parameter} {provider!r} is not "
                        "picklable (providers belong to one process); leave it out and set "
                        "the global provider in the process that unpickles the Policy"
                    ) from exc
                config[parameter] = provider
        return (rebuild, (type(self), config))

    # Decorating ---------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Wrap ``fn``; the wrapper keeps its name, docstring, signature and sync/async kind.

        Over a ``staticmethod`` or ``classmethod`` it returns one of the same kind.
        """
        return cast("Callable[P, R]", _driver.wrap(fn, "Policy", self.driver))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call sync ``fn(*args, **kwargs)`` through the policy, without decorating it."""
        return cast(R, self._cached(fn, False)(*args, **kwargs))

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await async ``fn(*args, **kwargs)`` through the policy, without decorating it."""
        return cast(R, await self._cached(fn, True)(*args, **kwargs))

    def _cached(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        return _driver.cached(self._drivers, fn, asynchronous, "Policy", self.driver)

    def driver(
        self,
        fn: Callable[..., Any],
        asynchronous: bool,
        *,
        observer: CallObserver | None = None,
    ) -> Callable[..., Any]:
        """The bare driver running ``fn`` through this policy's stages (no metadata copied).

        ``asynchronous`` picks the driver that awaits ``fn``. ``observer`` replaces
        this policy's own (its tracing) for a caller that keeps its own record of
        each call: the httpx transport hands each request's in as an argument.
        """
        if self.hedge is not None:
            return self._outermost(self._hedged(fn, asynchronous, observer), fn, asynchronous)
        built = _driver.build(
            self._injected(fn, asynchronous),
            asynchronous=asynchronous,
            admission=_admission(self.rate_limit, self.bulkhead),
            timeout=self.timeout,
            retrier=self.retry,
            gate=self._gate,
            attempt_timeout=self.attempt_timeout,
            observer=self._observer(fn) if observer is None else observer,
        )
        return self._outermost(built, fn, asynchronous)

    def _hedged(
        self, fn: Callable[..., Any], asynchronous: bool, observer: CallObserver | None
    ) -> Callable[..., Any]:
        """Two drivers around the hedge: each attempt's stages inside, the call's outside."""
        hedge = self.hedge
        assert hedge is not None
        if not asynchronous:
            _hedge.refuse_sync(fn)
        attempt = _driver.build(
            self._injected(fn, True),
            asynchronous=True,
            gate=self._gate,
            attempt_timeout=self.attempt_timeout,
        )
        listener = None
        site = None
        if self._telemetry is not None:
            name = _name_of(self, fn)
            if observer is None:  # this policy's own record: it counts the hedges too
                site = _tracing.HedgedCallSite(name, self._telemetry, self.timeout)
            listener = _tracing.HedgeEvents(name, self._telemetry, site=site)
        return _driver.build(
            hedge.wrap(attempt, listener=listener),
            asynchronous=True,
            admission=_admission(self.rate_limit, self.bulkhead),
            timeout=self.timeout,
            observer=site if observer is None else observer,
        )

    def resume(
        self,
        fn: Callable[..., Any],
        asynchronous: bool,
        *,
        observer: CallObserver | None = None,
    ) -> Callable[..., Any]:
        """The entry for a caller that made a call's first attempt itself and saw it fail.

        Returns ``resume(started, error, *args, **kwargs)``: the breaker and the retry
        budget hear of that attempt as if this policy had made it, and its retries run
        as they would have (see :func:`resilient._driver.build_resume`). The first
        attempt must have been made as this policy's healthy path would have made it:
        so only for a policy without a rate limit, bulkhead or timeouts, with the breaker closed
        and counting nothing on success (``CircuitBreaker.quiet()``), and with no
        deadline in force. The httpx transport's fast path is such a caller.
        """
        if (
            self.rate_limit is not None
            or self.bulkhead is not None
            or self.timeout is not None
            or self.attempt_timeout
            or self.chaos
            or self.hedge is not None
        ):
            raise ValueError(
                "resume() is for a policy without a bulkhead, timeout, attempt_timeout, "
                "rate_limit, hedge or chaos: "
                "a first attempt made outside the policy could not have honoured them"
            )
        built = _driver.build_resume(
            fn,
            asynchronous=asynchronous,
            retrier=self.retry,
            gate=self._gate,
            observer=self._observer(fn) if observer is None else observer,
        )
        return self._outermost(built, fn, asynchronous)

    def _injected(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """``fn`` inside the chaos injectors, the first in the list outermost."""
        for injector in reversed(self.chaos):
            wrapped = injector.wrap(fn, asynchronous)
            if not callable(wrapped):
                raise TypeError(
                    f"the chaos stage {injector!r} returned {wrapped!r} from wrap(), not a callable"
                )
            fn = wrapped
        return fn

    def _outermost(
        self, built: Callable[..., Any], fn: Callable[..., Any], asynchronous: bool
    ) -> Callable[..., Any]:
        """``built`` inside the fallback, the outermost stage, if there is one."""
        if self.fallback is None:
            return built
        return _fallback.wrap_driver(self.fallback, built, asynchronous, name=_name_of(self, fn))

    def _observer(self, fn: Callable[..., Any]) -> CallObserver | None:
        telemetry = self._telemetry
        if telemetry is None:
            return None
        return _tracing.CallSite(_name_of(self, fn), telemetry, self.timeout)


def _name_of(policy: Policy, fn: Callable[..., Any]) -> str:
    """What a call of ``fn`` is called in spans, metrics and logs: the Policy's name, or fn's."""
    return policy.name or str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def _admission(rate_limit: Admission | None, bulkhead: Admission | None) -> Admission | None:
    """The one admission stage the driver takes: the limiter, the bulkhead, or both in order."""
    if rate_limit is None:
        return bulkhead
    if bulkhead is None:
        return rate_limit
    if isinstance(bulkhead, MeasuredAdmission) and _no_slot_pool(bulkhead):
        return _RateThenMeasured(rate_limit, bulkhead)
    return _RateThenBulkhead(rate_limit, bulkhead)


def _no_slot_pool(bulkhead: object) -> bool:
    """Whether the driver would take ``bulkhead``'s tickets (no inline slot pool)."""
    slot_pool = getattr(bulkhead, "slot_pool", None)
    return not callable(slot_pool) or slot_pool() is None


# Set (in the caller's context) when the limiter admitted a call in try_acquire but the
# bulkhead had no free slot: the driver's acquire that follows must wait for the bulkhead
# only. Nothing can run in between: the driver calls acquire right after, with no
# suspension, so no other call of this thread or task sees the mark.
_LIMITER_PASSED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "resilient_limiter_passed", default=False
)


class _RateThenBulkhead:
    """``Policy(rate_limit=, bulkhead=)`` as one Admission: the limiter first, then the bulkhead.

    Each stage that admitted a call is released once, as the contract asks, the
    limiter too when the bulkhead then refuses. (A RateLimiter's release does
    nothing: a turn it granted is spent; see :class:`Policy`.)
    """

    __slots__ = ("bulkhead", "rate_limit")

    def __init__(self, rate_limit: Admission, bulkhead: Admission) -> None:
        self.rate_limit = rate_limit
        self.bulkhead = bulkhead

    def try_acquire(self) -> bool:
        if not self.rate_limit.try_acquire():
            return False
        if self.bulkhead.try_acquire():
            return True
        _LIMITER_PASSED.set(True)  # the driver now waits in acquire(): for the slot only
        return False

    def acquire(self) -> None:
        if _LIMITER_PASSED.get():
            _LIMITER_PASSED.set(False)
        else:
            self.rate_limit.acquire()
        try:
            self.bulkhead.acquire()
        except BaseException:
            self.rate_limit.release()
            raise

    async def acquire_async(self) -> None:
        if _LIMITER_PASSED.get():
            _LIMITER_PASSED.set(False)
        else:
            await self.rate_limit.acquire_async()
        try:
            await self.bulkhead.acquire_async()
        except BaseException:
            self.rate_limit.release()
            raise

    def release(self) -> None:
        try:
            self.bulkhead.release()
        finally:
            self.rate_limit.release()


class _RateThenMeasured(_RateThenBulkhead):
    """:class:`_RateThenBulkhead` over a bulkhead that learns from its calls (an adaptive
    limit): its tickets, and with them each call's round trip and outcome, pass through."""

    __slots__ = ("measured",)

    def __init__(self, rate_limit: Admission, bulkhead: MeasuredAdmission) -> None:
        super().__init__(rate_limit, bulkhead)
        self.measured = bulkhead

    def try_acquire_ticket(self) -> object | None:
        if not self.rate_limit.try_acquire():
            return None
        ticket = self.measured.try_acquire_ticket()
        if ticket is None:
            _LIMITER_PASSED.set(True)  # the driver now waits in acquire_ticket(): slot only
        return ticket

    def acquire_ticket(self) -> object:
        if _LIMITER_PASSED.get():
            _LIMITER_PASSED.set(False)
        else:
            self.rate_limit.acquire()
        try:
            return self.measured.acquire_ticket()
        except BaseException:
            self.rate_limit.release()
            raise

    async def acquire_ticket_async(self) -> object:
        if _LIMITER_PASSED.get():
            _LIMITER_PASSED.set(False)
        else:
            await self.rate_limit.acquire_async()
        try:
            return await self.measured.acquire_ticket_async()
        except BaseException:
            self.rate_limit.release()
            raise

    def release_ticket(self, ticket: object, error: BaseException | None) -> None:
        try:
            self.measured.release_ticket(ticket, error)
        finally:
            self.rate_limit.release()


def _injectors(chaos: Iterable[Injector] | None) -> tuple[Injector, ...]:
    if chaos is None:
        return ()
    if isinstance(chaos, Injector) and not isinstance(chaos, type):
        return (chaos,)
    if isinstance(chaos, (str, bytes)) or not isinstance(chaos, Iterable):
        raise TypeError(
            f"chaos must be a list of chaos stages (resilient.chaos.Fault, Latency, ...), "
            f"got {chaos!r}"
        )
    injectors = tuple(chaos)
    for injector in injectors:
        # A class has its wrap() too (unbound): the stage is an instance of it.
        if not isinstance(injector, Injector) or isinstance(injector, type):
            raise TypeError(
                "each chaos stage must be a resilient.chaos stage or an Injector "
                f"(a wrap(fn, asynchronous) method), got {injector!r}"
            )
    return injectors


def _time_limit(name: str, value: Duration | None, bounded: str) -> float | None:
    """``timeout`` or ``attempt_timeout`` as seconds; ``None`` (no limit) for None or inf."""
    if value is None:
        return None
    seconds = to_seconds(name, value, allow_inf=True)
    if seconds == 0.0:
        raise ValueError(
            f"{name} must be greater than zero, got {value!r}: {bounded} given no time "
            "could never succeed; pass None for no limit"
        )
    return None if seconds == _INF else seconds


def _as_gate(breaker: object) -> Gate | None:
    if breaker is None:
        return None
    pybreaker = sys.modules.get("pybreaker")
    if pybreaker is not None and isinstance(breaker, pybreaker.CircuitBreaker):
        from resilient._compat.pybreaker import PyBreakerStage

        return PyBreakerStage(breaker)
    if isinstance(breaker, Gate):
        return breaker
    raise TypeError(
        "breaker must be a resilient.CircuitBreaker, a pybreaker.CircuitBreaker or a Gate "
        f"stage (before_call, on_success, on_failure, on_abort), got {breaker!r}"
    )
