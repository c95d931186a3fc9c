"""Fallbacks: when a call fails in a way you expect, return something useful instead.

A :class:`Fallback` is the outermost stage: the whole call, retries and all, has
failed, and rather than the exception the caller gets a fallback result::

    @Fallback(value=[])                        # a fixed result
    def recommendations(user): ...

    @Fallback(handler=from_cache)              # computed from the exception
    async def price(item): ...

``on=`` chooses which failures fall back. By default (:func:`rejected_or_gave_up`)
those are the toolkit's own rejections, every :class:`~resilient.ResilientError`
(an open breaker, a full bulkhead, a passed deadline, a rate limit), and a failure
a :class:`~resilient.Retry` retried until it gave up: the failures where the
dependency is known to be unavailable. Anything else, a bug in the caller most of
all, still raises. Cancellation, ``KeyboardInterrupt`` and ``SystemExit`` (no
:class:`Exception`) never fall back, whatever ``on`` says.

The original exception stays reachable: ``handler`` receives it, ``value=`` logs
the function's name and the exception's type at INFO on the ``resilient.fallback``
logger, and an exception the handler raises is chained to it (its
``__context__``), as any exception raised inside an ``except`` block is.

Public names: :class:`Fallback`, :func:`rejected_or_gave_up`, :func:`gave_up`,
:func:`wrap_driver` (how :class:`~resilient.Policy` puts a fallback around its
driver).
"""

from __future__ import annotations

import inspect
import logging
import pickle
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

from resilient import _driver
from resilient._config import DEFAULT, Default, describe, rebuild
from resilient.errors import PROGRAMMING_ERRORS, ResilientError

__all__ = ["Fallback", "FallbackFilter", "gave_up", "rejected_or_gave_up", "wrap_driver"]

P = ParamSpec("P")
R = TypeVar("R")

FallbackFilter: TypeAlias = (
    "type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]"
)
"""What ``Fallback(on=...)`` accepts: exception type(s) or a predicate on the exception."""

_logger = logging.getLogger("resilient.fallback")
# The start of the note Retry.give_up adds (resilient/retry.py) or a Hedge adds to the
# last failure of a call whose every attempt failed (resilient/hedge.py), and what the
# Retry says when the failure was of a kind it does not retry at all.
_GAVE_UP = ("resilient.Retry: gave up after ", "resilient.Hedge: gave up after ")
_NOT_RETRYABLE = " is not retryable (on="


def gave_up(exc: BaseException) -> bool:
    """Whether ``exc`` reached its caller because a :class:`~resilient.Retry` gave up on it.

    That is: it was worth retrying (it matched the Retry's ``on``), and the retries
    ran out of attempts, budget or time, or the breaker stopped them. Likewise a
    :class:`~resilient.Hedge` whose every attempt failed. Read from the
    note the Retry adds, so it holds after the exception crossed a process pool.
    A failure the Retry does not retry (it says "not retryable") is no give-up.
    """
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        return False
    return any(
        isinstance(note, str) and note.startswith(_GAVE_UP) and _NOT_RETRYABLE not in note
        for note in notes
    )


def rejected_or_gave_up(exc: BaseException) -> bool:
    """The default ``Fallback(on=...)``: the toolkit's refusals, or a :func:`gave_up`.

    A refusal is a :class:`~resilient.ResilientError` whose ``refusal`` is true: an
    open breaker, a full bulkhead, a rate limit, a passed deadline, and an RPC
    server's own refusals; not an RPC application error or protocol error.

    Never a programming error (:data:`resilient.errors.PROGRAMMING_ERRORS`): a
    fallback would hide the bug. Compose it to add your own::

        Fallback(value=None, on=lambda exc: rejected_or_gave_up(exc) or is_404(exc))
    """
    if isinstance(exc, PROGRAMMING_ERRORS):
        return False
    if isinstance(exc, ResilientError) and exc.refusal:
        return True
    return gave_up(exc)


@dataclass(frozen=True, slots=True, kw_only=True, init=False, eq=False, repr=False)
class Fallback(_driver.Configured):
    """Return a fallback result when a call fails in one of the ways ``on`` names.

    >>> @Fallback(value="unknown")
    ... def region(host: str) -> str: ...

    * ``value``: the result to return instead of raising; or
    * ``handler``: a function that receives the exception and returns the result (or
      raises). Over an async function it may be sync or async (what it returns is
      awaited when it can be); over a sync function it must be sync. Give exactly one.
    * ``on``: which failures fall back: an exception type, a tuple of them, or a
      predicate ``(exception) -> bool``. The default is :func:`rejected_or_gave_up`.
      ``on=TypeError`` (or ``Exception``) falls back on programming errors too.

    ``value=`` logs each fallback at INFO on the ``resilient.fallback`` logger, with
    the function's name and the exception's type; use ``handler=`` to see the
    exception itself. ``@fallback`` decorates sync and async functions (generator
    functions are refused); ``fallback.call(fn, ...)`` and ``await fallback.acall(fn,
    ...)`` run one call. ``Policy(fallback=...)`` applies it around all the other
    stages. A Fallback pickles as its configuration, so ``value``, ``handler`` and
    ``on`` must pickle (module-level functions, not lambdas) for it to.
    """

    value: Any
    handler: Callable[[Exception], Any] | None
    on: FallbackFilter
    _on_types: tuple[type[Exception], ...] | None = field(init=False)
    _drivers: _driver.DriverCache = field(init=False)

    def __init__(
        self,
        *,
        value: Any = DEFAULT,
        handler: Callable[[Exception], Any] | None = None,
        on: FallbackFilter | Default = DEFAULT,
    ) -> None:
        if handler is not None:
            if not isinstance(value, Default):
                raise ValueError(
                    f"give value= or handler=, not both: got value={value!r} and "
                    f"handler={describe(handler)}"
                )
            if not callable(handler):
                raise TypeError(
                    f"handler must be a callable taking the exception, got "
                    f"{type(handler).__name__}: {handler!r}"
                )
            value = None
        elif isinstance(value, Default):
            raise ValueError(
                "Fallback needs value= (the result to return) or handler= (a function "
                "taking the exception and returning the result)"
            )

        on_types: tuple[type[Exception], ...] | None = None
        if isinstance(on, Default):
            on = rejected_or_gave_up
        elif isinstance(on, type | tuple):
            on_types = on if isinstance(on, tuple) else (on,)
            if not on_types:
                raise ValueError("on must name at least one exception type, got ()")
            for item in on_types:
                if not (isinstance(item, type) and issubclass(item, BaseException)):
                    raise TypeError(
                        f"on must be an exception type, a tuple of them or a predicate "
                        f"taking the exception, got {on!r}"
                    )
                if not issubclass(item, Exception):
                    raise ValueError(
                        f"on={describe(on)} names {item.__qualname__}, which is no "
                        "Exception: a fallback never replaces cancellation, "
                        "KeyboardInterrupt or SystemExit; name Exception subclasses"
                    )
        elif not callable(on):
            raise TypeError(
                "on must be an exception type, a tuple of them or a predicate taking the "
                f"exception, got {type(on).__name__}: {on!r}"
            )

        setattr_ = object.__setattr__
        setattr_(self, "value", value)
        setattr_(self, "handler", handler)
        setattr_(self, "on", on)
        setattr_(self, "_on_types", on_types)
        setattr_(self, "_drivers", {})

    def falls_back_on(self, exc: BaseException) -> bool:
        """Whether ``exc`` falls back (an :class:`Exception` that ``on`` names)."""
        if not isinstance(exc, Exception):
            return False
        on_types = self._on_types
        if on_types is not None:
            return isinstance(exc, on_types)
        return bool(cast("Callable[[Exception], bool]", self.on)(exc))

    def __repr__(self) -> str:
        if self.handler is not None:
            parts = [f"handler={describe(self.handler)}"]
        else:
            parts = [f"value={self.value!r}"]
        if self.on is not rejected_or_gave_up:
            parts.append(f"on={describe(self.on)}")
        return f"Fallback({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        config: dict[str, Any] = {"on": self.on}
        if self.handler is not None:
            config["handler"] = self.handler
        else:
            config["value"] = self.value
        # Pickle's own error would not say which setting it could not pickle.
        for parameter, setting in config.items():
            try:
                pickle.dumps(setting)
            except Exception as exc:
                raise pickle.PicklingError(
                    f"{self!r} cannot be pickled: its {parameter} {setting!r} is not "
                    "picklable; use a module-level function or class instead of a lambda "
                    "or closure"
                ) from exc
        return (rebuild, (type(self), config))

    # Decorating ---------------------------------------------------------------------

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate sync or async ``fn`` so that its failures that ``on`` names fall back.

        Generator functions are refused; over a ``staticmethod`` or ``classmethod`` it
        returns one of the same kind.
        """
        return cast("Callable[P, R]", _driver.wrap(fn, "Fallback", self._build))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call sync ``fn(*args, **kwargs)``, falling back as configured, without decorating it."""
        return cast(R, self._cached(fn, False)(*args, **kwargs))

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await async ``fn(*args, **kwargs)``, falling back as configured."""
        return cast(R, await self._cached(fn, True)(*args, **kwargs))

    def _cached(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        return _driver.cached(self._drivers, fn, asynchronous, "Fallback", self._build)

    def _build(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        # The stage-less driver, as Policy(fallback=self) alone would run: it refuses an
        # async function's non-awaitable result and a sync one's coroutine.
        driver = _driver.build(fn, asynchronous=asynchronous)
        return wrap_driver(self, driver, asynchronous, name=describe(fn))


def wrap_driver(
    fallback: Fallback,
    driver: Callable[..., Any],
    asynchronous: bool,
    *,
    name: str | None = None,
) -> Callable[..., Any]:
    """``driver`` (sync, or async when ``asynchronous``) with ``fallback`` applied around it.

    ``name`` names the function in the log of a ``value=`` fallback (default: the
    driver's ``__qualname__``). Raises :class:`TypeError` for an async ``handler``
    over a sync driver: a sync call cannot await it. The wrapper is one frame; a
    healthy call pays for entering a ``try`` block.
    """
    if not isinstance(fallback, Fallback):
        raise TypeError(f"fallback must be a resilient.Fallback, got {fallback!r}")
    label = name or describe(driver)
    handler = fallback.handler
    if handler is not None and not asynchronous and _driver.is_async(handler):
        raise TypeError(
            f"{fallback!r} cannot wrap {label}: its handler is async and {label} is sync, "
            "so nothing could await the handler; give a sync handler, or make the "
            "function async"
        )
    applies = fallback.falls_back_on
    if handler is None:
        recover: Callable[[Exception], Any] = _logging_value(fallback.value, label)
    elif asynchronous:
        recover = handler
    else:
        recover = _sync_handler(handler, label)

    if asynchronous:
        awaits = handler is not None

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await driver(*args, **kwargs)
            except Exception as exc:
                if not applies(exc):
                    raise
                result = recover(exc)
                if awaits and inspect.isawaitable(result):
                    return await result
                return result

        return run_async

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return driver(*args, **kwargs)
        except Exception as exc:
            if not applies(exc):
                raise
            return recover(exc)

    return run


def _logging_value(value: object, label: str) -> Callable[[Exception], Any]:
    def give_value(exc: Exception) -> object:
        _logger.info("%s fell back to its fallback value after %s", label, describe(type(exc)))
        return value

    return give_value


def _sync_handler(handler: Callable[[Exception], Any], label: str) -> Callable[[Exception], Any]:
    def handle(exc: Exception) -> object:
        result = handler(exc)
        if inspect.iscoroutine(result):
            result.close()  # never awaited: close it so Python does not warn
            raise TypeError(
                f"the fallback handler {describe(handler)} of sync {label} returned a "
                "coroutine: it is async (maybe behind a decorator without functools.wraps), "
                "and a sync call cannot await it; give a sync handler"
            )
        return result

    return handle
