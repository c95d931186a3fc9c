"""The plumbing every Redis store shares: scripts, the outage guard, the background syncer.

A :class:`Link` belongs to one store factory (a ``RedisStore``, ``RedisBudgetStore`` or
``RedisRateStore``) and holds its client. It runs each Lua script by ``EVALSHA``,
falling back to ``EVAL`` (which also caches it) when the server answers ``NOSCRIPT``.
Its guard is the store's own small circuit breaker: the first Redis error or timeout
marks Redis *down*; while down, callers never wait on Redis (their store uses local
state), and only the background syncer tries again, once per ``retry_interval``; the
outage is logged once when it starts and once when it ends. A script that fails over
what its key holds (WRONGTYPE, say) is no outage: only the store of that key falls
back (:class:`KeyTrouble`), logged once for the key. The syncer is a daemon
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
    "KeyTrouble",
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
    "is_key_trouble",
    "unpicklable",
]

_logger = logging.getLogger("resilient.redis")

# What counts as Redis trouble: connection loss, timeouts, a server that refuses (OOM,
# READONLY, LOADING), a cluster moving slots. A script failing over what its key holds
# (ResponseError) counts too, for that key alone (KeyTrouble): a store that cannot run
# its script must fall back rather than fail the call.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


class Unavailable(Exception):
    """Redis cannot be used now: the store falls back to its local state."""


class KeyTrouble(Unavailable):
    """Redis answered, but a script failed over what its key holds: only that store falls back.

    A key of another type where a store's should be (another program's, under the same
    prefix), or a field a script cannot read. Redis itself is fine, so the store's
    other breakers, budgets and limits go on using it.
    """


def is_key_trouble(error: BaseException) -> bool:
    """Whether ``error`` is about one key's contents rather than about Redis."""
    if not isinstance(error, redis.exceptions.ResponseError):
        return False
    # WRONGTYPE, or a Lua runtime error in our script (Redis 7: "user_script:N: ...",
    # Redis 6: "Error running script ..."); OOM, READONLY, BUSY... are about Redis.
    return str(error).startswith(("WRONGTYPE", "user_script:", "Error running script"))


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
    """Called when the script could not run (Redis is marked down, or its key is in trouble)."""


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
    if isinstance(client, redis.Redis | redis.asyncio.Redis):
        _check_patience(client)


def _check_patience(client: Any) -> None:
    """``ValueError`` for a client that retries failed commands or never times out.

    Each store falls back to local state on the first error, but only once the client
    gives up: redis-py's default retries a command 10 times (4 s against a refused
    port, a minute against one that does not answer), and every call that meets the
    dead Redis meanwhile waits as long. (A cluster client's own retries find a failed
    over primary, so they are left alone.)
    """
    get_retry = getattr(client, "get_retry", None)
    retry = get_retry() if get_retry is not None else None
    retries = 0
    if retry is not None:
        get_retries = getattr(retry, "get_retries", None)
        retries = get_retries() if get_retries is not None else getattr(retry, "_retries", 0)
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    problems = []
    if retries:
        problems.append(f"retries each failed command {retries} times")
    if isinstance(kwargs, dict) and "socket_timeout" in kwargs and kwargs["socket_timeout"] is None:
        problems.append("waits for a reply for ever (socket_timeout=None)")
    if problems:
        raise ValueError(
            f"the Redis client {' and '.join(problems)}: the calls that meet a dead Redis would "
            "wait for all of it before the store falls back to local state; give the store a "
            "client of its own with short timeouts and no retries, e.g. redis.Redis(..., "
            "socket_timeout=0.1, socket_connect_timeout=0.1, "
            "retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))"
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


def unpicklable(store: object) -> TypeError:
    """The error a store raises when pickled: it holds a client, which belongs to one process."""
    return TypeError(
        f"a {type(store).__name__} holds a Redis client, which cannot be pickled; build one in "
        "each process from a client of its own (the shared state stays in Redis)"
    )


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
        # Keys whose scripts fail over what they hold (logged once each, until one works).
        self._troubled: set[str] = set()
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

    def key_failed(self, keys: Sequence[str], error: BaseException) -> None:
        """A script failed over what its key holds: log it once; Redis stays up."""
        key = keys[0]
        with self._lock:
            if key in self._troubled:
                return
            self._troubled.add(key)
        _logger.warning(
            "Redis refused a script on key %r for %s (%s: %s): the key holds data this store "
            "cannot read (another program's under the same prefix, say), so this one uses "
            "local state, retrying every %g s; delete the key or choose another prefix",
            key,
            self.what,
            type(error).__name__,
            error,
            self.retry_interval,
        )

    def key_worked(self, keys: Sequence[str]) -> None:
        """A script on a key in trouble ran: log its end (once)."""
        key = keys[0]
        with self._lock:
            if key not in self._troubled:
                return
            self._troubled.discard(key)
        _logger.warning("Redis runs the scripts on key %r again for %s", key, self.what)

    def _failed_run(self, keys: Sequence[str], error: BaseException) -> Unavailable:
        """Mark Redis down, or only the key in trouble; the exception to raise."""
        if is_key_trouble(error):
            self.key_failed(keys, error)
            return KeyTrouble()
        self.failed(error)
        return Unavailable()

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
            raise self._failed_run(keys, error) from error
        if self.outage_logged:
            self.worked()
        if self._troubled:
            self.key_worked(keys)
        return reply

    async def arun(self, script: Script, keys: Sequence[str], args: Sequence[object]) -> Any:
        """Run ``script`` now (async client); as :meth:`run`."""
        if not self.up:
            raise Unavailable
        try:
            reply = await script.arun(self.client, keys, args)
        except REDIS_ERRORS as error:
            raise self._failed_run(keys, error) from error
        if self.outage_logged:
            self.worked()
        if self._troubled:
            self.key_worked(keys)
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
                self._failed_run(request.keys, reply)
                request.failed()
            else:
                if self.outage_logged:
                    self.worked()
                if self._troubled:
                    self.key_worked(request.keys)
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
