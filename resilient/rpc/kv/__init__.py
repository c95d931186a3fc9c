"""A small versioned key-value node to run the cluster client against.

A :class:`Node` keeps, per key, the *siblings* no other stored write descends
(:mod:`resilient.rpc.versions`): one when the writers saw each other's writes,
several when they wrote concurrently. It never merges values itself; it only
orders versions. The rule for a write (a put, or a delete, which stores a
tombstone so it can be ordered against later writes):

- if a stored sibling's version descends the incoming one, the write is stale or
  a repeat: nothing is stored and the answer is ``False``;
- else the siblings the incoming version descends are dropped, it is added,
  logged, and the answer is ``True``.

So a client may retry any write: the repeat answers ``False`` and changes nothing.
Writes are linearizable on one node (one write lock, held from the decision to the
fsync; a read sees a write only once it is durable). Reads take no lock.

With ``data=DIR`` every accepted write is appended to ``DIR/kv.log`` and, by
default, fsynced before it is acknowledged (see :mod:`resilient.rpc.kv._log` for
the format, the torn-tail rule and :class:`LogCorrupted`); a restart replays it.
Without it the node is memory only.

:func:`app` serves a node as a :class:`resilient.rpc.Server` with the idempotent
methods ``kv.get(key)``, ``kv.put(key, value, version, timestamp)``,
``kv.delete(key, version, timestamp)`` and ``kv.info()``; each runs inside the
caller's deadline. Run one from the shell::

    python -m resilient.rpc.kv --port 0 --data /tmp/node1    # prints "ready http://..."

or serve it (wrapped in middleware, say) from a script of your own, as the CLI does::

    sock = bind("127.0.0.1", 0)
    with sock, Node(data="/tmp/node1") as node:
        serve(Middleware(app(node)), sock)  # "ready URL", returns on SIGTERM/SIGINT

Public API: :class:`Node`, :func:`app`, :func:`bind`, :func:`serve`,
:class:`StoreFull`, :class:`StorageFailed`, :class:`LogError`, :class:`LogCorrupted`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar

import msgspec

from resilient._config import check_int
from resilient.deadline import check_deadline, remaining
from resilient.errors import DeadlineExceeded
from resilient.rpc.errors import InvalidParams, RemoteError
from resilient.rpc.kv._log import Log, LogCorrupted, LogError, StorageFailed, encode_record
from resilient.rpc.kv._serving import bind, serve
from resilient.rpc.server import Server
from resilient.rpc.versions import Sibling, descends, validate_version

__all__ = [
    "LogCorrupted",
    "LogError",
    "Node",
    "StorageFailed",
    "StoreFull",
    "app",
    "bind",
    "serve",
]

logger = logging.getLogger("resilient.rpc.kv")

_encode = msgspec.json.encode
_decode = msgspec.json.decode
_NULL = b"null"
#: How deep a value may nest (the RPC server's own max_depth is 32).
_MAX_DEPTH = 64
#: Superseded records a log must hold, at least, for compaction on open.
_COMPACT_AT = 1000


def _not_json(value: Any, where: str, depth: int) -> str | None:
    """Why ``value`` is not plain JSON (None, bool, int, finite float, str, list, str-keyed
    dict; a tuple is taken as a list), or ``None`` when it is."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value!r}, which JSON lacks"
    if depth >= _MAX_DEPTH:
        return f"{where} is nested over {_MAX_DEPTH} levels deep"
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _not_json(item, f"{where}[{index}]", depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return f"{where} has a key that is not a str: {name!r:.100}"
            problem = _not_json(item, f"{where}[{name!r:.100}]", depth + 1)
            if problem is not None:
                return problem
        return None
    return f"{where} is a {type(value).__name__}, not a JSON type"


def _sorted(survivors: list[Sibling], sibling: Sibling) -> tuple[Sibling, ...]:
    """Siblings in reconcile's order (timestamp, then version: no two versions are equal)."""
    survivors.append(sibling)
    survivors.sort(key=_order)
    return tuple(survivors)


def _order(sibling: Sibling) -> tuple[float, list[tuple[str, int]]]:
    return sibling.timestamp, sorted(item for item in sibling.version.items() if item[1])


class StoreFull(RemoteError):
    """The node refused a write that would go over ``max_keys`` or ``max_siblings``.

    Too many siblings of one key means writers keep writing concurrently without
    resolving: read the key and write the resolved value with the merged version.
    """

    CODE: ClassVar[int | None] = 1002
    MESSAGE: ClassVar[str] = "Store full"

    def __init__(self, message: str | None = None, data: Any = None) -> None:
        super().__init__(1002, self.MESSAGE if message is None else message, data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.data))


class _BadParam(Exception):
    """A refused argument: ``param`` names it; the server answers InvalidParams."""

    param: str

    def invalid(self) -> InvalidParams:
        return InvalidParams(data={"param": self.param, "reason": str(self)})


class _BadParamType(_BadParam, TypeError):
    def __init__(self, param: str, message: str) -> None:
        TypeError.__init__(self, message)
        self.param = param


class _BadParamValue(_BadParam, ValueError):
    def __init__(self, param: str, message: str) -> None:
        ValueError.__init__(self, message)
        self.param = param


class Node:
    """The store of one KV node: siblings per key, and the log when ``data`` is given.

    Limits, each refused with a clear error (``TypeError``/``ValueError`` naming
    the argument, ``InvalidParams`` over RPC; :class:`StoreFull` for the last two):

    ===================  =========  ==========================================
    ``max_key_bytes``    1024       UTF-8 bytes of a key
    ``max_value_bytes``  65536      bytes of a value, encoded as JSON
    ``max_writers``      1024       entries of a version vector
    ``max_keys``         1000000    keys stored (tombstones count: they stay)
    ``max_siblings``     64         concurrent siblings of one key
    ===================  =========  ==========================================

    Opening ``data`` replays the log; when most of its records are superseded
    (more than the live siblings, and over 1000), ``compact_on_open`` rewrites it
    to the live ones (:meth:`compact`). ``fsync=False`` acknowledges writes once
    they are in the kernel's page cache:
    they survive the process dying, not the machine. ``node_id`` names the node in
    ``kv.info`` and in errors. Thread-safe; close it (or use ``with``) to release
    the log.
    """

    def __init__(
        self,
        *,
        data: str | os.PathLike[str] | None = None,
        node_id: str = "kv",
        fsync: bool = True,
        max_key_bytes: int = 1024,
        max_value_bytes: int = 64 * 1024,
        max_writers: int = 1024,
        max_keys: int = 1_000_000,
        max_siblings: int = 64,
        compact_on_open: bool = True,
    ) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node_id must be a non-empty str, got {node_id!r}")
        if not isinstance(fsync, bool):
            raise TypeError(f"fsync must be a bool, got {type(fsync).__name__}: {fsync!r}")
        if not isinstance(compact_on_open, bool):
            raise TypeError(
                f"compact_on_open must be a bool, got {type(compact_on_open).__name__}: "
                f"{compact_on_open!r}"
            )
        if data is not None and not isinstance(data, str | os.PathLike):
            raise TypeError(
                f"data must be a directory path or None, got {type(data).__name__}: {data!r}"
            )
        self.node_id = node_id
        self.max_key_bytes = check_int("max_key_bytes", max_key_bytes, minimum=1)
        self.max_value_bytes = check_int("max_value_bytes", max_value_bytes, minimum=4)
        self.max_writers = check_int("max_writers", max_writers, minimum=1)
        self.max_keys = check_int("max_keys", max_keys, minimum=1)
        self.max_siblings = check_int("max_siblings", max_siblings, minimum=1)
        # key -> its siblings, oldest first, each value kept as its JSON (msgspec.Raw):
        # served as it is, decoded afresh for Python callers, so nobody can change a
        # stored value through a reference. A tuple is replaced, never changed, so a
        # reader needs no lock.
        self._keys: dict[str, tuple[Sibling, ...]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.log: Log | None = None
        if data is not None:
            self.log = Log(data, apply=self._replayed, fsync=fsync)
            siblings = sum(map(len, self._keys.values()))
            if compact_on_open and self.log.replayed - siblings > max(_COMPACT_AT, siblings):
                try:
                    self.compact()
                except StorageFailed as failed:  # the log as it is still serves
                    logger.warning("%s: compaction on open failed: %s", self.log.path, failed)
                except BaseException:
                    self.log.close()
                    raise

    def __repr__(self) -> str:
        where = "memory" if self.log is None else self.log.path
        return f"<resilient.rpc.kv.Node {self.node_id!r} keys={len(self._keys)} {where}>"

    def __len__(self) -> int:
        """The number of keys stored (tombstones included)."""
        return len(self._keys)

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a write in progress, then make the log durable and release it.

        Reads go on working; writes raise :class:`StorageFailed`.
        """
        with self._lock:
            self._closed = True
            if self.log is not None:
                self.log.close()

    def compact(self) -> int:
        """Rewrite the log to hold only the stored siblings; the bytes it saved.

        Writes wait meanwhile (reads do not); a crash during it loses nothing (see
        :mod:`resilient.rpc.kv._log`). ``0`` for a memory-only node.
        """
        with self._lock:
            if self.log is None:
                return 0
            if self._closed:
                raise StorageFailed(data={"node": self.node_id, "reason": "the node is closed"})
            before = self.log.size
            records = (
                encode_record(key, _NULL if s.deleted else bytes(s.value), s)
                for key, siblings in self._keys.items()
                for s in siblings
            )
            return before - self.log.rewrite(records)

    # Reads and writes ---------------------------------------------------------------

    def get(self, key: str) -> list[Sibling]:
        """The key's siblings (tombstones included), oldest first; ``[]``: never written."""
        self._check_key(key)
        return [
            Sibling(None if s.deleted else _decode(s.value), s.version, s.timestamp, s.deleted)
            for s in self._keys.get(key, ())
        ]

    def get_wire(self, key: str) -> list[dict[str, Any]]:
        """:meth:`get` as wire objects, the values still encoded (what ``kv.get`` sends)."""
        self._check_key(key)
        return [
            {
                "value": s.value,
                "version": dict(s.version),
                "timestamp": s.timestamp,
                "deleted": s.deleted,
            }
            for s in self._keys.get(key, ())
        ]

    def put(self, key: str, value: Any, version: Mapping[str, int], timestamp: float) -> bool:
        """Store ``value`` at ``version`` unless a stored version descends it; see the module."""
        self._check_key(key)
        value_json = self._check_value(value)
        sibling = self._sibling(msgspec.Raw(value_json), version, timestamp, deleted=False)
        return self._write(key, sibling, value_json)

    def delete(self, key: str, version: Mapping[str, int], timestamp: float) -> bool:
        """Store a tombstone at ``version`` unless a stored version descends it."""
        self._check_key(key)
        sibling = self._sibling(None, version, timestamp, deleted=True)
        return self._write(key, sibling, _NULL)

    def _write(self, key: str, sibling: Sibling, value_json: bytes) -> bool:
        # Waiting for the lock counts against the caller's deadline; once the record
        # is being written it is finished, so an answer is never half a write.
        budget = min(remaining(), threading.TIMEOUT_MAX)
        if not self._lock.acquire(timeout=budget):
            raise DeadlineExceeded(
                f"node {self.node_id!r}: the deadline passed while waiting for the write "
                f"lock; nothing was written"
            )
        try:
            check_deadline()
            if self._closed:
                raise StorageFailed(data={"node": self.node_id, "reason": "the node is closed"})
            stored = self._keys.get(key)
            survivors = self._decide(stored or (), sibling)
            if survivors is None:
                return False
            if len(survivors) >= self.max_siblings:
                raise StoreFull(
                    f"key has {len(survivors)} concurrent siblings, the node's max_siblings; "
                    f"read it and write a resolved value with the merged version",
                    data={"node": self.node_id, "max_siblings": self.max_siblings},
                )
            if stored is None and len(self._keys) >= self.max_keys:
                raise StoreFull(
                    f"the node holds max_keys={self.max_keys} keys; give the cluster more nodes",
                    data={"node": self.node_id, "max_keys": self.max_keys},
                )
            if self.log is not None:
                self.log.append(encode_record(key, value_json, sibling))
            self._keys[key] = _sorted(survivors, sibling)
            return True
        finally:
            self._lock.release()

    @staticmethod
    def _decide(stored: tuple[Sibling, ...], sibling: Sibling) -> list[Sibling] | None:
        """The stored siblings that stay beside ``sibling``, or ``None`` if it is stale."""
        version = sibling.version
        survivors = []
        for other in stored:
            if descends(other.version, version):
                return None
            if not descends(version, other.version):
                survivors.append(other)
        return survivors

    def _replayed(self, key: str, sibling: Sibling) -> None:
        """Replay applies the same rule; the limits are not checked (they were, when written)."""
        survivors = self._decide(self._keys.get(key, ()), sibling)
        if survivors is not None:
            self._keys[key] = _sorted(survivors, sibling)

    # Validation ------------------------------------------------------------------------

    def _check_key(self, key: object) -> None:
        if not isinstance(key, str):
            raise _BadParamType("key", f"key must be a str, got {type(key).__name__}: {key!r:.100}")
        if not key:
            raise _BadParamValue("key", "key must be a non-empty str")
        try:
            size = len(key.encode())
        except UnicodeEncodeError:
            raise _BadParamValue(
                "key", f"key is not valid UTF-8 text (a lone surrogate): {key!r:.100}"
            ) from None
        if size > self.max_key_bytes:
            raise _BadParamValue(
                "key",
                f"key is {size} bytes of UTF-8, over the node's max_key_bytes="
                f"{self.max_key_bytes}: {key[:40]!r}...",
            )

    def _check_value(self, value: Any) -> bytes:
        try:
            encoded = _encode(value)
        except (TypeError, ValueError, OverflowError) as error:
            raise _BadParamType("value", f"value must be JSON: {error}") from None
        if len(encoded) > self.max_value_bytes:
            raise _BadParamValue(
                "value",
                f"value is {len(encoded)} bytes as JSON, over the node's max_value_bytes="
                f"{self.max_value_bytes}",
            )
        # msgspec also encodes dates, sets, NaN (as null)...: a value would come back
        # changed, so only plain JSON is taken (cheap: the size is bounded already).
        problem = _not_json(value, "value", 0)
        if problem is not None:
            raise _BadParamType("value", f"value must be plain JSON: {problem}")
        return encoded

    def _sibling(self, value: Any, version: Any, timestamp: Any, *, deleted: bool) -> Sibling:
        try:
            checked = validate_version(version)
        except TypeError as error:
            raise _BadParamType("version", str(error)) from None
        except ValueError as error:
            raise _BadParamValue("version", str(error)) from None
        if len(checked) > self.max_writers:
            raise _BadParamValue(
                "version",
                f"version has {len(checked)} writers, over the node's max_writers="
                f"{self.max_writers}",
            )
        for writer in checked:
            if len(writer) > self.max_key_bytes:
                raise _BadParamValue(
                    "version",
                    f"a writer id is {len(writer)} characters, over max_key_bytes="
                    f"{self.max_key_bytes}: {writer[:40]!r}...",
                )
        if (
            not isinstance(timestamp, int | float)
            or isinstance(timestamp, bool)
            or not math.isfinite(timestamp)
        ):
            raise _BadParamType(
                "timestamp",
                f"timestamp must be a finite number of seconds, got "
                f"{type(timestamp).__name__}: {timestamp!r:.100}",
            )
        return Sibling(value, checked, float(timestamp), deleted)

    def info(self) -> dict[str, Any]:
        """What the node is: its id, how many keys, whether and where it is durable."""
        log = self.log
        return {
            "node_id": self.node_id,
            "keys": len(self._keys),
            "data": None if log is None else log.directory,
            "fsync": None if log is None else log.fsync,
            "replayed": 0 if log is None else log.replayed,
        }


def app(node: Node, **server_options: Any) -> Server:
    """A :class:`~resilient.rpc.Server` serving ``node``; ``server_options`` go to Server.

    Reads run on the event loop (they never block); writes in the server's worker
    threads, since they wait for fsync. Every method is registered idempotent, so
    clients may retry and hedge them.
    """
    if not isinstance(node, Node):
        raise TypeError(f"node must be a resilient.rpc.kv.Node, got {type(node).__name__}")
    server_options.setdefault("title", "resilient.rpc.kv")
    server = Server(**server_options)

    @server.method(name="kv.get", idempotent=True, run_in_thread=False)
    def get(key: str) -> list[dict[str, Any]]:
        """The key's siblings as wire objects (tombstones have deleted: true); []: never written."""
        try:
            return node.get_wire(key)
        except _BadParam as refused:
            raise refused.invalid() from None

    @server.method(name="kv.put", idempotent=True)
    def put(key: str, value: Any, version: dict[str, int], timestamp: float) -> bool:
        """Store value at version; false when a stored version descends it (stale, repeat)."""
        try:
            return node.put(key, value, version, timestamp)
        except _BadParam as refused:
            raise refused.invalid() from None

    @server.method(name="kv.delete", idempotent=True)
    def delete(key: str, version: dict[str, int], timestamp: float) -> bool:
        """Store a tombstone at version; false when a stored version descends it."""
        try:
            return node.delete(key, version, timestamp)
        except _BadParam as refused:
            raise refused.invalid() from None

    @server.method(name="kv.info", idempotent=True, run_in_thread=False)
    def info() -> dict[str, Any]:
        """The node's id, key count and durability settings."""
        return node.info()

    return server
