"""AsyncResilientTransport(hedge=...): slow idempotent requests get a second attempt, live."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from resilient import AsyncResilientTransport, Hedge, HedgeBudget, ResilientTransport
from tests.live_server import LiveServer, Reply


def hedging(**settings: object) -> AsyncResilientTransport:
    hedge = Hedge(delay=settings.pop("delay", 0.05), budget=None, **settings)  # type: ignore[arg-type]
    return AsyncResilientTransport(hedge=hedge)


async def test_a_slow_get_is_hedged_and_the_fast_answer_wins(server: LiveServer) -> None:
    """The first GET hangs; the hedge sent after the delay answers, long before it would."""
    server.plan("/", Reply(delay=3.0, body=b"slow"), Reply(body=b"fast"))
    began = time.monotonic()
    async with httpx.AsyncClient(transport=hedging()) as client:
        response = await client.get(server.url("/"))
    assert response.text == "fast"
    assert time.monotonic() - began < 2.0
    assert [seen.method for seen in server.seen] == ["GET", "GET"]
    assert response.extensions["resilient"]["attempts"] == 2  # the report counts the hedge


async def test_each_hedge_keeps_the_callers_timeouts_and_the_deadline(server: LiveServer) -> None:
    """A hedge sent later is clamped to what the deadline leaves, from the caller's timeouts."""
    server.plan("/", Reply(delay=3.0), Reply(delay=3.0), Reply(delay=3.0))
    transport = AsyncResilientTransport(
        hedge=Hedge(delay=0.05, max_attempts=3, budget=None), timeout=0.5
    )
    began = time.monotonic()
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0)) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.get(server.url("/"))
    assert time.monotonic() - began < 2.0
    assert len(server.seen) == 3


async def test_a_post_is_never_hedged(server: LiveServer) -> None:
    """A non-idempotent request waits for its one attempt, however slow."""
    server.plan("/", Reply(delay=0.3, body=b"created"), Reply(body=b"twice"))
    async with httpx.AsyncClient(transport=hedging(delay=0.01)) as client:
        response = await client.post(server.url("/"), content=b"order")
    assert response.text == "created"
    assert len(server.seen) == 1


async def test_a_retryable_status_starts_the_next_hedge_at_once(server: LiveServer) -> None:
    """A 503 without Retry-After is a failed attempt: the next starts without the delay."""
    server.plan("/", Reply(503, body=b"busy"), Reply(body=b"ok"))
    began = time.monotonic()
    async with httpx.AsyncClient(transport=hedging(delay=30.0)) as client:
        response = await client.get(server.url("/"))
    assert response.text == "ok"
    assert time.monotonic() - began < 5.0


async def test_a_response_asking_to_wait_is_returned_not_hedged(server: LiveServer) -> None:
    """Retry-After asks the client to wait; hedging at once would ignore it."""
    server.plan("/", Reply(429, headers={"Retry-After": "5"}, body=b"slow down"), Reply())
    async with httpx.AsyncClient(transport=hedging(delay=30.0)) as client:
        response = await client.get(server.url("/"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    assert len(server.seen) == 1


async def test_when_every_hedge_fails_the_caller_gets_the_last_response(server: LiveServer) -> None:
    """All attempts answering 503: the last 503 comes back, its body readable."""
    server.plan("/", Reply(503, body=b"first"), Reply(503, body=b"second"))
    async with httpx.AsyncClient(transport=hedging(delay=30.0)) as client:
        response = await client.get(server.url("/"))
    assert response.status_code == 503
    assert response.text == "second"


async def test_losing_attempts_give_their_connections_back(server: LiveServer) -> None:
    """With one pooled connection, hedges that lose must free it, or the next request hangs."""
    server.plan("/", *[Reply(503, body=b"x" * 1000), Reply(body=b"ok")] * 5)
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    transport = AsyncResilientTransport(inner, hedge=Hedge(delay=30.0, budget=None))
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(5.0, pool=1.0)
    ) as client:
        for _ in range(5):
            response = await client.get(server.url("/"))
            assert response.text == "ok"
    assert len({seen.peer for seen in server.seen}) == 1  # one connection, reused each time


async def test_each_origin_has_its_own_hedge_budget(server: LiveServer) -> None:
    """An origin whose hedges drained its budget does not stop another origin's."""
    slow = Reply(delay=0.3)
    server.plan("/", slow, Reply(), slow, slow, Reply())
    transport = AsyncResilientTransport(hedge=Hedge(delay=0.01, budget=HedgeBudget(max_tokens=1.5)))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(server.url("/"))  # hedged: the origin's budget is down to 0.6 of 1.5
        await client.get(server.url("/"))  # not hedged
        assert len(server.seen) == 3
        other = server.url("/").replace("127.0.0.1", "localhost")
        await client.get(other)  # a fresh budget for the new origin: hedged
    assert len(server.seen) == 5


def test_the_sync_transport_refuses_to_hedge() -> None:
    """A sync attempt cannot be cancelled, so ResilientTransport says it cannot hedge."""
    with pytest.raises(TypeError, match="cannot hedge"):
        ResilientTransport(hedge=Hedge())
    with pytest.raises(TypeError, match=r"hedge must be a resilient\.Hedge"):
        AsyncResilientTransport(hedge=0.05)  # type: ignore[arg-type]


def test_a_hedge_with_its_own_discard_is_refused_not_ignored() -> None:
    """The transport releases losing responses itself: a discard= it would not call is an error."""

    async def discard(left: object) -> None:
        return None

    with pytest.raises(ValueError, match="without discard"):
        AsyncResilientTransport(hedge=Hedge(discard=discard))


async def test_a_failing_response_left_while_the_hedge_runs_gives_its_connection_back(
    server: LiveServer,
) -> None:
    """The first GET answers 503 while the hedge (the last allowed) is in flight; the hedge wins.

    The 503 is nobody's answer: its connection must go back to the pool, or the pool of two
    serves one request at a time from then on.
    """
    server.plan("/", Reply(503, delay=0.3, body=b"x" * 1000), Reply(delay=0.6, body=b"won"))
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2))
    # No retries: a wait for a free connection that timed out is the caller's to see.
    transport = AsyncResilientTransport(inner, hedge=Hedge(delay=0.05, budget=None), retry=None)
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(5.0, pool=0.5)
    ) as client:
        assert (await client.get(server.url("/"))).text == "won"
        # Each held longer than the pool's wait: the two need both connections at once.
        server.plan("/", Reply(delay=1.5), Reply(delay=1.5))
        slow = [client.build_request("POST", server.url("/")) for _ in range(2)]  # not hedged
        both = await asyncio.gather(*(client.send(request) for request in slow))
    assert [response.status_code for response in both] == [200, 200]
