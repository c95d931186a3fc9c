"""resilient.HashRing against uhashring: lookup rate, build time, balance, churn, bounded loads.

Both rings get the same one million distinct keys and the same node names, 160 points per node
of weight 1 (uhashring's ketama mode: 40 digests of 4 points, which is what ``compat="ketama"``
reproduces). Timings are interleaved -- one run of each side in turn -- and each side keeps its
best run, because the machine is shared and noisy: the least disturbed run is the best estimate.
Balance and churn are averaged over 20 sets of node names, so one lucky or unlucky set of names
does not decide them. The ``target`` column says whether the result meets the goal it was
built for.

Run: ``.venv/bin/python benchmarks/hashring.py`` (about two minutes on two cores).
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

from _timing import best_of, table
from uhashring import HashRing as UHashRing

from resilient.hashring import HashRing

KEY_COUNT = 1_000_000
NAME_SETS = 20
VNODES = 160
NODE_COUNTS = (10, 100)
LOOKUP_ROUNDS = 3
BOUNDED_FACTORS = (1.25, 1.10)

KEYS = [f"user:{index}" for index in range(KEY_COUNT)]


def node_names(name_set: int, count: int) -> list[str]:
    return [f"cache-{name_set}-{index}" for index in range(count)]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def interleaved_best(
    sides: Sequence[Callable[[], Any]], rounds: int, number: int = 1
) -> list[float]:
    """Best seconds per call of each side, the sides taking turns run by run."""
    best = [float("inf")] * len(sides)
    for _ in range(rounds):
        for index, side in enumerate(sides):
            best[index] = min(best[index], best_of(side, repeat=1, number=number))
    return best


def lookup_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for compat in (None, "ketama"):
        for count in NODE_COUNTS:
            nodes = node_names(0, count)
            ours = HashRing(nodes, vnodes=VNODES, compat=compat)
            if compat == "ketama":
                theirs = UHashRing(nodes, hash_fn="ketama")  # 40 digests x 4 points
            else:
                theirs = UHashRing(nodes, vnodes=VNODES)
            our_get, their_get = ours.get, theirs.get_node
            answers: dict[str, list[str]] = {}

            def run_ours(
                get: Callable[[str], str] = our_get, answers: dict[str, list[str]] = answers
            ) -> None:
                answers["ours"] = list(map(get, KEYS))

            def run_theirs(
                get: Callable[[str], str] = their_get, answers: dict[str, list[str]] = answers
            ) -> None:
                answers["theirs"] = list(map(get, KEYS))

            our_time, their_time = interleaved_best([run_ours, run_theirs], LOOKUP_ROUNDS)
            ratio = their_time / our_time
            target = 1.5 if compat == "ketama" else 4.0
            if compat == "ketama":
                agreeing = sum(
                    a == b for a, b in zip(answers["ours"], answers["theirs"], strict=True)
                )
                agreement = f"{agreeing / KEY_COUNT:.4%}"
            else:
                agreement = "-"
            rows.append(
                [
                    compat or "default",
                    count,
                    f"{KEY_COUNT / our_time / 1e6:.2f} M/s",
                    f"{KEY_COUNT / their_time / 1e6:.2f} M/s",
                    f"{ratio:.1f}x",
                    agreement,
                    f">= {target}x {verdict(ratio >= target)}",
                ]
            )
    return rows


def build_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for count in NODE_COUNTS:
        nodes = node_names(0, count)
        rounds = 40 if count <= 10 else 12
        our_time, their_time = interleaved_best(
            [partial(HashRing, nodes, vnodes=VNODES), partial(UHashRing, nodes, vnodes=VNODES)],
            rounds,
            number=5,
        )
        ratio = our_time / their_time
        rows.append(
            [
                count,
                f"{our_time * 1e3:.2f} ms",
                f"{their_time * 1e3:.2f} ms",
                f"{ratio:.2f}",
                f"<= 0.50 {verdict(ratio <= 0.5)}",
            ]
        )
    return rows


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


def balance_and_churn_rows() -> tuple[list[list[object]], list[list[object]]]:
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
        theirs_spread.append(spread(list(map(UHashRing(ten, vnodes=VNODES).get_node, KEYS)), ten))

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

    balance: list[list[object]] = [
        [
            "stddev/mean",
            f"{mean_of(ours_spread, 0):.4f}",
            f"{mean_of(theirs_spread, 0):.4f}",
            f"<= 0.085 {verdict(mean_of(ours_spread, 0) <= 0.085)}",
        ],
        [
            "max/mean",
            f"{mean_of(ours_spread, 1):.4f}",
            f"{mean_of(theirs_spread, 1):.4f}",
            f"<= 1.15 {verdict(mean_of(ours_spread, 1) <= 1.15)}",
        ],
    ]
    churn: list[list[object]] = []
    for change, fractions, ideal in (
        ("add an 11th node", added_fractions, 1 / 11),
        ("remove 1 of 10 nodes", removed_fractions, 1 / 10),
    ):
        mean_moved = statistics.fmean(fractions)
        churn.append(
            [
                change,
                f"{mean_moved:.4f}",
                f"{ideal:.4f}",
                f"{mean_moved / ideal:.3f}",
                f"{min(fractions) / ideal:.2f}-{max(fractions) / ideal:.2f}",
                f"within 5% {verdict(abs(mean_moved / ideal - 1) <= 0.05)}",
            ]
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
    return balance, churn


def bounded_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for count in NODE_COUNTS:
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
    return rows


def main() -> None:
    started = time.perf_counter()
    print(
        f"resilient.HashRing vs uhashring {version('uhashring')} -- Python "
        f"{platform.python_version()}, {KEY_COUNT:,} distinct keys, {VNODES} points per node"
    )
    print("\nLookups per second (get vs get_node, the same keys on the same nodes)")
    table(
        lookup_rows(),
        ["mode", "nodes", "resilient", "uhashring", "speedup", "same node", "target"],
    )
    print("\nBuild time (constructor with all nodes)")
    table(build_rows(), ["nodes", "resilient", "uhashring", "ratio", "target"])
    balance, churn = balance_and_churn_rows()
    print(f"\nKeys per node, 10 nodes, mean over {NAME_SETS} sets of node names")
    table(balance, ["metric", "resilient", "uhashring", "target"])
    print(f"\nKeys moved by a membership change (resilient), mean over {NAME_SETS} name sets")
    table(churn, ["change", "moved", "ideal", "moved/ideal", "range", "target"])
    print(f"\nBounded loads (resilient), {KEY_COUNT:,} keys assigned, max/mean keys per node")
    table(bounded_rows(), ["nodes", "c", "bounded", "plain ring", "assign rate", "target"])
    print(f"\nTotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
