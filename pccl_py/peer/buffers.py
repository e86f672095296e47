"""Zero-copy views of user tensors for the native engine.

numpy arrays pass through as they are; torch CPU tensors become numpy views of the
same memory (bfloat16, which numpy lacks, is viewed as int16 and tagged BFLOAT16).
Device (CUDA) tensors are staged through pinned host memory (stage_to_host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pccl_py import _native
from pccl_py.errors import InvalidArgument

_NUMPY_TO_NATIVE: dict[np.dtype[Any], _native.DataType] = {
    np.dtype(np.float16): _native.DataType.FLOAT16,
    np.dtype(np.float32): _native.DataType.FLOAT32,
    np.dtype(np.float64): _native.DataType.FLOAT64,
    np.dtype(np.int8): _native.DataType.INT8,
    np.dtype(np.int16): _native.DataType.INT16,
    np.dtype(np.int32): _native.DataType.INT32,
    np.dtype(np.int64): _native.DataType.INT64,
    np.dtype(np.uint8): _native.DataType.UINT8,
    np.dtype(np.uint16): _native.DataType.UINT16,
    np.dtype(np.uint32): _native.DataType.UINT32,
    np.dtype(np.uint64): _native.DataType.UINT64,
}


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def native_view(x: Any) -> tuple[np.ndarray, _native.DataType]:
    """Returns (numpy view sharing x's memory, native dtype). Raises InvalidArgument for
    non-contiguous, non-CPU or unsupported tensors."""
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise InvalidArgument("array must be C-contiguous")
        try:
            return x, _NUMPY_TO_NATIVE[x.dtype]
        except KeyError:
            raise InvalidArgument(f"unsupported dtype {x.dtype}") from None
    if is_torch_tensor(x):
        import torch

        if x.device.type != "cpu":
            raise InvalidArgument(f"tensor on {x.device} must be staged to host memory first (stage_to_host)")
        if not x.is_contiguous():
            raise InvalidArgument("tensor must be contiguous")
        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), _native.DataType.BFLOAT16
        if t.dtype == torch.bool or t.is_complex():
            raise InvalidArgument(f"unsupported dtype {t.dtype}")
        view = t.numpy()
        return native_view(view)
    raise InvalidArgument(f"expected a numpy array or a torch CPU tensor, got {type(x).__name__}")


def is_device_tensor(x: Any) -> bool:
    """A torch tensor that does not live in host memory (CUDA)."""
    return is_torch_tensor(x) and x.device.type != "cpu"


def stage_to_host(x: Any, out: Any) -> tuple[Any, Any, Callable[[], None] | None]:
    """Device tensors go through pinned host memory: returns (host x, host out,
    copy_back). copy_back() writes the host result into the device tensor that receives
    it (x in place, or out); it is None when nothing lives on a device. The device
    tensors are untouched until copy_back(), so a failed op leaves them as they were."""
    if not is_device_tensor(x) and not is_device_tensor(out):
        return x, out, None
    in_place = out is None or out is x
    x_host = _pinned_copy(x) if is_device_tensor(x) else x
    if in_place:
        out_host, target = x_host, x
    elif is_device_tensor(out):
        if not out.is_contiguous():
            raise InvalidArgument("out must be contiguous")
        out_host, target = pinned_empty(out), out
    else:
        out_host, target = out, None
    if target is None:
        return x_host, out_host, None

    def copy_back() -> None:
        target.copy_(out_host.view_as(target))

    return x_host, out_host, copy_back


def pinned_empty(t: Any) -> Any:
    import torch

    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def _pinned_copy(t: Any) -> Any:
    if not t.is_contiguous():
        raise InvalidArgument("tensor must be contiguous")
    host = pinned_empty(t)
    host.copy_(t.detach())
    return host
