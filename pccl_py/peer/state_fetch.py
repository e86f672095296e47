"""One round of a shared-state fetch: chunks handed to the sources as they keep up.

A static split (every source 1/n of the chunks, all requested at once) finishes when the
slowest source does: TCP flows sharing a receiver's downlink rarely get equal shares,
and behind a 100 ms round trip the flows left at the end do not speed up before they
are done, so the downlink idles for a second or more. Here each source has at most
`window` chunks in flight; as one arrives, the source is given the next chunk it can
serve, so the faster sources take more and all of them finish within about one
window of each other. A source that fails is given nothing more; what it had in
flight is reported incomplete (shared_state.fetch_entries fetches those entries again).

The sources share the receiver's downlink. Asked for 4 chunks each, three sources
behind a 1 Gbit/s downlink at 100 ms would keep its 50 ms queue full and drop 1,100-3,600
packets per 256 MiB: their BBR flows probe past what the receiver's windows (8 MiB
buffers each) let them have in flight together, about twice the path's
bandwidth-delay product. So the receiver bounds its windows (`ReceiveWindow`, applied
with Engine.clamp_state_windows): once the delivery rate stops growing, the state
connections advertise WINDOW_GAIN times what was delivered per round trip at best,
shared among them. The sources still have data queued, so their flows are never short
of it (a bound on the requests instead starved them: docs/wan.md). The bound is kept
for the next fetch, which starts bounded. The state connections to a source are its
own pool to the receiver where it has one (a member's to a joiner, warmed during the
admission: Engine.fetch_state), else the receiver's state pool to it.

The choice of the next chunk and the window are pure (`next_chunk`, `ReceiveWindow`);
the loop around them only issues and waits.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pccl_py import _native
from pccl_py.errors import PcclError, PeerLost, Timeout

WINDOW = 4  # chunks in flight per source: with 4 MiB chunks, a round trip's worth at 1 Gbit/s and 100 ms
_WAKE_S = 0.05  # the longest the loop sleeps before it looks at every source again
WINDOW_GAIN = 1.2  # the windows together: this times the bytes delivered per round trip
RATE_ROUNDS = 8  # the delivery rate: the best of this many round trips' (a loss's dip is not the link)
FULL_ROUNDS = 3  # round trips without 25% more delivery: the rate has stopped growing
WINDOW_FLOOR = 4 << 20  # the least the bound goes to
WINDOW_MIN_RTT = 0.002  # a shorter round trip (loopback, a LAN) is left to the kernel's windows
_RECLAMP = 0.05  # within a round trip, the windows are set again if the bound moved by more

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


class ReceiveWindow:
    """What a receiver's state connections may advertise together (bytes), from what its
    fetches deliver. None (the kernel's windows) while the delivery still grows by a
    quarter per round trip, as during TCP's slow start, and until it has not for
    FULL_ROUNDS round trips. Then WINDOW_GAIN times the best delivery per round trip of
    the last RATE_ROUNDS, at least WINDOW_FLOOR. Each round trip's delivery is the
    median of it and the two before: after a loss, TCP holds back what arrived behind
    the hole and hands it over with the retransmission a round trip later, so one round
    trip reads up to twice what the link carried, next to one that read little (a
    joiner's first sync measured 1.5-2x; the best of them made bounds of 1.4-1.6 times
    the path's product, which kept its queue overflowing). Under WINDOW_MIN_RTT it measures
    nothing: so short a round trip grows many times over under load, and a bound from
    it would throttle a path that no queue limits. It lives as long as the receiver, so
    a later fetch starts with the bound the last one ended with. Fed the round trip at
    each fetch (`begin`), then the time and the bytes received so far (`update`)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self.rtt = 0.0
        self._mark: tuple[float, int] | None = None  # (start of the round trip measured, bytes by then)
        self._recent: deque[float] = deque(maxlen=3)  # the last round trips' deliveries (bytes per second)
        self._rates: deque[float] = deque(maxlen=RATE_ROUNDS)
        self._full = 0.0  # the best rate of the ramp so far
        self._flat = 0  # round trips since it last grew by a quarter
        self.rounds = 0  # round trips measured

    def begin(self, rtt: float) -> None:
        """A fetch starts: measure afresh (its first bytes come a round trip later)."""
        self.rtt = rtt
        self._mark = None
        self._rates.clear()
        self._recent.clear()

    def update(self, now: float, received: int) -> int | None:
        """Takes the bytes received by `now`; returns the bound (None: none yet)."""
        if self.rtt < WINDOW_MIN_RTT or received <= 0:
            return self.bytes
        if self._mark is None:
            self._mark = (now, received)
            return self.bytes
        since, base = self._mark
        if now - since < self.rtt:
            return self.bytes
        self._mark = (now, received)
        self._recent.append((received - base) / (now - since))
        # The median of three (of fewer: the least, which no burst has inflated yet).
        rate = sorted(self._recent)[1] if len(self._recent) == 3 else min(self._recent)
        self._rates.append(rate)
        self.rounds += 1
        if self.bytes is None:  # still ramping up?
            if rate >= 1.25 * self._full:
                self._full, self._flat = rate, 0
                return None
            self._flat += 1
            if self._flat < FULL_ROUNDS:
                return None
        self.bytes = max(WINDOW_FLOOR, int(WINDOW_GAIN * max(self._rates) * self.rtt))
        return self.bytes


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
    receive: ReceiveWindow | None = None,
) -> RoundResult:
    """Fetches `chunks` into `buffers` (chunk bytes land at the same entry and offset),
    from the sources (peer -> shared_state.Source) not in `dead`; adds the sources that
    fail to `dead`. Raises Timeout at `deadline`, after aborting what is in flight.
    `receive`: bounds the receive windows of the state connections as it measures."""
    queue = deque(chunks)
    clamp = _Clamp(engine, [sources[p].peer for p in sources if p not in dead], receive)
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
        clamp.update()
        if progress is not None and time.monotonic() >= next_progress:
            next_progress = time.monotonic() + 0.1
            moving = sum(h.rx_bytes for flights in inflight.values() for _, h, _ in flights)
            progress(min(total, base + result.rx_bytes + moving), total)


def measure_while_warming(
    engine: _native.Engine, peers: list[int], receive: ReceiveWindow, until: float, stop: threading.Event
) -> None:
    """A joiner's members pad their pools to it while it is admitted (Engine.prepare), and
    its first fetch runs over those pools (Engine.fetch_state). Measured from the fetch
    alone, the bound came about a second into it, after its ramp rounds, and bound
    windows that the padding had grown to several times the path's product (24 MB each
    behind a 1 Gbit/s, 100 ms downlink; a window once advertised is not taken back until
    it is used): the first sync overflowed the downlink's queue until then. So the
    receiver measures the padding as it measures a fetch, and its first fetch starts
    with the bound. Measures only: bounding the pools meanwhile made the joiner's first
    all-reduce over them slower (docs/wan.md). Runs until `until` (monotonic) or `stop`."""
    clamp: _Clamp | None = None
    while not stop.wait(min(_WAKE_S, max(0.0, until - time.monotonic()))) and time.monotonic() < until:
        if clamp is None or receive.rtt <= 0:  # the round trip is known once a pool is open
            clamp = _Clamp(engine, peers, receive, apply=False)
        else:
            clamp.update()


class _Clamp:
    """Applies a ReceiveWindow to the state connections of one fetch round: it measures
    the state and padding bytes they bring (`apply`=False: measures only)."""

    def __init__(
        self, engine: _native.Engine, peers: list[int], receive: ReceiveWindow | None, apply: bool = True
    ) -> None:
        self.engine, self.peers, self.receive, self.apply = engine, peers, receive, apply
        self.applied: int | None = None
        if receive is None:
            return
        # The round trip as the connections to each source measured it at their quietest
        # (Engine.state_round_trip): the longest of the sources'.
        receive.begin(max((_round_trip(engine, p) for p in peers), default=0.0))
        # The connections that carried the last round's tail are not the ones this round
        # uses: the share is of those that ever carried state.
        self._set(receive.bytes, starting=True)
        self.base = self._received()

    def _received(self) -> int:
        return self.engine.state_rx_bytes + self.engine.padding_rx_bytes

    def update(self) -> None:
        if self.receive is None:
            return
        rounds = self.receive.rounds
        bound = self.receive.update(time.monotonic(), self._received() - self.base)
        # Once per round trip as well: the share of each connection depends on which
        # ones carry bytes (Engine.clamp_state_windows), which the first call of a
        # fetch cannot know yet.
        self._set(bound, again=self.receive.rounds != rounds)

    def _set(self, bound: int | None, again: bool = False, starting: bool = False) -> None:
        if bound is None or not self.apply:
            return
        if not again and self.applied is not None and abs(bound - self.applied) <= _RECLAMP * self.applied:
            return
        try:
            self.engine.clamp_state_windows(self.peers, bound, starting=starting)
        except PcclError:
            return  # closed: the round fails on its own
        self.applied = bound


def _round_trip(engine: _native.Engine, peer: int) -> float:
    try:
        return engine.state_round_trip(peer)
    except PcclError:
        return 0.0
