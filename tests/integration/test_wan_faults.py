"""Silent partitions behind the WAN emulator, as a user's loop sees them (stress.wan_faults):
the cut-off peer's call ends with Partitioned within about the heartbeat timeout, never
its op timeout (120 s), and the survivors' retry succeeds over the others."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pccl_py.tools.wan import unavailable
from stress.wan_faults import run

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"WAN emulator: {WHY_NOT}")


def scenario(tmp_path: Path, case: str, outage: float = 0.0) -> dict:
    args = argparse.Namespace(wan="rtt=20ms,rate=1gbit", peers=3, mib=0, kib=1, case=case, outage=outage,
                              after=4.0, warm=2, seconds=120.0, cc=None, workdir=str(tmp_path))
    return run(args)


def test_a_partitioned_peer_raises_and_the_survivors_retry(tmp_path: Path) -> None:
    hosts = scenario(tmp_path, "partition")["hosts"]
    cut, survivors = hosts[0], hosts[1:]
    assert cut["outcome"].startswith("Partitioned"), cut
    # The default heartbeat timeout is 1.5 s; generous slack for a loaded machine.
    assert cut["returned_after_cut_s"] < 3.0, cut
    for h in survivors:
        assert h["outcome"].startswith("ok, world 2"), h
        assert h["returned_after_cut_s"] < 5.5, h
        assert h["calls_ok_after"] >= 2, h
        # Its pool to the other survivor held nothing of the op cut short: kept, warm,
        # for the retry's epoch instead of opened afresh.
        assert h["kept_by_retry"] >= 1 and h["opened_by_retry"] == 0, h


def test_a_short_outage_evicts_nobody(tmp_path: Path) -> None:
    """0.8 s of silence against a 1.5 s timeout: over TCP alone the heartbeats could
    wait up to 1 s more for a retransmission (silent 1.8 s: evicted); the datagrams
    arrive within an interval of the heal."""
    hosts = scenario(tmp_path, "outage", outage=0.8)["hosts"]
    for h in hosts:
        assert h["outcome"].startswith("ok, world 3"), h
        # Within the outage plus the 1 s retransmission cap, plus slack.
        assert h["stall_s"] < 0.8 + 1.0 + 1.0, h
