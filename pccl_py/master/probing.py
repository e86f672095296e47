"""Topology optimisation, mixed into Membership: optimize_topology() is a collective
like a vote; probe rounds of the missing or stale pairs, then the ring
pccl_py.master.topology solves, in a new epoch (docs/topology.md)."""

from __future__ import annotations

from typing import Any

from pccl_py.master import topology
from pccl_py.master.records import Effect, Group, Log, ProbeRecord, Rules, Send
from pccl_py.wire import protocol


class ProbeRules:
    def request_optimize(self: Rules, peer_id: int, exposure: int, probe_bytes: int, now: float) -> list[Effect]:
        """A peer called optimize_topology(): collective of the admitted peers. Its engine
        serves a probe buffer of `probe_bytes` under `exposure`."""
        peer, g = self._admitted(peer_id)
        peer.replay = None
        g.blocked.pop(peer.id, None)
        if g.probing is not None and peer.id in g.probing.participants:
            return [Log("optimize_ignored", {"group": g.id, "peer": peer.id, "why": "already probing"})]
        g.optimize_requests[peer.id] = (exposure, probe_bytes)
        return self._complete_optimize_requests(g, now) + self._resolve_held(g)

    def probe_done(self: Rules, peer_id: int, round_id: int, results: list[tuple[int, float]], now: float) -> list[Effect]:
        """A prober's measurements for one round: (sender, bytes/s), <= 0 for a failed
        probe (the pair stays unknown)."""
        peer, g = self._admitted(peer_id)
        record = g.probing
        if record is None or record.round_id != round_id or peer.id not in record.awaiting:
            return []  # late or duplicate: that round is over
        for sender, rate in results:
            if rate > 0 and sender in record.participants and sender != peer.id:
                g.bandwidth[(sender, peer.id)] = (float(rate), now)
        record.awaiting.discard(peer.id)
        return self._advance_probes(g, now)

    def _complete_optimize_requests(self: Rules, g: Group, now: float) -> list[Effect]:
        if not g.ring or not set(g.ring) <= set(g.optimize_requests) or g.probing is not None:
            return []
        exposures = {pid: g.optimize_requests[pid] for pid in g.ring}
        g.optimize_requests.clear()
        self._unblock(g, "optimize_topology")
        measured_at = {pair: at for pair, (_, at) in g.bandwidth.items()}
        wanted = topology.pairs_to_probe(g.ring, measured_at, now, self.bandwidth_ttl)
        rounds = topology.probe_rounds(g.ring, wanted)
        g.probing = ProbeRecord(set(g.ring), exposures, rounds)
        effects: list[Effect] = [Log("probe_plan", {"group": g.id, "pairs": len(wanted), "rounds": len(rounds)})]
        return effects + self._advance_probes(g, now)

    def _advance_probes(self: Rules, g: Group, now: float) -> list[Effect]:
        """Starts the next probe round once the current one is over; after the last,
        solves the ring and moves the group to it."""
        record = g.probing
        if record is None or record.awaiting:
            return []
        while record.rounds:
            batch = [(a, b) for a, b in record.rounds.pop(0) if a in record.participants and b in record.participants]
            if not batch:
                continue
            g.probe_seq += 1
            record.round_id = g.probe_seq
            tasks: dict[int, list[list[Any]]] = {}
            for sender, receiver in batch:
                exposure, nbytes = record.exposures[sender]
                host, port = self.peers[sender].host, self.peers[sender].port
                tasks.setdefault(receiver, []).append([sender, host, port, exposure, nbytes])
            record.awaiting = set(tasks)
            return [Send(pid, protocol.make("probe", round=record.round_id, fetch=fetch)) for pid, fetch in tasks.items()]
        g.probing = None
        if not g.ring:
            return []
        ring = self._solve(g, g.ring)
        g.optimized = True
        g.round += 1  # a collective like a vote: every member restarts its step numbering
        rates = self._rates(g)
        cost = topology.ring_cost(ring, rates)
        g.ring_only = ring_only(ring, rates, cost.bottleneck)
        effects: list[Effect] = [
            Log(
                "optimize",
                {"group": g.id, "ring": ring, "bottleneck": cost.bottleneck, "unknown_hops": cost.unknown,
                 "ring_only": g.ring_only},
            )
        ]
        return effects + self._new_epoch(g, ring, "optimized", vote=True)

    def _rates(self: Rules, g: Group) -> dict[tuple[int, int], float]:
        return {pair: rate for pair, (rate, _) in g.bandwidth.items()}

    def _solve(self: Rules, g: Group, peers: list[int], initial: list[int] | None = None, budget: float | None = None) -> list[int]:
        budget = self.solve_seconds if budget is None else budget
        return topology.solve_ring(peers, self._rates(g), time_budget=budget, seed=g.id, initial=initial)

    def _reorder(self: Rules, g: Group, ring: list[int]) -> list[int]:
        """The ring of a new epoch. Until the group is optimised: as given (survivors in
        order, joiners appended). After: re-solved over the known bandwidths, so an
        eviction does not leave a slow hop in the ring and joiners (whose pairs are
        unknown until the next optimize_topology()) go where the fewest unknown hops
        and the fastest known ones remain."""
        if not g.optimized or len(ring) < 3:
            return ring
        # A short budget: this runs on every join and departure (exact up to 10 peers).
        return self._solve(g, ring, initial=ring, budget=min(self.solve_seconds, 0.1))


# A pair this much slower than the optimised ring's slowest hop keeps larger
# all-reduces on the ring (Group.ring_only).
RING_ONLY_RATIO = 0.5


def ring_only(ring: list[int], rates: dict[tuple[int, int], float], bottleneck: float | None) -> bool:
    """Whether the direct all-to-all algorithms would cross a pair much slower than the
    ring's slowest hop: the ring the master chose avoids it, they would not."""
    if bottleneck is None or bottleneck <= 0:
        return False
    members = set(ring)
    slowest = min((r for (a, b), r in rates.items() if a in members and b in members), default=None)
    return slowest is not None and slowest < RING_ONLY_RATIO * bottleneck
