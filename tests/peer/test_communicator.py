"""Communicator happy paths, with real peer processes (tests/peer_workers.py) around
an in-process master: admission of a joiner, the agreed pending_peers() answer,
graceful leave, groups side by side, concurrent tagged ops, shape mismatch, torch
tensors, AVG, out-of-place.

Every peer reports records (checksums of the result bytes, info fields, errors); the
test recomputes the exact expected bytes from the deterministic inputs
(peer_workers.make_input) and compares. Every wait is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peer_workers import Cluster, checksum, make_input, master_paused

import pccl_py as pccl

pytestmark = pytest.mark.timeout(180)

N_ELEMS = 10_000  # not a multiple of the world size: uneven ring chunks


def expected_crc(n: int, coef: float, kind: str = "numpy:float32") -> int:
    """Checksum of make_input(n, coef) in `kind` ("numpy:<dtype>" / "torch:<dtype>"):
    the exact result of a SUM (coef = sum of the peers' coefs) or an AVG."""
    lib, _, dtype = kind.partition(":")
    if lib == "numpy":
        return checksum(make_input(n, coef, dtype))
    return checksum(torch.from_numpy(make_input(n, coef, "float32")).to(getattr(torch, dtype)))


def assert_all_ok(results: dict[int, dict[str, Any]]) -> None:
    bad = {i: r for i, r in results.items() if not r["ok"]}
    assert not bad, f"calls failed: {bad}"


def all_reduce_cmds(coefs: dict[int, float], **kw: Any) -> dict[int, dict[str, Any]]:
    return {i: {"cmd": "all_reduce", "n": N_ELEMS, "coef": c, **kw} for i, c in coefs.items()}


@pytest.fixture(scope="module")
def torch_pair() -> Iterator[Cluster]:
    """Two peers with torch imported (importing torch costs seconds of CPU per process,
    so only these two pay it)."""
    with pccl.Master() as m, Cluster(m.address, preload_torch=True) as c:
        c.form([0, 1])
        yield c


@pytest.fixture(scope="module")
def trio() -> Iterator[Cluster]:
    """Three peers in group 0, shared by the tests that only run collectives."""
    with pccl.Master() as m, Cluster(m.address) as c:
        c.form([0, 1, 2])
        yield c


# ---------------------------------------------------------------------- membership


def test_joiner_is_admitted_at_next_update_topology_and_reduces(cluster: Cluster) -> None:
    founders = cluster.form([0, 1])
    assert founders[0]["world_now"] == 1 and founders[1]["world_now"] == 2
    # The founders have already run ops with tag 0: the joiner must still line up.
    for step in range(2):
        r = cluster.call(all_reduce_cmds({0: 1.0 + step, 1: 2.0}))
        assert_all_ok(r)
        assert {r[i]["crc"] for i in r} == {expected_crc(N_ELEMS, 3.0 + step)}
    epoch_before = r[0]["epoch_now"]

    cluster.start(2)  # blocks in connect() until the founders admit it
    pend = cluster.call({0: {"cmd": "pending_until"}, 1: {"cmd": "pending_until"}}, timeout=60)
    assert_all_ok(pend)
    # pending_peers() is agreed: every round of the query gets the same answer on
    # every admitted peer (so both leave the polling loop at the same round).
    assert pend[0]["answers"] == pend[1]["answers"], pend
    assert pend[0]["answers"][-1] == 1
    # Nobody was admitted by merely asking.
    assert pend[0]["world_now"] == pend[1]["world_now"] == 2

    upd = cluster.call({0: {"cmd": "update_topology"}, 1: {"cmd": "update_topology"}})
    assert_all_ok(upd)
    joined = cluster.connected([2], timeout=30)[2]
    for rec in (upd[0], upd[1], joined):
        assert rec["world_now"] == 3, rec
        assert rec["epoch_now"] > epoch_before, rec
    assert upd[0]["epoch_now"] == upd[1]["epoch_now"] == joined["epoch_now"]
    assert sorted(r["rank_now"] for r in (upd[0], upd[1], joined)) == [0, 1, 2]

    # After admission nobody is pending any more: the same answer on all three.
    pend = cluster.call({i: {"cmd": "pending_once"} for i in range(3)})
    assert_all_ok(pend)
    assert [pend[i]["answer"] for i in range(3)] == [0, 0, 0], pend

    for step in range(2):
        r = cluster.call(all_reduce_cmds({0: 1.0, 1: 2.0, 2: 4.0 + step}, timeout=20.0), timeout=60)
        assert_all_ok(r)
        for rec in r.values():
            assert rec["world"] == 3, rec
            assert rec["crc"] == expected_crc(N_ELEMS, 7.0 + step), rec


@pytest.mark.parametrize("when", ["between_ops", "during_op", "before_the_master_notices"])
def test_graceful_leave_is_invisible_to_the_survivors(
    cluster: Cluster, master: pccl.Master, when: str
) -> None:
    """Peer 2 close()s; the survivors' next all_reduce (retry=False) succeeds over the
    two of them, exactly, promptly: the runtime re-runs ops that failed only because a
    peer left gracefully.
      between_ops: the survivors call after they know the group re-formed;
      during_op: they are already inside the op (which needs peer 2) when it leaves;
      before_the_master_notices: they call while the master has not yet announced the
        new ring (on a WAN its news always lags), so they start in the old ring."""
    cluster.form([0, 1, 2])
    r = cluster.call(all_reduce_cmds({0: 1.0, 1: 2.0, 2: 4.0}))
    assert_all_ok(r)
    assert {rec["crc"] for rec in r.values()} == {expected_crc(N_ELEMS, 7.0)}
    epoch_before = r[0]["epoch_now"]

    timeout = 8.0
    survivors = all_reduce_cmds({0: 1.0, 1: 2.0}, timeout=timeout, announce=True)
    if when == "between_ops":
        assert_all_ok(cluster.call({2: {"cmd": "close"}}))
        assert_all_ok(cluster.call({i: {"cmd": "wait_world", "world": 2} for i in (0, 1)}))
        cid = cluster.send(survivors)
    elif when == "during_op":
        # The op cannot complete without peer 2: it fails only because of the leave.
        cid = cluster.send(survivors)
        for i in survivors:
            cluster.expect(
                lambda rec, i=i: rec.get("index") == i and rec.get("phase") == "calling",
                30,
                f"peer {i} calling",
            )
        assert_all_ok(cluster.call({2: {"cmd": "close"}}))
    else:
        with master_paused(master):
            assert_all_ok(cluster.call({2: {"cmd": "close"}}))
            cid = cluster.send(survivors)
            for i in survivors:
                cluster.expect(
                    lambda rec, i=i: rec.get("index") == i and rec.get("phase") == "calling",
                    30,
                    f"peer {i} calling",
                )
            time.sleep(0.3)  # master latency: the survivors post their ops in the old ring meanwhile
    r = cluster.results(cid, [0, 1], timeout=timeout + 30)
    summary = {
        i: (rec["ok"], rec.get("error"), round(rec["elapsed"], 2), rec.get("attempts"), rec.get("message", "")[:300])
        for i, rec in r.items()
    }
    print(f"graceful leave {when}: (ok, error, seconds, attempts) {summary}")
    assert_all_ok(r)  # retry=False: a graceful leave never surfaces as an error
    for rec in r.values():
        assert rec["world"] == 2, rec
        assert rec["crc"] == expected_crc(N_ELEMS, 3.0), rec
        assert rec["world_now"] == 2 and rec["epoch_now"] > epoch_before, rec
        assert rec["elapsed"] < 4.0, f"the survivors stalled after a graceful leave: {summary}"

    r = cluster.call(all_reduce_cmds({0: 5.0, 1: 6.0}))
    assert_all_ok(r)
    assert {(rec["world"], rec["crc"]) for rec in r.values()} == {(2, expected_crc(N_ELEMS, 11.0))}


def test_two_groups_on_one_master_do_not_mix(cluster: Cluster) -> None:
    cluster.form([0, 1], group=0)
    cluster.form([2, 3], group=1)
    coefs = {0: 1.0, 1: 2.0, 2: 10.0, 3: 20.0}
    for step in range(3):
        # Same epochs, tags and steps in both groups: only the group keeps them apart.
        r = cluster.call(all_reduce_cmds({i: c + step for i, c in coefs.items()}, timeout=20.0), timeout=60)
        assert_all_ok(r)
        for i in (0, 1):
            assert r[i]["world"] == 2 and r[i]["crc"] == expected_crc(N_ELEMS, 3.0 + 2 * step), r[i]
        for i in (2, 3):
            assert r[i]["world"] == 2 and r[i]["crc"] == expected_crc(N_ELEMS, 30.0 + 2 * step), r[i]
    assert all(rec["world_now"] == 2 for rec in r.values())


def test_mismatched_element_counts_raise_on_every_peer(cluster: Cluster) -> None:
    cluster.form([0, 1])
    timeout = 10.0
    r = cluster.call(
        {
            0: {"cmd": "all_reduce", "n": 1000, "coef": 1.0, "timeout": timeout},
            1: {"cmd": "all_reduce", "n": 1001, "coef": 2.0, "timeout": timeout},
        },
        timeout=timeout + 30,
    )
    for rec in r.values():
        assert not rec["ok"], f"a mismatched all-reduce succeeded: {rec}"
        assert rec["pccl_error"], rec
        assert rec["error"] != "Timeout", f"mismatch was only caught by the op timeout (a hang): {rec}"
        assert rec["error"] == "ProtocolError", rec
        assert rec["elapsed"] < timeout, rec
        assert rec["intact"], rec
    # Bad input does not break the group: a matching op works afterwards.
    r = cluster.call(all_reduce_cmds({0: 1.0, 1: 2.0}, timeout=20.0))
    assert_all_ok(r)
    assert {(rec["world"], rec["crc"]) for rec in r.values()} == {(2, expected_crc(N_ELEMS, 3.0))}


# ---------------------------------------------------------------------- collectives


def test_sum_is_exact_and_identical_everywhere(trio: Cluster) -> None:
    r = trio.call(all_reduce_cmds({0: 1.0, 1: 2.0, 2: 4.0}))
    assert_all_ok(r)
    for rec in r.values():
        assert rec["world"] == 3 and rec["attempts"] == 1, rec
        assert rec["crc"] == expected_crc(N_ELEMS, 7.0), rec
        assert rec["head"] == [7.0, 14.0, 21.0, 28.0], rec


def test_three_concurrent_tagged_async_all_reduces(trio: Cluster) -> None:
    n = 1 << 18
    tags = [1, 2, 3]
    cmds = {}
    for i in range(3):
        order = tags[i:] + tags[:i]  # each peer starts the tags in a different order
        cmds[i] = {"cmd": "async_tags", "n": n, "tags": [(t, float((i + 1) * 10 ** (t - 1))) for t in order]}
    r = trio.call(cmds, timeout=90)
    for i, rec in r.items():
        assert rec["ok"], rec
        assert sorted(rec["results"]) == tags, rec
        for t in tags:
            res = rec["results"][t]
            assert res["world"] == 3, (i, t, res)
            assert res["crc"] == expected_crc(n, 6.0 * 10 ** (t - 1)), (i, t, res)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["SUM", "AVG"])
def test_torch_cpu_tensors(torch_pair: Cluster, dtype: str, op: str) -> None:
    kind = f"torch:{dtype}"
    r = torch_pair.call(all_reduce_cmds({0: 1.0, 1: 2.0}, kind=kind, op=op))
    assert_all_ok(r)
    for rec in r.values():
        assert rec["world"] == 2, rec
        assert rec["crc"] == expected_crc(N_ELEMS, 3.0 if op == "SUM" else 1.5, kind), rec


def test_avg_divides_by_world_size(trio: Cluster) -> None:
    r = trio.call(all_reduce_cmds({0: 1.0, 1: 2.0, 2: 6.0}, op="AVG"))
    assert_all_ok(r)
    for rec in r.values():
        assert rec["world"] == 3, rec
        assert rec["crc"] == expected_crc(N_ELEMS, 3.0), rec
        assert rec["head"] == [3.0, 6.0, 9.0, 12.0], rec


def test_out_of_place_leaves_input_unchanged(trio: Cluster) -> None:
    coefs = {0: 1.0, 1: 2.0, 2: 4.0}
    r = trio.call(all_reduce_cmds(coefs, out_of_place=True))
    assert_all_ok(r)
    for i, rec in r.items():
        assert rec["world"] == 3, rec
        assert rec["crc"] == expected_crc(N_ELEMS, 7.0), rec
        assert rec["x_crc"] == rec["input_crc"] == expected_crc(N_ELEMS, coefs[i]), rec


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_out_of_place_leaves_input_unchanged(torch_pair: Cluster, dtype: str) -> None:
    kind = f"torch:{dtype}"
    coefs = {0: 1.0, 1: 2.0}
    r = torch_pair.call(all_reduce_cmds(coefs, kind=kind, out_of_place=True))
    assert_all_ok(r)
    for i, rec in r.items():
        assert rec["crc"] == expected_crc(N_ELEMS, 3.0, kind), rec
        assert rec["x_crc"] == rec["input_crc"] == expected_crc(N_ELEMS, coefs[i], kind), rec
