"""Shared-state election: which content and revision every peer must end up with.
A pure function of the peers' submissions, run by the master (PCCL semantics).

Rules:
- Strategies: if any peer is SEND_ONLY, the SEND_ONLY peers alone decide the content
  (they must agree); otherwise every peer that is not RECEIVE_ONLY votes.
- Layout: every peer lists the same entries (names, order, dtype, shape); a
  difference is an error, since bytes cannot be copied between different layouts.
- Revision (PCCL's rule): once the group has synced revision G, a peer that took part
  in that sync must come with G + 1 (it bumps its revision by exactly one per sync
  after changing its content); anything else is an error. A peer that did not take
  part (a joiner) may come with any revision and adopts the group's. The group's
  revision never goes back: the target is G + 1; the first sync of a group takes the
  highest revision among the voters.
- Content: SEND_ONLY peers must all hold the same content, whatever their revision.
  Otherwise, per entry, the hash held by most voters at the target revision wins (the
  freshest voters count if none is at it); ties go to content held by a peer of the last sync,
  then to the lowest peer id holding it.
- Every peer whose bytes differ from the winner receives the entry (SEND_ONLY peers
  never do); any peer holding the winning bytes can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pccl_py.types import EntryMeta, SyncStrategy

__all__ = ["Election", "ElectionError", "EntryMeta", "Submission", "SyncStrategy", "elect"]


@dataclass(frozen=True)
class Submission:
    peer: int
    revision: int
    strategy: SyncStrategy
    entries: tuple[EntryMeta, ...]


@dataclass(frozen=True)
class Election:
    revision: int
    hashes: tuple[int, ...]  # elected content hash per entry index
    fetch: dict[int, tuple[int, ...]]  # peer -> entry indices it must receive
    holders: tuple[tuple[int, ...], ...]  # per entry: peers holding the elected bytes


class ElectionError(Exception):
    """The submissions cannot be reconciled; `peer` is the one at fault (-1: none)."""

    def __init__(self, message: str, peer: int = -1) -> None:
        super().__init__(message)
        self.peer = peer


def elect(submissions: list[Submission], group_revision: int | None, last_synced: set[int]) -> Election:
    if not submissions:
        raise ElectionError("no submissions")
    subs = sorted(submissions, key=lambda s: s.peer)
    send_only = [s for s in subs if s.strategy is SyncStrategy.SEND_ONLY]
    voters = send_only or [s for s in subs if s.strategy is not SyncStrategy.RECEIVE_ONLY]
    if not voters:
        raise ElectionError("every peer is RECEIVE_ONLY: nobody can provide the state")

    reference = voters[0]
    for s in subs:
        _check_layout(reference, s)

    if group_revision is None:
        target = max(s.revision for s in voters)
    else:
        target = group_revision + 1
        for s in voters:
            if s.peer in last_synced and s.revision != target:
                raise ElectionError(
                    f"peer {s.peer} comes with revision {s.revision}, but the group is at revision "
                    f"{group_revision}: bump the revision by exactly one per sync",
                    s.peer,
                )
    if send_only:
        eligible = send_only  # authoritative whatever their revision: they must agree
    else:
        freshest = max(s.revision for s in voters)
        eligible = [s for s in voters if s.revision == target] or [s for s in voters if s.revision == freshest]

    n_entries = len(reference.entries)
    hashes: list[int] = []
    for i in range(n_entries):
        votes: dict[int, list[int]] = {}
        for s in eligible:
            votes.setdefault(s.entries[i].hash, []).append(s.peer)
        if send_only and len(votes) > 1:
            raise ElectionError(f"SEND_ONLY peers disagree on entry {reference.entries[i].name!r}")
        winner = max(
            votes.items(),
            key=lambda kv: (len(kv[1]), any(p in last_synced for p in kv[1]), -min(kv[1])),
        )[0]
        hashes.append(winner)

    fetch: dict[int, tuple[int, ...]] = {}
    for s in subs:
        if s.strategy is SyncStrategy.SEND_ONLY:
            continue
        missing = tuple(i for i in range(n_entries) if s.entries[i].hash != hashes[i])
        if missing:
            fetch[s.peer] = missing
    holders = tuple(tuple(s.peer for s in subs if s.entries[i].hash == hashes[i]) for i in range(n_entries))
    return Election(target, tuple(hashes), fetch, holders)


def _check_layout(reference: Submission, s: Submission) -> None:
    if len(s.entries) != len(reference.entries):
        raise ElectionError(
            f"peer {s.peer} has {len(s.entries)} state entries, peer {reference.peer} has {len(reference.entries)}",
            s.peer,
        )
    for mine, theirs in zip(s.entries, reference.entries, strict=True):
        if (mine.name, mine.dtype, mine.shape, mine.nbytes) != (theirs.name, theirs.dtype, theirs.shape, theirs.nbytes):
            raise ElectionError(
                f"peer {s.peer}'s entry {mine.name!r} ({mine.dtype} {list(mine.shape)}) does not match peer "
                f"{reference.peer}'s {theirs.name!r} ({theirs.dtype} {list(theirs.shape)})",
                s.peer,
            )
