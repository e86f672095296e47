"""Usage: .venv/bin/python scripts/delayed_link_latency.py [DELAY_S=0.05] [N=4] [ITERS=10]

Per-op latency of a 1 KiB all-reduce over links with an emulated one-way delay.

Every data connection to peer j goes through a userspace proxy that holds each chunk
for DELAY seconds before forwarding it (both directions), so every one-way trip costs
DELAY (RTT = 2 x DELAY). N engines in this process, ring vs direct, with the commit
vote and in place with defer_commit, as the Communicator runs them."""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time

import numpy as np

from pccl_py import _native as nat

DELAY = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
N = int(sys.argv[2]) if len(sys.argv) > 2 else 4
ITERS = int(sys.argv[3]) if len(sys.argv) > 3 else 10


class DelayProxy:
    def __init__(self, target_port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.target_port = target_port
        self.loop = loop
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def sender() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    writer.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        task = asyncio.ensure_future(sender())
        try:
            while True:
                data = await reader.read(1 << 20)
                queue.put_nowait((time.monotonic() + DELAY, data or None))
                if not data:
                    break
            await task
        except Exception:
            task.cancel()

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for sock in (writer.get_extra_info("socket"), up_writer.get_extra_info("socket")):
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))


def main() -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    engines = [nat.Engine(peer_id=100 + r) for r in range(N)]
    proxies = [DelayProxy(e.port, loop) for e in engines]
    for p in proxies:
        asyncio.run_coroutine_threadsafe(p.start(), loop).result()
    ring = [(100 + r, "127.0.0.1", proxies[r].port) for r in range(N)]
    for r, e in enumerate(engines):
        e.set_ring(1, ring, r, timeout=30)
    seq = [0]
    for name, algo in (("ring", nat.AllReduceAlgorithm.RING), ("direct", nat.AllReduceAlgorithm.DIRECT)):
        times: list[float] = []
        for i in range(ITERS + 2):
            seq[0] += 1
            bufs = [np.full(256, float(r + 1), np.float32) for r in range(N)]  # 1 KiB
            barrier = threading.Barrier(N)
            took = [0.0] * N

            def run(r: int) -> None:
                barrier.wait()
                t0 = time.perf_counter()
                h = engines[r].all_reduce(bufs[r], bufs[r], nat.DataType.FLOAT32, nat.ReduceOp.SUM, tag=0,
                                          seq=seq[0], timeout=60, defer_commit=True, vote=True, algorithm=algo)
                h.result()
                h.settle(True)
                took[r] = time.perf_counter() - t0

            threads = [threading.Thread(target=run, args=(r,)) for r in range(N)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all((b == N * (N + 1) / 2).all() for b in bufs)
            if i >= 2:  # the first ops open the connections
                times.append(max(took))
        med = statistics.median(times)
        print(f"{name:6s} N={N} 1 KiB, one-way delay {DELAY * 1e3:.0f} ms (RTT {2 * DELAY * 1e3:.0f} ms): "
              f"median {med * 1e3:.1f} ms = {med / (2 * DELAY):.2f} RTT (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    for e in engines:
        e.close()


if __name__ == "__main__":
    main()
