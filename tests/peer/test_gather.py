"""Communicator.all_gather, reduce_scatter, broadcast and all_to_all
(pccl_py/peer/gather.py): results in rank order, bit-identical on every peer, numpy and
torch, preallocated outputs (the all-to-all's in place too), the async all-gather; peers in different collectives (all_gather vs
all_reduce, and vs each other) get CollectiveMismatch within a second on every peer
and the next matched call succeeds; a peer SIGKILLed while the others wait in an
all-gather fails it on every survivor with inputs intact, retry=True re-runs it over
the survivors (a smaller world_size), a broadcast whose root is killed raises
PeerLost on every survivor even with retry=True, and so does an all-to-all (which has no
retry), with inputs intact also in place."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from peer_workers import Cluster, checksum, make_input
from threads import run_parallel

import pccl_py as pccl
from pccl_py import _native
from pccl_py.errors import CollectiveMismatch, InvalidArgument
from pccl_py.peer.gather import chunk_elements, choose_broadcast
from pccl_py.testing import join_group

pytestmark = pytest.mark.timeout(180)

FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)
N = 3


@pytest.fixture(scope="module")
def comms() -> Iterator[list[pccl.Communicator]]:
    # torch's first import holds the GIL for seconds, which starves the heartbeats of a
    # loaded machine past FAST's timeout: pay it before the peers connect.
    import torch  # noqa: F401

    with pccl.Master(config=FAST) as master:
        group = [pccl.Communicator(master.address, config=FAST, name=f"peer-{i}") for i in range(N)]
        try:
            results = run_parallel([lambda c=c: join_group(c.connect(timeout=20), N, 20) for c in group])
            assert not any(isinstance(r, BaseException) for r in results), results
            group.sort(key=lambda c: c.rank)
            yield group
        finally:
            for c in group:
                c.close()


def each(comms: list[pccl.Communicator], fn: Any) -> list[Any]:
    """fn(rank, comm) on every peer at once; raises the first error."""
    results = run_parallel([lambda r=r, c=c: fn(r, c) for r, c in enumerate(comms)], timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_chunking_and_broadcast_choice() -> None:
    assert [chunk_elements(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert [chunk_elements(2, 3, r) for r in range(3)] == [1, 1, 0]
    assert choose_broadcast(1000, 4, 256 << 10) == _native.CollectiveKind.BROADCAST_DIRECT
    assert choose_broadcast(1 << 20, 4, 256 << 10) == _native.CollectiveKind.BROADCAST
    assert choose_broadcast(1000, 4, 0) == _native.CollectiveKind.BROADCAST


@pytest.mark.parametrize("count", [0, 1, 1001, 300_001])
def test_all_gather_rows_in_rank_order_on_every_peer(comms: list[pccl.Communicator], count: int) -> None:
    xs = [make_input(count, r + 1.0) for r in range(N)]
    infos = each(comms, lambda r, c: c.all_gather(xs[r], timeout=30))
    want = np.stack(xs)
    for r, info in enumerate(infos):
        assert isinstance(info, pccl.GatherInfo)
        assert (info.world_size, info.rank, info.attempts) == (N, r, 1)
        assert info.output.shape == (N, count) and info.output.dtype == np.float32
        np.testing.assert_array_equal(info.output, want)
        assert info.tx_bytes == info.rx_bytes == (N - 1) * xs[r].nbytes
        assert info.contributors == tuple(c.peer_id for c in comms)


def test_all_gather_of_torch_tensors_and_into_a_preallocated_output(comms: list[pccl.Communicator]) -> None:
    import torch

    xs = [torch.full((2, 3), float(r), dtype=torch.bfloat16) for r in range(N)]
    infos = each(comms, lambda r, c: c.all_gather(xs[r], timeout=30))
    for info in infos:
        assert isinstance(info.output, torch.Tensor) and info.output.shape == (N, 2, 3)
        assert torch.equal(info.output, torch.stack(xs))
    outs = [np.zeros((N, 5), np.int64) for _ in range(N)]
    infos = each(comms, lambda r, c: c.all_gather(np.arange(5, dtype=np.int64) * r, out=outs[r], timeout=30))
    for r, info in enumerate(infos):
        assert info.output is outs[r]
        np.testing.assert_array_equal(outs[r], np.arange(5)[None, :] * np.arange(N)[:, None])
    with pytest.raises(InvalidArgument, match="out holds"):
        comms[0].all_gather(np.zeros(5, np.int64), out=np.zeros((N + 1, 5), np.int64))
    with pytest.raises(InvalidArgument, match="dtype"):
        comms[0].all_gather(np.zeros(5, np.int64), out=np.zeros((N, 5), np.int32))


def test_all_gather_async_on_two_tags(comms: list[pccl.Communicator]) -> None:
    def fn(r: int, c: pccl.Communicator) -> tuple[Any, Any]:
        hs = [c.all_gather_async(np.full(100, r + 10 * t, np.float32), tag=t, timeout=30) for t in (1, 2)]
        return hs[0].wait(30), hs[1].wait(30)

    for a, b in each(comms, fn):
        np.testing.assert_array_equal(a.output[:, 0], np.arange(N) + 10)
        np.testing.assert_array_equal(b.output[:, 0], np.arange(N) + 20)


@pytest.mark.parametrize("op", [pccl.ReduceOp.SUM, pccl.ReduceOp.AVG, pccl.ReduceOp.MAX])
def test_reduce_scatter_gives_rank_r_chunk_r_bit_identical_to_the_all_reduce(
    comms: list[pccl.Communicator], op: pccl.ReduceOp
) -> None:
    """Flat, 10007 float32 (not divisible by N): chunk r of the all-reduce's result
    (by the rsag all-reduce, which reduces in the same rank order), bit for bit."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(10_007, dtype=np.float32) for _ in range(N)]
    infos = each(comms, lambda r, c: c.reduce_scatter(xs[r], op=op, timeout=30))
    full = [np.empty_like(x) for x in xs]
    each(comms, lambda r, c: c.all_reduce(xs[r], op=op, out=full[r], timeout=30))
    bounds = np.cumsum([0] + [chunk_elements(10_007, N, r) for r in range(N)])
    for r, info in enumerate(infos):
        assert info.output.shape == (bounds[r + 1] - bounds[r],)
        assert checksum(info.output) == checksum(full[0][bounds[r]:bounds[r + 1]]), r


def test_reduce_scatter_with_a_leading_world_dimension_and_torch(comms: list[pccl.Communicator]) -> None:
    import torch

    xs = [torch.arange(N * 4, dtype=torch.float32).reshape(N, 2, 2) * (r + 1) for r in range(N)]
    infos = each(comms, lambda r, c: c.reduce_scatter(xs[r], timeout=30))
    total = sum(xs)
    for r, info in enumerate(infos):
        assert isinstance(info.output, torch.Tensor) and info.output.shape == (2, 2)
        assert torch.equal(info.output, total[r])
    outs = [np.zeros(4, np.float32) for _ in range(N)]
    each(comms, lambda r, c: c.reduce_scatter(xs[r].numpy(), out=outs[r], op=pccl.ReduceOp.MIN, timeout=30))
    for r in range(N):
        np.testing.assert_array_equal(outs[r], xs[0][r].numpy().reshape(-1))


@pytest.mark.parametrize("count", [0, 3, 300_000])
def test_all_to_all_gives_rank_r_block_r_of_every_peer(comms: list[pccl.Communicator], count: int) -> None:
    """x flattened holds N blocks, block d for rank d: rank r's output block s is rank
    s's block r, exactly; out of place, in place (x overwritten) and on torch tensors."""
    xs = [make_input(count, r + 1.0) for r in range(N)]
    blocks = [[b.copy() for b in np.split(x, N)] for x in xs]  # xs are overwritten in place below
    infos = each(comms, lambda r, c: c.all_to_all(xs[r], timeout=30))
    for r, info in enumerate(infos):
        assert (info.world_size, info.rank) == (N, r)
        assert info.output.shape == (count,)
        np.testing.assert_array_equal(info.output, np.concatenate([blocks[s][r] for s in range(N)]))
        assert info.tx_bytes == info.rx_bytes == (N - 1) * xs[r].nbytes // N
    each(comms, lambda r, c: c.all_to_all(xs[r], out=xs[r], timeout=30))
    for r in range(N):
        np.testing.assert_array_equal(xs[r], np.concatenate([blocks[s][r] for s in range(N)]))

    import torch

    ts = [torch.arange(N * 6, dtype=torch.int16).reshape(N, 2, 3) + 100 * r for r in range(N)]
    infos = each(comms, lambda r, c: c.all_to_all(ts[r], timeout=30))
    for r, info in enumerate(infos):
        assert isinstance(info.output, torch.Tensor) and info.output.shape == (N, 2, 3)
        assert torch.equal(info.output, torch.stack([ts[s][r] for s in range(N)]))


def test_all_to_all_refuses_what_does_not_split_into_blocks(comms: list[pccl.Communicator]) -> None:
    with pytest.raises(InvalidArgument, match="equal blocks"):
        comms[0].all_to_all(np.zeros(N + 1, np.float32))
    with pytest.raises(InvalidArgument, match="out holds"):
        comms[0].all_to_all(np.zeros(N, np.float32), out=np.zeros(2 * N, np.float32))


@pytest.mark.parametrize("count", [0, 17, 100_003])  # direct below the limit, scatter above
def test_broadcast_from_every_root(comms: list[pccl.Communicator], count: int) -> None:
    for root in range(N):
        xs = [make_input(count, r + 1.0) for r in range(N)]
        want = xs[root].copy()
        infos = each(comms, lambda r, c: c.broadcast(xs[r], root=root, timeout=30))
        for r, info in enumerate(infos):
            assert info.output is xs[r]
            np.testing.assert_array_equal(xs[r], want)
        assert infos[root].rx_bytes == 0


def test_broadcast_rejects_a_root_outside_the_ring(comms: list[pccl.Communicator]) -> None:
    with pytest.raises(InvalidArgument, match="root"):
        comms[0].broadcast(np.zeros(4, np.float32), root=N)


def test_all_gather_vs_all_reduce_is_a_collective_mismatch_within_a_second(comms: list[pccl.Communicator]) -> None:
    """Peer 1 all-reduces while 0 and 2 all-gather: CollectiveMismatch naming both
    calls on every peer within ~1 s; then the same for all_gather vs broadcast vs
    reduce_scatter; then a matched all_gather is exact."""
    for calls in (
        ("all_gather", "all_reduce", "all_gather"),
        ("all_gather", "broadcast", "reduce_scatter"),
        ("all_to_all", "all_gather", "all_to_all"),
    ):
        xs = [np.full(999, r + 1.0, np.float32) for r in range(N)]

        def fn(r: int, c: pccl.Communicator, calls: tuple[str, ...] = calls) -> tuple[BaseException | None, float]:
            t0 = time.monotonic()
            try:
                getattr(c, calls[r])(xs[r], timeout=20)
            except pccl.PcclError as exc:
                return exc, time.monotonic() - t0
            return None, time.monotonic() - t0

        results = each(comms, fn)
        for r, (exc, elapsed) in enumerate(results):
            assert isinstance(exc, CollectiveMismatch), (calls, results)
            assert elapsed < 1.5, (calls, results)
            for call in set(calls):
                assert f"{call}(" in str(exc), exc
        infos = each(comms, lambda r, c: c.all_gather(xs[r], timeout=20))
        for info in infos:
            np.testing.assert_array_equal(info.output[:, 0], np.arange(N) + 1.0)


# ---------------------------------------------------------------- peer processes and kills


def gather(call: str, n: int, coef: float, **kw: Any) -> dict[str, Any]:
    return {"cmd": "gather", "call": call, "n": n, "coef": coef, "timeout": 30.0, **kw}


def test_sigkill_while_the_others_gather_agreed_failure_retry_and_lost_root() -> None:
    """Five peer processes. (1) 0..3 all-gather with retry=False while 4 idles; 4 is
    killed: every survivor raises PeerLost, inputs intact. (2) 0..2 all-gather with
    retry=True while 3 idles; 3 is killed: every survivor succeeds over 3 peers with the
    exact rows. (3) the two peers not at rank 0 broadcast from rank 0 with retry=True
    while rank 0 idles; it is killed: both raise PeerLost (the root is gone)."""
    n = 20_000
    config = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
    with pccl.Master(config=FAST) as master, Cluster(master.address) as cluster:
        cluster.form(range(5), config=config)
        # (1) retry=False
        cid = cluster.send({i: gather("all_gather", n, i + 1.0) for i in range(4)})
        time.sleep(0.5)
        cluster.kill(4)
        recs = cluster.results(cid, range(4), 60)
        for i, rec in recs.items():
            assert not rec["ok"] and rec["error"] == "PeerLost" and rec["intact"], recs
            assert rec["elapsed"] < 5.0, recs
        # (2) retry=True over the survivors
        cid = cluster.send({i: gather("all_gather", n, i + 1.0, retry=True) for i in range(3)})
        time.sleep(0.5)
        cluster.kill(3)
        recs = cluster.results(cid, range(3), 60)
        ranks = {}
        for i, rec in recs.items():
            assert rec["ok"] and rec["world"] == 3 and rec["shape"] == [3, n], recs
            ranks[rec["rank"]] = i
        want = np.stack([make_input(n, ranks[r] + 1.0) for r in range(3)])
        assert all(rec["crc"] == checksum(want) for rec in recs.values()), recs
        # (3) the broadcast's root is killed while the others wait for it
        root_index = ranks[0]
        others = [i for i in range(3) if i != root_index]
        cid = cluster.send({i: gather("broadcast", n, i + 1.0, root=0, retry=True) for i in others})
        time.sleep(0.5)
        cluster.kill(root_index)
        recs = cluster.results(cid, others, 60)
        for rec in recs.values():
            assert not rec["ok"] and rec["error"] == "PeerLost" and "root" in rec["message"], recs


@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_sigkill_during_an_all_to_all_fails_it_on_every_survivor_with_inputs_intact(in_place: bool) -> None:
    """Four peer processes; 0..2 run an all-to-all while 3 idles; 3 is killed: every
    survivor raises PeerLost within seconds (there is no retry: the blocks were laid out
    for four), its input intact, in place too."""
    n = 20_004
    config = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}
    with pccl.Master(config=FAST) as master, Cluster(master.address) as cluster:
        cluster.form(range(4), config=config)
        cid = cluster.send({i: gather("all_to_all", n, i + 1.0, in_place=in_place) for i in range(3)})
        time.sleep(0.5)
        cluster.kill(3)
        recs = cluster.results(cid, range(3), 60)
        for rec in recs.values():
            assert not rec["ok"] and rec["error"] == "PeerLost" and rec["intact"], recs
            assert rec["elapsed"] < 5.0, recs
