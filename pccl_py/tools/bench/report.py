"""What `pccl bench` reports: one Result per measured row, its derived bandwidths, and
how rows are shown: the rich table, the progress line, one JSON object per row.

algbw = bytes / time; busbw = algbw x the bytes each rank's link carries per byte of the
buffer in a bandwidth-optimal implementation, as in nccl-tests: 2(N-1)/N for the
all-reduce, (N-1)/N for the all-gather and the reduce-scatter (bytes: the full gathered
output / the full input), 1 for the broadcast. A quantized row's algbw is the
*effective* one: the original float32 bytes over the time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from pccl_py.tools.bench.config import format_size
from pccl_py.tools.netns import format_rate


def bus_factor(peers: int, op: str = "all_reduce") -> float:
    if op == "broadcast":
        return 1.0
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (peers - 1) / peers
    return 2.0 * (peers - 1) / peers


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


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
    shared_memory: bool | None = None  # pccl only
    pool_sizes: tuple[int, ...] | None = None  # pccl: connections per pool after the runs (auto K: as chosen)
    quantization: str | None = None  # "kind:dtype" (pccl only); algbw is then effective
    netns_rate_bits: int | None = None  # each worker's shaped egress (bits/s); None: loopback
    load1: float | None = None  # the machine's 1-minute load average when the row was measured
    wan: str | None = None  # the emulated WAN (pccl_py.tools.wan.WanSpec), None: none
    wan_rate_bits: int | None = None  # its narrowest rate, pair or access (bits/s; 0: unlimited)
    op: str = "all_reduce"  # the collective (pccl_py.tools.bench.config.OPS)
    wan_drops: dict[str, int] | None = None  # the emulator's drops by cause in this row's runs (warm-ups too)
    congestion_control: str | None = None  # pccl and comm: what their data connections asked for
    wan_cc: str | None = None  # --wan: the emulated hosts' default congestion control (None: the machine's)

    @property
    def link_key(self) -> tuple[int | None, str | None]:
        """Which network the row was measured on (rows compare only within one)."""
        return (self.netns_rate_bits, self.wan)

    @property
    def link_name(self) -> str:
        if self.wan is not None:
            return f"wan {self.wan}"
        return format_rate(self.netns_rate_bits) if self.netns_rate_bits else "loopback"

    @property
    def seconds(self) -> float:
        return statistics.median(self.per_iter_max)

    @property
    def algbw_gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def busbw_gbps(self) -> float:
        return self.algbw_gbps * bus_factor(self.peers, self.op)

    @property
    def link_utilization(self) -> float | None:
        """busbw over the shaped egress or WAN link rate (what each peer's link carries in a
        ring, as a fraction of what it can); effective, so above 1 when quantized. None on
        loopback and on an unlimited WAN link."""
        rate = self.netns_rate_bits or self.wan_rate_bits
        if not rate:
            return None
        return self.busbw_gbps * 1e9 / (rate / 8)

    @property
    def label(self) -> str:
        link = f" @{format_rate(self.netns_rate_bits)}" if self.netns_rate_bits else ""
        link = f" @wan({self.wan})" if self.wan is not None else link
        if self.impl != "pccl":
            return self.impl + link
        q = f" q={self.quantization}" if self.quantization else ""
        chosen = "auto" if not self.pool_sizes else "auto(" + ",".join(map(str, self.pool_sizes)) + ")"
        return f"pccl K={self.connections or chosen} seg={format_size(self.segment_bytes or 0)}{q}{link}"

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
            "collective": self.op,
            "op": "sum",
            "in_place": self.in_place,
            "iters": self.iters,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "seconds_min": ordered[0],
            "seconds_p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "seconds_max": ordered[-1],
            "link": "wan" if self.wan is not None else "loopback" if self.netns_rate_bits is None else "netns-htb",
            "netns_rate_bps": self.netns_rate_bits,
            "wan": self.wan,
            "wan_rate_bps": self.wan_rate_bits,
            "link_utilization": self.link_utilization,
            "load1": self.load1,
        }
        if self.wan_drops is not None:
            out["wan_drops"] = self.wan_drops
        if self.wan is not None:
            out["wan_cc"] = self.wan_cc
        if self.congestion_control is not None:
            out["congestion_control"] = self.congestion_control
        if self.impl == "pccl":
            out["connections"] = self.connections
            out["segment_bytes"] = self.segment_bytes
            out["socket_buffer_bytes"] = self.socket_buffer_bytes
            out["zero_copy"] = self.zero_copy
            out["shared_memory"] = self.shared_memory
            out["pool_sizes"] = list(self.pool_sizes) if self.pool_sizes is not None else None
            out["quantization"] = self.quantization
        return out


def progress_line(r: Result) -> str:
    """One row as it is printed the moment it was measured."""
    return (
        f"  {r.label:<24} N={r.peers} {format_size(r.nbytes):>5}  {format_seconds(r.seconds):>10}  "
        f"busbw {r.busbw_gbps:7.3f} GB/s  ({r.iters} iters)"
        + (f"  drops {sum(r.wan_drops.values())}" if r.wan_drops else "")
    )


def json_line(r: Result, started: str) -> str:
    """One row as a JSON line; `started` (ISO time) tells the invocations in a file apart."""
    return json.dumps({**r.to_json(), "started": started}) + "\n"


def results_table(results: Sequence[Result], title: str | None = None) -> Table:
    baseline = {(r.link_key, r.peers, r.nbytes): r for r in results if r.impl == "gloo"}
    show_ratio = bool(baseline) and any(r.impl == "pccl" for r in results)
    unquantized = {
        (r.link_key, r.peers, r.nbytes, r.connections, r.segment_bytes): r
        for r in results
        if r.impl == "pccl" and not r.quantization
    }
    show_quant = any(r.quantization for r in results)
    show_link = any(r.netns_rate_bits or r.wan is not None for r in results)
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
            r.wan or "",
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
            (str(r.connections) if r.connections else "auto") if r.connections is not None else "",
            format_size(r.segment_bytes) if r.segment_bytes is not None else "",
            str(r.peers),
            format_size(r.nbytes),
            str(r.iters),
            format_seconds(r.seconds),
            f"{r.algbw_gbps:.3f}",
            f"{r.busbw_gbps:.3f}",
        ]
        if show_link:
            row.insert(0, r.link_name)
            util = r.link_utilization
            row.append(f"{util:.2f}" if util is not None else "")
        if show_quant:
            row.append(r.quantization or "")
            plain = unquantized.get((r.link_key, r.peers, r.nbytes, r.connections, r.segment_bytes))
            if r.quantization and plain is not None:
                qratio = r.algbw_gbps / plain.algbw_gbps
                row.append(f"[{'green' if qratio >= 2.5 else 'red'}]{qratio:.2f}x[/]")
            else:
                row.append("")
        if show_ratio:
            base = baseline.get((r.link_key, r.peers, r.nbytes))
            if r.impl == "pccl" and base is not None:
                ratio = r.busbw_gbps / base.busbw_gbps
                row.append(f"[{'green' if ratio >= 1.0 else 'red'}]{ratio:.2f}x[/]")
            else:
                row.append("")
        table.add_row(*row)
    return table


def describe_machine() -> str:
    """Cores, CPU model and kernel: the line printed before the rows."""
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
