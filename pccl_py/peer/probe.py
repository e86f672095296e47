"""Bandwidth probes for optimize_topology(): the peer-side measurement of one directed
pair, over the data plane's state-transfer path (never through the master).

The sender serves a probe buffer (Engine.expose_state); the receiver fetches it
(Engine.fetch_state) and times the transfer. A small warm-up fetch first opens the
connection (TCP and handshake), so the timed transfer measures the link's rate, not
its round trips. What the master decides from the rates is pccl_py.topology's.
"""

from __future__ import annotations

import time

import numpy as np

from pccl_py import _native
from pccl_py.errors import Timeout

_CHUNK_BYTES = 1 << 20
_WARMUP_BYTES = 64 << 10


def measure_bandwidth(
    engine: _native.Engine, source: int, host: str, port: int, exposure: int, nbytes: int, timeout: float
) -> float:
    """Bytes per second received from `source`'s probe exposure (`nbytes` long).
    Raises PeerLost if the source cannot be reached or fails, Timeout after `timeout`
    seconds (warm-up and transfer together)."""
    deadline = time.monotonic() + timeout
    dst = np.empty(nbytes, np.uint8)
    _fetch(engine, source, host, port, exposure, dst, min(nbytes, _WARMUP_BYTES), deadline)
    start = time.perf_counter()
    _fetch(engine, source, host, port, exposure, dst, nbytes, deadline)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return nbytes / elapsed


def _fetch(
    engine: _native.Engine, source: int, host: str, port: int, exposure: int, dst: np.ndarray, nbytes: int,
    deadline: float,
) -> None:
    chunks = [(0, off, min(_CHUNK_BYTES, nbytes - off), 0, off) for off in range(0, nbytes, _CHUNK_BYTES)]
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Timeout(f"bandwidth probe of peer {source} ran out of time")
    handle = engine.fetch_state(source, host, port, exposure, [dst], chunks, timeout=remaining)
    try:
        handle.result(timeout=max(0.0, deadline - time.monotonic()))
    except BaseException:
        handle.abort("bandwidth probe abandoned")
        raise
