"""The errors `resilient` raises, as one tree.

Every error is a :class:`ResilientError`, so one ``except`` clause catches
anything the toolkit itself decided to raise. The tree::

    ResilientError
    ├── DeadlineExceeded        (also a builtin TimeoutError)
    ├── CircuitOpenError        (.retry_after seconds, .breaker name)
    ├── BulkheadFull            (.max_concurrent, .max_waiting)
    ├── RateLimited             (.retry_after seconds, .name of the limiter)
    ├── QuorumError             (.needed, .answered, .reasons: which calls answered, why
    │                            the others did not; resilient.quorum, the cluster client)
    ├── EmptyRingError          (also a builtin LookupError; in resilient.hashring)
    ├── RPCError                (resilient.rpc.errors, whose docstring draws its subtree:
    │                            ProtocolError, RemoteError and the remote refusals; the KV
    │                            node's StorageFailed and StoreFull are RemoteErrors)
    └── LogError                (resilient.rpc.kv: a KV node's data directory is unusable)
        └── LogCorrupted        (also a builtin ValueError; .path, .line, .offset)

When retries run out the caller gets the *last original exception*, not a
wrapper; what happened is attached to it with :meth:`BaseException.add_note`.

Every error pickles (so it crosses process pools), and its message says what
happened and what to do about it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "PROGRAMMING_ERRORS",
    "BulkheadFull",
    "CircuitOpenError",
    "DeadlineExceeded",
    "QuorumError",
    "RateLimited",
    "ResilientError",
]

#: Exceptions that are bugs in the calling code, not trouble with a dependency: the
#: default ``Retry(on=...)`` never retries them (it would only repeat the bug), and a
#: breaker's default ``exclude`` does not count them as the dependency's failures.
PROGRAMMING_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    AttributeError,
    NameError,
    AssertionError,
    NotImplementedError,
    ImportError,
    SyntaxError,
)


class ResilientError(Exception):
    """Base class of every error raised by `resilient` itself."""

    #: Whether the error was decided on the other side of a wire (an RPC server's
    #: answer) rather than by a stage of this process. A Retry never retries this
    #: process's own refusals (an open breaker, a full bulkhead, a rate limit: they
    #: would answer the same at once), but may retry a remote one when ``on`` says so.
    remote: ClassVar[bool] = False
    #: Whether the error is a refusal (the call was shed or stopped, not a failure of
    #: the work itself): what a :class:`~resilient.Fallback` answers for by default.
    refusal: ClassVar[bool] = True


class DeadlineExceeded(ResilientError, TimeoutError):
    """The deadline in force ran out before the work finished.

    It is also a :class:`TimeoutError`, so code that already handles timeouts
    handles it too.
    """

    def __init__(self, message: str = "the deadline was exceeded") -> None:
        super().__init__(message)


class CircuitOpenError(ResilientError):
    """The circuit breaker is open: the call was rejected without being made.

    ``retry_after`` is the number of seconds until the breaker lets a probe
    through (``math.inf`` when it is held open by ``isolate()``).
    """

    def __init__(self, name: str, retry_after: float) -> None:
        # No super().__init__(message): rejections are frequent while a breaker is
        # open, so the message is only formatted if someone reads it.
        self.name = name
        self.retry_after = retry_after

    def __str__(self) -> str:
        if math.isinf(self.retry_after):
            hint = "it is held open until reset() is called"
        else:
            hint = f"retry in {self.retry_after:.3f} s, when it lets a probe call through"
        return f"circuit breaker {self.name!r} is open; the call was not made: {hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.retry_after), self.__dict__)


class BulkheadFull(ResilientError):
    """The bulkhead had no free slot and no room in its waiting queue."""

    def __init__(self, name: str, max_concurrent: int, max_waiting: int) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        super().__init__(
            f"bulkhead {name!r} is full: {max_concurrent} calls running and "
            f"{max_waiting} waiting; shed load or raise max_concurrent/max_waiting"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.max_concurrent, self.max_waiting), self.__dict__)


class RateLimited(ResilientError):
    """A rate limiter refused the call: it came sooner than the limit allows.

    ``retry_after`` is the number of seconds until the limiter would admit a call;
    ``name`` is the limiter's name. Only a remote limit that did not say when
    (:class:`resilient.rpc.RemoteRateLimited`) leaves ``retry_after`` ``None``.
    """

    retry_after: float | None

    def __init__(self, name: str, retry_after: float) -> None:
        # As CircuitOpenError: refusals come in floods, so the message is formatted lazily.
        self.name = name
        self.retry_after = retry_after

    def __str__(self) -> str:
        hint = "" if self.retry_after is None else f"retry in {self.retry_after:.3f} s, or "
        return (
            f"rate limiter {self.name!r} refused the call, which came sooner than its limit "
            f"allows; {hint}slow down"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.retry_after), self.__dict__)


class QuorumError(ResilientError):
    """Fewer calls succeeded than a quorum needs, and no more could: the operation failed.

    Raised by :func:`resilient.quorum` (and the cluster client built on it) as soon as
    success became impossible: too many calls failed, or the deadline passed first.

    * ``needed``: how many successes the quorum needed.
    * ``answered``: the labels of the calls that succeeded, in the order they did.
    * ``reasons``: every other call's label mapped to why it gave no answer: its error
      (``"ConnectError: ..."``), ``"cancelled: ..."`` for a call still running when the
      quorum gave up, or ``"not asked: ..."`` for one never started.
    * ``errors``: the exceptions themselves, by label, in this process only (a pickled
      copy keeps ``reasons``, not ``errors``: a foreign exception need not pickle).
    * ``what``: what the calls were for (``"kv.put of 'k'"``), for the message.

    It is not a refusal (:attr:`ResilientError.refusal` is False): calls were made and
    failed, so a :class:`~resilient.Fallback` leaves it alone unless told otherwise.
    """

    refusal = False

    def __init__(
        self,
        needed: int,
        answered: Sequence[Any],
        reasons: Mapping[Any, str],
        *,
        what: str = "the calls",
        errors: Mapping[Any, BaseException] | None = None,
    ) -> None:
        self.needed = needed
        self.answered = tuple(answered)
        self.reasons = dict(reasons)
        self.what = what
        self.errors: dict[Any, BaseException] = dict(errors or {})
        super().__init__(needed, self.answered, self.reasons)

    def __str__(self) -> str:
        total = len(self.answered) + len(self.reasons)
        answered = ", ".join(map(str, self.answered)) or "none"
        why = "; ".join(f"{label}: {reason}" for label, reason in self.reasons.items())
        return (
            f"{self.what}: {len(self.answered)} of {total} answered, {self.needed} needed "
            f"(answered: {answered}; no answer from {why or 'none'}); bring the failing ones "
            "back, give the call a longer deadline, or lower the quorum"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        state = {name: value for name, value in self.__dict__.items() if name != "errors"}
        return (type(self), (self.needed, self.answered, self.reasons), state)
