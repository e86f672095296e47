"""The implementations `pccl bench` measures, one class each, as a worker process runs
them: the native pccl engine alone (PcclCollective), pccl_py.Communicator through a real
master (CommCollective), and torch.distributed's gloo (GlooCollective). Each allocates
its buffers for one collective (all-reduce, all-gather, reduce-scatter or broadcast;
float32, SUM), fills them with rank + 1, runs it and checks the result."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Protocol

from pccl_py.peer.transport import engine_congestion_control
from pccl_py.tools.bench.config import DEFAULT_SEGMENT_BYTES, FLOAT32_BYTES, BenchError, PcclParams


class Collective(Protocol):
    """What a worker drives: one implementation's buffers and collective. `rank` is the
    position whose rows and root the collective's results follow (the Communicator's is
    its place in the pccl ring, not the bench's rank)."""

    @property
    def rank(self) -> int: ...

    def allocate(self, nbytes: int, in_place: bool, op: str) -> None: ...

    def fill(self, value: float) -> None: ...

    def run(self, segment_bytes: int, quantization: str | None = None) -> None: ...

    def check(self) -> bool: ...

    def close(self) -> None: ...


def buffers(np: Any, nbytes: int, in_place: bool, op: str, world: int) -> tuple[Any, Any]:
    """(input, output) numpy float32 arrays for `op` over a buffer of `nbytes` (the full
    buffer: the all-gather's output, the reduce-scatter's and the all-to-all's input)."""
    count = nbytes // FLOAT32_BYTES
    if op == "all_gather":
        return np.empty(count // world, dtype=np.float32), np.empty(count, dtype=np.float32)
    if op == "reduce_scatter":
        return np.empty(count, dtype=np.float32), np.empty(count // world, dtype=np.float32)
    x = np.empty(count, dtype=np.float32)
    return x, x if in_place or op == "broadcast" else np.empty_like(x)


def result_ok(np: Any, out: Any, op: str, world: int) -> bool:
    """Whether `out` (numpy) is `op`'s result when rank r contributed r + 1 everywhere."""
    if op in ("all_gather", "all_to_all"):  # all-to-all: row s is rank s's block for this rank
        return bool((out.reshape(world, -1) == np.arange(1, world + 1, dtype=np.float32)[:, None]).all())
    if op == "broadcast":
        return bool((out == 1.0).all())  # rank 0's
    return bool((out == world * (world + 1) / 2.0).all())


class PcclCollective:
    def __init__(self, rank: int, world: int, params: PcclParams, op_timeout: float, host: str) -> None:
        import numpy as np

        import pccl_py._native as nat

        self._np = np
        self._nat = nat
        self._rank = rank
        self._world = world
        self._timeout = op_timeout
        self._direct_max_bytes = params.direct_max_bytes
        self._rsag_min_bytes = params.rsag_min_bytes
        self._seq = 0
        self._peers: list[int] = []
        self._op = "all_reduce"
        self._in: Any = None
        self._out: Any = None
        self.engine = nat.Engine(
            peer_id=rank,
            host=host,
            port=0,
            connections_per_peer=params.connections,
            segment_bytes=DEFAULT_SEGMENT_BYTES,
            socket_buffer_bytes=params.socket_buffer_bytes,
            zero_copy=params.zero_copy,
            shared_memory=params.shared_memory,
            congestion_control=engine_congestion_control(params.congestion_control),
        )

    @property
    def rank(self) -> int:
        return self._rank

    def connect(self, ring: list[tuple[int, str, int]]) -> None:
        self._peers = [peer for peer, _, _ in ring if peer != self._rank]
        # As the Communicator does: with the direct algorithms on, pools to every peer,
        # opened together (and, with auto K, sized together).
        direct = self._direct_max_bytes > 0 or self._rsag_min_bytes > 0
        self.engine.set_ring(1, ring, self._rank, timeout=self._timeout, connect_all=direct)

    def pool_sizes(self) -> list[int]:
        """The connections per pool to each peer this engine has a pool to (auto K: what
        the round trip asked for)."""
        return sorted({self.engine.pool_size(p) for p in self._peers} - {0})

    def allocate(self, nbytes: int, in_place: bool, op: str) -> None:
        self._in = self._out = None
        self._op = op
        self._in, self._out = buffers(self._np, nbytes, in_place, op, self._world)

    def fill(self, value: float) -> None:
        self._in.fill(value)
        if self._out is not self._in:
            self._out.fill(0.0)

    def run(self, segment_bytes: int, quantization: str | None = None) -> None:
        if self._op != "all_reduce":
            return self._run_other(segment_bytes)
        from pccl_py.peer.allreduce import choose_algorithm
        from pccl_py.types import Quantization

        q = Quantization.parse(quantization) if quantization else None
        self._seq += 1
        # As the Communicator chooses (quantized ops have their own algorithm).
        algorithm = (
            self._nat.AllReduceAlgorithm.RING
            if q
            else choose_algorithm(self._in.nbytes, self._world, self._direct_max_bytes, self._rsag_min_bytes)
        )
        # As the Communicator runs it: with the commit vote, and in place with the
        # input kept until the op is settled (without the master's verdict here).
        handle = self.engine.all_reduce(
            self._in,
            self._out,
            self._nat.DataType.FLOAT32,
            self._nat.ReduceOp.SUM,
            tag=0,
            seq=self._seq,
            timeout=self._timeout,
            segment_bytes=segment_bytes,
            defer_commit=self._in is self._out,
            quantization=q.native_kind if q else self._nat.QuantKind.NONE,
            quant_dtype=q.native_dtype if q else self._nat.DataType.UINT8,
            vote=True,
            algorithm=algorithm,
        )
        handle.result()
        handle.settle(True)

    def _run_other(self, segment_bytes: int) -> None:
        """An all-gather, reduce-scatter, all-to-all or broadcast (from rank 0), as the
        Communicator runs it: with the commit vote (without the master's verdict here)."""
        from pccl_py.peer.gather import choose_broadcast

        kinds = self._nat.CollectiveKind
        if self._op == "broadcast":
            kind = choose_broadcast(self._in.nbytes, self._world, self._direct_max_bytes)
        else:
            kind = {"all_gather": kinds.ALL_GATHER, "reduce_scatter": kinds.REDUCE_SCATTER,
                    "all_to_all": kinds.ALL_TO_ALL}[self._op]
        self._seq += 1
        self.engine.all_to_all(
            kind,
            self._in,
            self._out,
            self._nat.DataType.FLOAT32,
            self._nat.ReduceOp.SUM,
            tag=0,
            seq=self._seq,
            timeout=self._timeout,
            segment_bytes=segment_bytes,
            vote=True,
        ).result()

    def check(self) -> bool:
        return result_ok(self._np, self._out, self._op, self._world)

    def close(self) -> None:
        self._in = self._out = None
        self.engine.close()


class CommCollective:
    """All-reduce through pccl_py.Communicator: every op pays the control path (report,
    the master's verdict, commit), as users see it."""

    def __init__(self, rank: int, world: int, params: PcclParams, op_timeout: float, host: str) -> None:
        import numpy as np

        self._np = np
        self._host = host
        self._world = world
        self._params = params
        self._timeout = op_timeout
        self._op = "all_reduce"
        self._in: Any = None
        self._out: Any = None
        self.comm: Any = None

    @property
    def rank(self) -> int:
        return int(self.comm.rank)

    def connect(self, master: str) -> None:
        import pccl_py
        from pccl_py.peer.group import join_group

        config = pccl_py.Config(
            connections_per_peer=self._params.connections,
            socket_buffer_bytes=self._params.socket_buffer_bytes,
            direct_allreduce_max_bytes=self._params.direct_max_bytes,
            rsag_min_bytes=self._params.rsag_min_bytes,
            shared_memory=self._params.shared_memory,
            congestion_control=self._params.congestion_control,
        )
        comm = pccl_py.Communicator(master, host=self._host, config=config)
        self.comm = comm.connect(timeout=self._timeout)
        join_group(self.comm, self._world, timeout=self._timeout)

    def allocate(self, nbytes: int, in_place: bool, op: str) -> None:
        self._in = self._out = None
        self._op = op
        self._in, self._out = buffers(self._np, nbytes, in_place, op, self._world)

    def fill(self, value: float) -> None:
        self._in.fill(value)
        if self._out is not self._in:
            self._out.fill(0.0)

    def run(self, segment_bytes: int, quantization: str | None = None) -> None:
        if quantization:
            raise BenchError("only the native engine runs quantized here")
        out = None if self._out is self._in else self._out
        if self._op == "all_reduce":
            self.comm.all_reduce(self._in, out=out, timeout=self._timeout)
        elif self._op == "broadcast":
            self.comm.broadcast(self._in, root=0, timeout=self._timeout)
        elif self._op == "all_to_all":  # in place is out=x (out=None would allocate)
            self.comm.all_to_all(self._in, out=self._out, timeout=self._timeout)
        else:
            getattr(self.comm, self._op)(self._in, out=out, timeout=self._timeout)

    def check(self) -> bool:
        return result_ok(self._np, self._out, self._op, self._world)

    def close(self) -> None:
        self._in = self._out = None
        if self.comm is not None:
            self.comm.close()


class GlooCollective:
    def __init__(self, rank: int, world: int, store_path: str, op_timeout: float, ifname: str) -> None:
        # gloo binds to the address of this interface: loopback, or a namespace's shaped eth0.
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self._rank = rank
        self._world = world
        self._op = "all_reduce"
        self._in: Any = None
        self._out: Any = None
        store = dist.FileStore(store_path, world)  # type: ignore[attr-defined]
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=_dt.timedelta(seconds=op_timeout),
        )

    @property
    def rank(self) -> int:
        return self._rank

    def allocate(self, nbytes: int, in_place: bool, op: str) -> None:
        import numpy as np

        self._in = self._out = None
        self._op = op
        # gloo runs the all-reduce in place, the all-to-all out of place (its input must not alias).
        x, out = buffers(np, nbytes, op != "all_to_all", op, self._world)
        self._in = self._torch.from_numpy(x)
        self._out = self._in if out is x else self._torch.from_numpy(out)

    def fill(self, value: float) -> None:
        self._in.fill_(value)
        if self._out is not self._in:
            self._out.fill_(0.0)

    def run(self, segment_bytes: int, quantization: str | None = None) -> None:
        if quantization:
            raise BenchError("only the native engine runs quantized here")
        dist = self._dist
        if self._op == "all_reduce":
            dist.all_reduce(self._in, op=dist.ReduceOp.SUM)
        elif self._op == "all_gather":
            dist.all_gather_into_tensor(self._out, self._in)
        elif self._op == "reduce_scatter":
            dist.reduce_scatter_tensor(self._out, self._in, op=dist.ReduceOp.SUM)
        elif self._op == "all_to_all":
            dist.all_to_all_single(self._out, self._in)
        else:
            dist.broadcast(self._in, src=0)

    def check(self) -> bool:
        import numpy as np

        return result_ok(np, self._out.numpy(), self._op, self._world)

    def close(self) -> None:
        self._in = self._out = None
        self._dist.destroy_process_group()
