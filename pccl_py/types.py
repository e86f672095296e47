"""Small public value types: reduction operators and op results."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pccl_py import _native


class ReduceOp(enum.Enum):
    SUM = "sum"
    AVG = "avg"
    PROD = "prod"
    MIN = "min"
    MAX = "max"

    @property
    def native(self) -> _native.ReduceOp:
        return _NATIVE_OPS[self]


_NATIVE_OPS = {
    ReduceOp.SUM: _native.ReduceOp.SUM,
    ReduceOp.AVG: _native.ReduceOp.AVG,
    ReduceOp.PROD: _native.ReduceOp.PROD,
    ReduceOp.MIN: _native.ReduceOp.MIN,
    ReduceOp.MAX: _native.ReduceOp.MAX,
}


@dataclass(frozen=True)
class ReduceInfo:
    """What a successful all-reduce did."""

    world_size: int  # peers that contributed
    tx_bytes: int
    rx_bytes: int
    epoch: int  # the epoch it succeeded in
    attempts: int  # 1 unless it was retried over the survivors
    contributors: tuple[int, ...] = ()  # peer ids whose input is in the result, ring order
