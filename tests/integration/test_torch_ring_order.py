"""The torch backend's gather-family collectives when the pccl ring's order is not the
torch ranks' (pccl_py/torch/process_group.py lays rows and chunks out by ring position):
three ProcessGroupPccl objects in one process over in-process Communicators, torch rank
= 2 - ring position, the mapping learned by the backend's own all-gather. Every output
slot is checked by torch rank."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from threads import run_parallel

import pccl_py as pccl
from pccl_py.testing import join_group
from pccl_py.torch.process_group import ProcessGroupPccl

pytestmark = pytest.mark.timeout(120)

N = 3
FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)


@pytest.fixture(scope="module")
def groups() -> Iterator[list[ProcessGroupPccl]]:
    with pccl.Master(config=FAST) as master:
        comms = [pccl.Communicator(master.address, config=FAST) for _ in range(N)]
        pgs: list[ProcessGroupPccl] = []
        try:
            results = run_parallel([lambda c=c: join_group(c.connect(timeout=20), N, 20) for c in comms])
            assert not any(isinstance(r, BaseException) for r in results), results
            by_torch_rank = sorted(comms, key=lambda c: N - 1 - c.rank)
            pgs = [ProcessGroupPccl(c, r, N, datetime.timedelta(seconds=30)) for r, c in enumerate(by_torch_rank)]
            assert [c.rank for c in by_torch_rank] == [2, 1, 0]
            yield pgs
        finally:
            for pg in pgs:
                pg.shutdown()
            for c in comms:
                c.close()


def each(pgs: list[ProcessGroupPccl], fn: Any) -> list[Any]:
    results = run_parallel([lambda r=r, pg=pg: fn(r, pg) for r, pg in enumerate(pgs)], timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_all_gather_lists_and_into_a_tensor(groups: list[ProcessGroupPccl]) -> None:
    def fn(r: int, pg: ProcessGroupPccl) -> tuple[list[torch.Tensor], torch.Tensor]:
        outs = [torch.zeros(2, 3) for _ in range(N)]
        pg.allgather([outs], [torch.full((2, 3), float(r))]).wait()
        flat = torch.zeros(N * 4, dtype=torch.int32)
        pg._allgather_base(flat, torch.arange(4, dtype=torch.int32) + 10 * r).wait()
        return outs, flat

    for outs, flat in each(groups, fn):
        for q in range(N):
            assert torch.equal(outs[q], torch.full((2, 3), float(q)))
        assert torch.equal(flat.reshape(N, 4), torch.arange(4, dtype=torch.int32) + 10 * torch.arange(N)[:, None])


def test_reduce_scatter_list_and_tensor(groups: list[ProcessGroupPccl]) -> None:
    def fn(r: int, pg: ProcessGroupPccl) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.zeros(5)
        xs = [torch.full((5,), float(10 * q + r)) for q in range(N)]  # slot q from rank r
        pg.reduce_scatter([y], [xs]).wait()
        y2 = torch.zeros(2, dtype=torch.int64)
        x2 = torch.arange(2 * N, dtype=torch.int64) * (r + 1)
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        pg._reduce_scatter_base(y2, x2, opts).wait()
        return y, y2

    for r, (y, y2) in enumerate(each(groups, fn)):
        assert torch.equal(y, torch.full((5,), float(sum(10 * r + q for q in range(N)))))
        assert torch.equal(y2, torch.arange(2 * r, 2 * r + 2, dtype=torch.int64) * N)


def test_broadcast_and_scatter_from_every_root(groups: list[ProcessGroupPccl]) -> None:
    for root in range(N):

        def fn(r: int, pg: ProcessGroupPccl, root: int = root) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.full((7,), float(r))
            opts = dist.BroadcastOptions()
            opts.rootRank = root
            pg.broadcast([x], opts).wait()
            y = torch.zeros(3)
            sopts = dist.ScatterOptions()
            sopts.rootRank = root
            slots = [[torch.full((3,), float(100 * root + q)) for q in range(N)]] if r == root else []
            pg.scatter([y], slots, sopts).wait()
            return x, y

        for r, (x, y) in enumerate(each(groups, fn)):
            assert torch.equal(x, torch.full((7,), float(root))), (root, r)
            assert torch.equal(y, torch.full((3,), float(100 * root + r))), (root, r)
