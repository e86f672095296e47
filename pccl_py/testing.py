"""Fault injection and multi-process helpers for tests, benchmarks and the stress
harness (shipped, so users can test their own recovery paths).

PeerGroup starts peer processes that run a worker function with a Communicator and
report structured records through a queue; the caller kills (SIGKILL), stops
(SIGSTOP) or resumes them. Everything is cleaned up by close() / the context manager.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self, cast

import numpy as np

from pccl_py.config import Config
from pccl_py.errors import PcclError
from pccl_py.peer.communicator import Communicator
from pccl_py.peer.group import join_group
from pccl_py.types import ReduceOp

Record = dict[str, Any]


def allreduce_worker(
    master: str,
    index: int,
    out: Any,
    *,
    world: int,
    elements: int,
    iterations: int,
    retry: bool = True,
    config: dict[str, Any] | None = None,
    group: int = 0,
    pause: float = 0.0,
    admit_every: int = 0,
) -> None:
    """Connects, waits for `world` peers, then runs back-to-back SUM all-reduces of
    float32 vectors filled with (index + 1). Reports one record per op:
    {"index", "op", "ok", "t_end", "world", "value", "error"} where value is the first
    element of the result; on failure the input is checked to be intact.

    With admit_every=k, every k ops the peers let pending joiners in (pending_peers(),
    then update_topology()), as a training loop would; a joiner's first op lines up
    with the others' first op after that vote."""
    comm = Communicator(master, group=group, config=Config(**(config or {})), name=f"worker-{index}")
    try:
        comm.connect(timeout=60)
        join_group(comm, world, timeout=60)
        out.put({"index": index, "event": "ready", "pid": os.getpid(), "peer": comm.peer_id})
        x = np.empty(elements, np.float32)
        since_vote = 0
        for op in range(iterations):
            if admit_every and since_vote > 0 and since_vote % admit_every == 0 and comm.pending_peers(timeout=60) > 0:
                comm.update_topology(timeout=60)
                since_vote = 0
                out.put({"index": index, "event": "topology", "world": comm.world_size, "epoch": comm.epoch})
            since_vote += 1
            x.fill(index + 1)
            record: Record = {"index": index, "op": op}
            try:
                info = comm.all_reduce(x, op=ReduceOp.SUM, retry=retry, timeout=60)
                record.update(ok=True, world=info.world_size, value=float(x[0]), uniform=bool((x == x[0]).all()))
            except PcclError as exc:
                record.update(ok=False, error=type(exc).__name__, message=str(exc), intact=bool((x == index + 1).all()))
            record["t_end"] = time.time()
            out.put(record)
            if pause:
                time.sleep(pause)
        out.put({"index": index, "event": "done"})
    except BaseException as exc:  # reported, then re-raised so the exit code shows it
        out.put({"index": index, "event": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        comm.close()


class RecordPipe:
    """A peer's end of its record channel: put(record) sends it to the test process.
    One pipe per peer, so a peer killed mid-send cannot silence the others (a shared
    multiprocessing.Queue would stay locked)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def put(self, record: Record) -> None:
        self._conn.send(record)


@dataclass
class PeerGroup:
    """Peer processes running `target(master, index, out, **kwargs)`; `out.put(record)`
    reports a record to this process."""

    master: str
    target: Callable[..., None]
    kwargs: dict[str, Any] = field(default_factory=dict)
    processes: dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._readers: dict[Any, int] = {}
        self._backlog: list[Record] = []

    def start(self, index: int, **overrides: Any) -> None:
        kwargs = {**self.kwargs, **overrides}
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=self.target, args=(self.master, index, RecordPipe(writer)), kwargs=kwargs, daemon=True
        )
        proc.start()
        writer.close()
        self._readers[reader] = index
        self.processes[index] = proc

    def kill(self, index: int) -> None:
        os.kill(self.processes[index].pid, signal.SIGKILL)

    def stop(self, index: int) -> None:
        os.kill(self.processes[index].pid, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        os.kill(self.processes[index].pid, signal.SIGCONT)

    def records(self, timeout: float) -> Record:
        """Next record from any peer; raises queue.Empty after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._backlog:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._readers:
                raise queue.Empty
            for ready in mp_connection.wait(list(self._readers), remaining):
                reader = cast(mp_connection.Connection, ready)
                try:
                    self._backlog.append(reader.recv())
                except (EOFError, OSError):  # the peer exited or died
                    del self._readers[reader]
                    reader.close()
        return self._backlog.pop(0)

    def wait_for(self, predicate: Callable[[Record], bool], timeout: float) -> list[Record]:
        """Collects records until one satisfies `predicate`; returns all collected."""
        deadline = time.monotonic() + timeout
        seen: list[Record] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching record within {timeout}s; got {seen[-5:]}")
            try:
                record = self.records(remaining)
            except queue.Empty:
                continue
            seen.append(record)
            if predicate(record):
                return seen

    def close(self) -> None:
        for proc in self.processes.values():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.join(5)
        self.processes.clear()
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
