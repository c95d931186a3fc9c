"""Version vectors: which of two writes of one key happened after the other, if either.

A replicated key has no single clock to order its writes, so each write carries a
*version vector*: one counter per writer (a cluster client's id), a plain
``dict[str, int]`` on the wire. Version ``a`` :func:`descends` ``b`` when every
counter of ``a`` is at least ``b``'s (a missing writer counts as 0): the write of
``a`` saw the write of ``b``, so ``b`` is obsolete. When neither descends the other
the writes are :func:`concurrent` and both are kept as :class:`Sibling` values until
a writer resolves them (a write whose version is the :func:`merge` of theirs,
advanced for the writer with :func:`advance`).

:func:`reconcile` keeps exactly the siblings nothing else descends: that is what a
read returns and what read repair writes back. :func:`newest_wins` is the optional
last-writer-wins pick among them, by the writers' wall clocks: it silently drops
concurrent writes and trusts clocks that skew, so it is a convenience, not a
guarantee.

Public API: :data:`VersionVector`, :func:`descends`, :func:`dominates`,
:func:`concurrent`, :func:`merge`, :func:`advance`, :func:`validate_version`,
:class:`Sibling`, :func:`reconcile`, :func:`newest_wins`. Stdlib only, no I/O.
Wire validation raises :class:`TypeError` (wrong type) or :class:`ValueError` (a
right type with a wrong value); both name the field and the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "Sibling",
    "VersionVector",
    "advance",
    "concurrent",
    "descends",
    "dominates",
    "merge",
    "newest_wins",
    "reconcile",
    "validate_version",
]

#: writer id -> counter; a writer that is absent counts as 0.
VersionVector: TypeAlias = dict[str, int]

_WIRE_FIELDS = frozenset({"value", "version", "timestamp", "deleted"})


def descends(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Whether ``a`` happened after or equal to ``b``: every counter of ``a`` >= ``b``'s."""
    return all(a.get(writer, 0) >= counter for writer, counter in b.items())


def dominates(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Whether ``a`` happened strictly after ``b`` (descends it and is not equal)."""
    return descends(a, b) and not descends(b, a)


def concurrent(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Whether neither of ``a`` and ``b`` saw the other: both writes must be kept."""
    return not descends(a, b) and not descends(b, a)


def merge(*vectors: Mapping[str, int]) -> VersionVector:
    """The entrywise maximum: the smallest version that descends every one given.

    Zero counters are left out, so equal versions have equal dicts.
    """
    merged: VersionVector = {}
    for vector in vectors:
        for writer, counter in vector.items():
            if counter > merged.get(writer, 0):
                merged[writer] = counter
    return merged


def advance(version: Mapping[str, int], writer: str) -> VersionVector:
    """A copy of ``version`` with ``writer``'s counter one higher: the version of its next write.

    >>> advance(merge({"a": 2}, {"b": 1}), "a")
    {'a': 3, 'b': 1}
    """
    if not isinstance(writer, str) or not writer:
        raise ValueError(f"writer must be a non-empty str, got {writer!r}")
    advanced = merge(version)
    advanced[writer] = advanced.get(writer, 0) + 1
    return advanced


def validate_version(obj: Any, *, field: str = "version") -> VersionVector:
    """``obj`` as a version vector (a fresh dict), or a clear error naming ``field``.

    A version is a JSON object of non-empty writer ids to non-negative integer
    counters (booleans and floats refused).
    """
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{field} must be an object of writer id -> counter, got {type(obj).__name__}: "
            f"{obj!r:.200}"
        )
    version: VersionVector = {}
    for writer, counter in obj.items():
        if not isinstance(writer, str) or not writer:
            raise ValueError(
                f"{field} has a writer id that is not a non-empty str: {writer!r:.200}"
            )
        if not isinstance(counter, int) or isinstance(counter, bool):
            raise TypeError(
                f"{field}[{writer!r:.200}] must be an int counter, "
                f"got {type(counter).__name__}: {counter!r:.200}"
            )
        if counter < 0:
            raise ValueError(f"{field}[{writer!r:.200}] must be >= 0, got {counter}")
        version[writer] = counter
    return version


def _validate_timestamp(obj: Any) -> float:
    if not isinstance(obj, int | float) or isinstance(obj, bool):
        raise TypeError(f"timestamp must be a number, got {type(obj).__name__}: {obj!r:.200}")
    timestamp = float(obj)
    if not math.isfinite(timestamp):
        raise ValueError(f"timestamp must be finite, got {obj!r}")
    return timestamp


@dataclass(frozen=True, slots=True)
class Sibling:
    """One stored write of a key: its value, its version, and whether it is a delete.

    A delete is a *tombstone* (``deleted=True``, ``value=None``) rather than an
    absence, so it can be ordered against the writes it removes and against later
    ones. ``timestamp`` is the writer's wall clock (seconds), used only by
    :func:`newest_wins`. The version is copied and validated on construction.
    """

    value: Any
    version: VersionVector
    timestamp: float
    deleted: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", validate_version(self.version))
        object.__setattr__(self, "timestamp", _validate_timestamp(self.timestamp))
        if not isinstance(self.deleted, bool):
            raise TypeError(
                f"deleted must be a bool, got {type(self.deleted).__name__}: {self.deleted!r:.200}"
            )
        if self.deleted and self.value is not None:
            raise ValueError(f"a tombstone (deleted=True) has value None, got {self.value!r:.200}")

    def to_wire(self) -> dict[str, Any]:
        """The JSON object for this sibling: ``value``, ``version``, ``timestamp``, ``deleted``."""
        return {
            "value": self.value,
            "version": dict(self.version),
            "timestamp": self.timestamp,
            "deleted": self.deleted,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> Sibling:
        """The sibling a JSON object describes (:meth:`to_wire`'s inverse), validated.

        ``value``, ``version`` and ``timestamp`` are required, ``deleted`` defaults
        to false; an unknown field is an error rather than silently dropped.
        """
        if not isinstance(obj, Mapping):
            raise TypeError(f"a sibling must be an object, got {type(obj).__name__}: {obj!r:.200}")
        unknown = set(obj) - _WIRE_FIELDS
        if unknown:
            raise ValueError(
                f"a sibling has unknown field(s) {sorted(map(str, unknown))}; "
                f"expected {sorted(_WIRE_FIELDS)}"
            )
        missing = {"value", "version", "timestamp"} - set(obj)
        if missing:
            raise ValueError(f"a sibling is missing field(s) {sorted(missing)}")
        return cls(
            value=obj["value"],
            version=obj["version"],
            timestamp=obj["timestamp"],
            deleted=obj.get("deleted", False),
        )


def _order(sibling: Sibling) -> tuple[float, list[tuple[str, int]], bool, str]:
    # Deterministic on every replica and client: wall clock first, then the version
    # (zero counters left out, so equal versions compare equal), then the contents.
    canonical = sorted((writer, counter) for writer, counter in sibling.version.items() if counter)
    return (sibling.timestamp, canonical, sibling.deleted, repr(sibling.value))


def reconcile(siblings: Iterable[Sibling]) -> list[Sibling]:
    """The siblings no other one descends, oldest first, each version once.

    What a read of several replicas returns: obsolete writes dropped, concurrent
    ones kept. Two siblings with equal versions are the same write (a duplicate
    from two replicas) and collapse to one; should their contents differ (a buggy
    writer reused a version) the same one is kept everywhere, the greatest in the
    output order (timestamp, version, deleted, ``repr(value)``).
    """
    kept: list[Sibling] = []
    for candidate in siblings:
        if not isinstance(candidate, Sibling):
            raise TypeError(
                f"reconcile takes Sibling objects, got {type(candidate).__name__}: "
                f"{candidate!r:.200}"
            )
        survivors: list[Sibling] = []
        add = True
        for other in kept:
            if descends(other.version, candidate.version):
                if descends(candidate.version, other.version) and _order(candidate) > _order(other):
                    continue  # equal versions: the greater one replaces the other
                add = False
                survivors.append(other)
            elif not descends(candidate.version, other.version):
                survivors.append(other)  # concurrent: both stay
        if add:
            survivors.append(candidate)
        kept = survivors
    kept.sort(key=_order)
    return kept


def newest_wins(siblings: Iterable[Sibling]) -> Sibling | None:
    """The last-writer-wins pick: the reconciled sibling with the latest timestamp.

    Causality comes first (a sibling another descends never wins, whatever its
    clock says); only among concurrent siblings does the writers' wall clock
    decide, ties broken the same way everywhere. ``None`` when there are none; the
    winner may be a tombstone (the key reads as deleted).

    Caveat: this drops every concurrent write but one, and the writers' clocks
    skew, so a write that happened later by real time can lose to one from a
    writer whose clock runs ahead. Under contention LWW stores lose many
    acknowledged writes; keep siblings when that matters.
    """
    survivors = reconcile(siblings)
    return survivors[-1] if survivors else None
