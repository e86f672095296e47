"""DiLoCo / AsyncDiLoCo (pccl_py.optim) against a reference written out here.

The reference is DiLoCo's outer step by hand, in float64 from the float32 values the
peers hold: pseudo-gradient = global - local (averaged over the peers), then SGD with
Nesterov momentum (lr 0.7, momentum 0.9) on the global parameters:

    buf    = momentum * buf + pg          (buf starts at 0: materialize_state)
    global = global - lr * (pg + momentum * buf)

It is carried from the initial parameters through every outer step (the values under
test are never fed back into it), so an error in any step shows in every later one.
Peers run as threads of this process around an in-process master (the data plane is
native and releases the GIL); every wait is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from threads import run_parallel as run_threads

import pccl_py as pccl
from pccl_py.optim import AsyncDiLoCo, DiLoCo
from pccl_py.optim.diloco import materialize_state

pytestmark = pytest.mark.timeout(60)

H = 4  # inner steps per outer step
LR, MOMENTUM = 0.7, 0.9
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 implementation vs float64 reference


# ---------------------------------------------------------------------- helpers


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


class Peer:
    """One peer's training loop: H inner AdamW steps on its own data per round; it
    records, per round, the local parameters right before the outer step and the
    global parameters and state hashes right after it."""

    def __init__(self, comm: Any, seed: int, cls: type[DiLoCo] = DiLoCo, **kwargs: Any) -> None:
        torch.set_num_threads(1)
        self.model = make_model(seed)
        self.inner = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.diloco = cls(
            comm,
            self.model,
            self.inner,
            sync_every=H,
            timeout=30,
            outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, nesterov=True),
            **kwargs,
        )
        self.initial = clone(self.diloco.global_params)
        self.start: list[list[torch.Tensor]] = []  # global params each round started from
        self.local: list[list[torch.Tensor]] = []  # local params before each outer step
        self.after: list[list[torch.Tensor]] = []  # global params after each outer step
        self.hashes: list[dict[str, int]] = []
        self.momentum: list[list[torch.Tensor]] = []  # outer momentum buffers after each outer step
        self.outer: list[int] = []
        self.model_is_global: list[bool] = []

    def run(self, rounds: int) -> Peer:
        for _ in range(rounds):
            self.start.append(clone(self.diloco.global_params))
            for k in range(H):
                x = torch.randn(16, 6, generator=self.gen)
                y = torch.sin(x.sum(dim=1, keepdim=True))
                loss = ((self.model(x) - y) ** 2).mean()
                loss.backward()
                self.inner.step()
                self.inner.zero_grad(set_to_none=True)
                if k == H - 1:
                    self.local.append(clone(list(self.model.parameters())))
                info = self.diloco.step()
                assert (info is not None) == (k == H - 1)
            self.after.append(clone(self.diloco.global_params))
            self.hashes.append(self.diloco.state.hashes())
            opt = self.diloco.outer_optimizer
            self.momentum.append(clone(opt.state[g]["momentum_buffer"] for g in self.diloco.global_params))
            self.outer.append(self.diloco.outer_steps)
            self.model_is_global.append(
                all(
                    torch.equal(p, g)
                    for p, g in zip(self.model.parameters(), self.diloco.global_params, strict=True)
                )
            )
        return self


class Reference:
    """The outer optimizer written out, in float64."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = [p.double() for p in params]
        self.buf = [torch.zeros_like(p) for p in self.params]

    def step(self, pseudo_grad: list[torch.Tensor]) -> None:
        for p, b, g in zip(self.params, self.buf, pseudo_grad, strict=True):
            b.mul_(MOMENTUM).add_(g)
            p.sub_(LR * (g + MOMENTUM * b))

    def pseudo_grad(self, start: list[torch.Tensor], locals_: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Average over the peers of (start - local), start being reference values."""
        n = len(locals_)
        return [sum(s - loc[i].double() for loc in locals_) / n for i, s in enumerate(start)]


def clone(params: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_params_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, **TOL)


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run_parallel(fns: list[Callable[[], Any]], timeout: float = 40.0) -> list[Any]:
    """Runs the callables side by side; returns their results, raising the first
    exception; fails if one has not returned within `timeout`."""
    results = run_threads(fns, timeout)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results

@pytest.fixture
def group(make_group: Callable[..., list[pccl.Communicator]]) -> Callable[[int], list[pccl.Communicator]]:
    """group(n) -> n admitted communicators (conftest's make_group); closed at teardown."""
    return make_group


# ---------------------------------------------------------------------- (a) one peer


def test_world_of_one_matches_reference(group: Callable[[int], list[pccl.Communicator]]) -> None:
    (comm,) = group(1)
    peer = Peer(comm, seed=0).run(rounds=3)
    ref = Reference(peer.initial)
    for r in range(3):
        ref.step(ref.pseudo_grad(ref.params, [peer.local[r]]))
        assert_params_close(peer.after[r], ref.params)
        assert peer.outer[r] == r + 1
        assert peer.model_is_global[r]  # local := global after each outer step
    # The outer optimizer's momentum buffer is the reference's too.
    bufs = [peer.diloco.outer_optimizer.state[g]["momentum_buffer"] for g in peer.diloco.global_params]
    assert_params_close(bufs, ref.buf)
    assert peer.diloco.allreduces == 3


# ---------------------------------------------------------------------- (b) two peers


def test_two_peers_identical_and_match_averaged_reference(
    group: Callable[[int], list[pccl.Communicator]],
) -> None:
    comms = group(2)
    # Different initial weights: the first sync must make every peer start from the same.
    peers = run_parallel([lambda i=i: Peer(comms[i], seed=i) for i in range(2)])
    assert_identical(peers[0].initial, peers[1].initial)
    assert peers[0].diloco.state.hashes() == peers[1].diloco.state.hashes()
    run_parallel([lambda p=p: p.run(rounds=3) for p in peers])

    ref = Reference(peers[0].initial)
    for r in range(3):
        assert peers[0].hashes[r] == peers[1].hashes[r]  # shared state, byte for byte
        assert_identical(peers[0].after[r], peers[1].after[r])
        assert not all(torch.equal(a, b) for a, b in zip(peers[0].local[r], peers[1].local[r], strict=True))
        ref.step(ref.pseudo_grad(ref.params, [peers[0].local[r], peers[1].local[r]]))
        assert_params_close(peers[0].after[r], ref.params)
        assert peers[0].outer[r] == peers[1].outer[r] == r + 1
        assert peers[0].model_is_global[r] and peers[1].model_is_global[r]


# ---------------------------------------------------------------------- (c) async


def test_async_applies_previous_rounds_average(group: Callable[[int], list[pccl.Communicator]]) -> None:
    rounds = 4
    comms = group(2)
    # eager=0, no lookahead: the plain one-step-delayed rule (the eager restart and the
    # lookahead: tests/integration/test_compression.py)
    peers = run_parallel(
        [lambda i=i: Peer(comms[i], seed=i, cls=AsyncDiLoCo, eager=0, lookahead=False, apply_on_arrival=False) for i in range(2)]
    )
    run_parallel([lambda p=p: p.run(rounds=rounds) for p in peers])
    run_parallel([lambda p=p: p.diloco.finish() for p in peers])
    final = [clone(p.diloco.global_params) for p in peers]
    assert_identical(final[0], final[1])

    ref = Reference(peers[0].initial)
    pending: list[torch.Tensor] | None = None  # the average of the previous round
    for r in range(rounds):
        start = [p.clone() for p in ref.params]  # what round r started from
        for peer in peers:
            assert_params_close(peer.start[r], start)
        current = ref.pseudo_grad(start, [peers[0].local[r], peers[1].local[r]])
        if pending is not None:
            ref.step(pending)  # round r applies round r-1's average
        pending = current
        assert peers[0].hashes[r] == peers[1].hashes[r]
        assert_identical(peers[0].after[r], peers[1].after[r])
        assert_params_close(peers[0].after[r], ref.params)
        assert peers[0].outer[r] == r  # updates applied: one behind the rounds
        assert peers[0].model_is_global[r]
    assert pending is not None
    ref.step(pending)  # finish() applies the last round's average
    assert_params_close(final[0], ref.params)

    # The test tells the delayed rule from the undelayed one: applying each round's
    # own average at once (plain DiLoCo on the same local parameters) ends elsewhere.
    eager = Reference(peers[0].initial)
    eager.step(eager.pseudo_grad(eager.params, [peers[0].local[0], peers[1].local[0]]))
    assert not torch.allclose(peers[0].after[0][0].double(), eager.params[0], **TOL)


# ---------------------------------------------------------------------- (d) materialize_state


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-nesterov", "adamw"],
)
def test_materialize_state(make_opt: Callable[[Any], torch.optim.Optimizer]) -> None:
    model = make_model(3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # a gradient the caller holds must survive
    before = clone(model.parameters())
    grads = clone(p.grad for p in model.parameters())
    opt = make_opt(model.parameters())
    lr = opt.param_groups[0]["lr"]
    materialize_state(opt)

    assert_identical(list(model.parameters()), before)  # parameters unchanged, bit for bit
    assert_identical([p.grad for p in model.parameters()], grads)
    assert opt.param_groups[0]["lr"] == lr
    for p in model.parameters():
        state = opt.state[p]
        if isinstance(opt, torch.optim.SGD):
            assert set(state) == {"momentum_buffer"}
        else:
            assert {"step", "exp_avg", "exp_avg_sq"} <= set(state)
            assert float(state["step"]) == 0
        for key, value in state.items():
            if key != "step":
                assert value.shape == p.shape and value.dtype == p.dtype
                assert torch.count_nonzero(value) == 0, key

    # The next step is the one a fresh optimizer would take.
    twin = make_model(3)
    for p, q in zip(twin.parameters(), model.parameters(), strict=True):
        p.grad = q.grad.clone()
    fresh = make_opt(twin.parameters())
    opt.step()
    fresh.step()
    assert_identical(list(model.parameters()), list(twin.parameters()))


# ---------------------------------------------------------------------- (e) a joiner


@pytest.mark.parametrize("cls", [DiLoCo, AsyncDiLoCo], ids=["sync", "async"])
def test_joiner_gets_identical_state_at_an_outer_step(
    master: pccl.Master, group: Callable[[int], list[pccl.Communicator]], cls: type[DiLoCo]
) -> None:
    comms = group(2)
    founders = run_parallel([lambda i=i: Peer(comms[i], seed=i, cls=cls) for i in range(2)])
    run_parallel([lambda p=p: p.run(rounds=2) for p in founders])
    joiner_comm = pccl.Communicator(master.address, name="joiner")
    result: dict[str, Any] = {}

    def founder(p: Peer) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # outer steps until the joiner is in
            p.run(rounds=1)
            if p.diloco.comm.world_size == 3:
                assert p.diloco.outer_steps == p.outer[-1]
                p.run(rounds=2)
                return p.outer[-3]
            time.sleep(0.05)
        raise AssertionError("the joiner was never admitted")

    def joiner() -> None:
        joiner_comm.connect(timeout=20)
        peer = Peer(joiner_comm, seed=99, cls=cls)  # syncs at the founders' outer step
        result["synced_at"] = peer.diloco.outer_steps
        result["hashes"] = peer.diloco.state.hashes()
        result["initial"] = peer.initial
        result["peer"] = peer.run(rounds=2)

    try:
        admitted_at = run_parallel([lambda: founder(founders[0]), lambda: founder(founders[1]), joiner])[:2]
        assert admitted_at[0] == admitted_at[1] == result["synced_at"]
        step = admitted_at[0]
        idx = founders[0].outer.index(step)
        # Right after its sync the joiner holds the founders' state, byte for byte.
        assert result["hashes"] == founders[0].hashes[idx]
        assert_identical(result["initial"], founders[0].after[idx])
        # ...and stays identical while contributing to the next outer steps.
        jp: Peer = result["peer"]
        for r in range(2):
            assert jp.outer[r] == founders[0].outer[idx + 1 + r]
            assert jp.hashes[r] == founders[0].hashes[idx + 1 + r] == founders[1].hashes[idx + 1 + r]
        if cls is AsyncDiLoCo:
            # It took part in the round in flight at its admission with weight 0, and
            # applies the same (delayed) updates as the founders.
            run_parallel([lambda p=p: p.diloco.finish() for p in (*founders, jp)])
            hashes = [p.diloco.state.hashes() for p in (*founders, jp)]
            assert hashes[0] == hashes[1] == hashes[2]
            return
        # The average is over all three peers; the outer momentum carries on from the
        # founders' (the joiner received it with the state).
        ref = Reference(founders[0].after[idx])
        ref.buf = [b.double() for b in founders[0].momentum[idx]]
        for r in range(2):
            locals_ = [founders[0].local[idx + 1 + r], founders[1].local[idx + 1 + r], jp.local[r]]
            ref.step(ref.pseudo_grad(ref.params, locals_))
            assert_params_close(jp.after[r], ref.params)
    finally:
        joiner_comm.close()


# ---------------------------------------------------------------------- known bug


def test_custom_outer_optimizer_moves_the_global_params(
    group: Callable[[int], list[pccl.Communicator]],
) -> None:
    """A custom outer optimizer is a factory of the global parameters, so it moves them."""
    (comm,) = group(1)
    model = make_model(0)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-1)
    diloco = DiLoCo(
        comm,
        model,
        inner,
        sync_every=2,
        outer_optimizer=lambda params: torch.optim.SGD(params, lr=0.7, momentum=0.5),
    )
    before = clone(diloco.global_params)
    for _ in range(4):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        inner.step()
        inner.zero_grad()
        diloco.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, diloco.global_params, strict=True))


def test_default_outer_optimizers(group: Callable[[int], list[pccl.Communicator]]) -> None:
    """DiLoCo defaults to the paper's Nesterov SGD (lr 0.7, momentum 0.9); the delayed
    AsyncDiLoCo to less momentum (lr 0.7, momentum 0.5) with eager restarts, which
    trains where the paper's settings diverged (docs/diloco.md). The instance built
    here gets exactly the class's default."""
    assert (DiLoCo.DEFAULT_OUTER_LR, DiLoCo.DEFAULT_OUTER_MOMENTUM) == (0.7, 0.9)
    assert (AsyncDiLoCo.DEFAULT_OUTER_LR, AsyncDiLoCo.DEFAULT_OUTER_MOMENTUM) == (0.7, 0.5)
    (comm,) = group(1)
    model = make_model(0)
    diloco = AsyncDiLoCo(comm, model, torch.optim.AdamW(model.parameters(), lr=1e-2), sync_every=2)
    group0 = diloco.outer_optimizer.param_groups[0]
    assert isinstance(diloco.outer_optimizer, torch.optim.SGD)
    assert (group0["lr"], group0["momentum"], group0["nesterov"]) == (0.7, 0.5, True)
    assert diloco.eager == 1.0 and diloco.lookahead
    diloco.finish()
