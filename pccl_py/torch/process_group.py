"""ProcessGroupPccl: a torch.distributed ProcessGroup whose collectives run on one
pccl_py Communicator.

Every collective is queued in call order and returns a Work backed by a torch Future,
so `async_op=True` and DDP's reducer (which chains on `Work.get_future()`) overlap
communication with the caller's compute; up to 4 run at once, each on a pccl tag of
its own (pccl_py.torch.dispatch).

The collectives map onto the Communicator's, each moving the bytes a dedicated
implementation moves:

- all-reduce: all_reduce, one per dtype over the flattened tensors.
- broadcast, scatter: broadcast of the root's bytes (scatter: every slot, each rank
  keeps its own).
- all-gather (and gather): all_gather of this rank's bytes, rows reordered from the
  pccl ring's order to the torch ranks' (the ring's order is the ranks' after the usual
  rendezvous, and then an all_gather_into_tensor lands straight in its output).
- reduce-scatter: reduce_scatter of the input with its chunks laid out in ring order.
- reduce: an all-reduce of a copy; barrier: a one-byte all-reduce.
- all-to-all: all_to_all of the blocks laid out by ring position, padded to the largest
  (pccl_py.torch.exchange); monitored_barrier: a flag all-gather (pccl_py.torch.monitored).
- BAND/BOR/BXOR all-reduce on integers: an all-gather, reduced here in rank order;
  SUM of a sparse COO tensor: an all-gather of every rank's indices and values, summed
  here (coalesce), as gloo's sparse all-reduce.

Tensors outside host memory (CUDA) are staged (pccl_py.torch.staging): copied to host
when the op is issued, reduced there, copied back before the Work completes. Reduce ops
and dtypes map onto pccl's in pccl_py.torch.ops; the Work is pccl_py.torch.work's.

Point-to-point (send, recv, recv_anysource) bypasses the queue: pccl_py.torch.p2p.

Failure: the first error of a collective poisons the group, as in Gloo (dispatch.py).
The group never carries on with fewer ranks: an op that succeeded with fewer
contributors than the group's size fails too.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from pccl_py import Communicator, Master, ReduceOp
from pccl_py.errors import Timeout
from pccl_py.torch.dispatch import Dispatcher
from pccl_py.torch.errors import PcclBackendError
from pccl_py.torch.exchange import AllToAllCalls
from pccl_py.torch.gathered import GatheredReductions
from pccl_py.torch.monitored import MonitoredBarrierCalls
from pccl_py.torch.ops import bitwise_op, premul_factor, reduce_op
from pccl_py.torch.p2p import P2PProgress, PointToPointOps
from pccl_py.torch.staging import Staged, by_dtype, byte_view, split_into
from pccl_py.torch.work import PcclWork

log = logging.getLogger(__name__)


class ProcessGroupPccl(
    AllToAllCalls, MonitoredBarrierCalls, GatheredReductions, PointToPointOps, dist.ProcessGroup
):
    """torch.distributed ProcessGroup over a connected pccl_py Communicator.

    Owns `comm` (closed by shutdown()) and, when given, the in-process `master` this
    rank started for the group (closed last, once the other ranks have left or the
    grace period ran out). `timeout` bounds every collective unless its options carry
    their own.
    """

    def __init__(
        self,
        comm: Communicator,
        rank: int,
        size: int,
        timeout: datetime.timedelta,
        master: Master | None = None,
        peer_ranks: dict[int, int] | None = None,
        max_inflight: int | None = None,
    ) -> None:
        super().__init__(rank, size)
        self._comm = comm
        self._peer_ranks = peer_ranks  # peer id -> torch rank (learned at the first gather when None)
        self._rank = rank
        self._size = size
        self._timeout = timeout.total_seconds()
        self._master = master
        self._group_name = ""
        self._group_desc = ""
        self._dispatch = Dispatcher(rank, max_inflight, lambda: self._peer_ranks is None)
        self._closed = False
        self._p2p_progress = P2PProgress()  # completes point-to-point futures
        # A script that dies of a collective's error never calls destroy_process_group():
        # stop the worker and the communicator's threads before the interpreter tears
        # torch down under them (which crashed such processes with SIGSEGV at exit).
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ identity

    def getBackendName(self) -> str:
        return "pccl"

    @property
    def name(self) -> str:  # type: ignore[override]
        return "pccl"

    def _get_backend_name(self) -> str:
        return "pccl"

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    @property
    def group_name(self) -> str:  # type: ignore[override]
        return self._group_name

    @property
    def group_desc(self) -> str:  # type: ignore[override]
        return self._group_desc

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout = timeout.total_seconds()

    @property
    def communicator(self) -> Communicator:
        return self._comm

    # ------------------------------------------------------------------ collectives

    def allreduce(self, tensors: Any, opts: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        return self.allreduce_coalesced(tensors, opts)

    def allreduce_coalesced(self, tensors: Sequence[torch.Tensor], opts: Any = None) -> dist.Work:
        red = opts.reduceOp if opts is not None else dist.ReduceOp(dist.ReduceOp.SUM)
        timeout = self._op_timeout(opts)
        if any(t.is_sparse for t in tensors):
            return self._sparse_all_reduce(list(tensors), red, timeout)
        staged = [Staged(t) for t in tensors]
        bitwise = bitwise_op(red, [s.host.dtype for s in staged])
        if bitwise is not None:
            return self._bitwise_all_reduce(list(tensors), staged, bitwise, timeout)
        for s in staged:
            reduce_op(red, s.host.dtype)  # reject unsupported ops before queueing

        def run() -> list[torch.Tensor]:
            # One all-reduce per dtype over the flattened tensors.
            for group in by_dtype(staged):
                hosts = [s.host for s in group]
                dtype = hosts[0].dtype
                op = reduce_op(red, dtype)
                factor = premul_factor(red)
                if len(hosts) == 1:
                    flat = hosts[0]
                else:
                    flat = torch.cat([h.reshape(-1) for h in hosts])
                if factor is not None:
                    flat.mul_(factor)
                buf = flat.view(torch.uint8) if dtype == torch.bool else flat
                self._all_reduce(buf, op, timeout)
                if len(hosts) > 1:
                    offset = 0
                    for h in hosts:
                        h.reshape(-1).copy_(flat[offset : offset + h.numel()])
                        offset += h.numel()
            for s in staged:
                s.commit()
            return list(tensors)

        return self._submit(run, tensors)

    def broadcast(self, tensors: Any, opts: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        self._check_rank(root)
        timeout = self._op_timeout(opts)
        staged = [Staged(t, read=self._rank == root) for t in tensors]

        def run() -> list[torch.Tensor]:
            if len(staged) == 1:
                buf = byte_view(staged[0].host)
            elif self._rank == root:
                buf = torch.cat([byte_view(s.host) for s in staged])
            else:
                buf = torch.empty(sum(s.host.nbytes for s in staged), dtype=torch.uint8)
            self._broadcast(buf, root, timeout)
            if len(staged) > 1:
                split_into(buf, [byte_view(s.host) for s in staged])
            for s in staged:
                s.commit()
            return list(tensors)

        return self._submit(run, tensors)

    def allgather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> dist.Work:
        """output_tensors[i][r] receives rank r's input_tensors[i] (torch's all_gather,
        one output list per input): the coalesced all-gather with its lists transposed."""
        if isinstance(input_tensors, torch.Tensor):
            input_tensors, output_tensors = [input_tensors], [output_tensors]
        if len(input_tensors) != len(output_tensors):
            raise PcclBackendError("allgather: one output list per input tensor")
        for outs in output_tensors:
            self._check_list(outs, "allgather output")
        by_rank = [[outs[r] for outs in output_tensors] for r in range(self._size)]
        return self._gather(by_rank, list(input_tensors), self._op_timeout(opts), "allgather")

    def allgather_coalesced(self, output_lists: Any, input_list: Any, opts: Any = None) -> dist.Work:
        """output_lists[r][i] receives rank r's input_list[i] (torch's
        all_gather_coalesced); the inputs may differ from each other in shape and dtype."""
        self._check_list(output_lists, "allgather_coalesced output lists")
        return self._gather(
            list(output_lists), list(input_list), self._op_timeout(opts), "allgather_coalesced"
        )

    def _gather(
        self, by_rank: list[list[torch.Tensor]], inputs: list[torch.Tensor], timeout: float, what: str
    ) -> dist.Work:
        """by_rank[r][i] receives rank r's inputs[i]: one all-gather of this rank's
        inputs packed back to back as bytes, each row unpacked into that rank's outputs."""
        for r, outs in enumerate(by_rank):
            if len(outs) != len(inputs):
                raise PcclBackendError(
                    f"{what}: the outputs for rank {r} hold {len(outs)} tensors for {len(inputs)} inputs"
                )
            for i, (out, x) in enumerate(zip(outs, inputs, strict=True)):
                if out.dtype != x.dtype or out.numel() != x.numel():
                    raise PcclBackendError(
                        f"{what}: the output for rank {r}, input {i} is {out.dtype} x {out.numel()}; "
                        f"the input is {x.dtype} x {x.numel()}"
                    )
        slots = [[Staged(o, read=False) for o in outs] for outs in by_rank]
        sources = [Staged(x) for x in inputs]

        def run() -> list[torch.Tensor]:
            mine = (
                torch.cat([byte_view(x.host) for x in sources])
                if sources
                else torch.empty(0, dtype=torch.uint8)
            )
            rows = self._all_gather(mine, None, timeout)
            for r, outs in enumerate(slots):
                split_into(rows[r], [byte_view(s.host) for s in outs])
                for s in outs:
                    s.commit()
            return [t for outs in by_rank for t in outs]

        return self._submit(run, [by_rank, inputs])

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        return self.all_gather_single_coalesced([output], [input], opts)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(
        self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        timeout = self._op_timeout(opts)
        pairs = []
        for out, x in zip(outputs, inputs, strict=True):
            if out.nbytes != x.nbytes * self._size or out.dtype != x.dtype:
                raise PcclBackendError(
                    f"all_gather_single: output must hold world_size ({self._size}) inputs of the same dtype"
                )
            pairs.append((Staged(out, read=False), Staged(x)))

        def run() -> list[torch.Tensor]:
            for out, x in pairs:
                # Straight into the output when it is contiguous host memory (its own
                # slot may hold the input already: FSDP gathers in place).
                target = byte_view(out.host) if out.direct else None
                rows = self._all_gather(byte_view(x.host), target, timeout)
                if target is None or rows[0].data_ptr() != target.data_ptr():
                    split_into(torch.cat(rows), [byte_view(out.host)])
                out.commit()
            return list(outputs)

        return self._submit(run, [outputs, inputs])

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def reduce_scatter(self, output_tensors: Any, input_lists: Any, opts: Any = None) -> dist.Work:
        """output_tensors: [y], input_lists: [[x_0, ..., x_{N-1}]]."""
        if isinstance(output_tensors, torch.Tensor):
            output_tensors, input_lists = [output_tensors], [input_lists]
        red = opts.reduceOp if opts is not None else dist.ReduceOp(dist.ReduceOp.SUM)
        timeout = self._op_timeout(opts)
        plans = []
        for y, xs in zip(output_tensors, input_lists, strict=True):
            self._check_list(xs, "reduce_scatter input")
            if any(x.dtype != y.dtype or x.numel() != y.numel() for x in xs):
                raise PcclBackendError("reduce_scatter: every input must match the output's dtype and size")
            reduce_op(red, y.dtype)
            plans.append((Staged(y, read=False), [Staged(x) for x in xs]))

        def run() -> list[torch.Tensor]:
            for y, xs in plans:
                self._reduce_scatter([y], [[x.host for x in xs]], red, timeout)
            return list(output_tensors)

        return self._submit(run, [output_tensors, input_lists])

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        return self.reduce_scatter_single_coalesced([output], [input], opts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(
        self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], opts: Any = None
    ) -> dist.Work:
        red = opts.reduceOp if opts is not None else dist.ReduceOp(dist.ReduceOp.SUM)
        timeout = self._op_timeout(opts)
        pairs = []
        for y, x in zip(outputs, inputs, strict=True):
            if x.numel() != y.numel() * self._size or x.dtype != y.dtype:
                raise PcclBackendError(
                    f"reduce_scatter_single: input must hold world_size ({self._size}) outputs of the same dtype"
                )
            reduce_op(red, y.dtype)
            pairs.append((Staged(y, read=False), Staged(x)))

        def run() -> list[torch.Tensor]:
            for group in by_dtype([x for _, x in pairs]):
                members = [(y, x) for y, x in pairs if any(x is g for g in group)]
                chunks = [list(x.host.reshape(-1).chunk(self._size)) for _, x in members]
                self._reduce_scatter([y for y, _ in members], chunks, red, timeout)
            return list(outputs)

        return self._submit(run, [outputs, inputs])

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def reduce(self, tensors: Any, opts: Any = None) -> dist.Work:
        """All-reduces a copy; only the root keeps the result (torch's reduce semantics)."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        self._check_rank(root)
        red = opts.reduceOp if opts is not None else dist.ReduceOp(dist.ReduceOp.SUM)
        timeout = self._op_timeout(opts)
        staged = [Staged(t) for t in tensors]
        for s in staged:
            reduce_op(red, s.host.dtype)

        def run() -> list[torch.Tensor]:
            for s in staged:
                result = torch.empty_like(s.host)
                self._reduce(s.host, result, red, timeout)
                if self._rank == root:
                    s.host.copy_(result)
                    s.commit()
            return list(tensors)

        return self._submit(run, tensors)

    def gather(self, output_lists: Any, input_tensors: Any, opts: Any = None) -> dist.Work:
        """An all-gather whose result only the root keeps."""
        root = opts.rootRank if opts is not None else 0
        self._check_rank(root)
        x = input_tensors[0]
        outs = output_lists[0] if self._rank == root else [torch.empty_like(x) for _ in range(self._size)]
        return self.allgather([outs], [x], opts)

    def scatter(self, output_tensors: Any, input_lists: Any, opts: Any = None) -> dist.Work:
        """The root broadcasts every slot; each rank keeps its own."""
        root = opts.rootRank if opts is not None else 0
        self._check_rank(root)
        y = output_tensors[0]
        timeout = self._op_timeout(opts)
        target = Staged(y, read=False)
        sources = [Staged(t) for t in input_lists[0]] if self._rank == root else []

        def run() -> list[torch.Tensor]:
            n = target.host.nbytes
            if self._rank == root:
                buf = torch.cat([byte_view(s.host) for s in sources])
            else:
                buf = torch.empty(n * self._size, dtype=torch.uint8)
            self._broadcast(buf, root, timeout)
            byte_view(target.host).copy_(buf[self._rank * n : (self._rank + 1) * n])
            target.commit()
            return [y]

        return self._submit(run, [y, input_lists])

    def barrier(self, opts: Any = None) -> dist.Work:
        """A one-byte all-reduce. When it times out the error says so in gloo's words
        ("Timed out waiting N ms"), which torch's barrier tests match."""
        timeout = self._op_timeout(opts)

        def run() -> list[torch.Tensor]:
            try:
                self._all_reduce(torch.zeros(1, dtype=torch.uint8), ReduceOp.SUM, timeout)
            except Timeout as exc:
                raise PcclBackendError(
                    f"pccl barrier on rank {self._rank}: Timed out waiting {round(timeout * 1000)}ms for every rank "
                    f"to reach the barrier: {exc}"
                ) from exc
            return []

        return self._submit(run)  # after every collective before it, as gloo's barrier

    def _unsupported(self, what: str) -> dist.Work:
        raise PcclBackendError(f"the pccl backend does not implement {what}")


    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Stops the worker, leaves the pccl group, and (on the rank that started it)
        closes the in-process master once the other ranks have left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._dispatch.close(self._timeout)
        master, self._master = self._master, None
        if master is not None:
            # The other ranks may still be waiting for the outcome of the last op:
            # keep the master up until they have left (or were found dead).
            wait_until_alone(self._comm, grace=min(self._timeout, 30.0))
        self._comm.close()
        self._p2p_progress.close(self._timeout)
        if master is not None:
            master.close()

    abort = shutdown

    def _shutdown_quietly(self) -> None:
        try:
            self.shutdown()
        except Exception:  # at exit: never mask the error the script is dying of
            log.debug("pccl process group shutdown at exit failed", exc_info=True)

    # ------------------------------------------------------------------ internals

    def _submit(
        self, run: Callable[[], list[torch.Tensor]], tensors: Sequence[Any] | None = None
    ) -> dist.Work:
        """Queues `run` (which calls the Communicator through the helpers below, on the
        tag the dispatcher gives it). `tensors`: every tensor it reads or writes; None
        makes it wait for every collective before it and hold back the ones after."""
        if self._closed:
            raise PcclBackendError("the pccl process group has been shut down")
        # The Work (and the future DDP chains on) exist before the collective can start:
        # built after, they would contend for the GIL with the runner thread running it.
        future: Future[Any] = Future()
        work = PcclWork(future)
        self._dispatch.submit(run, tensors, future)
        return work

    @property
    def _tag(self) -> int:
        return self._dispatch.tag

    @property
    def _failure(self) -> BaseException | None:
        return self._dispatch.failure

    def _all_reduce(self, buf: torch.Tensor, op: ReduceOp, timeout: float) -> None:
        info = self._comm.all_reduce(buf, op=op, tag=self._tag, timeout=timeout)
        self._check_world(info.world_size)

    def _reduce(self, x: torch.Tensor, out: torch.Tensor | None, red: Any, timeout: float) -> None:
        """all-reduce with a torch ReduceOp (PREMUL_SUM scales a copy first)."""
        op = reduce_op(red, x.dtype)
        factor = premul_factor(red)
        if factor is not None:
            x = x.mul(factor) if out is not None else x.mul_(factor)
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)
            out = out.view(torch.uint8) if out is not None else None
        info = self._comm.all_reduce(x, op=op, out=out, tag=self._tag, timeout=timeout)
        self._check_world(info.world_size)

    def _check_world(self, contributors: int) -> None:
        if contributors != self._size:
            raise PcclBackendError(
                f"only {contributors} of {self._size} ranks took part (a rank left the pccl group); "
                "the torch.distributed group cannot shrink: use pccl_py.optim.DiLoCo for elastic training"
            )

    def _ring_ranks(self, timeout: float) -> list[int]:
        """The torch rank at each position of the pccl ring (learned by one all-gather
        when the rendezvous did not tell)."""
        if self._peer_ranks is None:
            info = self._comm.all_gather(
                torch.tensor([self._rank], dtype=torch.int64), tag=self._tag, timeout=timeout
            )
            self._check_world(info.world_size)
            self._peer_ranks = dict(zip(info.contributors, info.output.reshape(-1).tolist(), strict=True))
        ring = self._comm.ring_of(self._comm.epoch) or tuple(self._peer_ranks)
        try:
            return [self._peer_ranks[p] for p in ring]
        except KeyError:
            raise PcclBackendError("the pccl ring holds a peer outside the torch group") from None

    def _all_gather(self, mine: torch.Tensor, out: torch.Tensor | None, timeout: float) -> list[torch.Tensor]:
        """All-gathers this rank's bytes; returns every rank's row, by torch rank. Into
        `out` (size x mine's bytes) when the ring's order is the torch ranks'."""
        order = self._ring_ranks(timeout)
        if order != list(range(self._size)):
            out = None
        info = self._comm.all_gather(mine, out=out, tag=self._tag, timeout=timeout)
        self._check_world(info.world_size)
        rows = list(info.output.reshape(self._size, mine.numel()).unbind(0))
        return [rows[order.index(r)] for r in range(self._size)]

    def _broadcast(self, buf: torch.Tensor, root: int, timeout: float) -> None:
        info = self._comm.broadcast(
            buf, root=self._ring_ranks(timeout).index(root), tag=self._tag, timeout=timeout
        )
        self._check_world(info.world_size)

    def _reduce_scatter(
        self, outputs: list[Staged], chunks: list[list[torch.Tensor]], red: Any, timeout: float
    ) -> None:
        """outputs[i] gets the reduction of every rank's chunks[i][self rank]: one
        reduce-scatter of the chunks laid out by ring position, each position's block
        holding that rank's chunk of every tensor (PREMUL_SUM scales the copy)."""
        order = self._ring_ranks(timeout)
        dtype = outputs[0].host.dtype
        op = reduce_op(red, dtype)
        flat = torch.cat([c[r].reshape(-1) for r in order for c in chunks])
        factor = premul_factor(red)
        if factor is not None:
            flat.mul_(factor)
        if dtype == torch.bool:
            flat = flat.view(torch.uint8)
        info = self._comm.reduce_scatter(flat, op=op, tag=self._tag, timeout=timeout)
        self._check_world(info.world_size)
        result = info.output.reshape(-1)
        split_into(
            result.view(dtype) if dtype == torch.bool else result, [y.host.reshape(-1) for y in outputs]
        )
        for y in outputs:
            y.commit()

    def _op_timeout(self, opts: Any) -> float:
        custom = getattr(opts, "timeout", None)
        if isinstance(custom, datetime.timedelta) and custom.total_seconds() > 0:
            return custom.total_seconds()
        return self._timeout

    def _check_rank(self, root: int) -> None:
        if not 0 <= root < self._size:
            raise PcclBackendError(f"root rank {root} is outside the group of {self._size}")

    def _check_list(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        if len(tensors) != self._size:
            raise PcclBackendError(f"{what}: expected one per rank ({self._size}), got {len(tensors)}")


def _shutdown_at_exit(ref: weakref.ref[ProcessGroupPccl]) -> None:
    pg = ref()
    if pg is not None:
        pg._shutdown_quietly()


def wait_until_alone(comm: Communicator, grace: float) -> None:
    """Waits (at most `grace` seconds) until this peer is the last of its group."""
    deadline = time.monotonic() + grace
    while comm.world_size > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
