"""One retry budget for a whole fleet: :class:`RedisBudgetStore`, the Redis ``BudgetStore``.

``RetryBudget(store=RedisBudgetStore(client, name="inventory"))`` counts the calls and
retries of every process that builds a budget on that name in one Redis hash,
``{prefix}budget:{inventory}``: ten slices of the window, each with its calls and its
retries, advanced by Redis ``TIME``. One Lua script does all of it: it moves the ring on,
adds the calls a process reports, and (for a retry) takes one if ``retries + 1 <=
ratio * calls + min_retries_per_second * window`` over the fleet. So a fleet of 16
processes against a dead dependency retries 20% of its calls plus 10 a second, not 16
times that.

Calls are counted in-process, lock-free as ever, and reported in batches: by each
retry (which is a round-trip, on the failure path) and by the background syncer every
``sync_interval``. When Redis is down the budget decides on its own counts, and the
calls and retries it counted meanwhile are reported when Redis is back. With an async
client a retry cannot wait for Redis: the budget decides on the fleet's counts as of the
last sync plus its own since, and the syncer task reports them; the fleet may then
overshoot by what its processes allow themselves within one ``sync_interval``.

Public names: :class:`RedisBudgetStore`.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Final, NoReturn

from resilient import _fork
from resilient._config import Duration, to_seconds
from resilient.redis._link import (
    Link,
    Request,
    Script,
    Unavailable,
    check_client,
    check_name,
    check_prefix,
    decode,
    unpicklable,
)
from resilient.retry import RetryBudget

__all__ = ["RedisBudgetStore"]

# KEYS[1] the hash. ARGV: window, ratio, reserve, calls, retries (both added as they are),
# 1 to take a retry (0: only report). Replies {granted, fleet calls, fleet retries,
# allowance as text}.
_BUDGET: Final = Script(
    r"""
local window, ratio, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local calls, retries, take = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local width = window / 10
local index = math.floor(now / width)
local raw = redis.call('HGETALL', KEYS[1])
local s = {}
for i = 1, #raw, 2 do s[raw[i]] = raw[i + 1] end
local c, r = {}, {}
for i = 0, 9 do c[i] = tonumber(s['c' .. i] or '0'); r[i] = tonumber(s['r' .. i] or '0') end
local last = tonumber(s.i or '')
if last == nil or index - last >= 10 then
  for i = 0, 9 do c[i] = 0; r[i] = 0 end
elseif index > last then
  for b = last + 1, index do c[b % 10] = 0; r[b % 10] = 0 end
else
  index = last  -- a clock stepped back files everything under the newest slice
end
local slot = index % 10
c[slot] = c[slot] + calls
r[slot] = r[slot] + retries
local total_c, total_r = 0, 0
for i = 0, 9 do total_c = total_c + c[i]; total_r = total_r + r[i] end
local allowance = (ratio * total_c + reserve) * (1 + 1e-12)
local granted = 0
if take and total_r + 1 <= allowance then
  r[slot] = r[slot] + 1; total_r = total_r + 1; granted = 1
end
if calls > 0 or retries > 0 or granted == 1 or last ~= index then
  local fields = {'i', index}
  for i = 0, 9 do
    fields[#fields + 1] = 'c' .. i; fields[#fields + 1] = c[i]
    fields[#fields + 1] = 'r' .. i; fields[#fields + 1] = r[i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
end
return {granted, total_c, total_r, string.format('%.17g', allowance)}
"""
)


class RedisBudgetStore:
    """A :class:`~resilient.BudgetStore` that counts a budget's calls and retries in Redis.

    >>> budget = RetryBudget(store=RedisBudgetStore(client, name="inventory"))  # doctest: +SKIP
    >>> retry = Retry(attempts=3, budget=budget)  # doctest: +SKIP

    ``name`` keys the shared counts (every process using the same name shares them);
    ``prefix`` starts the key (default ``"resilient:"``); ``sync_interval`` is how often
    the background syncer reports calls (default 0.1 s); ``retry_interval`` how often
    it tries a Redis that is down (default 1.0 s). Budgets of the same ``ratio``,
    ``min_retries_per_second`` and ``window`` should share a name: each process applies
    its own budget's numbers to the fleet's counts.
    """

    __slots__ = ("__weakref__", "_key", "_link", "_name")

    def __init__(
        self,
        client: Any,
        *,
        name: str,
        prefix: str = "resilient:",
        sync_interval: Duration = 0.1,
        retry_interval: Duration = 1.0,
    ) -> None:
        check_client(client)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str, got {name!r}: it keys the counts")
        check_name("budget", name)
        self._name = name
        self._key = f"{check_prefix(prefix)}budget:{{{name}}}"
        self._link = Link(
            client,
            what=f"retry budget {name!r}",
            sync_interval=to_seconds("sync_interval", sync_interval, allow_zero=False),
            retry_interval=to_seconds("retry_interval", retry_interval, allow_zero=False),
        )

    def __reduce__(self) -> NoReturn:
        raise unpicklable(self)

    def __repr__(self) -> str:
        return f"RedisBudgetStore(name={self._name!r}, key={self._key!r})"

    @property
    def key(self) -> str:
        """The Redis key holding the fleet's counts."""
        return self._key

    @property
    def redis_available(self) -> bool:
        """``False`` while Redis is taken as down and budgets decide on their own counts."""
        return self._link.up

    def for_budget(self, budget: RetryBudget) -> _SharedBudget:
        """The fleet's counts for ``budget`` (no Redis command is sent)."""
        shared = _SharedBudget(self, budget)
        self._link.join(shared)
        return shared

    def close(self) -> None:
        """Stop the background syncer; budgets go on with their own counts."""
        self._link.close()


class _SharedBudget:
    """One budget's view of the fleet's counts (see :class:`RedisBudgetStore`)."""

    __slots__ = (
        "__weakref__",
        "_args",
        "_budget",
        "_fleet",
        "_key",
        "_link",
        "_lock",
        "_owed",
        "_ratio",
        "_reserve",
    )

    def __init__(self, store: RedisBudgetStore, budget: RetryBudget) -> None:
        self._link = store._link
        self._key = (store._key,)
        self._budget = weakref.ref(budget)
        self._ratio = budget.ratio
        self._reserve = budget.min_retries_per_second * budget.window
        self._args = (repr(budget.window), repr(self._ratio), repr(self._reserve))
        self._lock = _fork.register_lock(threading.Lock())
        # Async client: the fleet's (calls, retries) at the last sync, and the (calls,
        # retries) counted here since, owed to the next sync.
        self._fleet = (0, 0)
        self._owed = [0, 0]

    def _run(self, calls: int, retries: int, take: bool) -> tuple[bool, int]:
        reply = self._link.run(_BUDGET, self._key, (*self._args, calls, retries, int(take)))
        return int(reply[0]) == 1, max(0, math.floor(float(decode(reply[3])) - int(reply[2])))

    def _room(self, calls: int) -> float:
        """Async client: retries left on the last sync's counts and this process's since.

        Holds the lock.
        """
        self._owed[0] += calls
        fleet_calls, fleet_retries = self._fleet
        allowance = (self._ratio * (fleet_calls + self._owed[0]) + self._reserve) * (1 + 1e-12)
        return allowance - fleet_retries - self._owed[1]

    def try_withdraw(self, calls: int, now: float) -> bool | None:
        """One script: report ``calls``, then take a retry if the fleet's budget allows."""
        if self._link.is_async:
            self._link.ensure_syncer()
            with self._lock:
                if self._room(calls) < 1:
                    return False
                self._owed[1] += 1
                return True
        try:
            return self._run(calls, 0, True)[0]
        except Unavailable:
            return None

    def available(self, calls: int, now: float) -> int | None:
        """Report ``calls``, then say how many retries the fleet's budget allows now."""
        if self._link.is_async:
            self._link.ensure_syncer()
            with self._lock:
                return max(0, math.floor(self._room(calls)))
        try:
            return self._run(calls, 0, False)[1]
        except Unavailable:
            return None

    def sync(self) -> None:
        """Report now, alone (the syncer batches :meth:`sync_request` instead)."""
        request = self.sync_request()
        if request is not None:
            self._link.send([request])

    def sync_request(self) -> Request | None:
        """The syncer's script: the calls (and locally allowed retries) since the last report."""
        budget = self._budget()
        if budget is None or not self._link.up:
            return None
        calls, retries = budget.take_unreported()
        if not calls and not retries:
            return None

        def failed() -> None:
            with budget._lock:
                budget._give_back(calls)
                budget._unreported_retries += retries

        return Request(_BUDGET, self._key, (*self._args, calls, retries, 0), _ignore, failed)

    async def async_sync(self) -> None:
        """Async client: report what was counted here, take the fleet's counts back."""
        budget = self._budget()
        if budget is None or not self._link.up:
            return
        calls, retries = budget.take_unreported()
        with self._lock:
            calls += self._owed[0]
            retries += self._owed[1]
            self._owed = [0, 0]
        try:
            reply = await self._link.arun(_BUDGET, self._key, (*self._args, calls, retries, 0))
        except Unavailable:
            with self._lock:
                self._owed[0] += calls
                self._owed[1] += retries
            return
        with self._lock:
            self._fleet = (int(reply[1]), int(reply[2]))


def _ignore(reply: object) -> None:
    """A report's reply says nothing the sync client's budget needs."""
