"""The byte layout of torch's all-to-all on pccl's (pccl_py.Communicator.all_to_all):
how a tensor's dim-0 splits become per-rank byte blocks, and how blocks of possibly
different sizes travel as pccl's equal blocks, in the pccl ring's order.

pccl's all-to-all moves N equal blocks (block d to ring position d). torch's may differ
per pair (`all_to_all` lists, `all_to_all_single` with split sizes), and a rank knows
only the sizes it sends and receives, not those between two other ranks. So each block
is padded to the largest block of any pair, which the ranks agree on by one 8-byte MAX
all-reduce first (or know without it when every split is even: then every block is the
same size on every rank). Padding costs bytes when the splits are very uneven; it keeps
the exchange one direct, exact, all-or-nothing pccl op instead of N-1 point-to-point
transfers with no common outcome.

AllToAllCalls holds ProcessGroupPccl's all_to_all and all_to_all_single (mixed into it)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from pccl_py import ReduceOp
from pccl_py.torch.contract import GroupCore
from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.staging import Staged, byte_view


def split_bytes(t: torch.Tensor, splits: Sequence[int], world: int, what: str) -> list[torch.Tensor]:
    """Byte views of the parts of `t` (a contiguous host tensor) along dim 0, one per
    rank: `splits` rows each, or world equal parts when `splits` is empty."""
    flat = byte_view(t)
    rows = t.shape[0] if t.dim() > 0 else 1
    row_bytes = t.nbytes // rows if rows else 0
    if not splits:
        if rows % world:
            raise PcclBackendError(f"all_to_all_single: the {what} has {rows} rows, which do not split into {world} ranks")
        splits = [rows // world] * world
    if len(splits) != world or any(s < 0 for s in splits) or sum(splits) != rows:
        raise PcclBackendError(
            f"all_to_all_single: {what}_split_sizes {list(splits)} must be {world} sizes adding up to {rows} rows"
        )
    parts, offset = [], 0
    for s in splits:
        parts.append(flat[offset : offset + s * row_bytes])
        offset += s * row_bytes
    return parts


def pack_blocks(parts_by_rank: Sequence[torch.Tensor], order: Sequence[int], block: int) -> torch.Tensor:
    """pccl's input: ring position p holds the bytes for torch rank order[p], padded to
    `block` bytes (zeros)."""
    buf = torch.zeros(len(order) * block, dtype=torch.uint8)
    for p, r in enumerate(order):
        part = parts_by_rank[r]
        buf[p * block : p * block + part.numel()].copy_(part)
    return buf


def unpack_blocks(buf: torch.Tensor, order: Sequence[int], block: int, outs_by_rank: Sequence[torch.Tensor]) -> None:
    """Copies row p of pccl's output (from torch rank order[p]) into outs_by_rank[order[p]]
    (its first bytes: the rest of the row is padding)."""
    for p, r in enumerate(order):
        out = outs_by_rank[r]
        out.copy_(buf[p * block : p * block + out.numel()])


class AllToAllCalls:
    """ProcessGroupPccl's all_to_all and all_to_all_single (torch names the Python-side
    methods alltoall and all_to_all_single; alltoall_base is the C++ name)."""

    def alltoall(self: GroupCore, output_tensors: Any, input_tensors: Any, opts: Any = None) -> dist.Work:
        """output_tensors[s] receives rank s's input_tensors[self rank] (torch's
        all_to_all): sizes may differ per pair, each must match its peer's."""
        self._check_list(output_tensors, "all_to_all output")
        self._check_list(input_tensors, "all_to_all input")
        sends = [Staged(t) for t in input_tensors]
        recvs = [Staged(t, read=False) for t in output_tensors]
        timeout = self._op_timeout(opts)

        def run() -> list[torch.Tensor]:
            _exchange(self, [byte_view(s.host) for s in sends], [byte_view(r.host) for r in recvs], None, timeout)
            for r in recvs:
                r.commit()
            return list(output_tensors)

        return self._submit(run)

    def alltoall_base(
        self: GroupCore,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> dist.Work:
        """torch's all_to_all_single: `input`'s dim 0 split by input_split_sizes (equal
        parts when empty), part d to rank d; `output`'s by output_split_sizes, part s from
        rank s. Even splits on both sides go straight from `input` into `output` when the
        ring's order is the ranks' (as after the usual rendezvous)."""
        if input.dtype != output.dtype:
            raise PcclBackendError("all_to_all_single: the input and the output must have one dtype")
        src, dst = Staged(input), Staged(output, read=False)
        send = split_bytes(src.host, list(input_split_sizes), self._size, "input")
        recv = split_bytes(dst.host, list(output_split_sizes), self._size, "output")
        even = not input_split_sizes and not output_split_sizes
        timeout = self._op_timeout(opts)

        def run() -> list[torch.Tensor]:
            block = send[0].numel() if even else None  # the same on every rank: no size round
            _exchange(self, send, recv, block, timeout)
            dst.commit()
            return [output]

        return self._submit(run)

    all_to_all_single = alltoall_base


def _exchange(
    group: GroupCore, sends: list[torch.Tensor], recvs: list[torch.Tensor], block: int | None, timeout: float
) -> None:
    """sends[d] (bytes) to torch rank d, recvs[s] from torch rank s: one pccl
    all-to-all of blocks of `block` bytes (None: the largest of any pair, agreed by a
    MAX all-reduce first) laid out by ring position (pack_blocks)."""
    if block is None:
        largest = torch.tensor([max(t.numel() for t in [*sends, *recvs])], dtype=torch.int64)
        group._all_reduce(largest, ReduceOp.MAX, timeout)
        block = int(largest.item())
    if block == 0:
        return  # every rank knows: nothing to move
    order = group._ring_ranks(timeout)
    whole = [t.numel() == block for t in [*sends, *recvs]]
    if all(whole) and order == list(range(group._size)) and _consecutive(sends) and _consecutive(recvs):
        src = sends[0].as_strided((group._size * block,), (1,))
        dst = recvs[0].as_strided((group._size * block,), (1,))
        info = group._comm.all_to_all(src, out=dst, tag=group._tag, timeout=timeout)
        group._check_world(info.world_size)
        return
    out = torch.empty(group._size * block, dtype=torch.uint8)
    info = group._comm.all_to_all(pack_blocks(sends, order, block), out=out, tag=group._tag, timeout=timeout)
    group._check_world(info.world_size)
    unpack_blocks(out, order, block, recvs)


def _consecutive(parts: Sequence[torch.Tensor]) -> bool:
    """Whether `parts` (flat uint8 tensors) lie back to back in one piece of memory."""
    return all(
        b.data_ptr() == a.data_ptr() + a.numel() and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        for a, b in itertools.pairwise(parts)
    )
