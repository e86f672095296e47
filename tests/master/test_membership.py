"""Unit tests of the master's pure state machine (pccl_py.membership): one rule per
test, no sockets, no threads, explicit clocks.

Peer ids are chosen so that join order, id order and ring order all differ, so a rule
that silently sorts or reorders would show.
"""

from __future__ import annotations

from typing import Any

import pytest

from pccl_py.master.membership import Log, Membership, Send
from pccl_py.wire import beats, protocol

HB_INTERVAL = 1.0
HB_TIMEOUT = 5.0
GRACE = 0.2
T0 = 1000.0
HOST = "127.0.0.1"

# Join order A, B, C, D, E; numerically: B < D < C < E < A.
A, B, C, D, E = 901, 17, 455, 203, 777


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def m() -> Membership:
    return Membership(HB_INTERVAL, HB_TIMEOUT, GRACE)


def port_of(pid: int) -> int:
    return 20000 + pid


def register(m: Membership, pid: int, group: int = 0, now: float = T0) -> list[Any]:
    return m.register(pid, group, HOST, port_of(pid), f"peer-{pid}", now)


def sends(effects: list[Any], t: str | None = None) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and (t is None or e.msg["t"] == t)]


def logs(effects: list[Any], kind: str | None = None) -> list[Log]:
    return [e for e in effects if isinstance(e, Log) and (kind is None or e.kind == kind)]


def msgs_to(effects: list[Any], pid: int, t: str) -> list[dict[str, Any]]:
    return [s.msg for s in sends(effects, t) if s.to == pid]


def outcomes(effects: list[Any]) -> dict[int, dict[str, Any]]:
    """Outcome per recipient (each recipient must get at most one)."""
    out: dict[int, dict[str, Any]] = {}
    for s in sends(effects, "outcome"):
        assert s.to not in out, f"peer {s.to} got two outcomes in one step"
        out[s.to] = s.msg
    return out


def ring_ids(msg: dict[str, Any]) -> list[int]:
    return [p[0] for p in msg["ring"]]


def epoch_of(m: Membership, group: int = 0) -> int:
    return m.status()["groups"][str(group)]["epoch"]


def ring_of(m: Membership, group: int = 0) -> list[int]:
    return m.status()["groups"][str(group)]["ring"]


def phase_of(m: Membership, pid: int) -> str:
    return m.status()["peers"][str(pid)]["phase"]


def form_group(m: Membership, ids: list[int], group: int = 0, now: float = T0) -> int:
    """Registers `ids` in order and admits them all; returns the group's epoch."""
    register(m, ids[0], group, now)
    for pid in ids[1:]:
        register(m, pid, group, now)
    if len(ids) > 1:
        m.vote_topology(ids[0], now)
    assert ring_of(m, group) == ids
    return epoch_of(m, group)


def report(
    m: Membership,
    pid: int,
    key: tuple[int, int, int],
    ok: bool = True,
    kind: str = "",
    msg: str = "",
    culprit: int = -1,
    now: float = T0,
) -> list[Any]:
    return m.report_op(pid, key, ok, kind, msg, culprit, now)


def assert_valid_messages(effects: list[Any]) -> None:
    for s in sends(effects):
        protocol.validate(s.msg)


# ---------------------------------------------------------------------- registration and admission


def test_first_peer_of_empty_group_is_admitted_at_once(m: Membership) -> None:
    effects = register(m, A)
    [welcome] = msgs_to(effects, A, "welcome")
    assert welcome["admitted"] is True
    assert welcome["peer_id"] == A
    [topo] = msgs_to(effects, A, "topology")
    assert topo["epoch"] == 1
    assert topo["ring"] == [[A, HOST, port_of(A)]]
    assert phase_of(m, A) == "admitted"
    assert_valid_messages(effects)


def test_welcome_comes_before_the_first_topology(m: Membership) -> None:
    effects = register(m, A)
    kinds = [s.msg["t"] for s in sends(effects) if s.to == A]
    assert kinds.index("welcome") < kinds.index("topology")


def test_welcome_carries_heartbeat_settings(m: Membership) -> None:
    [welcome] = msgs_to(register(m, A), A, "welcome")
    assert welcome["heartbeat_interval"] == HB_INTERVAL
    assert welcome["heartbeat_timeout"] == HB_TIMEOUT


def test_second_peer_is_pending_and_gets_no_topology(m: Membership) -> None:
    register(m, A)
    effects = register(m, B)
    [welcome] = msgs_to(effects, B, "welcome")
    assert welcome["admitted"] is False
    assert sends(effects, "topology") == []
    assert phase_of(m, B) == "pending"
    assert ring_of(m) == [A]
    assert epoch_of(m) == 1


def test_a_waiting_newcomer_and_the_members_learn_of_each_other_ahead_of_the_vote(m: Membership) -> None:
    """So that both sides open their pools before the vote that admits it (the epoch
    that admits it keeps them): the welcome names the ring and its epoch, every member
    gets "joining" with the newcomer's address."""
    epoch = form_group(m, [A, B])
    effects = register(m, C)
    [welcome] = msgs_to(effects, C, "welcome")
    assert welcome["admitted"] is False
    assert welcome["members"] == [[A, HOST, port_of(A)], [B, HOST, port_of(B)]] and welcome["epoch"] == epoch
    for member in (A, B):
        [joining] = msgs_to(effects, member, "joining")
        assert (joining["peer"], joining["host"], joining["port"]) == (C, HOST, port_of(C))
    assert msgs_to(effects, C, "joining") == []
    assert_valid_messages(effects)
    # A peer admitted at once (an empty group) waits for nobody: no ring to prepare.
    [first] = msgs_to(register(m, D, group=7), D, "welcome")
    assert first["admitted"] is True and first["members"] == [] and first["epoch"] == 0


def test_a_knock_tells_the_members_and_answers_with_the_ring_before_any_hello(m: Membership) -> None:
    """A newcomer's knock (pccl_py.wire.knock) does what registering a waiting newcomer
    does for the pools, half a round trip after it left: every member gets "joining",
    the answer names the ring and epoch. It registers nothing, and each id knocks once."""
    epoch = form_group(m, [A, B])
    found, effects = m.knock(C, 0, HOST, port_of(C), T0)
    assert found == (epoch, [[A, HOST, port_of(A)], [B, HOST, port_of(B)]])
    for member in (A, B):
        [joining] = msgs_to(effects, member, "joining")
        assert (joining["peer"], joining["host"], joining["port"]) == (C, HOST, port_of(C))
    assert [log.fields["peer"] for log in logs(effects, "knock")] == [C]
    assert_valid_messages(effects)
    assert str(C) not in m.status()["peers"]  # nothing registered
    assert m.knock(C, 0, HOST, port_of(C), T0) == (None, [])  # once per id
    # Its hello then registers it as without a knock (the members hear "joining" again:
    # opening a pool ahead is idempotent on their side).
    effects = register(m, C)
    assert phase_of(m, C) == "pending"
    assert [s.to for s in sends(effects, "joining")] == [A, B]


def test_a_knock_is_ignored_where_the_hello_would_not_wait_for_a_vote(m: Membership) -> None:
    assert m.knock(C, 0, HOST, port_of(C), T0) == (None, [])  # no group yet: admitted at once
    form_group(m, [A, B])
    assert m.knock(A, 0, HOST, port_of(A), T0) == (None, [])  # a registered id
    assert m.knock(C, 5, HOST, port_of(C), T0) == (None, [])  # another group, empty
    held = Membership(HB_INTERVAL, HB_TIMEOUT, GRACE)
    form_group(held, [A, B])
    held.hold_until = T0 + 5  # a restarted master's grace: members may be coming back
    assert held.knock(C, 0, HOST, port_of(C), T0 + 1) == (None, [])
    assert held.knock(C, 0, HOST, port_of(C), T0 + 6)[0] is not None


def test_knocks_are_answered_at_a_bounded_rate(m: Membership) -> None:
    """A knock's source can be forged and each one makes every member open a pool: at
    most KNOCK_BURST are answered per KNOCK_WINDOW seconds (a hello still registers)."""
    from pccl_py.master.matching import KNOCK_BURST, KNOCK_WINDOW

    form_group(m, [A, B])
    ids = [10_000 + i for i in range(KNOCK_BURST + 1)]
    answered = [m.knock(pid, 0, HOST, port_of(pid), T0 + 0.01 * i)[0] is not None for i, pid in enumerate(ids)]
    assert answered == [True] * KNOCK_BURST + [False]
    assert m.knock(ids[-1] + 1, 0, HOST, 9, T0 + KNOCK_WINDOW + 0.5)[0] is not None  # the first ones aged out
    register(m, ids[-1])
    assert phase_of(m, ids[-1]) == "pending"


def test_pending_peer_admitted_only_when_every_admitted_peer_voted(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    register(m, C)
    assert sends(m.vote_topology(A, T0), "topology") == []
    assert phase_of(m, C) == "pending"
    effects = m.vote_topology(B, T0)
    assert phase_of(m, C) == "admitted"
    topos = {s.to: s.msg for s in sends(effects, "topology")}
    assert set(topos) == {A, B, C}
    for msg in topos.values():
        assert msg["epoch"] == epoch + 1
        assert msg["vote"] is True
        assert ring_ids(msg) == [A, B, C]
    assert_valid_messages(effects)


def test_admission_bumps_epoch_by_exactly_one(m: Membership) -> None:
    register(m, A)
    register(m, B)
    register(m, C)
    before = epoch_of(m)
    m.vote_topology(A, T0)
    assert epoch_of(m) == before + 1


def test_ring_order_is_join_order(m: Membership) -> None:
    for pid in (A, B, C, D):
        register(m, pid)
    effects = m.vote_topology(A, T0)
    [topo] = msgs_to(effects, D, "topology")
    assert ring_ids(topo) == [A, B, C, D]
    assert ring_of(m) == [A, B, C, D]


def test_joiners_are_appended_after_the_existing_ring(m: Membership) -> None:
    form_group(m, [A, B, C])
    register(m, E)
    register(m, D)
    for pid in (A, B, C):
        effects = m.vote_topology(pid, T0)
    [topo] = msgs_to(effects, A, "topology")
    assert ring_ids(topo) == [A, B, C, E, D]


def test_ring_entries_carry_each_peers_data_address(m: Membership) -> None:
    form_group(m, [A, B])
    register(m, C)
    m.vote_topology(A, T0)
    effects = m.vote_topology(B, T0)
    [topo] = msgs_to(effects, C, "topology")
    assert topo["ring"] == [[pid, HOST, port_of(pid)] for pid in (A, B, C)]


def test_vote_with_nobody_pending_keeps_epoch_and_ring(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    assert sends(m.vote_topology(A, T0)) == []
    effects = m.vote_topology(B, T0)
    topos = {s.to: s.msg for s in sends(effects, "topology")}
    assert set(topos) == {A, B}
    for msg in topos.values():
        assert msg["epoch"] == epoch
        assert msg["vote"] is True
        assert ring_ids(msg) == [A, B]
    assert epoch_of(m) == epoch


def test_votes_do_not_carry_over_to_the_next_round(m: Membership) -> None:
    form_group(m, [A, B])
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)  # round 1 complete
    register(m, C)
    effects = m.vote_topology(A, T0)  # round 2: B has not voted again
    assert sends(effects, "topology") == []
    assert phase_of(m, C) == "pending"


def test_completed_vote_gives_every_member_the_same_new_round(m: Membership) -> None:
    form_group(m, [A, B])
    register(m, C)
    m.vote_topology(A, T0)
    first = {s.to: s.msg["round"] for s in sends(m.vote_topology(B, T0), "topology")}
    assert len(set(first.values())) == 1
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)
    second = {s.to: s.msg["round"] for s in sends(m.vote_topology(C, T0), "topology")}
    assert set(second) == {A, B, C}
    assert len(set(second.values())) == 1
    assert next(iter(second.values())) > next(iter(first.values()))


def test_vote_from_pending_peer_raises_permission_error(m: Membership) -> None:
    register(m, A)
    register(m, B)
    with pytest.raises(PermissionError):
        m.vote_topology(B, T0)
    assert phase_of(m, B) == "pending"


def test_pending_query_from_pending_peer_raises_permission_error(m: Membership) -> None:
    register(m, A)
    register(m, B)
    with pytest.raises(PermissionError):
        m.query_pending(B, 1, T0)


def test_op_report_from_pending_peer_raises_permission_error(m: Membership) -> None:
    register(m, A)
    register(m, B)
    with pytest.raises(PermissionError):
        report(m, B, (1, 0, 0))


def test_duplicate_peer_id_raises_value_error(m: Membership) -> None:
    register(m, A)
    with pytest.raises(ValueError):
        register(m, A)
    with pytest.raises(ValueError):
        register(m, A, group=3)  # ids are global, not per group
    assert m.status()["peers"][str(A)]["group"] == 0
    assert ring_of(m) == [A]


@pytest.mark.parametrize("pid", [-1, 2**63, 2**64 - 2])
def test_peer_id_out_of_63_bit_range_raises_value_error(m: Membership, pid: int) -> None:
    with pytest.raises(ValueError):
        m.register(pid, 0, HOST, 1234, "x", T0)
    assert m.status()["peers"] == {}


def test_registration_logs_a_join_event(m: Membership) -> None:
    effects = register(m, A, group=4)
    [join] = logs(effects, "join")
    assert join.fields["peer"] == A
    assert join.fields["group"] == 4


# ---------------------------------------------------------------------- pending_peers()


def test_pending_query_answered_only_when_every_admitted_peer_asked(m: Membership) -> None:
    form_group(m, [A, B, C])
    register(m, D)
    assert sends(m.query_pending(A, 11, T0)) == []
    assert sends(m.query_pending(B, 12, T0)) == []
    effects = m.query_pending(C, 13, T0)
    answers = {s.to: s.msg for s in sends(effects, "pending_count")}
    assert set(answers) == {A, B, C}
    assert {msg["count"] for msg in answers.values()} == {1}
    assert {pid: msg["query"] for pid, msg in answers.items()} == {A: 11, B: 12, C: 13}
    assert_valid_messages(effects)


def test_pending_count_counts_only_this_groups_pending_peers(m: Membership) -> None:
    form_group(m, [A, B])
    register(m, C)
    register(m, D)
    form_group(m, [E], group=1)
    register(m, 5, group=1)
    m.query_pending(A, 1, T0)
    effects = m.query_pending(B, 1, T0)
    assert {s.msg["count"] for s in sends(effects, "pending_count")} == {2}


def test_pending_count_is_zero_when_nobody_waits(m: Membership) -> None:
    form_group(m, [A])
    effects = m.query_pending(A, 5, T0)
    [answer] = msgs_to(effects, A, "pending_count")
    assert answer["count"] == 0


def test_pending_query_round_resets_after_an_answer(m: Membership) -> None:
    form_group(m, [A, B])
    m.query_pending(A, 1, T0)
    m.query_pending(B, 1, T0)
    assert sends(m.query_pending(A, 2, T0)) == []  # B has not asked again


def test_pending_query_answered_when_the_last_silent_peer_is_evicted(m: Membership) -> None:
    form_group(m, [A, B, C])
    register(m, D)
    m.query_pending(A, 1, T0)
    m.query_pending(B, 2, T0)
    effects = m.evict(C, "crashed", "connection closed", T0)
    answers = {s.to: s.msg for s in sends(effects, "pending_count")}
    assert set(answers) == {A, B}
    assert {msg["count"] for msg in answers.values()} == {1}


# ---------------------------------------------------------------------- op outcomes


def test_op_succeeds_only_when_every_participant_reported_ok(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    assert outcomes(report(m, A, key)) == {}
    assert outcomes(report(m, B, key)) == {}
    effects = report(m, C, key)
    decided = outcomes(effects)
    assert set(decided) == {A, B, C}
    for msg in decided.values():
        assert msg["ok"] is True
        assert (msg["epoch"], msg["tag"], msg["seq"]) == key
        assert msg["world"] == 3
    assert_valid_messages(effects)


def test_single_peer_op_succeeds_on_its_own_report(m: Membership) -> None:
    epoch = form_group(m, [A])
    decided = outcomes(report(m, A, (epoch, 3, 9)))
    assert decided[A]["ok"] is True
    assert decided[A]["world"] == 1


def test_every_participant_gets_the_same_outcome(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    for pid in (A, B):
        report(m, pid, (epoch, 0, 0))
    decided = outcomes(report(m, C, (epoch, 0, 0)))
    assert len({tuple(sorted(msg.items())) for msg in decided.values()}) == 1


def test_ops_with_different_tags_or_seqs_are_independent(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    report(m, A, (epoch, 1, 0))
    report(m, B, (epoch, 2, 0))
    report(m, A, (epoch, 1, 1), ok=False, kind="Timeout", msg="slow")
    decided = outcomes(report(m, B, (epoch, 1, 0)))
    assert decided[A]["ok"] is True and decided[A]["tag"] == 1 and decided[A]["seq"] == 0


@pytest.mark.parametrize("kind", ["ProtocolError", "Timeout", "Aborted", "InvalidArgument"])
def test_root_failure_decides_at_once_for_every_participant(m: Membership, kind: str) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key)  # A reported success before
    effects = report(m, B, key, ok=False, kind=kind, msg="boom")
    decided = outcomes(effects)
    assert set(decided) == {A, B, C}  # C has not reported and is told anyway
    for msg in decided.values():
        assert msg["ok"] is False
        assert msg["kind"] == kind
        assert msg["peer"] == B
    assert len({tuple(sorted(msg.items())) for msg in decided.values()}) == 1
    assert_valid_messages(effects)


def test_root_failure_names_the_peer_the_reporter_blamed(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    decided = outcomes(report(m, A, (epoch, 0, 0), ok=False, kind="ProtocolError", msg="size", culprit=C))
    assert {msg["peer"] for msg in decided.values()} == {C}


def test_peer_lost_only_failure_waits_for_failure_grace(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    assert (
        outcomes(report(m, A, key, ok=False, kind="PeerLost", msg="neighbour closed", culprit=B, now=T0))
        == {}
    )
    assert outcomes(m.tick(T0 + GRACE / 2)) == {}
    decided = outcomes(m.tick(T0 + GRACE))
    assert set(decided) == {A, B, C}
    for msg in decided.values():
        assert msg["ok"] is False
        assert msg["kind"] == "PeerLost"
        assert msg["peer"] == B


def test_peer_lost_only_failure_decided_when_every_participant_reported(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    key = (epoch, 0, 0)
    assert outcomes(report(m, A, key, ok=False, kind="PeerLost", msg="x")) == {}
    decided = outcomes(report(m, B, key, ok=False, kind="PeerLost", msg="y"))
    assert set(decided) == {A, B}
    assert {msg["kind"] for msg in decided.values()} == {"PeerLost"}


def test_peer_lost_and_success_reports_decide_peer_lost_without_grace(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    key = (epoch, 0, 0)
    report(m, A, key, ok=False, kind="PeerLost", msg="x")
    decided = outcomes(report(m, B, key))
    assert {msg["ok"] for msg in decided.values()} == {False}
    assert {msg["kind"] for msg in decided.values()} == {"PeerLost"}


def test_root_cause_reported_within_grace_wins_over_peer_lost(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key, ok=False, kind="PeerLost", msg="cascade", now=T0)
    decided = outcomes(report(m, C, key, ok=False, kind="Timeout", msg="root", now=T0 + GRACE / 2))
    assert set(decided) == {A, B, C}
    assert {msg["kind"] for msg in decided.values()} == {"Timeout"}
    assert {msg["peer"] for msg in decided.values()} == {C}


def test_evicting_a_silent_participant_waits_for_the_survivors_then_fails_with_peer_lost(m: Membership) -> None:
    # A gone participant that said nothing may have voted or not: the survivors'
    # reports decide. One that never voted proves that nobody committed.
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key)
    effects = m.evict(C, "crashed", "its connection closed", T0)
    assert outcomes(effects) == {}  # B has not reported yet
    effects = report(m, B, key, ok=False, kind="PeerLost", msg="C closed", culprit=C)
    decided = outcomes(effects)
    assert set(decided) == {A, B}
    for msg in decided.values():
        assert msg["ok"] is False
        assert msg["kind"] == "PeerLost"
        assert msg["peer"] == C
        assert msg["world"] == 3
    assert_valid_messages(effects)


def test_survivors_that_all_voted_succeed_although_a_participant_vanished(m: Membership) -> None:
    # Every live participant held the complete result (it voted): success over all N,
    # whatever the silent one did.
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key)
    assert outcomes(m.evict(C, "crashed", "its connection closed", T0)) == {}
    decided = outcomes(report(m, B, key))
    assert set(decided) == {A, B}
    assert {msg["ok"] for msg in decided.values()} == {True}
    assert {msg["world"] for msg in decided.values()} == {3}


def test_one_committed_report_decides_success_and_answers_only_the_waiting(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key)  # voted, then its op failed: waits for the verdict
    effects = m.report_committed(B, [key], T0)
    decided = outcomes(effects)
    assert set(decided) == {A}  # B committed on its own; C has not asked
    assert decided[A]["ok"] is True and decided[A]["world"] == 3
    assert outcomes(report(m, C, key)) == {C: decided[A]}  # a later report is answered
    assert m.report_committed(C, [key], T0) == []  # a committed report is never answered


def test_commits_of_a_settled_op_change_nothing_and_its_outcome_is_a_valid_message(m: Membership) -> None:
    # The master's fast path for "done" batches: the first commit settles the op, the
    # others' commits of it are dropped (never answered, never recorded), and a later
    # non-committed report still gets the (schema-valid) success.
    epoch = form_group(m, [A, B, C])
    key = (epoch, 3, 5 << 8)
    m.report_committed(B, [key], T0)
    record = m.groups[0].ops[key]
    assert record.decided is not None and record.decided["ok"] is True
    protocol.validate(record.decided)
    assert m.report_committed(C, [key, key], T0) == []
    assert set(record.reports) == {B}  # C's commit of a settled op is not even recorded
    effects = report(m, A, key)
    assert outcomes(effects) == {A: record.decided}
    assert_valid_messages(effects)
    # A batch that mixes settled and new ops still settles the new ones.
    other = (epoch, 3, 6 << 8)
    m.report_committed(A, [key, other], T0)
    assert m.groups[0].ops[other].decided is not None


def test_committed_reports_of_unknown_epochs_are_dropped_silently(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    assert m.report_committed(A, [(epoch + 5, 0, 0), (epoch + 9, 1, 2)], T0) == []


def test_a_committed_report_wins_over_a_silent_departure(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    assert outcomes(m.evict(C, "crashed", "closed", T0)) == {}
    assert outcomes(m.report_committed(A, [key], T0)) == {}
    decided = outcomes(report(m, B, key))
    assert decided[B]["ok"] is True


def test_peer_lost_report_decided_at_once_when_the_culprit_is_evicted(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key, ok=False, kind="PeerLost", msg="neighbour", culprit=C, now=T0)
    decided = outcomes(m.evict(C, "crashed", "closed", T0 + GRACE / 10))
    assert set(decided) == {A, B}
    assert {msg["kind"] for msg in decided.values()} == {"PeerLost"}
    assert {msg["peer"] for msg in decided.values()} == {C}


def test_graceful_leave_before_reporting_fails_the_op_with_peer_left(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key)
    assert outcomes(m.leave(C, T0)) == {}
    decided = outcomes(report(m, B, key, ok=False, kind="PeerLost", msg="C closed its connection", culprit=C))
    assert set(decided) == {A, B}
    assert {msg["kind"] for msg in decided.values()} == {"PeerLeft"}
    assert {msg["ok"] for msg in decided.values()} == {False}
    assert {msg["peer"] for msg in decided.values()} == {C}


def test_cascade_peer_lost_from_a_leavers_closed_connection_still_gives_peer_left(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, B, key, ok=False, kind="PeerLost", msg="C closed its connection", culprit=C)
    decided = outcomes(m.leave(C, T0))
    assert {msg["kind"] for msg in decided.values()} == {"PeerLeft"}


def test_one_leaver_and_one_crash_give_peer_lost_not_peer_left(m: Membership) -> None:
    epoch = form_group(m, [A, B, C, D])
    key = (epoch, 0, 0)
    m.leave(C, T0)
    m.evict(D, "crashed", "closed", T0)
    decided = outcomes(report(m, A, key, ok=False, kind="PeerLost", msg="closed", culprit=D))
    assert set(decided) == {A, B}
    assert {msg["kind"] for msg in decided.values()} == {"PeerLost"}


def test_two_leavers_give_peer_left(m: Membership) -> None:
    epoch = form_group(m, [A, B, C, D])
    key = (epoch, 0, 0)
    m.leave(C, T0)
    m.leave(D, T0)
    decided = outcomes(report(m, A, key, ok=False, kind="PeerLost", msg="closed", culprit=D))
    assert {msg["kind"] for msg in decided.values()} == {"PeerLeft"}


def test_participant_that_reported_ok_then_left_does_not_fail_the_op(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, B, key)
    assert outcomes(m.leave(B, T0)) == {}
    report(m, A, key)
    decided = outcomes(report(m, C, key))
    assert set(decided) == {A, C}
    assert {msg["ok"] for msg in decided.values()} == {True}
    assert {msg["world"] for msg in decided.values()} == {3}


def test_eviction_sends_new_ring_to_survivors_before_the_outcomes(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    report(m, A, (epoch, 0, 0), ok=False, kind="PeerLost", msg="B closed", culprit=B)
    effects = m.evict(B, "crashed", "closed", T0)
    for pid in (A, C):
        kinds = [s.msg["t"] for s in sends(effects) if s.to == pid]
        assert "topology" in kinds and "outcome" in kinds
        assert kinds.index("topology") < kinds.index("outcome")
        [topo] = msgs_to(effects, pid, "topology")
        assert topo["epoch"] == epoch + 1
        assert ring_ids(topo) == [A, C]
        [out] = msgs_to(effects, pid, "outcome")
        assert out["next_epoch"] == epoch + 1
    assert sends(effects) and all(s.to != B for s in sends(effects))


def test_eviction_bumps_epoch_and_removes_the_peer_from_the_ring(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    effects = m.evict(B, "crashed", "closed", T0)
    assert epoch_of(m) == epoch + 1
    assert ring_of(m) == [A, C]
    assert str(B) not in m.status()["peers"]
    topos = {s.to: s.msg for s in sends(effects, "topology")}
    assert set(topos) == {A, C}
    assert all(msg["vote"] is False for msg in topos.values())


def test_graceful_leave_bumps_epoch_and_reforms_the_ring(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    effects = m.leave(A, T0)
    assert [e.fields["cause"] for e in logs(effects, "leave")] == ["left"]
    assert epoch_of(m) == epoch + 1
    assert ring_of(m) == [B, C]
    assert {s.to for s in sends(effects, "topology")} == {B, C}


def test_evicting_a_pending_peer_leaves_the_epoch_alone(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    register(m, C)
    effects = m.evict(C, "crashed", "closed", T0)
    assert epoch_of(m) == epoch
    assert sends(effects) == []
    assert m.status()["groups"]["0"]["pending"] == []


def test_unvoted_peer_evicted_completes_the_vote(m: Membership) -> None:
    form_group(m, [A, B])
    register(m, D)
    m.vote_topology(A, T0)
    effects = m.evict(B, "crashed", "closed", T0)
    assert phase_of(m, D) == "admitted"
    assert ring_of(m) == [A, D]
    assert any(msg["vote"] for msg in msgs_to(effects, A, "topology"))


def test_leave_of_unknown_peer_is_a_no_op(m: Membership) -> None:
    epoch = form_group(m, [A])
    assert m.leave(B, T0) == []
    assert m.evict(B, "crashed", "x", T0) == []
    assert epoch_of(m) == epoch


def test_leaving_twice_is_a_no_op(m: Membership) -> None:
    form_group(m, [A, B])
    m.leave(B, T0)
    epoch = epoch_of(m)
    assert m.leave(B, T0) == []
    assert epoch_of(m) == epoch


# ---------------------------------------------------------------------- heartbeats


def _datagram(m: Membership, peer: int, now: float) -> bool:
    return m.beat_datagram(peer, m.peers[peer].beat_token, now)


def test_heartbeat_timeout_evicts_the_silent_peer_as_hung(m: Membership) -> None:
    epoch = form_group(m, [A, B], now=T0)
    assert _datagram(m, B, T0)  # B's heartbeat datagrams arrive: the timeout as configured
    assert m.heartbeat(A, T0 + HB_TIMEOUT - 1)
    effects = m.tick(T0 + HB_TIMEOUT + 0.5)
    [evict] = logs(effects, "evict")
    assert evict.fields["peer"] == B
    assert evict.fields["cause"] == "hung"
    assert str(B) not in m.status()["peers"]
    [topo] = msgs_to(effects, A, "topology")
    assert topo["epoch"] == epoch + 1 and ring_ids(topo) == [A]


def test_no_eviction_before_the_heartbeat_timeout(m: Membership) -> None:
    form_group(m, [A, B], now=T0)
    effects = m.tick(T0 + HB_TIMEOUT - 0.01)
    assert logs(effects, "evict") == []
    assert ring_of(m) == [A, B]


def test_heartbeats_keep_a_peer_alive(m: Membership) -> None:
    form_group(m, [A, B], now=T0)
    now = T0
    for _ in range(10):
        now += HB_TIMEOUT / 2
        m.heartbeat(A, now)
        m.heartbeat(B, now)
        assert logs(m.tick(now), "evict") == []
    assert ring_of(m) == [A, B]


def test_a_peer_heard_over_tcp_only_gets_a_retransmission_more() -> None:
    """Without its datagrams a peer's heartbeats may wait behind a retransmission after
    an outage (beats.STREAM_ALLOWANCE): evicted that much later, and its welcome named
    the master's datagram port and its own token."""
    m = Membership(HB_INTERVAL, HB_TIMEOUT, GRACE)
    m.beat_port = 4242
    [welcome] = msgs_to(register(m, A, now=T0), A, "welcome")
    assert welcome["beat_port"] == 4242 and welcome["beat_token"] == m.peers[A].beat_token
    register(m, B, now=T0)
    m.vote_topology(A, T0)
    assert ring_of(m) == [A, B]
    assert m.status()["peers"][str(A)]["datagrams"] is False
    assert logs(m.tick(T0 + HB_TIMEOUT + 0.5), "evict") == []
    effects = m.tick(T0 + HB_TIMEOUT + beats.STREAM_ALLOWANCE + 0.01)
    assert sorted(e.fields["peer"] for e in logs(effects, "evict")) == sorted([A, B])


def test_a_path_that_loses_only_tcp_or_only_udp(m: Membership) -> None:
    """Datagrams alone do not keep a peer whose TCP heartbeats stopped (its control
    messages would not arrive either): evicted after the TCP limit. A peer whose
    datagrams stop while TCP flows is judged by TCP alone."""
    form_group(m, [A, B], now=T0)
    assert _datagram(m, A, T0) and _datagram(m, B, T0)
    t = T0
    while t < T0 + HB_TIMEOUT + beats.STREAM_ALLOWANCE - 0.5:
        t += HB_INTERVAL / 2
        assert _datagram(m, A, t)  # A: datagrams only
        assert m.heartbeat(B, t)  # B: TCP only
        assert logs(m.tick(t), "evict") == []
    effects = m.tick(T0 + HB_TIMEOUT + beats.STREAM_ALLOWANCE + 0.01)
    [evict] = logs(effects, "evict")
    assert evict.fields["peer"] == A and "over TCP" in evict.fields["detail"]


def test_a_heartbeat_datagram_counts_only_with_the_peers_token(m: Membership) -> None:
    form_group(m, [A, B], now=T0)
    other = bytes(16) if m.peers[A].beat_token != bytes(16) else b"\x01" * 16
    assert m.beat_datagram(A, other, T0 + 1) is False
    assert m.beat_datagram(A, m.peers[B].beat_token, T0 + 1) is False  # B's token is not A's
    assert m.beat_datagram(C, m.peers[A].beat_token, T0 + 1) is False  # not registered
    assert m.peers[A].datagrams is False and m.peers[A].last_datagram == 0.0
    assert _datagram(m, A, T0 + 1) and m.peers[A].datagrams and m.peers[A].last_datagram == T0 + 1


def test_heartbeat_timeout_also_evicts_pending_peers(m: Membership) -> None:
    form_group(m, [A], now=T0)
    register(m, B, now=T0)
    assert _datagram(m, B, T0)
    m.heartbeat(A, T0 + HB_TIMEOUT)
    effects = m.tick(T0 + HB_TIMEOUT + 0.5)
    assert [e.fields["peer"] for e in logs(effects, "evict")] == [B]
    assert m.status()["groups"]["0"]["pending"] == []


def test_heartbeat_from_unknown_peer_is_refused(m: Membership) -> None:
    assert m.heartbeat(A, T0) is False
    assert m.status()["peers"] == {}


def test_hung_participant_eviction_fails_its_op(m: Membership) -> None:
    epoch = form_group(m, [A, B], now=T0)
    # A's op never completed: the master's new ring aborts it (reported as PeerLost).
    report(m, A, (epoch, 0, 0), ok=False, kind="PeerLost", msg="superseded", now=T0)
    assert _datagram(m, B, T0)
    m.heartbeat(A, T0 + HB_TIMEOUT)
    decided = outcomes(m.tick(T0 + HB_TIMEOUT + 0.5))
    assert set(decided) == {A}
    assert decided[A]["kind"] == "PeerLost" and decided[A]["peer"] == B


# ---------------------------------------------------------------------- decided outcomes, late and stray reports


def test_late_reporter_gets_the_stored_decision(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    first = outcomes(report(m, A, key, ok=False, kind="Timeout", msg="slow"))
    effects = report(m, B, key)  # B's success report arrives after the decision
    assert sends(effects) == [Send(B, first[B])]
    assert effects[0].msg["ok"] is False and effects[0].msg["kind"] == "Timeout"


def test_decided_success_never_changes(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    for pid in (A, B):
        report(m, pid, key)
    decided = outcomes(report(m, C, key))
    assert decided[A]["ok"] is True
    # Later events touching the op's participants decide nothing new about it.
    effects = m.evict(C, "crashed", "closed", T0 + 1) + m.tick(T0 + 1 + 10 * GRACE)
    assert [o for o in outcomes(effects).values() if (o["epoch"], o["tag"], o["seq"]) == key] == []
    late = report(m, A, key, ok=False, kind="ProtocolError", msg="changed my mind", now=T0 + 2)
    assert [s.msg for s in sends(late)] == [decided[A]]


def test_decided_failure_never_changes(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    decided = outcomes(report(m, A, key, ok=False, kind="Aborted", msg="abort"))
    for pid in (B, C):
        assert [s.msg for s in sends(report(m, pid, key))] == [decided[pid]]
    assert outcomes(m.tick(T0 + 10 * GRACE)) == {}
    assert outcomes(m.leave(C, T0 + 1)) == {}


def test_grace_decision_not_changed_by_a_later_root_cause(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    key = (epoch, 0, 0)
    report(m, A, key, ok=False, kind="PeerLost", msg="x", now=T0)
    decided = outcomes(m.tick(T0 + GRACE))
    assert decided[B]["kind"] == "PeerLost"
    late = sends(report(m, B, key, ok=False, kind="ProtocolError", msg="root", now=T0 + 2 * GRACE))
    assert [s.msg for s in late] == [decided[B]]
    assert outcomes(m.tick(T0 + 4 * GRACE)) == {}


def test_outcome_is_decided_and_logged_once(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    key = (epoch, 0, 0)
    effects = report(m, A, key, ok=False, kind="Timeout", msg="x")
    effects += report(m, B, key, ok=False, kind="Timeout", msg="y")
    effects += m.tick(T0 + 1)
    [entry] = logs(effects, "outcome")
    assert entry.fields["ok"] is False and entry.fields["participants"] == sorted([A, B])


def test_report_for_a_future_epoch_is_aborted(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    effects = report(m, A, (epoch + 7, 0, 0))
    assert [s.to for s in sends(effects)] == [A]
    [msg] = msgs_to(effects, A, "outcome")
    assert msg["ok"] is False
    assert msg["kind"] == "Aborted"
    assert msg["next_epoch"] == epoch
    assert_valid_messages(effects)


def test_report_for_a_pruned_epoch_is_aborted(m: Membership) -> None:
    old = form_group(m, [A])
    for i in range(6):  # each join (admitted by A's vote) and leave is a new epoch
        pid = 5000 + i
        register(m, pid)
        m.vote_topology(A, T0)
        m.leave(pid, T0)
    assert epoch_of(m) >= old + 10
    effects = report(m, A, (old, 0, 0))
    [msg] = msgs_to(effects, A, "outcome")
    assert msg["ok"] is False and msg["kind"] == "Aborted"


def test_report_for_the_previous_epoch_is_still_decided_over_its_ring(m: Membership) -> None:
    old = form_group(m, [A, B])
    register(m, C)
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)  # epoch old+1: [A, B, C]
    report(m, A, (old, 0, 0))
    decided = outcomes(report(m, B, (old, 0, 0)))
    assert set(decided) == {A, B}
    assert decided[A]["ok"] is True and decided[A]["world"] == 2


def test_non_participant_report_gets_protocol_error(m: Membership) -> None:
    old = form_group(m, [A, B])
    register(m, C)
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)  # C admitted in epoch old+1; not a participant of `old`
    effects = report(m, C, (old, 0, 0))
    assert [s.to for s in sends(effects)] == [C]
    [msg] = msgs_to(effects, C, "outcome")
    assert msg["ok"] is False and msg["kind"] == "ProtocolError"


def test_non_participant_report_does_not_affect_the_op(m: Membership) -> None:
    old = form_group(m, [A, B])
    register(m, C)
    m.vote_topology(A, T0)
    m.vote_topology(B, T0)
    report(m, C, (old, 0, 0), ok=False, kind="Timeout", msg="not mine")
    report(m, A, (old, 0, 0))
    decided = outcomes(report(m, B, (old, 0, 0)))
    assert set(decided) == {A, B}
    assert {msg["ok"] for msg in decided.values()} == {True}


def test_outcome_goes_only_to_live_participants(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    register(m, D)  # pending member of the same group
    m.evict(C, "crashed", "x", T0)  # C's op (epoch) fails; outcomes for the old epoch
    key = (epoch, 5, 0)  # a fresh op of the old epoch: participants A, B, C
    decided = outcomes(report(m, A, key, ok=False, kind="PeerLost", msg="C closed", culprit=C))
    assert set(decided) == {A, B}  # not the evicted C, not the pending D


# ---------------------------------------------------------------------- groups


def test_groups_are_independent(m: Membership) -> None:
    form_group(m, [A, B], group=0)
    effects = register(m, C, group=1)
    [welcome] = msgs_to(effects, C, "welcome")
    assert welcome["admitted"] is True  # first peer of group 1, although group 0 is not empty
    register(m, D, group=1)  # pending in group 1
    m.vote_topology(A, T0)
    effects = m.vote_topology(B, T0)  # a vote round of group 0
    assert phase_of(m, D) == "pending"
    assert ring_of(m, 0) == [A, B]
    assert ring_of(m, 1) == [C]
    for s in sends(effects, "topology"):
        assert s.to in (A, B)
        assert set(ring_ids(s.msg)) <= {A, B}


def test_group_one_votes_never_put_its_peers_in_group_zeros_ring(m: Membership) -> None:
    form_group(m, [A], group=0)
    form_group(m, [C, D], group=1)
    register(m, E, group=1)
    m.vote_topology(C, T0)
    effects = m.vote_topology(D, T0)
    assert ring_of(m, 1) == [C, D, E]
    assert ring_of(m, 0) == [A]
    assert all(s.to in (C, D, E) for s in sends(effects))


def test_same_op_key_in_two_groups_is_decided_separately(m: Membership) -> None:
    e0 = form_group(m, [A, B], group=0)
    e1 = form_group(m, [C, D], group=1)
    assert e0 == e1
    key = (e0, 0, 0)
    report(m, A, key)
    effects = report(m, C, key, ok=False, kind="Timeout", msg="g1")
    assert set(outcomes(effects)) == {C, D}
    decided = outcomes(report(m, B, key))
    assert set(decided) == {A, B}
    assert {msg["ok"] for msg in decided.values()} == {True}


def test_pending_query_is_per_group(m: Membership) -> None:
    form_group(m, [A], group=0)
    form_group(m, [C, D], group=1)
    register(m, E, group=1)
    effects = m.query_pending(A, 1, T0)
    [answer] = msgs_to(effects, A, "pending_count")
    assert answer["count"] == 0
    assert sends(m.query_pending(C, 1, T0)) == []


def test_group_whose_admitted_peers_all_left_admits_pending_peers_at_once(m: Membership) -> None:
    epoch = form_group(m, [A, B])
    register(m, C)
    register(m, D)
    m.leave(A, T0)
    effects = m.evict(B, "crashed", "x", T0)
    assert phase_of(m, C) == "admitted" and phase_of(m, D) == "admitted"
    assert ring_of(m) == [C, D]
    topos = {s.to: s.msg for s in sends(effects, "topology")}
    assert set(topos) == {C, D}
    assert all(ring_ids(msg) == [C, D] for msg in topos.values())
    assert epoch_of(m) > epoch


def test_emptied_group_admits_the_next_peer_at_once(m: Membership) -> None:
    form_group(m, [A, B])
    m.leave(A, T0)
    m.leave(B, T0)
    effects = register(m, C)
    [welcome] = msgs_to(effects, C, "welcome")
    assert welcome["admitted"] is True
    [topo] = msgs_to(effects, C, "topology")
    assert ring_ids(topo) == [C]


# ---------------------------------------------------------------------- shared-state sync


def _submission(pid: int, hashes: list[int], revision: int = 1) -> Any:
    from pccl_py.master.election import EntryMeta, Submission, SyncStrategy

    entries = tuple(EntryMeta(f"e{i}", "float32", (4,), 16, h) for i, h in enumerate(hashes))
    return Submission(pid, revision, SyncStrategy.ENFORCE_POPULAR, entries)


def test_a_sync_where_nobody_fetches_is_decided_in_one_round_trip(m: Membership) -> None:
    epoch = form_group(m, [A, B, C])
    assert m.request_sync(A, _submission(A, [1, 2]), 1, T0) == []
    assert m.request_sync(B, _submission(B, [1, 2]), 2, T0) == []
    effects = m.request_sync(C, _submission(C, [1, 2]), 3, T0)
    assert sends(effects, "sync_plan") == []
    results = {s.to: s.msg for s in sends(effects, "sync_result")}
    assert set(results) == {A, B, C}
    assert all(r["ok"] and r["revision"] == 1 for r in results.values())
    assert m.groups[0].sync_active is None and m.groups[0].state_revision == 1
    assert epoch == m.groups[0].epoch
    assert_valid_messages(effects)


def test_a_sync_with_a_differing_entry_sends_plans_and_waits_for_every_peer(m: Membership) -> None:
    form_group(m, [A, B, C])
    m.request_sync(A, _submission(A, [1, 2]), 1, T0)
    m.request_sync(B, _submission(B, [1, 2]), 2, T0)
    effects = m.request_sync(C, _submission(C, [1, 9]), 3, T0)
    plans = {s.to: s.msg for s in sends(effects, "sync_plan")}
    assert set(plans) == {A, B, C}
    assert plans[C]["fetch"] and plans[C]["fetch"][0][0] == 1
    assert plans[A]["fetch"] == [] and plans[B]["fetch"] == []
    assert sends(effects, "sync_result") == []
    assert sends(m.sync_done(A, True, "", "", T0, 1), "sync_result") == []
    assert sends(m.sync_done(B, True, "", "", T0, 1), "sync_result") == []
    results = sends(m.sync_done(C, True, "", "", T0, 1), "sync_result")
    assert {s.to for s in results} == {A, B, C}


# ---------------------------------------------------------------------- data-plane calls that cannot match


def test_different_data_plane_calls_mismatch_and_a_named_op_that_broke_is_a_mismatch(m: Membership) -> None:
    """A blocks in an all_gather, B and C in an all_reduce (different ops: each kind runs
    on engine tags of its own). After mismatch_grace every member gets "mismatch" naming
    both calls and both ops. B's all-reduce then fails on a broken connection (A aborted
    its all-gather and closed its connections): PeerLost by itself, but the master knows
    the cause and decides CollectiveMismatch at once, for everyone."""
    epoch = form_group(m, [A, B, C])
    gather_key, reduce_key = (epoch, 1 << 32, 1 << 8), (epoch, 0, 1 << 8)
    g_desc, r_desc = "tag 0, step 1, 10 x float32", "tag 0, step 1, 10 x float32, SUM"
    m.report_blocked(A, "all_gather", gather_key, g_desc, [(gather_key, g_desc)], T0)
    for pid in (B, C):
        m.report_blocked(pid, "all_reduce", reduce_key, r_desc, [(reduce_key, r_desc)], T0)
    assert not sends(m.tick(T0 + 0.01), "mismatch")
    effects = m.tick(T0 + 1.0)
    (msg,) = msgs_to(effects, A, "mismatch")
    assert f"all_gather({g_desc})" in msg["msg"] and f"all_reduce({r_desc})" in msg["msg"]
    assert sorted(tuple(k) for k in msg["ops"]) == sorted([gather_key, reduce_key])
    assert all(msgs_to(effects, pid, "mismatch") for pid in (B, C))
    effects = report(m, B, reduce_key, ok=False, kind="PeerLost", msg="peer 901 closed the connection", culprit=A,
                     now=T0 + 1.01)
    decided = outcomes(effects)
    assert set(decided) == {A, B, C}
    assert all(o["kind"] == "CollectiveMismatch" and not o["ok"] for o in decided.values()), decided
    assert_valid_messages(effects)
