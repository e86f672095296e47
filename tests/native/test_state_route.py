"""A fetch over the source's own pool to the fetcher (Engine::fetchRoute): a member's
pool to a joiner has carried the join's padding, so its congestion windows are open
where a new state connection would start in slow start. The requests go out on the
fetcher's side of that pool and the source answers on it; the fetcher opens no
connection. A refusal comes back the same way, and a route that breaks fails the
fetch at once (not at its timeout)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from engine_harness import HOST, ROUTE_SOURCE_SEED, route_source_peer

import pccl_py._native as nat
from pccl_py.errors import PeerLost

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair() -> Iterator[tuple[nat.Engine, nat.Engine]]:
    source, fetcher = (nat.Engine(peer_id=300 + i, host=HOST, port=0) for i in range(2))
    try:
        yield source, fetcher
    finally:
        fetcher.close()
        source.close()


def _routed(fetcher: nat.Engine, source: int, timeout: float = 10.0) -> None:
    """Waits until the fetcher holds the source's pool (a round trip measured on it)."""
    deadline = time.monotonic() + timeout
    while fetcher.state_round_trip(source) == 0.0:
        assert time.monotonic() < deadline, "the source's pool never reached the fetcher"
        time.sleep(0.01)


def _chunks(nbytes: int, piece: int) -> list[tuple[int, int, int, int, int]]:
    return [(0, at, min(piece, nbytes - at), 0, at) for at in range(0, nbytes, piece)]


def test_a_fetch_goes_over_the_sources_own_pool(pair: tuple[nat.Engine, nat.Engine]) -> None:
    source, fetcher = pair
    source.prepare([(fetcher.peer_id, HOST, fetcher.port)], 1, 1, 10.0, 0.0, 0, 0.0)
    _routed(fetcher, source.peer_id)
    data = np.random.default_rng(3).standard_normal(2 << 20).astype(np.float32)  # 8 MiB
    exposure = source.expose_state([data])
    try:
        for piece in (4 << 20, 1 << 20):
            dst = np.zeros_like(data)
            handle = fetcher.fetch_state(
                source.peer_id, HOST, source.port, exposure.id, [dst], _chunks(data.nbytes, piece), timeout=30
            )
            handle.result(timeout=30)
            np.testing.assert_array_equal(dst, data)
        assert fetcher.clamp_state_windows([source.peer_id], 1 << 20, starting=True) >= 1  # the route is clamped
    finally:
        served = exposure.close()
    assert served == 2 * data.nbytes
    assert fetcher.connections_opened == 0  # no state pool: the source's pool carried it all
    assert fetcher.state_rx_bytes == 2 * data.nbytes


def test_a_refusal_comes_back_over_the_route(pair: tuple[nat.Engine, nat.Engine]) -> None:
    source, fetcher = pair
    source.prepare([(fetcher.peer_id, HOST, fetcher.port)], 1, 1, 10.0, 0.0, 0, 0.0)
    _routed(fetcher, source.peer_id)
    dst = np.zeros(1024, dtype=np.float32)
    handle = fetcher.fetch_state(source.peer_id, HOST, source.port, 12345, [dst], _chunks(dst.nbytes, 4096), timeout=30)
    t0 = time.monotonic()
    with pytest.raises(PeerLost, match="refused"):
        handle.result(timeout=30)
    assert time.monotonic() - t0 < 5.0
    assert fetcher.connections_opened == 0


def test_a_route_that_breaks_fails_its_fetch_at_once() -> None:
    """The source (a process) serves one fetch over its pool, is frozen with the next
    fetch's requests on their way, then SIGKILLed: its pool to the fetcher breaks, and the fetch fails with PeerLost within
    2 s, where before it was tied only to its state pool and waited out its timeout."""
    ctx = mp.get_context("spawn")
    fetcher = nat.Engine(peer_id=311, host=HOST, port=0)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(
        target=route_source_peer, args=(310, (fetcher.peer_id, HOST, fetcher.port), theirs), daemon=True
    )
    try:
        proc.start()
        assert mine.poll(60), "the source process never reported its port"
        port, exposure = mine.recv()
        _routed(fetcher, 310)
        dst = np.zeros(2 << 20, dtype=np.float32)
        fetcher.fetch_state(310, HOST, port, exposure, [dst], _chunks(dst.nbytes, 1 << 20), timeout=30).result(30)
        expected = np.random.default_rng(ROUTE_SOURCE_SEED).standard_normal(2 << 20).astype(np.float32)
        np.testing.assert_array_equal(dst, expected)
        os.kill(proc.pid, signal.SIGSTOP)
        handle = fetcher.fetch_state(310, HOST, port, exposure, [dst], _chunks(dst.nbytes, 1 << 20), timeout=60)
        time.sleep(0.3)
        assert not handle.done()  # the frozen source answers nothing
        t_kill = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(PeerLost):
            handle.result(timeout=30)
        assert time.monotonic() - t_kill < 2.0
        assert fetcher.connections_opened == 0
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        fetcher.close()

