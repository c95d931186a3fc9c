"""Fleet-wide state in Redis: shared breakers, retry budgets and rate limits (optional extra).

``pip install resilient[redis]`` brings redis-py. Three stores plug into the seams the
stages already have, so a fleet of processes shares one state where one is wanted:

* :class:`RedisStore` — ``CircuitBreaker(name="payments", store=RedisStore(client))``:
  one breaker for the fleet, read from a local copy on the healthy path (each breaker's
  store, ``breaker.store``, is the :class:`SharedBreakerStore` it builds).
* :class:`RedisBudgetStore` — ``RetryBudget(store=RedisBudgetStore(client, name="api"))``:
  Finagle's retry budget counted across the fleet.
* :class:`RedisRateStore` — ``RateLimiter(rate=..., store=RedisRateStore(client, name="api"))``:
  GCRA with one key per limit and Redis's clock.

Every update is one Lua script (atomic); times come from Redis ``TIME``; keys sit under
a prefix with the name as a hash tag, so Redis Cluster keeps each one's keys in a slot;
and Redis trouble never fails a call: each store falls back to local state, logs once,
and resynchronises when Redis returns. Clients may be sync (``redis.Redis``) or async
(``redis.asyncio.Redis``); see each class for what an async client changes.

No stage module imports this package: the root works without redis-py installed.
"""

from __future__ import annotations

from resilient.redis.breaker import RedisStore, SharedBreakerStore
from resilient.redis.budget import RedisBudgetStore
from resilient.redis.ratelimit import RedisRateStore

__all__ = ["RedisBudgetStore", "RedisRateStore", "RedisStore", "SharedBreakerStore"]
