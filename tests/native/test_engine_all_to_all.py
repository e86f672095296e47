"""The native all-to-all exchange (Engine.all_to_all with CollectiveKind.ALL_TO_ALL;
native/include/pccl/all_to_all_direct.hpp): block d of every peer's input straight to
rank d, the all-to-all commit vote.

- Results: N = 1..5, element counts of 0, N, and several segments' worth, every dtype
  somewhere, out of place and in place: rank r's row s is exactly rank s's block r, the
  input is never written (in place: overwritten only by the result), each peer sends and
  receives (N-1)/N of its input.
- Refusals: a count that does not split into N blocks, an output of the wrong size, an
  output that overlaps the input without being it.
- Failures: a peer whose engine closes before it posts, or in the middle of a large op,
  makes every other peer fail with a typed error (mid-op: an agreed outcome), inputs
  intact also in place; a retry over the survivors is exact. A peer in another collective
  at the same step makes every peer fail with ProtocolError.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from engine_harness import DTYPES, EngineRing, describe, make_data, mismatch_report

from pccl_py import _native as nat
from pccl_py.errors import Aborted, InvalidArgument, PcclError, PeerLost, ProtocolError

pytestmark = pytest.mark.timeout(120)

A2A = nat.CollectiveKind.ALL_TO_ALL
DTYPE_NAMES = list(DTYPES)
OP_TIMEOUT = 10.0


def expected_rows(data: Sequence[np.ndarray], rank: int) -> np.ndarray:
    """Rank `rank`'s all-to-all output: row s is rank s's block `rank`."""
    n = len(data)
    return np.concatenate([np.array_split(d.reshape(-1), n)[rank] for d in data])


def exchange(
    ring: EngineRing,
    data: Sequence[np.ndarray],
    dtype_name: str,
    *,
    in_place: bool = False,
    segment_bytes: int = 0,
    ranks: Sequence[int] | None = None,
    seq: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
    """One all-to-all on every rank (or `ranks`, ring positions 0..len-1 of the ring
    installed): returns (inputs as left, outputs, (tx, rx) per rank)."""
    ranks = list(range(ring.n)) if ranks is None else list(ranks)
    native = DTYPES[dtype_name][0]
    seq = ring.next_seq(0) if seq is None else seq
    bufs = [d.copy() for d in data]
    outs = [b if in_place else np.full(b.nbytes, 0x5A, np.uint8).view(b.dtype) for b in bufs]

    def fn(i: int) -> tuple[int, int]:
        h = ring.engines[ranks[i]].all_to_all(A2A, bufs[i], outs[i], native, tag=0, seq=seq, timeout=OP_TIMEOUT,
                                              segment_bytes=segment_bytes, vote=True)
        h.result()
        assert h.voted
        return h.tx_bytes, h.rx_bytes

    outcomes = ring.run(lambda r, e: fn(ranks.index(r)), ranks=ranks, timeout=OP_TIMEOUT + 20)
    assert all(o.ok for o in outcomes), describe(outcomes)
    return bufs, outs, [o.value for o in sorted(outcomes, key=lambda o: o.rank)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_rank_r_gets_block_r_of_every_peer_in_rank_order(n: int) -> None:
    with EngineRing(n) as ring:
        for i, count in enumerate([0, n, 3 * n, (37 * n + 5) * n, 4096 * n]):
            dtype_name = DTYPE_NAMES[(n + i) % len(DTYPE_NAMES)]
            rng = np.random.default_rng(zlib.crc32(f"a2a-{n}-{count}".encode()))
            data = [make_data(dtype_name, count, rng) for _ in range(n)]
            for in_place in (False, True):
                bufs, outs, moved = exchange(ring, data, dtype_name, in_place=in_place, segment_bytes=24 if i % 2 else 0)
                block = data[0].nbytes // n
                for r in range(n):
                    what = f"N={n} count={count} {dtype_name} in_place={in_place}: rank {r}"
                    assert mismatch_report(outs[r], expected_rows(data, r)) == "", what
                    if not in_place:
                        assert mismatch_report(bufs[r], data[r]) == "", f"{what}: input written"
                    assert moved[r] == ((n - 1) * block, (n - 1) * block), (what, moved[r])


def test_bad_buffers_are_refused() -> None:
    with EngineRing(3) as ring:
        e = ring.engines[0]
        x = np.ones(12, np.float32)
        with pytest.raises(InvalidArgument, match="equal blocks"):
            e.all_to_all(A2A, np.ones(10, np.float32), np.empty(10, np.float32), nat.DataType.FLOAT32)
        with pytest.raises(PcclError, match="output holds"):
            e.all_to_all(A2A, x, np.empty(24, np.float32), nat.DataType.FLOAT32)
        with pytest.raises(PcclError, match="out of place"):
            big = np.ones(24, np.float32)
            e.all_to_all(A2A, big[:12], big[6:18], nat.DataType.FLOAT32)


@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_a_peer_lost_before_it_posts_fails_every_other_and_a_retry_over_the_survivors_succeeds(in_place: bool) -> None:
    n, victim, count = 5, 3, 20 * 1001  # splits into 5 and into 4 blocks
    rng = np.random.default_rng(5)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        outs = [b if in_place else np.zeros_like(b) for b in bufs]
        handles = {
            r: ring.engines[r].all_to_all(A2A, bufs[r], outs[r], nat.DataType.FLOAT32, tag=0, seq=1, timeout=20,
                                          segment_bytes=4096, vote=True)
            for r in range(n) if r != victim
        }
        time.sleep(0.1)
        assert not any(h.done() for h in handles.values()), "ended without the victim"
        t0 = time.monotonic()
        ring.engines[victim].close()
        for r, h in handles.items():
            assert h.wait(5), f"rank {r} still running"
            assert time.monotonic() - t0 < 2.0, f"rank {r} failed only after {time.monotonic() - t0:.2f}s"
            with pytest.raises(PcclError) as info:
                h.result()
            assert isinstance(info.value, (PeerLost, Aborted)), repr(info.value)
            assert not h.voted, f"rank {r} voted"
            assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed"
        survivors = [r for r in range(n) if r != victim]
        new_ring = [ring.addresses[r] for r in survivors]
        for pos, r in enumerate(survivors):
            ring.engines[r].set_ring(2, new_ring, pos, timeout=10.0)
        kept = [data[r] for r in survivors]
        _, outs2, _ = exchange(ring, kept, "float32", in_place=in_place, ranks=survivors, seq=2, segment_bytes=4096)
        for i, r in enumerate(survivors):
            assert mismatch_report(outs2[i], expected_rows(kept, i)) == "", f"retry: rank {r}"


@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_a_peer_closed_in_the_middle_of_a_large_op_gives_an_agreed_outcome(in_place: bool) -> None:
    """4 peers, 32 MiB in 16 KiB segments; rank 2's engine closes while the op runs. If
    any survivor committed, every survivor voted; otherwise nobody committed. Inputs are
    intact after a failure (in place too: the rows are built aside)."""
    n, victim, count = 4, 2, 8 << 20
    rng = np.random.default_rng(13)
    data = [rng.standard_normal(count, dtype=np.float32) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:
        outs = [b if in_place else np.zeros_like(b) for b in bufs]
        handles = [
            ring.engines[r].all_to_all(A2A, bufs[r], outs[r], nat.DataType.FLOAT32, tag=0, seq=1, timeout=30,
                                       segment_bytes=16 << 10, vote=True)
            for r in range(n)
        ]
        time.sleep(0.02)
        ring.engines[victim].close()
        states: dict[int, str] = {}
        for r, h in enumerate(handles):
            if r == victim:
                continue
            assert h.wait(20), f"rank {r} still running"
            try:
                h.result()
                states[r] = "committed"
            except (PeerLost, Aborted) as e:
                states[r] = f"failed: {type(e).__name__}"
        voted = [h.voted for r, h in enumerate(handles) if r != victim]
        if "committed" in states.values():
            assert all(voted), (states, voted)
        for r, state in states.items():
            if state == "committed":
                assert mismatch_report(outs[r], expected_rows(data, r)) == "", f"rank {r}: committed a wrong result"
            else:
                assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed ({states})"
        if not in_place:
            for r in range(n):
                assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed ({states})"


def test_a_peer_in_another_collective_fails_every_peer_with_protocol_error() -> None:
    """Three peers run an all-to-all of 3000 float32 at step 1, rank 1 an all-gather of
    1000 there (the same bytes on the wire per peer): every peer fails fast, nobody
    votes, inputs intact."""
    n, count = 3, 3000
    rng = np.random.default_rng(9)
    data = [make_data("float32", count, rng) for _ in range(n)]
    bufs = [d.copy() for d in data]
    with EngineRing(n) as ring:

        def fn(r: int, e: nat.Engine) -> Any:
            if r == 1:
                time.sleep(0.1)
                x = bufs[r][: count // n]
                h = e.all_to_all(nat.CollectiveKind.ALL_GATHER, x, np.empty(count, np.float32), nat.DataType.FLOAT32,
                                 tag=0, seq=1, timeout=5.0, vote=True)
            else:
                h = e.all_to_all(A2A, bufs[r], np.empty_like(bufs[r]), nat.DataType.FLOAT32, tag=0, seq=1,
                                 timeout=5.0, vote=True)
            try:
                return h.result()
            finally:
                assert not h.voted

        outcomes = ring.run(fn, timeout=30)
    report = describe(outcomes)
    for o in outcomes:
        assert isinstance(o.error, (ProtocolError, PeerLost)), report
        assert o.elapsed < 3.0, report
    assert any(isinstance(o.error, ProtocolError) for o in outcomes), report
    for r in range(n):
        assert mismatch_report(bufs[r], data[r]) == "", f"rank {r}: input changed"
