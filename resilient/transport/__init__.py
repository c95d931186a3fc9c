"""httpx transports that put every request of a client through a :class:`~resilient.Policy`.

:class:`ResilientTransport` wraps any ``httpx.BaseTransport`` and
:class:`AsyncResilientTransport` any ``httpx.AsyncBaseTransport``::

    client = httpx.Client(transport=ResilientTransport())
    async_client = httpx.AsyncClient(transport=AsyncResilientTransport())

Each **origin** (scheme, host, port) gets its own circuit breaker, retry budget
and, optionally, bulkhead, kept in a bounded :class:`~resilient.ShardedMap`, so
one sick host does not open the circuit for the others and memory does not grow
with the number of hosts seen.

What is retried follows RFC 9110's idempotency rules, as gRPC and the browsers do:

* failures before the request was sent (``ConnectError``, ``ConnectTimeout``,
  ``PoolTimeout``), whatever the method;
* for idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), and for POST
  and PATCH carrying an ``Idempotency-Key`` header or sent with
  ``retry_non_idempotent=True``: also read/write timeouts and errors, protocol
  errors from the server, and the statuses in ``retry_statuses`` (429, 502,
  503, 504);
* never a request whose body is a stream that cannot be sent twice.

A ``Retry-After`` on 429 and 503 (seconds or an HTTP date) replaces the
backoff's wait; when it asks for more than the deadline leaves, or more than
``max_retry_after``, the response is returned at once.

A failing response's body is never read whole, and never past the deadline. The
response the caller gets (retries ran out, or were off) comes as plain httpx would
return it, its body not yet read: ``client.stream()`` streams it, ``client.get()``
reads it. Before a retry, the previous response's body is drained, at most
:data:`DRAIN_LIMIT` bytes within the deadline, so its connection goes back to the
pool; a longer (or stalled) body is closed instead, and its connection dropped.

Breakers count connection errors, timeouts, 5xx responses (501 aside), 429
and any status listed in ``retry_statuses`` as failures; other 4xx responses
are the caller's problem and count as successes. Each attempt's timeouts are
clamped to the deadline in force (:func:`resilient.deadline`), and the
remaining budget can be sent downstream in the ``resilient-timeout-ms`` header.

Errors the transport raises are both ``httpx.TransportError`` subclasses and
the matching `resilient` error: :class:`TransportDeadlineExceeded` (an
``httpx.TimeoutException``, also when ``async with resilient.deadline()`` cancels
the request), :class:`TransportCircuitOpen`, :class:`TransportBulkheadFull`. Every response
carries what happened in ``response.extensions["resilient"]``, a read-only
mapping: ``attempts``, ``waited`` (seconds) and ``breaker`` (the origin's breaker
state).

A request to a healthy origin (breaker closed with no failure counted), with no
deadline in force, no bulkhead, no timeouts and no per-request options, takes a
fast path: it is sent at once, and only a failure goes to the policy, through
:meth:`~resilient.Policy.resume`: the breaker and the retry budget count that
attempt once, elapsed times start at its send, and the retries run from there.

The transport drives each origin's stages only through the stage contract of
:mod:`resilient.stages`. Each request's bookkeeping is the driver's record of it
(passed along as an argument, no ``ContextVar``), and the retry rules judge the
failure alone: the request's own facts pick one of the origin's three drivers
(idempotent, not idempotent, or never retried).

:class:`AsyncResilientTransport` can hedge (``hedge=``, a :class:`~resilient.Hedge`):
an idempotent request whose attempt is slow gets another beside it, and the first
answer wins. Hedged requests are not retried as well: a failure the retry rules
would retry starts the next hedge at once (within ``max_attempts``), and a response
asking to wait (``Retry-After``) is returned as it is. Non-idempotent requests are
never hedged; they keep the retry rules above. An origin that hedges takes no fast
path. The sync transport refuses ``hedge=``: a sync attempt cannot be cancelled.

Per request, ``extensions={"resilient": {"retry": False}}`` turns retries off
and ``{"idempotent": True}`` marks a POST or PATCH safe to retry (both booleans).

Per-origin state is public: :meth:`~ResilientTransport.origins` maps each origin
kept to its breaker's state, :meth:`~ResilientTransport.breaker_for` returns one
origin's breaker, and :meth:`~ResilientTransport.reset` closes one origin's breaker
(or every origin's) and gives it a fresh retry budget.

With an OpenTelemetry provider configured (globally or as ``tracer_provider=``
/ ``meter_provider=``), each attempt is a CLIENT span per the HTTP client
semantic conventions, carrying its ``traceparent`` to the server, and each
request feeds the ``resilient.*`` metrics with the origin as ``resilient.policy``
(see :mod:`resilient.tracing`). Such requests skip the fast path; with nothing
configured, the test costs a few attribute reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import sys
import time
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import httpx

from resilient import tracing as _tracing
from resilient._compat.httpx import OriginKey, origin_key
from resilient._config import DEFAULT, Default, Duration, check_int, to_seconds
from resilient.breaker import BreakerState, BreakerStore, CircuitBreaker
from resilient.deadline import DEADLINE_HEADER, format_deadline_header, remaining
from resilient.deadline import current as _current_deadline
from resilient.errors import (
    PROGRAMMING_ERRORS,
    BulkheadFull,
    CircuitOpenError,
    DeadlineExceeded,
    ResilientError,
)
from resilient.hedge import AdaptiveDelay, Hedge
from resilient.policy import Policy
from resilient.retry import Retry, RetryBudget
from resilient.shardmap import ShardedMap
from resilient.stages import Admission, Gate
from resilient.tracing.metrics import Instruments, PolicyAttributes
from resilient.transport._spans import HttpSpan
from resilient.transport.rules import (
    CALLER_FAULTS,
    IDEMPOTENT_METHODS,
    MAYBE_SENT,
    NOT_SENT,
    RETRY_STATUSES,
    ResponseFailure,
    is_idempotent,
    parse_retry_after,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = [
    "DRAIN_LIMIT",
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "AsyncResilientTransport",
    "ResilientTransport",
    "ResponseFailure",
    "TransportBulkheadFull",
    "TransportCircuitOpen",
    "TransportDeadlineExceeded",
    "default_breaker",
    "parse_retry_after",
]

_DEFAULT_RETRY: Final = Retry(attempts=3)
#: The most of a failing response's body read before a retry (plus at most one network
#: read), so its connection can be reused; a longer body is closed, and the connection
#: dropped, rather than read at length.
DRAIN_LIMIT: Final = 64 * 1024
_OPTIONS: Final = frozenset({"retry", "idempotent"})
_NO_TIMEOUTS: Final[Mapping[str, float | None]] = MappingProxyType({})


def _report(attempts: int, waited: float, state: BreakerState | None) -> Mapping[str, Any]:
    """What ``response.extensions["resilient"]`` holds: read-only, so it can be shared."""
    return MappingProxyType(
        {"attempts": attempts, "waited": waited, "breaker": None if state is None else state.value}
    )


# The report of a request answered at the first try, per breaker state: built once.
_FIRST_TRY: Final = {state: _report(1, 0.0, state) for state in (None, *BreakerState)}
_CLOSED: Final = BreakerState.CLOSED
_INF: Final = math.inf
# The OpenTelemetry API's modules holding the global providers (see
# resilient.tracing.provider_globals), bound by the first transport with tracing on.
_traces: Any = None
_meters: Any = None
_monotonic = time.monotonic
_perf_counter = time.perf_counter


# Errors --------------------------------------------------------------------------------


class TransportDeadlineExceeded(DeadlineExceeded, httpx.TimeoutException):
    """The deadline ran out; also an ``httpx.TimeoutException``."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        DeadlineExceeded.__init__(self, message)
        self._request = request


class TransportCircuitOpen(CircuitOpenError, httpx.TransportError):
    """The origin's breaker is open; also an ``httpx.TransportError``."""

    def __init__(
        self, name: str, retry_after: float, *, request: httpx.Request | None = None
    ) -> None:
        CircuitOpenError.__init__(self, name, retry_after)
        self._request = request


class TransportBulkheadFull(BulkheadFull, httpx.TransportError):
    """The origin's bulkhead is full; also an ``httpx.TransportError``."""

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        max_waiting: int,
        *,
        request: httpx.Request | None = None,
    ) -> None:
        BulkheadFull.__init__(self, name, max_concurrent, max_waiting)
        self._request = request


def _recover(error: ResilientError, request: httpx.Request) -> httpx.Response:
    """Map a resilient error at the transport boundary, or recover the last response.

    A breaker that opened during retries ends them; the caller then gets the
    last response, as when retries run out.
    """
    if isinstance(error, CircuitOpenError) and isinstance(error.__cause__, ResponseFailure):
        return error.__cause__.response
    twin = _as_transport_error(error, request)
    if twin is error:  # a stage of one's own refused: its error, as it raised it
        raise error
    raise twin from error


def _as_transport_error(error: ResilientError, request: httpx.Request) -> Exception:
    """The httpx-catchable twin of a resilient error, with its notes."""
    twin: Exception
    if isinstance(error, CircuitOpenError):
        twin = TransportCircuitOpen(error.name, error.retry_after, request=request)
    elif isinstance(error, BulkheadFull):
        twin = TransportBulkheadFull(
            error.name, error.max_concurrent, error.max_waiting, request=request
        )
    elif isinstance(error, DeadlineExceeded):
        twin = TransportDeadlineExceeded(str(error), request=request)
    else:  # a stage of one's own refused with an error of its own
        return error
    for note in getattr(error, "__notes__", ()):
        twin.add_note(note)
    return twin


# Per-call bookkeeping --------------------------------------------------------------------


class _Call:
    """One request on its way: the driver's record of it (a :class:`~resilient.CallRecord`).

    It travels as the attempt function's second argument, and the transport's
    observer hands it to the driver as the call's record: the driver counts the
    attempts and reports each retry's wait here, for ``response.extensions``.
    No ``__init__``: the defaults are class attributes, so making one per request
    costs no Python call.
    """

    request: httpx.Request
    attempts = 0
    waited = 0.0
    hedges = 0  # a hedged request's attempts started (see _hedge_attempt)
    error: BaseException | None = None
    # The caller's own timeouts, kept by the first attempt that clamps them.
    timeouts: Mapping[str, float | None] | None = None
    # The last attempt's failing response, its body unread: the caller gets it if no
    # retry follows; a retry drains or closes it first (see _release).
    pending: httpx.Response | None = None
    # Telemetry, when somebody listens (see _Core.begin): attempt spans, call metrics.
    tracer: Tracer | None = None
    root: HttpSpan | None = None  # the logical request's span, when nothing was current
    instruments: Instruments | None = None
    attributes: PolicyAttributes | None = None  # the origin's, for the metrics
    began = 0.0

    def retrying(self, attempt: int, error: BaseException | None, wait: float) -> None:
        self.waited += wait
        if self.instruments is not None and error is not None:
            if isinstance(error, ResponseFailure):
                kind = str(error.response.status_code)
            else:
                kind = _tracing.error_type(error)
            assert self.attributes is not None
            self.instruments.record_retry(self.attributes, kind)

    def rejected(self, error: Exception) -> None:
        """Recorded when the request ends (see _Core.end), like every other outcome."""

    def end(self) -> None:
        """The transport finishes the request itself, once it has the response."""
        self.error = None  # the transport's frames, which hold this record, are on its traceback


class _OwnRecord:
    """The observer of the transport's drivers: a request's record is its second argument."""

    explicit = True

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        call: _Call = args[1]  # not typing.cast: a Python call on every request
        return call


_OWN_RECORD: Final = _OwnRecord()
# A request's way through its origin's driver: (record, origin, driver, its arguments).
_Route = tuple[_Call, "_Host", Callable[..., Any], tuple[Any, ...]]

# Which of an origin's drivers a request goes through (see _Core.kind).
_IDEMPOTENT: Final = 0  # retried on every failure RFC 9110 allows for idempotent requests
_UNSAFE: Final = 1  # retried only when it never left (connection failures)
_ONCE: Final = 2  # never retried: retries are off, or the body cannot be sent twice


# Retry rules -----------------------------------------------------------------------------


_TOUCH_EVERY: Final = 64


# The shared core -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Host:
    """One origin's state: its prebuilt drivers, its stages and its breaker's store.

    The drivers hold the origin's breaker, bulkhead and retry budget; the breaker and
    bulkhead are kept here too, so the origin can be read and reset (and its drivers
    rebuilt around them, with a fresh budget).
    """

    # The origin, "scheme://host:port": it names the breaker and the call metrics.
    origin: str
    breaker: Gate | None
    bulkhead: Admission | None
    # The breaker's store, whose state is a plain read: reporting it on every response
    # must not run the breaker's lazy open -> half-open transition (and its listeners).
    store: BreakerStore | None
    # One driver per kind of request (_IDEMPOTENT, _UNSAFE, _ONCE), and for a fast
    # origin the entries that take a failed fast first attempt over (Policy.resume).
    drivers: tuple[Callable[..., Any], ...]
    resumes: tuple[Callable[..., Any], ...] | None
    # Whether a request may take the fast path (see ResilientTransport.handle_request):
    # no bulkhead, no timeouts, a breaker that records nothing on a healthy success,
    # and no explicit telemetry provider.
    fast: bool
    # tracing=False: the fast path need not ask whether a global provider is set.
    untraced: bool
    # The retry's clock and how it counts a call in its budget (None without retries).
    clock: Callable[[], float] | None
    count_call: Callable[[float], None] | None
    # The budget's current slice (see CallTally): counted inline while it lasts.
    slices: Any
    # The report of a fast first try, built once: the state is closed or there is none.
    first_try: Mapping[str, object]
    # The metric attribute sets named after the origin: they go when the origin goes.
    attributes: PolicyAttributes


class _Core:
    """Configuration and decisions shared by the sync and async transports."""

    def __init__(
        self,
        *,
        retry: Retry | None,
        hedge: Hedge | None,
        breaker: Callable[[str], Gate] | None,
        bulkhead: Callable[[str], Admission] | None,
        timeout: Duration | None,
        attempt_timeout: Duration | None,
        retry_statuses: Collection[int],
        retry_non_idempotent: bool,
        max_retry_after: Duration,
        propagate_deadline: bool,
        internal_hosts: Collection[str],
        max_hosts: int,
        tracing: bool,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
    ) -> None:
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a resilient.Retry or None, got {retry!r}")
        if retry is not None and retry.on_result is not None:
            raise ValueError(
                "the transport decides which responses are retried (retry_statuses); "
                f"give a Retry without on_result, got on_result={retry.on_result!r}"
            )
        if hedge is not None and not isinstance(hedge, Hedge):
            raise TypeError(f"hedge must be a resilient.Hedge or None, got {hedge!r}")
        if hedge is not None and hedge.discard is not None:
            raise ValueError(
                "the transport releases the responses that lose a hedge itself; give a Hedge "
                f"without discard, got discard={hedge.discard!r}"
            )
        _check_factory("breaker", breaker, "resilient.CircuitBreaker")
        _check_factory("bulkhead", bulkhead, "resilient.Bulkhead")
        statuses = frozenset(retry_statuses)
        for status in statuses:
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                raise ValueError(f"retry_statuses must hold HTTP status codes, got {status!r}")
        if isinstance(internal_hosts, str):
            raise TypeError(
                "internal_hosts must be a collection of host names, "
                f"got the string {internal_hosts!r}"
            )
        self.retry = retry
        self.hedge = hedge
        # The attempt a hedged request's attempts run (see AsyncResilientTransport).
        self.hedge_attempt: Callable[[httpx.Request, _Call], Any] | None = None
        self.breaker_factory = breaker
        self.bulkhead_factory = bulkhead
        # Policy validates and normalises the timeouts and the telemetry options; keep
        # its results for every origin.
        checked = Policy(
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            tracing=tracing,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.timeout = checked.timeout
        self.attempt_timeout = checked.attempt_timeout
        # None with tracing=False. Otherwise a request records (see begin) when
        # Telemetry.wanted(): a provider was given, or one is set globally, which the
        # fast path tests inline on the API's variables (see _traces).
        self.telemetry = checked.telemetry
        if self.telemetry is not None:
            global _traces, _meters
            _traces, _meters = _tracing.provider_globals()
        self.retry_statuses = statuses
        # What the breaker counts as a failure: 5xx but 501, 429, and the listed statuses.
        self.failing_statuses = frozenset({*range(500, 600), 429, *statuses} - {501})
        self.retry_non_idempotent = bool(retry_non_idempotent)
        self.max_retry_after = to_seconds("max_retry_after", max_retry_after, allow_inf=True)
        self.propagate_deadline = bool(propagate_deadline)
        self.internal_hosts = frozenset(host.lower() for host in internal_hosts)
        check_int("max_hosts", max_hosts, minimum=1)
        # Origins' state lives in a bounded map with exact LRU eviction (one shard).
        # Every request reads it, and LRU bookkeeping costs several Python calls, so
        # reads go through a plain dict index mirroring the map (evictions remove
        # entries); one read in _TOUCH_EVERY also touches the map, so busy origins
        # stay most recently used.
        self.hosts: ShardedMap[OriginKey, _Host] = ShardedMap(
            shards=1, max_items=max_hosts, on_evict=self._forget
        )
        self.index: dict[OriginKey, _Host] = {}
        self.max_hosts = max_hosts
        self.reads = 0

    # Origins and their state ------------------------------------------------------------

    def lookup(self, key: OriginKey, attempt: Callable[[httpx.Request], Any]) -> _Host:
        """Find or create the origin's state in the LRU map (touching it), and index it."""
        host = self.hosts.get(key)
        if host is None:
            # The origin string names the breaker; built only when an origin is first seen.
            origin = _origin_name(key)
            host = self.hosts.get_or_create(key, lambda: self._new_host(origin, attempt))
        index = self.index
        index[key] = host
        if len(index) > 2 * self.max_hosts:
            # An eviction racing this lookup can strand an entry; rebuild from the map.
            self.index = self.hosts.snapshot()
        return host

    def known(self, key: OriginKey) -> _Host:
        """The state kept for the origin ``key``, read without touching the LRU order."""
        host = self.index.get(key)
        if host is None or key not in self.hosts:
            raise KeyError(
                f"the transport keeps no state for {_origin_name(key)}: no request has gone "
                f"there yet, or it was evicted since (max_hosts={self.max_hosts}); "
                "origins() lists the origins it keeps"
            )
        return host

    def reset(self, key: OriginKey | None, attempt: Callable[[httpx.Request], Any]) -> None:
        """Reset the breaker of origin ``key`` (every origin's for ``None``); renew its budget."""
        hosts = self.hosts.snapshot() if key is None else {key: self.known(key)}
        renew = (self.retry is not None and self.retry.budget is not None) or (
            self.hedge is not None
        )
        for each, host in hosts.items():
            reset = getattr(host.breaker, "reset", None)
            if callable(reset):
                reset()
            if renew:
                # A budget cannot be emptied in place: new drivers around a new budget, with
                # the same breaker and bulkhead. Requests in flight finish on the old ones.
                fresh = self._build_host(host.origin, attempt, host.breaker, host.bulkhead)
                self.hosts[each] = fresh
                self.index[each] = fresh

    def _forget(self, key: OriginKey, host: _Host) -> None:
        """The map evicted an origin: drop it from the index too (unless replaced since)."""
        if self.index.get(key) is host:
            self.index.pop(key, None)

    def _new_host(self, origin: str, attempt: Callable[[httpx.Request], Any]) -> _Host:
        breaker = None if self.breaker_factory is None else self.breaker_factory(origin)
        if breaker is not None and not isinstance(breaker, Gate):
            raise TypeError(
                "the breaker factory must return a resilient.CircuitBreaker or a Gate stage "
                f"(before_call, on_success, on_failure, on_abort), got {breaker!r}"
            )
        bulkhead = None if self.bulkhead_factory is None else self.bulkhead_factory(origin)
        if bulkhead is not None and not isinstance(bulkhead, Admission):
            raise TypeError(
                "the bulkhead factory must return a resilient.Bulkhead or an Admission stage "
                f"(try_acquire, acquire, acquire_async, release), got {bulkhead!r}"
            )
        return self._build_host(origin, attempt, breaker, bulkhead)

    def _build_host(
        self,
        origin: str,
        attempt: Callable[[httpx.Request], Any],
        breaker: Gate | None,
        bulkhead: Admission | None,
    ) -> _Host:
        """The origin's drivers around its breaker and bulkhead, with a new retry budget."""
        # Only a built-in breaker can be read without asking it: a gate of one's own is
        # asked by the driver on every request, so its origin takes no fast path.
        builtin = breaker if isinstance(breaker, CircuitBreaker) else None
        stages: dict[str, Any] = {
            "tracing": False,  # the transport records requests itself (see begin)
            "bulkhead": bulkhead,
            "timeout": self.timeout,
            "breaker": breaker,
            "attempt_timeout": self.attempt_timeout,
        }
        asynchronous = inspect.iscoroutinefunction(attempt)
        once = idempotent = unsafe = Policy(**stages)
        retry = None
        if self.retry is not None:
            # Both retrying kinds share the origin's one budget.
            budget = None if self.retry.budget is None else self.retry.budget.spawn()
            retry = self._host_retry(self.retry, budget, self._retryable_idempotent)
            idempotent = Policy(retry=retry, **stages)
            unsafe = Policy(retry=self._host_retry(self.retry, budget, _not_sent), **stages)
        drivers = [
            policy.driver(attempt, asynchronous, observer=_OWN_RECORD)
            for policy in (idempotent, unsafe, once)
        ]
        if self.hedge is not None:
            assert self.hedge_attempt is not None
            hedged = Policy(hedge=self._host_hedge(self.hedge), **stages)
            drivers[_IDEMPOTENT] = hedged.driver(self.hedge_attempt, True, observer=_OWN_RECORD)
        fast = (
            self.hedge is None
            and bulkhead is None
            and self.timeout is None
            and self.attempt_timeout is None
            and (breaker is None or (builtin is not None and not builtin.counts_successes))
            and not (self.telemetry is not None and self.telemetry.explicit)
        )
        count_call = None if retry is None else retry.count_call
        tally = None if retry is None else retry.tally()
        return _Host(
            origin=origin,
            breaker=breaker,
            bulkhead=bulkhead,
            store=None if builtin is None else builtin.store,
            drivers=tuple(drivers),
            resumes=(
                tuple(
                    policy.resume(attempt, asynchronous, observer=_OWN_RECORD)
                    for policy in (idempotent, unsafe, once)
                )
                if fast
                else None
            ),
            fast=fast,
            untraced=self.telemetry is None,
            clock=None if retry is None else retry.clock,
            count_call=None if tally is not None and tally.holder is None else count_call,
            slices=None if tally is None else tally.holder,
            first_try=_FIRST_TRY[None if builtin is None else BreakerState.CLOSED],
            attributes=PolicyAttributes(origin),
        )

    def _host_retry(
        self, base: Retry, budget: RetryBudget | None, rules: Callable[[Exception], bool]
    ) -> Retry:
        """The base Retry with this transport's ``rules`` and the origin's own ``budget``."""

        # The user's own `on` narrows the transport's rules; it cannot widen them.
        def retryable(failure: Exception) -> bool:
            return rules(failure) and base.accepts(failure)

        return dataclasses.replace(base, on=retryable, budget=budget, retry_after=self._retry_after)

    def _host_hedge(self, base: Hedge) -> Hedge:
        """The base Hedge with the origin's own delay and budget, on the retry rules.

        A failure the retry rules would retry starts the next hedge, unless the
        response asked for a wait (``Retry-After``): sending another at once would
        ignore it, so that response is the caller's.
        """

        def hedgeable(failure: Exception) -> bool:
            if isinstance(failure, ResponseFailure) and failure.asked_wait is not None:
                return False
            return self._retryable_idempotent(failure) and base.accepts(failure)

        delay = base.delay
        return Hedge(
            delay=delay.spawn() if isinstance(delay, AdaptiveDelay) else delay,
            max_attempts=base.max_attempts,
            on=hedgeable,
            budget=None if base.budget is None else base.budget.spawn(),
            discard=_discard,
            clock=base.clock,
        )

    # Decisions ----------------------------------------------------------------------------

    def kind(self, request: httpx.Request, options: object) -> int:
        """Which driver ``request`` goes through, its ``extensions["resilient"]`` being ``options``.

        The request's own facts decide here, once, so the retry rules need only the
        failure: a body that cannot be sent twice, or ``retry=False``, is never
        retried; an idempotent request is retried on every failure RFC 9110 allows;
        any other only when it never left.
        """
        if options is not None:
            if not isinstance(options, Mapping):
                raise TypeError(
                    f'extensions["resilient"] must be a mapping of options, got {options!r}'
                )
            unknown = set(options) - _OPTIONS
            if unknown:
                raise ValueError(
                    f'unknown option(s) in extensions["resilient"]: {sorted(unknown)}; '
                    f"known: {sorted(_OPTIONS)}"
                )
            for name in _OPTIONS & set(options):
                if not isinstance(options[name], bool):
                    raise TypeError(
                        f'extensions["resilient"]["{name}"] must be True or False, '
                        f"got {options[name]!r}"
                    )
            if options.get("retry", True) is False:
                return _ONCE
        if not isinstance(request.stream, httpx.ByteStream):
            return _ONCE  # the body is a stream the first attempt consumes
        return _IDEMPOTENT if is_idempotent(request, self.retry_non_idempotent) else _UNSAFE

    def _retryable_idempotent(self, failure: Exception) -> bool:
        if _not_sent(failure):
            return True
        if isinstance(failure, ResponseFailure):
            if failure.response.status_code not in self.retry_statuses:
                return False
            asked = failure.asked_wait
            return asked is None or asked <= self.max_retry_after
        return isinstance(failure, MAYBE_SENT)

    @staticmethod
    def _retry_after(failure: object) -> float | None:
        return failure.asked_wait if isinstance(failure, ResponseFailure) else None

    # Around every attempt -------------------------------------------------------------------

    def clamp(self, request: httpx.Request, call: _Call, when: float) -> None:
        """Under the deadline ``when``, before an attempt: clamp its timeouts, send the budget."""
        left = when - _monotonic()
        if left <= 0.0:
            raise DeadlineExceeded("the deadline passed before the request could be sent")
        if call.attempts == 1:
            call.timeouts = request.extensions.get("timeout") or _NO_TIMEOUTS
        given = call.timeouts
        assert given is not None
        # Each of httpx's four timeouts, written out: a comprehension costs a frame.
        get = given.get
        connect, read, write, pool = get("connect"), get("read"), get("write"), get("pool")
        timeouts = {
            "connect": left if connect is None or connect > left else connect,
            "read": left if read is None or read > left else read,
            "write": left if write is None or write > left else write,
            "pool": left if pool is None or pool > left else pool,
        }
        # A new dict: the caller's (often shared between requests) is left as it was.
        request.extensions = {**request.extensions, "timeout": timeouts}
        internal = self.internal_hosts
        if self.propagate_deadline or (internal and request.url.host.lower() in internal):
            request.headers[DEADLINE_HEADER] = format_deadline_header(left)

    def routed(self, request: httpx.Request, host: _Host) -> _Route:
        """What sends ``request`` through the origin's driver for its kind."""
        call = _Call()
        call.request = request
        send = host.drivers[self.kind(request, request.extensions.get("resilient"))]
        return call, host, send, (request, call)

    def resumed(
        self, request: httpx.Request, host: _Host, started: float, failure: Exception
    ) -> _Route:
        """What takes a failed fast first attempt over (see :meth:`Policy.resume`)."""
        call = _Call()
        call.request = request  # Policy.resume counts the fast attempt in its record
        if isinstance(failure, ResponseFailure):
            call.pending = failure.response
        assert host.resumes is not None
        resume = host.resumes[self.kind(request, None)]
        return call, host, resume, (started, failure, request, call)

    def settle(self, call: _Call, error: BaseException) -> httpx.Response:
        """The driver raised ``error``: the response the caller gets, or raise what it gets.

        Retries that ended on a failing response return that response; a breaker
        that ended them returns the last one (see ``_recover``).
        """
        try:
            if isinstance(error, ResponseFailure):
                return error.response
            if isinstance(error, ResilientError):
                return _recover(error, call.request)
            raise error
        except BaseException as raised:
            if call.instruments is not None or call.tracer is not None:
                self.end(call, None, raised)
            raise
        finally:
            error = None  # type: ignore[assignment]  # this frame is on its traceback

    def attempt_failed(self, span: HttpSpan | None, exc: BaseException) -> BaseException:
        """The attempt raised ``exc``: end its span; what to raise instead, if anything."""
        if span is not None:
            span.end(None, exc)
        if isinstance(exc, httpx.TimeoutException):
            return self.timed_out(exc)
        return exc

    @staticmethod
    def timed_out(exc: httpx.TimeoutException) -> Exception:
        """An httpx timeout caused by the clamped deadline becomes DeadlineExceeded."""
        if remaining() <= 0.0:
            return DeadlineExceeded(f"the deadline passed while the request was in flight ({exc})")
        return exc

    def finish(self, response: httpx.Response, host: _Host, call: _Call) -> httpx.Response:
        """The request is answered: report what it went through, and record it."""
        # Each response owns its extensions dict: add to it rather than copying it.
        state = None if host.store is None else host.store.state
        if call.attempts == 1 and not call.waited:
            # Built once, read-only; the origin holds the common one (a BreakerState key
            # hashes through a Python call).
            first = host.first_try if state is None or state is _CLOSED else _FIRST_TRY[state]
            response.extensions["resilient"] = first
        else:
            response.extensions["resilient"] = _report(call.attempts, call.waited, state)
        if call.instruments is not None or call.root is not None:
            self.end(call, response, None)
        return response

    # Telemetry ------------------------------------------------------------------------------

    def begin(self, call: _Call, host: _Host) -> None:
        """Before a request goes to the driver: record it, if somebody listens."""
        telemetry = self.telemetry
        # Telemetry.wanted(), inline: this runs for every request off the fast path.
        if telemetry is None or not (
            telemetry.explicit
            or _traces._TRACER_PROVIDER is not None
            or _meters._METER_PROVIDER is not None
        ):
            return
        call.tracer = tracer = telemetry.tracer()
        call.instruments = instruments = telemetry.instruments()
        if instruments is not None:
            call.attributes = host.attributes
            call.began = _perf_counter()
        if tracer is not None:
            from opentelemetry import trace

            if not trace.get_current_span().get_span_context().is_valid:
                # No trace to join: a span for the whole request keeps its attempts
                # in one trace, as the HTTP conventions' retry examples show.
                call.root = HttpSpan(tracer, call.request, None)

    def end(
        self, call: _Call, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        """The request was answered (``response``) or raised ``error``: record it.

        An open circuit is also an event on the current span: no attempt span shows it.
        """
        instruments = call.instruments
        if instruments is not None:
            if error is not None:
                outcome = _tracing.outcome_of(error)
            else:
                assert response is not None
                failed = response.status_code in self.failing_statuses
                outcome = "failure" if failed else "success"
            seconds = _perf_counter() - call.began
            assert call.attributes is not None
            instruments.record_call(call.attributes, outcome, seconds, call.attempts)
        if call.tracer is not None and isinstance(error, CircuitOpenError):
            from opentelemetry import trace

            span = trace.get_current_span()
            if span.is_recording():
                _tracing.circuit_open_event(span, error)
        if call.root is not None:
            call.root.end(response, error, call.attempts)


def _cancelling() -> int:
    """How many cancellations of the current task are pending (``Task.cancelling()``)."""
    task = asyncio.current_task()
    assert task is not None  # an async request runs in a task
    return task.cancelling()


def _deadline_cancelled(error: asyncio.CancelledError, before: int) -> BaseException:
    """``error`` as the request's caller should see it: DeadlineExceeded when the deadline did it.

    ``async with resilient.deadline()`` cancels the task at the deadline and turns
    that cancellation into a plain DeadlineExceeded as it leaves the scope: no
    ``httpx.TimeoutException``. When the deadline in force has passed and that is
    the one cancellation pending beyond the ``before`` the request started with, it
    is the deadline's: the transport raises it as a deadline error of its own, which
    the scope lets through, having balanced its cancellation. Any other cancellation
    (from outside, or along with the deadline's) stays ``CancelledError``.
    """
    if remaining() > 0.0 or _cancelling() != before + 1:
        return error
    exceeded = DeadlineExceeded(
        "the deadline passed while the request was in flight, and it was cancelled"
    )
    exceeded.__cause__ = error
    return exceeded


def _not_sent(failure: Exception) -> bool:
    """The request never left: safe to send again whatever its method."""
    return isinstance(failure, NOT_SENT) or isinstance(failure.__cause__, NOT_SENT)


def _drains(response: httpx.Response, request: httpx.Request) -> bool:
    """Whether a failing response's body is worth reading before a retry, to keep its connection.

    Not when it is in memory already (nothing to read) or announces more than
    :data:`DRAIN_LIMIT` bytes (it would be closed anyway).
    """
    if response.is_closed:
        return False
    length = response.headers.get("content-length")
    return not (
        length is not None
        and length.isdigit()
        and int(length) > DRAIN_LIMIT
        and request.method != "HEAD"  # a HEAD response announces a body it has not
    )


# unasync: begin
async def _release_async(response: httpx.Response, request: httpx.Request) -> None:
    """Before a retry: drain a failing response's body (see :data:`DRAIN_LIMIT`) and close it.

    A body read to its end gives the connection back to the pool; one closed before
    (too long, the deadline passed, or the read failed) drops the connection. In sync
    code a read cannot be interrupted: each is bounded by its read timeout, clamped to
    the deadline, and the deadline is checked between reads; in async code the driver
    also cancels the drain at the attempt's deadline.
    """
    try:
        if _drains(response, request):
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > DRAIN_LIMIT or remaining() <= 0.0:
                    break
    except httpx.HTTPError:
        pass  # the connection goes; nothing the caller must hear of
    finally:
        await response.aclose()


# unasync: end
# unasync: generated from the async code above by scripts/unasync.py; do not edit
def _release(response: httpx.Response, request: httpx.Request) -> None:
    """Before a retry: drain a failing response's body (see :data:`DRAIN_LIMIT`) and close it.

    A body read to its end gives the connection back to the pool; one closed before
    (too long, the deadline passed, or the read failed) drops the connection. In sync
    code a read cannot be interrupted: each is bounded by its read timeout, clamped to
    the deadline, and the deadline is checked between reads; in async code the driver
    also cancels the drain at the attempt's deadline.
    """
    try:
        if _drains(response, request):
            read = 0
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > DRAIN_LIMIT or remaining() <= 0.0:
                    break
    except httpx.HTTPError:
        pass  # the connection goes; nothing the caller must hear of
    finally:
        response.close()


# unasync: end generated


async def _discard(left: object) -> None:
    """A hedged attempt's answer that lost, or its failing response: release it."""
    if isinstance(left, ResponseFailure):
        await _release_async(left.response, left.request)
    elif isinstance(left, httpx.Response):
        await _release_async(left, left.request)


def default_breaker(origin: str) -> CircuitBreaker:
    """The breaker each origin gets by default: 15 failed attempts in a row open it for 10 s.

    The breaker sits inside the retries, so it counts attempts: with the default
    ``Retry(attempts=3)``, five requests in a row that each fail all three attempts
    open it (or fifteen requests sent once, such as POSTs or 500s, which are not
    retried). Two failing requests, or a burst of them shorter than five, leave it
    closed. It stays open 10 s, then lets one probe through; the probe's success
    closes it, its failure opens it for another 10 s. The caller's own mistakes
    (``httpx.LocalProtocolError``, ``UnsupportedProtocol``, ``InvalidURL``, programming
    errors) are not counted.

    Compared with Envoy's outlier detection, the model for per-host ejection: Envoy
    ejects a host after ``consecutive_5xx: 5`` responses (each retry is a response
    of its own, usually from another host: retries go elsewhere), for a
    ``base_ejection_time`` of 30 s multiplied by the times it was ejected (up to
    ``max_ejection_time``, 300 s), and never ejects more than
    ``max_ejection_percent`` (10 %, at least one host) of a cluster, so traffic
    always has somewhere to go. Here an origin is one host with nowhere else to go:
    all three attempts of a request count against it, and an open breaker refuses
    every request to it. So the default asks for five requests' worth of failures,
    as Envoy asks for five responses, and opens for a shorter 10 s without growing:
    a host that was wrongly cut off is back within 10 s, and one that is really down
    gets one probe per 10 s instead of the full load. Give ``breaker=`` a factory of
    your own for other numbers, or a failure-rate window (``failure_rate=``), which is
    closer to Envoy's success-rate detection.
    """
    return CircuitBreaker(
        name=origin,
        failure_threshold=15,  # five requests' worth of the default three attempts
        reset_timeout=10.0,
        exclude=(*CALLER_FAULTS, *PROGRAMMING_ERRORS),
    )


def _check_factory(parameter: str, factory: object, makes: str) -> None:
    """``factory`` must be ``origin -> stage``; a stage itself (callable too, as a decorator)
    is refused here rather than called with the origin on the first request."""
    if factory is None:
        return
    stage = Gate if parameter == "breaker" else Admission
    pybreaker = sys.modules.get("pybreaker")
    if not isinstance(factory, type) and (
        isinstance(factory, stage)
        or (pybreaker is not None and isinstance(factory, pybreaker.CircuitBreaker))
    ):
        raise TypeError(
            f"{parameter} expects a factory (a callable taking the origin, such as "
            f"'https://api.example.com:443', and returning a {makes}), not a {parameter} "
            f"instance: got {factory!r}. Pass {parameter}=lambda origin: ... so that each "
            f"origin gets its own {parameter} (or lambda origin: shared, to share one on "
            "purpose)"
        )
    if not callable(factory):
        raise TypeError(
            f"{parameter} must be a callable taking the origin and returning a "
            f"{makes}, or None, got {factory!r}"
        )


def _origin_name(key: OriginKey) -> str:
    """The origin as the transport names it: "scheme://host:port", default port included."""
    scheme, host, port = key
    if port is None:
        port = 443 if scheme == "https" else 80
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _origin_key(origin: object) -> OriginKey:
    """The key of ``origin``, a URL string or an ``httpx.URL`` (only its origin counts)."""
    if isinstance(origin, str):
        try:
            url = httpx.URL(origin)
        except httpx.InvalidURL as exc:
            raise ValueError(
                f"origin must be a URL such as 'https://api.example.com', got {origin!r}: {exc}"
            ) from None
    elif isinstance(origin, httpx.URL):
        url = origin
    else:
        raise TypeError(
            f"origin must be a URL string or an httpx.URL, got {type(origin).__name__}: {origin!r}"
        )
    if not url.scheme or not url.host:
        raise ValueError(
            "origin must be an absolute URL with a scheme and a host, such as "
            f"'https://api.example.com:443', got {origin!r}"
        )
    return origin_key(url)


Inner = TypeVar("Inner", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _Configured(Generic[Inner]):
    """The options both transports take, validated once; see :class:`ResilientTransport`."""

    _inner_type: type[Inner]

    def __init__(
        self,
        transport: Inner | None = None,
        *,
        retry: Retry | Default | None = DEFAULT,
        hedge: Hedge | None = None,
        breaker: Callable[[str], Gate] | Default | None = DEFAULT,
        bulkhead: Callable[[str], Admission] | None = None,
        timeout: Duration | None = None,
        attempt_timeout: Duration | None = None,
        retry_statuses: Collection[int] = RETRY_STATUSES,
        retry_non_idempotent: bool = False,
        max_retry_after: Duration = 60.0,
        propagate_deadline: bool = False,
        internal_hosts: Collection[str] = (),
        max_hosts: int = 1024,
        tracing: bool = True,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if transport is not None and not isinstance(transport, self._inner_type):
            raise TypeError(
                f"transport must be an httpx.{self._inner_type.__name__}, got {transport!r}"
            )
        if hedge is not None and self._inner_type is httpx.BaseTransport:
            raise TypeError(
                "ResilientTransport cannot hedge: a sync attempt cannot be cancelled, so the "
                "losing attempts would run on, holding connections; hedge with "
                "AsyncResilientTransport, or use retry= and attempt_timeout="
            )
        self._core = _Core(
            retry=_DEFAULT_RETRY if isinstance(retry, Default) else retry,
            hedge=hedge,
            breaker=default_breaker if isinstance(breaker, Default) else breaker,
            bulkhead=bulkhead,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            retry_statuses=retry_statuses,
            retry_non_idempotent=retry_non_idempotent,
            max_retry_after=max_retry_after,
            propagate_deadline=propagate_deadline,
            internal_hosts=internal_hosts,
            max_hosts=max_hosts,
            tracing=tracing,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self._transport: Inner = self._default_inner() if transport is None else transport
        # Bound once: each origin's drivers wrap this attempt function.
        self._bound_attempt: Callable[[httpx.Request], Any] = self._attempt  # type: ignore[attr-defined]
        self._core.hedge_attempt = getattr(self, "_hedge_attempt", None)

    def _default_inner(self) -> Inner:
        raise NotImplementedError  # pragma: no cover

    # Per-origin state -------------------------------------------------------------------

    def origins(self) -> dict[str, BreakerState | None]:
        """Every origin whose state the transport keeps, mapped to its breaker's state.

        Origins are named as their breakers and metrics are: ``"scheme://host:port"``,
        the default port included (``"https://api.example.com:443"``). The state is a
        :class:`~resilient.BreakerState` (an open breaker whose ``reset_timeout`` has
        passed reads ``HALF_OPEN``, as :attr:`CircuitBreaker.state` does), or ``None``
        for an origin without a built-in breaker (``breaker=None``, or a gate of your
        own). A snapshot of at most ``max_hosts`` origins; reading it does not count as
        use of an origin, so it does not keep one from being evicted.

        >>> transport.origins()
        {'https://api.example.com:443': <BreakerState.CLOSED: 'closed'>}
        """
        return {
            host.origin: host.breaker.state if isinstance(host.breaker, CircuitBreaker) else None
            for host in self._core.hosts.snapshot().values()
        }

    def breaker_for(self, origin: str | httpx.URL) -> Gate | None:
        """The breaker of ``origin``: the :class:`~resilient.CircuitBreaker` (or gate) its
        factory made.

        ``origin`` is a URL string or an ``httpx.URL``; only its scheme, host and port
        count, so ``"https://api.example.com"``, ``"https://api.example.com:443/orders"``
        and a request's ``request.url`` all name the same origin (anything else: a
        ``TypeError``; a relative or malformed URL: a ``ValueError``). The transport
        keeps state only for origins it has sent requests to, so an origin it keeps no
        state for (no request has gone there yet, or it was evicted since, see
        ``max_hosts``) raises ``KeyError`` naming it, whatever ``breaker`` is: its
        breaker does not exist (yet), so there is nothing to read or change. With
        ``breaker=None`` an origin the transport keeps gives ``None``; a
        ``KeyError`` still means the origin is not kept, not that there is no breaker.

        >>> breaker = transport.breaker_for("https://api.example.com")
        >>> breaker.metrics().consecutive_failures
        0
        """
        return self._core.known(_origin_key(origin)).breaker

    def reset(self, origin: str | httpx.URL | None = None) -> None:
        """Reset ``origin``'s breaker and retry budget; with no argument, every origin's.

        The breaker's ``reset()`` is called (a :class:`~resilient.CircuitBreaker` closes
        and clears its counters, and tells its listeners; a gate of your own is reset
        if it has a ``reset()`` method), and the origin gets a fresh retry budget.
        Requests already in flight finish under the old budget. ``origin`` is read as
        for :meth:`breaker_for`, with the same ``KeyError`` for an origin the
        transport keeps no state for.
        """
        key = None if origin is None else _origin_key(origin)
        self._core.reset(key, self._bound_attempt)


# The transports ----------------------------------------------------------------------------


class ResilientTransport(_Configured[httpx.BaseTransport], httpx.BaseTransport):
    """An httpx transport applying deadlines, retries and per-origin breakers to every request.

    >>> client = httpx.Client(transport=ResilientTransport(retry=Retry(attempts=4)))

    * ``transport``: the transport that sends (default ``httpx.HTTPTransport()``);
      closed with this one.
    * ``retry``: a :class:`~resilient.Retry` for attempts, backoff, budget and
      hooks (default ``Retry(attempts=3)``; ``None`` disables retries). The
      transport decides what is safe to retry; an ``on`` of your own can only
      narrow that. Each origin gets its own retry budget shaped like the Retry's.
    * ``breaker``: a factory, ``origin -> CircuitBreaker`` (default
      :func:`default_breaker`: 15 failed attempts in a row open it for 10 s), or
      ``origin ->`` any :class:`~resilient.stages.Gate` of your own; ``None`` disables
      breakers. A breaker itself, not a factory, is refused with ``TypeError``.
    * ``bulkhead``: a factory, ``origin -> Bulkhead`` (or any
      :class:`~resilient.stages.Admission`), or ``None`` (default).
    * ``timeout`` / ``attempt_timeout``: total and per-attempt budgets in seconds.
    * ``retry_statuses``: statuses retried for idempotent requests.
    * ``retry_non_idempotent``: also retry POST and PATCH (default ``False``).
    * ``max_retry_after``: the longest ``Retry-After`` honoured (default 60 s);
      a longer one returns the response at once.
    * ``propagate_deadline``: send the remaining budget in the
      ``resilient-timeout-ms`` header to every host; ``internal_hosts`` sends it
      only to these host names.
    * ``max_hosts``: how many origins' state to keep (least recently used go); read
      and reset it with :meth:`origins`, :meth:`breaker_for` and :meth:`reset`.
    * ``tracing``, ``tracer_provider``, ``meter_provider``: OpenTelemetry spans per
      attempt and metrics per origin, as for :class:`~resilient.Policy`.
    """

    _inner_type = httpx.BaseTransport

    def _default_inner(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    # unasync: twin transport
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        key = origin_key(request.url)
        host = core.index.get(key)
        core.reads += 1  # a lost increment under threads only delays a touch
        if host is None or not core.reads % _TOUCH_EVERY:
            host = core.lookup(key, self._bound_attempt)
        store = host.store
        if (
            host.fast
            and _current_deadline() == _INF
            and "resilient" not in request.extensions
            and (store is None or (store.state is _CLOSED and not store.consecutive_failures))
            and (
                host.untraced
                or (_traces._TRACER_PROVIDER is None and _meters._METER_PROVIDER is None)
            )
        ):
            # The fast path: what the driver would do for a healthy first attempt, with
            # nothing to clamp or count, inline (a Python call here would cost ~10% of
            # a request's overhead). A failure goes to Policy.resume, which takes over.
            clock = host.clock
            started = 0.0 if clock is None else clock()
            try:
                response = self._transport.handle_request(request)
            except Exception as exc:
                return self._finish(*self._core.resumed(request, host, started, exc))
            if response.status_code in core.failing_statuses:
                failure = ResponseFailure(response, request)
                return self._finish(*core.resumed(request, host, started, failure))
            count_call = host.count_call
            if count_call is not None:
                slices = host.slices
                if slices is not None and started < slices.end:
                    slices.calls[slices.current] += 1
                else:
                    count_call(started)
            response.extensions["resilient"] = host.first_try
            return response
        return self._finish(*self._core.routed(request, host))

    def _finish(
        self, call: _Call, host: _Host, send: Callable[..., Any], args: tuple[Any, ...]
    ) -> httpx.Response:
        core = self._core
        core.begin(call, host)
        try:
            response = send(*args)
        except BaseException as error:
            try:
                response = core.settle(call, error)
            except BaseException:
                # The caller gets an error, not the failing response still open: close it.
                if call.pending is not None:
                    call.pending.close()
                raise
        finally:
            args = ()  # they may hold the failure, and this frame is on its traceback
            call.pending = None
        return core.finish(response, host, call)

    def _attempt(self, request: httpx.Request, call: _Call) -> httpx.Response:
        pending = call.pending
        if pending is not None:  # a retry: the previous failing response goes first
            call.pending = None
            _release(pending, request)
        # Clamp the attempt to the deadline; its span, if traced (inline: a frame costs).
        when = _current_deadline()
        if when != _INF:
            self._core.clamp(request, call, when)
        tracer = call.tracer
        span = None if tracer is None else HttpSpan(tracer, request, call.attempts)
        try:
            response = self._transport.handle_request(request)
        except BaseException as exc:
            instead = self._core.attempt_failed(span, exc)
            try:
                if instead is not exc:
                    raise instead from exc
                raise
            finally:
                instead = None  # type: ignore[assignment]  # on the error's traceback
        if span is not None:
            span.end(response, None)
        if response.status_code in self._core.failing_statuses:
            call.pending = response
            raise ResponseFailure(response, request)
        return response

    def close(self) -> None:
        self._transport.close()

    # unasync: end generated


class AsyncResilientTransport(_Configured[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """The async twin of :class:`ResilientTransport`, for ``httpx.AsyncClient``.

    Same options; ``transport`` is an ``httpx.AsyncBaseTransport`` (default
    ``httpx.AsyncHTTPTransport()``). An attempt still running at the deadline
    or at ``attempt_timeout`` is cancelled.
    """

    _inner_type = httpx.AsyncBaseTransport

    def _default_inner(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    # unasync: begin transport
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        key = origin_key(request.url)
        host = core.index.get(key)
        core.reads += 1  # a lost increment under threads only delays a touch
        if host is None or not core.reads % _TOUCH_EVERY:
            host = core.lookup(key, self._bound_attempt)
        store = host.store
        if (
            host.fast
            and _current_deadline() == _INF
            and "resilient" not in request.extensions
            and (store is None or (store.state is _CLOSED and not store.consecutive_failures))
            and (
                host.untraced
                or (_traces._TRACER_PROVIDER is None and _meters._METER_PROVIDER is None)
            )
        ):
            # The fast path: what the driver would do for a healthy first attempt, with
            # nothing to clamp or count, inline (a Python call here would cost ~10% of
            # a request's overhead). A failure goes to Policy.resume, which takes over.
            clock = host.clock
            started = 0.0 if clock is None else clock()
            try:
                response = await self._transport.handle_async_request(request)
            except Exception as exc:
                return await self._finish(*self._core.resumed(request, host, started, exc))
            if response.status_code in core.failing_statuses:
                failure = ResponseFailure(response, request)
                return await self._finish(*core.resumed(request, host, started, failure))
            count_call = host.count_call
            if count_call is not None:
                slices = host.slices
                if slices is not None and started < slices.end:
                    slices.calls[slices.current] += 1
                else:
                    count_call(started)
            response.extensions["resilient"] = host.first_try
            return response
        return await self._finish(*self._core.routed(request, host))

    async def _finish(
        self, call: _Call, host: _Host, send: Callable[..., Any], args: tuple[Any, ...]
    ) -> httpx.Response:
        core = self._core
        core.begin(call, host)
        # unasync: async-only {
        # Under a deadline, how many cancellations the task had pending before this request.
        cancelling = -1 if _current_deadline() == _INF else _cancelling()
        # unasync: }
        try:
            response = await send(*args)
        except BaseException as error:
            try:
                # unasync: async-only {
                if cancelling >= 0 and isinstance(error, asyncio.CancelledError):
                    error = _deadline_cancelled(error, cancelling)
                # unasync: }
                response = core.settle(call, error)
            except BaseException:
                # The caller gets an error, not the failing response still open: close it.
                if call.pending is not None:
                    await call.pending.aclose()
                raise
        finally:
            args = ()  # they may hold the failure, and this frame is on its traceback
            call.pending = None
        return core.finish(response, host, call)

    async def _attempt(self, request: httpx.Request, call: _Call) -> httpx.Response:
        pending = call.pending
        if pending is not None:  # a retry: the previous failing response goes first
            call.pending = None
            await _release_async(pending, request)
        # Clamp the attempt to the deadline; its span, if traced (inline: a frame costs).
        when = _current_deadline()
        if when != _INF:
            self._core.clamp(request, call, when)
        tracer = call.tracer
        span = None if tracer is None else HttpSpan(tracer, request, call.attempts)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException as exc:
            instead = self._core.attempt_failed(span, exc)
            try:
                if instead is not exc:
                    raise instead from exc
                raise
            finally:
                instead = None  # type: ignore[assignment]  # on the error's traceback
        if span is not None:
            span.end(response, None)
        if response.status_code in self._core.failing_statuses:
            call.pending = response
            raise ResponseFailure(response, request)
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()

    # unasync: end

    async def _hedge_attempt(self, request: httpx.Request, call: _Call) -> httpx.Response:
        """One of a hedged request's attempts, several of which may run at once.

        Each gets a record of its own, copied from the request's, for what ``_attempt``
        writes in it: the clamped timeouts, and a failing response, which the Hedge
        hands to ``_discard`` (or to the caller, when it is the last) instead.
        """
        if call.timeouts is None:
            call.timeouts = request.extensions.get("timeout") or _NO_TIMEOUTS
        # The request's record counts the attempts, for its report and its metrics.
        call.hedges += 1
        own = _Call()
        own.request = request
        own.tracer = call.tracer
        own.timeouts = call.timeouts
        own.attempts = call.attempts = call.hedges
        response = await self._attempt(request, own)
        response.request = request  # so that a losing answer can be released (_discard)
        return response
