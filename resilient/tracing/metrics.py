"""The metric instruments `resilient` records to, one set per meter provider.

Names, units and attributes are in the README's "Tracing and metrics" table:
``resilient.calls``, ``resilient.call.duration``, ``resilient.call.attempts``,
``resilient.retries``, ``resilient.breaker.transitions`` and the observable gauge
``resilient.breaker.state`` (one series per live breaker and state). Instruments
are made once per provider (:func:`instruments_for`) and reused; OpenTelemetry is
imported on first use.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from resilient._compat.otel import provider_globals, proxy_meter_provider
from resilient.breaker import BreakerState, live_breakers

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

__all__ = [
    "ATTEMPT_BUCKETS",
    "DURATION_BUCKETS",
    "DURATION_BUCKETS_LONG",
    "SCOPE",
    "Instruments",
    "instruments_for",
    "library_version",
    "live_instruments",
]

#: The instrumentation scope of every tracer and meter `resilient` makes.
SCOPE: Final = "resilient"
# Bucket boundaries: call durations as in the HTTP semantic conventions, and attempts.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
DURATION_BUCKETS_LONG: Final = (*DURATION_BUCKETS, 7.5, 10.0, 30.0, 60.0)
ATTEMPT_BUCKETS: Final = (0, 1, 2, 3, 4, 5, 7, 10)


@functools.cache
def library_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("resilient")
    except metadata.PackageNotFoundError:  # pragma: no cover - not installed, run from source
        return None


# Instruments per meter provider, made once each (a second registration of the same
# names would make the SDK warn, and the breaker gauge report twice).
_instruments: weakref.WeakKeyDictionary[Any, Instruments | None] = weakref.WeakKeyDictionary()
_pinned: dict[int, tuple[object, Instruments | None]] = {}  # providers without weakrefs
_instruments_lock = threading.Lock()


class Instruments:
    """The metric instruments of one meter provider (names in the README's table)."""

    __slots__ = (
        "_call_attributes",
        "_policy_attributes",
        "_retry_attributes",
        "attempts",
        "calls",
        "duration",
        "retries",
        "state",
        "transitions",
    )

    def __init__(self, meter: Any) -> None:
        self.calls = meter.create_counter(
            "resilient.calls",
            unit="{call}",
            description="Calls through a Policy, by outcome.",
        )
        self.retries = meter.create_counter(
            "resilient.retries",
            unit="{retry}",
            description="Retries a Policy made, by the error that caused them.",
        )
        self.transitions = meter.create_counter(
            "resilient.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes, by the state entered.",
        )
        self.duration = _histogram(
            meter,
            "resilient.call.duration",
            "s",
            "Duration of calls through a Policy, waits and retries included.",
            DURATION_BUCKETS_LONG,
        )
        self.attempts = _histogram(
            meter,
            "resilient.call.attempts",
            "{attempt}",
            "Attempts made per call through a Policy (0 when it was rejected).",
            ATTEMPT_BUCKETS,
        )
        self.state = meter.create_observable_gauge(
            "resilient.breaker.state",
            callbacks=[_observe_breakers],
            unit="1",
            description="1 for the state each circuit breaker is in, 0 for the others.",
        )
        # Attribute dicts are reused: building one per call would cost more than the add.
        self._call_attributes: dict[tuple[str, str], dict[str, str]] = {}
        self._policy_attributes: dict[str, dict[str, str]] = {}
        self._retry_attributes: dict[tuple[str, str], dict[str, str]] = {}

    def record_call(self, policy: str, outcome: str, seconds: float, attempts: int) -> None:
        """Count one finished call and record its duration and attempts."""
        attributes = self._call_attributes.get((policy, outcome))
        if attributes is None:
            attributes = {"resilient.policy": policy, "resilient.outcome": outcome}
            self._call_attributes[policy, outcome] = attributes
        self.calls.add(1, attributes)
        self.duration.record(seconds, attributes)
        per_policy = self._policy_attributes.get(policy)
        if per_policy is None:
            per_policy = self._policy_attributes[policy] = {"resilient.policy": policy}
        self.attempts.record(attempts, per_policy)

    def record_retry(self, policy: str, error: str) -> None:
        """Count one retry of ``policy`` caused by ``error`` (an :func:`error_type`)."""
        attributes = self._retry_attributes.get((policy, error))
        if attributes is None:
            attributes = {"resilient.policy": policy, "error.type": error}
            self._retry_attributes[policy, error] = attributes
        self.retries.add(1, attributes)

    def record_transition(self, breaker: str, state: str) -> None:
        """Count one state change of ``breaker`` into ``state``."""
        self.transitions.add(1, {"resilient.breaker": breaker, "resilient.breaker.state": state})


def _histogram(
    meter: Any, name: str, unit: str, description: str, buckets: tuple[float, ...]
) -> Any:
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # pragma: no cover - opentelemetry-api older than 1.23
        return meter.create_histogram(name, unit=unit, description=description)


def instruments_for(provider: object) -> Instruments | None:
    """The instruments on ``provider`` (made on first use), or ``None`` for a no-op one."""
    try:
        return _instruments[provider]
    except KeyError:
        pass
    except TypeError:
        pinned = _pinned.get(id(provider))
        if pinned is not None and pinned[0] is provider:
            return pinned[1]
    with _instruments_lock:
        try:
            return _instruments[provider]
        except (KeyError, TypeError):
            pass
        from opentelemetry import metrics

        instruments: Instruments | None = None
        if not isinstance(provider, metrics.NoOpMeterProvider) and (
            provider is not proxy_meter_provider()
        ):
            meter = provider.get_meter(SCOPE, library_version())  # type: ignore[attr-defined]
            if not isinstance(meter, metrics.NoOpMeter):
                instruments = Instruments(meter)
        try:
            _instruments[provider] = instruments
        except TypeError:
            _pinned[id(provider)] = (provider, instruments)
        return instruments


def live_instruments() -> list[Instruments]:
    """Every meter provider's instruments, the global provider's included once it is set."""
    if "opentelemetry.metrics" in sys.modules:
        provider = provider_globals()[1]._METER_PROVIDER
        if provider is not None:
            instruments_for(provider)
    with _instruments_lock:
        found = [*_instruments.values(), *(pair[1] for pair in _pinned.values())]
    return [instruments for instruments in found if instruments is not None]


def _observe_breakers(options: CallbackOptions) -> Iterable[Observation]:
    """The breaker state gauge: one series per breaker and state, 1 for the current one.

    Reads each breaker's stored state without side effects: an open breaker
    whose ``reset_timeout`` has passed turns half-open on its next call, not here.
    """
    from opentelemetry.metrics import Observation

    for breaker in live_breakers():
        current = breaker.stored_state
        for state in BreakerState:
            yield Observation(
                1 if state is current else 0,
                {"resilient.breaker": breaker.name, "resilient.breaker.state": state.value},
            )
