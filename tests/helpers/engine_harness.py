"""Test helpers for the native data-plane engine (pccl_py._native).

`EngineRing` starts N engines in this process (ranks are threads: the binding releases
the GIL in every blocking call), installs one ring over them, runs a function per rank
and collects what each returned or raised. Every call has a deadline: when a rank is
still running at the deadline the engines are closed (which fails every op in flight
with Aborted and so unblocks the waiters) and `HarnessTimeout` is raised, so a test can
never hang. The engines are always closed, also when setup fails.

The module also holds the reference reduction (the engine's documented reduction
order, with 16-bit floats computed in float32 and rounded to nearest even), data
generators, and the peer process of the multi-process SIGKILL test (it must live in an
importable module for multiprocessing's 'spawn' start method).
"""

from __future__ import annotations

import socket
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pccl_py import _native as nat

HOST = "127.0.0.1"
DT = nat.DataType
OP = nat.ReduceOp

# Peer ids deliberately differ from ring positions, so rank/peer-id mix-ups show.
PEER_ID_BASE = 1000
PEER_ID_STRIDE = 7


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a fake peer's socket; EOFError when the engine closes it."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return bytes(buf)


class HarnessTimeout(AssertionError):
    """A rank did not finish within the harness deadline."""


@dataclass
class Outcome:
    rank: int
    value: Any = None
    error: BaseException | None = None
    started: float = 0.0  # time.monotonic() when the rank's function started
    ended: float = 0.0  # time.monotonic() when it returned or raised
    tb: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


def describe(outcomes: Sequence[Outcome]) -> str:
    lines = []
    for o in outcomes:
        if o.ok:
            lines.append(f"  rank {o.rank}: ok in {o.elapsed:.3f}s")
        else:
            lines.append(f"  rank {o.rank}: {type(o.error).__name__}: {o.error} (after {o.elapsed:.3f}s)")
    return "\n".join(lines)


class EngineRing:
    """N engines on 127.0.0.1 (port 0), one ring over them, ranks run as threads."""

    def __init__(
        self,
        n: int,
        *,
        epoch: int = 1,
        ring_timeout: float = 10.0,
        **engine_kwargs: Any,
    ) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.epoch = epoch
        self.engines: list[nat.Engine] = []
        self.closed = False
        self.tainted = False  # set by users after a failed op; fixtures rebuild tainted rings
        self._seq: dict[int, int] = {}
        try:
            for r in range(n):
                self.engines.append(
                    nat.Engine(peer_id=self.peer_id(r), host=HOST, port=0, **engine_kwargs)
                )
            self.addresses = [(e.peer_id, HOST, e.port) for e in self.engines]
            # set_ring only connects to the next neighbour, whose progress thread answers
            # the handshake, so installing the ring one engine after the other is fine.
            for r, e in enumerate(self.engines):
                e.set_ring(epoch, self.addresses, r, timeout=ring_timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def peer_id(rank: int) -> int:
        return PEER_ID_BASE + PEER_ID_STRIDE * rank

    def next_seq(self, tag: int = 0) -> int:
        """A fresh seq for the next op on `tag` (all ranks must use the same one)."""
        s = self._seq.get(tag, 0)
        self._seq[tag] = s + 1
        return s

    def run(
        self,
        fn: Callable[[int, nat.Engine], Any],
        *,
        timeout: float = 60.0,
        ranks: Sequence[int] | None = None,
    ) -> list[Outcome]:
        """Calls fn(rank, engine) in one thread per rank (all of them, or `ranks`),
        started together. Returns one Outcome per rank run, in rank order. Raises
        HarnessTimeout (after closing the engines) if a rank is still running after
        `timeout` seconds."""
        if self.closed:
            raise RuntimeError("the ring is closed")
        ranks = list(range(self.n)) if ranks is None else list(ranks)
        outcomes = {r: Outcome(rank=r) for r in ranks}
        barrier = threading.Barrier(len(ranks))

        def body(r: int) -> None:
            o = outcomes[r]
            try:
                barrier.wait(timeout=10.0)
                o.started = time.monotonic()
                o.value = fn(r, self.engines[r])
            except BaseException as e:  # collected, re-raised by the caller as needed
                o.error = e
                o.tb = traceback.format_exc()
            finally:
                o.ended = time.monotonic()

        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in ranks]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [r for r, t in zip(ranks, threads) if t.is_alive()]
        if stuck:
            # Closing fails every op in flight, which wakes the waiters.
            self.close()
            for t in threads:
                t.join(5.0)
            still = [r for r, t in zip(ranks, threads) if t.is_alive()]
            raise HarnessTimeout(
                f"ranks {stuck} still running after {timeout}s (engines closed; "
                f"{still or 'none'} still stuck after close)\n" + describe([outcomes[r] for r in ranks])
            )
        return [outcomes[r] for r in ranks]

    def run_ok(self, fn: Callable[[int, nat.Engine], Any], *, timeout: float = 60.0) -> list[Any]:
        """Like run(), but raises AssertionError if any rank raised; returns the values."""
        outcomes = self.run(fn, timeout=timeout)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            self.tainted = True
            raise AssertionError(
                "ranks failed:\n" + describe(outcomes) + "\n\nfirst traceback:\n" + failed[0].tb
            )
        return [o.value for o in outcomes]

    def all_reduce(
        self,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        dtype: nat.DataType,
        op: nat.ReduceOp,
        *,
        tag: int = 0,
        seq: int | None = None,
        op_timeout: float | None = 30.0,
        timeout: float | None = None,
    ) -> list[Outcome]:
        """One all-reduce on every rank, with `seq` (default: a fresh seq for `tag`).
        Each Outcome's value is (tx_bytes, rx_bytes, key) on success."""
        if seq is None:
            seq = self.next_seq(tag)

        def fn(r: int, e: nat.Engine) -> tuple[int, int, tuple[int, int, int]]:
            h = e.all_reduce(inputs[r], outputs[r], dtype, op, tag=tag, seq=seq, timeout=op_timeout)
            h.result()
            return h.tx_bytes, h.rx_bytes, h.key

        if timeout is None:
            timeout = (op_timeout or 60.0) + 15.0
        outcomes = self.run(fn, timeout=timeout)
        if not all(o.ok for o in outcomes):
            self.tainted = True
        return outcomes

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for e in self.engines:
            try:
                e.close()
            except Exception:
                pass

    def __enter__(self) -> "EngineRing":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_ring(n: int, fn: Callable[[int, nat.Engine], Any], *, timeout: float = 60.0, **engine_kwargs: Any) -> list[Outcome]:
    """Starts n engines, installs the ring, runs fn(rank, engine) on every rank (one
    thread each), closes the engines, and returns the outcomes."""
    with EngineRing(n, **engine_kwargs) as ring:
        return ring.run(fn, timeout=timeout)


# ---------------------------------------------------------------- dtypes and reference

# name -> (native dtype, numpy storage dtype, kind)
DTYPES: dict[str, tuple[nat.DataType, np.dtype, str]] = {
    "float16": (DT.FLOAT16, np.dtype(np.float16), "f16"),
    "bfloat16": (DT.BFLOAT16, np.dtype(np.uint16), "bf16"),  # raw bits
    "float32": (DT.FLOAT32, np.dtype(np.float32), "float"),
    "float64": (DT.FLOAT64, np.dtype(np.float64), "float"),
    "int8": (DT.INT8, np.dtype(np.int8), "int"),
    "int16": (DT.INT16, np.dtype(np.int16), "int"),
    "int32": (DT.INT32, np.dtype(np.int32), "int"),
    "int64": (DT.INT64, np.dtype(np.int64), "int"),
    "uint8": (DT.UINT8, np.dtype(np.uint8), "int"),
    "uint16": (DT.UINT16, np.dtype(np.uint16), "int"),
    "uint32": (DT.UINT32, np.dtype(np.uint32), "int"),
    "uint64": (DT.UINT64, np.dtype(np.uint64), "int"),
}

OPS: dict[str, nat.ReduceOp] = {"SUM": OP.SUM, "AVG": OP.AVG, "PROD": OP.PROD, "MIN": OP.MIN, "MAX": OP.MAX}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def reduce_step(kind: str, op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One reduction step `a op b` as the engine defines it (a: this peer's data,
    b: the partial from upstream). 16-bit floats: computed in float32, rounded."""
    if op == "AVG":
        op = "SUM"
    if kind == "bf16":
        fa, fb = bf16_to_f32(a), bf16_to_f32(b)
        return f32_to_bf16(_apply(op, fa, fb))
    if kind == "f16":
        fa, fb = a.astype(np.float32), b.astype(np.float32)
        return _apply(op, fa, fb).astype(np.float16)
    return _apply(op, a, b)


def _apply(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if op == "SUM":
        return np.add(a, b)
    if op == "PROD":
        return np.multiply(a, b)
    if op == "MIN":
        return np.minimum(a, b)
    if op == "MAX":
        return np.maximum(a, b)
    raise ValueError(op)


def finalize_avg(kind: str, s: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return s
    if kind == "bf16":
        return f32_to_bf16(bf16_to_f32(s) / np.float32(n))
    if kind == "f16":
        return (s.astype(np.float32) / np.float32(n)).astype(np.float16)
    if kind == "float":
        return s / s.dtype.type(n)
    # integers: the wrapped sum divided, truncating toward zero (C semantics)
    q = s // s.dtype.type(n)
    if np.issubdtype(s.dtype, np.signedinteger):
        q = q + ((s % s.dtype.type(n) != 0) & (s < 0)).astype(s.dtype)
    return q


def chunk_bounds(count: int, n: int) -> list[int]:
    """Element offsets of the n chunks: the first count % n chunks get one extra."""
    base, rem = divmod(count, n)
    return [c * base + min(c, rem) for c in range(n + 1)]


def reference_allreduce(inputs: Sequence[np.ndarray], dtype_name: str, op: str) -> np.ndarray:
    """The exact result the engine promises. Chunk c starts with x_c; peer c+1 computes
    x_{c+1} op partial, ..., the owner (c-1) computes x_{c-1} op partial (then / N for
    AVG)."""
    kind = DTYPES[dtype_name][2]
    n = len(inputs)
    flat = [np.asarray(x).reshape(-1) for x in inputs]
    count = flat[0].size
    out = np.empty_like(flat[0])
    b = chunk_bounds(count, n)
    for c in range(n):
        lo, hi = b[c], b[c + 1]
        if lo == hi:
            continue
        acc = flat[c][lo:hi].copy()
        for k in range(1, n):
            acc = reduce_step(kind, op, flat[(c + k) % n][lo:hi], acc)
        if op == "AVG":
            acc = finalize_avg(kind, acc, n)
        out[lo:hi] = acc
    return out


def expected_bytes(count: int, elem: int, n: int, rank: int) -> tuple[int, int]:
    """(tx, rx) payload bytes of `rank` in a ring all-reduce: it receives every chunk
    but its own in reduce-scatter and every chunk but the one it owns (rank+1) in
    all-gather; it sends exactly what its successor receives."""
    if n == 1:
        return 0, 0
    b = chunk_bounds(count, n)

    def chunk(c: int) -> int:
        c %= n
        return (b[c + 1] - b[c]) * elem

    nbytes = count * elem

    def rx(r: int) -> int:
        return 2 * nbytes - chunk(r) - chunk(r + 1)

    return rx(rank + 1), rx(rank)


def make_data(dtype_name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random data in the storage dtype. Floats: magnitude in [0.5, 2) with a random
    sign (no zeros, so no signed-zero ties in MIN/MAX; products of 8 stay finite even
    in float16). Integers: the full range (SUM/PROD wrap, as the reference does)."""
    _, storage, kind = DTYPES[dtype_name]
    if kind in ("f16", "bf16", "float"):
        mag = rng.random(count, dtype=np.float64) * 1.5 + 0.5
        sign = np.where(rng.random(count) < 0.5, -1.0, 1.0)
        x = mag * sign
        if kind == "bf16":
            return f32_to_bf16(x.astype(np.float32))
        return x.astype(storage)
    info = np.iinfo(storage)
    return rng.integers(info.min, info.max, size=count, endpoint=True, dtype=storage)


def bits(x: np.ndarray) -> np.ndarray:
    """Raw bit view (unsigned ints of the element size) for exact comparison."""
    x = np.ascontiguousarray(x).reshape(-1)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def mismatch_report(got: np.ndarray, want: np.ndarray, limit: int = 5) -> str:
    """Empty if got and want are bit-identical, else a short description."""
    g, w = bits(got), bits(want)
    if g.shape != w.shape:
        return f"shape {g.shape} != {w.shape}"
    bad = np.flatnonzero(g != w)
    if bad.size == 0:
        return ""
    shown = ", ".join(f"[{i}] got {got.reshape(-1)[i]!r} want {want.reshape(-1)[i]!r}" for i in bad[:limit])
    return f"{bad.size} of {g.size} elements differ: {shown}"


def crc(x: Any) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))


# ---------------------------------------------------------------- multi-process peer


def kill_test_peer(
    rank: int,
    peer_id: int,
    count: int,
    seed: int,
    results: Any,
    control: Any,
    stop_after_post: float | None = None,
    algorithm: str = "RING",
) -> None:
    """A peer process of the SIGKILL test (started with the 'spawn' method).

    Protocol with the parent (results: a multiprocessing Queue shared by all peers;
    control: this peer's end of a Pipe):
      -> ("port", rank, port)             <- ring [(peer_id, host, port), ...]
      -> ("ready", rank)                   <- "go"
      -> ("posted", rank, t)               then one of
      -> ("ok", rank, t, intact) / ("error", rank, t, class name, message, intact)
    t are time.monotonic() stamps (system-wide on Linux, comparable across processes).
    The all-reduce is in place, so `intact` (input checksum unchanged) checks that a
    failed op left the caller's buffer alone.

    With stop_after_post (the victim), the peer lets its op run that many seconds and
    then SIGSTOPs itself in the middle of it (reporting ("too-fast", rank) instead if
    the op had already finished), so the parent can SIGKILL it mid-op without racing
    the op's completion. `algorithm`: the name of the nat.AllReduceAlgorithm to run.
    """
    import os
    import signal

    from pccl_py.errors import PcclError

    engine = None
    try:
        engine = nat.Engine(peer_id=peer_id, host=HOST, port=0)
        results.put(("port", rank, engine.port))
        if not control.poll(60):
            return
        ring = control.recv()
        engine.set_ring(1, ring, rank, timeout=30.0)
        x = np.random.default_rng(seed).standard_normal(count, dtype=np.float32)
        before = crc(x)
        results.put(("ready", rank))
        if not control.poll(60) or control.recv() != "go":
            return
        h = engine.all_reduce(
            x, x, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=60.0, algorithm=nat.AllReduceAlgorithm.__members__[algorithm]
        )
        results.put(("posted", rank, time.monotonic()))
        if stop_after_post is not None:
            time.sleep(stop_after_post)
            if h.done():
                results.put(("too-fast", rank, time.monotonic()))
            else:
                os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs us while stopped
        try:
            h.result()
            results.put(("ok", rank, time.monotonic(), crc(x) == before))
        except PcclError as e:
            t = time.monotonic()
            results.put(("error", rank, t, type(e).__name__, str(e), crc(x) == before))
    except BaseException as e:  # anything unexpected: tell the parent rather than die silently
        results.put(("crash", rank, time.monotonic(), type(e).__name__, traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close()


ROUTE_SOURCE_SEED = 41


def route_source_peer(peer_id: int, fetcher: tuple[int, str, int], control: Any) -> None:
    """A state source of the fetch-route test (started with the 'spawn' method): it
    exposes 8 MiB of float32 (seed ROUTE_SOURCE_SEED), opens its own pool of epoch 1 to
    `fetcher` (as a member does to a joiner), reports (port, exposure id) on `control`
    and waits there to be stopped and killed."""
    import numpy as np

    from pccl_py import _native as nat

    engine = nat.Engine(peer_id=peer_id, host=HOST, port=0)
    data = np.random.default_rng(ROUTE_SOURCE_SEED).standard_normal(2 << 20).astype(np.float32)
    exposure = engine.expose_state([data])
    engine.prepare([fetcher], 1, 1, 10.0, 0.0, 0, 0.0)
    control.send((engine.port, exposure.id))
    control.recv()  # never comes: the parent kills this process
