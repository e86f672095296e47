"""A small training-like program for `pccl run` tests (tests/test_cli.py): a
Communicator built from the environment pccl run sets, a shared state, and a loop of
sync / all-reduce / update / admit. One JSON line per step goes to the file named by
argv[1]; it stops when the file argv[2] exists (or after argv[3] seconds).

A process started by a restart (PCCL_RESTART > 0) or admitted into a running group
syncs RECEIVE_ONLY first: it receives the whole state from the group."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

import pccl_py as pccl

ELEMENTS = 1 << 18  # 1 MiB of float32


def main() -> int:
    log_path, stop_path, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    index, restart = int(os.environ["PCCL_LOCAL_INDEX"]), int(os.environ["PCCL_RESTART"])
    config = pccl.Config.from_env(op_timeout=20.0)
    comm = pccl.Communicator(os.environ["PCCL_MASTER"], group=int(os.environ["PCCL_GROUP"]), config=config,
                             name=f"node{index}-r{restart}")
    comm.connect(timeout=30)
    joined_running_group = comm.world_size > 1 or restart > 0
    state = pccl.SharedState({"w": np.zeros(ELEMENTS, np.float32)}, revision=0)
    fresh = joined_running_group
    deadline = time.monotonic() + limit
    with open(log_path, "a") as log:
        log.write(json.dumps({"event": "connected", "pid": os.getpid(), "restart": restart, "peer": comm.peer_id}) + "\n")
        log.flush()
        step = 0
        while not os.path.exists(stop_path) and time.monotonic() < deadline:
            try:
                strategy = pccl.SyncStrategy.RECEIVE_ONLY if fresh else pccl.SyncStrategy.ENFORCE_POPULAR
                info = comm.sync_shared_state(state, strategy=strategy)
                fresh = False
                w = state.tensors["w"]
                log.write(json.dumps({
                    "event": "step", "step": step, "restart": restart, "revision": info.revision,
                    "rx_bytes": info.rx_bytes, "world": comm.world_size,
                    "sha256": hashlib.sha256(w.tobytes()).hexdigest(),
                }) + "\n")
                log.flush()
                grad = np.ones(1024, np.float32)
                comm.all_reduce(grad, retry=True)
                w[:1024] += grad
                state.revision += 1
                step += 1
                # Joiners are admitted here, at the end of a step: they start at the sync.
                if comm.pending_peers() > 0:
                    comm.update_topology()
                time.sleep(0.05)
            except pccl.PeerLost as exc:  # a neighbour died mid-collective: go on with the survivors
                log.write(json.dumps({"event": "peer_lost", "error": str(exc)}) + "\n")
                log.flush()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
