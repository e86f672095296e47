"""The all-reduce implementations `pccl bench` measures, one class each, as a worker
process runs them: the native pccl engine alone (PcclCollective), pccl_py.Communicator
through a real master (CommCollective), and torch.distributed's gloo (GlooCollective).
Each allocates its buffers, fills them, all-reduces them (float32 SUM) and checks them."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Protocol

from pccl_py.tools.bench.config import DEFAULT_SEGMENT_BYTES, FLOAT32_BYTES, BenchError, PcclParams


class Collective(Protocol):
    """What a worker drives: one implementation's buffers and all-reduce."""

    def allocate(self, nbytes: int, in_place: bool) -> None: ...

    def fill(self, value: float) -> None: ...

    def all_reduce(self, segment_bytes: int, quantization: str | None = None) -> None: ...

    def check(self, expected: float) -> bool: ...

    def close(self) -> None: ...


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
        )

    def connect(self, ring: list[tuple[int, str, int]]) -> None:
        self.engine.set_ring(1, ring, self._rank, timeout=self._timeout)

    def allocate(self, nbytes: int, in_place: bool) -> None:
        self._in = self._out = None
        self._in = self._np.empty(nbytes // FLOAT32_BYTES, dtype=self._np.float32)
        self._out = self._in if in_place else self._np.empty_like(self._in)

    def fill(self, value: float) -> None:
        self._in.fill(value)
        if self._out is not self._in:
            self._out.fill(0.0)

    def all_reduce(self, segment_bytes: int, quantization: str | None = None) -> None:
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

    def check(self, expected: float) -> bool:
        return bool((self._out == expected).all())

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
        self._in: Any = None
        self._out: Any = None
        self.comm: Any = None

    def connect(self, master: str) -> None:
        import pccl_py
        from pccl_py.peer.group import join_group

        config = pccl_py.Config(
            connections_per_peer=self._params.connections,
            socket_buffer_bytes=self._params.socket_buffer_bytes,
            direct_allreduce_max_bytes=self._params.direct_max_bytes,
            rsag_min_bytes=self._params.rsag_min_bytes,
        )
        comm = pccl_py.Communicator(master, host=self._host, config=config)
        self.comm = comm.connect(timeout=self._timeout)
        join_group(self.comm, self._world, timeout=self._timeout)

    def allocate(self, nbytes: int, in_place: bool) -> None:
        self._in = self._out = None
        self._in = self._np.empty(nbytes // FLOAT32_BYTES, dtype=self._np.float32)
        self._out = self._in if in_place else self._np.empty_like(self._in)

    def fill(self, value: float) -> None:
        self._in.fill(value)
        if self._out is not self._in:
            self._out.fill(0.0)

    def all_reduce(self, segment_bytes: int, quantization: str | None = None) -> None:
        if quantization:
            raise BenchError("only the native engine runs quantized here")
        out = None if self._out is self._in else self._out
        self.comm.all_reduce(self._in, out=out, timeout=self._timeout)

    def check(self, expected: float) -> bool:
        return bool((self._out == expected).all())

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
        self._tensor: Any = None
        store = dist.FileStore(store_path, world)  # type: ignore[attr-defined]
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=_dt.timedelta(seconds=op_timeout),
        )

    def allocate(self, nbytes: int, in_place: bool) -> None:
        self._tensor = None
        self._tensor = self._torch.empty(nbytes // FLOAT32_BYTES, dtype=self._torch.float32)

    def fill(self, value: float) -> None:
        self._tensor.fill_(value)

    def all_reduce(self, segment_bytes: int, quantization: str | None = None) -> None:
        if quantization:
            raise BenchError("only the native engine runs quantized here")
        self._dist.all_reduce(self._tensor, op=self._dist.ReduceOp.SUM)

    def check(self, expected: float) -> bool:
        return bool((self._tensor == expected).all().item())

    def close(self) -> None:
        self._tensor = None
        self._dist.destroy_process_group()
