"""Shared state: named tensors every peer keeps bit-identical, and the peer-side steps
of a sync (hash, fetch from several sources, verify, re-fetch). The decision of who
gets what is pccl_py.election's, made by the master; the Communicator runs the
collective (Communicator.sync_shared_state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from pccl_py import _native
from pccl_py._buffers import native_view
from pccl_py.election import EntryMeta
from pccl_py.errors import InvalidArgument, PeerLost, Timeout

CHUNK_BYTES = 8 << 20  # transfer unit; chunks of one entry are spread over the sources
ProgressFn = Callable[[int, int], None]


@dataclass
class SharedState:
    """Named tensors (numpy arrays or torch CPU tensors) plus a revision.

    PCCL's rule: after changing the content, bump `revision` by exactly one before the
    next sync. A peer that receives the state adopts the group's revision. Entries are
    matched by name and order; every peer must hold the same names, dtypes and shapes.
    """

    tensors: Mapping[str, Any]
    revision: int = 0
    _views: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
            view, dtype = native_view(tensor)
            shape = tuple(int(d) for d in tensor.shape)
            self._views.append((name, view.reshape(-1).view(np.uint8), dtype.name.lower(), shape))

    def buffers(self) -> list[np.ndarray]:
        """Byte views of the entries, in order (zero-copy)."""
        return [v for _, v, _, _ in self._views]

    def entries(self) -> list[EntryMeta]:
        """Name, dtype, shape, size and content hash (xxh3-64 of the exact bytes) per entry."""
        return [EntryMeta(name, dtype, shape, int(v.nbytes), digest(v)) for name, v, dtype, shape in self._views]

    def hashes(self) -> dict[str, int]:
        return {e.name: e.hash for e in self.entries()}


@dataclass(frozen=True)
class SyncInfo:
    """What a shared-state sync did on this peer."""

    revision: int
    rx_bytes: int  # received from other peers
    tx_bytes: int  # served to other peers
    entries_received: int


def digest(buffer: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(buffer)


@dataclass
class _Source:
    peer: int
    host: str
    port: int
    exposure: int


def fetch_entries(
    engine: _native.Engine,
    buffers: list[np.ndarray],
    wanted: list[tuple[int, int, list[int]]],
    sources: dict[int, _Source],
    deadline: float,
    max_rounds: int = 4,
    progress: ProgressFn | None = None,
) -> int:
    """Fetches the entries `wanted` ((index, elected hash, holder peers)) into `buffers`,
    spreading chunks over the holders, verifying each entry's hash on arrival and
    re-fetching from other holders what failed or arrived corrupt. Returns the bytes
    received. Raises PeerLost when an entry could not be obtained from any holder."""
    total = sum(int(buffers[i].nbytes) for i, _, _ in wanted)
    pending = {i: (h, [p for p in holders if p in sources]) for i, h, holders in wanted}
    failed_sources: set[int] = set()
    received = 0
    for round_ in range(max_rounds):
        if not pending:
            break
        # Assign chunks to sources round-robin per entry; rotate by round so a re-fetch
        # goes elsewhere.
        plan: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for n, (index, (_, holders)) in enumerate(sorted(pending.items())):
            usable = [p for p in holders if p not in failed_sources] or holders
            if not usable:
                raise PeerLost(f"no peer holds the elected content of state entry {index}")
            size = int(buffers[index].nbytes)
            for c, offset in enumerate(range(0, size, CHUNK_BYTES)):
                source = usable[(c + n + round_) % len(usable)]
                length = min(CHUNK_BYTES, size - offset)
                plan.setdefault(source, []).append((index, offset, length, index, offset))
        handles = {}
        remaining = max(0.0, deadline - time.monotonic())
        for peer, chunks in plan.items():
            src = sources[peer]
            try:
                handles[peer] = engine.fetch_state(
                    src.peer, src.host, src.port, src.exposure, buffers, chunks, timeout=remaining
                )
            except PeerLost:
                failed_sources.add(peer)
        _wait_all(handles, deadline, progress, received, total)
        broken_entries: set[int] = set()
        for peer, handle in handles.items():
            try:
                handle.result(timeout=0)
                received += handle.rx_bytes
            except Exception:
                failed_sources.add(peer)
                broken_entries.update(chunk[0] for chunk in plan[peer])
        for peer in plan:
            if peer not in handles:
                broken_entries.update(chunk[0] for chunk in plan[peer])
        for index in list(pending):
            if index in broken_entries:
                continue
            if digest(buffers[index]) == pending[index][0]:
                del pending[index]
            else:  # corrupt in transit or at the source: fetch again, elsewhere first
                failed_sources.update({p for p, chunks in plan.items() if any(ch[0] == index for ch in chunks)})
        if time.monotonic() > deadline:
            raise Timeout("shared-state transfer did not finish before the deadline")
    if pending:
        raise PeerLost(f"could not obtain state entries {sorted(pending)} intact from any holder")
    if progress is not None:
        progress(total, total)
    return received


def _wait_all(handles: dict[int, Any], deadline: float, progress: ProgressFn | None, base: int, total: int) -> None:
    for handle in handles.values():
        while not handle.wait(timeout=0.1 if progress else max(0.0, deadline - time.monotonic())):
            if progress is not None:
                progress(base + sum(h.rx_bytes for h in handles.values()), total)
            if time.monotonic() > deadline:
                for h in handles.values():
                    h.abort("shared-state transfer deadline")
                return


def rich_progress() -> tuple[ProgressFn, Callable[[], None]]:
    """A rich progress bar as a progress callback, and the function that closes it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("receiving shared state", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    task = bar.add_task("state", total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def check_strategy(strategy: Any) -> None:
    from pccl_py.election import SyncStrategy

    if not isinstance(strategy, SyncStrategy):
        raise InvalidArgument(f"strategy must be a pccl_py.SyncStrategy, got {strategy!r}")
