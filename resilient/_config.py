"""Validation shared by every configuration object.

Configuration is checked once, at construction, so a bad value fails where it
was written, with a message naming the parameter and the value.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT",
    "Default",
    "Duration",
    "check_int",
    "check_number",
    "describe",
    "exception_types",
    "rebuild",
    "to_seconds",
]


class Default(enum.Enum):
    """Marks a parameter that was not passed, where ``None`` means something (off, say)."""

    DEFAULT = enum.auto()

    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Final = Default.DEFAULT

Duration = float | int | timedelta
"""A length of time: seconds as a number, or a :class:`datetime.timedelta`."""


def to_seconds(
    name: str, value: object, *, allow_zero: bool = True, allow_inf: bool = False
) -> float:
    """Return ``value`` as float seconds, or raise naming ``name``.

    >>> to_seconds("timeout", timedelta(milliseconds=250))
    0.25
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"{name} must be seconds as a number or a datetime.timedelta, "
            f"got {type(value).__name__}: {value!r}"
        )
    if math.isnan(seconds):
        raise ValueError(f"{name} must be a number of seconds, got NaN")
    if seconds < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    if seconds == 0 and not allow_zero:
        raise ValueError(f"{name} must be greater than zero, got {value!r}")
    if math.isinf(seconds) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return seconds


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an int of at least ``minimum``, or raise naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float within bounds, or raise naming ``name``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if inclusive:
        ok = minimum <= number <= maximum
        bounds = f"between {minimum:g} and {maximum:g}"
    else:
        ok = minimum < number < maximum
        bounds = f"strictly between {minimum:g} and {maximum:g}"
    if not ok:
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def exception_types(
    name: str, value: object, *, if_empty: str = ""
) -> tuple[type[BaseException], ...] | None:
    """The exception types an ``on=``-style setting names, or ``None`` when it is a predicate.

    ``value`` may be an exception class, a non-empty tuple of them, or any callable
    (a predicate taking the exception); anything else raises naming ``name``.
    ``if_empty`` is said after the error for an empty tuple.
    """
    if isinstance(value, type):
        if not issubclass(value, BaseException):
            raise TypeError(f"{name} must be an exception type, got the class {value!r}")
        return (value,)
    if isinstance(value, tuple):
        if not value:
            raise ValueError(f"{name} must name at least one exception type, got (){if_empty}")
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise TypeError(
                    f"{name} must be a tuple of exception types, got {value!r} (holding {item!r})"
                )
        return value
    if not callable(value):
        raise TypeError(
            f"{name} must be an exception type, a tuple of them, or a predicate taking the "
            f"exception, got {value!r}"
        )
    return None


_C = TypeVar("_C")


def rebuild(cls: Callable[..., _C], config: dict[str, Any]) -> _C:
    """Unpickle an object that pickles as its configuration: ``cls(**config)``, fresh state.

    The stages' ``__reduce__`` returns ``(rebuild, (type(self), config))``, so a copy
    sent to another process starts with none of this process's live state.
    """
    return cls(**config)


def describe(value: object) -> str:
    """A short readable name for a setting in a ``repr`` or a message: a class, a tuple of
    them, a function's qualified name, else ``module.Kind(...)``."""
    if isinstance(value, type):
        if value.__module__ == "builtins":
            return value.__qualname__
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, tuple):
        items = ", ".join(describe(item) for item in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str):
        return name
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}(...)"
