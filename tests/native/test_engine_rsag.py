"""The direct reduce-scatter + all-gather all-reduce of the native engine
(AllReduceAlgorithm.DIRECT_RSAG, native/include/pccl/allreduce_direct_rsag.hpp): rank c
owns chunk c, every peer sends chunk c straight to rank c, which reduces the N
contributions in rank order and sends the result to every other peer; the commit vote
goes all-to-all.

- Results: every dtype x operator, N = 1..8, odd element counts (fewer than the peers
  too), in place and out of place, several segments and connections: bit-identical on
  every peer, equal to the rank-order reference (x_0 op x_1 op ... op x_{N-1}, one
  rounded step at a time, as the DIRECT algorithm computes it), and for integers equal
  to the ring's result too; the ring's bytes on the wire.
- The vote: a withheld vote leaves the others voted but undecided.
- Failures: a peer closed before it posts, a connection cut, a connection cut in the
  middle of a large op (an agreed outcome), a SIGKILLed peer process: every other peer
  fails with a typed error, inputs intact, and a retry over the survivors is exact;
  peers that disagree on the algorithm or shape fail with ProtocolError.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
from engine_harness import (
    DT,
    DTYPES,
    HOST,
    OP,
    OPS,
    EngineRing,
    chunk_bounds,
    describe,
    finalize_avg,
    kill_test_peer,
    make_data,
    mismatch_report,
    reduce_step,
    reference_allreduce,
)

from pccl_py import _native as nat
from pccl_py.errors import Aborted, PcclError, PeerLost, ProtocolError, Timeout

RSAG = nat.AllReduceAlgorithm.DIRECT_RSAG
DIRECT = nat.AllReduceAlgorithm.DIRECT
RING = nat.AllReduceAlgorithm.RING
NS = [1, 2, 3, 4, 5, 6, 7, 8]
OP_TIMEOUT = 10.0


def rank_order_reference(inputs: Sequence[np.ndarray], dtype_name: str, op: str) -> np.ndarray:
    """x_0 op x_1 op ... op x_{N-1}, each step rounded to the type (16-bit floats
    through float32), then / N for AVG: what every chunk's owner computes."""
    kind = DTYPES[dtype_name][2]
    flat = [np.asarray(x).reshape(-1) for x in inputs]
    acc = flat[0].copy()
    for x in flat[1:]:
        acc = reduce_step(kind, op, acc, x)
    if op == "AVG":
        acc = finalize_avg(kind, acc, len(flat))
    return acc


@pytest.fixture(scope="module")
def rings():
    cache: dict[tuple, EngineRing] = {}

    def get(n: int, **kwargs) -> EngineRing:
        key = (n, tuple(sorted(kwargs.items())))
        ring = cache.get(key)
        if ring is None or ring.closed or ring.tainted:
            if ring is not None:
                ring.close()
            ring = cache[key] = EngineRing(n, **kwargs)
        return ring

    yield get
    for ring in cache.values():
        ring.close()


def run_rsag(
    ring: EngineRing,
    data: Sequence[np.ndarray],
    dtype_name: str,
    op_name: str,
    *,
    parity: int = 0,
    vote: bool = True,
    segment_bytes: int = 0,
    algorithm: nat.AllReduceAlgorithm = RSAG,
) -> list[np.ndarray]:
    """One all-reduce of `data` (one array per rank; not written) on every rank: ranks
    with (rank + parity) even in place (deferred, settled with commit, as the
    Communicator runs it), the others out of place. Returns every rank's result."""
    n = ring.n
    native = DTYPES[dtype_name][0]
    seq = ring.next_seq(0)
    in_place = [(r + parity) % 2 == 0 for r in range(n)]
    bufs = [d.copy() for d in data]
    outs = [bufs[r] if in_place[r] else np.full_like(bufs[r], 0x5A) for r in range(n)]

    def fn(r: int, e: nat.Engine) -> bool:
        h = e.all_reduce(
            bufs[r], outs[r], native, OPS[op_name], tag=0, seq=seq, timeout=OP_TIMEOUT, segment_bytes=segment_bytes,
            defer_commit=in_place[r], vote=vote, algorithm=algorithm,
        )
        h.result()
        h.settle(True)
        return h.voted

    voted = ring.run_ok(fn, timeout=OP_TIMEOUT + 20)
    assert voted == [True] * n if vote else True
    for r in range(n):
        if not in_place[r]:
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: out-of-place input written"
    return outs


def check_results(outs: Sequence[np.ndarray], data: Sequence[np.ndarray], dtype_name: str, op_name: str,
                  what: str) -> None:
    for r in range(len(outs)):
        diff = mismatch_report(outs[r], outs[0])
        assert diff == "", f"{what}: rank {r} differs from rank 0: {diff}"
    diff = mismatch_report(outs[0], rank_order_reference(data, dtype_name, op_name))
    assert diff == "", f"{what}: not the rank-order reduction: {diff}"
    if DTYPES[dtype_name][2] == "int":  # exact: the ring's order gives the same bytes
        diff = mismatch_report(outs[0], reference_allreduce(data, dtype_name, op_name))
        assert diff == "", f"{what}: differs from the ring's result: {diff}"


# ---------------------------------------------------------------- results


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_every_op_is_bit_identical_and_matches_the_rank_order_reference(rings, n: int, dtype_name: str) -> None:
    """Per operator a different count: fewer elements than peers (some chunks empty),
    odd counts, and every other one in segments of 24 bytes (several per chunk)."""
    ring = rings(n)
    for i, op_name in enumerate(OPS):
        count = max(1, n // 2) if i == 0 else 1 + 37 * i + n
        segment_bytes = 24 if i % 2 else 0
        rng = np.random.default_rng(zlib.crc32(f"rsag-{n}-{dtype_name}-{op_name}".encode()))
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        outs = run_rsag(ring, data, dtype_name, op_name, parity=i, segment_bytes=segment_bytes)
        check_results(outs, data, dtype_name, op_name, f"N={n} {dtype_name} {op_name} count={count}")


@pytest.mark.parametrize("dtype_name", ["int32", "uint64", "int8"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_integers_match_what_the_ring_and_direct_compute(rings, dtype_name: str, op_name: str) -> None:
    ring = rings(4)
    rng = np.random.default_rng(zlib.crc32(f"rsag-{dtype_name}-{op_name}".encode()))
    data = [make_data(dtype_name, 4099, rng) for _ in range(4)]
    rsag = run_rsag(ring, data, dtype_name, op_name)
    by_ring = run_rsag(ring, data, dtype_name, op_name, algorithm=RING)
    for r in range(4):
        assert mismatch_report(rsag[r], by_ring[r]) == "", f"rank {r}"


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_floats_match_the_direct_algorithm_bit_for_bit(rings, dtype_name: str) -> None:
    """Both reduce in rank order, so a switch between them never changes a result."""
    ring = rings(5)
    rng = np.random.default_rng(zlib.crc32(f"rsag-vs-direct-{dtype_name}".encode()))
    data = [make_data(dtype_name, 10_007, rng) for _ in range(5)]
    for op_name in ("SUM", "AVG", "PROD"):
        rsag = run_rsag(ring, data, dtype_name, op_name, segment_bytes=1000)
        direct = run_rsag(ring, data, dtype_name, op_name, algorithm=DIRECT)
        for r in range(5):
            assert mismatch_report(rsag[r], direct[r]) == "", f"{op_name} rank {r}"


@pytest.mark.parametrize("connections", [1, 3])
def test_many_segments_over_a_pool_of_connections(connections: int) -> None:
    """Segments of 1000 bytes (rounded down to the element size), striped over
    `connections` connections per peer; results exact, and each peer moves the ring's
    bytes: every chunk but its own out, its own chunk to N-1 peers."""
    n, count = 5, 40_003
    rng = np.random.default_rng(7)
    data = [make_data("float32", count, rng) for _ in range(n)]
    with EngineRing(n, connections_per_peer=connections) as ring:
        for parity in (0, 1):
            outs = run_rsag(ring, data, "float32", "SUM", segment_bytes=1000, parity=parity)
            check_results(outs, data, "float32", "SUM", f"K={connections}")

        seq = ring.next_seq(0)

        def fn(r: int, e: nat.Engine) -> tuple[int, int]:
            h = e.all_reduce(data[r], np.empty_like(data[r]), DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=OP_TIMEOUT,
                             segment_bytes=1000, vote=True, algorithm=RSAG)
            h.result()
            return h.tx_bytes, h.rx_bytes

        b = chunk_bounds(count, n)
        for r, (tx, rx) in enumerate(ring.run_ok(fn)):
            own = (b[r + 1] - b[r]) * 4
            assert tx == rx == count * 4 - own + (n - 1) * own, (r, tx, rx)


@pytest.mark.parametrize("n", [1, 3])
def test_without_vote_and_in_place_without_defer(rings, n: int) -> None:
    ring = rings(n)
    rng = np.random.default_rng(11)
    data = [make_data("bfloat16", 3001, rng) for _ in range(n)]
    seq = ring.next_seq(0)
    bufs = [d.copy() for d in data]

    def fn(r: int, e: nat.Engine) -> None:
        e.all_reduce(bufs[r], bufs[r], DT.BFLOAT16, OP.AVG, tag=0, seq=seq, timeout=OP_TIMEOUT, segment_bytes=512,
                     algorithm=RSAG).result()

    ring.run_ok(fn)
    want = rank_order_reference(data, "bfloat16", "AVG")
    for r in range(n):
        assert mismatch_report(bufs[r], want) == "", f"rank {r}"


def test_zero_elements_still_vote_all_to_all(rings) -> None:
    ring = rings(3)
    seq = ring.next_seq(0)

    def fn(r: int, e: nat.Engine) -> bool:
        x = np.zeros(0, np.float32)
        h = e.all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=OP_TIMEOUT, vote=True, algorithm=RSAG)
        h.result()
        return h.voted

    assert ring.run_ok(fn) == [True] * 3


def test_back_to_back_ops_on_three_tags(rings) -> None:
    n, rounds = 4, 30
    ring = rings(n)
    seqs = [[ring.next_seq(t) for _ in range(rounds)] for t in range(3)]
    results: dict[tuple[int, int, int], float] = {}
    lock = threading.Lock()

    def fn(r: int, e: nat.Engine) -> None:
        for i in range(rounds):
            bufs = [np.full(100 + 7 * t, float(r + i + t), np.float32) for t in range(3)]
            hs = [e.all_reduce(bufs[t], bufs[t], DT.FLOAT32, OP.SUM, tag=t, seq=seqs[t][i], timeout=OP_TIMEOUT,
                               segment_bytes=64, defer_commit=True, vote=True, algorithm=RSAG) for t in range(3)]
            for h in hs:
                h.result()
                h.settle(True)
            with lock:
                for t in range(3):
                    assert (bufs[t] == bufs[t][0]).all()
                    results[(r, i, t)] = float(bufs[t][0])

    ring.run_ok(fn, timeout=60)
    for (r, i, t), v in results.items():
        assert v == sum(q + i + t for q in range(n)), (r, i, t)


# ---------------------------------------------------------------- the all-to-all vote


def test_withheld_vote_lets_its_sender_commit_and_leaves_the_others_voted() -> None:
    n, count = 4, 3001
    rng = np.random.default_rng(3)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    want = rank_order_reference(data, "float32", "SUM")
    with EngineRing(n) as ring:
        ring.engines[1].inject_fault("withhold_vote", 1)

        def fn(r: int, e: nat.Engine) -> tuple[str, bool]:
            h = e.all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=1.5, defer_commit=True,
                             vote=True, algorithm=RSAG)
            try:
                h.result()
                state = "committed"
            except (Timeout, PeerLost):
                state = "failed"
            h.settle(r != 0)
            return state, h.voted

        results = ring.run_ok(fn, timeout=30)
    assert results[1] == ("committed", True), results
    for r in (0, 2, 3):
        assert results[r] == ("failed", True), results
    assert mismatch_report(bufs[0], data[0]) == ""  # voted, settled as a failure
    for r in (1, 2, 3):
        assert mismatch_report(bufs[r], want) == "", f"rank {r}"


# ---------------------------------------------------------------- failures and retry


def retry_over_survivors(ring: EngineRing, survivors: list[int], bufs: list[np.ndarray], data: list[np.ndarray],
                         epoch: int) -> None:
    """Installs the ring of `epoch` over `survivors` and runs the op again (in place,
    deferred, voting): exact, on every survivor."""
    new_ring = [ring.addresses[r] for r in survivors]
    for pos, r in enumerate(survivors):
        ring.engines[r].set_ring(epoch, new_ring, pos, timeout=10.0)
    errors: list[tuple[int, BaseException]] = []

    def retry(r: int) -> None:
        try:
            h = ring.engines[r].all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=2, timeout=20,
                                           segment_bytes=4096, defer_commit=True, vote=True, algorithm=RSAG)
            h.result()
            h.settle(True)
        except BaseException as e:
            errors.append((r, e))

    threads = [threading.Thread(target=retry, args=(r,), daemon=True) for r in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "the retry hung"
    assert not errors, errors
    want = rank_order_reference([data[r] for r in survivors], "float32", "SUM")
    for r in survivors:
        assert mismatch_report(bufs[r], want) == "", f"rank {r}"


@pytest.mark.parametrize("how", ["close", "disconnect"])
def test_a_lost_peer_fails_the_op_everywhere_and_a_retry_over_the_survivors_succeeds(how: str) -> None:
    """5 peers; rank 3 has not posted yet when its engine closes or rank 0 cuts its
    connections to it. Every other rank fails within 2 s with a typed error, unvoted,
    input intact; the retry over the survivors (epoch 2) is exact."""
    n, victim, count = 5, 3, 20_001
    rng = np.random.default_rng(5)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        handles = {
            r: ring.engines[r].all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20,
                                          segment_bytes=4096, defer_commit=True, vote=True, algorithm=RSAG)
            for r in range(n) if r != victim
        }
        time.sleep(0.1)
        assert not any(h.done() for h in handles.values()), "an op ended without the victim's contribution"
        t0 = time.monotonic()
        if how == "close":
            ring.engines[victim].close()
        else:
            ring.engines[0].disconnect(ring.peer_id(victim), "test cut")
        for r, h in handles.items():
            assert h.wait(5), f"rank {r} still running"
            assert time.monotonic() - t0 < 2.0, f"rank {r} failed only after {time.monotonic() - t0:.2f}s"
            with pytest.raises(PcclError) as info:
                h.result()
            assert isinstance(info.value, (PeerLost, Aborted)), repr(info.value)
            assert h.voted is False, f"rank {r} voted although a contribution was missing"
            h.settle(False)
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed"
        retry_over_survivors(ring, [r for r in range(n) if r != victim], bufs, data, epoch=2)


def test_a_connection_cut_in_the_middle_of_a_large_op_gives_an_agreed_outcome() -> None:
    """4 peers run a 32 MiB op in small segments; rank 0 cuts its connections to rank 2
    while it runs. Whatever the timing, the outcomes agree as the master would settle
    them: if any peer committed, every peer voted (the arbiter declares a success and
    settle(True) gives everyone the exact result); otherwise a peer that did not vote
    proves that nobody committed, and every input is intact after settle(False). Then
    the survivors of rank 2's eviction retry exactly."""
    n, victim, count = 4, 2, 8 << 20
    rng = np.random.default_rng(13)
    data = [rng.standard_normal(count, dtype=np.float32) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        handles = [
            ring.engines[r].all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=30,
                                       segment_bytes=16 << 10, defer_commit=True, vote=True, algorithm=RSAG)
            for r in range(n)
        ]
        time.sleep(0.02)
        ring.engines[0].disconnect(ring.peer_id(victim), "test cut")
        states = []
        for r, h in enumerate(handles):
            assert h.wait(20), f"rank {r} still running"
            try:
                h.result()
                states.append("committed")
            except (PeerLost, Aborted) as e:
                states.append(f"failed: {type(e).__name__}")
        voted = [h.voted for h in handles]
        committed = [s == "committed" for s in states]
        if any(committed):
            assert all(voted), (states, voted)
        success = all(voted)  # the arbiter's verdict: anyone unvoted proves nobody committed
        assert not (any(committed) and not success)
        for h in handles:
            h.settle(success)
        want = rank_order_reference(data, "float32", "SUM")
        for r in range(n):
            expect = want if success else data[r]
            assert mismatch_report(bufs[r], expect) == "", f"rank {r} ({states[r]}, success={success})"
        if success:
            return  # the cut came too late to matter; nothing to retry
        bufs = [d.copy() for d in data]
        retry_over_survivors(ring, [r for r in range(n) if r != victim], bufs, data, epoch=2)


KILL_N = 4


def test_sigkill_of_a_peer_process_fails_every_survivor_fast() -> None:
    """4 peer processes; the survivors post the all-reduce, the victim never does and is
    SIGKILLed: every survivor raises a typed error within 2 s, its buffer unchanged."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(KILL_N)]
    victim = 2
    procs = [
        ctx.Process(
            target=kill_test_peer,
            args=(r, EngineRing.peer_id(r), 4099, 200 + r, results, pipes[r][1], None, "DIRECT_RSAG"),
            daemon=True,
        )
        for r in range(KILL_N)
    ]
    reports: list[tuple] = []

    def expect(kind: str, ranks, timeout: float) -> dict[int, tuple]:
        kinds = ("ok", "error") if kind == "result" else (kind,)
        deadline = time.monotonic() + timeout
        while True:
            for msg in reports:
                assert msg[0] != "crash", f"peer {msg[1]} crashed: {msg[3]}\n{msg[4]}"
            got = {m[1]: m for m in reports if m[0] in kinds and m[1] in ranks}
            if set(got) == set(ranks):
                return got
            assert time.monotonic() < deadline, f"waiting for {kind!r}; got {reports}"
            try:
                reports.append(results.get(timeout=0.5))
            except queue.Empty:
                pass

    try:
        for p in procs:
            p.start()
        ports = expect("port", range(KILL_N), 60.0)
        addresses = [(EngineRing.peer_id(r), HOST, ports[r][2]) for r in range(KILL_N)]
        for r in range(KILL_N):
            pipes[r][0].send(addresses)
        expect("ready", range(KILL_N), 60.0)
        survivors = [r for r in range(KILL_N) if r != victim]
        for r in survivors:
            pipes[r][0].send("go")
        expect("posted", survivors, 30.0)
        time.sleep(0.2)
        assert not any(m[0] in ("ok", "error") for m in reports), reports
        t_kill = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)
        outcome = expect("result", survivors, 30.0)
        for r in survivors:
            msg = outcome[r]
            assert msg[0] == "error", f"survivor {r} reported {msg}"
            _, _, t_err, cls, text, intact = msg
            assert cls in ("PeerLost", "Aborted"), f"survivor {r}: {cls}: {text}"
            assert t_err - t_kill < 2.0, f"survivor {r} failed only {t_err - t_kill:.2f}s after the kill"
            assert intact, f"survivor {r}: buffer changed by the failed op"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10.0)
        for a, b in pipes:
            a.close()
            b.close()
        results.close()
        results.join_thread()


# ---------------------------------------------------------------- disagreements


@pytest.mark.parametrize(
    "odd",
    [
        {"algorithm": RING},
        {"algorithm": DIRECT},
        {"count": 4000},
        {"dtype": DT.INT32},
        {"op": OP.MAX},
    ],
    ids=["ring", "direct", "count", "dtype", "op"],
)
def test_peers_that_disagree_fail_with_protocol_error(odd: dict) -> None:
    """Rank 1 posts another algorithm, count, dtype or operator; the others rsag of
    4001 float32. Every peer fails fast (ProtocolError, or PeerLost where a neighbour's
    failure spread first), nobody votes, inputs intact."""
    n = 4
    rng = np.random.default_rng(9)
    data = [make_data("float32", 4001, rng) for _ in range(n)]
    data[1] = data[1][: odd.get("count", 4001)].copy()
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:

        def fn(r: int, e: nat.Engine) -> bool:
            spec = {"algorithm": RSAG, "dtype": DT.FLOAT32, "op": OP.SUM}
            if r == 1:
                spec.update({k: v for k, v in odd.items() if k != "count"})
                time.sleep(0.1)  # the others' frames wait for it
            h = e.all_reduce(bufs[r], bufs[r], spec["dtype"], spec["op"], tag=0, seq=1, timeout=5.0,
                             defer_commit=True, vote=True, algorithm=spec["algorithm"])
            try:
                h.result()
            finally:
                h.settle(False)
                assert not h.voted
            return True

        outcomes = ring.run(fn, timeout=30)
    report = describe(outcomes)
    for o in outcomes:
        assert isinstance(o.error, (ProtocolError, PeerLost)), report
        assert o.elapsed < 3.0, report
        assert mismatch_report(bufs[o.rank], data[o.rank]) == "", f"rank {o.rank}: input changed"
    assert any(isinstance(o.error, ProtocolError) for o in outcomes), report


def test_quantized_and_rsag_together_are_refused(rings) -> None:
    ring = rings(2)
    x = np.ones(16, np.float32)
    with pytest.raises(PcclError, match="own algorithm"):
        ring.engines[0].all_reduce(x, x, DT.FLOAT32, OP.SUM, quantization=nat.QuantKind.MINMAX, algorithm=RSAG)
