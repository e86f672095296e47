"""The compressed outer step (pccl_py.Compression, pccl_py.optim.codec/exchange), the
eager AsyncDiLoCo and StreamingDiLoCo.

- the codec against a numpy reference of SparseLoCo's step (error feedback, top-k per
  chunk, 2-bit sign/magnitude values), round trips, and the rank-order sum;
- bit-identical decoded sums across 4 peer processes, with one SIGKILLed while they
  exchange: every survivor gets the same rows and the same bytes (the all-gather
  is retried over the survivors);
- DiLoCo / AsyncDiLoCo / StreamingDiLoCo with their options on peers that are threads
  of this process: identical shared state everywhere, against small references.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from engine_harness import EngineRing
from gather_workers import gather_loop_worker, payload_for
from peer_workers import Cluster, checksum
from threads import run_parallel as run_threads
from torch import nn

import pccl_py as pccl
from pccl_py import _native as nat
from pccl_py.errors import Aborted, PeerLost
from pccl_py.optim import AsyncDiLoCo, DiLoCo, StreamingDiLoCo
from pccl_py.optim.codec import Codec, dct_basis, pack_bits, unpack_bits
from pccl_py.optim.exchange import CompressedExchange
from pccl_py.optim.streaming import schedule, split_fragments

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- codec


def reference_step(e: np.ndarray, d: np.ndarray, beta: float, topk: int, chunk: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """SparseLoCo's step in numpy, float32: e = beta e + d; per chunk the top-k |e|;
    values as sign + magnitude level between the chunk's smallest and largest; e -= sent.
    Returns (new e, sent)."""
    e = (np.float32(beta) * e + d).astype(np.float32)
    n = e.size
    chunks = -(-n // chunk)
    padded = np.zeros(chunks * chunk, np.float32)
    padded[:n] = e
    blocks = padded.reshape(chunks, chunk)
    sent = np.zeros_like(blocks)
    levels = (1 << (bits - 1)) - 1
    for c in range(chunks):
        idx = np.argsort(-np.abs(blocks[c]), kind="stable")[:topk]
        v = blocks[c, idx]
        mag = np.abs(v)
        lo, hi = mag.min(), mag.max()
        step = np.float32((hi - lo) / np.float32(levels))
        level = np.clip(np.round((mag - lo) / step), 0, levels) if step > 0 else np.zeros_like(mag)
        dec = (lo + level.astype(np.float32) * step).astype(np.float32)
        sent[c, idx] = np.where(v < 0, -dec, dec)
    sent_flat = sent.reshape(-1)[:n]
    return (e - sent_flat).astype(np.float32), sent_flat


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_feedback_matches_numpy_reference(bits: int) -> None:
    n, chunk, topk, beta = 3000, 256, 8, 0.9  # 3000: the last chunk is partial
    exchange = CompressedExchange(comm=None, numel=n, compression=pccl.Compression(topk, chunk, bits, beta=beta), timeout=None)
    rng = np.random.default_rng(0)
    e_ref = np.zeros(n, np.float32)
    for _ in range(4):
        d = rng.standard_normal(n).astype(np.float32)
        flat = torch.from_numpy(np.append(d, np.float32(1.0)))
        before = exchange.error.clone()
        payload = exchange.encode(flat)
        e_ref, sent_ref = reference_step(e_ref, d, beta, topk, chunk, bits)
        sent, weight = exchange.codec.decode_sum(payload[None, :])
        assert weight == 1.0
        np.testing.assert_allclose(sent.numpy(), sent_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(exchange.error.numpy(), e_ref, rtol=1e-5, atol=1e-5)
        # what was sent plus what is kept is exactly the decayed buffer plus the input
        torch.testing.assert_close(exchange.error + sent, before * beta + torch.from_numpy(d), rtol=0, atol=1e-6)
        assert int((sent != 0).sum()) <= topk * -(-n // chunk)


def test_joiner_contributes_nothing_and_keeps_zero_error() -> None:
    exchange = CompressedExchange(None, 500, pccl.Compression(topk=4, chunk=64), None)
    flat = torch.ones(501)
    flat[-1] = 0.0  # weight 0: no pseudo-gradient
    payload = exchange.encode(flat)
    total, weight = exchange.codec.decode_sum(payload[None, :])
    assert weight == 0.0 and not total.any() and not exchange.error.any()


def test_pack_bits_round_trip() -> None:
    rng = np.random.default_rng(1)
    for width in (1, 2, 3, 7, 12, 17):
        v = rng.integers(0, 1 << width, 1001)
        packed = pack_bits(v, width)
        assert packed.size == (1001 * width + 7) // 8
        assert np.array_equal(unpack_bits(packed, 1001, width), v)


def test_round_trips() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    # float32 values, every entry selected: exact
    codec = Codec(5000, pccl.Compression(topk=64, chunk=64, bits=None))
    payload, sent = codec.encode(x)
    assert torch.equal(sent, x) and payload.size == codec.payload_bytes
    # 8 bits: every value within half a level of itself
    codec = Codec(5000, pccl.Compression(topk=64, chunk=64, bits=8))
    _, sent = codec.encode(x)
    mag = x.abs().view(-1)
    assert (sent - x).abs().max() <= (mag.max() - mag.min()) / 127 / 2 + 1e-6
    assert torch.equal(torch.sign(sent), torch.sign(x))
    # DCT: orthonormal, and with every coefficient kept the inverse gives x back
    basis = dct_basis(64).double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-6)
    codec = Codec(5000, pccl.Compression(topk=64, chunk=64, bits=None, transform="dct", dct_block=64))
    _, sent = codec.encode(x)
    torch.testing.assert_close(sent, x, rtol=0, atol=1e-5)
    # a sparse DCT payload is mostly smaller than the input
    codec = Codec(5000, pccl.Compression(topk=8, chunk=64, bits=2, transform="dct", dct_block=64))
    payload, _ = codec.encode(x)
    assert payload.size * 8 < 5000 * 32 / 10


def test_decode_sum_is_the_rank_order_sum() -> None:
    for spec in (pccl.Compression(topk=16, chunk=128), pccl.Compression(topk=16, chunk=128, transform="dct", dct_block=32)):
        codec = Codec(4000, spec)
        payloads = [payload_for(codec, j, 0) for j in range(4)]
        total, weight = codec.decode_sum(np.stack(payloads))
        assert weight == 4.0
        coeffs = torch.zeros(codec.padded)
        # the same sum, row by row, in the coefficient domain, then one inverse
        for p in payloads:
            codec_one = Codec(4000, pccl.Compression(**{**spec.__dict__, "transform": None}))
            one, _ = codec_one.decode_sum(p[None, :])
            coeffs[:4000] += one
        if spec.transform is None:
            assert torch.equal(total, coeffs[:4000])
        else:
            assert torch.equal(total, codec._inverse(coeffs)[:4000])


def test_compression_validates() -> None:
    for bad in ({"topk": 0}, {"topk": 10, "chunk": 8}, {"bits": 3}, {"transform": "fft"}, {"beta": 1.5}):
        with pytest.raises(ValueError):
            pccl.Compression(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- peer processes


def test_decoded_sum_bit_identical_and_retried_over_survivors() -> None:
    """4 processes all-gather payloads back to back; peer 3 is SIGKILLed after op 2.
    Every op's rows and decoded sum are the same on every peer that reported it, equal
    to the sum of its owners' payloads in rank order; the exchange the kill hit is
    redone over the 3 survivors, who agree on it."""
    world, victim, numel = 4, 3, 1 << 19
    spec = {"topk": 32, "chunk": 128, "bits": 8}
    codec = Codec(numel, pccl.Compression(**spec))
    with pccl.Master() as m, Cluster(
        m.address, gather_loop_worker, world=world, numel=numel, compression=spec, max_ops=200
    ) as c:
        for i in range(world):
            c.start(i)
        c.collect(lambda recs: sum(r.get("event") == "ready" for r in recs) == world, 60, "peers ready")
        c.collect(lambda recs: {r["index"] for r in recs if r.get("op") == 2} == set(range(world)), 40, "op 2")
        c.kill(victim)
        survivors = set(range(world)) - {victim}
        seen = c.collect(lambda recs: {r["index"] for r in recs if r.get("event") == "done"} >= survivors, 40, "done")
    ops: dict[int, list[dict[str, Any]]] = {}
    for r in seen:
        if "op" in r and r["index"] in survivors:
            assert r["ok"], r.get("error")
            ops.setdefault(r["op"], []).append(r)
    last = max(ops)
    assert {r["index"] for r in ops[last]} == survivors
    for op, recs in ops.items():
        assert len({(r["world"], tuple(r["owners"]), r["crc"], r["weight"]) for r in recs}) == 1, recs
    checked = [0, last]
    for op in checked:
        rec = ops[op][0]
        assert sorted(rec["owners"]) == sorted(range(world) if rec["world"] == world else survivors)
        assert rec["weight"] == float(rec["world"])
        assert rec["tx"] == codec.payload_bytes * (rec["world"] - 1)
        rows = np.stack([payload_for(codec, j, op) for j in rec["owners"]])
        assert checksum(codec.decode_sum(rows)[0]) == rec["crc"]
    assert ops[last][0]["world"] == world - 1


@pytest.mark.parametrize("victim_sends", [False, True], ids=["victim_silent", "victim_sending"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_sparse_all_gather_with_a_peer_lost_mid_op_is_bit_identical_on_every_survivor(
    n: int, victim_sends: bool
) -> None:
    """N engines all-gather compressed payloads (278 KiB each, in 4 KiB segments); the
    last rank's engine closes while the others run (N >= 2): either 2 ms after it
    posted too (its rows partly sent: racy on purpose), or 50 ms into the op without
    having posted (the others have exchanged their own rows by then: nobody can
    commit). The survivors agree on the outcome: if any committed, every survivor voted
    and holds every owner's row, byte for byte (the arbiter then declares a success for
    all); otherwise none committed. Retried over the survivors on a
    new ring, every survivor holds the same rows, in rank order, and decodes them to the
    same bytes, equal to the rank-order decode of the survivors' own payloads."""
    numel = 1 << 19
    codec = Codec(numel, pccl.Compression(topk=32, chunk=128, bits=8))
    payloads = [payload_for(codec, r, n) for r in range(n)]
    size = codec.payload_bytes
    victim = n - 1 if n > 1 else None
    with EngineRing(n) as ring:
        outs = [np.zeros(n * size, np.uint8) for _ in range(n)]
        handles = {
            r: ring.engines[r].all_to_all(nat.CollectiveKind.ALL_GATHER, payloads[r], outs[r], nat.DataType.UINT8,
                                          tag=0, seq=1, timeout=30, segment_bytes=4 << 10, vote=True)
            for r in range(n)
            if r != victim or victim_sends
        }
        if victim is not None:
            time.sleep(0.002 if victim_sends else 0.05)
            ring.engines[victim].close()
        survivors = [r for r in range(n) if r != victim]
        committed = []
        for r in survivors:
            assert handles[r].wait(20), f"rank {r} still running"
            try:
                handles[r].result()
                committed.append(r)
            except (PeerLost, Aborted):
                pass
        voted = [r for r in survivors if handles[r].voted]
        if committed:
            # A commit means every survivor voted, i.e. holds every row: the arbiter
            # then declares the op a success for all of them (the Communicator's rule).
            assert voted == survivors, f"committed {committed} but only {voted} of {survivors} voted"
        if victim is not None and not victim_sends:
            assert committed == [] and voted == [], "committed without the victim's row"
        for r in voted:
            assert np.array_equal(outs[r].reshape(n, size), np.stack(payloads)), f"rank {r}: rows"
        if victim is None:
            assert committed == [0]
            assert torch.equal(codec.decode_sum(outs[0].reshape(1, size))[0], codec.decode_sum(payloads[0][None])[0])
            return
        ring_addrs = [ring.addresses[r] for r in survivors]
        m = len(survivors)
        retry_outs = [np.zeros(m * size, np.uint8) for _ in survivors]

        def gather(i: int) -> None:
            r = survivors[i]
            ring.engines[r].set_ring(2, ring_addrs, i, timeout=10.0)
            h = ring.engines[r].all_to_all(nat.CollectiveKind.ALL_GATHER, payloads[r], retry_outs[i],
                                           nat.DataType.UINT8, tag=0, seq=2, timeout=30, segment_bytes=4 << 10,
                                           vote=True)
            h.result()

        outcomes = ring.run(lambda r, e: gather(survivors.index(r)), ranks=survivors, timeout=60)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    want_rows = np.stack([payloads[r] for r in survivors])
    want, weight = codec.decode_sum(want_rows)
    assert weight == float(m)
    for i, r in enumerate(survivors):
        assert np.array_equal(retry_outs[i].reshape(m, size), want_rows), f"rank {r}: retried rows"
    for i in sorted({0, m - 1}):  # the same rows decode to the same bytes (decoding is costly at this size)
        got, _ = codec.decode_sum(retry_outs[i].reshape(m, size))
        assert got.numpy().tobytes() == want.numpy().tobytes(), f"rank {survivors[i]}: decoded sum"


# ---------------------------------------------------------------------- optimisers


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 1))


def train(opt: Any, model: nn.Module, inner: Any, steps: int, seed: int) -> list[Any]:
    """Runs `steps` inner steps; returns the infos of the outer steps."""
    gen = torch.Generator().manual_seed(seed)
    infos = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        ((model(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        info = opt.step()
        if info is not None:
            infos.append((info, opt.state.hashes(), [g.clone() for g in opt.global_params]))
    return infos


def build(cls: type[DiLoCo], comm: Any, seed: int, **kwargs: Any) -> tuple[Any, nn.Module, Any]:
    torch.set_num_threads(1)
    model = make_model(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return cls(comm, model, inner, sync_every=4, timeout=30, **kwargs), model, inner


def parallel(fns: list[Callable[[], Any]]) -> list[Any]:
    out = run_threads(fns, 45.0)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


@pytest.mark.parametrize("cls", [DiLoCo, AsyncDiLoCo], ids=["sync", "async"])
def test_compressed_diloco_identical_state(make_group: Callable[..., list[pccl.Communicator]], cls: type[DiLoCo]) -> None:
    spec = pccl.Compression(topk=8, chunk=256, bits=2)
    comms = make_group(3)
    built = parallel([lambda i=i: build(cls, comms[i], seed=i, compression=spec) for i in range(3)])
    runs = parallel([lambda b=b, i=i: train(*b, steps=12, seed=100 + i) for i, b in enumerate(built)])
    for step in range(3):
        infos = [r[step][0] for r in runs]
        assert len({tuple(r[step][1].items()) for r in runs}) == 1  # same shared-state bytes
        assert all(i.world_size == 3 for i in infos[1 if cls is AsyncDiLoCo else 0 :])
    numel = sum(p.numel() for p in built[0][1].parameters())
    payload = Codec(numel, spec).payload_bytes
    assert runs[0][-1][0].tx_bytes == payload * 2  # what an all-gather of 3 sends
    errors = [b[0].error_feedback for b in built]
    assert all(e is not None and e.any() for e in errors)
    assert not torch.equal(errors[0], errors[1])  # peer-local
    assert "error" not in " ".join(built[0][0].state.hashes())
    if cls is AsyncDiLoCo:
        parallel([lambda b=b: b[0].finish() for b in built])
        assert len({tuple(b[0].state.hashes().items()) for b in built}) == 1


def test_compressed_outer_step_applies_the_decoded_average(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """Two peers, outer SGD lr 1 without momentum, average="peers", one outer step
    from zero error feedback: each peer sent sent_i = pg_i - e_i, and the global
    parameters move by exactly the average of the two (every peer computes it from the
    same rows)."""
    spec = pccl.Compression(topk=16, chunk=64, bits=4, beta=0.5, average="peers")
    comms = make_group(2)
    sgd = {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=1.0)}
    built = parallel([lambda i=i: build(DiLoCo, comms[i], seed=i, compression=spec, **sgd) for i in range(2)])
    before = torch.cat([g.reshape(-1) for g in built[0][0].global_params])

    def one_round(b: Any, seed: int) -> torch.Tensor:
        d, model, inner = b
        train(d, model, inner, steps=3, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(16, 6, generator=gen)
        ((model(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        local = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert d.step() is not None
        return before - local

    pgs = parallel([lambda b=b, i=i: one_round(b, 11 * i) for i, b in enumerate(built)])
    sent = [pg - b[0].error_feedback for pg, b in zip(pgs, built, strict=True)]
    after = torch.cat([g.reshape(-1) for g in built[0][0].global_params])
    torch.testing.assert_close(after, before - (sent[0] + sent[1]) / 2, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(built[0][0].global_params, built[1][0].global_params, strict=True))
    assert 0 < int((sent[0] != 0).sum()) <= 16 * -(-before.numel() // 64)


def test_eager_async_one_peer(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """World of one, outer SGD lr 1 without momentum, eager 1: the global parameters
    trail the local ones by exactly one round, and the local model runs on from where
    its inner steps left it (local SGD, bit for bit up to the float rounding of
    G - (start - local))."""
    (comm,) = make_group(1)
    sgd = {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=1.0)}
    d, model, inner = build(AsyncDiLoCo, comm, seed=0, **sgd)
    assert d.eager == 1.0
    twin = make_model(0)
    twin_inner = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    g_hist = []
    for _ in range(3 * 4):
        for m, opt, gen in ((model, inner, gen_a), (twin, twin_inner, gen_b)):
            x = torch.randn(16, 6, generator=gen)
            ((m(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if d.step() is not None:
            g_hist.append([g.clone() for g in d.global_params])
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    d.finish()
    for p, q in zip(d.global_params, twin.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-5)


def test_streaming_fragments_and_schedule() -> None:
    sizes = [5, 100, 7, 300, 1, 87]
    frags = split_fragments(sizes, 4)
    assert [sum(c - a for _, a, c in f) for f in frags] == [125, 125, 125, 125]
    flat = [(i, k) for f in frags for i, a, c in f for k in range(a, c)]
    assert flat == [(i, k) for i, n in enumerate(sizes) for k in range(n)]  # in order, each element once
    assert schedule(50, 4, 2) == [(10, 12), (23, 25), (36, 38), (48, 50)]
    with pytest.raises(ValueError):
        schedule(8, 4, 2)


def test_streaming_identical_state_and_fragment_bytes(make_group: Callable[..., list[pccl.Communicator]], master: pccl.Master) -> None:
    comms = make_group(2)
    built = parallel([lambda i=i: build(StreamingDiLoCo, comms[i], seed=i, fragments=2, delay=1) for i in range(2)])
    d = built[0][0]
    numel = sum(p.numel() for p in built[0][1].parameters())
    assert [sum(c - a for _, a, c in f) for f in d.fragments] == [numel // 2, numel - numel // 2]
    runs = parallel([lambda b=b, i=i: train(*b, steps=12, seed=3 + i) for i, b in enumerate(built)])
    assert [len(r) for r in runs] == [3, 3]
    for k in range(3):
        assert runs[0][k][1] == runs[1][k][1]
        info = runs[0][k][0]
        assert info.outer_step == k + 1 and info.world_size == 2
        assert 0 < info.peak_tx_bytes < info.tx_bytes  # one fragment's exchange, of two per cycle
    before = [g.clone() for g in runs[0][0][2]]
    assert not all(torch.equal(a, b) for a, b in zip(before, runs[0][2][2], strict=True))
    # a joiner at a cycle's end gets the same bytes and stays identical
    joiner = pccl.Communicator(master.address, name="joiner")
    try:
        out: dict[str, Any] = {}

        def founder(b: Any, seed: int) -> list[Any]:
            deadline = time.monotonic() + 20
            while b[0].comm.world_size < 3 and time.monotonic() < deadline:
                train(*b, steps=4, seed=seed)
            return train(*b, steps=8, seed=seed + 1)

        def join() -> None:
            joiner.connect(timeout=20)
            jb = build(StreamingDiLoCo, joiner, seed=9, fragments=2, delay=1)
            out["synced"] = jb[0].state.hashes()
            out["runs"] = train(*jb, steps=8, seed=50)

        res = parallel([lambda: founder(built[0], 60), lambda: founder(built[1], 70), join])
        assert [r[1] for r in out["runs"]] == [r[1] for r in res[0]] == [r[1] for r in res[1]]
    finally:
        joiner.close()


class _FakeGatherComm:
    """A Communicator stand-in with an all_gather: rows = the given payloads with this
    peer's own at `rank`."""

    def __init__(self, others: list[np.ndarray], rank: int) -> None:
        self.others, self.rank = others, rank

    def all_gather(self, x: np.ndarray, tag: Any = None, timeout: Any = None, retry: bool = False) -> Any:
        rows = [*self.others[: self.rank], x, *self.others[self.rank :]]

        class Info:
            output = np.stack(rows)
            world_size = len(rows)
            tx_bytes = x.size * (len(rows) - 1)

        return Info()


def test_average_over_senders() -> None:
    """average="senders": each entry of the sum is divided by the number of peers that
    sent it (a joiner's weight-0 row counts for nothing), not by the number of peers."""
    spec = pccl.Compression(topk=4, chunk=64, bits=None, average="senders")
    codec = Codec(640, spec)
    other = payload_for(codec, 1, 0)
    joiner = np.zeros(codec.payload_bytes, np.uint8)
    exchange = CompressedExchange(_FakeGatherComm([other, joiner], rank=0), 640, spec, None)
    flat = torch.zeros(641)
    flat[:640] = torch.randn(640, generator=torch.Generator().manual_seed(3))
    flat[640] = 1.0
    mine_x = flat[:640].clone()
    info = exchange.run(flat)
    assert info.world_size == 3 and float(flat[640]) == 1.0
    mine = Codec(640, spec).encode(mine_x)[1]
    theirs = codec.decode_sum(other[None, :])[0]
    both = (mine != 0) & (theirs != 0)
    one = (mine != 0) ^ (theirs != 0)
    assert torch.equal(flat[:640][both], (mine + theirs)[both] / 2)
    assert torch.equal(flat[:640][one], (mine + theirs)[one])
    assert not flat[:640][~(both | one)].any()


def test_keep_residual_one_peer_continues_locally(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """keep_residual, world of one, outer SGD lr 1, beta 1: the local model restarts
    from G - e, which is where its inner steps left it (what was sent moved G, the rest
    is still in e), while G moved by what was sent only. (With beta < 1 the restart
    drops (1 - beta) of the previous residual.)"""
    (comm,) = make_group(1)
    spec = pccl.Compression(topk=4, chunk=256, bits=2, keep_residual=True, beta=1.0)
    d, model, inner = build(DiLoCo, comm, seed=0, compression=spec, outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    for r in range(3):
        train(d, model, inner, steps=3, seed=r)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(40 + r))
        ((model(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        local = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert d.step() is not None
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after, local, rtol=0, atol=1e-6)
        g = torch.cat([p.reshape(-1) for p in d.global_params])
        assert d.error_feedback is not None
        torch.testing.assert_close(g - d.error_feedback, local, rtol=0, atol=1e-6)
        assert not torch.equal(g, local)


def test_compressed_default_outer_optimizer(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """With compression and no outer optimizer given: SGD, lr 1, no momentum (SparseLoCo)."""
    (comm,) = make_group(1)
    d, _, _ = build(DiLoCo, comm, seed=0, compression=pccl.Compression(topk=4, chunk=64))
    group0 = d.outer_optimizer.param_groups[0]
    assert isinstance(d.outer_optimizer, torch.optim.SGD)
    assert (group0["lr"], group0["momentum"]) == (DiLoCo.COMPRESSED_OUTER_LR, DiLoCo.COMPRESSED_OUTER_MOMENTUM) == (1.0, 0.0)


def test_average_over_senders_with_dct() -> None:
    """With the DCT the entries counted are coefficients: the division comes before
    the inverse transform."""
    spec = pccl.Compression(topk=8, chunk=64, bits=None, transform="dct", dct_block=64, average="senders")
    codec = Codec(640, spec)
    rows = np.stack([payload_for(codec, j, 0) for j in range(3)])
    total, weight = codec.decode_sum(rows, over_senders=True)
    assert weight == 1.0
    plain = Codec(640, pccl.Compression(topk=8, chunk=64, bits=None))
    coeffs = plain.decode_sum(rows)[0]
    counts = torch.zeros(640)
    for row in rows:
        counts += (plain.decode_sum(row[None, :])[0] != 0).float()
    assert torch.equal(total, codec._inverse(coeffs / torch.clamp(counts, min=1.0)))


@pytest.mark.parametrize("cls", [DiLoCo, AsyncDiLoCo], ids=["sync", "async"])
def test_compressed_joiner_stays_identical(
    make_group: Callable[..., list[pccl.Communicator]], master: pccl.Master, cls: type[DiLoCo]
) -> None:
    """A joiner of a compressed group receives the shared state (its error feedback
    starts at zeros; AsyncDiLoCo: it sends a weight-0 payload in the round in flight)
    and holds the same bytes as the founders at every later outer step."""
    spec = pccl.Compression(topk=8, chunk=256, bits=2)
    comms = make_group(2)
    built = parallel([lambda i=i: build(cls, comms[i], seed=i, compression=spec) for i in range(2)])
    parallel([lambda b=b, i=i: train(*b, steps=8, seed=i) for i, b in enumerate(built)])
    joiner = pccl.Communicator(master.address, name="joiner")
    out: dict[str, Any] = {}
    try:

        def founder(b: Any, seed: int) -> list[Any]:
            deadline = time.monotonic() + 20
            while b[0].comm.world_size < 3 and time.monotonic() < deadline:
                train(*b, steps=4, seed=seed)
            runs = train(*b, steps=8, seed=seed + 1)
            if cls is AsyncDiLoCo:
                b[0].finish()
            return runs

        def join() -> None:
            joiner.connect(timeout=20)
            jb = build(cls, joiner, seed=9, compression=spec)
            assert jb[0].error_feedback is not None and not jb[0].error_feedback.any()
            out["runs"] = train(*jb, steps=8, seed=50)
            if cls is AsyncDiLoCo:
                jb[0].finish()
            out["final"] = jb[0].state.hashes()

        res = parallel([lambda: founder(built[0], 60), lambda: founder(built[1], 70), join])
        assert [r[1] for r in out["runs"]] == [r[1] for r in res[0][-2:]] == [r[1] for r in res[1][-2:]]
        assert out["final"] == built[0][0].state.hashes() == built[1][0].state.hashes()
        assert [r[0].world_size for r in out["runs"]] == [3, 3]
    finally:
        joiner.close()


def test_async_lookahead_restart(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """AsyncDiLoCo's restart with the defaults (eager 1, lookahead, Nesterov lr 0.7 /
    momentum 0.5): local = G - P - lr * m^2 * buf, with P the round just finished and
    buf the outer momentum after the update applied at this outer step."""
    (comm,) = make_group(1)
    d, model, inner = build(AsyncDiLoCo, comm, seed=0, apply_on_arrival=False)
    group0 = d.outer_optimizer.param_groups[0]
    lr, m = group0["lr"], group0["momentum"]
    assert d.lookahead and d.eager == 1.0 and group0["nesterov"]
    for r in range(3):
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        train(d, model, inner, steps=3, seed=r)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(40 + r))
        ((model(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        pg = start - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert d.step() is not None
        g = torch.cat([p.reshape(-1) for p in d.global_params])
        buf = torch.cat([d.outer_optimizer.state[p]["momentum_buffer"].reshape(-1) for p in d.global_params])
        local = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(local, g - pg - lr * m * m * buf, rtol=0, atol=1e-6)
        assert (r == 0) == (not buf.any())  # nothing applied yet after the first round
    d.finish()


def test_async_applies_the_average_when_it_arrives(make_group: Callable[..., list[pccl.Communicator]]) -> None:
    """apply_on_arrival (the default): once the exchange in flight has ended, poll()
    (which step() calls after every inner step) steps G with its average at once and
    moves the local model by (new G - where the round started), keeping the inner steps
    taken since; the round's pseudo-gradient is then measured from the new G. The outer
    step count moves only at the round's end. World of one, outer SGD lr 0.5 (no
    momentum, so no lookahead), eager 1."""
    (comm,) = make_group(1)
    d, model, inner = build(AsyncDiLoCo, comm, seed=0, outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    assert d.apply_on_arrival

    def flat(ts: Any) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in ts])

    def inner_step(seed: int) -> None:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))
        ((model(x) - torch.sin(x.sum(1, keepdim=True))) ** 2).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)

    def poll_until_applied() -> None:
        deadline = time.monotonic() + 10
        while not d.poll():
            assert time.monotonic() < deadline, "the exchange never ended"
            time.sleep(0.005)

    g0 = flat(d.global_params)
    for k in range(3):
        inner_step(k)
        assert d.step() is None
    inner_step(3)
    end1 = flat(model.parameters())
    assert d.step() is not None  # round 1 ends; its exchange starts
    assert d.pending_update and d.outer_steps == 0
    start = flat(model.parameters())  # the eager guess: G0 - P1 = end1
    torch.testing.assert_close(start, end1, rtol=0, atol=1e-6)

    inner_step(10)  # an inner step of round 2 taken from the eager guess
    before = flat(model.parameters())
    poll_until_applied()
    g1 = flat(d.global_params)
    torch.testing.assert_close(g1, g0 - 0.5 * (g0 - end1), rtol=0, atol=1e-6)  # round 1's average, lr 0.5
    torch.testing.assert_close(flat(model.parameters()), before + (g1 - start), rtol=0, atol=1e-6)
    assert not d.pending_update and d.outer_steps == 0 and d.arrived_at == 0
    assert not d.poll()  # nothing in flight any more

    assert d.step() is None  # counts inner step 1 of round 2
    for k in range(11, 13):
        inner_step(k)
        assert d.step() is None
    inner_step(13)
    end2 = flat(model.parameters())
    assert d.step() is not None  # round 2 ends: the update applied mid-round is counted now
    assert d.outer_steps == 1
    torch.testing.assert_close(flat(d.global_params), g1, rtol=0, atol=0)  # nothing new applied yet
    poll_until_applied()
    # Round 2's pseudo-gradient was measured from G1, where the round was moved to.
    torch.testing.assert_close(flat(d.global_params), g1 - 0.5 * (g1 - end2), rtol=0, atol=1e-6)
    d.finish()
    assert d.outer_steps == 2
    torch.testing.assert_close(flat(model.parameters()), flat(d.global_params), rtol=0, atol=0)
