"""resilient.HashRing against uhashring: lookup rate, build time, balance, churn, bounded loads.

Hashes. resilient's default mode hashes with xxh3_64 (64-bit points). uhashring's rings here
hash with mmh3: ``hash_fn=mmh3.hash`` (MurmurHash3_x86_32, 32-bit points), its fastest hash.
uhashring never picks mmh3 by itself -- without ``hash_fn`` its ``MetaRing`` hashes with md5
(``int(md5(str(key)).hexdigest(), 16)``), about twice as slow to build as with mmh3 -- so the
function is passed explicitly and each ring is checked to hash its keys and points with it.
In ketama mode both sides hash with md5: that is the continuum, and uhashring's ketama ring
ignores ``hash_fn``.

Both rings get the same distinct keys and node names, 160 points per node of weight 1
(uhashring's ketama mode: 40 digests of 4 points, which is what ``compat="ketama"``
reproduces). Lookups and builds are compared at 10, 100, 1,000 and 10,000 nodes in paired
rounds: in each round both sides run back to back on the same input (a fresh slice of keys
for lookups, so no round is served from a warm cache), taking turns at going first, and the
figure judged is the median over rounds of the per-round ratio. The machine is shared and
noisy: a slow moment slows both sides of a round alike, so ratios hold where absolute times
drift. Ketama lookups stop at 1,000 nodes: uhashring builds its ketama ring by ``insort`` of
each point, quadratic in the points -- about a second at 1,000 nodes, minutes at 10,000.
Balance and churn are averaged over 20 sets of node names, so one lucky or unlucky set of
names does not decide them. Every verdict is recorded as a target (see ``_targets.py``).

Run: ``make bench`` or ``.venv/bin/python benchmarks/hashring.py`` (about 40 s on two cores).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import version
from typing import Any

import mmh3
from _targets import record
from _timing import table
from uhashring import HashRing as UHashRing

from resilient.hashring import HashRing

SCRIPT = "hashring.py"
VNODES = 160
NODE_COUNTS = (10, 100, 1_000, 10_000)
KETAMA_NODE_COUNTS = (10, 100, 1_000)
LOOKUP_ROUNDS = 30
KEYS_PER_ROUND = 20_000
# (calls per timing, rounds) for each build size: about a second or less per size, but 10,000
# nodes, where one build takes 1.5-2 s a side.
BUILD_PLAN = {10: (20, 30), 100: (3, 20), 1_000: (1, 9), 10_000: (1, 3)}
KEY_COUNT = 200_000  # keys routed in the balance, churn and bounded-load sections
NAME_SETS = 20
BOUNDED_NODE_COUNTS = (10, 100)
BOUNDED_FACTORS = (1.25, 1.10)
LOOKUP_TARGET = {"default": 4.0, "ketama": 1.5}  # resilient get vs uhashring get_node
BUILD_TARGET = 0.5  # resilient build time / uhashring's

POOL = [f"user:{index}" for index in range((LOOKUP_ROUNDS + 1) * KEYS_PER_ROUND)]  # + warm-up
KEYS = POOL[:KEY_COUNT]


def node_names(name_set: int, count: int) -> list[str]:
    return [f"cache-{name_set}-{index}" for index in range(count)]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def uhashring_mmh3(nodes: Sequence[str]) -> Any:
    """uhashring's default ring over ``nodes``, hashing keys and points with mmh3.hash."""
    return UHashRing(list(nodes), vnodes=VNODES, hash_fn=mmh3.hash)


def check_uses_mmh3(ring: Any, nodes: Sequence[str]) -> None:
    """Fail unless ``ring`` hashes keys (hashi) and its points (f"{node}-{i}") with mmh3.hash."""
    probe = "user:probe"
    if ring.hashi(probe) != mmh3.hash(probe):
        raise RuntimeError("uhashring does not hash keys with mmh3.hash")
    points = ring.ring  # point -> node
    for node in (nodes[0], nodes[-1]):
        for index in (0, VNODES - 1):
            if mmh3.hash(f"{node}-{index}") not in points:
                raise RuntimeError("uhashring's points are not mmh3.hash of f'{node}-{i}'")


def paired_times(
    ours: Callable[[int], Any], theirs: Callable[[int], Any], rounds: int
) -> tuple[list[float], list[float]]:
    """Seconds of each side in each round; both get the round's index, and go first in turn.

    First one untimed call of each side, for caches and lazy state, with index ``rounds``.
    """
    ours(rounds)
    theirs(rounds)
    our_times: list[float] = []
    their_times: list[float] = []
    for round_index in range(rounds):
        sides = [(ours, our_times), (theirs, their_times)]
        for side, times in sides if round_index % 2 == 0 else sides[::-1]:
            started = time.perf_counter()
            side(round_index)
            times.append(time.perf_counter() - started)
    return our_times, their_times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def lookup_rows() -> tuple[list[list[object]], list[tuple[str, str, bool]]]:
    rows: list[list[object]] = []
    targets: list[tuple[str, str, bool]] = []
    slices = [
        POOL[index * KEYS_PER_ROUND : (index + 1) * KEYS_PER_ROUND]
        for index in range(LOOKUP_ROUNDS + 1)
    ]
    for mode in ("default", "ketama"):
        for count in NODE_COUNTS if mode == "default" else KETAMA_NODE_COUNTS:
            nodes = node_names(0, count)
            if mode == "ketama":
                ours = HashRing(nodes, vnodes=VNODES, compat="ketama")
                theirs = UHashRing(nodes, hash_fn="ketama")  # 40 digests x 4 points, md5
            else:
                ours = HashRing(nodes, vnodes=VNODES)
                theirs = uhashring_mmh3(nodes)
                check_uses_mmh3(theirs, nodes)
            answers: dict[str, list[list[str]]] = {"ours": [], "theirs": []}

            def run(
                round_index: int,
                get: Callable[[str], str],
                side: list[list[str]],
            ) -> None:
                side.append(list(map(get, slices[round_index])))

            our_times, their_times = paired_times(
                partial(run, get=ours.get, side=answers["ours"]),
                partial(run, get=theirs.get_node, side=answers["theirs"]),
                LOOKUP_ROUNDS,
            )
            ratio = median_ratio(their_times, our_times)
            target = LOOKUP_TARGET[mode]
            if mode == "ketama":
                pairs = [
                    (a, b)
                    for mine, yours in zip(answers["ours"], answers["theirs"], strict=True)
                    for a, b in zip(mine, yours, strict=True)
                ]
                agreement = f"{sum(a == b for a, b in pairs) / len(pairs):.4%}"
            else:
                agreement = "-"
            rows.append(
                [
                    mode,
                    count,
                    f"{KEYS_PER_ROUND / statistics.median(our_times) / 1e6:.2f} M/s",
                    f"{KEYS_PER_ROUND / statistics.median(their_times) / 1e6:.2f} M/s",
                    f"{ratio:.2f}x",
                    agreement,
                    f">= {target}x {verdict(ratio >= target)}",
                ]
            )
            theirs_name = "uhashring ketama (md5)" if mode == "ketama" else "uhashring (mmh3)"
            targets.append(
                (
                    f"{mode} get, {count:,} nodes >= {target}x {theirs_name} get_node",
                    f"{ratio:.2f}x (median of {LOOKUP_ROUNDS} paired rounds)",
                    ratio >= target,
                )
            )
            del ours, theirs, answers
    return rows, targets


def build_rows() -> tuple[list[list[object]], list[tuple[str, str, bool]]]:
    rows: list[list[object]] = []
    targets: list[tuple[str, str, bool]] = []
    for count in NODE_COUNTS:
        nodes = node_names(0, count)
        check_uses_mmh3(uhashring_mmh3(nodes), nodes)
        number, rounds = BUILD_PLAN[count]

        def build(round_index: int, make: Callable[[], Any], number: int = number) -> None:
            for _ in range(number):
                make()

        our_times, their_times = paired_times(
            partial(build, make=partial(HashRing, nodes, vnodes=VNODES)),
            partial(build, make=partial(uhashring_mmh3, nodes)),
            rounds,
        )
        ratio = median_ratio(our_times, their_times)
        rows.append(
            [
                count,
                f"{statistics.median(our_times) / number * 1e3:.2f} ms",
                f"{statistics.median(their_times) / number * 1e3:.2f} ms",
                f"{ratio:.2f}",
                f"<= {BUILD_TARGET:.2f} {verdict(ratio <= BUILD_TARGET)}",
            ]
        )
        targets.append(
            (
                f"build, {count:,} nodes: resilient / uhashring (mmh3) time <= {BUILD_TARGET:.2f}",
                f"{ratio:.2f} (median of {rounds} paired rounds)",
                ratio <= BUILD_TARGET,
            )
        )
    return rows, targets


def spread(owners: list[str], nodes: Sequence[str]) -> tuple[float, float]:
    """(stddev/mean, max/mean) of the number of keys per node."""
    counts = Counter(owners)
    per_node = [counts[node] for node in nodes]
    mean = statistics.fmean(per_node)
    return statistics.pstdev(per_node) / mean, max(per_node) / mean


def moves(before: list[str], after: list[str], *, changed: str) -> tuple[int, int]:
    """Keys whose owner changed, and how many of those moved between unchanged nodes."""
    moved = stray = 0
    for old, new in zip(before, after, strict=True):
        if old != new:
            moved += 1
            stray += old != changed and new != changed
    return moved, stray


def balance_and_churn_rows() -> tuple[
    list[list[object]], list[list[object]], list[tuple[str, str, bool]]
]:
    ours_spread: list[tuple[float, float]] = []
    theirs_spread: list[tuple[float, float]] = []
    added_fractions: list[float] = []
    removed_fractions: list[float] = []
    stray_moves = 0
    for name_set in range(NAME_SETS):
        nodes = node_names(name_set, 11)
        ten, newcomer = nodes[:10], nodes[10]
        leaver = ten[name_set % 10]
        ring = HashRing(ten, vnodes=VNODES)
        before = list(map(ring.get, KEYS))
        ours_spread.append(spread(before, ten))
        theirs_spread.append(spread(list(map(uhashring_mmh3(ten).get_node, KEYS)), ten))

        ring.add(newcomer)
        moved, stray = moves(before, list(map(ring.get, KEYS)), changed=newcomer)
        added_fractions.append(moved / KEY_COUNT)
        stray_moves += stray

        ring.remove(newcomer)
        ring.remove(leaver)
        moved, stray = moves(before, list(map(ring.get, KEYS)), changed=leaver)
        removed_fractions.append(moved / KEY_COUNT)
        stray_moves += stray

    def mean_of(values: list[tuple[float, float]], index: int) -> float:
        return statistics.fmean(value[index] for value in values)

    targets: list[tuple[str, str, bool]] = []
    balance: list[list[object]] = []
    for index, metric, limit in ((0, "stddev/mean", 0.085), (1, "max/mean", 1.15)):
        ours = mean_of(ours_spread, index)
        balance.append(
            [
                metric,
                f"{ours:.4f}",
                f"{mean_of(theirs_spread, index):.4f}",
                f"<= {limit} {verdict(ours <= limit)}",
            ]
        )
        targets.append(
            (f"keys per node {metric}, 10 nodes <= {limit}", f"{ours:.4f}", ours <= limit)
        )
    churn: list[list[object]] = []
    for change, fractions, ideal in (
        ("add an 11th node", added_fractions, 1 / 11),
        ("remove 1 of 10 nodes", removed_fractions, 1 / 10),
    ):
        mean_moved = statistics.fmean(fractions)
        ok = abs(mean_moved / ideal - 1) <= 0.05
        churn.append(
            [
                change,
                f"{mean_moved:.4f}",
                f"{ideal:.4f}",
                f"{mean_moved / ideal:.3f}",
                f"{min(fractions) / ideal:.2f}-{max(fractions) / ideal:.2f}",
                f"within 5% {verdict(ok)}",
            ]
        )
        targets.append(
            (f"keys moved to {change} within 5% of ideal", f"{mean_moved / ideal:.3f}x ideal", ok)
        )
    churn.append(
        [
            "keys moved between unchanged nodes",
            stray_moves,
            0,
            "-",
            "-",
            f"zero {verdict(stray_moves == 0)}",
        ]
    )
    targets.append(("keys moved between unchanged nodes == 0", str(stray_moves), stray_moves == 0))
    return balance, churn, targets


def bounded_rows() -> tuple[list[list[object]], list[tuple[str, str, bool]]]:
    rows: list[list[object]] = []
    targets: list[tuple[str, str, bool]] = []
    for count in BOUNDED_NODE_COUNTS:
        ring = HashRing(node_names(0, count), vnodes=VNODES)
        mean = KEY_COUNT / count
        _, plain_max = spread(list(map(ring.get, KEYS)), ring.nodes)
        for factor in BOUNDED_FACTORS:
            view = ring.bounded(c=factor)
            started = time.perf_counter()
            for key in KEYS:
                view.assign(key)
            elapsed = time.perf_counter() - started
            worst = max(view.load(node) for node in ring.nodes) / mean
            rows.append(
                [
                    count,
                    factor,
                    f"{worst:.4f}",
                    f"{plain_max:.4f}",
                    f"{KEY_COUNT / elapsed / 1e6:.2f} M/s",
                    f"<= c {verdict(worst <= factor)}",
                ]
            )
            targets.append(
                (
                    f"bounded max/mean keys per node, {count} nodes, c={factor} <= c",
                    f"{worst:.4f}",
                    worst <= factor,
                )
            )
    return rows, targets


def record_all(targets: list[tuple[str, str, bool]]) -> None:
    for target, figure, met in targets:
        record(SCRIPT, target, figure, met)


def main() -> None:
    started = time.perf_counter()
    print(
        f"resilient.HashRing vs uhashring {version('uhashring')} -- Python "
        f"{platform.python_version()}, {VNODES} points per node"
    )
    print(
        "Hashes: resilient default xxh3_64, ketama md5; uhashring default "
        f"mmh3.hash (mmh3 {version('mmh3')}, passed as hash_fn and checked), ketama md5"
    )
    section = time.perf_counter()
    print(
        f"\nLookups per second (get vs get_node, the same keys on the same nodes), "
        f"{LOOKUP_ROUNDS} paired rounds of {KEYS_PER_ROUND:,} fresh keys; speedup is the median "
        "of the per-round ratios"
    )
    rows, targets = lookup_rows()
    table(rows, ["mode", "nodes", "resilient", "uhashring", "speedup", "same node", "target"])
    record_all(targets)
    print(f"  ({time.perf_counter() - section:.0f} s)")

    section = time.perf_counter()
    print("\nBuild time (constructor with all nodes); ratio is the median of per-round ratios")
    rows, targets = build_rows()
    table(rows, ["nodes", "resilient", "uhashring (mmh3)", "ratio", "target"])
    record_all(targets)
    print(f"  ({time.perf_counter() - section:.0f} s)")

    section = time.perf_counter()
    balance, churn, targets = balance_and_churn_rows()
    print(
        f"\nKeys per node, 10 nodes, {KEY_COUNT:,} keys, mean over {NAME_SETS} sets of node names"
    )
    table(balance, ["metric", "resilient", "uhashring (mmh3)", "target"])
    print(f"\nKeys moved by a membership change (resilient), mean over {NAME_SETS} name sets")
    table(churn, ["change", "moved", "ideal", "moved/ideal", "range", "target"])
    record_all(targets)
    print(f"  ({time.perf_counter() - section:.0f} s)")

    section = time.perf_counter()
    print(f"\nBounded loads (resilient), {KEY_COUNT:,} keys assigned, max/mean keys per node")
    rows, targets = bounded_rows()
    table(rows, ["nodes", "c", "bounded", "plain ring", "assign rate", "target"])
    record_all(targets)
    print(f"  ({time.perf_counter() - section:.0f} s)")
    print(f"\nTotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
