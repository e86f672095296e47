"""A peer process for tests/test_topology_netns.py, started inside a network namespace
with `ip netns exec NS python tests/netns_peer.py MASTER HOST CONFIG_JSON`.

It connects, prints {"event": "connected", "peer": id}, then runs one JSON command per
stdin line and prints one JSON record per command:
  {"cmd": "join", "world": n}           join_group() until the group has n peers
  {"cmd": "all_reduce", "n": n, "reps": r}  r SUM all-reduces of n float32 ones; seconds each
  {"cmd": "optimize"}                   optimize_topology()
  {"cmd": "quit"}
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import numpy as np

import pccl_py as pccl
from pccl_py.testing import join_group


def main() -> None:
    master, host, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    comm = pccl.Communicator(master, host=host, config=pccl.Config(**config), name=f"netns-{host}")

    def say(record: dict[str, object]) -> None:
        print(json.dumps(record), flush=True)

    try:
        comm.connect(timeout=60)
        say({"event": "connected", "peer": comm.peer_id})
        for line in sys.stdin:
            cmd = json.loads(line)
            t0 = time.monotonic()
            try:
                if cmd["cmd"] == "join":
                    join_group(comm, cmd["world"], timeout=60)
                    say({"cmd": "join", "ok": True, "world": comm.world_size})
                elif cmd["cmd"] == "all_reduce":
                    x = np.ones(cmd["n"], np.float32)
                    times = []
                    for _ in range(cmd["reps"]):
                        x.fill(1.0)
                        start = time.perf_counter()
                        info = comm.all_reduce(x, timeout=120)
                        times.append(time.perf_counter() - start)
                    say({"cmd": "all_reduce", "ok": True, "seconds": times, "world": info.world_size,
                         "value": float(x[0]), "epoch": comm.epoch})
                elif cmd["cmd"] == "optimize":
                    comm.optimize_topology(timeout=120)
                    say({"cmd": "optimize", "ok": True, "elapsed": time.monotonic() - t0, "epoch": comm.epoch})
                elif cmd["cmd"] == "quit":
                    break
            except Exception as exc:  # noqa: BLE001 - reported to the test
                say({"cmd": cmd["cmd"], "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-2000:]})
    finally:
        comm.close()


if __name__ == "__main__":
    main()
