"""One rank of tests/integration/test_torch_backend.py's monitored_barrier check
(started as torchrun would). Prints one JSON report: {"rank", "checks", "failures"}.

1. Every rank reaches the group's monitored_barrier (also with wait_all_ranks): it passes.
2. In a fresh group only rank 0 calls it, with wait_all_ranks: rank 0 names every
   other rank ("Ranks 1, 2 failed to pass monitoredBarrier").
3. In another fresh group every rank but 1 calls it: rank 0 names rank 1 alone, the
   others say they got there but rank 0's side failed (gloo's words).
A failed monitored barrier poisons its group, so each failing case gets its own.
"""

from __future__ import annotations

import datetime
import json
import re

import torch.distributed as dist

import pccl_py.torch  # noqa: F401  (registers "pccl")


def main() -> None:
    dist.init_process_group("pccl", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    failures: list[str] = []
    checks = 0

    def expect_error(what: str, pattern: str, fn: object) -> None:
        nonlocal checks
        checks += 1
        try:
            fn()  # type: ignore[operator]
        except RuntimeError as exc:
            if not re.search(pattern, str(exc)):
                failures.append(f"rank {rank} {what}: {exc!s:.300} does not match {pattern!r}")
        else:
            failures.append(f"rank {rank} {what}: did not raise")

    second = datetime.timedelta(seconds=1)
    world_pg = dist.group.WORLD
    world_pg.monitored_barrier(datetime.timedelta(seconds=20))
    world_pg.monitored_barrier(datetime.timedelta(seconds=20), wait_all_ranks=True)
    checks += 2

    everyone_else = dist.new_group(list(range(world)))
    if rank == 0:
        names = ", ".join(str(r) for r in range(1, world))
        expect_error("wait_all_ranks", f"Ranks {names} failed to pass monitoredBarrier",
                     lambda: everyone_else.monitored_barrier(second, wait_all_ranks=True))
    dist.barrier()

    one_missing = dist.new_group(list(range(world)))
    if rank == 0:
        expect_error("first missing", "Rank 1 failed to pass monitoredBarrier",
                     lambda: one_missing.monitored_barrier(2 * second))
    elif rank != 1:
        expect_error("another rank", f"Rank {rank} successfully reached monitoredBarrier, but received errors "
                     "while waiting for send/recv from rank 0", lambda: one_missing.monitored_barrier(2 * second))
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "checks": checks, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
