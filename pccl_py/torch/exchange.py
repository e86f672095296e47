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
transfers with no common outcome."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.staging import byte_view


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
