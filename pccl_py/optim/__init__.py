"""Optimisers built on pccl_py: DiLoCo and its one-step-delayed variant."""

from pccl_py.optim.diloco import AsyncDiLoCo, DiLoCo, OuterStepInfo

__all__ = ["AsyncDiLoCo", "DiLoCo", "OuterStepInfo"]
