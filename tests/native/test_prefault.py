"""Prefaulted receives (native/include/pccl/prefault.hpp): large receives into caller
memory have their pages faulted in by a worker thread ahead of the bytes.

- populating never changes a byte, also while another thread writes the same pages;
- held receives (a fake source that answers only when told; an all-reduce whose
  predecessor posts late) show that the destination is faulted in before any byte
  arrives, exactly the pages worth it (not those already mapped to the 4 KiB zero page),
  and that the bytes then land exactly;
- real receives racing the worker, in fresh memory of both kinds (numpy's, which numpy
  opens to huge pages, and plain anonymous memory as torch.empty gives), are exact;
- small receives and in-place all-reduces are left alone; the switch turns it off.

Speed is measured by stress/state_transfer.py (`--only fresh`), not here."""

from __future__ import annotations

import platform
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import xxhash

from pccl_py import Config
from pccl_py import _native as nat
from engine_harness import DT, OP, EngineRing, recv_exact
from state_workers import fill, plain_zeros

HOST = "127.0.0.1"
MIB = 1 << 20
PAGE = 4096
HUGE = 2 * MIB
CHUNK = 8 * MIB


def _kernel_populates() -> bool:
    """MADV_POPULATE_WRITE exists from Linux 5.14 on."""
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (5, 14)


needs_populate = pytest.mark.skipif(not _kernel_populates(), reason="kernel without MADV_POPULATE_WRITE (< 5.14)")


def _pattern(nbytes: int, seed: int) -> np.ndarray:
    out = np.empty(nbytes, np.uint8)
    fill(out, seed)
    return out


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _pagemap(buf: np.ndarray) -> list[int]:
    """/proc/self/pagemap entries of the pages wholly inside `buf`."""
    first = -(-buf.ctypes.data // PAGE)
    last = (buf.ctypes.data + buf.nbytes) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        return list(struct.unpack(f"<{last - first}Q", f.read((last - first) * 8)))


def _present(e: int) -> bool:
    return bool(e >> 63 & 1)


def _ours(e: int) -> bool:
    """Mapped to a page of this process alone: written to, or faulted in writable."""
    return _present(e) and bool(e >> 56 & 1)


def _zero_page(e: int) -> bool:
    """Mapped to the 4 KiB zero page (read, never written: present, anonymous, shared)."""
    return _present(e) and not e >> 61 & 1 and not e >> 56 & 1


def _huge_zero_page(e: int) -> bool:
    """Mapped to the huge zero page (present, not anonymous, shared)."""
    return _present(e) and bool(e >> 61 & 1) and not e >> 56 & 1


def _untouched(make: Callable[[], np.ndarray]) -> np.ndarray:
    """make() until it returns a buffer with no page resident, at most five times (the
    last one either way): the machine may make untouched memory resident behind our back
    (khugepaged; a DAMON scheme, as kdamond runs on this VM: a whole fresh 40 MiB buffer
    was once found resident in CI). Callers still assert that none is."""
    for _ in range(5):
        buf = make()
        if not any(_present(e) for e in _pagemap(buf)):
            break
    return buf


def _fresh_numpy(nbytes: int) -> np.ndarray:
    """np.zeros in memory nobody touched: above glibc's largest mmap threshold (32 MiB),
    which below it may hand out (and clear) reused heap memory instead.

    The view starts at the first 2 MiB boundary past the allocation's start: glibc writes
    its chunk header in the first page, numpy advises huge pages, and khugepaged may then
    collapse the huge page holding that header at any moment, making its 511 other pages
    resident although nobody touched them (seen once in CI)."""
    assert nbytes > 32 * MIB

    def make() -> np.ndarray:
        whole = np.zeros(nbytes + 4 * MIB, np.uint8)
        skip = -(-(whole.ctypes.data + 1) // HUGE) * HUGE - whole.ctypes.data
        return whole[skip : skip + nbytes]

    return _untouched(make)


# ---- populate: never a byte changed -------------------------------------------------------


def test_populate_keeps_the_content_of_touched_and_fresh_memory() -> None:
    expected = _pattern(16 * MIB + 123, 5)
    touched = expected.copy()
    fresh = np.zeros(16 * MIB + 123, np.uint8)
    ok = [nat.populate(touched), nat.populate(fresh[77:])]  # an unaligned start, too
    if _kernel_populates():
        assert ok == [True, True]
    np.testing.assert_array_equal(touched, expected)
    assert not fresh.any()


@pytest.mark.parametrize("kind", ["numpy", "plain"])
def test_populate_racing_a_writer_keeps_every_byte_written(kind: str) -> None:
    """A writer fills fresh memory from the end while populate runs from the start, so
    populate reaches pages the writer has already written. Writing anything to fault a
    page in (zeros, or even the byte just read) would lose some of those bytes."""
    nbytes = 64 * MIB
    pattern = _pattern(nbytes, 9)
    block = 256 << 10
    for round_ in range(3):
        buf = np.zeros(nbytes, np.uint8) if kind == "numpy" else plain_zeros(nbytes, "uint8")
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                start.wait(5)
                for end in range(nbytes, 0, -block):
                    buf[end - block : end] = pattern[end - block : end]  # numpy copies without the GIL
            except BaseException as exc:  # reported below
                errors.append(exc)

        def populater() -> None:
            try:
                start.wait(5)
                for offset in range(0, nbytes, 4 * MIB):  # pieces, as the engine's worker does
                    nat.populate(buf[offset : offset + 4 * MIB])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer), threading.Thread(target=populater)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        mismatch = np.flatnonzero(buf != pattern)
        assert mismatch.size == 0, f"round {round_}: {mismatch.size} bytes changed, first at {mismatch[0]}"


# ---- state fetch, held: a fake source answers only when told ---------------------------------

# Wire format (native/include/pccl/wire.hpp), spoken here by a fake serving peer.
# The engine's layouts (wire.hpp), as the binding exports them.
_HELLO, _HELLO_ACK, _HEADER = (
    struct.Struct(nat.HELLO_FORMAT), struct.Struct(nat.HELLO_ACK_FORMAT), struct.Struct(nat.FRAME_HEADER_FORMAT)
)
_STATE_REQUEST, _STATE_DATA = 4, 5



class _HeldSource:
    """A serving peer on a raw socket: it takes the fetcher's connection and its `chunks`
    state requests, and answers them from `data` once release() is called."""

    PEER = 4242

    def __init__(self, data: np.ndarray, chunks: int) -> None:
        self.data = data
        self.chunks = chunks
        self.requests = 0
        self.error: BaseException | None = None
        self._conn: socket.socket | None = None
        self._release = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(30)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
            self._conn = conn
            with conn:
                conn.settimeout(30)
                recv_exact(conn, _HELLO.size)
                conn.sendall(_HELLO_ACK.pack(nat.HELLO_MAGIC, 0, self.PEER, 0, 0, bytes(16)))
                asked = []
                while len(asked) < self.chunks:
                    header = _HEADER.unpack(recv_exact(conn, _HEADER.size))
                    _, length = struct.unpack("<QQ", recv_exact(conn, header[4]))
                    assert header[1] == _STATE_REQUEST
                    asked.append((header, length))
                    self.requests += 1
                self._release.wait(60)
                for (magic, _, _, _, _, entry, epoch, tag, seq, offset), length in asked:
                    reply = _HEADER.pack(magic, _STATE_DATA, 0, 0, length, entry, epoch, tag, seq, offset)
                    conn.sendall(reply + self.data[offset : offset + length].tobytes())
                while conn.recv(1 << 16):  # until the engine or close() hangs up
                    pass
        except BaseException as exc:  # the test sees it through the fetch's outcome
            self.error = exc

    def close(self) -> None:
        self._release.set()
        self._listener.close()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)


def _held_fetch(engine: nat.Engine, dst: np.ndarray, data: np.ndarray, before_release) -> None:
    """Fetches `data` into `dst` from a _HeldSource, calling before_release() once every
    request is in and no byte has arrived yet."""
    chunks = [(0, off, min(CHUNK, data.nbytes - off), 0, off) for off in range(0, data.nbytes, CHUNK)]
    source = _HeldSource(data, len(chunks))
    try:
        handle = engine.fetch_state(source.PEER, HOST, source.port, 1, [dst], chunks, timeout=60)
        assert _wait_for(lambda: source.requests == len(chunks) or source.error is not None)
        before_release()
        source.release()
        handle.result(timeout=60)
        assert source.error is None, source.error
    finally:
        source.close()


@needs_populate
@pytest.mark.parametrize("kind", ["numpy", "plain"])
def test_fresh_destination_is_faulted_in_before_the_bytes_arrive(kind: str) -> None:
    size = 40 * MIB + 4 * 1001  # a partial last chunk
    data = _pattern(size, 3)
    engine = nat.Engine(peer_id=1)
    try:
        if kind == "numpy":
            dst = _fresh_numpy(size)
        else:  # off page boundaries
            dst = _untouched(lambda: plain_zeros(size + 2 * PAGE, "uint8")[PAGE + 40 : PAGE + 40 + size])
        assert not any(_present(e) for e in _pagemap(dst))

        def check() -> None:
            assert _wait_for(lambda: all(_ours(e) for e in _pagemap(dst))), "not faulted in"
            assert not dst.any()  # faulted in, not written
            assert 0 < engine.prefaulted_bytes <= size + 2 * PAGE

        _held_fetch(engine, dst, data, check)
        np.testing.assert_array_equal(dst, data)
    finally:
        engine.close()


@needs_populate
def test_pages_mapped_to_the_4k_zero_page_are_left_to_the_receive() -> None:
    """Reading untouched memory (hashing a joiner's fresh state) maps its pages to the
    shared zero page; replacing those from the worker would cost a TLB shootdown each."""
    size = 40 * MIB
    data = _pattern(size, 4)
    dst = plain_zeros(size, "uint8")
    xxhash.xxh3_64_intdigest(dst)  # read: every page now maps the zero page
    assert all(_zero_page(e) for e in _pagemap(dst))
    engine = nat.Engine(peer_id=1)
    try:

        def check() -> None:
            time.sleep(0.3)  # time enough for the worker
            assert all(_zero_page(e) for e in _pagemap(dst))
            assert engine.prefaulted_bytes == 0

        _held_fetch(engine, dst, data, check)
        np.testing.assert_array_equal(dst, data)
    finally:
        engine.close()


@needs_populate
def test_the_huge_zero_page_is_faulted_in() -> None:
    """The same read maps numpy's (huge-page advised) memory to the huge zero page,
    which the worker replaces at one TLB flush per 2 MiB: worth it."""
    size = 40 * MIB
    data = _pattern(size, 6)
    dst = _fresh_numpy(size)
    xxhash.xxh3_64_intdigest(dst)
    entries = _pagemap(dst)
    huge = [i for i, e in enumerate(entries) if _huge_zero_page(e)]
    if len(huge) < 512:
        pytest.skip("no transparent huge pages here: numpy's arrays map the 4 KiB zero page")
    engine = nat.Engine(peer_id=1)
    try:

        def check() -> None:
            assert _wait_for(lambda: all(_ours(_pagemap(dst)[i]) for i in huge[:: 512 // 8])), "not faulted in"
            assert not dst.any()

        _held_fetch(engine, dst, data, check)
        np.testing.assert_array_equal(dst, data)
        assert engine.prefaulted_bytes > 0
    finally:
        engine.close()


# ---- state fetch, racing real sources -------------------------------------------------------


class _Sources:
    """`n` engines serving one buffer, and the fetch plan that spreads its chunks over them."""

    def __init__(self, data: np.ndarray, n: int) -> None:
        self.data = data
        self.engines = [nat.Engine(peer_id=100 + i) for i in range(n)]
        self.exposures = [e.expose_state([data]) for e in self.engines]

    def fetch(self, engine: nat.Engine, dst: np.ndarray) -> int:
        size = self.data.nbytes
        plan: dict[int, list[tuple[int, int, int, int, int]]] = {i: [] for i in range(len(self.engines))}
        for c, offset in enumerate(range(0, size, CHUNK)):
            plan[c % len(self.engines)].append((0, offset, min(CHUNK, size - offset), 0, offset))
        handles = [
            engine.fetch_state(src.peer_id, HOST, src.port, exp.id, [dst], plan[i], timeout=60)
            for i, (src, exp) in enumerate(zip(self.engines, self.exposures))
            if plan[i]
        ]
        for h in handles:
            h.result(timeout=60)
        return sum(h.rx_bytes for h in handles)

    def close(self) -> None:
        for exp in self.exposures:
            exp.close()
        for e in self.engines:
            e.close()


@pytest.fixture(scope="module")
def sources():
    s = _Sources(_pattern(40 * MIB + 4 * 1001, 3), n=3)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("prefault", [True, False])
@pytest.mark.parametrize("kind", ["numpy", "plain"])
def test_fetch_into_fresh_memory_is_exact(sources: _Sources, kind: str, prefault: bool) -> None:
    size = sources.data.nbytes
    engine = nat.Engine(peer_id=1, prefault=prefault)
    try:
        for _ in range(2):
            if kind == "numpy":
                dst = _fresh_numpy(size)
            else:
                dst = plain_zeros(size + 2 * PAGE, "uint8")[PAGE + 40 : PAGE + 40 + size]
            assert sources.fetch(engine, dst) == size
            np.testing.assert_array_equal(dst, sources.data)
        if not prefault:
            assert engine.prefaulted_bytes == 0
    finally:
        engine.close()


def test_small_fetches_are_left_to_the_receive() -> None:
    data = _pattern(3 * MIB, 4)  # under the 4 MiB floor
    engine = nat.Engine(peer_id=1)
    try:
        dst = np.zeros(data.nbytes, np.uint8)
        _held_fetch(engine, dst, data, lambda: time.sleep(0.2))
        np.testing.assert_array_equal(dst, data)
        assert engine.prefaulted_bytes == 0
    finally:
        engine.close()


def test_close_during_a_large_fetch_joins_the_worker(sources: _Sources) -> None:
    for _ in range(3):
        engine = nat.Engine(peer_id=1)
        dst = np.zeros(sources.data.nbytes, np.uint8)
        src, exp = sources.engines[0], sources.exposures[0]
        chunks = [(0, off, CHUNK, 0, off) for off in range(0, 32 * MIB, CHUNK)]
        handle = engine.fetch_state(src.peer_id, HOST, src.port, exp.id, [dst], chunks, timeout=60)
        engine.close()  # fails the fetch (or it finished first), stops the worker
        assert handle.wait(timeout=10)


# ---- out-of-place all-reduce ----------------------------------------------------------------


@pytest.mark.parametrize("prefault", [True, False])
def test_out_of_place_all_reduce_into_fresh_output_is_exact(prefault: bool) -> None:
    """Rank 0 posts first and waits for its predecessor, which posts only once rank 0's
    output has been faulted in (with prefault); then both finish with exact sums."""
    n, count = 2, (40 * MIB) // 4 + 5  # int32: exact sums; uneven chunks
    xs = [(np.arange(count, dtype=np.int32) * (r + 3)) ^ (r * 0x01010101) for r in range(n)]
    expected = np.sum(np.stack(xs), axis=0, dtype=np.int32)
    outs = [_fresh_numpy(count * 4).view(np.int32) for _ in range(n)]
    with EngineRing(n, prefault=prefault) as ring:
        e0, e1 = ring.engines
        h0 = e0.all_reduce(xs[0], outs[0], DT.INT32, OP.SUM, tag=0, seq=1, timeout=60)
        if prefault and _kernel_populates():
            assert _wait_for(lambda: all(_ours(e) for e in _pagemap(outs[0]))), "not faulted in"
            assert not outs[0].any()
        else:
            time.sleep(0.2)
            assert not any(_present(e) for e in _pagemap(outs[0]))
        h1 = e1.all_reduce(xs[1], outs[1], DT.INT32, OP.SUM, tag=0, seq=1, timeout=60)
        h0.result(timeout=60)
        h1.result(timeout=60)
        prefaulted = [e0.prefaulted_bytes, e1.prefaulted_bytes]
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    if not prefault:
        assert prefaulted == [0, 0]


def test_in_place_all_reduce_faults_nothing_in() -> None:
    """In place, the caller's buffer holds the input: its pages are there already."""
    n, count = 2, (16 * MIB) // 4
    xs = [np.full(count, r + 1, np.int32) for r in range(n)]
    with EngineRing(n) as ring:

        def run(r: int, e: nat.Engine) -> int:
            e.all_reduce(xs[r], xs[r], DT.INT32, OP.SUM, tag=0, seq=1, timeout=60).result(timeout=60)
            return e.prefaulted_bytes

        assert ring.run_ok(run) == [0] * n
    for x in xs:
        assert (x == 3).all()


# ---- the switch ------------------------------------------------------------------------------


def test_config_switch() -> None:
    assert Config().prefault is True
    assert Config.from_env({"PCCL_PREFAULT": "0"}).prefault is False
    assert Config.from_env({}, prefault=False).prefault is False


# ---- a shared state populated from its construction on ------------------------------------


@needs_populate
def test_prefault_populates_fresh_memory_and_leaves_every_byte() -> None:
    buf = _fresh_numpy(40 * MIB)
    buf[5 * MIB : 6 * MIB] = _pattern(MIB, 11)  # some pages written already, with bytes to keep
    assert not all(_ours(e) for e in _pagemap(buf))
    assert nat.prefault(buf[77:]) > 0  # an unaligned start, too
    assert all(_ours(e) for e in _pagemap(buf[4096:]))
    np.testing.assert_array_equal(buf[5 * MIB : 6 * MIB], _pattern(MIB, 11))
    assert not buf[: 5 * MIB].any() and not buf[6 * MIB :].any()
    assert nat.prefault(buf) == 0  # all resident: nothing left to do
    assert nat.prefault(np.zeros(MIB, np.uint8)) == 0  # small: left to the receive


@needs_populate
@pytest.mark.parametrize("prefault", [True, False])
def test_shared_state_populates_its_pages_from_construction(prefault: bool) -> None:
    import pccl_py as pccl

    # Sizes: more than one slice of 16 MiB, a tail under 4 MiB, and a single slice. Fresh
    # mappings of their own (a numpy array may land in memory the allocator reused).
    a, b, c = plain_zeros(36 * MIB, "uint8"), plain_zeros(34 * MIB // 4, "float32"), plain_zeros(10 * MIB // 2, "float16")
    state = pccl.SharedState({"a": a, "b": b, "c": c}, prefault=prefault)
    job = state._prefaulting
    if not prefault:
        assert job is None
        assert not any(_ours(e) for e in _pagemap(a))
        return
    assert job is not None
    job.thread.join(timeout=60)
    assert not job.thread.is_alive()
    for x in (a, b, c):
        assert all(_ours(e) for e in _pagemap(x.view(np.uint8)))
        assert not x.any()
    assert job.populated == 80 * MIB
    job.stop()  # after the job ended: a no-op


@needs_populate
def test_a_stopped_population_ends_and_a_racing_write_keeps_its_bytes() -> None:
    import pccl_py as pccl

    a = _fresh_numpy(200 * MIB)
    state = pccl.SharedState({"a": a})
    job = state._prefaulting
    assert job is not None
    a[-MIB:] = _pattern(MIB, 3)  # written while (or before) the thread populates
    job.stop()  # as interpreter exit does
    assert not job.thread.is_alive()
    stopped_at = job.populated
    time.sleep(0.05)
    assert job.populated == stopped_at  # nothing populated after the stop
    np.testing.assert_array_equal(a[-MIB:], _pattern(MIB, 3))
    assert not a[:-MIB].any()
