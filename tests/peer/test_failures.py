"""Failure semantics (DESIGN.md §4) with real processes: SIGKILL of a peer while idle,
in the middle of an all-reduce and in the middle of update_topology(), and SIGSTOP of
a peer (a hang, found by heartbeats).

The contract checked every time:
- every survivor gets the same outcome for the op in flight (all raise PeerLost with
  their input intact, or all succeed), op by op;
- the group re-forms without the victim (world size N-1, a newer epoch);
- all_reduce(retry=True) then succeeds with info.world_size == N-1 and the exact sum
  of the survivors' inputs, byte-identical on every survivor;
- a stopped-then-resumed peer's calls raise a PcclError (it was evicted), never hang.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import pytest
from peer_workers import Cluster, checksum, loop_coef, loop_worker, make_input, master_paused

import pccl_py as pccl

pytestmark = pytest.mark.timeout(180)

N_ELEMS = 10_000
BIG = 4 << 20  # 4M float32 = 16 MiB per op: a kill lands inside an op


def crc_of_sum(n: int, coefs: list[float]) -> int:
    return checksum(make_input(n, sum(coefs)))


def ar(n: int, coef: float, **kw: Any) -> dict[str, Any]:
    return {"cmd": "all_reduce", "n": n, "coef": coef, "timeout": 30.0, **kw}


def assert_same_outcome(
    results: dict[int, dict[str, Any]], coefs: dict[int, float], n: int = N_ELEMS
) -> bool:
    """The op every survivor ran: all succeeded (same world, exact and identical
    bytes) or all raised PeerLost with the input intact. Returns whether it succeeded."""
    oks = {i: r["ok"] for i, r in results.items()}
    assert len(set(oks.values())) == 1, f"survivors disagree on the outcome: {results}"
    if all(oks.values()):
        worlds = {r["world"] for r in results.values()}
        assert len(worlds) == 1, results
        crcs = {r["crc"] for r in results.values()}
        assert len(crcs) == 1, f"survivors hold different bytes: {results}"
        if worlds == {len(coefs)}:
            assert crcs == {crc_of_sum(n, list(coefs.values()))}, results
        return True
    for r in results.values():
        assert r["error"] == "PeerLost", r
        assert r["intact"], f"a failed op changed its input: {r}"
    return False


def assert_recovered(
    results: dict[int, dict[str, Any]],
    coefs: dict[int, float],
    epoch_before: int,
    n: int = N_ELEMS,
    live: bool = True,
) -> None:
    """A retry=True all-reduce over exactly the peers of `coefs` (in a newer epoch).
    live: the peers are still connected, so their current world/epoch must match too
    (loop workers close right after their last op, so theirs may have moved on)."""
    for r in results.values():
        assert r["ok"], f"retry=True all-reduce failed after the group re-formed: {r}"
        assert r["world"] == len(coefs), r
        assert r["crc"] == crc_of_sum(n, list(coefs.values())), r
        assert r["epoch"] > epoch_before, r
        if live:
            assert r["world_now"] == len(coefs), r
            assert r["epoch_now"] == r["epoch"], r
    assert len({r["epoch"] for r in results.values()}) == 1, results


# ---------------------------------------------------------------------- SIGKILL


def form_ring(cluster: Cluster) -> tuple[dict[int, int], int]:
    """Forms a group of peers 0, 1, 2 and runs one op; returns ({rank: index}, epoch)."""
    cluster.form([0, 1, 2])
    r = cluster.call({i: ar(N_ELEMS, c) for i, c in {0: 1.0, 1: 2.0, 2: 4.0}.items()})
    assert all(x["ok"] for x in r.values()), r
    assert {x["crc"] for x in r.values()} == {crc_of_sum(N_ELEMS, [1.0, 2.0, 4.0])}, r
    return {x["rank_now"]: i for i, x in r.items()}, r[0]["epoch_now"]


def test_sigkill_idle_peer(cluster: Cluster) -> None:
    """Killed between ops; the survivors' next op starts once they know (from the
    master) that the group re-formed: it runs over the 2 survivors, no error."""
    by_rank, epoch_before = form_ring(cluster)
    victim = by_rank[1]
    survivors = {i: float(i + 1) for i in by_rank.values() if i != victim}

    cluster.kill(victim)
    seen = cluster.call({i: {"cmd": "wait_world", "world": 2} for i in survivors})
    assert all(r["ok"] and r["epoch_now"] > epoch_before for r in seen.values()), seen
    first = cluster.call({i: ar(N_ELEMS, c) for i, c in survivors.items()})
    assert assert_same_outcome(first, survivors), first
    assert_recovered(first, survivors, epoch_before)
    again = cluster.call({i: ar(N_ELEMS, c + 10, retry=True) for i, c in survivors.items()})
    assert_recovered(again, {i: c + 10 for i, c in survivors.items()}, epoch_before)


PROMPT = 4.0  # seconds: a failure must surface well before the op timeout
SHORT_OP = 8.0  # op timeout of the ops that must fail promptly


def test_sigkill_idle_peer_before_the_master_notices(cluster: Cluster, master: pccl.Master) -> None:
    """Killed between ops; both survivors post their next op before the master has
    announced the new epoch (on a WAN the master's news always lags). Both must get
    the same outcome, promptly: here the op cannot succeed in the old ring, so both
    raise PeerLost with their input intact. The survivor whose ring successor was the
    victim must not sit in a reconnect loop to a dead address until the timeout."""
    by_rank, epoch_before = form_ring(cluster)
    victim = by_rank[2]
    survivors = {by_rank[0]: 1.0, by_rank[1]: 2.0}  # rank 1 sends to the victim
    with master_paused(master):
        cluster.kill(victim)
        cid = cluster.send({i: ar(N_ELEMS, c, timeout=SHORT_OP, announce=True) for i, c in survivors.items()})
        for i in survivors:
            cluster.expect(
                lambda r, i=i: r.get("id") == cid and r.get("phase") == "calling" and r["index"] == i, 30
            )
        time.sleep(0.3)  # master latency: the survivors post their ops in the old epoch meanwhile
    first = cluster.results(cid, list(survivors), timeout=SHORT_OP + 30)
    summary = {i: (r["ok"], r.get("error"), round(r["elapsed"], 2)) for i, r in first.items()}
    assert_same_outcome(first, {i: c for i, c in survivors.items()})
    slow = {i: s for i, s in summary.items() if s[2] > PROMPT}
    assert not slow, f"survivors blocked until the op timeout ({SHORT_OP}s) after a crash: {summary}"

    again = cluster.call({i: ar(N_ELEMS, c + 10, retry=True) for i, c in survivors.items()})
    assert_recovered(again, {i: c + 10 for i, c in survivors.items()}, epoch_before)


def test_sigkill_idle_peer_survivors_in_different_epochs(cluster: Cluster, master: pccl.Master) -> None:
    """Killed between ops; survivor A posts the next op before the master announced the
    new epoch (it fails: PeerLost), survivor B posts the same op (same tag, same step)
    just after (so in the new epoch). One op, two survivors: they must get the same
    outcome, and B must not wait for A until its timeout."""
    by_rank, epoch_before = form_ring(cluster)
    victim = by_rank[2]
    a, b = by_rank[0], by_rank[1]  # a receives from the victim: its op fails at once
    coefs = {a: 1.0, b: 2.0}
    with master_paused(master):
        cluster.kill(victim)
        cid = cluster.send({a: ar(N_ELEMS, coefs[a], timeout=SHORT_OP, announce=True)})
        cluster.expect(lambda r: r.get("id") == cid and r.get("phase") == "calling", 30)
        time.sleep(0.3)  # master latency: a posts its op in the old epoch meanwhile
    res_a = cluster.results(cid, [a], timeout=SHORT_OP + 30)[a]
    assert cluster.call({b: {"cmd": "wait_world", "world": 2}})[b]["ok"]
    res_b = cluster.call({b: ar(N_ELEMS, coefs[b], timeout=SHORT_OP)}, timeout=SHORT_OP + 30)[b]
    summary = {
        i: (r["ok"], r.get("error"), round(r["elapsed"], 2), r.get("message", "")[:80])
        for i, r in ((a, res_a), (b, res_b))
    }
    assert res_a["ok"] == res_b["ok"] and res_a.get("error") == res_b.get("error"), (
        f"survivors disagree: {summary}"
    )
    assert_same_outcome({a: res_a, b: res_b}, coefs)
    assert res_b["elapsed"] < PROMPT, (
        f"the late survivor waited for an op the group had already failed: {summary}"
    )

    again = cluster.call({i: ar(N_ELEMS, c + 10, retry=True) for i, c in coefs.items()})
    assert_recovered(again, {i: c + 10 for i, c in coefs.items()}, epoch_before)


def test_sigkill_mid_all_reduce() -> None:
    """Back-to-back 16 MiB all-reduces (retry=False) on 3 peers; peer 2 is killed after a
    few ops. Survivors agree op by op; the failed op (if the kill hit one) raised
    PeerLost with the input intact; the retry runs over the 2 survivors exactly."""
    world, victim, survivors = 3, 2, (0, 1)
    with pccl.Master() as m, Cluster(m.address, loop_worker, world=world, elements=BIG, max_ops=100) as c:
        for i in range(world):
            c.start(i)
        seen = c.collect(
            lambda recs: sum(r.get("event") == "ready" for r in recs) == world, 90, "peers ready"
        )
        epoch_before = max(r["epoch_now"] for r in seen if r.get("event") == "ready")
        # Kill once every peer finished op 2 (they are then inside, or entering, op 3).
        c.collect(
            lambda recs: {r["index"] for r in recs if r.get("op") == 2} == set(range(world)), 60, "op 2"
        )
        t_kill = time.time()
        c.kill(victim)
        seen = c.collect(
            lambda recs: {r["index"] for r in recs if r.get("recovery")} >= set(survivors), 60, "recovery"
        )
        ops = per_op(seen, survivors)
        check_outcome_agreement(ops, survivors, victim)
        recovery = {r["index"]: r for r in seen if r.get("recovery") and r["index"] in survivors}
        rec_op = recovery[survivors[0]]["op"]
        assert all(r["op"] == rec_op for r in recovery.values()), recovery
        coefs = {i: loop_coef(i, rec_op) for i in survivors}
        assert_recovered(recovery, coefs, epoch_before, n=BIG, live=False)
        last = ops[rec_op]
        hit = not last[survivors[0]]["ok"]
        # Either the kill failed op `rec_op` everywhere, or that op ran without the victim.
        assert hit or all(r["world"] == world - 1 for r in last.values()), last
        print(
            f"kill {'failed an op in flight' if hit else 'landed between ops'}; "
            f"recovered {max(r['t_end'] for r in recovery.values()) - t_kill:.3f}s after the kill"
        )


def test_sigkill_mid_update_topology(cluster: Cluster, master: pccl.Master) -> None:
    """Peers 0, 1, 2 admitted, joiner 3 pending; 0 and 1 are blocked in update_topology()
    (waiting for 2's vote) when 2 is killed. 0 and 1 must get the same outcome; the
    group re-forms without 2 (and, here, with the joiner), and a retry=True all-reduce
    runs over exactly the live members."""
    founders = cluster.form([0, 1, 2])
    epoch_before = max(r["epoch_now"] for r in founders.values())
    cluster.start(3)
    pend = cluster.call({i: {"cmd": "pending_until"} for i in (0, 1, 2)})
    assert all(r["ok"] for r in pend.values()), pend
    peer_ids = {i: r["peer"] for i, r in founders.items()}

    cid = cluster.send(
        {0: {"cmd": "update_topology", "timeout": 30.0}, 1: {"cmd": "update_topology", "timeout": 30.0}}
    )
    wait_for_votes(master, {peer_ids[0], peer_ids[1]})  # both blocked in the vote, 2 has not voted
    cluster.kill(2)

    upd = cluster.results(cid, [0, 1], timeout=60)
    oks = {i: r["ok"] for i, r in upd.items()}
    assert len(set(oks.values())) == 1, f"survivors disagree on update_topology(): {upd}"
    if not all(oks.values()):
        for r in upd.values():
            assert r["pccl_error"], r
        # The vote failed everywhere; the survivors vote again to let the joiner in.
        upd = cluster.call({0: {"cmd": "update_topology"}, 1: {"cmd": "update_topology"}})
        assert all(r["ok"] for r in upd.values()), upd
    joined = cluster.connected([3], timeout=30)
    members = (0, 1, 3)
    state = {**upd, 3: joined[3]}
    for i in members:
        assert state[i]["world_now"] == 3, state
        assert state[i]["epoch_now"] > epoch_before, state

    coefs = {0: 1.0, 1: 2.0, 3: 8.0}
    r = cluster.call({i: ar(N_ELEMS, c, retry=True) for i, c in coefs.items()})
    assert_recovered(r, coefs, epoch_before)


# ---------------------------------------------------------------------- SIGSTOP


HB = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
OP_TIMEOUT = 10.0


def test_sigstop_peer_is_evicted_and_fails_after_resume() -> None:
    world, victim, survivors = 3, 2, (0, 1)
    cfg = pccl.Config(**HB)
    kwargs = {
        "world": world,
        "elements": 1 << 16,
        "max_ops": 10_000,
        "retry": True,
        "config": HB,
        "op_timeout": OP_TIMEOUT,
    }
    with pccl.Master(config=cfg) as m, Cluster(m.address, loop_worker, **kwargs) as c:
        for i in range(world):
            c.start(i)
        seen = c.collect(
            lambda recs: {r["index"] for r in recs if r.get("op") == 3} == set(range(world)), 90, "op 3"
        )
        epoch_before = max(r["epoch_now"] for r in seen if r.get("event") == "ready")
        c.stop(victim)
        t_stop = time.time()
        seen = c.collect(
            lambda recs: {r["index"] for r in recs if r.get("recovery")} >= set(survivors), 30, "recovery"
        )
        ops = per_op(seen, survivors)
        check_outcome_agreement(ops, survivors, victim)
        # retry=True: no op fails on a survivor; the first op without the victim ends
        # within heartbeat_timeout + a few seconds of the stop.
        for recs in ops.values():
            for r in recs.values():
                assert r["ok"], f"retry=True all-reduce raised on a survivor: {r}"
        shrunk = [
            r for r in seen if r.get("index") in survivors and r.get("ok") and r.get("world") == world - 1
        ]
        detect = min(r["t_end"] for r in shrunk) - t_stop
        assert detect <= HB["heartbeat_timeout"] + 3.0, f"stalled peer found after {detect:.2f}s"
        recovery = {r["index"]: r for r in seen if r.get("recovery") and r["index"] in survivors}
        rec_op = recovery[survivors[0]]["op"]
        assert_recovered(
            recovery, {i: loop_coef(i, rec_op) for i in survivors}, epoch_before, n=1 << 16, live=False
        )

        # The stopped peer wakes up evicted: its calls raise, they do not hang.
        t_resume = time.time()
        c.resume(victim)
        seen = c.collect(
            lambda recs: any(r.get("index") == victim and r.get("recovery") for r in recs),
            2 * OP_TIMEOUT + 10,
            "victim",
        )
        victim_recs = [r for r in seen if r.get("index") == victim and "ok" in r and r["t_end"] > t_stop]
        for r in victim_recs:
            if r["ok"]:
                # Its op in flight may have succeeded before the stop (every report was
                # in): then it is the survivors' op of the same step, same bytes.
                same = ops[r["op"]]
                assert all(
                    s["ok"] and s["epoch"] == r["epoch"] and s["crc"] == r["crc"] for s in same.values()
                ), (r, same)
                assert r["t_start"] < t_stop, f"an evicted peer's call succeeded: {r}"
            else:
                assert r["pccl_error"], r
        # Its calls started after the resume must fail promptly: it already knows it
        # was evicted, so blocking until the op timeout is a hang by another name.
        late = [r for r in victim_recs if r["t_start"] >= t_resume]
        assert late and not any(r["ok"] for r in late), f"an evicted peer's call succeeded: {victim_recs}"
        slow = [
            (r["error"], r["message"], round(r["t_end"] - r["t_start"], 2))
            for r in late
            if r["t_end"] - r["t_start"] > PROMPT
        ]
        assert not slow, f"an evicted peer's all_reduce blocked until its {OP_TIMEOUT}s timeout: {slow}"
        raised = [r.get("error", "ok") for r in victim_recs]
        print(f"stalled peer detected after {detect:.3f}s; the evicted peer raised {raised}")


# ---------------------------------------------------------------------- helpers


def per_op(records: list[dict[str, Any]], survivors: tuple[int, ...]) -> dict[int, dict[int, dict[str, Any]]]:
    """{op index: {survivor: its (non-recovery) record}}."""
    ops: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if "op" in r and not r.get("recovery") and r["index"] in survivors:
            ops[r["op"]][r["index"]] = r
    return dict(ops)


def check_outcome_agreement(
    ops: dict[int, dict[int, dict[str, Any]]], survivors: tuple[int, ...], victim: int
) -> None:
    """Op by op: every survivor ran it, all with the same status; successes hold the
    same bytes (the exact sum of the contributors); failures are PeerLost, input intact."""
    for op, recs in sorted(ops.items()):
        assert set(recs) == set(survivors), f"op {op}: not every survivor reported it: {recs}"
        world = recs[survivors[0]].get("world")
        contributors = list(survivors) + ([victim] if world == len(survivors) + 1 else [])
        assert_same_outcome(recs, {i: loop_coef(i, op) for i in contributors}, n=recs[survivors[0]]["n"])


def wait_for_votes(master: pccl.Master, voters: set[int], timeout: float = 30.0) -> None:
    """Waits until the master has recorded the topology votes of `voters` (white box:
    the in-process master's membership state; read-only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        votes = {pid for g in master.status()["groups"].values() for pid in g["votes"]}
        if voters <= votes:
            return
        time.sleep(0.005)
    raise AssertionError(f"the master did not record the votes of {voters} within {timeout}s")
