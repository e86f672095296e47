"""The commit vote of the native all-reduce (AllReduceOptions::vote, docs/protocol.md
"Commit vote"): an op succeeds only once every peer holds the result; a peer whose op
failed after voting keeps the result, so an arbiter can still declare it a success."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pccl_py.errors import Aborted, PeerLost, Timeout
from engine_harness import DT, OP, EngineRing


def _inputs(n: int, count: int) -> list[np.ndarray]:
    return [np.arange(count, dtype=np.float32) * (r + 1) for r in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("in_place", [True, False])
def test_voting_ops_succeed_with_the_exact_sum_on_every_peer(n: int, in_place: bool) -> None:
    count = 1000 + 3 * n + 1  # not divisible by n
    xs = _inputs(n, count)
    expected = np.sum(np.stack(xs), axis=0, dtype=np.float32)
    with EngineRing(n) as ring:
        outs = [x if in_place else np.zeros_like(x) for x in xs]

        def run(r: int, e) -> bool:
            h = e.all_reduce(xs[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20, defer_commit=in_place, vote=True)
            h.result()
            h.settle(True)
            return h.voted

        assert ring.run_ok(run) == [True] * n
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    assert len({o.tobytes() for o in outs}) == 1


def test_zero_elements_still_vote() -> None:
    with EngineRing(3) as ring:

        def run(r: int, e) -> bool:
            x = np.zeros(0, np.float32)
            h = e.all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20, vote=True)
            h.result()
            return h.voted

        assert ring.run_ok(run) == [True] * 3


def test_withheld_vote_lets_its_sender_commit_and_leaves_the_others_voted_but_undecided() -> None:
    """Ring 0 -> 1 -> 2 -> 0. Rank 1 withholds its count: it still commits (its
    predecessor's count reaches N-1), but rank 2 never hears from it and rank 0 never
    gets N-1. They end by timeout having voted, with their in-place result held:
    settle(True) (the arbiter's success) writes the full sum into the input buffer."""
    n, count = 3, 4097
    xs = _inputs(n, count)
    originals = [x.copy() for x in xs]
    expected = np.sum(np.stack(xs), axis=0, dtype=np.float32)
    with EngineRing(n) as ring:
        ring.engines[1].inject_fault("withhold_vote", 1)

        def run(r: int, e) -> tuple[str, bool]:
            h = e.all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=1.5, defer_commit=True, vote=True)
            try:
                h.result()
                state = "committed"
            except (Timeout, PeerLost):  # the first to time out aborts its neighbours
                state = "failed"
            voted = h.voted
            if r == 0:
                h.settle(False)  # the arbiter said no: the input stays as it was
            else:
                h.settle(True)
            return state, voted

        results = ring.run_ok(run, timeout=30)
    assert results[1] == ("committed", True)
    assert results[0] == ("failed", True) and results[2] == ("failed", True)
    np.testing.assert_array_equal(xs[1], expected)
    np.testing.assert_array_equal(xs[2], expected)  # voted, then settled as a success
    np.testing.assert_array_equal(xs[0], originals[0])  # voted, settled as a failure


def test_a_peer_that_never_completes_never_votes_and_nobody_commits() -> None:
    """Rank 2 never posts: nobody's data completes, so no peer votes or commits."""
    n = 3
    xs = _inputs(n, 1 << 12)
    originals = [x.copy() for x in xs]
    with EngineRing(n) as ring:
        handles = [
            ring.engines[r].all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20, defer_commit=True, vote=True)
            for r in range(2)
        ]
        ring.engines[2].close()  # its connections close: the others fail
        for h in handles:
            assert h.wait(10)
            with pytest.raises((PeerLost, Aborted, Timeout)):
                h.result()
            assert h.voted is False
            h.settle(True)  # nothing held: the input is untouched
    for x, orig in zip(xs[:2], originals[:2]):
        np.testing.assert_array_equal(x, orig)


def test_unknown_fault_kind_is_rejected() -> None:
    with EngineRing(1) as ring:
        with pytest.raises(Exception, match="unknown fault"):
            ring.engines[0].inject_fault("no_such_fault", 1)


def test_many_voting_ops_back_to_back_on_three_tags() -> None:
    n, rounds = 3, 50
    with EngineRing(n) as ring:
        lock = threading.Lock()
        sums: list[float] = []

        def run(r: int, e) -> None:
            for step in range(rounds):
                hs = []
                bufs = []
                for tag in range(3):
                    x = np.full(257, float(r + step + tag), np.float32)
                    bufs.append(x)
                    hs.append(e.all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=tag, seq=step + 1, timeout=20, defer_commit=True, vote=True))
                for h in hs:
                    h.result()
                    h.settle(True)
                with lock:
                    sums.extend(float(b[0]) for b in bufs)

        ring.run_ok(run, timeout=60)
    # each (step, tag) sums r + step + tag over r = 0..n-1
    expected = sorted(float(sum(r + s + t for r in range(n))) for s in range(rounds) for t in range(3) for _ in range(n))
    assert sorted(sums) == expected


@pytest.mark.parametrize("vote", [True, False])
def test_a_deferred_in_place_success_settled_without_commit_gives_the_input_back(vote: bool) -> None:
    """The result is built in the caller's buffer; an arbiter's veto (settle(False))
    must still leave the caller's input exactly as it was, and a second settle is a
    no-op."""
    n, count = 3, (1 << 18) + 5
    xs = _inputs(n, count)
    originals = [x.copy() for x in xs]
    with EngineRing(n) as ring:

        def run(r: int, e) -> None:
            h = e.all_reduce(xs[r], xs[r], DT.FLOAT32, OP.SUM, tag=0, seq=1, timeout=20, defer_commit=True, vote=vote)
            h.result()
            h.settle(False)
            h.settle(True)  # too late: already settled

        ring.run_ok(run)
    for x, orig in zip(xs, originals):
        np.testing.assert_array_equal(x, orig)
