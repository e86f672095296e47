"""The peer process of the point-to-point SIGKILL tests (it must live in an importable
module for multiprocessing's 'spawn' start method)."""

from __future__ import annotations

import os
import signal
import traceback
from typing import Any

import numpy as np

from pccl_py import _native as nat

HOST = "127.0.0.1"


def p2p_victim(peer_id: int, other: int, role: str, nbytes: int, results: Any, control: Any) -> None:
    """Joins a ring of two with the parent's engine, posts one point-to-point op with
    the parent (`role`: "send" or "recv", `nbytes` bytes, tag 7), reports ("posted",)
    and freezes itself (SIGSTOP) so that the parent can SIGKILL it mid-op.

    Protocol: -> ("port", port) on `results`, <- ring [(peer_id, host, port), ...] and
    -> ("posted",) on `control`.
    """
    engine = None
    try:
        engine = nat.Engine(peer_id=peer_id, host=HOST, port=0)
        results.put(("port", engine.port))
        if not control.poll(60):
            return
        ring = control.recv()
        engine.set_ring(1, ring, [p[0] for p in ring].index(peer_id), timeout=30.0)
        buf = np.ones(nbytes, dtype=np.uint8)
        if role == "send":
            h = engine.send(buf, other, tag=7, timeout=60.0)
        else:
            h = engine.recv(buf, other, tag=7, timeout=60.0)
        control.send(("posted",))  # synchronous (a Queue's feeder thread would stop with us)
        os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs us while stopped
        h.wait(60.0)
    except BaseException as e:  # tell the parent rather than die silently
        results.put(("crash", type(e).__name__, traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close()
