"""The error tree: shape, messages, pickling."""

from __future__ import annotations

import math
import pickle

import pytest

import resilient
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, ResilientError


def test_every_error_is_a_resilient_error() -> None:
    """One except clause catches everything the toolkit raises."""
    for error in (DeadlineExceeded, CircuitOpenError, BulkheadFull):
        assert issubclass(error, ResilientError)
    assert issubclass(DeadlineExceeded, TimeoutError)


@pytest.mark.parametrize(
    "error",
    [
        DeadlineExceeded(),
        DeadlineExceeded("attempt took too long"),
        CircuitOpenError("payments", 1.5),
        CircuitOpenError("payments", math.inf),
        BulkheadFull("db", 4, 8),
    ],
)
def test_errors_pickle_with_their_fields(error: ResilientError) -> None:
    """Errors cross process boundaries intact: same type, message and attributes."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_messages_say_what_happened_and_what_to_do() -> None:
    """The open-circuit message names the breaker and when to come back."""
    assert "'payments' is open" in str(CircuitOpenError("payments", 1.5))
    assert "retry in 1.500 s" in str(CircuitOpenError("payments", 1.5))
    assert "reset()" in str(CircuitOpenError("payments", math.inf))
    full = str(BulkheadFull("db", 4, 8))
    assert "4 calls running" in full
    assert "8 waiting" in full


def test_errors_are_exported_at_top_level() -> None:
    """Users import errors from the package root."""
    assert resilient.CircuitOpenError is CircuitOpenError
    assert resilient.BulkheadFull is BulkheadFull
    assert resilient.ResilientError is ResilientError
