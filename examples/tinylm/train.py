"""Train the tiny language model on one peer: DiLoCo, AsyncDiLoCo, StreamingDiLoCo, or
per-step data-parallel ("ddp": gradients all-reduced every step, the baseline).
--compress "topk=32,chunk=4096,bits=2" (pccl_py.Compression's fields) compresses the
outer step; --quantize uint8 quantizes its all-reduce.

    python -m examples.tinylm.train --master 127.0.0.1:48148 --world 4 --index 0
    pccl run ... -- python -m examples.tinylm.train --world 4      (PCCL_MASTER set by pccl run)

Each peer trains on its own stream of the generated corpus (seeded by --index) and
evaluates on a fixed held-out stream. Progress goes to --log as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import pccl_py as pccl
from examples.tinylm.corpus import ALPHABET, generate
from examples.tinylm.model import TinyGPT
from pccl_py.optim import AsyncDiLoCo, DiLoCo, StreamingDiLoCo
from pccl_py.peer.group import join_group

STOI = {c: i for i, c in enumerate(ALPHABET)}


@dataclass
class TrainConfig:
    mode: str = "diloco"  # diloco | async | streaming | ddp
    world: int = 4  # peers to wait for at the start (a joiner passes 1)
    sync_every: int = 50
    outer_steps: int = 20  # train until the group reaches this many outer steps (ddp: steps / sync_every)
    batch: int = 8
    context: int = 48
    dim: int = 176
    layers: int = 3
    heads: int = 4
    lr: float = 3e-3
    seed: int = 0
    eval_batches: int = 8
    comm_delay: float = 0.0  # extra seconds per all-reduce (to emulate a slow link)
    threads: int = 1
    compress: str = ""  # pccl_py.Compression fields, "topk=32,chunk=4096,bits=2" ("" = dense)
    quantize: str = ""  # pccl_py.Quantization of the dense all-reduce, e.g. "uint8"
    fragments: int = 4  # streaming: fragments, their exchange's overlap (inner steps) and the mix
    delay: int = 2
    mix: float = 0.5
    eager: float = -1.0  # async: the eager coefficient (< 0: AsyncDiLoCo's default)
    lookahead: int = -1  # async: 0 / 1 = AsyncDiLoCo(lookahead=False / True) (< 0: its default)
    apply_on_arrival: int = -1  # async: 0 / 1 = AsyncDiLoCo(apply_on_arrival=False / True) (< 0: its default)


def parse_compression(text: str) -> pccl.Compression | None:
    """'topk=32,chunk=4096,bits=2,transform=dct,beta=0.9' -> Compression ('' -> None)."""
    if not text:
        return None
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key == "average":
            fields[key] = value
        elif key in ("bits", "transform"):
            fields[key] = None if value in ("", "none", "None") else (int(value) if key == "bits" else value)
        elif key == "beta":
            fields[key] = float(value)
        elif key == "keep_residual":
            fields[key] = value.lower() in ("1", "true", "yes")
        else:
            fields[key] = int(value)
    return pccl.Compression(**fields)


class SlowLink:
    """A Communicator whose all-reduces take `delay` seconds longer: a stand-in for a
    slow WAN link (the sync path waits for it; the async path pays it in the
    background)."""

    def __init__(self, comm: pccl.Communicator, delay: float) -> None:
        self._comm = comm
        self._delay = delay
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slow-link")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    def all_reduce(self, *args: Any, **kwargs: Any) -> pccl.ReduceInfo:
        time.sleep(self._delay)
        return self._comm.all_reduce(*args, **kwargs)

    def all_reduce_async(self, *args: Any, **kwargs: Any) -> Any:
        future = self._pool.submit(self.all_reduce, *args, **kwargs)
        return pccl.AllReduceHandle(future)


def encode(text: str) -> torch.Tensor:
    return torch.tensor([STOI[c] for c in text], dtype=torch.long)


class Batches:
    def __init__(self, stream: torch.Tensor, batch: int, context: int, seed: int) -> None:
        self.stream, self.batch, self.context = stream, batch, context
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.stream) - self.context - 1, self.batch)
        x = torch.stack([self.stream[s : s + self.context] for s in starts])
        y = torch.stack([self.stream[s + 1 : s + self.context + 1] for s in starts])
        return x, y


def evaluate(model: TinyGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return float(np.mean([model.loss(x, y).item() for x, y in batches]))


def evaluate_global(model: TinyGPT, diloco: DiLoCo, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The validation loss of the global parameters (the local model may differ from
    them: AsyncDiLoCo's eager term, Compression.keep_residual, StreamingDiLoCo's mix)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, diloco.global_params, strict=True):
            p.copy_(g)
        loss = evaluate(model, batches)
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return loss


def train(
    master: str, index: int, cfg: TrainConfig, emit: Callable[[dict[str, Any]], None], joining: bool = False
) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same init everywhere (the first sync would equalise it anyway)
    model = TinyGPT(len(ALPHABET), cfg.dim, cfg.layers, cfg.heads, cfg.context)
    inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    data = Batches(encode(generate(400_000, seed=1000 + index)), cfg.batch, cfg.context, seed=index)
    held_out = Batches(encode(generate(100_000, seed=999_999)), cfg.batch, cfg.context, seed=7)
    val = [held_out.next() for _ in range(cfg.eval_batches)]

    comm = pccl.Communicator(master, name=f"tinylm-{index}", config=pccl.Config.from_env()).connect(timeout=300)
    try:
        if not joining:
            join_group(comm, cfg.world, timeout=300)
        emit({"event": "joined", "index": index, "world": comm.world_size, "peer": comm.peer_id, "pid": os.getpid()})
        if cfg.mode == "ddp":
            _train_ddp(comm, model, inner, data, val, cfg, index, emit)
            return
        link = SlowLink(comm, cfg.comm_delay) if cfg.comm_delay else comm
        options: dict[str, Any] = {
            "compression": parse_compression(cfg.compress),
            "quantization": pccl.Quantization.parse(cfg.quantize) if cfg.quantize else None,
        }
        cls: type[DiLoCo] = DiLoCo
        if cfg.mode == "async":
            cls = AsyncDiLoCo
            if cfg.eager >= 0:
                options["eager"] = cfg.eager
            if cfg.lookahead >= 0:
                options["lookahead"] = bool(cfg.lookahead)
            if cfg.apply_on_arrival >= 0:
                options["apply_on_arrival"] = bool(cfg.apply_on_arrival)
        elif cfg.mode == "streaming":
            cls = StreamingDiLoCo
            options.update(fragments=cfg.fragments, delay=cfg.delay, mix=cfg.mix)
        diloco = cls(link, model, inner, sync_every=cfg.sync_every, timeout=120, **options)
        emit({"event": "synced", "index": index, "outer": diloco.outer_steps, "rx": diloco.last_sync.rx_bytes})
        start = time.perf_counter()
        while diloco.outer_steps < cfg.outer_steps:
            x, y = data.next()
            loss = model.loss(x, y)
            loss.backward()
            inner.step()
            inner.zero_grad(set_to_none=True)
            info = diloco.step()
            if info is not None:
                emit(
                    {
                        "event": "outer",
                        "index": index,
                        "outer": info.outer_step,
                        "world": info.world_size,
                        "loss": float(loss.detach()),
                        "val": evaluate(model, val),
                        "t": time.perf_counter() - start,
                        "round_s": info.seconds,
                        "inner_steps": diloco.inner_steps,
                        "allreduces": diloco.allreduces,
                        "tx": info.tx_bytes,
                        "peak_tx": info.peak_tx_bytes,
                        "arrived_at": getattr(diloco, "arrived_at", None),
                        "rx": info.rx_bytes,
                        "hash": hex(hash(tuple(diloco.state.hashes().values())) & 0xFFFFFFFF),
                    }
                )
        if isinstance(diloco, AsyncDiLoCo):
            diloco.finish()
        emit(
            {
                "event": "done",
                "index": index,
                "val": evaluate(model, val),
                "val_global": evaluate_global(model, diloco, val),
                "outer": diloco.outer_steps,
            }
        )
    finally:
        comm.close()


def _train_ddp(comm: Any, model: TinyGPT, inner: Any, data: Batches, val: list[Any], cfg: TrainConfig, index: int,
               emit: Callable[[dict[str, Any]], None]) -> None:
    """Baseline: average gradients over the peers every step (same samples, same inner
    optimizer, sync_every times more all-reduces than DiLoCo)."""
    params = [p for p in model.parameters()]
    flat = torch.zeros(sum(p.numel() for p in params))
    start = time.perf_counter()
    for step in range(cfg.outer_steps * cfg.sync_every):
        x, y = data.next()
        loss = model.loss(x, y)
        loss.backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        comm.all_reduce(flat, op=pccl.ReduceOp.AVG, retry=True, timeout=120)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        inner.step()
        inner.zero_grad(set_to_none=True)
        if (step + 1) % cfg.sync_every == 0:
            emit({"event": "outer", "index": index, "outer": (step + 1) // cfg.sync_every, "world": comm.world_size,
                  "loss": float(loss.detach()), "val": evaluate(model, val), "t": time.perf_counter() - start,
                  "inner_steps": step + 1, "allreduces": step + 1})
    emit({"event": "done", "index": index, "val": evaluate(model, val), "outer": cfg.outer_steps})


def worker(master: str, index: int, out: Any, joining: bool = False, **overrides: Any) -> None:
    """Entry point for spawned peer processes (pccl_py.testing.PeerGroup)."""
    cfg = TrainConfig(**overrides)
    train(master, index, cfg, out.put, joining=joining)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--master", default=os.environ.get("PCCL_MASTER", "127.0.0.1:48148"))
    parser.add_argument("--index", type=int, default=int(os.environ.get("PCCL_LOCAL_INDEX", "0")))
    parser.add_argument("--join", action="store_true", help="join a group that is already training")
    parser.add_argument("--log", help="append progress records (JSON lines) here")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args()
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    train(args.master, args.index, cfg, emit, joining=args.join)


if __name__ == "__main__":
    main()
