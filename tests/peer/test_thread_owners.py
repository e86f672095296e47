"""Every thread and task the runtime starts has an owner that ends it on close():
the control channel's loop thread and its rejoin thread, the async all-reduce
executor, the master's liveness watchers. Peers are threads of this process, so the
test can list the threads that are left."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threads import run_parallel

import pccl_py as pccl

pytestmark = pytest.mark.timeout(120)

FAST = pccl.Config(heartbeat_interval=0.2, heartbeat_timeout=2.0)


def pccl_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("pccl-") and t.is_alive())


def test_close_leaves_no_thread_behind_even_after_a_master_restart() -> None:
    before = pccl_threads()
    master = pccl.Master(config=FAST).start()
    port = int(master.address.rsplit(":", 1)[1])
    comms = [pccl.Communicator(master.address, config=FAST, name=f"t{i}") for i in range(2)]
    try:
        comms[0].connect(timeout=10)

        def join() -> None:
            comms[1].connect(timeout=10)

        def admit() -> None:
            while comms[0].pending_peers(timeout=10) == 0:
                time.sleep(0.01)
            comms[0].update_topology(timeout=10)

        assert run_parallel([join, admit], timeout=30) == [None, None]
        xs = [np.full(1 << 12, i + 1.0, np.float32) for i in range(2)]
        handles = [c.all_reduce_async(x, tag=3) for c, x in zip(comms, xs, strict=True)]
        assert [h.wait(10).world_size for h in handles] == [2, 2]
        assert any(name.startswith("pccl-op") for name in pccl_threads())

        master.close()  # the peers find a new master at the same address and rejoin it
        master = pccl.Master(port=port, config=FAST).start()
        deadline = time.monotonic() + 20
        # White box: each session saw the new incarnation and the group re-form.
        while not all(c._session.rejoin_target() is not None and not c._session.recovering() for c in comms):
            assert time.monotonic() < deadline, "the group did not re-form"
            time.sleep(0.05)
        out = run_parallel([lambda c=c, x=x: c.all_reduce(x, timeout=10) for c, x in zip(comms, xs, strict=True)])
        assert all(isinstance(r, pccl.ReduceInfo) and r.world_size == 2 for r in out), out
        # An all-reduce the other peer never joins is in flight when its caller closes.
        stuck = comms[0].all_reduce_async(np.ones(1 << 20, np.float32), tag=9, timeout=60)
        time.sleep(0.3)
        executor = comms[0]._executor
        assert executor is not None and not stuck.done()
        comms[0].close()
        assert stuck.done() and not any(t.is_alive() for t in executor._threads)  # type: ignore[attr-defined]
    finally:
        for c in comms:
            c.close()
        master.close()
    assert pccl_threads() == before
