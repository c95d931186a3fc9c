"""A real uvicorn server for an ASGI app, on 127.0.0.1 and an ephemeral port, always stopped.

::

    with serve(app) as url:          # "http://127.0.0.1:PORT"
        httpx.post(url + "/", json=...)

or the pytest fixture ``live_asgi`` (a function: ``url = live_asgi(app)``, stopped
after the test). uvicorn runs in a thread with its own event loop, so the test's
own loop (pytest-asyncio) stays free to be the client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn until the block ends; yields the base URL (no trailing /).

    ``config`` goes to :class:`uvicorn.Config` (``lifespan``, ``http``, ...).
    """
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it the two writes of each answer meet Nagle and delayed ACKs (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 2,
        **config,
    }
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as error:  # pragma: no cover - reported to the test below
            failure.append(error)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        while not server.started:
            if failure or not thread.is_alive():
                raise RuntimeError(f"uvicorn did not start: {failure!r}")
            if time.monotonic() - started > 10:  # pragma: no cover - a broken environment
                raise RuntimeError("uvicorn did not start within 10 s")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def live_asgi() -> Iterator[Callable[..., str]]:
    """``live_asgi(app, **config)`` serves ``app`` for the rest of the test; returns its URL."""
    with contextlib.ExitStack() as stack:

        def start(app: Any, **config: Any) -> str:
            return stack.enter_context(serve(app, **config))

        yield start
