"""The error the "pccl" torch.distributed backend raises."""

from __future__ import annotations

from pccl_py import PcclError


class PcclBackendError(PcclError, RuntimeError):
    """A collective of the "pccl" backend failed or was refused. A RuntimeError, as
    torch's own backend errors are; when a pccl_py error caused it, that error is its
    __cause__ (e.g. PeerLost naming the peer)."""
