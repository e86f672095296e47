"""Choosing the all-reduce algorithm (pccl_py.peer.allreduce.choose_algorithm,
Config.direct_allreduce_max_bytes) and the direct all-reduce through the Communicator:
small ops go direct, large ones by the ring, every peer agrees; peers configured
differently fail with ProtocolError, inputs intact; a peer SIGKILLed in a stream of
small ops leaves the survivors agreeing op by op and recovering over the survivors."""

from __future__ import annotations

import time

import numpy as np
import pytest
from peer_workers import Cluster, loop_coef, loop_worker
from test_failures import assert_recovered, check_outcome_agreement, per_op
from threads import run_parallel

import pccl_py as pccl
from pccl_py import _native
from pccl_py.errors import ConfigError, ProtocolError
from pccl_py.peer.allreduce import choose_algorithm
from pccl_py.testing import join_group

pytestmark = pytest.mark.timeout(180)

DIRECT = _native.AllReduceAlgorithm.DIRECT
RING = _native.AllReduceAlgorithm.RING
FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0, rsag_min_bytes=0)  # the ring above the direct limit


@pytest.mark.parametrize(
    ("nbytes", "world", "limit", "want"),
    [
        (1024, 4, 256 << 10, DIRECT),
        (0, 4, 256 << 10, DIRECT),  # nothing to send: the vote alone, all-to-all
        (128 << 10, 3, 256 << 10, DIRECT),  # exactly at the limit: 2 x 128 KiB
        ((128 << 10) + 4, 3, 256 << 10, RING),
        (256 << 10, 2, 256 << 10, DIRECT),
        (256 << 10, 8, 256 << 10, RING),
        (1024, 4, 0, RING),  # 0 disables it
        (1024, 1, 256 << 10, RING),  # alone: nothing to exchange either way
        (64 << 20, 2, 256 << 10, RING),
    ],
)
def test_choose_algorithm(nbytes: int, world: int, limit: int, want: _native.AllReduceAlgorithm) -> None:
    assert choose_algorithm(nbytes, world, limit) == want


def test_a_negative_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        pccl.Config(direct_allreduce_max_bytes=-1)


def _group(master: pccl.Master, configs: list[pccl.Config]) -> list[pccl.Communicator]:
    comms = [pccl.Communicator(master.address, config=c) for c in configs]
    results = run_parallel([lambda c=c: join_group(c.connect(timeout=20), len(comms), 20) for c in comms])
    for r in results:
        assert not isinstance(r, BaseException), results
    return comms


def test_small_ops_go_direct_large_ones_by_the_ring_with_the_same_bytes() -> None:
    """Three peers: 10001 float32 (x2 = 80 KB per peer) go direct, 100001 (800 KB) by
    the ring; every peer reports the same algorithm and holds the exact sum; a limit of
    0 sends the small op by the ring too."""
    with pccl.Master(config=FAST) as master:
        for limit, small_algo in ((FAST.direct_allreduce_max_bytes, "direct"), (0, "ring")):
            comms = _group(master, [FAST.replace(direct_allreduce_max_bytes=limit)] * 3)
            try:
                for count, algo in ((10_001, small_algo), (100_001, "ring"), (0, small_algo)):
                    xs = [np.arange(count, dtype=np.float32) * (i + 1) for i in range(3)]
                    infos = run_parallel([lambda c=comms[i], x=xs[i]: c.all_reduce(x, timeout=30) for i in range(3)])
                    for info in infos:
                        assert isinstance(info, pccl.ReduceInfo), infos
                        assert (info.algorithm, info.world_size) == (algo, 3), (count, infos)
                    want = np.arange(count, dtype=np.float32) * 6
                    for x in xs:
                        np.testing.assert_array_equal(x, want)
                # Out of place and AVG too.
                xs = [np.full(777, float(i + 1), np.float64) for i in range(3)]
                outs = [np.zeros_like(x) for x in xs]
                run_parallel(
                    [
                        lambda c=comms[i], x=xs[i], o=outs[i]: c.all_reduce(x, op=pccl.ReduceOp.AVG, out=o, timeout=30)
                        for i in range(3)
                    ]
                )
                for x, out in zip(xs, outs):
                    np.testing.assert_array_equal(out, np.full(777, 2.0))
                assert [x[0] for x in xs] == [1.0, 2.0, 3.0]
            finally:
                for c in comms:
                    c.close()


def test_peers_configured_differently_fail_with_protocol_error_and_intact_inputs() -> None:
    """One peer has the direct path off: it runs the ring where the others run direct.
    The shape digests differ, so every peer raises ProtocolError (never a hang or
    mixed bytes), inputs intact; the group still works for ops both choose alike."""
    with pccl.Master(config=FAST) as master:
        configs = [FAST, FAST, FAST.replace(direct_allreduce_max_bytes=0)]
        comms = _group(master, configs)
        try:
            xs = [np.full(1000, float(i + 1), np.float32) for i in range(3)]
            start = time.monotonic()
            results = run_parallel([lambda i=i: comms[i].all_reduce(xs[i], timeout=20) for i in range(3)])
            for r in results:
                assert isinstance(r, ProtocolError), results
            assert time.monotonic() - start < 10, "the mismatch was found only by a timeout"
            for i, x in enumerate(xs):
                np.testing.assert_array_equal(x, np.full(1000, float(i + 1), np.float32))
            big = [np.full(200_000, float(i + 1), np.float32) for i in range(3)]  # the ring for all three
            infos = run_parallel([lambda i=i: comms[i].all_reduce(big[i], timeout=30) for i in range(3)])
            assert all(isinstance(r, pccl.ReduceInfo) and r.algorithm == "ring" for r in infos), infos
            for b in big:
                np.testing.assert_array_equal(b, np.full(200_000, 6.0, np.float32))
        finally:
            for c in comms:
                c.close()


def test_sigkill_in_a_stream_of_small_direct_ops() -> None:
    """Back-to-back 16 KiB all-reduces (direct) on 3 peer processes; peer 2 is killed
    after a few ops. Survivors agree op by op (all succeed with the same bytes, or all
    raise PeerLost with their input intact); retry=True then runs over the two
    survivors exactly."""
    world, victim, survivors = 3, 2, (0, 1)
    elements = 4096
    with pccl.Master() as m, Cluster(m.address, loop_worker, world=world, elements=elements, max_ops=5000) as c:
        for i in range(world):
            c.start(i)
        seen = c.collect(lambda recs: sum(r.get("event") == "ready" for r in recs) == world, 90, "peers ready")
        epoch_before = max(r["epoch_now"] for r in seen if r.get("event") == "ready")
        c.collect(lambda recs: {r["index"] for r in recs if r.get("op") == 20} == set(range(world)), 60, "op 20")
        c.kill(victim)
        seen = c.collect(lambda recs: {r["index"] for r in recs if r.get("recovery")} >= set(survivors), 60, "recovery")
        ops = per_op(seen, survivors)
        check_outcome_agreement(ops, survivors, victim)
        recovery = {r["index"]: r for r in seen if r.get("recovery") and r["index"] in survivors}
        assert len({r["op"] for r in recovery.values()}) == 1, recovery
        rec_op = recovery[survivors[0]]["op"]
        assert_recovered(recovery, {i: loop_coef(i, rec_op) for i in survivors}, epoch_before, n=elements, live=False)
        hit = not ops[rec_op][survivors[0]]["ok"]
        print(f"kill {'failed an op in flight' if hit else 'landed between ops'} (op {rec_op})")
