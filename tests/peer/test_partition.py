"""Liveness both ways: the master answers heartbeats, and a peer that hears nothing from
it over a connection that stayed up knows it is cut off. Its calls end with Partitioned
within the master's heartbeat timeout, never by their own timeout. (A silent network
partition needs the WAN emulator: tests/integration/test_wan_faults.py; here the
master's loop hangs, which a peer cannot tell from one.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from threads import run_parallel

import pccl_py as pccl

INTERVAL, TIMEOUT = 0.2, 1.0


@pytest.fixture
def master() -> Iterator[pccl.Master]:
    with pccl.Master(config=pccl.Config(heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT)) as m:
        yield m


def hang(master: pccl.Master, seconds: float) -> threading.Event:
    """Blocks the master's event loop for `seconds` (its sockets stay open); the event
    is set once the loop runs again."""
    loop = master._loop
    assert loop is not None
    resumed = threading.Event()

    def block() -> None:
        time.sleep(seconds)
        resumed.set()

    loop.call_soon_threadsafe(block)
    return resumed


def test_calls_of_peers_that_no_longer_hear_the_master_end_with_partitioned(master, make_group) -> None:
    comms = make_group(2, config=pccl.Config(op_timeout=60.0))
    x = np.arange(1000, dtype=np.float32)
    first = run_parallel([lambda c=c: c.all_reduce(x.copy()) for c in comms], timeout=30)  # the group works
    assert all(r.world_size == 2 for r in first), first
    resumed = hang(master, 4 * TIMEOUT)
    t0 = time.monotonic()
    # update_topology() waits on the master, which cannot answer.
    results = run_parallel([lambda c=c: c.update_topology() for c in comms], timeout=30)
    elapsed = time.monotonic() - t0
    assert all(isinstance(r, pccl.Partitioned) for r in results), results
    assert isinstance(results[0], pccl.Aborted)  # what a loop that rejoins on Aborted catches
    assert "nothing heard from the master" in str(results[0])
    # Within the master's timeout plus a heartbeat interval or two, not the op timeout.
    assert elapsed < TIMEOUT + 3 * INTERVAL + 0.5, elapsed
    # Every later call ends at once with the same error.
    t1 = time.monotonic()
    with pytest.raises(pccl.Partitioned):
        comms[0].all_reduce(x.copy())
    assert time.monotonic() - t1 < 0.5
    assert resumed.wait(10)


def test_a_peer_that_hears_the_master_is_never_cut_off(master, make_group) -> None:
    """Idle and busy for ten heartbeat timeouts: the master's answers keep it a member."""
    comms = make_group(2)
    x = np.ones(64, dtype=np.float32)
    end = time.monotonic() + 10 * TIMEOUT
    while time.monotonic() < end:
        results = run_parallel([lambda c=c: c.all_reduce(x.copy()) for c in comms], timeout=30)
        assert all(r.world_size == 2 for r in results), results
        time.sleep(TIMEOUT / 2)
    assert all(c.world_size == 2 for c in comms)


def test_a_master_that_went_away_is_waited_for_not_a_partition(make_group) -> None:
    """A master whose host closes the connection (it stopped or restarted) is not a
    silent partition: peers wait for it, as for a restart (tests/master/test_master_restart.py)."""
    config = pccl.Config(heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT)
    m = pccl.Master(config=config)
    m.start()
    try:
        comms = []
        comms = [pccl.Communicator(m.address, name=f"g{i}", config=pccl.Config(op_timeout=30.0)) for i in range(2)]
        run_parallel([lambda c=c: (c.connect(timeout=20), pccl.join_group(c, 2, timeout=20)) for c in comms], timeout=40)
        m.close()  # its socket closes: the peers' connections go down
        time.sleep(3 * TIMEOUT)
        assert all(c._session.evicted() is None for c in comms)
    finally:
        for c in comms:
            c.close()
        m.close()
