"""The all-reduce calls of the Communicator (mixed into it): argument checks, the
choice of algorithm, one attempt on the engine (the attempt loop, with the commit vote,
the master's verdict and the retry over the survivors, is AttemptCalls'), the shape a
blocked caller reports, and the handle of an async all-reduce (or of any async
collective).

In-place results are kept in the caller's buffer only once the op succeeded on every
survivor, so a failed op leaves the input intact and can be retried."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pccl_py import _native
from pccl_py.errors import InvalidArgument, Timeout
from pccl_py.peer.attempts import STEP_BITS, remaining
from pccl_py.peer.buffers import native_view, stage_to_host
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.session import OpKey
from pccl_py.types import Quantization, ReduceInfo, ReduceOp

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (
    _native.DataType.FLOAT16,
    _native.DataType.BFLOAT16,
    _native.DataType.FLOAT32,
    _native.DataType.FLOAT64,
)


def choose_algorithm(
    nbytes: int, world: int, direct_max_bytes: int, rsag_min_bytes: int = 0
) -> _native.AllReduceAlgorithm:
    """The algorithm of an unquantized all-reduce of `nbytes` over `world` peers.

    DIRECT when the bytes each peer sends, nbytes x (world - 1), are at most
    `direct_max_bytes` (0 disables it): one exchange and an all-to-all vote, about one
    round trip. Otherwise DIRECT_RSAG when `rsag_min_bytes` > 0 and nbytes is at least
    that: the ring's 2(world-1)/world x nbytes per peer, but two one-way delays and an
    all-to-all vote. RING otherwise: the same bytes in 3(world-1) hops, to neighbours
    only. Every peer must choose the same (the algorithm is in the op's shape digest),
    so the inputs are what every peer of an epoch shares: the payload size (peers
    disagreeing on it fail anyway), the ring's size, and Config.direct_allreduce_max_bytes
    and Config.rsag_min_bytes, which a deployment must set alike everywhere (otherwise:
    ProtocolError on every peer)."""
    if world > 1 and direct_max_bytes > 0 and nbytes * (world - 1) <= direct_max_bytes:
        return _native.AllReduceAlgorithm.DIRECT
    if world > 1 and rsag_min_bytes > 0 and nbytes >= rsag_min_bytes:
        return _native.AllReduceAlgorithm.DIRECT_RSAG
    return _native.AllReduceAlgorithm.RING


Result = TypeVar("Result")


class AllReduceHandle(Generic[Result]):
    """A collective in flight (all_reduce_async, all_gather_async). wait() returns its
    info (ReduceInfo, GatherInfo) or raises its error."""

    def __init__(
        self,
        future: concurrent.futures.Future[Result],
        on_slow: Callable[[], None] | None = None,
        slow_after: float = 0.0,
        slow_every: float = 1.0,
    ) -> None:
        self._future = future
        self._on_slow = on_slow  # tells the master what this caller waits on (mismatch detection)
        self._slow_after = slow_after
        self._slow_every = slow_every

    def wait(self, timeout: float | None = None) -> Result:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._on_slow is not None:
            # Report what this caller waits on after slow_after, then every slow_every.
            step = self._slow_after
            while deadline is None or deadline - time.monotonic() > step:
                try:
                    return self._future.result(step)
                except concurrent.futures.TimeoutError:
                    self._on_slow()
                step = self._slow_every
        try:
            return self._future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise Timeout(f"collective still running after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()


def _describe(src: Any, dtype: Any, op: ReduceOp, tag: int, seq: int, quantization: Quantization | None) -> str:
    """An all-reduce's shape as the master compares it: peers in the same step must agree."""
    count = src.nbytes // _native.element_size(dtype)
    text = f"tag {tag}, step {seq & ((1 << STEP_BITS) - 1)}, {count} x {dtype.name.lower()}, {op.name}"
    return text + (f", {quantization.kind} {quantization.dtype}" if quantization is not None else "")


class AllReduceCalls:
    def all_reduce(
        self: PeerCore,
        x: Any,
        op: ReduceOp = ReduceOp.SUM,
        out: Any = None,
        tag: int | None = None,
        quantization: Any = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> ReduceInfo:
        """Reduces `x` (numpy array or torch tensor; CUDA tensors are staged through
        pinned host memory) across the group, in place or into `out`. Every participant
        gets the same bytes. On a peer failure raises PeerLost on every survivor with `x`
        intact, or with retry=True re-runs over the survivors; ReduceInfo.world_size
        tells how many contributed. `timeout` bounds the whole call (default:
        config.op_timeout). `quantization`: a pccl_py.Quantization (SUM/AVG of floats;
        every peer must pass the same one), see docs/quantization.md."""
        x_host, out_host, copy_back = stage_to_host(x, out)
        args = self._prepare(x_host, op, out_host, tag, quantization)
        info = self._run_all_reduce(*args, self._deadline(timeout, self.config.op_timeout), retry, blocking=True)
        if copy_back is not None:
            copy_back()
        return info

    def all_reduce_async(
        self: PeerCore,
        x: Any,
        op: ReduceOp = ReduceOp.SUM,
        out: Any = None,
        tag: int | None = None,
        quantization: Any = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> AllReduceHandle[ReduceInfo]:
        """Starts an all-reduce and returns a handle. Ops in flight at once need distinct
        tags; do not touch `x`/`out` until the handle is done."""
        x_host, out_host, copy_back = stage_to_host(x, out)
        args = self._prepare(x_host, op, out_host, tag, quantization)
        deadline = self._deadline(timeout, self.config.op_timeout)

        current: list[OpKey] = []  # the key of its latest attempt, for wait()'s report

        def run() -> ReduceInfo:
            info = self._run_all_reduce(*args, deadline, retry, attempt_key=current)
            if copy_back is not None:
                copy_back()
            return info

        def on_slow() -> None:
            if current:
                self._report_blocked("all_reduce", current[-1])

        return AllReduceHandle(
            self._op_executor().submit(run), on_slow, self.config.blocked_report_after, self.config.heartbeat_interval
        )

    def _prepare(
        self: PeerCore, x: Any, op: ReduceOp, out: Any, tag: int | None, quantization: Any
    ) -> tuple[Any, Any, Any, ReduceOp, int, int, Quantization | None]:
        self._require()
        if not isinstance(op, ReduceOp):
            raise InvalidArgument(f"op must be a pccl_py.ReduceOp, got {op!r}")
        if quantization is not None and not isinstance(quantization, Quantization):
            raise InvalidArgument(f"quantization must be a pccl_py.Quantization or None, got {quantization!r}")
        src, dtype = native_view(x)
        if quantization is not None:
            if op not in (ReduceOp.SUM, ReduceOp.AVG):
                raise InvalidArgument(f"a quantized all-reduce supports SUM and AVG only, not {op.name}")
            if dtype not in _FLOAT_DTYPES:
                raise InvalidArgument(f"quantization needs a floating-point tensor, not {dtype.name.lower()}")
        if out is None or out is x:
            dst = src
        else:
            dst, out_dtype = native_view(out)
            if out_dtype != dtype or dst.nbytes != src.nbytes:
                raise InvalidArgument("out must have the dtype and size of x")
        tag, _, seq = self._number("all_reduce", tag)  # all-reduces run on the user's tag itself
        return src, dst, dtype, op, tag, seq, quantization

    def _run_all_reduce(
        self: PeerCore,
        src: Any,
        dst: Any,
        dtype: Any,
        op: ReduceOp,
        tag: int,
        seq: int,
        quantization: Quantization | None,
        deadline: float,
        retry: bool,
        *,
        blocking: bool = False,
        attempt_key: list[OpKey] | None = None,
    ) -> ReduceInfo:
        """Runs (and with `retry` re-runs) one all-reduce (AttemptCalls._run_attempts)."""
        engine = self._engine
        assert engine is not None
        in_place = dst is src
        # Only a "blocked" report needs the op's shape in words: built then, not per op.
        desc = functools.partial(_describe, src, dtype, op, tag, seq, quantization)
        algorithms: list[_native.AllReduceAlgorithm] = []  # each attempt's

        def start(epoch: int, engine_seq: int, deadline: float) -> Any:
            algorithm = _native.AllReduceAlgorithm.RING
            if quantization is None:  # the ring of this attempt's epoch decides (a retry may differ)
                algorithm = choose_algorithm(
                    src.nbytes,
                    len(self._rings.get(epoch, ())),
                    self.config.direct_allreduce_max_bytes,
                    # The master keeps an epoch to the ring when some pair is much
                    # slower than the ring it optimised (every peer reads the same).
                    0 if epoch in self._ring_only else self.config.rsag_min_bytes,
                )
            algorithms.append(algorithm)
            return engine.all_reduce(
                src,
                dst,
                dtype,
                op.native,
                tag=tag,
                seq=engine_seq,
                timeout=remaining(deadline),
                connect_timeout=min(self.config.connect_timeout, remaining(deadline)),
                defer_commit=in_place,
                quantization=quantization.native_kind if quantization else _native.QuantKind.NONE,
                quant_dtype=quantization.native_dtype if quantization else _native.DataType.UINT8,
                vote=True,
                algorithm=algorithm,
            )

        done = self._run_attempts(
            "all_reduce", tag, tag, seq, start, desc, deadline, retry, blocking=blocking, attempt_key=attempt_key
        )
        return ReduceInfo(
            world_size=done.world,
            tx_bytes=done.handle.tx_bytes if done.handle is not None else 0,
            rx_bytes=done.handle.rx_bytes if done.handle is not None else 0,
            epoch=done.key[0],
            attempts=done.attempts,
            contributors=self._rings.get(done.key[0], ()),
            algorithm="quantized" if quantization is not None else algorithms[-1].name.lower(),
        )
