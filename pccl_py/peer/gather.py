"""The all-gather, reduce-scatter, broadcast and all-to-all calls of the Communicator
(mixed into it): argument checks, the output of each attempt, one attempt on the engine
(Engine.all_to_all; the attempt loop is AttemptCalls'), and the shape a blocked caller
reports.

Each moves (N-1)/N of the full buffer per peer (a broadcast's root: the buffer once),
directly between every pair of peers, and ends with the all-to-all commit vote, so the
failure contract is the all-reduce's: every survivor gets the same outcome, the input
is intact after a failure, and retry=True re-runs the op over the survivors. A retry
over fewer peers changes the result's shape, so each call returns it in a GatherInfo
with the world size it was computed over. An all-to-all has no retry: its input is laid
out for the world it was called over (block d for rank d), which a retry would change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pccl_py import _native
from pccl_py.errors import InvalidArgument, PeerLost
from pccl_py.peer.allreduce import AllReduceHandle
from pccl_py.peer.attempts import STEP_BITS, remaining
from pccl_py.peer.buffers import is_device_tensor, is_torch_tensor, native_view, stage_to_host
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.session import OpKey
from pccl_py.types import GatherInfo, ReduceOp

_KINDS = {
    "all_gather": _native.CollectiveKind.ALL_GATHER,
    "reduce_scatter": _native.CollectiveKind.REDUCE_SCATTER,
    "all_to_all": _native.CollectiveKind.ALL_TO_ALL,
}


def chunk_elements(count: int, world: int, rank: int) -> int:
    """Elements of rank `rank`'s chunk of `count` over `world` peers in a reduce-scatter:
    the ring's chunking, the first count % world chunks one element larger."""
    return count // world + (1 if rank < count % world else 0)


def choose_broadcast(nbytes: int, world: int, direct_max_bytes: int) -> _native.CollectiveKind:
    """BROADCAST_DIRECT (the root sends everything to everyone: one one-way delay) when
    the root's bytes, nbytes x (world - 1), are at most `direct_max_bytes`, the rule of
    the direct all-reduce; BROADCAST (the root scatters, the owners pass on: the root
    sends the buffer once) otherwise. Every peer chooses the same (it is in the shape
    digest): the inputs are what the peers of an epoch share."""
    if world > 1 and direct_max_bytes > 0 and nbytes * (world - 1) <= direct_max_bytes:
        return _native.CollectiveKind.BROADCAST_DIRECT
    return _native.CollectiveKind.BROADCAST


class _Outputs:
    """The result buffer of each attempt: the caller's `out`, or one allocated per world
    size, like `x` (a numpy array or a torch tensor). `shape(world, rank)` is its shape."""

    def __init__(self, x: Any, out: Any, shape: Callable[[int, int], tuple[int, ...]], what: str) -> None:
        self._x = x
        self._shape = shape
        self._what = what
        self._made: dict[tuple[int, ...], Any] = {}
        _, self._dtype = native_view(x)
        self._out = None  # the caller's `out` in host memory, filled by the engine
        self._out_size = -1  # the caller's `out`'s elements (-1: none)
        if out is not None:
            self._out_size = int(out.numel()) if is_torch_tensor(out) else int(np.size(out))
            if is_device_tensor(out):  # filled from a host result after success (_to_device)
                if out.dtype != x.dtype:
                    raise InvalidArgument(f"out must have the dtype of x ({x.dtype})")
                return
            view, dtype = native_view(out)
            if dtype != self._dtype:
                raise InvalidArgument(f"out must have the dtype of x ({self._dtype.name.lower()})")
            self._out, self._out_view = out, view

    def check(self, world: int, rank: int) -> None:
        """Raises InvalidArgument when the caller's `out` cannot hold the result over `world`."""
        if self._out_size < 0:
            return
        size = int(np.prod(self._shape(world, rank), dtype=np.int64))
        if self._out_size != size:
            raise InvalidArgument(
                f"out holds {self._out_size} elements where the {self._what} over {world} peers "
                f"(rank {rank}) gives {size}"
            )

    def get(self, world: int, rank: int) -> tuple[Any, Any]:
        """(the result object, its native view) for an attempt over `world` as `rank`."""
        self.check(world, rank)
        if self._out is not None:
            return self._out, self._out_view
        shape = self._shape(world, rank)
        result = self._made.get(shape)
        if result is None:
            x = self._x
            if is_torch_tensor(x):
                import torch

                result = torch.empty(shape, dtype=x.dtype)
            else:
                result = np.empty(shape, dtype=x.dtype)
            self._made[shape] = result
        return result, native_view(result)[0]


def _to_device(result: Any, x: Any, out: Any) -> Any:
    """A host result of a device tensor's collective, moved where the caller expects it."""
    if is_device_tensor(out):
        out.copy_(result.view(out.shape))
        return out
    if is_device_tensor(x) and out is None:
        return result.to(x.device)
    return result


class GatherCalls:
    def all_gather(
        self: PeerCore,
        x: Any,
        out: Any = None,
        tag: int | None = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> GatherInfo:
        """Gathers `x` (numpy array or torch tensor, the same shape and dtype on every
        member) from every member: info.output has shape (info.world_size, *x.shape),
        row r from the peer of rank r (ring order), the same bytes on every peer. `out`:
        an optional preallocated array of that size (any shape); None allocates a new
        array (a tensor if x is one). On a peer failure raises PeerLost on every
        survivor, or with retry=True re-runs over the survivors, which changes
        world_size: then an `out` sized for the old world raises InvalidArgument on
        every survivor rather than return a partial result. `timeout` bounds the whole
        call (default: config.op_timeout). Each peer sends and receives
        (N-1)/N x the output."""
        shape = tuple(x.shape)
        return self._run_gather("all_gather", x, out, tag, timeout, retry, lambda world, rank: (world, *shape))

    def all_gather_async(
        self: PeerCore,
        x: Any,
        out: Any = None,
        tag: int | None = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> AllReduceHandle[GatherInfo]:
        """Starts an all-gather and returns a handle whose wait() returns its GatherInfo.
        Collectives in flight at once need distinct tags; leave `x`/`out` alone until it
        is done."""
        shape = tuple(x.shape)
        return self._run_gather(
            "all_gather", x, out, tag, timeout, retry, lambda world, rank: (world, *shape), run_async=True
        )

    def reduce_scatter(
        self: PeerCore,
        x: Any,
        out: Any = None,
        op: ReduceOp = ReduceOp.SUM,
        tag: int | None = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> GatherInfo:
        """Reduces `x` (the same shape and dtype on every member) across the group and
        gives each peer its chunk of the result: the flattened result split into
        info.world_size chunks in rank order (the first count % world_size one element
        larger), this peer's being chunk info.rank. info.output has shape x.shape[1:]
        when x.shape[0] == world_size (the torch convention), else is flat. Elements
        are reduced in rank order, one rounded step at a time, as the direct
        all-reduces do. `out`: optional, room for exactly this peer's chunk (see
        all_gather for retries). Each peer sends and receives (N-1)/N x the input."""
        if not isinstance(op, ReduceOp):
            raise InvalidArgument(f"op must be a pccl_py.ReduceOp, got {op!r}")
        shape = tuple(x.shape)
        count = int(np.prod(shape, dtype=np.int64))

        def chunk_shape(world: int, rank: int) -> tuple[int, ...]:
            if len(shape) >= 1 and shape[0] == world:
                return shape[1:]
            return (chunk_elements(count, world, rank),)

        return self._run_gather("reduce_scatter", x, out, tag, timeout, retry, chunk_shape, op=op)

    def broadcast(
        self: PeerCore,
        x: Any,
        root: int = 0,
        tag: int | None = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> GatherInfo:
        """Copies the buffer of the peer of rank `root` (ring order) into `x` on every
        other member, in place (info.output is x). The root's `x` is only read; another
        peer's `x` is the broadcast's output, and holds no defined bytes after a
        failure. The root is the peer of that rank in the first attempt: with
        retry=True the op is re-run over the survivors while it lives, and raises
        PeerLost on every survivor once it is gone. The root sends the buffer once,
        every other peer receives it once (small payloads: the root sends it to each)."""
        if not isinstance(root, int) or root < 0:
            raise InvalidArgument(f"root must be a rank (an int >= 0), got {root!r}")
        return self._run_gather("broadcast", x, None, tag, timeout, retry, lambda world, rank: tuple(x.shape), root=root)

    def all_to_all(
        self: PeerCore,
        x: Any,
        out: Any = None,
        tag: int | None = None,
        timeout: float | None = None,
    ) -> GatherInfo:
        """Exchanges blocks between every pair of members: `x` (the same shape and dtype on
        every member), flattened, holds world_size equal blocks, block d for the peer of
        rank d (ring order); info.output has x's shape, its block s being peer s's block
        info.rank. The bytes are moved, never computed on, so the result is exact. `out`:
        optional, room for as many elements as x; it may be x itself (in place: x is
        overwritten only on success). Raises InvalidArgument when x's elements do not
        split into world_size blocks. On a peer failure raises PeerLost on every survivor
        and leaves x intact; there is no retry, since x is laid out for the world it was
        called over. Each peer sends and receives (N-1)/N x the input."""
        shape = tuple(x.shape)
        count = int(np.prod(shape, dtype=np.int64))
        world = self.world_size
        if world > 0 and count % world != 0:
            raise InvalidArgument(f"all-to-all: {count} elements do not split into {world} equal blocks, one per peer")
        return self._run_gather("all_to_all", x, out, tag, timeout, False, lambda world, rank: shape)

    def _run_gather(
        self: PeerCore,
        call: str,
        x: Any,
        out: Any,
        tag: int | None,
        timeout: float | None,
        retry: bool,
        shape: Callable[[int, int], tuple[int, ...]],
        *,
        op: ReduceOp = ReduceOp.SUM,
        root: int = 0,
        run_async: bool = False,
    ) -> Any:
        """Checks the arguments, numbers the step, and runs it (AttemptCalls._run_attempts),
        in this thread or, with `run_async`, on the op executor (returning a handle)."""
        engine = self._engine
        self._require()
        assert engine is not None
        x_host, _, copy_back = stage_to_host(x, x if call == "broadcast" else None)
        src, dtype = native_view(x_host)
        outputs = _Outputs(x_host, out, shape, call.replace("_", "-"))
        world, rank = self.world_size, self.rank  # the current ring's: usage errors show before any op
        if call == "broadcast" and world > 0 and root >= world:
            raise InvalidArgument(f"root {root} is not a rank of the ring of {world} peers")
        if call != "broadcast" and world > 0 and rank >= 0:
            outputs.check(world, rank)
        tag, engine_tag, seq = self._number(call, tag)
        deadline = self._deadline(timeout, self.config.op_timeout)
        step = seq & ((1 << STEP_BITS) - 1)
        count = src.nbytes // _native.element_size(dtype)
        detail = f", {op.name}" if call == "reduce_scatter" else f", root {root}" if call == "broadcast" else ""
        desc = f"tag {tag}, step {step}, {count} x {dtype.name.lower()}{detail}"
        results: list[Any] = []  # each attempt's result object
        root_peer: list[int] = []  # the broadcast's root, pinned by its first attempt

        def precheck(epoch: int) -> None:
            ring = self.ring_of(epoch)
            if not root_peer:
                if root >= len(ring):
                    raise InvalidArgument(f"root {root} is not a rank of the ring of {len(ring)} peers")
                root_peer.append(ring[root])
            if root_peer[0] not in ring:
                raise PeerLost(
                    f"broadcast failed: its root (peer {root_peer[0]}) is gone", peer=root_peer[0], epoch=epoch,
                    tag=tag, step=step,
                )

        def start(epoch: int, engine_seq: int, deadline: float) -> Any:
            ring = self.ring_of(epoch)
            world, rank = len(ring), self._rank_in(epoch)
            kwargs: dict[str, Any] = {}
            if call == "broadcast":
                kind = choose_broadcast(src.nbytes, world, self.config.direct_allreduce_max_bytes)
                kwargs["root"] = ring.index(root_peer[0])
                result, dst = x_host, src
            else:
                kind = _KINDS[call]
                result, dst = outputs.get(world, rank)
            results.append(result)
            return engine.all_to_all(
                kind,
                src,
                dst,
                dtype,
                op.native,
                tag=engine_tag,
                seq=engine_seq,
                timeout=remaining(deadline),
                connect_timeout=min(self.config.connect_timeout, remaining(deadline)),
                vote=True,
                **kwargs,
            )

        def run(blocking: bool, attempt_key: list[OpKey] | None = None) -> GatherInfo:
            done = self._run_attempts(
                call, tag, engine_tag, seq, start, lambda: desc, deadline, retry, blocking=blocking,
                attempt_key=attempt_key, precheck=precheck if call == "broadcast" else None,
            )
            result = results[-1]
            if copy_back is not None:
                copy_back()
                result = x
            elif call != "broadcast":
                result = _to_device(result, x, out)
            return GatherInfo(
                world_size=done.world,
                tx_bytes=done.handle.tx_bytes,
                rx_bytes=done.handle.rx_bytes,
                output=result,
                epoch=done.key[0],
                rank=self._rank_in(done.key[0]),
                attempts=done.attempts,
                contributors=self.ring_of(done.key[0]),
            )

        if not run_async:
            return run(blocking=True)
        current: list[OpKey] = []  # the key of its latest attempt, for wait()'s report

        def on_slow() -> None:
            if current:
                self._report_blocked(call, current[-1])

        return AllReduceHandle(
            self._op_executor().submit(run, False, current),
            on_slow,
            self.config.blocked_report_after,
            self.config.heartbeat_interval,
        )

    def _rank_in(self: PeerCore, epoch: int) -> int:
        ring = self.ring_of(epoch)
        return ring.index(self.peer_id) if self.peer_id in ring else 0
