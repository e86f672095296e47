"""Peer processes for tests/integration/test_compression.py: back-to-back all-gathers
of compressed payloads (Communicator.all_gather, pccl_py.optim.codec) and their decoded
sum, one record per op through the peer's own pipe, until the group shrinks.

Payloads are deterministic (`payload_for`), so the test recomputes the exact sum of
any set of contributors in any rank order and compares checksums of the bytes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from peer_workers import checksum

import pccl_py as pccl
from pccl_py.optim.codec import Codec
from pccl_py.testing import join_group


def payload_for(codec: Codec, index: int, op: int) -> np.ndarray:
    """Peer `index`'s payload at op `op`: a seeded normal vector, encoded."""
    x = torch.randn(codec.numel, generator=torch.Generator().manual_seed(1000 * index + op))
    return codec.encode(x)[0]


def gather_loop_worker(
    master: str,
    index: int,
    out: Any,
    *,
    records: Any,
    world: int,
    numel: int,
    compression: dict[str, Any],
    max_ops: int = 200,
    op_timeout: float = 30.0,
) -> None:
    """Reports {"event": "ready"}, then per op {"index", "op", "world", "epoch",
    "owners" (whose payload each row is, rank order), "crc" (of the decoded sum),
    "weight", "tx"}; after the first op with fewer than `world` rows it stops."""
    emit = records.send
    torch.set_num_threads(1)
    comm = pccl.Communicator(master, name=f"gather-{index}")
    try:
        comm.connect(timeout=60)
        join_group(comm, world, timeout=60)
        emit({"index": index, "event": "ready", "pid": os.getpid()})
        codec = Codec(numel, pccl.Compression(**compression))
        for op in range(max_ops):
            rec: dict[str, Any] = {"index": index, "op": op, "t_start": time.time()}
            try:
                info = comm.all_gather(payload_for(codec, index, op), timeout=op_timeout, retry=True)
            except Exception as exc:  # noqa: BLE001 - reported to the test, whatever it is
                emit({**rec, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                break
            rows = np.asarray(info.output)
            mine = {j: payload_for(codec, j, op) for j in range(world)}
            owners = [next((j for j, p in mine.items() if np.array_equal(p, row)), -1) for row in rows]
            total, weight = codec.decode_sum(rows)
            emit(
                {
                    **rec,
                    "ok": True,
                    "world": info.world_size,
                    "epoch": info.epoch,
                    "owners": owners,
                    "crc": checksum(total),
                    "weight": weight,
                    "tx": info.tx_bytes,
                    "t_end": time.time(),
                }
            )
            if info.world_size < world:
                break
        emit({"index": index, "event": "done"})
    except BaseException as exc:
        emit({"index": index, "event": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        comm.close()
