"""Unit tests of two master rules (pccl_py.membership), no sockets, explicit clocks:

- a joiner admitted by a topology vote replays the members' part of that vote (its
  first pending_peers() / update_topology() are answered at once), so a joiner that
  runs the members' loop lines up with them;
- when every member is blocked in collectives that cannot match, every one of those
  calls fails with CollectiveMismatch once the mismatch has lasted `mismatch_grace`.
"""

from __future__ import annotations

from typing import Any

import pytest

from pccl_py.wire import protocol
from pccl_py.master.election import EntryMeta, Submission, SyncStrategy
from pccl_py.master.membership import Log, Membership, Send

T0 = 1000.0
GRACE = 0.25
A, B, C, J = 901, 17, 455, 203  # J: the joiner
ENTRY = (EntryMeta("w", "float32", (4,), 16, 1234),)


@pytest.fixture
def m() -> Membership:
    return Membership(1.0, 5.0, 0.2, mismatch_grace=GRACE)


def register(m: Membership, pid: int, now: float = T0) -> list[Any]:
    return m.register(pid, 0, "127.0.0.1", 20000 + pid % 10000, f"peer-{pid}", now)


def to(effects: list[Any], pid: int, t: str) -> list[dict[str, Any]]:
    msgs = [e.msg for e in effects if isinstance(e, Send) and e.to == pid and e.msg["t"] == t]
    for msg in msgs:
        protocol.validate(msg)
    return msgs


def group(m: Membership) -> dict[str, Any]:
    return m.status()["groups"]["0"]


def form(m: Membership, ids: list[int]) -> None:
    for pid in ids:
        register(m, pid)
    if len(ids) > 1:
        m.vote_topology(ids[0], T0)
    assert group(m)["ring"] == ids


def admit_by_vote(m: Membership, members: list[int], joiner: int, ask_first: bool = False) -> int:
    """The members (optionally after a pending_peers() round) vote the joiner in;
    returns the new epoch."""
    register(m, joiner)
    if ask_first:
        for pid in members:
            effects = m.query_pending(pid, 7, T0)
        assert all(to(effects, pid, "pending_count")[0]["count"] == 1 for pid in members)
    for pid in members:
        effects = m.vote_topology(pid, T0)
    assert to(effects, joiner, "topology"), "the joiner was not admitted"
    return group(m)["epoch"]


def sync(m: Membership, pid: int, now: float = T0) -> list[Any]:
    return m.request_sync(pid, Submission(pid, 0, SyncStrategy.ENFORCE_POPULAR, ENTRY), 1, now)


def blocked(m: Membership, pid: int, call: str, op: Any = None, desc: str = "", inflight: Any = ()) -> None:
    assert m.report_blocked(pid, call, op, desc, list(inflight), T0) == []


# ---------------------------------------------------------------------- the joiner's first vote


def test_a_joiners_first_vote_is_the_vote_that_admitted_it(m: Membership) -> None:
    form(m, [A, B])
    epoch = admit_by_vote(m, [A, B], J)
    assert sync(m, A) == [] and sync(m, B) == []  # the members went on to their loop's next call
    effects = m.vote_topology(J, T0 + 1, fresh=True)
    (topo,) = to(effects, J, "topology")
    assert topo["vote"] and topo["epoch"] == epoch and [p[0] for p in topo["ring"]] == [A, B, J]
    assert not to(effects, A, "topology") and not to(effects, B, "topology")
    assert [e.kind for e in effects if isinstance(e, Log)] == ["replay"]
    # Then it joins the members' sync, which completes.
    effects = sync(m, J)
    assert all(to(effects, pid, "sync_result") or to(effects, pid, "sync_plan") for pid in (A, B, J))


def test_a_fresh_vote_waits_until_the_members_show_what_they_do_next(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J)
    assert m.vote_topology(J, T0, fresh=True) == []  # the members are computing: nothing known yet
    # B waits in an all-reduce of the new epoch (reported after a while): it went on.
    key = (group(m)["epoch"], 0, 1 << 8)
    effects = m.report_blocked(B, "all_reduce", key, "d", [(key, "d")], T0)
    assert to(effects, J, "topology")[0]["vote"]


def test_a_fresh_vote_counts_when_the_members_vote_again(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J)
    assert m.vote_topology(J, T0, fresh=True) == []
    assert m.vote_topology(A, T0) == []
    effects = m.vote_topology(B, T0)
    assert all(to(effects, pid, "topology") for pid in (A, B, J))
    assert not [e for e in effects if isinstance(e, Log) and e.kind == "replay"]


def test_a_vote_that_is_not_fresh_counts_as_a_vote(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J)
    sync(m, A)
    assert m.vote_topology(J, T0, fresh=False) == []  # a real vote: it waits for A and B


def test_no_replay_once_another_collective_ran(m: Membership) -> None:
    form(m, [A, B])
    epoch = admit_by_vote(m, [A, B], J)
    m.report_op(J, (epoch, 0, 0), True, "", "", -1, T0, committed=True)
    sync(m, A)
    assert m.vote_topology(J, T0, fresh=True) == []


def test_no_replay_after_a_later_vote(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J)
    for pid in (A, B):
        m.vote_topology(pid, T0)
    assert to(m.vote_topology(J, T0, fresh=False), J, "topology")  # completes that vote
    sync(m, A)
    assert m.vote_topology(J, T0, fresh=True) == []  # a new round: nothing to replay


def test_the_first_peer_of_a_group_has_nothing_to_replay(m: Membership) -> None:
    form(m, [A])
    register(m, B)
    assert m.vote_topology(A, T0, fresh=True) != []  # admits B: A's vote counted
    assert m.vote_topology(A, T0, fresh=True) == []  # waits for B


def test_a_joiner_replays_the_pending_query_the_members_asked_before_its_vote(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J, ask_first=True)
    sync(m, A)
    sync(m, B)
    effects = m.query_pending(J, 3, T0, fresh=True)
    assert to(effects, J, "pending_count") == [protocol.make("pending_count", query=3, count=1)]
    (topo,) = to(m.vote_topology(J, T0, fresh=True), J, "topology")
    assert topo["vote"]
    assert to(sync(m, J), J, "sync_result") or to(sync(m, J), J, "sync_plan")


def test_a_fresh_pending_query_the_members_ask_too_is_a_real_one(m: Membership) -> None:
    """The members' loop asks pending_peers() right after the vote, and so does the joiner."""
    form(m, [A, B])
    admit_by_vote(m, [A, B], J, ask_first=True)
    assert m.query_pending(J, 3, T0, fresh=True) == []  # held: the members are not in a call yet
    assert m.query_pending(A, 9, T0) == []
    effects = m.query_pending(B, 9, T0)
    for pid, query in ((A, 9), (B, 9), (J, 3)):
        assert to(effects, pid, "pending_count") == [protocol.make("pending_count", query=query, count=0)]


def test_a_pending_query_the_members_did_not_ask_is_not_replayed(m: Membership) -> None:
    form(m, [A, B])
    admit_by_vote(m, [A, B], J, ask_first=False)
    sync(m, A)
    assert m.query_pending(J, 3, T0, fresh=True) == []  # a real query: it waits for the members


# ---------------------------------------------------------------------- mismatched collectives


def test_vote_against_sync_fails_both_after_the_grace(m: Membership) -> None:
    form(m, [A, B])
    round_before = m.groups[0].round
    m.vote_topology(A, T0)
    sync(m, B)
    blocked(m, A, "update_topology")
    blocked(m, B, "sync_shared_state")
    assert m.tick(T0) == []
    assert m.tick(T0 + GRACE / 2) == []
    effects = m.tick(T0 + GRACE + 0.01)
    for pid in (A, B):
        (msg,) = to(effects, pid, "mismatch")
        assert msg["round"] == round_before + 1
        assert f"peer {A} (peer-{A}) in update_topology()" in msg["msg"]
        assert f"peer {B} (peer-{B}) in sync_shared_state()" in msg["msg"]
    assert [e.kind for e in effects if isinstance(e, Log)] == ["mismatch"]
    # Both calls are dropped: the next matched calls complete.
    assert m.vote_topology(A, T0 + 1) == []
    effects = m.vote_topology(B, T0 + 1)
    assert to(effects, A, "topology") and to(effects, B, "topology")
    sync(m, A, T0 + 1)
    assert to(sync(m, B, T0 + 1), A, "sync_result")


def test_no_mismatch_while_a_member_is_not_blocked(m: Membership) -> None:
    form(m, [A, B, C])
    m.vote_topology(A, T0)
    blocked(m, A, "update_topology")
    sync(m, B)
    blocked(m, B, "sync_shared_state")
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_a_report_that_crossed_the_answer_is_ignored(m: Membership) -> None:
    form(m, [A, B])
    m.query_pending(A, 1, T0)
    m.query_pending(B, 1, T0)  # answers both
    blocked(m, A, "pending_peers")  # sent just before A got the answer: stale
    sync(m, B)
    blocked(m, B, "sync_shared_state")
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_a_completed_call_unblocks_its_members(m: Membership) -> None:
    form(m, [A, B])
    m.query_pending(A, 1, T0)
    blocked(m, A, "pending_peers")
    m.query_pending(B, 1, T0)  # answers both
    m.vote_topology(B, T0)
    blocked(m, B, "update_topology")
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_all_reduce_against_control_call_names_the_op_and_its_reports_decide_it(m: Membership) -> None:
    """The master does not decide the all-reduce itself (a peer may have committed it
    unheard): the mismatch names it, each peer aborts it and reports, and the usual
    rules give everyone the same outcome."""
    form(m, [A, B])
    epoch = group(m)["epoch"]
    key = (epoch, 0, 5 << 8)
    blocked(m, A, "all_reduce", key, "tag 0, step 5, 8 x float32, SUM", [(key, "tag 0, step 5, 8 x float32, SUM")])
    m.vote_topology(B, T0)
    blocked(m, B, "update_topology")
    m.tick(T0)
    effects = m.tick(T0 + GRACE)
    for pid in (A, B):
        (msg,) = to(effects, pid, "mismatch")
        assert msg["ops"] == [list(key)]
        assert "all_reduce(tag 0, step 5, 8 x float32, SUM)" in msg["msg"]
        assert not to(effects, pid, "outcome")
    # A aborted it before voting: its report decides the op for every participant.
    effects = m.report_op(A, key, False, "CollectiveMismatch", "aborted", -1, T0 + 1)
    outcomes = {pid: to(effects, pid, "outcome") for pid in (A, B)}
    assert all(o and o[0]["kind"] == "CollectiveMismatch" and not o[0]["ok"] for o in outcomes.values())


def test_an_op_that_committed_somewhere_succeeds_despite_a_mismatch(m: Membership) -> None:
    form(m, [A, B])
    key = (group(m)["epoch"], 0, 5 << 8)
    blocked(m, A, "all_reduce", key, "d", [(key, "d")])
    m.vote_topology(B, T0)
    blocked(m, B, "update_topology")
    m.tick(T0)
    m.tick(T0 + GRACE)
    m.report_committed(A, [key], T0 + 1)  # it had committed before the abort arrived
    (late,) = to(m.report_op(B, key, False, "CollectiveMismatch", "aborted", -1, T0 + 1), B, "outcome")
    assert late["ok"]


def test_same_step_with_different_shapes_is_a_mismatch(m: Membership) -> None:
    form(m, [A, B])
    key = (group(m)["epoch"], 0, 1 << 8)
    blocked(m, A, "all_reduce", key, "tag 0, step 1, 8 x float32, SUM", [(key, "tag 0, step 1, 8 x float32, SUM")])
    blocked(m, B, "all_reduce", key, "tag 0, step 1, 9 x float32, SUM", [(key, "tag 0, step 1, 9 x float32, SUM")])
    m.tick(T0)
    effects = m.tick(T0 + GRACE)
    assert to(effects, A, "mismatch")[0]["ops"] == [list(key)]
    assert "9 x float32" in to(effects, A, "mismatch")[0]["msg"]


def test_the_same_all_reduce_everywhere_is_no_mismatch(m: Membership) -> None:
    form(m, [A, B])
    key = (group(m)["epoch"], 0, 1 << 8)
    for pid in (A, B):
        blocked(m, pid, "all_reduce", key, "d", [(key, "d")])
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_an_op_in_flight_everywhere_can_still_complete(m: Membership) -> None:
    """A waits in a vote with an async all-reduce in flight; B waits on that all-reduce:
    it can complete, and then B votes too."""
    form(m, [A, B])
    key = (group(m)["epoch"], 3, 1 << 8)
    m.vote_topology(A, T0)
    blocked(m, A, "update_topology", inflight=[(key, "d")])
    blocked(m, B, "all_reduce", key, "d", [(key, "d")])
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_a_member_waiting_on_an_op_that_is_over_is_not_blocked(m: Membership) -> None:
    """The op committed (a "done" batch says so): its waiter's report is stale."""
    form(m, [A, B])
    key = (group(m)["epoch"], 0, 1 << 8)
    blocked(m, A, "all_reduce", key, "d", [(key, "d")])
    m.report_committed(B, [key], T0)
    m.vote_topology(B, T0)
    blocked(m, B, "update_topology")
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_an_op_of_an_older_epoch_is_not_blocked(m: Membership) -> None:
    form(m, [A, B])
    key = (group(m)["epoch"], 0, 1 << 8)
    blocked(m, A, "all_reduce", key, "d", [(key, "d")])
    register(m, C)
    m.vote_topology(B, T0)
    blocked(m, B, "update_topology")
    m.vote_topology(A, T0)  # A's op was superseded; the vote admits C: a new epoch
    assert group(m)["epoch"] > key[0]
    blocked(m, A, "all_reduce", key, "d", [(key, "d")])
    blocked(m, B, "sync_shared_state")
    blocked(m, C, "sync_shared_state")
    assert m.tick(T0) == [] and m.tick(T0 + 1) == []


def test_a_departure_ends_a_mismatch_in_the_making(m: Membership) -> None:
    form(m, [A, B, C])
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)
    blocked(m, A, "update_topology")
    blocked(m, B, "update_topology")
    blocked(m, C, "sync_shared_state")
    m.tick(T0)
    effects = m.leave(C, T0 + 0.1)  # completes the vote of the other two
    assert to(effects, A, "topology") and to(effects, B, "topology")
    assert m.tick(T0 + GRACE + 0.1) == []


def test_a_mismatch_after_a_master_restart_is_found_from_repeated_reports() -> None:
    """The old master died while telling A the result of a sync the others completed: A
    repeats its sync request to the new master, B waits in the next all-reduce. Their
    reports (repeated while blocked, so the new master hears them) end it at once."""
    from pccl_py.master.membership import RejoinInfo

    m = Membership(1.0, 5.0, 0.2, mismatch_grace=GRACE, incarnation=7, recovery_wait=3.0)
    for pid, revision in ((A, 11), (B, 12)):
        info = RejoinInfo(epoch=4, ring=(A, B), round=2, revision=revision, pending=(), decided=())
        m.rejoin(pid, 0, "127.0.0.1", 20000 + pid, f"peer-{pid}", info, T0)
    assert group(m)["ring"] == [A, B] and group(m)["epoch"] == 4
    assert sync(m, A) == []  # its repeated request: B will not sync
    key = (4, 0, 7 << 8)
    blocked(m, A, "sync_shared_state")
    blocked(m, B, "all_reduce", key, "d", [(key, "d")])
    m.tick(T0)
    effects = m.tick(T0 + GRACE)
    assert to(effects, A, "mismatch") and to(effects, B, "mismatch")[0]["ops"] == [list(key)]
