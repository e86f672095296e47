"""Master restart, mixed into Membership: the master is soft state, so peers that find
a new master re-register with "rejoin", carrying their epoch, ring, op round, last
synced revision, the ops they reported without a verdict and the verdicts they
received. The group re-forms when every member of the newest ring has rejoined (or
`recovery_wait` passed): the epoch and ring are taken over (a new epoch only if
members are missing), verdicts any member received are given to all, and ops every
member reported ok succeed (docs/protocol.md, "Master restart")."""

from __future__ import annotations

from pccl_py.errors import FailureKind
from pccl_py.master.records import (
    Effect,
    Group,
    Log,
    OpRecord,
    Peer,
    Phase,
    Recovery,
    RejoinInfo,
    RejoinRefused,
    Report,
    Rules,
    Send,
)
from pccl_py.wire import protocol


class RecoveryRules:
    def rejoin(
        self: Rules, peer_id: int, group: int, host: str, port: int, name: str, info: RejoinInfo, now: float
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
        welcome = self.welcome(peer_id, admitted=True)
        effects: list[Effect] = [
            Log("rejoin", {"peer": peer_id, "group": group, "epoch": info.epoch, "host": host, "port": port}),
            Send(peer_id, welcome),
        ]
        return effects + self._try_reform(g, now, force=False)

    def _try_reform(self: Rules, g: Group, now: float, force: bool) -> list[Effect]:
        recovery = g.recovery
        if recovery is None or not (recovery.infos or force):
            return []
        if recovery.infos:
            newest = max(recovery.infos.values(), key=lambda i: i.epoch)
            if not force and not set(newest.ring) <= set(recovery.infos):
                return []  # members of the newest ring are still missing: wait for them
            epoch, ring = newest.epoch, list(newest.ring)
        else:
            # Every peer that rejoined is gone again (crashed or left before the group
            # re-formed): nothing to take over, and the recovery must still end, or
            # newcomers would wait for admission forever.
            epoch, ring = g.epoch, []
        g.recovery = None
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
        # The epoch keeps the algorithm its members run (a member that missed the epoch's
        # topology message learns it from the re-form's); a new epoch chooses afresh.
        g.rsag = max(infos, key=lambda i: i.epoch).rsag
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
