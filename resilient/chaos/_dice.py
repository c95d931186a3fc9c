"""The dice every chaos piece rolls: a rate, an on/off switch, a seeded random source.

Shared by the fault stages, :class:`~resilient.chaos.ChaosTransport`, the
:class:`~resilient.chaos.FaultProxy` and the :class:`~resilient.chaos.FaultMiddleware`,
so each validates ``rate=``, ``enabled=`` and ``random=`` the same way and says the
same thing when they are wrong.

A draw takes a lock: ``random.Random`` keeps its state in one object, and two
threads drawing from it at once would not corrupt it under the GIL but could on a
free-threaded build. With a seed, the *sequence* of draws is reproducible; which
call gets which draw depends on the order calls arrive in, so a run is reproducible
exactly when its calls are made in the same order (one thread, or one task at a time).
"""

from __future__ import annotations

import math
import random as _random
import threading
from collections.abc import Callable

__all__ = ["Dice", "check_enabled", "check_rate"]

Enabled = bool | Callable[[], bool]


def check_rate(name: str, value: object) -> float:
    """``value`` as a probability in [0, 1], or a TypeError/ValueError naming ``name``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a probability between 0 and 1 (a number), "
            f"got {type(value).__name__}: {value!r}"
        )
    rate = float(value)
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"{name} must be a probability between 0 and 1 (0.1 injects into one call in "
            f"ten), got {value!r}"
        )
    return rate


def check_enabled(value: object) -> Enabled:
    """``enabled=``: True, False, or a zero-argument callable returning one of them."""
    if isinstance(value, bool) or callable(value):
        return value
    raise TypeError(
        "enabled must be True, False or a zero-argument callable returning one "
        f"(to switch injection on and off while running), got {type(value).__name__}: {value!r}"
    )


def _source(value: object) -> _random.Random:
    if value is None:
        return _random.Random()
    if isinstance(value, _random.Random):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _random.Random(value)
    raise TypeError(
        "random must be a random.Random, an int seed (for a reproducible run) or None, "
        f"got {type(value).__name__}: {value!r}"
    )


class Dice:
    """A switch and a random source: :meth:`roll` gives a uniform draw, or ``None`` when off.

    ``random`` is kept as given (the same ``random.Random`` object, or the seed), so a
    piece that pickles as its configuration starts its copy from the same point.
    """

    __slots__ = ("_draw", "_lock", "enabled", "hits", "random")

    def __init__(self, *, enabled: object, random: object) -> None:
        self.enabled = check_enabled(enabled)
        self._draw = _source(random).random
        self.random = random
        self._lock = threading.Lock()
        #: How many :meth:`hit` calls came out true.
        self.hits = 0

    def on(self) -> bool:
        """Whether injection is switched on now (``enabled`` called if it is a callable)."""
        enabled = self.enabled
        if enabled is True:
            return True
        if enabled is False:
            return False
        state = enabled()
        if not isinstance(state, bool):
            raise TypeError(
                f"the enabled= callable {enabled!r} returned {state!r}; it must return True "
                "or False"
            )
        return state

    def roll(self) -> float | None:
        """A uniform draw in [0, 1) while switched on, else ``None`` (and no draw taken)."""
        if not self.on():
            return None
        with self._lock:
            return self._draw()

    def hit(self, rate: float) -> bool:
        """Whether this call is hit, with probability ``rate`` while switched on; counted."""
        if not self.on():
            return False
        with self._lock:
            if self._draw() >= rate:
                return False
            self.hits += 1
            return True

    def uniform(self, low: float, high: float) -> float:
        """A uniform draw in [low, high], taken under the lock (for jitter and sizes)."""
        with self._lock:
            return low + (high - low) * self._draw()
