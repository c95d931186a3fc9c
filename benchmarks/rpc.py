"""resilient.rpc.Server against jsonrpcserver, fastapi-jsonrpc and a bare ASGI app: one handler.

Every server answers the same request, ``subtract`` with named params (fastapi-jsonrpc takes
no positional ones), from the same ``async def`` handler body:

- ``resilient.rpc.Server``, as a user writes it (``@server.method``, the default limits);
- jsonrpcserver 5 behind the thinnest ASGI wrapper: read the body, ``async_dispatch``, send;
- fastapi-jsonrpc: an ``Entrypoint`` at ``/`` with a ``subtract`` method, bound to its ``API``;
- the ceiling: a bare ASGI app that reads the body and sends a fixed
  ``{"jsonrpc":"2.0","result":19,"id":1}``, all any JSON-RPC server must do on top of HTTP.

1. Throughput. Each app is served by uvicorn in a child process of its own (one worker, the
   same loop and HTTP parser for all, access log off) on 127.0.0.1 at an ephemeral port;
   all four start once and are always stopped. This process is the client: it keeps
   ``CONNECTIONS`` keep-alive connections open to each server and sends one request at a
   time on each, over raw asyncio streams. (Tried here, an ``httpx.AsyncClient`` sharing
   its pool among 16 concurrent requests spent ~1.1 ms of client CPU per request, ten times
   what uvicorn spends serving the ceiling: it, not the servers, set the pace. The raw
   client spends ~35 us.) On two or more cores the servers are pinned to one core and the
   client to another. Many short rounds take turns across the servers (who goes first
   rotates), each turn sized to last about ``TURN`` seconds; every server is compared with
   the ceiling *in the same round* and the median over rounds of those paired ratios is
   kept, since the machine's speed wanders by more than some of the differences measured.
   Latency p50/p99 are over every request of every round (a closed loop: latency is about
   connections / throughput). The client's CPU per request is measured too: the client is
   not the bottleneck while it could drive several times the ceiling's rate. Server CPU
   per request comes from ``/proc`` (Linux), pooled over all rounds: a figure that wanders
   less than wall time, printed as a cross-check.
   Targets: resilient keeps >= 85% of the ceiling's requests/s; >= 2x fastapi-jsonrpc's.
2. In-process dispatch: each ASGI app called directly with a prebuilt scope, a ``receive``
   that hands over the body and a ``send`` that drops the messages; no socket, no HTTP
   parsing. us per request, paired rounds as above. Also, with no target: resilient with a
   ``def`` handler (which the server runs in a worker thread) and with a
   ``resilient-timeout-ms`` header; and the cost of ``resilient.asgi.DeadlineMiddleware``
   around the bare app, with no budget header and with ``resilient-timeout-ms: 5000``.
3. Batches, resilient only: one batch of 100 ``subtract`` requests against 100 single
   requests, in-process (the target: the batch takes less time) and over one keep-alive
   connection to the uvicorn server of part 1.

Run: ``make bench`` or ``.venv/bin/python benchmarks/rpc.py`` (about 40 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from _servers import free_port, listening, stop
from _targets import record
from _timing import (
    Paired,
    median_paired_overhead,
    median_paired_ratio,
    paired_rounds,
    table,
    time_async,
)

SCRIPT = "rpc.py"
CONNECTIONS = 16  # keep-alive connections per server, one request in flight on each
TURN = 0.05  # seconds a server's turn in a throughput round lasts, about
ROUNDS = 100
INPROCESS_TURN = 0.01
INPROCESS_ROUNDS = 60
BATCH = 100
BATCH_ROUNDS = 60
SOCKET_BATCH_ROUNDS = 15
THROUGHPUT_TARGET = 0.85  # of the ceiling's requests/s
PEER_TARGET = 2.0  # times fastapi-jsonrpc's requests/s

RESILIENT = "resilient.rpc.Server"
JSONRPCSERVER = "jsonrpcserver (thin ASGI wrapper)"
FASTAPI_JSONRPC = "fastapi-jsonrpc"
CEILING = "bare ASGI app (ceiling)"
RESILIENT_SYNC = "resilient.rpc.Server, def handler (thread)"
RESILIENT_HEADER = "resilient.rpc.Server, resilient-timeout-ms"

# Named params: fastapi-jsonrpc refuses positional ones, and every server gets the same bytes.
REQUEST = b'{"jsonrpc":"2.0","method":"subtract","params":{"minuend":42,"subtrahend":23},"id":1}'
ANSWER = b'{"jsonrpc":"2.0","result":19,"id":1}'
BATCH_REQUEST = json.dumps(
    [
        {"jsonrpc": "2.0", "method": "subtract", "params": [42, index], "id": index}
        for index in range(BATCH)
    ],
    separators=(",", ":"),
).encode()
LOOP = "uvloop" if find_spec("uvloop") else "asyncio"
HTTP = "httptools" if find_spec("httptools") else "h11"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
Rounds = dict[str, list[float]]


# The apps. uvicorn imports this module in each server process and calls one factory
# (``--factory``): the peers are imported only where they are served.


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    while message.get("more_body", False):
        message = await receive()
        body += message.get("body", b"")
    return body


async def _send_json(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _ceiling(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await _read_body(receive)
    await _send_json(send, ANSWER)


def ceiling_app() -> App:
    """The bare ASGI app: reads the body, answers the fixed result."""
    return _ceiling


def resilient_app(sync: bool = False) -> App:
    """``resilient.rpc.Server`` with ``subtract``, async (or, ``sync``, a ``def``)."""
    from resilient.rpc.server import Server

    server = Server()
    if sync:

        @server.method
        def subtract(minuend: int, subtrahend: int) -> int:
            return minuend - subtrahend

    else:

        @server.method
        async def subtract(minuend: int, subtrahend: int) -> int:
            return minuend - subtrahend

    return server


def jsonrpcserver_app() -> App:
    """jsonrpcserver's ``async_dispatch`` behind the thinnest ASGI wrapper."""
    from jsonrpcserver import Result, Success, async_dispatch

    async def subtract(minuend: int, subtrahend: int) -> Result:
        return Success(minuend - subtrahend)

    methods = {"subtract": subtract}

    async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        await _send_json(send, (await async_dispatch(body.decode(), methods=methods)).encode())

    return app


def fastapi_jsonrpc_app() -> App:
    """fastapi-jsonrpc: an ``Entrypoint`` at ``/`` with ``subtract``, bound to its ``API``."""
    import fastapi_jsonrpc

    api = fastapi_jsonrpc.API()
    entrypoint = fastapi_jsonrpc.Entrypoint("/")

    @entrypoint.method()
    async def subtract(minuend: int, subtrahend: int) -> int:
        return minuend - subtrahend

    api.bind_entrypoint(entrypoint)
    return api


FACTORIES: dict[str, Callable[[], App]] = {
    RESILIENT: resilient_app,
    JSONRPCSERVER: jsonrpcserver_app,
    FASTAPI_JSONRPC: fastapi_jsonrpc_app,
    CEILING: ceiling_app,
}

_targets: list[tuple[str, str, bool]] = []


def target(what: str, figure: str, met: bool) -> None:
    """Keep a target's verdict; ``main`` records them all at the end, in one block."""
    _targets.append((what, figure, met))


# 1. Throughput through uvicorn ------------------------------------------------------------


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _launch(factory: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start uvicorn serving ``factory`` (a function of this module) on a free port."""
    here = Path(__file__).resolve()
    port = free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", f"{here.stem}:{factory}", "--factory"),
        *("--app-dir", str(here.parent), "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--loop", LOOP, "--http", HTTP),
        *("--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "60"),
    ]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL), port


@contextmanager
def uvicorn_servers(factories: dict[str, str], core: int | None) -> Iterator[dict[str, Any]]:
    """Serve each factory in its own uvicorn; yield name -> (pid, port); always stop them.

    All start at once, so the frameworks import in parallel. Another process may take a
    free port before uvicorn binds it: a server that dies starting is tried on another.
    """
    with ExitStack() as stack:
        started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

        def launch(name: str) -> None:
            started[name] = _launch(factories[name])
            server = started[name][0]
            stack.callback(stop, server)
            if core is not None:
                os.sched_setaffinity(server.pid, {core})

        for name in factories:
            launch(name)
        until = time.monotonic() + 30.0
        for name in factories:
            for _ in range(3):
                if listening(*started[name], until):
                    break
                stop(started[name][0])
                launch(name)
            else:
                raise RuntimeError(f"uvicorn serving {name} did not start listening")
        yield {name: (server.pid, port) for name, (server, port) in started.items()}


def _post(port: int, body: bytes) -> bytes:
    return (
        b"POST / HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (port, len(body), body)
    )


class Connection:
    """One keep-alive HTTP/1.1 connection, one request in flight: as little client as possible."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def call(self, request: bytes) -> bytes:
        """Send ``request`` (a whole HTTP request); the response's body, or raise if not 200."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lowered = head.lower()
        start = lowered.index(b"\r\ncontent-length:") + 17
        length = int(lowered[start : lowered.index(b"\r\n", start)])
        body = await self.reader.readexactly(length)
        if head[9:12] != b"200":
            raise RuntimeError(f"HTTP {head[9:12].decode()}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


@dataclass
class Load:
    """One server under load: its connections and what its rounds measured."""

    pid: int
    port: int
    connections: list[Connection]
    request: bytes
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    client_cpu: float = 0.0
    warm: bool = False  # paired_rounds' first call per server is its warm-up: not counted


async def _burst(load: Load, per_connection: int) -> float:
    """``per_connection`` requests on every connection at once; seconds per request."""
    latencies: list[float] = []
    request = load.request
    clock = time.perf_counter

    async def drive(connection: Connection) -> None:
        call = connection.call
        for _ in range(per_connection):
            started = clock()
            await call(request)
            latencies.append(clock() - started)

    cpu = time.process_time()
    started = clock()
    await asyncio.gather(*(drive(connection) for connection in load.connections))
    elapsed = clock() - started
    if load.warm:
        load.latencies += latencies
        load.client_cpu += time.process_time() - cpu
    load.warm = True
    load.sent += len(latencies)
    return elapsed / len(latencies)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Throughput:
    rounds: Rounds
    loads: dict[str, Load]
    server_cpu: dict[str, float | None]  # seconds per request


def throughput(servers: dict[str, Any], runner: asyncio.Runner) -> Throughput:
    """Paired rounds of bursts across the servers; see the module docstring."""

    async def connect(port: int) -> list[Connection]:
        return [await Connection.open(port) for _ in range(CONNECTIONS)]

    loads = {
        name: Load(pid, port, runner.run(connect(port)), _post(port, REQUEST))
        for name, (pid, port) in servers.items()
    }
    try:
        for name, load in loads.items():
            answer = runner.run(load.connections[0].call(load.request))
            if json.loads(answer) != json.loads(ANSWER):
                raise RuntimeError(f"{name} answered {answer!r}, expected {ANSWER!r}")
        # Warm up, then size each server's turn to about TURN seconds from a probe burst.
        calls: dict[str, int] = {}
        for name, load in loads.items():
            runner.run(_burst(load, 20))
            load.warm = False
            per_request = runner.run(_burst(load, 10))
            calls[name] = max(3, round(TURN / (per_request * CONNECTIONS)))
            load.warm = False
        cpu_before = {name: _cpu_seconds(load.pid) for name, load in loads.items()}
        sent_before = {name: load.sent for name, load in loads.items()}
        rounds = paired_rounds(
            loads, lambda load, count: runner.run(_burst(load, count)), calls, ROUNDS
        )
        server_cpu: dict[str, float | None] = {}
        for name, load in loads.items():
            before, after = cpu_before[name], _cpu_seconds(load.pid)
            requests = load.sent - sent_before[name]
            server_cpu[name] = (
                None if before is None or after is None else (after - before) / requests
            )
    finally:
        for load in loads.values():
            for connection in load.connections:
                connection.close()
    return Throughput(rounds, loads, server_cpu)


def _percentile(values: list[float], fraction: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, round(fraction * (len(ranked) - 1)))]


def throughput_report(measured: Throughput) -> None:
    rounds, loads, server_cpu = measured.rounds, measured.loads, measured.server_cpu
    rows = []
    for name, times in rounds.items():
        load = loads[name]
        cpu = server_cpu[name]
        rows.append(
            (
                name,
                f"{1 / Paired.of(times).median:,.0f}",
                "(ceiling)"
                if name == CEILING
                else f"{median_paired_ratio(rounds, CEILING, name).median:.1%}",
                f"{median_paired_ratio(rounds, name, RESILIENT).median:.2f}x",
                f"{_percentile(load.latencies, 0.5) * 1e3:.2f}",
                f"{_percentile(load.latencies, 0.99) * 1e3:.2f}",
                "" if cpu is None else f"{cpu * 1e6:,.0f}",
                f"{load.client_cpu / len(load.latencies) * 1e6:.0f}",
            )
        )
    table(
        rows,
        (
            "server",
            "req/s",
            "of ceiling",
            "resilient / this",
            "p50 ms",
            "p99 ms",
            "server CPU us/req",
            "client CPU us/req",
        ),
    )
    ceiling = loads[CEILING]
    client_per_request = ceiling.client_cpu / len(ceiling.latencies)
    ceiling_rate = 1 / Paired.of(rounds[CEILING]).median
    client_rate = 1 / client_per_request
    print(
        f"   client limit: {client_per_request * 1e6:.0f} us of client CPU per request, "
        f"about {client_rate:,.0f} req/s on its core; the ceiling used "
        f"{ceiling_rate / client_rate:.0%} of that"
        + ("" if ceiling_rate < 0.7 * client_rate else "  (WARNING: the client may limit it)")
    )
    ours, theirs = server_cpu[RESILIENT], server_cpu[CEILING]
    if ours is not None and theirs is not None:
        print(
            f"   by server CPU per request instead (all rounds pooled): resilient.rpc.Server "
            f"{theirs / ours:.1%} of the ceiling's rate, +{(ours - theirs) * 1e6:.0f} us a request"
        )
    share = median_paired_ratio(rounds, CEILING, RESILIENT)
    target(
        f"1: resilient.rpc.Server keeps >= {THROUGHPUT_TARGET:.0%} of a bare ASGI app's req/s",
        f"{share.median:.1%} (middle half of rounds {share.low:.1%}-{share.high:.1%})",
        share.median >= THROUGHPUT_TARGET,
    )
    times = median_paired_ratio(rounds, FASTAPI_JSONRPC, RESILIENT)
    target(
        f"1: resilient.rpc.Server >= {PEER_TARGET:g}x fastapi-jsonrpc's req/s",
        times.ratio(),
        times.median >= PEER_TARGET,
    )


# 2. In-process dispatch -------------------------------------------------------------------


def _scope(body: bytes, *extra: tuple[bytes, bytes]) -> dict[str, Any]:
    """What uvicorn hands an app for a POST of ``body`` to ``/``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *extra,
        ],
        "state": {},
    }


class Dispatch:
    """One ASGI app called in-process on a prebuilt request; the last body it sent."""

    def __init__(self, app: App, body: bytes, *headers: tuple[bytes, bytes]) -> None:
        self.app = app
        self.scope = _scope(body, *headers)
        self.message = {"type": "http.request", "body": body, "more_body": False}
        self.sent: bytes = b""

    async def receive(self) -> Message:
        return self.message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            self.sent = message.get("body", b"")

    async def __call__(self) -> None:
        await self.app(dict(self.scope), self.receive, self.send)  # apps may write to scope


def _sized(
    variants: dict[str, Callable[[], Awaitable[Any]]], turn: float, runner: asyncio.Runner
) -> dict[str, int]:
    """Calls per variant so that each variant's turn lasts about ``turn`` seconds."""
    calls = {}
    for name, fn in variants.items():
        time_async(fn, 20, runner)
        calls[name] = max(3, round(turn / time_async(fn, 20, runner)))
    return calls


def _check(name: str, dispatch: Dispatch, expected: bytes, runner: asyncio.Runner) -> None:
    runner.run(dispatch())
    if json.loads(dispatch.sent) != json.loads(expected):
        raise RuntimeError(f"{name} answered {dispatch.sent!r} in-process, expected {expected!r}")


def in_process(runner: asyncio.Runner) -> tuple[Rounds, Rounds]:
    """Seconds per dispatch of each app, and of DeadlineMiddleware around the bare app."""
    from resilient.asgi import DeadlineMiddleware

    header = (b"resilient-timeout-ms", b"5000")
    dispatches = {name: Dispatch(factory(), REQUEST) for name, factory in FACTORIES.items()}
    dispatches[RESILIENT_SYNC] = Dispatch(resilient_app(sync=True), REQUEST)
    dispatches[RESILIENT_HEADER] = Dispatch(resilient_app(), REQUEST, header)
    bare = "bare ASGI app"
    no_header = "DeadlineMiddleware, no header"
    with_header = "DeadlineMiddleware, resilient-timeout-ms: 5000"
    middleware = {
        bare: Dispatch(ceiling_app(), REQUEST),
        no_header: Dispatch(DeadlineMiddleware(ceiling_app()), REQUEST),
        with_header: Dispatch(DeadlineMiddleware(ceiling_app()), REQUEST, header),
    }
    for name, dispatch in {**dispatches, **middleware}.items():
        _check(name, dispatch, ANSWER, runner)
    timer = partial(time_async, runner=runner)
    apps = paired_rounds(
        dispatches, timer, _sized(dispatches, INPROCESS_TURN, runner), INPROCESS_ROUNDS
    )
    wrapped = paired_rounds(
        middleware, timer, _sized(middleware, INPROCESS_TURN, runner), INPROCESS_ROUNDS
    )
    return apps, wrapped


def in_process_report(apps: Rounds, wrapped: Rounds) -> None:
    rows = []
    for name, times in apps.items():
        over = median_paired_overhead(apps, name, CEILING).median
        rows.append(
            (
                name,
                f"{Paired.of(times).median * 1e6:,.1f}",
                "(ceiling)" if name == CEILING else f"{over * 1e6:+,.1f}",
                f"{median_paired_ratio(apps, name, RESILIENT).median:.2f}x",
            )
        )
    table(rows, ("app", "us/request", "over the bare app", "of resilient's"))
    print("\n   DeadlineMiddleware around the bare app (no target)")
    bare = next(iter(wrapped))
    rows = [(bare, f"{Paired.of(wrapped[bare]).median * 1e6:,.2f}", "(baseline)")]
    for name, times in list(wrapped.items())[1:]:
        over = median_paired_overhead(wrapped, name, bare).median
        rows.append((name, f"{Paired.of(times).median * 1e6:,.2f}", f"{over * 1e6:+,.2f}"))
    table(rows, ("app", "us/request", "overhead us"))


# 3. Batches -------------------------------------------------------------------------------


def _batch_check(body: bytes) -> None:
    answers = json.loads(body)
    if [answer.get("result") for answer in answers] != [42 - index for index in range(BATCH)]:
        raise RuntimeError(f"the batch was answered {body[:200]!r}...")


def batches_in_process(runner: asyncio.Runner) -> Rounds:
    """Seconds for one batch of BATCH requests, and for BATCH single requests in a row."""
    server = resilient_app()
    batch = Dispatch(server, BATCH_REQUEST)
    single = Dispatch(server, REQUEST)
    runner.run(batch())
    _batch_check(batch.sent)
    _check(RESILIENT, single, ANSWER, runner)

    async def singles() -> None:
        for _ in range(BATCH):
            await single()

    variants: dict[str, Callable[[], Awaitable[Any]]] = {"batch": batch, "singles": singles}
    timer = partial(time_async, runner=runner)
    return paired_rounds(variants, timer, _sized(variants, INPROCESS_TURN, runner), BATCH_ROUNDS)


def batches_over_socket(port: int, runner: asyncio.Runner) -> Rounds:
    """As :func:`batches_in_process`, over one keep-alive connection to uvicorn."""
    connection = runner.run(Connection.open(port))
    try:
        batch_request, single_request = _post(port, BATCH_REQUEST), _post(port, REQUEST)
        _batch_check(runner.run(connection.call(batch_request)))

        async def batch() -> None:
            await connection.call(batch_request)

        async def singles() -> None:
            for _ in range(BATCH):
                await connection.call(single_request)

        variants: dict[str, Callable[[], Awaitable[Any]]] = {"batch": batch, "singles": singles}
        timer = partial(time_async, runner=runner)
        calls = _sized(variants, TURN, runner)
        return paired_rounds(variants, timer, calls, SOCKET_BATCH_ROUNDS)
    finally:
        connection.close()


def batch_report(where: str, rounds: Rounds, judged: bool) -> None:
    ratio = median_paired_ratio(rounds, "batch", "singles")
    batch, singles = Paired.of(rounds["batch"]).median, Paired.of(rounds["singles"]).median
    print(
        f"   {where}: one batch of {BATCH} {batch * 1e3:.2f} ms, {BATCH} singles "
        f"{singles * 1e3:.2f} ms; batch / singles {ratio.ratio()}"
    )
    if judged:
        target(
            f"3: a batch of {BATCH} dispatched in less time than {BATCH} single requests "
            "(in-process)",
            f"batch / singles {ratio.ratio()}",
            ratio.median < 1.0,
        )


def main() -> None:
    started = time.perf_counter()
    cores = _cores()
    print(
        f"Python {sys.version.split()[0]}, uvicorn {version('uvicorn')} ({HTTP}, {LOOP}), "
        f"jsonrpcserver {version('jsonrpcserver')}, fastapi-jsonrpc "
        f"{version('fastapi-jsonrpc')} (fastapi {version('fastapi')}), "
        f"msgspec {version('msgspec')}; {len(cores) or os.cpu_count()} cores"
    )
    # Servers on one core, this client on another: neither takes CPU from the other.
    pinned = len(cores) >= 2
    server_core = cores[0] if pinned else None
    with asyncio.Runner() as runner:
        print(
            f"\n1. Requests/s through uvicorn on 127.0.0.1: {CONNECTIONS} keep-alive "
            f"connections per server, one request in flight on each;\n   {ROUNDS} interleaved "
            f"rounds of ~{TURN * 1e3:.0f} ms per server. req/s: median round; of ceiling: "
            "median over rounds of the\n   ceiling's time / the server's in the same round. "
            + (
                f"Servers pinned to core {cores[0]}, client to core {cores[1]}."
                if pinned
                else "One core: client and server compete for it."
            )
        )
        factories = {name: factory.__name__ for name, factory in FACTORIES.items()}
        with uvicorn_servers(factories, server_core) as servers:
            if pinned:
                os.sched_setaffinity(0, {cores[1]})
            try:
                measured = throughput(servers, runner)
                socket_batches = batches_over_socket(servers[RESILIENT][1], runner)
            finally:
                if pinned:
                    os.sched_setaffinity(0, set(cores))
        throughput_report(measured)

        print(
            f"\n2. In-process dispatch, no socket: {INPROCESS_ROUNDS} rounds of "
            f"~{INPROCESS_TURN * 1e3:.0f} ms per app; over the bare app: paired, median"
        )
        apps, wrapped = in_process(runner)
        in_process_report(apps, wrapped)

        print(f"\n3. A batch of {BATCH} subtract requests against {BATCH} singles, resilient")
        batch_report("in-process", batches_in_process(runner), judged=True)
        batch_report("over one keep-alive connection", socket_batches, judged=False)

    print("\nTargets")
    for what, figure, met in _targets:
        record(SCRIPT, what, figure, met)
    print(f"\nTotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
