"""Rank entry point for tests/integration/test_torch_coalesced.py: runs torch's coalesced
collectives (all_gather_coalesced, all_reduce_coalesced, and the ProcessGroup methods
allgather_coalesced, allreduce_coalesced, allgather_into_tensor_coalesced,
reduce_scatter_tensor_coalesced) with tensors of different shapes and dtypes on any
backend, and checks every output slot against the value computed locally.

    python tests/helpers/torch_coalesced_workers.py --backend pccl|gloo --save PREFIX

Started once per rank with torchrun's environment (pccl_py.tools.torch_bench.start). Saves
every case's outputs to PREFIX.rank<R>.pt (so a test can compare two backends bit for
bit) and prints one JSON line: {"rank", "checks", "failures": [...], "failed": [case, ...],
"raised": {case: error}}. A case that raises is recorded, not fatal; exits 0 so the test sees it all.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.distributed_c10d import (
    AllgatherOptions,
    AllreduceCoalescedOptions,
    ReduceScatterOptions,
)

import pccl_py.torch  # noqa: F401  (registers "pccl")

Outputs = dict[str, torch.Tensor]


def value(rank: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Small exact values, different for every (rank, index) and every element."""
    n = 1
    for d in shape:
        n *= d
    base = (torch.arange(n, dtype=torch.int64) * 3 + rank * 7 + index * 11) % 13 + 1
    if dtype == torch.bool:
        t = base % 2 == 0
    elif dtype.is_complex:
        t = torch.complex(base.float(), -base.float() * (rank + 1))
    else:
        t = base.to(dtype)
    return t.reshape(shape)


def reduce(op: dist.ReduceOp.RedOpType, values: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(values)
    if op == dist.ReduceOp.SUM:
        return stacked.sum(0).to(values[0].dtype)
    if op == dist.ReduceOp.PRODUCT:
        return stacked.prod(0).to(values[0].dtype)
    if op == dist.ReduceOp.MIN:
        return stacked.amin(0)
    return stacked.amax(0)


# (shape, dtype) per input index: odd sizes, an empty tensor, and dtypes interleaved so a
# dtype grouping that puts results back in the wrong order shows.
SHAPES = [(3,), (2, 2), (0,), (1, 5), (2, 3, 1)]
MIXED = [
    ((3,), torch.float32),
    ((2, 2), torch.int64),
    ((5,), torch.float64),
    ((0,), torch.int64),
    ((4,), torch.float16),
    ((1, 3), torch.float32),
    ((2,), torch.int32),
]
MIXED_GATHER = [*MIXED, ((6,), torch.bool), ((2,), torch.complex64)]


class Cases:
    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.pg = dist.group.WORLD
        self.checks = 0
        self.failures: list[str] = []
        self.raised: dict[str, str] = {}
        self.failed: set[str] = set()
        self.outputs: dict[str, Outputs] = {}

    def run(self, name: str, fn: Callable[[], list[tuple[str, torch.Tensor, torch.Tensor]]]) -> None:
        try:
            results = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other cases go on
            self.raised[name] = f"{type(exc).__name__}: {exc}"[:400]
            return
        saved: Outputs = {}
        for label, got, want in results:
            self.checks += 1
            saved[label] = got.detach().clone()
            same = got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
            if not same:
                self.failed.add(name)
                self.failures.append(
                    f"rank {self.rank} {name} {label}: got {got.dtype} {tuple(got.shape)} {got.flatten()[:6].tolist()}, "
                    f"want {want.dtype} {tuple(want.shape)} {want.flatten()[:6].tolist()}"
                )
        self.outputs[name] = saved

    # ------------------------------------------------------------ all_gather_coalesced

    def gather_coalesced(self, specs: list[tuple[tuple[int, ...], torch.dtype]], direct: bool, async_op: bool = False):  # type: ignore[no-untyped-def]
        def case() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
            inputs = [value(self.rank, i, shape, dtype) for i, (shape, dtype) in enumerate(specs)]
            outs = [[torch.full(shape, 99).to(dtype) for shape, dtype in specs] for _ in range(self.world)]
            if direct:  # the ProcessGroup method, which takes mixed dtypes
                self.pg.allgather_coalesced(outs, inputs, AllgatherOptions()).wait()
            else:
                work = dist.all_gather_coalesced(outs, inputs, async_op=async_op)
                if async_op:
                    work.wait()  # type: ignore[union-attr]
            return [
                (f"slot[{r}][{i}]", outs[r][i], value(r, i, shape, dtype))
                for r in range(self.world)
                for i, (shape, dtype) in enumerate(specs)
            ]

        return case

    def gather_non_contiguous(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        inputs = [value(self.rank, i, (3, 2), torch.float32).t() for i in range(2)]
        outs = [[torch.zeros(3, 2).t() for _ in range(2)] for _ in range(self.world)]
        dist.all_gather_coalesced(outs, inputs)
        return [(f"slot[{r}][{i}]", outs[r][i], value(r, i, (3, 2), torch.float32).t()) for r in range(self.world) for i in range(2)]

    # ------------------------------------------------------------ all_reduce_coalesced

    def reduce_coalesced(self, specs: list[tuple[tuple[int, ...], torch.dtype]], op: dist.ReduceOp.RedOpType, direct: bool, async_op: bool = False):  # type: ignore[no-untyped-def]
        def case() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
            tensors = [value(self.rank, i, shape, dtype) for i, (shape, dtype) in enumerate(specs)]
            if direct:
                opts = AllreduceCoalescedOptions()
                opts.reduceOp = op
                self.pg.allreduce_coalesced(tensors, opts).wait()
            else:
                work = dist.all_reduce_coalesced(tensors, op=op, async_op=async_op)
                if async_op:
                    work.wait()  # type: ignore[union-attr]
            return [
                (f"tensor[{i}]", t, reduce(op, [value(r, i, shape, dtype) for r in range(self.world)]))
                for i, (t, (shape, dtype)) in enumerate(zip(tensors, specs, strict=True))
            ]

        return case

    def reduce_non_contiguous(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        tensors = [value(self.rank, 0, (4, 3), torch.float32).t(), value(self.rank, 1, (3,), torch.float32)]
        dist.all_reduce_coalesced(tensors)
        want = [reduce(dist.ReduceOp.SUM, [value(r, 0, (4, 3), torch.float32) for r in range(self.world)]).t(),
                reduce(dist.ReduceOp.SUM, [value(r, 1, (3,), torch.float32) for r in range(self.world)])]
        return [(f"tensor[{i}]", t, w) for i, (t, w) in enumerate(zip(tensors, want, strict=True))]

    def reduce_coalescing_manager(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        # dist._coalescing_manager hands the whole batch, dtypes mixed, to allreduce_coalesced.
        tensors = [value(self.rank, i, shape, dtype) for i, (shape, dtype) in enumerate(MIXED)]
        with dist._coalescing_manager(async_ops=True) as cm:
            for t in tensors:
                dist.all_reduce(t)
        cm.wait()
        return [
            (f"tensor[{i}]", t, reduce(dist.ReduceOp.SUM, [value(r, i, shape, dtype) for r in range(self.world)]))
            for i, (t, (shape, dtype)) in enumerate(zip(tensors, MIXED, strict=True))
        ]

    # ------------------------------------------------ into-tensor / reduce-scatter coalesced

    def gather_into_tensor_coalesced(self, specs: list[tuple[tuple[int, ...], torch.dtype]]):  # type: ignore[no-untyped-def]
        def case() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
            inputs = [value(self.rank, i, shape, dtype) for i, (shape, dtype) in enumerate(specs)]
            outs = [torch.full((self.world * x.shape[0], *x.shape[1:]), 99).to(x.dtype) for x in inputs]
            self.pg.allgather_into_tensor_coalesced(outs, inputs, AllgatherOptions()).wait()
            return [
                (f"out[{i}]", out, torch.cat([value(r, i, shape, dtype) for r in range(self.world)]))
                for i, (out, (shape, dtype)) in enumerate(zip(outs, specs, strict=True))
            ]

        return case

    def reduce_scatter_tensor_coalesced(self, specs: list[tuple[tuple[int, ...], torch.dtype]], op: dist.ReduceOp.RedOpType):  # type: ignore[no-untyped-def]
        def case() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
            # Input i is world blocks of MIXED[i]'s shape; block r (rank-dependent values) is rank r's.
            inputs = [
                torch.cat([value(self.rank, i * 10 + r, shape, dtype) for r in range(self.world)])
                for i, (shape, dtype) in enumerate(specs)
            ]
            before = [x.clone() for x in inputs]
            outs = [torch.full(shape, 99).to(dtype) for shape, dtype in specs]
            opts = ReduceScatterOptions()
            opts.reduceOp = op
            self.pg.reduce_scatter_tensor_coalesced(outs, inputs, opts).wait()
            results = [
                (f"out[{i}]", out, reduce(op, [value(r, i * 10 + self.rank, shape, dtype) for r in range(self.world)]))
                for i, (out, (shape, dtype)) in enumerate(zip(outs, specs, strict=True))
            ]
            results += [(f"input[{i}] intact", x, b) for i, (x, b) in enumerate(zip(inputs, before, strict=True))]
            return results

        return case

    def functional(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        # torch's functional collectives reach the backend through the C++ dispatcher.
        specs = [((3,), torch.float32), ((2, 2), torch.float32), ((1,), torch.float32)]
        mine = [value(self.rank, i, shape, dtype) for i, (shape, dtype) in enumerate(specs)]
        every = [[value(r, i, shape, dtype) for i, (shape, dtype) in enumerate(specs)] for r in range(self.world)]
        gathered = funcol.all_gather_into_tensor_coalesced(mine, self.pg)
        blocks = [torch.cat([value(self.rank, i * 10 + r, shape, dtype) for r in range(self.world)]) for i, (shape, dtype) in enumerate(specs)]
        scattered = funcol.reduce_scatter_tensor_coalesced(blocks, "sum", [0] * len(specs), self.pg)
        reduced = funcol.all_reduce_coalesced(mine, "sum", self.pg)
        results = []
        for i, (shape, dtype) in enumerate(specs):
            results.append((f"all_gather_into_tensor[{i}]", gathered[i], torch.cat([every[r][i] for r in range(self.world)])))
            mine_block = [value(r, i * 10 + self.rank, shape, dtype) for r in range(self.world)]
            results.append((f"reduce_scatter_tensor[{i}]", scattered[i], reduce(dist.ReduceOp.SUM, mine_block)))
            results.append((f"all_reduce[{i}]", reduced[i], reduce(dist.ReduceOp.SUM, [every[r][i] for r in range(self.world)])))
        return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="pccl")
    parser.add_argument("--save", required=True, help="outputs go to SAVE.rank<R>.pt")
    args = parser.parse_args()
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    c = Cases(rank, world)
    f32 = torch.float32
    ops = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX]

    # The case: as many inputs as ranks, equal shapes (a transposed result fits).
    c.run("all_gather_coalesced square", c.gather_coalesced([((4,), f32)] * world, direct=False))
    c.run("all_gather_coalesced shapes", c.gather_coalesced([(s, f32) for s in SHAPES], direct=False))
    c.run("all_gather_coalesced shapes async", c.gather_coalesced([(s, torch.int64) for s in SHAPES], direct=False, async_op=True))
    c.run("all_gather_coalesced complex", c.gather_coalesced([((3,), torch.complex64), ((2, 2), torch.complex64)], direct=False))
    c.run("all_gather_coalesced non-contiguous", c.gather_non_contiguous)
    c.run("pg.allgather_coalesced mixed dtypes", c.gather_coalesced(MIXED_GATHER, direct=True))
    for op in ops:
        c.run(f"all_reduce_coalesced shapes {op}", c.reduce_coalesced([(s, f32) for s in SHAPES], op, direct=False))
    c.run("all_reduce_coalesced int64 async", c.reduce_coalesced([(s, torch.int64) for s in SHAPES], dist.ReduceOp.SUM, direct=False, async_op=True))
    c.run("all_reduce_coalesced complex", c.reduce_coalesced([((3,), torch.complex64), ((2, 2), torch.complex64)], dist.ReduceOp.SUM, direct=False))
    c.run("all_reduce_coalesced non-contiguous", c.reduce_non_contiguous)
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
        c.run(f"pg.allreduce_coalesced mixed dtypes {op}", c.reduce_coalesced(MIXED, op, direct=True))
    c.run("coalescing manager all_reduce mixed dtypes", c.reduce_coalescing_manager)
    c.run("pg.allgather_into_tensor_coalesced shapes", c.gather_into_tensor_coalesced([(s, f32) for s in SHAPES]))
    c.run("pg.allgather_into_tensor_coalesced mixed dtypes", c.gather_into_tensor_coalesced(MIXED_GATHER))
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MIN):
        c.run(f"pg.reduce_scatter_tensor_coalesced shapes {op}", c.reduce_scatter_tensor_coalesced([(s, f32) for s in SHAPES], op))
        c.run(f"pg.reduce_scatter_tensor_coalesced mixed dtypes {op}", c.reduce_scatter_tensor_coalesced(MIXED, op))
    c.run("functional collectives coalesced", c.functional)

    # Still usable after whatever raised above.
    t = torch.ones(2)
    dist.all_reduce(t)
    c.run("all_reduce afterwards", lambda: [("t", t, torch.full((2,), float(world)))])
    dist.destroy_process_group()
    torch.save(c.outputs, f"{args.save}.rank{rank}.pt")
    print(json.dumps({"rank": rank, "checks": c.checks, "failures": c.failures, "failed": sorted(c.failed), "raised": c.raised}), flush=True)


if __name__ == "__main__":
    main()
