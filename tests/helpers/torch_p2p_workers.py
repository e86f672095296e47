"""Rank entry point for tests/integration/test_torch_p2p.py: point-to-point of the
"pccl" backend (or gloo, --backend) checked against locally computed values.

    python tests/helpers/torch_p2p_workers.py [--backend pccl|gloo] [--big-mib 64]

Started once per rank with torchrun's environment (pccl_py.tools.torch_bench.start). Prints
one JSON line: {"rank", "checks", "failures": [...]}; exits 0 even when checks fail so
the test can show every failure at once.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.distributed as dist

import torch_workers  # the same directory (run as a script)

import pccl_py.torch  # noqa: F401  (registers "pccl")
from pccl_py.torch.errors import PcclBackendError


def payload(src: int, dst: int, n: int, salt: int = 0) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) * 31 + src * 1000 + dst * 7 + salt).to(torch.float32)


class Checker(torch_workers.Checker):
    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks += 1
        if not ok:
            self.failures.append(f"rank {self.rank} {what}: {detail}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="pccl")
    parser.add_argument("--big-mib", type=int, default=64)
    args = parser.parse_args()
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    c = Checker(rank)

    def ping_pong() -> None:
        x = torch.zeros(1000)
        for i in range(5):
            if rank == 0:
                dist.send(payload(0, 1, 1000, i), 1)
                dist.recv(x, 1)
                c.check("ping-pong reply", torch.equal(x, payload(1, 0, 1000, i)))
            elif rank == 1:
                dist.recv(x, 0)
                c.check("ping-pong request", torch.equal(x, payload(0, 1, 1000, i)))
                dist.send(payload(1, 0, 1000, i), 0)

    def both_ways_big() -> None:
        n = args.big_mib * (1 << 20) // 4
        out = torch.zeros(n)
        s = dist.isend(payload(rank, nxt, n), nxt)
        r = dist.irecv(out, prv)
        r.wait()
        s.wait()
        c.check("isend/irecv 64 MiB", torch.equal(out, payload(prv, rank, n)))
        c.check("is_completed", s.is_completed() and r.is_completed())

    def any_source() -> None:
        if rank == 0:
            seen = set()
            for _ in range(world - 1):
                x = torch.zeros(64)
                src = dist.recv(x, tag=11)
                seen.add(src)
                c.check("any-source payload", torch.equal(x, payload(src, 0, 64)), f"from {src}")
            c.check("any-source ranks", seen == set(range(1, world)), str(seen))
            # irecv from any: the Work names the sender, get_future completes.
            x = torch.zeros(8)
            w = dist.irecv(x, tag=12)
            fut = w.get_future()
            w.wait()
            c.check("_source_rank", w._source_rank() == 1, str(w._source_rank()))
            fut.wait()
            c.check("future done", fut.done())
        else:
            dist.send(payload(rank, 0, 64), 0, tag=11)
            if rank == 1:
                dist.send(payload(1, 0, 8), 0, tag=12)

    def batch_ring() -> None:
        out = torch.zeros(333, dtype=torch.float64)
        ops = [
            dist.P2POp(dist.irecv, out, prv),
            dist.P2POp(dist.isend, payload(rank, nxt, 333).double(), nxt),
        ]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        c.check("batch_isend_irecv ring", torch.equal(out, payload(prv, rank, 333).double()))

    def around_collectives() -> None:
        # A send posted before an all-reduce, its receive after: the send must not
        # queue behind the all-reduce.
        out = torch.zeros(16)
        s = dist.isend(payload(rank, nxt, 16), nxt, tag=3)
        t = torch.ones(4)
        dist.all_reduce(t)
        dist.recv(out, prv, tag=3)
        s.wait()
        c.check("send around all_reduce", torch.equal(out, payload(prv, rank, 16)) and bool((t == world).all()))

    def non_contiguous() -> None:
        out = torch.zeros(6, 8).t()  # strided (8 x 6)
        dist.barrier()
        s = dist.isend(payload(rank, nxt, 48).reshape(6, 8).t(), nxt, tag=4)  # strided source too
        dist.recv(out, prv, tag=4)
        s.wait()
        c.check("strided", torch.equal(out, payload(prv, rank, 48).reshape(6, 8).t()))

    def mismatch() -> None:
        if rank > 1:
            return
        x = torch.zeros(10 if rank == 0 else 12)
        try:
            if rank == 0:
                dist.send(x, 1, tag=9)
            else:
                dist.recv(x, 0, tag=9)
        except RuntimeError as exc:
            ok = args.backend == "gloo" or (isinstance(exc, PcclBackendError) and "ProtocolError" in repr(exc.__cause__))
            c.check("mismatch error type", ok, f"{type(exc).__name__}: {exc!r} cause {exc.__cause__!r}")
        else:
            c.check("mismatch raises", False, "no error")

    for name, fn in [
        ("ping_pong", ping_pong),
        ("both_ways_big", both_ways_big),
        ("any_source", any_source),
        ("batch_ring", batch_ring),
        ("around_collectives", around_collectives),
        ("non_contiguous", non_contiguous),
    ]:
        c.run(name, fn)
    if args.backend == "pccl":
        c.run("mismatch", mismatch)
        # The group still works after the mismatch (it poisons nothing).
        def after() -> None:
            t = torch.ones(2)
            dist.all_reduce(t)
            c.check("all_reduce after mismatch", bool((t == world).all()))

        c.run("after", after)
    print(json.dumps({"rank": rank, "checks": c.checks, "failures": c.failures}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
