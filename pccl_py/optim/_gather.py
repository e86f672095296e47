"""All-gather of equal-size uint8 payloads for the compressed outer step.

STAND-IN, TO BE REMOVED when the native Communicator.all_gather merges: all_gather()
calls `comm.all_gather` when the Communicator has it, and otherwise emulates it with a
SUM all-reduce of a zero (world, header + n) uint8 matrix in which each peer fills its
own row. The sum is exact (one nonzero contributor per byte). Each row starts with a
header (marker 1, the rank and the epoch its writer laid it out for), and the result
is accepted only when every row carries marker 1, its own rank and the epoch the op ran
in: the result is the same bytes on every peer, so every peer takes the same decision.
With retry the all-reduce is retried over the survivors (the Communicator waits for
the new ring); rows laid out for the old epoch then show in the headers, and peers
that laid out rows for different epochs (one learned of a loss first) make the op
fail on all of them (their sizes differ): either way every peer redoes the
all-gather over the current ring.

The emulation sends about 2(N-1)/N x N x n bytes per peer; a real all-gather sends
n x (N-1). GatherInfo.tx_bytes reports the latter (what the native op will send),
GatherInfo.standin_tx_bytes what the emulation actually sent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pccl_py import CollectiveMismatch, ProtocolError, ReduceOp, Timeout

log = logging.getLogger(__name__)

_HEADER = 11  # marker (u8), rank (u16), epoch (u64), little-endian
_MAX_REDOS = 16


@dataclass(frozen=True)
class GatherInfo:
    output: np.ndarray  # (world_size, n) uint8, rows in rank order
    world_size: int
    tx_bytes: int  # what a real all-gather sends: n x (world_size - 1)
    rx_bytes: int
    epoch: int
    standin_tx_bytes: int = 0  # what the stand-in's all-reduce sent


def all_gather(comm: Any, x: np.ndarray, tag: int | None = None, timeout: float | None = None, retry: bool = False) -> Any:
    """`info.output[r]` is rank r's `x` (1-D uint8, the same size on every peer)."""
    native = getattr(comm, "all_gather", None)
    if native is not None:
        return native(x, tag=tag, timeout=timeout, retry=retry)
    return _emulated(comm, np.ascontiguousarray(x, dtype=np.uint8).reshape(-1), tag, timeout, retry)


def _emulated(comm: Any, x: np.ndarray, tag: int | None, timeout: float | None, retry: bool) -> GatherInfo:
    deadline = None if timeout is None else time.monotonic() + timeout
    n = x.size
    sent = 0
    for _ in range(_MAX_REDOS):
        epoch, world, rank = comm.epoch, comm.world_size, comm.rank
        if rank < 0 or rank >= world:
            raise Timeout(f"all-gather: this peer has no rank in epoch {epoch}")
        buf = np.zeros((world, _HEADER + n), np.uint8)
        head = buf[rank, :_HEADER]
        head[0] = 1
        head[1:3] = np.frombuffer(np.uint16(rank).tobytes(), np.uint8)
        head[3:11] = np.frombuffer(np.uint64(epoch).tobytes(), np.uint8)
        buf[rank, _HEADER:] = x
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            info = comm.all_reduce(buf.reshape(-1), op=ReduceOp.SUM, tag=tag, timeout=remaining, retry=retry)
        except (CollectiveMismatch, ProtocolError):
            # Peers read the ring at different epochs and built matrices of different
            # sizes: every peer fails the op; read the ring again.
            if not retry:
                raise
            log.info("all-gather stand-in: peers laid out different worlds; redoing")
            continue
        sent += info.tx_bytes
        heads = buf[:, :_HEADER]
        ranks = heads[:, 1:3].copy().view(np.uint16).reshape(-1)
        epochs = heads[:, 3:11].copy().view(np.uint64).reshape(-1)
        if (
            info.world_size == world
            and bool((heads[:, 0] == 1).all())
            and bool((ranks == np.arange(world)).all())
            and bool((epochs == info.epoch).all())
        ):
            return GatherInfo(
                output=buf[:, _HEADER:].copy(),
                world_size=world,
                tx_bytes=n * (world - 1),
                rx_bytes=n * (world - 1),
                epoch=info.epoch,
                standin_tx_bytes=sent,
            )
        log.info("all-gather stand-in: rows laid out for another epoch than %d; redoing", info.epoch)
    raise Timeout(f"all-gather stand-in: no consistent layout after {_MAX_REDOS} tries")
