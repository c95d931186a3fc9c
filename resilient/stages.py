"""The stage contract: how a :class:`~resilient.Policy` drives the stages of one call.

A call passes through at most these stages, outermost first, and each kind has one
protocol here::

    admission ─▶ total deadline ─▶ retrier ─▶ gate ─▶ attempt deadline ─▶ injectors ─▶ the call
    (Bulkhead)   (timeout=)       (Retry)    (CircuitBreaker)   (attempt_timeout=)  (chaos=)

    observer: sees the whole call (resilient's OpenTelemetry tracing)

The built-in stages implement these protocols, and so can yours: a class with the
methods below can be passed to ``Policy(bulkhead=..., retry=..., breaker=...)``, and
the httpx transport drives the same stages through the same driver. Stages never
sleep, never call the protected function and never touch the deadline themselves:
the driver does all three, so one stage works for sync and async callers alike.

Rules every stage can rely on
-----------------------------
* **Times.** ``now`` is always a reading of the :class:`Retrier`'s own ``clock``
  (injectable, :func:`time.monotonic` by default). Deadlines passed to a retrier are
  absolute instants on that same clock, ``math.inf`` for none.
* **Tickets.** :meth:`Gate.before_call` returns a ticket that the driver owns until
  it hands it back, exactly once, to one of :meth:`Gate.on_success`,
  :meth:`Gate.on_failure` or :meth:`Gate.on_abort`. A gate must not keep it.
  Likewise every successful :meth:`Admission.try_acquire` or ``acquire`` is paired
  with exactly one :meth:`Admission.release`, whatever the call did (and each ticket
  of a :class:`MeasuredAdmission` with exactly one ``release_ticket``).
* **Cancellation.** ``asyncio.CancelledError``, ``KeyboardInterrupt`` and other
  ``BaseException`` that is not an ``Exception`` are no outcome: the gate hears
  :meth:`Gate.on_abort` (free any probe slot, count nothing), the retrier is not
  asked, and the exception propagates unchanged.
* **Rejections.** A stage refuses by raising a :class:`~resilient.ResilientError`
  (``BulkheadFull``, ``CircuitOpenError``, ``DeadlineExceeded``). A gate's refusal
  during retries ends them at once: the caller gets it, chained to the last failure.
* **Cost.** Admission, gate and the retrier's :meth:`Retrier.count_call` run on every
  healthy call: keep them to a few attribute reads. Everything else runs only once
  an attempt has failed.

Healthy paths as plain objects (optional)
-----------------------------------------
A Python method call costs about as much as a healthy stage's whole decision, and a
healthy call makes several. So a stage may also describe its healthy path as plain
objects the driver reads inline, with no call: an admission stage through a
``slot_pool()`` method returning a :class:`SlotPool`, a gate through ``quiet()``
returning a :class:`QuietGate`, a retrier through ``tally()`` returning a
:class:`CallTally` (each may return ``None``: no such path). A gate may describe
its refusals the same way, through ``refusing()`` returning a :class:`RefusingGate`,
so that rejecting a call while it is open costs no call into it either. The built-in
:class:`~resilient.Bulkhead`, :class:`~resilient.CircuitBreaker` and
:class:`~resilient.Retry` do; a stage without them is driven through its methods,
with the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Admission",
    "CallObserver",
    "CallRecord",
    "CallTally",
    "Gate",
    "Injector",
    "MeasuredAdmission",
    "QuietGate",
    "RefusingGate",
    "Retrier",
    "SlotPool",
]


@dataclass(frozen=True, slots=True)
class SlotPool:
    """An admission stage's healthy path: free slots as tokens in a ``collections.deque``.

    Taking a slot is ``free.pop()`` while ``waiting`` is empty (``IndexError``: none
    free, so call ``acquire``); giving it back is ``free.append(None)`` and then, if
    ``waiting`` is not empty, ``wake()``. Append first, look second: a waiter enqueues
    first and looks for a token second, so neither misses the other.
    """

    free: Any
    waiting: Sized
    wake: Callable[[], None]


@dataclass(frozen=True, slots=True)
class CallTally:
    """How a retrier's :meth:`Retrier.count_call` counts a call made at ``now``.

    ``holder`` ``None``: counting is a no-op. Otherwise, while ``now < holder.end``,
    it is ``holder.calls[holder.current] += 1``; at or past ``holder.end``, call
    ``count_call(now)``, which moves to the next slice.
    """

    holder: Any


@dataclass(frozen=True, slots=True)
class QuietGate:
    """A gate's healthy path, read from ``holder``'s plain attributes.

    While ``holder.state is closed``, :meth:`Gate.before_call` would return ``None``;
    after the call succeeds, ``on_success(None)`` changes something only if
    ``holder.consecutive_failures`` is not zero (then call it). Failures and aborts
    still go to ``on_failure(None, error)`` and ``on_abort(None)``.
    """

    holder: Any
    closed: object


@dataclass(frozen=True, slots=True)
class RefusingGate:
    """A gate's refusals, read from ``holder``'s plain attributes.

    While ``holder.state is state`` and ``retry_after = holder.opened_at +
    reset_timeout - clock()`` is above zero, :meth:`Gate.before_call` would add one
    to ``rejections[0]`` and raise ``error(name, retry_after)``; otherwise ask it.
    The driver reads this only where a refusal has nothing to undo (no slot taken,
    no deadline narrowed, no record begun); elsewhere it calls ``before_call``.
    """

    holder: Any
    state: object
    reset_timeout: float
    clock: Callable[[], float]
    error: Callable[[str, float], BaseException]
    name: str
    rejections: list[int]


@runtime_checkable
class Admission(Protocol):
    """Bounds how many calls run at once: :class:`~resilient.Bulkhead`, for one.

    The driver tries :meth:`try_acquire` first (the healthy path) and only when it
    returns ``False`` waits in :meth:`acquire` or :meth:`acquire_async`, with the
    call's total deadline in force (read it with :func:`resilient.deadline.current`),
    so ``Policy(timeout=)`` bounds the wait too.
    """

    def try_acquire(self) -> bool:
        """Take a slot without waiting; return whether one was taken."""
        ...

    def acquire(self) -> None:
        """Take a slot, blocking this thread at most until the deadline in force; or raise."""
        ...

    async def acquire_async(self) -> None:
        """Take a slot, suspending this task at most until the deadline in force; or raise."""
        ...

    def release(self) -> None:
        """Give back a slot taken by one of the acquire methods."""
        ...


@runtime_checkable
class MeasuredAdmission(Admission, Protocol):
    """An admission stage that learns from the calls it admits: an adaptive limit.

    Optional: the driver checks once, when it builds a function's driver, whether
    its admission stage is one (and has no :class:`SlotPool` path). If so, it takes
    slots with the ticket methods instead: :meth:`try_acquire_ticket` first, then,
    when that returns ``None``, :meth:`acquire_ticket` or
    :meth:`acquire_ticket_async` within the total deadline; and it hands each ticket
    back exactly once to :meth:`release_ticket` with how the whole call ended:
    ``None`` for a value returned, else what it raised, a ``BaseException`` that is
    not an ``Exception`` (cancellation, an interrupt) included, which is no outcome.
    The time between acquiring and releasing is the call's round trip, retries and
    their waits included: the slot was held through them. The plain methods stay for
    callers that know no tickets (they teach the stage nothing).
    :class:`~resilient.Bulkhead` is one; with a fixed limit its tickets are ``0.0``
    and it has a :class:`SlotPool` path, which the driver prefers.
    """

    def try_acquire_ticket(self) -> object | None:
        """Take a slot without waiting; return its ticket, or ``None`` if none was free."""
        ...

    def acquire_ticket(self) -> object:
        """Take a slot, blocking at most until the deadline in force; return its ticket."""
        ...

    async def acquire_ticket_async(self) -> object:
        """Take a slot, suspending at most until the deadline in force; return its ticket."""
        ...

    def release_ticket(self, ticket: object, error: BaseException | None) -> None:
        """Give back the slot of ``ticket``; ``error`` is what the call raised, ``None`` if none."""
        ...


@runtime_checkable
class Gate(Protocol):
    """Decides, per attempt, whether it may go out: :class:`~resilient.CircuitBreaker`, for one.

    A gate reads its own clock when it needs one (a healthy closed breaker reads none).
    """

    def before_call(self) -> object:
        """Admit one attempt and return its ticket, or raise (``CircuitOpenError``) to refuse."""
        ...

    def on_success(self, ticket: object) -> None:
        """The admitted attempt returned."""
        ...

    def on_failure(self, ticket: object, error: Exception) -> None:
        """The admitted attempt raised ``error``."""
        ...

    def on_abort(self, ticket: object) -> None:
        """The admitted attempt was cancelled or interrupted: no outcome at all."""
        ...


@runtime_checkable
class Retrier(Protocol):
    """Decides whether a failed attempt is tried again, and when: :class:`~resilient.Retry`.

    The driver calls :meth:`count_call` once per call. Only once an attempt has
    failed (or returned a value the retrier must judge) does it call :meth:`begin`,
    then :meth:`next_delay` after each failed attempt, and :meth:`give_up` when the
    caller is about to get the failure. ``state`` is whatever :meth:`begin`
    returned: it belongs to one call.
    """

    @property
    def clock(self) -> Callable[[], float]:
        """The clock ``now`` and ``deadline`` are read on."""
        ...

    @property
    def judges_results(self) -> bool:
        """Whether a returned value may be retried too (``Retry(on_result=...)``)."""
        ...

    def count_call(self, now: float) -> None:
        """Count one call made at ``now`` (a retry budget's deposit). Runs on every call."""
        ...

    def begin(self, started: float) -> object:
        """Make the state of one call that began at ``started``, at its first failure."""
        ...

    def next_delay(
        self,
        state: object,
        *,
        now: float,
        deadline: float,
        error: Exception | None = None,
        result: object = None,
    ) -> float | None:
        """Record one failed attempt (``error``, or else ``result``); return the wait, or ``None``.

        ``None`` means stop: the caller gets ``error`` (or ``result``). A wait must
        end before ``deadline``.
        """
        ...

    def give_up(self, state: object, error: BaseException, reason: str | None = None) -> None:
        """Say on ``error`` (as notes) why retrying stopped; ``reason`` names a driver's reason.

        The driver's reasons: ``"deadline"`` (it passed while waiting) and
        ``"circuit open"`` (the gate refused the next attempt).
        """
        ...


@runtime_checkable
class Injector(Protocol):
    """Wraps the protected call itself, innermost: :mod:`resilient.chaos`'s fault stages.

    ``Policy(chaos=[a, b])`` calls ``a.wrap(b.wrap(fn, asynchronous), asynchronous)``
    once, when it builds a function's driver, so every attempt goes through ``a``
    first and every outer stage (attempt timeout, breaker, retry) sees what the
    injectors did: a raised fault, an added delay, a replaced result. The wrapper
    runs inside the attempt's deadline; ``asynchronous`` says whether ``fn`` must be
    awaited, and the wrapper returned must be of the same kind.
    """

    def wrap(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        """Return ``fn`` wrapped: a plain function when ``asynchronous`` is false, else async."""
        ...


class CallRecord(Protocol):
    """One call as an observer records it, from :meth:`CallObserver.begin`.

    The driver adds one to ``attempts`` per attempt made, sets ``error`` when the call
    raises, reports each retry and each gate refusal, and calls :meth:`end` exactly once.
    """

    attempts: int
    error: BaseException | None

    def retrying(self, attempt: int, error: BaseException | None, wait: float) -> None:
        """Attempt ``attempt`` failed with ``error`` (``None``: its result); a retry follows."""
        ...

    def rejected(self, error: Exception) -> None:
        """The gate refused an attempt with ``error``."""
        ...

    def end(self) -> None:
        """The call returned (``error`` is ``None``) or raised ``error``."""
        ...


@runtime_checkable
class CallObserver(Protocol):
    """Sees each whole call: resilient's OpenTelemetry tracing is one.

    ``explicit`` true means :meth:`begin` is asked on every call. False lets an
    OpenTelemetry-based observer cost nothing while nobody listens: the driver then
    asks only while a global OpenTelemetry tracer or meter provider is set.
    """

    @property
    def explicit(self) -> bool:
        """Whether :meth:`begin` must be asked on every call."""
        ...

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallRecord | None:
        """Start recording one call with these arguments, or return ``None`` to record nothing.

        The arguments let a caller hand its own record in: the httpx transport passes
        each request's bookkeeping as an argument and its observer returns it.
        """
        ...
