"""Fault injection for tests and game days: stages, an httpx transport, a TCP proxy, ASGI.

Resilience settings that were never seen failing are guesses. This package makes
the failures happen on purpose, at four depths, each reproducible with a seed and
each switchable while running (``enabled=`` takes a callable):

* **In the call**: :class:`Fault`, :class:`Latency`, :class:`Outcome` and
  :class:`Behavior` are the innermost stages of a :class:`~resilient.Policy`
  (``Policy(chaos=[...])``), so its retry, breaker and timeouts see the faults
  (:mod:`resilient.chaos.faults`).
* **In the HTTP client**: :class:`ChaosTransport` / :class:`AsyncChaosTransport`
  wrap an httpx transport and inject connection errors, read timeouts, 5xx or 429
  answers with ``Retry-After``, and latency (:mod:`resilient.chaos.transport`;
  loaded on first use, so the stages never import httpx).
* **On the wire**: :class:`FaultProxy` is a TCP proxy on 127.0.0.1 with
  Toxiproxy's toxics (latency with jitter, timeout, reset_peer, bandwidth,
  slicer), changed while it runs (:mod:`resilient.chaos.proxy`).
* **In the server**: :class:`FaultMiddleware` wraps an ASGI app and answers some
  requests per path prefix late or with an error status (:mod:`resilient.chaos.middleware`).

``import resilient`` does not import this package; ``import resilient.chaos`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient.chaos.faults import Behavior, Fault, Latency, Outcome
from resilient.chaos.middleware import FaultMiddleware, ServerFault
from resilient.chaos.proxy import FaultProxy, Toxic

if TYPE_CHECKING:
    from resilient.chaos.transport import AsyncChaosTransport, ChaosTransport

__all__ = [
    "AsyncChaosTransport",
    "Behavior",
    "ChaosTransport",
    "Fault",
    "FaultMiddleware",
    "FaultProxy",
    "Latency",
    "Outcome",
    "ServerFault",
    "Toxic",
]

_LAZY = {"AsyncChaosTransport", "ChaosTransport"}


def __getattr__(name: str) -> Any:
    # The transports import httpx; the stages must not need it (tests/test_imports.py).
    if name in _LAZY:
        from resilient.chaos import transport

        value = getattr(transport, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resilient.chaos' has no attribute {name!r}")
