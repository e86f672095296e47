"""DDP step time with backend "pccl" next to "gloo", on the same unmodified script
(examples/ddp_mlp.py), launched as torchrun would (one process per rank, env://).

    python -m pccl_py.torch.bench --procs 2 4 --steps 300

Prints one JSON line per run and a side-by-side table. `launch()` is also what the
tests use to run a script on N local ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_mlp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(world: int, argv: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    """Starts `python argv...` on `world` local ranks with torchrun's environment
    (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK). The caller owns the processes."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ if env is None else env)
        rank_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


def launch(world: int, argv: list[str], timeout: float = 300.0) -> list[tuple[int, str, str]]:
    """Runs `python argv...` on `world` local ranks to completion."""
    return finish(start(world, argv), timeout)


def run_once(backend: str, world: int, steps: int, extra: list[str]) -> dict[str, Any]:
    results = launch(world, [str(EXAMPLE), "--backend", backend, "--steps", str(steps), "--bench", *extra])
    for code, _, err in results:
        if code != 0:
            raise RuntimeError(f"{backend} x{world} failed (exit {code}):\n{err[-3000:]}")
    line = [ln for ln in results[0][1].splitlines() if ln.startswith("{")][-1]
    return dict(json.loads(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the backends this many times")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--json", default=None, help="append the rows to this file")
    args, extra = parser.parse_known_args()
    if args.fsdp:
        extra.append("--fsdp")
    rows = []
    for world in args.procs:
        for _ in range(args.repeats):
            for backend in ("gloo", "pccl"):
                row = run_once(backend, world, args.steps, extra)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'ranks':>5} {'gloo ms/step':>13} {'pccl ms/step':>13} {'pccl/gloo':>10}")
    for world in args.procs:
        gloo = sorted(r["step_ms_median"] for r in rows if r["world"] == world and r["backend"] == "gloo")
        pccl = sorted(r["step_ms_median"] for r in rows if r["world"] == world and r["backend"] == "pccl")
        g, p = gloo[len(gloo) // 2], pccl[len(pccl) // 2]
        print(f"{world:>5} {g:>13.3f} {p:>13.3f} {p / g:>10.3f}")


if __name__ == "__main__":
    main()
