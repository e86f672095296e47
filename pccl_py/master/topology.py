"""Ring ordering from measured bandwidths, as pure functions: which order of the peers
makes the fastest ring all-reduce, and which pairs to probe in which rounds.

A pipelined ring all-reduce moves every byte over every directed hop at the same
rate, so it runs at the speed of its slowest hop. The objective, best first:

1. as few hops of *unknown* bandwidth as possible (a pair nobody has measured is
   used only when no ring avoids it: a joiner, a failed probe);
2. the largest bottleneck: the minimum measured bandwidth over the ring's hops;
3. the smallest sum of 1/bandwidth over the measured hops (the time one byte needs to
   travel all the way round): among rings with the same bottleneck, the faster ones.

`ring_cost()` computes this key; `solve_ring()` minimises it: exactly for up to
`EXACT_LIMIT` peers (Held-Karp dynamic programming over subsets, with a binary search
over the bottleneck threshold), and above that with a time-bounded local search
(or-opt, swap and reversal moves on a leximin key, random restarts), which is
deterministic for a seed when it stops on `max_restarts` rather than on time.

Bandwidths are directed: `bw[(a, b)]` is what `a` sends to `b`, in bytes per second.
The output always starts at the smallest peer id, so a ring has one spelling.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Pair = tuple[int, int]
Bandwidths = Mapping[Pair, float]

EXACT_LIMIT = 10


@dataclass(frozen=True, order=True)
class RingCost:
    """Lower is better (compare the objects, or use `key`)."""

    unknown: int  # hops without a measurement
    neg_bottleneck: float  # minus the slowest measured hop (0.0 when none is measured)
    inverse_sum: float  # sum of 1/bandwidth over the measured hops

    @property
    def bottleneck(self) -> float:
        return -self.neg_bottleneck


def ring_cost(ring: Sequence[int], bw: Bandwidths) -> RingCost:
    """The objective of a ring (a cyclic order of peer ids); see the module docstring."""
    unknown = 0
    slowest = float("inf")
    inverse = 0.0
    n = len(ring)
    if n < 2:
        return RingCost(0, 0.0, 0.0)
    for i in range(n):
        b = bw.get((ring[i], ring[(i + 1) % n]))
        if b is None or b <= 0:
            unknown += 1
        else:
            slowest = min(slowest, b)
            inverse += 1.0 / b
    return RingCost(unknown, -(slowest if slowest != float("inf") else 0.0), inverse)


def canonical(ring: Sequence[int]) -> list[int]:
    """The ring rotated to start at its smallest peer id."""
    if not ring:
        return []
    i = ring.index(min(ring))
    return list(ring[i:]) + list(ring[:i])


def solve_ring(
    peers: Iterable[int],
    bw: Bandwidths,
    *,
    time_budget: float = 0.5,
    seed: int = 0,
    max_restarts: int | None = None,
    initial: Sequence[int] | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> list[int]:
    """The best ring order of `peers` under `bw` (exact up to `exact_limit` peers).

    Above the limit: a local search that runs for at most `time_budget` seconds or
    `max_restarts` restarts, whichever ends first; `initial` (if given) is one of its
    starting points, so the result is never worse than it."""
    nodes = sorted(set(peers))
    if len(nodes) <= 3:
        return _brute_force_small(nodes, bw)
    if len(nodes) <= exact_limit:
        return _exact(nodes, bw)
    return _local_search(nodes, bw, time_budget, seed, max_restarts, initial)


def probe_rounds(peers: Sequence[int], wanted: Iterable[Pair]) -> list[list[Pair]]:
    """Schedules the directed pairs `wanted` ((sender, receiver), both in `peers`) in
    rounds in which every peer sends at most one probe and receives at most one, so
    probes do not share a peer's link. Round k holds the pairs i -> i+k (mod N) that are
    wanted: N-1 rounds at most, empty rounds dropped."""
    order = list(peers)
    n = len(order)
    todo = set(wanted)
    rounds: list[list[Pair]] = []
    for k in range(1, n):
        batch = [(order[i], order[(i + k) % n]) for i in range(n) if (order[i], order[(i + k) % n]) in todo]
        if batch:
            rounds.append(batch)
    return rounds


def pairs_to_probe(peers: Sequence[int], measured_at: Mapping[Pair, float], now: float, ttl: float) -> list[Pair]:
    """Directed pairs among `peers` with no measurement, or one older than `ttl`."""
    return [
        (a, b)
        for a in peers
        for b in peers
        if a != b and ((a, b) not in measured_at or now - measured_at[(a, b)] > ttl)
    ]


# ---------------------------------------------------------------------- exact


def _brute_force_small(nodes: list[int], bw: Bandwidths) -> list[int]:
    if len(nodes) <= 2:
        return nodes
    a, b, c = nodes
    return min(([a, b, c], [a, c, b]), key=lambda r: ring_cost(r, bw))


def _exact(nodes: list[int], bw: Bandwidths) -> list[int]:
    """Held-Karp over subsets, lexicographic (unknown hops, 1/bw sum), restricted to hops
    whose bandwidth reaches a threshold; a binary search finds the largest threshold
    that keeps the fewest unknown hops reachable, which is the best bottleneck."""
    n = len(nodes)
    known = {(i, j): bw[(nodes[i], nodes[j])] for i in range(n) for j in range(n) if i != j
             and bw.get((nodes[i], nodes[j]), 0.0) > 0}
    best = _held_karp(n, known, float("-inf"))
    assert best is not None
    fewest_unknown = best[0]
    thresholds = sorted(set(known.values()))
    lo, hi = 0, len(thresholds) - 1  # find the largest feasible threshold index
    while lo <= hi:
        mid = (lo + hi) // 2
        found = _held_karp(n, known, thresholds[mid])
        if found is not None and found[0] == fewest_unknown:
            best = found
            lo = mid + 1
        else:
            hi = mid - 1
    return [nodes[i] for i in best[2]]


def _held_karp(n: int, known: dict[Pair, float], threshold: float) -> tuple[int, float, list[int]] | None:
    """The cheapest Hamiltonian cycle through 0..n-1 using unknown hops (cost (1, 0)) and
    known hops of bandwidth >= threshold (cost (0, 1/bw)); None if there is none."""
    inf = (n + 1, 0.0)
    cost = [[inf] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            b = known.get((i, j))
            if b is None:
                cost[i][j] = (1, 0.0)
            elif b >= threshold:
                cost[i][j] = (0, 1.0 / b)
    # Paths start at node 0; mask over nodes 1..n-1 (bit k-1 for node k).
    full = (1 << (n - 1)) - 1
    dp: list[dict[int, tuple[int, float]]] = [{} for _ in range(full + 1)]
    parent: list[dict[int, int]] = [{} for _ in range(full + 1)]
    for k in range(1, n):
        c = cost[0][k]
        if c[0] <= n:
            dp[1 << (k - 1)][k] = c
            parent[1 << (k - 1)][k] = 0
    for mask in range(1, full + 1):
        row = dp[mask]
        if not row:
            continue
        for last, (u, s) in row.items():
            out = cost[last]
            rest = full & ~mask
            while rest:
                bit = rest & -rest
                rest ^= bit
                k = bit.bit_length()
                c = out[k]
                if c[0] > n:
                    continue
                cand = (u + c[0], s + c[1])
                nxt = dp[mask | bit]
                old = nxt.get(k)
                if old is None or cand < old:
                    nxt[k] = cand
                    parent[mask | bit][k] = last
    best: tuple[int, float] | None = None
    best_last = -1
    for last, (u, s) in dp[full].items():
        c = cost[last][0]
        if c[0] > n:
            continue
        cand = (u + c[0], s + c[1])
        if best is None or cand < best:
            best, best_last = cand, last
    if best is None:
        return None
    path = []
    mask, node = full, best_last
    while node != 0:
        path.append(node)
        prev = parent[mask][node]
        mask &= ~(1 << (node - 1))
        node = prev
    path.append(0)
    path.reverse()
    return best[0], best[1], path


# ---------------------------------------------------------------------- heuristic


def _local_search(
    nodes: list[int],
    bw: Bandwidths,
    time_budget: float,
    seed: int,
    max_restarts: int | None,
    initial: Sequence[int] | None,
) -> list[int]:
    """Hill climbing on the leximin key (the hops' bandwidths sorted ascending, unknown
    hops lowest, compared lexicographically): raising the slowest hop, then the next
    slowest, gives the search a gradient where the bottleneck alone is flat. Starts:
    `initial`, greedy fastest-next-hop tours from every node, then random orders and
    perturbations of the best ring so far."""
    rng = random.Random(seed)
    deadline = time.monotonic() + time_budget
    index = {p: i for i, p in enumerate(nodes)}
    n = len(nodes)
    w = [[-1.0] * n for _ in range(n)]  # -1: unknown
    for (a, b), v in bw.items():
        if a in index and b in index and a != b and v > 0:
            w[index[a]][index[b]] = v

    target = [0.0]  # hops at or below it count as bad: the search looks for a better ring

    def leximin(ring: list[int]) -> tuple[int, list[float]]:
        hops = sorted(w[ring[i]][ring[(i + 1) % n]] for i in range(n))
        bad = 0
        while bad < n and hops[bad] <= target[0]:
            bad += 1
        return -bad, hops

    starts: list[list[int]] = []
    if initial is not None and set(initial) == set(nodes) and len(initial) == n:
        starts.append([index[p] for p in initial])
    for s in range(n):
        starts.append(_greedy(w, s))

    best = starts[0]
    best_cost = ring_cost([nodes[i] for i in best], bw)
    restarts = 0
    proven = False  # no ring has a better bottleneck: only the tie-break is left to improve
    while True:
        if restarts >= 1 and not proven and best_cost.unknown == 0:
            # The greedy starts are done: look for a ring whose every hop beats the
            # best bottleneck so far, by a budgeted depth-first search over those hops.
            bar = best_cost.bottleneck
            adj = [[v for v in range(n) if v != u and w[u][v] > bar] for u in range(n)]
            try:
                found = _hamiltonian_cycle(adj, deadline)
            except _OutOfTime:
                found = None
            else:
                proven = found is None
            if found is not None:
                target[0] = bar
                ring = _climb(found, leximin, rng, deadline)
                cost = ring_cost([nodes[i] for i in ring], bw)
                if cost < best_cost:
                    best, best_cost = ring, cost
                continue
        if starts:
            start = starts.pop(0)
        elif rng.random() < 0.5:
            start = _perturb(best, rng)
        else:
            start = list(range(n))
            rng.shuffle(start)
        target[0] = best_cost.bottleneck if best_cost.unknown == 0 else -1.0
        ring = _climb(start, leximin, rng, deadline)
        cost = ring_cost([nodes[i] for i in ring], bw)
        if cost < best_cost:
            best, best_cost = ring, cost
        restarts += 1
        if time.monotonic() >= deadline or (max_restarts is not None and restarts >= max_restarts):
            break
    return canonical([nodes[i] for i in best])


class _OutOfTime(Exception):
    pass


def _hamiltonian_cycle(adj: list[list[int]], deadline: float) -> list[int] | None:
    """A directed Hamiltonian cycle over the hops `adj` (u -> adj[u]), or None if there
    is none; raises _OutOfTime at the deadline. Depth-first, trying first the successor
    with the fewest onward hops (Warnsdorff), pruning a branch as soon as an unvisited
    node has lost every way in or every way out."""
    n = len(adj)
    radj: list[list[int]] = [[] for _ in range(n)]
    for u in range(n):
        for v in adj[u]:
            radj[v].append(u)
    if any(not a for a in adj) or any(not r for r in radj):
        return None
    start = min(range(n), key=lambda u: len(adj[u]))
    visited = [False] * n
    visited[start] = True
    path = [start]
    steps = 0

    def viable(current: int) -> bool:
        for x in range(n):
            if visited[x]:
                continue
            if not any(not visited[y] or y == current for y in radj[x]):
                return False
            if not any(not visited[y] or y == start for y in adj[x]):
                return False
        return True

    def extend(u: int) -> bool:
        nonlocal steps
        if len(path) == n:
            return start in adj[u]
        steps += 1
        if steps % 128 == 0 and time.monotonic() > deadline:
            raise _OutOfTime
        options = [v for v in adj[u] if not visited[v]]
        options.sort(key=lambda v: sum(1 for y in adj[v] if not visited[y]))
        for v in options:
            visited[v] = True
            path.append(v)
            if viable(v) and extend(v):
                return True
            visited[v] = False
            path.pop()
        return False

    return list(path) if extend(start) else None


def _greedy(w: list[list[float]], start: int) -> list[int]:
    n = len(w)
    ring = [start]
    left = set(range(n)) - {start}
    while left:
        last = ring[-1]
        nxt = max(sorted(left), key=lambda k: w[last][k])
        ring.append(nxt)
        left.remove(nxt)
    return ring


def _perturb(ring: list[int], rng: random.Random) -> list[int]:
    """Double bridge: cut the ring in four segments and reconnect them A C B D."""
    n = len(ring)
    a, b, c = sorted(rng.sample(range(1, n), 3))
    return ring[:a] + ring[b:c] + ring[a:b] + ring[c:]


def _climb(ring: list[int], key: object, rng: random.Random, deadline: float) -> list[int]:
    """First-improvement descent over or-opt (move a segment of 1-3), swap and reversal
    moves, until no move improves `key` (or the deadline passes)."""
    assert callable(key)
    n = len(ring)
    current = key(ring)
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        moves = [(kind, i, j) for kind in range(5) for i in range(n) for j in range(n) if i != j]
        rng.shuffle(moves)
        for kind, i, j in moves:
            cand = _apply(ring, kind, i, j)
            if cand is None:
                continue
            value = key(cand)
            if value > current:
                ring, current, improved = cand, value, True
        # a pass checks the deadline once: a pass is a few milliseconds at N=20
    return ring


def _apply(ring: list[int], kind: int, i: int, j: int) -> list[int] | None:
    n = len(ring)
    if kind <= 2:  # or-opt: move the segment of length kind+1 at i to after position j
        length = kind + 1
        if length >= n - 1:
            return None
        seg = [ring[(i + t) % n] for t in range(length)]
        rest = [p for p in ring if p not in seg]
        pos = j % len(rest)
        return rest[: pos + 1] + seg + rest[pos + 1 :]
    if kind == 3:  # swap two nodes
        cand = list(ring)
        cand[i], cand[j] = cand[j], cand[i]
        return cand
    lo, hi = min(i, j), max(i, j)  # reverse a segment (asymmetric: a different ring)
    if hi - lo < 2:
        return None
    return ring[:lo] + ring[lo : hi + 1][::-1] + ring[hi + 1 :]
