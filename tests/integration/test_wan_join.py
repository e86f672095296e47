"""A join behind the WAN emulator, as a user's loop sees it (stress.wan_join), at a small
round trip: the joiner's first all-reduce covers the whole group with the exact sum,
the members keep their pools to each other across the re-ring that admits it, and the
pools between the joiner and the members, opened while it waited for admission, are
kept by that epoch rather than opened again. Times are the tool's output, not asserted here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pccl_py.tools.wan import unavailable
from stress.wan_join import run

WHY_NOT = unavailable()
pytestmark = [pytest.mark.skipif(WHY_NOT is not None, reason=f"WAN emulator: {WHY_NOT}"), pytest.mark.timeout(300)]


def test_a_joiner_takes_part_at_once_and_the_members_keep_their_pools(tmp_path: Path) -> None:
    args = argparse.Namespace(wan="rtt=20ms,rate=1gbit", peers=3, mib=1, reps=2, calls=2, warm=2, cc=None,
                              workdir=str(tmp_path), json=None)
    result = run(args)
    assert result["reps"] == 2
    for rep in result["details"]:
        assert rep["first_op"] == "world 3, 1 attempts, value 3.0", rep
        members = rep["members_admitting_call"]
        assert len(members) == 2, rep
        per_peer = rep["joiner_connections"] // 2  # the joiner opened one pool to each member
        # ... while it waited for admission, and the admitting epoch kept them all.
        assert rep["joiner_kept"] == rep["joiner_connections"], rep
        for m in members:
            assert m["opened"] == per_peer, rep  # the pool to the joiner (opened ahead), nothing else
            assert m["kept"] >= 1 + per_peer, rep  # that pool and the one to the other member
