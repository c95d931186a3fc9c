"""``Policy``: admission, deadline, retry, gate and attempt timeout fused into one wrapper.

The stages always apply in this order, outermost first::

    bulkhead → total deadline (timeout) → retry → breaker → attempt deadline → call

Any subset may be given. The stages are not a stack of nested decorators: one
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

import math
import pickle
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar, cast

from resilient import _driver
from resilient import tracing as _tracing
from resilient._config import Duration, rebuild, to_seconds
from resilient.stages import Admission, CallObserver, Gate, Retrier

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
    ...     bulkhead=Bulkhead(max_concurrent=10),
    ...     timeout=2.0,                  # total budget for the call, retries included
    ...     retry=Retry(attempts=3),
    ...     breaker=CircuitBreaker(failure_threshold=5),
    ...     attempt_timeout=0.5,          # each try, clamped to the total budget
    ... )
    >>> @policy
    ... def fetch(key: str) -> str: ...

    Each stage may be the built-in one or any object that implements its protocol
    in :mod:`resilient.stages`: ``bulkhead`` an :class:`~resilient.stages.Admission`,
    ``retry`` a :class:`~resilient.stages.Retrier`, ``breaker`` a
    :class:`~resilient.stages.Gate` (or a ``pybreaker.CircuitBreaker``, whose own
    rules, listeners and storage keep working). ``timeout`` bounds the whole call,
    the wait for a bulkhead slot included; ``attempt_timeout`` each attempt.

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
        "name",
        "retry",
        "timeout",
        "tracing",
    )

    bulkhead: Admission | None
    timeout: float | None
    retry: Retrier | None
    breaker: Gate | Any | None
    attempt_timeout: float | None
    name: str | None
    tracing: bool
    _gate: Gate | None
    _telemetry: _tracing.Telemetry | None
    _drivers: _driver.DriverCache

    def __init__(
        self,
        *,
        bulkhead: Admission | None = None,
        timeout: Duration | None = None,
        retry: Retrier | None = None,
        breaker: Gate | Any | None = None,
        attempt_timeout: Duration | None = None,
        name: str | None = None,
        tracing: bool = True,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
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
        setattr_(self, "bulkhead", bulkhead)
        setattr_(self, "timeout", total)
        setattr_(self, "retry", retry)
        setattr_(self, "breaker", breaker)
        setattr_(self, "attempt_timeout", per_attempt)
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
            for name in ("bulkhead", "timeout", "retry", "breaker", "attempt_timeout", "name")
            if (value := getattr(self, name)) is not None
        ]
        if not self.tracing:
            stages.append("tracing=False")
        return f"Policy({', '.join(stages)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration (the default would set attributes on an immutable object).
        config: dict[str, Any] = {
            "bulkhead": self.bulkhead,
            "timeout": self.timeout,
            "retry": self.retry,
            "breaker": self.breaker,
            "attempt_timeout": self.attempt_timeout,
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
        return _driver.build(
            fn,
            asynchronous=asynchronous,
            admission=self.bulkhead,
            timeout=self.timeout,
            retrier=self.retry,
            gate=self._gate,
            attempt_timeout=self.attempt_timeout,
            observer=self._observer(fn) if observer is None else observer,
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
        so only for a policy without a bulkhead or timeouts, with the breaker closed
        and counting nothing on success (``CircuitBreaker.quiet()``), and with no
        deadline in force. The httpx transport's fast path is such a caller.
        """
        if self.bulkhead is not None or self.timeout is not None or self.attempt_timeout:
            raise ValueError(
                "resume() is for a policy without a bulkhead, timeout or attempt_timeout: "
                "a first attempt made outside the policy could not have honoured them"
            )
        return _driver.build_resume(
            fn,
            asynchronous=asynchronous,
            retrier=self.retry,
            gate=self._gate,
            observer=self._observer(fn) if observer is None else observer,
        )

    def _observer(self, fn: Callable[..., Any]) -> CallObserver | None:
        telemetry = self._telemetry
        if telemetry is None:
            return None
        name = self.name or str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
        return _tracing.CallSite(name, telemetry, self.timeout)


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
