"""ChaosTransport / AsyncChaosTransport: network and server failures injected under httpx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from live_server import LiveServer

import resilient
from resilient.chaos import AsyncChaosTransport, ChaosTransport
from resilient.testing import record_sleeps


def counting() -> tuple[list[httpx.Request], httpx.MockTransport]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="real")

    return seen, httpx.MockTransport(answer)


def no_wait_retry(attempts: int = 3) -> resilient.Retry:
    return resilient.Retry(attempts=attempts, backoff=resilient.Backoff(initial=0.0, jitter="none"))


async def test_the_resilient_transport_retries_an_injected_503_after_its_retry_after(
    server: LiveServer,
) -> None:
    """A 503 with Retry-After: 2 from the chaos transport is retried after 2 s, then succeeds."""
    # Seed 1's draws: 0.134 (< 0.5: a 503), then 0.847 (no fault).
    chaos = AsyncChaosTransport(status_rate=0.5, status=503, retry_after=2, random=1)
    transport = resilient.AsyncResilientTransport(chaos, retry=no_wait_retry())
    with record_sleeps() as waits:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(server.url("/"))
    assert response.status_code == 200
    assert response.text == "ok"
    assert response.extensions["resilient"]["attempts"] == 2
    assert waits == [2.0]
    assert chaos.injected["status"] == 1
    assert len(server.seen) == 1  # the injected answer never reached the server


def test_an_injected_connect_error_is_retried_even_for_a_post() -> None:
    """ConnectError means nothing was sent, so the resilient transport retries any method."""
    seen, inner = counting()
    chaos = ChaosTransport(inner, connect_error_rate=0.5, random=1)
    transport = resilient.ResilientTransport(chaos, retry=no_wait_retry())
    with httpx.Client(transport=transport) as client:
        response = client.post("http://svc.test/orders", content=b"{}")
    assert response.text == "real"
    assert len(seen) == 1
    assert chaos.injected["connect_error"] == 1


def test_an_injected_read_timeout_sends_the_request_and_is_not_retried_for_a_post() -> None:
    """The server saw the request, so a POST is not retried; the caller gets ReadTimeout."""
    seen, inner = counting()
    chaos = ChaosTransport(inner, read_timeout_rate=1.0)
    transport = resilient.ResilientTransport(chaos, retry=no_wait_retry())
    with httpx.Client(transport=transport) as client:
        with pytest.raises(httpx.ReadTimeout, match="did not come in time"):
            client.post("http://svc.test/orders", content=b"{}")
        assert len(seen) == 1
        with pytest.raises(httpx.ReadTimeout):
            client.get("http://svc.test/orders")  # an idempotent GET is retried, 3 times
    assert len(seen) == 4
    assert chaos.injected["read_timeout"] == 4


async def test_async_read_timeouts_and_connect_errors() -> None:
    """The async twin injects the same failures."""
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    inner = httpx.MockTransport(answer)
    async with httpx.AsyncClient(transport=AsyncChaosTransport(inner, read_timeout_rate=1.0)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get("http://svc.test/")
    async with httpx.AsyncClient(transport=AsyncChaosTransport(inner, connect_error_rate=1.0)) as c:
        with pytest.raises(httpx.ConnectError, match="injected"):
            await c.get("http://svc.test/")
    assert len(seen) == 1


def test_latency_waits_then_sends() -> None:
    """Injected latency is a recorded wait before the request goes to the inner transport."""
    _, inner = counting()
    chaos = ChaosTransport(inner, latency_rate=1.0, delay=0.3)
    with record_sleeps() as waits, httpx.Client(transport=chaos, timeout=None) as client:
        assert client.get("http://svc.test/").text == "real"
    assert waits == [0.3]
    assert chaos.injected["latency"] == 1


def test_latency_past_the_read_timeout_times_out_at_it() -> None:
    """A delay longer than the request's read timeout waits that long and raises ReadTimeout."""
    seen, inner = counting()
    chaos = ChaosTransport(inner, latency_rate=1.0, delay=5.0)
    expected = pytest.raises(httpx.ReadTimeout, match="latency ran past")
    with record_sleeps() as waits, httpx.Client(transport=chaos, timeout=0.5) as client, expected:
        client.get("http://svc.test/")
    assert waits == [0.5]
    assert seen == []


async def test_the_resilient_transports_attempt_timeout_bounds_injected_latency() -> None:
    """The attempt's budget clamps the read timeout, so injected latency ends at it; retried."""
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    # Seed 9 draws 0.463, 0.373 (latency), 0.139, 0.867 (none): only the first is slow.
    chaos = AsyncChaosTransport(httpx.MockTransport(answer), latency_rate=0.5, delay=30.0, random=9)
    transport = resilient.AsyncResilientTransport(
        chaos, retry=no_wait_retry(), attempt_timeout=0.05
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://svc.test/")
    assert response.status_code == 200
    assert response.extensions["resilient"]["attempts"] == 2
    assert len(seen) == 1


def test_latency_is_bounded_by_the_deadline_in_force() -> None:
    """With no read timeout, the deadline bounds the wait."""
    _, inner = counting()
    chaos = ChaosTransport(inner, latency_rate=1.0, delay=5.0)
    client = httpx.Client(transport=chaos, timeout=None)
    expected = pytest.raises(httpx.ReadTimeout)
    with record_sleeps() as waits, client, resilient.deadline(1.0), expected:
        client.get("http://svc.test/")
    assert 0.5 < waits[0] <= 1.0


def test_a_seed_reproduces_the_same_failures_and_enabled_turns_them_off() -> None:
    """Same seed, same statuses; enabled=False (or a callable saying so) passes everything."""

    def statuses(**settings: Any) -> list[int]:
        _, inner = counting()
        with httpx.Client(transport=ChaosTransport(inner, status_rate=0.4, **settings)) as c:
            return [c.get("http://svc.test/").status_code for _ in range(30)]

    assert statuses(random=9) == statuses(random=9)
    assert 503 in statuses(random=9)
    assert set(statuses(enabled=False)) == {200}
    assert set(statuses(enabled=lambda: False)) == {200}


def test_a_429_carries_retry_after_and_counts_add_up() -> None:
    """status=429 with retry_after: the header is there; injected counts each kind."""
    _, inner = counting()
    chaos = ChaosTransport(inner, status_rate=1.0, status=429, retry_after=0)
    with httpx.Client(transport=chaos) as client:
        response = client.get("http://svc.test/")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0"
    assert dict(chaos.injected) == {
        "connect_error": 0,
        "read_timeout": 0,
        "status": 1,
        "latency": 0,
    }
    assert repr(chaos) == "ChaosTransport(status_rate=1.0, status=429, retry_after=0)"


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"connect_error_rate": 0.6, "status_rate": 0.6}, ValueError, "at most 1"),
        ({"status_rate": 2}, ValueError, "status_rate must be a probability"),
        ({"status_rate": 0.1, "status": 200}, ValueError, "status must be at least 400"),
        ({"status_rate": 0.1, "status": 600}, ValueError, "4xx or 5xx"),
        ({"retry_after": 1}, ValueError, "give status_rate too"),
        ({"status": 429}, ValueError, "status=429 is answered only to a share status_rate"),
        ({"status_rate": 0.1, "retry_after": 1.5}, TypeError, "retry_after must be an int"),
        ({"latency_rate": 0.1}, ValueError, "needs delay"),
        ({"delay": 0.1}, ValueError, "give latency_rate too"),
        ({"latency_rate": 0.1, "delay": -1}, ValueError, "delay must not be negative"),
        ({"random": "seed"}, TypeError, "random must be"),
    ],
)
def test_bad_settings_are_refused_naming_the_parameter(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Every setting is checked at construction, with a message naming it."""
    with pytest.raises(error, match=match):
        ChaosTransport(httpx.MockTransport(lambda r: httpx.Response(200)), **settings)


def test_the_inner_transport_must_match_and_is_closed_with_it() -> None:
    """A sync chaos transport refuses an async inner one; close() closes the inner one."""
    with pytest.raises(TypeError, match=r"httpx\.BaseTransport"):
        ChaosTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
    closed: list[str] = []

    class Inner(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(200)

        def close(self) -> None:
            closed.append("closed")

    ChaosTransport(Inner()).close()
    assert closed == ["closed"]
    assert isinstance(ChaosTransport()._transport, httpx.HTTPTransport)
    assert isinstance(AsyncChaosTransport()._transport, httpx.AsyncHTTPTransport)


async def test_async_close_closes_the_inner_transport() -> None:
    """aclose() is forwarded."""
    closed: list[str] = []

    class Inner(httpx.AsyncBaseTransport):
        async def aclose(self) -> None:
            closed.append("closed")

    await AsyncChaosTransport(Inner()).aclose()
    assert closed == ["closed"]


def test_the_transport_module_is_loaded_lazily_and_names_are_exported() -> None:
    """resilient.chaos exposes the transports by name; an unknown name is an AttributeError."""
    import resilient.chaos as chaos

    assert chaos.ChaosTransport is ChaosTransport
    assert "AsyncChaosTransport" in chaos.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = chaos.Nope
