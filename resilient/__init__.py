"""Resilience middleware for Python services.

Deadlines that flow through contextvars, retries with jittered backoff and a
retry budget, circuit breakers, bulkheads, and one :class:`Policy` that fuses
them, for sync and async functions alike; and the routing pieces beside the
call path: a consistent hash ring and a sharded map for per-key state. See the
README for a tour.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from resilient.breaker import (
    BreakerEvent,
    BreakerMetrics,
    BreakerState,
    BreakerStore,
    CircuitBreaker,
    InMemoryBreakerStore,
)
from resilient.bulkhead import Bulkhead
from resilient.deadline import (
    DEADLINE_HEADER,
    check_deadline,
    deadline,
    deadline_at,
    format_deadline_header,
    parse_deadline_header,
    remaining,
)
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, ResilientError
from resilient.hashring import BoundedLoadRing, EmptyRingError, HashRing
from resilient.policy import Policy
from resilient.retry import Backoff, Retry, RetryBudget, RetryEvent, instant_retries
from resilient.shardmap import ShardedMap
from resilient.stages import Admission, CallObserver, CallRecord, Gate, Retrier
from resilient.transport import (
    AsyncResilientTransport,
    ResilientTransport,
    TransportBulkheadFull,
    TransportCircuitOpen,
    TransportDeadlineExceeded,
)

try:
    __version__ = _version("resilient")
except _PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
    __version__ = "0+unknown"

__all__ = [
    "DEADLINE_HEADER",
    "Admission",
    "AsyncResilientTransport",
    "Backoff",
    "BoundedLoadRing",
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerState",
    "BreakerStore",
    "Bulkhead",
    "BulkheadFull",
    "CallObserver",
    "CallRecord",
    "CircuitBreaker",
    "CircuitOpenError",
    "DeadlineExceeded",
    "EmptyRingError",
    "Gate",
    "HashRing",
    "InMemoryBreakerStore",
    "Policy",
    "ResilientError",
    "ResilientTransport",
    "Retrier",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "ShardedMap",
    "TransportBulkheadFull",
    "TransportCircuitOpen",
    "TransportDeadlineExceeded",
    "check_deadline",
    "deadline",
    "deadline_at",
    "format_deadline_header",
    "instant_retries",
    "parse_deadline_header",
    "remaining",
]
