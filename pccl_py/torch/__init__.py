"""The torch.distributed backend "pccl". Importing this package registers it (and the
`pccl://` rendezvous scheme); `import pccl_py` alone does not.

    import torch.distributed as dist
    import pccl_py.torch  # registers "pccl"

    dist.init_process_group("pccl")                                    # env:// (torchrun)
    dist.init_process_group("pccl", init_method="pccl://10.0.0.1:48148",
                            rank=rank, world_size=world_size)          # an external master

See docs/torch.md for what is supported, what it costs, and how failures surface.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # the core runs without torch; this part does not
    raise ImportError("pccl_py.torch (the torch.distributed backend) needs torch: pip install 'pccl_py[torch]' (pin a CPU or CUDA build first)") from exc

import torch.distributed as dist
from torch.distributed.rendezvous import _rendezvous_handlers, register_rendezvous_handler

from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.monitored import route_dist_monitored_barrier
from pccl_py.torch.ops import REDUCE_DTYPES
from pccl_py.torch.process_group import ProcessGroupPccl
from pccl_py.torch.rendezvous import create_process_group, pccl_rendezvous_handler

BACKEND = "pccl"


def register() -> None:
    """Registers backend "pccl" for CPU and CUDA tensors and the pccl:// scheme, and lets
    `dist.monitored_barrier()` reach pccl groups (torch lets only gloo's through).
    Idempotent (called on import)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, create_process_group, extended_api=True, devices=["cpu", "cuda"])
    if "pccl" not in _rendezvous_handlers:
        register_rendezvous_handler("pccl", pccl_rendezvous_handler)
    route_dist_monitored_barrier(BACKEND)


register()

__all__ = ["BACKEND", "REDUCE_DTYPES", "PcclBackendError", "ProcessGroupPccl", "register"]
