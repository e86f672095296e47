"""One round of a shared-state fetch: chunks handed to the sources as they keep up.

A static split (every source 1/n of the chunks, all requested at once) finishes when the
slowest source does: TCP flows sharing a receiver's downlink rarely get equal shares,
and behind a 100 ms round trip the flows left at the end do not speed up before they
are done, so the downlink idles for a second or more. Here each source has at most
`window` chunks in flight; as one arrives, the source is given the next chunk it can
serve, so the faster sources take more and all of them finish within about one
window of each other. A source that fails is given nothing more; what it had in
flight is reported incomplete (shared_state.fetch_entries fetches those entries again).

The choice of the next chunk is a pure function (`next_chunk`); the loop around it only
issues and waits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pccl_py import _native
from pccl_py.errors import PeerLost, Timeout

WINDOW = 4  # chunks in flight per source: with 4 MiB chunks, a round trip's worth at 1 Gbit/s and 100 ms
_WAKE_S = 0.05  # the longest the loop sleeps before it looks at every source again

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Chunk:
    """Bytes [offset, offset + length) of entry `index`, which any of `holders` may serve."""

    index: int
    offset: int
    length: int
    holders: tuple[int, ...]


@dataclass
class RoundResult:
    rx_bytes: int = 0
    asked: dict[int, set[int]] = field(default_factory=dict)  # source -> entries it was asked for
    incomplete: set[int] = field(default_factory=set)  # entries not received whole


def next_chunk(queue: Sequence[Chunk], source: int) -> int | None:
    """Position in `queue` of the first chunk `source` may serve, None if there is none."""
    for k, chunk in enumerate(queue):
        if source in chunk.holders:
            return k
    return None


def fetch_round(
    engine: _native.Engine,
    buffers: list[Any],
    chunks: list[Chunk],
    sources: dict[int, Any],
    dead: set[int],
    deadline: float,
    progress: ProgressFn | None = None,
    base: int = 0,
    total: int = 0,
    window: int = WINDOW,
) -> RoundResult:
    """Fetches `chunks` into `buffers` (chunk bytes land at the same entry and offset),
    from the sources (peer -> shared_state.Source) not in `dead`; adds the sources that
    fail to `dead`. Raises Timeout at `deadline`, after aborting what is in flight."""
    queue = deque(chunks)
    inflight: dict[int, deque[tuple[int, Any, Chunk]]] = {}  # per source, in issue order
    issued = 0
    result = RoundResult()
    next_progress = 0.0
    while True:
        for peer in sorted(sources):
            flights = inflight.setdefault(peer, deque())
            while peer not in dead and len(flights) < window:
                k = next_chunk(queue, peer)
                if k is None:
                    break
                chunk = queue[k]
                del queue[k]
                src = sources[peer]
                try:
                    handle = engine.fetch_state(
                        src.peer, src.host, src.port, src.exposure, buffers,
                        [(chunk.index, chunk.offset, chunk.length, chunk.index, chunk.offset)],
                        timeout=max(0.0, deadline - time.monotonic()),
                    )
                except PeerLost:
                    dead.add(peer)
                    queue.appendleft(chunk)
                    break
                flights.append((issued, handle, chunk))
                issued += 1
                result.asked.setdefault(peer, set()).add(chunk.index)
        heads = [flights[0] for flights in inflight.values() if flights]
        if not heads:
            # Nothing in flight, nothing more to issue: what is left has no live holder.
            result.incomplete.update(chunk.index for chunk in queue)
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for flights in inflight.values():
                for _, handle, _ in flights:
                    handle.abort("shared-state transfer deadline")
            raise Timeout("shared-state transfer did not finish before the deadline")
        # The first issued is the likeliest to finish next (a source serves in order).
        min(heads, key=lambda f: f[0])[1].wait(timeout=min(_WAKE_S, remaining))
        for peer, flights in inflight.items():
            for entry in [f for f in flights if f[1].done()]:
                flights.remove(entry)
                _, handle, chunk = entry
                try:
                    handle.result(timeout=0)
                    result.rx_bytes += handle.rx_bytes
                except Exception:  # noqa: BLE001 - any failure of a source: its entries are fetched again
                    dead.add(peer)
                    result.incomplete.add(chunk.index)
            if peer in dead:  # what it still has in flight will not be waited for
                for _, handle, chunk in flights:
                    handle.abort(f"peer {peer} failed during the shared-state transfer")
                    result.incomplete.add(chunk.index)
                flights.clear()
        if progress is not None and time.monotonic() >= next_progress:
            next_progress = time.monotonic() + 0.1
            moving = sum(h.rx_bytes for flights in inflight.values() for _, h, _ in flights)
            progress(min(total, base + result.rx_bytes + moving), total)

