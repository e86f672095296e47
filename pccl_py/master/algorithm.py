"""Which algorithm an epoch's larger all-reduces use: the ring, or the direct
reduce-scatter + all-gather ("rsag"). The master decides once per epoch and carries the
choice in the epoch's topology message (`rsag`), so every peer of the epoch runs the
same one (the algorithm is part of an op's shape: peers that disagree fail the op).

Both move 2(N-1)/N x S bytes per peer. The ring does it in 3(N-1) one-way hops to
neighbours only; rsag in two one-way delays plus an all-to-all vote, but with N-1
streams per peer at once. Behind long round trips the hops dominate and rsag wins
(100 ms, 1 Gbit/s, N=4: 16 MiB from 0.36 to 0.76 of the link); on loopback or a LAN
the hops cost microseconds and the extra streams cost CPU and cache (loopback, N=4,
8 MiB: the ring 0.85x gloo's time, rsag 0.6x). The crossover is where a round trip
costs about what rsag saves per hop: RSAG_MIN_RTT (Config.rsag_min_rtt) puts it at
2 ms, well above any LAN (<= 0.5 ms) and below any WAN path (>= 5 ms).

What is measured: the master's round trip to each peer, from the kernel's estimate
(TCP_INFO) on the liveness connection it holds to the peer's data port. That stands in
for the peers' round trips to each other: a peer pair whose paths to the master are
short is close (and at least one long path means a long peer-to-peer path for some
pair, e.g. the master beside rank 0). It errs towards rsag, the choice that is safe
on a WAN: a member whose round trip is not measured yet, or a master far from a group
that sits on one LAN, gives rsag, as before this rule existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AlgorithmChoice:
    rsag: bool  # larger all-reduces of the epoch may use the direct reduce-scatter + all-gather
    reason: str


def choose_rsag(
    ring: Sequence[int], rtts: Mapping[int, float | None], ring_only: bool, min_rtt: float
) -> AlgorithmChoice:
    """The choice for an epoch whose ring is `ring`: `rtts` maps a peer to the master's
    measured round trip to it (seconds; None or missing: not measured); `ring_only`:
    optimize_topology() found a pair much slower than the ring's slowest hop (the ring
    avoids it, rsag would not); `min_rtt`: the longest round trip from which rsag pays
    (0: rsag always, as long as the ring is not required)."""
    if ring_only:
        return AlgorithmChoice(False, "a pair of members is much slower than the optimised ring: the ring")
    if len(ring) < 2:
        return AlgorithmChoice(True, "a single peer: nothing to choose")
    if min_rtt <= 0:
        return AlgorithmChoice(True, "rsag_min_rtt is 0: rsag at every round trip")
    unknown = [pid for pid in ring if rtts.get(pid) is None]
    if unknown:
        return AlgorithmChoice(True, f"the round trip to peer {unknown[0]} is not measured yet: rsag (safe on a WAN)")
    longest = max(float(rtts[pid] or 0.0) for pid in ring)
    if longest >= min_rtt:
        return AlgorithmChoice(True, f"longest round trip {longest * 1e3:.3g} ms >= {min_rtt * 1e3:g} ms: rsag")
    return AlgorithmChoice(False, f"longest round trip {longest * 1e3:.3g} ms < {min_rtt * 1e3:g} ms: the ring")
