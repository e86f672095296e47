"""Ring all-reduce of the native engine: results against an exact reference, for every
dtype x operator, N in {1, 2, 3, 4, 8}, in place and out of place.

The reference follows the engine's documented reduction order (chunk c starts with
x_c and is folded forward around the ring up to its owner, peer c-1), so floats are
compared bit for bit too. Every peer's output must be byte-identical to every other
peer's. The engines of one N are reused across tests (fresh seq per op); a ring on
which an op failed is rebuilt for the next test.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch

from engine_harness import (
    DTYPES,
    HOST,
    OPS,
    DT,
    OP,
    EngineRing,
    HarnessTimeout,
    bf16_to_f32,
    chunk_bounds,
    crc,
    describe,
    expected_bytes,
    f32_to_bf16,
    make_data,
    mismatch_report,
    reduce_step,
    recv_exact,
    reference_allreduce,
    run_ring,
)
from pccl_py import _native as nat
from pccl_py.peer.buffers import native_view
from pccl_py.errors import PcclError, Timeout

NS = [1, 2, 3, 4, 8]
BIG = 2**20 + 3
HUGE = 2**24
OP_TIMEOUT = 10.0  # per op; a 2**20-element op takes well under 0.5 s here
HUGE_OP_TIMEOUT = 20.0

NATIVE_TO_NAME = {spec[0]: name for name, spec in DTYPES.items()}


@pytest.fixture(scope="module")
def ring_cache():
    cache: dict[tuple, EngineRing] = {}
    yield cache
    for ring in cache.values():
        ring.close()


@pytest.fixture
def get_ring(ring_cache):
    """get_ring(n, **engine_kwargs): a healthy ring of n engines, reused across tests."""

    def get(n: int, **kwargs) -> EngineRing:
        key = (n, tuple(sorted(kwargs.items())))
        ring = ring_cache.get(key)
        if ring is None or ring.closed or ring.tainted:
            if ring is not None:
                ring.close()
            ring = ring_cache[key] = EngineRing(n, **kwargs)
        return ring

    return get


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def check_allreduce(
    ring: EngineRing,
    data: list[np.ndarray],
    dtype_name: str,
    op_name: str,
    in_place_parity: int,
    *,
    tag: int = 0,
    op_timeout: float = OP_TIMEOUT,
) -> tuple[str, bool]:
    """Runs one all-reduce of `data` (one read-only array per rank) and checks it.
    Ranks with (rank + parity) even reduce in place (a copy of their data), the
    others out of place (their read-only data in, a garbage-filled output).
    Returns (problem description or "", whether the failure looks like a hang)."""
    n = ring.n
    native, _, _ = DTYPES[dtype_name]
    count = data[0].size
    elem = data[0].dtype.itemsize
    in_place = [(r + in_place_parity) % 2 == 0 for r in range(n)]
    inputs, outputs, crcs = [], [], []
    for r in range(n):
        crcs.append(crc(data[r]))
        if in_place[r]:
            buf = data[r].copy()
            inputs.append(buf)
            outputs.append(buf)
        else:
            out = np.empty_like(data[r])
            out.view(np.uint8).fill(0xA5)
            inputs.append(data[r])
            outputs.append(out)
    what = f"N={n} {dtype_name} {op_name} count={count} in_place={in_place}"
    seq = ring.next_seq(tag)
    try:
        outcomes = ring.all_reduce(inputs, outputs, native, OPS[op_name], tag=tag, seq=seq, op_timeout=op_timeout)
    except HarnessTimeout as e:
        return f"{what}: harness timeout: {e}", True
    problems = []
    # Inputs are never written unless the op succeeded and was in place.
    for r in range(n):
        if crc(data[r]) != crcs[r]:
            problems.append(f"rank {r}: the caller's data array changed")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for r in range(n):
            if in_place[r] and mismatch_report(inputs[r], data[r]):
                problems.append(f"rank {r}: in-place buffer modified by a failed op")
        hang = any(isinstance(o.error, Timeout) for o in failed)
        return f"{what}: op failed:\n{describe(outcomes)}\n" + "\n".join(problems), hang
    want = reference_allreduce(data, dtype_name, op_name)
    for r in range(n):
        if r > 0:
            diff = mismatch_report(outputs[r], outputs[0])
            if diff:
                problems.append(f"rank {r} output differs from rank 0's: {diff}")
        diff = mismatch_report(outputs[r], want)
        if diff:
            problems.append(f"rank {r} output differs from the reference: {diff}")
        tx, rx, key = outcomes[r].value
        if (tx, rx) != expected_bytes(count, elem, n, r):
            problems.append(f"rank {r}: (tx, rx) = {(tx, rx)}, expected {expected_bytes(count, elem, n, r)}")
        if tuple(key) != (ring.epoch, tag, seq):
            problems.append(f"rank {r}: key {key} != {(ring.epoch, tag, seq)}")
    if problems:
        return f"{what}:\n  " + "\n  ".join(problems), False
    return "", False


def sizes_for(n: int) -> list[int]:
    return sorted({0, 1, 7, n - 1, BIG})


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("n", NS)
def test_allreduce_every_op_matches_reference(get_ring, n, dtype_name):
    """Counts 0, 1, 7, N-1 and 2**20+3, all five operators, in place and out of place
    (alternating per rank and per op, so every rank does both)."""
    ring = get_ring(n)
    rng = np.random.default_rng(seed_of("matrix", n, dtype_name))
    failures: list[str] = []
    combo = 0
    hung = False
    for count in sizes_for(n):
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        for x in data:
            x.flags.writeable = False
        for op_name in OPS:
            problem, hang = check_allreduce(ring, data, dtype_name, op_name, combo % 2)
            combo += 1
            if problem:
                failures.append(problem)
                if hang:  # do not spend another op timeout on this test
                    hung = True
                    break
            if ring.closed:
                break
        if hung or ring.closed:
            break
    assert not failures, f"{len(failures)} failed all-reduce(s):\n\n" + "\n\n".join(failures)


@pytest.mark.parametrize("dtype_name,op_name", [("float32", "SUM"), ("int32", "MAX")])
@pytest.mark.parametrize("n", NS)
def test_allreduce_16m_elements(n, dtype_name, op_name):
    """64 MiB per peer. A ring of its own, closed at the end, so the engines' scratch
    buffers (64 MiB per in-place rank) do not outlive the test."""
    rng = np.random.default_rng(seed_of("huge", n, dtype_name))
    if dtype_name == "float32":
        data = [rng.standard_normal(HUGE, dtype=np.float32) for _ in range(n)]
    else:
        data = [make_data(dtype_name, HUGE, rng) for _ in range(n)]
    for x in data:
        x.flags.writeable = False
    with EngineRing(n) as ring:
        problem, _ = check_allreduce(ring, data, dtype_name, op_name, n % 2, op_timeout=HUGE_OP_TIMEOUT)
    assert not problem, problem


# ---------------------------------------------------------------- torch tensors


TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("torch_dtype", TORCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_allreduce_torch_cpu_tensors(get_ring, torch_dtype):
    """torch CPU tensors through native_view (bfloat16 viewed as int16): in place the
    tensor itself must hold the result; out of place a second tensor."""
    n, count = 3, 100_003
    ring = get_ring(n)
    gen = torch.Generator().manual_seed(seed_of("torch", str(torch_dtype)) % 2**31)
    failures = []
    for i, op_name in enumerate(OPS):
        if torch_dtype.is_floating_point:
            mag = torch.rand(n, count, generator=gen, dtype=torch.float64) * 1.5 + 0.5
            sign = torch.where(torch.rand(n, count, generator=gen) < 0.5, -1.0, 1.0).double()
            base = (mag * sign).to(torch_dtype)
        else:
            info = torch.iinfo(torch_dtype)
            base = torch.randint(info.min, info.max, (n, count), generator=gen, dtype=torch_dtype)
        originals = [base[r].clone() for r in range(n)]
        tensors = [base[r].clone() for r in range(n)]
        in_place = [(r + i) % 2 == 0 for r in range(n)]
        outs = [tensors[r] if in_place[r] else torch.empty_like(tensors[r]) for r in range(n)]
        in_views, out_views, natives = [], [], set()
        for r in range(n):
            v, d = native_view(tensors[r])
            o, _ = native_view(outs[r])
            assert v.__array_interface__["data"][0] == tensors[r].data_ptr()  # zero-copy
            in_views.append(v)
            out_views.append(v if in_place[r] else o)
            natives.add(d)
        assert len(natives) == 1
        native = natives.pop()
        dtype_name = NATIVE_TO_NAME[native]
        if torch_dtype == torch.bfloat16:
            assert native == DT.BFLOAT16
        outcomes = ring.all_reduce(in_views, out_views, native, OPS[op_name])
        if not all(o.ok for o in outcomes):
            failures.append(f"{op_name}: op failed:\n{describe(outcomes)}")
            continue

        def raw(t: torch.Tensor) -> np.ndarray:
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(np.uint16)
            return t.numpy()

        want = reference_allreduce([raw(t) for t in originals], dtype_name, op_name)
        for r in range(n):
            diff = mismatch_report(raw(outs[r]), want)
            if diff:
                failures.append(f"{op_name} rank {r} (in_place={in_place[r]}): {diff}")
            if in_place[r]:
                diff = mismatch_report(raw(tensors[r]), want)
                if diff:
                    failures.append(f"{op_name} rank {r}: the tensor itself was not updated in place: {diff}")
            elif not torch.equal(tensors[r], originals[r]):
                failures.append(f"{op_name} rank {r}: out-of-place input tensor modified")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- oracle sanity


def test_reference_bf16_rounding_matches_torch():
    """The hand-written bfloat16 conversion of the reference agrees with torch's
    (round to nearest even), including exact ties, and one bf16 SUM step agrees with
    torch's bfloat16 addition."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-30, 30, 200_000)).astype(np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF], dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, ties, np.array([0.0, -0.0, np.inf, -np.inf], dtype=np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert mismatch_report(f32_to_bf16(x), want) == ""
    a, b = f32_to_bf16(x[:1000]), f32_to_bf16(x[1000:2000][::-1].copy())
    ta = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    tb = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)
    torch_sum = (ta + tb).view(torch.int16).numpy().view(np.uint16)
    assert mismatch_report(reduce_step("bf16", "SUM", a, b), torch_sum) == ""
    assert np.array_equal(bf16_to_f32(want), torch.from_numpy(x).to(torch.bfloat16).float().numpy(), equal_nan=True)


def test_reference_order_is_observable_in_float16():
    """The bit-exact comparison is meaningful: a different association order gives
    other float16 bits on random data, so a wrong order in the engine would be caught."""
    rng = np.random.default_rng(2)
    data = [make_data("float16", 10_000, rng) for _ in range(4)]
    ring_order = reference_allreduce(data, "float16", "SUM")
    naive = data[0]
    for x in data[1:]:
        naive = (naive.astype(np.float32) + x.astype(np.float32)).astype(np.float16)
    assert mismatch_report(ring_order, naive) != ""
    assert chunk_bounds(10, 4) == [0, 3, 6, 8, 10]


# ---------------------------------------------------------------- other transport shapes


@pytest.mark.parametrize("dtype_name,op_name", [("float32", "SUM"), ("bfloat16", "AVG"), ("int64", "PROD")])
def test_allreduce_striped_connections_small_segments(get_ring, dtype_name, op_name):
    """4 connections per neighbour and 64 KiB segments: frames of one op are striped
    over several streams and arrive out of order."""
    n = 4
    ring = get_ring(n, connections_per_peer=4, segment_bytes=64 << 10)
    rng = np.random.default_rng(seed_of("striped", dtype_name))
    failures = []
    for i, count in enumerate([BIG, 3 * 64 * 1024 // 8 + 5]):
        data = [make_data(dtype_name, count, rng) for _ in range(n)]
        problem, hang = check_allreduce(ring, data, dtype_name, op_name, i % 2)
        if problem:
            failures.append(problem)
            if hang:
                break
    assert not failures, "\n\n".join(failures)


def test_allreduce_late_poster_with_small_mailbox():
    """One peer posts its op 0.3 s after the others while their frames pile up at it,
    with a 1 MiB mailbox limit (the rest waits in the sockets): the op still completes
    with the right result."""
    n, count = 3, 2 * 2**20  # 8 MiB of float32
    rng = np.random.default_rng(3)
    data = [make_data("float32", count, rng) for _ in range(n)]
    outs = [np.empty_like(x) for x in data]

    def fn(r, e):
        if r == 2:
            time.sleep(0.3)
        h = e.all_reduce(data[r], outs[r], DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=20.0)
        h.result()

    outcomes = run_ring(n, fn, timeout=40.0, mailbox_limit_bytes=1 << 20)
    assert all(o.ok for o in outcomes), describe(outcomes)
    want = reference_allreduce(data, "float32", "SUM")
    for r in range(n):
        assert mismatch_report(outs[r], want) == "", f"rank {r}"


# ---------------------------------------------------------------- a frame straddling the post

# Wire format (native/include/pccl/wire.hpp), spoken here by a fake peer.
# The engine's layouts (wire.hpp), as the binding exports them.
_HELLO, _HELLO_ACK, _HEADER = (
    struct.Struct(nat.HELLO_FORMAT), struct.Struct(nat.HELLO_ACK_FORMAT), struct.Struct(nat.FRAME_HEADER_FORMAT)
)
_HELLO_MAGIC, _FRAME_MAGIC = nat.HELLO_MAGIC, nat.FRAME_MAGIC


def _digest(count: int, dtype: int, op: int, world: int) -> int:
    h = 2166136261
    for f in (count, dtype, op, world):
        for i in range(8):
            h ^= (f >> (8 * i)) & 0xFF
            h = (h * 16777619) & 0xFFFFFFFF
    return h


def _frame(phase: int, length: int, digest: int, offset: int, *, epoch=1, tag=0, seq=0) -> bytes:
    return _HEADER.pack(_FRAME_MAGIC, 1, phase, 0, length, digest, epoch, tag, seq, offset)


@pytest.mark.parametrize("split", [False, True], ids=["whole-frame", "split-frame"])
def test_frame_arriving_across_op_post_is_delivered(split):
    """N=2 with a fake peer on a raw socket. The predecessor's reduce-scatter frame
    starts arriving before this peer posts its op and finishes after (split), or comes
    entirely after the post: in both cases the op must complete with the right result.
    (Frames that arrive before the post wait in the mailbox; one that is half read at
    the moment of the post must still reach the op.)"""
    assert (_HELLO.size, _HELLO_ACK.size, _HEADER.size) == (nat.HELLO_SIZE, nat.HELLO_ACK_SIZE, nat.FRAME_HEADER_SIZE)
    count = 8
    engine = nat.Engine(peer_id=1000, host=HOST, port=0)
    lst = socket.socket()
    peer_sock = None
    try:
        lst.bind((HOST, 0))
        lst.listen(4)
        lst.settimeout(10)
        fake_port = lst.getsockname()[1]
        received = bytearray()

        def accept_and_drain():
            c, _ = lst.accept()
            c.settimeout(10)
            recv_exact(c, _HELLO.size)
            c.sendall(_HELLO_ACK.pack(_HELLO_MAGIC, 0, 2000, 0, 0, bytes(16)))  # status ok, peer 2000, no auth
            try:
                while True:
                    b = c.recv(1 << 16)
                    if not b:
                        break
                    received.extend(b)
            except OSError:
                pass
            finally:
                c.close()

        t = threading.Thread(target=accept_and_drain, daemon=True)
        t.start()
        engine.set_ring(1, [(1000, HOST, engine.port), (2000, HOST, fake_port)], 0, timeout=5.0)
        peer_sock = socket.create_connection((HOST, engine.port), timeout=10)
        peer_sock.sendall(_HELLO.pack(_HELLO_MAGIC, nat.PROTOCOL_VERSION, 2000, 1, 0, 1))
        recv_exact(peer_sock, _HELLO_ACK.size)
        dig = _digest(count, int(DT.FLOAT32), int(OP.SUM), 2)
        x = np.arange(count, dtype=np.float32)
        out = np.zeros_like(x)
        partial = np.full(4, 100.0, np.float32).tobytes()  # the fake peer's half (chunk 1)
        rs = _frame(0, 16, dig, 16) + partial  # reduce-scatter of chunk 1, owned by this peer
        if split:
            peer_sock.sendall(rs[: _HEADER.size + 8])
            time.sleep(0.3)  # let the engine read the header and half the payload
        h = engine.all_reduce(x, out, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=3.0)
        time.sleep(0.3)
        peer_sock.sendall(rs[_HEADER.size + 8 :] if split else rs)
        peer_sock.sendall(_frame(1, 16, dig, 0) + np.full(4, 7.0, np.float32).tobytes())  # all-gather, chunk 0
        try:
            h.result()
        except PcclError as e:
            pytest.fail(f"op failed ({type(e).__name__}: {e}) although every frame was delivered")
        assert out.tolist() == [7.0] * 4 + [104.0, 105.0, 106.0, 107.0]
    finally:
        if peer_sock is not None:
            peer_sock.close()
        engine.close()
        lst.close()
