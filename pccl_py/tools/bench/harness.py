"""The `pccl bench` driver: it starts the worker processes, drives them size by size and
round by round, and turns their times into Results.

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

With --netns-rate RATE (root only), the workers do not share loopback: each runs in its
own network namespace on a bridge, its egress shaped to RATE by htb (pccl_py.netns), so
the wire, not the CPU, is the bottleneck, as between hosts. Several rates are measured
one after the other in the same invocation; the namespaces are removed at the end.

With --wan SPEC (root only), every worker runs in its own host of an emulated WAN
(pccl_py.tools.wan: one namespace per host, a TUN device each, a native relay applying
delay, jitter, loss, rate and queue to every packet between hosts): pccl's ring, gloo's
pairs and, for impl "comm", the master's control plane all cross it. The master runs in
a host of its own (the last one, max(--peers) + 1 hosts in all), so even the control
plane pays the link's RTT. Several specs run one after the other (the link is changed in
place between them); gloo still meets through its FileStore (a file, not the network).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

from pccl_py.tools import netns, wan
from pccl_py.tools.bench.config import (
    DEFAULT_CONNECTIONS,
    LOOPBACK,
    BenchConfig,
    BenchError,
    PcclParams,
    default_iters,
    default_warmup,
)
from pccl_py.tools.bench.report import Result
from pccl_py.tools.bench.worker import worker_main


class _Group:
    """N worker processes of one implementation, driven over one Pipe each; on loopback, or
    rank r in namespace r of `net` (the master of impl "comm" then listens on a ShapedNet's
    bridge, or in a WanNet's last host)."""

    def __init__(
        self, impl: str, world: int, params: PcclParams, op_timeout: float, net: Network | None = None
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
        self.pool_sizes: tuple[int, ...] = ()  # pccl: connections per pool after the last measure()

    def start(self, timeout: float) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="pccl-bench-")
        store_path = os.path.join(self._tmpdir, "gloo-store")
        net = self.net
        hosts = net.ips[: self.world] if net is not None else [LOOPBACK] * self.world
        for rank in range(self.world):
            parent_end, child_end = self._ctx.Pipe(duplex=True)
            namespace = net.namespaces[rank] if net is not None else None
            proc = self._ctx.Process(
                target=worker_main,
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

            if isinstance(net, wan.WanNet):
                # Started from a thread inside the master's host: its sockets and threads live there.
                master_ip = net.ips[-1]
                self._master = net.call_in(net.hosts - 1, lambda: Master(host=master_ip).start())
            else:
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
        op: str = "all_reduce",
    ) -> list[float]:
        """Runs one size of collective `op`; returns, per timed iteration, the slowest
        rank's seconds."""
        self._broadcast(("run", nbytes, iters, warmup, segment_bytes, in_place, quantization, op))
        self._gather("allocated", self.op_timeout)
        self._broadcast(("go",))
        budget = self.op_timeout * (iters + warmup + 1)
        replies = self._gather("times", budget)
        self.pool_sizes = tuple(sorted({k for r in replies for k in r[2]}))
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


Network = netns.ShapedNet | wan.WanNet


@contextmanager
def _group(
    impl: str, world: int, params: PcclParams, cfg: BenchConfig, net: Network | None = None
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
    cfg: BenchConfig,
    variants: Sequence[_Variant],
    world: int,
    net: Network | None,
    rate: int | None,
    link: wan.WanSpec | None = None,
) -> Iterator[Result]:
    """Every size and variant at one peer count (and link rate); yields each result."""
    emulated = net if isinstance(net, wan.WanNet) else None  # drops are counted per row
    with ExitStack() as stack:
        groups: dict[tuple[str, int | None], _Group] = {}
        for v in variants:
            key = (v.impl, v.connections)
            if key not in groups:
                params = PcclParams(
                    connections=v.connections or DEFAULT_CONNECTIONS,
                    socket_buffer_bytes=cfg.socket_buffer_bytes,
                    zero_copy=cfg.zero_copy,
                    shared_memory=cfg.shared_memory,
                    direct_max_bytes=cfg.direct_max_bytes,
                    rsag_min_bytes=cfg.rsag_min_bytes,
                    congestion_control=cfg.congestion_control,
                )
                groups[key] = stack.enter_context(_group(v.impl, world, params, cfg, net))
        for nbytes in cfg.sizes:
            iters = cfg.iters if cfg.iters is not None else default_iters(nbytes)
            warmup = cfg.warmup if cfg.warmup is not None else default_warmup(iters)
            times: dict[_Variant, list[float]] = {v: [] for v in variants}
            drops: dict[_Variant, Counter[str]] = {v: Counter() for v in variants}
            for _ in range(cfg.rounds):
                for v in variants:
                    in_place = cfg.in_place or v.impl != "pccl"  # gloo always runs in place
                    group = groups[(v.impl, v.connections)]
                    before = emulated.drops() if emulated is not None else {}
                    times[v] += group.measure(
                        nbytes, iters, warmup, v.segment_bytes or 0, in_place, v.quantization, cfg.op
                    )
                    if emulated is not None:
                        drops[v].update({k: n - before[k] for k, n in emulated.drops().items()})
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
                    pool_sizes=groups[(v.impl, v.connections)].pool_sizes if v.impl == "pccl" else None,
                    shared_memory=cfg.shared_memory if v.impl == "pccl" else None,
                    quantization=v.quantization,
                    netns_rate_bits=rate,
                    load1=os.getloadavg()[0],
                    wan=str(link) if link is not None else None,
                    wan_rate_bits=link.rate_bits if link is not None else None,
                    op=cfg.op,
                    wan_drops=dict(drops[v]) if emulated is not None else None,
                    congestion_control=cfg.congestion_control if v.impl in ("pccl", "comm") else None,
                    wan_cc=cfg.wan_cc if link is not None else None,
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
    wan_links: tuple[wan.WanSpec | None, ...] = cfg.wan or (None,)
    with ExitStack() as net_stack:
        net: Network | None = None
        if cfg.netns_rates:
            net = net_stack.enter_context(netns.ShapedNet(max(cfg.peers), cfg.netns_rates[0]))
        if cfg.wan:
            # One host per worker rank and one more for the master.
            first = cfg.wan[0]
            net = net_stack.enter_context(wan.WanNet(max(cfg.peers) + 1, first.link, host=first.host, cc=cfg.wan_cc))
        for rate in links:
            if isinstance(net, netns.ShapedNet) and rate is not None and rate != net.rate_bits:
                net.set_rate(rate)
            for link in wan_links:
                if isinstance(net, wan.WanNet) and link is not None:
                    net.set_wan(link)
                for world in cfg.peers:
                    for result in _measure_peer_count(cfg, variants, world, net, rate, link):
                        results.append(result)
                        if on_result is not None:
                            on_result(result)
    return results
