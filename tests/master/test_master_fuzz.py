"""Fuzzing the master's control socket: a raw ZeroMQ DEALER throws random bytes, random
msgpack values, messages that are structurally valid but wrong, oversized frames and
multi-part frames at a live in-process Master, while two real Communicators in the
same process keep running all-reduces through it.

After every example the master must answer a `status` request (from a well-behaved
client) within 2 s; every message it sends back to the fuzzer must be a valid protocol
message; fuzz input must not leave peers behind in its tables (only valid `hello`s
register peers, and those go away with their heartbeats); the process's RSS must stay
bounded. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pccl_py
from pccl_py.wire import protocol
from pccl_py.errors import ProtocolError

pytestmark = pytest.mark.timeout(120)

CAP = 4096
HB_INTERVAL = 0.25
HB_TIMEOUT = 3.0
STATUS_DEADLINE = 2.0
MAX_RSS_GROWTH = 50 << 20
EXAMPLES = 300
ALL_REDUCE_EVERY = 20

CONFIG = pccl_py.Config(
    heartbeat_interval=HB_INTERVAL,
    heartbeat_timeout=HB_TIMEOUT,
    max_message_bytes=CAP,
    connect_timeout=10.0,
    op_timeout=20.0,
)

# Types of replies the master may send to anyone.
MASTER_TO_PEER = {
    "welcome", "topology", "pending_count", "outcome", "evicted", "unknown", "error", "status_reply", "sync_plan",
    "sync_result", "hb", "mismatch", "joining",
}


# ---------------------------------------------------------------------- helpers


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def closed_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class StatusProbe:
    """A well-behaved client asking the master for its status."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect("tcp://" + address)

    def status(self, deadline_s: float = STATUS_DEADLINE) -> dict[str, Any]:
        self.sock.send(protocol.encode(protocol.make("status")))
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                raise AssertionError(f"the master did not answer a status request within {deadline_s}s")
            msg = protocol.decode(self.sock.recv(), 1 << 30)
            if msg["t"] == "status_reply":
                return msg["state"]
            raise AssertionError(f"unexpected reply to status: {msg}")

    def close(self) -> None:
        self.sock.close(0)


def drain_replies(sock: zmq.Socket) -> list[dict[str, Any]]:
    """Every message the master sent to the fuzzer so far; each must be valid."""
    out = []
    while sock.poll(0):
        frames = sock.recv_multipart()
        assert len(frames) == 1, f"the master sent a multi-part message: {frames!r}"
        try:
            msg = protocol.decode(frames[0], 1 << 30)
        except ProtocolError as exc:
            raise AssertionError(f"the master sent an invalid message {frames[0]!r}: {exc}") from None
        assert msg["t"] in MASTER_TO_PEER, msg
        out.append(msg)
    return out


def all_reduce_round(comms: list[pccl_py.Communicator], pool: concurrent.futures.Executor, n: int) -> None:
    """Every communicator all-reduces a small vector; all must succeed with the sum."""
    world = len(comms)

    def one(rank: int) -> tuple[Any, np.ndarray]:
        x = np.full(16, float(rank + 1 + n), dtype=np.float32)
        info = comms[rank].all_reduce(x, timeout=15)
        return info, x

    results = [f.result(timeout=30) for f in [pool.submit(one, r) for r in range(world)]]
    expected = sum(float(r + 1 + n) for r in range(world))
    for info, x in results:
        assert info.world_size == world
        np.testing.assert_array_equal(x, np.full(16, expected, dtype=np.float32))


def connect_pair(address: str, pool: concurrent.futures.Executor) -> list[pccl_py.Communicator]:
    """Two communicators of group 0: the second is admitted by the first's vote."""
    first = pccl_py.Communicator(address, config=CONFIG, name="real-0")
    second = pccl_py.Communicator(address, config=CONFIG, name="real-1")
    comms = [first, second]
    try:
        first.connect(timeout=10)
        joining = pool.submit(second.connect, 10)
        deadline = time.monotonic() + 10
        while first.pending_peers(timeout=5) < 1:
            assert time.monotonic() < deadline, "the second peer never became pending"
            time.sleep(0.02)
        first.update_topology(timeout=10)
        joining.result(timeout=15)
        assert first.world_size == second.world_size == 2
        return comms
    except BaseException:
        for c in comms:
            c.close()
        raise


# ---------------------------------------------------------------------- fuzz input

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
TEXT = st.text(max_size=30)
LEAF = st.one_of(st.none(), st.booleans(), INT64, st.floats(), TEXT, st.binary(max_size=30))
VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(TEXT, st.binary(max_size=4)), inner, max_size=4),
    ),
    max_leaves=10,
)
# Inputs that once tripped a decoder or a handler, always in the mix.
KNOWN_TRICKY = [
    b"",
    b"\xc1",
    b"\x80",
    b"\x81\xa1t\xa6status",
    b"\x91" * 3000 + b"\xc0",  # deep nesting
    pack({"t": "status", "v": protocol.VERSION}) + b"\x00",  # trailing bytes
    pack({"t": "hb", "v": protocol.VERSION, "a": 1, b"b": 1}),  # extra fields with str and bin keys
    pack({"t": "status", "v": True}),  # a bool version
    pack({"t": "vote", "v": protocol.VERSION, "epoch": True}),
    pack({"t": "op", "v": protocol.VERSION, "epoch": 1, "tag": 0, "seq": 0, "ok": 1, "kind": "", "msg": "", "peer": -1}),
]
SMALL_INT = st.one_of(st.integers(-3, 5), INT64)
PEER_TYPES = ["hello", "hb", "vote", "pending", "blocked", "op", "done", "leave", "status"]


def value_for(types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = []
    if bool in types:
        options.append(st.booleans())
    if int in types:
        options.append(SMALL_INT)
    if float in types:
        options.append(st.floats(allow_nan=False))
    if str in types:
        options.append(st.one_of(TEXT, st.sampled_from(protocol.FAILURE_KINDS)))
    if list in types:
        options.append(st.lists(VALUE, max_size=3))
    if dict in types:
        options.append(st.dictionaries(TEXT, VALUE, max_size=3))
    return st.one_of(options)


def fuzz_frames(real_ids: list[int], ports: list[int]) -> st.SearchStrategy[list[bytes]]:
    """One multi-part (or single-part) ZeroMQ message of fuzz input."""

    hello = st.fixed_dictionaries(
        {
            "t": st.just("hello"),
            "v": st.just(protocol.VERSION),
            "peer_id": st.one_of(
                st.sampled_from(real_ids + [0, -1, 2**63, 2**64 - 1]), st.integers(1, 2**63 - 1)
            ),
            "group": st.one_of(st.integers(-2, 3), st.integers(0, 2**63)),
            # Only loopback addresses: the master connects to what a hello names.
            "host": st.just("127.0.0.1"),
            "port": st.one_of(st.sampled_from(ports), st.sampled_from([0, -1, 65536, 2**40])),
            "name": TEXT,
        }
    )

    @st.composite
    def schema_valid(draw: st.DrawFn) -> dict[str, Any]:
        t = draw(st.sampled_from(sorted(set(protocol.SCHEMAS) - {"hello"})))
        fields = {f: draw(value_for(types)) for f, types in protocol.SCHEMAS[t].items()}
        return {"t": t, "v": protocol.VERSION, **fields}

    @st.composite
    def near_valid(draw: st.DrawFn) -> dict[Any, Any]:
        """A message with one thing wrong (or several): missing / mistyped / extra fields,
        a wrong version, an unknown type."""
        t = draw(
            st.one_of(st.sampled_from(PEER_TYPES), st.sampled_from(sorted(protocol.SCHEMAS)), TEXT, VALUE)
        )
        msg: dict[Any, Any] = {
            "t": t,
            "v": draw(st.one_of(st.just(1), st.sampled_from([0, 2, True, 1.0, "1"]), VALUE)),
        }
        schema = protocol.SCHEMAS.get(t, {}) if isinstance(t, str) else {}
        for name, types in schema.items():
            how = draw(st.integers(0, 4))
            if how == 0:
                continue  # missing
            msg[name] = draw(VALUE if how == 1 else value_for(types))
        if draw(st.booleans()):
            msg.update(draw(st.dictionaries(st.one_of(TEXT, st.binary(max_size=4)), VALUE, max_size=3)))
        if isinstance(t, str) and t == "hello" and "host" in msg:
            msg["host"] = "127.0.0.1" if isinstance(msg["host"], str) else msg["host"]
        return msg

    valid_peer_msg = st.one_of(
        hello,
        st.sampled_from([{"t": t, "v": protocol.VERSION} for t in ("hb", "leave", "status")]),
        st.builds(lambda e, f: {"t": "vote", "v": protocol.VERSION, "epoch": e, "fresh": f}, SMALL_INT, st.booleans()),
        st.builds(
            lambda e, q, f: {"t": "pending", "v": protocol.VERSION, "epoch": e, "query": q, "fresh": f},
            SMALL_INT,
            SMALL_INT,
            st.booleans(),
        ),
        st.fixed_dictionaries(
            {
                "t": st.just("blocked"),
                "v": st.just(protocol.VERSION),
                "call": st.sampled_from(["update_topology", "pending_peers", "sync_shared_state", "all_reduce", "x"]),
                "op": st.one_of(st.just([]), st.lists(st.integers(-1, 4), min_size=3, max_size=3), st.lists(VALUE, max_size=4)),
                "desc": TEXT,
                "inflight": st.lists(
                    st.one_of(st.tuples(st.integers(-1, 4), SMALL_INT, SMALL_INT, TEXT).map(list), VALUE), max_size=3
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "t": st.just("op"),
                "v": st.just(protocol.VERSION),
                "epoch": st.integers(-1, 4),
                "tag": SMALL_INT,
                "seq": SMALL_INT,
                "ok": st.booleans(),
                "kind": st.sampled_from(protocol.FAILURE_KINDS + ("Bogus",)),
                "msg": TEXT,
                "peer": st.one_of(st.just(-1), st.sampled_from(real_ids), INT64),
            }
        ),
        st.builds(
            lambda ops: {"t": "done", "v": protocol.VERSION, "ops": ops},
            st.lists(st.one_of(st.lists(st.integers(-1, 4), min_size=3, max_size=3), VALUE), max_size=5),
        ),
    )
    oversized = st.one_of(
        st.integers(CAP + 1, 3 * CAP).map(lambda n: b"\x00" * n),
        st.integers(CAP + 1, 2 * CAP).map(lambda n: pack({"t": "status", "v": protocol.VERSION, "pad": "x" * n})),
        st.integers(CAP, 2 * CAP).map(
            lambda n: pack(
                {
                    "t": "hello",
                    "v": protocol.VERSION,
                    "peer_id": 1,
                    "group": 0,
                    "host": "127.0.0.1",
                    "port": 1,
                    "name": "n" * n,
                }
            )
        ),
    )
    frame = st.one_of(
        st.binary(max_size=200),
        VALUE.map(pack),
        schema_valid().map(pack),
        near_valid().map(pack),
        valid_peer_msg.map(pack),
        st.sampled_from(KNOWN_TRICKY),
    )
    # Oversized frames make ZeroMQ drop the fuzzer's connection (it reconnects), so
    # they are kept to about one example in six, multi-part messages to one in five.
    single = st.one_of(*[frame] * 5, oversized).map(lambda f: [f])
    multi = st.lists(st.one_of(frame, valid_peer_msg.map(pack), oversized), min_size=2, max_size=4)
    return st.one_of(*[single] * 4, multi)


# ---------------------------------------------------------------------- the test


@pytest.fixture
def master() -> Iterator[pccl_py.Master]:
    m = pccl_py.Master(config=CONFIG)
    m.start()
    try:
        yield m
    finally:
        m.close()


def test_master_survives_fuzz_while_real_peers_keep_reducing(master: pccl_py.Master) -> None:
    ctx = zmq.Context()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fuzz-peer")
    comms: list[pccl_py.Communicator] = []
    fuzzer = rude = probe = None
    try:
        comms = connect_pair(master.address, pool)
        real_ids = [c.peer_id for c in comms]
        all_reduce_round(comms, pool, 0)

        fuzzer = ctx.socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        fuzzer.setsockopt(zmq.SNDHWM, 100_000)
        fuzzer.connect("tcp://" + master.address)
        # Oversized frames go through a second socket: ZeroMQ drops the connection that
        # carried one (losing what was queued on it), which would hide the rest of the
        # input from the master.
        rude = ctx.socket(zmq.DEALER)
        rude.setsockopt(zmq.LINGER, 0)
        rude.connect("tcp://" + master.address)
        probe = StatusProbe(ctx, master.address)
        master_port = int(master.address.rsplit(":", 1)[1])
        ports = [closed_local_port(), master_port]

        baseline = probe.status()
        assert set(baseline["peers"]) == {str(p) for p in real_ids}
        valid_hello_ids: set[int] = set()
        replies: dict[str, int] = {}
        state = {"examples": 0, "rss0": 0, "sent": 0}

        def check_peer_table() -> None:
            # No peer appears out of fuzz input except by a valid hello.
            peers = {int(p) for p in master.status()["peers"]}
            extra = peers - set(real_ids)
            assert extra <= valid_hello_ids, f"peers from nowhere: {extra - valid_hello_ids}"
            assert set(real_ids) <= peers, "a real peer was evicted by fuzz input"

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=fuzz_frames(real_ids, ports))
        def fuzz(batch: list[bytes]) -> None:
            for msg in batch if len(batch) == 1 else []:
                # Record the ids of hellos the master may accept (single-part only).
                try:
                    decoded = msgpack.unpackb(msg, raw=False)
                except (ValueError, TypeError):
                    continue
                if (
                    isinstance(decoded, dict)
                    and decoded.get("t") == "hello"
                    and isinstance(decoded.get("peer_id"), int)
                ):
                    valid_hello_ids.add(decoded["peer_id"])
            assert fuzzer is not None and rude is not None and probe is not None
            sock = rude if any(len(f) > CAP for f in batch) else fuzzer
            sock.send_multipart(batch)
            state_now = probe.status()
            assert str(real_ids[0]) in state_now["peers"] and str(real_ids[1]) in state_now["peers"]
            for reply in drain_replies(fuzzer) + drain_replies(rude):
                replies[reply["t"]] = replies.get(reply["t"], 0) + 1
            state["sent"] += sock is fuzzer and len(batch) == 1
            assert master._thread is not None and master._thread.is_alive()
            check_peer_table()
            state["examples"] += 1
            if state["examples"] == 10:
                state["rss0"] = rss_bytes()  # after warm-up (hypothesis, sockets, threads)
            if state["examples"] % ALL_REDUCE_EVERY == 0:
                all_reduce_round(comms, pool, state["examples"])

        for tricky in KNOWN_TRICKY:  # every time, whatever hypothesis draws
            fuzzer.send(tricky)
            probe.status()
            assert master._thread is not None and master._thread.is_alive()
        t0 = time.monotonic()
        fuzz()
        fuzz_seconds = time.monotonic() - t0

        # The real peers are still a healthy group of two.
        all_reduce_round(comms, pool, 10_000)
        assert [c.world_size for c in comms] == [2, 2]
        final = probe.status()
        assert final["groups"]["0"]["ring"] == real_ids

        # Fuzz-registered peers go away with their heartbeats; nothing else is left.
        time.sleep(0.2)
        for reply in drain_replies(fuzzer) + drain_replies(rude):
            replies[reply["t"]] = replies.get(reply["t"], 0) + 1
        for sock in (fuzzer, rude):
            sock.send(protocol.encode(protocol.make("leave")))
            sock.close(0)
        fuzzer = rude = None
        deadline = time.monotonic() + HB_TIMEOUT + 3.0
        while {int(p) for p in master.status()["peers"]} != set(real_ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = {int(p) for p in master.status()["peers"]} - set(real_ids)
        assert not leftover, f"leftover peers: {leftover}"
        assert set(master._routes.copy()) == set(real_ids)
        assert set(master._ids.copy().values()) == set(real_ids)
        assert set(master._watchers.copy()) <= set(real_ids)
        assert set(probe.status()["peers"]) == {str(p) for p in real_ids}
        all_reduce_round(comms, pool, 20_000)

        growth = rss_bytes() - state["rss0"]
        assert state["examples"] >= EXAMPLES // 2
        assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth >> 20} MiB during the fuzz run"
        # The fuzz input did reach the master: it answered most single frames (the
        # others are valid requests it need not answer, e.g. hb, or inputs it drops).
        assert sum(replies.values()) >= state["sent"] // 3, (replies, state)
        assert replies.get("error", 0) > 0, replies
        print(
            f"fuzz: {state['examples']} examples in {fuzz_seconds:.1f}s, {state['sent']} single frames "
            f"on the clean socket, replies {replies}, "
            f"RSS growth {growth >> 10} KiB, groups {len(master.status()['groups'])}"
        )
    finally:
        for c in comms:
            c.close()
        for sock in (fuzzer, rude):
            if sock is not None:
                sock.close(0)
        if probe is not None:
            probe.close()
        pool.shutdown(wait=False, cancel_futures=True)
        ctx.term()


def test_oversized_frame_is_refused_and_the_sender_can_reconnect(master: pccl_py.Master) -> None:
    """A frame over max_message_bytes is refused (ZeroMQ drops the connection); the
    master goes on, and the same DEALER, reconnected, is served again."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    probe = StatusProbe(ctx, master.address)
    try:
        sock.connect("tcp://" + master.address)
        sock.send(b"\x00" * (4 * CAP))
        assert probe.status()["peers"] == {}
        deadline = time.monotonic() + 5
        answered = False
        while not answered and time.monotonic() < deadline:
            sock.send(protocol.encode(protocol.make("status")))
            if sock.poll(500):
                msg = protocol.decode(sock.recv(), 1 << 20)
                answered = msg["t"] == "status_reply"
        assert answered, "the DEALER that sent an oversized frame was never served again"
    finally:
        sock.close(0)
        probe.close()
        ctx.term()


@pytest.mark.parametrize(
    "frames,code",
    [
        ([b"\xc1"], "bad_message"),
        ([pack([1, 2])], "bad_message"),
        ([pack({"t": "status", "v": protocol.VERSION + 1})], "bad_message"),
        (
            [
                pack(
                    {
                        "t": "hello",
                        "v": protocol.VERSION,
                        "peer_id": 5,
                        "group": 0,
                        "host": "127.0.0.1",
                        "port": 0,
                        "name": "",
                    }
                )
            ],
            "bad_hello",
        ),
        (
            [
                pack(
                    {
                        "t": "hello",
                        "v": protocol.VERSION,
                        "peer_id": -5,
                        "group": 0,
                        "host": "127.0.0.1",
                        "port": 9,
                        "name": "",
                    }
                )
            ],
            "bad_hello",
        ),
    ],
    ids=["garbage", "array", "version", "port-0", "negative-id"],
)
def test_bad_input_gets_an_error_reply(master: pccl_py.Master, frames: list[bytes], code: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect("tcp://" + master.address)
        sock.send_multipart(frames)
        assert sock.poll(2000), "no reply"
        msg = protocol.decode(sock.recv(), 1 << 20)
        assert msg["t"] == "error" and msg["code"] == code, msg
        assert master.status()["peers"] == {}
    finally:
        sock.close(0)
        ctx.term()


def test_requests_from_unregistered_sockets_are_answered_unknown(master: pccl_py.Master) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect("tcp://" + master.address)
        for msg in (
            protocol.make("hb"),
            protocol.make("vote", epoch=1, fresh=False),
            protocol.make("leave"),
            protocol.make("op", epoch=1, tag=0, seq=0, ok=True, kind="", msg="", peer=-1),
        ):
            sock.send(protocol.encode(msg))
            assert sock.poll(2000), f"no reply to {msg['t']}"
            reply = protocol.decode(sock.recv(), 1 << 20)
            # "unknown" names this master's incarnation: a peer of a previous master rejoins.
            assert reply["t"] == "unknown" and reply["master"] == master.status()["incarnation"], reply
        assert master.status()["peers"] == {}
    finally:
        sock.close(0)
        ctx.term()


def test_hello_with_a_real_peers_id_does_not_disturb_it(master: pccl_py.Master) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    comm = pccl_py.Communicator(master.address, config=CONFIG)
    try:
        comm.connect(timeout=10)
        sock.connect("tcp://" + master.address)
        sock.send(
            protocol.encode(
                protocol.make(
                    "hello",
                    peer_id=comm.peer_id,
                    group=0,
                    host="127.0.0.1",
                    port=closed_local_port(),
                    name="impostor",
                )
            )
        )
        assert sock.poll(2000)
        reply = protocol.decode(sock.recv(), 1 << 20)
        assert reply["t"] == "error" and reply["code"] == "bad_hello", reply
        sock.send(protocol.encode(protocol.make("leave")))  # not registered: must not remove the real peer
        assert sock.poll(2000)
        assert protocol.decode(sock.recv(), 1 << 20)["t"] == "unknown"
        x = np.ones(8, dtype=np.float32)
        assert comm.all_reduce(x, timeout=10).world_size == 1
        assert {int(p) for p in master.status()["peers"]} == {comm.peer_id}
    finally:
        comm.close()
        sock.close(0)
        ctx.term()
