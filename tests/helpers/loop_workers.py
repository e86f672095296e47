"""The loop a user writes, as a peer process (tests/test_join_loop.py): every peer,
founder or joiner, runs the same code:

    comm.connect()
    while not stop:
        comm.update_topology()
        comm.sync_shared_state(state)
        comm.all_reduce(x, retry=True)
        state += result; state.revision += 1
        (compute)

It reports one record per step through its own pipe (`records`), with the time spent
in each call, the contributors and value of the all-reduce (the test checks it is the
exact sum of their inputs: peer `index` contributes index + 1 in every element) and the
hash of the state after the sync (every peer at the same revision must hold the same
bytes).
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np

import pccl_py as pccl
from pccl_py.peer.shared_state import digest


def user_loop_worker(
    master: str,
    index: int,
    out: Any,
    *,
    records: Any,
    stop: Any,
    elements: int = 4096,
    state_elements: int = 1 << 16,
    max_steps: int = 5000,
    compute_s: float = 0.01,
    config: dict[str, Any] | None = None,
) -> None:
    emit = records.send
    comm = pccl.Communicator(master, config=pccl.Config(**(config or {})), name=f"user-{index}")
    try:
        emit({"index": index, "event": "started", "pid": os.getpid(), "peer": comm.peer_id, "t": time.time()})
        comm.connect(timeout=60)
        state = pccl.SharedState({"w": np.zeros(state_elements, np.float32)}, revision=0)
        x = np.empty(elements, np.float32)
        emit({"index": index, "event": "connected", "peer": comm.peer_id, "t": time.time(), "world": comm.world_size})
        for step in range(max_steps):
            if stop.is_set():
                break
            rec: dict[str, Any] = {"index": index, "step": step, "t_start": time.time()}
            try:
                comm.update_topology(timeout=30)
                rec["t_voted"] = time.time()
                comm.sync_shared_state(state, timeout=30)
                rec.update(t_synced=time.time(), revision=state.revision, state_hash=digest(state.buffers()[0]))
                x[:] = float(index + 1)
                info = comm.all_reduce(x, retry=True, timeout=30)
                rec.update(
                    ok=True,
                    world=info.world_size,
                    contributors=list(info.contributors),
                    value=float(x[0]),
                    uniform=bool((x == x[0]).all()),
                )
                # The same update on every peer: the revision is the group's.
                state.tensors["w"][state.revision % state_elements] += x[0]
                state.revision += 1
            except pccl.PcclError as exc:
                rec.update(ok=False, error=type(exc).__name__, message=str(exc)[:500])
            rec["t_end"] = time.time()
            emit(rec)
            time.sleep(compute_s)  # the training step
        emit({"index": index, "event": "done"})
    except BaseException as exc:
        emit({"index": index, "event": "crashed", "error": repr(exc), "traceback": traceback.format_exc()[-3000:]})
        raise
    finally:
        comm.close()
