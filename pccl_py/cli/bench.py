"""`pccl bench`: the all-reduce benchmark's command line (pccl_py.tools.bench runs it).
Parses the arguments into a BenchConfig, refuses what cannot run here (gloo without
torch, namespaces without root), prints each row as it is measured, writes JSON lines,
and prints the table.

    pccl bench --peers 2 4 --sizes 1K 1M 16M --compare gloo comm [--json FILE]
    pccl bench --op all_gather --peers 2 4 --sizes 16M 64M --compare gloo
    pccl bench --peers 4 --sizes 1K 16M --compare gloo --wan rtt=100ms,rate=1gbit
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.console import Console

from pccl_py.tools import netns, wan
from pccl_py.tools.bench.config import (
    DEFAULT_CONNECTIONS,
    DEFAULT_DIRECT_MAX_BYTES,
    DEFAULT_PEERS,
    DEFAULT_RSAG_MIN_BYTES,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SIZES,
    IMPLS,
    LOOPBACK,
    OPS,
    BenchConfig,
    BenchError,
    format_size,
    parse_size,
)
from pccl_py.tools.bench.harness import run_benchmark
from pccl_py.tools.bench.report import Result, describe_machine, json_line, progress_line, results_table
from pccl_py.tools.netns import format_rate


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
        "--op",
        choices=OPS,
        default="all_reduce",
        help="the collective (default: all_reduce); SIZE is the full buffer as in nccl-tests: the "
        "all-gather's output, the reduce-scatter's and the all-to-all's input, the broadcast's buffer (from "
        "rank 0); busbw is algbw x 2(N-1)/N for the all-reduce, x (N-1)/N for the all-gather, "
        "reduce-scatter and all-to-all, x 1 for the broadcast",
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
        help="pccl TCP connections per peer, 0 (the default): sized from each neighbour's measured round "
        "trip, as the Communicator does; several values sweep",
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
        "--no-shared-memory",
        action="store_true",
        help="pccl sends payloads to peers on this host over loopback TCP instead of shared-memory rings",
    )
    parser.add_argument(
        "--direct-max-bytes",
        type=parse_size,
        default=DEFAULT_DIRECT_MAX_BYTES,
        metavar="B",
        help="pccl and comm: an all-reduce whose size x (N-1) is at most B goes direct (every peer to "
        "every peer, about one round trip) instead of by the ring; 0: always the ring "
        "(default: Config.direct_allreduce_max_bytes, 256K)",
    )
    parser.add_argument(
        "--rsag-min-bytes",
        type=parse_size,
        default=DEFAULT_RSAG_MIN_BYTES,
        metavar="B",
        help="pccl and comm: an all-reduce above the direct limit whose size is at least B goes by the "
        "direct reduce-scatter + all-gather (rank c reduces chunk c and sends it to everyone) instead of "
        "the ring; 0: the ring. --rsag-min-bytes 4 --direct-max-bytes 0 forces it for every size "
        "(default: Config.rsag_min_bytes, 0)",
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
    parser.add_argument(
        "--wan",
        type=parse_wan,
        nargs="+",
        default=[],
        metavar="SPEC",
        help="run behind the WAN emulator (pccl_py.tools.wan): each worker in its own emulated host, "
        "the master (--compare comm) in a host of its own, gloo's and pccl's traffic and the control "
        "plane all crossing modelled links; SPEC is KEY=VALUE,... of the per-pair keys rtt (the round "
        "trip; one-way delay is rtt/2), rate, loss, jitter, queue and the per-host access-link keys up, "
        "down, access (up and down alike), access_queue, e.g. rtt=100ms,rate=1gbit,loss=0.001 or "
        "rtt=100ms,access=1gbit (1 Gbit/s up and down per host, shared by its pairs; several SPECs run "
        "one after the other); needs root and /dev/net/tun; see docs/wan.md",
    )
    parser.add_argument(
        "--wan-cc",
        choices=wan.CONGESTION_CONTROLS,
        default=None,
        help="with --wan: the default TCP congestion control of every emulated host (what gloo's "
        "connections get; pccl's ask for --congestion-control); default: the machine's",
    )
    parser.add_argument(
        "--congestion-control",
        default="bbr",
        metavar="CC",
        help="pccl and comm: the TCP congestion control of the data connections "
        "(Config.congestion_control; 'system': the host's default; default: bbr)",
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
        shared_memory=not args.no_shared_memory,
        in_place=not args.out_of_place,
        rounds=args.rounds,
        skip_pccl=args.skip_pccl,
        json_path=args.json,
        op_timeout=args.op_timeout,
        quantization=tuple(dict.fromkeys(args.quantization)),
        netns_rates=tuple(dict.fromkeys(args.netns_rate)),
        wan=tuple(dict.fromkeys(args.wan)),
        direct_max_bytes=args.direct_max_bytes,
        rsag_min_bytes=args.rsag_min_bytes,
        op=args.op,
        congestion_control=args.congestion_control,
        wan_cc=args.wan_cc,
    )


def parse_netns_rate(text: str) -> int:
    """'200mbit' -> 200_000_000 bits/s (argparse type of --netns-rate)."""
    try:
        return netns.parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_wan(text: str) -> wan.WanSpec:
    """'rtt=100ms,rate=1gbit' -> WanSpec (argparse type of --wan)."""
    try:
        return wan.WanSpec.parse(text)
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
    if cfg.wan:
        why_not = wan.unavailable()
        if why_not is not None:
            Console(stderr=True).print(f"[red]error:[/] --wan {why_not}")
            return 2
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)  # a file or pipe: do not squeeze the table into 80 columns
    progress = Console(stderr=True, soft_wrap=True)
    if cfg.netns_rates:
        rates = ", ".join(format_rate(r) for r in cfg.netns_rates)
        where = f"one network namespace per worker, egress shaped by htb to {rates}"
    elif cfg.wan:
        specs = "; ".join(str(s) for s in cfg.wan)
        hosts = max(cfg.peers) + 1
        where = f"WAN emulator, {hosts} hosts (one per worker, the last for the master), every link {specs}"
    else:
        where = f"loopback {LOOPBACK}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    progress.print(f"[dim]{describe_machine()}; {where}; load average {load}[/]")
    json_file: IO[str] | None = None
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    def on_result(r: Result) -> None:
        progress.print(progress_line(r))
        if json_file is not None:
            json_file.write(json_line(r, started))
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
    if cfg.shared_memory and not cfg.netns_rates and not cfg.wan:
        sends += ", same-host rings"
    direct = f"direct up to {format_size(cfg.direct_max_bytes)} x (N-1)" if cfg.direct_max_bytes else "no direct"
    direct += f", rsag from {format_size(cfg.rsag_min_bytes)}" if cfg.rsag_min_bytes else ", else ring"
    if cfg.op == "all_reduce":
        title = f"all-reduce float32 SUM, {placement}; pccl: commit vote, {sends}, {direct}"
    else:
        what = cfg.op.replace("_", "-") + (" float32 SUM" if cfg.op == "reduce_scatter" else " float32")
        title = f"{what} (size: the full buffer); pccl: direct exchange, commit vote, {sends}"
    out.print(results_table(results, title=title))
    return 0
