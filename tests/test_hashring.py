"""Tests for resilient.hashring: placement, churn, replicas, ketama agreement, bounded loads."""

from __future__ import annotations

import math
import pickle
import struct
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from hashlib import md5

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uhashring import HashRing as UHashRing
from xxhash import xxh3_64_intdigest

import resilient.hashring as hashring_module
from resilient.errors import ResilientError
from resilient.hashring import BoundedLoadRing, EmptyRingError, HashRing

# Keys of every accepted type, including non-ASCII text, raw bytes and big and negative ints.
KEYS: list[str | bytes | int] = [
    *(f"user:{index}" for index in range(300)),
    *(f"é-ключ-鍵-{index}".encode() for index in range(100)),
    *range(-50, 50),
    2**70,
]

node_ids = st.text(min_size=1, max_size=10)
node_sets = st.lists(node_ids, min_size=1, max_size=8, unique=True)


def mapping(ring: HashRing, keys: list[str | bytes | int] = KEYS) -> dict[str | bytes | int, str]:
    return {key: ring.get(key) for key in keys}


def reference_owner(weights: Mapping[str, float], vnodes: int, key: bytes) -> str:
    """The placement exactly as the module docstring states it, written the slow, obvious way."""
    points = sorted(
        (xxh3_64_intdigest(node.encode(), seed=index), node)
        for node, weight in weights.items()
        for index in range(max(1, round(vnodes * weight)))
    )
    position = bisect_right([point for point, _ in points], xxh3_64_intdigest(key))
    return points[position % len(points)][1]


# -- fixed placement vectors -----------------------------------------------------------------

VECTOR_NODES = ["alpha", "bravo", "charlie", "delta", "echo"]
VECTOR_KEYS: list[str | bytes | int] = [
    "user:1",
    "user:2",
    "user:3",
    "session:abc",
    "cart:99",
    "é-ключ-鍵",
    b"\x00\xffraw",
    0,
    42,
    -7,
    2**70,
]


def test_default_placement_matches_fixed_vectors() -> None:
    """Placement never changes silently: these owners were computed once and pasted here.

    Every client of a shared cluster must agree, across processes, machines and versions, so
    a change to the hashing or the point derivation must be a deliberate, visible decision.
    """
    ring = HashRing(VECTOR_NODES)
    assert mapping(ring, VECTOR_KEYS) == {
        "user:1": "alpha",
        "user:2": "alpha",
        "user:3": "alpha",
        "session:abc": "alpha",
        "cart:99": "alpha",
        "é-ключ-鍵": "echo",
        b"\x00\xffraw": "bravo",
        0: "bravo",
        42: "charlie",
        -7: "charlie",
        2**70: "echo",
    }
    assert {key: ring.get_n(key, 3) for key in VECTOR_KEYS[:4]} == {
        "user:1": ["alpha", "bravo", "delta"],
        "user:2": ["alpha", "delta", "charlie"],
        "user:3": ["alpha", "bravo", "delta"],
        "session:abc": ["alpha", "echo", "charlie"],
    }


def test_weighted_placement_matches_fixed_vectors() -> None:
    """Weighted placement (round(vnodes * weight) points) is pinned by pasted vectors too."""
    ring = HashRing(VECTOR_NODES, weights={"alpha": 2, "echo": 0.5})
    assert mapping(ring, VECTOR_KEYS) == {
        "user:1": "alpha",
        "user:2": "alpha",
        "user:3": "alpha",
        "session:abc": "alpha",
        "cart:99": "alpha",
        "é-ключ-鍵": "alpha",
        b"\x00\xffraw": "bravo",
        0: "bravo",
        42: "alpha",
        -7: "charlie",
        2**70: "echo",
    }


def test_ketama_placement_matches_fixed_vectors() -> None:
    """Ketama placement is pinned independently of the uhashring version installed."""
    ring = HashRing(VECTOR_NODES, compat="ketama")
    assert mapping(ring, VECTOR_KEYS) == {
        "user:1": "echo",
        "user:2": "alpha",
        "user:3": "echo",
        "session:abc": "echo",
        "cart:99": "bravo",
        "é-ключ-鍵": "bravo",
        b"\x00\xffraw": "delta",
        0: "delta",
        42: "delta",
        -7: "charlie",
        2**70: "echo",
    }


@settings(max_examples=60)
@given(
    weights=st.dictionaries(node_ids, st.floats(0.01, 3), min_size=1, max_size=6),
    vnodes=st.integers(1, 40),
    keys=st.lists(st.binary(max_size=12), min_size=1, max_size=60),
)
def test_lookups_follow_the_documented_placement(
    weights: dict[str, float], vnodes: int, keys: list[bytes]
) -> None:
    """get() is exactly the documented placement: the bucket table only makes it faster.

    Small vnodes and tiny weights make sparse rings and crowded buckets, the edge cases of
    the lookup table.
    """
    ring = HashRing(list(weights), vnodes=vnodes, weights=weights)
    for key in keys:
        assert ring.get(key) == reference_owner(weights, vnodes, key)


def test_keys_are_encoded_canonically() -> None:
    """str is hashed as UTF-8 and int as decimal digits, so equal encodings share an owner."""
    ring = HashRing([f"node-{index}" for index in range(20)])
    for number in (*range(-20, 20), 2**64, -(2**80)):
        assert ring.get(number) == ring.get(str(number)) == ring.get(str(number).encode())
    assert ring.get("é-ключ") == ring.get("é-ключ".encode())


@pytest.mark.parametrize("compat", [None, "ketama"])
@pytest.mark.parametrize("key", [True, 1.5, None, bytearray(b"x"), ("tuple",)])
def test_unsupported_key_types_raise_type_error_naming_the_type(
    key: object, compat: str | None
) -> None:
    """bool, float and other types are refused rather than silently hashed somehow."""
    ring = HashRing(["a", "b"], compat=compat)  # type: ignore[arg-type]
    for lookup in (ring.get, lambda key: ring.get_n(key, 2), ring.bounded().assign):
        with pytest.raises(TypeError, match=type(key).__name__):
            lookup(key)  # type: ignore[operator]


# -- membership properties -------------------------------------------------------------------


@settings(max_examples=60)
@given(nodes=node_sets, newcomer=node_ids)
def test_adding_a_node_moves_keys_only_to_it(nodes: list[str], newcomer: str) -> None:
    """A key either stays where it was or moves to the new node: never between old nodes."""
    if newcomer in nodes:
        nodes.remove(newcomer)
    if not nodes:
        return
    ring = HashRing(nodes, vnodes=20)
    before = mapping(ring)
    ring.add(newcomer)
    after = mapping(ring)
    assert all(after[key] in (before[key], newcomer) for key in KEYS)


@settings(max_examples=60)
@given(nodes=st.lists(node_ids, min_size=2, max_size=8, unique=True), data=st.data())
def test_removing_a_node_moves_only_its_keys(nodes: list[str], data: st.DataObject) -> None:
    """Only the removed node's keys move; every other key keeps its owner."""
    leaver = data.draw(st.sampled_from(nodes))
    ring = HashRing(nodes, vnodes=20)
    before = mapping(ring)
    ring.remove(leaver)
    after = mapping(ring)
    for key in KEYS:
        if before[key] != leaver:
            assert after[key] == before[key]
        else:
            assert after[key] != leaver


@settings(max_examples=60)
@given(nodes=node_sets, data=st.data())
def test_mapping_is_independent_of_insertion_order(nodes: list[str], data: st.DataObject) -> None:
    """Clients that learn about nodes in different orders still agree on every key."""
    shuffled = data.draw(st.permutations(nodes))
    built = HashRing(nodes, vnodes=20)
    grown = HashRing(vnodes=20)
    for node in shuffled:
        grown.add(node)
    assert mapping(built) == mapping(grown)


@settings(max_examples=60)
@given(nodes=node_sets, data=st.data())
def test_remove_then_readd_restores_the_mapping(nodes: list[str], data: st.DataObject) -> None:
    """A node that flaps out and back in gets exactly its old keys back."""
    node = data.draw(st.sampled_from(nodes))
    ring = HashRing(nodes, vnodes=20, weights={node: 1.5})
    before = mapping(ring)
    ring.remove(node)
    ring.add(node, weight=1.5)
    assert mapping(ring) == before


@settings(max_examples=60)
@given(nodes=node_sets, n=st.integers(1, 10))
def test_get_n_returns_distinct_nodes_owner_first(nodes: list[str], n: int) -> None:
    """A replica set has min(n, len(ring)) distinct members, the first being the owner,
    and asking for more replicas only appends to the list."""
    ring = HashRing(nodes, vnodes=20)
    for key in KEYS[::10]:
        replicas = ring.get_n(key, n)
        assert len(replicas) == len(set(replicas)) == min(n, len(nodes))
        assert replicas[0] == ring.get(key)
        assert set(replicas) <= set(nodes)
        assert ring.get_n(key, n + 1)[:n] == replicas


def test_get_n_larger_than_the_ring_returns_every_node_once() -> None:
    """Asking for more replicas than nodes gives each node exactly once."""
    ring = HashRing(["a", "b", "c"])
    assert sorted(ring.get_n("key", 50)) == ["a", "b", "c"]


def test_replica_sets_survive_removal_of_another_node() -> None:
    """Removing a node that is not in a key's replica set leaves that replica set unchanged."""
    nodes = [f"node-{index}" for index in range(8)]
    ring = HashRing(nodes)
    before = {key: ring.get_n(key, 3) for key in KEYS}
    ring.remove("node-3")
    for key, replicas in before.items():
        if "node-3" not in replicas:
            assert ring.get_n(key, 3) == replicas


@settings(max_examples=25, derandomize=True, deadline=None)
@given(weights=st.lists(st.floats(0.5, 4), min_size=2, max_size=6))
def test_weights_are_honoured_in_proportion(weights: list[float]) -> None:
    """Each node's share of keys is its share of the total weight, within 20 %."""
    nodes = {f"node-{index}": weight for index, weight in enumerate(weights)}
    ring = HashRing(nodes, vnodes=2000, weights=nodes)
    counts = Counter(map(ring.get, range(40_000)))
    total = sum(weights)
    for node, weight in nodes.items():
        expected = 40_000 * weight / total
        assert abs(counts[node] - expected) <= 0.2 * expected, (node, weight, counts)


def test_set_weight_moves_keys_only_to_or_from_that_node() -> None:
    """Changing a weight moves keys only between that node and the others, proportionally."""
    ring = HashRing(["a", "b", "c", "d"])
    keys = list(range(20_000))
    before = mapping(ring, keys)  # type: ignore[arg-type]
    ring.set_weight("a", 3)
    after = mapping(ring, keys)  # type: ignore[arg-type]
    moved = [key for key in keys if before[key] != after[key]]
    assert moved
    assert all(after[key] == "a" for key in moved)
    assert Counter(after.values())["a"] > 0.45 * len(keys)  # 3/6 of the weight
    ring.set_weight("a", 1)
    assert mapping(ring, keys) == before  # type: ignore[arg-type]
    assert ring.nodes == ("a", "b", "c", "d")


def test_equal_points_go_to_the_smaller_node_id_whatever_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Point collisions are settled by node id, not insertion order, and the loser keeps its
    points: when the winner leaves, the loser owns them again."""
    monkeypatch.setattr(hashring_module, "_xxh3_points", lambda node, count: [1 << 40, 1 << 62])
    forward = HashRing(["b", "a", "c"])
    backward = HashRing(["c", "a", "b"])
    assert {forward.get(key) for key in KEYS} == {"a"}
    assert mapping(forward) == mapping(backward)
    assert forward.get_n("key", 3) == ["a"]  # the losers own no arc
    forward.remove("a")
    assert {forward.get(key) for key in KEYS} == {"b"}
    forward.remove("c")
    assert {forward.get(key) for key in KEYS} == {"b"}


def test_readers_during_membership_changes_always_get_a_member(
    frequent_thread_switches: None,
) -> None:
    """Lookups racing with add/remove never fail and only ever return real members."""
    stable = [f"stable-{index}" for index in range(4)]
    flapping = [f"flap-{index}" for index in range(6)]
    universe = set(stable) | set(flapping)
    ring = HashRing(stable)
    done = threading.Event()
    start = threading.Barrier(4)
    failures: list[BaseException] = []
    lookups = [0, 0, 0]

    def read(slot: int) -> None:
        start.wait()
        try:
            while not done.is_set():
                for key in KEYS[::7]:
                    assert ring.get(key) in universe
                    replicas = ring.get_n(key, 3)
                    assert len(set(replicas)) == 3
                    assert set(replicas) <= universe
                    lookups[slot] += 1
        except BaseException as error:  # reported below, with the thread's failure
            failures.append(error)

    readers = [threading.Thread(target=read, args=(slot,)) for slot in range(3)]
    for reader in readers:
        reader.start()
    start.wait()
    for _ in range(40):
        for node in flapping:
            ring.add(node)
        for node in flapping:
            ring.remove(node)
    done.set()
    for reader in readers:
        reader.join()
    assert not failures
    assert all(lookups)


# -- large rings ----------------------------------------------------------------------------

# 1,000 nodes of 160 points: 160,000 points, far past the 2**15 buckets the lookup table was
# once capped at, so this ring's table is one that grew with it.
LARGE_RING_NODES = [f"cache-{index}" for index in range(1000)]


def canonical_bytes(key: str | bytes | int) -> bytes:
    """A key's bytes as the module docstring defines them."""
    if isinstance(key, str):
        return key.encode()
    return key if isinstance(key, bytes) else str(key).encode()


def plain_continuum(
    points_of: Mapping[str, list[int]], *, last_added_wins: bool = False
) -> tuple[list[int], list[str]]:
    """The sorted distinct points and the owner of each, built the slow, obvious way.

    A point shared by two nodes goes to the smaller id, or with ``last_added_wins`` (ketama)
    to the node that comes later in ``points_of``.
    """
    owner_of: dict[int, str] = {}
    for node, points in points_of.items():
        for point in points:
            if last_added_wins or point not in owner_of or node < owner_of[point]:
                owner_of[point] = node
    points = sorted(owner_of)
    return points, [owner_of[point] for point in points]


def plain_bisect(points: list[int], owners: list[str], hashed: int) -> str:
    """The owner of the first point strictly greater than ``hashed``, wrapping to the first."""
    return owners[bisect_right(points, hashed) % len(points)]


def test_large_ring_lookups_match_a_plain_bisect_over_its_points() -> None:
    """On a 1,000-node ring every key goes to the node a plain bisect over the points gives.

    The bucket table only speeds lookups up; whatever its size, a user must get the very node
    the documented placement names.
    """
    ring = HashRing(LARGE_RING_NODES)
    assert len(ring._snapshot.lookup[2]) > 2**15  # the grown table is what is under test
    points, owners = plain_continuum(
        {
            node: [xxh3_64_intdigest(node.encode(), seed=index) for index in range(160)]
            for node in LARGE_RING_NODES
        }
    )
    keys = [*KEYS, *(f"key:{index}" for index in range(60_000))]
    expected = [plain_bisect(points, owners, xxh3_64_intdigest(canonical_bytes(k))) for k in keys]
    assert list(map(ring.get, keys)) == expected


def test_large_ketama_ring_lookups_match_a_plain_bisect_over_its_points() -> None:
    """The same on a 1,000-node ketama continuum, whose 32-bit hashes index the table too."""
    ring = HashRing(LARGE_RING_NODES, compat="ketama")
    assert len(ring._snapshot.lookup[2]) > 2**15
    points_of = {
        node: [
            point
            for digest in range(40)
            for point in struct.unpack("<4I", md5(f"{node}-{digest}".encode()).digest())
        ]
        for node in LARGE_RING_NODES
    }
    points, owners = plain_continuum(points_of, last_added_wins=True)
    keys = [*KEYS, *(f"key:{index}" for index in range(60_000))]
    expected = [
        plain_bisect(points, owners, int.from_bytes(md5(canonical_bytes(k)).digest()[:4], "little"))
        for k in keys
    ]
    assert list(map(ring.get, keys)) == expected


def test_large_ring_lookups_on_beside_and_among_crowded_points_match_a_plain_bisect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys that hash exactly onto a point, one off either side of one, or into a bucket
    crowded with hundreds of points still get the plain bisect's node on a large ring.

    Random keys rarely land on these edges: here the points are placed around the keys.
    """
    keys = [f"edge:{index}" for index in range(45_000)]
    hashes = [xxh3_64_intdigest(key.encode()) for key in keys]
    nodes = [f"node-{index:03}" for index in range(300)]
    points_of: dict[str, list[int]] = {node: [] for node in nodes}
    for index, hashed in enumerate(hashes):
        # On the key's hash (the key must go past it), just above, or just below it.
        points_of[nodes[index % len(nodes)]].append(hashed + index % 3 - 1)
    # Crowds of hundreds of points in one bucket, all below a key's hash (the fullest bucket:
    # the key goes past all of them), all above one, and around one.
    for hashed, offsets in zip(
        hashes, (range(-500, 0), range(1, 401), range(-200, 200)), strict=False
    ):
        for offset in offsets:
            points_of[nodes[(offset * 7) % len(nodes)]].append(hashed + offset)
    monkeypatch.setattr(hashring_module, "_xxh3_points", lambda node, count: points_of[node])
    ring = HashRing(nodes, vnodes=10_000)  # more than any node's points, so none are cut
    assert len(ring._snapshot.lookup[2]) > 2**15
    points, owners = plain_continuum(points_of)
    assert [ring.get(key) for key in keys] == [
        plain_bisect(points, owners, hashed) for hashed in hashes
    ]


# -- ketama compatibility --------------------------------------------------------------------

KETAMA_KEYS = [f"key:{index}" for index in range(100_000)]


@pytest.mark.parametrize(
    "weights",
    [None, {"10.0.0.1:11211": 1, "10.0.0.2:11211": 3, "10.0.0.3:11211": 2, "10.0.0.4:11211": 5}],
    ids=["equal", "weighted"],
)
def test_ketama_mode_agrees_with_uhashring_on_100k_keys(weights: dict[str, int] | None) -> None:
    """Every key lands on the node a libketama-compatible client (uhashring) picks."""
    nodes = [f"10.0.0.{index}:11211" for index in range(1, 9)]
    ours = HashRing(nodes, weights=weights, compat="ketama")
    theirs = UHashRing({node: (weights or {}).get(node, 1) for node in nodes}, hash_fn="ketama")
    assert list(map(ours.get, KETAMA_KEYS)) == list(map(theirs.get_node, KETAMA_KEYS))


def test_ketama_mode_agrees_with_uhashring_after_membership_changes() -> None:
    """Agreement holds after nodes are added, removed and re-weighted on both sides."""
    ours = HashRing(["a", "b", "c"], compat="ketama")
    theirs = UHashRing(["a", "b", "c"], hash_fn="ketama")
    ours.add("d", weight=2)
    theirs.add_node("d", {"weight": 2})
    ours.remove("b")
    theirs.remove_node("b")
    ours.set_weight("a", 3)
    theirs.add_node("a", {"weight": 3})
    keys = KETAMA_KEYS[:20_000]
    assert list(map(ours.get, keys)) == list(map(theirs.get_node, keys))


@pytest.mark.parametrize("order", [["server-113", "server-574"], ["server-574", "server-113"]])
def test_ketama_point_collisions_resolve_like_uhashring(order: list[str]) -> None:
    """These two servers share the ketama point 421945743; the one added later owns it."""
    ours = HashRing(order, compat="ketama")
    theirs = UHashRing(order, hash_fn="ketama")
    on_collision = [key for key in KETAMA_KEYS[:20_000] if theirs.get_server(key)[0] == 421945743]
    assert on_collision  # the comparison below does exercise the shared point
    assert {ours.get(key) for key in on_collision} == {order[-1]}
    keys = KETAMA_KEYS[:20_000]
    assert list(map(ours.get, keys)) == list(map(theirs.get_node, keys))


def test_ketama_float_weights_split_digests_like_scaled_int_weights() -> None:
    """Only weight ratios matter: 0.5/1.5 places keys exactly as uhashring's ints 1/3."""
    ours = HashRing(["a", "b"], weights={"a": 0.5, "b": 1.5}, compat="ketama")
    theirs = UHashRing({"a": 1, "b": 3}, hash_fn="ketama")
    keys = KETAMA_KEYS[:20_000]
    assert list(map(ours.get, keys)) == list(map(theirs.get_node, keys))


def test_ketama_node_with_no_digest_is_never_chosen() -> None:
    """A weight too small for one digest gives no points, as in libketama: get_n skips it."""
    ring = HashRing(["big", "tiny"], weights={"big": 1000, "tiny": 1}, compat="ketama")
    assert ring.get_n("key", 2) == ["big"]
    assert "tiny" in ring


# -- bounded loads ---------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.1, 1.25, 2])
@pytest.mark.parametrize("node_count", [3, 10])
def test_bounded_loads_never_exceed_ceil_c_times_average(c: float, node_count: int) -> None:
    """After every assignment, no node holds more than ceil(c * assigned / nodes) keys."""
    ring = HashRing([f"node-{index}" for index in range(node_count)])
    view = ring.bounded(c=c)
    exact_c = Fraction(str(c))
    for assigned in range(1, 3001):
        view.assign(f"key-{assigned}")
        if assigned % 50 == 0 or assigned < 50:
            bound = math.ceil(exact_c * assigned / node_count)
            assert max(view.load(node) for node in ring.nodes) <= bound
    assert sum(view.load(node) for node in ring.nodes) == len(view) == 3000


def test_bounded_c_is_read_as_a_decimal() -> None:
    """c=1.1 allows exactly 11 keys per node at an average of 10, not 12 from float error."""
    view = HashRing([f"node-{index}" for index in range(10)]).bounded(c=1.1)
    for index in range(99):
        view.assign(index)
    assert view.capacity == 11  # ceil(1.1 * 100 / 10)


def test_bounded_assign_keeps_keys_on_their_owner_until_it_is_full() -> None:
    """Keys go to their plain consistent-hashing owner unless that owner is full."""
    ring = HashRing([f"node-{index}" for index in range(5)])
    view = ring.bounded(c=1.25)
    diverted = 0
    for key in KEYS:
        owner = ring.get(key)
        load_before = view.load(owner)
        capacity = view.capacity
        node = view.assign(key)
        assert (node == owner) == (load_before < capacity)
        diverted += node != owner
    assert diverted  # some owners did fill up, so both sides of the rule were checked


def test_bounded_overflow_walks_clockwise_past_the_end_of_the_ring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the node of the last point is full, the walk wraps around to the first point."""
    points = {"first": [1 << 32], "last": [(1 << 64) - 2]}
    monkeypatch.setattr(hashring_module, "_xxh3_points", lambda node, count: points[node])
    ring = HashRing(["first", "last"])
    view = ring.bounded(c=1.25)
    keys_of_last = [key for key in KEYS if ring.get(key) == "last"][:3]
    assert [view.assign(key) for key in keys_of_last] == ["last", "last", "first"]


def test_bounded_assign_is_idempotent_and_release_frees_once() -> None:
    """Assigning a key twice returns the same node and counts it once; one release frees it."""
    view = HashRing(["a", "b", "c"]).bounded(c=1.5)
    node = view.assign("session-1")
    assert view.assign("session-1") == node
    assert view.load(node) == 1
    assert len(view) == 1
    assert "session-1" in view
    assert view.release("session-1") == node
    assert view.load(node) == 0
    assert "session-1" not in view
    with pytest.raises(KeyError, match="session-1"):
        view.release("session-1")


def test_bounded_view_ignores_later_membership_changes() -> None:
    """The view keeps the membership it was made with; a removed node still holds its keys."""
    ring = HashRing(["a", "b", "c"])
    view = ring.bounded()
    owners = {key: view.assign(key) for key in KEYS[:60]}
    ring.remove("a")
    ring.add("z")
    assert view.nodes == ("a", "b", "c")
    assert {key: view.assign(key) for key in KEYS[:60]} == owners
    with pytest.raises(KeyError, match="'z'"):
        view.load("z")


def test_bounded_assign_is_thread_safe(frequent_thread_switches: None) -> None:
    """Concurrent assign/release keep exact counts and the load bound."""
    view = HashRing([f"node-{index}" for index in range(4)]).bounded(c=1.25)
    start = threading.Barrier(4)

    def work(offset: int) -> None:
        start.wait()
        for index in range(offset, 2000, 4):
            view.assign(index)
            if index % 8 == 0:
                view.release(index)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loads = [view.load(node) for node in view.nodes]
    assert sum(loads) == len(view) == 2000 - 250
    assert max(loads) <= math.ceil(Fraction(5, 4) * 2000 / 4)


def test_bounded_view_of_an_empty_ring_refuses_assignments() -> None:
    """A view over an empty ring raises EmptyRingError instead of looping or dividing by 0."""
    view = HashRing().bounded()
    assert view.capacity == 0
    with pytest.raises(EmptyRingError):
        view.assign("key")


@pytest.mark.parametrize(
    ("c", "error"),
    [
        (1, ValueError),
        (0.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("2", TypeError),
        (True, TypeError),
    ],
)
def test_bounded_rejects_bad_c(c: object, error: type[Exception]) -> None:
    """c must be a finite number greater than 1, and the error names it."""
    with pytest.raises(error, match="c must"):
        HashRing(["a"]).bounded(c=c)  # type: ignore[arg-type]


def test_bounded_requires_a_hash_ring() -> None:
    """BoundedLoadRing is built over a HashRing, nothing else."""
    with pytest.raises(TypeError, match="HashRing"):
        BoundedLoadRing(["a", "b"])  # type: ignore[arg-type]


# -- errors and introspection ----------------------------------------------------------------


def test_lookups_on_an_empty_ring_raise_empty_ring_error() -> None:
    """An empty ring says so with a LookupError that is also a ResilientError."""
    ring = HashRing(["only"])
    ring.remove("only")
    for compat in (None, "ketama"):
        for empty in (ring, HashRing(compat=compat)):  # type: ignore[arg-type]
            with pytest.raises(EmptyRingError, match="no nodes"):
                empty.get("key")
            with pytest.raises(EmptyRingError):
                empty.get_n("key", 2)
    assert issubclass(EmptyRingError, LookupError)
    assert issubclass(EmptyRingError, ResilientError)
    error = pickle.loads(pickle.dumps(EmptyRingError("the ring has no nodes")))
    assert str(error) == "the ring has no nodes"


def test_removing_an_unknown_node_raises_key_error_naming_it() -> None:
    """remove() and set_weight() of a node that is not on the ring name the node."""
    ring = HashRing(["a"])
    with pytest.raises(KeyError, match="'ghost'"):
        ring.remove("ghost")
    with pytest.raises(KeyError, match="'ghost'"):
        ring.set_weight("ghost", 2)


def test_adding_an_existing_node_raises_and_points_to_set_weight() -> None:
    """A duplicate add is refused (it would silently change nothing or the weight)."""
    ring = HashRing(["a"])
    with pytest.raises(ValueError, match="set_weight"):
        ring.add("a")
    with pytest.raises(ValueError, match="twice"):
        HashRing(["a", "b", "a"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"vnodes": 0}, ValueError, "vnodes"),
        ({"vnodes": 2.5}, TypeError, "vnodes"),
        ({"vnodes": True}, TypeError, "vnodes"),
        ({"vnodes": 162, "compat": "ketama"}, ValueError, "multiple of 4"),
        ({"compat": "md5"}, ValueError, "compat"),
        ({"weights": {"a": 0}}, ValueError, r"weights\['a'\]"),
        ({"weights": {"a": -1}}, ValueError, r"weights\['a'\]"),
        ({"weights": {"a": math.nan}}, ValueError, r"weights\['a'\]"),
        ({"weights": {"a": math.inf}}, ValueError, r"weights\['a'\]"),
        ({"weights": {"a": "2"}}, TypeError, r"weights\['a'\]"),
        ({"weights": {"a": True}}, TypeError, r"weights\['a'\]"),
        ({"weights": {"zzz": 2}}, ValueError, "zzz"),
        ({"weights": [("a", 2)]}, TypeError, "weights"),
    ],
)
def test_bad_configuration_is_rejected_naming_the_parameter(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """Every bad constructor argument fails at construction with a message naming it."""
    with pytest.raises(error, match=message):
        HashRing(["a", "b"], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weight", "error"),
    [
        (0, ValueError),
        (-2, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (None, TypeError),
    ],
)
def test_bad_weights_are_rejected_by_add_and_set_weight(
    weight: object, error: type[Exception]
) -> None:
    """add() and set_weight() validate the weight before touching the ring."""
    ring = HashRing(["a"])
    with pytest.raises(error, match="weight"):
        ring.add("b", weight=weight)  # type: ignore[arg-type]
    with pytest.raises(error, match="weight"):
        ring.set_weight("a", weight)  # type: ignore[arg-type]
    assert ring.nodes == ("a",)
    assert ring.weights == {"a": 1}


@pytest.mark.parametrize(
    ("node", "error"), [("", ValueError), (7, TypeError), (b"a", TypeError), (None, TypeError)]
)
def test_node_ids_must_be_non_empty_strings(node: object, error: type[Exception]) -> None:
    """Node ids are non-empty str, whether given to the constructor or to add()."""
    with pytest.raises(error, match="node id"):
        HashRing([node])  # type: ignore[list-item]
    with pytest.raises(error, match="node id"):
        HashRing().add(node)  # type: ignore[arg-type]


def test_a_single_string_is_not_taken_for_a_list_of_nodes() -> None:
    """HashRing("abc") would otherwise build nodes 'a', 'b' and 'c'."""
    with pytest.raises(TypeError, match="iterable of node ids"):
        HashRing("abc")


@pytest.mark.parametrize("n", [0, -1])
def test_get_n_rejects_n_below_one(n: int) -> None:
    """A replica set of no nodes is a caller bug, reported as such."""
    with pytest.raises(ValueError, match="n must be at least 1"):
        HashRing(["a"]).get_n("key", n)


def test_introspection_reports_members_weights_and_mode() -> None:
    """len, in, nodes, weights and repr describe the ring; weights cannot be mutated."""
    ring = HashRing(["a", "b"], weights={"b": 2}, compat="ketama", vnodes=80)
    ring.add("c", weight=0.5)
    assert len(ring) == 3
    assert "b" in ring
    assert "z" not in ring
    assert 5 not in ring
    assert ring.nodes == ("a", "b", "c")
    assert dict(ring.weights) == {"a": 1, "b": 2, "c": 0.5}
    assert ring.vnodes == 80
    assert ring.compat == "ketama"
    with pytest.raises(TypeError):
        ring.weights["a"] = 5  # type: ignore[index]
    assert repr(ring) == (
        "HashRing(['a', 'b', 'c'], vnodes=80, weights={'b': 2, 'c': 0.5}, compat='ketama')"
    )
    big = HashRing([f"n{index}" for index in range(20)])
    assert repr(big) == (
        "HashRing(['n0', 'n1', 'n2', 'n3', 'n4', 'n5', 'n6', ..., 'n19'] (20 nodes), vnodes=160)"
    )
    view = big.bounded(c=1.5)
    assert view.c == 1.5
    view.assign("k")
    assert repr(view) == "BoundedLoadRing(c=1.5, nodes=20, assigned=1, capacity=1)"


# -- bounds on the number of points ------------------------------------------------------


def test_absurd_weight_is_refused_at_once_naming_the_node_and_weight() -> None:
    """A weight needing millions of points raises ValueError at once, everywhere it can enter."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"node 'big' with weight 1000000.0 .*160,000,000 points"):
        HashRing(["big", "small"], weights={"big": 1e6})
    ring = HashRing(["a", "b"])
    before = mapping(ring)
    with pytest.raises(ValueError, match="MAX_NODE_POINTS=1,048,576; weights are relative"):
        ring.add("big", 1e6)
    with pytest.raises(ValueError, match=r"node 'a' with weight 1e\+300 would need 1.6e\+302 "):
        ring.set_weight("a", 1e300)
    assert time.monotonic() - started < 1
    assert ring.nodes == ("a", "b")
    assert mapping(ring) == before  # a refused change leaves the ring as it was


def test_vnodes_beyond_the_node_bound_are_refused() -> None:
    """vnodes alone may not exceed what one node may have."""
    with pytest.raises(ValueError, match="vnodes must be at most MAX_NODE_POINTS"):
        HashRing(vnodes=hashring_module.MAX_NODE_POINTS + 1)


def test_point_bounds_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node may have exactly MAX_NODE_POINTS points and a ring MAX_RING_POINTS, not one more."""
    monkeypatch.setattr(hashring_module, "MAX_NODE_POINTS", 100)
    monkeypatch.setattr(hashring_module, "MAX_RING_POINTS", 250)
    ring = HashRing(["a"], vnodes=10, weights={"a": 10})  # 100 points: the bound itself
    ring.add("b", 10.04)  # 100.4 points round to 100: allowed
    with pytest.raises(ValueError, match=r"node 'c' with weight 10\.06 would need 101 points"):
        ring.add("c", 10.06)
    with pytest.raises(ValueError, match="the ring would have 260 points over 3 nodes"):
        ring.add("c", 6)
    ring.add("c", 5)  # 250 points in all: allowed
    assert len(ring) == 3
    # Ketama shares vnodes x nodes out by weight: x's share is 120 points.
    with pytest.raises(ValueError, match="node 'x' with weight 3 would need 120 points"):
        HashRing(["x", "y"], vnodes=80, weights={"x": 3}, compat="ketama")


# -- pickling and forking ------------------------------------------------------------------


@pytest.mark.parametrize("compat", [None, "ketama"])
def test_pickled_ring_routes_every_key_as_the_original(compat: str | None) -> None:
    """A ring pickles as its nodes, weights, vnodes and mode; the copy routes identically."""
    ring = HashRing(["a", "b", "c"], vnodes=40, weights={"b": 2.5}, compat=compat)  # type: ignore[arg-type]
    ring.add("d", 3)
    ring.set_weight("a", 0.5)
    ring.remove("c")
    copy = pickle.loads(pickle.dumps(ring))
    assert type(copy) is HashRing
    assert (copy.nodes, dict(copy.weights)) == (("a", "b", "d"), {"a": 0.5, "b": 2.5, "d": 3})
    assert (copy.vnodes, copy.compat, repr(copy)) == (40, compat, repr(ring))
    assert mapping(copy) == mapping(ring)
    assert [copy.get_n(key, 3) for key in KEYS] == [ring.get_n(key, 3) for key in KEYS]
    copy.add("e")  # the copy is a ring of its own, with its own lock
    assert "e" not in ring


def test_pickled_bounded_view_keeps_its_ring_c_and_assignments() -> None:
    """A bounded view pickles with its ring, c and the keys it holds; the copy carries on."""
    view = HashRing(["a", "b", "c"], compat="ketama").bounded(c=1.1)
    for index in range(30):
        view.assign(f"key-{index}")
    copy = pickle.loads(pickle.dumps(view))
    assert type(copy) is BoundedLoadRing
    assert (copy.c, copy.nodes, len(copy), copy.capacity) == (1.1, view.nodes, 30, view.capacity)
    assert [copy.load(node) for node in copy.nodes] == [view.load(node) for node in view.nodes]
    assert [copy.assign(f"key-{i}") for i in range(40)] == [
        view.assign(f"key-{i}") for i in range(40)
    ]
