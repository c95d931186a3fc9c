"""A real HTTP/1.1 server on 127.0.0.1 for the integration tests, started and stopped per test.

It answers each path from a script of planned replies and keeps every request it saw.
A reply can stream a long body: its first part at once, the rest only once the test
sets an event, or a piece at a time.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One planned answer: status, headers, body, and an optional delay before answering.

    ``more`` bytes of body follow ``body`` (announced in ``Content-Length``, or sent
    ``chunked``): once ``hold`` is set (at once without one), ``piece`` bytes at a
    time, ``interval`` seconds apart. The server stops sending when the client hangs up.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0
    more: int = 0
    hold: threading.Event | None = None
    piece: int = 64 * 1024
    interval: float = 0.0
    chunked: bool = False


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]


class _Server(ThreadingHTTPServer):
    live: LiveServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-answer (the deadline tests) are expected: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection pooling really happens
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.live.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.live.track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _answer(self) -> None:
        seen = Seen(
            method=self.command,
            path=self.path,
            headers={key.lower(): value for key, value in self.headers.items()},
            body=self._read_body(),
            peer=self.client_address,
        )
        reply = self.server.live.next_reply(seen)
        if reply.delay:
            self.server.live.release.wait(reply.delay)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(reply.body) + reply.more))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            self._send_body(reply)
        except OSError:
            self.close_connection = True  # the client hung up mid-body: expected here

    def _send_body(self, reply: Reply) -> None:
        self._write(reply.body, reply.chunked)
        self.wfile.flush()
        live = self.server.live
        while reply.hold is not None and not reply.hold.is_set() and not live.release.is_set():
            reply.hold.wait(0.05)  # until the test lets the rest go, or the server stops
        left = reply.more
        filler = b"z" * reply.piece
        while left > 0:
            if reply.interval:
                live.release.wait(reply.interval)
            self._write(filler[:left], reply.chunked)
            self.wfile.flush()
            left -= len(filler)
        if reply.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write(self, data: bytes, chunked: bool) -> None:
        if not chunked:
            self.wfile.write(data)
        elif data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer


class LiveServer:
    """A real server on 127.0.0.1 that answers each path from a script of planned replies.

    ``stop()`` also drops every open keep-alive connection, so the host is really gone;
    ``start()`` again binds the same port.
    """

    def __init__(self) -> None:
        self.port = 0
        self.plans: defaultdict[str, deque[Reply]] = defaultdict(deque)
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self.plans[path].extend(replies)

    def next_reply(self, seen: Seen) -> Reply:
        with self._lock:
            self.seen.append(seen)
            plan = self.plans[seen.path]
            return plan.popleft() if plan else Reply()

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def start(self) -> None:
        self.release.clear()
        for _ in range(50):
            try:
                server = _Server(("127.0.0.1", self.port), _Handler)
                break
            except OSError:  # the old socket may linger a moment after stop()
                if self.port == 0:
                    raise
                time.sleep(0.02)
        else:  # pragma: no cover - the port was taken by someone else
            raise RuntimeError(f"could not bind 127.0.0.1:{self.port} again")
        server.live = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join(5)
        self._server = None
