"""Zero-copy sends (Engine::zeroCopy): large payloads of voting ops go to the kernel by
reference (vmsplice + splice), so the kernel reads the caller's pages when the
receiver reads, not when the frame is queued. These tests check which ops take that
path, that results stay exact for any buffer alignment, and the safety argument: a
buffer changed right after an op ended (committed or settled) never reaches a peer
that still needed the old bytes. Engines here are on one host, so they switch the
shared-memory ring off (it would carry these payloads instead: test_shared_ring.py)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from pccl_py.errors import Aborted, PeerLost, Timeout
from engine_harness import DT, OP, EngineRing

BIG = 1 << 20  # float32 elements: 4 MiB, segments of 512 KiB (all above the 32 KiB floor)


def _inputs(n: int, count: int) -> list[np.ndarray]:
    return [(np.arange(count, dtype=np.float32) % 251) * (r + 1) for r in range(n)]


@pytest.mark.parametrize("in_place", [True, False])
def test_voting_ops_send_every_large_payload_by_reference(in_place: bool) -> None:
    n = 3
    xs = _inputs(n, BIG)
    expected = np.sum(np.stack(xs), axis=0, dtype=np.float32)
    outs = [x if in_place else np.zeros_like(x) for x in xs]
    with EngineRing(n, shared_memory=False) as ring:

        def run(r: int, e) -> tuple[int, int]:
            h = e.all_reduce(xs[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=30, defer_commit=in_place, vote=True)
            h.result()
            h.settle(True)
            return h.tx_bytes, e.zero_copy_bytes

        results = ring.run_ok(run)
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    for tx, zc in results:
        # 2(N-1)/N of the buffer, in segments of at least 32 KiB: all of it by reference
        assert abs(tx - 2 * (n - 1) * BIG * 4 / n) < 4 * n
        assert zc == tx


@pytest.mark.parametrize(
    "vote,defer,zero_copy",
    [
        (False, False, True),  # no vote: a peer may return before its successor read everything
        (False, True, True),
        (True, False, True),  # in place, restored at failure: could change bytes still in flight
        (True, True, False),  # switched off on the engine
    ],
)
def test_other_ops_copy_their_payloads(vote: bool, defer: bool, zero_copy: bool) -> None:
    n = 2
    xs = _inputs(n, BIG)
    expected = np.sum(np.stack(xs), axis=0, dtype=np.float32)
    with EngineRing(n, zero_copy=zero_copy, shared_memory=False) as ring:

        def run(r: int, e) -> int:
            h = e.all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=30, defer_commit=defer, vote=vote)
            h.result()
            h.settle(True)
            return e.zero_copy_bytes

        assert ring.run_ok(run) == [0] * n
    for x in xs:
        np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("offset_elems", [1, 3, 1021])
def test_unaligned_buffers_and_two_connections_give_exact_results(offset_elems: int) -> None:
    """Payloads that start and end mid-page, striped over K=2 connections (one pipe each)."""
    n, count = 4, (1 << 19) + 7
    rng = np.random.default_rng(7)
    backing = [np.zeros(count + offset_elems + 5, np.float32) for _ in range(n)]
    xs = [b[offset_elems : offset_elems + count] for b in backing]
    for x in xs:
        x[:] = rng.integers(-1000, 1000, count).astype(np.float32)
    expected = np.sum(np.stack([x.copy() for x in xs]), axis=0, dtype=np.float32)
    with EngineRing(n, connections_per_peer=2, shared_memory=False) as ring:

        def run(r: int, e) -> int:
            h = e.all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=30, defer_commit=True, vote=True)
            h.result()
            h.settle(True)
            return e.zero_copy_bytes

        assert all(zc > 0 for zc in ring.run_ok(run))
    for b, x in zip(backing, xs):
        np.testing.assert_array_equal(x, expected)
        assert not b[:offset_elems].any() and not b[offset_elems + count :].any()  # nothing outside written
    assert len({x.tobytes() for x in xs}) == 1


@pytest.mark.parametrize("in_place", [True, False])
def test_a_buffer_overwritten_as_soon_as_the_op_ends_never_leaks_into_a_peer(in_place: bool) -> None:
    """Each peer overwrites its buffers the moment its op has ended, as a training loop
    does. A peer that committed knows every peer held the result (had read all it
    needed from it), so the next step's bytes can never reach a peer of this op."""
    n, steps, count = 3, 12, (1 << 18) + 11
    with EngineRing(n, shared_memory=False) as ring:

        def run(r: int, e) -> list[float]:
            x = np.empty(count, np.float32)
            out = x if in_place else np.empty_like(x)
            bad: list[float] = []
            for step in range(steps):
                x.fill(float(100 * step + r))
                h = e.all_reduce(x, out, DT.FLOAT32, OP.SUM, tag=0, seq=step + 1, timeout=30, defer_commit=in_place, vote=True)
                h.result()
                h.settle(True)
                want = float(sum(100 * step + q for q in range(n)))
                if not (out == want).all():
                    bad.append(step)
                x.fill(-1.0)  # the next step's data would be written here at once
                if not in_place:
                    out.fill(-2.0)
            return bad

        results = ring.run_ok(run, timeout=90)
    assert results == [[]] * n


def test_a_failed_voting_op_puts_its_input_back_at_settle_or_when_dropped() -> None:
    """Deferred and voting, the restore of a failed op waits for settle() (after the
    arbiter heard of the failure), or for the handle to go away."""
    n = 3
    xs = _inputs(n, BIG)
    originals = [x.copy() for x in xs]
    with EngineRing(n, shared_memory=False) as ring:
        handles = [
            ring.engines[r].all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20, defer_commit=True, vote=True)
            for r in range(2)
        ]
        ring.engines[2].close()  # rank 2 never takes part: the others fail, unvoted
        for h in handles:
            assert h.wait(10)
            with pytest.raises((PeerLost, Aborted, Timeout)):
                h.result()
            assert h.voted is False
        handles[0].settle(True)  # nothing held to commit: the input comes back
        del h
        handles.pop()  # rank 1's handle dropped unsettled
        gc.collect()
    for x, orig in zip(xs[:2], originals[:2]):
        np.testing.assert_array_equal(x, orig)


@pytest.mark.parametrize("vote", [True, False])
def test_a_predecessor_closing_mid_op_fails_a_voting_op_before_it_reads_on(vote: bool) -> None:
    """Ring 0 -> 1 -> 2 -> 0; rank 2 never posts, so rank 1 still waits for rank 0's
    frames when rank 0 drops its connections. A voting op must fail at the hang-up,
    without reading what is still queued (those frames refer to rank 0's pages, which
    rank 0 may rewrite now that it failed); a copying op reads on until the EOF."""
    n = 3
    xs = _inputs(n, BIG)
    with EngineRing(n, shared_memory=False) as ring:
        kwargs = dict(tag=0, seq=1, timeout=20, defer_commit=True, vote=vote)
        h0 = ring.engines[0].all_reduce(xs[0], xs[0], DT.FLOAT32, OP.SUM, **kwargs)
        h1 = ring.engines[1].all_reduce(xs[1], xs[1], DT.FLOAT32, OP.SUM, **kwargs)
        assert not h1.wait(0.3)  # stuck: rank 2 never sends
        ring.engines[0].disconnect(ring.peer_id(1), "test: rank 0 drops rank 1")
        for h in (h0, h1):
            assert h.wait(10)
        with pytest.raises(PeerLost) as failure:
            h1.result()
        assert ("mid-op" in str(failure.value)) == vote, str(failure.value)
        for h in (h0, h1):
            h.settle(False)
