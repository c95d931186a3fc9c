"""Tests for resilient.fallback: which failures fall back, to what, and what stays visible.

Time matters only where a Retry or a CircuitBreaker sits beneath the fallback: they
run on a FakeClock, and retry waits are recorded instead of slept.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import resilient
from resilient._driver import NotAwaitable
from resilient.breaker import CircuitBreaker
from resilient.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, ResilientError
from resilient.fallback import Fallback, gave_up, rejected_or_gave_up, wrap_driver
from resilient.retry import Retry
from resilient.testing import FakeClock

OPEN = CircuitOpenError("svc", 1.5)


class Throttled(ResilientError):
    """A rejection the toolkit may add later (RateLimited, say): any ResilientError."""


def cached_answer(exc: Exception) -> str:
    """A module-level handler, so fallbacks using it pickle."""
    return f"cached ({type(exc).__name__})"


def raiser(exc: BaseException) -> Callable[..., Any]:
    """A sync function that raises ``exc``, counting its calls in ``.calls``."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        fail.calls += 1  # type: ignore[attr-defined]
        raise exc

    fail.calls = 0  # type: ignore[attr-defined]
    return fail


def async_raiser(exc: BaseException) -> Callable[..., Awaitable[Any]]:
    """An async function that raises ``exc``."""

    async def fail(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        raise exc

    return fail


def given_up(exc: Exception) -> Exception:
    """``exc`` as a real Retry gives it up: retried, then out of attempts."""
    retry = Retry(attempts=2, on=type(exc), budget=None, clock=FakeClock())
    with pytest.raises(type(exc)):
        retry.call(raiser(exc))
    return exc


# value= and handler=, sync and async --------------------------------------------------


def test_value_is_returned_instead_of_a_rejection() -> None:
    """A rejected call returns the fallback value; a healthy one its own result."""
    fallback = Fallback(value=0)
    assert fallback(raiser(OPEN))() == 0

    @fallback
    def healthy(x: int) -> int:
        return x * 2

    assert healthy(21) == 42


def test_value_none_is_a_value() -> None:
    """value=None is a fallback value, not a missing one."""
    assert Fallback(value=None)(raiser(OPEN))() is None


def test_value_fallback_logs_the_name_and_the_exception_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """value= hides the exception from the caller, so it is logged at INFO."""

    @Fallback(value=[])
    def recommendations() -> list[str]:
        raise BulkheadFull("recs", 4, 0)

    with caplog.at_level(logging.INFO, logger="resilient.fallback"):
        assert recommendations() == []
    (record,) = caplog.records
    assert record.name == "resilient.fallback"
    assert record.levelno == logging.INFO
    assert "recommendations" in record.getMessage()
    assert "resilient.errors.BulkheadFull" in record.getMessage()


def test_handler_receives_the_exception() -> None:
    """handler(exc) gets the very exception, and its result is returned."""
    seen: list[Exception] = []

    def handler(exc: Exception) -> str:
        seen.append(exc)
        return "fallback"

    assert Fallback(handler=handler)(raiser(OPEN))() == "fallback"
    assert seen == [OPEN]


def test_handler_fallback_does_not_log(caplog: pytest.LogCaptureFixture) -> None:
    """The handler has the exception to log as it likes; the toolkit logs nothing."""
    with caplog.at_level(logging.DEBUG, logger="resilient.fallback"):
        assert Fallback(handler=cached_answer)(raiser(OPEN))() == "cached (CircuitOpenError)"
    assert caplog.records == []


async def test_async_value_and_sync_handler() -> None:
    """Over an async function, value= and a sync handler both work; healthy calls pass."""
    assert await Fallback(value=7)(async_raiser(OPEN))() == 7
    assert await Fallback(handler=cached_answer)(async_raiser(OPEN))() == (
        "cached (CircuitOpenError)"
    )

    @Fallback(value=7)
    async def healthy() -> int:
        return 1

    assert await healthy() == 1


async def test_async_handler_for_an_async_function_is_awaited() -> None:
    """An async handler's coroutine is awaited, and so is an awaitable a sync one returns."""

    async def handler(exc: Exception) -> str:
        await asyncio.sleep(0)
        return f"async {type(exc).__name__}"

    assert await Fallback(handler=handler)(async_raiser(OPEN))() == "async CircuitOpenError"

    def returns_awaitable(exc: Exception) -> Awaitable[str]:
        return handler(exc)

    assert await Fallback(handler=returns_awaitable)(async_raiser(OPEN))() == (
        "async CircuitOpenError"
    )


async def test_an_awaitable_value_is_returned_not_awaited() -> None:
    """value= is returned as given, even when it could be awaited."""
    future = asyncio.get_running_loop().create_future()
    assert await Fallback(value=future)(async_raiser(OPEN))() is future


def test_async_handler_for_a_sync_function_is_refused_at_decoration() -> None:
    """A sync call could not await the handler: TypeError when decorating, naming both."""

    async def handler(exc: Exception) -> int:
        return 0

    def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match=r"handler is async and .*fetch is sync"):
        Fallback(handler=handler)(fetch)
    with pytest.raises(TypeError, match=r"handler is async"):
        Fallback(handler=handler).call(fetch)


def test_sync_handler_returning_a_coroutine_for_a_sync_function_is_an_error() -> None:
    """A handler that is async behind a decorator cannot be awaited: TypeError, closed."""
    made: list[Any] = []

    async def real(exc: Exception) -> int:
        return 0

    def disguised(exc: Exception) -> Any:
        made.append(real(exc))
        return made[-1]

    with pytest.raises(TypeError, match=r"disguised of sync .* returned a coroutine"):
        Fallback(handler=disguised)(raiser(OPEN))()
    # Closed, so Python will not warn that it was never awaited.
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


# Which failures fall back -------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [OPEN, BulkheadFull("db", 2, 0), DeadlineExceeded(), Throttled("slow down")],
    ids=type,
)
def test_by_default_every_rejection_falls_back(error: Exception) -> None:
    """The toolkit's own rejections (any ResilientError) fall back by default."""
    assert Fallback(value="fallback")(raiser(error))() == "fallback"


def test_by_default_an_ordinary_failure_raises() -> None:
    """A ValueError no Retry gave up on is the caller's to see."""
    error = ValueError("bad")
    with pytest.raises(ValueError, match="bad") as raised:
        Fallback(value=0)(raiser(error))()
    assert raised.value is error


@pytest.mark.parametrize("error_type", [TypeError, AttributeError, NameError, AssertionError])
def test_by_default_programming_errors_raise_even_after_a_retry_gave_up(
    error_type: type[Exception],
) -> None:
    """A bug is never hidden by default, whatever notes it carries."""
    error = given_up(error_type("bug"))
    assert gave_up(error)
    with pytest.raises(error_type):
        Fallback(value=0)(raiser(error))()


def test_the_retrys_give_up_falls_back(record_waits: list[float]) -> None:
    """A failure a Retry retried until out of attempts falls back, after every attempt."""
    clock = FakeClock()
    fetch = raiser(ConnectionError("down"))
    retrying = Retry(attempts=3, on=ConnectionError, budget=None, clock=clock)(fetch)
    assert Fallback(value="stale")(retrying)() == "stale"
    assert fetch.calls == 3  # type: ignore[attr-defined]
    assert len(record_waits) == 2


def test_a_failure_no_retry_touched_is_no_give_up() -> None:
    """A ConnectionError straight from the function raises: nothing gave up on it."""
    with pytest.raises(ConnectionError):
        Fallback(value=0)(raiser(ConnectionError("down")))()


def test_a_failure_the_retry_does_not_retry_is_no_give_up(record_waits: list[float]) -> None:
    """After a retried ConnectionError, a ValueError the Retry refuses raises as it would."""
    errors = iter([ConnectionError("down"), ValueError("bad answer")])

    def fetch() -> None:
        raise next(errors)

    retrying = Retry(attempts=3, on=ConnectionError, budget=None, clock=FakeClock())(fetch)
    with pytest.raises(ValueError, match="bad answer") as raised:
        Fallback(value=0)(retrying)()
    assert any("not retryable" in note for note in raised.value.__notes__)
    assert not gave_up(raised.value)


def test_gave_up_survives_pickling() -> None:
    """An exception from a process pool carries its give-up note as plain text."""
    error = given_up(ConnectionError("down"))
    copy = pickle.loads(pickle.dumps(error))
    assert gave_up(copy)
    assert rejected_or_gave_up(copy)


def test_gave_up_ignores_other_notes() -> None:
    """Only Retry's give-up note counts; no notes, or other notes, mean no give-up."""
    error = ConnectionError("down")
    assert not gave_up(error)
    error.add_note("resilient.Retry is great")
    assert not gave_up(error)
    error.__notes__ = "not a list"  # type: ignore[assignment]
    assert not gave_up(error)


def test_on_a_class_a_tuple_or_a_predicate() -> None:
    """on= replaces the default: only what it names falls back."""
    by_class = Fallback(value="x", on=KeyError)
    assert by_class(raiser(KeyError("k")))() == "x"
    with pytest.raises(CircuitOpenError):
        by_class(raiser(OPEN))()

    by_tuple = Fallback(value="x", on=(KeyError, LookupError))
    assert by_tuple(raiser(IndexError(0)))() == "x"

    def is_404(exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    missing = OSError("missing")
    missing.status = 404  # type: ignore[attr-defined]
    by_predicate = Fallback(value="x", on=is_404)
    assert by_predicate(raiser(missing))() == "x"
    with pytest.raises(OSError, match="other"):
        by_predicate(raiser(OSError("other")))()


def test_the_default_composes_into_a_predicate() -> None:
    """rejected_or_gave_up is public, so a predicate can extend the default."""
    fallback = Fallback(
        value="x", on=lambda exc: rejected_or_gave_up(exc) or isinstance(exc, KeyError)
    )
    assert fallback(raiser(OPEN))() == "x"
    assert fallback(raiser(KeyError("k")))() == "x"


def test_on_can_name_programming_errors_explicitly() -> None:
    """on=TypeError (or Exception) falls back on what the default leaves alone."""
    assert Fallback(value="x", on=TypeError)(raiser(TypeError("bug")))() == "x"
    assert Fallback(value="x", on=Exception)(raiser(AttributeError("bug")))() == "x"


def test_never_on_base_exceptions_whatever_on_says() -> None:
    """KeyboardInterrupt and SystemExit propagate even past a predicate that accepts all."""
    everything = Fallback(value="x", on=lambda exc: True)
    with pytest.raises(KeyboardInterrupt):
        everything(raiser(KeyboardInterrupt()))()
    with pytest.raises(SystemExit):
        everything(raiser(SystemExit(3)))()
    assert not everything.falls_back_on(GeneratorExit())


async def test_cancellation_propagates() -> None:
    """A cancelled call stays cancelled: CancelledError is no failure to replace."""
    started = asyncio.Event()

    @Fallback(value="x", on=lambda exc: True)
    async def slow() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "late"

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_non_awaitable_result_is_a_programming_error_that_raises() -> None:
    """An 'async' function that returns a plain value raises NotAwaitable, not the fallback."""

    def not_async() -> int:
        return 1

    with pytest.raises(NotAwaitable):
        await Fallback(value=0).acall(not_async)  # type: ignore[arg-type]


# What stays visible -------------------------------------------------------------------


def test_a_handler_that_raises_chains_to_the_original() -> None:
    """The handler's own exception propagates with the original as its __context__."""

    def handler(exc: Exception) -> int:
        raise LookupError("no cached copy either")

    with pytest.raises(LookupError, match="no cached copy") as raised:
        Fallback(handler=handler)(raiser(OPEN))()
    assert raised.value.__context__ is OPEN


async def test_an_async_handler_that_raises_chains_to_the_original() -> None:
    """Same for an async handler of an async function."""

    async def handler(exc: Exception) -> int:
        await asyncio.sleep(0)
        raise LookupError("no cached copy either")

    with pytest.raises(LookupError) as raised:
        await Fallback(handler=handler)(async_raiser(OPEN))()
    assert raised.value.__context__ is OPEN


def test_an_exception_that_does_not_fall_back_is_the_original() -> None:
    """Not the fallback's business: the very object propagates, without a new context."""
    error = ValueError("bad")
    with pytest.raises(ValueError, match="bad") as raised:
        Fallback(value=0)(raiser(error))()
    assert raised.value is error
    assert raised.value.__context__ is None


# Decorating ---------------------------------------------------------------------------


def test_the_wrapper_keeps_the_functions_metadata_and_kind() -> None:
    """Name, docstring, signature and sync/async kind are the wrapped function's."""

    @Fallback(value=0)
    async def fetch(key: str, *, retries: int = 1) -> int:
        """Fetch a key."""
        return 1

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a key."
    assert str(inspect.signature(fetch)) == "(key: 'str', *, retries: 'int' = 1) -> 'int'"
    assert inspect.iscoroutinefunction(fetch)


async def test_over_staticmethod_and_classmethod() -> None:
    """Stacked over staticmethod/classmethod it binds as they do."""

    class Client:
        name = "client"

        @Fallback(value="static fallback")
        @staticmethod
        def static(x: int) -> str:
            if x < 0:
                raise OPEN
            return f"static {x}"

        @Fallback(value="class fallback")
        @classmethod
        async def klass(cls, x: int) -> str:
            if x < 0:
                raise OPEN
            return f"{cls.name} {x}"

    assert Client.static(1) == "static 1"
    assert Client().static(-1) == "static fallback"
    assert await Client.klass(2) == "client 2"
    assert await Client().klass(-1) == "class fallback"


def test_generator_functions_are_refused() -> None:
    """A fallback over a generator could not catch what it raises later: TypeError."""

    def items() -> Any:
        yield 1

    async def async_items() -> Any:
        yield 1

    with pytest.raises(TypeError, match=r"Fallback cannot wrap .*items: it is a generator"):
        Fallback(value=0)(items)
    with pytest.raises(TypeError, match=r"it is an async generator"):
        Fallback(value=0)(async_items)


def test_non_callables_are_refused() -> None:
    """Decorating something that is not a function says what it got."""
    with pytest.raises(TypeError, match=r"Fallback decorates callables, got int"):
        Fallback(value=0)(42)  # type: ignore[arg-type]


def test_without_parentheses_the_error_says_how_to_write_it() -> None:
    """@Fallback over a function is a mistake the message explains."""
    with pytest.raises(TypeError, match=r"write @Fallback\(\) \(with parentheses\)"):

        @Fallback  # type: ignore[call-arg, arg-type]
        def fetch() -> int:
            return 1


def test_call_and_reuse_of_the_cached_driver() -> None:
    """fallback.call(fn, ...) runs one call; the second call of fn reuses its driver."""
    fallback = Fallback(value="x")
    fetch = raiser(OPEN)
    assert fallback.call(fetch, 1, key=2) == "x"
    assert fallback.call(fetch) == "x"
    assert len(fallback._drivers) == 1
    assert fallback.call(lambda a, b: a + b, 1, 2) == 3


async def test_acall() -> None:
    """await fallback.acall(fn, ...) runs one async call."""
    fallback = Fallback(handler=cached_answer)
    assert await fallback.acall(async_raiser(OPEN), "k") == "cached (CircuitOpenError)"


def test_call_refuses_an_async_function() -> None:
    """call() with an async function would return a coroutine unguarded: TypeError."""

    async def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match=r"await Fallback.acall\(\)"):
        Fallback(value=0).call(fetch)  # type: ignore[arg-type]


# Composition --------------------------------------------------------------------------


def test_over_an_open_breaker_it_falls_back_without_calling() -> None:
    """@Fallback over @CircuitBreaker: once open, calls get the value and never run."""
    clock = FakeClock()
    breaker = CircuitBreaker(name="recs", failure_threshold=2, reset_timeout=30, clock=clock)
    calls: list[int] = []

    @Fallback(value=["popular"])
    @breaker
    def recommendations(user: int) -> list[str]:
        calls.append(user)
        raise ConnectionError("recs is down")

    for user in (1, 2):  # the failures that trip it are not rejections: they raise
        with pytest.raises(ConnectionError):
            recommendations(user)
    assert recommendations(3) == ["popular"]
    clock.advance(10)
    assert recommendations(4) == ["popular"]
    assert calls == [1, 2]


async def test_async_over_an_open_breaker_with_a_handler() -> None:
    """The handler sees the breaker's CircuitOpenError, with its retry_after."""
    clock = FakeClock()
    breaker = CircuitBreaker(name="recs", failure_threshold=1, reset_timeout=30, clock=clock)
    breaker.isolate()

    @Fallback(handler=lambda exc: getattr(exc, "retry_after", None))
    @breaker
    async def recommendations() -> float:
        raise AssertionError("never called")

    assert await recommendations() == float("inf")


# wrap_driver (Policy's entry) ---------------------------------------------------------


def test_wrap_driver_sync_names_the_function_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Around a sync driver, with the name given for the log."""
    run = wrap_driver(Fallback(value=0), raiser(OPEN), False, name="orders.fetch")
    with caplog.at_level(logging.INFO, logger="resilient.fallback"):
        assert run() == 0
    assert caplog.records[0].getMessage().startswith("orders.fetch fell back")


async def test_wrap_driver_async() -> None:
    """Around an async driver; by default the driver's own name is logged."""
    run = wrap_driver(Fallback(handler=cached_answer), async_raiser(OPEN), True)
    assert await run() == "cached (CircuitOpenError)"


def test_wrap_driver_refuses_what_is_not_a_fallback() -> None:
    """A wrong object in Policy(fallback=...) fails when the driver is built, clearly."""
    with pytest.raises(TypeError, match=r"fallback must be a resilient.Fallback, got 0"):
        wrap_driver(0, raiser(OPEN), False)  # type: ignore[arg-type]


# Configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({}, ValueError, r"needs value= .* or handler="),
        ({"value": 0, "handler": cached_answer}, ValueError, r"value= or handler=, not both"),
        ({"handler": 42}, TypeError, r"handler must be a callable .* got int: 42"),
        ({"value": 0, "on": ()}, ValueError, r"on must name at least one exception type"),
        ({"value": 0, "on": int}, TypeError, r"on must be an exception type.*<class 'int'>"),
        ({"value": 0, "on": (KeyError, "x")}, TypeError, r"on must be an exception type"),
        ({"value": 0, "on": "KeyError"}, TypeError, r"on must be .* got str: 'KeyError'"),
        ({"value": 0, "on": KeyboardInterrupt}, ValueError, r"on=KeyboardInterrupt .* no "),
        ({"value": 0, "on": (KeyError, BaseException)}, ValueError, r"names BaseException"),
    ],
)
def test_bad_configuration_names_the_parameter(
    config: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each mistake fails at construction with the parameter and the value."""
    with pytest.raises(error, match=message):
        Fallback(**config)


def test_configuration_is_keyword_only_and_immutable() -> None:
    """Positional arguments are refused; a Fallback cannot be changed after construction."""
    with pytest.raises(TypeError, match=r"keyword arguments only, got positional 0"):
        Fallback(0)  # type: ignore[misc]
    fallback = Fallback(value=0)
    with pytest.raises(AttributeError):
        fallback.value = 1  # type: ignore[misc]
    assert list(inspect.signature(Fallback).parameters) == ["value", "handler", "on"]


def test_repr_shows_the_configuration() -> None:
    """repr names the value or handler, and on= when it is not the default."""
    assert repr(Fallback(value=[])) == "Fallback(value=[])"
    assert repr(Fallback(handler=cached_answer)) == "Fallback(handler=cached_answer)"
    assert repr(Fallback(value=0, on=KeyError)) == "Fallback(value=0, on=KeyError)"
    assert repr(Fallback(value=0, on=(KeyError,))) == "Fallback(value=0, on=(KeyError,))"
    assert repr(Fallback(value=0, on=(OSError, Throttled))) == (
        "Fallback(value=0, on=(OSError, test_fallback.Throttled))"
    )
    assert repr(Fallback(value=0, on=rejected_or_gave_up)) == "Fallback(value=0)"


@pytest.mark.parametrize(
    "fallback",
    [
        Fallback(value={"items": []}),
        Fallback(handler=cached_answer, on=(KeyError, Throttled)),
        Fallback(value=None, on=rejected_or_gave_up),
    ],
    ids=repr,
)
def test_pickles_as_its_configuration(fallback: Fallback) -> None:
    """The copy has the same settings, behaves the same, and no cached drivers."""
    fallback.call(lambda: 1)
    copy = pickle.loads(pickle.dumps(fallback))
    assert repr(copy) == repr(fallback)
    assert (copy.value, copy.handler, copy.on) == (fallback.value, fallback.handler, fallback.on)
    assert copy._drivers == {}
    error = KeyError("k")
    assert copy.falls_back_on(error) == fallback.falls_back_on(error)


@pytest.mark.parametrize("parameter", ["value", "handler", "on"])
def test_unpicklable_settings_make_a_clear_pickling_error(parameter: str) -> None:
    """A lambda or a lock cannot cross processes; the error names the setting."""
    config: dict[str, Any] = {"value": 0}
    if parameter == "value":
        config["value"] = lambda: 0
    elif parameter == "handler":
        config = {"handler": lambda exc: 0}
    else:
        config["on"] = lambda exc: True
    with pytest.raises(pickle.PicklingError, match=rf"cannot be pickled: its {parameter} "):
        pickle.dumps(Fallback(**config))


# In a Policy: the outermost stage ---------------------------------------------------------


def test_policy_fallback_answers_for_a_retry_that_gave_up_and_for_a_rate_limit() -> None:
    """Policy(fallback=) wraps every other stage: the retries' give-up and the limiter's refusal."""
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        raise ConnectionError("down")

    policy = resilient.Policy(
        fallback=Fallback(value="cached"),
        rate_limit=resilient.RateLimiter(rate=1, per=3600, burst=1),
        retry=Retry(attempts=3, on=ConnectionError),
    )
    with resilient.instant_retries():
        assert policy.call(flaky) == "cached"  # three attempts, then the give-up falls back
        assert len(calls) == 3
        assert policy.call(flaky) == "cached"  # refused by the limiter: never called
    assert len(calls) == 3


async def test_policy_fallback_applies_to_async_calls_with_an_async_handler() -> None:
    """An async Policy call falls back through an async handler that sees the exception."""
    seen: list[BaseException] = []

    async def handler(error: Exception) -> str:
        seen.append(error)
        await asyncio.sleep(0)
        return "degraded"

    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    policy = resilient.Policy(fallback=Fallback(handler=handler), breaker=breaker, retry=None)

    @policy
    async def fetch() -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):  # not a rejection: the default does not fall back
        await fetch()
    assert await fetch() == "degraded"  # the open breaker's rejection falls back
    assert isinstance(seen[0], CircuitOpenError)


def test_policy_without_fallback_is_unchanged_and_refuses_a_wrong_one() -> None:
    """No fallback: the driver is the bare one; a wrong fallback is a TypeError naming it."""
    with pytest.raises(TypeError, match=r"fallback must be a resilient\.Fallback"):
        resilient.Policy(fallback="cached")  # type: ignore[arg-type]
    policy = resilient.Policy(fallback=Fallback(value=0), retry=None)
    assert "fallback=Fallback(value=0)" in repr(policy)
    copy = pickle.loads(pickle.dumps(policy))
    assert repr(copy) == repr(policy)


def test_policy_resume_applies_the_fallback_around_the_failure_path() -> None:
    """A first attempt made elsewhere that fails, and whose retries give up, falls back too."""

    policy = resilient.Policy(
        fallback=Fallback(value="cached"), retry=Retry(attempts=2, on=ConnectionError)
    )

    def again() -> str:
        raise ConnectionError("still down")

    resume = policy.resume(again, False)
    with resilient.instant_retries():
        assert resume(time.monotonic(), ConnectionError("down")) == "cached"


def test_by_default_a_servers_refusals_fall_back_and_its_application_errors_do_not() -> None:
    """RPC: Overloaded (a refusal) falls back; RemoteError(404) and ProtocolError raise."""
    from resilient.rpc import Overloaded, ProtocolError, RemoteError

    def failing(error: Exception) -> Callable[[], str]:
        def call() -> str:
            raise error

        return call

    fallback = Fallback(value="cached")
    assert fallback(failing(Overloaded()))() == "cached"
    for error in (RemoteError(404, "no such key"), ProtocolError("not JSON-RPC")):
        with pytest.raises(type(error)):
            fallback(failing(error))()
