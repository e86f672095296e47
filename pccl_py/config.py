"""Defaults for every timeout and tunable, in one object. This is the only module that
reads environment variables (PCCL_*), and only when asked to (Config.from_env)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from pccl_py.errors import ConfigError

_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Config:
    # Liveness, both ways: a peer sends a heartbeat every interval and the master answers
    # it; the master evicts a peer it has not heard from for `heartbeat_timeout` seconds
    # (a hung or partitioned peer), and a peer that has not heard the master for as long
    # over a live connection knows it is cut off (Partitioned). The master's values win.
    # Each heartbeat goes twice: over the control connection and as a UDP datagram
    # (pccl_py.wire.beats), which no retransmission delays after an outage, so an
    # outage shorter than the timeout evicts nobody. 0.25 / 1.5 s: a partition is
    # detected in 1.5 s, and a 300 ms round trip with jitter never comes near it. A
    # peer whose datagrams do not get through (UDP filtered, or
    # `heartbeat_datagrams=False`) is judged by its TCP heartbeats with 1 s more.
    heartbeat_interval: float = 0.25
    heartbeat_timeout: float = 1.5
    heartbeat_datagrams: bool = True
    # Per-op default timeout (seconds) for collectives, and for connect/admission.
    op_timeout: float = 120.0
    connect_timeout: float = 30.0
    # How long the master waits for the root cause of a failure before it decides on
    # the reports it has (a poisoned neighbour reports before the peer that failed).
    failure_grace: float = 0.2
    # Data plane.
    connections_per_peer: int = 0  # 0: sized per neighbour from its round trip (about 1 Gbit/s each); K fixes it
    segment_bytes: int = 512 << 10
    socket_buffer_bytes: int = 0
    # TCP congestion control of every data connection (TCP_CONGESTION). BBR keeps a long
    # link full under random loss and across the collectives' stop-and-go, where a
    # loss-based one (cubic, reno: most hosts' default) backs off: on cubic hosts, 64 MiB
    # at N=4 behind a 100 ms link runs at 0.96 of the link with it, and 0.51-0.57 with
    # 1% loss, where cubic connections got 0.02 (docs/benchmarks.md). Where
    # the host does not offer it to this process, the host's default is kept and a
    # warning says how to allow it. "system" (or ""): always the host's default.
    congestion_control: str = "bbr"
    # Large all-reduce payloads go to the kernel by reference (vmsplice + splice), not
    # copied (docs/architecture.md, "Zero-copy sends"). False: copy everything.
    zero_copy: bool = True
    # Large receives into the caller's memory (a state fetch, an out-of-place
    # all-reduce's output) have their pages faulted in by a worker thread ahead of the
    # bytes (docs/architecture.md, "Prefaulted receives"). False: recv() faults them in.
    prefault: bool = True
    # Payloads to peers on the same host go through a shared-memory ring per connection
    # instead of loopback TCP: a copy in and a copy out, without the TCP stack (1.2-1.6x
    # the broadcast bandwidth at N=2-4; docs/architecture.md, "Same-host rings"). A peer
    # whose counterpart cannot map its ring (another pid namespace or user) stays on TCP.
    # False: TCP only.
    shared_memory: bool = True
    mailbox_limit_bytes: int = 256 << 20
    # All-reduces whose payload x (world size - 1) is at most this many bytes use the
    # direct algorithm (every peer sends its input to every other; about one round trip
    # with the commit vote) instead of the ring (docs/architecture.md, "Choosing the
    # algorithm"); 0: always the ring. Every peer must use the same value: a peer that
    # chooses otherwise fails the op on every peer with ProtocolError.
    direct_allreduce_max_bytes: int = 256 << 10
    # All-reduces above the direct limit whose payload is at least this many bytes use
    # the direct reduce-scatter + all-gather (rank c reduces chunk c and sends it to
    # everyone: the ring's bytes in two one-way delays plus an all-to-all vote, where the
    # ring takes 3(N-1)) instead of the ring; 0: off, always the ring. On by default for
    # every size above the direct limit: behind a 100 ms, 1 Gbit/s link at N=4 it took
    # 16 MiB from 0.36 to 0.76 of the link and 64 MiB from 0.55 to 0.74; on loopback and
    # LANs the ring is faster, so the master keeps such epochs on it (rsag_min_rtt below;
    # docs/architecture.md, "Choosing the algorithm"). Must be the same on every peer,
    # as direct_allreduce_max_bytes.
    rsag_min_bytes: int = 1
    # Master: an epoch's all-reduces above the direct limit use rsag only when the
    # longest round trip the master measures to a member is at least this (seconds),
    # the ring otherwise; 0: rsag at any round trip. Decided once per epoch and sent to
    # every peer with the epoch's ring (pccl_py.master.algorithm; docs/architecture.md,
    # "Choosing the algorithm"): loopback and LAN groups get the ring, WAN groups rsag.
    rsag_min_rtt: float = 0.002
    # Joins (docs/protocol.md, "Joining"): while the master admits a
    # joiner, the joiner and the members open their pools to each other, so the epoch
    # that admits it keeps them (one round trip) instead of opening them (two or three);
    # False: they open when that epoch needs them. Where a prepared connection's round
    # trip is at least rsag_min_rtt, it also sends padding for at most `join_warmup`
    # seconds (less once TCP has left slow start, or the pool carries an op), so that
    # the joiner's first op does not start from TCP's initial window; 0: no padding.
    # The padding takes link capacity from the group's running op while it lasts.
    prepare_joins: bool = True
    join_warmup: float = 2.0
    # Control plane.
    max_message_bytes: int = 16 << 20  # room for the state description of large models
    max_retries: int = 64
    # Ops a peer committed through the commit vote are reported to the master in
    # batches, at most this many seconds apart (nobody waits on them; a failure report
    # sends the batch at once).
    commit_report_interval: float = 0.05
    # Mismatched collectives (docs/protocol.md): a peer whose collective call has waited
    # this long tells the master what it waits in; the master fails every member's call
    # with CollectiveMismatch once all of them have waited in calls that cannot match
    # for `mismatch_grace` seconds.
    blocked_report_after: float = 0.2
    mismatch_grace: float = 0.25
    # Topology optimisation (optimize_topology()): bytes per bandwidth probe, how long
    # a measurement stays fresh, the per-probe timeout, and the time budget of the ring
    # heuristic the master runs above 10 peers (exact below).
    probe_bytes: int = 8 << 20
    bandwidth_ttl: float = 600.0
    probe_timeout: float = 30.0
    topology_solve_seconds: float = 0.5
    # Master restart: a (re)started master holds the first admission of a group this
    # long, so members of a run it must take over can rejoin before a newcomer founds
    # the group afresh. `pccl master` sets it to four heartbeat intervals (1 s) by default.
    startup_grace: float = 0.0
    # Structured JSON-lines event log (membership changes, op outcomes); None: off.
    event_log: str | None = None
    # Shared secret (PCCL_SECRET) authenticating every control and data connection;
    # None: no authentication. Kept out of repr() so it never lands in a log.
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("need 0 < heartbeat_interval < heartbeat_timeout")
        if not 0 <= self.connections_per_peer <= 64:
            raise ConfigError("connections_per_peer must be in [0, 64] (0: sized from each neighbour's round trip)")
        if self.direct_allreduce_max_bytes < 0:
            raise ConfigError("direct_allreduce_max_bytes must be >= 0 (0: always the ring)")
        if self.rsag_min_bytes < 0:
            raise ConfigError("rsag_min_bytes must be >= 0 (0: off)")
        if not 0 <= self.rsag_min_rtt <= 60:
            raise ConfigError("rsag_min_rtt must be in [0, 60] seconds (0: rsag at any round trip)")
        if not 0 <= self.join_warmup <= 60:
            raise ConfigError("join_warmup must be in [0, 60] seconds (0: no padding)")
        if self.segment_bytes < 4096:
            raise ConfigError("segment_bytes must be at least 4096")
        if self.blocked_report_after <= 0 or self.mismatch_grace < 0:
            raise ConfigError("need blocked_report_after > 0 and mismatch_grace >= 0")
        if not 0 < self.commit_report_interval <= self.heartbeat_interval:
            raise ConfigError("need 0 < commit_report_interval <= heartbeat_interval")
        if self.op_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if not 0 < self.probe_bytes <= 1 << 30 or self.probe_timeout <= 0 or self.topology_solve_seconds <= 0:
            raise ConfigError("need 0 < probe_bytes <= 1 GiB, probe_timeout > 0, topology_solve_seconds > 0")

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Config:
        """Defaults, overridden by PCCL_<FIELD> environment variables, then by `overrides`."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for spec in dataclasses.fields(cls):
            raw = env.get("PCCL_" + spec.name.upper())
            if raw is None:
                continue
            try:
                if spec.type in ("float", float):
                    values[spec.name] = float(raw)
                elif spec.type in ("int", int):
                    values[spec.name] = int(raw)
                elif spec.type in ("bool", bool):
                    values[spec.name] = _BOOLS[raw.strip().lower()]
                else:
                    values[spec.name] = raw or None
            except (ValueError, KeyError):
                raise ConfigError(f"PCCL_{spec.name.upper()}={raw!r} is not a valid {spec.type}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
