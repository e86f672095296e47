"""The master's decisions, as a pure state machine: peers, groups, admission, epochs,
rings, collective votes and the outcome of every collective. No I/O: each input
returns the effects (messages to send, events to log) for the master to carry out,
so every rule here is unit-tested without sockets. See docs/protocol.md.

Peer phases:   (new) --register--> PENDING --admitted in a topology vote--> ADMITTED
               PENDING|ADMITTED --leave / crash / heartbeat timeout--> (gone)
               (new master) --rejoin--> RECOVERING --group re-formed--> ADMITTED
A group with no admitted peer admits its pending peers at once.

Master restart (the master is soft state): peers that find a new master re-register
with "rejoin", carrying their epoch, ring, op round, last synced revision, the ops
they reported without a verdict and the verdicts they received. The group re-forms
when every member of the newest ring has rejoined (or `recovery_wait` passed): the
epoch and ring are taken over (a new epoch only if members are missing), verdicts any
member received are given to all, and ops every member reported ok succeed.

A joiner admitted by a topology vote took part in that vote: while it has made no
other collective call, its first update_topology() returns at once (and a
pending_peers() before it gets the answer the members got before that vote), so a
joiner that runs the members' loop lines up with them (docs/protocol.md, "Joining").

Mismatched collectives: a member whose collective call has waited a while says what
it waits in ("blocked": the call, and the data-plane ops it has in flight). When every
member of a group is blocked and no collective is common to all of them for
`mismatch_grace`, none can complete: every member's call fails with
CollectiveMismatch (data-plane ops get that outcome), and the op round restarts.

Topology optimisation (optimize_topology(), a collective like a vote): probe rounds
of the missing or stale pairs, then the ring pccl_py.topology solves, in a new epoch.

Op outcome (per group, epoch, tag, seq; participants = the ring of that epoch):
  success  when every participant reported success;
  failure  when a participant reported a failure, or left the group before reporting.
A failure that only says "my neighbour's connection broke" (PeerLost from a live
peer) may be a cascade of another failure; the decision waits up to `failure_grace`
for the root cause. Once decided, an outcome never changes, and every participant
still alive is told, whether it reported or not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pccl_py.errors import FailureKind
from pccl_py.master import topology
from pccl_py.master.election import Election, ElectionError, Submission, elect
from pccl_py.wire import protocol

OpKey = tuple[int, int, int]  # (epoch, tag, seq)

_KEEP_EPOCHS = 4  # decided ops of this many recent epochs are kept for late reporters
_MAX_OPS_PER_GROUP = 20000


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


@dataclass(frozen=True)
class Blocked:
    """What a member told the master it has been waiting in for a while."""

    call: str  # update_topology, pending_peers, sync_shared_state, optimize_topology, all_reduce
    op: OpKey | None  # the data-plane op it waits on (all_reduce)
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


class Membership:
    def __init__(
        self,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        failure_grace: float,
        *,
        bandwidth_ttl: float = 600.0,
        solve_seconds: float = 0.5,
        incarnation: int = 0,
        recovery_wait: float | None = None,
        hold_first_admission_until: float = 0.0,
        mismatch_grace: float = 0.25,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.failure_grace = failure_grace
        self.bandwidth_ttl = bandwidth_ttl  # a measurement older than this is probed again
        self.solve_seconds = solve_seconds  # time budget of the ring heuristic (N > 10)
        self.incarnation = incarnation  # this master's random id: peers tell a restart by it
        # How long a re-forming group waits for missing members after the first rejoin.
        self.recovery_wait = heartbeat_timeout if recovery_wait is None else recovery_wait
        # A restarted master gives the members of its groups this long to rejoin before it
        # forms a group afresh from new peers (monotonic time; 0: admit at once).
        self.hold_until = hold_first_admission_until
        # How long every member must wait in calls that cannot match before they fail.
        self.mismatch_grace = mismatch_grace
        self.peers: dict[int, Peer] = {}
        self.groups: dict[int, Group] = {}
        self._departed: dict[int, str] = {}  # peer -> cause ("left", "crashed", "hung"), recent only

    # ------------------------------------------------------------------ inputs

    def register(self, peer_id: int, group: int, host: str, port: int, name: str, now: float) -> list[Effect]:
        """Registers a new peer (ids are chosen by the peers: random 63-bit numbers).
        Raises ValueError if the id is taken."""
        if peer_id in self.peers or not 0 <= peer_id < 2**63:
            raise ValueError(f"peer id {peer_id} is taken or out of range")
        g = self.groups.setdefault(group, Group(group))
        self.peers[peer_id] = Peer(peer_id, group, host, port, name, Phase.PENDING, now)
        g.pending.append(peer_id)
        effects: list[Effect] = [Log("join", {"peer": peer_id, "group": group, "name": name, "host": host, "port": port})]
        admit_now = not g.ring
        if g.recovery is not None or now < self.hold_until:
            admit_now = False  # its members may be coming back: the newcomer waits
        effects.append(
            Send(
                peer_id,
                protocol.make(
                    "welcome",
                    peer_id=peer_id,
                    heartbeat_interval=self.heartbeat_interval,
                    heartbeat_timeout=self.heartbeat_timeout,
                    admitted=admit_now,
                    master=self.incarnation,
                ),
            )
        )
        if admit_now:
            effects += self._admit_pending(g, "first peers of the group")
        else:
            # Peers blocked in pending_peers() may now be answered differently; they are
            # answered when every admitted peer asks, so nothing to do here.
            pass
        return effects

    def heartbeat(self, peer_id: int, now: float) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        peer.last_seen = now
        return True

    def vote_topology(self, peer_id: int, now: float, fresh: bool = False) -> list[Effect]:
        """A member called update_topology(). `fresh`: the peer made no other collective
        call since its admission (only pending_peers())."""
        peer, g = self._admitted(peer_id)
        g.blocked.pop(peer.id, None)
        if self._may_replay(peer, g, fresh, "update_topology"):
            g.held[peer.id] = ("update_topology", 0)
            return self._resolve_held(g)
        peer.replay = None
        g.votes.add(peer.id)
        return self._complete_votes(g) + self._resolve_held(g)

    def query_pending(self, peer_id: int, query: int, now: float, fresh: bool = False) -> list[Effect]:
        peer, g = self._admitted(peer_id)
        g.blocked.pop(peer.id, None)
        if self._may_replay(peer, g, fresh, "pending_peers"):
            g.held[peer.id] = ("pending_peers", query)
            return self._resolve_held(g)
        peer.replay = None
        g.pending_queries[peer.id] = query
        return self._complete_pending_queries(g) + self._resolve_held(g)

    def report_blocked(
        self, peer_id: int, call: str, op: OpKey | None, desc: str, inflight: list[tuple[OpKey, str]], now: float
    ) -> list[Effect]:
        """A member has been waiting in `call` for a while (Config.blocked_report_after).
        Mismatches are decided by tick(), once they have lasted `mismatch_grace`."""
        peer, g = self._admitted(peer_id)
        if call != "all_reduce" and call not in self._requested(g, peer.id) and call not in g.held.get(peer.id, ()):
            return []  # answered meanwhile: the report crossed the answer
        g.blocked[peer.id] = Blocked(call, op, desc, tuple(inflight))
        return self._resolve_held(g)

    def report_committed(self, peer_id: int, keys: list[OpKey], now: float) -> list[Effect]:
        """A "done" batch: ops this peer committed through the commit vote. Nobody
        waits on these, so they are never answered; an op not known yet is decided at
        once (a commit proves that every participant holds the result)."""
        effects: list[Effect] = []
        for key in keys:
            effects += self.report_op(peer_id, key, True, "", "", -1, now, committed=True)
        return effects

    def report_op(
        self, peer_id: int, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, now: float, committed: bool = False
    ) -> list[Effect]:
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.replay = None  # it ran a collective: nothing left to replay
        if peer is not None and peer.phase is Phase.RECOVERING:
            recovery = self.groups[peer.group].recovery
            assert recovery is not None
            recovery.reports.append((peer_id, key, Report(ok, kind, msg, culprit, committed)))
            return []
        peer, g = self._admitted(peer_id)
        epoch = key[0]
        record = g.ops.get(key)
        if record is None:
            participants = g.rings.get(epoch)
            if committed and (participants is None or peer.id not in participants):
                return []  # an epoch this master forgot (or never ran): nothing to settle
            if participants is None:
                # An epoch this master has no ring for (pruned, or from a future it never
                # made): the op cannot be vouched for.
                outcome = self._outcome(
                    g, key, False, FailureKind.ABORTED, f"epoch {epoch} is not current (group is at {g.epoch})", -1, 0
                )
                return [Send(peer.id, outcome)]
            if peer.id not in participants:
                outcome = self._outcome(
                    g, key, False, FailureKind.PROTOCOL, f"peer {peer.id} is not in the ring of epoch {epoch}", -1, 0
                )
                return [Send(peer.id, outcome)]
            record = OpRecord(key, frozenset(participants))
            g.ops[key] = record
            self._prune_ops(g)
        if peer.id not in record.participants:
            outcome = self._outcome(g, key, False, FailureKind.PROTOCOL, f"peer {peer.id} is not in the ring of epoch {epoch}", -1, 0)
            return [Send(peer.id, outcome)]
        if record.decided is not None:
            if committed:
                if not record.decided["ok"]:
                    return [Log("contradiction", {"group": g.id, "peer": peer.id, "key": list(key)})]
                return []
            return [Send(peer.id, record.decided)]  # every waiting report gets an answer
        record.reports[peer.id] = Report(ok, kind, msg, culprit, committed)
        if not ok and record.first_failure_at is None:
            record.first_failure_at = now
        return self._decide(g, record, now)

    def request_sync(self, peer_id: int, submission: Submission, exposure: int, now: float) -> list[Effect]:
        """A peer called sync_shared_state(): collective of the admitted peers."""
        peer, g = self._admitted(peer_id)
        peer.replay = None
        g.blocked.pop(peer.id, None)
        if g.sync_active is not None and peer.id in g.sync_active.participants:
            return [Send(peer.id, self._sync_result(g, False, FailureKind.ABORTED, "a previous sync is still in progress"))]
        g.sync_requests[peer.id] = (submission, exposure)
        return self._complete_sync_requests(g) + self._resolve_held(g)

    def sync_done(self, peer_id: int, ok: bool, kind: str, msg: str, now: float, revision: int) -> list[Effect]:
        """A peer's part of the planned sync is over; `revision` is the plan's."""
        peer, g = self._admitted(peer_id)
        record = g.sync_active
        if record is None and ok and peer.id in g.behind and revision == g.state_revision:
            # It finished the sync the others completed before the master restarted.
            # (A peer behind for another reason, e.g. a joiner that never synced, may
            # answer a newer plan that nobody completed: that one is retried below.)
            g.behind.discard(peer.id)
            g.last_synced.add(peer.id)
            assert g.state_revision is not None
            return [Send(peer.id, self._sync_result(g, True, "", ""))]
        g.behind.discard(peer.id)
        if record is None and peer.id in g.recovered:
            # A sync the previous master planned and this one never saw: the members
            # ask again (the communicator repeats its request on "Retry").
            return [Send(peer.id, self._sync_result(g, False, FailureKind.RETRY, "the master restarted during this sync"))]
        if record is None or peer.id not in record.participants:
            return [Send(peer.id, self._sync_result(g, False, FailureKind.ABORTED, "no sync in progress for this peer"))]
        record.reports[peer.id] = (ok, kind, msg)
        return self._complete_sync(g)

    def request_optimize(self, peer_id: int, exposure: int, probe_bytes: int, now: float) -> list[Effect]:
        """A peer called optimize_topology(): collective of the admitted peers. Its engine
        serves a probe buffer of `probe_bytes` under `exposure`."""
        peer, g = self._admitted(peer_id)
        peer.replay = None
        g.blocked.pop(peer.id, None)
        if g.probing is not None and peer.id in g.probing.participants:
            return [Log("optimize_ignored", {"group": g.id, "peer": peer.id, "why": "already probing"})]
        g.optimize_requests[peer.id] = (exposure, probe_bytes)
        return self._complete_optimize_requests(g, now) + self._resolve_held(g)

    def probe_done(self, peer_id: int, round_id: int, results: list[tuple[int, float]], now: float) -> list[Effect]:
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

    def rejoin(
        self, peer_id: int, group: int, host: str, port: int, name: str, info: RejoinInfo, now: float
    ) -> list[Effect]:
        """A member of a group that a previous master ran registers with this one.
        Raises RejoinRefused when the group has already re-formed without it (it must
        register afresh, as a new peer) or the id is taken."""
        if peer_id in self.peers or not 0 <= peer_id < 2**63:
            raise RejoinRefused(f"peer id {peer_id} is taken or out of range")
        g = self.groups.setdefault(group, Group(group))
        # Newcomers that registered first stay pending (the group's members admit them
        # once it re-forms); a group this master already formed is not taken over.
        if g.recovery is None and (g.ring or g.epoch > 0):
            raise RejoinRefused(f"group {group} has re-formed without this peer (epoch {g.epoch})")
        if g.recovery is None:
            g.recovery = Recovery(now)
        self.peers[peer_id] = Peer(peer_id, group, host, port, name, Phase.RECOVERING, now)
        g.recovery.infos[peer_id] = info
        welcome = protocol.make(
            "welcome",
            peer_id=peer_id,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            admitted=True,
            master=self.incarnation,
        )
        effects: list[Effect] = [
            Log("rejoin", {"peer": peer_id, "group": group, "epoch": info.epoch, "host": host, "port": port}),
            Send(peer_id, welcome),
        ]
        return effects + self._try_reform(g, now, force=False)

    def _try_reform(self, g: Group, now: float, force: bool) -> list[Effect]:
        recovery = g.recovery
        if recovery is None or not recovery.infos:
            return []
        newest = max(recovery.infos.values(), key=lambda i: i.epoch)
        if not force and not set(newest.ring) <= set(recovery.infos):
            return []  # members of the newest ring are still missing: wait for them
        g.recovery = None
        epoch, ring = newest.epoch, list(newest.ring)
        # A member of the newest ring that missed its topology message still belongs.
        members = [pid for pid in ring if pid in recovery.infos]
        stale = [pid for pid in recovery.infos if pid not in members]
        effects: list[Effect] = []
        for pid in stale:  # from an older epoch: not a member any more; it re-registers
            effects.append(Send(pid, protocol.make("evicted", reason="the group re-formed after a master restart without this peer")))
            del self.peers[pid]
            self._departed[pid] = "lost"
        for pid in ring:
            if pid not in members:
                self._departed[pid] = "lost"  # did not come back: its ops fail as PeerLost
        if not members:
            g.ring = []
            g.epoch = max(g.epoch, epoch) + 1
            if g.pending:
                effects += self._admit_pending(g, "first peers of the group")
            return effects
        for pid in members:
            self.peers[pid].phase = Phase.ADMITTED
        infos = [recovery.infos[pid] for pid in members]
        g.epoch = epoch
        g.ring = ring
        g.rings = {epoch: tuple(ring)}
        g.round = max(i.round for i in infos)
        revisions = [i.revision for i in infos if i.revision is not None]
        g.state_revision = max(revisions) if revisions else None
        g.last_synced = {pid for pid in members if recovery.infos[pid].revision == g.state_revision}
        g.behind = set(members) - g.last_synced if g.state_revision is not None else set()
        g.recovered = set(members)
        g.pruned_at_epoch = epoch
        effects.append(Log("reform", {"group": g.id, "epoch": epoch, "members": members, "missing": [p for p in ring if p not in members]}))
        # Ops of the newest epoch: a verdict any member received holds for all. Ops of
        # older epochs (a member missed the topology that ended them) get the verdict
        # someone received, else fail as superseded, as under the old master.
        verdicts = {key: (ok, kind, msg, world) for i in infos for key, ok, kind, msg, world in i.decided}
        for pid in members:
            for key, ok, kind, msg in recovery.infos[pid].pending:
                if key[0] < epoch:
                    v = verdicts.get(key, (False, FailureKind.PEER_LOST, f"superseded by epoch {epoch}", 0))
                    effects.append(Send(pid, self._outcome(g, key, v[0], v[1], v[2], -1, v[3])))
        for pid in members:
            for key, ok, kind, msg, world in recovery.infos[pid].decided:
                if key[0] != epoch or key in g.ops:
                    continue
                record = OpRecord(key, frozenset(ring))
                record.decided = self._outcome(g, key, ok, kind, msg, -1, world)
                g.ops[key] = record
        reports = [(pid, key, Report(ok, kind, msg, -1)) for pid in members for key, ok, kind, msg in recovery.infos[pid].pending]
        reports += [(pid, key, r) for pid, key, r in recovery.reports if pid in members]
        for pid, key, report in reports:
            if key[0] != epoch or pid not in ring:
                continue
            record = g.ops.setdefault(key, OpRecord(key, frozenset(ring)))
            if record.decided is None:
                record.reports[pid] = report
                if not report.ok and record.first_failure_at is None:
                    record.first_failure_at = now
        # Collective answers the old master sent to some members only: a pending_peers()
        # answer (named by round and index) and a completed vote (a newer round).
        answers = {(i.answered[0], i.answered[1]): i.answered[2] for i in infos if len(i.answered) == 3}
        vote_behind = set()
        for pid in members:
            waiting = recovery.infos[pid].waiting
            if len(waiting) == 4 and waiting[0] == "pending" and (waiting[1], waiting[2]) in answers:
                count = answers[(waiting[1], waiting[2])]
                effects.append(Send(pid, protocol.make("pending_count", query=int(waiting[3]), count=count)))
            elif len(waiting) == 2 and waiting[0] == "vote" and int(waiting[1]) < g.round:
                vote_behind.add(pid)
                effects.append(Send(pid, self._ring_message(g, "the master restarted; the vote completed", vote=True)))
        if len(members) == len(ring):
            reformed = self._ring_message(g, "the master restarted; the group re-formed", vote=False)
            effects += [Send(pid, reformed) for pid in ring if pid not in vote_behind]
        else:
            lost = [p for p in ring if p not in members]
            effects += self._new_epoch(g, members, f"the master restarted; peers {lost} did not come back")
        for record in list(g.ops.values()):
            if record.decided is not None:
                # Re-issued with the current epoch as next_epoch (for retries).
                key = record.key
                record.decided = self._outcome(g, key, record.decided["ok"], record.decided["kind"],
                                               record.decided["msg"], record.decided["peer"], record.decided["world"])
                effects += [Send(pid, record.decided) for pid in sorted(record.participants) if pid in self.peers]
            else:
                effects += self._decide(g, record, now)
        return effects

    def leave(self, peer_id: int, now: float) -> list[Effect]:
        return self._remove(peer_id, "left", "left the group", now)

    def evict(self, peer_id: int, cause: str, detail: str, now: float) -> list[Effect]:
        """cause: "crashed" (its connection broke) or "hung" (heartbeat timeout)."""
        return self._remove(peer_id, cause, detail, now)

    def tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.heartbeat_timeout:
                effects += self.evict(
                    peer.id, "hung", f"no heartbeat for {now - peer.last_seen:.1f}s", now
                )
        for g in list(self.groups.values()):
            if g.recovery is not None and now - g.recovery.started >= self.recovery_wait:
                effects += self._try_reform(g, now, force=True)
            if not g.ring and g.pending and g.recovery is None and now >= self.hold_until:
                effects += self._admit_pending(g, "first peers of the group")
            for record in list(g.ops.values()):
                failing_since = record.first_failure_at
                if record.decided is None and failing_since is not None and now - failing_since >= self.failure_grace:
                    effects += self._decide(g, record, now, grace_over=True)
            effects += self._check_mismatch(g, now)
        return effects

    # ------------------------------------------------------------------ queries

    def status(self) -> dict[str, Any]:
        return {
            "peers": {
                str(p.id): {
                    "group": p.group,
                    "address": f"{p.host}:{p.port}",
                    "name": p.name,
                    "phase": p.phase.value,
                }
                for p in self.peers.values()
            },
            "groups": {
                str(g.id): {
                    "epoch": g.epoch,
                    "ring": list(g.ring),
                    "pending": list(g.pending),
                    "state_revision": g.state_revision,
                    "optimized": g.optimized,
                    # [sender, receiver, bytes/s] for every measured pair
                    "bandwidth": [[a, b, rate] for (a, b), (rate, _) in sorted(g.bandwidth.items())],
                }
                for g in self.groups.values()
            },
        }

    # ------------------------------------------------------------------ rules

    def _may_replay(self, peer: Peer, g: Group, fresh: bool, call: str) -> bool:
        """Whether this call of a joiner may be its part of the vote that admitted it."""
        if not fresh or peer.replay is None or g.round != peer.joined_round:
            return False
        return call == "update_topology" or peer.replay == "pending"

    def _engaged(self, g: Group, pid: int) -> set[str]:
        """The collectives member `pid` is in, as far as this master knows."""
        calls = self._requested(g, pid)
        b = g.blocked.get(pid)
        if b is not None and (b.call != "all_reduce" or (b.op is not None and self._op_open(g, b.op))):
            calls.add(b.call)
        return calls

    def _requested(self, g: Group, pid: int) -> set[str]:
        """The control-plane collectives member `pid` asked for and still waits in."""
        calls = set()
        if pid in g.votes:
            calls.add("update_topology")
        if pid in g.pending_queries:
            calls.add("pending_peers")
        if pid in g.sync_requests or (g.sync_active is not None and pid in g.sync_active.participants):
            calls.add("sync_shared_state")
        if pid in g.optimize_requests or (g.probing is not None and pid in g.probing.participants):
            calls.add("optimize_topology")
        return calls

    def _resolve_held(self, g: Group) -> list[Effect]:
        """Decides the joiners' fresh calls held so far. If the other members are in the
        same call, it is a real one (it counts like theirs); if they went on to another
        collective, it was the joiner's part of the vote that admitted it, answered as
        the members were: the vote's ring, or their pending_peers() answer. Otherwise
        (the members compute) it waits."""
        effects: list[Effect] = []
        for pid, (call, query) in list(g.held.items()):
            peer = self.peers[pid]
            others = [self._engaged(g, p) for p in g.ring if p != pid and p not in g.held]
            if others and not any(call in e for e in others) and not any(others):
                continue
            del g.held[pid]
            g.blocked.pop(pid, None)
            if not others or any(call in e for e in others):
                peer.replay = None
                if call == "update_topology":
                    g.votes.add(pid)
                    effects += self._complete_votes(g)
                else:
                    g.pending_queries[pid] = query
                    effects += self._complete_pending_queries(g)
                continue
            effects.append(Log("replay", {"group": g.id, "peer": pid, "call": call}))
            if call == "update_topology":
                peer.replay = None
                effects.append(Send(pid, self._ring_message(g, "the vote that admitted this peer", vote=True)))
            else:
                peer.replay = "vote"
                effects.append(Send(pid, protocol.make("pending_count", query=query, count=peer.replay_count)))
        return effects

    def _unblock(self, g: Group, call: str) -> None:
        """A collective completed: nobody waits in it any more."""
        for pid in [p for p, b in g.blocked.items() if b.call == call]:
            del g.blocked[pid]

    def _op_open(self, g: Group, key: OpKey) -> bool:
        """Whether data-plane op `key` can still be waiting: of the current epoch, undecided."""
        record = g.ops.get(key)
        return key[0] == g.epoch and (record is None or record.decided is None)

    def _mismatched(self, g: Group) -> dict[int, tuple[Blocked, set[tuple[Any, ...]]]] | None:
        """Every member's blocked call and the collectives it is part of, when every
        member is blocked and no collective is common to all; else None."""
        if len(g.ring) < 2 or g.recovery is not None or g.probing is not None or g.sync_active is not None:
            return None
        calls: dict[int, tuple[Blocked, set[tuple[Any, ...]]]] = {}
        for pid in g.ring:
            b = g.blocked.get(pid)
            if b is None:
                return None
            parts: set[tuple[Any, ...]] = {("op", k, d) for k, d in b.inflight if self._op_open(g, k)}
            if b.call == "all_reduce":
                if b.op is None or not self._op_open(g, b.op):
                    return None  # its op is over (or moved to a new epoch): it is not stuck
                parts.add(("op", b.op, b.desc))
            else:
                parts.add((b.call,))
            calls[pid] = (b, parts)
        common = set.intersection(*(parts for _, parts in calls.values()))
        return None if common else calls

    def _check_mismatch(self, g: Group, now: float) -> list[Effect]:
        calls = self._mismatched(g)
        if calls is None:
            g.mismatch_since = None
            return []
        if g.mismatch_since is None:
            g.mismatch_since = now
        if now - g.mismatch_since < self.mismatch_grace:
            return []
        return self._fail_mismatch(g, calls, now)

    def _fail_mismatch(self, g: Group, calls: dict[int, tuple[Blocked, set[tuple[Any, ...]]]], now: float) -> list[Effect]:
        """Fails every member's call: control-plane calls by a "mismatch" message,
        data-plane ops by a CollectiveMismatch outcome. Op numbering restarts."""
        g.mismatch_since = None
        g.round += 1
        described = []
        for pid, (b, parts) in calls.items():
            name = self.peers[pid].name
            who = f"peer {pid}" + (f" ({name})" if name else "")
            what = f"all_reduce({b.desc})" if b.call == "all_reduce" else f"{b.call}()"
            others = len([p for p in parts if p[0] == "op" and p[1] != b.op])
            described.append(f"{who} in {what}" + (f" with {others} other all-reduce(s) in flight" if others else ""))
        text = "the members are blocked in collectives that cannot match: " + "; ".join(described)
        g.blocked.clear()
        g.held.clear()
        g.votes.clear()
        g.pending_queries.clear()
        g.sync_requests.clear()
        g.optimize_requests.clear()
        effects: list[Effect] = [Log("mismatch", {"group": g.id, "round": g.round, "calls": described})]
        effects += [Send(pid, protocol.make("mismatch", round=g.round, msg=text)) for pid in g.ring]
        keys = sorted({part[1] for _, parts in calls.values() for part in parts if part[0] == "op"})
        for key in keys:
            record = g.ops.get(key)
            if record is None:
                participants = g.rings.get(key[0])
                if participants is None:
                    continue
                record = OpRecord(key, frozenset(participants))
                g.ops[key] = record
            if record.decided is None:
                record.decided = self._outcome(g, key, False, FailureKind.COLLECTIVE_MISMATCH, text, -1, len(record.participants))
                effects.append(Log("outcome", {"group": g.id, "epoch": key[0], "tag": key[1], "seq": key[2],
                                               "ok": False, "kind": FailureKind.COLLECTIVE_MISMATCH,
                                               "participants": sorted(record.participants)}))
                effects += [Send(pid, record.decided) for pid in sorted(record.participants) if pid in self.peers]
        return effects

    def _admitted(self, peer_id: int) -> tuple[Peer, Group]:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise KeyError(peer_id)
        if peer.phase is not Phase.ADMITTED:
            raise PermissionError(f"peer {peer_id} is not admitted yet")
        return peer, self.groups[peer.group]

    def _ring_message(self, g: Group, reason: str, vote: bool) -> protocol.Message:
        ring = [[pid, self.peers[pid].host, self.peers[pid].port] for pid in g.ring]
        return protocol.make("topology", epoch=g.epoch, ring=ring, reason=reason, vote=vote, round=g.round)

    def _new_epoch(self, g: Group, ring: list[int], reason: str, vote: bool = False) -> list[Effect]:
        g.epoch += 1
        g.ring = ring
        g.rings[g.epoch] = tuple(ring)
        for old in [e for e in g.rings if e <= g.epoch - _KEEP_EPOCHS]:
            del g.rings[old]
        msg = self._ring_message(g, reason, vote)
        effects: list[Effect] = [Log("epoch", {"group": g.id, "epoch": g.epoch, "ring": list(ring), "reason": reason})]
        effects += [Send(pid, msg) for pid in ring]
        return effects

    def _admit_pending(self, g: Group, reason: str, vote: bool = False) -> list[Effect]:
        if not vote:
            g.round += 1  # admitted without a vote (empty group): still a fresh numbering
        joiners = list(g.pending)
        g.pending.clear()
        # Members that asked pending_peers() before this vote did so in the previous round.
        asked = g.pending_answer if g.pending_answer is not None and g.pending_answer[0] == g.round - 1 else None
        for pid in joiners:
            peer = self.peers[pid]
            peer.phase = Phase.ADMITTED
            if vote:
                peer.joined_round = g.round
                peer.replay = "pending" if asked is not None else "vote"
                peer.replay_count = asked[1] if asked is not None else 0
        effects: list[Effect] = [Log("admit", {"group": g.id, "peers": joiners})] if joiners else []
        return effects + self._new_epoch(g, self._reorder(g, g.ring + joiners), reason, vote)

    def _complete_votes(self, g: Group) -> list[Effect]:
        if not g.ring or not set(g.ring) <= g.votes:
            return []
        g.votes.clear()
        self._unblock(g, "update_topology")
        g.round += 1
        if g.pending:
            return self._admit_pending(g, "topology update admitted pending peers", vote=True)
        # Nothing changes: everyone goes on in the current epoch.
        msg = self._ring_message(g, "topology unchanged", vote=True)
        return [Send(pid, msg) for pid in g.ring]

    def _complete_pending_queries(self, g: Group) -> list[Effect]:
        if not g.ring or not set(g.ring) <= set(g.pending_queries):
            return []
        count = len(g.pending)
        effects: list[Effect] = [
            Send(pid, protocol.make("pending_count", query=q, count=count)) for pid, q in g.pending_queries.items()
        ]
        g.pending_queries.clear()
        g.pending_answer = (g.round, count)
        self._unblock(g, "pending_peers")
        return effects

    def _remove(self, peer_id: int, cause: str, detail: str, now: float) -> list[Effect]:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return []
        self._departed[peer_id] = cause
        if len(self._departed) > 10000:
            del self._departed[next(iter(self._departed))]
        g = self.groups[peer.group]
        effects: list[Effect] = [Log("leave" if cause == "left" else "evict", {"peer": peer_id, "group": g.id, "cause": cause, "detail": detail})]
        if peer.phase is Phase.PENDING:
            g.pending.remove(peer_id)
            return effects
        if peer.phase is Phase.RECOVERING:
            if g.recovery is not None:
                g.recovery.infos.pop(peer_id, None)
            return effects
        g.votes.discard(peer_id)
        g.blocked.pop(peer_id, None)
        g.held.pop(peer_id, None)
        g.pending_queries.pop(peer_id, None)
        g.optimize_requests.pop(peer_id, None)
        for pair in [p for p in g.bandwidth if peer_id in p]:
            del g.bandwidth[pair]  # its row and column: a peer that comes back is probed afresh
        survivors = [pid for pid in g.ring if pid != peer_id]
        if survivors:
            effects += self._new_epoch(g, self._reorder(g, survivors), f"peer {peer_id} {cause}: {detail}")
        else:
            g.ring = []
            g.epoch += 1
        # Ops that waited on it can now be decided.
        for record in list(g.ops.values()):
            if record.decided is None and peer_id in record.participants:
                effects += self._decide(g, record, now)
        effects += self._complete_votes(g)
        effects += self._complete_pending_queries(g)
        effects += self._complete_optimize_requests(g, now)
        if g.probing is not None and peer_id in g.probing.participants:
            g.probing.participants.discard(peer_id)
            g.probing.awaiting.discard(peer_id)
            g.probing.rounds = [[p for p in r if peer_id not in p] for r in g.probing.rounds]
            effects += self._advance_probes(g, now)
        g.sync_requests.pop(peer_id, None)
        effects += self._complete_sync_requests(g)
        if g.sync_active is not None and peer_id in g.sync_active.participants:
            effects += self._complete_sync(g)
        effects += self._resolve_held(g)
        if not g.ring and g.pending:
            effects += self._admit_pending(g, "previous peers are gone")
        if not g.ring and not g.pending:
            del self.groups[g.id]  # nothing left to remember; a new group starts afresh
        return effects

    # ------------------------------------------------------------------ topology optimisation

    def _complete_optimize_requests(self, g: Group, now: float) -> list[Effect]:
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

    def _advance_probes(self, g: Group, now: float) -> list[Effect]:
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
        cost = topology.ring_cost(ring, self._rates(g))
        effects: list[Effect] = [
            Log(
                "optimize",
                {"group": g.id, "ring": ring, "bottleneck": cost.bottleneck, "unknown_hops": cost.unknown},
            )
        ]
        return effects + self._new_epoch(g, ring, "optimized", vote=True)

    def _rates(self, g: Group) -> dict[tuple[int, int], float]:
        return {pair: rate for pair, (rate, _) in g.bandwidth.items()}

    def _solve(self, g: Group, peers: list[int], initial: list[int] | None = None, budget: float | None = None) -> list[int]:
        budget = self.solve_seconds if budget is None else budget
        return topology.solve_ring(peers, self._rates(g), time_budget=budget, seed=g.id, initial=initial)

    def _reorder(self, g: Group, ring: list[int]) -> list[int]:
        """The ring of a new epoch. Until the group is optimised: as given (survivors in
        order, joiners appended). After: re-solved over the known bandwidths, so an
        eviction does not leave a slow hop in the ring and joiners (whose pairs are
        unknown until the next optimize_topology()) go where the fewest unknown hops
        and the fastest known ones remain."""
        if not g.optimized or len(ring) < 3:
            return ring
        # A short budget: this runs on every join and departure (exact up to 10 peers).
        return self._solve(g, ring, initial=ring, budget=min(self.solve_seconds, 0.1))

    def _sync_result(self, g: Group, ok: bool, kind: str, msg: str) -> protocol.Message:
        revision = g.state_revision if g.state_revision is not None else -1
        return protocol.make("sync_result", ok=ok, kind=kind, msg=msg, revision=revision)

    def _complete_sync_requests(self, g: Group) -> list[Effect]:
        if not g.ring or not set(g.ring) <= set(g.sync_requests):
            return []
        requests = {pid: g.sync_requests[pid] for pid in g.ring}
        g.sync_requests.clear()
        self._unblock(g, "sync_shared_state")
        try:
            election = elect([sub for sub, _ in requests.values()], g.state_revision, g.last_synced)
        except ElectionError as exc:
            result = self._sync_result(g, False, FailureKind.STATE_MISMATCH, str(exc))
            return [Log("sync", {"group": g.id, "ok": False, "error": str(exc)})] + [Send(pid, result) for pid in requests]
        g.sync_active = SyncRecord(frozenset(requests), election)
        if not any(election.fetch.get(pid) for pid in requests):
            # Nobody fetches anything: the plan would only be answered by every peer's
            # "nothing received". Decide at once, one round trip instead of two.
            g.sync_active.reports.update({pid: (True, "", "") for pid in requests})
            return self._complete_sync(g)
        sources = sorted({pid for holders in election.holders for pid in holders})
        source_table = [
            [pid, self.peers[pid].host, self.peers[pid].port, requests[pid][1]] for pid in sources if pid in self.peers
        ]
        effects: list[Effect] = [
            Log(
                "sync_plan",
                {
                    "group": g.id,
                    "revision": election.revision,
                    "receivers": {str(p): len(e) for p, e in election.fetch.items()},
                },
            )
        ]
        for pid in requests:
            fetch = [[i, election.hashes[i], list(election.holders[i])] for i in election.fetch.get(pid, ())]
            effects.append(
                Send(pid, protocol.make("sync_plan", revision=election.revision, fetch=fetch, sources=source_table))
            )
        return effects

    def _complete_sync(self, g: Group) -> list[Effect]:
        record = g.sync_active
        if record is None:
            return []
        alive = {pid for pid in record.participants if pid in self.peers}
        if not alive <= set(record.reports):
            return []
        g.sync_active = None
        self._unblock(g, "sync_shared_state")
        failures = sorted((pid, r) for pid, r in record.reports.items() if pid in alive and not r[0])
        if failures:
            pid, (_, kind, msg) = failures[0]
            result = self._sync_result(g, False, kind or FailureKind.PEER_LOST, f"peer {pid}: {msg}")
            log: Effect = Log("sync", {"group": g.id, "ok": False, "error": msg})
        else:
            g.state_revision = record.election.revision
            g.last_synced = set(alive)
            g.behind = set()
            g.recovered = set()
            result = self._sync_result(g, True, "", "")
            log = Log("sync", {"group": g.id, "ok": True, "revision": g.state_revision, "peers": sorted(alive)})
        return [log] + [Send(pid, result) for pid in sorted(alive)]

    def _outcome(
        self, g: Group, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, world: int
    ) -> protocol.Message:
        epoch, tag, seq = key
        return protocol.make(
            "outcome",
            epoch=epoch,
            tag=tag,
            seq=seq,
            ok=ok,
            kind=kind,
            msg=msg,
            peer=culprit,
            next_epoch=g.epoch,
            world=world,
        )

    def _decide(self, g: Group, record: OpRecord, now: float, grace_over: bool = False) -> list[Effect]:
        if record.decided is not None:
            return []
        # The commit vote (docs/protocol.md): a peer reports ok only once it held the
        # complete result, and commits on its own only once every peer did. So one
        # committed report proves success, one failure report proves that nobody
        # committed, and when every live participant holds the result the op succeeds
        # whoever else is gone. Peers that are gone without a word do not decide it.
        alive = {pid for pid in record.participants if pid in self.peers}
        gone_unreported = [pid for pid in sorted(record.participants - alive) if pid not in record.reports or not record.reports[pid].ok]
        failures = {pid: r for pid, r in record.reports.items() if not r.ok}
        all_reported = alive <= set(record.reports)
        if any(r.committed for r in record.reports.values()):
            ok, kind, msg, culprit = True, "", "", -1
        elif failures and gone_unreported:
            culprit = gone_unreported[0]
            cause = self._departed.get(culprit, "lost")
            left = all(self._departed.get(pid) == "left" for pid in gone_unreported) and not failures_root(record)
            ok, kind, msg = False, FailureKind.PEER_LEFT if left else FailureKind.PEER_LOST, f"peer {culprit} {cause} during the op"
        elif failures:
            roots = {pid: r for pid, r in failures.items() if r.kind != FailureKind.PEER_LOST}
            if roots:
                pid, r = min(roots.items())
                ok, kind, msg, culprit = False, r.kind, f"peer {pid}: {r.msg}", r.culprit if r.culprit >= 0 else pid
            elif all_reported or grace_over:
                pid, r = min(failures.items())
                ok, kind, msg, culprit = False, FailureKind.PEER_LOST, f"peer {pid}: {r.msg}", r.culprit
            else:
                return []  # wait for the root cause (tick() decides when the grace ends)
        elif all_reported:
            ok, kind, msg, culprit = True, "", "", -1
        else:
            return []
        outcome = self._outcome(g, record.key, ok, kind, msg, culprit, len(record.participants))
        record.decided = outcome
        effects: list[Effect] = [
            Log(
                "outcome",
                {
                    "group": g.id,
                    "epoch": record.key[0],
                    "tag": record.key[1],
                    "seq": record.key[2],
                    "ok": ok,
                    "kind": kind,
                    "participants": sorted(record.participants),
                },
            )
        ]
        # A success goes to those waiting for it (peers that report later are answered
        # then); a failure to every live participant, to stop ops still running.
        waiting = {pid for pid, r in record.reports.items() if not r.committed}
        effects += [Send(pid, outcome) for pid in sorted(alive) if pid in waiting or not ok]
        return effects

    def _prune_ops(self, g: Group) -> None:
        # Decided ops are kept only so late reporters learn the outcome: drop those of
        # old epochs, and the oldest decided ones past the cap.
        if len(g.ops) <= _MAX_OPS_PER_GROUP and g.pruned_at_epoch == g.epoch:
            return
        g.pruned_at_epoch = g.epoch
        # Undecided ops of old epochs go too: their ring is forgotten, so a late
        # reporter is told the epoch is not current.
        g.ops = {k: r for k, r in g.ops.items() if k[0] > g.epoch - _KEEP_EPOCHS}
        excess = len(g.ops) - _MAX_OPS_PER_GROUP // 2
        if excess > 0:
            for k in [k for k, r in g.ops.items() if r.decided is not None][:excess]:
                del g.ops[k]
