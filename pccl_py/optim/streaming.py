"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) over a pccl_py
Communicator: the flattened parameters are split into F equal fragments (a tensor
that straddles a boundary is cut there: the outer optimizer steps views of the global
parameters, one per piece), and each fragment has its own outer step, once every H
inner steps, the fragments' steps spread evenly over the H steps. A fragment's
exchange starts `delay` (tau) inner steps before it is applied and runs in the
background meanwhile; when it is applied, the outer optimizer steps that fragment's
global parameters and the local ones are mixed back:
local = mix * local + (1 - mix) * global (alpha in the paper; 0: restart from global).

So every exchange carries about 1/F of the parameters: the peak bytes per exchange are
about F times lower than DiLoCo's, the bytes per H inner steps the same.

    diloco = StreamingDiLoCo(comm, model, inner_opt, sync_every=50, fragments=4, delay=2, mix=0.5)

Shared state as in DiLoCo (global parameters, outer optimizer state, counters): every
fragment step changes the same bytes on every peer. Joiners are let in only after the
last fragment's step of each H-step cycle, when no exchange is in flight, so a joiner
that starts its inner-step count at 0 lines up with the group's cycle. The outer step
counter counts cycles; step() returns an OuterStepInfo at each cycle's end, with the
cycle's bytes (tx_bytes) and the largest single exchange (peak_tx_bytes).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pccl_py import ReduceOp
from pccl_py.optim.diloco import DiLoCo, OuterStepInfo


def split_fragments(sizes: list[int], fragments: int) -> list[list[tuple[int, int, int]]]:
    """The flattened tensors of `sizes` cut into `fragments` consecutive fragments of
    equal size (to one element): per fragment, its pieces (tensor index, start, end),
    start/end within the flattened tensor."""
    total = sum(sizes)
    fragments = max(1, min(fragments, total))
    bounds = [round(f * total / fragments) for f in range(fragments + 1)]
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(fragments)]
    offset = 0
    for i, n in enumerate(sizes):
        for f in range(fragments):
            lo, hi = max(bounds[f], offset), min(bounds[f + 1], offset + n)
            if lo < hi:
                out[f].append((i, lo - offset, hi - offset))
        offset += n
    return out


def schedule(sync_every: int, fragments: int, delay: int) -> list[tuple[int, int]]:
    """(start, apply) inner-step positions in the cycle (1..H) of each fragment: applied
    at round((f + 1) H / F), started `delay` steps before."""
    out = []
    prev = 0
    for f in range(fragments):
        apply_at = round((f + 1) * sync_every / fragments)
        start = apply_at - delay
        if start < max(prev, 1):
            raise ValueError(
                f"delay {delay} too long for {fragments} fragments in {sync_every} inner steps "
                f"(at most {sync_every // fragments - 1})"
            )
        out.append((start, apply_at))
        prev = apply_at
    return out


class StreamingDiLoCo(DiLoCo):
    """See the module docstring. `delay=0` applies each fragment's step as soon as its
    exchange ends (no overlap)."""

    def __init__(
        self, *args: Any, fragments: int = 4, delay: int = 2, mix: float = 0.5, **kwargs: Any
    ) -> None:
        if kwargs.get("compression") is not None:
            raise ValueError("StreamingDiLoCo does not take compression (yet): use DiLoCo or AsyncDiLoCo")
        if not 0.0 <= mix < 1.0:
            raise ValueError("mix must be in [0, 1)")
        self._fragment_count = fragments
        self._pieces: list[torch.Tensor] | None = None
        super().__init__(*args, **kwargs)
        self.mix = mix
        self.delay = delay
        self._schedule = schedule(self.sync_every, len(self.fragments), delay)
        self._buffers = [torch.zeros(sum(c - a for _, a, c in frag) + 1, dtype=torch.float32) for frag in self.fragments]
        self._inflight: dict[int, Any] = {}
        self._cycle_tx = self._cycle_rx = self._peak_tx = 0
        self._cycle_seconds = 0.0  # time spent in this cycle's fragment steps
        self._cycle_world = self.comm.world_size

    def step(self) -> OuterStepInfo | None:
        self.inner_steps += 1
        pos = (self.inner_steps - 1) % self.sync_every + 1
        info = None
        for f, (start_at, apply_at) in enumerate(self._schedule):
            began = time.perf_counter()
            if pos == start_at:
                self._start(f)
            if pos == apply_at:
                info = self._apply(f, began)
            else:
                self._cycle_seconds += time.perf_counter() - began
        return info

    def outer_step(self) -> OuterStepInfo:
        raise NotImplementedError("StreamingDiLoCo steps its fragments from step()")

    def _outer_params(self) -> list[torch.Tensor]:
        if self._pieces is None:
            self.fragments = split_fragments([p.numel() for p in self._params], self._fragment_count)
            self._pieces = [self.global_params[i].view(-1)[a:c] for frag in self.fragments for i, a, c in frag]
            self._piece_of = {}
            k = 0
            for f, frag in enumerate(self.fragments):
                for j in range(len(frag)):
                    self._piece_of[(f, j)] = self._pieces[k]
                    k += 1
        return self._pieces

    def _local(self, i: int, a: int, c: int) -> torch.Tensor:
        return self._params[i].detach().view(-1)[a:c]

    def _start(self, f: int) -> None:
        buf = self._buffers[f]
        offset = 0
        with torch.no_grad():
            for j, (i, a, c) in enumerate(self.fragments[f]):
                n = c - a
                torch.sub(self._piece_of[(f, j)], self._local(i, a, c), out=buf[offset : offset + n])
                offset += n
            buf[offset] = 1.0
        self._inflight[f] = self.comm.all_reduce_async(
            buf, op=ReduceOp.SUM, quantization=self.quantization, timeout=self.timeout, retry=True
        )
        self.allreduces += 1

    def _apply(self, f: int, began: float) -> OuterStepInfo | None:
        info = self._inflight.pop(f).wait(timeout=self.timeout)
        self._cycle_tx += info.tx_bytes
        self._cycle_rx += info.rx_bytes
        self._peak_tx = max(self._peak_tx, info.tx_bytes)
        self._cycle_world = info.world_size
        buf = self._buffers[f]
        weight = buf[-1]
        offset = 0
        for j, (_, a, c) in enumerate(self.fragments[f]):
            self._piece_of[(f, j)].grad = buf[offset : offset + c - a] / weight
            offset += c - a
        self.outer_optimizer.step()  # pieces without a gradient (other fragments) are left alone
        self.outer_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for j, (i, a, c) in enumerate(self.fragments[f]):
                p, g = self._local(i, a, c), self._piece_of[(f, j)]
                if self.mix:
                    p.mul_(self.mix).add_(g, alpha=1.0 - self.mix)
                else:
                    p.copy_(g)
        if f < len(self.fragments) - 1:
            self._cycle_seconds += time.perf_counter() - began
            return None
        self._outer_step += 1
        self._rounds += 1
        synced = self._admit_joiners()
        out = OuterStepInfo(
            outer_step=self.outer_steps,
            world_size=self._cycle_world,
            tx_bytes=self._cycle_tx,
            rx_bytes=self._cycle_rx,
            seconds=self._cycle_seconds + time.perf_counter() - began,
            synced=synced,
            peak_tx_bytes=self._peak_tx,
        )
        self._cycle_tx = self._cycle_rx = self._peak_tx = 0
        self._cycle_seconds = 0.0
        return out
