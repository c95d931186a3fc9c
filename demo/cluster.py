"""``make demo``: a naive quorum client and ClusterClient, side by side, through scheduled faults.

Five KV nodes run as real processes on 127.0.0.1 (``demo/node.py``: a
:mod:`resilient.rpc.kv` node behind :class:`resilient.chaos.FaultMiddleware`, which
delays or fails its requests on cue, with an fsynced log). The slow node is slowed
in the server rather than by :class:`resilient.chaos.FaultProxy`: the proxy delays
each TCP chunk in turn, so an answer written in two pieces would come twice as late.
Two clients run at once, each on keys of its own, through the same faults:

* **naive**: the seeds' client. A plain ``httpx`` JSON-RPC caller with no timeout,
  no retry, no breaker and no hedging: a write goes to all five replicas and waits
  for every answer, then counts at least W = 3 successes; a read asks all five, waits
  for all, and needs R = 3.
* **ClusterClient**: :class:`resilient.rpc.AsyncClusterClient` with N = 5, W = 3,
  R = 3, a 1 s deadline per operation, hedged reads after 50 ms, a breaker per node.

Each client gets the same open-loop load, 25 operations a second (half writes, half
reads), for the whole run. The schedule: node 1 is killed (SIGKILL) at 5 s and
restarted at 30 s; node 2 answers 300 ms late from 10 s to 40 s; node 3 fails 30% of
requests (HTTP 503) from 15 s on. At the end every fault is lifted and every
acknowledged write is read back from all five nodes: a write is lost when no node
holds it (or a newer write of its key). A read is stale when it returned a value
older than a write acknowledged before the read began. The run ends with a table,
latency over time, and each node's breaker state over time (as ClusterClient saw
it). Every process is stopped at the end, also on Ctrl-C. ``--seconds`` shortens or
lengthens the workload (default 45).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import pathlib
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from resilient.breaker import BreakerState
from resilient.hashring import HashRing
from resilient.rpc.cluster import AsyncClusterClient
from resilient.rpc.versions import Sibling, reconcile

HERE = pathlib.Path(__file__).resolve().parent
NODES = 5
N, W, R = 5, 3, 3
RATE = 25.0  # operations a second, per client
MAX_IN_FLIGHT = 200  # per client
KEYS = 200  # per client


# The node processes -----------------------------------------------------------------------


class Cluster:
    """Five demo/node.py processes: start, kill, restart, set faults, stop all."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[str] | None] = [None] * NODES
        self.ports = [0] * NODES

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/" for port in self.ports]

    def start(self, *indexes: int) -> None:
        started = []
        for index in indexes:
            command = [
                sys.executable,
                str(HERE / "node.py"),
                "--port",
                str(self.ports[index]),
                "--data",
                str(self.directory / f"node{index}"),
                "--seed",
                str(index),
            ]
            log = (self.directory / f"node{index}.log").open("a")
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the nodes
            )
            log.close()
            self.procs[index] = proc
            started.append((index, proc))
        for index, proc in started:
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline() if readable else ""
            if not line.startswith("ready "):
                raise RuntimeError(f"node {index} did not start; see {self.directory}")
            self.ports[index] = int(line.split()[1].rsplit(":", 1)[1])

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            self.procs[index] = None

    async def faults(self, index: int, **settings: float) -> None:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.post(f"{self.urls[index]}_faults", json=settings)
            response.raise_for_status()

    def stop_all(self) -> None:
        procs = [proc for proc in self.procs if proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = [None] * NODES


# The naive client (the seeds') ---------------------------------------------------------------


class NaiveClient:
    """Write to all N and wait for all; read from all N and wait for all. No timeouts."""

    def __init__(self, urls: list[str]) -> None:
        self.ring = HashRing(urls)
        self.http = httpx.AsyncClient(timeout=None)
        self.counter = itertools.count(1)
        self.ids = itertools.count(1)

    async def _call(self, url: str, method: str, params: dict[str, Any]) -> Any:
        request = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        response = await self.http.post(url, json=request)
        return response.json()["result"]  # an error answer is a KeyError: a failed call

    async def _all(self, key: str, method: str, params: dict[str, Any]) -> list[Any]:
        nodes = self.ring.get_n(key, N)
        replies = await asyncio.gather(
            *(self._call(url, method, params) for url in nodes), return_exceptions=True
        )
        return [reply for reply in replies if not isinstance(reply, BaseException)]

    async def put(self, key: str, value: int) -> None:
        params = {"key": key, "value": value, "version": {"naive": next(self.counter)}}
        params["timestamp"] = time.time()
        if len(await self._all(key, "kv.put", params)) < W:
            raise RuntimeError("fewer than W acknowledgements")

    async def get(self, key: str) -> list[int]:
        replies = await self._all(key, "kv.get", {"key": key})
        if len(replies) < R:
            raise RuntimeError("fewer than R replies")
        siblings = [Sibling.from_wire(item) for reply in replies for item in reply]
        return [s.value for s in reconcile(siblings) if not s.deleted]

    async def aclose(self) -> None:
        await self.http.aclose()


class Resilient:
    """AsyncClusterClient behind the same two calls."""

    def __init__(self, urls: list[str]) -> None:
        self.client = AsyncClusterClient(
            urls,
            replicas=N,
            write_quorum=W,
            read_quorum=R,
            timeout=1.0,
            hedge_after=0.05,
            writer_id="cluster-demo",
        )

    async def put(self, key: str, value: int) -> None:
        await self.client.put(key, value)

    async def get(self, key: str) -> list[int]:
        return (await self.client.get(key)).values

    async def aclose(self) -> None:
        await self.client.aclose()


# The workload and what it records ---------------------------------------------------------


@dataclass
class Record:
    name: str
    latencies: list[tuple[float, float, bool]] = field(default_factory=list)  # (t, s, ok)
    acked: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # key -> (t, v)
    reads: list[tuple[str, float, list[int]]] = field(default_factory=list)  # key, t0, values


async def workload(
    name: str,
    client: NaiveClient | Resilient,
    record: Record,
    stop: float,
    start: float,
    seed: int,
) -> None:
    """An open-loop load: RATE operations a second whatever the answers, half puts, half gets.

    Open loop, as real traffic is: a slow client does not get fewer requests, it gets
    more of them in flight (at most MAX_IN_FLIGHT; beyond, an operation counts as failed).
    """
    rng = random.Random(seed)
    counter = itertools.count(1)
    in_flight: set[asyncio.Task[None]] = set()

    async def operation(began: float) -> None:
        key = f"{name}:{rng.randrange(KEYS)}"
        ok = True
        if rng.random() < 0.5:
            value = next(counter)
            try:
                await client.put(key, value)
                record.acked.setdefault(key, []).append((time.monotonic(), value))
            except Exception:
                ok = False
        else:
            try:
                values = await client.get(key)
                record.reads.append((key, began, values))
            except Exception:
                ok = False
        record.latencies.append((began - start, time.monotonic() - began, ok))

    tick = start
    try:
        while tick < stop:
            tick += rng.expovariate(RATE)
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if len(in_flight) >= MAX_IN_FLIGHT:
                record.latencies.append((tick - start, 0.0, False))
                continue
            task = asyncio.create_task(operation(time.monotonic()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(set(in_flight))
    finally:
        for task in in_flight:
            task.cancel()


def percentile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def stale_reads(record: Record) -> int:
    stale = 0
    for key, began, values in record.reads:
        before = [value for at, value in record.acked.get(key, []) if at < began]
        if before and (not values or max(values) < max(before)):
            stale += 1
    return stale


async def lost_writes(urls: list[str], record: Record) -> tuple[int, int]:
    """Acknowledged writes no node holds (nor a newer write of the key); and how many."""
    lost = 0
    async with httpx.AsyncClient(timeout=10.0) as http:

        async def held(key: str) -> int:
            best = 0
            for index, url in enumerate(urls):
                body = {"jsonrpc": "2.0", "id": index, "method": "kv.get", "params": [key]}
                for item in (await http.post(url, json=body)).json()["result"]:
                    best = max(best, Sibling.from_wire(item).value or 0)
            return best

        for key, acks in record.acked.items():
            # A client's values grow with its versions: an acknowledged write is kept
            # when a node holds it or a later write of its key, lost otherwise.
            kept = await held(key)
            lost += sum(1 for _, value in acks if value > kept)
    return lost, sum(len(acks) for acks in record.acked.values())


# Output -----------------------------------------------------------------------------------

STATE_MARK = {
    BreakerState.CLOSED: ".",
    BreakerState.OPEN: "O",
    BreakerState.HALF_OPEN: "h",
    BreakerState.ISOLATED: "I",
    None: "?",
}
BARS = " ▁▂▃▄▅▆▇█"


def latency_row(record: Record, seconds: int, bucket: float) -> str:
    """p99 latency per time bucket, on a log scale from 1 ms to 1 s, as block characters."""
    row = []
    for index in range(math.ceil(seconds / bucket)):
        inside = [
            latency
            for at, latency, _ in record.latencies
            if index * bucket <= at < (index + 1) * bucket
        ]
        if not inside:
            row.append(" ")
            continue
        level = math.log10(max(percentile(inside, 0.99), 1e-3) * 1000) / 3  # 1 ms .. 1 s
        row.append(BARS[max(1, min(len(BARS) - 1, round(level * (len(BARS) - 1))))])
    return "".join(row)


def report(
    records: list[Record],
    lost: dict[str, tuple[int, int]],
    timeline: list[dict[str, BreakerState | None]],
    urls: list[str],
    seconds: int,
) -> None:
    def ms(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value * 1000:,.1f} ms"

    rows: list[tuple[str, ...]] = [("", *(record.name for record in records))]
    columns: dict[str, list[str]] = {}
    for record in records:
        latencies = [latency for _, latency, _ in record.latencies]
        total = len(record.latencies)
        ok = sum(1 for _, _, succeeded in record.latencies if succeeded)
        gone, acknowledged = lost[record.name]
        columns[record.name] = [
            f"{total:,}",
            f"{ok / total * 100:.2f} %" if total else "n/a",
            ms(percentile(latencies, 0.50)),
            ms(percentile(latencies, 0.99)),
            ms(percentile(latencies, 0.999)),
            f"{acknowledged:,}",
            f"{gone:,}",
            f"{stale_reads(record):,}",
        ]
    labels = [
        "operations",
        "success rate",
        "p50 latency",
        "p99 latency",
        "p99.9 latency",
        "acknowledged writes",
        "acknowledged writes lost",
        "stale reads",
    ]
    for index, label in enumerate(labels):
        rows.append((label, *(columns[record.name][index] for record in records)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    print()
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
        if number == 0:
            print("  ".join("-" * width for width in widths))
    print()
    bucket = 1.0
    print(f"p99 latency per second (log scale: ▁ 1 ms, ▄ ~30 ms, █ 1 s), 0 s .. {seconds} s:")
    for record in records:
        print(f"  {record.name:<14} |{latency_row(record, seconds, bucket)}|")
    print()
    print("ClusterClient's breaker per node, one mark per second (. closed  O open  h half-open):")
    for index, url in enumerate(urls):
        marks = "".join(STATE_MARK[sample.get(url)] for sample in timeline)
        print(f"  node {index} {url:<26} |{marks}|")


# The run ------------------------------------------------------------------------------------


async def run(seconds: int) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with tempfile.TemporaryDirectory(prefix="resilient-demo-") as directory:
        cluster = Cluster(pathlib.Path(directory))
        try:
            print(f"starting {NODES} KV nodes on 127.0.0.1 ...", flush=True)
            cluster.start(*range(NODES))
            for index, url in enumerate(cluster.urls):
                print(f"  node {index}: {url}")
            await drive(cluster, seconds)
        finally:
            cluster.stop_all()
            print("all node processes stopped")


async def drive(cluster: Cluster, seconds: int) -> None:
    scale = seconds / 45
    schedule: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
        (5 * scale, "node 1 killed", lambda: asyncio.to_thread(cluster.kill, 1)),
        (10 * scale, "node 2 slowed by 300 ms", lambda: cluster.faults(2, delay=0.3)),
        (15 * scale, "node 3 fails 30% of requests", lambda: cluster.faults(3, fail_rate=0.3)),
        (30 * scale, "node 1 restarted", lambda: asyncio.to_thread(cluster.start, 1)),
        (40 * scale, "node 2 back to normal speed", lambda: cluster.faults(2)),
    ]
    urls = cluster.urls
    naive, resilient_client = NaiveClient(urls), Resilient(urls)
    records = [Record("naive"), Record("ClusterClient")]
    timeline: list[dict[str, BreakerState | None]] = []
    start = time.monotonic()
    stop = start + seconds

    async def faults() -> None:
        for at, what, action in schedule:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            await action()
            print(f"  [{time.monotonic() - start:5.1f} s] fault: {what}", flush=True)

    async def progress() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(1.0)
            timeline.append(resilient_client.client.node_states())
            elapsed = time.monotonic() - start
            if len(timeline) % 5 == 0:
                parts = []
                for record in records:
                    done = len(record.latencies)
                    ok = sum(1 for _, _, succeeded in record.latencies if succeeded)
                    parts.append(f"{record.name}: {done:6,} ops {ok / max(done, 1) * 100:6.2f}% ok")
                print(f"  [{elapsed:5.1f} s] " + "   ".join(parts), flush=True)

    print(
        f"running the workload for {seconds} s ({RATE:g} operations/s per client) ...", flush=True
    )
    try:
        await asyncio.gather(
            faults(),
            progress(),
            workload("naive", naive, records[0], stop, start, seed=1),
            workload("ClusterClient", resilient_client, records[1], stop, start, seed=1),
        )
    finally:
        await naive.aclose()
        await resilient_client.aclose()
    print("lifting every fault; reading back every acknowledged write from all nodes ...")
    if cluster.procs[1] is None:
        cluster.start(1)
    for index in range(NODES):
        await cluster.faults(index)
    lost = {record.name: await lost_writes(urls, record) for record in records}
    report(records, lost, timeline, urls, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description="naive client vs ClusterClient under faults")
    parser.add_argument("--seconds", type=int, default=45, help="workload length (default 45)")
    args = parser.parse_args()
    if args.seconds < 5:
        parser.error("--seconds must be at least 5")
    # Ctrl-C interrupts even when started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(run(args.seconds))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every node process was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
