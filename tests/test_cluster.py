"""The cluster client against real KV node processes: quorums, failures, versions, repair.

Five ``python -m resilient.rpc.kv`` processes (each with a ``--data`` log, so a
restarted node keeps what it acknowledged) serve the whole module; a test that kills
nodes has them restarted before the next one. Every process is stopped when the
module ends, whatever happened. Keys carry a per-test prefix, so tests never read each
other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import pathlib
import pickle
import random
import select
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from rpc_live import live_asgi, serve

import resilient
from resilient.breaker import BreakerState, CircuitBreaker
from resilient.chaos import FaultMiddleware, FaultProxy, ServerFault
from resilient.errors import QuorumError
from resilient.rpc import Client, RemoteError, Server, kv
from resilient.rpc.cluster import AsyncClusterClient, ClusterClient, ReadResult
from resilient.rpc.versions import Sibling
from resilient.testing import FakeClock

__all__ = ["live_asgi"]  # the fixture, imported to be found by pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Nodes:
    """KV node processes on 127.0.0.1: started, killed (SIGKILL: a crash), restarted."""

    def __init__(self, directory: pathlib.Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.procs: list[subprocess.Popen[str] | None] = [None] * count
        self.ports: list[int] = [0] * count

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/" for port in self.ports]

    def _spawn(self, command: list[str], log: pathlib.Path) -> subprocess.Popen[str]:
        with log.open("a") as stderr:
            return subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT
            )

    @staticmethod
    def _ready(proc: subprocess.Popen[str]) -> int:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if readable else ""
        if not line.startswith("ready "):
            proc.kill()
            raise RuntimeError(f"a node did not start (exit {proc.poll()}): {line!r}")
        return int(line.split()[1].rsplit(":", 1)[1])

    def start(self, *indexes: int) -> None:
        """Start (or restart, on the same port and log) the nodes at ``indexes``."""
        started = []
        for index in indexes:
            assert self.procs[index] is None, f"node {index} is running"
            data = self.directory / f"node{index}"
            command = [sys.executable, "-m", "resilient.rpc.kv", "--port", str(self.ports[index])]
            command += ["--data", str(data), "--no-fsync"]
            proc = self._spawn(command, self.directory / f"node{index}.log")
            self.procs[index] = proc
            started.append((index, proc))
        for index, proc in started:
            self.ports[index] = self._ready(proc)

    def kill(self, *indexes: int) -> None:
        for index in indexes:
            proc = self.procs[index]
            assert proc is not None
            proc.kill()
            proc.wait()
            self.procs[index] = None

    def down(self) -> list[int]:
        return [index for index, proc in enumerate(self.procs) if proc is None]

    def revive(self) -> None:
        self.start(*self.down())

    def stop_all(self) -> None:
        procs = [proc for proc in self.procs if proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a stuck node
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = [None] * self.count


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    nodes = Nodes(tmp_path_factory.mktemp("cluster"), 5)
    try:
        nodes.start(*range(5))
        yield nodes
    finally:
        nodes.stop_all()


@pytest.fixture
def nodes(cluster: Nodes) -> Iterator[Nodes]:
    """The five nodes, all running at the start of the test and again after it."""
    cluster.revive()
    try:
        yield cluster
    finally:
        cluster.revive()


@pytest.fixture
def prefix() -> str:
    return f"{uuid.uuid4().hex[:8]}:"


def five(urls: list[str], **options: Any) -> AsyncClusterClient:
    """The seeds' cluster: N = 5, W = 3, R = 3."""
    options.setdefault("timeout", 3.0)
    return AsyncClusterClient(urls, replicas=5, write_quorum=3, read_quorum=3, **options)


# Availability and durability --------------------------------------------------------------


async def test_two_nodes_down_leave_reads_and_writes_working_and_lose_nothing(
    nodes: Nodes, prefix: str
) -> None:
    """With N=5, W=3, R=3 and two nodes crashed, every acknowledged write is read back."""
    async with five(nodes.urls) as cluster:
        for i in range(15):
            await cluster.put(f"{prefix}{i}", i)
        nodes.kill(1, 3)
        for i in range(15):
            assert (await cluster.get(f"{prefix}{i}")).value == i
        for i in range(15, 30):
            await cluster.put(f"{prefix}{i}", i)
        for i in range(30):
            assert (await cluster.get(f"{prefix}{i}")).value == i
        assert cluster.stats().failed == 0


def test_two_nodes_down_with_the_blocking_client(nodes: Nodes, prefix: str) -> None:
    """The blocking twin keeps working with two nodes down, and reads its own writes."""
    with ClusterClient(nodes.urls, replicas=5, write_quorum=3, read_quorum=3) as cluster:
        nodes.kill(0, 4)
        for i in range(10):
            cluster.put(f"{prefix}{i}", {"n": i})
        for i in range(10):
            assert cluster.get(f"{prefix}{i}").value == {"n": i}
        version = cluster.delete(f"{prefix}0")
        read = cluster.get(f"{prefix}0")
        assert not read.found
        assert read.context == version
        stats = cluster.stats()
        assert (stats.writes, stats.reads, stats.failed) == (11, 11, 0)


async def test_three_nodes_down_fail_with_quorum_error_inside_the_deadline(
    nodes: Nodes, prefix: str
) -> None:
    """With three of five down, writes and reads raise QuorumError naming who answered, in time."""
    nodes.kill(0, 2, 4)
    down = {nodes.urls[index] for index in (0, 2, 4)}
    async with five(nodes.urls) as cluster:
        started = time.monotonic()
        with resilient.deadline(2.0), pytest.raises(QuorumError) as caught:
            await cluster.put(f"{prefix}k", 1)
        assert time.monotonic() - started < 2.5
        error = caught.value
        assert error.needed == 3
        assert len(error.answered) == 2
        assert set(error.reasons) == down
        assert "2 of 5 answered, 3 needed" in str(error)
        assert pickle.loads(pickle.dumps(error)).reasons == error.reasons
        started = time.monotonic()
        with resilient.deadline(2.0), pytest.raises(QuorumError):
            await cluster.get(f"{prefix}k")
        assert time.monotonic() - started < 2.5
        # Enough failures open the dead nodes' breakers: then they are not even asked.
        for _ in range(20):
            states = cluster.node_states()
            if all(states[url] is BreakerState.OPEN for url in down):
                break
            with pytest.raises(QuorumError):
                await cluster.put(f"{prefix}k", 1)
        assert {url for url, state in states.items() if state is BreakerState.OPEN} == down
        with pytest.raises(QuorumError) as caught:
            await cluster.get(f"{prefix}k")
        assert "not asked: its circuit breaker is open" in str(caught.value)
        assert cluster.stats().failed >= 6


async def test_read_your_writes_and_contexts(nodes: Nodes, prefix: str) -> None:
    """A read after a write returns it; a write given a read's context supersedes that read."""
    key = f"{prefix}cart"
    async with five(nodes.urls) as cluster:
        first = await cluster.get(key)
        assert (first.found, first.siblings, first.context) == (False, (), {})
        with pytest.raises(KeyError):
            first.value  # noqa: B018
        await cluster.put(key, ["apple"])
        read = await cluster.get(key)
        assert read.value == ["apple"]
        await cluster.put(key, [*read.value, "pear"], context=read.context)
        read = await cluster.get(key)
        assert read.value == ["apple", "pear"]
        assert len(read.siblings) == 1
        await cluster.delete(key, context=read.context)
        gone = await cluster.get(key)
        assert not gone.found
        assert gone.siblings[0].deleted
        await cluster.put(key, ["again"], context=gone.context)
        assert (await cluster.get(key)).values == [["again"]]


async def test_concurrent_writers_leave_siblings_until_one_resolves_them(
    nodes: Nodes, prefix: str
) -> None:
    """Blind writes of two clients are both kept; a write with the context merges; LWW picks."""
    key = f"{prefix}k"
    async with (
        five(nodes.urls, writer_id="alice") as alice,
        five(nodes.urls, writer_id="bob") as bob,
        five(nodes.urls, last_writer_wins=True) as lww,
    ):
        await alice.put(key, "a")
        await bob.put(key, "b")
        read = await alice.get(key)
        assert sorted(read.values) == ["a", "b"]
        with pytest.raises(ValueError, match="2 concurrent values"):
            read.value  # noqa: B018
        assert (await lww.get(key)).values == ["b"]  # the later wall clock wins
        await alice.put(key, "ab", context=read.context)
        assert (await bob.get(key)).values == ["ab"]


async def test_read_repair_brings_a_stale_replica_up_to_date(nodes: Nodes, prefix: str) -> None:
    """A replica that missed a write gets it from the next read, in the background."""
    key = f"{prefix}repair"
    async with AsyncClusterClient(nodes.urls, replicas=3, write_quorum=2, read_quorum=3) as cluster:
        replicas = cluster.ring.get_n(key, 3)
        stale = nodes.urls.index(replicas[2])
        nodes.kill(stale)
        await cluster.put(key, "v1")
        nodes.start(stale)
        with Client(nodes.urls[stale]) as direct:
            assert direct.call("kv.get", key=key) == []
        assert (await cluster.get(key)).value == "v1"
        await cluster.drain()
        with Client(nodes.urls[stale]) as direct:
            assert [Sibling.from_wire(s).value for s in direct.call("kv.get", key=key)] == ["v1"]
        assert cluster.stats().repairs == 1
        assert cluster.stats().background == 0


def test_read_repair_with_the_blocking_client(nodes: Nodes, prefix: str) -> None:
    """The blocking client repairs too; close() waits for the repair."""
    key = f"{prefix}repair"
    cluster = ClusterClient(nodes.urls, replicas=3, write_quorum=2, read_quorum=3)
    stale = nodes.urls.index(cluster.ring.get_n(key, 3)[0])
    nodes.kill(stale)
    cluster.put(key, "v1")
    nodes.start(stale)
    assert cluster.get(key).value == "v1"
    cluster.close()
    cluster.close()  # closing twice is harmless
    assert cluster.stats().background == 0
    with Client(nodes.urls[stale]) as direct:
        assert [Sibling.from_wire(s).value for s in direct.call("kv.get", key=key)] == ["v1"]
    assert cluster.stats().repairs == 1
    with pytest.raises(RuntimeError, match="closed"):
        cluster.get(key)


async def test_a_slow_node_does_not_slow_quorum_calls(nodes: Nodes, prefix: str) -> None:
    """A node answering 1 s late (behind a TCP fault proxy) costs writes nothing, reads a hedge."""
    with FaultProxy(upstream=("127.0.0.1", nodes.ports[4])) as proxy:
        proxy.latency(delay=1.0)
        urls = [*nodes.urls[:4], f"http://127.0.0.1:{proxy.port}/"]
        async with five(urls, hedge_after=0.05) as cluster:
            slowest = 0.0
            for i in range(20):
                started = time.monotonic()
                await cluster.put(f"{prefix}{i}", i)
                assert (await cluster.get(f"{prefix}{i}")).value == i
                slowest = max(slowest, time.monotonic() - started)
            # Generous for a shared machine, and well under the slow node's one second.
            assert slowest < 0.7
            assert cluster.stats().background > 0  # the slow node's writes still running
            await cluster.drain()
            # Its writes measured it: now reads ask it last, after the four fast ones.
            assert cluster.preference(f"{prefix}0")[0][-1] == urls[-1]
        assert cluster.stats().background == 0


# The history checker ------------------------------------------------------------------------


@dataclass
class Op:
    kind: str  # "put" or "get"
    key: str
    invoked: float
    value: int | None = None  # put: the value written
    completed: float | None = None
    ok: bool = False
    read: list[int] | None = None  # get: the values read


def check_history(history: list[Op]) -> None:
    """Per key, every successful read returns a value no older than the last write
    acknowledged before the read started (writes of one writer carry increasing values)."""
    written = {op.value for op in history if op.kind == "put"}
    for op in history:
        if op.kind != "get" or not op.ok:
            continue
        assert op.read is not None
        assert set(op.read) <= written, f"{op} read a value never written"
        acknowledged = [
            w.value
            for w in history
            if w.kind == "put"
            and w.key == op.key
            and w.ok
            and w.completed is not None
            and w.completed < op.invoked
        ]
        if acknowledged:
            newest = max(v for v in acknowledged if v is not None)
            assert op.read, f"{op} read nothing after {newest} was acknowledged"
            assert max(op.read) >= newest, f"{op} is older than the acknowledged {newest}"


async def test_history_of_a_random_workload_with_crashes_is_consistent(
    nodes: Nodes, prefix: str
) -> None:
    """Random puts and gets while nodes crash and restart: no read is older than an ack."""
    seed = int(os.environ.get("CLUSTER_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    keys = [f"{prefix}{i}" for i in range(5)]
    counter = itertools.count(1)
    history: list[Op] = []
    stop = time.monotonic() + 4.0

    async def worker(cluster: AsyncClusterClient) -> None:
        while time.monotonic() < stop:
            key = rng.choice(keys)
            if rng.random() < 0.5:
                op = Op("put", key, time.monotonic(), value=next(counter))
                history.append(op)
                try:
                    await cluster.put(key, op.value)
                    op.ok = True
                except QuorumError:
                    pass
            else:
                op = Op("get", key, time.monotonic())
                history.append(op)
                try:
                    op.read = (await cluster.get(key)).values
                    op.ok = True
                except QuorumError:
                    pass
            op.completed = time.monotonic()

    kills = 0

    async def faults() -> None:
        nonlocal kills
        while time.monotonic() < stop - 0.5:
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            down = nodes.down()
            if len(down) < 2 and (rng.random() < 0.6 or not kills):
                kills += 1
                up = [index for index in range(5) if index not in down]
                await asyncio.to_thread(nodes.kill, rng.choice(up))
            elif down:
                await asyncio.to_thread(nodes.start, rng.choice(down))

    async with five(nodes.urls, timeout=2.0) as cluster:
        await asyncio.gather(faults(), *(worker(cluster) for _ in range(4)))
    nodes.revive()
    async with five(nodes.urls) as cluster:
        for key in keys:
            op = Op("get", key, time.monotonic())
            op.read = (await cluster.get(key)).values
            op.ok = True
            op.completed = time.monotonic()
            history.append(op)
    assert kills > 0
    assert sum(op.ok for op in history if op.kind == "put") > 20, f"seed {seed}"
    try:
        check_history(history)
    except AssertionError as error:  # pragma: no cover - reported with the seed to rerun
        raise AssertionError(f"{error} (CLUSTER_SEED={seed})") from None


def test_the_checker_catches_a_stale_read() -> None:
    """The checker itself fails a history where a read misses an acknowledged write."""
    history = [
        Op("put", "k", 0.0, value=1, completed=1.0, ok=True),
        Op("put", "k", 2.0, value=2, completed=3.0, ok=True),
        Op("get", "k", 4.0, completed=5.0, ok=True, read=[1]),
    ]
    with pytest.raises(AssertionError, match="older than the acknowledged 2"):
        check_history(history)
    history[-1].read = []
    with pytest.raises(AssertionError, match="read nothing"):
        check_history(history)
    history[-1].read = [7]
    with pytest.raises(AssertionError, match="never written"):
        check_history(history)
    history[-1].read = [2]
    check_history(history)


# Configuration and bad input (no nodes needed) --------------------------------------------

URLS = [f"http://127.0.0.1:{port}/" for port in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"nodes": []}, ValueError, "at least one node"),
        ({"nodes": "http://a/"}, TypeError, "nodes must be a sequence"),
        ({"replicas": 6}, ValueError, "replicas=6 needs at least 6 nodes"),
        ({"replicas": 3, "write_quorum": 4}, ValueError, "write_quorum=4 is more than replicas"),
        ({"replicas": 3, "read_quorum": 4}, ValueError, "read_quorum=4 is more than replicas"),
        ({"replicas": 0}, ValueError, "replicas must be at least 1"),
        ({"writer_id": ""}, ValueError, "writer_id must be"),
        ({"timeout": 0}, ValueError, "timeout must be greater than zero"),
        ({"hedge_after": -1}, ValueError, "hedge_after must not be negative"),
        ({"last_writer_wins": 1}, TypeError, "last_writer_wins must be"),
        ({"read_repair": "yes"}, TypeError, "read_repair must be"),
        ({"max_background": 0}, ValueError, "max_background must be at least 1"),
        ({"max_parallel": 0}, ValueError, "max_parallel must be at least 1"),
        ({"retry": 3}, TypeError, "retry must be a resilient.Retry"),
        ({"breaker": 3}, TypeError, "breaker must be a callable"),
        ({"breaker": CircuitBreaker(name="one")}, TypeError, "expects a factory"),
        ({"breaker": lambda node: "x"}, TypeError, "must return a resilient.CircuitBreaker"),
        ({"nodes": [URLS[0], URLS[0], URLS[1]]}, ValueError, "twice"),
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any], error: type, text: str) -> None:
    """Each bad option fails at construction, naming the option and the value."""
    options = {"nodes": URLS, **options}
    with pytest.raises(error, match=text):
        AsyncClusterClient(**options)
    with pytest.raises(error, match=text):
        ClusterClient(**options)


def test_quorums_that_may_miss_writes_warn() -> None:
    """R + W <= N is allowed, with a warning that reads may miss acknowledged writes."""
    with pytest.warns(UserWarning, match="reads can return stale values"):
        ClusterClient(URLS, replicas=3, write_quorum=1, read_quorum=2).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClusterClient(URLS, replicas=3, write_quorum=2, read_quorum=2).close()


async def test_open_breakers_fail_fast_without_calling() -> None:
    """When too few replicas have a closed breaker, the call fails at once, asking nobody."""
    breakers: dict[str, CircuitBreaker] = {}

    def breaker(node: str) -> CircuitBreaker:
        breakers[node] = CircuitBreaker(name=node)
        return breakers[node]

    async with AsyncClusterClient(URLS, breaker=breaker) as cluster:
        assert repr(cluster).startswith("<resilient.rpc.AsyncClusterClient 5 nodes N=3 W=2 R=2")
        for each in breakers.values():
            each.isolate()
        with pytest.raises(QuorumError) as caught:
            await cluster.get("k")
        assert set(caught.value.reasons.values()) == {"not asked: its circuit breaker is isolated"}
        breakers[cluster.ring.get_n("k", 3)[0]].reset()
        with pytest.raises(QuorumError, match="too few replicas are healthy"):
            await cluster.put("k", 1)
    with pytest.raises(RuntimeError, match="closed"):
        await cluster.get("k")


async def test_bad_keys_values_and_contexts_are_the_callers_errors(nodes: Nodes) -> None:
    """A bad key, a value that is not JSON, or a bad context raise at once, not a QuorumError."""
    async with five(nodes.urls, breaker=None) as cluster:
        with pytest.raises(TypeError, match="key must be a str"):
            await cluster.get(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="non-empty"):
            await cluster.put("", 1)
        with pytest.raises(TypeError, match="context must be"):
            await cluster.put("k", 1, context=[1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not JSON-encodable"):
            await cluster.put("k", object())
        with pytest.raises(resilient.rpc.InvalidParams) as caught:
            await cluster.put("k" * 5000, 1)
        assert any("every replica would refuse it" in note for note in caught.value.__notes__)
        assert cluster.node_states() == dict.fromkeys(nodes.urls)


async def test_a_node_answering_nonsense_is_that_nodes_failure() -> None:
    """A reply that is not a list of siblings counts against that node, named in the error."""
    server = Server()

    @server.method(name="kv.get", idempotent=True)
    def get(key: str) -> Any:
        return "nonsense" if key == "text" else [{"value": 1}]

    with serve(server) as url:
        async with AsyncClusterClient([url + "/"], replicas=1, write_quorum=1, read_quorum=1) as c:
            with pytest.raises(QuorumError, match="not a list of siblings"):
                await c.get("text")
            with pytest.raises(QuorumError, match="malformed sibling"):
                await c.get("list")


def test_writes_of_one_writer_always_advance() -> None:
    """Each write of a client takes a larger counter than its last and than the context."""
    with ClusterClient(URLS, writer_id="w") as cluster:
        first = cluster.new_sibling(None, 1, deleted=False).version["w"]
        second = cluster.new_sibling(None, 2, deleted=False).version["w"]
        ahead = cluster.new_sibling({"w": second + 10**15}, 3, deleted=False).version["w"]
        assert first < second < ahead
        assert cluster.new_sibling({"x": 4}, None, deleted=True).version["x"] == 4
    read = ReadResult(key="k", siblings=(), context={}, answered=())
    assert read.values == []
    assert httpx.URL(URLS[0]).port == 1


# In-process nodes: repair bounds and failures, probing order, closing ----------------------


def stale_setup(live_asgi: Any) -> tuple[list[str], str]:
    """Three in-process nodes: two hold two concurrent siblings of "k", the third (whose
    writes fail) holds nothing. Returns the URLs, the failing one last."""
    holders = []
    for _ in range(2):
        node = kv.Node()
        node.put("k", "a", {"alice": 1}, 1.0)
        node.put("k", "b", {"bob": 1}, 2.0)
        holders.append(live_asgi(kv.app(node)))
    broken = Server()

    @broken.method(name="kv.get", idempotent=True)
    def get(key: str) -> list[Any]:
        return []

    @broken.method(name="kv.put", idempotent=True)
    def put(key: str, value: Any, version: dict[str, int], timestamp: float) -> bool:
        raise RemoteError(1, "disk full")

    failing = f"{live_asgi(broken)}/"
    return [*(f"{url}/" for url in holders), failing], failing


async def test_repairs_are_bounded_and_their_failures_counted(live_asgi: Any) -> None:
    """Repairs beyond max_background are skipped, failed ones counted; none is left running."""
    urls, _ = stale_setup(live_asgi)
    options: dict[str, Any] = {"replicas": 3, "write_quorum": 1, "read_quorum": 3}
    async with AsyncClusterClient(urls[:3], max_background=1, **options) as cluster:
        read = await cluster.get("k")
        assert sorted(read.values) == ["a", "b"]
        await cluster.drain()
        stats = cluster.stats()
        assert (stats.repairs, stats.repairs_skipped, stats.repair_failures) == (1, 1, 1)
    async with AsyncClusterClient(urls[:3], read_repair=False, **options) as cluster:
        await cluster.get("k")
        assert cluster.stats().repairs == 0


def test_blocking_repairs_are_bounded_and_their_failures_counted(live_asgi: Any) -> None:
    """The blocking client bounds and counts its repairs the same way."""
    urls, _ = stale_setup(live_asgi)
    options: dict[str, Any] = {"replicas": 3, "write_quorum": 1, "read_quorum": 3}
    cluster = ClusterClient(urls[:3], max_background=1, **options)
    assert sorted(cluster.get("k").values) == ["a", "b"]
    cluster.close()
    stats = cluster.stats()
    assert (stats.repairs, stats.repairs_skipped, stats.repair_failures) == (1, 1, 1)


def test_half_open_nodes_are_asked_after_the_healthy_ones() -> None:
    """A node whose breaker lets probes through is asked last, so probes go only where needed."""
    clock = FakeClock()
    breakers: dict[str, CircuitBreaker] = {}

    def breaker(node: str) -> CircuitBreaker:
        breakers[node] = CircuitBreaker(
            name=node, failure_threshold=1, reset_timeout=1, clock=clock
        )
        return breakers[node]

    with ClusterClient(URLS, breaker=breaker) as cluster:
        first = cluster.ring.get_n("k", 3)[0]
        ticket = breakers[first].before_call()
        breakers[first].on_failure(ticket, ConnectionError("down"))
        asked, skipped = cluster.preference("k")
        assert first not in asked
        assert skipped == {first: "not asked: its circuit breaker is open"}
        clock.advance(2)
        asked, skipped = cluster.preference("k")
        assert asked[-1] == first
        assert skipped == {}
        assert cluster.node_states()[first] is BreakerState.HALF_OPEN


async def test_cancelling_aclose_cancels_the_write_stragglers(live_asgi: Any) -> None:
    """A write to a slow replica outlives its put; aclose waits for it, or cancels it."""
    fast = [f"{live_asgi(kv.app(kv.Node()))}/" for _ in range(2)]
    sleepy = ServerFault(latency_rate=1.0, delay=5.0)
    slowed = FaultMiddleware(kv.app(kv.Node()), routes={"/": sleepy})
    slow = f"{live_asgi(slowed, timeout_graceful_shutdown=0.1)}/"
    cluster = AsyncClusterClient([*fast, slow], replicas=3, write_quorum=2, read_quorum=2)
    started = time.monotonic()
    await cluster.put("k", 1)
    assert time.monotonic() - started < 2.0
    assert cluster.stats().background == 1
    closing = asyncio.create_task(cluster.aclose())
    await asyncio.sleep(0.05)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert cluster.stats().background == 0
    await cluster.aclose()  # already closed: nothing to do


def test_a_slow_node_does_not_slow_the_blocking_client(live_asgi: Any) -> None:
    """A replica answering 2 s late ties up only threads of its own: the blocking client's
    writes keep returning at the fast replicas' pace, however many stragglers it left."""
    fast = [f"{live_asgi(kv.app(kv.Node()))}/" for _ in range(2)]
    sleepy = FaultMiddleware(
        kv.app(kv.Node()), routes={"/": ServerFault(latency_rate=1.0, delay=2.0)}
    )
    slow = f"{live_asgi(sleepy, timeout_graceful_shutdown=0.1)}/"
    options: dict[str, Any] = {"replicas": 3, "write_quorum": 2, "read_quorum": 2}
    with ClusterClient([*fast, slow], timeout=4.0, max_threads=4, **options) as cluster:
        slowest = 0.0
        for i in range(20):  # five times the threads the slow node may hold
            started = time.monotonic()
            cluster.put(f"k{i}", i)
            slowest = max(slowest, time.monotonic() - started)
        # Generous for a shared machine, and well under the slow node's two seconds.
        assert slowest < 1.0
        assert cluster.get("k19").value == 19
    assert cluster.stats().background == 0


def test_blocking_calls_to_unreachable_nodes_raise_quorum_error() -> None:
    """Nothing listening: the blocking client's reads and writes raise QuorumError, quickly."""
    with ClusterClient(URLS, timeout=2.0) as cluster:
        started = time.monotonic()
        with pytest.raises(QuorumError, match="ConnectError"):
            cluster.put("k", 1)
        with pytest.raises(QuorumError, match="0 of 3 answered, 2 needed"):
            cluster.get("k")
        assert time.monotonic() - started < 3.0
        assert cluster.stats().failed == 2


async def test_a_write_quorum_given_up_leaves_the_running_writes_going(live_asgi: Any) -> None:
    """When a write cannot reach W, the replica still writing is reported as left to finish."""
    sleepy = FaultMiddleware(
        kv.app(kv.Node()), routes={"/": ServerFault(latency_rate=1.0, delay=0.5)}
    )
    slow = f"{live_asgi(sleepy, timeout_graceful_shutdown=0.1)}/"
    async with AsyncClusterClient(
        [URLS[0], URLS[1], slow], replicas=3, write_quorum=2, read_quorum=2, timeout=2.0
    ) as cluster:
        with pytest.raises(QuorumError) as caught:
            await cluster.put("k", 1)
        assert caught.value.reasons[slow].startswith("still running, left to finish")
        assert cluster.stats().background == 1
        await cluster.drain()
    with Client(slow) as direct:
        assert [Sibling.from_wire(s).value for s in direct.call("kv.get", key="k")] == [1]


def test_replicas_slower_than_the_hedge_delay_are_asked_last() -> None:
    """A replica whose average latency exceeds hedge_after moves behind the others."""
    with ClusterClient(URLS, hedge_after=0.05, breaker=None) as cluster:
        ring_order = cluster.ring.get_n("k", 3)
        cluster.observe(ring_order[0], 0.3)
        assert cluster.preference("k")[0] == [*ring_order[1:], ring_order[0]]
        for _ in range(20):
            cluster.observe(ring_order[0], 0.001)  # it recovered
        assert cluster.preference("k")[0] == ring_order
    with ClusterClient(URLS, hedge_after=None, breaker=None) as cluster:
        cluster.observe(cluster.ring.get_n("k", 3)[0], 5.0)
        assert cluster.preference("k")[0] == cluster.ring.get_n("k", 3)


# The demo's own parts ------------------------------------------------------------------------


def load_demo() -> Any:
    """demo/cluster.py as a module (the demo is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("demo_cluster", ROOT / "demo" / "cluster.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_cluster"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_the_demo_counts_every_acknowledged_write_it_lost(live_asgi: Any) -> None:
    """The demo's 'acknowledged writes lost' counts writes, not keys: every acknowledged
    value of a key above the newest one any node holds is lost."""
    demo = load_demo()
    holder = kv.Node()
    holder.put("k", 2, {"naive": 2}, 1.0)
    urls = [f"{live_asgi(kv.app(holder))}/", f"{live_asgi(kv.app(kv.Node()))}/"]
    record = demo.Record("naive")
    record.acked = {"k": [(0.0, 1), (0.0, 2), (0.0, 3), (0.0, 4)], "gone": [(0.0, 5)]}
    # 1 and 2 are held (2 supersedes 1); 3, 4 and the only write of "gone" are lost.
    assert await demo.lost_writes(urls, record) == (3, 5)


def test_a_demo_node_stops_cleanly_on_sigterm(tmp_path: pathlib.Path) -> None:
    """demo/node.py exits 0 on SIGTERM, its log closed, and keeps what it acknowledged."""
    command = [sys.executable, str(ROOT / "demo" / "node.py"), "--port", "0"]
    command += ["--data", str(tmp_path)]
    for attempt in range(2):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            port = Nodes._ready(proc)
            with Client(f"http://127.0.0.1:{port}/") as direct:
                if attempt == 0:
                    assert direct.call("kv.put", "k", 1, {"w": 1}, 1.0) is True
                else:
                    assert [s["value"] for s in direct.call("kv.get", "k")] == [1]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:  # pragma: no cover - a stuck node
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
