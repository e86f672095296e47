"""Shared state: named tensors every peer keeps bit-identical, and the peer-side steps
of a sync (hash, fetch from several sources, verify, re-fetch). The decision of who
gets what is pccl_py.election's, made by the master; the Communicator runs the
collective (Communicator.sync_shared_state).
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from pccl_py import _native
from pccl_py.errors import InvalidArgument, PcclError, PeerLost
from pccl_py.peer.buffers import is_device_tensor, native_view, pinned_empty
from pccl_py.peer.state_fetch import Chunk, ReceiveWindow, fetch_round
from pccl_py.types import EntryMeta

CHUNK_BYTES = 4 << 20  # transfer unit; chunks of one entry are spread over the sources
PREFAULT_SLICE = 16 << 20  # populated per native call: also how long a stop may wait
ProgressFn = Callable[[int, int], None]


class _Prefault:
    """Makes a new state's pages resident on threads of their own, from its construction on.

    A joiner's state is usually fresh memory (np.zeros, torch.zeros of a new model): the
    kernel must fault in and zero every page its first sync receives into. The engine
    populates a receive's pages just ahead of the bytes, but only from when the receive
    starts, and on a VM whose host took free memory back faulting it in again costs more
    than the transfer; started here, it runs while the peer connects and is admitted,
    and the sync finds the pages resident. Nothing changes a byte
    (_native.prefault), and pages already resident (a trained model) are skipped after a
    look at the page table. A sync that starts while the thread still runs leaves it
    running: the engine's own worker populates ahead of each receive, and either skips
    what the other has done (measured: stopping the thread at the sync was no faster).
    Threads are daemons; interpreter exit stops them within a slice."""

    def __init__(self) -> None:
        self._jobs: set[PrefaultJob] = set()
        self._lock = threading.Lock()
        self._exiting = False
        atexit.register(self.stop_all)

    def start(self, buffers: list[np.ndarray]) -> PrefaultJob | None:
        buffers = [b for b in buffers if b.nbytes > 0]
        with self._lock:
            if not buffers or self._exiting:
                return None
            job = PrefaultJob(buffers, self._jobs.discard)
            self._jobs.add(job)
        job.thread.start()
        return job

    def stop_all(self) -> None:
        with self._lock:
            self._exiting = True
            jobs = list(self._jobs)
        for job in jobs:
            job.stop()


class PrefaultJob:
    """One state's buffers being populated (see _Prefault)."""

    def __init__(self, buffers: list[np.ndarray], done: Callable[[PrefaultJob], None]) -> None:
        self._buffers = buffers
        self._done = done
        self._stop = threading.Event()
        self.populated = 0
        self.thread = threading.Thread(target=self._run, name="pccl-prefault", daemon=True)

    def _run(self) -> None:
        try:
            for buffer in self._buffers:
                # Slices of PREFAULT_SLICE, the last one taking the rest (a slice under 4 MiB
                # would be left to the receive, as the engine leaves small receives).
                cuts = [*range(0, max(buffer.nbytes - PREFAULT_SLICE, 1), PREFAULT_SLICE), buffer.nbytes]
                for begin, end in itertools.pairwise(cuts):
                    if self._stop.is_set():
                        return
                    self.populated += _native.prefault(buffer[begin:end])
        finally:
            self._buffers = []
            self._done(self)

    def stop(self) -> None:
        """Stops after the slice in progress and waits for it."""
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()


_prefault = _Prefault()


@dataclass
class SharedState:
    """Named tensors (numpy arrays, torch CPU or CUDA tensors) plus a revision.

    CUDA tensors are mirrored in pinned host memory: each sync copies them to the
    mirror before hashing and copies received entries back to the device after a
    successful sync (the device tensor is untouched by a failed one).

    PCCL's rule: after changing the content, bump `revision` by exactly one before the
    next sync. A peer that receives the state adopts the group's revision. Entries are
    matched by name and order; every peer must hold the same names, dtypes and shapes.

    `prefault` (default True): from construction on, a thread of its own makes the
    entries' pages resident without changing a byte, so that a first sync receiving
    into fresh memory (a joiner's np.zeros state) does not pay the kernel's page
    faults during the transfer. Pages already resident are skipped.
    """

    tensors: Mapping[str, Any]
    revision: int = 0
    prefault: bool = True
    _views: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = field(default_factory=list, init=False, repr=False)
    _device: dict[int, tuple[Any, Any]] = field(default_factory=dict, init=False, repr=False)  # index -> (device, host)
    _prefaulting: PrefaultJob | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for index, (name, tensor) in enumerate(self.tensors.items()):
            if is_device_tensor(tensor):
                if not tensor.is_contiguous():
                    raise InvalidArgument(f"shared-state entry {name!r} must be contiguous")
                host = pinned_empty(tensor)
                self._device[index] = (tensor, host)
                tensor = host
            view, dtype = native_view(tensor)
            shape = tuple(int(d) for d in tensor.shape)
            self._views.append((name, view.reshape(-1).view(np.uint8), dtype.name.lower(), shape))
        host = [v for index, (_, v, _, _) in enumerate(self._views) if index not in self._device]  # mirrors: pinned
        self._prefaulting = _prefault.start(host) if self.prefault else None

    def buffers(self) -> list[np.ndarray]:
        """Byte views of the entries, in order (zero-copy)."""
        return [v for _, v, _, _ in self._views]

    def entries(self) -> list[EntryMeta]:
        """Name, dtype, shape, size and content hash (xxh3-64 of the exact bytes) per entry."""
        self.stage_in()
        return [EntryMeta(name, dtype, shape, int(v.nbytes), digest(v)) for name, v, dtype, shape in self._views]

    def hashes(self) -> dict[str, int]:
        return {e.name: e.hash for e in self.entries()}

    def stage_in(self) -> None:
        """Copies device entries to their host mirrors (a no-op without device entries)."""
        for device, host in self._device.values():
            host.copy_(device.detach())

    def stage_out(self, indices: list[int]) -> None:
        """Copies the host mirrors of these entries (received in a sync) to the device."""
        for index in indices:
            pair = self._device.get(index)
            if pair is not None:
                pair[0].copy_(pair[1])


@dataclass(frozen=True)
class SyncInfo:
    """What a shared-state sync did on this peer."""

    revision: int
    rx_bytes: int  # received from other peers
    tx_bytes: int  # served to other peers
    entries_received: int


def digest(buffer: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(buffer.data)


@dataclass
class Source:
    peer: int
    host: str
    port: int
    exposure: int


def fetch_entries(
    engine: _native.Engine,
    buffers: list[np.ndarray],
    wanted: list[tuple[int, int, list[int]]],
    sources: dict[int, Source],
    deadline: float,
    progress: ProgressFn | None = None,
    receive: ReceiveWindow | None = None,
) -> int:
    """Fetches the entries `wanted` ((index, elected hash, holder peers)) into `buffers`
    and returns the bytes received. Raises PeerLost when an entry cannot be obtained
    intact from any holder, Timeout at the deadline.

    The first attempt spreads each entry's chunks over all its holders, handed out as
    each source keeps up (pccl_py.peer.state_fetch). An entry whose hash does not match
    on arrival is fetched again whole from one holder at a time, so a holder that serves
    it corrupt is known and never asked for it again; a holder whose transfer fails is
    not asked again at all. `receive`: the receiver's window bound, kept across fetches
    (state_fetch.ReceiveWindow)."""
    total = sum(int(buffers[i].nbytes) for i, _, _ in wanted)
    pending = {i: (h, [p for p in holders if p in sources]) for i, h, holders in wanted}
    spread = {i: True for i in pending}
    corrupt_from: dict[int, set[int]] = {i: set() for i in pending}
    dead: set[int] = set()
    received = 0
    wanted_from = sorted({p for _, holders in pending.values() for p in holders})
    try:  # their round trips at once; otherwise each source's first fetch opens its own, in turn
        engine.connect_state_sources(
            [(sources[p].peer, sources[p].host, sources[p].port) for p in wanted_from],
            timeout=max(0.0, deadline - time.monotonic()),
        )
    except PcclError:
        pass  # the fetch from the source that cannot be reached fails, and is handled there
    while pending:
        chunks: list[Chunk] = []
        for index, (_, holders) in sorted(pending.items()):
            usable = [p for p in holders if p not in dead and p not in corrupt_from[index]]
            if not usable:
                raise PeerLost(f"no peer could provide state entry {index} intact (holders: {holders})")
            allowed = tuple(usable) if spread[index] else (usable[0],)
            size = int(buffers[index].nbytes)
            chunks += [
                Chunk(index, offset, min(CHUNK_BYTES, size - offset), allowed) for offset in range(0, size, CHUNK_BYTES)
            ]
        done = fetch_round(
            engine, buffers, chunks, sources, dead, deadline, progress, received, total, receive=receive
        )
        received += done.rx_bytes
        for index in [i for i in pending if i not in done.incomplete]:
            if digest(buffers[index]) == pending[index][0]:
                del pending[index]
            elif spread[index]:
                spread[index] = False  # fetch it whole from one holder: blame becomes exact
            else:
                corrupt_from[index].update(p for p, asked in done.asked.items() if index in asked)
    if progress is not None:
        progress(total, total)
    return received


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
    from pccl_py.types import SyncStrategy

    if not isinstance(strategy, SyncStrategy):
        raise InvalidArgument(f"strategy must be a pccl_py.SyncStrategy, got {strategy!r}")
