"""pccl_py.peer.state_fetch: chunks handed out as the sources keep up, against a fake
engine whose sources serve at different speeds (or fail); the receive-window bound
(ReceiveWindow) fed by hand, and applied by a fetch round."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from pccl_py.errors import PeerLost, Timeout
from pccl_py.peer.state_fetch import (
    FULL_ROUNDS,
    RATE_ROUNDS,
    WINDOW_FLOOR,
    WINDOW_GAIN,
    WINDOW_MIN_RTT,
    Chunk,
    ReceiveWindow,
    fetch_round,
    measure_while_warming,
    next_chunk,
)


def test_next_chunk_takes_the_first_the_source_may_serve() -> None:
    queue = [Chunk(0, 0, 4, (1,)), Chunk(0, 4, 4, (1, 2)), Chunk(1, 0, 4, (2,))]
    assert next_chunk(queue, 1) == 0
    assert next_chunk(queue, 2) == 1
    assert next_chunk(queue, 3) is None
    assert next_chunk([], 1) is None


@dataclass
class _Source:
    peer: int
    host: str = "h"
    port: int = 0
    exposure: int = 0


class _Handle:
    """Finishes `seconds` after it was made; fails then if `fail`."""

    def __init__(self, seconds: float, nbytes: int, fail: bool) -> None:
        self._event = threading.Event()
        self._fail = fail
        self._nbytes = nbytes
        self._timer = threading.Timer(max(0.0, seconds), self._event.set)
        self._timer.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> None:
        if self._fail:
            raise PeerLost("injected")

    @property
    def rx_bytes(self) -> int:
        return self._nbytes if self._event.is_set() and not self._fail else 0

    def abort(self, reason: str = "") -> None:
        self._timer.cancel()
        self._fail = True
        self._event.set()


class _Engine:
    """Source p serves its chunks one after another, each in seconds[p]; a source in
    `failing` fails each one."""

    def __init__(self, seconds: dict[int, float], failing: frozenset[int] = frozenset()) -> None:
        self.seconds = seconds
        self.failing = failing
        self.served: dict[int, int] = {p: 0 for p in seconds}
        self.most_in_flight: dict[int, int] = {p: 0 for p in seconds}
        self._handles: dict[int, list[_Handle]] = {p: [] for p in seconds}
        self._free_at: dict[int, float] = {p: 0.0 for p in seconds}
        self.clamps: list[tuple[list[int], int]] = []  # each clamp_state_windows call
        self.starting: list[bool] = []  # and its `starting`

    rtt = 0.1

    def state_round_trip(self, source: int) -> float:
        return self.rtt

    @property
    def state_rx_bytes(self) -> int:
        return sum(h.rx_bytes for hs in self._handles.values() for h in hs)

    padding_rx_bytes = 0

    def clamp_state_windows(self, sources: list[int], window_bytes: int, starting: bool = False) -> int:
        self.clamps.append((sorted(sources), window_bytes))
        self.starting.append(starting)
        return len(sources)

    def fetch_state(self, peer: int, host: str, port: int, exposure: int, dsts: Any, chunks: Any, timeout: Any) -> Any:
        assert len(chunks) == 1
        self.served[peer] += 1
        live = [h for h in self._handles[peer] if not h.done()]
        self.most_in_flight[peer] = max(self.most_in_flight[peer], len(live) + 1)
        now = time.monotonic()
        self._free_at[peer] = max(now, self._free_at[peer]) + self.seconds[peer]
        handle = _Handle(self._free_at[peer] - now, chunks[0][2], peer in self.failing)
        self._handles[peer] = [*live, handle]
        return handle


def _chunks(n: int, holders: tuple[int, ...] = (1, 2, 3)) -> list[Chunk]:
    return [Chunk(k // 8, (k % 8) * 100, 100, holders) for k in range(n)]


def test_faster_sources_take_more_and_all_finish_together() -> None:
    engine = _Engine({1: 0.005, 2: 0.005, 3: 0.05})  # source 3 is ten times slower
    t0 = time.monotonic()
    done = fetch_round(engine, [], _chunks(64), {p: _Source(p) for p in (1, 2, 3)}, set(), time.monotonic() + 10)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    assert done.incomplete == set() and done.rx_bytes == 64 * 100
    assert sum(engine.served.values()) == 64
    assert engine.served[3] <= 8, engine.served
    assert min(engine.served[1], engine.served[2]) >= 24, engine.served
    assert max(engine.most_in_flight.values()) <= 4
    # A static split would wait for source 3's 21 chunks, 50 ms each (~1.1 s); ideal ~0.15 s.
    assert elapsed < 0.5, elapsed


def test_a_failing_source_gets_nothing_more_and_its_entries_are_incomplete() -> None:
    engine = _Engine({1: 0.002, 2: 0.002}, failing=frozenset({2}))
    dead: set[int] = set()
    done = fetch_round(engine, [], _chunks(32, (1, 2)), {p: _Source(p) for p in (1, 2)}, dead, time.monotonic() + 10)  # type: ignore[arg-type]
    assert dead == {2}
    assert engine.served[2] <= 4  # its first window, nothing after it failed
    assert done.incomplete and done.incomplete <= {0, 1, 2, 3}
    assert done.rx_bytes == (32 - engine.served[2]) * 100


def test_chunks_without_a_live_holder_are_incomplete() -> None:
    engine = _Engine({1: 0.001, 2: 0.001})
    chunks = [*_chunks(8, (1,)), Chunk(5, 0, 100, (2,))]
    done = fetch_round(engine, [], chunks, {p: _Source(p) for p in (1, 2)}, {2}, time.monotonic() + 10)  # type: ignore[arg-type]
    assert done.incomplete == {5} and engine.served == {1: 8, 2: 0}


def test_deadline_aborts_what_is_in_flight() -> None:
    engine = _Engine({1: 5.0})
    with pytest.raises(Timeout):
        fetch_round(engine, [], _chunks(8, (1,)), {1: _Source(1)}, set(), time.monotonic() + 0.1)  # type: ignore[arg-type]


def test_a_round_bounds_the_windows_where_the_last_fetch_left_them() -> None:
    """The bound a receiver measured lives on (the Communicator keeps its ReceiveWindow):
    the next round clamps its sources' connections to it before the first byte, as one
    that starts (the connections that carried the last round's tail are not the ones
    this round uses: each of those would get the whole bound)."""
    receive = ReceiveWindow()
    receive.bytes = 15 << 20
    engine = _Engine({1: 0.001, 2: 0.001})
    sources = {p: _Source(p) for p in (1, 2)}
    fetch_round(engine, [], _chunks(8, (1, 2)), sources, set(), time.monotonic() + 10, receive=receive)  # type: ignore[arg-type]
    assert engine.clamps[0] == ([1, 2], 15 << 20)
    assert engine.starting[0] and not any(engine.starting[1:])
    assert receive.rtt == engine.rtt
    engine = _Engine({1: 0.001})
    fetch_round(engine, [], _chunks(8, (1,)), {1: _Source(1)}, set(), time.monotonic() + 10)  # type: ignore[arg-type]
    assert engine.clamps == []  # no ReceiveWindow: the kernel's windows


def _feed(w: ReceiveWindow, t: float, received: int, per_round: list[int]) -> tuple[float, int, list[int | None]]:
    bounds = []
    for n in per_round:
        t += w.rtt
        received += n
        bounds.append(w.update(t, received))
    return t, received, bounds


def test_no_bound_while_the_delivery_ramps_up_then_its_gain_over_the_best() -> None:
    w = ReceiveWindow()
    w.begin(0.125)  # (binary fractions: the round trips add up exactly)
    assert w.update(0.0, 0) is None  # nothing in yet: the request's round trip is not the link
    assert w.update(0.0, 1) is None  # the first bytes: measuring starts here
    # Slow start: twice as much each round trip, then the link's 100,000 bytes per round.
    t, received, bounds = _feed(w, 0.0, 1, [1000, 2000, 4000, 8000, 16000, 32000, 64000])
    assert bounds == [None] * 7
    # The first two of those still grew by a quarter (a round trip's delivery is the
    # median of three: it lags by one); FULL_ROUNDS more that did not end the ramp.
    t, received, bounds = _feed(w, t, received, [100_000] * (FULL_ROUNDS + 2))
    assert bounds[: FULL_ROUNDS + 1] == [None] * (FULL_ROUNDS + 1)
    assert bounds[FULL_ROUNDS + 1] == max(WINDOW_FLOOR, int(WINDOW_GAIN * 100_000))


def test_the_bound_follows_the_best_round_trip_and_grows_while_it_limits() -> None:
    big = 10 * WINDOW_FLOOR  # per round trip: far above the floor
    w = ReceiveWindow()
    w.begin(0.125)
    w.update(0.0, 1)
    t, received, bounds = _feed(w, 0.0, 1, [big] * (FULL_ROUNDS + 1))
    bound = bounds[-1]
    assert bound == int(WINDOW_GAIN * big)
    t, received, bounds = _feed(w, t, received, [big // 10])  # one round trip's dip (a loss)
    assert bounds == [bound]
    w.begin(0.125)  # the next fetch: starts where this one ended
    assert w.bytes == bound
    w.update(t, received)
    for _ in range(3):  # each round trip delivers all the bound allowed: it limits, so it grows
        t, received, (new,) = _feed(w, t, received, [bound])
        t, received, (new,) = _feed(w, t, received, [new])
        assert new >= int(WINDOW_GAIN * bound), (bound, new)  # (by the gain every other round trip)
        bound = new
    slow = _feed(w, t, received, [WINDOW_FLOOR // 100] * (RATE_ROUNDS + 1))[2][-1]
    assert slow == WINDOW_FLOOR  # the link slowed for good: down to the floor, not below


def test_a_burst_after_a_slow_read_is_not_taken_for_the_link() -> None:
    """Bytes are counted as the receiver reads them: a round trip in which it fell
    behind counts too few, the next one the backlog as well. Taken over two round trips,
    the pair is what the link delivered, and the bound stays at the gain over it."""
    big = 10 * WINDOW_FLOOR
    w = ReceiveWindow()
    w.begin(0.125)
    w.update(0.0, 1)
    t, received, bounds = _feed(w, 0.0, 1, [big] * (FULL_ROUNDS + 1))
    assert bounds[-1] == int(WINDOW_GAIN * big)
    t, received, bounds = _feed(w, t, received, [big // 2, big + big // 2, big, big])
    assert bounds[-1] == int(WINDOW_GAIN * big)  # not 1.5 times the link


def test_no_bound_on_a_short_round_trip() -> None:
    w = ReceiveWindow()
    w.begin(WINDOW_MIN_RTT / 2)
    w.update(0.0, 1)
    assert _feed(w, 0.0, 1, [1 << 20] * 20)[2] == [None] * 20


def test_a_round_sets_the_windows_again_every_round_trip() -> None:
    """Which connections carry bytes decides each one's share (the engine counts them
    between calls), so the clamp is set again once per measured round trip."""
    receive = ReceiveWindow()
    receive.bytes = 8 << 20
    engine = _Engine({1: 0.004})
    engine.rtt = 0.02
    fetch_round(engine, [], _chunks(50, (1,)), {1: _Source(1)}, set(), time.monotonic() + 10, receive=receive)  # type: ignore[arg-type]
    assert receive.rounds >= 4  # ~0.2 s of deliveries at 20 ms round trips
    assert len(engine.clamps) >= receive.rounds  # the start, then each round trip
    assert all(peers == [1] for peers, _ in engine.clamps)


class _Padded:
    """An engine that receives only padding, at `rate` bytes per second (a joiner whose
    members warm their pools to it), once its pools are open (`open_after` seconds)."""

    rtt = 0.02
    state_rx_bytes = 0

    def __init__(self, rate: float, open_after: float = 0.0) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.open_after = open_after
        self.clamps: list[int] = []

    def _open(self) -> bool:
        return time.monotonic() - self.t0 >= self.open_after

    def state_round_trip(self, source: int) -> float:
        return self.rtt if self._open() else 0.0

    @property
    def padding_rx_bytes(self) -> int:
        return int(self.rate * max(0.0, time.monotonic() - self.t0 - self.open_after))

    def clamp_state_windows(self, sources: list[int], window_bytes: int, starting: bool = False) -> int:
        self.clamps.append(window_bytes)
        return len(sources)


def test_a_joiner_measures_its_bound_on_its_members_padding() -> None:
    """Before its first fetch, a joiner measures the padding its members send like a
    fetch's bytes: the bound (the gain over the padding's rate) is known when the fetch
    starts, also when the pools open after the measuring began. It only measures: the
    pools' windows are left alone. `stop` ends it."""
    rate = 10 * WINDOW_FLOOR / (WINDOW_GAIN * _Padded.rtt)  # a bound far above the floor
    engine = _Padded(rate, open_after=0.1)
    receive = ReceiveWindow()
    stop = threading.Event()
    t0 = time.monotonic()
    measure_while_warming(engine, [1, 2], receive, t0 + 1.0, stop)  # type: ignore[arg-type]
    assert 0.9 < time.monotonic() - t0 < 1.5
    assert receive.bytes is not None and not engine.clamps
    assert abs(receive.bytes - WINDOW_GAIN * rate * _Padded.rtt) < 0.05 * receive.bytes
    late = threading.Timer(0.05, stop.set)
    late.start()
    t0 = time.monotonic()
    measure_while_warming(_Padded(rate), [1], ReceiveWindow(), t0 + 30.0, stop)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 0.5  # ended by `stop`, not by its 30 s
