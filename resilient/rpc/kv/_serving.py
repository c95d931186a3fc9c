"""Serve an ASGI app the way a KV node process does: ready line, clean stop on signals.

:func:`bind` opens the listening socket first (so ``port=0`` has a real port to
name), and :func:`serve` runs uvicorn on it until SIGTERM or SIGINT. uvicorn on
its own re-raises the stop signal once it has shut down, so a process it serves
dies of the signal (status -15) before code after it runs; :func:`serve` returns
instead, so the caller closes what it holds (the node's log) and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

__all__ = ["bind", "serve", "url_of"]


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus re-raising the stop signal after shutdown (that would exit non-zero)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        else:
            self.should_exit = True


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``0``: a free port), not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it an answer's two writes meet Nagle and delayed ACKs (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """The ``http://host:port`` URL of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(asgi_app: Any, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve ``asgi_app`` on ``sock`` until SIGTERM or SIGINT, then return.

    Prints ``ready <url>`` on stdout (flushed) once uvicorn is listening. Requests
    in flight get up to 5 s to finish; a second SIGINT stops waiting for them.
    Signals are handled only when called from the main thread (uvicorn's rule).
    """
    config = uvicorn.Config(
        asgi_app,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    asyncio.run(_serve(_Uvicorn(config), sock, url_of(sock)))


async def _serve(server: uvicorn.Server, sock: socket.socket, url: str) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await serving  # raises what stopped it, or returns (stopped before listening)
            return
        await asyncio.sleep(0.005)
    print(f"ready {url}", flush=True)
    await serving
