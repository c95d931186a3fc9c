"""A ring-routed, quorum-replicated key-value client: :class:`AsyncClusterClient` and its twin.

Each key lives on ``replicas`` (N) nodes: the first N distinct nodes clockwise of the
key on a :class:`~resilient.HashRing` (:meth:`~resilient.HashRing.get_n`), its
*preference list*. A write goes to all N at once and returns after ``write_quorum``
(W) acknowledgements; a read asks ``read_quorum`` (R) of them and returns once R
answered. With R + W > N every read quorum overlaps every write quorum, so a read sees
the latest acknowledged write (Dynamo's (3, 2, 2) are the defaults; the seeds' N = 5,
F = 2 is ``replicas=5, write_quorum=3, read_quorum=3``)::

    async with AsyncClusterClient(nodes=urls, replicas=5, write_quorum=3, read_quorum=3) as c:
        await c.put("cart:42", ["apple"])
        read = await c.get("cart:42")
        read.value                                   # ["apple"]
        await c.put("cart:42", [*read.value, "pear"], context=read.context)

The nodes are :mod:`resilient.rpc.kv` servers; each is called through a
:class:`~resilient.rpc.AsyncClient` (:class:`~resilient.rpc.Client` for the blocking
twin) of its own, so each call goes through the resilient transport:

* **A breaker per node** (``breaker=``, default :func:`default_node_breaker`). A node
  whose breaker is open is not asked at all: it is reported in a
  :class:`~resilient.QuorumError` as ``"not asked: its circuit breaker is open"``, and
  the quorum is formed without it. Sloppy quorums and hinted handoff are *not* taken:
  writing a key to a node outside its preference list needs the node to keep hints
  and hand them back, which the KV node does not do, and without hints a sloppy
  quorum gives up the R + W > N overlap. Replicas that missed writes are brought up
  to date by read repair instead.
* **Retries with a budget** (``retry=``, default four attempts and each node's own
  :class:`~resilient.RetryBudget`): the three methods are idempotent (a node ignores a
  version it already has), so the transport retries them on timeouts and 503s.
* **Bounded parallelism** (``max_parallel``): at most that many node calls of one
  operation at once (default: all N).
* **One deadline**: each operation runs within the caller's deadline
  (:func:`resilient.deadline`) and at most ``timeout`` seconds; it crosses the wire to
  every node. Fewer than a quorum of answers inside it is a
  :class:`~resilient.QuorumError` that says which nodes answered and why each other
  one did not.
* **Hedged reads**: a read asks R nodes first; when fewer than R have answered after
  ``hedge_after`` seconds, it asks one more node of the preference list not yet asked
  (and another each ``hedge_after`` after that), and at once when an asked node fails.
  A slow replica therefore costs a read ``hedge_after``, not its full latency; and a
  replica whose recent latency (a moving average, fed by every call) is above
  ``hedge_after`` is asked after the others, so it costs nothing once it is known.

**Stragglers.** A read returns at R answers and *cancels* the node calls still
running: their answers could only feed read repair. A write returns at W
acknowledgements and *lets the other writes finish* in the background, so every
reachable replica gets the write without waiting for read repair; they stay bounded by
the operation's deadline, and :meth:`AsyncClusterClient.aclose` (or
:meth:`~AsyncClusterClient.drain`) waits for them. A write cancelled by its caller keeps
the writes already sent running the same way. The blocking :class:`ClusterClient`
cannot cancel a thread: its read stragglers also finish in the background.

**Versions.** Every write carries a version vector (:mod:`resilient.rpc.versions`)
with an entry for this client's ``writer_id``. A read returns a :class:`ReadResult`:
the reconciled *siblings* (writes no other write descends: one, or several when
writers raced) and a ``context``, the merge of every version read; a put or delete
given that ``context`` supersedes what was read, and one without a context supersedes
only this writer's own earlier writes (it is concurrent with other writers' writes,
so both are kept). ``last_writer_wins=True`` resolves siblings to the one with the
latest writer's wall clock instead (:func:`~resilient.rpc.versions.newest_wins`).
Caveat: it silently drops every concurrent write but one and trusts clocks that skew;
Jepsen measured LWW stores losing 30-70% of acknowledged writes under contention. Its
read repair writes the winner back over the losers, so on keys shared with clients that
keep siblings, it resolves their siblings too.
Deletes are tombstones, returned as siblings with ``deleted=True`` (a read of a key
whose only sibling is a tombstone is not :attr:`~ReadResult.found`); they are never
collected.

**Read repair.** When the replies of a read differ, the nodes that answered with
stale or missing siblings are sent the reconciled ones (``kv.put`` / ``kv.delete``
with the sibling's own version, or, with last-writer-wins, the winner under the merge
of all versions so the replicas collapse to it), in the background: at most
``max_background`` repairs in flight (more are skipped and counted in
:meth:`~AsyncClusterClient.stats`), each within ``repair_timeout``, none outliving
:meth:`~AsyncClusterClient.aclose`.

Public names: :class:`AsyncClusterClient`, :class:`ClusterClient`, :class:`ReadResult`,
:class:`ClusterStats`, :func:`default_node_breaker`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from resilient._config import DEFAULT, Default, Duration, check_int, to_seconds
from resilient.breaker import BreakerState, CircuitBreaker
from resilient.deadline import deadline
from resilient.errors import PROGRAMMING_ERRORS, QuorumError
from resilient.hashring import HashRing
from resilient.quorum import QuorumResult, quorum, quorum_sync
from resilient.retry import Backoff, Retry
from resilient.rpc.client import AsyncClient, Client
from resilient.rpc.errors import InvalidParams, InvalidRequest, MethodNotFound, ProtocolError
from resilient.rpc.versions import Sibling, VersionVector, descends, merge, newest_wins, reconcile
from resilient.transport.rules import CALLER_FAULTS

__all__ = [
    "AsyncClusterClient",
    "ClusterClient",
    "ClusterStats",
    "ReadResult",
    "default_node_breaker",
]

_METHODS: Final = frozenset({"kv.get", "kv.put", "kv.delete"})
# A node answering these says the request is wrong, not the node: every node would say
# the same, so the caller gets the error itself rather than a QuorumError.
_CALLER_FAULTS: Final = (*PROGRAMMING_ERRORS, InvalidParams, InvalidRequest, MethodNotFound)
_NOT_ASKED: Final = frozenset({BreakerState.OPEN, BreakerState.ISOLATED})
# Weight of the newest call in a node's latency average: about the last ten calls count.
_SMOOTHING: Final = 0.2


def default_node_breaker(node: str) -> CircuitBreaker:
    """The breaker each node gets by default: 60% of its last 50 attempts failing opens it for 5 s.

    A failure rate rather than failures in a row: a node failing now and then (30% of
    its requests, say) still helps quorums form, and a run of bad luck must not cut it
    off (five failures in a row come every few hundred attempts at 30%, and 50% of 20
    often enough); a node that is down fails everything, and is cut off after its first
    20 attempts. It opens for 5 s, shorter than the transport's default 10 s, since the
    other replicas carry the load meanwhile. The caller's own mistakes are not counted.
    """
    return CircuitBreaker(
        name=node,
        failure_threshold=None,
        failure_rate=0.6,
        window_size=50,
        minimum_calls=20,
        reset_timeout=5.0,
        exclude=(*CALLER_FAULTS, *PROGRAMMING_ERRORS),
    )


def _default_retry() -> Retry:
    # A quorum waits on the slowest replica it needs: asking a node that failed fast
    # again, a few ms later, is usually quicker than waiting for a slow one (measured in
    # `make demo`: with one node of five failing 30% of requests, three attempts left
    # 2.7% of quorums waiting on a 300 ms replica, four left 0.8%). Each node's retry
    # budget keeps the extra attempts from becoming a retry storm.
    return Retry(attempts=4, backoff=Backoff(initial=0.01, max_delay=0.1))


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What :meth:`AsyncClusterClient.get` read.

    * ``key``: the key read.
    * ``siblings``: the reconciled writes, oldest first: one in the common case,
      several when writers raced, none when the key was never written; tombstones
      (``deleted=True``) included. With ``last_writer_wins=True``, at most one.
    * ``context``: the merge of every version read: pass it to the next
      :meth:`~AsyncClusterClient.put` or :meth:`~AsyncClusterClient.delete` of the key
      so that write supersedes everything this read saw.
    * ``answered``: the nodes whose replies made the quorum, in the order they came.
    """

    key: str
    siblings: tuple[Sibling, ...]
    context: VersionVector
    answered: tuple[str, ...]

    @property
    def values(self) -> list[Any]:
        """The values of the live (not deleted) siblings."""
        return [sibling.value for sibling in self.siblings if not sibling.deleted]

    @property
    def found(self) -> bool:
        """Whether any live sibling was read (False: never written, or deleted)."""
        return any(not sibling.deleted for sibling in self.siblings)

    @property
    def value(self) -> Any:
        """The value, when exactly one live sibling was read.

        ``KeyError`` when there is none (check :attr:`found`), ``ValueError`` when
        concurrent writes left several (read :attr:`values`, and write their merge
        back with ``context=``, or use ``last_writer_wins=True``).
        """
        values = self.values
        if len(values) == 1:
            return values[0]
        if not values:
            raise KeyError(self.key)
        raise ValueError(
            f"{self.key!r} has {len(values)} concurrent values (siblings): read .values, "
            "and put their merge back with context=read.context to resolve them"
        )


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """Counters of a cluster client since it was made (a snapshot).

    ``reads``/``writes``: operations that reached their quorum; ``failed``: operations
    that raised :class:`~resilient.QuorumError`; ``hedged``: reads that asked more than
    R nodes; ``repairs``: read-repair writes sent; ``repairs_skipped``: repairs not
    sent because ``max_background`` were in flight; ``repair_failures``: repairs that
    failed (the next read of the key tries again); ``background``: node calls running
    now that closing the client waits for: every write call (each may outlive its
    operation) and repair; in the blocking :class:`ClusterClient`, every node call
    running in its threads.
    """

    reads: int
    writes: int
    failed: int
    hedged: int
    repairs: int
    repairs_skipped: int
    repair_failures: int
    background: int


class _Counters:
    """The counters behind :class:`ClusterStats`; the blocking client bumps them from threads."""

    __slots__ = (
        "_lock",
        "failed",
        "hedged",
        "reads",
        "repair_failures",
        "repairs",
        "repairs_skipped",
        "writes",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads = self.writes = self.failed = self.hedged = 0
        self.repairs = self.repairs_skipped = self.repair_failures = 0

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}: {key!r:.200}")
    if not key:
        raise ValueError("key must be a non-empty str")
    return key


def _check_context(context: object) -> VersionVector:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise TypeError(
            "context must be the context of a ReadResult (a dict of writer id -> counter) "
            f"or None, got {type(context).__name__}: {context!r:.200}"
        )
    return merge(context)


def _parse_reply(node: str, reply: object) -> list[Sibling]:
    """A node's ``kv.get`` answer as siblings; a ProtocolError (the node's fault) otherwise."""
    if not isinstance(reply, list):
        raise ProtocolError(
            f"{node} answered kv.get with {type(reply).__name__}, not a list of siblings"
        )
    try:
        return [Sibling.from_wire(item) for item in reply]
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"{node} answered kv.get with a malformed sibling: {error}") from None


def _write_params(key: str, sibling: Sibling) -> tuple[str, dict[str, Any]]:
    """The RPC method and named params that store ``sibling`` under ``key``."""
    params: dict[str, Any] = {
        "key": key,
        "version": sibling.version,
        "timestamp": sibling.timestamp,
    }
    if sibling.deleted:
        return "kv.delete", params
    params["value"] = sibling.value
    return "kv.put", params


class _Core:
    """Configuration and every decision shared by the async and blocking clients; no I/O."""

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        replicas: int,
        write_quorum: int,
        read_quorum: int,
        writer_id: str | None,
        timeout: Duration,
        hedge_after: Duration | None,
        last_writer_wins: bool,
        read_repair: bool,
        max_background: int,
        repair_timeout: Duration,
        max_parallel: int | None,
        vnodes: int,
        retry: Retry | Default | None,
        breaker: Callable[[str], CircuitBreaker] | Default | None,
    ) -> None:
        if isinstance(nodes, str) or not isinstance(nodes, Iterable):
            raise TypeError(f"nodes must be a sequence of node URLs, got {nodes!r:.200}")
        nodes = list(nodes)
        if not nodes:
            raise ValueError("nodes must name at least one node URL")
        self.replicas = check_int("replicas", replicas, minimum=1)
        if self.replicas > len(nodes):
            raise ValueError(
                f"replicas={replicas} needs at least {replicas} nodes, but nodes lists "
                f"{len(nodes)}; add nodes or lower replicas"
            )
        self.write_quorum = check_int("write_quorum", write_quorum, minimum=1)
        self.read_quorum = check_int("read_quorum", read_quorum, minimum=1)
        for name, value in (("write_quorum", write_quorum), ("read_quorum", read_quorum)):
            if value > self.replicas:
                raise ValueError(
                    f"{name}={value} is more than replicas={replicas}: no operation could "
                    f"ever reach it; use at most {replicas}"
                )
        if self.read_quorum + self.write_quorum <= self.replicas:
            warnings.warn(
                f"read_quorum + write_quorum = {self.read_quorum + self.write_quorum} is not "
                f"more than replicas={self.replicas}: a read quorum may miss every replica of "
                "the latest acknowledged write, so reads can return stale values; raise one "
                "of the quorums if reads must see acknowledged writes",
                UserWarning,
                stacklevel=3,
            )
        if writer_id is None:
            writer_id = uuid.uuid4().hex[:16]
        elif not isinstance(writer_id, str) or not writer_id:
            raise ValueError(f"writer_id must be a non-empty str or None, got {writer_id!r}")
        self.writer_id = writer_id
        self.timeout = to_seconds("timeout", timeout, allow_zero=False, allow_inf=True)
        self.hedge_after = (
            None
            if hedge_after is None
            else to_seconds("hedge_after", hedge_after, allow_zero=False)
        )
        if not isinstance(last_writer_wins, bool):
            raise TypeError(f"last_writer_wins must be True or False, got {last_writer_wins!r}")
        if not isinstance(read_repair, bool):
            raise TypeError(f"read_repair must be True or False, got {read_repair!r}")
        self.last_writer_wins = last_writer_wins
        self.read_repair = read_repair
        self.max_background = check_int("max_background", max_background, minimum=1)
        self.repair_timeout = to_seconds("repair_timeout", repair_timeout, allow_zero=False)
        self.max_parallel = (
            None if max_parallel is None else check_int("max_parallel", max_parallel, minimum=1)
        )
        self.ring = HashRing(nodes, vnodes=vnodes)  # refuses duplicates and non-str ids
        self.retry = _default_retry() if isinstance(retry, Default) else retry
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be a resilient.Retry or None, got {retry!r}")
        factory = default_node_breaker if isinstance(breaker, Default) else breaker
        if isinstance(factory, CircuitBreaker):  # callable too, as a decorator
            raise TypeError(
                "breaker expects a factory (a callable taking a node URL and returning a "
                f"resilient.CircuitBreaker), not a breaker: got {breaker!r}. Pass "
                "breaker=lambda node: CircuitBreaker(name=node, ...) so that each node "
                "gets its own"
            )
        if factory is not None and not callable(factory):
            raise TypeError(
                "breaker must be a callable taking a node URL and returning a "
                f"resilient.CircuitBreaker, or None, got {breaker!r}"
            )
        self.breakers: dict[str, CircuitBreaker | None] = {}
        for node in nodes:
            made = None if factory is None else factory(node)
            if made is not None and not isinstance(made, CircuitBreaker):
                raise TypeError(
                    f"the breaker factory must return a resilient.CircuitBreaker, got {made!r}"
                )
            self.breakers[node] = made
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.counters = _Counters()
        self._latency: dict[str, float] = {}  # node -> moving average of call latency
        self._clock_lock = threading.Lock()
        self._last_tick = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<resilient.rpc.{type(self).__name__} {len(self.nodes)} nodes "
            f"N={self.replicas} W={self.write_quorum} R={self.read_quorum} "
            f"writer={self.writer_id!r}>"
        )

    # Routing ----------------------------------------------------------------------------

    def preference(self, key: str) -> tuple[list[str], dict[str, str]]:
        """The key's replicas to ask, best first, and those skipped with the reason.

        Ring order, except that replicas known to be slow (see :meth:`observe`) and
        replicas whose breaker lets only probes through come after the others.
        """
        asked: list[str] = []
        slow: list[str] = []
        probing: list[str] = []
        skipped: dict[str, str] = {}
        threshold = self.hedge_after
        latency = self._latency
        for node in self.ring.get_n(key, self.replicas):
            breaker = self.breakers[node]
            state = None if breaker is None else breaker.state
            if state is not None and state in _NOT_ASKED:
                skipped[node] = f"not asked: its circuit breaker is {state.value}"
            elif state is BreakerState.HALF_OPEN:
                probing.append(node)  # asked after the healthy ones: a probe, if needed
            elif threshold is not None and latency.get(node, 0.0) > threshold:
                slow.append(node)
            else:
                asked.append(node)
        return asked + slow + probing, skipped

    def observe(self, node: str, seconds: float) -> None:
        """Fold one call's latency into the node's moving average (the dynamic snitch's idea).

        A replica that usually answers later than ``hedge_after`` is asked after the
        others: asking it among the first R would only make the read wait for the
        hedge. Writes go to every replica, so they keep the measure of each fresh.
        Unlocked: a lost update between threads only delays the average by one call.
        """
        old = self._latency.get(node)
        self._latency[node] = seconds if old is None else old + _SMOOTHING * (seconds - old)

    def node_states(self) -> dict[str, BreakerState | None]:
        """Each node's breaker state (``None``: the node has no breaker)."""
        return {
            node: None if breaker is None else breaker.state
            for node, breaker in self.breakers.items()
        }

    def stats(self, background: int) -> ClusterStats:
        counters = self.counters
        return ClusterStats(
            reads=counters.reads,
            writes=counters.writes,
            failed=counters.failed,
            hedged=counters.hedged,
            repairs=counters.repairs,
            repairs_skipped=counters.repairs_skipped,
            repair_failures=counters.repair_failures,
            background=background,
        )

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed; make a new one")

    # Versions ---------------------------------------------------------------------------

    def new_sibling(self, context: object, value: Any, deleted: bool) -> Sibling:
        """The sibling a write stores: ``context`` advanced for this writer."""
        version = _check_context(context)
        # This writer's counter never repeats and never goes back: it starts from the wall
        # clock in microseconds (so a restarted client reusing its writer_id goes on past
        # its old writes), and each write takes a larger one than the last and the context.
        with self._clock_lock:
            tick = max(self._last_tick + 1, version.get(self.writer_id, 0) + 1)
            tick = max(tick, time.time_ns() // 1000)
            self._last_tick = tick
        version[self.writer_id] = tick
        return Sibling(value=value, version=version, timestamp=time.time(), deleted=deleted)

    def read_result(
        self, key: str, replies: Mapping[str, list[Sibling]]
    ) -> tuple[ReadResult, list[tuple[str, Sibling]]]:
        """Reconcile a quorum's replies; the result and the repairs (node, sibling) to send."""
        everything = [sibling for siblings in replies.values() for sibling in siblings]
        context = merge(*(sibling.version for sibling in everything))
        siblings = reconcile(everything)
        target = siblings
        if self.last_writer_wins and siblings:
            winner = newest_wins(siblings)
            assert winner is not None
            siblings = [winner]
            # Repaired under the merge of every version, so each replica drops the losers.
            target = [
                Sibling(
                    value=winner.value,
                    version=context,
                    timestamp=winner.timestamp,
                    deleted=winner.deleted,
                )
            ]
        repairs: list[tuple[str, Sibling]] = []
        if self.read_repair:
            for node, held in replies.items():
                for sibling in target:
                    if not any(descends(mine.version, sibling.version) for mine in held):
                        repairs.append((node, sibling))
        result = ReadResult(
            key=key, siblings=tuple(siblings), context=context, answered=tuple(replies)
        )
        return result, repairs

    # Outcomes ---------------------------------------------------------------------------

    def too_few(self, needed: int, asked: list[str], skipped: dict[str, str], what: str) -> None:
        """Refuse at once when the healthy nodes cannot make the quorum."""
        if len(asked) < needed:
            self.counters.add("failed")
            waiting = "not asked: too few replicas are healthy for the quorum"
            raise QuorumError(needed, [], {**skipped, **dict.fromkeys(asked, waiting)}, what=what)

    def failure(
        self, error: QuorumError, skipped: dict[str, str], what: str, *, writing: bool = False
    ) -> BaseException:
        """The error to raise for a failed quorum: the caller's own fault, or the QuorumError."""
        for cause in error.errors.values():
            if isinstance(cause, _CALLER_FAULTS):
                cause.add_note(f"every replica would refuse it: {error}")
                return cause
        self.counters.add("failed")
        reasons = dict(error.reasons)
        if writing:
            # A write the gather stopped waiting for was not stopped: it goes on.
            for node, reason in reasons.items():
                if reason.startswith("cancelled: "):
                    reasons[node] = "still running, left to finish: " + reason[len("cancelled: ") :]
        return QuorumError(
            error.needed, error.answered, {**reasons, **skipped}, what=what, errors=error.errors
        )

    def read_done(self, result: QuorumResult[str, Any]) -> None:
        self.counters.add("reads")
        launched = len(result.results) + len(result.failures) + len(result.unfinished)
        if launched > self.read_quorum:
            self.counters.add("hedged")


class AsyncClusterClient(_Core):
    """The asyncio cluster client; see the module docstring.

    >>> async with AsyncClusterClient(nodes=urls) as cluster:
    ...     await cluster.put("k", 1)
    ...     (await cluster.get("k")).value
    1

    Keyword-only options, checked here:

    * ``nodes``: the node URLs (``http://host:port/``), each a ring member.
    * ``replicas`` (N, default 3), ``write_quorum`` (W, 2), ``read_quorum`` (R, 2):
      a quorum above N is refused; R + W <= N warns (reads may miss writes).
    * ``writer_id``: this client's entry in version vectors (default: random); give a
      stable one per process to keep vectors short, and never the same one to two
      clients at once: their blind writes would then order by their clocks, the
      earlier dropped though acknowledged, instead of being kept as siblings.
    * ``timeout``: the longest an operation may take (default 5 s), within the
      caller's deadline.
    * ``hedge_after``: seconds before a read asks one more replica, and the recent
      latency above which a replica is asked after the others (default 0.05;
      ``None``: one more only on failures, and ring order always).
    * ``last_writer_wins``: resolve siblings by wall clock (default False; see caveat).
    * ``read_repair`` (default True), ``max_background`` (repairs in flight, default
      64), ``repair_timeout`` (default 2 s).
    * ``max_parallel``: node calls of one operation at once (default: all).
    * ``vnodes``: the ring's points per node (default 160).
    * ``retry``: the node clients' :class:`~resilient.Retry` (default 4 attempts,
      10-100 ms backoff, a budget per node); ``None``: no retries.
    * ``breaker``: ``node URL -> CircuitBreaker`` (default :func:`default_node_breaker`);
      ``None``: no breakers.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        replicas: int = 3,
        write_quorum: int = 2,
        read_quorum: int = 2,
        writer_id: str | None = None,
        timeout: Duration = 5.0,
        hedge_after: Duration | None = 0.05,
        last_writer_wins: bool = False,
        read_repair: bool = True,
        max_background: int = 64,
        repair_timeout: Duration = 2.0,
        max_parallel: int | None = None,
        vnodes: int = 160,
        retry: Retry | Default | None = DEFAULT,
        breaker: Callable[[str], CircuitBreaker] | Default | None = DEFAULT,
    ) -> None:
        super().__init__(
            nodes,
            replicas=replicas,
            write_quorum=write_quorum,
            read_quorum=read_quorum,
            writer_id=writer_id,
            timeout=timeout,
            hedge_after=hedge_after,
            last_writer_wins=last_writer_wins,
            read_repair=read_repair,
            max_background=max_background,
            repair_timeout=repair_timeout,
            max_parallel=max_parallel,
            vnodes=vnodes,
            retry=retry,
            breaker=breaker,
        )
        self._clients = {
            node: AsyncClient(
                node,
                idempotent=_METHODS,
                timeout=self.timeout,
                retry=self.retry,
                breaker=None if breaker is None else functools.partial(_same, breaker),
            )
            for node, breaker in self.breakers.items()
        }
        self._background: set[asyncio.Task[Any]] = set()
        self._repairing = 0

    # Public operations ------------------------------------------------------------------

    async def get(self, key: str) -> ReadResult:
        """Read ``key`` from R of its replicas: the reconciled siblings and their context."""
        key = _check_key(key)
        self.check_open()
        what = f"kv.get of {key!r}"
        asked, skipped = self.preference(key)
        self.too_few(self.read_quorum, asked, skipped, what)
        calls = {node: functools.partial(self._read_one, node, key) for node in asked}
        with deadline(self.timeout):
            try:
                result = await quorum(
                    calls,
                    self.read_quorum,
                    start=self.read_quorum,
                    hedge_after=self.hedge_after,
                    limit=self.max_parallel,
                    what=what,
                )
            except QuorumError as error:
                raise self.failure(error, skipped, what) from None
        self.read_done(result)
        read, repairs = self.read_result(key, result.results)
        for node, sibling in repairs:
            self._repair(node, key, sibling)
        return read

    async def put(
        self, key: str, value: Any, *, context: Mapping[str, int] | None = None
    ) -> VersionVector:
        """Write ``value`` under ``key`` to all its replicas; return once W acknowledged.

        ``context`` is a :class:`ReadResult`'s, to supersede what that read saw. Returns
        the version written (a context for a next write of this client).
        """
        key = _check_key(key)
        sibling = self.new_sibling(context, value, deleted=False)
        await self._write(key, sibling)
        return sibling.version

    async def delete(self, key: str, *, context: Mapping[str, int] | None = None) -> VersionVector:
        """Delete ``key`` (a tombstone) on all its replicas; return once W acknowledged."""
        key = _check_key(key)
        sibling = self.new_sibling(context, None, deleted=True)
        await self._write(key, sibling)
        return sibling.version

    def node_states(self) -> dict[str, BreakerState | None]:
        """Each node's breaker state now (``None`` for a node without a breaker)."""
        return super().node_states()

    def stats(self) -> ClusterStats:  # type: ignore[override]
        """The client's counters (see :class:`ClusterStats`)."""
        return super().stats(len(self._background))

    async def drain(self) -> None:
        """Wait until the background work in flight now (write stragglers, repairs) is done."""
        while self._background:
            await asyncio.wait(set(self._background))

    async def aclose(self) -> None:
        """Wait for the background work (bounded by its deadlines), then close the clients.

        If the wait is cancelled, the background work is cancelled too.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self.drain()
        finally:
            for task in self._background:
                task.cancel()
            if self._background:
                await asyncio.wait(set(self._background))
            for client in self._clients.values():
                await client.aclose()

    async def __aenter__(self) -> AsyncClusterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # The node calls ---------------------------------------------------------------------

    async def _read_one(self, node: str, key: str) -> list[Sibling]:
        return _parse_reply(node, await self._timed(node, "kv.get", {"key": key}))

    async def _timed(self, node: str, method: str, params: dict[str, Any]) -> Any:
        started = time.monotonic()
        try:
            result = await self._clients[node].call(method, **params)
        except asyncio.CancelledError:
            # A read straggler cancelled after t seconds took at least t.
            elapsed = time.monotonic() - started
            if elapsed > self._latency.get(node, 0.0):
                self.observe(node, elapsed)
            raise
        self.observe(node, time.monotonic() - started)
        return result

    async def _write(self, key: str, sibling: Sibling) -> None:
        self.check_open()
        method, params = _write_params(key, sibling)
        what = f"{method} of {key!r}"
        asked, skipped = self.preference(key)
        self.too_few(self.write_quorum, asked, skipped, what)
        calls = {node: functools.partial(self._write_one, node, method, params) for node in asked}
        with deadline(self.timeout):
            try:
                await quorum(calls, self.write_quorum, limit=self.max_parallel, what=what)
            except QuorumError as error:
                raise self.failure(error, skipped, what, writing=True) from None
        self.counters.add("writes")

    async def _write_one(self, node: str, method: str, params: dict[str, Any]) -> Any:
        # The write itself is a task of the client's, so that a write still running when
        # the quorum is reached (or its caller gives up) goes on to the replica.
        task = self._spawn(self._timed(node, method, params))
        return await asyncio.shield(task)

    def _spawn(
        self, coroutine: Any, context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, context=context)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller saw it, or it was a straggler's

    def _repair(self, node: str, key: str, sibling: Sibling) -> None:
        if self._repairing >= self.max_background:
            self.counters.add("repairs_skipped")
            return
        self._repairing += 1
        self.counters.add("repairs")
        # A fresh context: the repair is bounded by repair_timeout, not by the deadline
        # of the read that found it (which may be all but spent).
        self._spawn(self._repair_one(node, key, sibling), context=contextvars.Context())

    async def _repair_one(self, node: str, key: str, sibling: Sibling) -> None:
        method, params = _write_params(key, sibling)
        try:
            async with deadline(self.repair_timeout):
                await self._clients[node].call(method, **params)
        except Exception:
            self.counters.add("repair_failures")
        finally:
            self._repairing -= 1


def _same(breaker: CircuitBreaker, origin: str) -> CircuitBreaker:
    """The transport's per-origin breaker factory: the node's own breaker, whatever the origin."""
    return breaker


class ClusterClient(_Core):
    """The blocking twin of :class:`AsyncClusterClient`, over threads; same options.

    Each node call runs in a thread of that node's own pool (``max_threads`` per
    node, default 32), through a :class:`~resilient.rpc.Client` per node, carrying
    the caller's deadline. Threads cannot be cancelled: read stragglers, like write
    stragglers, finish in their pool in the background, bounded by the operation's
    deadline; :meth:`close` waits for them and for the repairs. A pool per node is a
    bulkhead: a slow node's stragglers hold its own threads, so calls to the other
    replicas never queue behind them and a slow node does not slow the quorum.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        replicas: int = 3,
        write_quorum: int = 2,
        read_quorum: int = 2,
        writer_id: str | None = None,
        timeout: Duration = 5.0,
        hedge_after: Duration | None = 0.05,
        last_writer_wins: bool = False,
        read_repair: bool = True,
        max_background: int = 64,
        repair_timeout: Duration = 2.0,
        max_parallel: int | None = None,
        vnodes: int = 160,
        retry: Retry | Default | None = DEFAULT,
        breaker: Callable[[str], CircuitBreaker] | Default | None = DEFAULT,
        max_threads: int = 32,
    ) -> None:
        super().__init__(
            nodes,
            replicas=replicas,
            write_quorum=write_quorum,
            read_quorum=read_quorum,
            writer_id=writer_id,
            timeout=timeout,
            hedge_after=hedge_after,
            last_writer_wins=last_writer_wins,
            read_repair=read_repair,
            max_background=max_background,
            repair_timeout=repair_timeout,
            max_parallel=max_parallel,
            vnodes=vnodes,
            retry=retry,
            breaker=breaker,
        )
        threads = check_int("max_threads", max_threads, minimum=1)
        self._clients = {
            node: Client(
                node,
                idempotent=_METHODS,
                timeout=self.timeout,
                retry=self.retry,
                breaker=None if breaker is None else functools.partial(_same, breaker),
            )
            for node, breaker in self.breakers.items()
        }
        self._pools = {
            node: concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="resilient-cluster"
            )
            for node in self.nodes
        }
        self._lock = threading.Lock()
        self._repairs: set[concurrent.futures.Future[Any]] = set()
        self._active = 0  # node calls running in the pool

    def get(self, key: str) -> ReadResult:
        """Read ``key`` from R of its replicas: the reconciled siblings and their context."""
        key = _check_key(key)
        self.check_open()
        what = f"kv.get of {key!r}"
        asked, skipped = self.preference(key)
        self.too_few(self.read_quorum, asked, skipped, what)
        calls = {node: functools.partial(self._read_one, node, key) for node in asked}
        with deadline(self.timeout):
            try:
                result = quorum_sync(
                    calls,
                    self.read_quorum,
                    start=self.read_quorum,
                    hedge_after=self.hedge_after,
                    limit=self.max_parallel,
                    executor=self._pools,
                    what=what,
                )
            except QuorumError as error:
                raise self.failure(error, skipped, what) from None
        self.read_done(result)
        read, repairs = self.read_result(key, result.results)
        for node, sibling in repairs:
            self._repair(node, key, sibling)
        return read

    def put(
        self, key: str, value: Any, *, context: Mapping[str, int] | None = None
    ) -> VersionVector:
        """Write ``value`` under ``key`` to all its replicas; return once W acknowledged."""
        key = _check_key(key)
        sibling = self.new_sibling(context, value, deleted=False)
        self._write(key, sibling)
        return sibling.version

    def delete(self, key: str, *, context: Mapping[str, int] | None = None) -> VersionVector:
        """Delete ``key`` (a tombstone) on all its replicas; return once W acknowledged."""
        key = _check_key(key)
        sibling = self.new_sibling(context, None, deleted=True)
        self._write(key, sibling)
        return sibling.version

    def stats(self) -> ClusterStats:  # type: ignore[override]
        """The client's counters (see :class:`ClusterStats`)."""
        with self._lock:
            return super().stats(self._active)

    def close(self) -> None:
        """Wait for the background work (bounded by its deadlines), then close the clients."""
        if self._closed:
            return
        self._closed = True
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, node: str, method: str, params: dict[str, Any]) -> Any:
        """One node call, in a thread of the pool, counted in ``stats().background``."""
        with self._lock:
            self._active += 1
        try:
            started = time.monotonic()
            result = self._clients[node].call(method, **params)
            self.observe(node, time.monotonic() - started)
            return result
        finally:
            with self._lock:
                self._active -= 1

    def _read_one(self, node: str, key: str) -> list[Sibling]:
        return _parse_reply(node, self._call(node, "kv.get", {"key": key}))

    def _write(self, key: str, sibling: Sibling) -> None:
        self.check_open()
        method, params = _write_params(key, sibling)
        what = f"{method} of {key!r}"
        asked, skipped = self.preference(key)
        self.too_few(self.write_quorum, asked, skipped, what)
        calls = {node: functools.partial(self._call, node, method, params) for node in asked}
        with deadline(self.timeout):
            try:
                quorum_sync(
                    calls,
                    self.write_quorum,
                    limit=self.max_parallel,
                    executor=self._pools,
                    what=what,
                )
            except QuorumError as error:
                raise self.failure(error, skipped, what, writing=True) from None
        self.counters.add("writes")

    def _repair(self, node: str, key: str, sibling: Sibling) -> None:
        with self._lock:
            if len(self._repairs) >= self.max_background:
                self.counters.add("repairs_skipped")
                return
            self.counters.add("repairs")
            future = self._pools[node].submit(
                contextvars.Context().run, self._repair_one, node, key, sibling
            )
            self._repairs.add(future)
        future.add_done_callback(self._repaired)

    def _repaired(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._repairs.discard(future)
            if future.cancelled() or future.exception() is not None:
                self.counters.add("repair_failures")

    def _repair_one(self, node: str, key: str, sibling: Sibling) -> None:
        method, params = _write_params(key, sibling)
        with deadline(self.repair_timeout):
            self._call(node, method, params)
