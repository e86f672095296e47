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

from typing import Any

from pccl_py.errors import FailureKind
from pccl_py.master.algorithm import choose_rsag
from pccl_py.master.matching import MatchingRules
from pccl_py.master.probing import ProbeRules
from pccl_py.master.records import (
    KEEP_EPOCHS,
    MAX_OPS_PER_GROUP,
    Blocked,
    Effect,
    Group,
    Log,
    OpKey,
    OpRecord,
    Peer,
    Phase,
    Recovery,
    RejoinInfo,
    RejoinRefused,
    Report,
    Send,
    failures_root,
)
from pccl_py.master.recovery import RecoveryRules
from pccl_py.master.syncing import SyncRules
from pccl_py.wire import beats, protocol

__all__ = [
    "Blocked", "Effect", "Group", "Log", "Membership", "OpKey", "OpRecord", "Peer", "Phase", "Recovery",
    "RejoinInfo", "RejoinRefused", "Report", "Send",
]


class Membership(MatchingRules, RecoveryRules, SyncRules, ProbeRules):
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
        rsag_min_rtt: float = 0.0,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.failure_grace = failure_grace
        self.bandwidth_ttl = bandwidth_ttl  # a measurement older than this is probed again
        self.solve_seconds = solve_seconds  # time budget of the ring heuristic (N > 10)
        self.incarnation = incarnation  # this master's random id: peers tell a restart by it
        # How long a re-forming group waits for missing members after the first rejoin.
        # Rejoins travel over TCP: the heartbeat timeout plus a retransmission's wait.
        self.recovery_wait = heartbeat_timeout + beats.STREAM_ALLOWANCE if recovery_wait is None else recovery_wait
        # A restarted master gives the members of its groups this long to rejoin before it
        # forms a group afresh from new peers (monotonic time; 0: admit at once).
        self.hold_until = hold_first_admission_until
        # How long every member must wait in calls that cannot match before they fail.
        self.mismatch_grace = mismatch_grace
        # rsag for an epoch's larger all-reduces only from this round trip on (0: always).
        self.rsag_min_rtt = rsag_min_rtt
        # A vote that admits peers waits this long at most for their round trips (they
        # decide the new epoch's algorithm); 0 when the choice needs none.
        self.rtt_wait = 2 * heartbeat_interval if rsag_min_rtt > 0 else 0.0
        # The master's UDP port for heartbeat datagrams (the server sets it once bound;
        # 0: none), named in every welcome.
        self.beat_port = 0
        self.peers: dict[int, Peer] = {}
        self.groups: dict[int, Group] = {}
        self._departed: dict[int, str] = {}  # peer -> cause ("left", "crashed", "hung"), recent only
        self._knocked: dict[int, float] = {}  # peer id -> when it knocked (MatchingRules.knock), oldest first

    def register(self, peer_id: int, group: int, host: str, port: int, name: str, now: float) -> list[Effect]:
        """Registers a new peer (ids are chosen by the peers: random 63-bit numbers).
        Raises ValueError if the id is taken."""
        if peer_id in self.peers or not 0 <= peer_id < 2**63:
            raise ValueError(f"peer id {peer_id} is taken or out of range")
        g = self.groups.setdefault(group, Group(group))
        self.peers[peer_id] = Peer(
            peer_id, group, host, port, name, Phase.PENDING, now, measuring=self.rtt_wait > 0, registered=now
        )
        g.pending.append(peer_id)
        effects: list[Effect] = [Log("join", {"peer": peer_id, "group": group, "name": name, "host": host, "port": port})]
        admit_now = not g.ring
        if g.recovery is not None or now < self.hold_until:
            admit_now = False  # its members may be coming back: the newcomer waits
        effects.append(Send(peer_id, self.welcome(peer_id, admit_now, g if not admit_now else None)))
        if admit_now:
            effects += self._admit_pending(g, "first peers of the group")
        else:
            # Both sides open their pools to each other while the members vote (again,
            # after a knock: opening is idempotent). (Peers blocked in pending_peers()
            # are answered when every admitted peer asks.)
            effects += self._joining(g, peer_id, host, port)
        return effects

    def welcome(self, peer_id: int, admitted: bool, waits_in: Group | None = None) -> protocol.Message:
        """`waits_in`: the group a newcomer waits to be admitted to (its ring goes along)."""
        return protocol.make(
            "welcome",
            peer_id=peer_id,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            admitted=admitted,
            master=self.incarnation,
            beat_port=self.beat_port,
            beat_token=self.peers[peer_id].beat_token,
            members=self._members(waits_in) if waits_in is not None else [],
            epoch=waits_in.epoch if waits_in is not None else 0,
        )

    def heartbeat(self, peer_id: int, now: float) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        peer.last_seen = now
        return True

    def beat_datagram(self, peer_id: int, token: bytes, now: float) -> bool:
        """A heartbeat datagram claiming to be from `peer_id` (pccl_py.wire.beats):
        counted, and to be answered, only with that peer's token."""
        peer = self.peers.get(peer_id)
        if peer is None or not beats.same_token(token, peer.beat_token):
            return False
        peer.last_datagram = max(peer.last_datagram, now)
        peer.datagrams = True
        return True

    def silent(self, peer: Peer, now: float) -> str | None:
        """Why `peer` counts as gone at `now`, or None. Heard neither way for the
        timeout, once its datagrams arrive; over TCP for the timeout plus a
        retransmission's wait (beats.STREAM_ALLOWANCE), which is all there is for a
        peer whose datagrams do not, and catches a path where only TCP is lost. Both
        tolerate an outage up to the timeout less an interval."""
        stream = now - peer.last_seen
        if stream > self.heartbeat_timeout + beats.STREAM_ALLOWANCE:
            return f"no heartbeat over TCP for {stream:.1f}s"
        either = now - max(peer.last_seen, peer.last_datagram)
        if peer.datagrams and either > self.heartbeat_timeout:
            return f"no heartbeat for {either:.1f}s"
        return None

    def set_transport(self, peer_id: int, transport: dict[str, Any]) -> None:
        """What a peer's data connections get from its host (its "transport" message),
        kept for status()."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.transport = dict(transport)

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

    def report_committed(self, peer_id: int, keys: list[OpKey], now: float) -> list[Effect]:
        """A "done" batch: ops this peer committed through the commit vote. Nobody
        waits on these, so they are never answered; an op not known yet is decided at
        once (a commit proves that every participant holds the result)."""
        effects: list[Effect] = []
        peer = self.peers.get(peer_id)
        settled = self.groups[peer.group].ops if peer is not None and peer.phase is Phase.ADMITTED else {}
        for key in keys:
            # The other participants' commits of an op already settled a success: nothing
            # to do (what report_op would conclude, without its work: one per op and peer).
            record = settled.get(key)
            if record is not None and record.decided is not None and record.decided["ok"] and peer_id in record.participants:
                assert peer is not None
                peer.replay = None
                continue
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

    def note_rtt(self, peer_id: int, seconds: float | None) -> list[Effect]:
        """The master measured its round trip to `peer_id` (None: it cannot): the
        algorithm choice of the epochs formed from now on reads it
        (pccl_py.master.algorithm), and a vote waiting for it completes."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return []
        if seconds is not None and seconds >= 0:
            peer.rtt = seconds
        return self._measured(peer)

    def _measured(self, peer: Peer) -> list[Effect]:
        if not peer.measuring:
            return []
        peer.measuring = False
        g = self.groups.get(peer.group)
        return self._complete_votes(g) + self._resolve_held(g) if g is not None else []

    def _measuring(self, g: Group) -> bool:
        """Whether a vote of `g` that admits peers waits for round trips still being
        measured (its members' or the joiners'), which decide the epoch's algorithm.
        Not when what is known decides it already (pccl_py.master.algorithm): the ring
        that optimize_topology() required, or rsag once a member's round trip reaches
        rsag_min_rtt (a longer one cannot change that): a WAN group admits a joiner
        without waiting a round trip for its measurement."""
        if not any(self.peers[pid].measuring for pid in (*g.ring, *g.pending) if pid in self.peers):
            return False
        if g.ring_only:
            return False
        rtts = [self.peers[pid].rtt for pid in g.ring if pid in self.peers]
        return not any(rtt is not None and rtt >= self.rsag_min_rtt for rtt in rtts)

    def leave(self, peer_id: int, now: float) -> list[Effect]:
        return self._remove(peer_id, "left", "left the group", now)

    def evict(self, peer_id: int, cause: str, detail: str, now: float) -> list[Effect]:
        """cause: "crashed" (its connection broke) or "hung" (heartbeat timeout)."""
        return self._remove(peer_id, cause, detail, now)

    def tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for peer in [p for p in self.peers.values() if p.measuring and now - p.registered >= self.rtt_wait]:
            effects += self._measured(peer)  # not measured in time: the choice treats it as far
        for peer in list(self.peers.values()):
            why = self.silent(peer, now)
            if why is not None:
                effects += self.evict(peer.id, "hung", why, now)
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

    def status(self) -> dict[str, Any]:
        return {
            "peers": {
                str(p.id): {
                    "group": p.group,
                    "address": f"{p.host}:{p.port}",
                    "name": p.name,
                    "phase": p.phase.value,
                    "transport": dict(p.transport),
                    # its heartbeat datagrams arrive (else only its TCP heartbeats count)
                    "datagrams": p.datagrams,
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
                    "votes": sorted(g.votes),  # members in update_topology() now
                    # [sender, receiver, bytes/s] for every measured pair
                    "bandwidth": [[a, b, rate] for (a, b), (rate, _) in sorted(g.bandwidth.items())],
                }
                for g in self.groups.values()
            },
        }

    def _admitted(self, peer_id: int) -> tuple[Peer, Group]:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise KeyError(peer_id)
        if peer.phase is not Phase.ADMITTED:
            raise PermissionError(f"peer {peer_id} is not admitted yet")
        return peer, self.groups[peer.group]

    def _ring_message(self, g: Group, reason: str, vote: bool) -> protocol.Message:
        ring = [[pid, self.peers[pid].host, self.peers[pid].port] for pid in g.ring]
        return protocol.make(
            "topology", epoch=g.epoch, ring=ring, reason=reason, vote=vote, round=g.round, rsag=g.rsag
        )

    def _new_epoch(self, g: Group, ring: list[int], reason: str, vote: bool = False) -> list[Effect]:
        g.epoch += 1
        g.ring = ring
        g.rings[g.epoch] = tuple(ring)
        for old in [e for e in g.rings if e <= g.epoch - KEEP_EPOCHS]:
            del g.rings[old]
        choice = choose_rsag(ring, {pid: self.peers[pid].rtt for pid in ring}, g.ring_only, self.rsag_min_rtt)
        g.rsag = choice.rsag
        msg = self._ring_message(g, reason, vote)
        effects: list[Effect] = [
            Log(
                "epoch",
                {"group": g.id, "epoch": g.epoch, "ring": list(ring), "reason": reason, "rsag": g.rsag,
                 "algorithm": choice.reason},
            )
        ]
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
        if g.pending and self._measuring(g):
            return []  # completed by note_rtt(), or by tick() once rtt_wait is over
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

    def _outcome(
        self, g: Group, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, world: int
    ) -> protocol.Message:
        epoch, tag, seq = key
        # Built as protocol.make would, without its schema check: one per collective on
        # the master's loop, every field typed here (tests/wire checks it validates).
        return {
            "t": "outcome",
            "v": protocol.VERSION,
            "epoch": epoch,
            "tag": tag,
            "seq": seq,
            "ok": ok,
            "kind": str(kind),
            "msg": msg,
            "peer": culprit,
            "next_epoch": g.epoch,
            "world": world,
        }

    def _decide(self, g: Group, record: OpRecord, now: float, grace_over: bool = False) -> list[Effect]:
        if record.decided is not None:
            return []
        # The commit vote (docs/protocol.md): a peer reports ok only once it held the
        # complete result, and commits on its own only once every peer did. So one
        # committed report proves success, one failure report proves that nobody
        # committed, and when every live participant holds the result the op succeeds
        # whoever else is gone. Peers that are gone without a word do not decide it.
        alive = {pid for pid in record.participants if pid in self.peers}
        committed = any(r.committed for r in record.reports.values())
        gone_unreported = [] if committed else [
            pid for pid in sorted(record.participants - alive) if pid not in record.reports or not record.reports[pid].ok
        ]
        failures = {pid: r for pid, r in record.reports.items() if not r.ok}
        all_reported = alive <= set(record.reports)
        if committed:
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
            elif record.mismatch is not None:
                # Peers in different collectives abort their ops (the mismatch rule),
                # which breaks the connections of the others' ops: the cause is known.
                pid = min(failures)
                ok, kind, msg, culprit = False, FailureKind.COLLECTIVE_MISMATCH, f"peer {pid}: {record.mismatch}", -1
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
        if len(g.ops) <= MAX_OPS_PER_GROUP and g.pruned_at_epoch == g.epoch:
            return
        g.pruned_at_epoch = g.epoch
        # Undecided ops of old epochs go too: their ring is forgotten, so a late
        # reporter is told the epoch is not current.
        g.ops = {k: r for k, r in g.ops.items() if k[0] > g.epoch - KEEP_EPOCHS}
        excess = len(g.ops) - MAX_OPS_PER_GROUP // 2
        if excess > 0:
            for k in [k for k, r in g.ops.items() if r.decided is not None][:excess]:
                del g.ops[k]
