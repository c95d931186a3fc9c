"""The KV node: its write rule, its log, its RPC methods, and the real process."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import pickle
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rpc_live import live_asgi

import resilient
from resilient.rpc import Client, InvalidParams, RemoteDeadlineExceeded, RemoteError
from resilient.rpc.kv import LogCorrupted, LogError, Node, StorageFailed, StoreFull, app
from resilient.rpc.kv import _log as kv_log
from resilient.rpc.kv.__main__ import main, parse_args
from resilient.rpc.versions import Sibling

__all__ = ["live_asgi"]  # the fixture, imported to be found by pytest

LOG = kv_log.FILE_NAME


def values(node: Node, key: str) -> list[Any]:
    return [(s.value, s.version, s.deleted) for s in node.get(key)]


# The write rule ---------------------------------------------------------------------------


def test_put_then_get_returns_the_sibling() -> None:
    """An accepted put answers True and a get returns its value, version and timestamp."""
    node = Node()
    assert node.get("k") == []
    assert node.put("k", {"n": 1}, {"w": 1}, 10.0) is True
    assert node.get("k") == [Sibling({"n": 1}, {"w": 1}, 10.0)]
    assert len(node) == 1


def test_stale_and_repeated_puts_are_refused_and_change_nothing() -> None:
    """A put whose version a stored one descends answers False, so retries are harmless."""
    node = Node()
    assert node.put("k", "v2", {"w": 2}, 2.0)
    assert node.put("k", "v1", {"w": 1}, 1.0) is False  # stale
    assert node.put("k", "v2", {"w": 2}, 2.0) is False  # the same write again
    assert node.put("k", "other", {"w": 2}, 3.0) is False  # a reused version
    assert values(node, "k") == [("v2", {"w": 2}, False)]


def test_a_newer_version_replaces_what_it_descends() -> None:
    """A write that saw the stored one replaces it."""
    node = Node()
    node.put("k", "old", {"a": 1}, 1.0)
    assert node.put("k", "new", {"a": 2}, 2.0)
    assert values(node, "k") == [("new", {"a": 2}, False)]


def test_concurrent_versions_are_kept_as_siblings_until_resolved() -> None:
    """Writes that did not see each other are both kept; one that saw both replaces them."""
    node = Node()
    assert node.put("k", "left", {"a": 1}, 1.0)
    assert node.put("k", "right", {"b": 1}, 2.0)
    assert values(node, "k") == [("left", {"a": 1}, False), ("right", {"b": 1}, False)]
    assert node.put("k", "third", {"c": 1}, 0.5)
    assert len(node.get("k")) == 3
    assert node.put("k", "resolved", {"a": 1, "b": 1, "c": 2}, 3.0)
    assert values(node, "k") == [("resolved", {"a": 1, "b": 1, "c": 2}, False)]


def test_delete_stores_a_tombstone_ordered_like_a_write() -> None:
    """A delete is a tombstone: it hides older writes, refuses stale ones, yields to newer."""
    node = Node()
    node.put("k", "v", {"a": 1}, 1.0)
    assert node.delete("k", {"a": 2}, 2.0) is True
    assert values(node, "k") == [(None, {"a": 2}, True)]
    assert node.delete("k", {"a": 2}, 2.0) is False  # repeated delete
    assert node.put("k", "late", {"a": 1}, 3.0) is False  # older than the delete
    assert node.put("k", "again", {"a": 3}, 4.0) is True
    assert values(node, "k") == [("again", {"a": 3}, False)]


def test_delete_of_an_unknown_key_is_kept_for_ordering() -> None:
    """Deleting a key never written here still stores the tombstone (it orders later writes)."""
    node = Node()
    assert node.delete("ghost", {"a": 1}, 1.0) is True
    assert node.put("ghost", "stale", {"a": 1}, 2.0) is False
    assert node.get("ghost")[0].deleted


def test_a_concurrent_delete_is_a_sibling() -> None:
    """A delete concurrent with a write keeps both, so the client can decide."""
    node = Node()
    node.put("k", "v", {"a": 1}, 1.0)
    node.delete("k", {"b": 1}, 2.0)
    assert values(node, "k") == [("v", {"a": 1}, False), (None, {"b": 1}, True)]


def test_null_is_a_value_not_a_delete() -> None:
    """put(None) stores JSON null as a live value; only delete writes a tombstone."""
    node = Node()
    node.put("k", None, {"a": 1}, 1.0)
    assert values(node, "k") == [(None, {"a": 1}, False)]


def test_deeply_nested_values_are_refused() -> None:
    """A value nested deeper than JSON needs is refused instead of exhausting the stack."""
    value: Any = 1
    for _ in range(100):
        value = [value]
    with pytest.raises(TypeError, match="nested over 64 levels"):
        Node().put("k", value, {}, 0.0)


def test_stored_values_cannot_be_changed_through_references() -> None:
    """Changing the dict given to put, or one returned by get, leaves the store as written."""
    node = Node()
    value = {"items": [1]}
    node.put("k", value, {"w": 1}, 0.0)
    value["items"].append(2)
    node.get("k")[0].value["items"].append(3)
    assert node.get("k")[0].value == {"items": [1]}


def test_concurrent_writers_on_one_key_are_linearized(frequent_thread_switches: None) -> None:
    """Threads racing on one key: each version is accepted exactly once and nothing is lost."""
    node = Node()
    accepted: list[tuple[str, int]] = []
    lock = threading.Lock()

    def writer(name: str) -> None:
        for counter in range(1, 31):
            # Every writer sends each of its versions twice, as a retrying client does.
            for _ in range(2):
                if node.put("k", counter, {name: counter}, float(counter)):
                    with lock:
                        accepted.append((name, counter))

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(accepted) == sorted((f"w{i}", c) for i in range(6) for c in range(1, 31))
    assert [s.version for s in node.get("k")] == [{f"w{i}": 30} for i in range(6)]


# Bad inputs and limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "param", "error", "match"),
    [
        (lambda n: n.put(1, "v", {}, 0.0), "key", TypeError, "key must be a str"),
        (lambda n: n.put("", "v", {}, 0.0), "key", ValueError, "non-empty"),
        (lambda n: n.put("k" * 33, "v", {}, 0.0), "key", ValueError, "33 bytes"),
        (lambda n: n.put("\ud800", "v", {}, 0.0), "key", ValueError, "surrogate"),
        (lambda n: n.get(None), "key", TypeError, "key must be a str"),
        (lambda n: n.put("k", object(), {}, 0.0), "value", TypeError, "value must be JSON"),
        (lambda n: n.put("k", "x" * 100, {}, 0.0), "value", ValueError, "102 bytes"),
        (lambda n: n.put("k", [float("nan")], {}, 0.0), r"value", TypeError, r"value\[0\] is nan"),
        (lambda n: n.put("k", {"d": {1, 2}}, {}, 0.0), "value", TypeError, r"\['d'\] is a set"),
        (lambda n: n.put("k", {1: 2}, {}, 0.0), "value", TypeError, "key that is not a str"),
        (lambda n: n.put("k", (1, [{}], 2.5), {}, 0.0), "value", None, ""),
        (lambda n: n.put("k", "v", [1], 0.0), "version", TypeError, "must be an object"),
        (lambda n: n.put("k", "v", {"a": -1}, 0.0), "version", ValueError, ">= 0"),
        (lambda n: n.put("k", "v", {"a": 1, "b": 1, "c": 1}, 0.0), "version", ValueError, "3"),
        (lambda n: n.put("k", "v", {"w" * 40: 1}, 0.0), "version", ValueError, "writer id"),
        (lambda n: n.put("k", "v", {}, float("nan")), "timestamp", TypeError, "finite"),
        (lambda n: n.delete("k", {}, True), "timestamp", TypeError, "finite"),
        (lambda n: n.delete("k", {}, "now"), "timestamp", TypeError, "finite"),
    ],
)
def test_bad_arguments_name_the_parameter(
    call: Any, param: str, error: type[Exception] | None, match: str
) -> None:
    """Each refused argument raises TypeError/ValueError naming it, and nothing is stored."""
    node = Node(max_key_bytes=32, max_value_bytes=100, max_writers=2)
    if error is None:  # the control: a plain JSON value (a tuple is a list) is taken
        assert call(node) is True
        return
    with pytest.raises(error, match=match) as raised:
        call(node)
    assert raised.value.param == param  # type: ignore[attr-defined]
    assert len(node) == 0


def test_store_full_when_over_max_keys_or_max_siblings() -> None:
    """A write past the key or sibling limit is refused with StoreFull; updates still work."""
    node = Node(max_keys=2, max_siblings=2)
    node.put("a", 1, {"w": 1}, 0.0)
    node.put("b", 1, {"w": 1}, 0.0)
    with pytest.raises(StoreFull, match="max_keys=2") as full:
        node.put("c", 1, {"w": 1}, 0.0)
    assert full.value.code == StoreFull.CODE
    assert node.put("a", 2, {"w": 2}, 0.0)  # an existing key is not a new one
    node.put("a", "x", {"x": 1}, 0.0)
    with pytest.raises(StoreFull, match="concurrent siblings"):
        node.put("a", "y", {"y": 1}, 0.0)
    assert node.put("a", "resolved", {"w": 2, "x": 1, "y": 1}, 0.0)
    assert len(node.get("a")) == 1


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"node_id": ""}, ValueError, "node_id"),
        ({"fsync": 1}, TypeError, "fsync must be a bool"),
        ({"data": 5}, TypeError, "data must be a directory path"),
        ({"max_key_bytes": 0}, ValueError, "max_key_bytes"),
        ({"max_value_bytes": 1}, ValueError, "max_value_bytes"),
        ({"max_writers": 1.5}, TypeError, "max_writers"),
        ({"max_keys": 0}, ValueError, "max_keys"),
        ({"max_siblings": 0}, ValueError, "max_siblings"),
    ],
)
def test_configuration_is_validated(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """A bad setting fails at construction, naming the parameter."""
    with pytest.raises(error, match=match):
        Node(**options)


def test_writes_honour_the_callers_deadline() -> None:
    """A write with no time left, or stuck behind the write lock, stores nothing."""
    node = Node()
    with resilient.deadline(0), pytest.raises(resilient.DeadlineExceeded):
        node.put("k", "v", {"a": 1}, 0.0)
    with node._lock, resilient.deadline(0.05):
        started = time.monotonic()
        with pytest.raises(resilient.DeadlineExceeded, match="write lock; nothing was written"):
            node.put("k", "v", {"a": 1}, 0.0)
        assert time.monotonic() - started < 2
    assert node.get("k") == []


def test_a_closed_node_serves_reads_and_refuses_writes() -> None:
    """After close() reads still answer, and writes raise StorageFailed instead of vanishing."""
    node = Node(node_id="n1")
    node.put("k", "v", {"a": 1}, 0.0)
    node.close()
    assert node.get("k")[0].value == "v"
    with pytest.raises(StorageFailed, match="Storage failed") as failed:
        node.put("k", "w", {"a": 2}, 0.0)
    assert failed.value.data["reason"] == "the node is closed"
    assert "n1" in repr(node)
    assert "memory" in repr(node)


def test_errors_pickle_with_their_class_and_code() -> None:
    """The node's errors cross process boundaries intact."""
    for error in (
        StoreFull("full", {"max_keys": 1}),
        StorageFailed(data={"reason": "disk"}),
        LogCorrupted("/x/kv.log", 3, 120, "bad crc", 2),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
    assert isinstance(LogCorrupted("p", 1, 0, "r", 1), resilient.ResilientError)


# The log -----------------------------------------------------------------------------------


def fill(node: Node) -> None:
    node.put("a", {"n": 1}, {"w": 1}, 1.0)
    node.put("a", {"n": 2}, {"w": 2}, 2.0)
    node.put("b", "x", {"w": 1}, 3.0)
    node.put("b", "y", {"v": 1}, 4.0)  # concurrent: two siblings
    node.delete("c", {"w": 1}, 5.0)
    node.put("a", "stale", {"w": 1}, 6.0)  # refused: never logged


def snapshot(node: Node) -> dict[str, list[Sibling]]:
    return {key: node.get(key) for key in ("a", "b", "c")}


def test_replay_restores_every_accepted_write(tmp_path: pathlib.Path) -> None:
    """A node reopened on its data directory has exactly the state it acknowledged."""
    with Node(data=tmp_path) as node:
        fill(node)
        before = snapshot(node)
    lines = (tmp_path / LOG).read_bytes().splitlines()
    assert len(lines) == 1 + 5  # the header and the five accepted writes
    with Node(data=tmp_path) as again:
        assert snapshot(again) == before
        assert again.log is not None
        assert again.log.replayed == 5
        assert again.info()["replayed"] == 5
        again.put("a", "more", {"w": 3}, 7.0)
    with Node(data=tmp_path) as third:
        assert third.get("a")[0].value == "more"


def test_replay_applies_the_write_rule_to_repeated_records(tmp_path: pathlib.Path) -> None:
    """A record present twice (or a stale one after a newer) changes nothing on replay."""
    with Node(data=tmp_path) as node:
        node.put("k", "old", {"w": 1}, 1.0)
        node.put("k", "new", {"w": 2}, 2.0)
    path = tmp_path / LOG
    header, old, new = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(header + old + new + new + old)
    with Node(data=tmp_path) as node:
        assert values(node, "k") == [("new", {"w": 2}, False)]
        assert node.log is not None
        assert "kv.log" in repr(node.log)
        node.close()
        node.close()  # a second close is a no-op


def test_compaction_keeps_exactly_the_live_siblings(tmp_path: pathlib.Path) -> None:
    """compact() rewrites the log to the stored siblings (tombstones too), losing nothing."""
    with Node(data=tmp_path) as node:
        for i in range(1, 30):
            node.put("a", i, {"w": i}, float(i))
        fill(node)
        before = snapshot(node)
        assert node.compact() > 0
        lines = (tmp_path / LOG).read_bytes().splitlines()
        assert len(lines) == 1 + 4  # header, a, two siblings of b, the tombstone of c
        node.put("d", "after", {"w": 1}, 0.0)  # appends go to the new file
    with Node(data=tmp_path) as node:
        assert snapshot(node) == before
        assert node.get("d")[0].value == "after"
    assert Node().compact() == 0
    closed = Node(data=tmp_path)
    closed.close()
    with pytest.raises(StorageFailed):
        closed.compact()


def test_a_mostly_superseded_log_is_compacted_on_open(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening a log of many overwrites shrinks it; compact_on_open=False leaves it."""
    import resilient.rpc.kv as kv

    monkeypatch.setattr(kv, "_COMPACT_AT", 5)
    with Node(data=tmp_path) as node:
        for i in range(1, 21):
            node.put("k", i, {"w": i}, 0.0)
    path = tmp_path / LOG
    size = path.stat().st_size
    with Node(data=tmp_path, compact_on_open=False):
        assert path.stat().st_size == size
    (tmp_path / (LOG + ".tmp")).write_bytes(b"half a compaction")
    with Node(data=tmp_path) as node:
        assert path.stat().st_size < size / 5
        assert node.get("k")[0].value == 20
    assert not (tmp_path / (LOG + ".tmp")).exists()
    with pytest.raises(TypeError, match="compact_on_open"):
        Node(compact_on_open="yes")  # type: ignore[arg-type]


def test_a_failed_compaction_keeps_the_old_log_in_use(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the rewrite fails the old log stays whole and writable; on open it is a warning."""
    import resilient.rpc.kv as kv

    with Node(data=tmp_path) as node:
        for i in range(1, 11):
            node.put("k", i, {"w": i}, 0.0)
        real_sync = kv_log._sync

        def failing(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(kv_log, "_sync", failing)
        with pytest.raises(StorageFailed, match="Storage failed"):
            node.compact()
        monkeypatch.setattr(kv_log, "_sync", real_sync)
        assert node.put("k", 11, {"w": 11}, 0.0)
    monkeypatch.setattr(kv, "_COMPACT_AT", 1)
    original = kv_log.Log.rewrite

    def broken(self: Any, records: Any) -> int:
        raise StorageFailed(data={"reason": "disk full"})

    monkeypatch.setattr(kv_log.Log, "rewrite", broken)
    with caplog.at_level(logging.WARNING, "resilient.rpc.kv"), Node(data=tmp_path) as node:
        assert node.get("k")[0].value == 11
    assert "compaction on open failed" in caplog.text

    def crashing(self: Any, records: Any) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(kv_log.Log, "rewrite", crashing)
    with pytest.raises(RuntimeError):
        Node(data=tmp_path)
    monkeypatch.setattr(kv_log.Log, "rewrite", original)
    with Node(data=tmp_path) as node:  # the failed opens released the directory
        assert node.get("k")[0].value == 11
    assert not (tmp_path / (LOG + ".tmp")).exists()


def test_the_log_is_readable_checksummed_json_lines(tmp_path: pathlib.Path) -> None:
    """Each line is CRC-32, a space, and the JSON of the write (documented format)."""
    with Node(data=tmp_path) as node:
        node.put("k", [1, "two"], {"w": 1}, 1.5)
    header, record = (tmp_path / LOG).read_bytes().splitlines()
    assert header.endswith(b'{"format":"resilient.kv.log","version":1}')
    crc, body = record.split(b" ", 1)
    assert int(crc, 16) == __import__("zlib").crc32(body)
    assert (
        body == b'{"key":"k","value":[1,"two"],"version":{"w":1},"timestamp":1.5,"deleted":false}'
    )


@pytest.mark.parametrize(
    "tail",
    [
        b'1234abcd {"key":"a","val',
        b"\x00" * 300,
        b"deadbeef {}\n",
        b"zz\n\x00\x00",
        b"zzzzzzzz {}\n",
    ],
    ids=["torn", "zeros", "bad-checksum", "garbage-lines", "checksum-not-hex"],
)
def test_a_torn_tail_is_ignored_with_a_warning_and_cut(
    tmp_path: pathlib.Path, tail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-write leaves a damaged tail: replay keeps the rest, warns, and cuts it."""
    with Node(data=tmp_path) as node:
        fill(node)
        before = snapshot(node)
    path = tmp_path / LOG
    good = path.read_bytes()
    path.write_bytes(good + tail)
    with caplog.at_level(logging.WARNING, "resilient.rpc.kv"), Node(data=tmp_path) as node:
        assert snapshot(node) == before
        assert node.log is not None
        assert node.log.dropped == len(tail)
        node.put("d", "after the crash", {"w": 1}, 9.0)
    assert "torn or corrupt last record at line 7" in caplog.text
    assert path.read_bytes().startswith(good)
    with Node(data=tmp_path) as node:  # the new record follows the good ones
        assert node.get("d")[0].value == "after the crash"


def test_a_torn_header_starts_a_fresh_log(tmp_path: pathlib.Path) -> None:
    """A crash while creating the log leaves a partial header: the node starts empty."""
    (tmp_path / LOG).write_bytes(b"ca8795")
    with Node(data=tmp_path) as node:
        assert len(node) == 0
        node.put("k", "v", {"w": 1}, 0.0)
    with Node(data=tmp_path) as node:
        assert node.get("k")[0].value == "v"


def test_a_corrupt_record_in_the_middle_is_an_error_that_says_where(
    tmp_path: pathlib.Path,
) -> None:
    """Damage followed by intact records means acknowledged writes are hurt: refuse to start."""
    with Node(data=tmp_path) as node:
        fill(node)
    path = tmp_path / LOG
    lines = path.read_bytes().splitlines(keepends=True)
    offset = len(lines[0]) + len(lines[1])
    lines[2] = lines[2].replace(b'"n":2', b'"n":3')  # the checksum no longer matches
    path.write_bytes(b"".join(lines))
    with pytest.raises(LogCorrupted) as raised:
        Node(data=tmp_path)
    error = raised.value
    assert (error.line, error.offset, error.following) == (3, offset, 3)
    assert f"line 3 (byte {offset})" in str(error)
    assert "checksum does not match" in str(error)
    assert path.read_bytes() == b"".join(lines)  # nothing cut


def test_a_valid_checksum_on_a_foreign_record_is_an_error(tmp_path: pathlib.Path) -> None:
    """A line that checks out but is not a KV record is another program's file: refused."""
    import zlib

    with Node(data=tmp_path):
        pass
    foreign = (
        b'{"key":"k","value":1}',
        b"[1]",
        b'{"key":"","value":1,"version":{},"timestamp":0,"deleted":false}',
        b'{"key":"k","value":1,"version":{},"timestamp":0,"deleted":true}',
        b'{"key":"k","value":1,"version":{"w":-1},"timestamp":0,"deleted":false}',
    )
    for body in foreign:
        line = b"%08x %s\n" % (zlib.crc32(body), body)
        header = (tmp_path / LOG).read_bytes().splitlines(keepends=True)[0]
        (tmp_path / LOG).write_bytes(header + line)
        with pytest.raises(LogError, match=r"line 2 .* not a resilient\.kv record"):
            Node(data=tmp_path)
    body = b'{"format":"other"}'
    (tmp_path / LOG).write_bytes(b"%08x %s\n" % (zlib.crc32(body), body))
    with pytest.raises(LogError, match=r"not a resilient\.kv\.log v1 header"):
        Node(data=tmp_path)


def test_two_nodes_cannot_share_a_directory(tmp_path: pathlib.Path) -> None:
    """The second node on one data directory is refused while the first has it open."""
    with Node(data=tmp_path / "d"), pytest.raises(LogError, match="locked by another process"):
        Node(data=tmp_path / "d")
    with Node(data=tmp_path / "d"):  # released on close
        pass


def test_a_failed_fsync_refuses_the_write_and_every_later_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk did not take is not acknowledged, and the node stops taking writes."""
    node = Node(data=tmp_path)
    node.put("k", "kept", {"w": 1}, 0.0)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(kv_log, "_sync", broken)
    with pytest.raises(StorageFailed, match="Storage failed") as failed:
        node.put("k", "lost", {"w": 2}, 0.0)
    assert "Input/output error" in failed.value.data["reason"]
    assert node.get("k")[0].value == "kept"  # not applied, reads go on
    with pytest.raises(StorageFailed):
        node.put("other", "v", {"w": 1}, 0.0)
    with pytest.raises(StorageFailed):
        node.compact()
    node.close()  # the final sync fails too: logged, not raised
    monkeypatch.undo()
    with Node(data=tmp_path) as again:
        assert again.get("k")[0].value == "kept"
        assert again.get("other") == []


def test_without_fsync_writes_are_logged_but_not_synced(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync=False skips the per-write sync (documented trade-off) yet still replays."""
    syncs: list[int] = []
    monkeypatch.setattr(kv_log, "_sync", syncs.append)
    with Node(data=tmp_path, fsync=False) as node:
        synced_at_open = len(syncs)
        node.put("k", "v", {"w": 1}, 0.0)
        assert len(syncs) == synced_at_open
        assert node.info()["fsync"] is False
    monkeypatch.undo()
    with Node(data=tmp_path) as node:
        assert node.get("k")[0].value == "v"


# Over RPC ------------------------------------------------------------------------------------


def test_the_rpc_methods_round_trip(live_asgi: Any) -> None:
    """kv.put/get/delete/info over a real server, with the contract's wire shapes."""
    server = app(Node(node_id="n1"))
    assert all(server.is_idempotent(m) for m in ("kv.get", "kv.put", "kv.delete", "kv.info"))
    url = live_asgi(server)
    with Client(url + "/") as client:
        assert client.call("kv.get", "k") == []
        assert client.call("kv.put", "k", {"n": 1}, {"w": 1}, 1) is True
        assert client.call("kv.put", key="k", value=2, version={"w": 1}, timestamp=2.0) is False
        assert client.call("kv.get", "k") == [
            {"value": {"n": 1}, "version": {"w": 1}, "timestamp": 1.0, "deleted": False}
        ]
        assert client.call("kv.delete", "k", {"w": 2}, 3.0) is True
        assert client.call("kv.get", "k")[0]["deleted"] is True
        assert client.call("kv.info")["node_id"] == "n1"


@pytest.mark.parametrize(
    ("method", "params", "param"),
    [
        ("kv.get", {"key": "k" * 2000}, "key"),
        ("kv.get", {"key": 5}, "key"),
        ("kv.put", {"key": "k", "value": "v" * 70_000, "version": {}, "timestamp": 0}, "value"),
        ("kv.put", {"key": "k", "value": 1, "version": {"w": -3}, "timestamp": 0}, "version"),
        ("kv.put", {"key": "k", "value": 1, "version": {"w": "1"}, "timestamp": 0}, "version"),
        ("kv.put", {"key": "k", "value": 1, "version": {}, "timestamp": "x"}, "timestamp"),
        ("kv.put", {"key": "k", "value": 1, "version": {}}, "timestamp"),
        ("kv.delete", {"key": "", "version": {}, "timestamp": 0}, "key"),
    ],
)
def test_hostile_inputs_get_invalid_params_and_the_node_serves_on(
    live_asgi: Any, method: str, params: dict[str, Any], param: str
) -> None:
    """Oversized or mistyped params are refused with InvalidParams naming the param."""
    node = Node()
    url = live_asgi(app(node))
    with Client(url + "/") as client:
        with pytest.raises(InvalidParams) as refused:
            client.call(method, **params)
        assert refused.value.data["param"] == param
        assert client.call("kv.put", "ok", 1, {"w": 1}, 0.0) is True
    assert len(node) == 1


def test_a_write_past_the_deadline_answers_deadline_exceeded(live_asgi: Any) -> None:
    """kv.put runs inside the caller's deadline: stuck behind the lock it gives up, unwritten."""
    node = Node()
    url = live_asgi(app(node))
    with (
        Client(url + "/", timeout=0.2, retry=None) as client,
        node._lock,
        pytest.raises((RemoteDeadlineExceeded, resilient.DeadlineExceeded)),
    ):
        client.call("kv.put", "k", 1, {"w": 1}, 0.0)
    time.sleep(0.05)
    assert node.get("k") == []


def test_app_wants_a_node() -> None:
    """app() refuses anything but a Node, and passes the server options on."""
    with pytest.raises(TypeError, match=r"resilient\.rpc\.kv\.Node"):
        app({})  # type: ignore[arg-type]
    assert app(Node(), max_concurrent=3).max_concurrent == 3


# The process ---------------------------------------------------------------------------------


def read_ready(process: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The URL of the node's ``ready`` line, or fail with what it wrote on stderr."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no ready line within {timeout} s")
    line = process.stdout.readline()
    if not line.startswith("ready "):
        process.kill()
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"node did not start: {line!r} {err}")
    return line.split()[1]


@contextlib.contextmanager
def node_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m resilient.rpc.kv --port 0 ARGS`` as a process, always killed at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "resilient.rpc.kv", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, read_ready(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_acknowledged_writes_survive_kill_9_and_sigterm_exits_0(tmp_path: pathlib.Path) -> None:
    """A node killed with SIGKILL and restarted on its data serves every acknowledged write;
    hostile input does not stop it; SIGTERM stops it cleanly with status 0."""
    data = str(tmp_path / "node")
    acknowledged = {}
    with node_process("--data", data) as (process, url), Client(url + "/") as client:
        for i in range(20):
            if client.call("kv.put", f"k{i}", {"i": i}, {"w": 1}, float(i)):
                acknowledged[f"k{i}"] = {"i": i}
        client.call("kv.delete", "k0", {"w": 2}, 99.0)
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    assert len(acknowledged) == 20
    with node_process("--data", data, "--node-id", "again") as (process, url):
        with Client(url + "/") as client:
            assert client.call("kv.get", "k0")[0]["deleted"] is True
            for key, value in list(acknowledged.items())[1:]:
                assert [s["value"] for s in client.call("kv.get", key)] == [value]
            with pytest.raises(InvalidParams):
                client.call("kv.put", "x" * 5000, 1, {"w": 1}, 0.0)
            with pytest.raises(InvalidParams):
                client.call("kv.put", "k", 1, "not a version", 0.0)
            assert client.call("kv.info") == {
                "node_id": "again",
                "keys": 20,
                "data": data,
                "fsync": True,
                "replayed": 21,
            }
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_cli_refuses_a_corrupt_log_and_a_bad_port(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Startup problems exit non-zero with the reason on stderr, before serving anything."""
    with Node(data=tmp_path) as node:
        fill(node)
    path = tmp_path / LOG
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b"0" + lines[1][1:]
    path.write_bytes(b"".join(lines))
    assert main(["--port", "0", "--data", str(tmp_path)]) == 1
    assert "is corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        parse_args(["--port", "70000"])
    assert usage.value.code == 2
    with contextlib.closing(__import__("socket").socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    assert "cannot listen" in capsys.readouterr().err


def test_cli_serves_in_process_until_sigterm(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() prints the ready line with the real port, serves, and returns 0 on SIGTERM."""
    with Node(data=tmp_path) as node:
        node.put("before", 0, {"w": 1}, 0.0)
    seen: list[Any] = []
    returned = threading.Event()

    def client_side() -> None:
        try:
            deadline = time.monotonic() + 20
            out = ""
            while "ready " not in out and time.monotonic() < deadline and not returned.is_set():
                time.sleep(0.01)
                out += capsys.readouterr().out
            url = out.split()[1]
            with Client(url + "/") as client:
                seen.append(client.call("kv.get", "before")[0]["value"])
                seen.append(client.call("kv.put", "k", 1, {"w": 1}, 0.0))
                seen.append(url)
        finally:
            # Only while main() runs: after it, SIGTERM would stop the test run itself.
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client_side)
    thread.start()
    try:
        status = main(["--port", "0", "--data", str(tmp_path), "--no-fsync", "--log-level", "info"])
    finally:
        returned.set()
        thread.join(30)
    assert status == 0
    assert seen[:2] == [0, True]  # replayed the log, then took a write
    assert seen[2].startswith("http://127.0.0.1:")
    assert not seen[2].endswith(":0")
    with Node(data=tmp_path) as node:
        assert node.get("k")[0].value == 1


def test_remote_errors_of_the_node_reach_the_client_with_their_code(live_asgi: Any) -> None:
    """StoreFull crosses the wire as its application code (not a reserved one)."""
    url = live_asgi(app(Node(max_keys=1)))
    with Client(url + "/") as client:
        client.call("kv.put", "a", 1, {"w": 1}, 0.0)
        with pytest.raises(RemoteError) as full:
            client.call("kv.put", "b", 1, {"w": 1}, 0.0)
    assert full.value.code == StoreFull.CODE
    assert full.value.data["max_keys"] == 1


def test_cli_signal_handling_details() -> None:
    """A stop signal while the log replays unwinds with status 0; a second Ctrl-C forces exit;
    a server that stops before listening prints no ready line."""
    import asyncio
    import socket

    import uvicorn

    from resilient.rpc.kv import __main__ as cli
    from resilient.rpc.kv import _serving

    with pytest.raises(SystemExit) as stopped:
        cli._stop_early(signal.SIGTERM, None)
    assert stopped.value.code == 0
    server = _serving._Uvicorn(uvicorn.Config(app(Node())))
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit
    assert not server.force_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit

    class NeverStarts:
        started = False

        async def serve(self, sockets: list[socket.socket]) -> None:
            return None

    with contextlib.closing(socket.socket()) as sock:
        asyncio.run(_serving._serve(NeverStarts(), sock, "http://x"))  # type: ignore[arg-type]
    try:
        v6 = _serving.bind("::1", 0)
    except OSError:  # pragma: no cover - a host without IPv6
        return
    with v6:
        assert _serving.url_of(v6).startswith("http://[::1]:")
