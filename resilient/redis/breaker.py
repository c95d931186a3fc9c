"""One circuit breaker for a whole fleet: :class:`RedisStore`, the Redis ``BreakerStore``.

``CircuitBreaker(name="payments", store=RedisStore(client))`` keeps the breaker's state
in Redis under ``{prefix}breaker:{payments}`` (a hash) and ``...:probes`` (the probe
leases), so every process that builds a breaker of that name shares one state machine.
See the README section "Sharing state across a fleet" for the whole story; in short:

* **The healthy path stays in-process.** The state the breaker reads on every call is
  a local copy, refreshed by a background syncer every ``sync_interval`` (50 ms), in
  one pipelined round-trip for all the store's breakers. A success that cannot trip
  anything is counted locally and reported in that batch. So a healthy call makes no
  round-trip, and a breaker opened anywhere in the fleet rejects calls everywhere
  within ``sync_interval`` plus one round-trip.
* **Everything else is one Lua script**, atomic in Redis: recording a failure, each
  transition (a compare-and-set on the stay's epoch, so of many processes racing to
  trip the breaker one does, and one listener event is emitted fleet-wide), taking
  and giving back a probe slot. Times are Redis ``TIME``, never a host's clock:
  ``opened_at`` is converted to each process's own clock when read.
* **Half-open probes are leases** in a sorted set, with an expiry (``probe_lease``):
  the fleet runs at most ``half_open_max_calls`` probes at once, and a probe whose
  process died frees its slot when its lease expires.
* **Redis trouble never fails a call.** On an error or timeout the store falls back to
  a local in-memory breaker seeded with the last shared state (``outage="local"``, the
  default) or opened (``outage="open"``); it logs once, and Redis is not tried again
  by callers, only by the syncer, every ``retry_interval``. When Redis answers again,
  a breaker that opened locally during the outage opens the shared one, failures
  counted locally are added to the shared count, and the local copy takes the shared
  state again.
* **Constructing a breaker touches nothing shared**: no key is written until an outcome
  or a transition is.

An async client (``redis.asyncio.Redis``) cannot be awaited from the breaker's
synchronous decisions, so with one the breaker decides on its local state, and the
syncer, an asyncio task started on the loop that first uses the breaker, does the Redis
side every ``sync_interval``: it reports the interval's outcomes and transitions, takes
the shared state back, and leases probe slots ahead for calls that asked for one. The
fleet then agrees within two ``sync_interval`` rather than at once (one for the trip to
reach Redis, one for the others to read it; and each process's breaker emits its own
event for a trip it made itself), a first probe waits up to one interval for its lease;
the probe limit still holds across the fleet, and the event loop never waits on Redis.

Public names: :class:`RedisStore`, :class:`SharedBreakerStore`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any, Final, Literal, NoReturn

from resilient import _fork
from resilient._config import Duration, to_seconds
from resilient.breaker.store import (
    BreakerSpec,
    BreakerState,
    InMemoryBreakerStore,
    StoreSnapshot,
)
from resilient.redis import _breaker_lua as lua
from resilient.redis._link import (
    KeyTrouble,
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

__all__ = ["RedisStore", "SharedBreakerStore"]

_logger = logging.getLogger("resilient.redis")

_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_ISOLATED: Final = BreakerState.ISOLATED
_STATES: Final = {state.value: state for state in BreakerState}

_LOAD: Final = Script(lua.LOAD)
_CAS: Final = Script(lua.COMPARE_AND_SET)
_RECORD: Final = Script(lua.RECORD)
_ACQUIRE: Final = Script(lua.ACQUIRE_PROBE)
_RELEASE: Final = Script(lua.RELEASE_PROBE)
_RENEW: Final = Script(lua.RENEW_PROBE)


class RedisStore:
    """A :class:`~resilient.BreakerStoreFactory` that keeps each breaker's state in Redis.

    >>> import redis
    >>> quick = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    >>> store = RedisStore(redis.Redis(socket_timeout=0.1, retry=quick))  # doctest: +SKIP
    >>> payments = CircuitBreaker(name="payments", store=store)  # doctest: +SKIP

    One ``RedisStore`` serves any number of breakers (each keyed by its name) and runs
    one background syncer for them all. Keyword-only configuration:

    * ``prefix`` — start of every key (default ``"resilient:"``).
    * ``sync_interval`` — seconds between refreshes of the local copy and batched
      reports (default 0.05): the bound on how stale a process's view of the fleet is.
    * ``retry_interval`` — seconds between attempts to reach Redis while it is down
      (default 1.0).
    * ``probe_lease`` — seconds a half-open probe holds its fleet-wide slot at most
      (default 10.0): set it above the protected call's timeout.
    * ``outage`` — ``"local"`` (default): while Redis is down each process goes on with
      its own breaker, seeded with the last shared state; ``"open"``: each process opens
      its breaker when Redis is lost and probes on its own after ``reset_timeout``.
    * ``key_ttl`` — seconds a breaker's keys live after their last write (default one
      day): breakers that are gone do not stay in Redis for ever. It must exceed each
      breaker's ``reset_timeout``; an isolated breaker's keys never expire (``isolate()``
      holds until ``reset()``).

    Give the client short timeouts (``socket_timeout=0.1``, ``socket_connect_timeout=0.1``)
    and no retries of its own (``retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)``):
    a timeout marks Redis down at once, and only the calls that met it paid it. A
    ``redis.Redis`` or ``redis.asyncio.Redis`` that retries (redis-py's default does, 10
    times) or has ``socket_timeout=None`` is refused with ``ValueError``: every call that
    met a dead Redis would wait for all of it.
    """

    __slots__ = ("__weakref__", "_key_ttl_ms", "_link", "_outage", "_prefix", "_probe_lease")

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "resilient:",
        sync_interval: Duration = 0.05,
        retry_interval: Duration = 1.0,
        probe_lease: Duration = 10.0,
        outage: Literal["local", "open"] = "local",
        key_ttl: Duration = 86400.0,
    ) -> None:
        check_client(client)
        self._prefix = check_prefix(prefix)
        if outage not in ("local", "open"):
            raise ValueError(f"outage must be 'local' or 'open', got {outage!r}")
        self._outage = outage
        self._probe_lease = to_seconds("probe_lease", probe_lease, allow_zero=False)
        self._key_ttl_ms = max(1, round(to_seconds("key_ttl", key_ttl, allow_zero=False) * 1000))
        self._link = Link(
            client,
            what=f"circuit breakers under {prefix!r}",
            sync_interval=to_seconds("sync_interval", sync_interval, allow_zero=False),
            retry_interval=to_seconds("retry_interval", retry_interval, allow_zero=False),
        )

    def __reduce__(self) -> NoReturn:
        raise unpicklable(self)

    def __repr__(self) -> str:
        return f"RedisStore(client={self._link.client!r}, prefix={self._prefix!r})"

    @property
    def redis_available(self) -> bool:
        """``False`` while Redis is taken as down and the breakers run on local state."""
        return self._link.up

    def keys(self, name: str) -> tuple[str, str]:
        """The Redis keys of the breaker named ``name``: its hash and its probe leases."""
        base = f"{self._prefix}breaker:{{{name}}}"
        return base, base + ":probes"

    def for_breaker(self, spec: BreakerSpec) -> SharedBreakerStore:
        """Build the store of one breaker (no Redis command is sent)."""
        if spec.generated_name:
            # Every process numbers its unnamed breakers alike: 'breaker-1' here and
            # 'breaker-1' there are unrelated breakers that would share one state.
            raise ValueError(
                f"a breaker on a RedisStore needs a name (it got the generated {spec.name!r}): "
                "the name keys the state the fleet shares, and other processes generate the "
                "same names for unrelated breakers; pass CircuitBreaker(name=...)"
            )
        check_name("breaker", spec.name)
        if self._key_ttl_ms <= spec.reset_timeout * 1000:
            # An open breaker writes nothing while it waits out reset_timeout.
            raise ValueError(
                f"key_ttl={self._key_ttl_ms / 1000:g} s of this RedisStore is not longer than "
                f"reset_timeout={spec.reset_timeout:g} s of breaker {spec.name!r}: its open "
                "state would expire from Redis before it probes, closing it for the fleet; "
                "raise key_ttl"
            )
        kind = _AsyncSharedBreakerStore if self._link.is_async else SharedBreakerStore
        store = kind(self, spec)
        self._link.join(store)
        return store

    def close(self) -> None:
        """Stop the background syncer; the breakers keep their last local state."""
        self._link.close()


_lease_ids = itertools.count(1)


class _Pending:
    """Outcomes counted here, not yet reported: added by any thread without a lock.

    Each count is a ``next()`` of an :func:`itertools.count` (atomic in CPython), and
    :meth:`take` counts the values drawn since it last ran, so racing threads neither
    lose a count nor have one reported twice. :meth:`take` and :meth:`restore` run
    under the store's lock.
    """

    __slots__ = ("_restored", "_seen", "failures", "successes")

    def __init__(self) -> None:
        self.successes = itertools.count()
        self.failures = itertools.count()
        self._seen = [0, 0]  # the first value of each not yet taken
        self._restored = [0, 0]

    def take(self) -> tuple[int, int]:
        """``(successes, failures)`` counted since the last take (or given back)."""
        counts = []
        for index, counter in enumerate((self.successes, self.failures)):
            drawn = next(counter)  # this value is the take's own, not a count
            counts.append(drawn - self._seen[index] + self._restored[index])
            self._seen[index] = drawn + 1
        self._restored = [0, 0]
        return counts[0], counts[1]

    def restore(self, successes: int, failures: int) -> None:
        """Counts a report could not deliver: the next take returns them again."""
        self._restored[0] += successes
        self._restored[1] += failures


class SharedBreakerStore:
    """The :class:`~resilient.BreakerStore` a :class:`RedisStore` builds for one breaker.

    ``state``, ``consecutive_failures`` and ``opened_at`` are the local copy the
    breaker reads on every call (see the module docstring).
    """

    __slots__ = (
        "__weakref__",
        "_applied",
        "_args",
        "_async",
        "_clock",
        "_count_failure",
        "_count_success",
        "_epoch",
        "_foreign_seen",
        "_keys",
        "_leases",
        "_link",
        "_local",
        "_lock",
        "_outage",
        "_outage_mode",
        "_pending",
        "_probe_lease",
        "_probe_limit",
        "_reset_timeout",
        "_resync_at",
        "_seeded",
        "_sequence",
        "_token",
        "_window",
        "_window_failures",
        "_windowed",
        "consecutive_failures",
        "name",
        "opened_at",
        "state",
    )

    def __init__(self, factory: RedisStore, spec: BreakerSpec) -> None:
        self.name = spec.name
        self._link = factory._link
        self._async = self._link.is_async
        self._keys = factory.keys(spec.name)
        window = spec.window
        self._window = window
        self._windowed = window.size is not None or window.duration is not None
        self._args = (
            window.size or 0,
            0 if window.duration is None else repr(window.duration),
            factory._key_ttl_ms,
        )
        self._reset_timeout = spec.reset_timeout
        self._probe_lease = factory._probe_lease
        self._probe_limit = spec.half_open_max_calls
        self._outage_mode = factory._outage
        self._clock = spec.clock
        self._lock = _fork.register_lock(threading.Lock())
        # The local copy, read by the breaker's fast path.
        self.state = _CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._epoch = 0
        self._window_failures = 0
        # Successes counted here but not yet reported; failures counted during an outage.
        self._pending = _Pending()
        self._count_success = self._pending.successes.__next__
        self._count_failure = self._pending.failures.__next__
        self._leases: list[str] = []
        self._token = uuid.uuid4().hex[:12]
        self._sequence = itertools.count(1)
        self._applied = 0
        # Local state: used while Redis is down, and between syncs with an async client.
        self._local = InMemoryBreakerStore(window)
        self._outage = self._async
        self._seeded = 0  # the local store's epoch when it was last seeded
        self._foreign_seen = False  # a breaker of another window shares the name: logged
        self._resync_at = 0.0  # with its key in trouble, resynced once per retry_interval

    def __repr__(self) -> str:
        where = "local" if self._outage else "redis"
        return f"SharedBreakerStore(name={self.name!r}, state={self.state.value}, via={where})"

    def _lease_id(self) -> str:
        # The pid too: a forked child inherits the token and the counter.
        return f"{self._token}-{os.getpid()}:{next(_lease_ids)}"

    # Replies -----------------------------------------------------------------------

    def _apply(self, reply: Sequence[Any], sequence: int) -> tuple[bool, StoreSnapshot]:
        """Turn a script's reply into a snapshot on this process's clock; refresh the copy."""
        local_now = self._clock()
        redis_now = float(decode(reply[9]))
        opened_text = decode(reply[3])
        # Redis time -> this process's clock: as long ago as Redis says it was.
        opened_at = local_now - (redis_now - float(opened_text)) if opened_text else None
        state = _STATES[decode(reply[1])]
        if not self._foreign_seen and len(reply) > 10 and reply[10]:
            self._foreign_seen = True
            self._log_foreign(decode(reply[10]))
        snapshot = StoreSnapshot(
            state,
            int(reply[2]),
            opened_at,
            int(reply[4]),
            int(reply[5]),
            int(reply[6]),
            int(reply[7]),
            int(reply[8]),
        )
        with self._lock:
            # A reply to an older request must not overwrite a newer one's view. With an
            # async client the copy mirrors the local breaker instead (see _adopt).
            if sequence > self._applied and not self._async:
                self._applied = sequence
                self._epoch = snapshot.epoch
                self._window_failures = snapshot.window_failures
                self.consecutive_failures = snapshot.consecutive_failures
                self.opened_at = opened_at
                self.state = state  # last: a reader that sees it sees the rest
        return int(reply[0]) == 1, snapshot

    def _log_foreign(self, foreign: str) -> None:
        """Another configuration shares this breaker's name: say so, once per process."""
        window = self._window
        if window.duration is not None:
            mine = f"window_duration={window.duration!r}"
        elif window.size is not None:
            mine = f"window_size={window.size}"
        else:
            mine = "no window"
        _logger.error(
            "circuit breaker %r: Redis holds its state with %s, but this process's breaker "
            "of that name has %s; a window of one shape cannot be read as another, so each "
            "resets the other's window and failure rates are counted from scratch. Give "
            "every breaker of one name the same window_size/window_duration, or different "
            "names",
            self.name,
            "no window" if foreign == "none" else foreign,
            mine,
        )

    def _call(self, script: Script, *args: object) -> tuple[bool, StoreSnapshot]:
        sequence = next(self._sequence)
        reply = self._link.run(script, self._keys, (*self._args, *args))
        return self._apply(reply, sequence)

    def _shared(self) -> bool:
        """Whether to go to Redis now: not while it is down or before the syncer resynced."""
        if self._outage:
            return False
        if self._link.up:
            return True
        self._fall_back()
        return False

    # Outages -----------------------------------------------------------------------

    def _fall_back(self) -> None:
        """Redis went away: go on with a local breaker seeded with the last shared state."""
        with self._lock:
            if self._outage:
                return
            self._outage = True
            local = self._local
            if self._outage_mode == "open" and self.state is _CLOSED:
                local._seed(_OPEN, self._epoch + 1, self._clock(), 0, 0)
            else:
                local._seed(self.state, self._epoch, self.opened_at, self.consecutive_failures, 0)
            self._seeded = local._epoch
            self._mirror()

    def _mirror(self) -> None:
        local = self._local
        self.consecutive_failures = local.consecutive_failures
        self.opened_at = local.opened_at
        self.state = local.state

    def _news(
        self, shared: StoreSnapshot, successes: int, failures: int
    ) -> tuple[Script, tuple[object, ...]] | None:
        """The script that tells the fleet what the local breaker did since it was seeded.

        A transition made here (a trip, a probe's verdict, ``isolate()``/``reset()``)
        moves the shared breaker too, whatever state it is in now; ``successes`` and
        ``failures`` counted here while closed are added to the shared counts if the
        shared breaker is closed too (successes first: the order within a batch is lost).
        """
        local = self._local
        if local._epoch != self._seeded and local.state is not shared.state:
            return _CAS, (shared.epoch, local.state.value, self._reset_timeout)
        if shared.state is _CLOSED and local.state is _CLOSED and (successes or failures):
            return _RECORD, (shared.epoch, successes, failures, -1)
        return None

    def _restore_pending(self, successes: int, failures: int) -> None:
        """Counts a report could not deliver: they go with the next one."""
        with self._lock:
            self._pending.restore(successes, failures)

    def _take_pending(self) -> tuple[int, int]:
        """The outcomes counted here and not yet reported: ``(successes, failures)``."""
        with self._lock:
            return self._pending.take()

    # The syncer --------------------------------------------------------------------

    def sync(self) -> None:
        """One sync of this store alone (the syncer batches :meth:`sync_request` instead)."""
        request = self.sync_request()
        if request is not None:
            self._link.send([request])

    def sync_request(self) -> Request | None:
        """The syncer's script: report batched counts and refresh the local copy.

        After an outage the store resynchronises on its own, first (several round trips):
        it tells Redis what happened here meanwhile, then takes its state.
        """
        if not self._link.up:
            self._fall_back()
            return None
        if self._outage:
            self._resync()
            return None
        successes, failures = self._take_pending()
        sequence = next(self._sequence)
        script: Script = _LOAD
        extra: tuple[int, ...] = ()
        if successes or failures:
            script, extra = _RECORD, (self._epoch, successes, failures, -1)

        def done(reply: Any) -> None:
            self._apply(reply, sequence)

        def failed() -> None:
            self._restore_pending(successes, failures)
            self._fall_back()

        return Request(script, self._keys, (*self._args, *extra), done, failed)

    def _resync(self) -> None:
        if self._link.clock() < self._resync_at:
            return
        successes, failures = self._take_pending()
        try:
            _, shared = self._call(_LOAD)
            news = self._news(shared, successes, failures)
            if news is not None:
                self._call(news[0], *news[1])
        except Unavailable as trouble:
            self._restore_pending(successes, failures)
            if isinstance(trouble, KeyTrouble):  # Redis is up: pace the tries here
                self._resync_at = self._link.clock() + self._link.retry_interval
            return
        with self._lock:
            self._outage = False
            self._seeded = self._local._epoch

    async def async_sync(self) -> None:  # pragma: no cover - only async clients' stores
        """Only the stores of async clients sync from a task (see _AsyncSharedBreakerStore)."""

    # The BreakerStore protocol -------------------------------------------------------

    def load(self, now: float) -> StoreSnapshot:
        """The shared state and counters (the local ones while Redis is down)."""
        self._link.ensure_syncer()
        if self._shared():
            try:
                return self._call(_LOAD)[1]
            except Unavailable:
                self._fall_back()
        return self._local.load(now)

    def compare_and_set_state(self, epoch: int, new_state: BreakerState, now: float) -> bool:
        """One script: move to ``new_state`` if the shared stay is still ``epoch``."""
        if self._shared():
            try:
                return self._call(_CAS, epoch, new_state.value, self._reset_timeout)[0]
            except Unavailable:
                self._fall_back()
        moved = self._local.compare_and_set_state(epoch, new_state, now)
        if moved:
            self._take_pending()  # counts of the stay just left: they can trip nothing now
        self._mirror()
        return moved

    def record(self, failed: bool, now: float) -> StoreSnapshot | None:
        """Count one outcome: a success that cannot trip anything locally, the rest in Redis."""
        if self._outage:
            # Local decisions: Redis is down, or an async client syncs in the background.
            # Count what the fleet must hear of later (only a closed stay's outcomes count).
            if self.state is _CLOSED:
                if failed:
                    self._count_failure()
                elif self._windowed or self._local.consecutive_failures:
                    self._count_success()  # else it changes nothing to report
            snapshot = self._local.record(failed, now)
            self._mirror()
            return snapshot
        if (
            not failed
            and self.state is _CLOSED
            and not self.consecutive_failures
            and not self._window_failures
        ):
            # The healthy case: it can trip nothing, so it waits for the syncer's batch.
            if self._windowed:
                self._count_success()
            return None
        if self._shared():
            try:
                successes, failures = self._take_pending()
                counted, snapshot = self._call(
                    _RECORD, self._epoch, successes, failures, 1 if failed else 0
                )
            except Unavailable:
                self._restore_pending(successes, failures)
                self._fall_back()
            else:
                if not counted or (
                    not failed
                    and not snapshot.window_failures
                    and not snapshot.consecutive_failures
                ):
                    return None
                return snapshot
        return self.record(failed, now)

    def acquire_probe(self, epoch: int, limit: int) -> bool:
        """Take one of the fleet's ``limit`` probe slots: a lease that expires by itself."""
        if self._shared():
            lease = self._lease_id()
            try:
                granted = self._call(_ACQUIRE, epoch, limit, lease, repr(self._probe_lease))[0]
            except Unavailable:
                self._fall_back()
            else:
                if granted:
                    with self._lock:
                        self._leases.append(lease)
                return granted
        return self._local.acquire_probe(epoch, limit)

    def release_probe(self, epoch: int, succeeded: bool) -> int | None:
        """Give a probe's lease back; the stay's successful probes, or ``None`` if it is over."""
        with self._lock:
            lease = self._leases.pop() if self._leases else None
        if lease is not None and self._shared():
            try:
                current, snapshot = self._call(_RELEASE, epoch, 1 if succeeded else 0, lease)
            except Unavailable:
                self._fall_back()
            else:
                return snapshot.probe_successes if current else None
        return self._local.release_probe(epoch, succeeded)


class _AsyncSharedBreakerStore(SharedBreakerStore):
    """A store on an async client: local decisions, and a syncer task for the Redis side.

    A healthy call reads only ``state``: with an async client that read is the one place
    where a task can be started on the caller's running loop, the first time one runs,
    and again should that loop end. It costs an attribute check on top of the read.

    Probe slots are leased ahead: a half-open call that finds no lease in hand is
    refused (``retry_after == 0``) and asks for one; the task takes it from the fleet's
    lease set at its next sync, and the next call probes with it. So the fleet's probe
    limit holds exactly with async clients too, at the price of up to one
    ``sync_interval`` before the first probe.
    """

    __slots__ = ("_granted", "_local_state", "_opened_for_outage", "_releases", "_wanted")

    def __init__(self, factory: RedisStore, spec: BreakerSpec) -> None:
        super().__init__(factory, spec)
        self._granted: list[str] = []  # leases taken ahead, not yet used by a probe
        self._releases: list[str] = []  # leases of finished probes, to give back
        self._wanted = False
        self._opened_for_outage = False

    @property
    def state(self) -> BreakerState:
        """The local state; starts the syncer on the running loop if it is not running."""
        if not self._link.syncing:
            self._link.ensure_syncer()
        return self._local_state

    @state.setter
    def state(self, value: BreakerState) -> None:
        self._local_state = value

    def acquire_probe(self, epoch: int, limit: int) -> bool:
        """Probe with a lease taken ahead by the task, or ask for one and refuse this call."""
        with self._lock:
            if not self._granted:
                self._wanted = True
                return False
            lease = self._granted.pop()
        if self._local.acquire_probe(epoch, limit):
            with self._lock:
                self._leases.append(lease)
            return True
        with self._lock:
            self._granted.append(lease)  # a stale stay: keep the lease for the next call
        return False

    def release_probe(self, epoch: int, succeeded: bool) -> int | None:
        """The local verdict counts; the lease goes back to the fleet at the next sync."""
        with self._lock:
            if self._leases:
                self._releases.append(self._leases.pop())
        return self._local.release_probe(epoch, succeeded)

    async def async_sync(self) -> None:
        """With an async client: report the local breaker's news, then adopt the fleet's."""
        link = self._link
        if not link.up:
            if self._outage_mode == "open" and not self._opened_for_outage:
                self._opened_for_outage = True
                with self._lock:
                    local = self._local
                    if local.state is _CLOSED:
                        local._seed(_OPEN, local._epoch + 1, self._clock(), 0, 0)
                        self._seeded = local._epoch  # Redis's absence, not news for the fleet
                        self._mirror()
            return
        self._opened_for_outage = False
        if link.clock() < self._resync_at:
            return
        successes, failures = self._take_pending()
        try:
            sequence = next(self._sequence)
            _, shared = self._apply(await link.arun(_LOAD, self._keys, self._args), sequence)
            news = self._news(shared, successes, failures)
            decided = self._local._epoch
            if news is not None:
                sequence = next(self._sequence)
                reply = await link.arun(news[0], self._keys, (*self._args, *news[1]))
                _, shared = self._apply(reply, sequence)
        except Unavailable as trouble:
            self._restore_pending(successes, failures)
            if isinstance(trouble, KeyTrouble):  # Redis is up: pace the tries here
                self._resync_at = link.clock() + link.retry_interval
            return
        if self._local._epoch == decided:
            self._adopt(shared)
        # else the local breaker moved while the script ran: the next sync reports it.
        await self._trade_leases(shared)

    async def _trade_leases(self, shared: StoreSnapshot) -> None:
        """Give back the leases of finished probes; take one ahead if a probe waits for it.

        A lease in hand is renewed at every sync until a probe uses it: the next call
        may come later than ``probe_lease``, and the slot must still be this process's.
        """
        with self._lock:
            releases, self._releases = self._releases, []
            if shared.state is not _HALF_OPEN:
                releases += self._granted  # a lease for a stay that is over
                self._granted = []
            held = list(self._granted)
            wanted, self._wanted = self._wanted and shared.state is _HALF_OPEN, False
        link, keys, args = self._link, self._keys, self._args
        try:
            for lease in releases:
                await link.arun(_RELEASE, keys, (*args, -1, 0, lease))
            for lease in held:
                reply = await link.arun(_RENEW, keys, (*args, lease, repr(self._probe_lease)))
                if int(reply) != 1:
                    with self._lock:  # expired (Redis was away, say): no longer ours
                        if lease in self._granted:
                            self._granted.remove(lease)
            if wanted:
                lease = self._lease_id()
                reply = await link.arun(
                    _ACQUIRE,
                    keys,
                    (*args, shared.epoch, self._probe_limit, lease, repr(self._probe_lease)),
                )
                if int(reply[0]) == 1:
                    with self._lock:
                        self._granted.append(lease)
        except Unavailable:
            return  # the leases expire by themselves

    def _adopt(self, shared: StoreSnapshot) -> None:
        """Seed the local breaker with the shared state (an async client's, after a sync)."""
        with self._lock:
            local = self._local
            moved = shared.state is not local.state
            local._seed(
                shared.state,
                local._epoch + 1 if moved else local._epoch,
                shared.opened_at,
                shared.consecutive_failures,
                0 if moved else local._probe_successes,
            )
            self._seeded = local._epoch
            self._mirror()
