"""monitored_barrier for the pccl backend: which ranks failed to reach it, in gloo's words.

Gloo's monitored barrier is point to point: rank 0 waits for a message from every
other rank, then answers each. pccl has no point-to-point path to lean on here, so the
barrier is one all-gather of a one-byte arrival flag with the barrier's timeout: every
rank that arrives sends its flag straight to every other at once, so when the op times
out the rows that hold a flag are the ranks that did arrive, and the others are the
ones to report. The messages are gloo's (ProcessGroupGloo::monitoredBarrier), which
torch's tests and users' log scrapers match on. MonitoredBarrierCalls holds
ProcessGroupPccl's monitored_barrier (mixed into it).

torch's `dist.monitored_barrier()` refuses every backend but gloo by name before it asks
the group. `route_dist_monitored_barrier()` (called when the backend registers) wraps it:
a call on a pccl group goes to the group's own method, every other call to torch's
function unchanged."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from pccl_py import PcclError
from pccl_py.torch.contract import GroupCore
from pccl_py.torch.errors import PcclBackendError


def missing_ranks(arrived: Sequence[bool], rank: int) -> list[int]:
    """The ranks whose flag never came, in rank order (never `rank` itself)."""
    return [r for r, ok in enumerate(arrived) if not ok and r != rank]


def failure_message(rank: int, arrived: Sequence[bool], wait_all_ranks: bool, timeout_ms: int) -> str:
    """What a failed monitored barrier raises on `rank` (gloo's messages): rank 0 names
    the first missing rank, or every one with `wait_all_ranks`; another rank says it
    got through but rank 0's side failed (as gloo, whose other ranks only hear from 0)."""
    if rank != 0:
        return (
            f"Rank {rank} successfully reached monitoredBarrier, but received errors while waiting for "
            "send/recv from rank 0. Please check rank 0 logs for faulty rank."
        )
    missing = missing_ranks(arrived, rank)
    if not missing or timeout_ms <= 0:
        return f"Rank {rank} timed out in monitoredBarrier after {timeout_ms} ms."
    if wait_all_ranks:
        names = ", ".join(str(r) for r in missing)
        return f"Ranks {names} failed to pass monitoredBarrier in {timeout_ms} ms"
    return (
        f"Rank {missing[0]} failed to pass monitoredBarrier in {timeout_ms} ms "
        "(use wait_all_ranks=True to report every rank that failed)"
    )


class MonitoredBarrierCalls:
    """ProcessGroupPccl's monitored_barrier."""

    def monitored_barrier(self: GroupCore, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        """A barrier that names the ranks that failed to reach it within `timeout` (a
        timedelta, seconds, or options carrying one; default: the group's), as gloo's
        does: rank 0 raises "Rank r failed to pass monitoredBarrier in T ms" for the
        first missing rank, or "Ranks a, b failed ..." for every one with
        `wait_all_ranks`; another rank that got there raises that it did but rank 0's
        side failed. One all-gather of arrival flags (pccl_py.torch.monitored); a failure
        poisons the group, as any failed collective does. Blocks until it ends."""
        if isinstance(timeout, datetime.timedelta):
            seconds = timeout.total_seconds()
        elif isinstance(timeout, (int, float)):
            seconds = float(timeout)
        else:
            custom = getattr(timeout, "timeout", None)
            seconds = custom.total_seconds() if isinstance(custom, datetime.timedelta) else self._timeout
            if seconds < 0:  # torch's "unset" timeout (a call without one)
                seconds = self._timeout
        timeout_ms = round(seconds * 1000)

        def run() -> list[torch.Tensor]:
            if seconds <= 0:
                raise PcclBackendError(failure_message(self._rank, [], wait_all_ranks, 0))
            order = self._ring_ranks(seconds)
            rows = torch.zeros(self._size, dtype=torch.uint8)
            rows[order.index(self._rank)] = 1
            try:
                info = self._comm.all_gather(
                    rows[order.index(self._rank)].reshape(1).clone(), out=rows, tag=self._tag, timeout=seconds
                )
            except PcclError as exc:
                arrived = [bool(rows[order.index(r)]) for r in range(self._size)]
                raise PcclBackendError(
                    failure_message(self._rank, arrived, wait_all_ranks, timeout_ms) + f" ({exc})"
                ) from exc
            self._check_world(info.world_size)
            return []

        self._submit(run).wait()


def route_dist_monitored_barrier(backend: str) -> None:
    """Makes `torch.distributed.monitored_barrier(group, timeout, wait_all_ranks)` work on
    groups of `backend`: torch's function raises ValueError for any backend but gloo, by
    name, before the group is asked. The wrapper sends a call on such a group (the
    default one when `group` is None) to the group's `monitored_barrier`, and every
    other call (another backend, a rank outside the group) to torch's function.
    A timeout given in seconds is taken as such. Idempotent."""
    original: Callable[..., Any] = distributed_c10d.monitored_barrier
    if getattr(original, "__pccl_backend__", None) == backend:
        return

    @functools.wraps(original)
    def monitored_barrier(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> Any:
        if distributed_c10d._rank_not_in_group(group) or dist.get_backend(group) != backend:
            return original(group, timeout, wait_all_ranks)
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=timeout)
        target: Any = group if group is not None else distributed_c10d._get_default_group()
        return target.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)

    monitored_barrier.__pccl_backend__ = backend  # type: ignore[attr-defined]
    distributed_c10d.monitored_barrier = monitored_barrier
    dist.monitored_barrier = monitored_barrier
