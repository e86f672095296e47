"""The engine's side of the receive-window bound on shared-state fetches
(pccl_py.peer.state_fetch.ReceiveWindow): the bytes its state connections received
(state_rx_bytes), the round trip they measured (state_round_trip), and the clamp of
their receive windows (clamp_state_windows), which a fetch still completes under."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from engine_harness import HOST

import pccl_py._native as nat

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair() -> Iterator[tuple[nat.Engine, nat.Engine]]:
    source, fetcher = (nat.Engine(peer_id=200 + i, host=HOST, port=0) for i in range(2))
    try:
        yield source, fetcher
    finally:
        fetcher.close()
        source.close()


def _fetch(fetcher: nat.Engine, source: nat.Engine, exposure: int, data: np.ndarray, piece: int) -> np.ndarray:
    dst = np.zeros_like(data)
    chunks = [(0, at, min(piece, data.nbytes - at), 0, at) for at in range(0, data.nbytes, piece)]
    fetcher.fetch_state(source.peer_id, HOST, source.port, exposure, [dst], chunks, timeout=30).result(timeout=30)
    return dst


def test_a_fetch_counts_its_bytes_and_its_round_trip(pair: tuple[nat.Engine, nat.Engine]) -> None:
    source, fetcher = pair
    assert fetcher.state_rx_bytes == 0 and fetcher.state_round_trip(source.peer_id) == 0.0  # no connection yet
    data = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    exposure = source.expose_state([data])
    try:
        np.testing.assert_array_equal(_fetch(fetcher, source, exposure.id, data, 1 << 20), data)
    finally:
        exposure.close()
    assert fetcher.state_rx_bytes == data.nbytes  # payload only: no header, no request
    assert source.state_rx_bytes == 0  # what it served is not what it received
    assert 0.0 < fetcher.state_round_trip(source.peer_id) < 0.5  # loopback


def test_a_fetch_completes_under_the_smallest_clamp(pair: tuple[nat.Engine, nat.Engine]) -> None:
    """Clamped to a window far below the data (each connection gets at least 256 KiB),
    the transfer takes more round trips but completes intact; a peer with no state
    connection has nothing to clamp."""
    source, fetcher = pair
    data = np.random.default_rng(7).standard_normal(2 << 20).astype(np.float32)  # 8 MiB
    exposure = source.expose_state([data])
    try:
        _fetch(fetcher, source, exposure.id, data[:1024], 4096)  # opens the pool
        pool = fetcher.clamp_state_windows([source.peer_id], 1)
        assert pool >= 1
        np.testing.assert_array_equal(_fetch(fetcher, source, exposure.id, data, 4 << 20), data)
        assert fetcher.clamp_state_windows([source.peer_id], 64 << 20) == pool  # and lifted again
        np.testing.assert_array_equal(_fetch(fetcher, source, exposure.id, data, 4 << 20), data)
    finally:
        exposure.close()
    assert fetcher.clamp_state_windows([999], 1 << 20) == 0
