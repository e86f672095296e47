"""DiLoCo (Douillard et al. 2023) over a pccl_py Communicator.

Each peer runs H inner steps of any torch optimizer on its own data; then, in an
outer step, the peers all-reduce (AVG) their pseudo-gradients, global - local, and an
outer optimizer (SGD with Nesterov momentum, lr 0.7, momentum 0.9 by default) applies
the average to the global parameters; every peer's model restarts from them.

    diloco = DiLoCo(comm, model, inner_opt, sync_every=50)
    # any outer optimizer, built over the global parameters it is handed:
    # DiLoCo(..., outer_optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.8))
    for batch in data:
        loss_fn(model(batch)).backward()
        inner_opt.step(); inner_opt.zero_grad()
        diloco.step()          # counts inner steps; every `sync_every`-th is an outer step

The global parameters, the outer optimizer's state and the outer step count are the
group's shared state, so a joiner receives them bit-exactly (sync_shared_state). A
peer failure during the all-reduce is retried over the survivors, and the average is
over the peers that actually contributed. Every peer ends each outer step with the
same bytes in every global parameter and in the outer optimizer state.

Joining: at each outer step the peers let pending joiners in (pending_peers(), then
update_topology()) and sync the shared state; a joiner constructs its DiLoCo after
connect(), which syncs at the same point.

compression=pccl_py.Compression(...) replaces the dense all-reduce by SparseLoCo's
exchange (pccl_py/optim/exchange.py): top-k per chunk of a peer-local error-feedback
buffer, low-bit values, all-gathered and summed in rank order on every peer; the
default outer optimizer is then plain SGD with lr 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pccl_py import Communicator, Compression, ReduceOp, SharedState, SyncInfo, SyncStrategy
from pccl_py.optim.exchange import CompressedExchange

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OuterStepInfo:
    outer_step: int  # outer steps applied so far (the shared step counter)
    world_size: int  # peers whose pseudo-gradients were averaged
    tx_bytes: int
    rx_bytes: int
    seconds: float  # wall time of the outer step (communication included)
    synced: SyncInfo | None  # the shared-state sync that followed, if joiners came in
    peak_tx_bytes: int = -1  # the most one exchange sent (StreamingDiLoCo: one fragment's); -1: tx_bytes

    def __post_init__(self) -> None:
        if self.peak_tx_bytes < 0:
            object.__setattr__(self, "peak_tx_bytes", self.tx_bytes)


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates an optimizer's lazily made state (momentum buffers, moments) as it would
    be before its first step, so that every peer's state has the same layout and a
    joiner can receive it. Runs one step with zero gradients and lr 0, then resets step
    counters to 0; parameters are unchanged."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_grads = [p.grad for p in params]
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    before = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, saved_lr, strict=True):
            group["lr"] = lr
        for p, g, b in zip(params, saved_grads, before, strict=True):
            p.grad = g
            with torch.no_grad():
                p.copy_(b)
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step":
                state[key] = torch.zeros_like(value) if torch.is_tensor(value) else 0


class DiLoCo:
    """Synchronous DiLoCo. See the module docstring."""

    # Default outer optimizer: Nesterov SGD with the paper's settings.
    DEFAULT_OUTER_LR = 0.7
    DEFAULT_OUTER_MOMENTUM = 0.9
    # With compression: plain SGD, lr 1 (SparseLoCo).
    COMPRESSED_OUTER_LR = 1.0
    COMPRESSED_OUTER_MOMENTUM = 0.0

    def __init__(
        self,
        comm: Communicator,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int = 50,
        outer_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        quantization: Any = None,
        compression: Compression | None = None,
        timeout: float | None = None,
        join_strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
    ) -> None:
        if sync_every < 1:
            raise ValueError("sync_every must be >= 1")
        self.comm = comm
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        if compression is not None and quantization is not None:
            raise ValueError("pass quantization or compression, not both (compression sets its own bits)")
        if compression is not None and not isinstance(compression, Compression):
            raise TypeError(f"compression must be a pccl_py.Compression, not {compression!r}")
        self.quantization = quantization
        self.compression = compression
        self.timeout = timeout
        self._params = [p for p in model.parameters() if p.requires_grad]
        # The global parameters live apart from the model; the outer optimizer steps them.
        self.global_params = [p.detach().clone() for p in self._params]
        # The outer optimizer steps the global parameters, which only exist from here on:
        # it is given as a factory of them (default: Nesterov SGD, lr 0.7, momentum 0.9).
        lr, momentum = self.DEFAULT_OUTER_LR, self.DEFAULT_OUTER_MOMENTUM
        if compression is not None:
            # SparseLoCo's: the error feedback already carries a momentum; Nesterov on
            # top of it did not train the tiny LM (docs/diloco.md).
            lr, momentum = self.COMPRESSED_OUTER_LR, self.COMPRESSED_OUTER_MOMENTUM
        make_outer = outer_optimizer or (
            lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        )
        self.outer_optimizer = make_outer(self._outer_params())
        materialize_state(self.outer_optimizer)
        self._outer_step = torch.zeros(1, dtype=torch.int64)  # outer updates applied
        self._rounds = torch.zeros(1, dtype=torch.int64)  # outer steps taken (async: one more than applied)
        # Pseudo-gradients, flattened, plus one contribution weight (1: a real
        # pseudo-gradient; 0: a joiner with none); reduced by SUM, then divided.
        self._numel = sum(p.numel() for p in self._params)
        self._flat = torch.zeros(self._numel + 1, dtype=torch.float32)
        # Compressed outer step: error feedback (peer-local) + all-gather of payloads.
        self._exchange = CompressedExchange(comm, self._numel, compression, timeout) if compression else None
        # Where the local model started this round (pseudo-gradient = start - local):
        # the global parameters, unless the local restart adds peer-local terms.
        self._round_start: list[torch.Tensor] | None = None
        if compression is not None and compression.keep_residual:
            self._round_start = [g.detach().clone() for g in self.global_params]
        self.inner_steps = 0
        self.allreduces = 0
        self.state = SharedState(self._state_tensors(), revision=0)
        self._synced_once = False
        # First sync: every peer of a starting group, or a joiner, gets the group's state.
        self.last_sync = self._sync(join_strategy)

    @property
    def outer_steps(self) -> int:
        return int(self._outer_step.item())

    def step(self) -> OuterStepInfo | None:
        """Call after each inner optimizer step; runs the outer step every `sync_every`
        inner steps (a collective) and returns its info, else None."""
        self.inner_steps += 1
        if self.inner_steps % self.sync_every:
            return None
        return self.outer_step()

    def outer_step(self) -> OuterStepInfo:
        start = time.perf_counter()
        self._pseudo_gradient_into_flat(self._round_start)
        if self._exchange is not None:
            info = self._exchange.run(self._flat)
        else:
            info = self.comm.all_reduce(
                self._flat, op=ReduceOp.SUM, quantization=self.quantization, timeout=self.timeout, retry=True
            )
        self.allreduces += 1
        self._rounds += 1
        self._apply_outer(self._flat)
        synced = self._admit_joiners()
        return OuterStepInfo(
            outer_step=self.outer_steps,
            world_size=info.world_size,
            tx_bytes=info.tx_bytes,
            rx_bytes=info.rx_bytes,
            seconds=time.perf_counter() - start,
            synced=synced,
        )

    @property
    def error_feedback(self) -> torch.Tensor | None:
        """The compressed outer step's error-feedback buffer (flat, peer-local: not in
        the shared state; zeros on a joiner), or None without compression."""
        return self._exchange.error if self._exchange is not None else None

    # ------------------------------------------------------------------ parts

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {"outer_step": self._outer_step, "rounds": self._rounds}
        index = {id(p): i for i, p in enumerate(self._outer_params())}
        for i, p in enumerate(self.global_params):
            tensors[f"global.{i}"] = p.data
        for p, state in self.outer_optimizer.state.items():
            for key in sorted(state):
                value = state[key]
                if torch.is_tensor(value):
                    tensors[f"outer.{index[id(p)]}.{key}"] = value
        return tensors

    def _outer_params(self) -> list[torch.Tensor]:
        """The tensors the outer optimizer steps: the global parameters (StreamingDiLoCo:
        views of them cut at its fragments' boundaries)."""
        return self.global_params

    def _pseudo_gradient_into_flat(self, reference: list[torch.Tensor] | None = None) -> None:
        """flat = reference - local (reference: where the round started; default the
        global parameters), then the contribution weight 1."""
        offset = 0
        with torch.no_grad():
            for g, p in zip(reference or self.global_params, self._params, strict=True):
                n = p.numel()
                torch.sub(g.reshape(-1), p.detach().reshape(-1), out=self._flat[offset : offset + n])
                offset += n
            self._flat[self._numel] = 1.0

    def _apply_outer(self, summed: torch.Tensor) -> None:
        """Applies the outer step with summed pseudo-gradients (last element: the number
        of contributors), counts it and restarts the local model from the result."""
        self._update_global(summed)
        self._outer_step += 1
        self._reset_local()

    def _update_global(self, summed: torch.Tensor) -> None:
        """The outer optimizer's step on the global parameters with the average of the
        summed pseudo-gradients. Identical inputs on every peer give identical bytes out."""
        weight = summed[self._numel]
        if float(weight) == 0.0:  # nobody had a pseudo-gradient (every contributor a joiner)
            weight = torch.ones_like(weight)
        offset = 0
        for g in self.global_params:
            n = g.numel()
            g.grad = (summed[offset : offset + n] / weight).view_as(g)
            offset += n
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)

    def _reset_local(self) -> None:
        """local = global (keep_residual: minus this peer's unsent error feedback)."""
        residual = self.error_feedback if self._round_start is not None else None
        offset = 0
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self._params, self.global_params, strict=True)):
                p.copy_(g)
                if residual is not None and self._round_start is not None:
                    p.sub_(residual[offset : offset + p.numel()].view_as(p))
                    self._round_start[i].copy_(p)
                offset += p.numel()

    def _admit_joiners(self) -> SyncInfo | None:
        if self.comm.pending_peers(timeout=self.timeout) == 0:
            return None
        self.comm.update_topology(timeout=self.timeout)
        return self._sync(SyncStrategy.ENFORCE_POPULAR)

    def _sync(self, strategy: SyncStrategy) -> SyncInfo:
        if self._synced_once:
            self.state.revision += 1  # the content changed since the last sync (PCCL's rule)
        info = self.comm.sync_shared_state(self.state, strategy=strategy, timeout=self.timeout)
        self._synced_once = True
        self._reset_local()
        self.last_sync = info
        return info


class AsyncDiLoCo(DiLoCo):
    """One-step-delayed DiLoCo with eager local updates, corrected when the average
    arrives: the exchange of round t runs in the background during the inner steps of
    round t+1, so communication is hidden when it is shorter than compute.

    At the end of round t: P_t = (where round t started) - local; if round t-1's
    exchange has not arrived yet, wait for it and apply its average with the outer
    optimizer to the global parameters G (the shared state: the same bytes on every
    peer); restart the local model *eagerly* from G - eager * P_t, i.e. with this peer's
    own fresh progress, which G does not hold yet; let joiners in; start round t's
    exchange of P_t. lookahead (default on) also takes the part of G's next update that
    the outer momentum already fixes (Nesterov SGD: lr * m^2 * buf).

    apply_on_arrival (default on): step() checks after every inner step whether the
    exchange in flight has ended; once it has, the average is applied to G at once and
    the local model is moved by (new G - where the round started), keeping the inner
    steps it took from the eager guess, so the rest of the round runs from where
    synchronous DiLoCo would have started it. G gets the same updates in the same
    order either way (only when a peer applies them differs), so the shared state is
    bit-identical at every outer step. When the exchange takes as long as the inner
    steps, the average lands at the round's end and this is the plain eager rule.

    eager=0, lookahead=False, apply_on_arrival=False is the plain one-step-delayed
    DiLoCo (PCCL's), which restarts from G and so loses one round of progress: it
    trails synchronous DiLoCo by 13.8% after 20 rounds of the tiny LM at its best outer
    settings, and diverges with lr 0.7 / momentum 0.9 (docs/diloco.md). The local start
    point and the eager term are peer-local; the model equals G only after finish().

    A joiner catches up with the sync at its admission (the old peers SEND_ONLY, the
    joiner RECEIVE_ONLY or popular) and takes part in the round then in flight with
    contribution weight 0, so it applies the same update as everyone and stays
    bit-identical without a second sync.

    Defaults, measured on the tiny LM (docs/diloco.md): eager 1.0, lookahead and
    apply_on_arrival with outer Nesterov SGD lr 0.7, momentum 0.5 (a scalar model of
    the delayed recursion with eager 1 is stable with these for every per-round
    progress, and with momentum 0.9 is not; the delayed recursion is what remains when
    the link is as slow as the inner steps)."""

    DEFAULT_OUTER_LR = 0.7
    DEFAULT_OUTER_MOMENTUM = 0.5
    DEFAULT_EAGER = 1.0
    DEFAULT_LOOKAHEAD = True
    DEFAULT_APPLY_ON_ARRIVAL = True

    def __init__(
        self,
        *args: Any,
        eager: float | None = None,
        lookahead: bool | None = None,
        apply_on_arrival: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.eager = self.DEFAULT_EAGER if eager is None else float(eager)
        self.lookahead = self.DEFAULT_LOOKAHEAD if lookahead is None else bool(lookahead)
        self.apply_on_arrival = self.DEFAULT_APPLY_ON_ARRIVAL if apply_on_arrival is None else bool(apply_on_arrival)
        self._inflight: Any = None
        self._arrived: Any = None  # the info of an exchange applied before its round ended
        self.arrived_at: int | None = None  # inner steps of its round counted when the last update was applied
        self._round_began = 0  # inner_steps when the round in progress began
        self._inflight_buffer = torch.zeros_like(self._flat)
        self._start_point = [g.detach().clone() for g in self.global_params]  # where this round started
        if int(self._rounds.item()) > 0:
            # Joined a running group: the others start their in-flight round right
            # after this sync; join it with nothing to contribute.
            self._start_round()

    def step(self) -> OuterStepInfo | None:
        self.inner_steps += 1
        if self.apply_on_arrival:
            self.poll()
        if self.inner_steps % self.sync_every:
            return None
        return self.outer_step()

    def poll(self) -> bool:
        """Applies the exchange in flight if it has ended (step() calls this after every
        inner step); True if it applied one now."""
        if self._inflight is None or not self._inflight.done():
            return False
        self._arrived = self._take_inflight()
        self.arrived_at = self.inner_steps - self._round_began
        with torch.no_grad():  # keep the inner steps taken since the round started
            for p, g, s in zip(self._params, self.global_params, self._start_point, strict=True):
                p.add_(g - s)
                s.copy_(g)
        return True

    def _take_inflight(self) -> Any:
        """Waits for the exchange in flight and steps G with its average (not counted:
        the outer step counter moves at the round's end, on every peer alike)."""
        info = self._inflight.wait(timeout=self.timeout)
        self._inflight = None
        self._update_global(self._inflight_buffer)
        return info

    @property
    def pending_update(self) -> bool:
        """True while an exchange is in flight and its average is not in G yet."""
        return self._inflight is not None

    def outer_step(self) -> OuterStepInfo:
        start = time.perf_counter()
        world = self.comm.world_size
        tx = rx = 0
        self._pseudo_gradient_into_flat(self._start_point)
        info = self._arrived
        if self._inflight is not None:
            info = self._take_inflight()
            self.arrived_at = self.inner_steps - self._round_began
        self._arrived = None
        self._round_began = self.inner_steps
        if info is not None:
            world, tx, rx = info.world_size, info.tx_bytes, info.rx_bytes
            self._outer_step += 1
        self._reset_local()
        self._rounds += 1
        self._inflight_buffer, self._flat = self._flat, self._inflight_buffer
        synced = None
        if self.comm.pending_peers(timeout=self.timeout) > 0:
            self.comm.update_topology(timeout=self.timeout)
            synced = self._sync(SyncStrategy.SEND_ONLY)
        self._eager_restart(self._inflight_buffer)
        self._start_round(keep=True)
        return OuterStepInfo(self.outer_steps, world, tx, rx, time.perf_counter() - start, synced)

    def _eager_restart(self, pseudo_gradient: torch.Tensor) -> None:
        """local = G - eager * P (this peer's own round, not yet in G); the round's
        start point is remembered for the next pseudo-gradient."""
        offset = 0
        with torch.no_grad():  # the local model was just reset (_reset_local)
            for p, g, s in zip(self._params, self.global_params, self._start_point, strict=True):
                n = p.numel()
                if self.eager:
                    p.sub_(pseudo_gradient[offset : offset + n].view_as(p), alpha=self.eager)
                if self.lookahead:
                    self._momentum_lookahead(p, g)
                s.copy_(p)
                offset += n

    def _momentum_lookahead(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """lookahead: also take now the part of G's next update that the momentum
        buffer already fixes (SGD: lr * m * buf; Nesterov: lr * m^2 * buf)."""
        buf = self.outer_optimizer.state.get(g, {}).get("momentum_buffer")
        if buf is None:
            return
        group = next(gr for gr in self.outer_optimizer.param_groups if any(q is g for q in gr["params"]))
        m = group.get("momentum", 0.0)
        p.sub_(buf, alpha=group["lr"] * m * (m if group.get("nesterov") else 1.0))

    def _start_round(self, keep: bool = False) -> None:
        if not keep:
            self._inflight_buffer.zero_()  # weight 0: a joiner has no pseudo-gradient yet
        if self._exchange is not None:
            self._inflight = self._exchange.start(self._inflight_buffer)
        else:
            self._inflight = self.comm.all_reduce_async(
                self._inflight_buffer, op=ReduceOp.SUM, quantization=self.quantization, timeout=self.timeout, retry=True
            )
        self.allreduces += 1

    def finish(self) -> None:
        """Waits for the last in-flight exchange and applies it; the model then holds
        the global parameters."""
        if self._inflight is not None:
            self._arrived = self._take_inflight()
        if self._arrived is not None:
            self._arrived = None
            self._outer_step += 1
        self._reset_local()
        if self._exchange is not None:
            self._exchange.close()
