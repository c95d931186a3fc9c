"""The KV node's append-only log: one checksummed JSON line per accepted write.

The file is ``DIR/kv.log``. Each line is ``CRC SP JSON LF``: ``CRC`` is the CRC-32
of the JSON bytes as 8 lowercase hex digits; the JSON is ``{"key", "value",
"version", "timestamp", "deleted"}`` (a sibling's wire form plus its key). The
first line is a header, ``{"format": "resilient.kv.log", "version": 1}``. JSON
escapes newlines inside strings, so a record never contains a raw LF.

Durability: each record is written with one ``write(2)`` and, when ``fsync`` is on
(the default), made durable with ``fdatasync`` (``fsync`` where that is missing)
before the write is acknowledged. With it off a write survives the process being
killed (it is in the kernel's page cache) but not a power loss.

Replay reads the lines in order. Only writes that were never acknowledged can be
incomplete, and they are all at the end: a torn or corrupt tail (a line without
its LF, a wrong checksum, zeros) is ignored with a warning and cut off, so new
records follow the last good one. A corrupt line *followed by good ones* is damage
to acknowledged data and raises :class:`LogCorrupted` naming the line and byte
offset. A line with a right checksum and a wrong shape was written by something
else and is an error wherever it is. ``DIR/kv.lock`` is locked (``flock``) while a
node has the directory open, so two nodes cannot share one.

Compaction (:meth:`Log.rewrite`, driven by the node) writes the live siblings to
``kv.log.tmp``, syncs it and renames it over the log, so a crash leaves one whole
log or the other; a leftover ``.tmp`` is removed on open.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final

import msgspec

from resilient.errors import ResilientError
from resilient.rpc.errors import RemoteError
from resilient.rpc.versions import Sibling

try:  # POSIX only; elsewhere two nodes on one directory are not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FILE_NAME",
    "LOCK_NAME",
    "Log",
    "LogCorrupted",
    "LogError",
    "StorageFailed",
    "encode_record",
]

logger = logging.getLogger("resilient.rpc.kv")

#: The log's file name inside the data directory.
FILE_NAME: Final = "kv.log"
#: The file a node holds locked while it has the directory open.
LOCK_NAME: Final = "kv.lock"
_FORMAT: Final = "resilient.kv.log"
_VERSION: Final = 1
_encode = msgspec.json.encode
_decode = msgspec.json.decode
_sync: Final[Callable[[int], None]] = getattr(os, "fdatasync", os.fsync)


class LogError(ResilientError):
    """The data directory's log cannot be used (in use by another node, not a KV log)."""

    refusal = False


class LogCorrupted(LogError, ValueError):
    """A record of the log is damaged and records after it are intact.

    Acknowledged writes follow the damage, so the node refuses to start rather
    than serve a history with a hole in it. ``line`` (1-based) and ``offset``
    (bytes from the start) locate the damaged record.
    """

    def __init__(self, path: str, line: int, offset: int, reason: str, following: int) -> None:
        super().__init__(
            f"{path}: record at line {line} (byte {offset}) is corrupt ({reason}), and "
            f"{following} intact record(s) follow it, so acknowledged writes are damaged. "
            f"Restore the directory from a backup or let the node recover from its replicas "
            f"(move the log away), or cut the file at byte {offset} to keep what precedes it"
        )
        self.path = path
        self.line = line
        self.offset = offset
        self.reason = reason
        self.following = following

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.line, self.offset, self.reason, self.following))


class StorageFailed(RemoteError):
    """The node could not make a write durable; it refuses writes until it restarts.

    After a failed ``write`` or ``fsync`` the kernel's view of the file is
    unknown, so the node stops accepting writes (reads go on) instead of
    acknowledging writes it may lose. Restart it: replay finds the last good record.
    """

    CODE: ClassVar[int | None] = 1001
    MESSAGE: ClassVar[str] = "Storage failed"

    def __init__(self, message: str | None = None, data: Any = None) -> None:
        super().__init__(1001, self.MESSAGE if message is None else message, data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.data))


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: msgspec.Raw  # kept encoded: the node stores and serves values as JSON bytes
    version: dict[str, int]
    timestamp: float
    deleted: bool


_decode_record: Final = msgspec.json.Decoder(_Record).decode


def encode_record(key: str, value_json: bytes, sibling: Sibling) -> bytes:
    """One log line for ``sibling`` of ``key``; ``value_json`` is its value, encoded."""
    body = _encode(
        {
            "key": key,
            "value": msgspec.Raw(value_json),
            "version": sibling.version,
            "timestamp": sibling.timestamp,
            "deleted": sibling.deleted,
        }
    )
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _header() -> bytes:
    body = _encode({"format": _FORMAT, "version": _VERSION})
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _checked(line: bytes) -> tuple[bytes | None, str]:
    """The JSON of an intact line, or ``None`` and why it is not intact."""
    if not line.endswith(b"\n"):
        return None, "the line has no end (a torn write)"
    if len(line) < 11 or line[8:9] != b" ":
        return None, "the line is too short or has no checksum"
    try:
        expected = int(line[:8], 16)
    except ValueError:
        return None, "the checksum is not hex"
    body = line[9:-1]
    if zlib.crc32(body) != expected:
        return None, "the checksum does not match"
    return body, ""


class Log:
    """The open log of one data directory; see the module docstring.

    Opening replays every record into ``apply(key, sibling)`` in order, cuts off a
    torn tail, and locks the directory until :meth:`close`. :meth:`append` and
    :meth:`rewrite` are not thread-safe: the node calls them under its write lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        apply: Callable[[str, Sibling], object],
        fsync: bool = True,
    ) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, FILE_NAME)
        self.fsync = fsync
        #: Records replayed when the log was opened.
        self.replayed = 0
        #: Bytes of torn tail cut off when the log was opened.
        self.dropped = 0
        self._failed: str | None = None
        self._fd = -1
        os.makedirs(self.directory, exist_ok=True)
        # The lock is a file of its own: compaction replaces the log's file, and a lock
        # on the old one would not keep a second node off the new one.
        lock = os.path.join(self.directory, LOCK_NAME)
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock()
            with contextlib.suppress(FileNotFoundError):  # a compaction a crash interrupted
                os.unlink(self.path + ".tmp")
            created = not os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._size = self._replay(apply)
            if self._size == 0:
                self._write_all(_header())
                _sync(self._fd)
                self._size = os.fstat(self._fd).st_size
            if created:
                self._sync_directory()
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._lock_fd)
            raise

    def __repr__(self) -> str:
        return f"<resilient.rpc.kv.Log {self.path!r} bytes={self._size}>"

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogError(
                f"{self.path} is locked by another process: a node is already running on "
                f"{self.directory!r}; stop it or give this node its own --data directory"
            ) from None

    def _replay(self, apply: Callable[[str, Sibling], object]) -> int:
        """Apply every intact record; cut a damaged tail; the size of the good part."""
        good_end = offset = number = 0
        damaged: tuple[int, int, str] | None = None
        following = 0
        with open(self.path, "rb") as file:
            for line in file:
                number += 1
                body, reason = _checked(line)
                if body is None:
                    if damaged is None:
                        damaged = (number, offset, reason)
                elif damaged is not None:
                    following += 1
                else:
                    self._apply(body, number, offset, apply)
                    good_end = offset + len(line)
                offset += len(line)
        if following:
            assert damaged is not None
            raise LogCorrupted(self.path, *damaged, following)
        if damaged is not None:
            number, at, reason = damaged
            self.dropped = offset - at
            logger.warning(
                "%s: ignored %d byte(s) of a torn or corrupt last record at line %d (byte %d: "
                "%s), a write interrupted by a crash (never acknowledged when fsync is on); "
                "cut the file there",
                self.path,
                self.dropped,
                number,
                at,
                reason,
            )
            os.ftruncate(self._fd, good_end)
            _sync(self._fd)
        return good_end

    def _apply(
        self, body: bytes, number: int, offset: int, apply: Callable[[str, Sibling], object]
    ) -> None:
        try:
            if number == 1:
                if _decode(body) != {"format": _FORMAT, "version": _VERSION}:
                    raise ValueError(f"the first line is not a {_FORMAT} v{_VERSION} header")
                return
            record = _decode_record(body)
            if not record.key:
                raise ValueError("the record's key is empty")
            if record.deleted and bytes(record.value) != b"null":
                raise ValueError("a tombstone record has a value")
            value = None if record.deleted else record.value
            sibling = Sibling(value, record.version, record.timestamp, record.deleted)
        except (msgspec.DecodeError, TypeError, ValueError) as error:
            raise LogError(
                f"{self.path}: line {number} (byte {offset}) has a valid checksum but is not a "
                f"resilient.kv record ({error}); this directory holds another program's file"
            ) from None
        apply(record.key, sibling)
        self.replayed += 1

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _sync_directory(self) -> None:
        # A new file's directory entry is durable only once the directory is synced.
        with contextlib.suppress(OSError):  # not supported everywhere (Windows)
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, record: bytes) -> None:
        """Write one record and (with ``fsync``) make it durable; raise :class:`StorageFailed`.

        After a failure every later append fails too: the node keeps serving reads.
        """
        if self._failed is not None:
            raise StorageFailed(data={"path": self.path, "reason": self._failed})
        try:
            self._write_all(record)
            if self.fsync:
                _sync(self._fd)
        except OSError as error:
            self._failed = f"{type(error).__name__}: {error}; restart the node to recover"
            with contextlib.suppress(OSError):  # leave no partial record behind
                os.ftruncate(self._fd, self._size)
            raise StorageFailed(data={"path": self.path, "reason": self._failed}) from error
        self._size += len(record)

    def rewrite(self, records: Iterable[bytes]) -> int:
        """Replace the log by a header and ``records`` (compaction); the bytes it now has.

        Written to ``kv.log.tmp``, synced, then renamed over the log and the directory
        synced: a crash at any point leaves either the old log or the new one whole.
        A failure leaves the old log in use and raises :class:`StorageFailed`.
        """
        if self._failed is not None:
            raise StorageFailed(data={"path": self.path, "reason": self._failed})
        temporary = self.path + ".tmp"
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except OSError as error:
            raise StorageFailed(data={"path": temporary, "reason": str(error)}) from error
        try:
            size = 0
            for chunk in itertools.chain((_header(),), records):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                size += len(chunk)
            _sync(fd)
            os.replace(temporary, self.path)
        except BaseException as error:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            if isinstance(error, OSError):
                raise StorageFailed(data={"path": temporary, "reason": str(error)}) from error
            raise
        old, self._fd, self._size = self._fd, fd, size
        os.close(old)
        self._sync_directory()
        return size

    @property
    def size(self) -> int:
        """Bytes in the log (the header included)."""
        return self._size

    def close(self) -> None:
        """Make everything written durable and release the file and its lock."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._failed = self._failed or "the log is closed"
        try:
            _sync(fd)
        except OSError as error:  # the writes were acknowledged already, with fsync on
            logger.error("%s: the final sync failed: %s", self.path, error)
        finally:
            os.close(fd)
            os.close(self._lock_fd)
