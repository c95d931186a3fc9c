"""The metric instruments `resilient` records to, one set per meter provider.

Names, units and attributes are in the README's "Tracing and metrics" table:
``resilient.calls``, ``resilient.call.duration``, ``resilient.call.attempts``,
``resilient.retries``, ``resilient.breaker.transitions`` and the observable gauge
``resilient.breaker.state`` (one series per live breaker and state), and the
observable gauge ``resilient.bulkhead.limit`` (one series per bulkhead with an
adaptive limit, its current value, read only when a reader collects). Instruments
are made once per provider (:func:`instruments_for`) and reused; OpenTelemetry is
imported on first use.

The attribute dicts a call is recorded with are made once per policy and outcome,
not per call: :class:`PolicyAttributes` holds one policy's. :class:`Instruments`
keeps those of at most :data:`MAX_POLICIES` policy names; a caller with many
short-lived names (the httpx transport: one per origin) keeps its own
:class:`PolicyAttributes` with each name's state and passes it instead of the name,
so they go when that state goes.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from resilient import _fork
from resilient._compat.otel import provider_globals, proxy_meter_provider
from resilient.adaptive import live_limits
from resilient.breaker import BreakerState, live_breakers

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

__all__ = [
    "ATTEMPT_BUCKETS",
    "DURATION_BUCKETS",
    "DURATION_BUCKETS_LONG",
    "MAX_POLICIES",
    "SCOPE",
    "Instruments",
    "PolicyAttributes",
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
#: How many policy names' attribute sets one :class:`Instruments` keeps; past it, they
#: are dropped and made again as calls come (so memory does not grow with the names).
MAX_POLICIES: Final = 256


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
_fork.register_lock(_instruments_lock)


class PolicyAttributes:
    """The attribute dicts one policy's metrics are recorded with, each made once.

    ``resilient.policy`` alone (``per_policy``), with each ``resilient.outcome``
    (:meth:`for_call`), and with each ``error.type`` of a retry (:meth:`for_retry`).
    Reused call after call: building a dict per call would cost more than the add.
    """

    __slots__ = ("_calls", "_retries", "name", "per_policy")

    def __init__(self, name: str) -> None:
        self.name = name
        self.per_policy = {"resilient.policy": name}
        self._calls: dict[str, dict[str, str]] = {}
        self._retries: dict[str, dict[str, str]] = {}

    def for_call(self, outcome: str) -> dict[str, str]:
        """The attributes of a call that ended with ``outcome``."""
        attributes = self._calls.get(outcome)
        if attributes is None:
            attributes = {"resilient.policy": self.name, "resilient.outcome": outcome}
            self._calls[outcome] = attributes
        return attributes

    def for_retry(self, error: str) -> dict[str, str]:
        """The attributes of a retry caused by ``error`` (an ``error.type``)."""
        attributes = self._retries.get(error)
        if attributes is None:
            attributes = {"resilient.policy": self.name, "error.type": error}
            self._retries[error] = attributes
        return attributes


class Instruments:
    """The metric instruments of one meter provider (names in the README's table).

    ``policy`` is a policy's name, whose :class:`PolicyAttributes` are kept here
    (for at most :data:`MAX_POLICIES` names), or a :class:`PolicyAttributes` the
    caller keeps itself.
    """

    __slots__ = (
        "_policies",
        "attempts",
        "calls",
        "duration",
        "hedges",
        "limit",
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
        self.hedges = meter.create_counter(
            "resilient.hedges",
            unit="{hedge}",
            description="Hedged attempts a Policy sent, and those that answered first.",
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
        self.limit = meter.create_observable_gauge(
            "resilient.bulkhead.limit",
            callbacks=[_observe_limits],
            unit="{call}",
            description="The current concurrency limit of each bulkhead with an adaptive limit.",
        )
        self._policies: dict[str, PolicyAttributes] = {}

    def attributes_for(self, policy: str) -> PolicyAttributes:
        """The attribute sets of the policy named ``policy``, kept for the next calls."""
        policies = self._policies
        found = policies.get(policy)
        if found is None:
            if len(policies) >= MAX_POLICIES:
                # Rare (many names at once): start over rather than pay for LRU bookkeeping
                # on every call. A racing thread may lose an entry; it is made again.
                policies.clear()
            found = policies[policy] = PolicyAttributes(policy)
        return found

    def record_call(
        self, policy: str | PolicyAttributes, outcome: str, seconds: float, attempts: int
    ) -> None:
        """Count one finished call and record its duration and attempts."""
        sets = policy if isinstance(policy, PolicyAttributes) else self.attributes_for(policy)
        attributes = sets.for_call(outcome)
        self.calls.add(1, attributes)
        self.duration.record(seconds, attributes)
        self.attempts.record(attempts, sets.per_policy)

    def record_retry(self, policy: str | PolicyAttributes, error: str) -> None:
        """Count one retry of ``policy`` caused by ``error`` (an :func:`error_type`)."""
        sets = policy if isinstance(policy, PolicyAttributes) else self.attributes_for(policy)
        self.retries.add(1, sets.for_retry(error))

    def record_hedge(self, policy: str, outcome: str) -> None:
        """Count one hedge of ``policy``: ``"sent"``, or ``"won"`` when it answered first."""
        self.hedges.add(1, {"resilient.policy": policy, "resilient.hedge.outcome": outcome})

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


def _observe_limits(options: CallbackOptions) -> Iterable[Observation]:
    """The adaptive limit gauge: one series per bulkhead (or RPC server) with one, by name."""
    from opentelemetry.metrics import Observation

    for limit in live_limits():
        yield Observation(limit.limit, {"resilient.bulkhead": limit.owner or "unnamed"})
