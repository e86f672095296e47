"""Host staging of the tensors a collective reads and writes. The engine reduces
contiguous host memory; a tensor elsewhere (CUDA) or non-contiguous is copied to host
when the op is issued and copied back before its Work completes. Also the byte views and
the dtype grouping the collectives build on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pccl_py.torch.errors import PcclBackendError


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's memory."""
    return t.detach().reshape(-1).view(torch.uint8)


class Staged:
    """A tensor's host-memory, contiguous counterpart. For a contiguous CPU tensor it is
    the tensor itself; otherwise a host copy made now (on the caller's thread, so a CUDA
    tensor is read after the kernels that produce it), written back by commit()."""

    def __init__(self, t: torch.Tensor, read: bool = True) -> None:
        if t.device.type not in ("cpu", "cuda"):
            raise PcclBackendError(f"the pccl backend supports CPU and CUDA tensors, not {t.device}")
        self.target = t
        self.direct = t.device.type == "cpu" and t.is_contiguous()
        if self.direct:
            self.host = t.detach()
        elif read:
            self.host = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format).contiguous()
        else:
            self.host = torch.empty(t.shape, dtype=t.dtype)

    def commit(self) -> None:
        if not self.direct:
            with torch.no_grad():
                self.target.copy_(self.host)


def by_dtype(staged: Sequence[Any]) -> list[list[Any]]:
    """Groups staged tensors by dtype, in first-seen order."""
    groups: dict[torch.dtype, list[Any]] = {}
    for s in staged:
        groups.setdefault(s.host.dtype, []).append(s)
    return list(groups.values())


def split_into(buf: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
    """Copies consecutive pieces of `buf` into `parts`, in order."""
    offset = 0
    for part in parts:
        part.copy_(buf[offset : offset + part.numel()])
        offset += part.numel()
