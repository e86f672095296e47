"""How torch's reduce ops and dtypes map onto pccl's: which dtypes the engine reduces,
which ReduceOp a torch op becomes (bool tensors reduce their 0/1 bytes with MIN/MAX), and
PREMUL_SUM's factor, and the bitwise ops the backend runs on integers itself. Everything
unsupported is refused with a PcclBackendError."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pccl_py import ReduceOp
from pccl_py.torch.errors import PcclBackendError

# RedOpType's members exist only at run time (torch's stubs do not list them).
_RedOp: Any = dist.ReduceOp.RedOpType
_OPS: dict[Any, ReduceOp] = {
    _RedOp.SUM: ReduceOp.SUM,
    _RedOp.AVG: ReduceOp.AVG,
    _RedOp.PRODUCT: ReduceOp.PROD,
    _RedOp.MIN: ReduceOp.MIN,
    _RedOp.MAX: ReduceOp.MAX,
}
# Logical ops on bool tensors reduce their uint8 view (0/1) with MIN/MAX.
_BOOL_OPS: dict[Any, ReduceOp] = {
    _RedOp.SUM: ReduceOp.MAX,
    _RedOp.MAX: ReduceOp.MAX,
    _RedOp.BOR: ReduceOp.MAX,
    _RedOp.PRODUCT: ReduceOp.MIN,
    _RedOp.MIN: ReduceOp.MIN,
    _RedOp.BAND: ReduceOp.MIN,
}
# dtypes the engine reduces natively; every dtype works for the byte-moving collectives.
REDUCE_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


# Bitwise ops on integer tensors: the engine's kernels lack them, so the backend gathers
# the tensors and applies these in rank order (ProcessGroupPccl._bitwise_all_reduce).
_BITWISE: dict[Any, Callable[..., torch.Tensor]] = {
    _RedOp.BAND: torch.bitwise_and,
    _RedOp.BOR: torch.bitwise_or,
    _RedOp.BXOR: torch.bitwise_xor,
}
_INTEGER_DTYPES = tuple(d for d in REDUCE_DTYPES if not d.is_floating_point)


def bitwise_op(red: Any, dtypes: Sequence[torch.dtype]) -> Callable[..., torch.Tensor] | None:
    """torch's function for `red` when it is BAND/BOR/BXOR over integer tensors (every
    one of `dtypes`); None for any other op, and for bool tensors, which reduce_op maps
    onto MIN/MAX. PcclBackendError for a bitwise op on floating-point tensors."""
    kind = red.op if hasattr(red, "op") else red
    if kind not in _BITWISE or all(d == torch.bool for d in dtypes):
        return None
    if any(d not in _INTEGER_DTYPES for d in dtypes):
        raise PcclBackendError(f"{kind} needs integer tensors, got {sorted({str(d) for d in dtypes})}")
    return _BITWISE[kind]


_SIGNED_TWIN = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def bit_pattern_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dtype of the same width whose bitwise kernels torch has (it lacks them for
    uint16..uint64): bitwise ops act on bit patterns, so a view of it gives the same bits."""
    return _SIGNED_TWIN.get(dtype, dtype)


def reduce_op(red: Any, dtype: torch.dtype) -> ReduceOp:
    """The pccl ReduceOp that does torch's `red` on `dtype`; PcclBackendError if none does."""
    kind = red.op if hasattr(red, "op") else red
    if dtype == torch.bool:
        if kind in _BOOL_OPS:
            return _BOOL_OPS[kind]
        raise PcclBackendError(f"the pccl backend cannot reduce bool tensors with {kind}")
    if dtype not in REDUCE_DTYPES:
        raise PcclBackendError(f"the pccl backend cannot reduce {dtype} tensors")
    if kind == _RedOp.PREMUL_SUM:
        if not dtype.is_floating_point:
            raise PcclBackendError("PREMUL_SUM needs a floating-point tensor")
        premul_factor(red)  # rejected before queueing where torch hides the factor
        return ReduceOp.SUM
    if kind == _RedOp.AVG and not dtype.is_floating_point:
        raise PcclBackendError("AVG needs a floating-point tensor (as with NCCL)")
    try:
        return _OPS[kind]
    except KeyError:
        raise PcclBackendError(
            f"the pccl backend does not support {kind} (supported: SUM, AVG, PRODUCT, MIN, MAX, PREMUL_SUM)"
        ) from None


def premul_factor(red: Any) -> float | None:
    """PREMUL_SUM's factor (the tensor is scaled by it, then summed); None for other ops."""
    if getattr(red, "op", None) != _RedOp.PREMUL_SUM:
        return None
    if not hasattr(red, "factor"):
        raise PcclBackendError(
            f"PREMUL_SUM: this torch ({torch.__version__}) does not expose the op's factor to Python "
            "backends (ReduceOp.factor); scale the tensor and use SUM instead"
        )
    factor = red.factor
    return float(factor.item() if isinstance(factor, torch.Tensor) else factor)
