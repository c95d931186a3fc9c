"""Where `resilient` reads other libraries' private internals, each behind a canary test.

* :mod:`resilient._compat.otel`: OpenTelemetry's global provider variables.
* :mod:`resilient._compat.httpx`: httpx's parsed URL, for each request's origin.
* :mod:`resilient._compat.pybreaker`: drives a ``pybreaker.CircuitBreaker`` as a gate.

Nothing outside this package reads another library's underscored names; each
module here has a canary in ``tests/test_compat.py`` that fails clearly when the
upstream internals it relies on change.
"""

__all__: list[str] = []
