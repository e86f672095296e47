"""Peer processes and deterministic state contents for the shared-state tests
(tests/test_shared_state.py) and the measurement script (stress/state_transfer.py).

Workers have pccl_py.testing.PeerGroup's signature `target(master, index, out, **kw)`
but talk to the parent through their own pipe (`conn`), not through the queue `out`
that PeerGroup shares among all peers: a peer SIGKILLed while it holds that queue's
lock would silence the others.

`state_worker` connects, waits until the group has `world` peers, reports
{"event": "ready", "peer": id, "pid": pid}, then executes commands from `conn`:

    {"cmd": "sync", "revision": r, "strategy": "ENFORCE_POPULAR", "timeout": s,
     "inject": k, "repeat": n, "zero": z, "fresh": f, "lead": s, "state_prefault": b}
        ->  {"ok", "revision", "rx", "tx", "received", "elapsed": [per call], "fetch_s", "hashes",
             "prefaulted", "opened", "padded", "window", "window_rtt"}
    {"cmd": "hashes"}          ->  {"ok", "hashes"}
    {"cmd": "grow", "world": n} ->  {"ok", "world"}: admits newcomers until the group has n peers
    {"cmd": "drop"}            ->  {"ok"}: the state is freed (a "fresh" sync makes a new one)
    {"cmd": "close"}           ->  {"ok"} and the worker exits

A joiner again before each sync: "zero" zeroes its state in place (the pages stay
touched); "fresh" ("numpy" or "plain") frees it and allocates a new one, np.zeros or
plain_zeros: pages the kernel has yet to fault in, so the receive pays for them.
With "fresh", the new SharedState gets prefault="state_prefault" (default True) and
the worker waits "lead" seconds (default 0) before the timed sync, as a joiner builds
its state, then connects and is admitted before its first sync.
"prefaulted": the bytes its engine has faulted in ahead of receives so far; "opened": the
connections it has opened so far (a fetch over a source's own pool opens none);
"padded": the padding it has sent so far to warm pools ahead of a join; "window": the
bound on its receive windows it has measured (state_fetch.ReceiveWindow; None: none),
"window_rtt": the round trip that bound was measured at.

With `namespace` (and `host`, its address), the worker first moves into that network
namespace (a WAN emulator's host, pccl_py.tools.wan) and its peer listens on `host`.

`spec` describes the state: a list of (name, dtype, elements, content) where content
is an int seed (deterministic pattern, see `fill`) or None (zeros).
"""

from __future__ import annotations

import mmap
import os
import time
import traceback
from typing import Any

import numpy as np

Spec = list[tuple[str, str, int, int | None]]


def fill(buffer: np.ndarray, seed: int) -> None:
    """Deterministic, non-trivial bytes for `buffer` (any dtype, C-contiguous): a
    multiplicative sequence over 32-bit words, offset by `seed`."""
    raw = buffer.reshape(-1).view(np.uint8)
    words = raw[: raw.nbytes // 4 * 4].view(np.uint32)
    np.multiply(np.arange(words.size, dtype=np.uint32), np.uint32(2654435761), out=words)
    words += np.uint32((seed * 40503 + 1) & 0xFFFFFFFF)
    tail = raw[words.nbytes :]
    tail[:] = np.arange(tail.size, dtype=np.uint8) + np.uint8(seed & 0xFF)


def plain_zeros(elements: int, dtype: str) -> np.ndarray:
    """Zeros in fresh private anonymous memory with no huge-page advice, as torch.empty
    or malloc give (np.zeros advises huge pages for arrays of 4 MiB and more). The
    mapping is released with the last view of the array."""
    nbytes = max(1, elements * np.dtype(dtype).itemsize)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype, elements)


def make_state(spec: Spec, plain: bool = False) -> dict[str, np.ndarray]:
    """The tensors of `spec`; with `plain`, the zero entries in plain_zeros memory."""
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, elements, content in spec:
        t = plain_zeros(elements, dtype) if plain and content is None else np.zeros(elements, dtype=dtype)
        if content is not None:
            fill(t, content)
        tensors[name] = t
    return tensors


def expected_hashes(spec: Spec) -> dict[str, int]:
    from pccl_py.peer.shared_state import digest

    return {name: digest(t.view(np.uint8)) for name, t in make_state(spec).items()}


def _timed_fetch(times: list[float]) -> None:
    """Measures the transfer phase (fetch + verification) of the next syncs: wraps the
    fetch function the Communicator calls (this process only)."""
    from pccl_py.peer import sync

    inner = sync.fetch_entries

    def wrapper(*args: Any, **kwargs: Any) -> int:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    sync.fetch_entries = wrapper  # type: ignore[assignment]


def state_worker(
    master: str,
    index: int,
    out: Any,
    *,
    conn: Any,
    world: int,
    spec: Spec,
    config: dict | None = None,
    namespace: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    if namespace is not None:  # before any socket or thread
        from pccl_py.tools.wan import enter

        enter(namespace)
    import pccl_py as pccl
    from pccl_py.testing import join_group

    comm = pccl.Communicator(master, host=host, config=pccl.Config(**(config or {})), name=f"state-{index}")
    try:
        state = pccl.SharedState(make_state(spec), revision=0)
        fetch_times: list[float] = []
        _timed_fetch(fetch_times)
        comm.connect(timeout=60)
        join_group(comm, world, timeout=60)
        conn.send({"event": "ready", "index": index, "peer": comm.peer_id, "pid": os.getpid()})
        while True:
            cmd = conn.recv()
            kind = cmd["cmd"]
            if kind == "close":
                conn.send({"ok": True})
                return
            if kind == "hashes":
                conn.send({"ok": True, "hashes": state.hashes()})
                continue
            if kind == "grow":  # as a member's loop does: update_topology() while peers wait
                join_group(comm, int(cmd["world"]), timeout=float(cmd.get("timeout", 60)))
                conn.send({"ok": True, "world": comm.world_size})
                continue
            if kind == "drop":
                state = pccl.SharedState({}, revision=state.revision)
                conn.send({"ok": True})
                continue
            if kind != "sync":
                conn.send({"ok": False, "error": f"unknown command {kind}"})
                continue
            if cmd.get("inject"):
                comm._engine.inject_fault("corrupt_state", int(cmd["inject"]))
            strategy = pccl.SyncStrategy[cmd.get("strategy", "ENFORCE_POPULAR")]
            elapsed: list[float] = []
            rec: dict[str, Any] = {"ok": True, "rx": 0, "tx": 0, "received": 0}
            fetch_times.clear()
            try:
                for n in range(int(cmd.get("repeat", 1))):
                    if "revision" in cmd:
                        state.revision = int(cmd["revision"]) + n
                    if cmd.get("fresh"):
                        revision = state.revision
                        state = pccl.SharedState({})  # freed first: the new one may reuse its pages
                        state = pccl.SharedState(
                            make_state(spec, plain=cmd["fresh"] == "plain"),
                            revision=revision,
                            prefault=cmd.get("state_prefault", True),
                        )
                        time.sleep(float(cmd.get("lead", 0.0)))  # as a joiner connects and is admitted
                    elif cmd.get("zero"):
                        for b in state.buffers():
                            b[:] = 0
                    t0 = time.perf_counter()
                    info = comm.sync_shared_state(state, strategy=strategy, timeout=cmd.get("timeout", 60.0))
                    elapsed.append(time.perf_counter() - t0)
                    rec["rx"] += info.rx_bytes
                    rec["tx"] += info.tx_bytes
                    rec["received"] += info.entries_received
                    rec["revision"] = info.revision
            except Exception as exc:  # reported to the parent, who asserts
                rec.update(ok=False, error=type(exc).__name__, message=str(exc)[:2000])
                if not isinstance(exc, pccl.PcclError):
                    rec["traceback"] = traceback.format_exc()[-3000:]
            rec.update(elapsed=elapsed, fetch_s=list(fetch_times), hashes=state.hashes(), world_now=comm.world_size)
            engine = comm._engine
            rec["prefaulted"] = engine.prefaulted_bytes if engine is not None else 0
            rec["opened"] = engine.connections_opened if engine is not None else 0
            rec["padded"] = engine.padding_bytes if engine is not None else 0
            rec["window"] = comm._receive_window.bytes
            rec["window_rtt"] = comm._receive_window.rtt
            conn.send(rec)
    except BaseException as exc:
        try:
            conn.send({"event": "crashed", "index": index, "error": f"{type(exc).__name__}: {exc}"})
        except Exception:
            pass
        raise
    finally:
        comm.close()
