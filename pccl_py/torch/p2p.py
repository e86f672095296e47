"""Point-to-point of the "pccl" backend: send, recv, recv_anysource (and through them
torch's isend, irecv and batch_isend_irecv), carried by the pccl engine.

The ops do not go through the group's collective worker thread: each is posted to the
engine on the caller's thread, in call order (so the k-th send to a rank with a tag
matches that rank's k-th receive with it), and progresses in the engine's own progress
thread. A send posted before a collective therefore never waits for that collective, and
torch code that pairs sends and receives around collectives cannot deadlock on the
queue. Futures (get_future) are completed by a small thread of their own
(P2PProgress); wait() and is_completed() ask the engine directly.

A failed send or receive raises PcclBackendError from wait() (its __cause__ is the
pccl_py error: PeerLost, Timeout, Aborted, ProtocolError for sizes that differ). It does
not poison the group: the engine closes the connections to the peer only when bytes may
have been in flight, which fails collectives with that peer (and so poisons the group)
through their own error.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.futures import Future

from pccl_py import P2PHandle, PcclError
from pccl_py.torch.contract import GroupCore
from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.staging import Staged, byte_view


class P2PWork(dist.Work):
    """A send or receive of the pccl backend. wait() raises the op's error;
    _source_rank() names the sender of a receive from any rank (as gloo's does)."""

    def __init__(
        self, handle: P2PHandle, tensors: list[torch.Tensor], staged: Staged | None, ranks: dict[int, int],
        progress: P2PProgress, what: str,
    ) -> None:
        super().__init__()
        self._handle = handle
        self._tensors = tensors
        self._staged = staged  # a receive into memory the engine cannot write (CUDA, strided)
        self._ranks = ranks  # peer id -> torch rank
        self._progress = progress
        self._what = what
        self._lock = threading.Lock()
        self._settled = False
        self._error: PcclBackendError | None = None
        self._future: Future[Any] = Future()
        self._chained = self._future.then(_value_of)

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 0.0
        if not self._handle.join(seconds if seconds > 0 else None):
            raise PcclBackendError(f"{self._what} did not finish within {seconds}s")
        self._settle()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        if not self._handle.done():
            return False
        self._settle()
        return True

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error if self.is_completed() else None

    def get_future(self) -> Future[Any]:
        self._progress.watch(self)
        return self._chained

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._tensors

    def synchronize(self) -> None:
        self.wait()

    def _source_rank(self) -> int:
        peer = self._handle.peer
        if peer is None or peer not in self._ranks:
            raise PcclBackendError(f"{self._what} has no source rank yet")
        return self._ranks[peer]

    def _settle(self) -> None:
        """Once the op ended: writes a staged receive back and completes the future.
        Idempotent (wait(), is_completed() and the progress thread all call it)."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            try:
                self._handle.wait(0)
                if self._staged is not None:
                    self._staged.commit()
            except PcclError as exc:
                error = PcclBackendError(f"pccl: {self._what} failed: {exc}")
                error.__cause__ = exc
                self._error = error
                self._future.set_exception(error)
            else:
                self._future.set_result(self._tensors)


class P2PProgress:
    """Completes the futures of the works whose get_future() was asked for, on a thread
    of its own (started at the first; stopped by close(), once their ops ended)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._works: list[P2PWork] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, work: P2PWork) -> None:
        with self._cond:
            if work in self._works:
                return
            self._works.append(work)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pccl-torch-p2p", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Stops the thread once the watched ops have ended (closing the engine ends
        them), waiting at most `timeout` seconds."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._works and not self._closed:
                    self._cond.wait()
                if not self._works:
                    return
                works = list(self._works)
            finished = [w for w in works if w._handle.done()]
            for w in finished:
                w._settle()
            with self._cond:
                self._works = [w for w in self._works if w not in finished]
            if not finished:
                works[0]._handle.join(0.005)


def peer_of(ranks: dict[int, int] | None, rank: int, this_rank: int, what: str) -> int:
    """The pccl peer holding torch `rank` (PcclBackendError when none, or this rank)."""
    if rank == this_rank:
        raise PcclBackendError(f"{what}: rank {rank} is this rank")
    for peer, r in require_ranks(ranks).items():
        if r == rank:
            return peer
    raise PcclBackendError(f"{what}: no pccl peer holds rank {rank}")


def require_ranks(ranks: dict[int, int] | None) -> dict[int, int]:
    if ranks is None:
        raise PcclBackendError("point-to-point needs the rank table of the rendezvous (peer_ranks)")
    return ranks


def p2p_tag(tag: int) -> int:
    """torch's tag (a C++ int, may be negative) as pccl's 64-bit one."""
    return int(tag) % 2**64


def _value_of(future: Future[Any]) -> Any:
    return future.value()


class P2PGroup(GroupCore, Protocol):
    _p2p_progress: P2PProgress


class PointToPointOps:
    """send, recv and recv_anysource of ProcessGroupPccl (the group's state: P2PGroup):
    each posted to the engine at once, on the caller's thread."""

    def send(self: P2PGroup, tensors: Sequence[torch.Tensor], dstRank: int, tag: int = 0) -> dist.Work:
        """Posted to the engine now, not queued behind collectives (pccl_py.torch.p2p)."""
        (t,) = _one_tensor(self, tensors, "send")
        self._check_rank(dstRank)
        peer = peer_of(self._peer_ranks, dstRank, self._rank, "send")
        handle = self._comm.send_async(byte_view(Staged(t).host), peer, tag=p2p_tag(tag), timeout=self._timeout)
        ranks = require_ranks(self._peer_ranks)
        return P2PWork(handle, list(tensors), None, ranks, self._p2p_progress, f"send to rank {dstRank}")

    def recv(self: P2PGroup, tensors: Sequence[torch.Tensor], srcRank: int, tag: int = 0) -> dist.Work:
        (t,) = _one_tensor(self, tensors, "recv")
        self._check_rank(srcRank)
        peer = peer_of(self._peer_ranks, srcRank, self._rank, "recv")
        return _recv(self, t, tensors, peer, tag, f"recv from rank {srcRank}")

    def recv_anysource(self: P2PGroup, tensors: Sequence[torch.Tensor], tag: int = 0) -> dist.Work:
        """The Work's _source_rank() names the sender once it is done."""
        (t,) = _one_tensor(self, tensors, "recv")
        require_ranks(self._peer_ranks)
        return _recv(self, t, tensors, None, tag, "recv from any rank")


def _recv(
    group: P2PGroup, t: torch.Tensor, tensors: Sequence[torch.Tensor], peer: int | None, tag: int, what: str
) -> dist.Work:
    staged = Staged(t, read=False)
    handle = group._comm.recv_async(byte_view(staged.host), peer, tag=p2p_tag(tag), timeout=group._timeout)
    ranks = require_ranks(group._peer_ranks)
    return P2PWork(handle, list(tensors), None if staged.direct else staged, ranks, group._p2p_progress, what)


def _one_tensor(group: P2PGroup, tensors: Sequence[torch.Tensor], what: str) -> Sequence[torch.Tensor]:
    if group._closed:
        raise PcclBackendError("the pccl process group has been shut down")
    if group._failure is not None:
        raise PcclBackendError(f"the pccl process group failed earlier and cannot be used: {group._failure}")
    if len(tensors) != 1:
        raise PcclBackendError(f"{what}: expected one tensor, got {len(tensors)}")
    return tensors
