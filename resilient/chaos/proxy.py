"""A TCP fault proxy for tests: real sockets, Toxiproxy's toxics, changed while it runs.

:class:`FaultProxy` listens on 127.0.0.1 (an ephemeral port by default) and
forwards every connection to an upstream ``host:port``. Toxics added to it act on
the bytes flowing through, as Toxiproxy's do, so a client meets a slow, stalled
or reset network exactly as its sockets would, timeouts and connection pools
included::

    with FaultProxy(upstream=("127.0.0.1", server_port)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/"
        with proxy.latency(delay=0.5, jitter=0.1):   # removed when the block ends
            ...                                      # requests through url are slow
        proxy.reset_peer()                           # now every answer is a TCP RST

The toxics (each a method returning a :class:`Toxic` handle):

* :meth:`~FaultProxy.latency` holds each chunk ``delay`` seconds (± ``jitter``)
  from when it arrived; chunks are pipelined, in order, as Toxiproxy's are, so an
  answer that comes in several chunks is one ``delay`` late, not several;
* :meth:`~FaultProxy.timeout` drops the data and keeps the sockets open (a
  black hole); with ``after``, closes the connection that many seconds later;
* :meth:`~FaultProxy.reset_peer` resets the connection (``SO_LINGER`` 0, so the
  peer reads ``ECONNRESET``), at once or ``after`` seconds;
* :meth:`~FaultProxy.bandwidth` lets ``bytes_per_second`` through;
* :meth:`~FaultProxy.slicer` cuts the data into ``size``-byte slices (±
  ``variation``), ``delay`` seconds apart.

Every toxic acts on one direction, ``stream="downstream"`` (server to client, the
default, as Toxiproxy's) or ``"upstream"``, and on a share ``rate`` of the
connections (Toxiproxy's toxicity; decided once per connection, seeded by the
proxy's ``random=``). Toxics apply in the order added; they act on the next chunk
that flows, so an idle connection is touched only when data moves. ``enabled=``
(``False`` or a callable) lets everything through untouched.

It runs either in its own event loop in a background thread (``with proxy:``, or
``start()`` and ``stop()``), for sync tests, or in the running loop (``async with
proxy:``). Stopping closes the listener and every connection and ends all its
tasks (and its thread); :meth:`~FaultProxy.stop` is for the thread form only. A
connection whose two directions have ended (each half-close passed on) is closed
once what the proxy holds for it has gone out. A reset toxic resets after the data
that arrived before it. Sleeps are real (``asyncio.sleep``): this is a network,
not a test double, and :func:`resilient.testing.record_sleeps` does not touch it.
A proxy that cannot reach its upstream resets the client's connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final

from resilient._config import Duration, check_int, to_seconds
from resilient.chaos._dice import Dice, check_rate

__all__ = ["FaultProxy", "Toxic"]

_STREAMS: Final = ("downstream", "upstream")
_CHUNK: Final = 64 * 1024
# How many chunks a direction holds between reading and writing (each at most _CHUNK
# bytes): enough for a latency toxic to keep a stream moving, bounded so a slow reader
# still pushes back on a fast writer.
_QUEUED: Final = 32
# One piece of the data and the pause before it is written (after the previous piece).
Pieces = list[tuple[float, bytes]]


class _Chunk:
    """One read's worth of data on its way: when it may go out first, and its pieces.

    ``due`` starts as the loop time the data arrived; a latency toxic moves it later.
    The pieces' pauses come after that, one after the other (bandwidth, slicer).
    ``reset``: instead of the data, reset the connection when the chunk is due, so
    what came before it is delivered first.
    """

    __slots__ = ("due", "pieces", "reset")

    def __init__(self, due: float, data: bytes) -> None:
        self.due = due
        self.pieces: Pieces = [(0.0, data)]
        self.reset = False


class Toxic:
    """One toxic in force on a :class:`FaultProxy`: ``kind``, ``stream``, ``rate``, ``settings``.

    :meth:`remove` takes it off (new data flows untouched). As a context manager it
    is removed when the block ends.
    """

    __slots__ = ("_proxy", "_shape", "kind", "rate", "settings", "stream")

    def __init__(
        self,
        proxy: FaultProxy,
        kind: str,
        stream: str,
        rate: float,
        settings: dict[str, Any],
        shape: Callable[[_Link, _Chunk], None],
    ) -> None:
        self._proxy = proxy
        self.kind = kind
        self.stream = stream
        self.rate = rate
        self.settings: Mapping[str, Any] = MappingProxyType(settings)
        self._shape = shape

    def remove(self) -> None:
        """Take this toxic off the proxy; removing it again does nothing."""
        self._proxy._remove(self)

    @property
    def active(self) -> bool:
        """Whether the toxic is still in force."""
        return self in self._proxy.toxics

    def __enter__(self) -> Toxic:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in self.settings.items())
        return f"<Toxic {self.kind} {self.stream} rate={self.rate:g} {settings}>"


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drop the connection now, unless it is already closing with nothing left to send."""
    transport = writer.transport
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


class _Link:
    """One proxied connection: the client's socket, the two writers, timers, toxics' draws."""

    __slots__ = ("client", "decided", "sock", "timers", "upstream")

    def __init__(self, sock: socket.socket) -> None:
        # The accepted socket, closed by the proxy if no transport ever takes it over.
        self.sock = sock
        self.client: asyncio.StreamWriter | None = None
        self.upstream: asyncio.StreamWriter | None = None
        self.decided: dict[Toxic, bool] = {}
        self.timers: dict[Toxic, asyncio.TimerHandle] = {}

    def writers(self) -> list[asyncio.StreamWriter]:
        return [writer for writer in (self.client, self.upstream) if writer is not None]

    def close(self) -> None:
        """End the connection politely (FIN on both sides, after what is buffered)."""
        for writer in self.writers():
            writer.close()

    async def finish(self) -> None:
        """Close politely and wait until what was written has gone out."""
        self.close()
        for writer in self.writers():
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def reset(self) -> None:
        """End the connection with a TCP RST on both sides: linger on, timeout zero."""
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _abort(writer)

    def later(self, toxic: Toxic, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` in ``seconds``, once per toxic, if the toxic is still in force."""
        if toxic in self.timers:
            return

        def fire() -> None:
            if toxic.active:
                action()

        self.timers[toxic] = asyncio.get_running_loop().call_later(seconds, fire)

    def end(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        for writer in self.writers():
            _abort(writer)


def _parse_upstream(upstream: object) -> tuple[str, int]:
    if isinstance(upstream, str):
        host, colon, port = upstream.rpartition(":")
        if colon and host and port.isdigit():
            upstream = (host.strip("[]"), int(port))
    if (
        isinstance(upstream, tuple)
        and len(upstream) == 2
        and isinstance(upstream[0], str)
        and upstream[0]
        and isinstance(upstream[1], int)
        and not isinstance(upstream[1], bool)
        and 0 < upstream[1] < 65536
    ):
        return upstream[0], upstream[1]
    raise ValueError(
        f"upstream must be (host, port) or 'host:port' with a port from 1 to 65535, "
        f"got {upstream!r}"
    )


def _check_stream(stream: object) -> str:
    if stream not in _STREAMS:
        raise ValueError(f"stream must be 'downstream' or 'upstream', got {stream!r}")
    return str(stream)


class FaultProxy:
    """A TCP proxy from 127.0.0.1 to ``upstream`` that toxics can slow, stall or break.

    * ``upstream``: ``(host, port)`` or ``"host:port"``, where connections go.
    * ``host``, ``port``: where it listens (default 127.0.0.1, an ephemeral port;
      read the port from :attr:`port` once started).
    * ``enabled``: ``True``, ``False`` or a zero-argument callable, read per chunk.
    * ``random``: a ``random.Random`` or an ``int`` seed for toxicity, jitter, slices.

    See the module docstring for the toxics and the two ways to run it.
    """

    def __init__(
        self,
        *,
        upstream: tuple[str, int] | str,
        host: str = "127.0.0.1",
        port: int = 0,
        enabled: bool | Callable[[], bool] = True,
        random: Any = None,
    ) -> None:
        self.upstream = _parse_upstream(upstream)
        if not isinstance(host, str) or not host:
            raise TypeError(f"host must be a host name or address, got {host!r}")
        self.host = host
        self._listen_port = check_int("port", port, minimum=0)
        if self._listen_port > 65535:
            raise ValueError(f"port must be at most 65535, got {port!r}")
        self._dice = Dice(enabled=enabled, random=random)
        self._lock = threading.Lock()
        self._toxics: tuple[Toxic, ...] = ()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0
        #: How many connections the proxy has accepted so far.
        self.accepted = 0

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port else "not started"
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        return f"<FaultProxy {where} -> {upstream} toxics={list(self._toxics)!r}>"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the proxy listens on (port 0 until it is started)."""
        return self.host, self.port

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        return len(self._links)

    # Toxics ----------------------------------------------------------------------------

    @property
    def toxics(self) -> tuple[Toxic, ...]:
        """The toxics in force, in the order they apply."""
        return self._toxics

    def latency(
        self,
        *,
        delay: Duration,
        jitter: Duration = 0.0,
        stream: str = "downstream",
        rate: float = 1.0,
    ) -> Toxic:
        """Hold each chunk ``delay`` seconds (± up to ``jitter``, never below 0) from its arrival.

        Chunks keep their order: one whose jitter would let it overtake the one
        before goes out right after it.
        """
        seconds = to_seconds("delay", delay, allow_zero=False)
        spread = to_seconds("jitter", jitter)
        dice = self._dice

        def shape(link: _Link, chunk: _Chunk) -> None:
            wait = seconds + (dice.uniform(-spread, spread) if spread else 0.0)
            chunk.due += max(wait, 0.0)

        return self._add("latency", stream, rate, {"delay": seconds, "jitter": spread}, shape)

    def timeout(
        self, *, after: Duration | None = None, stream: str = "downstream", rate: float = 1.0
    ) -> Toxic:
        """Drop the data and keep the sockets open; with ``after``, close the connection then.

        ``after`` counts from the first chunk the toxic dropped on that connection.
        Data sent while it is in force is lost, not delivered when it is removed.
        """
        seconds = None if after is None else to_seconds("after", after)

        def shape(link: _Link, chunk: _Chunk) -> None:
            if seconds is not None:
                link.later(toxic, seconds, link.close)
            chunk.pieces = []

        toxic = self._add("timeout", stream, rate, {"after": seconds}, shape)
        return toxic

    def blackhole(self, *, stream: str = "downstream", rate: float = 1.0) -> Toxic:
        """:meth:`timeout` without ``after``: data vanishes and nothing ever closes."""
        return self.timeout(stream=stream, rate=rate)

    def reset_peer(
        self, *, after: Duration = 0.0, stream: str = "downstream", rate: float = 1.0
    ) -> Toxic:
        """Reset the connection (TCP RST) when data flows; with ``after``, that much later.

        Until the reset, data flows untouched.
        """
        seconds = to_seconds("after", after)

        def shape(link: _Link, chunk: _Chunk) -> None:
            if seconds == 0.0:
                chunk.pieces, chunk.reset = [], True
            else:
                link.later(toxic, seconds, link.reset)

        toxic = self._add("reset_peer", stream, rate, {"after": seconds}, shape)
        return toxic

    def bandwidth(
        self, *, bytes_per_second: int, stream: str = "downstream", rate: float = 1.0
    ) -> Toxic:
        """Let at most ``bytes_per_second`` through, in slices of 1/20 s."""
        per_second = check_int("bytes_per_second", bytes_per_second, minimum=1)
        step = max(1, per_second // 20)

        def shape(link: _Link, chunk: _Chunk) -> None:
            shaped: Pieces = []
            for pause, data in chunk.pieces:
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    shaped.append((pause + len(piece) / per_second, piece))
                    pause = 0.0
            chunk.pieces = shaped

        return self._add("bandwidth", stream, rate, {"bytes_per_second": per_second}, shape)

    def slicer(
        self,
        *,
        size: int,
        variation: int = 0,
        delay: Duration = 0.0,
        stream: str = "downstream",
        rate: float = 1.0,
    ) -> Toxic:
        """Cut the data into slices of ``size`` bytes (± ``variation``), ``delay`` s apart."""
        average = check_int("size", size, minimum=1)
        spread = check_int("variation", variation, minimum=0)
        if spread >= average:
            raise ValueError(
                f"variation must be less than size (a slice has at least one byte), got "
                f"size={size!r}, variation={variation!r}"
            )
        gap = to_seconds("delay", delay)
        dice = self._dice

        def shape(link: _Link, chunk: _Chunk) -> None:
            shaped: Pieces = []
            for pause, data in chunk.pieces:
                start = 0
                while start < len(data):
                    length = average
                    if spread:
                        length = round(dice.uniform(average - spread, average + spread))
                    shaped.append((pause if start == 0 else gap, data[start : start + length]))
                    start += length
            chunk.pieces = shaped

        settings = {"size": average, "variation": spread, "delay": gap}
        return self._add("slicer", stream, rate, settings, shape)

    def clear(self) -> None:
        """Take every toxic off: data flows untouched again."""
        with self._lock:
            self._toxics = ()

    def _add(
        self,
        kind: str,
        stream: str,
        rate: float,
        settings: dict[str, Any],
        shape: Callable[[_Link, _Chunk], None],
    ) -> Toxic:
        toxic = Toxic(self, kind, _check_stream(stream), check_rate("rate", rate), settings, shape)
        with self._lock:
            self._toxics = (*self._toxics, toxic)
        return toxic

    def _remove(self, toxic: Toxic) -> None:
        with self._lock:
            self._toxics = tuple(other for other in self._toxics if other is not toxic)

    # Forwarding ------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is waiting (the listener is readable); each socket is ours at once."""
        loop = asyncio.get_running_loop()
        for _ in range(64):  # a burst at a time, so the open connections are served too
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            sock.setblocking(False)
            # Known at once, so stopping closes it even if its task never gets to run.
            link = _Link(sock)
            self._links.add(link)
            self.accepted += 1
            task = loop.create_task(self._serve(link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: _Link) -> None:
        pipes: list[asyncio.Task[None]] = []
        try:
            with contextlib.suppress(OSError):
                link.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                reader, link.client = await asyncio.open_connection(sock=link.sock)
            except OSError:  # pragma: no cover - the client's socket broke at once
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                link.reset()  # as a refused connection looks from the client's side
                return
            link.upstream = upstream_writer
            loop = asyncio.get_running_loop()
            for source, sink, stream in (
                (reader, upstream_writer, "upstream"),
                (upstream_reader, link.client, "downstream"),
            ):
                # Reading and writing apart, so a held chunk does not hold the next one's read.
                queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(_QUEUED)
                pipes.append(loop.create_task(self._read(link, source, queue, stream)))
                pipes.append(loop.create_task(self._write(link, queue, sink)))
            await asyncio.gather(*pipes)
            await link.finish()  # both ways ended: deliver what is buffered, then close
        finally:
            for pipe in pipes:
                pipe.cancel()
            if pipes:
                await asyncio.gather(*pipes, return_exceptions=True)
            link.end()
            if link.client is None:
                link.sock.close()
            self._links.discard(link)

    async def _read(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[_Chunk | None],
        stream: str,
    ) -> None:
        """Read one direction, apply its toxics as each chunk arrives, queue it; ``None`` last."""
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(_CHUNK):
                chunk = _Chunk(loop.time(), data)
                if self._toxics and self._dice.on():
                    for toxic in self._toxics:
                        if toxic.stream == stream and self._hits(link, toxic):
                            toxic._shape(link, chunk)
                            if not chunk.pieces:
                                break
                if chunk.pieces or chunk.reset:
                    await queue.put(chunk)
        except OSError:
            link.reset()  # one side broke: the other learns it the same way
        await queue.put(None)

    async def _write(
        self, link: _Link, queue: asyncio.Queue[_Chunk | None], writer: asyncio.StreamWriter
    ) -> None:
        """Write each queued chunk when it is due; at the end, pass the half-close on."""
        loop = asyncio.get_running_loop()
        chunk: _Chunk | None = None
        try:
            while (chunk := await queue.get()) is not None:
                if (wait := chunk.due - loop.time()) > 0.0:
                    await asyncio.sleep(wait)
                if chunk.reset:
                    break
                for pause, piece in chunk.pieces:
                    if pause > 0.0:
                        await asyncio.sleep(pause)
                    writer.write(piece)
                    await writer.drain()
        except OSError:
            pass  # this side broke: reset below, so the other learns it the same way
        else:
            if chunk is None:  # the reader is done
                try:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()  # half-close: the other direction goes on
                except OSError:
                    link.reset()
                return
        link.reset()
        while await queue.get() is not None:  # let the reader finish (the reset ends it)
            pass

    def _hits(self, link: _Link, toxic: Toxic) -> bool:
        decided = link.decided.get(toxic)
        if decided is None:
            decided = link.decided[toxic] = toxic.rate == 1.0 or self._dice.hit(toxic.rate)
        return decided

    # Running ---------------------------------------------------------------------------

    async def _open(self) -> None:
        if self._listener is not None:
            raise RuntimeError("this FaultProxy is already running; stop it first")
        loop = asyncio.get_running_loop()
        listener: socket.socket | None = None
        try:
            found = await loop.getaddrinfo(
                self.host, self._listen_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = found[0]
            # Accepting on our own (not asyncio.start_server, nor sock_accept): a connection
            # is ours from the moment it is accepted, so stopping can close every one.
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
            listener.setblocking(False)
        except OSError as error:
            if listener is not None:
                listener.close()
            reason = (error.strerror or str(error)).lower()
            raise OSError(
                error.errno,
                f"FaultProxy cannot listen on {self.host}:{self._listen_port}: {reason} "
                "(check host=; give another port=, or port=0 for a free one)",
            ) from error
        loop.add_reader(listener.fileno(), self._accept, listener)
        self._listener = listener
        self._loop = loop
        self.port = listener.getsockname()[1]

    async def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        asyncio.get_running_loop().remove_reader(listener.fileno())
        listener.close()  # connections not yet accepted are reset by the kernel
        for link in list(self._links):
            link.end()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links:  # accepted, but their task never ran
            link.sock.close()
        self._links.clear()
        self._loop = None

    async def __aenter__(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("this FaultProxy is already running; stop it first")
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    def start(self) -> FaultProxy:
        """Run the proxy in an event loop of its own, in a background thread; return it."""
        if self._listener is not None or self._thread is not None:
            raise RuntimeError("this FaultProxy is already running; stop it first")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=asyncio.run, args=(self._main(ready),), name="resilient-fault-proxy", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            ready.result(timeout=10)
        except BaseException:
            thread.join(10)
            self._thread = None
            raise
        return self

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._stopping = asyncio.Event()
        try:
            await self._open()
        except BaseException as error:
            ready.set_exception(error)
            return
        ready.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            await self._close()

    def stop(self) -> None:
        """Stop a proxy started with :meth:`start`: close every socket, end its thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            if self._listener is not None:
                raise RuntimeError(
                    "this FaultProxy runs in your event loop (async with), not in a thread of "
                    "its own: it stops when the async with block ends"
                )
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        self._thread = None
        self._stopping = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
