"""Fault injection as stages: faults, latency, outcomes and behaviours, innermost in a Policy.

A chaos stage wraps the protected call itself, inside every other stage
(``Policy(chaos=[...])``, see :class:`~resilient.stages.Injector`), so the attempt
timeout, the breaker and the retry see what it injected exactly as they would see
a real failure: a retry retries an injected ``ConnectionError``, a breaker counts
it, an async attempt timeout cancels injected latency. That is the point of
injecting faults *inside* the resilience stages rather than mocking the
dependency: it tests the stages you configured, with the settings you ship.

Four kinds, after Polly's chaos strategies:

* :class:`Fault` raises an exception instead of making the call;
* :class:`Latency` waits before making the call, never past the deadline in force;
* :class:`Outcome` returns a value instead of making the call;
* :class:`Behavior` runs an action of yours before making the call.

Each takes ``rate`` (the probability that one call is hit), ``enabled`` (``True``,
``False`` or a zero-argument callable read on every call, so a game day can switch
a stage on and off while the service runs) and ``random`` (a ``random.Random`` or
an ``int`` seed: seeded, a run injects into the same calls every time, as long as
the calls come in the same order). Draws are taken under a lock, so a stage can be
shared by threads and tasks. ``injected`` counts the calls a stage hit.

A stage also decorates a function on its own, sync or async, when there is no
Policy to put it in::

    @chaos.Fault(rate=0.1, exception=ConnectionError)
    def fetch(key: str) -> bytes: ...

Waits go through the drivers' sleep (:data:`resilient._driver.sleep`), so
:func:`resilient.testing.record_sleeps` records injected latency instead of sleeping it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from resilient import _driver
from resilient._config import Duration, describe, rebuild, to_seconds
from resilient.chaos._dice import Dice, check_rate
from resilient.deadline import remaining
from resilient.errors import DeadlineExceeded

__all__ = ["Behavior", "Fault", "Latency", "Outcome"]

P = ParamSpec("P")
R = TypeVar("R")

ExceptionSpec = BaseException | type[BaseException] | Callable[[], BaseException]


class _Chaos(_driver.Configured):
    """What the four stages share: the dice, the count, the decorator, repr and pickling."""

    __slots__ = ("_dice", "rate")

    # The settings beside rate/enabled/random, in repr and pickling order.
    _settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, rate: float, enabled: object, random: object) -> None:
        self.rate = check_rate("rate", rate)
        self._dice = Dice(enabled=enabled, random=random)

    @property
    def enabled(self) -> object:
        """``True``, ``False`` or the callable that says, on each call."""
        return self._dice.enabled

    @property
    def injected(self) -> int:
        """How many calls this stage has injected into so far (all threads and tasks)."""
        return self._dice.hits

    def _hit(self) -> bool:
        return self._dice.hit(self.rate)

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """The :class:`~resilient.stages.Injector` contract: ``fn`` with this stage around it."""
        raise NotImplementedError  # pragma: no cover - every subclass has its own

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate sync or async ``fn`` with this stage alone (no Policy around it)."""
        return cast("Callable[P, R]", _driver.wrap(fn, type(self).__name__, self.wrap))

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"rate": self.rate}
        config.update((name, getattr(self, name)) for name in self._settings)
        config.update(enabled=self._dice.enabled, random=self._dice.random)
        return config

    def __repr__(self) -> str:
        shown = []
        for name, value in self._config().items():
            if (name == "enabled" and value is True) or (name == "random" and value is None):
                continue
            text = describe(value) if callable(value) and name != "enabled" else repr(value)
            shown.append(f"{name}={text}")
        return f"chaos.{type(self).__name__}({', '.join(shown)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration: the copy counts from zero.
        return (rebuild, (type(self), self._config()))


def _exception_factory(exception: object) -> Callable[[], BaseException]:
    """``exception=`` as a factory making a fresh exception for each injection."""
    if isinstance(exception, BaseException):
        template = exception
        try:
            trial = copy.copy(template)
        except Exception as error:
            raise TypeError(
                f"exception={template!r} cannot be copied ({error}), and every injection "
                "raises a fresh copy; pass a zero-argument factory instead "
                f"(lambda: {type(template).__name__}(...))"
            ) from None
        if type(trial) is not type(template):  # pragma: no cover - a broken __reduce__
            raise TypeError(f"exception={template!r} does not copy as itself; pass a factory")

        def fresh() -> BaseException:
            error = copy.copy(template)
            # A shallow copy shares the template's list of notes: give each its own, or
            # every injection's note piles up on the template and on all later copies.
            notes = getattr(template, "__notes__", None)
            if isinstance(notes, list):
                error.__notes__ = list(notes)
            return error

        return fresh
    if isinstance(exception, type) and issubclass(exception, BaseException):
        kind = exception
        message = f"injected by resilient.chaos.Fault: {kind.__name__}"
        try:
            kind(message)
        except Exception as error:
            raise TypeError(
                f"exception={kind.__name__} cannot be built as {kind.__name__}(message) "
                f"({error}); pass an instance or a zero-argument factory instead"
            ) from None
        return lambda: kind(message)
    if callable(exception):
        return cast("Callable[[], BaseException]", exception)
    raise TypeError(
        "exception must be an exception instance, an exception class or a zero-argument "
        f"factory returning an exception, got {type(exception).__name__}: {exception!r}"
    )


class Fault(_Chaos):
    """Raise an exception instead of making the call, in ``rate`` of the calls.

    >>> flaky = Policy(retry=Retry(attempts=3), chaos=[chaos.Fault(rate=0.5, exception=OSError)])

    ``exception`` is an instance (each injection raises a copy of it, never the
    same object twice: a shared instance would collect every raise's traceback and
    notes), a class (built as ``cls("injected by resilient.chaos.Fault: ...")``) or
    a zero-argument factory called on each injection. Every injected exception gets
    a note naming the stage, so a log that shows it says it was injected. A
    ``BaseException`` that is no ``Exception`` (``asyncio.CancelledError``) is
    injected too, and the Policy treats it as a real one: no outcome, never retried.
    """

    __slots__ = ("_make", "exception")
    _settings = ("exception",)
    _needs = "rate=..., exception=..."

    def __init__(
        self,
        *,
        rate: float,
        exception: ExceptionSpec,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        super().__init__(rate=rate, enabled=enabled, random=random)
        self._make = _exception_factory(exception)
        self.exception = exception

    def _fault(self) -> BaseException:
        error = self._make()
        if not isinstance(error, BaseException):
            raise TypeError(
                f"the exception factory {describe(self.exception)} returned {error!r}, not an "
                "exception; it must return a new exception each time it is called"
            )
        if error.__traceback__ is not None:
            raise TypeError(
                f"the exception factory {describe(self.exception)} returned an exception "
                f"that was raised before ({error!r}); return a new one on each call"
            )
        error.add_note(f"injected by {self!r}")
        return error

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """``fn`` behind this stage: a hit raises the fault, the call is not made."""
        hit = self._hit
        if asynchronous:

            async def faulty_async(*args: Any, **kwargs: Any) -> Any:
                if hit():
                    raise self._fault()
                return await _awaitable(fn, fn(*args, **kwargs))

            return faulty_async

        def faulty(*args: Any, **kwargs: Any) -> Any:
            if hit():
                raise self._fault()
            return fn(*args, **kwargs)

        return faulty


class Latency(_Chaos):
    """Wait ``delay`` before making the call, in ``rate`` of the calls; never past the deadline.

    ``delay`` is seconds (or a ``timedelta``), greater than zero. When the deadline
    in force (:func:`resilient.remaining`; inside a Policy, the attempt's) leaves
    less than ``delay``, the stage waits until the deadline and raises
    :class:`~resilient.DeadlineExceeded`, without making the call: that is what a
    dependency this slow does to a caller that passes its deadline down, and it
    costs the caller's budget the same time. (In async code under an
    ``attempt_timeout`` the Policy's own timer may cancel the wait first; either
    way the attempt fails with ``DeadlineExceeded``.)
    """

    __slots__ = ("delay",)
    _settings = ("delay",)
    _needs = "rate=..., delay=..."

    def __init__(
        self,
        *,
        rate: float,
        delay: Duration,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        super().__init__(rate=rate, enabled=enabled, random=random)
        self.delay = to_seconds("delay", delay, allow_zero=False)

    def _wait(self) -> tuple[float, bool]:
        """How long to wait, and whether the deadline ends the wait (then raise after it)."""
        left = remaining()
        if self.delay < left:
            return self.delay, False
        return left, True

    def _overran(self) -> DeadlineExceeded:
        error = DeadlineExceeded(
            f"injected latency of {self.delay:g} s ran past the deadline in force; "
            "the call was not made"
        )
        error.add_note(f"injected by {self!r}")
        return error

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """``fn`` behind this stage: a hit waits first (sleeping through the drivers' seam)."""
        hit, wait = self._hit, self._wait
        if asynchronous:

            async def slow_async(*args: Any, **kwargs: Any) -> Any:
                if hit():
                    seconds, overran = wait()
                    if seconds > 0.0:
                        await _driver.async_sleep(seconds)
                    if overran:
                        raise self._overran()
                return await _awaitable(fn, fn(*args, **kwargs))

            return slow_async

        def slow(*args: Any, **kwargs: Any) -> Any:
            if hit():
                seconds, overran = wait()
                if seconds > 0.0:
                    _driver.sleep(seconds)
                if overran:
                    raise self._overran()
            return fn(*args, **kwargs)

        return slow


class Outcome(_Chaos):
    """Return ``result`` instead of making the call, in ``rate`` of the calls.

    The same object is returned each time (copy it in a :class:`Behavior` if the
    caller mutates results). A ``Retry(on_result=...)`` outside judges it as it
    would a real result: inject an empty answer to test that it is retried.
    """

    __slots__ = ("result",)
    _settings = ("result",)
    _needs = "rate=..., result=..."

    def __init__(
        self,
        *,
        rate: float,
        result: object,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        super().__init__(rate=rate, enabled=enabled, random=random)
        self.result = result

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """``fn`` behind this stage: a hit returns ``result``, the call is not made."""
        hit, result = self._hit, self.result
        if asynchronous:

            async def replaced_async(*args: Any, **kwargs: Any) -> Any:
                if hit():
                    return result
                return await _awaitable(fn, fn(*args, **kwargs))

            return replaced_async

        def replaced(*args: Any, **kwargs: Any) -> Any:
            if hit():
                return result
            return fn(*args, **kwargs)

        return replaced


class Behavior(_Chaos):
    """Run ``action()`` before making the call, in ``rate`` of the calls.

    For faults that are not an exception, a delay or a value: drop a cache, kill a
    connection, fill a disk, flip a flag. ``action`` takes no arguments. Around a
    sync call it must be a plain function (an async one is refused when the stage
    wraps the call); around an async call it may be either, and an awaitable it
    returns is awaited. Whatever it raises propagates as the call's failure (so it
    can raise what :class:`Fault` cannot build), and the call is then not made.
    """

    __slots__ = ("action",)
    _settings = ("action",)
    _needs = "rate=..., action=..."

    def __init__(
        self,
        *,
        rate: float,
        action: Callable[[], object],
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        super().__init__(rate=rate, enabled=enabled, random=random)
        if not callable(action):
            raise TypeError(
                f"action must be a zero-argument callable, got {type(action).__name__}: {action!r}"
            )
        self.action = action

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """``fn`` behind this stage: a hit runs ``action()`` first."""
        hit, action = self._hit, self.action
        if asynchronous:

            async def acted_async(*args: Any, **kwargs: Any) -> Any:
                if hit():
                    done = action()
                    if inspect.isawaitable(done):
                        await done
                return await _awaitable(fn, fn(*args, **kwargs))

            return acted_async

        if _driver.is_async(action):
            raise TypeError(
                f"the action {describe(action)} of {self!r} is async, but the call it would "
                "run before is sync: nothing would await it; give a sync action, or make "
                "the call async"
            )

        def acted(*args: Any, **kwargs: Any) -> Any:
            if hit():
                done = action()
                if inspect.isawaitable(done):
                    if inspect.iscoroutine(done):
                        done.close()  # never awaited: close it so Python does not warn
                    raise TypeError(
                        f"the action {describe(action)} of {self!r} returned an awaitable "
                        "around a sync call, where nothing can await it; give a sync action"
                    )
            return fn(*args, **kwargs)

        return acted


def _awaitable(fn: Callable[..., Any], result: object) -> Awaitable[Any]:
    """``result`` if it can be awaited; else the drivers' own error for a sync function."""
    if inspect.isawaitable(result):
        return result
    raise _driver.NotAwaitable(
        f"{describe(fn)} returned {type(result).__name__}, not an awaitable: it was driven "
        "as async (acall, or an async decorator target). Use call() for sync functions."
    )
