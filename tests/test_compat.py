"""Canaries for the other libraries' internals that resilient._compat reads.

Each test fails, with a message saying what changed upstream, before the code that
relies on the internal silently slows down or misbehaves.
"""

from __future__ import annotations

import threading

import pybreaker
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_internal

from resilient._compat import otel
from resilient._compat.pybreaker import PyBreakerStage


def test_opentelemetry_still_keeps_its_providers_in_module_globals() -> None:
    """The drivers' free "is anyone listening?" test reads these two variables inline."""
    assert hasattr(trace, "_TRACER_PROVIDER"), (
        "opentelemetry.trace no longer has _TRACER_PROVIDER: every traced call now pays "
        "for the public getter; update resilient/_compat/otel.py"
    )
    assert hasattr(metrics_internal, "_METER_PROVIDER"), (
        "opentelemetry.metrics._internal no longer has _METER_PROVIDER; "
        "update resilient/_compat/otel.py"
    )
    assert otel.uses_private_globals()
    assert otel.proxy_meter_provider() is not None, "_PROXY_METER_PROVIDER moved"


def test_stand_ins_for_renamed_api_globals_read_the_public_getters() -> None:
    """If the API renames its provider variables, the public getters answer (None: unset)."""
    assert otel._PublicTraces()._TRACER_PROVIDER is None
    assert otel._PublicMeters()._METER_PROVIDER is None


def test_pybreaker_still_has_the_internals_the_gate_drives() -> None:
    """The pybreaker gate takes pybreaker's lock and calls its state objects' handlers."""
    breaker = pybreaker.CircuitBreaker(fail_max=2)
    assert isinstance(breaker._lock, type(threading.RLock())), "pybreaker's _lock changed"
    assert hasattr(breaker._state_storage, "opened_at"), "pybreaker's storage lost opened_at"
    state = breaker.state
    assert callable(getattr(state, "_handle_success", None)), "_handle_success is gone"
    assert callable(getattr(state, "_handle_error", None)), "_handle_error is gone"
    gate = PyBreakerStage(breaker)
    ticket = gate.before_call()
    gate.on_failure(ticket, RuntimeError("one"))
    assert breaker.fail_counter == 1
    gate.on_success(gate.before_call())
    assert breaker.fail_counter == 0


def test_httpx_still_keeps_its_parsed_url_for_the_origin_key() -> None:
    """The transport names each request's origin from httpx's parsed URL, lower-cased."""
    import httpx

    from resilient._compat import httpx as compat_httpx

    assert compat_httpx.uses_parsed_url(), (
        "httpx.URL no longer has _uri_reference: every request now pays for the public "
        "properties; update resilient/_compat/httpx.py"
    )
    url = httpx.URL("HTTPS://API.Example.test:8443/path")
    assert compat_httpx.origin_key(url) == ("https", "api.example.test", 8443)
    assert compat_httpx._public_origin_key(url) == compat_httpx.origin_key(url)
    assert compat_httpx.origin_key(httpx.URL("http://a.test/")) == ("http", "a.test", None)
