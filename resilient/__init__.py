"""Resilience middleware for Python services.

Deadlines that flow through contextvars, retries with jittered backoff and a
retry budget, circuit breakers, bulkheads, and one :class:`Policy` that fuses
them, for sync and async functions alike; and the routing pieces beside the
call path: a consistent hash ring and a sharded map for per-key state. See the
README for a tour.
"""

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
    format_deadline_header,
    parse_deadline_header,
    remaining,
)
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, ResilientError
from resilient.hashring import BoundedLoadRing, EmptyRingError, HashRing
from resilient.policy import Policy
from resilient.retry import Backoff, Retry, RetryBudget, RetryEvent, instant_retries
from resilient.shardmap import ShardedMap
from resilient.transport import (
    AsyncResilientTransport,
    ResilientTransport,
    TransportBulkheadFull,
    TransportCircuitOpen,
    TransportDeadlineExceeded,
)

__all__ = [
    "DEADLINE_HEADER",
    "AsyncResilientTransport",
    "Backoff",
    "BoundedLoadRing",
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerState",
    "BreakerStore",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpenError",
    "DeadlineExceeded",
    "EmptyRingError",
    "HashRing",
    "InMemoryBreakerStore",
    "Policy",
    "ResilientError",
    "ResilientTransport",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "ShardedMap",
    "TransportBulkheadFull",
    "TransportCircuitOpen",
    "TransportDeadlineExceeded",
    "check_deadline",
    "deadline",
    "format_deadline_header",
    "instant_retries",
    "parse_deadline_header",
    "remaining",
]
