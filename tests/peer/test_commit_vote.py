"""The commit vote end to end (docs/protocol.md, "Commit vote"): peers whose vote was
cut short report to the master, which settles the op consistently with the peer that
committed on its own."""

from __future__ import annotations

import time

import numpy as np
import pytest
from threads import run_parallel

import pccl_py as pccl
from pccl_py.testing import join_group

pytestmark = pytest.mark.timeout(120)

FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)


def test_an_op_whose_vote_was_cut_short_succeeds_on_every_peer() -> None:
    """The peer at rank 1 withholds its commit count. It still commits (its
    predecessor's count reaches N-1) and leaves the group right away; the other two
    never got N-1, end their op when its connections close, having voted, and ask the
    master, which must answer success (a commit happened) with the full sum."""
    with pccl.Master(config=FAST) as master:
        comms = [pccl.Communicator(master.address, config=FAST) for _ in range(3)]
        try:
            run_parallel([lambda c=c: join_group(c.connect(timeout=20), 3, 20) for c in comms])
            withholder = next(c for c in comms if c.rank == 1)
            withholder._engine.inject_fault("withhold_vote", 1)
            inputs = [np.full(10_001, float(i + 1), np.float32) for i in range(3)]

            def call(i: int) -> tuple[pccl.ReduceInfo, float]:
                info = comms[i].all_reduce(inputs[i], timeout=30)
                took = time.monotonic()
                if comms[i] is withholder:
                    comms[i].close()  # gone before anyone could learn of its commit from it
                return info, took

            start = time.monotonic()
            results = run_parallel([lambda i=i: call(i) for i in range(3)])
            for info, took in results:
                assert info.world_size == 3
                assert took - start < 15, "a survivor waited for its op's timeout"
            for x in inputs:
                np.testing.assert_array_equal(x, np.full(10_001, 6.0, np.float32))
            # The survivors go on in the re-formed ring.
            survivors = [c for c in comms if c is not withholder]
            run_parallel([lambda c=c: c.all_reduce(np.ones(8, np.float32), timeout=20) for c in survivors])
        finally:
            for c in comms:
                c.close()


def test_committed_ops_reach_the_master_in_done_batches() -> None:
    with pccl.Master(config=FAST) as master:
        comms = [pccl.Communicator(master.address, config=FAST) for _ in range(2)]
        try:
            run_parallel([lambda c=c: join_group(c.connect(timeout=20), 2, 20) for c in comms])
            for _ in range(20):
                run_parallel([lambda c=c: c.all_reduce(np.ones(64, np.float32), timeout=20) for c in comms])
            deadline = time.monotonic() + 5
            group = None
            while time.monotonic() < deadline:
                group = master._membership.groups[0]
                decided = [r for r in group.ops.values() if r.decided is not None and r.decided["ok"]]
                if len(decided) == 20 and all(len(r.reports) == 2 for r in decided):
                    break
                time.sleep(0.05)
            assert group is not None
            decided = [r for r in group.ops.values() if r.decided is not None and r.decided["ok"]]
            assert len(decided) == 20
            assert all(all(rep.committed for rep in r.reports.values()) for r in decided)
        finally:
            for c in comms:
                c.close()
