"""Pools kept across a re-ring (Engine::rebindPools, the kRebind / kRebound frames): a
new epoch whose ring keeps a peer reuses the whole, idle pool to it instead of opening a
new one (no connect, no handshake, no slow start); pools to peers that left are closed;
an op of the older epoch still running when the ring changes fails; its pools are kept
when they hold nothing of it (the peer drops the older epoch's frames that still
arrive), and opened afresh otherwise, so the new epoch's ops never share a stream with
half a frame of it. Counted, not timed: Engine.connections_opened / connections_kept."""

from __future__ import annotations

import time

import numpy as np
import pytest
from engine_harness import DT, HOST, OP, EngineRing

import pccl_py._native as nat
from pccl_py.errors import PcclError

pytestmark = pytest.mark.timeout(120)

RSAG = nat.AllReduceAlgorithm.DIRECT_RSAG


def _reduce(ring: EngineRing, ranks: list[int], data: list[np.ndarray], epoch: int, algorithm=RSAG) -> None:
    """One all-reduce over `ranks` (the current ring), checked: the exact sum, keys of `epoch`."""
    seq = ring.next_seq()
    outs = {r: np.empty_like(data[r]) for r in ranks}

    def fn(r: int, e: nat.Engine) -> tuple[int, int, int]:
        h = e.all_reduce(data[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=20.0, algorithm=algorithm)
        h.result()
        return h.key

    outcomes = ring.run(fn, ranks=ranks, timeout=40.0)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    want = sum(data[r] for r in ranks)
    for o in outcomes:
        assert o.value[0] == epoch
        np.testing.assert_array_equal(outs[o.rank], want)


def _data(n: int, count: int = 1 << 16) -> list[np.ndarray]:
    return [np.full(count, float(r + 1), np.float32) for r in range(n)]


def test_a_re_ring_with_the_same_peers_keeps_every_pool() -> None:
    n, k = 3, 2
    with EngineRing(n, connections_per_peer=k) as ring:
        data = _data(n)
        _reduce(ring, list(range(n)), data, 1)  # pools to every peer, epoch 1
        opened = [e.connections_opened for e in ring.engines]
        assert opened == [k * (n - 1)] * n
        for r, e in enumerate(ring.engines):  # one after another: each waits for its peers' kRebound
            e.set_ring(2, ring.addresses, r, timeout=10.0, connect_all=True)
        for r, e in enumerate(ring.engines):
            assert e.connections_opened == opened[r], "a kept pool was opened again"
            assert e.connections_kept == k * (n - 1)
            for other in range(n):
                if other != r:
                    assert e.live_connections(ring.peer_id(other), 2) == k
                    assert e.live_connections(ring.peer_id(other), 1) == 0
        _reduce(ring, list(range(n)), data, 2)
        _reduce(ring, list(range(n)), data, 2, algorithm=nat.AllReduceAlgorithm.RING)
        assert [e.connections_opened for e in ring.engines] == opened


def test_a_re_ring_without_a_peer_keeps_the_others_and_closes_its_pools() -> None:
    n, k = 4, 2
    with EngineRing(n, connections_per_peer=k) as ring:
        data = _data(n)
        _reduce(ring, list(range(n)), data, 1)
        opened = [e.connections_opened for e in ring.engines]
        survivors = [2, 0, 1]  # another order, rank 3 left
        new_ring = [ring.addresses[r] for r in survivors]
        for pos, r in enumerate(survivors):
            ring.engines[r].set_ring(2, new_ring, pos, timeout=10.0, connect_all=True)
        for r in survivors:
            e = ring.engines[r]
            assert e.connections_opened == opened[r]
            assert e.connections_kept == k * 2
            assert e.live_connections(ring.peer_id(3), 1) == 0
            assert e.live_connections(ring.peer_id(3), 2) == 0
        _reduce(ring, survivors, data, 2)


def test_a_re_ring_that_adds_a_peer_opens_only_the_pools_to_it() -> None:
    n, k = 3, 2
    with EngineRing(n, connections_per_peer=k) as ring:
        joiner = nat.Engine(peer_id=ring.peer_id(n), host=HOST, port=0, connections_per_peer=k)
        try:
            data = _data(n + 1)
            _reduce(ring, list(range(n)), data, 1)
            opened = [e.connections_opened for e in ring.engines]
            ring.engines.append(joiner)
            ring.n = n + 1
            addresses = [*ring.addresses, (joiner.peer_id, HOST, joiner.port)]
            outcomes = ring.run(lambda r, e: e.set_ring(2, addresses, r, timeout=10.0, connect_all=True))
            assert all(o.ok for o in outcomes), [o.error for o in outcomes]
            for r in range(n):
                assert ring.engines[r].connections_opened == opened[r] + k, "only the pool to the joiner is new"
                assert ring.engines[r].connections_kept == k * (n - 1)
            assert joiner.connections_opened == k * n
            _reduce(ring, list(range(n + 1)), data, 2)
        finally:
            joiner.close()


def test_an_op_still_running_at_a_re_ring_fails_with_its_input_intact_and_its_idle_pool_is_kept() -> None:
    """Everything of the op was sent (the peer holds it in its mailbox): its connections
    hold nothing of it, so they stay warm for the new epoch; the peer drops the frames
    of the old epoch."""
    k = 2
    with EngineRing(2, connections_per_peer=k) as ring:
        data = _data(2)
        _reduce(ring, [0, 1], data, 1)
        # Rank 0 posts an op of epoch 1 that rank 1 never posts: still running at the re-ring.
        x = data[0].copy()
        h = ring.engines[0].all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=5, seq=0, timeout=30.0, algorithm=RSAG)
        time.sleep(0.3)  # its frames reach rank 1, which waits for the op to be posted
        # Both move to the new epoch at once, as a master's topology makes them: rank 1
        # drops the frames of the old epoch, reads the kRebind behind them and confirms.
        started = time.monotonic()
        outcomes = ring.run(lambda r, e: e.set_ring(2, ring.addresses, r, timeout=10.0, connect_all=True),
                            timeout=20.0)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert time.monotonic() - started < 0.9  # confirmed, not given up after the rebind wait
        with pytest.raises(PcclError, match="replaced this op's epoch"):
            h.result(timeout=5.0)
        np.testing.assert_array_equal(x, data[0])  # the input is intact
        assert [e.connections_kept for e in ring.engines] == [k, k]
        assert [e.connections_opened for e in ring.engines] == [k, k]
        _reduce(ring, [0, 1], data, 2)


def test_an_op_still_sending_at_a_re_ring_fails_with_its_input_intact_and_its_pool_is_not_kept() -> None:
    """Rank 1's mailbox has no room for the op's frames, so rank 0 still has some to send
    at the re-ring: that pool is closed (a stream that may hold half a frame of the op
    never carries the new epoch's), the next epoch opens its own, and it is exact."""
    k = 2
    with EngineRing(2, connections_per_peer=k, mailbox_limit_bytes=64 << 10, shared_memory=False) as ring:
        data = _data(2)
        _reduce(ring, [0, 1], data, 1)
        big = np.full(4 << 20, 1.0, np.float32)  # 16 MiB: more than the mailbox and the sockets hold
        x = big.copy()
        h = ring.engines[0].all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=5, seq=0, timeout=30.0, algorithm=RSAG)
        time.sleep(0.3)
        for r, e in enumerate(ring.engines):
            e.set_ring(2, ring.addresses, r, timeout=10.0, connect_all=True)
        with pytest.raises(PcclError):
            h.result(timeout=5.0)
        np.testing.assert_array_equal(x, big)  # the input is intact
        assert ring.engines[0].connections_kept == 0
        assert ring.engines[0].live_connections(ring.peer_id(1), 2) == k
        _reduce(ring, [0, 1], data, 2)


def test_auto_sized_pools_with_a_secret_handshake_only_what_they_need_and_are_kept() -> None:
    """connections_per_peer=0: a first pool starts with kAutoMaxConnections TCP connects
    and keeps what its round trip asks for (1 on loopback); the extra ones close before
    their (authenticated) handshake and never join a pool."""
    n = 3
    with EngineRing(n, connections_per_peer=0, secret=b"rebind-secret") as ring:
        data = _data(n)
        _reduce(ring, list(range(n)), data, 1)
        for r, e in enumerate(ring.engines):
            sizes = [e.pool_size(ring.peer_id(o)) for o in range(n) if o != r]
            assert sizes == [1] * (n - 1)
            assert e.connections_opened == n - 1
        for r, e in enumerate(ring.engines):
            e.set_ring(2, ring.addresses, r, timeout=10.0, connect_all=True)
        for e in ring.engines:
            assert e.connections_opened == n - 1
            assert e.connections_kept == n - 1
        _reduce(ring, list(range(n)), data, 2)


@pytest.mark.parametrize(
    "rtt,sndbuf,sharers,want",
    [
        (0.0002, 4 << 20, 1, 1),  # loopback
        (0.05, 4 << 20, 1, 3),  # one pool (the ring): the whole 1 Gbit/s through it
        (0.05, 4 << 20, 3, 1),  # N=4, direct algorithms: three pools share the link
        (0.1, 4 << 20, 3, 2),
        (0.1, 4 << 20, 1, 5),
        (0.3, 1 << 20, 1, 8),  # capped at kAutoMaxConnections
        (0.0, 4 << 20, 1, 1),  # no round trip measured
    ],
)
def test_auto_pool_size_carries_each_pools_share_of_the_link(rtt: float, sndbuf: int, sharers: int, want: int) -> None:
    assert nat.auto_pool_size(rtt, sndbuf, sharers) == want


@pytest.mark.parametrize(
    ("sharers", "pool_size", "want"),
    [
        (1, 3, 1e9 / 8 * 1.1 / 3),  # N=2 at 100 ms: the whole link over 3 connections
        (2, 2, 0.5e9 / 8 * 1.1 / 2),  # N=3: half the link each pool
        (3, 1, 0),  # one connection: its window limits it, not paced
        (1, 1, 0),
    ],
)
def test_auto_pacing_rate_is_each_connections_part_of_the_share(sharers: int, pool_size: int, want: float) -> None:
    assert nat.auto_pacing_rate(sharers, pool_size) == pytest.approx(want, abs=1)
