"""DDP (or FSDP2, --fsdp) step time with backend "pccl" next to "gloo", on the same
unmodified script (examples/ddp_mlp.py), launched as torchrun would (one process per
rank, env://).

    python -m pccl_py.tools.torch_bench --procs 2 4 --steps 300
    python -m pccl_py.tools.torch_bench --procs 2 4 --steps 60 --warmup 10 --wan rtt=50ms,rate=1gbit

--wan puts every rank in an emulated host of its own behind the WAN emulator
(pccl_py.tools.wan; root and /dev/net/tun; docs/wan.md): MASTER_ADDR is rank 0's host,
gloo binds to each host's eth0. Prints one JSON line per run and a side-by-side table.
`launch()` is also what the tests use to run a script on N local ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pccl_py.tools import wan
from pccl_py.tools.wan import WanNet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_mlp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    world: int, argv: list[str], env: dict[str, str] | None = None, net: WanNet | None = None
) -> list[subprocess.Popen[str]]:
    """Starts `python argv...` on `world` local ranks with torchrun's environment
    (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK); with `net`, rank r in host r.
    The caller owns the processes."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ if env is None else env)
        if net is not None:
            rank_env["GLOO_SOCKET_IFNAME"] = "eth0"
        rank_env.update(
            MASTER_ADDR=net.ips[0] if net is not None else "127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
        )
        prefix = net.exec_prefix(rank) if net is not None else []
        procs.append(
            subprocess.Popen(
                [*prefix, sys.executable, *argv],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """Waits for every process (killing all at the deadline); returns (code, out, err)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += "\n[killed at the launch deadline]"
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def launch(
    world: int, argv: list[str], timeout: float = 300.0, net: WanNet | None = None
) -> list[tuple[int, str, str]]:
    """Runs `python argv...` on `world` local ranks to completion (with `net`: rank r in host r)."""
    return finish(start(world, argv, net=net), timeout)


def run_once(
    backend: str, world: int, steps: int, extra: list[str], net: WanNet | None = None, timeout: float = 900.0
) -> dict[str, Any]:
    results = launch(
        world, [str(EXAMPLE), "--backend", backend, "--steps", str(steps), "--bench", *extra], timeout, net
    )
    lines = [ln for ln in results[0][1].splitlines() if ln.startswith("{")]
    codes = [code for code, _, _ in results]
    # Rank 0 prints its result after the last step, which needs every rank's gradients:
    # a rank's abort after that, at exit, is reported with the row, not fatal
    # (gloo sometimes dies in its destructor: "terminate called without an active exception").
    if not lines or any(code not in (0, -signal.SIGABRT) for code in codes):
        code, _, err = next((r for r in results if r[0] != 0), results[0])
        raise RuntimeError(f"{backend} x{world} failed (exit {code}):\n{err[-3000:]}")
    row = dict(json.loads(lines[-1]))
    if any(codes):
        row["exit_codes"] = codes
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the backends this many times")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--json", default=None, help="append the rows to this file")
    parser.add_argument(
        "--wan",
        default=None,
        metavar="SPEC",
        help="run every rank in its own host behind the WAN emulator, e.g. rtt=50ms,rate=1gbit (root; docs/wan.md)",
    )
    args, extra = parser.parse_known_args()
    if args.fsdp:
        extra.append("--fsdp")
    rows = []
    with ExitStack() as stack:
        net = None
        if args.wan is not None:
            why_not = wan.unavailable()
            if why_not is not None:
                parser.error(f"--wan {why_not}")
            spec = wan.WanSpec.parse(args.wan)
            net = stack.enter_context(wan.WanNet(max(args.procs), spec.link, host=spec.host))
        for world in args.procs:
            for _ in range(args.repeats):
                for backend in ("gloo", "pccl"):
                    row = run_once(backend, world, args.steps, extra, net)
                    row.update(fsdp=args.fsdp, wan=args.wan)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"\n{'ranks':>5} {'gloo ms/step':>13} {'pccl ms/step':>13} {'pccl/gloo':>10}")
    for world in args.procs:
        gloo = sorted(r["step_ms_median"] for r in rows if r["world"] == world and r["backend"] == "gloo")
        pccl = sorted(r["step_ms_median"] for r in rows if r["world"] == world and r["backend"] == "pccl")
        g, p = gloo[len(gloo) // 2], pccl[len(pccl) // 2]
        print(f"{world:>5} {g:>13.3f} {p:>13.3f} {p / g:>10.3f}")


if __name__ == "__main__":
    main()
