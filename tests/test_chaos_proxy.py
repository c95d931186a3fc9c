"""FaultProxy: a real TCP proxy whose toxics slow, stall and reset real connections."""

from __future__ import annotations

import asyncio
import socket
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
    """start() raises the bind error instead of a proxy that does not listen."""
    taken = FaultProxy(upstream=proxy.upstream, port=proxy.port)
    with pytest.raises(OSError, match="address already in use"):
        taken.start()
    assert taken._thread is None


async def test_the_async_form_runs_in_the_current_loop(server: LiveServer) -> None:
    """async with: the proxy serves from the test's own loop; the toxic applies there too."""
    async with FaultProxy(upstream=("127.0.0.1", server.port)) as proxy:
        with pytest.raises(RuntimeError, match="already running"):
            await proxy.__aenter__()
        async with httpx.AsyncClient() as client:
            proxy.latency(delay=0.2)
            started = time.monotonic()
            assert (await client.get(url(proxy))).text == "ok"
            assert time.monotonic() - started >= 0.15
    assert proxy.connections == 0
    assert not [task for task in asyncio.all_tasks() if "_serve" in repr(task)]


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
