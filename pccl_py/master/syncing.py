"""Shared-state sync, mixed into Membership: a collective of the admitted peers. When
all have asked, the election (pccl_py.master.election) decides the content and the
revision; peers whose bytes differ fetch them from the holders; the result is the
same for every participant (docs/protocol.md, "Shared-state sync")."""

from __future__ import annotations

from pccl_py.errors import FailureKind
from pccl_py.master.election import ElectionError, Submission, elect
from pccl_py.master.records import Effect, Group, Log, Rules, Send, SyncRecord
from pccl_py.wire import protocol


class SyncRules:
    def request_sync(self: Rules, peer_id: int, submission: Submission, exposure: int, now: float) -> list[Effect]:
        """A peer called sync_shared_state(): collective of the admitted peers."""
        peer, g = self._admitted(peer_id)
        peer.replay = None
        g.blocked.pop(peer.id, None)
        if g.sync_active is not None and peer.id in g.sync_active.participants:
            return [Send(peer.id, self._sync_result(g, False, FailureKind.ABORTED, "a previous sync is still in progress"))]
        g.sync_requests[peer.id] = (submission, exposure)
        return self._complete_sync_requests(g) + self._resolve_held(g)

    def sync_done(self: Rules, peer_id: int, ok: bool, kind: str, msg: str, now: float, revision: int) -> list[Effect]:
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

    def _sync_result(self: Rules, g: Group, ok: bool, kind: str, msg: str) -> protocol.Message:
        revision = g.state_revision if g.state_revision is not None else -1
        return protocol.make("sync_result", ok=ok, kind=kind, msg=msg, revision=revision)

    def _complete_sync_requests(self: Rules, g: Group) -> list[Effect]:
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

    def _complete_sync(self: Rules, g: Group) -> list[Effect]:
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
