"""OpenTelemetry spans and metrics for :class:`~resilient.Policy`, free when nobody listens.

A Policy call makes one span (named after the function's ``__qualname__``, or
the Policy's ``name``) with an event per retry and per breaker rejection, and
records the metrics listed in the README's "Tracing and metrics" section.
Circuit breakers report their state changes as events on the current span and
count them; an observable gauge reports each live breaker's state.

What it costs
-------------
Nothing is recorded unless somebody listens: an explicit ``tracer_provider=`` or
``meter_provider=``, or a real provider set globally through the OpenTelemetry
API (at any time, before or after the Policy was built). The drivers in
:mod:`resilient.policy` decide that with an inline test per call, no function
call, on the API's own global provider variables (``_TRACER_PROVIDER``,
``_METER_PROVIDER``: ``None`` until a provider is set). Only when that test
passes do they call :meth:`CallSite.begin`, which resolves the tracer and the
instruments (``None`` for the API's no-op providers) and returns a :class:`Call`
recorder, or ``None`` when neither is real.

Internal API (used by :mod:`resilient.policy` and :mod:`resilient.transport`)
-------------------------------------------------------------------------------
* :func:`provider_globals` — ``(traces, meters)``: read ``traces._TRACER_PROVIDER``
  and ``meters._METER_PROVIDER`` per call; both ``None`` means nothing is set globally.
* :class:`Telemetry` — one Policy's providers: ``explicit``, :meth:`Telemetry.wanted`
  (the per-call test, to inline), :meth:`Telemetry.tracer`, :meth:`Telemetry.instruments`.
* :mod:`resilient.tracing.metrics` — :class:`~resilient.tracing.metrics.Instruments`,
  the metric instruments of one meter provider (``record_call``, ``record_retry``,
  ``record_transition``), and :func:`~resilient.tracing.metrics.instruments_for`.
* :class:`CallSite` and :class:`Call` — one decorated function, one call's recorder.
* :class:`HedgeEvents` — a hedged Policy's listener: span events and counts of hedges;
  :class:`HedgedCallSite` — a hedged Policy's call site, whose records count the hedges.
* :func:`breaker_state_changed` — subscribed to every circuit breaker's state changes.
* :func:`error_type` and :func:`outcome_of` — the values of ``error.type`` and
  ``resilient.outcome``; :func:`circuit_open_event` — a breaker's refusal on a span.

OpenTelemetry is imported on first use (when a Policy's driver is built, or an
explicit provider is given), not by ``import resilient``.
"""

from __future__ import annotations

import contextvars
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from resilient._compat.otel import provider_globals
from resilient.breaker import BreakerEvent, subscribe
from resilient.deadline import current as _current_deadline
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded
from resilient.tracing.metrics import SCOPE, Instruments, instruments_for, library_version
from resilient.tracing.metrics import live_instruments as _live_instruments

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider


__all__ = [
    "OUTCOMES",
    "Call",
    "CallSite",
    "HedgeEvents",
    "HedgedCallSite",
    "Telemetry",
    "breaker_state_changed",
    "circuit_open_event",
    "error_type",
    "outcome_of",
    "provider_globals",
]

OUTCOMES: Final = (
    "success",
    "failure",
    "circuit_open",
    "bulkhead_full",
    "deadline_exceeded",
    "cancelled",
)
"""The values of the ``resilient.outcome`` attribute; see :func:`outcome_of`."""


_perf_counter = time.perf_counter
_monotonic = time.monotonic
_INF = math.inf
# The record of the hedged call running in this context (see HedgedCallSite): the
# Hedge's listener adds each attempt it starts to it.
_HEDGED_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "resilient.tracing.hedged_call", default=None
)


# The API modules Call needs, bound on first use (a Call with a span implies they are).
_otel_context: Any = None
_otel_trace: Any = None


def _tracer_for(provider: object) -> Tracer | None:
    """The provider's tracer for this library, or ``None`` if it would record nothing."""
    global _otel_context, _otel_trace
    from opentelemetry import context, trace

    _otel_context, _otel_trace = context, trace

    if isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider):
        return None
    tracer = provider.get_tracer(SCOPE, library_version())  # type: ignore[attr-defined]
    if isinstance(tracer, trace.NoOpTracer | trace.ProxyTracer):
        return None  # e.g. the SDK's provider with OTEL_SDK_DISABLED=true
    return tracer  # type: ignore[no-any-return]


class Telemetry:
    """The providers one Policy records to: explicit ones, or else the global ones.

    ``explicit`` is true when a provider was given, which turns recording on
    for that signal whatever the globals say. :meth:`tracer` and
    :meth:`instruments` resolve the provider in force (the global one may be
    set at any time) and cache the result per provider, so repeated calls cost
    a few attribute reads.
    """

    __slots__ = ("_metrics", "_tracing", "explicit", "meter_provider", "tracer_provider")

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        get_tracer = getattr(tracer_provider, "get_tracer", None)
        if tracer_provider is not None and not callable(get_tracer):
            raise TypeError(
                f"tracer_provider must be an OpenTelemetry TracerProvider, got {tracer_provider!r}"
            )
        get_meter = getattr(meter_provider, "get_meter", None)
        if meter_provider is not None and not callable(get_meter):
            raise TypeError(
                f"meter_provider must be an OpenTelemetry MeterProvider, got {meter_provider!r}"
            )
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.explicit = tracer_provider is not None or meter_provider is not None
        # (provider, what it resolved to), replaced as one tuple so threads see pairs.
        self._tracing: tuple[object, Tracer | None] = (None, None)
        self._metrics: tuple[object, Instruments | None] = (None, None)
        if meter_provider is not None:
            instruments_for(meter_provider)  # its breaker gauge reports from now on

    def wanted(self) -> bool:
        """Whether a call should ask for a recorder; hot paths inline this test::

            if (
                explicit
                or traces._TRACER_PROVIDER is not None
                or meters._METER_PROVIDER is not None
            ):
                call = site.begin(args, kwargs)  # None still: no-op providers record nothing

        with ``explicit`` and ``(traces, meters) = provider_globals()`` in closure cells.
        Keep ``traces`` and ``meters`` the API modules there (no stand-ins for explicit
        providers): one type per attribute read keeps the interpreter's inline cache hot.
        """
        traces, meters = provider_globals()
        return (
            self.explicit
            or traces._TRACER_PROVIDER is not None
            or meters._METER_PROVIDER is not None
        )

    def tracer(self) -> Tracer | None:
        """The tracer to record spans with, or ``None`` when tracing is off."""
        provider: object = self.tracer_provider
        if provider is None:
            provider = provider_globals()[0]._TRACER_PROVIDER
            if provider is None:
                return None
        seen, tracer = self._tracing
        if provider is not seen:
            tracer = _tracer_for(provider)
            self._tracing = (provider, tracer)
        return tracer

    def instruments(self) -> Instruments | None:
        """The metric instruments to record with, or ``None`` when metrics are off."""
        provider: object = self.meter_provider
        if provider is None:
            provider = provider_globals()[1]._METER_PROVIDER
            if provider is None:
                return None
        seen, instruments = self._metrics
        if provider is not seen:
            instruments = instruments_for(provider)
            self._metrics = (provider, instruments)
        return instruments


# Circuit breakers ---------------------------------------------------------------------


def breaker_state_changed(event: BreakerEvent) -> None:
    """A breaker changed state: an event on the current span, and a count per meter provider.

    Subscribed to every breaker's events (:func:`resilient.breaker.subscribe`) when
    this module is imported.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "resilient.breaker.state_change",
                {
                    "resilient.breaker": event.name,
                    "resilient.breaker.state": event.new_state.value,
                    "resilient.breaker.previous_state": event.old_state.value,
                    "resilient.breaker.reason": event.reason,
                },
            )
    for instruments in _live_instruments():
        instruments.record_transition(event.name, event.new_state.value)


subscribe(breaker_state_changed)


# Calls --------------------------------------------------------------------------------


def outcome_of(error: BaseException | None) -> str:
    """The ``resilient.outcome`` of a call that raised ``error`` (``None``: it returned)."""
    if error is None:
        return "success"
    if isinstance(error, CircuitOpenError):
        return "circuit_open"
    if isinstance(error, BulkheadFull):
        return "bulkhead_full"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(error, Exception):
        return "failure"
    return "cancelled"  # cancellation and interrupts say nothing about the dependency


def error_type(error: BaseException) -> str:
    """``error.type`` as the semantic conventions ask: the exception's qualified class name."""
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def circuit_open_event(span: Span, error: CircuitOpenError) -> None:
    """Record on ``span`` that a breaker refused a call: ``resilient.circuit_open``."""
    attributes: dict[str, str | float] = {"resilient.breaker": error.name}
    if error.retry_after != _INF:
        attributes["resilient.retry_after"] = error.retry_after
    span.add_event("resilient.circuit_open", attributes)


class CallSite:
    """One function wrapped by a Policy: its span name, telemetry and timeout.

    The driver calls :meth:`begin` only when the test of :meth:`Telemetry.wanted` passes.
    """

    __slots__ = ("name", "telemetry", "timeout")

    def __init__(self, name: str, telemetry: Telemetry, timeout: float | None) -> None:
        self.name = name
        self.telemetry = telemetry
        self.timeout = timeout

    @property
    def explicit(self) -> bool:
        """Whether a provider was given, so that every call asks :meth:`begin`."""
        return self.telemetry.explicit

    def begin(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Call | None:
        """Start recording one call (its span becomes current), or ``None`` if nobody listens."""
        telemetry = self.telemetry
        tracer = telemetry.tracer()
        instruments = telemetry.instruments()
        if tracer is None and instruments is None:
            return None
        return self._record(self, tracer, instruments)

    # What begin() records a call with (HedgedCallSite's records do one thing more).
    _record: type[Call]


class HedgedCallSite(CallSite):
    """A hedged Policy's call site: its record counts every attempt the Hedge starts.

    The driver around a :class:`~resilient.Hedge` sees one attempt, the hedge; the
    hedge's :class:`HedgeEvents` finds this call's record through a context variable
    set here (and reset by :meth:`Call.end`) and adds each attempt it starts, so the
    span's ``resilient.attempts`` and the ``resilient.call.attempts`` histogram say
    how many attempts the call made.
    """

    __slots__ = ()


class Call:
    """One call being recorded: its span (current while it runs) and its counts.

    The driver adds one to ``attempts`` per attempt, sets ``error`` when the call
    raises, and calls :meth:`end` exactly once, when it returns or raises.
    """

    __slots__ = ("attempts", "budget", "error", "instruments", "site", "span", "started", "token")

    def __init__(self, site: CallSite, tracer: Tracer | None, instruments: Instruments | None):
        self.site = site
        self.instruments = instruments
        self.attempts = 0
        self.error: BaseException | None = None
        self.span: Span | None = None
        self.token: Token[Context] | None = None  # set with span
        self.budget: float | None = None
        if tracer is not None:
            budget = _current_deadline()
            timeout = site.timeout
            if budget != _INF or timeout is not None:
                budget -= _monotonic()
                self.budget = timeout if timeout is not None and timeout < budget else budget
            # Attributes are set at the end, all at once: the SDK charges more for
            # attributes given to start_span than for the same ones set later.
            self.span = span = tracer.start_span(site.name)
            self.token = _otel_context.attach(_otel_trace.set_span_in_context(span))
        self.started = 0.0 if instruments is None else _perf_counter()

    def retrying(self, attempt: int, error: BaseException | None, wait: float) -> None:
        """Attempt ``attempt`` failed with ``error`` (``None``: its result); a retry follows."""
        kind = "result" if error is None else error_type(error)
        span = self.span
        if span is not None:
            span.add_event(
                "resilient.retry",
                {"resilient.attempt": attempt, "error.type": kind, "resilient.retry.wait": wait},
            )
        if self.instruments is not None:
            self.instruments.record_retry(self.site.name, kind)

    def rejected(self, error: Exception) -> None:
        """The gate refused an attempt: ``resilient.circuit_open`` for a breaker's refusal."""
        span = self.span
        if span is not None:
            if isinstance(error, CircuitOpenError):
                circuit_open_event(span, error)
            else:
                span.add_event("resilient.rejected", {"error.type": error_type(error)})

    def end(self) -> None:
        """The call returned (``error`` is ``None``) or raised ``error``: record it."""
        error = self.error
        outcome = "success" if error is None else outcome_of(error)
        span = self.span
        if span is not None:
            attributes: dict[str, str | int | float] = {
                "resilient.outcome": outcome,
                "resilient.attempts": self.attempts,
            }
            if self.budget is not None:
                attributes["resilient.deadline.budget"] = self.budget
            if error is not None and isinstance(error, Exception):
                attributes["error.type"] = error_type(error)
                span.record_exception(error)
                span.set_status(
                    _otel_trace.Status(
                        _otel_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"
                    )
                )
            span.set_attributes(attributes)
            _otel_context.detach(self.token)
            span.end()
        instruments = self.instruments
        if instruments is not None:
            seconds = _perf_counter() - self.started
            instruments.record_call(self.site.name, outcome, seconds, self.attempts)


class _HedgedCall(Call):
    """A hedged call's record: findable by the Hedge's listener while the call runs."""

    __slots__ = ("hedged",)

    def __init__(self, site: CallSite, tracer: Tracer | None, instruments: Instruments | None):
        super().__init__(site, tracer, instruments)
        self.hedged: Token[Call | None] | None = _HEDGED_CALL.set(self)

    def end(self) -> None:
        if self.hedged is not None:
            _HEDGED_CALL.reset(self.hedged)
            self.hedged = None
        super().end()


CallSite._record = Call
HedgedCallSite._record = _HedgedCall


class HedgeEvents:
    """Tracing as a :class:`~resilient.hedge.HedgeListener`: span events and counters.

    Each hedge sent is a ``resilient.hedge`` event on the call's span and counts in
    ``resilient.hedges`` (``resilient.hedge.outcome="sent"``); a hedge that answered
    first is a ``resilient.hedge.won`` event and counts as ``"won"``. Hedges are
    rare, so these ask the providers each time instead of being set up per call.
    """

    __slots__ = ("name", "site", "telemetry")

    def __init__(self, name: str, telemetry: Telemetry, site: HedgedCallSite | None = None) -> None:
        self.name = name
        self.telemetry = telemetry
        # The call site whose records count the hedges as attempts (None: the caller,
        # such as the httpx transport, counts its attempts itself).
        self.site = site

    def hedged(self, attempt: int, elapsed: float) -> None:
        record = _HEDGED_CALL.get()
        if record is not None and record.site is self.site:
            record.attempts += 1
        self._record(
            "resilient.hedge",
            {"resilient.attempt": attempt, "resilient.hedge.elapsed": elapsed},
            "sent",
        )

    def won(self, attempt: int, attempts: int) -> None:
        if attempt > 1:
            self._record("resilient.hedge.won", {"resilient.attempt": attempt}, "won")

    def _record(self, event: str, attributes: dict[str, int | float], outcome: str) -> None:
        telemetry = self.telemetry
        if not telemetry.wanted():
            return
        if telemetry.tracer() is not None:
            span = _otel_trace.get_current_span()
            if span.is_recording():
                span.add_event(event, attributes)
        instruments = telemetry.instruments()
        if instruments is not None:
            instruments.record_hedge(self.name, outcome)
