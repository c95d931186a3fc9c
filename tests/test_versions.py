"""Version vectors and siblings: the ordering rules a replicated key relies on."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from resilient.rpc.versions import (
    Sibling,
    advance,
    concurrent,
    descends,
    dominates,
    merge,
    newest_wins,
    reconcile,
    validate_version,
)


def test_descends_is_entrywise_with_missing_writers_as_zero() -> None:
    """A version descends another when it saw all of that one's writes; absent means 0."""
    assert descends({"a": 2, "b": 1}, {"a": 1})
    assert descends({"a": 1}, {"a": 1})
    assert descends({"a": 1}, {})
    assert descends({"a": 1}, {"b": 0})
    assert not descends({"a": 1}, {"a": 2})
    assert not descends({}, {"a": 1})
    assert not descends({"a": 3}, {"a": 1, "b": 1})


def test_dominates_is_strict() -> None:
    """A write dominates only writes strictly before it, never itself or an equal version."""
    assert dominates({"a": 2}, {"a": 1})
    assert dominates({"a": 1, "b": 1}, {"a": 1})
    assert not dominates({"a": 1}, {"a": 1})
    assert not dominates({"a": 1, "b": 0}, {"a": 1})  # a zero counter is no write
    assert not dominates({"a": 1}, {"a": 2})


def test_concurrent_when_neither_saw_the_other() -> None:
    """Two writers that each missed the other's write are concurrent; ordered ones are not."""
    assert concurrent({"a": 1}, {"b": 1})
    assert concurrent({"a": 2, "b": 1}, {"a": 1, "b": 2})
    assert not concurrent({"a": 1}, {"a": 2})
    assert not concurrent({"a": 1}, {"a": 1})


def test_merge_is_the_least_upper_bound() -> None:
    """merge descends every input and drops zero counters, so equal versions compare equal."""
    vectors = [{"a": 1, "b": 3}, {"a": 2}, {"c": 1, "d": 0}]
    merged = merge(*vectors)
    assert merged == {"a": 2, "b": 3, "c": 1}
    assert all(descends(merged, vector) for vector in vectors)
    assert merge() == {}
    assert merge({"a": 0}) == {}


def test_merge_does_not_alias_its_inputs() -> None:
    """Changing the merged dict leaves the inputs alone."""
    source = {"a": 1}
    merged = merge(source)
    merged["a"] = 5
    assert source == {"a": 1}


def test_advance_makes_a_version_that_dominates_everything_seen() -> None:
    """A writer's next version dominates the merge of what it read, and only its counter moves."""
    seen = [{"a": 2}, {"b": 1}]
    version = advance(merge(*seen), "a")
    assert version == {"a": 3, "b": 1}
    assert all(dominates(version, s) for s in seen)
    assert advance({}, "new") == {"new": 1}
    with pytest.raises(ValueError, match="writer"):
        advance({}, "")


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        ([("a", 1)], TypeError, "version must be an object"),
        ({"": 1}, ValueError, "writer id"),
        ({1: 1}, ValueError, "writer id"),
        ({"a": 1.0}, TypeError, r"version\['a'\] must be an int"),
        ({"a": True}, TypeError, r"version\['a'\] must be an int"),
        ({"a": -1}, ValueError, r"must be >= 0, got -1"),
    ],
)
def test_validate_version_names_the_problem(
    obj: object, error: type[Exception], match: str
) -> None:
    """A malformed version is refused with the field and the offending value named."""
    with pytest.raises(error, match=match):
        validate_version(obj)


def test_validate_version_returns_a_copy_and_names_the_field() -> None:
    """A valid version comes back as a fresh dict; the caller's field name is in errors."""
    source = {"a": 1}
    copy = validate_version(source)
    assert copy == source
    assert copy is not source
    with pytest.raises(TypeError, match=r"^params\.v must be"):
        validate_version(None, field="params.v")


def test_sibling_round_trips_through_the_wire() -> None:
    """to_wire gives plain JSON types and from_wire reads it back to an equal sibling."""
    sibling = Sibling({"n": [1, 2]}, {"a": 1}, 12.5)
    wire = sibling.to_wire()
    assert wire == {
        "value": {"n": [1, 2]},
        "version": {"a": 1},
        "timestamp": 12.5,
        "deleted": False,
    }
    assert Sibling.from_wire(wire) == sibling
    tombstone = Sibling(None, {"a": 2}, 13, deleted=True)
    assert Sibling.from_wire(tombstone.to_wire()) == tombstone
    assert Sibling.from_wire({"value": 1, "version": {}, "timestamp": 0}).deleted is False


def test_sibling_copies_its_version() -> None:
    """Mutating the dict a sibling was built from, or its wire form, cannot change the sibling."""
    version = {"a": 1}
    sibling = Sibling("v", version, 1.0)
    version["a"] = 9
    sibling.to_wire()["version"]["a"] = 7
    assert sibling.version == {"a": 1}
    assert isinstance(sibling.timestamp, float)


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        ("x", TypeError, "a sibling must be an object"),
        ({"value": 1, "version": {}, "timestamp": 0, "extra": 1}, ValueError, "unknown field"),
        ({"value": 1, "timestamp": 0}, ValueError, r"missing field\(s\) \['version'\]"),
        ({"value": 1, "version": {"a": "1"}, "timestamp": 0}, TypeError, "int counter"),
        ({"value": 1, "version": {}, "timestamp": "now"}, TypeError, "timestamp must be a number"),
        ({"value": 1, "version": {}, "timestamp": True}, TypeError, "timestamp must be a number"),
        ({"value": 1, "version": {}, "timestamp": math.inf}, ValueError, "finite"),
        ({"value": 1, "version": {}, "timestamp": 0, "deleted": 1}, TypeError, "deleted must be"),
        ({"value": 1, "version": {}, "timestamp": 0, "deleted": True}, ValueError, "tombstone"),
    ],
)
def test_from_wire_refuses_malformed_siblings(
    obj: object, error: type[Exception], match: str
) -> None:
    """Each kind of malformed sibling gets an error that says which field is wrong."""
    with pytest.raises(error, match=match):
        Sibling.from_wire(obj)


def test_reconcile_drops_obsolete_and_keeps_concurrent() -> None:
    """Writes another descends disappear; concurrent ones all stay, oldest first."""
    old = Sibling("old", {"a": 1}, 1.0)
    left = Sibling("left", {"a": 2}, 3.0)
    right = Sibling("right", {"a": 1, "b": 1}, 2.0)
    assert reconcile([old, left, right]) == [right, left]
    assert reconcile([]) == []


def test_reconcile_collapses_duplicates_from_several_replicas() -> None:
    """The same write read from three replicas is one sibling."""
    write = Sibling("v", {"a": 1}, 1.0)
    assert reconcile([write, Sibling("v", {"a": 1, "b": 0}, 1.0), write]) == [write]


def test_reconcile_is_deterministic_for_a_reused_version() -> None:
    """Two contents under one version (a buggy writer) resolve to the same one in any order."""
    first = Sibling("x", {"a": 1}, 1.0)
    second = Sibling("y", {"a": 1}, 1.0)
    for order in itertools.permutations([first, second, first]):
        assert reconcile(order) == [second]


def test_reconcile_result_does_not_depend_on_input_order() -> None:
    """Every replica and client reconciling the same siblings gets the same list."""
    rng = random.Random(7)
    writers = ["a", "b", "c"]
    siblings = [
        Sibling(i, {w: rng.randint(0, 3) for w in writers}, float(rng.randint(0, 4)))
        for i in range(12)
    ]
    expected = reconcile(siblings)
    for _ in range(20):
        shuffled = siblings[:]
        rng.shuffle(shuffled)
        assert reconcile(shuffled) == expected
    for kept in expected:
        assert not any(dominates(other.version, kept.version) for other in siblings)
        assert not any(dominates(kept.version, other.version) for other in expected)


def test_reconcile_orders_tombstones_like_writes() -> None:
    """A delete that saw a write removes it; a write after the delete removes the tombstone."""
    write = Sibling("v", {"a": 1}, 1.0)
    delete = Sibling(None, {"a": 2}, 2.0, deleted=True)
    rewrite = Sibling("w", {"a": 2, "b": 1}, 3.0)
    assert reconcile([write, delete]) == [delete]
    assert reconcile([write, delete, rewrite]) == [rewrite]
    concurrent_write = Sibling("c", {"a": 1, "b": 1}, 0.5)
    assert reconcile([delete, concurrent_write]) == [concurrent_write, delete]


def test_reconcile_refuses_non_siblings() -> None:
    """Passing wire dicts instead of Sibling objects is a TypeError, not a silent mix-up."""
    with pytest.raises(TypeError, match="reconcile takes Sibling objects"):
        reconcile([{"value": 1, "version": {}, "timestamp": 0}])  # type: ignore[list-item]


def test_newest_wins_picks_the_latest_clock_among_concurrent() -> None:
    """LWW picks the concurrent sibling with the greatest timestamp; None when empty."""
    early = Sibling("early", {"a": 1}, 1.0)
    late = Sibling("late", {"b": 1}, 2.0)
    assert newest_wins([late, early]) == late
    assert newest_wins([]) is None


def test_newest_wins_respects_causality_over_clocks() -> None:
    """A later write from a writer whose clock lags still beats the write it saw."""
    first = Sibling("first", {"a": 1}, 100.0)
    after_it = Sibling("second", {"a": 1, "b": 1}, 50.0)  # writer b's clock is behind
    assert newest_wins([first, after_it]) == after_it


def test_newest_wins_breaks_clock_ties_the_same_way_everywhere() -> None:
    """Equal timestamps are broken by version, so every client picks the same winner."""
    a = Sibling("a", {"a": 1}, 5.0)
    b = Sibling("b", {"b": 1}, 5.0)
    assert newest_wins([a, b]) == newest_wins([b, a]) == b


def test_newest_wins_may_pick_a_tombstone() -> None:
    """If the newest concurrent write is a delete, LWW says the key is deleted."""
    write = Sibling("v", {"a": 1}, 1.0)
    delete = Sibling(None, {"b": 1}, 2.0, deleted=True)
    winner = newest_wins([write, delete])
    assert winner is not None
    assert winner.deleted
