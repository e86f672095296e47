"""A small transformer language model trained with pccl_py (DiLoCo and baselines)."""
