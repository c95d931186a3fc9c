"""Consistent hashing: route keys to nodes so that membership changes move few keys.

A :class:`HashRing` places every node at many pseudo-random points ("virtual nodes") on a
circle of 64-bit hash values. A key belongs to the node owning the first point clockwise of the
key's hash, so adding a node takes keys only from the arcs its points land on, and removing one
hands only its own keys to their clockwise neighbours: every other key stays where it was.
:meth:`HashRing.get` gives the owner of a key; :meth:`HashRing.get_n` gives up to ``n``
*distinct* nodes in ring order, a replica set for quorum reads and writes whose first element
is the owner. Placement depends only on the node ids, their weights and ``vnodes`` -- never on
insertion order, the process, the machine or the Python version (``hash()`` is not used) --
so every client of a shared cluster computes the same mapping. ``compat="ketama"`` switches to
the libketama/libmemcached continuum, so the ring agrees with ketama clients in other languages.
:meth:`HashRing.bounded` returns a :class:`BoundedLoadRing`, consistent hashing with bounded
loads (Mirrokni, Thorup, Zadimoghaddam 2018): no node is given more than ``ceil(c * average)``
keys, the overflow walking clockwise to the next node with room.

Placement, exactly (default mode):

* A key is turned into bytes: ``str`` as UTF-8, ``bytes`` unchanged, ``int`` as its decimal
  ASCII digits (so ``42`` and ``"42"`` share an owner). ``bool``, ``float`` and every other type
  raise :class:`TypeError`. The key's hash is ``xxh3_64(key_bytes)``, an unsigned 64-bit int.
* A node id (a non-empty ``str``) with weight ``w`` gets ``max(1, round(vnodes * w))`` points
  (Python's ``round``: halves go to the even neighbour). Point ``i`` (``0 <= i < count``) is
  ``xxh3_64(node.encode("utf-8"), seed=i)``.
* The owner of a key is the node of the first point strictly greater than its hash, wrapping
  past the largest point to the smallest. If two nodes share a point, the node whose id sorts
  first (by code point) owns it; the other node keeps its point and regains the arc if the
  winner leaves.

Ketama mode differs in the hashes only: ``vnodes`` counts points and must be a multiple of 4
(default 160, i.e. 40 md5 digests of 4 points each). With ``N`` nodes whose weights sum to
``W``, a node of weight ``w`` gets ``floor((vnodes / 4) * N * w / W)`` digests (computed
exactly; for int weights this is libketama's and uhashring's integer formula), digest ``j``
being ``md5(f"{node}-{j}")`` read as four little-endian uint32 points. A key's hash is the
first four bytes of ``md5(key_bytes)`` as a little-endian uint32. On a point shared by two
nodes the node added later wins, as in uhashring. ``bytes`` keys are hashed as they are, as
libketama does (uhashring hashes ``str(b"...")`` instead, so it disagrees on bytes keys).

A node gets at most :data:`MAX_NODE_POINTS` points and a ring at most :data:`MAX_RING_POINTS`:
a weight (or ``vnodes``) that would need more raises :class:`ValueError` at once, naming the
node and its weight, instead of spending seconds per million points and gigabytes of memory
building the ring. Weights are relative, so scale them all down instead.

Lookups are lock-free: each ring keeps an immutable snapshot -- sorted points, their owners,
and a bucket table indexed by the top bits of a hash that names the owner directly when the
bucket holds no point (most lookups) or else bounds a tiny ``bisect``. :meth:`HashRing.add`,
:meth:`HashRing.remove` and :meth:`HashRing.set_weight` build a new snapshot under a lock and
publish it with one attribute assignment, so a concurrent reader sees the old ring or the new
one, never a half-built one.

A ring pickles as its configuration -- node ids, weights, ``vnodes``, ``compat`` -- so the
copy routes every key exactly as the original does; a :class:`BoundedLoadRing` pickles with
its ring and its current assignments. Both are safe to use in a forked child.

Public names: :class:`HashRing`, :class:`BoundedLoadRing`, :class:`EmptyRingError`,
:data:`MAX_NODE_POINTS`, :data:`MAX_RING_POINTS`.
"""

from __future__ import annotations

import math
import reprlib
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from hashlib import md5 as _hashlib_md5
from importlib import import_module
from itertools import chain, repeat
from operator import rshift
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from xxhash import xxh3_64_intdigest

from resilient import _fork
from resilient._config import check_int, check_number, rebuild
from resilient.errors import ResilientError

__all__ = ["MAX_NODE_POINTS", "MAX_RING_POINTS", "BoundedLoadRing", "EmptyRingError", "HashRing"]

Key = str | bytes | int
"""What a ring routes: ``str`` (hashed as UTF-8), ``bytes``, or ``int`` (as decimal digits)."""


class _Digest(Protocol):
    def digest(self) -> bytes: ...


def _builtin_md5() -> Callable[[bytes], _Digest]:
    # CPython's own md5 is about twice as fast as OpenSSL's for key-sized inputs, because
    # creating an OpenSSL context dominates; both compute the same digest.
    try:
        constructor: Callable[[bytes], _Digest] = import_module("_md5").md5
    except (ImportError, AttributeError):  # pragma: no cover - builds without _md5
        constructor = _hashlib_md5
    return constructor


_md5 = _builtin_md5()
_ketama_digest_points = struct.Struct("<4I").unpack

# Bucket table size: 2**(bits of the point count + 2), four to eight buckets per point, so
# roughly four lookups in five land in a bucket without a point and skip the bisect. The table
# grows with the ring up to 2**22 buckets, reached at 524,289 points (3,277 nodes of 160
# points); past that, buckets fill up and more lookups bisect. Memory bound: at most 2**22
# slots (32 MiB of pointers on 64-bit CPython) and 8 per point, plus one int (32 bytes) per
# bucket holding a point, so never more of those than points. Measured on 160-point nodes:
# 1,000 nodes, 2**20 slots, 12 MiB; 10,000 nodes, 2**22 slots, 73 MiB beside the 96 MiB of
# the rest of the ring. Against the old cap of 2**15, which left up to 19 points in a bucket
# at 1,000 nodes and 77 at 10,000, lookups there are 1.4-2.1x as fast and builds 25-50%
# slower (filling the table is a Python loop over the buckets that hold points).
_TABLE_OVERSAMPLING_BITS = 2

MAX_NODE_POINTS: Final = 1 << 20
"""The most points one node may have: 1,048,576, i.e. weight 6,553.6 at ``vnodes=160``.

Building that many takes over a second and some 200 MiB (measured with CPython 3.11), on
every membership change; a weight needing more is a mistake (weights are relative), and is
refused with ValueError.
"""
MAX_RING_POINTS: Final = 1 << 22
"""The most points a whole ring may have: 4,194,304, i.e. 26,214 nodes at ``vnodes=160``.

Such a ring takes about six seconds and 600 MiB to build (measured with CPython 3.11), and
every membership change rebuilds it; past that, adding nodes or weight is refused with
ValueError.
"""
_MAX_TABLE_BITS = 22
_REPR_MAX_NODES = 8


class EmptyRingError(ResilientError, LookupError):
    """A key was looked up on a ring that has no nodes."""


def _key_bytes(key: object) -> bytes:
    """Return the canonical bytes of ``key`` (see the module docstring), or raise TypeError."""
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return b"%d" % key
    raise TypeError(f"key must be str, bytes or int, got {type(key).__name__}: {reprlib.repr(key)}")


def _key_hash(key: object, ketama: bool) -> int:
    if ketama:
        return int.from_bytes(_md5(_key_bytes(key)).digest()[:4], "little")
    return xxh3_64_intdigest(_key_bytes(key))


def _xxh3_points(node: str, count: int) -> list[int]:
    return list(map(xxh3_64_intdigest, repeat(node.encode(), count), range(count)))


def _ketama_points(node: str, count: int) -> list[int]:
    points: list[int] = []
    for digest_index in range(count // 4):
        points.extend(_ketama_digest_points(_md5(f"{node}-{digest_index}".encode()).digest()))
    return points


def _check_node(node: object) -> str:
    if not isinstance(node, str):
        raise TypeError(f"node id must be a str, got {type(node).__name__}: {node!r}")
    if not node:
        raise ValueError("node id must be a non-empty str, got ''")
    return node


def _too_many_points(node: str, weight: float, points: float, vnodes: int) -> ValueError:
    shown = f"{points:,.0f}" if points < 1e15 else f"{points:.3g}"
    return ValueError(
        f"node {node!r} with weight {weight!r} would need {shown} points on the ring "
        f"(vnodes={vnodes}), more than MAX_NODE_POINTS={MAX_NODE_POINTS:,}; weights are "
        "relative, so scale them all down (or lower vnodes)"
    )


def _check_weight(name: str, weight: object) -> float:
    number = check_number(name, weight, minimum=0, inclusive=False)
    # Keep ints as ints: they print as given and ketama's digest counts stay integer maths.
    return weight if isinstance(weight, int) else number


class _Snapshot:
    """One immutable ring state; readers take a reference once and never see it change."""

    __slots__ = ("ketama", "lookup", "owners", "points", "reachable", "size", "weights")

    def __init__(
        self,
        points: list[int],
        owners: list[str],
        table: list[str | int],
        shift: int,
        span: int,
        ketama: bool,
        weights: dict[str, float],
        reachable: int,
    ) -> None:
        # points: the sorted distinct points, then `span` sentinels above every hash, so a
        # bisect over [start, start + span] never needs clamping.
        # owners: owners[i] owns points[i], then copies of owners[0], where hashes past the
        # last point go. table: per bucket of hash values, the owner when the bucket holds no
        # point, else the index of its first point.
        self.points = points
        self.owners = owners
        self.size = len(points) - span
        self.ketama = ketama
        self.weights = weights
        # How many distinct nodes own a point, i.e. how many get_n can return.
        self.reachable = reachable
        # What get() needs, as one plain tuple: unpacking it is the cheapest way to load
        # seven values into locals (a NamedTuple would unpack through the iterator protocol).
        self.lookup = (points, owners, table, shift, span, self.size, ketama)


def _build_snapshot(
    weights: dict[str, float], points_of: dict[str, list[int]], ketama: bool
) -> _Snapshot:
    """Merge the nodes' points into a lookup structure."""
    # Later writes win, so write the node that must win a shared point last: in default mode
    # the smallest id (whatever the insertion order), in ketama mode the last added.
    order = list(weights) if ketama else sorted(weights, reverse=True)
    owner_of = dict(
        zip(
            chain.from_iterable(map(points_of.__getitem__, order)),
            chain.from_iterable(repeat(node, len(points_of[node])) for node in order),
            strict=True,
        )
    )
    points = sorted(owner_of)
    size = len(points)
    if not size:
        return _Snapshot([], [], [], 0, 0, ketama, weights, 0)
    owners = list(map(owner_of.__getitem__, points))
    hash_bits = 32 if ketama else 64
    bits = min((size - 1).bit_length() + _TABLE_OVERSAMPLING_BITS, _MAX_TABLE_BITS)
    shift = hash_bits - bits

    table: list[str | int] = []
    extend = table.extend
    append = table.append
    previous_bucket = -1
    previous_start = 0
    span = 1
    for index, bucket in enumerate(map(rshift, points, repeat(shift))):
        if bucket != previous_bucket:
            if bucket - previous_bucket > 1:
                # Hashes in the empty buckets before this one all go to this point's owner.
                extend(repeat(owners[index], bucket - previous_bucket - 1))
            append(index)
            if index - previous_start > span:
                span = index - previous_start
            previous_start = index
            previous_bucket = bucket
    span = max(span, size - previous_start)
    extend(repeat(owners[0], (1 << bits) - 1 - previous_bucket))

    points.extend(repeat(1 << hash_bits, span))
    owners.extend(repeat(owners[0], span))
    reachable = len(set(owner_of.values()))
    return _Snapshot(points, owners, table, shift, span, ketama, weights, reachable)


def _start_index(snapshot: _Snapshot, hashed: int) -> int:
    """Index of the first point strictly after ``hashed``, wrapping to 0."""
    index = bisect_right(snapshot.points, hashed, 0, snapshot.size)
    return 0 if index == snapshot.size else index


def _empty_ring_error() -> EmptyRingError:
    return EmptyRingError("the ring has no nodes; add() one before looking keys up")


def _ring_config(snapshot: _Snapshot, vnodes: int) -> dict[str, Any]:
    """The arguments of a :class:`HashRing` whose snapshot equals ``snapshot``."""
    weights = snapshot.weights
    # The nodes in the order they were added: in ketama mode that order breaks ties.
    return {
        "nodes": list(weights),
        "vnodes": vnodes,
        "weights": dict(weights),
        "compat": "ketama" if snapshot.ketama else None,
    }


def _rebuild_bounded(
    cls: type[BoundedLoadRing], ring: dict[str, Any], c: float, assigned: dict[Key, str]
) -> BoundedLoadRing:
    """Unpickle a :class:`BoundedLoadRing`: the same ring, ``c`` and assignments."""
    view = cls(HashRing(**ring), c=c)
    view._assigned = assigned
    for node in assigned.values():
        view._loads[node] += 1
    return view


class HashRing:
    """A consistent hashing ring of node ids; see the module docstring for exact placement.

    ``nodes`` are the initial node ids (non-empty ``str``, no duplicates); ``weights`` maps
    some of them to a positive finite weight (default 1); ``vnodes`` is the number of points
    of a weight-1 node; ``compat="ketama"`` selects the libketama continuum. A weight or
    ``vnodes`` needing more than :data:`MAX_NODE_POINTS` points for a node, or
    :data:`MAX_RING_POINTS` for the ring, raises :class:`ValueError`. The ring is safe to
    share between threads and pickles as its configuration.

    >>> ring = HashRing(["cache-a", "cache-b", "cache-c"])
    >>> ring.get("user:42") in ring
    True
    >>> len(set(ring.get_n("user:42", 2)))
    2
    """

    __slots__ = ("_ketama", "_points_cache", "_snapshot", "_vnodes", "_write_lock")

    def __init__(
        self,
        nodes: Iterable[str] = (),
        *,
        vnodes: int = 160,
        weights: Mapping[str, float] | None = None,
        compat: Literal["ketama"] | None = None,
    ) -> None:
        if compat not in (None, "ketama"):
            raise ValueError(f"compat must be None or 'ketama', got {compat!r}")
        self._ketama = compat == "ketama"
        self._vnodes = check_int("vnodes", vnodes, minimum=1)
        if vnodes > MAX_NODE_POINTS:
            raise ValueError(
                f"vnodes must be at most MAX_NODE_POINTS={MAX_NODE_POINTS:,} (the points of "
                f"a weight-1 node), got {vnodes!r}"
            )
        if self._ketama and vnodes % 4:
            raise ValueError(
                f"vnodes must be a multiple of 4 with compat='ketama' "
                f"(each md5 digest gives 4 points), got {vnodes!r}"
            )
        if isinstance(nodes, str | bytes):
            raise TypeError(f"nodes must be an iterable of node ids, got {type(nodes).__name__}")
        initial: dict[str, float] = {}
        for node in nodes:
            if _check_node(node) in initial:
                raise ValueError(f"nodes lists {node!r} twice")
            initial[node] = 1
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(
                    f"weights must be a mapping of node id to weight, got {type(weights).__name__}"
                )
            unknown = [node for node in weights if node not in initial]
            if unknown:
                raise ValueError(f"weights names nodes that are not in nodes: {unknown!r}")
            for node, weight in weights.items():
                initial[node] = _check_weight(f"weights[{node!r}]", weight)
        self._write_lock = _fork.register_lock(threading.Lock())
        self._points_cache: dict[str, list[int]] = {}
        self._snapshot = self._build(initial)

    def __reduce__(self) -> tuple[Any, ...]:
        # As its configuration: placement depends on nothing else, so the copy routes alike.
        return (rebuild, (type(self), self._config()))

    def _config(self) -> dict[str, Any]:
        return _ring_config(self._snapshot, self._vnodes)

    # -- lookups (lock-free) -------------------------------------------------------------

    def get(self, key: Key) -> str:
        """Return the node that owns ``key``.

        Raises :class:`EmptyRingError` if the ring has no nodes and :class:`TypeError` if
        ``key`` is not a ``str``, ``bytes`` or ``int``.
        """
        # Hot path: one snapshot read, one hash, usually one table index. Everything is a
        # local or a cached global, and nothing is allocated but the key's bytes.
        points, owners, table, shift, span, size, ketama = self._snapshot.lookup
        if ketama:
            hashed = int.from_bytes(
                _md5(key.encode() if type(key) is str else _key_bytes(key)).digest()[:4],
                "little",
            )
        elif type(key) is str:
            hashed = xxh3_64_intdigest(key.encode())
        else:
            hashed = xxh3_64_intdigest(_key_bytes(key))
        if not size:
            raise _empty_ring_error()
        # Any: `type(...) is str` is the cheapest test, but mypy narrows only its true branch.
        entry: Any = table[hashed >> shift]
        if type(entry) is str:
            return entry
        return owners[bisect_right(points, hashed, entry, entry + span)]

    def get_n(self, key: Key, n: int) -> list[str]:
        """Return up to ``n`` distinct nodes for ``key``, in ring order, owner first.

        This is the key's replica set: the owner, then each next distinct node clockwise.
        If ``n`` exceeds the number of nodes, every node is returned once (in ketama mode a
        node whose weight rounds down to no point can never be returned). Membership changes
        disturb replica sets as little as they disturb owners.
        """
        check_int("n", n, minimum=1)
        snapshot = self._snapshot
        hashed = _key_hash(key, snapshot.ketama)
        size = snapshot.size
        if not size:
            raise _empty_ring_error()
        owners = snapshot.owners
        index = _start_index(snapshot, hashed)
        wanted = min(n, snapshot.reachable)
        replicas: list[str] = []
        seen: set[str] = set()
        while len(replicas) < wanted:
            owner = owners[index]
            if owner not in seen:
                seen.add(owner)
                replicas.append(owner)
            index += 1
            if index == size:
                index = 0
        return replicas

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, in the order they were added."""
        return tuple(self._snapshot.weights)

    @property
    def weights(self) -> Mapping[str, float]:
        """A read-only view of node id -> weight, in the order the nodes were added."""
        return MappingProxyType(self._snapshot.weights)

    @property
    def vnodes(self) -> int:
        """Points given to a node of weight 1."""
        return self._vnodes

    @property
    def compat(self) -> Literal["ketama"] | None:
        """``"ketama"`` for the libketama continuum, else None."""
        return "ketama" if self._ketama else None

    def __len__(self) -> int:
        return len(self._snapshot.weights)

    def __contains__(self, node: object) -> bool:
        return isinstance(node, str) and node in self._snapshot.weights

    def __repr__(self) -> str:
        weights = self._snapshot.weights
        names = list(weights)
        if len(names) <= _REPR_MAX_NODES:
            shown = repr(names)
        else:
            head = ", ".join(map(repr, names[: _REPR_MAX_NODES - 1]))
            shown = f"[{head}, ..., {names[-1]!r}] ({len(names)} nodes)"
        parts = [shown, f"vnodes={self._vnodes}"]
        unequal = {node: weight for node, weight in weights.items() if weight != 1}
        if unequal:
            parts.append(f"weights={reprlib.repr(unequal)}")
        if self._ketama:
            parts.append("compat='ketama'")
        return f"HashRing({', '.join(parts)})"

    # -- membership (serialised by the writer lock) ----------------------------------------

    def add(self, node: str, weight: float = 1) -> None:
        """Add ``node`` with ``weight``; keys move to it only from other nodes' arcs.

        Raises :class:`ValueError` if the node is already on the ring (change its weight
        with :meth:`set_weight`), and :class:`TypeError`/:class:`ValueError` for a bad id
        or weight.
        """
        _check_node(node)
        weight = _check_weight("weight", weight)
        with self._write_lock:
            current = self._snapshot.weights
            if node in current:
                raise ValueError(
                    f"node {node!r} is already on the ring; use set_weight() to change its weight"
                )
            self._snapshot = self._build({**current, node: weight})

    def remove(self, node: str) -> None:
        """Remove ``node``; only its keys move, each to the next node clockwise.

        Raises :class:`KeyError` naming the node if it is not on the ring.
        """
        with self._write_lock:
            current = self._snapshot.weights
            if node not in current:
                raise KeyError(f"node {node!r} is not on the ring")
            remaining = {name: weight for name, weight in current.items() if name != node}
            self._points_cache.pop(node, None)
            self._snapshot = self._build(remaining)

    def set_weight(self, node: str, weight: float) -> None:
        """Change the weight of ``node``; it keeps its position in :attr:`nodes`.

        In default mode keys move only to or from ``node``: it keeps its first points and
        gains or loses some at the end. Raises :class:`KeyError` if the node is not on the ring.
        """
        weight = _check_weight("weight", weight)
        with self._write_lock:
            current = self._snapshot.weights
            if node not in current:
                raise KeyError(f"node {node!r} is not on the ring")
            self._snapshot = self._build({**current, node: weight})

    def bounded(self, *, c: float = 1.25) -> BoundedLoadRing:
        """Return a :class:`BoundedLoadRing` over the ring's current nodes (see there)."""
        return BoundedLoadRing(self, c=c)

    def _point_counts(self, weights: dict[str, float]) -> dict[str, int]:
        """Each node's number of points; ValueError past MAX_NODE_POINTS or MAX_RING_POINTS."""
        vnodes = self._vnodes
        if not self._ketama:
            counts = {}
            for node, weight in weights.items():
                exact = vnodes * weight
                # Checked before rounding too: round() of an overflowing product would raise.
                if not exact < MAX_NODE_POINTS + 1 or round(exact) > MAX_NODE_POINTS:
                    raise _too_many_points(node, weight, exact, vnodes)
                counts[node] = max(1, round(exact))
        else:
            # libketama's share of 40 digests per server times the number of servers;
            # Fractions make it exact for float weights and identical to the integer formula
            # for ints.
            digests_per_node = vnodes // 4 * len(weights)
            total = sum(map(Fraction, weights.values()))
            counts = {
                node: 4 * math.floor(digests_per_node * Fraction(weight) / total)
                for node, weight in weights.items()
            }
            for node, count in counts.items():
                if count > MAX_NODE_POINTS:
                    raise _too_many_points(node, weights[node], count, vnodes)
        points = sum(counts.values())
        if points > MAX_RING_POINTS:
            raise ValueError(
                f"the ring would have {points:,} points over {len(counts):,} nodes "
                f"(vnodes={vnodes}), more than MAX_RING_POINTS={MAX_RING_POINTS:,}: building "
                "it would take many seconds and gigabytes; lower vnodes or the weights"
            )
        return counts

    def _build(self, weights: dict[str, float]) -> _Snapshot:
        generate = _ketama_points if self._ketama else _xxh3_points
        cache = self._points_cache
        points_of: dict[str, list[int]] = {}
        for node, count in self._point_counts(weights).items():
            # A node's first k points never depend on k, so one cached list serves any count.
            points = cache.get(node)
            if points is None or len(points) < count:
                points = cache[node] = generate(node, count)
            points_of[node] = points if len(points) == count else points[:count]
        return _build_snapshot(weights, points_of, self._ketama)


class BoundedLoadRing:
    """Consistent hashing with bounded loads over a snapshot of a :class:`HashRing`.

    :meth:`assign` gives a key to the first node clockwise of its hash that holds fewer than
    ``ceil(c * (assigned + 1) / nodes)`` keys, where ``assigned`` counts the keys held before
    this one and ``nodes`` the nodes that own ring points. So, as long as no key is released,
    no node ever holds more than ``ceil(c * assigned / nodes)`` keys, and a key moves off its
    consistent-hashing owner only when that owner is full. ``c`` must be greater than 1 and is
    read as the decimal it prints as (``1.1`` is exactly 11/10), so ``c * average`` has no
    float rounding.

    Assigning a key that is already assigned returns its node and counts it once; a single
    :meth:`release` frees it. Releasing never moves other keys, so after releases a node may
    stay above the (now smaller) bound until its own keys are released; new keys never go to
    a node at or above the bound. Keys are told apart by Python equality.

    The view is fixed to the ring's membership when it was made: later ``add``/``remove`` on
    the ring do not affect it. To follow a membership change, make a new view and assign the
    keys again. All methods are thread-safe (one lock serialises them).
    """

    __slots__ = (
        "_assigned",
        "_c",
        "_c_denominator",
        "_c_numerator",
        "_loads",
        "_lock",
        "_ring",
        "_vnodes",
    )

    def __init__(self, ring: HashRing, *, c: float = 1.25) -> None:
        if not isinstance(ring, HashRing):
            raise TypeError(f"ring must be a HashRing, got {type(ring).__name__}")
        check_number("c", c, minimum=1, inclusive=False)
        self._c = c
        exact = Fraction(repr(c))
        self._c_numerator = exact.numerator
        self._c_denominator = exact.denominator
        self._ring = ring._snapshot
        self._vnodes = ring._vnodes  # only to pickle the ring
        self._loads = dict.fromkeys(self._ring.weights, 0)
        self._assigned: dict[Key, str] = {}
        self._lock = _fork.register_lock(threading.Lock())

    def __reduce__(self) -> tuple[Any, ...]:
        # The assignments are plain data, not this process's state: they travel too.
        with self._lock:
            assigned = dict(self._assigned)
        ring = _ring_config(self._ring, self._vnodes)
        return (_rebuild_bounded, (type(self), ring, self._c, assigned))

    @property
    def c(self) -> float:
        """The load factor: no node takes a key while holding ``ceil(c * average)`` keys."""
        return self._c

    @property
    def capacity(self) -> int:
        """The most keys a node may hold when the next key is assigned."""
        with self._lock:
            return self._capacity()

    def _capacity(self) -> int:
        nodes = self._ring.reachable
        if not nodes:
            return 0
        # ceil(c * (assigned + 1) / nodes) in integers, c being numerator / denominator.
        return -(-self._c_numerator * (len(self._assigned) + 1) // (self._c_denominator * nodes))

    def assign(self, key: Key) -> str:
        """Return the node holding ``key``, choosing it if ``key`` is not assigned yet.

        Raises :class:`EmptyRingError` if the ring had no nodes when the view was made.
        """
        snapshot = self._ring
        hashed = _key_hash(key, snapshot.ketama)
        if not snapshot.size:
            raise _empty_ring_error()
        owners = snapshot.owners
        size = snapshot.size
        with self._lock:
            node = self._assigned.get(key)
            if node is not None:
                return node
            loads = self._loads
            capacity = self._capacity()
            index = _start_index(snapshot, hashed)
            # Terminates: the loads sum to `assigned` < c * (assigned + 1) <= capacity * nodes,
            # so some node is below capacity.
            while loads[owners[index]] >= capacity:
                index += 1
                if index == size:
                    index = 0
            node = owners[index]
            loads[node] += 1
            self._assigned[key] = node
            return node

    def release(self, key: Key) -> str:
        """Forget ``key``'s assignment and return the node that held it.

        Raises :class:`KeyError` if ``key`` is not assigned.
        """
        with self._lock:
            try:
                node = self._assigned.pop(key)
            except KeyError:
                raise KeyError(f"key {reprlib.repr(key)} is not assigned") from None
            self._loads[node] -= 1
            return node

    def load(self, node: str) -> int:
        """Return how many keys ``node`` holds; :class:`KeyError` if it is not in the view."""
        with self._lock:
            try:
                return self._loads[node]
            except KeyError:
                raise KeyError(f"node {node!r} is not in this bounded view") from None

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids of the view, in the order they were added to the ring."""
        return tuple(self._ring.weights)

    def __len__(self) -> int:
        return len(self._assigned)

    def __contains__(self, key: object) -> bool:
        return key in self._assigned

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"BoundedLoadRing(c={self._c!r}, nodes={len(self._loads)}, "
                f"assigned={len(self._assigned)}, capacity={self._capacity()})"
            )
