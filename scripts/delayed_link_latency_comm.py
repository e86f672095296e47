"""Usage: .venv/bin/python scripts/delayed_link_latency_comm.py DELAY_S N ITERS

1 KiB all-reduce latency through pccl_py.Communicator over delayed data links: each
peer's data port is reached through a DelayProxy on 127.0.1.(i+1) (advertise_host), so
every peer-to-peer one-way trip costs DELAY. The master's control plane is not delayed
(a committed op awaits no master message)."""
from __future__ import annotations
import asyncio, socket, statistics, sys, threading, time
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import delayed_link_latency as wl
import pccl_py as pccl
from pccl_py.testing import join_group

DELAY = float(sys.argv[1]); N = int(sys.argv[2]); ITERS = int(sys.argv[3])
wl.DELAY = DELAY

class Proxy(wl.DelayProxy):
    def __init__(self, host, port, loop):
        super().__init__(port, loop); self.host = host
    async def start(self):
        await asyncio.start_server(self._handle, self.host, self.target_port)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

loop = asyncio.new_event_loop(); threading.Thread(target=loop.run_forever, daemon=True).start()
with pccl.Master() as master:
    for limit in (0, pccl.Config.direct_allreduce_max_bytes):
        cfg = pccl.Config(direct_allreduce_max_bytes=limit)
        comms = []
        for i in range(N):
            port = free_port(); host = f"127.0.1.{i + 1}"
            asyncio.run_coroutine_threadsafe(Proxy(host, port, loop).start(), loop).result()
            comms.append(pccl.Communicator(master.address, config=cfg, host="127.0.0.1", port=port, advertise_host=host))
        ts = [threading.Thread(target=lambda c=c: join_group(c.connect(timeout=60), N, 60)) for c in comms]
        [t.start() for t in ts]; [t.join() for t in ts]
        times, algos = [], set()
        for it in range(ITERS + 2):
            xs = [np.full(256, float(i + 1), np.float32) for i in range(N)]
            took = [0.0] * N; barrier = threading.Barrier(N)
            def run(i):
                barrier.wait(); t0 = time.perf_counter()
                info = comms[i].all_reduce(xs[i], timeout=60); took[i] = time.perf_counter() - t0; algos.add(info.algorithm)
            ts = [threading.Thread(target=run, args=(i,)) for i in range(N)]
            [t.start() for t in ts]; [t.join() for t in ts]
            assert all((x == N * (N + 1) / 2).all() for x in xs)
            if it >= 2: times.append(max(took))
        med = statistics.median(times)
        print(f"Communicator {sorted(algos)} N={N} 1 KiB, RTT {2*DELAY*1e3:.0f} ms: median {med*1e3:.1f} ms = {med/(2*DELAY):.2f} RTT (min {min(times)*1e3:.1f}, max {max(times)*1e3:.1f})", flush=True)
        for c in comms: c.close()
