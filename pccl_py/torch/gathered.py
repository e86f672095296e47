"""The reductions the pccl backend runs itself over an all-gather, where the engine has
no kernel: BAND/BOR/BXOR on integer tensors and SUM of a sparse COO tensor (mixed into
ProcessGroupPccl). Both are exact and reduce in rank order, so every rank ends with the
same bytes; both move (N-1) x the bytes where an all-reduce moves 2(N-1)/N x, which is
fine for the masks, flags and sparse updates they carry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pccl_py.torch.contract import GroupCore
from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.ops import bit_pattern_dtype
from pccl_py.torch.staging import Staged, byte_view


class GatheredReductions:
    """ProcessGroupPccl's bitwise and sparse all-reduces (allreduce_coalesced routes them here)."""

    def _bitwise_all_reduce(
        self: GroupCore, tensors: list[torch.Tensor], staged: list[Staged], fn: Callable[..., torch.Tensor], timeout: float
    ) -> dist.Work:
        """BAND/BOR/BXOR on integer tensors: the engine's kernels do not have them, so one
        all-gather of this rank's tensors (as bytes), each reduced here in rank order.
        Exact, so every rank ends with the same bytes; it moves (N-1) x the bytes where
        an all-reduce moves 2(N-1)/N x, which is fine for the masks and flags these ops
        carry."""

        def run() -> list[torch.Tensor]:
            mine = torch.cat([byte_view(s.host) for s in staged])
            rows = self._all_gather(mine, None, timeout)
            offset = 0
            for s in staged:
                n = s.host.nbytes
                dtype = bit_pattern_dtype(s.host.dtype)
                parts = [_typed(row[offset : offset + n], dtype) for row in rows]
                acc = parts[0].clone()
                for part in parts[1:]:
                    fn(acc, part, out=acc)
                byte_view(s.host).copy_(acc.view(torch.uint8))
                s.commit()
                offset += n
            return tensors

        return self._submit(run)

    def _sparse_all_reduce(self: GroupCore, tensors: list[torch.Tensor], red: Any, timeout: float) -> dist.Work:
        """SUM of one sparse COO CPU tensor (what gloo's sparse all-reduce takes): every
        rank's nonzero count, then one all-gather of its indices and values padded to the
        largest count, then the sum of all N here (concatenated in rank order and
        coalesced: the same steps on the same bytes on every rank), copied into the
        tensor, which may change its number of nonzeros."""
        if (red.op if hasattr(red, "op") else red) != dist.ReduceOp.SUM:
            raise PcclBackendError(f"sparse all_reduce supports SUM only (as gloo), got {red}")
        if len(tensors) != 1 or not tensors[0].is_sparse or tensors[0].device.type != "cpu":
            raise PcclBackendError("sparse all_reduce takes one sparse COO CPU tensor")
        target = tensors[0]

        def run() -> list[torch.Tensor]:
            mine = target.coalesce()
            indices, values = mine.indices(), mine.values().contiguous()
            counts = [int(row[0]) for row in self._all_gather(torch.tensor([mine._nnz()]), None, timeout)]
            most = max(counts)
            padded_indices = torch.zeros((indices.shape[0], most), dtype=torch.int64)
            padded_indices[:, : indices.shape[1]] = indices
            padded_values = torch.zeros((most, *values.shape[1:]), dtype=values.dtype)
            padded_values[: values.shape[0]] = values
            index_bytes = padded_indices.nbytes
            rows = self._all_gather(torch.cat([byte_view(padded_indices), byte_view(padded_values)]), None, timeout)
            all_indices, all_values = [], []
            for count, row in zip(counts, rows, strict=True):
                all_indices.append(_typed(row[:index_bytes], torch.int64).reshape(padded_indices.shape)[:, :count])
                all_values.append(_typed(row[index_bytes:], values.dtype).reshape(padded_values.shape)[:count])
            total = torch.sparse_coo_tensor(torch.cat(all_indices, 1), torch.cat(all_values), mine.shape).coalesce()
            with torch.no_grad():
                target.copy_(total)
            return [target]

        return self._submit(run)


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`raw` (bytes, a slice of a gathered row) as `dtype`: viewed in place when its
    offset suits the dtype's alignment, else copied first (a row starts wherever the
    previous rows' bytes end)."""
    size = torch.empty(0, dtype=dtype).element_size()
    if raw.storage_offset() % size:
        raw = raw.clone()
    return raw.view(dtype)

