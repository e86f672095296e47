"""Failure behaviour of the native engine: abort, timeouts, shape mismatches,
concurrent tagged ops, argument checks, and a peer process SIGKILLed mid-op.

Every blocking call has a deadline (op timeouts, harness timeouts, process join
timeouts), so a regression shows up as a failure, never as a hung run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time

import numpy as np
import pytest

from engine_harness import (
    DT,
    HOST,
    OP,
    DTYPES,
    OPS,
    EngineRing,
    HarnessTimeout,
    describe,
    kill_test_peer,
    make_data,
    mismatch_report,
    reference_allreduce,
)
from pccl_py import _native as nat
from pccl_py.errors import Aborted, InvalidArgument, PcclError, PeerLost, ProtocolError, Timeout


def _data(count: int, seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(count).astype(dtype)


def _wait_raises(h, timeout: float) -> tuple[BaseException | None, float]:
    """Waits up to `timeout` for h to finish; returns (its PcclError or None, seconds)."""
    t0 = time.monotonic()
    assert h.wait(timeout), f"op still running after {timeout}s"
    try:
        h.result()
    except PcclError as e:
        return e, time.monotonic() - t0
    return None, time.monotonic() - t0


# ---------------------------------------------------------------- the harness itself


def test_harness_deadline_unblocks_a_rank_stuck_in_the_engine():
    """A rank blocked in wait() without any timeout (its peer never posts) is woken
    by the harness deadline: it closes the engines, which fails the op with Aborted,
    and raises HarnessTimeout instead of hanging."""
    ring = EngineRing(2)
    x = _data(1024, 0)
    errors: list[BaseException] = []

    def fn(r, e):
        if r == 1:
            return
        h = e.all_reduce(x, np.empty_like(x), DT.FLOAT32, OP.SUM, tag=0, seq=0)  # no op timeout
        h.wait()  # blocks until the op ends
        try:
            h.result()
        except PcclError as err:
            errors.append(err)

    t0 = time.monotonic()
    with pytest.raises(HarnessTimeout, match="none still stuck"):
        ring.run(fn, timeout=1.0)
    assert ring.closed
    assert 1.0 <= time.monotonic() - t0 < 5.0
    assert len(errors) == 1 and isinstance(errors[0], Aborted), errors


# ---------------------------------------------------------------- abort


def test_abort_unblocks_a_blocked_waiter_quickly():
    """Ranks 0 and 2 of 3 post an in-place op that cannot finish (rank 1 never posts);
    a thread blocks in result(). abort() from the main thread must wake it with
    Aborted well within 100 ms (asserted < 0.5 s against scheduling noise); the
    poisoned neighbour fails with a typed error too; inputs stay intact; the next op
    (fresh seq) on the same engines succeeds."""
    n, count = 3, 1 << 20
    with EngineRing(n) as ring:
        data = [_data(count, r) for r in range(n)]
        bufs = [x.copy() for x in data]
        seq = ring.next_seq()
        h0 = ring.engines[0].all_reduce(bufs[0], bufs[0], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=30.0)
        h2 = ring.engines[2].all_reduce(bufs[2], bufs[2], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=30.0)
        woke: dict[str, object] = {}

        def waiter():
            try:
                h0.result()
                woke["error"] = None
            except BaseException as e:
                woke["error"] = e
            woke["t"] = time.monotonic()

        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        time.sleep(0.3)
        assert not h0.done() and "t" not in woke, "the op finished although a peer never posted"
        t_abort = time.monotonic()
        h0.abort("test abort")
        t.join(5.0)
        assert not t.is_alive(), "abort() did not wake the waiter within 5 s"
        latency = woke["t"] - t_abort
        print(f"\nabort -> waiter woke after {latency * 1e3:.1f} ms")
        assert isinstance(woke["error"], Aborted), repr(woke["error"])
        assert latency < 0.5, f"abort took {latency * 1e3:.0f} ms to unblock the waiter"
        # Rank 2 (whose successor is rank 0) is poisoned by the abort.
        err2, _ = _wait_raises(h2, 2.0)
        assert isinstance(err2, PcclError) and not isinstance(err2, Timeout), repr(err2)
        for r in (0, 2):
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed by a failed op"
        # The engines recover: a fresh op on every rank succeeds.
        outs = [np.empty_like(x) for x in data]
        outcomes = ring.all_reduce(data, outs, DT.FLOAT32, OP.SUM, op_timeout=20.0)
        assert all(o.ok for o in outcomes), describe(outcomes)
        want = reference_allreduce(data, "float32", "SUM")
        for r in range(n):
            assert mismatch_report(outs[r], want) == "", f"rank {r}"


def test_close_fails_ops_in_flight_with_aborted():
    with EngineRing(2) as ring:
        x = _data(4096, 0)
        buf = x.copy()
        h = ring.engines[0].all_reduce(buf, buf, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=30.0)
        time.sleep(0.05)
        assert not h.done()
        t0 = time.monotonic()
        ring.engines[0].close()
        err, _ = _wait_raises(h, 2.0)
        assert isinstance(err, Aborted), repr(err)
        assert time.monotonic() - t0 < 2.0
        assert mismatch_report(buf, x) == ""
        with pytest.raises(Aborted):
            ring.engines[0].all_reduce(buf, buf, DT.FLOAT32, OP.SUM, tag=0, seq=1)


# ---------------------------------------------------------------- timeouts


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
def test_op_timeout_raises_timeout_with_input_intact(in_place):
    """Rank 1 never posts: rank 0's op (timeout 0.3 s) raises Timeout after about 0.3 s
    and leaves its input as it was."""
    with EngineRing(2) as ring:
        x = _data(1 << 18, 1)
        buf = x.copy()
        out = buf if in_place else np.zeros_like(buf)
        t0 = time.monotonic()
        h = ring.engines[0].all_reduce(buf, out, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=0.3)
        assert h.wait(5.0), "the op did not time out"
        elapsed = time.monotonic() - t0
        with pytest.raises(Timeout):
            h.result()
        assert 0.25 <= elapsed < 2.0, f"timed out after {elapsed:.3f}s, expected about 0.3s"
        assert mismatch_report(buf, x) == "", "input changed by a timed-out op"


def test_wait_with_timeout_does_not_fail_the_op():
    """wait(t) returns False and result(t) raises Timeout while the op runs; the op
    itself keeps running until aborted."""
    with EngineRing(2) as ring:
        x = _data(1024, 2)
        h = ring.engines[0].all_reduce(x, np.empty_like(x), DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=30.0)
        t0 = time.monotonic()
        assert h.wait(0.1) is False
        assert 0.08 <= time.monotonic() - t0 < 1.0
        with pytest.raises(Timeout):
            h.result(timeout=0.05)
        assert not h.done()
        h.abort("done with it")
        err, _ = _wait_raises(h, 2.0)
        assert isinstance(err, Aborted), repr(err)


def test_peer_that_never_posts_makes_the_others_time_out():
    """4 ranks, rank 2 never posts: the other three fail (Timeout where the deadline
    hit, PeerLost where a neighbour's failure spread) within a few seconds of their
    1 s timeout, never hang; inputs intact."""
    n, count = 4, 1 << 16
    with EngineRing(n) as ring:
        data = [_data(count, r) for r in range(n)]
        bufs = [x.copy() for x in data]
        seq = ring.next_seq()

        def fn(r, e):
            if r == 2:
                return None
            h = e.all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=1.0)
            h.result()

        outcomes = ring.run(fn, timeout=20.0)
    posted = [o for o in outcomes if o.rank != 2]
    for o in posted:
        assert isinstance(o.error, (Timeout, PeerLost)), describe(outcomes)
        assert o.elapsed < 4.0, describe(outcomes)
        assert mismatch_report(bufs[o.rank], data[o.rank]) == "", f"rank {o.rank}: input changed"
    assert any(isinstance(o.error, Timeout) for o in posted), describe(outcomes)


# ---------------------------------------------------------------- shape mismatches


MISMATCHES = {
    # name: (n, normal (count, dtype, op), odd rank's (count, dtype, op))
    "count+1": (3, (50_000, "float32", "SUM"), (50_001, "float32", "SUM")),
    "count-1-small": (4, (5, "float32", "SUM"), (4, "float32", "SUM")),
    "count-zero": (3, (50_000, "float32", "SUM"), (0, "float32", "SUM")),
    "dtype-same-size": (3, (50_000, "float32", "SUM"), (50_000, "int32", "SUM")),
    "dtype-other-size": (3, (50_000, "float32", "SUM"), (50_000, "float64", "SUM")),
    "op": (3, (50_000, "float32", "SUM"), (50_000, "float32", "MAX")),
}


def _mismatch_run(case: str, post_delays: list[float]):
    """Rank 1 of the ring posts the odd shape of MISMATCHES[case]; rank r posts after
    post_delays[r] seconds (op timeout 5 s). Returns (outcomes, inputs, buffers)."""
    n, normal, odd = MISMATCHES[case]
    assert len(post_delays) == n
    with EngineRing(n) as ring:
        shapes = [odd if r == 1 else normal for r in range(n)]
        rng = np.random.default_rng(5)
        data = [make_data(d, c, rng) for c, d, _ in shapes]
        bufs = [x.copy() for x in data]
        seq = ring.next_seq()

        def fn(r, e):
            time.sleep(post_delays[r])
            count, dtype_name, op_name = shapes[r]
            h = e.all_reduce(bufs[r], bufs[r], DTYPES[dtype_name][0], OPS[op_name], tag=0, seq=seq, timeout=5.0)
            h.result()

        return ring.run(fn, timeout=30.0), data, bufs


def _assert_all_failed_fast(outcomes, data, bufs):
    report = describe(outcomes)
    for o in outcomes:
        assert isinstance(o.error, (ProtocolError, PeerLost)), f"rank {o.rank} did not fail as expected:\n{report}"
        assert o.elapsed < 3.0, f"rank {o.rank} failed only after {o.elapsed:.1f}s:\n{report}"
        assert mismatch_report(bufs[o.rank], data[o.rank]) == "", f"rank {o.rank}: input changed"
    assert any(isinstance(o.error, ProtocolError) for o in outcomes), report


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_shape_mismatch_fails_on_every_peer(case):
    """Rank 1's op differs from the others' in element count (or dtype, or operator).
    The others post first, rank 1 0.1 s later (their frames wait in its mailbox):
    every peer raises ProtocolError or PeerLost, long before the 5 s op timeout, with
    its input intact. Nobody succeeds, nobody hangs."""
    n = MISMATCHES[case][0]
    _assert_all_failed_fast(*_mismatch_run(case, [0.1 if r == 1 else 0.0 for r in range(n)]))


def test_zero_count_peer_posting_first_makes_the_others_fail_fast():
    """As above, but the odd rank, with 0 elements, posts first (0.1 s before the
    others). Its op has nothing to send or receive, so at the engine level it finishes
    at once (the master's verdict makes it fail at the Communicator level). The others
    must not sit out their timeout: when their frames reach the finished op with
    another shape digest, the odd rank answers with an abort naming the mismatch."""
    outcomes, data, bufs = _mismatch_run("count-zero", [0.1, 0.0, 0.1])
    report = describe(outcomes)
    odd = next(o for o in outcomes if o.rank == 1)
    assert odd.error is None, report
    for o in outcomes:
        if o.rank == 1:
            continue
        assert isinstance(o.error, ProtocolError), f"rank {o.rank} did not fail as expected:\n{report}"
        assert "disagree" in str(o.error), report
        assert o.elapsed < 3.0, f"rank {o.rank} failed only after {o.elapsed:.1f}s:\n{report}"
        assert mismatch_report(bufs[o.rank], data[o.rank]) == "", f"rank {o.rank}: input changed"


def test_shape_mismatch_reaches_a_peer_that_posts_after_the_failure():
    """Rank 1 (50001 elements) posts first, rank 2 0.1 s later (it sees the mismatch at
    once and the failure spreads), rank 0 only 0.5 s later, when its neighbours have
    already failed the op: rank 0 must fail fast too (ProtocolError or PeerLost), not
    sit out its 5 s timeout waiting for frames that will never come."""
    _assert_all_failed_fast(*_mismatch_run("count+1", [0.5, 0.0, 0.1]))


# ---------------------------------------------------------------- concurrent tagged ops


def test_three_tagged_ops_in_flight_at_once():
    """Each rank posts three ops (distinct tags, dtypes, operators and sizes) before
    waiting on any, in a rank-dependent order; every result is right. Three rounds, a
    fresh seq per tag each round."""
    n = 3
    specs = {  # tag: (count, dtype, op)
        7: (1 << 20, "float32", "SUM"),
        8: (300_001, "int64", "MAX"),
        9: (500_000, "float16", "AVG"),
    }
    orders = [[7, 8, 9], [9, 8, 7], [8, 9, 7]]
    rng = np.random.default_rng(6)
    with EngineRing(n) as ring:
        for rnd in range(3):
            data = {t: [make_data(d, c, rng) for _ in range(n)] for t, (c, d, _) in specs.items()}
            outs = {t: [np.empty_like(x) for x in data[t]] for t in specs}
            seqs = {t: ring.next_seq(t) for t in specs}

            def fn(r, e):
                handles = {}
                for t in orders[r]:
                    _, d, o = specs[t]
                    handles[t] = e.all_reduce(data[t][r], outs[t][r], DTYPES[d][0], OPS[o], tag=t, seq=seqs[t], timeout=20.0)
                for t in orders[r]:
                    handles[t].result()
                return {t: handles[t].key for t in handles}

            outcomes = ring.run(fn, timeout=40.0)
            assert all(o.ok for o in outcomes), f"round {rnd}:\n{describe(outcomes)}"
            for t, (_, d, o) in specs.items():
                want = reference_allreduce(data[t], d, o)
                for r in range(n):
                    assert outcomes[r].value[t] == (ring.epoch, t, seqs[t])
                    diff = mismatch_report(outs[t][r], want)
                    assert diff == "", f"round {rnd} tag {t} rank {r}: {diff}"


def test_second_op_on_a_busy_tag_is_rejected():
    """A second op on a tag whose op is still in flight fails with InvalidArgument and
    leaves the first one running."""
    with EngineRing(2) as ring:
        x = _data(4096, 3)
        y = x.copy()
        e = ring.engines[0]
        h1 = e.all_reduce(x, np.empty_like(x), DT.FLOAT32, OP.SUM, tag=4, seq=0, timeout=30.0)
        h2 = e.all_reduce(y, y, DT.FLOAT32, OP.SUM, tag=4, seq=1, timeout=30.0)
        err, _ = _wait_raises(h2, 2.0)
        assert isinstance(err, InvalidArgument), repr(err)
        assert mismatch_report(y, x) == ""
        assert not h1.done()
        h1.abort("cleanup")
        err, _ = _wait_raises(h1, 2.0)
        assert isinstance(err, Aborted), repr(err)


# ---------------------------------------------------------------- a new ring after a loss


def test_survivors_form_a_new_ring_after_a_peer_dies():
    """4 in-process ranks; rank 2's engine is closed mid-op: the other three fail with
    a typed error and intact inputs, then install a 3-peer ring of epoch 2 and run a
    correct all-reduce on it (keys carry the new epoch)."""
    n, count = 4, 1 << 20
    with EngineRing(n) as ring:
        data = [_data(count, 10 + r) for r in range(n)]
        bufs = [x.copy() for x in data]
        seq = ring.next_seq()
        handles = {
            r: ring.engines[r].all_reduce(bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=20.0)
            for r in (0, 1, 3)
        }
        time.sleep(0.1)
        t0 = time.monotonic()
        ring.engines[2].close()
        for r, h in handles.items():
            err, _ = _wait_raises(h, 5.0)
            assert isinstance(err, PcclError), f"rank {r}: {err!r}"
            assert time.monotonic() - t0 < 2.0, f"rank {r} failed only {time.monotonic() - t0:.2f}s after the loss"
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed"
        survivors = [0, 1, 3]
        new_ring = [ring.addresses[r] for r in survivors]
        for pos, r in enumerate(survivors):
            ring.engines[r].set_ring(2, new_ring, pos, timeout=10.0)
        outs = {r: np.empty_like(data[r]) for r in survivors}
        keys = {}

        errors: list[tuple[int, BaseException]] = []

        def fn(r):
            try:
                h = ring.engines[r].all_reduce(data[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq + 1, timeout=20.0)
                h.result()
                keys[r] = h.key
            except BaseException as e:
                errors.append((r, e))

        threads = [threading.Thread(target=fn, args=(r,), daemon=True) for r in survivors]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
            if t.is_alive():
                ring.close()
                pytest.fail("all-reduce on the new ring did not finish within 30 s")
        assert not errors, f"all-reduce on the new ring failed: {errors}"
        want = reference_allreduce([data[r] for r in survivors], "float32", "SUM")
        for r in survivors:
            assert keys[r] == (2, 0, seq + 1), f"rank {r}: key {keys[r]}"
            assert mismatch_report(outs[r], want) == "", f"rank {r}"


# ---------------------------------------------------------------- argument checks


def test_invalid_arguments_are_rejected():
    with EngineRing(2) as ring:
        e = ring.engines[0]
        x = np.zeros(16, np.float32)
        with pytest.raises(InvalidArgument):
            e.all_reduce(x, np.zeros(15, np.float32), DT.FLOAT32, OP.SUM)  # output size differs
        with pytest.raises(InvalidArgument):
            e.all_reduce(np.zeros(3, np.uint8), np.zeros(3, np.uint8), DT.FLOAT32, OP.SUM)  # 3 bytes
        other = ring.addresses
        with pytest.raises(InvalidArgument):
            e.set_ring(2, other, 1)  # position 1 holds another peer
        with pytest.raises(InvalidArgument):
            e.set_ring(2, [other[0], other[0]], 0)  # listed twice
        with pytest.raises(InvalidArgument):
            e.set_ring(2, other, 5)  # outside the ring
    with pytest.raises(InvalidArgument):
        nat.Engine(peer_id=1, host=HOST, port=0, connections_per_peer=-1)  # 0 is "sized from the round trip"
    with pytest.raises(InvalidArgument):
        nat.Engine(peer_id=1, host=HOST, port=0, connections_per_peer=65)


# ---------------------------------------------------------------- SIGKILL of a peer process


KILL_N = 4
KILL_COUNT = 16 * 2**20  # 64 MiB of float32 per peer


def _process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ('T': stopped), or '' if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.parametrize("victim", [1, 3])
def test_sigkill_of_a_peer_mid_op(victim):
    """4 peer processes run a 64 MiB in-place float32 all-reduce. The survivors post
    first (their op cannot finish without the victim); the victim posts, lets the op
    run for 20 ms, and freezes itself (SIGSTOP) in the middle of it; the test then
    SIGKILLs it. Every survivor must raise a typed PcclError within 2 s of the kill,
    with its buffer unchanged (checksum)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(KILL_N)]
    procs = [
        ctx.Process(
            target=kill_test_peer,
            args=(r, EngineRing.peer_id(r), KILL_COUNT, 100 + r, results, pipes[r][1], 0.02 if r == victim else None),
            daemon=True,
        )
        for r in range(KILL_N)
    ]
    reports: list[tuple] = []

    def check_reports() -> None:
        for msg in reports:
            if msg[0] == "crash":
                raise AssertionError(f"peer {msg[1]} crashed: {msg[3]}\n{msg[4]}")
            if msg[0] == "too-fast":
                raise AssertionError("the op finished within 20 ms, before the victim could be stopped mid-op")

    def pump(timeout: float) -> None:
        try:
            reports.append(results.get(timeout=timeout))
        except queue.Empty:
            pass
        check_reports()

    def expect(kind: str, ranks, timeout: float) -> dict[int, tuple]:
        """Messages of `kind` ("result": "ok" or "error") from every rank in `ranks`,
        looking at what arrived earlier too."""
        kinds = ("ok", "error") if kind == "result" else (kind,)
        deadline = time.monotonic() + timeout
        while True:
            check_reports()
            got = {msg[1]: msg for msg in reports if msg[0] in kinds and msg[1] in ranks}
            if set(got) == set(ranks):
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waiting for {kind!r} from {sorted(set(ranks) - set(got))}; got {reports}")
            pump(min(left, 1.0))

    try:
        for p in procs:
            p.start()
        ports = expect("port", range(KILL_N), 60.0)
        ring = [(EngineRing.peer_id(r), HOST, ports[r][2]) for r in range(KILL_N)]
        for r in range(KILL_N):
            pipes[r][0].send(ring)
        expect("ready", range(KILL_N), 60.0)
        survivors = [r for r in range(KILL_N) if r != victim]
        for r in survivors:
            pipes[r][0].send("go")
        expect("posted", survivors, 30.0)
        pipes[victim][0].send("go")
        deadline = time.monotonic() + 30.0
        while _process_state(procs[victim].pid) != "T":
            assert time.monotonic() < deadline, f"the victim never stopped itself; reports: {reports}"
            pump(0.005)
        assert not any(m[0] in ("ok", "error") for m in reports), f"an op ended before the kill: {reports}"
        t_kill = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)
        outcome = expect("result", survivors, 30.0)
        for r in survivors:
            msg = outcome[r]
            assert msg[0] == "error", f"survivor {r} reported {msg}"
            _, _, t_err, cls, text, intact = msg
            delay = t_err - t_kill
            print(f"\nsurvivor {r}: {cls} {delay * 1e3:.0f} ms after the kill: {text}")
            assert cls in ("PeerLost", "ProtocolError", "Aborted", "Timeout"), f"survivor {r}: {cls}: {text}"
            assert delay < 2.0, f"survivor {r} raised {cls} only {delay:.2f}s after the kill"
            assert intact, f"survivor {r}: buffer changed by the failed op"
        procs[victim].join(5.0)
        assert procs[victim].exitcode == -signal.SIGKILL
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
