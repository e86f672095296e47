"""How the ranks of a torch.distributed group find one pccl master and form one pccl
group of exactly world_size peers.

- `init_method="pccl://host:port[?group=G]"`: use the pccl master at host:port (started
  with `pccl master`). torch gets a process-local store holding that address; the
  ranks meet at the master, not in the store.
- `env://` (or `tcp://`, or an explicit `store=`): rank 0 of the group starts an
  in-process pccl master on the store's host and publishes its address in the store;
  the other ranks read it there. That rank's process group owns the master.

Then every rank connects, the admitted peers let the others in (update_topology) until
the group has world_size members, and one all-gather checks that the torch ranks are
distinct and complete and tells every rank which peer holds which torch rank. A rank's
torch rank is its slot in every collective, whatever its place in the pccl ring.
"""

from __future__ import annotations

import datetime
import socket
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist

from pccl_py import Communicator, Config, Master, PcclError, join_group
from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.process_group import ProcessGroupPccl

_MASTER_KEY = "pccl/master"
_GROUP_KEY = "pccl/group"


def pccl_rendezvous_handler(url: str, timeout: datetime.timedelta = datetime.timedelta(minutes=30), **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    """torch rendezvous handler for `pccl://host:port?rank=R&world_size=N[&group=G]`
    (rank and world_size may also come from RANK / WORLD_SIZE, as with tcp://)."""
    import os

    parsed = urlparse(url)
    if not parsed.hostname or parsed.port is None:
        raise ValueError(f"pccl:// needs host:port, got {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    rank = int(query.get("rank", os.environ.get("RANK", "-1")))
    world_size = int(query.get("world_size", os.environ.get("WORLD_SIZE", "-1")))
    if rank < 0 or world_size < 1:
        raise ValueError("pccl:// needs rank and world_size (arguments, or RANK and WORLD_SIZE)")
    store = dist.HashStore()
    store.set_timeout(timeout)
    store.set(_MASTER_KEY, f"{parsed.hostname}:{parsed.port}")
    store.set(_GROUP_KEY, query.get("group", "0"))
    yield store, rank, world_size
    raise RuntimeError("pccl:// rendezvous cannot be repeated (a process group was re-created)")


def create_process_group(options: Any, backend_options: Any = None) -> ProcessGroupPccl:
    """The creator torch calls for backend "pccl" (extended API): connects this rank's
    Communicator and returns once the pccl group has exactly group_size members."""
    store = options.store
    rank = int(options.group_rank)
    size = int(options.group_size)
    timeout: datetime.timedelta = options.timeout
    seconds = timeout.total_seconds()
    config = Config.from_env(op_timeout=seconds, connect_timeout=seconds)
    base = _base_store(store)
    master: Master | None = None
    if base.check([_MASTER_KEY]):  # pccl://: an external master
        address = base.get(_MASTER_KEY).decode()
        group = int(base.get(_GROUP_KEY).decode())
    elif rank == 0:
        master = Master(host=_store_host(base), port=0, config=config).start()
        address = master.address
        store.set(_MASTER_KEY, address)
        group = 0
    else:
        address = store.get(_MASTER_KEY).decode()  # waits up to the store's timeout
        group = 0
    if options.global_ranks_in_group:  # a subgroup (new_group): its own pccl group
        group = (group + zlib.crc32(str(options.group_id).encode()) + 1) % (2**31)
    host = _local_address(address)
    comm = Communicator(address, group=group, config=config, host=host, name=f"torch-rank-{rank}")
    try:
        comm.connect(timeout=seconds)
        join_group(comm, size, timeout=seconds)
        peer_ranks = _check_ranks(comm, rank, size, seconds)
    except BaseException:
        comm.close()
        if master is not None:
            master.close()
        raise
    return ProcessGroupPccl(comm, rank, size, timeout, master=master, peer_ranks=peer_ranks)


def _check_ranks(comm: Communicator, rank: int, size: int, timeout: float) -> dict[int, int]:
    """One all-gather of the torch ranks: each of 0..size-1 must appear once. Returns
    the torch rank of every peer id (the pccl ring's order need not be the ranks')."""
    if comm.world_size != size:
        raise PcclBackendError(f"the pccl group has {comm.world_size} peers, expected {size}")
    info = comm.all_gather(torch.tensor([rank], dtype=torch.int64), timeout=timeout)
    ranks = [int(r) for r in info.output.reshape(-1).tolist()]
    if info.world_size != size or sorted(ranks) != list(range(size)):
        raise PcclBackendError(f"ranks are not distinct: {ranks} (each of 0..{size - 1} must appear once)")
    return dict(zip(info.contributors, ranks, strict=True))


def _base_store(store: Any) -> Any:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


def _store_host(store: Any) -> str:
    """The address the other ranks reach rank 0 on: the TCPStore's host (MASTER_ADDR)."""
    host = getattr(store, "host", None) if isinstance(store, dist.TCPStore) else None
    if not host:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise PcclError(f"cannot resolve the store host {host!r}: {exc}") from None


def _local_address(master: str) -> str:
    """This host's address on the route to the master (what the other peers can reach)."""
    host, _, port = master.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, int(port)))  # UDP connect sends nothing; it picks the route
        return str(probe.getsockname()[0])
