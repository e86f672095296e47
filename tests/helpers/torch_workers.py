"""Rank entry point for tests/test_torch_backend.py: runs every torch.distributed
collective the "pccl" backend offers, for every dtype it supports, synchronously and
with async_op=True, and checks each result against the value computed locally.

    python tests/torch_workers.py [--init pccl://host:port] [--device cpu|cuda] [--quick]

Started once per rank with torchrun's environment (pccl_py.tools.torch_bench.start). Prints
one JSON line: {"rank", "checks", "failures": [...]}; exits 0 even when checks fail so
the test can show every failure at once.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllreduceCoalescedOptions

import pccl_py.torch  # noqa: F401  (registers "pccl")
from pccl_py.torch import REDUCE_DTYPES

N = 37  # elements per rank: odd, so no slot lines up with a power of two
BYTE_DTYPES = (*REDUCE_DTYPES, torch.bool, torch.complex64)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def value(rank: int, dtype: torch.dtype, n: int = N, salt: int = 0) -> torch.Tensor:
    """Small exact values (every reduction order gives the same result)."""
    base = (torch.arange(n, dtype=torch.int64) * 7 + rank * 3 + salt) % 5
    if dtype == torch.bool:
        return (base + rank) % 2 == 0
    if dtype == torch.complex64:
        return torch.complex(base.float(), -base.float() - rank)
    return base.to(dtype)


def as_f64(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.complex64:
        return torch.view_as_real(t).to(torch.float64)
    return t.to(torch.int64).to(torch.float64) if not t.dtype.is_floating_point else t.to(torch.float64)


class Checker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.checks = 0
        self.failures: list[str] = []

    def same(self, what: str, got: torch.Tensor, want: torch.Tensor, tol: float = 0.0) -> None:
        self.checks += 1
        got, want = as_f64(got.cpu()), as_f64(want.cpu())
        ok = got.shape == want.shape and bool(((got - want).abs() <= tol * want.abs().clamp(min=1)).all())
        if not ok:
            self.failures.append(f"rank {self.rank} {what}: got {got.flatten()[:8].tolist()} want {want.flatten()[:8].tolist()}")

    def run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # recorded, the other checks go on
            self.checks += 1
            self.failures.append(f"rank {self.rank} {what}: raised {type(exc).__name__}: {exc}")


BITWISE = {dist.ReduceOp.BAND: torch.bitwise_and, dist.ReduceOp.BOR: torch.bitwise_or, dist.ReduceOp.BXOR: torch.bitwise_xor}


def bits_value(rank: int, salt: int = 0) -> torch.Tensor:
    """value() + 1 as int64 (small and positive: every integer dtype holds its bits)."""
    return value(rank, torch.int64, salt=salt) + 1


def reduce_expected(op: dist.ReduceOp.RedOpType, dtype: torch.dtype, world: int, salt: int = 0) -> torch.Tensor:
    if op in BITWISE:
        acc = bits_value(0, salt)
        for r in range(1, world):
            acc = BITWISE[op](acc, bits_value(r, salt))
        return as_f64(acc)
    values = [as_f64(value(r, dtype, salt=salt)) for r in range(world)]
    stacked = torch.stack(values)
    if dtype == torch.bool:
        if op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
            return stacked.amax(0)
        return stacked.amin(0)
    if op == dist.ReduceOp.SUM:
        return stacked.sum(0)
    if op == dist.ReduceOp.PRODUCT:
        return stacked.prod(0)
    if op == dist.ReduceOp.MIN:
        return stacked.amin(0)
    if op == dist.ReduceOp.MAX:
        return stacked.amax(0)
    return stacked.sum(0) / world  # AVG


def reduce_ops(dtype: torch.dtype) -> list[dist.ReduceOp.RedOpType]:
    ops = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX]
    if dtype in FLOATS:
        ops.append(dist.ReduceOp.AVG)
    else:
        ops += list(BITWISE)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default="env://")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="float32 and bool only, synchronous only")
    args = parser.parse_args()
    dist.init_process_group("pccl", init_method=args.init, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(args.device)
    c = Checker(rank)

    reduce_dtypes = (torch.float32,) if args.quick else REDUCE_DTYPES
    byte_dtypes = (torch.float32, torch.bool) if args.quick else BYTE_DTYPES
    for async_op in (False,) if args.quick else (False, True):
        mode = "async" if async_op else "sync"

        def finish(work: dist.Work | None) -> None:
            if async_op:
                assert work is not None, "async_op=True returned no Work"
                work.wait()
                assert work.is_completed()

        for dtype in (*reduce_dtypes, torch.bool):
            for op in reduce_ops(dtype) if dtype != torch.bool else [dist.ReduceOp.SUM, dist.ReduceOp.MIN]:

                def all_reduce(dtype: torch.dtype = dtype, op: dist.ReduceOp.RedOpType = op) -> None:
                    t = (bits_value(rank).to(dtype) if op in BITWISE else value(rank, dtype)).to(dev)
                    finish(dist.all_reduce(t, op=op, async_op=async_op))
                    tol = 1e-2 if op == dist.ReduceOp.AVG and dtype in (torch.float16, torch.bfloat16) else 1e-6
                    c.same(f"{mode} all_reduce {dtype} {op}", t, reduce_expected(op, dtype, world), tol)

                c.run(f"{mode} all_reduce {dtype} {op}", all_reduce)

            def reduce_scatter(dtype: torch.dtype = dtype) -> None:
                op = dist.ReduceOp.SUM if dtype != torch.bool else dist.ReduceOp.MAX
                inputs = [value(rank, dtype, salt=s).to(dev) for s in range(world)]
                out = torch.empty(N, dtype=dtype, device=dev)
                finish(dist.reduce_scatter(out, inputs, op=op, async_op=async_op))
                c.same(f"{mode} reduce_scatter {dtype}", out, reduce_expected(op, dtype, world, salt=rank))
                big = torch.cat([value(rank, dtype, salt=s) for s in range(world)]).to(dev)
                before = big.clone()
                out2 = torch.empty(N, dtype=dtype, device=dev)
                finish(dist.reduce_scatter_tensor(out2, big, op=op, async_op=async_op))
                c.same(f"{mode} reduce_scatter_tensor {dtype}", out2, reduce_expected(op, dtype, world, salt=rank))
                c.same(f"{mode} reduce_scatter_tensor input intact {dtype}", big, before)

            c.run(f"{mode} reduce_scatter {dtype}", reduce_scatter)

        for dtype in byte_dtypes:

            def broadcast(dtype: torch.dtype = dtype) -> None:
                for src in range(world):
                    t = value(rank, dtype).to(dev)
                    finish(dist.broadcast(t, src=src, async_op=async_op))
                    c.same(f"{mode} broadcast {dtype} src={src}", t, value(src, dtype))

            def all_gather(dtype: torch.dtype = dtype) -> None:
                outs = [torch.empty(N, dtype=dtype, device=dev) for _ in range(world)]
                finish(dist.all_gather(outs, value(rank, dtype).to(dev), async_op=async_op))
                for r in range(world):
                    c.same(f"{mode} all_gather {dtype} slot {r}", outs[r], value(r, dtype))
                out = torch.empty(world * N, dtype=dtype, device=dev)
                finish(dist.all_gather_into_tensor(out, value(rank, dtype).to(dev), async_op=async_op))
                c.same(f"{mode} all_gather_into_tensor {dtype}", out, torch.cat([value(r, dtype) for r in range(world)]))
                # In place, as FSDP does: the input is this rank's slot of the output.
                out = torch.empty(world * N, dtype=dtype, device=dev)
                out[rank * N : (rank + 1) * N].copy_(value(rank, dtype))
                finish(dist.all_gather_into_tensor(out, out[rank * N : (rank + 1) * N], async_op=async_op))
                c.same(f"{mode} all_gather_into_tensor in place {dtype}", out, torch.cat([value(r, dtype) for r in range(world)]))

            def all_to_all(dtype: torch.dtype = dtype) -> None:
                # Lists of different sizes per pair: rank s sends s + d + 1 elements to rank d.
                sends = [value(rank, dtype, n=rank + d + 1, salt=d).to(dev) for d in range(world)]
                outs = [torch.empty(s + rank + 1, dtype=dtype, device=dev) for s in range(world)]
                finish(dist.all_to_all(outs, sends, async_op=async_op))
                for s in range(world):
                    c.same(f"{mode} all_to_all {dtype} from {s}", outs[s], value(s, dtype, n=s + rank + 1, salt=rank))
                # Single tensors, even: block d (N rows of 2) to rank d.
                x = torch.stack([value(rank, dtype, n=2 * N, salt=d).reshape(N, 2) for d in range(world)]).to(dev)
                y = torch.empty_like(x)
                finish(dist.all_to_all_single(y, x.reshape(world * N, 2), async_op=async_op))
                for s in range(world):
                    c.same(f"{mode} all_to_all_single {dtype} from {s}", y[s], value(s, dtype, n=2 * N, salt=rank).reshape(N, 2))
                # Single tensors with split sizes: s + d + 1 rows from rank s to rank d.
                x = torch.cat([value(rank, dtype, n=rank + d + 1, salt=d) for d in range(world)]).to(dev)
                y = torch.empty(sum(s + rank + 1 for s in range(world)), dtype=dtype, device=dev)
                finish(dist.all_to_all_single(y, x, [s + rank + 1 for s in range(world)], [rank + d + 1 for d in range(world)],
                                              async_op=async_op))
                want = torch.cat([value(s, dtype, n=s + rank + 1, salt=rank) for s in range(world)])
                c.same(f"{mode} all_to_all_single {dtype} with splits", y, want)

            c.run(f"{mode} broadcast {dtype}", broadcast)
            c.run(f"{mode} all_gather {dtype}", all_gather)
            c.run(f"{mode} all_to_all {dtype}", all_to_all)

        def barrier() -> None:
            finish(dist.barrier(async_op=async_op))
            c.checks += 1

        c.run(f"{mode} barrier", barrier)

    def many_in_flight() -> None:
        # Several async ops of different kinds at once: they complete in order, correctly.
        tensors = [value(rank, torch.float32, salt=i).to(dev) for i in range(8)]
        gathered = torch.empty(world * N, dtype=torch.int32, device=dev)
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        works.append(dist.all_gather_into_tensor(gathered, value(rank, torch.int32).to(dev), async_op=True))
        works.append(dist.barrier(async_op=True))
        for w in works:
            w.wait()
        for i, t in enumerate(tensors):
            c.same(f"in flight all_reduce {i}", t, reduce_expected(dist.ReduceOp.SUM, torch.float32, world, salt=i))
        c.same("in flight all_gather", gathered, torch.cat([value(r, torch.int32) for r in range(world)]))
        fut = dist.all_reduce(torch.ones(3, device=dev), async_op=True).get_future()
        c.same("future value", fut.wait()[0], torch.full((3,), float(world)))
        # The same tensor twice in flight: the second waits for the first (world x world),
        # and a view of it counts as the same tensor.
        twice = torch.ones(1 << 16, device=dev)
        first = dist.all_reduce(twice, async_op=True)
        second = dist.all_reduce(twice[: 1 << 15], async_op=True)
        first.wait()
        second.wait()
        c.same("same tensor twice", twice[: 1 << 15], torch.full((1 << 15,), float(world * world)))
        c.same("same tensor twice, rest", twice[1 << 15 :], torch.full((1 << 15,), float(world)))

    def coalesced() -> None:
        a = value(rank, torch.float32).to(dev)
        b = value(rank, torch.int64, salt=1).to(dev)
        with dist._coalescing_manager(async_ops=True) as cm:
            dist.all_reduce(a)
            dist.all_reduce(b)
        cm.wait()
        c.same("coalesced all_reduce f32", a, reduce_expected(dist.ReduceOp.SUM, torch.float32, world))
        c.same("coalesced all_reduce i64", b, reduce_expected(dist.ReduceOp.SUM, torch.int64, world, salt=1))
        outs = [torch.empty(world * N, device=dev) for _ in range(2)]
        with dist._coalescing_manager(async_ops=True) as cm:
            for i, out in enumerate(outs):
                dist.all_gather_into_tensor(out, value(rank, torch.float32, salt=i).to(dev))
        cm.wait()
        for i, out in enumerate(outs):
            want = torch.cat([value(r, torch.float32, salt=i) for r in range(world)])
            c.same(f"coalesced all_gather_into_tensor {i}", out, want)
        ys = [torch.empty(N, device=dev) for _ in range(2)]
        with dist._coalescing_manager(async_ops=True) as cm:
            for i, y in enumerate(ys):
                x = torch.cat([value(rank, torch.float32, salt=s + i) for s in range(world)]).to(dev)
                dist.reduce_scatter_tensor(y, x)
        cm.wait()
        for i, y in enumerate(ys):
            c.same(f"coalesced reduce_scatter_tensor {i}", y, reduce_expected(dist.ReduceOp.SUM, torch.float32, world, salt=rank + i))

    def premul_and_rooted() -> None:
        t = value(rank, torch.float32).to(dev)
        premul = dist._make_nccl_premul_sum(0.5)
        if hasattr(premul, "factor"):
            dist.all_reduce(t, op=premul)
            c.same("premul_sum", t, reduce_expected(dist.ReduceOp.SUM, torch.float32, world) * 0.5)
        else:  # older torch: the factor is out of a Python backend's reach, so it must refuse
            c.checks += 1
            try:
                dist.all_reduce(t, op=premul)
                c.failures.append("PREMUL_SUM without a readable factor did not raise")
            except Exception as exc:
                if "PREMUL_SUM" not in str(exc):
                    c.failures.append(f"PREMUL_SUM error does not name the op: {exc}")
        t = value(rank, torch.int32).to(dev)
        dist.reduce(t, dst=1 % world)
        c.same("reduce", t, reduce_expected(dist.ReduceOp.SUM, torch.int32, world) if rank == 1 % world else value(rank, torch.int32))
        outs = [torch.empty(N, dtype=torch.int16, device=dev) for _ in range(world)] if rank == 0 else None
        dist.gather(value(rank, torch.int16).to(dev), outs, dst=0)
        if outs is not None:
            for r in range(world):
                c.same(f"gather slot {r}", outs[r], value(r, torch.int16))
        y = torch.empty(N, dtype=torch.float64, device=dev)
        parts = [value(r, torch.float64, salt=9).to(dev) for r in range(world)] if rank == 0 else None
        dist.scatter(y, parts, src=0)
        c.same("scatter", y, value(rank, torch.float64, salt=9))
        objs: list[object] = [None] * world
        dist.all_gather_object(objs, {"rank": rank})
        c.same("all_gather_object", torch.tensor([o["rank"] for o in objs]), torch.arange(world))  # type: ignore[index]

    def gathered_reductions() -> None:
        # Sparse SUM (CPU, as gloo): rank r holds rows 0..r of a (world + 1) x 3 tensor,
        # so the ranks' nonzero counts differ and overlap.
        def sparse(r: int) -> torch.Tensor:
            return torch.sparse_coo_tensor(torch.arange(r + 1).reshape(1, -1), torch.full((r + 1, 3), r + 1.0), (world + 1, 3))

        t = sparse(rank)
        dist.all_reduce(t)
        c.same("sparse all_reduce", t.to_dense(), sum(sparse(r).to_dense() for r in range(world)))
        # Mixed integer dtypes in one bitwise op (on the group: dist.* refuses mixed dtypes):
        # int8 then int64, so a rank's int64 bytes start at an unaligned offset of the row.
        a = torch.tensor([rank + 1], dtype=torch.int8, device=dev)
        b = torch.tensor([1 << rank, 7], dtype=torch.int64, device=dev)
        opts = AllreduceCoalescedOptions()
        opts.reduceOp = dist.ReduceOp.BOR
        group = dist.group.WORLD
        assert group is not None
        group.allreduce_coalesced([a, b], opts).wait()
        want_a = 0
        for r in range(world):
            want_a |= r + 1
        c.same("BOR int8 (coalesced)", a, torch.tensor([want_a]))
        c.same("BOR int64 (coalesced)", b, torch.tensor([(1 << world) - 1, 7]))

    def unsupported() -> None:
        c.checks += 1
        try:
            dist.all_reduce(torch.ones(2, dtype=torch.float32, device=dev), op=dist.ReduceOp.BXOR)
        except Exception as exc:
            if "BXOR" not in str(exc):
                c.failures.append(f"BXOR error does not name the op: {exc}")
        else:
            c.failures.append("BXOR did not raise")
        # The group is still usable after a rejected argument.
        t = torch.ones(2, device=dev)
        dist.all_reduce(t)
        c.same("after a rejected op", t, torch.full((2,), float(world)))

    def subgroup() -> None:
        # new_group: its own pccl group (torch orders its ranks: group rank 1 is `world - 1`).
        members = [0, world - 1]
        group = dist.new_group(members)
        if rank in members:
            t = torch.full((5,), float(rank + 1), device=dev)
            dist.all_reduce(t, group=group)
            c.same("subgroup all_reduce", t, torch.full((5,), float(world + 1)))
            src = torch.full((3,), float(rank), device=dev)
            dist.broadcast(src, group_src=1, group=group)
            c.same("subgroup broadcast from group rank 1", src, torch.full((3,), float(world - 1)))

    c.run("many in flight", many_in_flight)
    c.run("subgroup", subgroup)
    c.run("coalesced", coalesced)
    c.run("premul/reduce/gather/scatter", premul_and_rooted)
    c.run("sparse and mixed bitwise all-reduces", gathered_reductions)
    c.run("unsupported op", unsupported)
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "checks": c.checks, "failures": c.failures}), flush=True)


if __name__ == "__main__":
    main()
