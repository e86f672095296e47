"""monitored_barrier for the pccl backend: which ranks failed to reach it, in gloo's words.

Gloo's monitored barrier is point to point: rank 0 waits for a message from every
other rank, then answers each. pccl has no point-to-point path to lean on here, so the
barrier is one all-gather of a one-byte arrival flag with the barrier's timeout: every
rank that arrives sends its flag straight to every other at once, so when the op times
out the rows that hold a flag are the ranks that did arrive, and the others are the
ones to report. The messages are gloo's (ProcessGroupGloo::monitoredBarrier), which
torch's tests and users' log scrapers match on."""

from __future__ import annotations

from collections.abc import Sequence


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
