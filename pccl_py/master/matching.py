"""Two rules about collective calls that do not line up, mixed into Membership.

A joiner admitted by a topology vote took part in that vote: while it has made no
other collective call, its first update_topology() (and a pending_peers() before it)
is held until the other members show what they do next. Members in the same call make
it a real one; members in another collective make it the joiner's part of the vote
that admitted it, answered as the members were (docs/protocol.md, "Joining").

A knock (pccl_py.wire.knock): a newcomer's datagram ahead of its hello. Where the hello
would make it wait for the members' vote, the members are told at once ("joining") and
the newcomer gets the ring and epoch, so that both sides open their pools to each
other while it registers. Nothing is registered; each peer id knocks once.

Mismatched collectives: a member whose collective call has waited a while says what
it waits in ("blocked": the call, and the data-plane ops it has in flight). When every
member of a group is blocked and no collective is common to all of them for
`mismatch_grace`, none can complete: every member's call fails with
CollectiveMismatch (data-plane ops get that outcome), and the op round restarts
(docs/protocol.md, "Mismatched collectives")."""

from __future__ import annotations

from typing import Any

from pccl_py.master.records import Blocked, Effect, Group, Log, OpKey, OpRecord, Peer, Rules, Send
from pccl_py.wire import protocol

# Peer ids that knocked, remembered (oldest dropped first) so that each knocks once.
MAX_KNOCKS = 4096
# Knocks answered per KNOCK_WINDOW seconds at most: a datagram's source can be forged,
# and each knock makes every member open a pool (to an address the knock names).
KNOCK_BURST, KNOCK_WINDOW = 32, 10.0


class MatchingRules:
    def knock(
        self: Rules, peer_id: int, group: int, host: str, port: int, now: float
    ) -> tuple[tuple[int, list[list[Any]]] | None, list[Effect]]:
        """A newcomer's knock: (epoch, members) to answer it with, and the effects (the
        members' "joining"); (None, []) where its hello would not wait for a vote, the
        id is registered or knocked before, or KNOCK_BURST knocks came within
        KNOCK_WINDOW seconds."""
        g = self.groups.get(group)
        if peer_id in self.peers or peer_id in self._knocked or g is None or not g.ring:
            return None, []
        if g.recovery is not None or now < self.hold_until:
            return None, []  # its members may be coming back: the hello finds out
        recent = [t for t in self._knocked.values() if now - t < KNOCK_WINDOW]
        if len(recent) >= KNOCK_BURST:
            return None, []  # the hello does what the knock would have
        self._knocked[peer_id] = now
        while len(self._knocked) > MAX_KNOCKS:
            del self._knocked[next(iter(self._knocked))]
        effects: list[Effect] = [Log("knock", {"peer": peer_id, "group": group, "host": host, "port": port})]
        return (g.epoch, self._members(g)), effects + self._joining(g, peer_id, host, port)

    def _members(self: Rules, g: Group) -> list[list[Any]]:
        """The ring of `g` as a newcomer opens its pools to it: [[peer id, host, port]]."""
        return [[pid, self.peers[pid].host, self.peers[pid].port] for pid in g.ring]

    def _joining(self: Rules, g: Group, peer_id: int, host: str, port: int) -> list[Effect]:
        """Tells every member of `g` to open its pool to a newcomer that waits for the vote."""
        joining = protocol.make("joining", peer=peer_id, host=host, port=port)
        return [Send(pid, joining) for pid in g.ring]

    def report_blocked(
        self: Rules, peer_id: int, call: str, op: OpKey | None, desc: str, inflight: list[tuple[OpKey, str]], now: float
    ) -> list[Effect]:
        """A member has been waiting in `call` for a while (Config.blocked_report_after).
        Mismatches are decided by tick(), once they have lasted `mismatch_grace`."""
        peer, g = self._admitted(peer_id)
        if (
            call not in protocol.DATA_CALLS
            and call not in self._requested(g, peer.id)
            and call not in g.held.get(peer.id, ())
        ):
            return []  # answered meanwhile: the report crossed the answer
        g.blocked[peer.id] = Blocked(call, op, desc, tuple(inflight))
        return self._resolve_held(g)

    def _may_replay(self: Rules, peer: Peer, g: Group, fresh: bool, call: str) -> bool:
        """Whether this call of a joiner may be its part of the vote that admitted it."""
        if not fresh or peer.replay is None or g.round != peer.joined_round:
            return False
        return call == "update_topology" or peer.replay == "pending"

    def _engaged(self: Rules, g: Group, pid: int) -> set[str]:
        """The collectives member `pid` is in, as far as this master knows."""
        calls = self._requested(g, pid)
        b = g.blocked.get(pid)
        if b is not None and (b.call not in protocol.DATA_CALLS or (b.op is not None and self._op_open(g, b.op))):
            calls.add(b.call)
        return calls

    def _requested(self: Rules, g: Group, pid: int) -> set[str]:
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

    def _resolve_held(self: Rules, g: Group) -> list[Effect]:
        """Decides the joiners' fresh calls held so far. If the other members are in the
        same call, it is a real one (it counts like theirs); if they went on to another
        collective, it was the joiner's part of the vote that admitted it, answered as
        the members were: the vote's ring, or their pending_peers() answer. Otherwise
        (the members compute) it waits."""
        effects: list[Effect] = []
        for pid, (call, query) in list(g.held.items()):
            peer = self.peers[pid]
            others = [self._engaged(g, p) for p in g.ring if p != pid and p not in g.held]
            if others and not any(others):
                continue  # the others compute: wait until they show what they do next
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

    def _unblock(self: Rules, g: Group, call: str) -> None:
        """A collective completed: nobody waits in it any more."""
        for pid in [p for p, b in g.blocked.items() if b.call == call]:
            del g.blocked[pid]

    def _op_open(self: Rules, g: Group, key: OpKey) -> bool:
        """Whether data-plane op `key` can still be waiting: of the current epoch, undecided."""
        record = g.ops.get(key)
        return key[0] == g.epoch and (record is None or record.decided is None)

    def _mismatched(self: Rules, g: Group) -> dict[int, tuple[Blocked, set[tuple[Any, ...]]]] | None:
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
            if b.call in protocol.DATA_CALLS:
                if b.op is None or not self._op_open(g, b.op):
                    return None  # its op is over (or moved to a new epoch): it is not stuck
                parts.add(("op", b.op, b.desc))
            else:
                parts.add((b.call,))
            calls[pid] = (b, parts)
        common = set.intersection(*(parts for _, parts in calls.values()))
        return None if common else calls

    def _check_mismatch(self: Rules, g: Group, now: float) -> list[Effect]:
        calls = self._mismatched(g)
        if calls is None:
            g.mismatch_since = None
            return []
        if g.mismatch_since is None:
            g.mismatch_since = now
        if now - g.mismatch_since < self.mismatch_grace:
            return []
        return self._fail_mismatch(g, calls, now)

    def _fail_mismatch(self: Rules, g: Group, calls: dict[int, tuple[Blocked, set[tuple[Any, ...]]]], now: float) -> list[Effect]:
        """Fails every member's call: control-plane calls by a "mismatch" message, which
        also names the all-reduces involved. The master does not decide those: one may
        have committed on a peer it has not heard from yet. Each peer aborts them and
        reports as usual (a peer that voted reports ok, one that did not reports
        CollectiveMismatch), so their outcome is decided by the commit-vote rules and
        agreed by everyone. Op numbering restarts."""
        g.mismatch_since = None
        g.round += 1
        described = []
        for pid, (b, parts) in calls.items():
            name = self.peers[pid].name
            who = f"peer {pid}" + (f" ({name})" if name else "")
            what = f"{b.call}({b.desc})" if b.call in protocol.DATA_CALLS else f"{b.call}()"
            others = len([p for p in parts if p[0] == "op" and p[1] != b.op])
            described.append(f"{who} in {what}" + (f" with {others} other collective(s) in flight" if others else ""))
        text = "the members are blocked in collectives that cannot match: " + "; ".join(described)
        g.blocked.clear()
        g.held.clear()
        g.votes.clear()
        g.pending_queries.clear()
        g.sync_requests.clear()
        g.optimize_requests.clear()
        effects: list[Effect] = [Log("mismatch", {"group": g.id, "round": g.round, "calls": described})]
        ops = sorted({part[1] for _, parts in calls.values() for part in parts if part[0] == "op"})
        for key in ops:  # a broken connection of these ops is this mismatch's doing
            record = g.ops.get(key)
            if record is None and key[0] in g.rings:
                record = g.ops[key] = OpRecord(key, frozenset(g.rings[key[0]]))
            if record is not None:
                record.mismatch = text
        msg = protocol.make("mismatch", round=g.round, msg=text, ops=[list(k) for k in ops])
        return effects + [Send(pid, msg) for pid in g.ring]
