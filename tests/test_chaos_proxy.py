"""FaultProxy: a real TCP proxy whose toxics slow, stall and reset real connections."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import LiveServer, Reply
from rpc_live import serve

import resilient
from resilient import rpc
from resilient.chaos import FaultProxy


@pytest.fixture
def proxy(server: LiveServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the live server, stopped after the test."""
    with FaultProxy(upstream=("127.0.0.1", server.port), random=1) as running:
        yield running


def url(proxy: FaultProxy, path: str = "/") -> str:
    return f"http://127.0.0.1:{proxy.port}{path}"


def retry(attempts: int = 3, **options: Any) -> resilient.Retry:
    backoff = resilient.Backoff(initial=0.0, jitter="none")
    return resilient.Retry(attempts=attempts, backoff=backoff, **options)


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "resilient-fault-proxy"]


def test_without_toxics_it_forwards_requests_and_answers(
    proxy: FaultProxy, server: LiveServer
) -> None:
    """A healthy proxy is invisible: the answer comes through, keep-alive and all."""
    with httpx.Client() as client:
        assert client.get(url(proxy, "/a")).text == "ok"
        assert client.get(url(proxy, "/b")).text == "ok"
    assert [seen.path for seen in server.seen] == ["/a", "/b"]
    assert proxy.accepted == 1  # one pooled connection carried both


def test_the_resilient_transport_times_out_through_the_latency_toxic(proxy: FaultProxy) -> None:
    """Latency past attempt_timeout fails each attempt on the real socket; then it recovers."""
    transport = resilient.ResilientTransport(retry=retry(attempts=2), attempt_timeout=0.2)
    with httpx.Client(transport=transport) as client:
        with proxy.latency(delay=2.0, jitter=0.1) as toxic:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                client.get(url(proxy))
            assert time.monotonic() - started < 1.5
            assert toxic.active
        assert not toxic.active
        assert client.get(url(proxy)).text == "ok"


def test_a_reset_peer_is_retried_by_the_resilient_transport(proxy: FaultProxy) -> None:
    """The first answer is an RST; the GET is retried on a new connection and succeeds."""
    toxic = proxy.reset_peer()
    errors: list[str] = []

    def heal(event: resilient.RetryEvent) -> None:
        errors.append(type(event.exception).__name__)
        toxic.remove()

    transport = resilient.ResilientTransport(retry=retry(on_retry=heal))
    with httpx.Client(transport=transport) as client:
        response = client.get(url(proxy))
    assert response.text == "ok"
    assert response.extensions["resilient"]["attempts"] == 2
    assert errors in (["ReadError"], ["RemoteProtocolError"])


def test_a_reset_peer_reads_as_connection_reset_on_a_raw_socket(proxy: FaultProxy) -> None:
    """SO_LINGER 0: the client's socket sees ECONNRESET, not a polite end of stream."""
    proxy.reset_peer(stream="upstream")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)  # an orderly close would return b"" instead


def test_a_timeout_toxic_holds_the_answer_until_the_read_timeout(proxy: FaultProxy) -> None:
    """A black hole keeps the socket open and silent; the client's read timeout fires."""
    toxic = proxy.timeout()
    with httpx.Client(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get(url(proxy))
        toxic.remove()
        assert client.get(url(proxy)).text == "ok"
    assert proxy.blackhole().kind == "timeout"


def test_a_timeout_toxic_with_after_closes_the_connection(proxy: FaultProxy) -> None:
    """timeout(after=) closes the connection: the client sees the server hang up."""
    proxy.timeout(after=0.05)
    with httpx.Client(timeout=5.0) as client, pytest.raises(httpx.RemoteProtocolError):
        client.get(url(proxy))


def test_bandwidth_slows_a_large_answer(proxy: FaultProxy, server: LiveServer) -> None:
    """10 kB at 40 kB/s takes about a quarter of a second; the body arrives whole."""
    server.plan("/big", Reply(body=b"x" * 10_000))
    proxy.bandwidth(bytes_per_second=40_000)
    with httpx.Client() as client:
        started = time.monotonic()
        body = client.get(url(proxy, "/big")).content
    assert time.monotonic() - started >= 0.2
    assert body == b"x" * 10_000


def test_slicer_delivers_the_answer_in_small_pieces(proxy: FaultProxy) -> None:
    """The bytes arrive whole but in many small reads."""
    proxy.slicer(size=20, variation=5, delay=0.005)
    reads = 0
    data = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        while chunk := sock.recv(4096):
            reads += 1
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"ok")
    assert reads > 3


def test_upstream_toxics_and_per_connection_rates(proxy: FaultProxy) -> None:
    """rate=0 never touches a connection; an upstream latency delays the request side."""
    proxy.reset_peer(rate=0.0)
    with proxy.latency(delay=0.2, stream="upstream"), httpx.Client() as client:
        started = time.monotonic()
        assert client.get(url(proxy)).text == "ok"
        assert time.monotonic() - started >= 0.15
    proxy.clear()
    assert proxy.toxics == ()


@pytest.mark.parametrize(("stream", "reaches_server"), [("upstream", False), ("downstream", True)])
def test_a_toxic_acts_on_the_direction_it_names(
    proxy: FaultProxy, server: LiveServer, stream: str, reaches_server: bool
) -> None:
    """A black hole upstream swallows the request; downstream, the server answers into it."""
    proxy.blackhole(stream=stream)
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.get(url(proxy, "/swallowed"))
    time.sleep(0.1)  # a request that got through has been seen by now
    assert [seen.path for seen in server.seen] == (["/swallowed"] if reaches_server else [])


def test_enabled_false_lets_everything_through(server: LiveServer) -> None:
    """A switched-off proxy ignores its toxics."""
    flag = threading.Event()
    with FaultProxy(upstream=f"127.0.0.1:{server.port}", enabled=flag.is_set) as proxy:
        proxy.reset_peer()
        with httpx.Client() as client:
            assert client.get(url(proxy)).text == "ok"
            flag.set()
            with pytest.raises(httpx.TransportError):
                client.get(url(proxy, "/again"))


def test_an_unreachable_upstream_resets_the_client() -> None:
    """With nothing listening upstream the client's connection is reset, not left hanging."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    refused = pytest.raises(httpx.TransportError)
    with FaultProxy(upstream=("127.0.0.1", port)) as proxy, httpx.Client() as client, refused:
        client.get(url(proxy))


def test_stop_closes_every_connection_and_ends_the_thread(server: LiveServer) -> None:
    """Stopping with a stalled connection open leaves no thread, task or socket behind."""
    before = len(proxy_threads())
    proxy = FaultProxy(upstream=("127.0.0.1", server.port)).start()
    proxy.blackhole()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    deadline = time.monotonic() + 5
    while proxy.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.connections == 1
    proxy.stop()
    assert proxy.connections == 0
    assert len(proxy_threads()) == before
    assert sock.recv(100) == b""  # the proxy's side is gone
    sock.close()
    proxy.stop()  # a second stop does nothing
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


def test_a_running_proxy_refuses_to_start_again(proxy: FaultProxy) -> None:
    """start() twice is a clear error, not a second listener."""
    with pytest.raises(RuntimeError, match="already running"):
        proxy.start()
    assert f":{proxy.port} -> 127.0.0.1:" in repr(proxy)
    assert proxy.address == ("127.0.0.1", proxy.port)


def test_a_port_in_use_is_reported_by_start(proxy: FaultProxy) -> None:
    """start() raises the bind error naming the address, not a proxy that never listens."""
    taken = FaultProxy(upstream=proxy.upstream, port=proxy.port)
    with pytest.raises(OSError, match="address already in use"):
        taken.start()
    assert taken._thread is None
    nowhere = FaultProxy(upstream=proxy.upstream, host="no-such-host.invalid")
    with pytest.raises(OSError, match=r"cannot listen on no-such-host\.invalid:0"):
        nowhere.start()


async def test_the_async_form_runs_in_the_current_loop(server: LiveServer) -> None:
    """async with: the proxy serves from the test's own loop; the toxic applies there too.

    stop() there is refused (it stops only threads it started), not a silent no-op.
    """
    async with FaultProxy(upstream=("127.0.0.1", server.port)) as proxy:
        with pytest.raises(RuntimeError, match="already running"):
            await proxy.__aenter__()
        with pytest.raises(RuntimeError, match="when the async with block ends"):
            proxy.stop()
        async with httpx.AsyncClient() as client:
            proxy.latency(delay=0.2)
            started = time.monotonic()
            assert (await client.get(url(proxy))).text == "ok"
            assert time.monotonic() - started >= 0.15
    assert proxy.connections == 0
    assert not [task for task in asyncio.all_tasks() if "FaultProxy." in repr(task)]


async def test_the_async_resilient_transport_cancels_at_the_attempt_timeout(
    server: LiveServer,
) -> None:
    """The async transport's attempt_timeout cuts the latency toxic, then retries."""
    async with FaultProxy(upstream=("127.0.0.1", server.port)) as proxy:
        toxic = proxy.latency(delay=5.0)
        attempts: list[int] = []

        def heal(event: resilient.RetryEvent) -> None:
            attempts.append(event.attempt)
            toxic.remove()

        transport = resilient.AsyncResilientTransport(
            retry=retry(on_retry=heal), attempt_timeout=0.2
        )
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(url(proxy))
    assert response.text == "ok"
    assert attempts == [1]


def test_the_rpc_client_sees_latency_and_a_retried_reset() -> None:
    """Through the proxy, an RPC call times out under latency and survives a reset."""
    server = rpc.Server()

    @server.method(idempotent=True)
    def echo(text: str) -> str:
        return text

    with serve(server) as base:
        port = int(base.rsplit(":", 1)[1])
        with FaultProxy(upstream=("127.0.0.1", port)) as proxy:
            endpoint = url(proxy)
            with rpc.Client(endpoint, idempotent={"echo"}, timeout=0.3) as client:
                assert client.call("echo", "hi") == "hi"
                with proxy.latency(delay=3.0), pytest.raises(resilient.DeadlineExceeded):
                    client.call("echo", "slow")
                toxic = proxy.reset_peer()
                heal = retry(on_retry=lambda event: toxic.remove())
                with rpc.Client(endpoint, idempotent={"echo"}, retry=heal) as healing:
                    assert healing.call("echo", "again") == "again"
                assert not toxic.active


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FaultProxy(upstream="nowhere"), ValueError, "upstream must be"),
        (lambda: FaultProxy(upstream=("h", 0)), ValueError, "upstream must be"),
        (lambda: FaultProxy(upstream=("h", 1), port=70000), ValueError, "at most 65535"),
        (lambda: FaultProxy(upstream=("h", 1), host=""), TypeError, "host must be"),
        (lambda: FaultProxy(upstream=("h", 1)).latency(delay=0), ValueError, "delay"),
        (lambda: FaultProxy(upstream=("h", 1)).latency(delay=1, stream="up"), ValueError, "stream"),
        (lambda: FaultProxy(upstream=("h", 1)).timeout(rate=2), ValueError, "rate"),
        (lambda: FaultProxy(upstream=("h", 1)).bandwidth(bytes_per_second=0), ValueError, "bytes"),
        (lambda: FaultProxy(upstream=("h", 1)).slicer(size=4, variation=4), ValueError, "less"),
        (lambda: FaultProxy(upstream=("h", 1)).reset_peer(after=-1), ValueError, "after"),
    ],
)
def test_bad_settings_are_refused_naming_the_parameter(
    make: Any, error: type[Exception], match: str
) -> None:
    """Every setting is checked where it is written."""
    with pytest.raises(error, match=match):
        make()


def test_toxics_describe_themselves() -> None:
    """A toxic's repr and settings say what it does; removing it twice is harmless."""
    proxy = FaultProxy(upstream="[::1]:8080")
    assert proxy.upstream == ("::1", 8080)
    toxic = proxy.slicer(size=10, delay=0.01)
    assert dict(toxic.settings) == {"size": 10, "variation": 0, "delay": 0.01}
    assert repr(toxic) == "<Toxic slicer downstream rate=1 size=10, variation=0, delay=0.01>"
    toxic.remove()
    toxic.remove()
    assert "not started" in repr(proxy)


# Raw TCP: the timing of chunks, half-closes, many connections ------------------------


class Upstream:
    """A raw TCP server on 127.0.0.1: each connection runs ``handler(conn)`` in a thread.

    Stopping closes the listener and every connection it accepted.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def three_chunks(conn: socket.socket) -> None:
    """Answer each request with three chunks 50 ms apart, then hang up."""
    conn.recv(100)
    for number in range(3):
        conn.sendall(b"chunk%d;" % number)
        time.sleep(0.05)


def test_a_reply_in_several_chunks_is_one_latency_late_not_several() -> None:
    """Latency counts from each chunk's arrival (Toxiproxy's pipelining), not one after another.

    Three chunks sent 50 ms apart through a 0.5 s latency arrive by about 0.6 s; held
    one after another they took 1 s (the second and third waited for the first).
    """
    with Upstream(three_chunks) as upstream, FaultProxy(upstream=upstream.address) as proxy:
        proxy.latency(delay=0.5)
        with socket.create_connection(proxy.address, timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"go")
            data = read_all(sock)
            took = time.monotonic() - started
    assert data == b"chunk0;chunk1;chunk2;"
    assert 0.48 <= took < 0.85


def test_jitter_never_reorders_the_chunks() -> None:
    """Chunks 5 ms apart with ±90 ms of jitter still arrive whole and in order."""

    def numbered(conn: socket.socket) -> None:
        conn.recv(100)
        for number in range(20):
            conn.sendall(b"%02d," % number)
            time.sleep(0.005)

    expected = b"".join(b"%02d," % number for number in range(20))
    with Upstream(numbered) as upstream, FaultProxy(upstream=upstream.address, random=4) as proxy:
        proxy.latency(delay=0.1, jitter=0.09)
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"go")
            assert read_all(sock) == expected


def test_a_reset_comes_after_the_data_that_arrived_before_it() -> None:
    """Under latency, a reset added mid-answer lets the held chunk through first, then RSTs."""
    reset_added = threading.Event()

    def two_parts(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"first")
        reset_added.wait(5)
        conn.sendall(b"second")
        time.sleep(1.0)

    with Upstream(two_parts) as upstream, FaultProxy(upstream=upstream.address) as proxy:
        proxy.latency(delay=0.4)
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"go")
            time.sleep(0.1)  # "first" is in the proxy, held by the latency
            proxy.reset_peer()
            reset_added.set()
            assert sock.recv(100) == b"first"
            with pytest.raises(ConnectionResetError):
                sock.recv(100)


def test_a_half_closed_client_gets_the_whole_answer() -> None:
    """The client's FIN reaches the server; the server's answer then arrives whole.

    Once both ways have ended the proxy closes only after its buffer has gone out:
    aborting there dropped the tail of the answer while the client saw a clean end.
    Small socket buffers on both sides of the client's connection keep that tail in
    the proxy's own buffer when the server hangs up.
    """
    size = 150_000

    def until_eof_then_answer(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass  # the request ends with the client's half-close
        conn.sendall(b"x" * size)

    with (
        Upstream(until_eof_then_answer) as upstream,
        FaultProxy(upstream=upstream.address) as proxy,
    ):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(proxy.address)
            deadline = time.monotonic() + 5
            while not (links := [link for link in proxy._links if link.client]):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert links[0].client is not None
            links[0].client.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            sock.sendall(b"request")
            sock.shutdown(socket.SHUT_WR)
            time.sleep(0.2)  # the server answers and hangs up while the client is not reading
            got = len(read_all(sock))
        assert got == size
        deadline = time.monotonic() + 5
        while proxy.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.connections == 0


def test_stop_with_many_connections_in_every_state_leaves_nothing_open() -> None:
    """Idle, half-closed, delayed and just-accepted connections: stop() ends every one.

    Each client socket then reads an end (EOF or reset) at once, and so does each of
    the upstream's: no socket is left for the garbage collector to close. (Connections
    accepted just before stop() used to be left open when their task had not run yet;
    three rounds of a burst make that race show.)
    """
    release = threading.Event()
    upstream_ends: list[int] = []

    def hold(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                conn.sendall(b"echo")
        finally:
            upstream_ends.append(1)  # the proxy's side ended (a FIN, or a reset)
        release.wait(10)  # a half-closed client's connection stays open the other way

    clients: list[socket.socket] = []
    with Upstream(hold) as upstream:
        before = len(proxy_threads())
        try:
            for round in range(3):
                proxy = FaultProxy(upstream=upstream.address).start()
                proxy.latency(delay=5.0)
                settled = [socket.create_connection(proxy.address, timeout=5) for _ in range(12)]
                for number, sock in enumerate(settled):
                    if number % 3 == 0:
                        sock.sendall(b"held by the latency")
                    elif number % 3 == 1:
                        sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 5
                while proxy.connections < 12 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert proxy.connections == 12
                # And a burst the proxy has had no time to serve yet.
                burst = [socket.create_connection(proxy.address, timeout=5) for _ in range(20)]
                proxy.stop()
                clients += settled + burst
                assert proxy.connections == 0
                assert len(proxy_threads()) == before
                ended, _, _ = select.select(settled + burst, [], [], 3.0)
                assert len(ended) == 32, f"round {round}: {32 - len(ended)} left open"
            deadline = time.monotonic() + 5
            while len(upstream_ends) < len(upstream.conns) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(upstream_ends) == len(upstream.conns)
        finally:
            release.set()
            for sock in clients:
                sock.close()


def test_a_client_that_resets_mid_answer_ends_the_connection_on_both_sides() -> None:
    """An endless answer, a client that reads a little then resets: the server is cut off too.

    The proxy's writer fails while its reader is still queueing the server's data; both
    stop, the upstream connection closes, and nothing stays open in the proxy.
    """
    upstream_ended = threading.Event()

    def endless(conn: socket.socket) -> None:
        conn.recv(100)
        try:
            while True:
                conn.sendall(b"y" * 65536)
        except OSError:
            upstream_ended.set()

    with Upstream(endless) as upstream, FaultProxy(upstream=upstream.address) as proxy:
        proxy.latency(delay=0.01)  # chunks wait in the proxy's queue, as under any toxic
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(b"go")
        assert sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a TCP RST
        assert upstream_ended.wait(5)
        deadline = time.monotonic() + 5
        while proxy.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.connections == 0
