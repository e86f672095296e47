"""The all-to-all all-gather, reduce-scatter and broadcast of the native engine
(Engine.all_to_all; native/include/pccl/all_gather.hpp, reduce_scatter.hpp,
broadcast.hpp): direct exchanges between every pair of peers and an all-to-all commit
vote, as the direct all-reduces.

- Results: N = 1..8, element counts of 0, 1, fewer than N, not divisible by N, several
  segments, every dtype somewhere: every peer's result is exact (all-gather: the inputs
  in rank order; reduce-scatter: chunk r of the rank-order reduction, bit-identical to
  the rsag all-reduce's chunk r; broadcast: the root's bytes), inputs never written.
- Bytes: all-gather and reduce-scatter move (N-1)/N of the full buffer per peer each
  way; a broadcast's root sends the buffer once (scatter mode), N-1 times (direct).
- Failures: a peer whose engine closes before it posts or in the middle of a large op
  makes every other peer fail with a typed error, unvoted (or, mid-op, with an agreed
  outcome), inputs intact; a retry over the survivors is exact. Peers in different
  collectives (or an all-reduce) at the same step fail with ProtocolError, nobody votes.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from engine_harness import DTYPES, OPS, EngineRing, chunk_bounds, describe, finalize_avg, make_data, mismatch_report, reduce_step

from pccl_py import _native as nat
from pccl_py.errors import Aborted, PcclError, PeerLost, ProtocolError

pytestmark = pytest.mark.timeout(120)

AG = nat.CollectiveKind.ALL_GATHER
RS = nat.CollectiveKind.REDUCE_SCATTER
BC = nat.CollectiveKind.BROADCAST
BCD = nat.CollectiveKind.BROADCAST_DIRECT
NS = [1, 2, 3, 4, 5, 6, 7, 8]
DTYPE_NAMES = list(DTYPES)
OP_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def rings():
    cache: dict[int, EngineRing] = {}

    def get(n: int) -> EngineRing:
        ring = cache.get(n)
        if ring is None or ring.closed or ring.tainted:
            if ring is not None:
                ring.close()
            ring = cache[n] = EngineRing(n)
        return ring

    yield get
    for ring in cache.values():
        ring.close()


def rank_order_reduction(inputs: Sequence[np.ndarray], dtype_name: str, op: str) -> np.ndarray:
    kind = DTYPES[dtype_name][2]
    acc = inputs[0].reshape(-1).copy()
    for x in inputs[1:]:
        acc = reduce_step(kind, op, acc, x.reshape(-1))
    return finalize_avg(kind, acc, len(inputs)) if op == "AVG" else acc


def output_for(kind: Any, x: np.ndarray, n: int, rank: int) -> np.ndarray:
    if kind == AG:
        return np.full(n * x.nbytes, 0x5A, np.uint8).view(x.dtype)
    if kind == RS:
        b = chunk_bounds(x.size, n)
        return np.full((b[rank + 1] - b[rank]) * x.itemsize, 0x5A, np.uint8).view(x.dtype)
    return x  # broadcast: in place


def run_kind(
    ring: EngineRing,
    kind: Any,
    data: Sequence[np.ndarray],
    dtype_name: str,
    *,
    op: str = "SUM",
    root: int = 0,
    segment_bytes: int = 0,
    ranks: Sequence[int] | None = None,
    seq: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
    """One op of `kind` on every rank (or `ranks`, ring positions 0..len-1 of the ring
    installed): returns (inputs as left, outputs, (tx, rx) per rank)."""
    ranks = list(range(ring.n)) if ranks is None else list(ranks)
    n = len(ranks)
    native = DTYPES[dtype_name][0]
    seq = ring.next_seq(0) if seq is None else seq
    bufs = [d.copy() for d in data]
    outs = [output_for(kind, bufs[i], n, i) for i in range(n)]

    def fn(i: int) -> tuple[int, int]:
        h = ring.engines[ranks[i]].all_to_all(
            kind, bufs[i], outs[i], native, OPS[op], tag=0, seq=seq, timeout=OP_TIMEOUT, segment_bytes=segment_bytes,
            vote=True, root=root,
        )
        h.result()
        assert h.voted
        return h.tx_bytes, h.rx_bytes

    outcomes = ring.run(lambda r, e: fn(ranks.index(r)), ranks=ranks, timeout=OP_TIMEOUT + 20)
    assert all(o.ok for o in outcomes), describe(outcomes)
    return bufs, outs, [o.value for o in sorted(outcomes, key=lambda o: o.rank)]


def counts_for(n: int) -> list[int]:
    return [0, 1, max(1, n - 1), 37 * n + 5, 1000 + n]


# ---------------------------------------------------------------- results


@pytest.mark.parametrize("n", NS)
def test_all_gather_gives_every_peer_the_inputs_in_rank_order(rings, n: int) -> None:
    ring = rings(n)
    for i, count in enumerate(counts_for(n)):
        dtype_name = DTYPE_NAMES[(n + i) % len(DTYPE_NAMES)]
        rng = np.random.default_rng(zlib.crc32(f"ag-{n}-{count}".encode()))
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        bufs, outs, bytes_moved = run_kind(ring, AG, data, dtype_name, segment_bytes=24 if i % 2 else 0)
        want = np.concatenate([d.reshape(-1) for d in data]) if count else np.zeros(0, data[0].dtype)
        nbytes = data[0].nbytes
        for r in range(n):
            assert mismatch_report(outs[r], want) == "", f"N={n} count={count} {dtype_name}: rank {r}"
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input written"
            assert bytes_moved[r] == ((n - 1) * nbytes, (n - 1) * nbytes), (r, bytes_moved[r])


@pytest.mark.parametrize("n", NS)
def test_reduce_scatter_gives_rank_r_chunk_r_of_the_rank_order_reduction(rings, n: int) -> None:
    ring = rings(n)
    for i, count in enumerate(counts_for(n)):
        dtype_name = DTYPE_NAMES[(2 * n + i) % len(DTYPE_NAMES)]
        op = list(OPS)[(n + i) % len(OPS)]
        rng = np.random.default_rng(zlib.crc32(f"rs-{n}-{count}".encode()))
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        bufs, outs, bytes_moved = run_kind(ring, RS, data, dtype_name, op=op, segment_bytes=24 if i % 2 else 0)
        want = rank_order_reduction(data, dtype_name, op)
        b = chunk_bounds(count, n)
        size = data[0].itemsize
        for r in range(n):
            what = f"N={n} count={count} {dtype_name} {op}: rank {r}"
            assert mismatch_report(outs[r], want[b[r]:b[r + 1]]) == "", what
            assert mismatch_report(bufs[r], data[r]) == "", f"{what}: input written"
            own = (b[r + 1] - b[r]) * size
            assert bytes_moved[r] == (count * size - own, (n - 1) * own), (what, bytes_moved[r])


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_reduce_scatter_is_bit_identical_to_the_rsag_all_reduce(rings, dtype_name: str) -> None:
    """Both reduce rank c's chunk in rank order: reduce-scatter + all-gather of the
    chunks gives exactly what the rsag all-reduce gives."""
    n, count = 5, 10_007
    ring = rings(n)
    rng = np.random.default_rng(zlib.crc32(f"rs-vs-rsag-{dtype_name}".encode()))
    data = [make_data(dtype_name, count, rng) for _ in range(n)]
    for op in ("SUM", "AVG", "PROD"):
        _, chunks, _ = run_kind(ring, RS, data, dtype_name, op=op, segment_bytes=1000)
        seq = ring.next_seq(0)
        outs = [np.empty_like(d) for d in data]

        def fn(r: int, e: nat.Engine) -> None:
            e.all_reduce(data[r], outs[r], DTYPES[dtype_name][0], OPS[op], tag=0, seq=seq, timeout=OP_TIMEOUT,
                         vote=True, algorithm=nat.AllReduceAlgorithm.DIRECT_RSAG).result()

        ring.run_ok(fn)
        assert mismatch_report(np.concatenate(chunks), outs[0]) == "", op


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind", [BC, BCD], ids=["scatter", "direct"])
def test_broadcast_gives_every_peer_the_roots_bytes(rings, n: int, kind: Any) -> None:
    ring = rings(n)
    for i, count in enumerate(counts_for(n)):
        root = (i * 3) % n
        dtype_name = DTYPE_NAMES[(3 * n + i) % len(DTYPE_NAMES)]
        rng = np.random.default_rng(zlib.crc32(f"bc-{n}-{count}".encode()))
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        bufs, outs, bytes_moved = run_kind(ring, kind, data, dtype_name, root=root, segment_bytes=24 if i % 2 else 0)
        nbytes = data[0].nbytes
        for r in range(n):
            assert mismatch_report(outs[r], data[root]) == "", f"N={n} count={count} root={root}: rank {r}"
        if n == 1:
            continue
        # The root sends the buffer once (scatter) or to every peer (direct); every other
        # peer receives it once.
        assert bytes_moved[root] == ((n - 1) * nbytes if kind == BCD else nbytes, 0), bytes_moved
        for r in range(n):
            if r != root:
                assert bytes_moved[r][1] == nbytes, (r, bytes_moved)


def test_broadcast_out_of_place_on_the_root_and_the_others(rings) -> None:
    n, count = 3, 5001
    ring = rings(n)
    data = [np.arange(count, dtype=np.int32) * (r + 1) for r in range(n)]
    outs = [np.zeros(count, np.int32) for _ in range(n)]
    seq = ring.next_seq(0)

    def fn(r: int, e: nat.Engine) -> None:
        e.all_to_all(BC, data[r], outs[r], nat.DataType.INT32, tag=0, seq=seq, timeout=OP_TIMEOUT, vote=True,
                     root=1).result()

    ring.run_ok(fn)
    for r in range(n):
        assert (outs[r] == data[1]).all(), r
        assert (data[r] == np.arange(count, dtype=np.int32) * (r + 1)).all(), r


def test_all_gather_input_may_be_its_own_row_of_the_output(rings) -> None:
    n, count = 4, 333
    ring = rings(n)
    outs = [np.zeros((n, count), np.float64) for _ in range(n)]
    for r in range(n):
        outs[r][r] = r + 0.5
    seq = ring.next_seq(0)

    def fn(r: int, e: nat.Engine) -> None:
        e.all_to_all(AG, outs[r][r], outs[r], nat.DataType.FLOAT64, tag=0, seq=seq, timeout=OP_TIMEOUT,
                     vote=True).result()

    ring.run_ok(fn)
    want = np.repeat(np.arange(n) + 0.5, count).reshape(n, count)
    for r in range(n):
        assert (outs[r] == want).all(), r


def test_bad_buffers_are_refused(rings) -> None:
    e = rings(3).engines[0]
    x = np.ones(10, np.float32)
    with pytest.raises(PcclError, match="output holds"):
        e.all_to_all(AG, x, np.empty(20, np.float32), nat.DataType.FLOAT32)
    with pytest.raises(PcclError, match="output holds"):
        e.all_to_all(RS, x, np.empty(3, np.float32), nat.DataType.FLOAT32)  # rank 0's chunk is 4
    with pytest.raises(PcclError, match="out of place"):
        e.all_to_all(RS, x, x[:4], nat.DataType.FLOAT32)
    with pytest.raises(PcclError, match="root"):
        e.all_to_all(BC, x, x, nat.DataType.FLOAT32, root=3)


def test_back_to_back_kinds_on_one_tag_and_two_tags_at_once(rings) -> None:
    n, rounds = 4, 10
    ring = rings(n)
    seqs = [[ring.next_seq(t) for _ in range(3 * rounds)] for t in range(2)]

    def fn(r: int, e: nat.Engine) -> None:
        for i in range(rounds):
            for j, kind in enumerate((AG, RS, BC)):
                x = [np.full(101 + t, float(r + i + t), np.float32) for t in range(2)]
                outs = [output_for(kind, x[t], n, r) for t in range(2)]
                hs = [e.all_to_all(kind, x[t], outs[t], nat.DataType.FLOAT32, tag=t, seq=seqs[t][3 * i + j],
                                   timeout=OP_TIMEOUT, vote=True, segment_bytes=64, root=i % n) for t in range(2)]
                for h in hs:
                    h.result()
                for t in range(2):
                    if kind == AG:
                        assert (outs[t].reshape(n, -1) == (np.arange(n) + i + t)[:, None]).all()
                    elif kind == RS:
                        assert (outs[t] == sum(q + i + t for q in range(n))).all()
                    else:
                        assert (outs[t] == i % n + i + t).all()

    ring.run_ok(fn, timeout=60)


# ---------------------------------------------------------------- failures and retry


def fresh_output(kind: Any, x: np.ndarray, n: int, rank: int) -> np.ndarray:
    return output_for(kind, x, n, rank) if kind != BC else np.zeros_like(x)


@pytest.mark.parametrize("kind", [AG, RS, BC], ids=["all_gather", "reduce_scatter", "broadcast"])
def test_a_peer_lost_before_it_posts_fails_every_other_and_a_retry_over_the_survivors_succeeds(kind: Any) -> None:
    n, victim, count = 5, 3, 20_001
    rng = np.random.default_rng(5)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        outs = [fresh_output(kind, bufs[r], n, r) for r in range(n)]
        handles = {
            r: ring.engines[r].all_to_all(kind, bufs[r], outs[r], nat.DataType.FLOAT32, tag=0, seq=1, timeout=20,
                                          segment_bytes=4096, vote=True)
            for r in range(n) if r != victim
        }
        time.sleep(0.1)
        assert not any(h.done() for r, h in handles.items() if r != 0 or kind != BC), "ended without the victim"
        t0 = time.monotonic()
        ring.engines[victim].close()
        for r, h in handles.items():
            assert h.wait(5), f"rank {r} still running"
            assert time.monotonic() - t0 < 2.0, f"rank {r} failed only after {time.monotonic() - t0:.2f}s"
            with pytest.raises(PcclError) as info:
                h.result()
            assert isinstance(info.value, (PeerLost, Aborted)), repr(info.value)
            assert h.voted is (kind == BC and r == 0), f"rank {r}: voted={h.voted}"
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed"
        survivors = [r for r in range(n) if r != victim]
        new_ring = [ring.addresses[r] for r in survivors]
        for pos, r in enumerate(survivors):
            ring.engines[r].set_ring(2, new_ring, pos, timeout=10.0)
        _, outs2, _ = run_kind(ring, kind, [data[r] for r in survivors], "float32", ranks=survivors, seq=2,
                               segment_bytes=4096)
        m = len(survivors)
        b = chunk_bounds(count, m)
        for i, r in enumerate(survivors):
            if kind == AG:
                want = np.concatenate([data[q] for q in survivors])
            elif kind == RS:
                want = rank_order_reduction([data[q] for q in survivors], "float32", "SUM")[b[i]:b[i + 1]]
            else:
                want = data[survivors[0]]
            assert mismatch_report(outs2[i], want) == "", f"retry: rank {r}"


@pytest.mark.parametrize("kind", [AG, RS, BC], ids=["all_gather", "reduce_scatter", "broadcast"])
def test_a_peer_closed_in_the_middle_of_a_large_op_gives_an_agreed_outcome(kind: Any) -> None:
    """4 peers, 32 MiB in 16 KiB segments; rank 2's engine closes while the op runs.
    If any survivor committed, every survivor voted (the arbiter declares a success);
    otherwise nobody committed. Inputs are intact either way."""
    n, victim, count = 4, 2, 8 << 20
    rng = np.random.default_rng(13)
    data = [rng.standard_normal(count, dtype=np.float32) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        outs = [fresh_output(kind, bufs[r], n, r) for r in range(n)]
        handles = [
            ring.engines[r].all_to_all(kind, bufs[r], outs[r], nat.DataType.FLOAT32, tag=0, seq=1, timeout=30,
                                       segment_bytes=16 << 10, vote=True)
            for r in range(n)
        ]
        time.sleep(0.02)
        ring.engines[victim].close()
        states = []
        for r, h in enumerate(handles):
            if r == victim:
                continue
            assert h.wait(20), f"rank {r} still running"
            try:
                h.result()
                states.append("committed")
            except (PeerLost, Aborted) as e:
                states.append(f"failed: {type(e).__name__}")
        voted = [h.voted for r, h in enumerate(handles) if r != victim]
        if "committed" in states:
            assert all(voted), (states, voted)
        for r in range(n):
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed ({states})"


@pytest.mark.parametrize(
    "odd",
    [
        {"kind": RS},
        {"kind": AG},
        {"kind": BCD},
        {"all_reduce": nat.AllReduceAlgorithm.DIRECT_RSAG},
        {"all_reduce": nat.AllReduceAlgorithm.DIRECT},
        {"root": 1},
        {"dtype": nat.DataType.INT32},
    ],
    ids=["reduce_scatter", "all_gather", "broadcast_direct", "rsag", "direct", "root", "dtype"],
)
def test_peers_in_different_collectives_fail_with_protocol_error(odd: dict) -> None:
    """The others run a broadcast (root 0) of 4000 float32 at step 1; rank 1 runs
    another collective, an all-reduce or another root or dtype there. Every peer fails
    fast (ProtocolError, or PeerLost where a neighbour's failure spread first), nobody
    votes, inputs intact."""
    n, count = 4, 4000
    rng = np.random.default_rng(9)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    roots = [d.copy() for d in data]
    with EngineRing(n) as ring:

        def fn(r: int, e: nat.Engine) -> bool:
            kind, dtype, root = BC, nat.DataType.FLOAT32, 0
            if r == 1:
                kind, dtype, root = odd.get("kind", kind), odd.get("dtype", dtype), odd.get("root", root)
                time.sleep(0.1)  # the others' frames wait for it
                if "all_reduce" in odd:
                    h = e.all_reduce(bufs[r], np.empty_like(bufs[r]), dtype, nat.ReduceOp.SUM, tag=0, seq=1,
                                     timeout=5.0, vote=True, algorithm=odd["all_reduce"])
                    try:
                        h.result()
                    finally:
                        assert not h.voted
                    return True
            out = fresh_output(kind, bufs[r], n, r) if r == 1 or kind != BC else bufs[r]
            h = e.all_to_all(kind, bufs[r], out, dtype, tag=0, seq=1, timeout=5.0, vote=True, root=root)
            try:
                h.result()
            finally:
                assert not h.voted or r == root
            return True

        outcomes = ring.run(fn, timeout=30)
    report = describe(outcomes)
    for o in outcomes:
        assert isinstance(o.error, (ProtocolError, PeerLost)), report
        assert o.elapsed < 3.0, report
    assert any(isinstance(o.error, ProtocolError) for o in outcomes), report
    # Rank 0 is the others' root, rank 1 ran out of place: both buffers are inputs.
    for r in (0, 1):
        assert mismatch_report(bufs[r], roots[r]) == "", f"rank {r}: input changed"


def test_concurrent_ops_of_every_kind_on_distinct_tags(rings) -> None:
    """An all-gather, a reduce-scatter, a broadcast and an all-reduce in flight at once."""
    n = 3
    ring = rings(n)
    seqs = [ring.next_seq(t) for t in range(4)]
    results: list[Any] = [None] * n
    lock = threading.Lock()

    def fn(r: int, e: nat.Engine) -> None:
        x = np.full(1 << 16, r + 1, np.int64)
        ag, rs, bc, ar = np.empty(n << 16, np.int64), output_for(RS, x, n, r), x.copy(), np.empty_like(x)
        hs = [
            e.all_to_all(AG, x, ag, nat.DataType.INT64, tag=0, seq=seqs[0], timeout=OP_TIMEOUT, vote=True),
            e.all_to_all(RS, x, rs, nat.DataType.INT64, tag=1, seq=seqs[1], timeout=OP_TIMEOUT, vote=True),
            e.all_to_all(BC, bc, bc, nat.DataType.INT64, tag=2, seq=seqs[2], timeout=OP_TIMEOUT, vote=True, root=2),
            e.all_reduce(x, ar, nat.DataType.INT64, nat.ReduceOp.SUM, tag=3, seq=seqs[3], timeout=OP_TIMEOUT, vote=True),
        ]
        for h in hs:
            h.result()
        with lock:
            results[r] = (ag, rs, bc, ar)

    ring.run_ok(fn)
    for r, (ag, rs, bc, ar) in enumerate(results):
        assert (ag.reshape(n, -1) == (np.arange(n) + 1)[:, None]).all()
        assert (rs == 6).all() and (ar == 6).all() and (bc == 3).all(), r
