"""A ``pybreaker.CircuitBreaker`` as the breaker stage of a :class:`~resilient.Policy`.

Users who already have pybreaker breakers keep them: pybreaker's own state
machine, thresholds, excluded exceptions, listeners and storage (memory or
Redis) decide, and this adapter only drives them as a :class:`~resilient.stages.Gate`.
It reads pybreaker's internals (``_lock``, ``_state_storage``, the state objects'
``_handle_success`` / ``_handle_error``): the canary in ``tests/test_compat.py``
fails first if they change. Two things differ from ``pybreaker.CircuitBreaker.call``, both on
purpose:

* pybreaker holds its lock while the protected call runs, serialising every
  call; here the lock is held only while pybreaker updates its state.
* In half-open, pybreaker lets calls through one at a time behind that lock;
  here one trial call runs and concurrent callers are rejected at once.

Rejections raise :class:`PyBreakerOpenError`, which is both a
:class:`resilient.CircuitOpenError` and a ``pybreaker.CircuitBreakerError``, so
either ``except`` clause catches it. Cancellation and interrupts
(``BaseException`` that is not ``Exception``) are not reported to pybreaker.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pybreaker

from resilient import _fork
from resilient.errors import CircuitOpenError

__all__ = ["PyBreakerOpenError", "PyBreakerStage"]

_PROBE = object()


class PyBreakerOpenError(CircuitOpenError, pybreaker.CircuitBreakerError):
    """A pybreaker breaker rejected the call; catchable as either library's error."""


def _noop() -> None:  # pragma: no cover - pybreaker only passes it to listeners
    """Stands in for the protected function in pybreaker's listener callbacks."""


class PyBreakerStage:
    """Drive a ``pybreaker.CircuitBreaker`` as a :class:`~resilient.stages.Gate`."""

    __slots__ = ("_breaker", "_probe", "name")

    def __init__(self, breaker: pybreaker.CircuitBreaker) -> None:
        self._breaker = breaker
        self._probe = threading.Lock()
        _fork.register_lock(self._probe)
        self.name: str = breaker.name or "pybreaker"

    def _rejected(self) -> PyBreakerOpenError:
        breaker = self._breaker
        opened_at = breaker._state_storage.opened_at
        retry_after = 0.0
        if opened_at is not None and breaker.current_state == pybreaker.STATE_OPEN:
            reopen = opened_at + timedelta(seconds=breaker.reset_timeout)
            retry_after = max(0.0, (reopen - datetime.now(UTC)).total_seconds())
        return PyBreakerOpenError(self.name, retry_after)

    def before_call(self) -> object:
        breaker = self._breaker
        with breaker._lock:
            state = breaker.state
            if state.name == pybreaker.STATE_OPEN:
                timeout = timedelta(seconds=breaker.reset_timeout)
                opened_at = breaker._state_storage.opened_at
                if opened_at and datetime.now(UTC) < opened_at + timeout:
                    raise self._rejected()
                breaker.half_open()
                state = breaker.state
            for listener in breaker.listeners:
                listener.before_call(breaker, _noop)
        if state.name == pybreaker.STATE_HALF_OPEN:
            if not self._probe.acquire(blocking=False):
                raise self._rejected()
            return _PROBE
        return None

    def _release(self, ticket: object) -> None:
        if ticket is _PROBE:
            self._probe.release()

    def on_success(self, ticket: object) -> None:
        breaker = self._breaker
        try:
            with breaker._lock:
                breaker.state._handle_success()
        finally:
            self._release(ticket)

    def on_failure(self, ticket: object, exc: Exception) -> None:
        breaker = self._breaker
        try:
            with breaker._lock:
                breaker.state._handle_error(exc, reraise=False)
        except pybreaker.CircuitBreakerError as tripped:
            # pybreaker's throw_new_error_on_trip: this failure opened the circuit.
            raise self._rejected() from tripped
        finally:
            self._release(ticket)

    def on_abort(self, ticket: object) -> None:
        self._release(ticket)

    def __repr__(self) -> str:
        return f"<PyBreakerStage {self.name!r} state={self._breaker.current_state}>"
