"""Point-to-point of the Communicator (mixed into it): send and receive between two
peers of the current ring, addressed by peer id or ring rank, with a 64-bit tag.

The engine does the matching and moves the bytes (docs/architecture.md,
"Point-to-point"): the k-th send from A to B with tag T lands in the k-th receive at B
from A with T; a receive from any peer takes the first unclaimed send with its tag. A
send's payload leaves only once the receive is posted, so send/recv pairs of any size
never deadlock on buffering. No master round trip: the outcome is the engine's, and
both sides of a pair get it (a failure of one side after pairing closes the pair's
connections, which fails the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pccl_py import _native
from pccl_py.errors import InvalidArgument
from pccl_py.peer.attempts import remaining
from pccl_py.peer.buffers import native_view, stage_to_host
from pccl_py.peer.contract import PeerCore
from pccl_py.types import P2PInfo

_MAX_TAG = 2**64


class P2PHandle:
    """A send or receive in flight. wait() returns its P2PInfo or raises its typed error
    (PeerLost, Timeout, Aborted, ProtocolError when the sizes differ); a receive into a
    device tensor is written back before wait() returns. The handle holds the buffer:
    leave it alone until the op is done."""

    def __init__(self, native: _native.P2PHandle, ring: tuple[int, ...], copy_back: Callable[[], None] | None) -> None:
        self._native = native
        self._ring = ring
        self._copy_back = copy_back
        self._info: P2PInfo | None = None

    def wait(self, timeout: float | None = None) -> P2PInfo:
        """Blocks until the op ends (at most `timeout` seconds: then Timeout, and the op
        goes on). Raises the op's error if it failed."""
        if self._info is None:
            self._native.result(timeout)
            if self._copy_back is not None:
                self._copy_back()
            self._info = self._describe()
        return self._info

    def done(self) -> bool:
        return self._native.done()

    def join(self, timeout: float | None = None) -> bool:
        """Waits (at most `timeout` seconds) until the op ends; returns whether it
        did, without raising its error (wait() does)."""
        return self._native.wait(timeout)

    def abort(self, reason: str = "aborted by caller") -> None:
        """Fails the op with Aborted (no-op once it ended)."""
        self._native.abort(reason)

    @property
    def peer(self) -> int | None:
        """The other peer (a receive from any peer: the sender, None until matched)."""
        return self._native.peer

    @property
    def rank(self) -> int | None:
        """The other peer's rank in the ring the op ran in (None until known)."""
        peer = self._native.peer
        return self._ring.index(peer) if peer is not None and peer in self._ring else None

    def _describe(self) -> P2PInfo:
        n = self._native
        return P2PInfo(
            peer=n.peer if n.peer is not None else -1,
            rank=self.rank if self.rank is not None else -1,
            nbytes=n.nbytes,
            tag=n.tag,
            epoch=n.epoch,
            tx_bytes=n.tx_bytes,
            rx_bytes=n.rx_bytes,
        )


class PointToPointCalls:
    def send(
        self: PeerCore, x: Any, peer: int | None = None, *, rank: int | None = None, tag: int = 0,
        timeout: float | None = None,
    ) -> P2PInfo:
        """Sends x's bytes to `peer` (a peer id) or the peer of ring `rank`; returns once
        the receiver took them (its receive must hold exactly as many bytes). Raises
        PeerLost, Timeout, Aborted, ProtocolError (sizes differ), InvalidArgument."""
        deadline = self._deadline(timeout, self.config.op_timeout)
        handle = PointToPointCalls.send_async(self, x, peer, rank=rank, tag=tag, timeout=timeout)
        return handle.wait(remaining(deadline) + 1.0)

    def send_async(
        self: PeerCore, x: Any, peer: int | None = None, *, rank: int | None = None, tag: int = 0,
        timeout: float | None = None,
    ) -> P2PHandle:
        """send() without waiting: returns a P2PHandle."""
        deadline = self._deadline(timeout, self.config.op_timeout)
        engine, ring = _ready(self, deadline)
        dst = _resolve(self, ring, peer, rank, required=True)
        assert dst is not None
        host, _, _ = stage_to_host(x, None)
        view, _ = native_view(host)
        native = engine.send(
            view.reshape(-1).view("u1"), dst, tag=_check_tag(tag), timeout=remaining(deadline),
            connect_timeout=min(self.config.connect_timeout, remaining(deadline)),
        )
        return P2PHandle(native, ring, None)

    def recv(
        self: PeerCore, out: Any, peer: int | None = None, *, rank: int | None = None, tag: int = 0,
        timeout: float | None = None,
    ) -> P2PInfo:
        """Receives into `out` (exactly its bytes) from `peer`, the peer of ring `rank`,
        or (neither given) any peer; the P2PInfo names the sender. Raises as send()."""
        deadline = self._deadline(timeout, self.config.op_timeout)
        handle = PointToPointCalls.recv_async(self, out, peer, rank=rank, tag=tag, timeout=timeout)
        return handle.wait(remaining(deadline) + 1.0)

    def recv_async(
        self: PeerCore, out: Any, peer: int | None = None, *, rank: int | None = None, tag: int = 0,
        timeout: float | None = None,
    ) -> P2PHandle:
        """recv() without waiting: returns a P2PHandle."""
        deadline = self._deadline(timeout, self.config.op_timeout)
        engine, ring = _ready(self, deadline)
        src = _resolve(self, ring, peer, rank, required=False)
        host, _, copy_back = stage_to_host(out, None)
        view, _ = native_view(host)
        native = engine.recv(
            view.reshape(-1).view("u1"), src, tag=_check_tag(tag), timeout=remaining(deadline),
            connect_timeout=min(self.config.connect_timeout, remaining(deadline)),
        )
        return P2PHandle(native, ring, copy_back)


def _ready(comm: PeerCore, deadline: float) -> tuple[_native.Engine, tuple[int, ...]]:
    """The engine on the master's latest ring, and that ring's peer ids."""
    comm._end_warmup()
    epoch = comm._ensure_ring(deadline)
    assert comm._engine is not None
    return comm._engine, comm.ring_of(epoch)


def _resolve(comm: PeerCore, ring: tuple[int, ...], peer: int | None, rank: int | None, required: bool) -> int | None:
    if peer is not None and rank is not None:
        raise InvalidArgument("pass peer or rank, not both")
    if rank is not None:
        if not 0 <= rank < len(ring):
            raise InvalidArgument(f"rank {rank} is outside the ring of {len(ring)} peers")
        peer = ring[rank]
    if peer is None and required:
        raise InvalidArgument("a send needs a destination: peer or rank")
    if peer is not None and peer not in ring:
        raise InvalidArgument(f"peer {peer} is not in the current ring")
    if peer == comm.peer_id:
        raise InvalidArgument("point-to-point with this peer itself")
    return peer


def _check_tag(tag: int) -> int:
    if not 0 <= int(tag) < _MAX_TAG:
        raise InvalidArgument("tag must be in [0, 2**64)")
    return int(tag)
