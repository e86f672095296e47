"""Data-parallel training of a small MLP on synthetic data, in plain torch.distributed:
DDP by default, FSDP2 (`fully_shard`) with --fsdp. The backend is a flag; the training
code is the same for "gloo" and "pccl". Launch it like any torch.distributed script:

    torchrun --nproc-per-node 4 examples/ddp_mlp.py --backend pccl --steps 300
    torchrun --nproc-per-node 4 examples/ddp_mlp.py --backend gloo --steps 300

--save PREFIX writes each rank's final parameters to PREFIX.rank<R>.pt (full tensors,
also under FSDP); --bench prints the median step time (rank 0, one JSON line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn


def build_model(width: int, depth: int, inputs: int, classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = inputs
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    layers.append(nn.Linear(size, classes))
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    parser.add_argument("--save", default=None, help="write final parameters to SAVE.rank<R>.pt")
    parser.add_argument("--bench", action="store_true", help="print the median step time (rank 0)")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the --bench timing")
    parser.add_argument("--timeout", type=float, default=1800.0, help="collective timeout (seconds)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (for failure tests)")
    args = parser.parse_args()

    if args.backend == "pccl":
        import pccl_py.torch  # noqa: F401  (registers the "pccl" backend)

    torch.set_num_threads(1)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))  # env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # the same initial weights everywhere
    inputs, classes = 64, 10
    model = build_model(args.width, args.depth, inputs, classes)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The model trains on the CPU: say so, or fully_shard picks the accelerator's
        # mesh wherever torch sees one (and a single-GPU host has no device for rank 1).
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained: nn.Module = model
    else:
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9)

    # Each rank draws its own batches from a fixed teacher, so runs are reproducible.
    data = torch.Generator().manual_seed(1000 + rank)
    teacher = torch.randn(inputs, classes, generator=torch.Generator().manual_seed(7))
    times: list[float] = []
    loss = torch.zeros(())
    for step in range(args.steps):
        start = time.perf_counter()
        x = torch.randn(args.batch, inputs, generator=data)
        y = (x @ teacher).argmax(dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(trained(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if args.step_delay:
            time.sleep(args.step_delay)
        if rank == 0 and step % 50 == 0 and not args.bench:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if args.save:
        params = {}
        for name, p in model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            params[name] = full.detach().clone()
        torch.save(params, f"{args.save}.rank{rank}.pt")
    if args.bench and rank == 0:
        timed = times[args.warmup :] or times
        print(
            json.dumps(
                {
                    "backend": args.backend,
                    "world": world,
                    "mode": "fsdp" if args.fsdp else "ddp",
                    "steps": len(timed),
                    "step_ms_median": 1000 * statistics.median(timed),
                    "step_ms_mean": 1000 * statistics.fmean(timed),
                    "final_loss": loss.item(),
                }
            ),
            flush=True,
        )
    # Every rank reaches the end before any tears its connections down: a rank whose
    # peers have already closed theirs can abort inside gloo's teardown.
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and not args.bench:
        print(f"done: {args.steps} steps on {world} ranks with {args.backend}; loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
