"""The run survives a master restart: the new master's rules for taking a group over
from its rejoining members (pure, on pccl_py.membership), and a training-like run whose
master is SIGKILLed and restarted at the same address several times."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pccl_py.wire import protocol
from pccl_py.master.membership import Membership, Phase, RejoinInfo, RejoinRefused, Send
from stress.orchestrator import Scenario, load, run_scenario

A, B, C, D = 901, 17, 455, 3003
T0 = 100.0
RING = (A, B, C)


def fresh_master(hold_until: float = 0.0) -> Membership:
    return Membership(1.0, 5.0, 0.2, incarnation=42, recovery_wait=3.0, hold_first_admission_until=hold_until)


def info(epoch: int = 7, ring: tuple[int, ...] = RING, pending: tuple[Any, ...] = (), decided: tuple[Any, ...] = (),
         revision: int | None = 12, round_: int = 3, waiting: tuple[Any, ...] = (),
         answered: tuple[int, ...] = (), rsag: bool = True) -> RejoinInfo:
    return RejoinInfo(epoch=epoch, ring=ring, round=round_, revision=revision, pending=pending, decided=decided,
                      waiting=waiting, answered=answered, rsag=rsag)


def rejoin(m: Membership, pid: int, i: RejoinInfo, now: float = T0) -> list[Any]:
    effects = m.rejoin(pid, 0, "127.0.0.1", 40000 + pid, f"p{pid}", i, now)
    for e in effects:
        if isinstance(e, Send):
            protocol.validate(e.msg)
    return effects


def msgs(effects: list[Any], t: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in effects:
        if isinstance(e, Send) and e.msg["t"] == t:
            out[e.to].append(e.msg)
    return out


KEY = (7, 0, 5 << 8)


def test_group_reforms_in_place_when_every_member_is_back() -> None:
    m = fresh_master()
    assert msgs(rejoin(m, A, info()), "welcome")[A][0]["master"] == 42
    assert m.peers[A].phase is Phase.RECOVERING
    assert msgs(rejoin(m, B, info()), "topology") == {}  # C still missing: wait
    effects = rejoin(m, C, info())
    topo = msgs(effects, "topology")
    assert set(topo) == {A, B, C}
    assert topo[A][0]["epoch"] == 7 and [p[0] for p in topo[A][0]["ring"]] == list(RING)
    assert topo[A][0]["round"] == 3
    g = m.groups[0]
    assert g.state_revision == 12 and g.last_synced == {A, B, C}
    assert all(m.peers[p].phase is Phase.ADMITTED for p in RING)


@pytest.mark.parametrize("rsag", [False, True])
def test_an_epoch_taken_over_keeps_its_algorithm_choice(rsag: bool) -> None:
    """The members ran epoch 7 with rsag (or on the ring, as loopback and LAN groups
    do): the re-form's topology says the same, so a member that missed epoch 7's
    topology message runs what the others run. A new epoch chooses afresh."""
    m = fresh_master()
    rejoin(m, A, info(rsag=rsag))
    rejoin(m, B, info(ring=(A, B), epoch=6))  # missed epoch 7's topology
    topo = msgs(rejoin(m, C, info(rsag=rsag)), "topology")
    assert {msg["rsag"] for msgs_ in topo.values() for msg in msgs_} == {rsag}
    assert m.groups[0].epoch == 7


def test_a_verdict_one_member_received_is_given_to_all() -> None:
    m = fresh_master()
    rejoin(m, A, info(decided=((KEY, True, "", "", 3),)))
    rejoin(m, B, info(pending=((KEY, True, "", ""),)))
    effects = rejoin(m, C, info(pending=((KEY, True, "", ""),)))
    got = msgs(effects, "outcome")
    assert set(got) == {A, B, C}
    assert all(o[0]["ok"] and o[0]["world"] == 3 for o in got.values())


def test_a_failed_verdict_one_member_received_is_given_to_all() -> None:
    m = fresh_master()
    rejoin(m, A, info(pending=((KEY, True, "", ""),)))
    rejoin(m, B, info(decided=((KEY, False, "PeerLost", "peer 3 crashed", 3),)))
    effects = rejoin(m, C, info(pending=((KEY, True, "", ""),)))
    got = msgs(effects, "outcome")
    assert set(got) == {A, B, C} and not any(o[0]["ok"] for o in got.values())


def test_an_op_every_member_reported_ok_succeeds() -> None:
    m = fresh_master()
    for pid in RING:
        effects = rejoin(m, pid, info(pending=((KEY, True, "", ""),)))
    got = msgs(effects, "outcome")
    assert set(got) == {A, B, C} and all(o[0]["ok"] for o in got.values())


def test_an_op_reported_during_recovery_is_decided_at_the_reform() -> None:
    m = fresh_master()
    rejoin(m, A, info())
    rejoin(m, B, info())
    assert m.report_op(A, KEY, True, "", "", -1, T0) == []  # held until the group re-forms
    assert m.report_op(B, KEY, True, "", "", -1, T0) == []
    effects = rejoin(m, C, info(pending=((KEY, True, "", ""),)))
    assert all(o[0]["ok"] for o in msgs(effects, "outcome").values())


def test_a_member_that_does_not_come_back_fails_its_ops_and_leaves_the_ring() -> None:
    m = fresh_master()
    rejoin(m, A, info(pending=((KEY, True, "", ""),)))  # voted
    rejoin(m, B, info(pending=((KEY, False, "PeerLost", "C closed"),)))  # had not: nobody committed
    assert m.tick(T0 + 1.0) == []  # within recovery_wait: nothing forced yet
    assert m.groups[0].recovery is not None
    effects = m.tick(T0 + 3.5)
    topo = msgs(effects, "topology")
    assert set(topo) == {A, B} and topo[A][0]["epoch"] == 8
    assert [p[0] for p in topo[A][0]["ring"]] == [A, B]
    got = msgs(effects, "outcome")
    assert set(got) == {A, B}
    assert all(not o[0]["ok"] and o[0]["kind"] == "PeerLost" and o[0]["next_epoch"] == 8 for o in got.values())


def test_members_that_all_voted_succeed_although_one_does_not_come_back() -> None:
    m = fresh_master()
    rejoin(m, A, info(pending=((KEY, True, "", ""),)))
    rejoin(m, B, info(pending=((KEY, True, "", ""),)))
    got = msgs(m.tick(T0 + 3.5), "outcome")
    assert set(got) == {A, B}
    assert all(o[0]["ok"] and o[0]["world"] == 3 for o in got.values())


def test_a_member_of_an_older_epoch_is_sent_away_and_a_late_one_refused() -> None:
    m = fresh_master()
    rejoin(m, A, info(ring=(A, B)))
    rejoin(m, C, info(epoch=5, ring=(A, B, C)))  # evicted by the old master before it died
    effects = rejoin(m, B, info(ring=(A, B)))
    assert set(msgs(effects, "evicted")) == {C}
    assert C not in m.peers and set(m.groups[0].ring) == {A, B}
    with pytest.raises(RejoinRefused):
        m.rejoin(999, 0, "127.0.0.1", 1, "late", info(ring=(A, B)), T0 + 1)


def test_restarted_master_holds_a_newcomers_admission_for_the_grace() -> None:
    m = fresh_master(hold_until=T0 + 2.0)
    effects = m.register(C, 0, "127.0.0.1", 5000, "new", T0)
    assert msgs(effects, "welcome")[C][0]["admitted"] is False and msgs(effects, "topology") == {}
    topo = msgs(m.tick(T0 + 2.5), "topology")
    assert set(topo) == {C}  # nobody came back: the newcomer founds the group


def test_newcomer_during_recovery_waits_for_the_members() -> None:
    m = fresh_master()
    rejoin(m, A, info(ring=(A, B)))
    assert m.knock(C, 0, "127.0.0.1", 5000, T0) == (None, [])  # no ring to open pools to yet
    effects = m.register(C, 0, "127.0.0.1", 5000, "new", T0)
    assert msgs(effects, "welcome")[C][0]["admitted"] is False
    rejoin(m, B, info(ring=(A, B)))
    assert m.groups[0].ring == [A, B] and m.groups[0].pending == [C]


def test_newcomers_are_admitted_when_every_rejoined_member_is_gone_again() -> None:
    """A restarted master took one member back, which then crashed before the group
    re-formed: once recovery_wait is over the group starts afresh from the newcomers
    (found by the WAN stress run: they waited for admission until the next master
    restart, 96 s)."""
    m = fresh_master()
    rejoin(m, A, info(ring=(A, B)))
    m.register(C, 0, "127.0.0.1", 5000, "new", T0 + 0.5)
    m.register(D, 0, "127.0.0.1", 5001, "new2", T0 + 0.6)
    m.evict(A, "crashed", "its connection closed", T0 + 1.0)
    assert msgs(m.tick(T0 + 2.0), "topology") == {}  # within recovery_wait: B may still come back
    topo = msgs(m.tick(T0 + 3.5), "topology")
    assert set(topo) == {C, D}
    g = m.groups[0]
    assert g.recovery is None and set(g.ring) == {C, D} and g.pending == []
    with pytest.raises(RejoinRefused):  # a member of the old group comes back as a new peer
        m.rejoin(B, 0, "127.0.0.1", 1, "late", info(ring=(A, B)), T0 + 4)


# ---------------------------------------------------------------------- end to end


def test_training_run_survives_master_restarts(tmp_path: Path) -> None:
    """4 peers sync their state and all-reduce every step; the master is SIGKILLed and
    restarted at the same address (after 0.5-3 s) several times. Every peer resumes,
    the state stays bit-identical (bit_parity), outcomes agree, and no step is lost or
    applied twice: each peer's step counter moves by 0 or 1 between syncs."""
    scenario = Scenario(
        seconds=30, seed=21, fault_every=6.0, warmup=3.0,
        weights={"kill": 0, "stall": 0, "leave": 0, "join": 0, "restart": 0, "master_restart": 1},
    )
    summary = run_scenario(scenario, str(tmp_path))
    assert summary["violations"] == 0, summary["violation_details"]
    assert summary["faults"]["master_restart"] >= 2
    assert len(summary["master_restart_to_next_allreduce_s"]) >= 2
    records, faults = load(summary["workdir"])
    steps: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r.get("event") == "synced":
            steps[r["pid"]].append(r["step"])
    assert len(steps) == 4  # nobody had to rejoin as a new process
    run_end = max(f["ts"] for f in faults if f["kind"] == "run_end")
    # The last restart with time to go on after it (one may come with the shutdown).
    last_restart = max(f["ts"] for f in faults[1:] if f["kind"] == "master_start" and f["ts"] < run_end - 3)
    for pid, seq in steps.items():
        assert all(b - a in (0, 1) for a, b in zip(seq, seq[1:])), (pid, seq[:50])
        assert seq[-1] > 10
    after = [r for r in records if r.get("event") == "synced" and r["ts"] > last_restart]
    assert len({r["pid"] for r in after}) == 4  # every peer went on after the last restart
    assert sum(1 for r in records if r.get("event") == "evicted") == 0


def test_member_behind_on_the_last_sync_finishes_it_under_the_new_master() -> None:
    """The old master died while sending a sync's result: A got it (revision 13), B and
    C did not (12) but hold the bytes; their repeated sync_done completes that sync."""
    m = fresh_master()
    rejoin(m, A, info(revision=13))
    rejoin(m, B, info(revision=12))
    rejoin(m, C, info(revision=12))
    effects = m.sync_done(B, True, "", "", T0, 13)
    [result] = msgs(effects, "sync_result")[B]
    assert result["ok"] and result["revision"] == 13
    # Not behind (or a failed fetch): there is no sync to finish.
    [result] = msgs(m.sync_done(A, True, "", "", T0, 13), "sync_result")[A]
    assert not result["ok"]
    [result] = msgs(m.sync_done(C, False, "PeerLost", "x", T0, 13), "sync_result")[C]
    assert not result["ok"]


def test_pending_answer_some_members_got_is_given_to_the_others() -> None:
    """The old master answered pending_peers() (round 3, query 2 of the round) to A
    only before it died; B and C still wait in it. They get A's answer, before the
    re-form topology (so they do not ask again)."""
    m = fresh_master()
    rejoin(m, A, info(answered=(3, 2, 0)))
    rejoin(m, B, info(answered=(3, 1, 0), waiting=("pending", 3, 2, 41)))
    effects = rejoin(m, C, info(answered=(3, 1, 0), waiting=("pending", 3, 2, 7)))
    got = msgs(effects, "pending_count")
    assert {pid: [(x["query"], x["count"]) for x in v] for pid, v in got.items()} == {B: [(41, 0)], C: [(7, 0)]}
    order = [(e.to, e.msg["t"]) for e in effects if isinstance(e, Send)]
    assert order.index((B, "pending_count")) < order.index((B, "topology"))


def test_members_all_waiting_in_pending_are_not_answered_by_the_reform() -> None:
    m = fresh_master()
    for pid in RING:
        effects = rejoin(m, pid, info(answered=(3, 1, 0), waiting=("pending", 3, 2, pid)))
    assert msgs(effects, "pending_count") == {}  # their repeated queries are answered as usual


def test_vote_some_members_saw_complete_is_completed_for_the_others() -> None:
    m = fresh_master()
    rejoin(m, A, info(round_=4))  # saw the vote complete (round 3 -> 4)
    rejoin(m, B, info(round_=3, waiting=("vote", 3)))
    effects = rejoin(m, C, info(round_=4))
    topo = msgs(effects, "topology")
    assert [t["vote"] for t in topo[B]] == [True] and topo[B][0]["round"] == 4
    assert [t["vote"] for t in topo[A]] == [False]


def test_sync_the_new_master_never_saw_is_retried() -> None:
    m = fresh_master()
    for pid in RING:
        rejoin(m, pid, info())
    [result] = msgs(m.sync_done(A, True, "", "", T0, 1), "sync_result")[A]
    assert not result["ok"] and result["kind"] == "Retry"


def test_joiner_that_answers_a_plan_nobody_completed_is_retried_not_settled() -> None:
    """Members A, B, C synced revision 12; joiner D (never synced) was fetching for the
    revision-13 plan when the old master died, before anyone got that sync's result.
    D is behind the group's revision (12), but its sync_done answers plan 13: it must
    be retried with the others, not told that it holds revision 12 (it holds the
    bytes of 13)."""
    m = fresh_master()
    for pid in RING:
        rejoin(m, pid, info(ring=RING + (D,), revision=12))
    rejoin(m, D, info(ring=RING + (D,), revision=-1))
    [result] = msgs(m.sync_done(D, True, "", "", T0, 13), "sync_result")[D]
    assert not result["ok"] and result["kind"] == "Retry"


def test_member_that_missed_the_newest_topology_stays_and_its_old_op_is_settled() -> None:
    """The old master moved to epoch 8 (ring A, B) and died before B heard of it; B
    still waits on an op of epoch 7 that A saw failed."""
    old_key = (7, 0, 9 << 8)
    m = fresh_master()
    rejoin(m, A, info(epoch=8, ring=(A, B), decided=((old_key, False, "PeerLost", "C crashed", 3),)))
    effects = rejoin(m, B, info(epoch=7, ring=(A, B, C), pending=((old_key, True, "", ""),)))
    assert set(m.groups[0].ring) == {A, B} and m.groups[0].epoch == 8
    [outcome] = msgs(effects, "outcome")[B]
    assert (outcome["epoch"], outcome["ok"], outcome["kind"]) == (7, False, "PeerLost")
    assert msgs(effects, "topology")[B][0]["epoch"] == 8


def test_members_rejoin_after_a_newcomer_registered_first() -> None:
    """A newcomer reaches the restarted master before the members do: it stays pending
    (held), the members take the group over, and it is admitted at their next vote."""
    m = fresh_master(hold_until=T0 + 2.0)
    m.register(999, 0, "127.0.0.1", 5000, "new", T0)
    for pid in RING:
        effects = rejoin(m, pid, info())
    assert set(msgs(effects, "topology")) == set(RING)
    g = m.groups[0]
    assert g.ring == list(RING) and g.pending == [999] and g.epoch == 7
    assert msgs(m.tick(T0 + 2.5), "topology") == {}  # the hold ends: still pending, not a new group
    for pid in RING:
        effects = m.vote_topology(pid, T0 + 3)
    assert [p[0] for p in msgs(effects, "topology")[999][0]["ring"]] == [*RING, 999]
