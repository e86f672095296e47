"""Optimisers built on pccl_py: DiLoCo and its one-step-delayed variant (needs the
`torch` extra)."""

try:
    import torch  # noqa: F401
except ImportError as exc:  # the core runs without torch; this part does not
    raise ImportError("pccl_py.optim needs torch: pip install 'pccl_py[torch]' (pin a CPU or CUDA build first)") from exc

from pccl_py.optim.diloco import AsyncDiLoCo, DiLoCo, OuterStepInfo

__all__ = ["AsyncDiLoCo", "DiLoCo", "OuterStepInfo"]
