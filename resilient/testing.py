"""Helpers for your own test suite: a fake clock, instant retries, a sleep recorder.

Code wrapped by `resilient` sleeps between retries and reads clocks; a test suite
wants neither real waits nor flaky timing::

    from resilient.testing import FakeClock, instant_retries, record_sleeps

    def test_fetch_gives_up_after_three_attempts():
        with record_sleeps() as waits:
            with pytest.raises(ConnectionError):
                fetch("key")
        assert len(waits) == 2          # two retries, nobody slept

* :class:`FakeClock` — monotonic seconds that move only when the test says so; pass it
  as ``clock=`` to :class:`~resilient.Retry`, :class:`~resilient.CircuitBreaker`,
  :class:`~resilient.RetryBudget`.
* :func:`instant_retries` — every retry waits zero seconds (and, with ``cap=``, makes
  at most that many attempts), process-wide.
* :func:`record_sleeps` — the drivers record each wait they would sleep instead of
  sleeping it, sync and async alike.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from resilient import _driver, _fork
from resilient.retry import instant_retries

__all__ = ["FakeClock", "instant_retries", "record_sleeps"]


class FakeClock:
    """Monotonic seconds that move only when a test says so.

    >>> clock = FakeClock()
    >>> clock.advance(1.5)
    >>> clock()
    1001.5
    """

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backward: clocks here are monotonic)."""
        if not seconds >= 0:
            raise ValueError(f"a monotonic clock cannot move back: seconds={seconds!r}")
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"


_recording_lock = threading.Lock()
_fork.register_lock(_recording_lock)
_recording = False


@contextmanager
def record_sleeps() -> Iterator[list[float]]:
    """Record the seconds every retry wait would sleep, instead of sleeping, while the block runs.

    Yields the list the waits are appended to, in order, from every thread and
    task (sync ``time.sleep`` and async ``asyncio.sleep`` waits alike). The
    deadline still counts real time. Blocks cannot nest: a second one raises
    ``RuntimeError``, since two recorders would each see only some waits.
    """
    global _recording
    with _recording_lock:
        if _recording:
            raise RuntimeError("record_sleeps() is already active; blocks cannot nest")
        _recording = True
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    sleep, async_sleep = _driver.sleep, _driver.async_sleep
    _driver.sleep, _driver.async_sleep = waits.append, record
    try:
        yield waits
    finally:
        _driver.sleep, _driver.async_sleep = sleep, async_sleep
        with _recording_lock:
            _recording = False
