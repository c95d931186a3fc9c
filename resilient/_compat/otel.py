"""OpenTelemetry's private provider globals, read in this one place.

A healthy call must learn "is any provider set?" for almost nothing, and the
API's public getters (``get_tracer_provider()``) cost a function call and return a
proxy. The API keeps its providers in module globals, ``None`` until one is set:
``opentelemetry.trace._TRACER_PROVIDER`` and
``opentelemetry.metrics._internal._METER_PROVIDER``. :func:`provider_globals`
returns the two modules, so a driver reads the variables inline. Should a future
API rename them, stand-ins read the public getters instead (slower, still
correct); the canary test in ``tests/test_compat.py`` fails first, so the change is
seen rather than silently slow.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["provider_globals", "proxy_meter_provider", "uses_private_globals"]

_traces: Any = None
_meters: Any = None


class _PublicTraces:
    """Stands in for ``opentelemetry.trace`` if its ``_TRACER_PROVIDER`` is ever renamed."""

    @property
    def _TRACER_PROVIDER(self) -> object:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        return None if isinstance(provider, trace.ProxyTracerProvider) else provider


class _PublicMeters:
    """Stands in for ``opentelemetry.metrics._internal`` if its ``_METER_PROVIDER`` goes."""

    @property
    def _METER_PROVIDER(self) -> object:
        from opentelemetry import metrics
        from opentelemetry.metrics import _internal

        provider = metrics.get_meter_provider()
        proxy = getattr(_internal, "_ProxyMeterProvider", None)
        return None if proxy is not None and isinstance(provider, proxy) else provider


def provider_globals() -> tuple[Any, Any]:
    """``(traces, meters)``: the objects whose provider variables a driver reads per call.

    ``traces._TRACER_PROVIDER`` and ``meters._METER_PROVIDER`` are the API's own
    globals, ``None`` until a provider is set: two attribute reads tell a driver
    that nothing is configured. If a future API renames them, stand-ins read the
    public getters instead (slower, still correct). Imports the API on first use.
    """
    global _traces, _meters
    if _traces is None:
        from opentelemetry import trace
        from opentelemetry.metrics import _internal as metrics_internal

        traces: Any = trace if hasattr(trace, "_TRACER_PROVIDER") else _PublicTraces()
        meters: Any = (
            metrics_internal if hasattr(metrics_internal, "_METER_PROVIDER") else _PublicMeters()
        )
        # A provider named by environment variable is only loaded by the first
        # get_*_provider() call; make it so now, so the variables show it.
        if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
            trace.get_tracer_provider()
        if "OTEL_PYTHON_METER_PROVIDER" in os.environ:
            from opentelemetry import metrics

            metrics.get_meter_provider()
        _traces, _meters = traces, meters
    return _traces, _meters


def uses_private_globals() -> bool:
    """Whether both private variables were found (``False``: the stand-ins are in use)."""
    traces, meters = provider_globals()
    return not isinstance(traces, _PublicTraces) and not isinstance(meters, _PublicMeters)


def proxy_meter_provider() -> object:
    """The API's placeholder meter provider, in force until a real one is set (or ``None``)."""
    from opentelemetry.metrics import _internal

    return getattr(_internal, "_PROXY_METER_PROVIDER", None)
