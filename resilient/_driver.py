"""The drivers: one call through the stages of :mod:`resilient.stages`, sync or async.

A driver is a closure built once per wrapped function over the stages it runs.
Its healthy path is a straight line: take an admission slot, narrow the
deadline, ask the gate, call, report the outcome, return. It builds no object
and reads the clock at most once. Only when an attempt fails (or returns a
value the retrier must judge) does the driver make a :class:`Recovery`, the
call's failure path. Its :meth:`Recovery.flow` is a generator that makes every
decision after a failed attempt: the deadline checks, the gate's verdicts, the
retrier's waits, the notes on the error the caller gets. Two thin loops run it,
one sleeping and one awaiting (the model is httpx's ``Auth.auth_flow``).

The healthy path is written for every stage at once, each absent one ``None``; each
built driver is that text recompiled with the absent stages folded away
(:mod:`resilient._specialize`), so a call pays only for the stages it has.

This module knows the stage protocols and nothing else: it imports no stage
module, so the stages can use it for their own decorators without a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import inspect
import math
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, ClassVar, Final, ParamSpec, Self, TypeVar, cast

from resilient import _fork
from resilient._specialize import specialize
from resilient.deadline import current as _current
from resilient.deadline import narrow as _narrow
from resilient.deadline import restore as _restore
from resilient.errors import DeadlineExceeded
from resilient.stages import MeasuredAdmission, RefusingGate

if TYPE_CHECKING:
    from resilient.stages import Admission, CallObserver, CallRecord, Gate, Retrier

__all__ = [
    "Configured",
    "Decorating",
    "DriverCache",
    "NotAwaitable",
    "Recovery",
    "async_sleep",
    "build",
    "build_resume",
    "cached",
    "deadline_in_force",
    "decorate",
    "is_async",
    "refuse_generators",
    "resume_stepped",
    "sleep",
    "wrap",
]

_INF: Final = math.inf
_monotonic = time.monotonic
_CoroutineType = types.CoroutineType
# What a Recovery yields to ask its driver for one more attempt (a float asks it to wait).
_ATTEMPT: Final = object()
# What build_resume's gate check holds when the gate refused.
_REFUSED: Final = object()
# A gate's ticket still to be asked for, inside the handlers that report a refusal.
_LATE: Final = object()
# The one sleep seam of every driver (the Policy's, the attempt loop's, the rate
# limiter's): read at call time, so resilient.testing.record_sleeps() can stand in for them.
sleep: Callable[[float], object] = time.sleep
async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep


def refuse_generators(fn: Callable[..., object], what: str) -> None:
    """Raise :class:`TypeError` if ``fn`` is a generator or async generator function.

    Retrying a generator would run it again from the start and replay the items
    the caller had already received. ``what`` names the wrapper in the message.
    """
    if inspect.isasyncgenfunction(fn):
        kind = "an async generator function"
    elif inspect.isgeneratorfunction(fn):
        kind = "a generator function"
    else:
        return
    name = getattr(fn, "__qualname__", repr(fn))
    raise TypeError(
        f"{what} cannot wrap {name}: it is {kind}, and retrying it would replay the items "
        "it had already yielded. Wrap the code that produces each item instead, or a "
        "regular function that returns them all."
    )


#: A per-object cache of ``.call()`` drivers: ``(id(fn), asynchronous) -> (fn, driver)``.
DriverCache = dict[tuple[int, bool], tuple[Callable[..., Any], Callable[..., Any]]]


def cached(
    cache: DriverCache,
    fn: Callable[..., Any],
    asynchronous: bool,
    what: str,
    make: Callable[[Callable[..., Any], bool], Callable[..., Any]],
) -> Callable[..., Any]:
    """The driver of ``fn`` in ``cache``, made with ``make`` on first use (``.call(fn)``).

    Keyed by identity, not equality: two callables that compare equal (dataclass
    instances, say) are different functions, and unhashable ones work too. The entry
    keeps ``fn`` alive, so its id is not reused while cached. The cache is bounded:
    callers passing a new lambda each time must not grow it.
    """
    key = (id(fn), asynchronous)
    entry = cache.get(key)
    if entry is not None and entry[0] is fn:
        return entry[1]
    refuse_generators(fn, what)
    if not asynchronous and is_async(fn):
        raise TypeError(
            f"{what}.call() got {_name(fn)}, an async function: its calls return "
            f"coroutines, so nothing would be retried or timed; await {what}.acall() "
            "instead"
        )
    driver = make(fn, asynchronous)
    if len(cache) >= 64:
        cache.clear()
    cache[key] = (fn, driver)
    return driver


def decorate(fn: Callable[..., Any], what: str, **stages: Any) -> Callable[..., Any]:
    """Wrap ``fn`` in a driver over ``stages`` (see :func:`build`), keeping its metadata."""
    return wrap(fn, what, functools.partial(_build_over, stages))


def _build_over(
    stages: dict[str, Any], fn: Callable[..., Any], asynchronous: bool
) -> Callable[..., Any]:
    return build(fn, asynchronous=asynchronous, **stages)


def wrap(
    fn: Callable[..., Any],
    what: str,
    make: Callable[[Callable[..., Any], bool], Callable[..., Any]],
) -> Callable[..., Any]:
    """Wrap ``fn`` in the driver ``make(fn, asynchronous)`` returns, keeping its metadata.

    A ``staticmethod`` or ``classmethod`` (a decorator stacked above one in a class
    body) comes back as the same kind of object over the wrapped function: wrapping
    the descriptor itself would lose the binding (a staticmethod would get ``self``).
    """
    if isinstance(fn, staticmethod | classmethod):
        return type(fn)(wrap(fn.__func__, what, make))
    if not callable(fn):
        raise TypeError(f"{what} decorates callables, got {type(fn).__name__}: {fn!r}")
    refuse_generators(fn, what)
    return functools.wraps(fn)(make(fn, is_async(fn)))


class _ConstructorSignature:
    """``__signature__`` of a :class:`Configured` class: its ``__init__``'s, not ``__new__``'s.

    An instance has none (``AttributeError``), so its signature stays its ``__call__``'s.
    """

    def __get__(self, instance: object, owner: Any) -> inspect.Signature:
        if instance is not None:
            raise AttributeError("__signature__")
        init = inspect.signature(owner.__init__)
        return init.replace(parameters=tuple(init.parameters.values())[1:])


class Configured:
    """Base of the stage classes whose instances decorate: ``@Retry()``, ``@CircuitBreaker()``.

    Their configuration is keyword-only, so ``@Retry`` written without parentheses
    would fail with Python's "takes 1 positional argument but 2 were given". Here
    it fails with what to write instead. The check runs once per construction,
    never per call. ``inspect.signature`` and ``help`` still show the subclass's
    ``__init__``.
    """

    __slots__ = ()

    #: What a class whose configuration has required settings needs written, for the
    #: error of ``@Cls`` without parentheses (``"max_concurrent=..."``, say).
    _needs: ClassVar[str | None] = None

    def __new__(cls, *args: object, **config: object) -> Self:
        if args:
            raise _positional(cls.__name__, args, cls._needs)
        return object.__new__(cls)

    __signature__ = _ConstructorSignature()


P = ParamSpec("P")
R = TypeVar("R")


class Decorating(Configured):
    """Base of a stage that also decorates on its own: the driver with this one stage.

    ``@stage`` over a function, ``stage.call(fn, ...)`` and ``await stage.acall(fn,
    ...)`` behave exactly like a :class:`~resilient.Policy` holding only this stage.
    A subclass names the :func:`build` keyword it fills (``_fills``) and keeps a
    :data:`DriverCache` in ``_drivers``.
    """

    __slots__ = ()

    _fills: ClassVar[str]
    _drivers: DriverCache

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate sync or async ``fn`` so that every call goes through this stage.

        Generator functions are refused; over a ``staticmethod`` or ``classmethod`` it
        returns one of the same kind.
        """
        stage = {self._fills: self}
        return cast("Callable[P, R]", decorate(fn, type(self).__name__, **stage))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call sync ``fn(*args, **kwargs)`` through this stage, without decorating it."""
        return cast(R, self._driver(fn, asynchronous=False)(*args, **kwargs))

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await async ``fn(*args, **kwargs)`` through this stage, without decorating it."""
        return cast(R, await self._driver(fn, asynchronous=True)(*args, **kwargs))

    def _driver(self, fn: Callable[..., Any], *, asynchronous: bool) -> Callable[..., Any]:
        return cached(self._drivers, fn, asynchronous, type(self).__name__, self._build)

    def _build(self, fn: Callable[..., Any], asynchronous: bool) -> Callable[..., Any]:
        stage: dict[str, Any] = {self._fills: self}
        return build(fn, asynchronous=asynchronous, **stage)


def _positional(what: str, args: tuple[object, ...], needs: str | None = None) -> TypeError:
    target = args[0]
    if needs is not None and len(args) == 1 and callable(target):
        return TypeError(
            f"{what} needs its settings to decorate a function: write @{what}({needs}), not @{what}"
        )
    if len(args) == 1 and (callable(target) or isinstance(target, staticmethod | classmethod)):
        name = _name(getattr(target, "__func__", target))
        return TypeError(
            f"{what} is a class: write @{what}() (with parentheses) to decorate {name}, "
            f"or @{what}(setting=value, ...) to configure it; it takes no positional "
            "arguments"
        )
    listed = ", ".join(map(repr, args))
    return TypeError(
        f"{what} takes keyword arguments only, got positional {listed}; "
        f"write {what}(setting=value, ...)"
    )


def is_async(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def``, or an object whose
    ``__call__`` is one (a partial of either counts too)."""
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or not callable(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or repr(fn))


class NotAwaitable(TypeError):
    """An async driver's function returned something that cannot be awaited.

    Never retried and never counted by a gate: the mistake is the caller's, and
    running the function again would repeat its side effects.
    """


def _refuse_result(fn: Callable[..., Any], result: object) -> NotAwaitable:
    return NotAwaitable(
        f"{_name(fn)} returned {type(result).__name__}, not an awaitable: it was driven as "
        "async (acall, or an async decorator target). Use call() for sync functions."
    )


def _refuse_coroutine(fn: Callable[..., Any], result: object) -> TypeError:
    if inspect.iscoroutine(result):
        result.close()  # never awaited: close it so Python does not warn
    return TypeError(
        f"{_name(fn)} returned {type(result).__name__}: it is async (maybe behind a "
        "decorator without functools.wraps), but it was driven as a sync function, so its "
        "retries, breaker and timeouts did not apply. Decorate the async function itself "
        "or use acall()."
    )


def build(
    fn: Callable[..., Any],
    *,
    asynchronous: bool,
    admission: Admission | None = None,
    timeout: float | None = None,
    retrier: Retrier | None = None,
    gate: Gate | None = None,
    attempt_timeout: float | None = None,
    observer: CallObserver | None = None,
) -> Callable[..., Any]:
    """The driver running ``fn`` through the stages, in pipeline order."""
    explicit = True
    traces: Any = None
    meters: Any = None
    if observer is not None:
        explicit = observer.explicit
        if not explicit:
            from resilient._compat.otel import provider_globals

            traces, meters = provider_globals()
    begin = None if observer is None else observer.begin
    try_acquire: Callable[[], Any] | None = None if admission is None else admission.try_acquire
    release: Callable[..., None] | None = None if admission is None else admission.release
    # The stages' healthy paths as plain objects, when they describe them (stages.py).
    pool = None if admission is None else _described(admission, "slot_pool")
    if pool is not None:
        free, waiting, wake = pool.free, pool.waiting, pool.wake
        take, give, try_acquire, release = free.pop, free.append, None, None
    else:
        waiting, wake, take, give = None, None, None, None
    # An admission that learns from each call (an adaptive limit) gets tickets instead: a
    # slot is then a list [ticket, what the call raised], held in `admitted`. Nothing of
    # its own is added to the drivers' frames: each variable more, closed over or local,
    # made every healthy call without a bulkhead measurably slower (a Retry's by 2-4%). So
    # ticket mode is told by `wake` set without a pool (it is then `release`), and the
    # stage is seen through _Tickets, whose methods take and give back such slots.
    if pool is None and isinstance(admission, MeasuredAdmission):
        tickets = _Tickets(admission)
        admission = cast("Admission", tickets)
        try_acquire, release, wake = tickets.try_acquire, tickets.release, tickets.release
    quiet = None if gate is None else _described(gate, "quiet")
    holder, closed = (None, None) if quiet is None else (quiet.holder, quiet.closed)
    # A gate's refusals as plain reads (RefusingGate): its fields are read once, here.
    refusing = None if gate is None else _described(gate, "refusing")
    if refusing is not None:
        _check_refusing(gate, refusing)
    open_state = None if refusing is None else refusing.state
    open_holder: Any = None if refusing is None else refusing.holder
    reopens_after = 0.0 if refusing is None else refusing.reset_timeout
    gate_clock = None if refusing is None else refusing.clock
    refusal = None if refusing is None else refusing.error
    gate_name = "" if refusing is None else refusing.name
    rejections = None if refusing is None else refusing.rejections
    before_call = None if gate is None else gate.before_call
    on_success = None if gate is None else gate.on_success
    on_failure = None if gate is None else gate.on_failure
    on_abort = None if gate is None else gate.on_abort
    count_call = None if retrier is None else retrier.count_call
    tally = None if retrier is None else _described(retrier, "tally")
    slices = None if tally is None else tally.holder
    counts_nothing = tally is not None and slices is None
    clock = None if retrier is None else retrier.clock
    judges = retrier is not None and retrier.judges_results
    # A healthy call reads the clock once when the retrier's clock is the deadline's.
    shared_clock = clock is _monotonic
    bounded = timeout is not None or attempt_timeout is not None
    # Whether a call may ask the gate before anything needs undoing on refusal: no slot
    # to give back, no deadline to restore (a record or a deadline in force may still
    # make it ask later).
    early = admission is None and not bounded

    def recovery(started: float, total: float, outer: float) -> Recovery:
        assert retrier is not None
        return Recovery(retrier, gate, started, total, outer, timeout, attempt_timeout)

    def start() -> float:
        """Count the call with the retrier; return when it began, on the retrier's clock."""
        started: float = clock()  # type: ignore[misc]
        count_call(started)  # type: ignore[misc]
        return started

    # A retrier with a clock of its own is read through start(); else inline.
    counted = None if shared_clock else start

    # The first result of a sync function is checked: a "sync" function that returns a
    # coroutine is async behind a decorator without functools.wraps, and must not pass as
    # healthy.
    unchecked = True

    def _check_sync_result(
        fn: Callable[..., Any], result: object, on_abort: Any, ticket: object
    ) -> None:
        nonlocal unchecked
        if inspect.isawaitable(result):
            if on_abort is not None:
                on_abort(ticket)
            raise _refuse_coroutine(fn, result)
        unchecked = False

    # The healthy path, inlined for speed: written once, async; scripts/unasync.py writes
    # the sync twin below it.
    # unasync: begin
    async def run_async(*args: Any, **kwargs: Any) -> Any:
        record = None
        if begin is not None and (
            explicit or traces._TRACER_PROVIDER is not None or meters._METER_PROVIDER is not None
        ):
            record = begin(args, kwargs)
        outer = total = limit = _current()
        now = 0.0
        if bounded or outer != _INF:
            now = _monotonic()
            if timeout is not None and now + timeout < total:
                total = now + timeout
            limit = total
            if attempt_timeout is not None and now + attempt_timeout < limit:
                limit = now + attempt_timeout
        if take is not None:
            try:
                if waiting:
                    raise IndexError  # others wait first: join them
                take()
                admitted: Any = True
            except IndexError:
                admitted = False
        else:
            # In ticket mode, a slot [ticket, None] or False (see build).
            admitted = try_acquire is None or _admitted(try_acquire, record)
        if not admitted:  # waited for outside the handler, so its errors carry no IndexError
            admitted = await _wait_for_slot_async(admission, total, outer, record)
            if bounded or outer != _INF:
                now = _monotonic()
                limit = _attempt_limit(now, total, attempt_timeout)
        if holder is not None and holder.state is closed:
            ticket = None  # the gate's quiet path: before_call() would return None
        elif before_call is None:
            ticket = None
        elif early and record is None and outer == _INF:
            # Nothing to undo yet (no slot, deadline or record): a refusal raises from
            # here, through none of the handlers below, which would cost more than it;
            # and from this frame if the gate describes it, not through another one.
            if open_state is not None and open_holder.state is open_state:
                opened_at = open_holder.opened_at
                if opened_at is not None:
                    retry_after = opened_at + reopens_after - gate_clock()  # type: ignore[misc]
                    if retry_after > 0.0:
                        rejections[0] += 1  # type: ignore[index]
                        raise refusal(gate_name, retry_after)  # type: ignore[misc]
            ticket = before_call()
        else:
            ticket = _LATE
        try:
            started = now
            if count_call is not None:
                if counted is not None:
                    started = counted()
                else:
                    if not now:
                        started = _monotonic()
                    if slices is not None and started < slices.end:
                        slices.calls[slices.current] += 1
                    elif not counts_nothing:
                        count_call(started)
            if now >= total:
                raise _expired(timeout)
            token = None if limit >= outer else _narrow(limit)
            try:
                if ticket is _LATE:
                    try:
                        ticket = before_call()  # type: ignore[misc]
                    except Exception as refused:
                        if record is not None:
                            record.rejected(refused)
                        raise
                if record is not None:
                    record.attempts += 1
                try:
                    # unasync: async-only {
                    awaitable = fn(*args, **kwargs)
                    if type(awaitable) is not _CoroutineType:
                        if not inspect.isawaitable(awaitable):
                            raise _refuse_result(fn, awaitable)
                        if limit != _INF:
                            awaitable = _as_coroutine(awaitable)
                    if limit == _INF:
                        result = await awaitable
                    else:
                        # Step the coroutine once by hand: one that finishes without
                        # suspending (a cache hit, say) never needs its deadline watched.
                        try:
                            pending = awaitable.send(None)
                        except StopIteration as stop:
                            result = stop.value
                        else:
                            result = await _suspended(
                                awaitable, pending, limit, total, attempt_timeout
                            )
                except NotAwaitable:
                    if on_abort is not None:
                        on_abort(ticket)
                    raise
                    # unasync: }
                    # unasync: sync-only {
                    # result = fn(*args, **kwargs)
                    # unasync: }
                except Exception as exc:
                    if on_failure is not None:
                        on_failure(ticket, exc)
                    if retrier is None:
                        raise
                    error: Exception | None = exc
                    result = None
                except BaseException:
                    if on_abort is not None:
                        on_abort(ticket)
                    raise
                else:
                    # unasync: sync-only {
                    # if unchecked:
                    #     _check_sync_result(fn, result, on_abort, ticket)
                    # unasync: }
                    if ticket is None and holder is not None:
                        if holder.consecutive_failures:
                            on_success(None)  # type: ignore[misc]
                    elif on_success is not None:
                        on_success(ticket)
                    if not judges:
                        return result
                    error = None
            finally:
                if token is not None:
                    _restore(token)
            recovered = recovery(started, total, outer)
            flow = recovered.flow(error, result, record)
            error = None  # this frame is on its traceback: the flow holds it now
            return await _run_async(recovered, flow, fn, args, kwargs)
        except BaseException as exc:
            if record is not None:
                record.error = exc
            if take is None and wake is not None:  # ticket mode: the slot hears it
                admitted[1] = exc
            raise
        finally:
            if give is not None:
                give(None)  # append first, look second (see SlotPool)
                if waiting:
                    wake()
            elif release is not None:
                if wake is not None:  # ticket mode
                    release(admitted)
                    admitted = None  # it holds the error, and this frame is on its traceback
                else:
                    release()
            if record is not None:
                record.end()
                record = None  # it holds the error, and this frame is on its traceback

    # unasync: end
    # unasync: generated from the async code above by scripts/unasync.py; do not edit
    def run(*args: Any, **kwargs: Any) -> Any:
        record = None
        if begin is not None and (
            explicit or traces._TRACER_PROVIDER is not None or meters._METER_PROVIDER is not None
        ):
            record = begin(args, kwargs)
        outer = total = limit = _current()
        now = 0.0
        if bounded or outer != _INF:
            now = _monotonic()
            if timeout is not None and now + timeout < total:
                total = now + timeout
            limit = total
            if attempt_timeout is not None and now + attempt_timeout < limit:
                limit = now + attempt_timeout
        if take is not None:
            try:
                if waiting:
                    raise IndexError  # others wait first: join them
                take()
                admitted: Any = True
            except IndexError:
                admitted = False
        else:
            # In ticket mode, a slot [ticket, None] or False (see build).
            admitted = try_acquire is None or _admitted(try_acquire, record)
        if not admitted:  # waited for outside the handler, so its errors carry no IndexError
            admitted = _wait_for_slot(admission, total, outer, record)
            if bounded or outer != _INF:
                now = _monotonic()
                limit = _attempt_limit(now, total, attempt_timeout)
        if holder is not None and holder.state is closed:
            ticket = None  # the gate's quiet path: before_call() would return None
        elif before_call is None:
            ticket = None
        elif early and record is None and outer == _INF:
            # Nothing to undo yet (no slot, deadline or record): a refusal raises from
            # here, through none of the handlers below, which would cost more than it;
            # and from this frame if the gate describes it, not through another one.
            if open_state is not None and open_holder.state is open_state:
                opened_at = open_holder.opened_at
                if opened_at is not None:
                    retry_after = opened_at + reopens_after - gate_clock()  # type: ignore[misc]
                    if retry_after > 0.0:
                        rejections[0] += 1  # type: ignore[index]
                        raise refusal(gate_name, retry_after)  # type: ignore[misc]
            ticket = before_call()
        else:
            ticket = _LATE
        try:
            started = now
            if count_call is not None:
                if counted is not None:
                    started = counted()
                else:
                    if not now:
                        started = _monotonic()
                    if slices is not None and started < slices.end:
                        slices.calls[slices.current] += 1
                    elif not counts_nothing:
                        count_call(started)
            if now >= total:
                raise _expired(timeout)
            token = None if limit >= outer else _narrow(limit)
            try:
                if ticket is _LATE:
                    try:
                        ticket = before_call()  # type: ignore[misc]
                    except Exception as refused:
                        if record is not None:
                            record.rejected(refused)
                        raise
                if record is not None:
                    record.attempts += 1
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    if on_failure is not None:
                        on_failure(ticket, exc)
                    if retrier is None:
                        raise
                    error: Exception | None = exc
                    result = None
                except BaseException:
                    if on_abort is not None:
                        on_abort(ticket)
                    raise
                else:
                    if unchecked:
                        _check_sync_result(fn, result, on_abort, ticket)
                    if ticket is None and holder is not None:
                        if holder.consecutive_failures:
                            on_success(None)  # type: ignore[misc]
                    elif on_success is not None:
                        on_success(ticket)
                    if not judges:
                        return result
                    error = None
            finally:
                if token is not None:
                    _restore(token)
            recovered = recovery(started, total, outer)
            flow = recovered.flow(error, result, record)
            error = None  # this frame is on its traceback: the flow holds it now
            return _run_sync(recovered, flow, fn, args, kwargs)
        except BaseException as exc:
            if record is not None:
                record.error = exc
            if take is None and wake is not None:  # ticket mode: the slot hears it
                admitted[1] = exc
            raise
        finally:
            if give is not None:
                give(None)  # append first, look second (see SlotPool)
                if waiting:
                    wake()
            elif release is not None:
                if wake is not None:  # ticket mode
                    release(admitted)
                    admitted = None  # it holds the error, and this frame is on its traceback
                else:
                    release()
            if record is not None:
                record.end()
                record = None  # it holds the error, and this frame is on its traceback

    # unasync: end generated

    return specialize(run_async if asynchronous else run)


def build_resume(
    fn: Callable[..., Any],
    *,
    asynchronous: bool,
    retrier: Retrier | None = None,
    gate: Gate | None = None,
    observer: CallObserver | None = None,
) -> Callable[..., Any]:
    """An entry for a caller that made a call's first attempt itself and saw it fail.

    The httpx transport sends a healthy request at once, with no deadline in force,
    no admission stage, and the gate only read on its quiet path (see
    :class:`~resilient.stages.QuietGate`). Only when that attempt fails does it call
    ``resume(started, error, *args, **kwargs)``: ``started`` is when the attempt
    began, on the retrier's clock; ``error`` what it raised. The retrier counts the
    call and the gate hears of the attempt as the driver would have told it; the
    failure path runs from there, calling ``fn(*args, **kwargs)`` for each retry.
    A gate that has left its quiet (closed) state while the attempt was out hears
    nothing (a call admitted before the breaker opened says nothing new), and
    ``error`` itself goes back to the caller, not retried: the attempt was made all
    the same. The observer's record counts that first attempt.
    """
    begin = None if observer is None else observer.begin
    quiet = None if gate is None else _described(gate, "quiet")

    def recover(started: float, error: Exception, record: CallRecord | None) -> Any:
        """The failure path's flow after the attempt; raises ``error`` when it is final."""
        try:
            if retrier is not None:
                retrier.count_call(started)
            if gate is not None:
                if quiet is not None:
                    if quiet.holder.state is not quiet.closed:
                        raise error
                    gate.on_failure(None, error)
                else:
                    ticket: object = _REFUSED
                    with contextlib.suppress(Exception):
                        ticket = gate.before_call()
                    if ticket is _REFUSED:  # raised outside the handler: no context added
                        raise error
                    gate.on_failure(ticket, error)
            if retrier is None:
                raise error
            recovery = Recovery(retrier, gate, started, _INF, _INF, None, None)
            return recovery, recovery.flow(error, None, record)
        finally:
            error = None  # type: ignore[assignment]  # this frame is on its traceback

    # unasync: begin
    async def resume_async(started: float, error: Exception, *args: Any, **kwargs: Any) -> Any:
        recording = _Recording(begin, args, kwargs)
        with recording:
            try:
                recovery, flow = recover(started, error, recording.record)
            finally:
                error = None  # type: ignore[assignment]
            return await _run_async(recovery, flow, fn, args, kwargs)

    # unasync: end
    # unasync: generated from the async code above by scripts/unasync.py; do not edit
    def resume(started: float, error: Exception, *args: Any, **kwargs: Any) -> Any:
        recording = _Recording(begin, args, kwargs)
        with recording:
            try:
                recovery, flow = recover(started, error, recording.record)
            finally:
                error = None  # type: ignore[assignment]
            return _run_sync(recovery, flow, fn, args, kwargs)

    # unasync: end generated

    return resume_async if asynchronous else resume


class _Recording:
    """The observer's record of a resumed call: it counts the first attempt, ends on exit."""

    __slots__ = ("record",)

    def __init__(self, begin: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.record: CallRecord | None = None if begin is None else begin(args, kwargs)
        if self.record is not None:
            self.record.attempts += 1

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        record, self.record = self.record, None  # the caller's frame is on the traceback
        if record is not None:
            record.error = error
            record.end()
            record.error = None


def _described(stage: object, method: str) -> Any:
    """What a stage's optional ``slot_pool()`` / ``quiet()`` / ... returns, or ``None``."""
    describe = getattr(stage, method, None)
    return None if describe is None else describe()


def _check_refusing(gate: object, refusing: object) -> None:
    """Refuse at build a ``refusing()`` the driver could only fail on later, while open.

    Its fields are read once the gate refuses: unchecked, a mistake would surface in an
    outage, as an AttributeError or a TypeError in place of the gate's own error.
    """
    what = f"{type(gate).__name__}.refusing()"
    if not isinstance(refusing, RefusingGate):
        raise TypeError(f"{what} returned {type(refusing).__name__}, not a RefusingGate or None")
    holder, rejections = refusing.holder, refusing.rejections
    if not (hasattr(holder, "state") and hasattr(holder, "opened_at")):
        wrong = "a holder without state and opened_at"
    elif not (callable(refusing.clock) and callable(refusing.error)):
        wrong = "a clock or error that is not callable"
    elif not (type(rejections) is list and len(rejections) == 1):
        wrong = "rejections that are not a one-item list"
    elif not isinstance(refusing.reset_timeout, int | float):
        wrong = f"a reset_timeout that is not a number: {refusing.reset_timeout!r}"
    else:
        return
    raise TypeError(f"{what} returned a RefusingGate with {wrong}")


def _attempt_limit(now: float, total: float, attempt_timeout: float | None) -> float:
    """The deadline of an attempt starting at ``now`` within the call's ``total``."""
    if attempt_timeout is not None and now + attempt_timeout < total:
        return now + attempt_timeout
    return total


def deadline_in_force() -> float:
    """The deadline in force (absolute, on ``time.monotonic``; ``inf`` for none).

    Raises :class:`DeadlineExceeded` if it has already passed. For a driver outside
    this module (``Retry``'s attempt loop), so that it reads the deadline and the
    clock as :func:`build`'s drivers do.
    """
    outer = _current()
    if outer != _INF and _monotonic() >= outer:
        raise _expired(None)
    return outer


def _expired(timeout: float | None) -> DeadlineExceeded:
    if timeout is not None:
        return DeadlineExceeded(
            f"the call's timeout of {timeout:g} s passed before an attempt could start"
        )
    return DeadlineExceeded("the deadline passed before an attempt could start")


def _refused(record: CallRecord | None, error: BaseException) -> None:
    """Admission refused the call: end its record, which the caller's frame still holds."""
    if record is not None:
        record.error = error
        record.end()
        record.error = None  # the caller's frame is on the error's traceback


def _admitted(try_acquire: Callable[[], Any], record: CallRecord | None) -> Any:
    """A stage's ``try_acquire()`` (or ``try_acquire_ticket()``); one that refuses by raising
    ends the record."""
    try:
        return try_acquire()
    except BaseException as exc:
        _refused(record, exc)
        raise


class _Tickets:
    """Ticket mode: a MeasuredAdmission's slots as the driver holds them, ``[ticket, error]``.

    A slot is a list, never falsy (a ticket may be), and the failure handler writes what
    the call raised into it; :meth:`release` hands both to ``release_ticket``.
    """

    __slots__ = ("_acquire", "_acquire_async", "_release", "_try_acquire")

    def __init__(self, stage: MeasuredAdmission) -> None:
        # Bound once: the healthy path calls two of them per call.
        self._try_acquire = stage.try_acquire_ticket
        self._acquire = stage.acquire_ticket
        self._acquire_async = stage.acquire_ticket_async
        self._release = stage.release_ticket

    def try_acquire(self) -> list[Any] | bool:
        # A call whose deadline passed already never reaches the dependency: refused
        # before it takes a slot, its DeadlineExceeded teaches the stage nothing (as a
        # drop, it would cut an adaptive limit once per late caller).
        when = _current()
        if when != _INF and when <= _monotonic():
            raise _expired(None)
        ticket = self._try_acquire()
        return False if ticket is None else [ticket, None]

    def acquire(self) -> list[Any]:
        return [self._acquire(), None]

    async def acquire_async(self) -> list[Any]:
        return [await self._acquire_async(), None]

    def release(self, slot: list[Any]) -> None:
        self._release(slot[0], slot[1])


# unasync: begin
async def _wait_for_slot_async(
    admission: Any, total: float, outer: float, record: CallRecord | None
) -> Any:
    """No free slot: wait for one within the call's total deadline; what acquire returned."""
    token = None if total >= outer else _narrow(total)
    try:
        return await admission.acquire_async()
    except BaseException as exc:
        _refused(record, exc)
        raise
    finally:
        if token is not None:
            _restore(token)


# unasync: end
# unasync: generated from the async code above by scripts/unasync.py; do not edit
def _wait_for_slot(admission: Any, total: float, outer: float, record: CallRecord | None) -> Any:
    """No free slot: wait for one within the call's total deadline; what acquire returned."""
    token = None if total >= outer else _narrow(total)
    try:
        return admission.acquire()
    except BaseException as exc:
        _refused(record, exc)
        raise
    finally:
        if token is not None:
            _restore(token)


# unasync: end generated


# The failure path ---------------------------------------------------------------------


class Recovery:
    """One call's failure path: everything decided once an attempt has failed.

    :meth:`flow` is sans-I/O. It yields a float to ask its driver to wait that
    many seconds, or ``_ATTEMPT`` to ask for one more attempt, bounded by
    :attr:`limit`; the driver sends back what the attempt returned, or throws in
    what it raised. The flow returns the value the caller gets, or raises the
    error the caller gets, with the retrier's notes on it.
    """

    __slots__ = (
        "attempt_timeout",
        "gate",
        "limit",
        "outer",
        "retrier",
        "started",
        "timeout",
        "total",
    )

    def __init__(
        self,
        retrier: Retrier,
        gate: Gate | None,
        started: float,
        total: float,
        outer: float,
        timeout: float | None,
        attempt_timeout: float | None,
    ) -> None:
        self.retrier = retrier
        self.gate = gate
        self.started = started
        self.total = total
        self.outer = outer
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        #: The deadline of the attempt the flow asks for (``inf``: none).
        self.limit = _INF

    def flow(
        self, error: Exception | None, result: Any, record: CallRecord | None
    ) -> Generator[object, Any, Any]:
        """Decide after each failed attempt; the first one's outcome is ``error`` or ``result``."""
        try:
            retrier = self.retrier
            gate = self.gate
            total = self.total
            timed = total != _INF or self.attempt_timeout is not None
            state = retrier.begin(self.started)
            attempt = 1
            while True:
                now = retrier.clock()
                # The deadline expressed on the retrier's own (injectable) clock.
                deadline = _INF if total == _INF else now + (total - _monotonic())
                delay = retrier.next_delay(
                    state, now=now, deadline=deadline, error=error, result=result
                )
                if delay is None:
                    if error is None:
                        return result
                    retrier.give_up(state, error)
                    raise error
                if record is not None:
                    record.retrying(attempt, error, delay)
                if delay > 0.0:
                    yield delay
                attempt += 1
                limit = total
                if timed:
                    now = _monotonic()
                    if now >= total:
                        if error is None:
                            raise _expired(self.timeout)
                        retrier.give_up(state, error, "deadline")
                        raise error
                    limit = _attempt_limit(now, total, self.attempt_timeout)
                self.limit = limit
                token = None if limit >= self.outer else _narrow(limit)
                try:
                    ticket = None
                    if gate is not None:
                        try:
                            ticket = gate.before_call()
                        except Exception as refused:
                            if record is not None:
                                record.rejected(refused)
                            retrier.give_up(state, refused, "circuit open")
                            if error is not None:
                                raise refused from error
                            raise
                    if record is not None:
                        record.attempts += 1
                    try:
                        result = yield _ATTEMPT
                    except NotAwaitable:
                        if gate is not None:
                            gate.on_abort(ticket)
                        raise
                    except Exception as exc:
                        if gate is not None:
                            gate.on_failure(ticket, exc)
                        error = exc
                        result = None
                        continue
                    except BaseException:
                        if gate is not None:
                            gate.on_abort(ticket)
                        raise
                    if gate is not None:
                        gate.on_success(ticket)
                    if not retrier.judges_results:
                        return result
                    error = None
                finally:
                    if token is not None:
                        _restore(token)
        finally:
            # This frame sits on the traceback of the error it raises: drop its references
            # to errors and to the retry state (whose tenacity view holds the last one), so
            # the call's arguments and errors are freed without waiting for the cyclic GC.
            error = result = state = record = None


# unasync: begin
async def _run_async(
    recovery: Recovery,
    flow: Generator[object, Any, Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run a recovery's flow: wait when it asks, attempt (async: within its limit) when it asks."""
    try:
        command = next(flow)
        while True:
            if command is _ATTEMPT:
                try:
                    # unasync: async-only {
                    awaitable = fn(*args, **kwargs)
                    if type(awaitable) is not _CoroutineType and not inspect.isawaitable(awaitable):
                        raise _refuse_result(fn, awaitable)
                    limit, total = recovery.limit, recovery.total
                    outcome = await _attempt(awaitable, limit, total, recovery.attempt_timeout)
                    # unasync: }
                    # unasync: sync-only {
                    # outcome = fn(*args, **kwargs)
                    # unasync: }
                except BaseException as exc:
                    command = flow.throw(exc)
                    continue
                command = flow.send(outcome)
            else:
                await async_sleep(command)  # type: ignore[arg-type]
                command = next(flow)
    except StopIteration as stop:
        return stop.value


# unasync: end
# unasync: generated from the async code above by scripts/unasync.py; do not edit
def _run_sync(
    recovery: Recovery,
    flow: Generator[object, Any, Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run a recovery's flow: wait when it asks, attempt (async: within its limit) when it asks."""
    try:
        command = next(flow)
        while True:
            if command is _ATTEMPT:
                try:
                    outcome = fn(*args, **kwargs)
                except BaseException as exc:
                    command = flow.throw(exc)
                    continue
                command = flow.send(outcome)
            else:
                sleep(command)  # type: ignore[arg-type]
                command = next(flow)
    except StopIteration as stop:
        return stop.value


# unasync: end generated


# Bounding async attempts --------------------------------------------------------------
#
# Every bounded attempt needs "cancel this task at that instant". A loop timer per
# attempt (call_at, then cancel) costs more than the rest of the Policy together, so
# each event loop has one queue of attempt deadlines served by a single timer, armed
# for the earliest one. An attempt that ends early just marks its entry done; the
# timer pops done entries when it fires and re-arms for the next live one.


class _Deadlines:
    """One event loop's attempt deadlines (monotonic instants), served by one loop timer.

    It holds the loop only weakly, and no timer handle (a handle holds its loop): a
    loop dropped without being closed is freed with its queue. A timer that is no
    longer the earliest is not cancelled but left to fire, finding nothing due.
    """

    __slots__ = ("__weakref__", "armed", "done", "heap", "loop", "sequence")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        # Entries are [when, sequence, task or None once done, fired].
        self.heap: list[list[Any]] = []
        self.armed = _INF  # when the earliest timer still to fire is due
        self.done = 0
        self.sequence = 0

    def add(self, when: float, task: asyncio.Task[Any]) -> list[Any]:
        self.sequence += 1
        entry = [when, self.sequence, task, False]
        heapq.heappush(self.heap, entry)
        if when < self.armed:
            self._arm(when)
        return entry

    def finish(self, entry: list[Any]) -> None:
        entry[2] = None
        self.done += 1
        heap = self.heap
        if self.done > 1024 and self.done * 2 > len(heap):
            # Keep memory to the attempts in flight when deadlines are long and calls many.
            heap[:] = [item for item in heap if item[2] is not None]
            heapq.heapify(heap)
            self.done = 0

    def _arm(self, when: float) -> None:
        loop = self.loop()
        if loop is None:  # pragma: no cover - an attempt runs on a live loop
            return
        self.armed = when
        # The loop's clock need not be time.monotonic(): convert through "seconds left".
        loop.call_at(loop.time() + (when - _monotonic()), self._fire, when)

    def _fire(self, when: float) -> None:
        if when == self.armed:
            self.armed = _INF
        heap = self.heap
        now = _monotonic()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            task = entry[2]
            if task is None:
                self.done -= 1
            else:
                entry[2] = None
                entry[3] = True
                task.cancel(msg="resilient attempt deadline exceeded")
        if heap and heap[0][0] < self.armed:
            self._arm(heap[0][0])


# Each event loop's queue, held weakly on both sides (see _Deadlines).
_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary()
)
_queues_lock = threading.Lock()
_fork.register_lock(_queues_lock)


def _queue(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    queue = _queues.get(loop)
    if queue is None:
        with _queues_lock:
            queue = _queues.get(loop)
            if queue is None:
                queue = _queues[loop] = _Deadlines(loop)
    return queue


async def _attempt(
    awaitable: Awaitable[Any], limit: float, total: float, attempt_timeout: float | None
) -> Any:
    """Await one attempt, cancelled at ``limit`` (``inf``: not bounded) with DeadlineExceeded."""
    if limit == _INF:
        return await awaitable
    if type(awaitable) is not _CoroutineType:
        awaitable = _as_coroutine(awaitable)
    coroutine: Coroutine[Any, Any, Any] = awaitable
    try:
        pending = coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    return await _suspended(coroutine, pending, limit, total, attempt_timeout)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@types.coroutine
def resume_stepped(coroutine: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Await the rest of ``coroutine``, whose first step already ran and yielded ``pending``.

    For a driver that steps a coroutine once by hand (most finish without waiting,
    and need no timer or task) and, when it did wait, goes on awaiting it in the
    same task.
    """
    while True:
        try:
            yield pending
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:
            try:
                pending = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        # The task resumes a suspended coroutine with send(None); `yield from` does that.
        return (yield from coroutine.__await__())


@types.coroutine
def _suspended(
    coroutine: Coroutine[Any, Any, Any],
    pending: Any,
    limit: float,
    total: float,
    attempt_timeout: float | None,
) -> Generator[Any, Any, Any]:
    """Finish an attempt that suspended, cancelling it at ``limit``: then DeadlineExceeded.

    A cancellation from outside stays ``CancelledError``, even one that lands in
    the same loop iteration as ours, and ``task.cancelling()`` ends balanced.
    """
    task = asyncio.current_task()
    assert task is not None
    queue = _queue(task.get_loop())
    cancelling = task.cancelling()
    entry = queue.add(limit, task)
    try:
        return (yield from resume_stepped(coroutine, pending))
    except asyncio.CancelledError:
        if entry[3]:
            entry[3] = False  # our cancel() is accounted for here, once
            if task.uncancel() <= cancelling:
                if limit < total:
                    raise DeadlineExceeded(
                        f"the attempt took longer than attempt_timeout={attempt_timeout:g} s "
                        "and was cancelled"
                    ) from None
                raise DeadlineExceeded(
                    "the call's deadline passed while an attempt was running; it was cancelled"
                ) from None
        raise
    finally:
        if entry[2] is not None:
            queue.finish(entry)
        if entry[3]:
            # Our timer fired but the attempt swallowed the cancellation and returned.
            task.uncancel()
