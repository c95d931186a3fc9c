"""One rate limit for a whole fleet: :class:`RedisRateStore`, the Redis ``RateStore``.

``RateLimiter(rate=100, per=1.0, burst=20, store=RedisRateStore(client, name="api"))``
keeps the limiter's one instant (GCRA's theoretical arrival time) under the key
``{prefix}rate:{api}``, and each decision is one Lua script that reads it, compares and
writes it forward, with ``now`` taken from Redis ``TIME``: the hosts' clocks never
enter it, so skewed hosts cannot hand out more than the limit. The key expires once
its instant has passed (an idle limit costs no memory). ``limiter.for_key(k)`` gives
each key its own Redis key, ``{prefix}rate:{api[k]}`` (``repr(k)`` inside the brackets).

Every admission is a round-trip: an exact fleet-wide limit must ask the one place that
counts. When Redis is down (an error or a timeout), the store falls back to an
in-process :class:`~resilient.MemoryRateStore`, logs once, and goes back to Redis when
the syncer finds it again: during the outage each process applies the limit on its own.

The client may be sync (``redis.Redis``, ``redis.RedisCluster``) or async
(``redis.asyncio.Redis``, ``redis.asyncio.RedisCluster``). With a sync client every
decision is a blocking call, also in async code, where each admission then holds the
event loop for its round trip (about 120 µs on one host). With an async client the store
offers the seam's coroutine methods (``take_async``, ``give_back_async``): the limiter
awaits the same script in ``acquire_async``, so the loop runs other tasks meanwhile,
and ``try_acquire`` on the loop answers ``False`` ("await ``acquire_async``"), which is
what the driver of a decorated async function does. Such a store has no sync path: its
``take`` raises ``TypeError`` (sync code needs a store on a sync client of its own). A
task cancelled while its script is in flight may have spent one admission of the limit.

Public names: :class:`RedisRateStore`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable
from typing import Any, Final, NoReturn

from resilient._config import Duration, to_seconds
from resilient.ratelimit import MemoryRateStore
from resilient.redis._link import (
    Link,
    Script,
    Unavailable,
    check_client,
    check_prefix,
    decode,
    is_async_client,
    unpicklable,
)

__all__ = ["RedisRateStore"]

# KEYS[1] the instant. ARGV: interval, tolerance, max_wait (-1: unlimited). Replies
# {wait, instant stored} as text.
_TAKE: Final = Script(
    r"""
local interval, tolerance, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stored = tonumber(redis.call('GET', KEYS[1]) or '')
local tat = stored or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait <= 1e-9 then
  wait = 0
elseif max_wait >= 0 and wait > max_wait then
  return {string.format('%.17g', wait), string.format('%.17g', stored or now)}
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', new), 'PX', math.ceil((new - now) * 1000) + 1)
return {string.format('%.17g', wait), string.format('%.17g', new)}
"""
)

# KEYS[1] the instant. ARGV: the reserved instant, interval.
_GIVE_BACK: Final = Script(
    r"""
local stored = tonumber(redis.call('GET', KEYS[1]) or '')
if stored ~= nil and stored == tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], string.format('%.17g', stored - tonumber(ARGV[2])), 'KEEPTTL')
end
return 0
"""
)


class RedisRateStore:
    """A :class:`~resilient.RateStore` whose instant lives in Redis, decided on Redis time.

    >>> limit = RateLimiter(rate=100, store=RedisRateStore(client, name="api"))  # doctest: +SKIP

    ``client`` is a redis-py client, sync or async (an async one's store is decided by
    awaiting, in async code only; see the module docstring), with a socket timeout and
    no retries of its own. ``name`` keys the limit (every process using it shares it);
    ``prefix`` starts the key (default ``"resilient:"``); ``retry_interval`` is how often
    a Redis that is down is tried again (default 1.0 s). Every limiter sharing a name
    should have the same ``rate``, ``per`` and ``burst``.
    """

    __slots__ = ("__weakref__", "_key", "_link", "_local", "_name", "_prefix")

    def __new__(cls, client: Any, *args: Any, **kwargs: Any) -> RedisRateStore:
        # An async client's store is the subclass with the seam's coroutine methods (and
        # no sync path); the limiter looks for them, so a sync client's store has none.
        if cls is RedisRateStore and is_async_client(client):
            cls = _AsyncRedisRateStore
        return object.__new__(cls)

    def __init__(
        self,
        client: Any,
        *,
        name: str,
        prefix: str = "resilient:",
        retry_interval: Duration = 1.0,
        _link: Link | None = None,
    ) -> None:
        check_client(client)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str, got {name!r}: it keys the limit")
        self._name = name
        self._prefix = check_prefix(prefix)
        self._key = (f"{prefix}rate:{{{name}}}",)
        if _link is None:
            _link = Link(
                client,
                what=f"rate limit {name!r}",
                sync_interval=to_seconds("retry_interval", retry_interval, allow_zero=False),
                retry_interval=to_seconds("retry_interval", retry_interval, allow_zero=False),
            )
        self._link = _link
        self._local = MemoryRateStore()

    def __reduce__(self) -> NoReturn:
        raise unpicklable(self)

    def __repr__(self) -> str:
        return f"RedisRateStore(name={self._name!r}, key={self._key[0]!r})"

    @property
    def key(self) -> str:
        """The Redis key holding this limit's instant."""
        return self._key[0]

    @property
    def redis_available(self) -> bool:
        """``False`` while Redis is taken as down and this process limits on its own."""
        return self._link.up

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """One script: GCRA on Redis's clock (``now`` is used only during an outage)."""
        link = self._link
        if link.up:
            limit = -1.0 if math.isinf(max_wait) else max_wait
            try:
                reply = link.run(_TAKE, self._key, (repr(interval), repr(tolerance), repr(limit)))
            except Unavailable:
                pass
            else:
                return float(decode(reply[0])), float(decode(reply[1]))
        link.ensure_syncer()  # it finds Redis again
        return self._local.take(now, interval, tolerance, max_wait)

    def give_back(self, reserved: float, interval: float) -> None:
        """Move the instant back if it is still ``reserved`` (in Redis and locally)."""
        self._local.give_back(reserved, interval)
        if self._link.up:
            with contextlib.suppress(Unavailable):
                self._link.run(_GIVE_BACK, self._key, (repr(reserved), repr(interval)))

    def for_key(self, key: Hashable) -> RedisRateStore:
        """The store of one key's own limit: ``{prefix}rate:{name[key]}``."""
        return type(self)(
            self._link.client, name=f"{self._name}[{key!r}]", prefix=self._prefix, _link=self._link
        )

    def close(self) -> None:
        """Stop the background syncer, if an outage started one (the client stays open)."""
        self._link.close()

    def sync_request(self) -> None:
        """Nothing to report: every admission went to Redis (the syncer only finds it again)."""

    async def async_sync(self) -> None:  # pragma: no cover - never joins a syncer
        """Nothing to report: every admission went to Redis (the syncer only finds it again)."""


class _AsyncRedisRateStore(RedisRateStore):
    """``RedisRateStore`` on an async client: decides by awaiting, has no sync path."""

    __slots__ = ()

    def take(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """Refused: a sync caller cannot await the async client's round trip."""
        raise self._no_sync_path()

    def give_back(self, reserved: float, interval: float) -> None:
        """Refused, as :meth:`take`."""
        raise self._no_sync_path()

    def _no_sync_path(self) -> TypeError:
        return TypeError(
            f"{self!r} has an async client (redis.asyncio), so a rate limiter on it decides "
            "only in async code: 'await limiter.acquire_async()', 'async with limiter:' or "
            "an async function it decorates; for sync code give the limiter a "
            "RedisRateStore on a sync client (redis.Redis) of the same name"
        )

    async def take_async(
        self, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[float, float]:
        """The script of :meth:`RedisRateStore.take`, awaited (``now``: outages only)."""
        link = self._link
        if link.up:
            limit = -1.0 if math.isinf(max_wait) else max_wait
            try:
                reply = await link.arun(
                    _TAKE, self._key, (repr(interval), repr(tolerance), repr(limit))
                )
            except Unavailable:
                pass
            else:
                return float(decode(reply[0])), float(decode(reply[1]))
        if not link.syncing:
            link.ensure_syncer()  # a task on this loop: it finds Redis again
        return self._local.take(now, interval, tolerance, max_wait)

    async def give_back_async(self, reserved: float, interval: float) -> None:
        """:meth:`RedisRateStore.give_back`, awaited."""
        self._local.give_back(reserved, interval)
        if self._link.up:
            with contextlib.suppress(Unavailable):
                await self._link.arun(_GIVE_BACK, self._key, (repr(reserved), repr(interval)))
