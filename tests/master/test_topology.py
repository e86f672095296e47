"""Topology optimisation: the pure ring solver (against brute force, planted optima,
the heuristic's quality), probe scheduling, the master's transitions for
optimize_topology() (pccl_py.membership), and optimize_topology() end to end over
loopback with peer processes. The WAN-like test with shaped links is
tests/test_topology_netns.py."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from peer_workers import Cluster

import pccl_py as pccl
from pccl_py.wire import protocol
from pccl_py.errors import ProtocolError
from pccl_py.master.server import _probe_results
from pccl_py.master.membership import Membership, Send
from pccl_py.master.topology import (
    canonical,
    pairs_to_probe,
    probe_rounds,
    ring_cost,
    solve_ring,
)

T0 = 1000.0
HOST = "127.0.0.1"


# ---------------------------------------------------------------------- solver


def brute_force(nodes: list[int], bw: dict[tuple[int, int], float]) -> Any:
    first, *rest = sorted(nodes)
    return min(ring_cost([first, *p], bw) for p in itertools.permutations(rest))


def same_cost(a: Any, b: Any) -> bool:
    return a.unknown == b.unknown and a.bottleneck == b.bottleneck and abs(a.inverse_sum - b.inverse_sum) <= 1e-9 * max(
        1.0, b.inverse_sum
    )


def random_matrix(rng: random.Random, nodes: list[int], known: float = 1.0, levels: bool = False) -> dict[tuple[int, int], float]:
    bw = {}
    for a in nodes:
        for b in nodes:
            if a != b and rng.random() < known:
                bw[(a, b)] = float(rng.choice([1, 2, 5, 10, 20, 50, 100])) if levels else rng.uniform(1.0, 100.0)
    return bw


def assert_ring(ring: list[int], nodes: list[int]) -> None:
    assert sorted(ring) == sorted(nodes), "a permutation of the peers"
    assert ring[0] == min(nodes), "starts at the canonical (smallest) peer"


@pytest.mark.parametrize("n", range(3, 9))
def test_exact_solver_matches_brute_force_on_random_asymmetric_matrices(n: int) -> None:
    rng = random.Random(n)
    for trial in range(12):
        nodes = rng.sample(range(1, 10**9), n)
        bw = random_matrix(rng, nodes, levels=trial % 2 == 1)  # levels: many ties
        ring = solve_ring(nodes, bw)
        assert_ring(ring, nodes)
        assert same_cost(ring_cost(ring, bw), brute_force(nodes, bw))


@pytest.mark.parametrize("n", [4, 6, 8])
def test_exact_solver_matches_brute_force_with_unknown_pairs(n: int) -> None:
    rng = random.Random(100 + n)
    for _ in range(10):
        nodes = rng.sample(range(1, 10**6), n)
        bw = random_matrix(rng, nodes, known=0.6)
        ring = solve_ring(nodes, bw)
        assert_ring(ring, nodes)
        assert same_cost(ring_cost(ring, bw), brute_force(nodes, bw))


def test_unknown_pairs_are_used_only_when_no_ring_avoids_them() -> None:
    nodes = [1, 2, 3, 4]
    bw = {(a, b): 1.0 for a in nodes for b in nodes if a != b}  # all known but slow
    for pair in [(1, 2), (2, 3), (3, 4), (4, 1)]:
        bw[pair] = 1000.0
    del bw[(1, 3)]  # unknown pairs are not "fast"
    ring = solve_ring(nodes, bw)
    assert ring == [1, 2, 3, 4]
    assert ring_cost(ring, bw).unknown == 0
    # A peer none of whose pairs is known (a joiner) still gets a place: two unknown hops.
    bw5 = dict(bw)
    ring5 = solve_ring([*nodes, 5], bw5)
    assert_ring(ring5, [*nodes, 5])
    cost = ring_cost(ring5, bw5)
    assert cost.unknown == 2 and cost.bottleneck == 1000.0  # it replaces one fast hop


def test_planted_slow_links_are_avoided() -> None:
    rng = random.Random(7)
    nodes = list(range(10, 18))
    bw = {(a, b): rng.uniform(80, 120) for a in nodes for b in nodes if a != b}
    ring = solve_ring(nodes, bw)
    slow = {(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))}  # make that ring terrible
    for pair in slow:
        bw[pair] = 8.0
    better = solve_ring(nodes, bw)
    hops = {(better[i], better[(i + 1) % len(better)]) for i in range(len(better))}
    assert not hops & slow
    assert ring_cost(better, bw).bottleneck >= 80


def test_bottleneck_beats_total_time() -> None:
    # Ring 1->2->3->4 has one slow hop (10) but otherwise very fast hops; every other
    # ring's slowest hop is 20: the ring all-reduce runs at its slowest hop, so 20 wins.
    nodes = [1, 2, 3, 4]
    bw = {(a, b): 20.0 for a in nodes for b in nodes if a != b}
    bw.update({(1, 2): 10.0, (2, 3): 1e6, (3, 4): 1e6, (4, 1): 1e6})
    ring = solve_ring(nodes, bw)
    assert ring_cost(ring, bw).bottleneck == 20.0


def test_exact_solver_at_ten_peers_finds_the_planted_ring() -> None:
    nodes, bw, optimum = planted_matrix(10, seed=3)
    ring = solve_ring(nodes, bw)
    assert_ring(ring, nodes)
    assert ring_cost(ring, bw).bottleneck == optimum


def planted_ring(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    hidden = rng.sample(range(1, 10**9), n)
    rng.shuffle(hidden)
    return hidden


def planted_matrix(n: int, seed: int) -> tuple[list[int], dict[tuple[int, int], float], float]:
    """A hidden ring with hops in [50, 100], decoy hops in [200, 300] (15% of the other
    pairs) and slow ones in [1, 49]. Peer v's only out-hop >= 50 is its planted one, at
    exactly 50: no ring's bottleneck exceeds 50 and the planted ring reaches it, so
    the optimum bottleneck is 50, while a greedy fastest-next-hop tour chases decoys."""
    hidden = planted_ring(n, seed)
    nodes = sorted(hidden)
    rng = random.Random(seed + 1000)
    bw = {(a, b): rng.uniform(200, 300) if rng.random() < 0.15 else rng.uniform(1, 49) for a in nodes for b in nodes if a != b}
    for i in range(n):
        bw[(hidden[i], hidden[(i + 1) % n])] = rng.uniform(50, 100)
    v = hidden[0]
    for b in nodes:
        if b not in (v, hidden[1]):
            bw[(v, b)] = rng.uniform(1, 49)
    bw[(v, hidden[1])] = 50.0
    return nodes, bw, 50.0


@pytest.mark.parametrize("n", [12, 16, 20])
def test_heuristic_reaches_the_planted_optimum(n: int) -> None:
    for seed in range(2):
        nodes, bw, optimum = planted_matrix(n, seed)
        ring = solve_ring(nodes, bw, time_budget=1.0, seed=seed)
        assert_ring(ring, nodes)
        cost = ring_cost(ring, bw)
        assert cost.unknown == 0 and cost.bottleneck == optimum


def test_heuristic_matches_the_exact_solver_at_nine_peers() -> None:
    rng = random.Random(11)
    for _ in range(3):
        nodes = rng.sample(range(1, 10**6), 9)
        bw = random_matrix(rng, nodes, levels=True)
        exact = ring_cost(solve_ring(nodes, bw), bw)
        heuristic = ring_cost(solve_ring(nodes, bw, exact_limit=0, time_budget=0.5, seed=1), bw)
        assert heuristic.unknown == exact.unknown and heuristic.bottleneck == exact.bottleneck


def test_heuristic_is_deterministic_for_a_seed_and_restart_count() -> None:
    nodes, bw, _ = planted_matrix(14, seed=5)
    a = solve_ring(nodes, bw, time_budget=30.0, seed=9, max_restarts=20)
    b = solve_ring(nodes, bw, time_budget=30.0, seed=9, max_restarts=20)
    assert a == b


def test_heuristic_is_never_worse_than_its_initial_ring() -> None:
    nodes, bw, optimum = planted_matrix(16, seed=8)
    hidden = planted_ring(16, seed=8)
    ring = solve_ring(nodes, bw, time_budget=0.0, max_restarts=1, initial=hidden)
    assert ring == canonical(hidden)
    assert ring_cost(ring, bw).bottleneck == optimum


def test_small_groups_and_canonical_rotation() -> None:
    assert solve_ring([], {}) == []
    assert solve_ring([5], {}) == [5]
    assert solve_ring([9, 5], {}) == [5, 9]
    assert canonical([3, 1, 2]) == [1, 2, 3]
    bw = {(1, 3): 5.0, (3, 2): 5.0, (2, 1): 5.0, (1, 2): 1.0, (2, 3): 1.0, (3, 1): 1.0}
    assert solve_ring([3, 2, 1], bw) == [1, 3, 2]


# ---------------------------------------------------------------------- probe scheduling


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_probe_rounds_cover_every_pair_once_one_probe_per_peer_and_direction(n: int) -> None:
    peers = list(range(100, 100 + n))
    wanted = [(a, b) for a in peers for b in peers if a != b]
    rounds = probe_rounds(peers, wanted)
    assert len(rounds) == n - 1
    assert sorted(p for r in rounds for p in r) == sorted(wanted)
    for r in rounds:
        assert len({a for a, _ in r}) == len(r), "a peer sends at most one probe per round"
        assert len({b for _, b in r}) == len(r), "a peer receives at most one probe per round"


def test_probe_rounds_schedule_only_the_wanted_pairs() -> None:
    peers = [1, 2, 3, 4]
    rounds = probe_rounds(peers, [(1, 3), (4, 2)])
    assert sorted(p for r in rounds for p in r) == [(1, 3), (4, 2)]
    assert probe_rounds(peers, []) == []


def test_pairs_to_probe_are_the_missing_and_the_stale() -> None:
    measured = {(1, 2): 100.0, (2, 1): 10.0}
    todo = pairs_to_probe([1, 2, 3], measured, now=200.0, ttl=150.0)
    assert (1, 2) not in todo  # fresh
    assert (2, 1) in todo  # stale
    assert {(1, 3), (3, 1), (2, 3), (3, 2)} <= set(todo)


# ---------------------------------------------------------------------- master transitions


@pytest.fixture
def m() -> Membership:
    return Membership(1.0, 5.0, 0.2, bandwidth_ttl=100.0, solve_seconds=0.2)


def form(m: Membership, ids: list[int], now: float = T0) -> None:
    for pid in ids:
        m.register(pid, 0, HOST, 20000 + pid % 1000, f"p{pid}", now)
    if len(ids) > 1:
        m.vote_topology(ids[0], now)
    assert m.groups[0].ring == ids


def sends(effects: list[Any], t: str) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and e.msg["t"] == t]


def request_all(m: Membership, ids: list[int], now: float = T0) -> list[Any]:
    effects: list[Any] = []
    for i, pid in enumerate(ids):
        effects += m.request_optimize(pid, exposure=1000 + i, probe_bytes=4096, now=now)
    return effects


def answer_probes(
    m: Membership, effects: list[Any], rates: dict[tuple[int, int], float], now: float = T0
) -> tuple[list[Any], list[tuple[int, int]]]:
    """Answers every probe round with `rates` until the group is re-ringed; returns the
    final effects and the probed pairs, in order."""
    probed: list[tuple[int, int]] = []
    while True:
        probes = sends(effects, "probe")
        if not probes:
            return effects, probed
        nxt: list[Any] = []
        for s in probes:
            protocol.validate(s.msg)
            results = []
            for sender, host, port, exposure, nbytes in s.msg["fetch"]:
                assert nbytes == 4096 and exposure >= 1000 and host == HOST
                probed.append((sender, s.to))
                results.append((sender, rates.get((sender, s.to), 0.0)))
            nxt += m.probe_done(s.to, s.msg["round"], results, now)
        effects = nxt


A, B, C, D = 40, 10, 30, 20  # join order A B C D; id order B D C A
SLOW_RING = {(A, B), (B, C), (C, D), (D, A)}


def slow_join_order_rates() -> dict[tuple[int, int], float]:
    ids = [A, B, C, D]
    return {(a, b): 2e6 if (a, b) in SLOW_RING else 2e7 for a in ids for b in ids if a != b}


def test_optimize_waits_for_every_admitted_peer_then_probes_missing_pairs(m: Membership) -> None:
    form(m, [A, B, C, D])
    assert request_all(m, [A, B, C]) == []
    effects = m.request_optimize(D, 1007, 4096, T0)
    probes = sends(effects, "probe")
    assert probes, "the first round starts"
    for s in probes:
        assert len(s.msg["fetch"]) == 1, "one probe per receiver and round"
    assert len({s.msg["fetch"][0][0] for s in probes}) == len(probes), "one per sender"
    epoch = m.groups[0].epoch
    effects, probed = answer_probes(m, effects, slow_join_order_rates())
    assert sorted(probed) == sorted((a, b) for a in [A, B, C, D] for b in [A, B, C, D] if a != b)
    [topo] = [s.msg for s in sends(effects, "topology") if s.to == A]
    assert topo["reason"] == "optimized" and topo["vote"] is True and topo["epoch"] == epoch + 1
    ring = [p[0] for p in topo["ring"]]
    assert ring[0] == min(ring)
    assert not {(ring[i], ring[(i + 1) % 4]) for i in range(4)} & SLOW_RING
    assert {s.to for s in sends(effects, "topology")} == {A, B, C, D}
    status = m.status()["groups"]["0"]
    assert status["optimized"] is True and len(status["bandwidth"]) == 12


def test_a_second_optimize_with_fresh_measurements_probes_nothing(m: Membership) -> None:
    form(m, [A, B, C, D])
    answer_probes(m, request_all(m, [A, B, C, D]), slow_join_order_rates())
    effects = request_all(m, [A, B, C, D], now=T0 + 50)
    assert not sends(effects, "probe")
    assert {s.msg["reason"] for s in sends(effects, "topology")} == {"optimized"}


def test_stale_measurements_are_probed_again(m: Membership) -> None:
    form(m, [A, B, C, D])
    answer_probes(m, request_all(m, [A, B, C, D]), slow_join_order_rates())
    effects, probed = answer_probes(m, request_all(m, [A, B, C, D], now=T0 + 101), slow_join_order_rates(), T0 + 101)
    assert len(probed) == 12
    assert sends(effects, "topology")


def test_a_failed_probe_leaves_the_pair_unknown(m: Membership) -> None:
    form(m, [A, B, C])
    rates = {(a, b): 1e7 for a in [A, B, C] for b in [A, B, C] if a != b}
    del rates[(A, B)]  # answered with 0.0: failed
    answer_probes(m, request_all(m, [A, B, C]), rates)
    assert (A, B) not in m.groups[0].bandwidth
    ring = m.groups[0].ring
    assert (A, B) not in {(ring[i], ring[(i + 1) % 3]) for i in range(3)}


def test_a_peer_evicted_during_probes_leaves_and_the_survivors_complete(m: Membership) -> None:
    form(m, [A, B, C, D])
    effects = request_all(m, [A, B, C, D])
    probes = sends(effects, "probe")
    # Round one: answer all but one prober, then that prober crashes.
    victim = probes[0].to
    for s in probes[1:]:
        m.probe_done(s.to, s.msg["round"], [(s.msg["fetch"][0][0], 1e7)], T0)
    effects = m.evict(victim, "crashed", "its connection closed", T0)
    assert all(victim not in pair for pair in m.groups[0].bandwidth), "its row and column are forgotten"
    # The next round goes on without it; the stale round's late answer is ignored.
    assert m.probe_done(probes[1].to, probes[1].msg["round"], [], T0) == []
    rates = {(a, b): 1e7 for a in [A, B, C, D] for b in [A, B, C, D] if a != b}
    effects, probed = answer_probes(m, effects, rates)
    assert all(victim not in pair for pair in probed)
    optimized = [s for s in sends(effects, "topology") if s.msg["reason"] == "optimized"]
    assert {s.to for s in optimized} == {A, B, C, D} - {victim}
    assert sorted(p[0] for p in optimized[0].msg["ring"]) == sorted({A, B, C, D} - {victim})


def test_a_peer_that_dies_before_calling_lets_the_others_complete(m: Membership) -> None:
    form(m, [A, B, C])
    assert request_all(m, [A, B]) == []
    effects = m.leave(C, T0)
    effects, _ = answer_probes(m, effects, {(A, B): 1e7, (B, A): 1e7})
    assert {s.to for s in sends(effects, "topology") if s.msg["reason"] == "optimized"} == {A, B}


def test_a_repeated_request_while_probing_is_ignored(m: Membership) -> None:
    form(m, [A, B, C])
    effects = request_all(m, [A, B, C])
    assert not sends(m.request_optimize(A, 1, 4096, T0), "probe")
    answer_probes(m, effects, {})  # all probes fail: the group still completes
    assert m.groups[0].probing is None


def test_pending_peers_stay_pending_through_optimize(m: Membership) -> None:
    form(m, [A, B])
    m.register(C, 0, HOST, 20030, "late", T0)
    effects, _ = answer_probes(m, request_all(m, [A, B]), {(A, B): 1e7, (B, A): 1e7})
    assert m.groups[0].pending == [C]
    assert {s.to for s in sends(effects, "topology")} == {A, B}


def test_after_optimisation_evictions_and_joins_keep_the_fast_order(m: Membership) -> None:
    ids = [A, B, C, D]
    form(m, ids)
    # Fast directed cycle A->C->B->D->A; everything else slow.
    fast = {(A, C), (C, B), (B, D), (D, A)}
    rates = {(a, b): 1e8 if (a, b) in fast else 1e6 for a in ids for b in ids if a != b}
    rates[(C, D)] = 5e7  # the best bypass once B is gone: C->D
    answer_probes(m, request_all(m, ids), rates)
    ring = m.groups[0].ring
    assert {(ring[i], ring[(i + 1) % 4]) for i in range(4)} == fast
    m.evict(B, "crashed", "gone", T0)
    ring = m.groups[0].ring
    assert sorted(ring) == sorted([A, C, D])
    assert {(ring[i], ring[(i + 1) % 3]) for i in range(3)} == {(A, C), (C, D), (D, A)}
    # A joiner goes in as one block with two unknown hops; the known hops stay fast.
    joiner = 50
    m.register(joiner, 0, HOST, 20050, "joiner", T0)
    m.vote_topology(A, T0)
    m.vote_topology(C, T0)
    m.vote_topology(D, T0)
    ring = m.groups[0].ring
    assert sorted(ring) == sorted([A, C, D, joiner])
    cost = ring_cost(ring, {k: v for k, (v, _) in m.groups[0].bandwidth.items()})
    assert cost.unknown == 2 and cost.bottleneck >= 5e7


def test_before_any_optimisation_rings_keep_the_join_order(m: Membership) -> None:
    form(m, [A, B, C, D])
    m.evict(B, "crashed", "gone", T0)
    assert m.groups[0].ring == [A, C, D]


def test_probe_messages_are_schema_checked() -> None:
    with pytest.raises(ProtocolError):
        protocol.make("optimize", epoch=1, exposure=2)  # missing probe_bytes
    with pytest.raises(ProtocolError):
        protocol.make("probe_done", round=1, results="fast")
    assert _probe_results(protocol.make("probe_done", round=1, results=[[5, 1.5e6], [6, 0]])) == [(5, 1.5e6), (6, 0.0)]
    for bad in ([[5]], [["x", 1.0]], [[5, "fast"]], [[5, True]], [7]):
        with pytest.raises(ProtocolError):
            _probe_results(protocol.make("probe_done", round=1, results=bad))


# ---------------------------------------------------------------------- end to end (loopback)

PEER_CONFIG = {"probe_bytes": 256 << 10}


def test_optimize_topology_end_to_end(master: pccl.Master) -> None:
    with Cluster(master.address, config=PEER_CONFIG) as c:
        c.form([0, 1, 2])
        records = c.call({i: {"cmd": "optimize_topology", "timeout": 30} for i in range(3)})
        assert all(r["ok"] for r in records.values()), records
        epochs = {r["epoch_now"] for r in records.values()}
        assert len(epochs) == 1 and all(r["world_now"] == 3 for r in records.values())
        status = master.status()["groups"]["0"]
        assert status["optimized"] and len(status["bandwidth"]) == 6
        assert all(rate > 0 for _, _, rate in status["bandwidth"])
        measured = master.status()["groups"]["0"]["bandwidth"]
        # The collective leaves a working ring: an all-reduce over it.
        reduced = c.call({i: {"cmd": "all_reduce", "n": 1000, "coef": 1.0} for i in range(3)})
        assert all(r["ok"] and r["world"] == 3 for r in reduced.values()), reduced
        assert len({r["crc"] for r in reduced.values()}) == 1
        # Fresh measurements are not probed again.
        again = c.call({i: {"cmd": "optimize_topology", "timeout": 30} for i in range(3)})
        assert all(r["ok"] for r in again.values()), again
        assert master.status()["groups"]["0"]["bandwidth"] == measured


def test_optimize_topology_completes_with_the_survivors_when_a_peer_dies(master: pccl.Master) -> None:
    with Cluster(master.address, config=PEER_CONFIG) as c:
        c.form([0, 1, 2])
        cid = c.send({i: {"cmd": "optimize_topology", "timeout": 30} for i in (0, 1)})
        c.kill(2)
        records = c.results(cid, [0, 1], timeout=40)
        assert all(r["ok"] and r["world_now"] == 2 for r in records.values()), records
        reduced = c.call({i: {"cmd": "all_reduce", "n": 1000, "coef": 1.0} for i in (0, 1)})
        assert all(r["ok"] and r["world"] == 2 for r in reduced.values()), reduced


# ---------------------------------------------------------------------- ring only


def test_ring_only_when_a_pair_is_much_slower_than_the_rings_slowest_hop() -> None:
    from pccl_py.master.probing import ring_only

    fast = {(a, b): 100.0 for a in range(4) for b in range(4) if a != b}
    ring = [0, 1, 2, 3]
    assert not ring_only(ring, fast, 100.0)
    slow = {**fast, (0, 2): 10.0}  # a pair the ring 0-1-2-3 does not use
    assert ring_only(ring, slow, 100.0)
    assert not ring_only(ring, {**fast, (0, 2): 60.0}, 100.0)  # not much slower
    assert not ring_only(ring, slow, 0.0)  # nothing measured on the ring
    assert not ring_only([1, 3], slow, 100.0)  # the slow pair's peers are not both members
