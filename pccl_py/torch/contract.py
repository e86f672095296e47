"""The contract between ProcessGroupPccl (pccl_py.torch.process_group) and the call
groups mixed into it (pccl_py.torch.exchange, .gathered, .monitored, .p2p): what each may use
of the group. ProcessGroupPccl implements all of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pccl_py import Communicator, ReduceOp


class GroupCore(Protocol):
    _comm: Communicator
    _rank: int
    _size: int
    _timeout: float
    _closed: bool
    _peer_ranks: dict[int, int] | None  # pccl peer id -> torch rank

    @property
    def _failure(self) -> BaseException | None: ...

    def _check_rank(self, root: int) -> None: ...

    def _submit(self, run: Callable[[], list[torch.Tensor]], tensors: Sequence[Any] | None = None) -> dist.Work: ...

    @property
    def _tag(self) -> int:
        """The pccl tag of the collective the calling runner thread runs (dispatch.py)."""
        ...

    def _all_reduce(self, buf: torch.Tensor, op: ReduceOp, timeout: float) -> None: ...

    def _all_gather(self, mine: torch.Tensor, out: torch.Tensor | None, timeout: float) -> list[torch.Tensor]: ...

    def _ring_ranks(self, timeout: float) -> list[int]: ...

    def _check_world(self, contributors: int) -> None: ...

    def _op_timeout(self, opts: Any) -> float: ...

    def _check_list(self, tensors: Sequence[torch.Tensor], what: str) -> None: ...
