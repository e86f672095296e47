"""The master's records and the contract its rule sets share. Plain data: peers,
groups, op records, recoveries, syncs and probe rounds, the effects a rule returns
(Send, Log), and `Rules`, the protocol every rule set (pccl_py.master.membership
and the mixins beside it) is written against."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from pccl_py.errors import FailureKind
from pccl_py.master.election import Election, Submission
from pccl_py.wire import beats, protocol

OpKey = tuple[int, int, int]  # (epoch, tag, seq)

KEEP_EPOCHS = 4  # decided ops of this many recent epochs are kept for late reporters
MAX_OPS_PER_GROUP = 20000


class Phase(enum.Enum):
    PENDING = "pending"
    ADMITTED = "admitted"
    RECOVERING = "recovering"  # rejoined a restarted master; its group is re-forming


class RejoinRefused(Exception):
    """A rejoin the master cannot take (the peer must register afresh)."""


@dataclass(frozen=True)
class RejoinInfo:
    """What a peer tells a restarted master about itself and its group."""

    epoch: int
    ring: tuple[int, ...]
    round: int
    revision: int | None  # the last revision it synced
    pending: tuple[tuple[OpKey, bool, str, str], ...]  # reported, no verdict: (key, ok, kind, msg)
    decided: tuple[tuple[OpKey, bool, str, str, int], ...]  # verdicts it got: (key, ok, kind, msg, world)
    waiting: tuple[Any, ...] = ()  # ("pending", round, index, query) or ("vote", round): waits in it
    answered: tuple[int, ...] = ()  # (round, index, count): its last pending_peers() answer
    rsag: bool = True  # its epoch's algorithm choice (the topology message's `rsag`)



@dataclass
class Peer:
    id: int
    group: int
    host: str
    port: int
    name: str
    phase: Phase
    last_seen: float
    # A joiner admitted by a vote replays the members' part of that vote: "pending" (a
    # pending_peers() answered with replay_count, then an update_topology()), "vote"
    # (an update_topology() only), None (nothing to replay). Only while the group is
    # still in joined_round, the round that vote opened.
    replay: str | None = None
    replay_count: int = 0
    joined_round: int = -1
    # The master's measured round trip to it (seconds; None until measured): which
    # algorithm its epochs' larger all-reduces use (pccl_py.master.algorithm).
    rtt: float | None = None
    # Still being measured (the vote that would admit it into an epoch waits, at most
    # Membership.rtt_wait after it registered).
    measuring: bool = False
    registered: float = 0.0
    # What its data connections get from its host (the "transport" message), for
    # `pccl status`: {"cc", "cc_note", "send_buffer", "recv_buffer"}; empty until told.
    transport: dict[str, Any] = field(default_factory=dict)
    # Heartbeat datagrams (pccl_py.wire.beats): the token its welcome gave it, whether
    # one of its datagrams has arrived, and when the last did (last_seen: over TCP).
    # Membership.silent() judges both.
    beat_token: bytes = field(default_factory=beats.new_token)
    datagrams: bool = False
    last_datagram: float = 0.0


@dataclass(frozen=True)
class Blocked:
    """What a member told the master it has been waiting in for a while."""

    call: str  # update_topology, pending_peers, sync_shared_state, optimize_topology, or a DATA_CALL
    op: OpKey | None  # the data-plane op it waits on (a DATA_CALL)
    desc: str  # that op's shape: "tag 0, step 3, 1024 x float32, SUM"
    inflight: tuple[tuple[OpKey, str], ...]  # its data-plane ops in flight, with their shapes


@dataclass(frozen=True)
class Send:
    """Send `msg` to peer `to`."""

    to: int
    msg: protocol.Message


@dataclass(frozen=True)
class Log:
    """A structured event for the event log."""

    kind: str
    fields: dict[str, Any]


Effect = Send | Log


@dataclass(frozen=True)
class Report:
    ok: bool  # the peer holds the complete result (it committed, or it voted)
    kind: str
    msg: str
    culprit: int  # -1: unknown
    # The peer's commit vote reached it from all others: it has already returned
    # success and waits for nothing (its report comes in a "done" batch).
    committed: bool = False


@dataclass
class OpRecord:
    key: OpKey
    participants: frozenset[int]
    reports: dict[int, Report] = field(default_factory=dict)
    decided: dict[str, Any] | None = None
    first_failure_at: float | None = None
    # The mismatch this op was caught in (its text), when a "mismatch" named it: a
    # broken connection is then that mismatch's consequence, not a lost peer.
    mismatch: str | None = None


@dataclass
class Recovery:
    """A group re-forming after a master restart."""

    started: float
    infos: dict[int, RejoinInfo] = field(default_factory=dict)
    reports: list[tuple[int, OpKey, Report]] = field(default_factory=list)  # op reports meanwhile


@dataclass
class SyncRecord:
    """A shared-state sync between its plan and its result."""

    participants: frozenset[int]
    election: Election
    reports: dict[int, tuple[bool, str, str]] = field(default_factory=dict)  # peer -> (ok, kind, msg)


@dataclass
class ProbeRecord:
    """An optimize_topology() between its first probe round and the new ring."""

    participants: set[int]
    exposures: dict[int, tuple[int, int]]  # peer -> (exposure id, probe bytes)
    rounds: list[list[tuple[int, int]]]  # (sender, receiver) pairs, one round at a time
    awaiting: set[int] = field(default_factory=set)  # probers of the current round
    round_id: int = 0


@dataclass
class Group:
    id: int
    epoch: int = 0
    ring: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # admission order
    votes: set[int] = field(default_factory=set)
    pending_queries: dict[int, int] = field(default_factory=dict)  # peer -> query id
    round: int = 0  # completed topology votes: every member numbers its ops from here
    rings: dict[int, tuple[int, ...]] = field(default_factory=dict)  # recent epochs
    ops: dict[OpKey, OpRecord] = field(default_factory=dict)  # insertion order = age
    # Shared state: the last revision the group synced, who took part, the sync in
    # progress (requests collected, then the planned transfer).
    state_revision: int | None = None
    last_synced: set[int] = field(default_factory=set)
    sync_requests: dict[int, tuple[Submission, int]] = field(default_factory=dict)  # peer -> (it, exposure)
    sync_active: SyncRecord | None = None
    pruned_at_epoch: int = 0
    # Topology optimisation: measured bandwidths (sender, receiver) -> (bytes/s, when),
    # the optimize_topology() calls collected (peer -> (exposure, probe bytes)), the
    # probe rounds in progress, and whether the ring order is the solver's (then later
    # epochs re-solve instead of appending joiners).
    bandwidth: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    optimize_requests: dict[int, tuple[int, int]] = field(default_factory=dict)
    probing: ProbeRecord | None = None
    probe_seq: int = 0
    optimized: bool = False
    # Set by optimize_topology() when some pair of members is much slower than the
    # optimised ring's slowest hop: larger all-reduces then keep to the ring, which
    # avoids those pairs, instead of the direct reduce-scatter + all-gather, which uses
    # every pair (the epoch's topology message carries it as `rsag`).
    ring_only: bool = False
    # The current epoch's choice (pccl_py.master.algorithm), decided when the epoch
    # began and sent with every topology message of it.
    rsag: bool = True
    recovery: Recovery | None = None
    # After a master restart: members whose last synced revision is behind the group's
    # (the old master died while telling them the result of that sync).
    behind: set[int] = field(default_factory=set)
    recovered: set[int] = field(default_factory=set)  # members since the re-forming, until a sync completes
    pending_answer: tuple[int, int] | None = None  # (round, count) of the last pending_peers() answer
    blocked: dict[int, Blocked] = field(default_factory=dict)  # member -> the call it waits in
    # Joiners' fresh calls not decided yet: a replay of the vote that admitted them, or
    # a real call (peer -> (call, pending query id)); see _resolve_held().
    held: dict[int, tuple[str, int]] = field(default_factory=dict)
    mismatch_since: float | None = None  # since when every member waits in calls that cannot match


def failures_root(record: OpRecord) -> bool:
    """Whether a participant reported a failure other than a broken connection."""
    return any(not r.ok and r.kind != FailureKind.PEER_LOST for r in record.reports.values())


class Rules(Protocol):
    """What the rule sets use of each other (Membership implements all of it)."""

    heartbeat_interval: float
    heartbeat_timeout: float
    failure_grace: float
    bandwidth_ttl: float
    solve_seconds: float
    incarnation: int
    recovery_wait: float
    hold_until: float
    mismatch_grace: float
    peers: dict[int, Peer]
    groups: dict[int, Group]
    _departed: dict[int, str]
    _knocked: dict[int, float]

    def welcome(self, peer_id: int, admitted: bool, waits_in: Group | None = None) -> protocol.Message: ...

    def _admit_pending(self, g: Group, reason: str, vote: bool = False) -> list[Effect]: ...

    def _admitted(self, peer_id: int) -> tuple[Peer, Group]: ...

    def _members(self, g: Group) -> list[list[Any]]: ...

    def _joining(self, g: Group, peer_id: int, host: str, port: int) -> list[Effect]: ...

    def _advance_probes(self, g: Group, now: float) -> list[Effect]: ...

    def _complete_optimize_requests(self, g: Group, now: float) -> list[Effect]: ...

    def _complete_pending_queries(self, g: Group) -> list[Effect]: ...

    def _complete_sync(self, g: Group) -> list[Effect]: ...

    def _complete_sync_requests(self, g: Group) -> list[Effect]: ...

    def _complete_votes(self, g: Group) -> list[Effect]: ...

    def _decide(self, g: Group, record: OpRecord, now: float, grace_over: bool = False) -> list[Effect]: ...

    def _engaged(self, g: Group, pid: int) -> set[str]: ...

    def _fail_mismatch(self, g: Group, calls: dict[int, tuple[Blocked, set[tuple[Any, ...]]]], now: float) -> list[Effect]: ...

    def _mismatched(self, g: Group) -> dict[int, tuple[Blocked, set[tuple[Any, ...]]]] | None: ...

    def _new_epoch(self, g: Group, ring: list[int], reason: str, vote: bool = False) -> list[Effect]: ...

    def _op_open(self, g: Group, key: OpKey) -> bool: ...

    def _outcome(
        self, g: Group, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, world: int
    ) -> protocol.Message: ...

    def _rates(self, g: Group) -> dict[tuple[int, int], float]: ...

    def _requested(self, g: Group, pid: int) -> set[str]: ...

    def _resolve_held(self, g: Group) -> list[Effect]: ...

    def _ring_message(self, g: Group, reason: str, vote: bool) -> protocol.Message: ...

    def _solve(self, g: Group, peers: list[int], initial: list[int] | None = None, budget: float | None = None) -> list[int]: ...

    def _sync_result(self, g: Group, ok: bool, kind: str, msg: str) -> protocol.Message: ...

    def _try_reform(self, g: Group, now: float, force: bool) -> list[Effect]: ...

    def _unblock(self, g: Group, call: str) -> None: ...
