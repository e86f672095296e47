"""The churn harness: its invariant checker on hand-made records (each invariant fires on
its violation and stays quiet on clean records), a short churn scenario that must end
with zero violations (the CI run), and runs against deliberately broken peers that
must be caught."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from stress.invariants import Params, alive_intervals, check
from stress.orchestrator import Scenario, run_scenario
from stress.peer import contribution, digest, expected_sum

P1, P2, P3 = 11, 22, 33  # process ids
A, B, C = 1001, 2002, 3003  # peer ids


def _end(pid: int, ts: float, op_id: int, tag: int, step: int, contributors: list[int], epoch: int = 2,
         elements: int = 4096, result: str | None = None) -> dict:
    if result is None:
        result = digest(expected_sum(contributors, tag, step, elements))
    return {"ts": ts, "pid": pid, "event": "end", "id": op_id, "what": "allreduce", "tag": tag, "step": step,
            "ok": True, "epoch": epoch, "contributors": contributors, "digest": result, "elements": elements,
            "tx_bytes": 100}


def clean_run() -> tuple[list[dict], list[dict]]:
    """Three peers, 20 steps of one all-reduce plus one sync each, all consistent."""
    records: list[dict] = []
    faults = [{"ts": 0.0, "kind": "start", "pid": p, "slot": i} for i, p in enumerate((P1, P2, P3))]
    for pid, peer in ((P1, A), (P2, B), (P3, C)):
        records.append({"ts": 0.5, "pid": pid, "event": "connected", "peer": peer})
    t = 1.0
    for step in range(20):
        for n, (pid, _) in enumerate(((P1, A), (P2, B), (P3, C))):
            records.append({"ts": t, "pid": pid, "event": "begin", "id": 2 * step, "what": "sync", "tag": -1, "step": step})
            records.append({"ts": t + 0.01, "pid": pid, "event": "end", "id": 2 * step, "what": "sync", "ok": True,
                            "rx_bytes": 0, "tx_bytes": 0})
            records.append({"ts": t + 0.01, "pid": pid, "event": "synced", "revision": step, "hash": f"h{step}"})
            records.append({"ts": t + 0.02, "pid": pid, "event": "begin", "id": 2 * step + 1, "what": "allreduce",
                            "tag": 0, "step": step})
            records.append({"ts": t + 0.03, "pid": pid, "event": "op", "epoch": 2, "tag": 0, "seq": step << 8, "ok": True})
            records.append(_end(pid, t + 0.04 + n * 0.001, 2 * step + 1, 0, step, [A, B, C]))
        t += 1.0
    faults.append({"ts": t + 1, "kind": "run_end"})
    return sorted(records, key=lambda r: r["ts"]), faults


def kinds(violations: list[dict]) -> set[str]:
    return {v["invariant"] for v in violations}


def test_expected_sum_is_the_exact_reduction() -> None:
    peers = [5, 77, 123456789]
    for elements in (1, 7, 4096, 5000, 1 << 18):
        by_hand = sum(contribution(p, 2, 9, elements).astype("float64") for p in peers).astype("float32")
        assert (expected_sum(peers, 2, 9, elements) == by_hand).all()


def test_clean_records_have_no_violations() -> None:
    records, faults = clean_run()
    violations, counts = check(records, faults, Params(window=5.0))
    assert violations == []
    assert counts["allreduce_ok"] == 60 and counts["syncs_ok"] == 60 and counts["revisions_synced"] == 20


def test_disagreeing_outcome_is_caught() -> None:
    records, faults = clean_run()
    op = next(r for r in records if r["event"] == "op" and r["pid"] == P2)
    op.update(ok=False, kind="PeerLost")
    violations, _ = check(records, faults, Params(window=5.0))
    assert kinds(violations) == {"outcome_agreement"}
    assert violations[0]["op"] == [op["epoch"], op["tag"], op["seq"]]


def test_same_op_key_in_another_group_life_is_not_a_disagreement() -> None:
    """A group founded afresh (a master nobody came back to) numbers epochs and ops
    from the start again: the same (epoch, tag, seq) with another ring is another op."""
    records, faults = clean_run()
    for r in records:
        if r["event"] == "op":
            r["ring"] = [A, B, C]
    later = [{"ts": 50.0, "pid": 44, "event": "op", "epoch": 2, "tag": 0, "seq": 0, "ok": False,
              "kind": "PeerLost", "ring": [7, 8]}]
    violations, _ = check(records + later, faults, Params(window=5.0))
    assert violations == []
    same_ring = [dict(later[0], ring=[A, B, C])]
    violations, _ = check(records + same_ring, faults, Params(window=5.0))
    assert kinds(violations) == {"outcome_agreement"}


def test_call_reported_ok_by_one_and_failed_by_another_is_caught() -> None:
    records, faults = clean_run()
    end = next(r for r in records if r["event"] == "end" and r["what"] == "allreduce" and r["pid"] == P3)
    end.update(ok=False, kind="PeerLost")
    violations, _ = check(records, faults, Params(window=5.0))
    assert "outcome_agreement" in kinds(violations)


def test_step_retried_after_a_mismatch_in_the_same_epoch_is_not_a_disagreement() -> None:
    """A CollectiveMismatch ends the calls of some peers while the others were in
    another collective; the whole group then runs the step again in the same epoch."""
    records, faults = clean_run()
    end = next(r for r in records if r["event"] == "end" and r["what"] == "allreduce" and r["pid"] == P3)
    ring = sorted(end["contributors"])
    failed = dict(end, ok=False, kind="CollectiveMismatch", ring=ring, ts=end["ts"] - 0.01)
    del failed["contributors"]
    at = records.index(end)
    violations, _ = check(records[:at] + [failed] + records[at:], faults, Params(window=5.0))
    assert violations == []
    # The same failure as the peer's last word on the call is a disagreement.
    violations, _ = check(records[:at + 1] + [failed] + records[at + 1:], faults, Params(window=5.0))
    assert kinds(violations) == {"outcome_agreement"}


def test_wrong_result_is_caught() -> None:
    records, faults = clean_run()
    end = [r for r in records if r["event"] == "end" and r["what"] == "allreduce"][7]
    end["contributors"] = [A, B]  # claims two contributors, but the bytes hold three
    violations, _ = check(records, faults, Params(window=5.0))
    assert kinds(violations) == {"correctness"}
    assert violations[0]["pid"] == end["pid"] and violations[0]["step"] == end["step"]


def test_divergent_state_is_caught() -> None:
    records, faults = clean_run()
    synced = [r for r in records if r["event"] == "synced" and r["revision"] == 4]
    synced[1]["hash"] = "other"
    violations, _ = check(records, faults, Params(window=5.0))
    assert kinds(violations) == {"bit_parity"}
    assert violations[0]["revision"] == 4


def test_a_group_founded_afresh_numbers_its_revisions_again() -> None:
    """Every member gone, the master restarted: new peers found the group again at
    epoch 1 and revision 0 with their own state. Its revision 4 is not the old one's."""
    records, faults = clean_run()
    end = max(r["ts"] for r in records)
    later = [{"ts": end + 1.0, "pid": 99, "source": "master", "event": "epoch", "group": 0, "epoch": 1,
              "ring": [7, 8], "reason": "first peers of the group"}]
    later += [{"ts": end + 2.0, "pid": pid, "event": "synced", "revision": 4, "hash": "another life", "peer": pid,
               "epoch": 1, "world": 2, "step": 4} for pid in (44, 45)]
    violations, _ = check(records + later, faults, Params(window=5.0))
    assert "bit_parity" not in kinds(violations)
    # Within one life, the same revision with another hash is still caught.
    later[2]["hash"] = "diverged"
    violations, _ = check(records + later, faults, Params(window=5.0))
    assert {v["invariant"] for v in violations if v["invariant"] == "bit_parity"} == {"bit_parity"}


def test_a_restarted_master_that_hears_no_revision_numbers_them_again() -> None:
    """A joiner admitted, then the master and the last member that held the state die
    before the joiner synced: the restarted master hears no revision from it and
    numbers from 0 again, with the joiner's state. Its revision 0 is not the old one's."""
    records, faults = clean_run()
    end = max(r["ts"] for r in records)
    master_sync = {"pid": 99, "source": "master", "event": "sync", "group": 0, "ok": True}
    later = [{**master_sync, "ts": end + 0.5, "revision": 7, "peers": [A]}]
    later += [{**master_sync, "ts": end + 0.7, "ok": False, "error": "a source failed"}]  # no revision
    later += [{**master_sync, "ts": end + 1.0, "revision": 0, "peers": [C]}]
    later += [{"ts": end + 1.1, "pid": pid, "event": "synced", "revision": 0, "hash": "the joiner's", "peer": pid,
               "epoch": 9, "world": 1, "step": 0} for pid in (44, 45)]
    violations, _ = check(records + later, faults, Params(window=5.0))
    assert "bit_parity" not in kinds(violations)
    later[4]["hash"] = "diverged"  # within the new life, still caught
    violations, _ = check(records + later, faults, Params(window=5.0))
    assert [v["revision"] for v in violations if v["invariant"] == "bit_parity"] == [0]


def test_op_that_never_ends_is_caught_unless_its_process_was_killed() -> None:
    records, faults = clean_run()
    last_end = max(i for i, r in enumerate(records) if r["event"] == "end" and r["pid"] == P1)
    dropped = records.pop(last_end)
    violations, _ = check(records, faults, Params(window=5.0))
    assert kinds(violations) == {"liveness"} and violations[0]["pid"] == P1
    killed = faults + [{"ts": dropped["ts"], "kind": "kill", "pid": P1, "slot": 0}]
    violations, _ = check(records, killed, Params(window=5.0))
    assert violations == []


def test_slow_op_is_caught_but_time_stopped_is_allowed() -> None:
    records, faults = clean_run()
    end = next(r for r in records if r["event"] == "end" and r["pid"] == P2 and r["what"] == "allreduce")
    end["ts"] += 40.0  # longer than op_timeout + slack
    records.sort(key=lambda r: r["ts"])
    params = Params(op_timeout=30.0, slack=5.0, window=100.0)
    violations, _ = check(records, faults, params)
    assert kinds(violations) == {"liveness"}
    stalled = faults + [{"ts": end["ts"] - 39.0, "kind": "stall", "pid": P2, "slot": 1, "seconds": 20.0}]
    violations, _ = check(records, stalled, params)
    assert violations == []


def test_stalled_group_is_caught_by_the_window() -> None:
    records, faults = clean_run()
    # No all-reduce completes between t=5 and t=12 while three peers are alive.
    records = [r for r in records if not (r["event"] == "end" and r["what"] == "allreduce" and 5 < r["ts"] < 12)]
    records = [r for r in records if not (r["event"] == "begin" and r["what"] == "allreduce" and 5 < r["ts"] < 12)]
    violations, _ = check(records, faults, Params(window=5.0))
    assert kinds(violations) == {"liveness"}
    # With fewer than two peers alive there is no progress to demand.
    lonely = faults + [{"ts": 4.5, "kind": "kill", "pid": P2, "slot": 1}, {"ts": 4.5, "kind": "kill", "pid": P3, "slot": 2}]
    trimmed = [r for r in records if not (r["pid"] in (P2, P3) and r["ts"] > 4.5)]
    violations, _ = check(trimmed, lonely, Params(window=5.0))
    assert violations == []


def test_alive_count_follows_stalls_and_evictions() -> None:
    records = [
        {"ts": 1.0, "pid": P1, "event": "connected"},
        {"ts": 1.0, "pid": P2, "event": "connected"},
        {"ts": 4.0, "pid": P2, "event": "evicted"},
        {"ts": 5.0, "pid": P2, "event": "connected"},
    ]
    faults = [{"ts": 2.0, "kind": "stall", "pid": P1, "seconds": 1.0}, {"ts": 6.0, "kind": "kill", "pid": P1}]
    assert [n for _, n in alive_intervals(records, faults)] == [1, 2, 1, 2, 1, 2, 1]


# ---------------------------------------------------------------------- end to end


def test_short_churn_scenario_has_no_violations(tmp_path: Path) -> None:
    """The CI scenario: 4 peers, every fault kind of a peer, about a minute."""
    summary = run_scenario(Scenario(seconds=50, seed=7, fault_every=2.5), str(tmp_path))
    assert summary["violations"] == 0, summary["violation_details"]
    faults = summary["faults"]
    assert sum(faults.values()) >= 8, faults
    assert summary["allreduce_ok"] > 100 and summary["syncs_ok"] > 30
    assert summary["state_bytes_received"] > 0  # joiners received the state


@pytest.mark.parametrize(
    ("bug", "invariant"),
    [("corrupt_after_sync", "bit_parity"), ("wrong_result", "correctness")],
)
def test_harness_catches_a_broken_peer(tmp_path: Path, bug: str, invariant: str) -> None:
    scenario = Scenario(seconds=15, seed=3, bug=bug, fault_every=4.0,
                        weights={"kill": 0, "stall": 0, "leave": 0, "join": 1, "restart": 0, "master_restart": 0})
    summary = run_scenario(copy.deepcopy(scenario), str(tmp_path))
    found = {v["invariant"] for v in summary["violation_details"]}
    assert invariant in found, summary["violation_details"][:5]
    assert found == {invariant}, summary["violation_details"][:5]
