"""The pure parts of the pccl backend's all-to-all, monitored barrier and bitwise
all-reduce (pccl_py.torch.exchange, .monitored, .ops): split sizes to byte blocks,
padding to pccl's equal blocks in ring order and back, gloo's barrier messages, and
which ops the backend gathers and reduces itself."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pccl_py.torch import PcclBackendError
from pccl_py.torch.exchange import pack_blocks, split_bytes, unpack_blocks
from pccl_py.torch.monitored import failure_message, missing_ranks
from pccl_py.torch.ops import bit_pattern_dtype, bitwise_op


def test_split_bytes_by_rows_or_evenly() -> None:
    t = torch.arange(12, dtype=torch.int16).reshape(6, 2)  # 4 bytes a row
    parts = split_bytes(t, [1, 0, 5], 3, "input")
    assert [p.numel() for p in parts] == [4, 0, 20]
    assert torch.equal(parts[2].view(torch.int16), torch.arange(2, 12, dtype=torch.int16))
    assert [p.numel() for p in split_bytes(t, [], 3, "input")] == [8, 8, 8]
    with pytest.raises(PcclBackendError, match="do not split"):
        split_bytes(t, [], 4, "input")
    with pytest.raises(PcclBackendError, match="adding up to 6"):
        split_bytes(t, [1, 1, 1], 3, "output")
    with pytest.raises(PcclBackendError, match="3 sizes"):
        split_bytes(t, [6], 3, "output")


def test_blocks_are_padded_and_laid_out_by_ring_position() -> None:
    order = [2, 0, 1]  # ring position p holds torch rank order[p]
    parts = [torch.tensor([10], dtype=torch.uint8), torch.tensor([20, 21], dtype=torch.uint8),
             torch.tensor([], dtype=torch.uint8)]
    buf = pack_blocks(parts, order, 3)
    assert buf.tolist() == [0, 0, 0, 10, 0, 0, 20, 21, 0]
    outs = [torch.empty(2, dtype=torch.uint8), torch.empty(1, dtype=torch.uint8), torch.empty(3, dtype=torch.uint8)]
    unpack_blocks(torch.arange(9, dtype=torch.uint8), order, 3, outs)
    assert outs[2].tolist() == [0, 1, 2] and outs[0].tolist() == [3, 4] and outs[1].tolist() == [6]


def test_monitored_barrier_messages_are_gloos() -> None:
    arrived = [True, False, True, False]
    assert missing_ranks(arrived, 0) == [1, 3]
    assert failure_message(0, arrived, True, 100).startswith("Ranks 1, 3 failed to pass monitoredBarrier in 100 ms")
    assert failure_message(0, arrived, False, 100).startswith("Rank 1 failed to pass monitoredBarrier in 100 ms")
    assert failure_message(0, [], False, 0) == "Rank 0 timed out in monitoredBarrier after 0 ms."
    assert failure_message(2, arrived, False, 100).startswith(
        "Rank 2 successfully reached monitoredBarrier, but received errors while waiting for send/recv from rank 0"
    )


def test_bitwise_ops_are_run_by_the_backend_on_integers_only() -> None:
    red = dist.ReduceOp
    assert bitwise_op(red(red.BXOR), [torch.int32, torch.uint64]) is torch.bitwise_xor
    assert bitwise_op(red(red.BAND), [torch.int8]) is torch.bitwise_and
    assert bitwise_op(red(red.BOR), [torch.bool]) is None  # bool: MAX over 0/1 (reduce_op)
    assert bitwise_op(red(red.SUM), [torch.int32]) is None
    with pytest.raises(PcclBackendError, match="integer"):
        bitwise_op(red(red.BOR), [torch.float32])
    assert bit_pattern_dtype(torch.uint32) == torch.int32 and bit_pattern_dtype(torch.int8) == torch.int8
