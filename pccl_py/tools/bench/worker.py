"""One `pccl bench` worker process: it builds its implementation's collective (joining
the ring, the master or gloo's store as the parent tells it), then runs each size the
parent asks for and sends back its per-iteration times.

Parent -> worker:  ("ring", ring | None),
                   ("run", nbytes, iters, warmup, segment_bytes, in_place, quantization | None, op),
                   ("go",), ("stop",)
Worker -> parent:  ("hello", port | None), ("ready",), ("allocated",),
                   ("times", [seconds], [connections per pool, pccl only]),
                   ("error", traceback text)
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import signal
import sys
import time
import traceback
from contextlib import suppress

from pccl_py.tools import netns
from pccl_py.tools.bench.backends import Collective, CommCollective, GlooCollective, PcclCollective
from pccl_py.tools.bench.config import LOOPBACK, BenchError, PcclParams


def _serve(conn: mpc.Connection, coll: Collective, rank: int, world: int) -> None:
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] != "run":
            raise BenchError(f"unexpected command {msg!r}")
        _, nbytes, iters, warmup, segment_bytes, in_place, quant, op = msg

        def run(segment_bytes: int = segment_bytes, quant: str | None = quant) -> None:
            if quant:
                coll.run(segment_bytes, quant)
            else:
                coll.run(segment_bytes)

        coll.allocate(nbytes, in_place, op)
        coll.fill(float(coll.rank + 1))
        conn.send(("allocated",))
        if conn.recv()[0] != "go":
            raise BenchError("expected 'go'")
        run()
        if not coll.check():
            raise BenchError(f"rank {rank}: wrong {op} result for {nbytes} bytes (position {coll.rank} of {world})")
        coll.fill(0.0)
        for _ in range(warmup):
            run()
        times: list[float] = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        pools = coll.pool_sizes() if isinstance(coll, PcclCollective) else []
        conn.send(("times", times, pools))


def worker_main(
    conn: mpc.Connection,
    impl: str,
    rank: int,
    world: int,
    params: PcclParams,
    store_path: str,
    op_timeout: float,
    namespace: str | None = None,
    host: str = LOOPBACK,
) -> None:
    """Entry point of one worker process (module level, so 'spawn' can pickle it). With a
    `namespace`, the worker moves into it first (before any socket or thread) and listens
    on `host`, its address there; the Pipe to the parent is a socketpair and stays usable."""
    # The parent owns Ctrl-C: it stops or kills the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # numpy's BLAS threads would only compete with the engine for the cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    coll: PcclCollective | GlooCollective | CommCollective | None = None
    try:
        if namespace is not None:
            netns.enter(namespace)
        if impl == "pccl":
            coll = PcclCollective(rank, world, params, op_timeout, host)
            conn.send(("hello", coll.engine.port))
            ring = conn.recv()[1]
            coll.connect([tuple(p) for p in ring])
        elif impl == "comm":
            coll = CommCollective(rank, world, params, op_timeout, host)
            conn.send(("hello", None))
            coll.connect(conn.recv()[1])
        else:
            conn.send(("hello", None))
            conn.recv()
            ifname = "eth0" if namespace is not None else "lo" if sys.platform.startswith("linux") else "lo0"
            coll = GlooCollective(rank, world, store_path, op_timeout, ifname)
        conn.send(("ready",))
        _serve(conn, coll, rank, world)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
    except BaseException:  # noqa: BLE001 - whatever it is, the parent hears of it
        with suppress(OSError, EOFError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if coll is not None:
            with suppress(Exception):  # best effort on the way out
                coll.close()
        conn.close()
