"""Pools opened ahead of a join (Engine.prepare): a joiner's pools to the members, and
each member's to the joiner, open while the master admits it, then the epoch that admits
it keeps them (kRebind, no connect, no handshake). Where the round trip is long enough,
a prepared connection sends padding (kPadding frames, dropped by the receiver) so that
its windows have grown before the first op; the padding stops at the first frame of an
op (a prepared pool's kRebind goes behind it, and it pads on), once its congestion
control has left slow start, and at its byte and time caps. On loopback every round trip
is short, so these tests warm with warm_min_rtt=0. Counted, not timed:
Engine.connections_opened / connections_kept / padding_bytes."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from engine_harness import DT, HOST, OP

import pccl_py._native as nat
from pccl_py.errors import PcclError

pytestmark = pytest.mark.timeout(120)

RSAG = nat.AllReduceAlgorithm.DIRECT_RSAG
K = 2


@pytest.fixture
def engines() -> Iterator[list[nat.Engine]]:
    """Three engines: 0 and 1 are members (a ring of epoch 1), 2 the joiner (no ring yet)."""
    made = [nat.Engine(peer_id=100 + i, host=HOST, port=0, connections_per_peer=K) for i in range(3)]
    try:
        members = [(e.peer_id, HOST, e.port) for e in made[:2]]
        for r, e in enumerate(made[:2]):
            e.set_ring(1, members, r, timeout=10.0, connect_all=True)
        yield made
    finally:
        for e in made:
            e.close()


def address(e: nat.Engine) -> tuple[int, str, int]:
    return (e.peer_id, HOST, e.port)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while not check():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def settled(read: Callable[[], int], quiet: float = 0.3, timeout: float = 20.0) -> int:
    """`read()` once it has stopped changing for `quiet` seconds."""
    until = time.monotonic() + timeout
    before = read()
    while True:
        time.sleep(quiet)
        now = read()
        if now == before:
            return now
        if time.monotonic() > until:
            raise AssertionError(f"still changing after {timeout} s: {before} -> {now}")
        before = now


def prepare_join(made: list[nat.Engine], warm: float = 5.0, warm_bytes: int = 1 << 40) -> None:
    """What a join does ahead of its epoch: the joiner to both members, each member to it."""
    joiner = made[2]
    with ThreadPoolExecutor(3) as pool:
        jobs = [
            pool.submit(joiner.prepare, [address(e) for e in made[:2]], 1, 2, 10.0, warm, warm_bytes, 0.0),
            *(pool.submit(e.prepare, [address(joiner)], 1, 2, 10.0, warm, warm_bytes, 0.0) for e in made[:2]),
        ]
        for job in jobs:
            job.result(timeout=10)


def admit(made: list[nat.Engine], epoch: int = 2) -> None:
    """Every engine moves to the ring of all three (as after the vote that admits the joiner)."""
    ring = [address(e) for e in made]
    with ThreadPoolExecutor(3) as pool:
        for job in [pool.submit(e.set_ring, epoch, ring, r, 10.0, True) for r, e in enumerate(made)]:
            job.result(timeout=10)


def all_reduce(made: list[nat.Engine], epoch: int, seq: int, count: int = 100_003) -> None:
    """An exact sum over every engine, keys of `epoch`."""
    data = [np.arange(count, dtype=np.float32) * (r + 1) for r in range(len(made))]
    outs = [np.empty_like(d) for d in data]

    def one(r: int) -> tuple[int, int, int]:
        h = made[r].all_reduce(
            data[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=20.0, algorithm=RSAG
        )
        h.result()
        return h.key

    with ThreadPoolExecutor(len(made)) as pool:
        keys = [job.result(timeout=30) for job in [pool.submit(one, r) for r in range(len(made))]]
    assert all(k[0] == epoch for k in keys), keys
    want = sum(data)
    for out in outs:
        np.testing.assert_array_equal(out, want)


def test_prepared_pools_warm_and_the_admitting_epoch_keeps_them(engines: list[nat.Engine]) -> None:
    opened_before = [e.connections_opened for e in engines]
    prepare_join(engines)
    assert [e.connections_opened - b for e, b in zip(engines, opened_before, strict=True)] == [K, K, 2 * K]
    for e in engines:  # every prepared pool sends padding while it waits
        wait_for(lambda e=e: e.padding_bytes > 0, f"padding from peer {e.peer_id}")
    opened = [e.connections_opened for e in engines]
    admit(engines)
    assert [e.connections_opened for e in engines] == opened, "a prepared pool was opened again"
    # Members keep their pool to each other and the one to the joiner; the joiner both of its own.
    assert [e.connections_kept for e in engines] == [2 * K, 2 * K, 2 * K]
    # A kept pool pads on until its first op frame (on loopback TCP leaves slow start at
    # once, and that stops it earlier); after the ops, none.
    padded = [settled(lambda e=e: e.padding_bytes) for e in engines]
    all_reduce(engines, epoch=2, seq=0)
    all_reduce(engines, epoch=2, seq=1)
    assert [e.padding_bytes for e in engines] == padded
    assert [e.connections_opened for e in engines] == opened


def test_an_op_on_a_warming_pool_stops_its_padding(engines: list[nat.Engine]) -> None:
    """A pool prepared for the epoch the op runs in carries the op right away: the padding
    already queued goes first, then the op's frames, and no padding after them."""
    joiner = engines[2]
    ring = [address(e) for e in engines]
    # Epoch 3 for everyone, prepared for 3 by the joiner only: its ring pools are those.
    joiner.prepare([address(e) for e in engines[:2]], 3, 2, 10.0, 5.0, 1 << 40, 0.0)
    wait_for(lambda: joiner.padding_bytes > 0, "padding")
    with ThreadPoolExecutor(3) as pool:
        for job in [pool.submit(e.set_ring, 3, ring, r, 10.0, True) for r, e in enumerate(engines)]:
            job.result(timeout=10)
    all_reduce(engines, epoch=3, seq=0)
    padded = settled(lambda: joiner.padding_bytes)
    all_reduce(engines, epoch=3, seq=1)
    time.sleep(0.3)
    assert joiner.padding_bytes == padded


def test_padding_stops_at_its_byte_cap_and_time_cap(engines: list[nat.Engine]) -> None:
    joiner = engines[2]
    cap = (200 << 10) + 12_345  # not a whole number of padding frames; within the first flight
    joiner.prepare([address(engines[0])], 1, 1, 10.0, 30.0, cap, 0.0)
    wait_for(lambda: joiner.padding_bytes >= cap, "the byte cap")
    assert settled(lambda: joiner.padding_bytes) == K * cap  # each connection of the pool, exactly its cap
    member = engines[1]
    member.prepare([address(joiner)], 1, 1, 10.0, 0.3, 1 << 40, 0.0)
    wait_for(lambda: member.padding_bytes > 0, "padding")
    time.sleep(0.5)  # past the time cap
    stopped = settled(lambda: member.padding_bytes)
    time.sleep(0.3)
    assert member.padding_bytes == stopped
    # A stopped pool is still whole and idle: the admitting epoch keeps it.
    kept = member.connections_kept
    joiner.prepare([address(engines[1])], 1, 1, 10.0, 0.0, 0, 0.0)
    engines[0].prepare([address(joiner)], 1, 1, 10.0, 0.0, 0, 0.0)
    admit(engines)
    assert member.connections_kept - kept == 2 * K
    all_reduce(engines, epoch=2, seq=0)


def test_no_padding_where_the_round_trip_is_short(engines: list[nat.Engine]) -> None:
    joiner = engines[2]
    joiner.prepare([address(e) for e in engines[:2]], 1, 2, 10.0, 5.0, 1 << 40, 0.002)  # loopback: < 2 ms
    for e in engines[:2]:
        e.prepare([address(joiner)], 1, 2, 10.0, 5.0, 1 << 40, 0.002)
    time.sleep(0.3)
    assert [e.padding_bytes for e in engines] == [0, 0, 0]
    admit(engines)
    assert [e.connections_kept for e in engines] == [2 * K, 2 * K, 2 * K]
    all_reduce(engines, epoch=2, seq=0)


def test_a_peer_that_cannot_be_reached_fails_the_prepare(engines: list[nat.Engine]) -> None:
    gone = nat.Engine(peer_id=999, host=HOST, port=0)
    port = gone.port
    gone.close()
    start = time.monotonic()
    with pytest.raises(PcclError):
        engines[2].prepare([(999, HOST, port)], 1, 1, 2.0, 5.0, 1 << 40, 0.0)
    assert time.monotonic() - start < 5.0
    with pytest.raises(PcclError):
        engines[2].prepare([address(engines[2])], 1, 1, 2.0)  # a pool to itself


@contextlib.contextmanager
def stuck_prepare(member: nat.Engine) -> Iterator[tuple[tuple[int, str, int], Future[None], ThreadPoolExecutor]]:
    """`member` preparing a pool (for 5 s at most) to a peer that accepts TCP but never
    answers the handshake (a process stopped, say): (that peer, the prepare, a pool of
    threads for more calls)."""
    with socket.socket() as silent, ThreadPoolExecutor(2) as pool:
        silent.bind((HOST, 0))
        silent.listen(8)
        stuck = (777, HOST, silent.getsockname()[1])
        job = pool.submit(member.prepare, [stuck], 1, 1, 5.0, 0.0, 0, 0.0)
        time.sleep(0.2)  # connected, waiting for the handshake's answer
        yield stuck, job, pool


def test_an_epoch_waits_for_a_prepare_only_as_long_as_its_own_timeout(engines: list[nat.Engine]) -> None:
    """A prepare to a peer that accepts TCP but never answers the handshake (a process
    stopped, say) holds an epoch with that peer for set_ring's timeout at most; an
    epoch without it does not wait at all."""
    member = engines[0]
    others = [address(e) for e in engines[:2]]
    with stuck_prepare(member) as (stuck, job, _):
        start = time.monotonic()
        member.set_ring(2, others, 0, 10.0, True)  # not a peer of this ring: no wait
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        with pytest.raises(PcclError):
            member.set_ring(3, [*others, stuck], 0, 1.0, True)
        assert time.monotonic() - start < 3.0  # its own 1 s (and its own connect's), not the prepare's 5 s
        with pytest.raises(PcclError):
            job.result(timeout=10)


def test_a_second_prepare_leaves_a_peer_to_the_one_still_opening_its_pool(engines: list[nat.Engine]) -> None:
    """A join's knock and then its welcome (or "joining") name the same peers: a prepare
    to a peer that another is still opening a pool to returns at once, opens nothing and
    does not wait for that peer; the first one goes on (and here fails, as it would)."""
    member = engines[0]
    with stuck_prepare(member) as (stuck, job, _):
        start = time.monotonic()
        member.prepare([stuck], 1, 1, 5.0, 0.0, 0, 0.0)  # would wait 5 s for the handshake, then fail
        assert time.monotonic() - start < 1.0
        assert not job.done()
        with pytest.raises(PcclError):
            job.result(timeout=10)


def test_kept_pools_rebind_while_an_epoch_waits_for_a_prepare(engines: list[nat.Engine]) -> None:
    """An epoch that waits for a prepare still opening (to the joiner) sends its rebinds
    to the peers it keeps pools to first: their round trip runs during the wait, not
    after it (a join at RTT 100 ms paid both, one after the other)."""
    member = engines[0]
    others = [address(e) for e in engines[:2]]
    kept = member.connections_kept
    with stuck_prepare(member) as (stuck, job, pool):
        ring = pool.submit(member.set_ring, 2, [*others, stuck], 0, 3.0, True)
        wait_for(lambda: member.connections_kept == kept + K, "the pool to the other member rebound", 2.5)
        assert not ring.done()  # still waiting for the prepare
        with pytest.raises(PcclError):
            ring.result(timeout=10)
        with pytest.raises(PcclError):
            job.result(timeout=10)
