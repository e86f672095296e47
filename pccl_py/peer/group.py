"""Forming a group of a known size: the admitted peers let the others in until the
group has them all (what a launcher such as the torch backend's rendezvous, or a
benchmark, does before its first collective)."""

from __future__ import annotations

import time

from pccl_py.errors import PcclError
from pccl_py.peer.communicator import Communicator


def join_group(comm: Communicator, world: int, timeout: float) -> None:
    """Admitted peers call update_topology() until the group has `world` peers."""
    deadline = time.monotonic() + timeout
    while comm.world_size < world:
        if time.monotonic() > deadline:
            raise PcclError(f"group did not reach {world} peers (has {comm.world_size})")
        if comm.pending_peers(timeout=timeout) > 0:
            comm.update_topology(timeout=timeout)
        else:
            time.sleep(0.01)
