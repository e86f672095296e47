"""All-reduce benchmark: pccl's native ring against torch.distributed's gloo.

For every peer count N, each implementation (and each pccl connection count K) gets one
group of N local worker processes ('spawn' context); all groups of that N stay up for all
its sizes and segment sizes, and per size the variants are measured back to back (and
`rounds` times over, interleaved), so background load hits them alike. pccl workers find
each other through the parent: each creates its Engine on an ephemeral loopback port
and sends the port up a Pipe; the parent answers with the whole ring. gloo workers meet
through a torch FileStore in a temporary directory (no ports chosen by us at all).

Per size, every worker first runs one verification all-reduce (values rank+1, checked
against N(N+1)/2), then `warmup` untimed and `iters` timed all-reduces (SUM, float32,
in place unless asked otherwise) on a zeroed buffer, so repeated sums stay finite. Each
rank times each iteration on its own clock; per iteration the slowest rank counts, and
the reported time is the median of those maxima (over all rounds).

algbw = bytes / time; busbw = algbw * 2(N-1)/N (the bytes each rank's link carries in a
bandwidth-optimal all-reduce, as in nccl-tests).

With --quantization, every pccl variant is also measured quantized (same engines, same
buffers, back to back). Its algbw is the *effective* one: the original float32 bytes
over the time, so it compares directly with the unquantized run; the table shows the
ratio. The verification op stays exact: constant blocks quantize without error.

With --netns-rate RATE (root only), the workers do not share loopback: each runs in its
own network namespace on a bridge, its egress shaped to RATE by htb (pccl_py.netns), so
the wire, not the CPU, is the bottleneck, as between hosts. Several rates are measured
one after the other in the same invocation; the namespaces are removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.table import Table

from pccl_py.tools import netns
from pccl_py.tools.netns import format_rate

LOOPBACK = "127.0.0.1"
# pccl: the native engine alone; gloo: torch.distributed gloo; comm: pccl_py.Communicator
# through a real master (control plane and outcome agreement included).
IMPLS = ("pccl", "gloo", "comm")
DEFAULT_PEERS = (2, 4)
DEFAULT_SIZES = ("1K", "1M", "16M", "64M", "256M")
DEFAULT_CONNECTIONS = 1
DEFAULT_SEGMENT_BYTES = 512 << 10
FLOAT32_BYTES = 4

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class BenchError(RuntimeError):
    """A worker failed, died, or did not answer in time."""


# --------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """'1K' -> 1024, '16M' -> 16 MiB, '1G' -> 1 GiB, '4096' -> 4096 (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K, M or G suffix")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if value != int(value):
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return f"{nbytes}B" if nbytes < 1024 else f"{nbytes / 1024:.1f}K"


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def default_iters(nbytes: int) -> int:
    """Timed iterations: ~1 GiB moved per (size, N), between 5 and 500 iterations."""
    return max(5, min(500, (1 << 30) // max(nbytes, 1)))


def default_warmup(iters: int) -> int:
    return max(1, min(20, iters // 10))


def bus_factor(peers: int) -> float:
    return 2.0 * (peers - 1) / peers


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PcclParams:
    """Engine settings of one pccl group (segment size is per op, swept within a group)."""

    connections: int = DEFAULT_CONNECTIONS
    socket_buffer_bytes: int = 0
    zero_copy: bool = True


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    peers: tuple[int, ...]
    sizes: tuple[int, ...]
    compare: tuple[str, ...] = ()
    iters: int | None = None
    warmup: int | None = None
    connections: tuple[int, ...] = (DEFAULT_CONNECTIONS,)
    segment_bytes: tuple[int, ...] = (DEFAULT_SEGMENT_BYTES,)
    socket_buffer_bytes: int = 0
    zero_copy: bool = True  # pccl: voting ops send large payloads by reference
    in_place: bool = True
    rounds: int = 1
    skip_pccl: bool = False
    json_path: Path | None = None
    op_timeout: float = 120.0
    start_timeout: float = 120.0
    quantization: tuple[str, ...] = ()  # e.g. ("minmax:uint8",): pccl variants also run quantized
    netns_rates: tuple[int, ...] = ()  # bits/s: each worker in its own namespace, egress shaped

    def validate(self) -> None:
        if not self.peers or any(n < 2 for n in self.peers):
            raise ValueError("--peers: every peer count must be at least 2")
        if not self.sizes or any(s < FLOAT32_BYTES or s % FLOAT32_BYTES for s in self.sizes):
            raise ValueError("--sizes: every size must be a positive multiple of 4 bytes (float32)")
        if any(c not in IMPLS[1:] for c in self.compare):
            raise ValueError(f"--compare: unknown implementation(s) {self.compare}; known: {', '.join(IMPLS[1:])}")
        if self.iters is not None and self.iters < 1:
            raise ValueError("--iters must be at least 1")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError("--warmup must not be negative")
        if any(k < 1 for k in self.connections):
            raise ValueError("--connections must be at least 1")
        if any(b < FLOAT32_BYTES for b in self.segment_bytes):
            raise ValueError("--segment-bytes must be at least 4")
        if any(r <= 0 for r in self.netns_rates):
            raise ValueError("--netns-rate must be positive")
        if self.skip_pccl and not self.compare:
            raise ValueError("--skip-pccl leaves nothing to run without --compare")
        from pccl_py.types import Quantization

        for q in self.quantization:
            Quantization.parse(q)  # raises ValueError


@dataclasses.dataclass(frozen=True)
class Result:
    impl: str
    peers: int
    nbytes: int
    iters: int
    warmup: int
    in_place: bool
    per_iter_max: tuple[float, ...]  # per timed iteration (all rounds), the slowest rank's time
    rounds: int = 1
    connections: int | None = None
    segment_bytes: int | None = None
    socket_buffer_bytes: int | None = None
    zero_copy: bool | None = None  # pccl only
    quantization: str | None = None  # "kind:dtype" (pccl only); algbw is then effective
    netns_rate_bits: int | None = None  # each worker's shaped egress (bits/s); None: loopback
    load1: float | None = None  # the machine's 1-minute load average when the row was measured

    @property
    def seconds(self) -> float:
        return statistics.median(self.per_iter_max)

    @property
    def algbw_gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def busbw_gbps(self) -> float:
        return self.algbw_gbps * bus_factor(self.peers)

    @property
    def link_utilization(self) -> float | None:
        """busbw over the shaped egress rate (what each peer's link carries in a ring, as a
        fraction of what it can); effective, so above 1 when quantized. None on loopback."""
        if self.netns_rate_bits is None:
            return None
        return self.busbw_gbps * 1e9 / (self.netns_rate_bits / 8)

    @property
    def label(self) -> str:
        link = f" @{format_rate(self.netns_rate_bits)}" if self.netns_rate_bits else ""
        if self.impl != "pccl":
            return self.impl + link
        q = f" q={self.quantization}" if self.quantization else ""
        return f"pccl K={self.connections} seg={format_size(self.segment_bytes or 0)}{q}{link}"

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.per_iter_max)
        out: dict[str, Any] = {
            "impl": self.impl,
            "peers": self.peers,
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "algbw_GBps": self.algbw_gbps,
            "busbw_GBps": self.busbw_gbps,
            "dtype": "float32",
            "op": "sum",
            "in_place": self.in_place,
            "iters": self.iters,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "seconds_min": ordered[0],
            "seconds_p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "seconds_max": ordered[-1],
            "link": "loopback" if self.netns_rate_bits is None else "netns-htb",
            "netns_rate_bps": self.netns_rate_bits,
            "link_utilization": self.link_utilization,
            "load1": self.load1,
        }
        if self.impl == "pccl":
            out["connections"] = self.connections
            out["segment_bytes"] = self.segment_bytes
            out["socket_buffer_bytes"] = self.socket_buffer_bytes
            out["zero_copy"] = self.zero_copy
            out["quantization"] = self.quantization
        return out


# --------------------------------------------------------------------------- workers
#
# Parent -> worker:  ("ring", ring | None),
#                    ("run", nbytes, iters, warmup, segment_bytes, in_place, quantization | None),
#                    ("go",), ("stop",)
# Worker -> parent:  ("hello", port | None), ("ready",), ("allocated",), ("times", [seconds]),
#                    ("error", traceback text)


class _Collective(Protocol):
    def allocate(self, nbytes: int, in_place: bool) -> None: ...

    def fill(self, value: float) -> None: ...

    def all_reduce(self, segment_bytes: int, quantization: str | None = None) -> None: ...

    def check(self, expected: float) -> bool: ...

    def close(self) -> None: ...


class _PcclCollective:
    def __init__(self, rank: int, world: int, params: PcclParams, op_timeout: float, host: str) -> None:
        import numpy as np

        import pccl_py._native as nat

        self._np = np
        self._nat = nat
        self._rank = rank
        self._world = world
        self._timeout = op_timeout
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
        from pccl_py.types import Quantization

        q = Quantization.parse(quantization) if quantization else None
        self._seq += 1
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
        )
        handle.result()
        handle.settle(True)

    def check(self, expected: float) -> bool:
        return bool((self._out == expected).all())

    def close(self) -> None:
        self._in = self._out = None
        self.engine.close()


class _CommCollective:
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
            connections_per_peer=self._params.connections, socket_buffer_bytes=self._params.socket_buffer_bytes
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


class _GlooCollective:
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


def _serve(conn: mpc.Connection, coll: _Collective, rank: int, world: int) -> None:
    expected = world * (world + 1) / 2.0
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] != "run":
            raise BenchError(f"unexpected command {msg!r}")
        _, nbytes, iters, warmup, segment_bytes, in_place, quant = msg

        def reduce(segment_bytes: int = segment_bytes, quant: str | None = quant) -> None:
            if quant:
                coll.all_reduce(segment_bytes, quant)
            else:
                coll.all_reduce(segment_bytes)

        coll.allocate(nbytes, in_place)
        coll.fill(float(rank + 1))
        conn.send(("allocated",))
        if conn.recv()[0] != "go":
            raise BenchError("expected 'go'")
        reduce()
        if not coll.check(expected):
            raise BenchError(f"rank {rank}: wrong all-reduce result for {nbytes} bytes (expected {expected})")
        coll.fill(0.0)
        for _ in range(warmup):
            reduce()
        times: list[float] = []
        for _ in range(iters):
            t0 = time.perf_counter()
            reduce()
            times.append(time.perf_counter() - t0)
        conn.send(("times", times))


def _worker_main(
    conn: mpc.Connection,
    impl: str,
    rank: int,
    world: int,
    params: PcclParams,
    store_path: str,
    op_timeout: float,
    namespace: str | None = None,
    host: str = LOOPBACK,
) -> None:
    """Entry point of one worker process (module level, so 'spawn' can pickle it). With a
    `namespace`, the worker moves into it first (before any socket or thread) and listens
    on `host`, its address there; the Pipe to the parent is a socketpair and stays usable."""
    # The parent owns Ctrl-C: it stops or kills the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # numpy's BLAS threads would only compete with the engine for the cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    coll: _PcclCollective | _GlooCollective | _CommCollective | None = None
    try:
        if namespace is not None:
            netns.enter(namespace)
        if impl == "pccl":
            coll = _PcclCollective(rank, world, params, op_timeout, host)
            conn.send(("hello", coll.engine.port))
            ring = conn.recv()[1]
            coll.connect([tuple(p) for p in ring])
        elif impl == "comm":
            coll = _CommCollective(rank, world, params, op_timeout, host)
            conn.send(("hello", None))
            coll.connect(conn.recv()[1])
        else:
            conn.send(("hello", None))
            conn.recv()
            ifname = "eth0" if namespace is not None else "lo" if sys.platform.startswith("linux") else "lo0"
            coll = _GlooCollective(rank, world, store_path, op_timeout, ifname)
        conn.send(("ready",))
        _serve(conn, coll, rank, world)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
    except BaseException:  # noqa: BLE001 - whatever it is, the parent hears of it
        with suppress(OSError, EOFError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if coll is not None:
            with suppress(Exception):  # best effort on the way out
                coll.close()
        conn.close()


class _Group:
    """N worker processes of one implementation, driven over one Pipe each; on loopback, or
    rank r in namespace r of `net` (the master of impl "comm" then listens on its bridge)."""

    def __init__(
        self, impl: str, world: int, params: PcclParams, op_timeout: float, net: netns.ShapedNet | None = None
    ) -> None:
        self.impl = impl
        self.net = net
        self.world = world
        self.params = params
        self.op_timeout = op_timeout
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[mpc.Connection] = []
        self._tmpdir: str | None = None
        self._master: Any = None  # impl "comm": the in-process master

    def start(self, timeout: float) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="pccl-bench-")
        store_path = os.path.join(self._tmpdir, "gloo-store")
        net = self.net
        hosts = net.ips[: self.world] if net is not None else [LOOPBACK] * self.world
        for rank in range(self.world):
            parent_end, child_end = self._ctx.Pipe(duplex=True)
            namespace = net.namespaces[rank] if net is not None else None
            proc = self._ctx.Process(
                target=_worker_main,
                args=(
                    child_end,
                    self.impl,
                    rank,
                    self.world,
                    self.params,
                    store_path,
                    self.op_timeout,
                    namespace,
                    hosts[rank],
                ),
                name=f"pccl-bench-{self.impl}-{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        hellos = self._gather("hello", timeout)
        ring: Any = None
        if self.impl == "pccl":
            ring = [(rank, hosts[rank], int(h[1])) for rank, h in enumerate(hellos)]
        if self.impl == "comm":
            from pccl_py.master.server import Master

            self._master = Master(host=net.hub_ip if net is not None else LOOPBACK).start()
            ring = self._master.address
        self._broadcast(("ring", ring))
        self._gather("ready", timeout)

    def measure(
        self,
        nbytes: int,
        iters: int,
        warmup: int,
        segment_bytes: int,
        in_place: bool,
        quantization: str | None = None,
    ) -> list[float]:
        """Runs one size; returns, per timed iteration, the slowest rank's seconds."""
        self._broadcast(("run", nbytes, iters, warmup, segment_bytes, in_place, quantization))
        self._gather("allocated", self.op_timeout)
        self._broadcast(("go",))
        budget = self.op_timeout * (iters + warmup + 1)
        replies = self._gather("times", budget)
        per_rank: list[list[float]] = [list(r[1]) for r in replies]
        return [max(ts) for ts in zip(*per_rank, strict=True)]

    def close(self, graceful: bool = True) -> None:
        """Stops the workers: asks them to stop (graceful), then terminates, then kills."""
        if graceful:
            for conn in self._conns:
                with suppress(OSError, ValueError):
                    conn.send(("stop",))
            deadline = time.monotonic() + 10.0
            for proc in self._procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self._master is not None:
            self._master.close()
            self._master = None

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(msg)
            except (OSError, ValueError) as e:
                raise BenchError(f"{self.impl} rank {rank}: cannot send {msg[0]!r}: {e}") from e

    def _gather(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """One message of `kind` from every rank; raises BenchError on errors, deaths, timeout."""
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout
        conn_rank = {id(c): r for r, c in enumerate(self._conns)}
        sentinel_rank = {p.sentinel: r for r, p in enumerate(self._procs)}
        while len(replies) < self.world:
            pending = [c for r, c in enumerate(self._conns) if r not in replies]
            pending_sentinels = [p.sentinel for r, p in enumerate(self._procs) if r not in replies]
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.world)) - set(replies))
                raise BenchError(f"{self.impl}: no {kind!r} from rank(s) {missing} within {timeout:.0f} s")
            ready = mpc.wait([*pending, *pending_sentinels], timeout=left)
            for obj in ready:
                if isinstance(obj, int):
                    rank = sentinel_rank[obj]
                    conn = self._conns[rank]
                    if rank in replies or conn.poll():
                        continue  # its message is readable; take it through the conn
                    raise BenchError(
                        f"{self.impl} rank {rank} exited (code {self._procs[rank].exitcode}) "
                        f"while the parent waited for {kind!r}"
                    )
                rank = conn_rank[id(obj)]
                try:
                    msg: tuple[Any, ...] = self._conns[rank].recv()
                except EOFError:
                    self._procs[rank].join(timeout=1.0)
                    raise BenchError(
                        f"{self.impl} rank {rank} exited (code {self._procs[rank].exitcode}) "
                        f"while the parent waited for {kind!r}"
                    ) from None
                if msg[0] == "error":
                    raise BenchError(f"{self.impl} rank {rank} failed:\n{msg[1]}")
                if msg[0] != kind:
                    raise BenchError(f"{self.impl} rank {rank}: expected {kind!r}, got {msg[0]!r}")
                replies[rank] = msg
        return [replies[r] for r in range(self.world)]


@contextmanager
def _group(
    impl: str, world: int, params: PcclParams, cfg: BenchConfig, net: netns.ShapedNet | None = None
) -> Iterator[_Group]:
    group = _Group(impl, world, params, cfg.op_timeout, net)
    try:
        group.start(cfg.start_timeout)
        yield group
    except BaseException:
        # Failure or Ctrl-C: workers may be stuck in an op; do not wait for them.
        group.close(graceful=False)
        raise
    group.close(graceful=True)


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One measured configuration within a peer count."""

    impl: str
    connections: int | None = None  # pccl only
    segment_bytes: int | None = None  # pccl only
    quantization: str | None = None  # pccl only


def _measure_peer_count(
    cfg: BenchConfig, variants: Sequence[_Variant], world: int, net: netns.ShapedNet | None, rate: int | None
) -> Iterator[Result]:
    """Every size and variant at one peer count (and link rate); yields each result."""
    with ExitStack() as stack:
        groups: dict[tuple[str, int | None], _Group] = {}
        for v in variants:
            key = (v.impl, v.connections)
            if key not in groups:
                params = PcclParams(
                    connections=v.connections or DEFAULT_CONNECTIONS,
                    socket_buffer_bytes=cfg.socket_buffer_bytes,
                    zero_copy=cfg.zero_copy,
                )
                groups[key] = stack.enter_context(_group(v.impl, world, params, cfg, net))
        for nbytes in cfg.sizes:
            iters = cfg.iters if cfg.iters is not None else default_iters(nbytes)
            warmup = cfg.warmup if cfg.warmup is not None else default_warmup(iters)
            times: dict[_Variant, list[float]] = {v: [] for v in variants}
            for _ in range(cfg.rounds):
                for v in variants:
                    in_place = cfg.in_place or v.impl != "pccl"  # gloo always runs in place
                    group = groups[(v.impl, v.connections)]
                    times[v] += group.measure(
                        nbytes, iters, warmup, v.segment_bytes or 0, in_place, v.quantization
                    )
            for v in variants:
                result = Result(
                    impl=v.impl,
                    peers=world,
                    nbytes=nbytes,
                    iters=iters * cfg.rounds,
                    warmup=warmup,
                    in_place=cfg.in_place or v.impl != "pccl",
                    per_iter_max=tuple(times[v]),
                    rounds=cfg.rounds,
                    connections=v.connections,
                    segment_bytes=v.segment_bytes,
                    socket_buffer_bytes=cfg.socket_buffer_bytes if v.impl == "pccl" else None,
                    zero_copy=cfg.zero_copy if v.impl == "pccl" else None,
                    quantization=v.quantization,
                    netns_rate_bits=rate,
                    load1=os.getloadavg()[0],
                )
                yield result


def run_benchmark(cfg: BenchConfig, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Runs every (peers, size, variant) combination; returns the results.

    For one peer count, every group (pccl per K, gloo) is up at once and the variants are
    measured back to back per size, `rounds` times over, so a change in background load
    hits them alike instead of one implementation's whole sweep. With cfg.netns_rates,
    all of that runs once per rate, in shaped namespaces (pccl_py.netns; needs root)."""
    cfg.validate()
    results: list[Result] = []
    variants: list[_Variant] = []
    if not cfg.skip_pccl:
        for k in cfg.connections:
            for seg in cfg.segment_bytes:
                variants.append(_Variant("pccl", k, seg))
                variants += [_Variant("pccl", k, seg, q) for q in cfg.quantization]
    variants += [_Variant(impl) for impl in cfg.compare]

    links: tuple[int | None, ...] = cfg.netns_rates or (None,)
    with ExitStack() as net_stack:
        net = None
        if cfg.netns_rates:
            net = net_stack.enter_context(netns.ShapedNet(max(cfg.peers), cfg.netns_rates[0]))
        for rate in links:
            if net is not None and rate is not None and rate != net.rate_bits:
                net.set_rate(rate)
            for world in cfg.peers:
                for result in _measure_peer_count(cfg, variants, world, net, rate):
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
    return results


def results_table(results: Sequence[Result], title: str | None = None) -> Table:
    baseline = {(r.netns_rate_bits, r.peers, r.nbytes): r for r in results if r.impl == "gloo"}
    show_ratio = bool(baseline) and any(r.impl == "pccl" for r in results)
    unquantized = {
        (r.netns_rate_bits, r.peers, r.nbytes, r.connections, r.segment_bytes): r
        for r in results
        if r.impl == "pccl" and not r.quantization
    }
    show_quant = any(r.quantization for r in results)
    show_link = any(r.netns_rate_bits for r in results)
    table = Table(title=title)
    if show_link:
        table.add_column("link", justify="right", no_wrap=True)
    for name in ("impl", "K", "segment", "peers", "size", "iters", "median time", "algbw GB/s", "busbw GB/s"):
        table.add_column(name, justify="left" if name == "impl" else "right", no_wrap=True)
    if show_link:
        table.add_column("busbw / link", justify="right", no_wrap=True)
    if show_quant:
        table.add_column("quantized", justify="left", no_wrap=True)
        table.add_column("eff. algbw vs unquantized", justify="right", no_wrap=True)
    if show_ratio:
        table.add_column("pccl/gloo busbw", justify="right", no_wrap=True)
    for r in sorted(
        results,
        key=lambda r: (
            r.netns_rate_bits or 0,
            r.peers,
            r.nbytes,
            r.impl != "pccl",
            r.connections or 0,
            r.segment_bytes or 0,
            r.quantization or "",
        ),
    ):
        row = [
            r.impl,
            str(r.connections) if r.connections is not None else "",
            format_size(r.segment_bytes) if r.segment_bytes is not None else "",
            str(r.peers),
            format_size(r.nbytes),
            str(r.iters),
            format_seconds(r.seconds),
            f"{r.algbw_gbps:.3f}",
            f"{r.busbw_gbps:.3f}",
        ]
        if show_link:
            row.insert(0, format_rate(r.netns_rate_bits) if r.netns_rate_bits else "loopback")
            util = r.link_utilization
            row.append(f"{util:.2f}" if util is not None else "")
        if show_quant:
            row.append(r.quantization or "")
            plain = unquantized.get((r.netns_rate_bits, r.peers, r.nbytes, r.connections, r.segment_bytes))
            if r.quantization and plain is not None:
                qratio = r.algbw_gbps / plain.algbw_gbps
                row.append(f"[{'green' if qratio >= 2.5 else 'red'}]{qratio:.2f}x[/]")
            else:
                row.append("")
        if show_ratio:
            base = baseline.get((r.netns_rate_bits, r.peers, r.nbytes))
            if r.impl == "pccl" and base is not None:
                ratio = r.busbw_gbps / base.busbw_gbps
                row.append(f"[{'green' if ratio >= 1.0 else 'red'}]{ratio:.2f}x[/]")
            else:
                row.append("")
        table.add_row(*row)
    return table


def _describe_machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While running, SIGTERM unwinds like Ctrl-C does, so the workers are stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pccl bench`."""
    parser.add_argument(
        "--peers",
        type=int,
        nargs="+",
        default=list(DEFAULT_PEERS),
        metavar="N",
        help="peer counts (local processes) to run (default: 2 4)",
    )
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[parse_size(s) for s in DEFAULT_SIZES],
        metavar="SIZE",
        help="buffer sizes in bytes of float32 data; suffixes K, M, G are "
        "powers of 1024 (default: 1K 1M 16M 64M 256M)",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        choices=IMPLS[1:],
        default=[],
        metavar="IMPL",
        help="also run these implementations in the same invocation: gloo (torch.distributed), "
        "comm (pccl_py.Communicator through a real master: control plane and commit vote included)",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed iterations per size (default: adaptive, ~1 GiB per size, 5..500)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed iterations per size after the verification op (default: iters/10, 1-20)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[DEFAULT_CONNECTIONS],
        metavar="K",
        help="pccl TCP connections per peer; several values sweep (default: 1)",
    )
    parser.add_argument(
        "--segment-bytes",
        type=parse_size,
        nargs="+",
        default=[DEFAULT_SEGMENT_BYTES],
        metavar="B",
        help="pccl segment (frame) size; several values sweep (default: 512K)",
    )
    parser.add_argument(
        "--socket-buffer-bytes",
        type=parse_size,
        default=0,
        metavar="B",
        help="pccl SO_SNDBUF/SO_RCVBUF (default: 0, the kernel's autotuning)",
    )
    parser.add_argument(
        "--no-zero-copy",
        action="store_true",
        help="pccl copies every payload into the socket instead of sending large ones by reference "
        "(vmsplice + splice)",
    )
    parser.add_argument(
        "--out-of-place",
        action="store_true",
        help="pccl writes into a separate output buffer (gloo always runs in place)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every variant this many times per size, interleaved (pccl, gloo, pccl, ...); "
        "the median is over all rounds' iterations (default: 1)",
    )
    parser.add_argument(
        "--quantization",
        type=parse_quantization,
        nargs="+",
        default=[],
        metavar="Q",
        help="also run pccl quantized: uint8, uint16, or KIND:DTYPE (minmax|zeropoint : uint8|uint16); "
        "algbw is then effective (original bytes / time) and the table shows the ratio to the unquantized run",
    )
    parser.add_argument(
        "--netns-rate",
        type=parse_netns_rate,
        nargs="+",
        default=[],
        metavar="RATE",
        help="run each worker in its own network namespace, its egress shaped to RATE by htb "
        "(e.g. 1gbit 200mbit; several rates run one after the other); needs root and iproute2",
    )
    parser.add_argument("--skip-pccl", action="store_true", help="run only the --compare implementations")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="write one JSON object per result row (JSON lines) to FILE",
    )
    parser.add_argument(
        "--op-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="timeout of one all-reduce (default: 120)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        peers=tuple(args.peers),
        sizes=tuple(args.sizes),
        compare=tuple(dict.fromkeys(args.compare)),
        iters=args.iters,
        warmup=args.warmup,
        connections=tuple(dict.fromkeys(args.connections)),
        segment_bytes=tuple(dict.fromkeys(args.segment_bytes)),
        socket_buffer_bytes=args.socket_buffer_bytes,
        zero_copy=not args.no_zero_copy,
        in_place=not args.out_of_place,
        rounds=args.rounds,
        skip_pccl=args.skip_pccl,
        json_path=args.json,
        op_timeout=args.op_timeout,
        quantization=tuple(dict.fromkeys(args.quantization)),
        netns_rates=tuple(dict.fromkeys(args.netns_rate)),
    )


def parse_netns_rate(text: str) -> int:
    """'200mbit' -> 200_000_000 bits/s (argparse type of --netns-rate)."""
    try:
        return netns.parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_quantization(text: str) -> str:
    """'uint8' -> 'minmax:uint8' (argparse type of --quantization)."""
    from pccl_py.types import Quantization

    try:
        q = Quantization.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{q.kind}:{q.dtype}"


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: argparse.Namespace) -> int:
    """`pccl bench`: runs the benchmark, prints the table, writes JSON lines. Returns the exit code."""
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}")
        return 2
    if "gloo" in cfg.compare and not _torch_available():
        Console(stderr=True).print("[red]error:[/] --compare gloo needs torch: pip install 'pccl_py\\[torch]'")
        return 2
    if cfg.netns_rates:
        why_not = netns.unavailable()
        if why_not is not None:
            Console(stderr=True).print(f"[red]error:[/] --netns-rate {why_not}")
            return 2
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)  # a file or pipe: do not squeeze the table into 80 columns
    progress = Console(stderr=True, soft_wrap=True)
    if cfg.netns_rates:
        rates = ", ".join(format_rate(r) for r in cfg.netns_rates)
        where = f"one network namespace per worker, egress shaped by htb to {rates}"
    else:
        where = f"loopback {LOOPBACK}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    progress.print(f"[dim]{_describe_machine()}; {where}; load average {load}[/]")
    json_file: IO[str] | None = None
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    def on_result(r: Result) -> None:
        progress.print(
            f"  {r.label:<24} N={r.peers} {format_size(r.nbytes):>5}  {format_seconds(r.seconds):>10}  "
            f"busbw {r.busbw_gbps:7.3f} GB/s  ({r.iters} iters)"
        )
        if json_file is not None:
            json_file.write(json.dumps({**r.to_json(), "started": started}) + "\n")
            json_file.flush()

    try:
        with _sigterm_as_exit():
            if cfg.json_path is not None:
                json_file = open(cfg.json_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
            results = run_benchmark(cfg, on_result)
    except (BenchError, netns.NetnsError) as e:
        progress.print(f"[red]benchmark failed:[/] {e}")
        return 1
    finally:
        if json_file is not None:
            json_file.close()
    placement = "in-place" if cfg.in_place else "out-of-place (pccl; gloo in place)"
    sends = "zero-copy sends" if cfg.zero_copy else "copied sends"
    out.print(results_table(results, title=f"all-reduce float32 SUM, {placement}; pccl: commit vote, {sends}"))
    return 0


__all__ = [
    "BenchConfig",
    "BenchError",
    "PcclParams",
    "Result",
    "add_arguments",
    "bus_factor",
    "config_from_args",
    "default_iters",
    "default_warmup",
    "format_size",
    "main",
    "parse_size",
    "results_table",
    "run_benchmark",
]
