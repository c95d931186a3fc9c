"""The plumbing every Redis store shares: scripts, the outage guard, the background syncer.

A :class:`Link` belongs to one store factory (a ``RedisStore``, ``RedisBudgetStore`` or
``RedisRateStore``) and holds its client. It runs each Lua script by ``EVALSHA``,
falling back to ``EVAL`` (which also caches it) when the server answers ``NOSCRIPT``.
Its guard is the store's own small circuit breaker: the first Redis error or timeout
marks Redis *down*; while down, callers never wait on Redis (their store uses local
state), and only the background syncer tries again, once per ``retry_interval``; the
outage is logged once when it starts and once when it ends. The syncer is a daemon
thread for a sync client, an asyncio task on the loop that first used the store for an
async client; every ``sync_interval`` it calls each participant's ``sync``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import redis
import redis.asyncio
import redis.exceptions

from resilient import _fork

__all__ = [
    "REDIS_ERRORS",
    "Link",
    "Participant",
    "Request",
    "Script",
    "Unavailable",
    "check_client",
    "check_name",
    "check_prefix",
    "decode",
    "is_async_client",
]

_logger = logging.getLogger("resilient.redis")

# What counts as Redis trouble: connection loss, timeouts, a server that refuses (OOM,
# READONLY, LOADING), a cluster moving slots. Script bugs (ResponseError) count too: a
# store that cannot run its script must fall back rather than fail the call.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


class Unavailable(Exception):
    """Redis cannot be used now: the store falls back to its local state."""


def decode(value: object) -> str:
    """A reply as text, whether the client decodes responses or not."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class Script:
    """One Lua script, run by ``EVALSHA`` with a fallback to ``EVAL`` on ``NOSCRIPT``."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def run(self, client: Any, keys: Sequence[str], args: Sequence[object]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            # A restarted or flushed server, or a cluster node that never saw it.
            return client.eval(self.source, len(keys), *keys, *args)

    async def arun(self, client: Any, keys: Sequence[str], args: Sequence[object]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


class Request(NamedTuple):
    """One script a participant wants run by the syncer's pipeline, and what to do after."""

    script: Script
    keys: Sequence[str]
    args: Sequence[object]
    done: Callable[[Any], object]
    """Called with the script's reply."""
    failed: Callable[[], object]
    """Called when the script could not run (Redis is marked down already)."""


class Participant(Protocol):
    """A store the syncer keeps in step.

    With a sync client each round asks every participant for its :class:`Request`
    (``None``: nothing to send, or it did its own round trips) and sends them all in one
    pipeline; with an async client it awaits each one's ``async_sync()``.
    """

    def sync_request(self) -> Request | None: ...

    async def async_sync(self) -> None: ...


def is_async_client(client: object) -> bool:
    """Whether ``client`` is redis-py's asyncio client (or its cluster twin)."""
    return isinstance(client, redis.asyncio.Redis | redis.asyncio.RedisCluster)


def check_client(client: object) -> None:
    """``TypeError`` unless ``client`` is a redis-py client, sync or async, plain or cluster."""
    kinds = (redis.Redis, redis.RedisCluster, redis.asyncio.Redis, redis.asyncio.RedisCluster)
    if not isinstance(client, kinds):
        raise TypeError(
            "client must be a redis-py client (redis.Redis, redis.RedisCluster, "
            f"redis.asyncio.Redis or redis.asyncio.RedisCluster), got {client!r}"
        )


def check_name(what: str, name: str) -> None:
    """Braces in a name would move its keys' hash tag and split them across cluster slots."""
    if "{" in name or "}" in name:
        raise ValueError(
            f"{what} name {name!r} contains '{{' or '}}': its Redis keys carry the name as a "
            "cluster hash tag, which braces would break; pick a name without braces"
        )


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(
            f"prefix={prefix!r} contains '{{' or '}}', which would become the keys' cluster "
            "hash tag in place of the name; pick a prefix without braces"
        )
    return prefix


_tokens = itertools.count(1)


class Link:
    """A store factory's client, outage guard and background syncer (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        *,
        what: str,
        sync_interval: float,
        retry_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.is_async = is_async_client(client)
        self.what = what
        self.sync_interval = sync_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self.up = True  # read by callers without the lock: a plain attribute
        self._retry_at = 0.0
        # An outage was logged and no script has worked since: its end is not logged yet.
        self.outage_logged = False
        self._lock = _fork.register_lock(threading.Lock())
        self._participants: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        # Whether the async syncer task is running: read on an async store's every call.
        self.syncing = False
        self._stop = threading.Event()
        self.closed = False
        _fork.register(self)

    # The guard ------------------------------------------------------------------------

    def failed(self, error: BaseException) -> None:
        """Redis failed an operation: mark it down (logged once per outage)."""
        with self._lock:
            self._retry_at = self.clock() + self.retry_interval
            self.up = False
            if self.outage_logged:
                return
            self.outage_logged = True
        _logger.warning(
            "Redis unreachable for %s (%s: %s): using local state, retrying every %g s",
            self.what,
            type(error).__name__,
            error,
            self.retry_interval,
        )

    def recovered(self) -> None:
        """The syncer reached a Redis that was down (only it tries one): use it again.

        Not logged until a script works too (:meth:`worked`): a server that answers a
        ping yet fails every script (a key of the wrong type, say) is still one outage.
        """
        self.up = True

    def worked(self) -> None:
        """A script ran: if an outage was logged, log its end (once)."""
        with self._lock:
            if not self.outage_logged:
                return
            self.outage_logged = False
        _logger.warning("Redis reachable again for %s: resynchronised local state", self.what)

    def due(self) -> bool:
        """Whether the syncer should try a down Redis again now."""
        return not self.up and self.clock() >= self._retry_at

    def run(self, script: Script, keys: Sequence[str], args: Sequence[object]) -> Any:
        """Run ``script`` now (sync client); ``Unavailable`` while Redis is down or on error."""
        if not self.up:
            raise Unavailable
        try:
            reply = script.run(self.client, keys, args)
        except REDIS_ERRORS as error:
            self.failed(error)
            raise Unavailable from error
        if self.outage_logged:
            self.worked()
        return reply

    async def arun(self, script: Script, keys: Sequence[str], args: Sequence[object]) -> Any:
        """Run ``script`` now (async client); as :meth:`run`."""
        if not self.up:
            raise Unavailable
        try:
            reply = await script.arun(self.client, keys, args)
        except REDIS_ERRORS as error:
            self.failed(error)
            raise Unavailable from error
        if self.outage_logged:
            self.worked()
        return reply

    # The syncer -----------------------------------------------------------------------

    def join(self, participant: Participant) -> None:
        """Keep ``participant`` in step from now on (held weakly); starts the syncer."""
        with self._lock:
            self._participants.add(participant)
        self.ensure_syncer()

    def ensure_syncer(self) -> None:
        """Start the syncer if it is not running (an async one needs a running loop)."""
        if self.closed:
            return
        if not self.is_async:
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._stop = threading.Event()
                    thread = threading.Thread(
                        target=_sync_thread,
                        args=(weakref.ref(self), self._stop, self.sync_interval),
                        name=f"resilient-redis-sync-{next(_tokens)}",
                        daemon=True,
                    )
                    self._thread = thread
                    thread.start()
            return
        loop = asyncio._get_running_loop()
        if loop is not None and not self.syncing:
            self.syncing = True
            self._task = loop.create_task(_sync_task(weakref.ref(self), self.sync_interval))

    def tick(self) -> None:
        """One round of the sync syncer: try a down Redis if due, then sync everyone."""
        if self.due():
            try:
                self.client.ping()
            except REDIS_ERRORS as error:
                self.failed(error)
            else:
                self.recovered()
        requests = [
            request
            for participant in list(self._participants)
            if (request := participant.sync_request()) is not None
        ]
        self.send(requests)

    def send(self, requests: Sequence[Request]) -> None:
        """Run ``requests`` in one pipeline (one round trip), each told how it went."""
        if not requests:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args, _, _ in requests:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as error:
            self.failed(error)
            for request in requests:
                request.failed()
            return
        for request, reply in zip(requests, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                try:  # EVAL, once: it loads the script for the next rounds
                    reply = request.script.run(self.client, request.keys, request.args)
                except REDIS_ERRORS as error:
                    reply = error
            if isinstance(reply, Exception):
                self.failed(reply)
                request.failed()
            else:
                if self.outage_logged:
                    self.worked()
                request.done(reply)

    async def atick(self) -> None:
        """One round of the async syncer."""
        if self.due():
            try:
                await self.client.ping()
            except REDIS_ERRORS as error:
                self.failed(error)
            else:
                self.recovered()
        for participant in list(self._participants):
            await participant.async_sync()

    def close(self) -> None:
        """Stop the syncer (the client stays open: it is the caller's)."""
        self.closed = True
        self._stop.set()
        task = self._task
        if task is not None:
            task.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _after_fork_in_child(self) -> None:  # pragma: no cover - runs in forked children
        # (test_a_forked_child_keeps_its_copy_fresh proves it; coverage does not follow forks)
        # The parent's syncer thread does not exist here: start this process's own.
        self._thread = None
        self._task = None
        if self._participants and not self.is_async:
            self.ensure_syncer()


def _sync_thread(ref: weakref.ref[Link], stop: threading.Event, interval: float) -> None:
    # Holds the link only during a tick, so a forgotten store can be collected.
    while not stop.wait(interval):
        link = ref()
        if link is None or link.closed:
            return
        try:
            link.tick()
        except Exception:  # pragma: no cover - a bug must not kill the syncer silently
            _logger.exception("resilient.redis syncer for %s failed; continuing", link.what)
        del link


async def _sync_task(ref: weakref.ref[Link], interval: float) -> None:
    try:
        while True:
            await asyncio.sleep(interval)
            link = ref()
            if link is None or link.closed:
                return
            try:
                await link.atick()
            except Exception:  # pragma: no cover - as in _sync_thread
                _logger.exception("resilient.redis syncer for %s failed; continuing", link.what)
            del link
    finally:
        # Ended (its loop closed, say): the next use on a running loop starts another.
        link = ref()
        if link is not None:
            link.syncing = False
