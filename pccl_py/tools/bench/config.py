"""What one `pccl bench` invocation measures: BenchConfig (and its validation), the
engine settings of a pccl group, the defaults, and byte sizes as the command line writes
them ('1K', '16M'). BenchError is the one error a failed run raises."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pccl_py.config import Config
from pccl_py.tools.wan import WanSpec

LOOPBACK = "127.0.0.1"
# pccl: the native engine alone; gloo: torch.distributed gloo; comm: pccl_py.Communicator
# through a real master (control plane and outcome agreement included).
IMPLS = ("pccl", "gloo", "comm")
# The collectives it measures. SIZE is the full buffer, as in nccl-tests: an all-gather's
# output (each rank contributes SIZE/N), a reduce-scatter's input (each rank keeps SIZE/N),
# a broadcast's buffer (from rank 0).
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
DEFAULT_PEERS = (2, 4)
DEFAULT_SIZES = ("1K", "1M", "16M", "64M", "256M")
DEFAULT_CONNECTIONS = 0  # the Communicator's default: sized from each neighbour's round trip
DEFAULT_SEGMENT_BYTES = 512 << 10
DEFAULT_DIRECT_MAX_BYTES = Config.direct_allreduce_max_bytes
DEFAULT_RSAG_MIN_BYTES = Config.rsag_min_bytes
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


def default_iters(nbytes: int) -> int:
    """Timed iterations: ~1 GiB moved per (size, N), between 5 and 500 iterations."""
    return max(5, min(500, (1 << 30) // max(nbytes, 1)))


def default_warmup(iters: int) -> int:
    return max(1, min(20, iters // 10))


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PcclParams:
    """Engine settings of one pccl group (segment size is per op, swept within a group)."""

    connections: int = DEFAULT_CONNECTIONS
    socket_buffer_bytes: int = 0
    zero_copy: bool = True
    shared_memory: bool = True  # pccl and comm: same-host payloads through shared rings
    # pccl and comm: payload x (N-1) up to this goes direct (Config.direct_allreduce_max_bytes).
    direct_max_bytes: int = DEFAULT_DIRECT_MAX_BYTES
    # pccl and comm: above the direct limit, payloads of at least this go by the direct
    # reduce-scatter + all-gather (Config.rsag_min_bytes; 0: the ring).
    rsag_min_bytes: int = DEFAULT_RSAG_MIN_BYTES
    # pccl and comm: TCP_CONGESTION of the data connections (Config.congestion_control;
    # "system": the host's).
    congestion_control: str = "bbr"


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
    shared_memory: bool = True  # pccl: same-host payloads through shared rings, not TCP
    in_place: bool = True
    rounds: int = 1
    skip_pccl: bool = False
    json_path: Path | None = None
    op_timeout: float = 120.0
    start_timeout: float = 120.0
    quantization: tuple[str, ...] = ()  # e.g. ("minmax:uint8",): pccl variants also run quantized
    netns_rates: tuple[int, ...] = ()  # bits/s: each worker in its own namespace, egress shaped
    wan: tuple[WanSpec, ...] = ()  # each worker (and the master) in its own emulated WAN host
    direct_max_bytes: int = DEFAULT_DIRECT_MAX_BYTES  # pccl and comm: see PcclParams
    rsag_min_bytes: int = DEFAULT_RSAG_MIN_BYTES  # pccl and comm: see PcclParams
    op: str = "all_reduce"  # one of OPS
    congestion_control: str = "bbr"  # pccl and comm: see PcclParams
    wan_cc: str | None = None  # --wan: every emulated host's default congestion control (None: the machine's)

    def validate(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"--op: unknown collective {self.op!r}; known: {', '.join(OPS)}")
        if self.op != "all_reduce" and self.quantization:
            raise ValueError("--quantization applies to the all-reduce only")
        if self.op in ("all_gather", "reduce_scatter", "all_to_all") and any(
            s % (FLOAT32_BYTES * n) for s in self.sizes for n in self.peers
        ):
            raise ValueError(f"--op {self.op}: every size must split into float32 chunks for every peer count")
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
        if any(not 0 <= k <= 64 for k in self.connections):
            raise ValueError("--connections must be in [0, 64] (0: sized from the round trip)")
        if any(b < FLOAT32_BYTES for b in self.segment_bytes):
            raise ValueError("--segment-bytes must be at least 4")
        if self.direct_max_bytes < 0:
            raise ValueError("--direct-max-bytes must not be negative")
        if self.rsag_min_bytes < 0:
            raise ValueError("--rsag-min-bytes must not be negative")
        if any(r <= 0 for r in self.netns_rates):
            raise ValueError("--netns-rate must be positive")
        if self.wan_cc is not None and not self.wan:
            raise ValueError("--wan-cc sets the emulated hosts' congestion control: it needs --wan")
        if self.netns_rates and self.wan:
            raise ValueError("--netns-rate and --wan cannot be combined: pick one network")
        if self.skip_pccl and not self.compare:
            raise ValueError("--skip-pccl leaves nothing to run without --compare")
        from pccl_py.types import Quantization

        for q in self.quantization:
            Quantization.parse(q)  # raises ValueError
