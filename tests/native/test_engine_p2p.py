"""Point-to-point on the native engine (Engine.send / Engine.recv): matching by
(source, tag) in order, any-source receives, payloads far larger than the mailbox in
both directions at once, size mismatches, timeouts and withdrawn offers, and a peer
process SIGKILLed mid-op.

Every wait has a deadline (op timeouts, harness timeouts), so a regression fails
instead of hanging.
"""

from __future__ import annotations

from typing import Any

import multiprocessing as mp
import os
import queue
import signal
import time

import numpy as np
import pytest

from engine_harness import DT, HOST, OP, EngineRing
from p2p_victim import p2p_victim
from pccl_py import _native as nat
from pccl_py.errors import Aborted, InvalidArgument, PeerLost, ProtocolError, Timeout

MiB = 1 << 20


def _bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _pid(rank: int) -> int:
    return EngineRing.peer_id(rank)


def test_send_recv_both_directions_with_tags():
    with EngineRing(2) as ring:
        def fn(r: int, e: nat.Engine) -> list[bytes]:
            other = _pid(1 - r)
            sends = [e.send(_bytes(1000 + t, 10 * r + t), other, tag=t, timeout=10) for t in range(3)]
            outs = [np.zeros(1000 + t, dtype=np.uint8) for t in range(3)]
            # Received in the reverse tag order: a tag is its own queue.
            for t in reversed(range(3)):
                h = e.recv(outs[t], other, tag=t, timeout=10)
                h.result(10)
                assert h.peer == other and h.rx_bytes == 1000 + t
            for h in sends:
                h.result(10)
            return [o.tobytes() for o in outs]

        got = ring.run_ok(fn, timeout=30)
        for r in range(2):
            for t in range(3):
                assert got[r][t] == _bytes(1000 + t, 10 * (1 - r) + t).tobytes(), (r, t)


def test_sends_on_one_tag_match_receives_in_order():
    """The k-th send from A to B with tag T lands in the k-th receive at B from A with T,
    also when the receives are posted before the sends and with other tags between."""
    with EngineRing(2) as ring:
        def fn(r: int, e: nat.Engine) -> list[bytes]:
            if r == 0:
                time.sleep(0.2)  # the receives are posted first
                hs = [e.send(_bytes(64, k), _pid(1), tag=99, timeout=10) for k in range(5)]
                hs.append(e.send(_bytes(8, 50), _pid(1), tag=3, timeout=10))
                for h in hs:
                    h.result(10)
                return []
            outs = [np.zeros(64, dtype=np.uint8) for _ in range(5)]
            other = np.zeros(8, dtype=np.uint8)
            hs = [e.recv(outs[k], _pid(0), tag=99, timeout=10) for k in range(2)]
            hs.append(e.recv(other, _pid(0), tag=3, timeout=10))
            hs += [e.recv(outs[k], _pid(0), tag=99, timeout=10) for k in range(2, 5)]
            for h in hs:
                h.result(10)
            return [o.tobytes() for o in outs] + [other.tobytes()]

        got = ring.run_ok(fn, timeout=30)[1]
        assert got[:5] == [_bytes(64, k).tobytes() for k in range(5)]
        assert got[5] == _bytes(8, 50).tobytes()


def test_any_source_receive_names_the_sender():
    with EngineRing(3) as ring:
        def fn(r: int, e: nat.Engine) -> Any:
            if r != 0:
                e.send(_bytes(4096, r), _pid(0), tag=5, timeout=10).result(10)
                return None
            got = {}
            for _ in range(2):
                out = np.zeros(4096, dtype=np.uint8)
                h = e.recv(out, None, tag=5, timeout=10)
                h.result(10)
                got[h.peer] = out.tobytes()
            return got

        got = ring.run_ok(fn, timeout=30)[0]
        assert got == {_pid(1): _bytes(4096, 1).tobytes(), _pid(2): _bytes(4096, 2).tobytes()}


def test_any_source_leaves_an_offer_to_the_specific_receive_posted_before_it():
    with EngineRing(3) as ring:
        def fn(r: int, e: nat.Engine) -> Any:
            if r == 1:
                time.sleep(0.2)
                e.send(_bytes(16, 1), _pid(0), tag=1, timeout=10).result(10)
            if r == 2:
                time.sleep(0.4)
                e.send(_bytes(16, 2), _pid(0), tag=1, timeout=10).result(10)
            if r != 0:
                return None
            a, b = np.zeros(16, dtype=np.uint8), np.zeros(16, dtype=np.uint8)
            specific = e.recv(a, _pid(1), tag=1, timeout=10)
            anyone = e.recv(b, None, tag=1, timeout=10)
            specific.result(10)
            anyone.result(10)
            return a.tobytes(), b.tobytes(), anyone.peer

        a, b, src = ring.run_ok(fn, timeout=30)[0]
        assert a == _bytes(16, 1).tobytes()
        assert (b, src) == (_bytes(16, 2).tobytes(), _pid(2))


@pytest.mark.parametrize("send_first", [True, False])
def test_large_exchange_both_ways_beyond_the_mailbox(send_first):
    """isend(x, peer); recv(y, peer) on both sides with 64 MiB, far more than the mailbox
    (1 MiB here) and the kernel's buffers: the rendezvous never buffers a payload."""
    n = 64 * MiB
    with EngineRing(2, mailbox_limit_bytes=MiB) as ring:
        data = [_bytes(n, 1), _bytes(n, 2)]

        def fn(r: int, e: nat.Engine) -> bool:
            other = _pid(1 - r)
            out = np.zeros(n, dtype=np.uint8)
            if send_first:
                s = e.send(data[r], other, tag=0, timeout=30)
                h = e.recv(out, other, tag=0, timeout=30)
            else:
                h = e.recv(out, other, tag=0, timeout=30)
                s = e.send(data[r], other, tag=0, timeout=30)
            h.result(30)
            s.result(30)
            assert s.tx_bytes >= n
            return bool(np.array_equal(out, data[1 - r]))

        assert ring.run_ok(fn, timeout=90) == [True, True]


def test_zero_byte_message_and_late_receive():
    with EngineRing(2) as ring:
        def fn(r: int, e: nat.Engine) -> int:
            if r == 0:
                e.send(np.zeros(0, dtype=np.uint8), _pid(1), tag=2, timeout=10).result(10)
                return 0
            time.sleep(0.3)  # the offer waits for the receive
            h = e.recv(np.zeros(0, dtype=np.uint8), _pid(0), tag=2, timeout=10)
            h.result(10)
            return h.peer

        assert ring.run_ok(fn, timeout=30) == [0, _pid(0)]


def test_size_mismatch_fails_both_sides_and_poisons_nothing():
    with EngineRing(2) as ring:
        def mismatch(r: int, e: nat.Engine) -> None:
            if r == 0:
                e.send(_bytes(100, 0), _pid(1), tag=4, timeout=10).result(10)
            else:
                e.recv(np.zeros(64, dtype=np.uint8), _pid(0), tag=4, timeout=10).result(10)

        outcomes = ring.run(mismatch, timeout=30)
        for o in outcomes:
            assert isinstance(o.error, ProtocolError), o.error
            assert "100" in str(o.error) and "64" in str(o.error)
        # The connections are intact: the same tag and an all-reduce work at once.
        def after(r: int, e: nat.Engine) -> bytes:
            out = np.zeros(100, dtype=np.uint8)
            if r == 0:
                e.send(_bytes(100, 9), _pid(1), tag=4, timeout=10).result(10)
            else:
                e.recv(out, _pid(0), tag=4, timeout=10).result(10)
            x = np.ones(8, dtype=np.float32)
            e.all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=10).result(10)
            assert (x == 2).all()
            return out.tobytes()

        assert ring.run_ok(after, timeout=30)[1] == _bytes(100, 9).tobytes()
        assert all(e.live_connections(_pid(1 - r), 1) > 0 for r, e in enumerate(ring.engines))


def test_timed_out_send_withdraws_its_offer():
    with EngineRing(2) as ring:
        e0, e1 = ring.engines
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            e0.send(_bytes(32, 1), _pid(1), tag=8, timeout=0.3).result(5)
        assert time.monotonic() - t0 < 2.0
        time.sleep(0.1)  # the cancel reaches peer 1
        # The withdrawn offer is not taken: this receive waits for the next send.
        out = np.zeros(32, dtype=np.uint8)
        h = e1.recv(out, _pid(0), tag=8, timeout=10)
        time.sleep(0.2)
        assert not h.done()
        e0.send(_bytes(32, 2), _pid(1), tag=8, timeout=10).result(10)
        h.result(10)
        assert out.tobytes() == _bytes(32, 2).tobytes()


def test_unmatched_receive_times_out_and_abort_fails_with_aborted():
    with EngineRing(2) as ring:
        e0 = ring.engines[0]
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            e0.recv(np.zeros(8, dtype=np.uint8), _pid(1), tag=0, timeout=0.3).result(5)
        assert time.monotonic() - t0 < 2.0
        h = e0.recv(np.zeros(8, dtype=np.uint8), None, tag=0, timeout=30)
        h.abort("test")
        with pytest.raises(Aborted):
            h.result(5)
        # Nothing was poisoned: a later exchange works.
        def fn(r: int, e: nat.Engine) -> None:
            if r == 0:
                e.recv(np.zeros(8, dtype=np.uint8), _pid(1), tag=0, timeout=10).result(10)
            else:
                e.send(np.zeros(8, dtype=np.uint8), _pid(0), tag=0, timeout=10).result(10)

        ring.run_ok(fn, timeout=30)


def test_point_to_point_beside_an_all_reduce():
    with EngineRing(3) as ring:
        def fn(r: int, e: nat.Engine) -> bool:
            nxt, prv = _pid((r + 1) % 3), _pid((r + 2) % 3)
            out = np.zeros(MiB, dtype=np.uint8)
            h = e.recv(out, prv, tag=1, timeout=20)
            x = np.full(1 << 18, r, dtype=np.float32)
            ar = e.all_reduce(x, x, DT.FLOAT32, OP.SUM, tag=0, seq=0, timeout=20)
            s = e.send(_bytes(MiB, r), nxt, tag=1, timeout=20)
            ar.result(20)
            s.result(20)
            h.result(20)
            return bool((x == 3).all()) and out.tobytes() == _bytes(MiB, (r + 2) % 3).tobytes()

        assert ring.run_ok(fn, timeout=60) == [True] * 3


def test_invalid_point_to_point_arguments():
    with EngineRing(2) as ring:
        e0 = ring.engines[0]
        with pytest.raises(InvalidArgument):
            e0.send(np.zeros(4, dtype=np.uint8), _pid(0), tag=0)
        with pytest.raises(InvalidArgument):
            e0.recv(np.zeros(4, dtype=np.uint8), 424242, tag=0)
    with EngineRing(1) as alone:
        with pytest.raises(InvalidArgument):
            alone.engines[0].recv(np.zeros(4, dtype=np.uint8), None, tag=0)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


@pytest.mark.parametrize("victim_role", ["recv", "send"])
def test_peer_killed_mid_op_fails_with_peer_lost_quickly(victim_role):
    """A peer process posts its side of a 256 MiB exchange and freezes; the test's
    engine posts the other side and SIGKILLs the frozen peer: the op fails with PeerLost
    within 2 s (the op timeout is 60 s)."""
    n = 256 * MiB
    me, victim_id = _pid(0), _pid(1)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=p2p_victim, args=(victim_id, me, victim_role, n, results, child_end), daemon=True)
    engine = nat.Engine(peer_id=me, host=HOST, port=0)
    try:
        proc.start()
        msg = results.get(timeout=60)
        assert msg[0] == "port", msg
        ring = [(me, HOST, engine.port), (victim_id, HOST, msg[1])]
        parent_end.send(ring)
        engine.set_ring(1, ring, 0, timeout=30.0)
        buf = np.zeros(n, dtype=np.uint8)
        if victim_role == "recv":
            h = engine.send(buf, victim_id, tag=7, timeout=60.0)
        else:
            h = engine.recv(buf, victim_id, tag=7, timeout=60.0)
        assert parent_end.poll(60), "the victim never posted its op"
        msg = parent_end.recv()
        assert msg[0] == "posted", msg
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "T":
            assert time.monotonic() < deadline, "the victim never stopped itself"
            time.sleep(0.005)
        time.sleep(0.2)
        assert not h.done()
        t_kill = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        assert h.wait(10.0)
        delay = time.monotonic() - t_kill
        with pytest.raises(PeerLost):
            h.result()
        assert delay < 2.0, f"PeerLost only {delay:.2f}s after the kill"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        engine.close()
        parent_end.close()
        child_end.close()
        results.close()
        results.join_thread()
