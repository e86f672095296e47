"""Optimisers built on pccl_py: DiLoCo, its compressed outer step (Compression), its
one-step-delayed variant and Streaming DiLoCo (needs the `torch` extra)."""

try:
    import torch  # noqa: F401
except ImportError as exc:  # the core runs without torch; this part does not
    raise ImportError("pccl_py.optim needs torch: pip install 'pccl_py[torch]' (pin a CPU or CUDA build first)") from exc

from pccl_py import Compression
from pccl_py.optim.diloco import AsyncDiLoCo, DiLoCo, OuterStepInfo
from pccl_py.optim.streaming import StreamingDiLoCo

__all__ = ["AsyncDiLoCo", "Compression", "DiLoCo", "OuterStepInfo", "StreamingDiLoCo"]
