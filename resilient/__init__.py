"""Resilience middleware for Python services.

Deadlines that flow through contextvars, retries with jittered backoff and a
retry budget, circuit breakers, bulkheads, and one :class:`Policy` that fuses
them, for sync and async functions alike; and the routing pieces beside the
call path: a consistent hash ring and a sharded map for per-key state. See the
README for a tour.
"""

from typing import Any as _Any

from resilient.adaptive import AIMD, AdaptiveLimit, Gradient2
from resilient.breaker import (
    BreakerEvent,
    BreakerMetrics,
    BreakerSpec,
    BreakerState,
    BreakerStore,
    BreakerStoreFactory,
    CircuitBreaker,
    InMemoryBreakerStore,
)
from resilient.bulkhead import Bulkhead
from resilient.deadline import (
    DEADLINE_HEADER,
    carry,
    check_deadline,
    deadline,
    deadline_at,
    format_deadline_header,
    parse_deadline_header,
    remaining,
)
from resilient.errors import (
    BulkheadFull,
    CircuitOpenError,
    DeadlineExceeded,
    QuorumError,
    RateLimited,
    ResilientError,
)
from resilient.fallback import Fallback
from resilient.hashring import BoundedLoadRing, EmptyRingError, HashRing
from resilient.hedge import AdaptiveDelay, Hedge, HedgeBudget
from resilient.policy import Policy
from resilient.quorum import QuorumResult, quorum, quorum_sync
from resilient.ratelimit import MemoryRateStore, RateLimiter, RateStore
from resilient.retry import (
    Backoff,
    BudgetStore,
    Retry,
    RetryBudget,
    RetryEvent,
    SharedBudget,
    instant_retries,
)
from resilient.shardmap import ShardedMap
from resilient.stages import (
    Admission,
    CallObserver,
    CallRecord,
    Gate,
    Injector,
    MeasuredAdmission,
    Retrier,
)
from resilient.transport import (
    AsyncResilientTransport,
    ResilientTransport,
    TransportBulkheadFull,
    TransportCircuitOpen,
    TransportDeadlineExceeded,
)


def __getattr__(name: str) -> _Any:
    # __version__ is read from the installed metadata on first use: importing
    # importlib.metadata costs about a quarter of `import resilient`.
    if name == "__version__":
        from importlib import metadata

        try:
            version = metadata.version("resilient")
        except metadata.PackageNotFoundError:  # pragma: no cover - a source tree, not installed
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    raise AttributeError(f"module 'resilient' has no attribute {name!r}")


__all__ = [
    "AIMD",
    "DEADLINE_HEADER",
    "AdaptiveDelay",
    "AdaptiveLimit",
    "Admission",
    "AsyncResilientTransport",
    "Backoff",
    "BoundedLoadRing",
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerSpec",
    "BreakerState",
    "BreakerStore",
    "BreakerStoreFactory",
    "BudgetStore",
    "Bulkhead",
    "BulkheadFull",
    "CallObserver",
    "CallRecord",
    "CircuitBreaker",
    "CircuitOpenError",
    "DeadlineExceeded",
    "EmptyRingError",
    "Fallback",
    "Gate",
    "Gradient2",
    "HashRing",
    "Hedge",
    "HedgeBudget",
    "InMemoryBreakerStore",
    "Injector",
    "MeasuredAdmission",
    "MemoryRateStore",
    "Policy",
    "QuorumError",
    "QuorumResult",
    "RateLimited",
    "RateLimiter",
    "RateStore",
    "ResilientError",
    "ResilientTransport",
    "Retrier",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "ShardedMap",
    "SharedBudget",
    "TransportBulkheadFull",
    "TransportCircuitOpen",
    "TransportDeadlineExceeded",
    "carry",
    "check_deadline",
    "deadline",
    "deadline_at",
    "format_deadline_header",
    "instant_retries",
    "parse_deadline_header",
    "quorum",
    "quorum_sync",
    "remaining",
]
