"""Same-host rings (native/src/transport/shared_ring.hpp): payloads between engines on
one host go through a shared-memory ring per connection instead of loopback TCP; only
the headers stay on the stream. These tests check that every collective's large
payloads take that path once the ring is up, with exact results; that a full ring
(payloads then go on the stream, interleaved) and frames waiting for their op keep the
order; that a peer which cannot or will not map a ring keeps TCP; and that the engine
refuses offers it cannot verify and ring payloads it never agreed to.

Failures mid-op with rings in use are covered by test_engine_failures.py, whose 4 MiB
ops run over rings since they became the default."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from engine_harness import DT, HOST, OP, EngineRing, chunk_bounds, recv_exact

from pccl_py import _native as nat

pytestmark = pytest.mark.timeout(120)

AG = nat.CollectiveKind.ALL_GATHER
RS = nat.CollectiveKind.REDUCE_SCATTER
BC = nat.CollectiveKind.BROADCAST
COUNT = 1_000_003  # float32: 4 MB, so every frame is far above the ring's 4 KiB floor
TIMEOUT = 30.0


def _inputs(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-1000, 1000, count).astype(np.float32) for _ in range(n)]


def _expected(kind: Any, xs: list[np.ndarray], rank: int) -> np.ndarray:
    n = len(xs)
    if kind == AG:
        return np.concatenate(xs)
    if kind == BC:
        return xs[0]
    total = np.sum(np.stack(xs), axis=0, dtype=np.float32)  # small integers: exact in any order
    if kind == RS:
        b = chunk_bounds(total.size, n)
        return total[b[rank] : b[rank + 1]]
    return total


def _run(ring: EngineRing, kind: Any, xs: list[np.ndarray], seq: int) -> list[tuple[np.ndarray, int, int]]:
    """One op of `kind` on every rank: (output, tx bytes, ring bytes sent during it)."""
    n = ring.n

    def fn(r: int, e: nat.Engine) -> tuple[np.ndarray, int, int]:
        before = e.shared_memory_bytes
        x = xs[r].copy()
        if kind == "all_reduce":
            out = np.zeros_like(x)
            h = e.all_reduce(x, out, DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=TIMEOUT, vote=True)
        else:
            if kind == AG:
                out = np.zeros(n * x.size, np.float32)
            elif kind == RS:
                b = chunk_bounds(x.size, n)
                out = np.zeros(b[r + 1] - b[r], np.float32)
            else:
                out = x  # broadcast: in place
            h = e.all_to_all(kind, x, out, DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=TIMEOUT, vote=True, root=0)
        h.result()
        return out, h.tx_bytes, e.shared_memory_bytes - before

    return ring.run_ok(fn, timeout=TIMEOUT + 30)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", ["all_reduce", AG, RS, BC], ids=["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
def test_every_collective_sends_its_payloads_through_the_ring_once_it_is_up(n: int, kind: Any) -> None:
    xs = _inputs(n, COUNT, seed=n)
    with EngineRing(n) as ring:
        first = _run(ring, kind, xs, seq=1)  # offers the rings; payloads go on the stream until answered
        time.sleep(0.2)  # every answer is in
        second = _run(ring, kind, xs, seq=2)
    for results in (first, second):
        for r, (out, _, _) in enumerate(results):
            np.testing.assert_array_equal(out, _expected(kind, xs, r))
    # Each connection carries at most 4 MB per op and a ring holds 8 MiB: every payload fits.
    for r, (_, tx, via_ring) in enumerate(second):
        assert via_ring == tx, f"rank {r}: {via_ring} of {tx} payload bytes through the ring"
    assert sum(tx for _, tx, _ in second) > 0


def _pair_all_gathers(hosts: list[str], shared_memory: list[bool]) -> list[int]:
    """Two engines (on `hosts`), two all-gathers of 4 MB each with exact results: the
    bytes each engine sent through rings."""
    xs = _inputs(2, COUNT, seed=7)
    engines = [nat.Engine(peer_id=1 + r, host=hosts[r], shared_memory=shared_memory[r]) for r in range(2)]
    try:
        ring = [(e.peer_id, hosts[r], e.port) for r, e in enumerate(engines)]
        for r, e in enumerate(engines):
            e.set_ring(1, ring, r, timeout=10.0)  # each connects to its successor, whose thread answers
        for seq in (1, 2):
            outs = [np.zeros(2 * COUNT, np.float32) for _ in range(2)]
            handles = [
                e.all_to_all(AG, xs[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=TIMEOUT, vote=True)
                for r, e in enumerate(engines)
            ]
            for h in handles:
                h.result()
            for out in outs:
                np.testing.assert_array_equal(out, np.concatenate(xs))
            time.sleep(0.1)  # the offers' answers are in before the second op
        return [e.shared_memory_bytes for e in engines]
    finally:
        for e in engines:
            e.close()


def test_a_peer_with_shared_memory_off_keeps_every_connection_on_tcp() -> None:
    # Rank 0 offers and is refused; rank 1 never offers.
    assert _pair_all_gathers([HOST, HOST], [True, False]) == [0, 0]


def test_engines_on_two_loopback_addresses_use_the_ring() -> None:
    """Two engines on different loopback addresses are still on one host: the ring is
    used (what "local" means: loopback, or the socket's own address)."""
    assert all(sent > 0 for sent in _pair_all_gathers(["127.0.0.1", "127.0.0.2"], [True, True]))


@pytest.mark.parametrize("segment_bytes", [40_000, 100_000])
def test_a_full_ring_sends_the_rest_on_the_stream_in_order(segment_bytes: int) -> None:
    """A 64 KiB ring and segments that do not divide it: payloads wrap, the ring fills,
    and frames alternate between the ring and the stream."""
    n = 3
    xs = _inputs(n, COUNT, seed=11)
    want = np.sum(np.stack(xs), axis=0, dtype=np.float32)
    with EngineRing(n, ring_bytes=64 << 10) as ring:
        via_ring = tx_total = 0
        for seq in range(1, 5):

            def fn(r: int, e: nat.Engine, seq: int = seq) -> tuple[np.ndarray, int, int]:
                before = e.shared_memory_bytes
                out = np.zeros_like(xs[r])
                h = e.all_reduce(xs[r], out, DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=TIMEOUT,
                                 segment_bytes=segment_bytes, vote=True)
                h.result()
                return out, h.tx_bytes, e.shared_memory_bytes - before

            for out, tx, ringed in ring.run_ok(fn, timeout=TIMEOUT + 30):
                np.testing.assert_array_equal(out, want)
                via_ring += ringed
                tx_total += tx
    assert 0 < via_ring < tx_total, (via_ring, tx_total)


def test_payloads_that_arrive_before_their_op_wait_in_the_ring() -> None:
    """The root's payloads are in the ring before the receiver posts the broadcast: the
    receiver stops reading the stream, and takes them from the ring once it posts."""
    xs = _inputs(2, COUNT, seed=5)
    with EngineRing(2) as ring:
        for seq, delay in ((1, 0.0), (2, 0.5), (3, 0.5)):
            bufs = [x.copy() for x in xs]

            def fn(r: int, e: nat.Engine, seq: int = seq, delay: float = delay, bufs: list = bufs) -> int:
                if r == 1:
                    time.sleep(delay)
                before = e.shared_memory_bytes
                e.all_to_all(BC, bufs[r], bufs[r], DT.FLOAT32, OP.SUM, tag=0, seq=seq, timeout=TIMEOUT, vote=True,
                             root=0).result()
                return e.shared_memory_bytes - before

            ringed = ring.run_ok(fn, timeout=TIMEOUT + 30)
            np.testing.assert_array_equal(bufs[1], xs[0])
            if seq == 3:
                assert ringed[0] == xs[0].nbytes, ringed  # the root's whole buffer went through the ring


# ---------------------------------------------------------------- a fake peer on a raw socket

_HELLO, _HELLO_ACK, _HEADER = (
    struct.Struct(nat.HELLO_FORMAT), struct.Struct(nat.HELLO_ACK_FORMAT), struct.Struct(nat.FRAME_HEADER_FORMAT)
)
_OFFER = struct.Struct("<IIiIQ16s")  # RingOffer (shared_ring.hpp)
_RING_MAGIC = 0x474E5250
_DATA, _RING_OFFER, _RING_ANSWER = 1, 13, 14
_IN_RING = 1
_PAGE = 4096



class _FakePeer:
    """Connects to an engine's data port as peer 2000 and speaks frames to it."""

    def __init__(self, engine: nat.Engine) -> None:
        self.sock = socket.create_connection((HOST, engine.port), timeout=10)
        self.sock.sendall(_HELLO.pack(nat.HELLO_MAGIC, nat.PROTOCOL_VERSION, 2000, 1, 0, 1))
        recv_exact(self.sock, _HELLO_ACK.size)

    def frame(self, type_: int, payload: bytes = b"", *, flags: int = 0, length: int | None = None) -> None:
        size = len(payload) if length is None else length
        self.sock.sendall(_HEADER.pack(nat.FRAME_MAGIC, type_, 0, flags, size, 0, 1, 0, 1, 0) + payload)

    def answer(self) -> int:
        header = _HEADER.unpack(recv_exact(self.sock, _HEADER.size))
        assert header[1] == _RING_ANSWER and header[4] == 0, header
        return int(header[2])  # phase: 0 mapped, 1 refused

    def close(self) -> None:
        self.sock.close()


TOKEN = b"T" * 16


@contextlib.contextmanager
def _fake_peer(shared_memory: bool = True) -> Iterator[tuple[_FakePeer, Callable[..., bytes]]]:
    """An engine, a fake peer connected to it, and offer(fd=, token=): a RingOffer for a
    64 KiB memfd ring of this process that holds TOKEN."""
    capacity = 64 << 10
    engine = nat.Engine(peer_id=1000, host=HOST, shared_memory=shared_memory)
    fd = os.memfd_create("test-ring")
    os.ftruncate(fd, _PAGE + capacity)
    m = mmap.mmap(fd, _PAGE + capacity)
    m[:24] = struct.pack("<II16s", _RING_MAGIC, 0, TOKEN)
    peer = None

    def offer(*, ring_fd: int = fd, token: bytes = TOKEN) -> bytes:
        return _OFFER.pack(_RING_MAGIC, os.getpid(), ring_fd, 0, capacity, token)

    try:
        peer = _FakePeer(engine)
        yield peer, offer
    finally:
        if peer is not None:
            peer.close()
        engine.close()
        m.close()
        os.close(fd)


def test_the_engine_maps_only_a_ring_whose_token_matches() -> None:
    with _fake_peer() as (peer, offer):
        peer.frame(_RING_OFFER, offer(token=b"X" * 16))
        assert peer.answer() == 1, "a ring whose token differs was mapped"
        peer.frame(_RING_OFFER, offer(ring_fd=987654))
        assert peer.answer() == 1, "a file that does not exist was mapped"
        peer.frame(_RING_OFFER, offer())
        assert peer.answer() == 0, "the ring offered was refused"
        peer.frame(_RING_OFFER, offer())
        assert peer.answer() == 1, "a second ring on one connection was mapped"


def test_an_engine_with_shared_memory_off_refuses_every_offer() -> None:
    with _fake_peer(shared_memory=False) as (peer, offer):
        peer.frame(_RING_OFFER, offer())
        assert peer.answer() == 1


@pytest.mark.parametrize("case", ["no_ring", "bigger_than_ring", "flag_on_control_frame"])
def test_a_ring_payload_the_engine_cannot_take_closes_the_connection(case: str) -> None:
    with _fake_peer() as (peer, offer):
        if case == "no_ring":
            peer.frame(_DATA, flags=_IN_RING, length=8192)
        elif case == "bigger_than_ring":
            peer.frame(_RING_OFFER, offer())
            assert peer.answer() == 0
            peer.frame(_DATA, flags=_IN_RING, length=(64 << 10) + 4096)
        else:
            peer.frame(_RING_ANSWER, flags=_IN_RING)
        peer.sock.settimeout(10)
        with pytest.raises((EOFError, ConnectionResetError)):
            recv_exact(peer.sock, 1)
