"""The all-reduce calls of the Communicator (mixed into it): argument checks and step
numbering, the attempt loop (run on the engine, commit vote or the master's verdict,
retry over the survivors), the report that names what a blocked caller waits on,
and the handle of an async all-reduce.

Every all-reduce runs in three steps: the data plane moves and reduces the bytes peer
to peer; each participant commits on its own once the commit vote came round, or
reports its local result to the master; the master decides one outcome for everyone
(pccl_py.master.membership), so an op succeeds on all survivors or fails on all of
them. In-place results are kept in the caller's buffer only then, so a failed op
leaves the input intact and can be retried."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from pccl_py import _native
from pccl_py.errors import (
    FailureKind,
    InvalidArgument,
    PcclError,
    Timeout,
    error_class,
    failure_kind,
)
from pccl_py.peer.buffers import native_view, stage_to_host
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.session import ATTEMPT_BITS, OpKey
from pccl_py.types import Quantization, ReduceInfo, ReduceOp
from pccl_py.wire import protocol

log = logging.getLogger(__name__)

# Engine step = round << 40 | step << 8 | attempt. The round changes at each topology
# vote (when every member restarts its step numbering, so joiners line up with the
# others); the attempt changes at each retry: every attempt is a distinct op.
_ATTEMPT_BITS = ATTEMPT_BITS
_STEP_BITS = 32
_FLOAT_DTYPES = (
    _native.DataType.FLOAT16,
    _native.DataType.BFLOAT16,
    _native.DataType.FLOAT32,
    _native.DataType.FLOAT64,
)
# Failures that re-running over the survivors can fix.
_RETRYABLE = (FailureKind.PEER_LOST, FailureKind.PEER_LEFT)


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


class AllReduceHandle:
    """An all-reduce in flight. wait() returns its ReduceInfo or raises its error."""

    def __init__(
        self,
        future: concurrent.futures.Future[ReduceInfo],
        on_slow: Callable[[], None] | None = None,
        slow_after: float = 0.0,
        slow_every: float = 1.0,
    ) -> None:
        self._future = future
        self._on_slow = on_slow  # tells the master what this caller waits on (mismatch detection)
        self._slow_after = slow_after
        self._slow_every = slow_every

    def wait(self, timeout: float | None = None) -> ReduceInfo:
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
            raise Timeout(f"all-reduce still running after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()


def _describe(src: Any, dtype: Any, op: ReduceOp, tag: int, seq: int, quantization: Quantization | None) -> str:
    """An all-reduce's shape as the master compares it: peers in the same step must agree."""
    count = src.nbytes // _native.element_size(dtype)
    text = f"tag {tag}, step {seq & ((1 << _STEP_BITS) - 1)}, {count} x {dtype.name.lower()}, {op.name}"
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
    ) -> AllReduceHandle:
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
        self._catch_up_round()
        self._fresh = False
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
        tag = 0 if tag is None else int(tag)
        if not 0 <= tag < 2**32:
            raise InvalidArgument("tag must be in [0, 2**32)")
        with self._seq_lock:  # steps are numbered in call order, the same on every peer
            step = self._next_seq.get(tag, 0)
            self._next_seq[tag] = step + 1
            seq = (self._round << _STEP_BITS) | step
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
        """Runs (and with `retry` re-runs) one all-reduce. `blocking`: the caller's
        thread waits in it (reported to the master if it waits long: mismatch
        detection); `attempt_key` receives the key of each attempt."""
        engine = self._engine
        control = self._require()
        assert engine is not None
        in_place = dst is src
        # Only a "blocked" report needs the op's shape in words: built then, not per op.
        desc = functools.partial(_describe, src, dtype, op, tag, seq, quantization)
        failures_in_epoch: dict[int, int] = {}  # a retry in the same epoch needs a fresh key
        attempts = 0
        algorithm = _native.AllReduceAlgorithm.RING
        while True:
            epoch = -1
            handle = None
            outcome: protocol.Message | None = None
            superseded = mismatched = False  # this peer aborted the attempt: the master moved on / found a mismatch
            ok, kind, msg, culprit = True, "", "", -1
            try:
                epoch = self._ensure_ring(deadline)
                key = (epoch, tag, (seq << _ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                if quantization is None:  # the ring of this attempt's epoch decides (a retry may differ)
                    algorithm = choose_algorithm(
                        src.nbytes,
                        len(self._rings.get(epoch, ())),
                        self.config.direct_allreduce_max_bytes,
                        # The master keeps an epoch to the ring when some pair is much
                        # slower than the ring it optimised (every peer reads the same).
                        0 if epoch in self._ring_only else self.config.rsag_min_bytes,
                    )
                handle = engine.all_reduce(
                    src,
                    dst,
                    dtype,
                    op.native,
                    tag=tag,
                    seq=key[2],
                    timeout=max(0.0, deadline - time.monotonic()),
                    connect_timeout=min(self.config.connect_timeout, max(0.0, deadline - time.monotonic())),
                    defer_commit=in_place,
                    quantization=quantization.native_kind if quantization else _native.QuantKind.NONE,
                    quant_dtype=quantization.native_dtype if quantization else _native.DataType.UINT8,
                    vote=True,
                    algorithm=algorithm,
                )
                self._track(key, handle, retry, desc)
                if attempt_key is not None:
                    attempt_key.append(key)
                try:
                    if blocking:
                        # Tell the master what this caller waits on, and again every
                        # heartbeat interval (a restarted master must hear it too).
                        wait = self.config.blocked_report_after
                        while not handle.wait(wait):
                            self._report_blocked("all_reduce", key)
                            wait = self.config.heartbeat_interval
                    handle.result()
                finally:
                    superseded, mismatched = self._untrack(key)
            except PcclError as exc:
                if epoch < 0:  # no ring to run on (evicted, closed, timed out)
                    raise
                key = (epoch, tag, (seq << _ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                # After voting, this peer held the whole result and another may have
                # committed it: it reports ok and the master settles the op (one
                # commit anywhere makes it a success). Before voting: a failure, and
                # provably nobody committed.
                ok = handle is not None and handle.voted
                kind = failure_kind(exc)
                if kind == FailureKind.ABORTED and mismatched:
                    kind = FailureKind.COLLECTIVE_MISMATCH  # the master found the members out of step
                elif kind == FailureKind.ABORTED and superseded:
                    kind = FailureKind.PEER_LOST  # the master moved on: a consequence, not a cause
                text = self._session.mismatch_text() if kind == FailureKind.COLLECTIVE_MISMATCH else str(exc)
                kind, msg = (FailureKind.NONE, "") if ok else (kind, text)
                culprit = exc.peer if isinstance(exc.peer, int) and exc.peer < 2**63 else -1
            else:
                # Committed: the vote came round, every participant holds the result.
                # No master round trip; the master hears of it in the next "done" batch.
                world = len(self._rings.get(key[0], ()))
                control.note_committed(key, world)
                outcome = {"ok": True, "world": world}
            if outcome is None:
                outcome = self._outcome(key, ok, kind, msg, culprit, deadline)
            attempts += 1
            if outcome["ok"]:
                if handle is not None:
                    handle.settle(True)
                self._events.emit(
                    "op", epoch=key[0], tag=tag, seq=key[2], ok=True, world=outcome["world"], ring=self.ring_of(key[0])
                )
                return ReduceInfo(
                    world_size=outcome["world"],
                    tx_bytes=handle.tx_bytes if handle is not None else 0,
                    rx_bytes=handle.rx_bytes if handle is not None else 0,
                    epoch=key[0],
                    attempts=attempts,
                    contributors=self._rings.get(key[0], ()),
                    algorithm="quantized" if quantization is not None else algorithm.name.lower(),
                )
            if handle is not None:
                handle.settle(False)
            self._events.emit(
                "op", epoch=key[0], tag=tag, seq=key[2], ok=False, kind=outcome["kind"], ring=self.ring_of(key[0])
            )
            error = error_class(outcome["kind"])(
                f"all-reduce failed: {outcome['msg']}",
                peer=outcome["peer"] if outcome["peer"] >= 0 else None,
                epoch=key[0],
                tag=tag,
                step=seq & ((1 << _STEP_BITS) - 1),
            )
            if outcome["kind"] == FailureKind.COLLECTIVE_MISMATCH:
                self._start_round()  # every member does: numbering restarts where the master says
            retryable = outcome["kind"] == FailureKind.PEER_LEFT or (retry and outcome["kind"] in _RETRYABLE)
            failures_in_epoch[key[0]] = failures_in_epoch.get(key[0], 0) + 1
            if not retryable or attempts >= self.config.max_retries or failures_in_epoch[key[0]] >= 1 << _ATTEMPT_BITS:
                raise error
            # Re-run once the master's new ring (if the failure made one) is known here.
            next_epoch = outcome["next_epoch"]
            self._session.wait(
                functools.partial(self._session.epoch_reached, next_epoch),
                deadline,
                f"epoch {next_epoch}",
            )

    def _outcome(self: PeerCore, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, deadline: float) -> protocol.Message:
        """Reports this peer's result for op `key` and returns the master's decision."""
        control = self._require()
        session = self._session
        control.flush_committed()  # the master weighs this report against those
        known = session.note_reported(key, ok, kind, msg[:2000])  # handed to a restarted master
        try:
            if not known:
                control.send(
                    protocol.make(
                        "op", epoch=key[0], tag=key[1], seq=key[2], ok=ok, kind=kind, msg=msg[:2000], peer=culprit
                    )
                )
            return session.wait(lambda: session.take_outcome(key), deadline, f"the outcome of op {key}")
        finally:
            session.forget_reported(key)

    def _track(self: PeerCore, key: OpKey, handle: Any, retry: bool, desc: Callable[[], str]) -> None:
        if self._session.track(key, handle, retry, desc):
            handle.abort("the master already failed this op (superseded)")

    def _untrack(self: PeerCore, key: OpKey) -> tuple[bool, bool]:
        """Forgets op `key`; returns whether this peer aborted it as superseded, and
        whether because of a mismatch."""
        return self._session.untrack(key)
