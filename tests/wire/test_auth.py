"""Shared-secret authentication of the control plane (master) and the data plane (peer
data ports): refusals with a clear AuthError, the running group undisturbed, no secret
on the wire, replays refused. See pccl_py/auth.py and native/include/pccl/wire.hpp."""

from __future__ import annotations

import hashlib
import hmac
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from groups import connect_group
from threads import run_parallel

import pccl_py as pccl
from pccl_py import _native
from pccl_py.wire import auth, protocol
from pccl_py.errors import AuthError
from pccl_py.testing import join_group

SECRET = b"correct horse battery staple 42"
HOST = "127.0.0.1"


# ---------------------------------------------------------------- HMAC-SHA256 (native)

# RFC 4231 test cases 1, 2, 3, 4, 6, 7 (case 5 is a truncated MAC).
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131,
     b"This is a test using a larger than block-size key and a larger than block-size data. "
     b"The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]


@pytest.mark.parametrize("key,data,expected", RFC4231)
def test_native_hmac_sha256_matches_rfc4231(key: bytes, data: bytes, expected: str) -> None:
    assert _native.hmac_sha256(key, data).hex() == expected


@pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 119, 128, 1000])
def test_native_hmac_sha256_matches_python_across_padding_boundaries(length: int) -> None:
    data = bytes(range(256)) * 4
    assert _native.hmac_sha256(SECRET, data[:length]) == hmac.new(SECRET, data[:length], hashlib.sha256).digest()


# ---------------------------------------------------------------- a running group


@pytest.fixture
def group() -> Iterator[tuple[pccl.Master, list[pccl.Communicator]]]:
    """A master with a secret and two admitted peers (threads of this process)."""
    master = pccl.Master(secret=SECRET).start()
    comms: list[pccl.Communicator] = []
    try:
        comms = connect_group(master.address, 2, secret=SECRET, name="p", timeout=20)
        yield master, comms
    finally:
        for c in comms:
            c.close()
        master.close()


def all_reduce_pair(comms: list[pccl.Communicator]) -> list[float]:
    def one(c: pccl.Communicator, i: int) -> float:
        x = np.full(1024, float(i + 1), np.float32)
        info = c.all_reduce(x, timeout=20)
        assert info.world_size == 2
        return float(x[0])

    results = run_parallel([lambda c=c, i=i: one(c, i) for i, c in enumerate(comms)], 60)
    return results


def assert_undisturbed(master: pccl.Master, comms: list[pccl.Communicator], epoch: int) -> None:
    assert all_reduce_pair(comms) == [3.0, 3.0]
    assert [c.epoch for c in comms] == [epoch, epoch]
    assert [c.world_size for c in comms] == [2, 2]
    assert len(master.status()["peers"]) == 2


# ---------------------------------------------------------------- control plane


@pytest.mark.parametrize("secret", [None, b"wrong secret"], ids=["missing", "wrong"])
def test_master_refuses_a_peer_without_the_secret(group, secret) -> None:
    master, comms = group
    epoch = comms[0].epoch
    assert all_reduce_pair(comms) == [3.0, 3.0]
    intruder = pccl.Communicator(master.address, secret=secret)
    try:
        with pytest.raises(AuthError, match="master"):
            intruder.connect(timeout=10)
    finally:
        intruder.close()
    assert_undisturbed(master, comms, epoch)


def test_peer_with_a_secret_refuses_a_master_without_one() -> None:
    with pccl.Master() as master:
        comm = pccl.Communicator(master.address, secret=SECRET)
        try:
            with pytest.raises(AuthError, match="no shared secret"):
                comm.connect(timeout=10)
        finally:
            comm.close()


class RawClient:
    """A bare DEALER speaking msgpack to the master."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address}")

    def ask(self, msg: protocol.Message) -> protocol.Message:
        self.sock.send(protocol.encode(msg))
        assert self.sock.poll(10_000), f"no answer to {msg['t']}"
        return protocol.decode(self.sock.recv(), 1 << 24)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


HELLO = dict(peer_id=12345, group=0, host=HOST, port=9, name="intruder")


def test_raw_clients_without_valid_proof_are_refused_and_the_master_lives_on(group) -> None:
    master, comms = group
    epoch = comms[0].epoch
    raw = RawClient(master.address)
    try:
        # No authentication at all: hello and status are refused.
        for msg in (protocol.make("hello", **HELLO), protocol.make("status")):
            reply = raw.ask(msg)
            assert (reply["t"], reply["code"]) == ("error", "auth")
        # A wrong MAC.
        challenge = raw.ask(protocol.make("auth_begin", nonce=auth.new_nonce()))
        assert challenge["t"] == "auth_challenge" and len(challenge["proof"]) == 32
        reply = raw.ask(protocol.make("auth", mac=b"\x00" * 32))
        assert (reply["t"], reply["code"]) == ("error", "auth")
        # A MAC made with the wrong secret, and an answer with no challenge outstanding.
        nonce = auth.new_nonce()
        challenge = raw.ask(protocol.make("auth_begin", nonce=nonce))
        reply = raw.ask(protocol.make("auth", mac=auth.client_proof(b"wrong", challenge["nonce"], nonce)))
        assert (reply["t"], reply["code"]) == ("error", "auth")
        reply = raw.ask(protocol.make("auth", mac=auth.client_proof(SECRET, challenge["nonce"], nonce)))
        assert (reply["t"], reply["code"]) == ("error", "auth")
        assert "no challenge" in reply["msg"]
        # Still refused afterwards; nothing registered.
        reply = raw.ask(protocol.make("hello", **HELLO))
        assert (reply["t"], reply["code"]) == ("error", "auth")
        assert "12345" not in master.status()["peers"]
    finally:
        raw.close()
    assert_undisturbed(master, comms, epoch)


def test_a_replayed_control_handshake_is_refused(group) -> None:
    master, comms = group
    legit = RawClient(master.address)
    nonce = auth.new_nonce()
    try:
        begin = protocol.make("auth_begin", nonce=nonce)
        challenge = legit.ask(begin)
        answer = protocol.make("auth", mac=auth.client_proof(SECRET, challenge["nonce"], nonce))
        assert legit.ask(answer)["t"] == "auth_ok"
        assert legit.ask(protocol.make("status"))["t"] == "status_reply"
    finally:
        legit.close()
    # An eavesdropper replays both recorded messages on its own connection: the master
    # chose a fresh nonce, so the recorded MAC does not answer it.
    replay = RawClient(master.address)
    try:
        fresh = replay.ask(begin)
        assert fresh["t"] == "auth_challenge" and fresh["nonce"] != challenge["nonce"]
        reply = replay.ask(answer)
        assert (reply["t"], reply["code"]) == ("error", "auth")
        reply = replay.ask(protocol.make("status"))
        assert (reply["t"], reply["code"]) == ("error", "auth")
    finally:
        replay.close()
    assert_undisturbed(master, comms, comms[0].epoch)


# ---------------------------------------------------------------- data plane


@pytest.mark.parametrize("secret", [b"", b"wrong secret"], ids=["missing", "wrong"])
def test_a_peer_data_port_refuses_an_engine_without_the_secret(group, secret) -> None:
    master, comms = group
    epoch = comms[0].epoch
    target = comms[0]
    intruder = _native.Engine(peer_id=777, secret=secret)
    try:
        ring = [(777, HOST, intruder.port), (target.peer_id, HOST, target._engine.port)]
        with pytest.raises(AuthError, match="secret") as info:
            intruder.set_ring(5, ring, 0, timeout=10)
        assert info.value.peer == target.peer_id
    finally:
        intruder.close()
    assert_undisturbed(master, comms, epoch)


def test_an_engine_with_the_secret_is_admitted_by_the_data_port(group) -> None:
    """The positive control of the test above: the same raw engine, with the secret."""
    master, comms = group
    target = comms[0]
    friend = _native.Engine(peer_id=778, secret=SECRET)
    try:
        friend.set_ring(5, [(778, HOST, friend.port), (target.peer_id, HOST, target._engine.port)], 0, timeout=10)
        assert friend.live_connections(target.peer_id, 5) == 1
    finally:
        friend.close()
    assert_undisturbed(master, comms, comms[0].epoch)


# The engine's layouts (wire.hpp), as the binding exports them.
_HELLO = struct.Struct(_native.HELLO_FORMAT)
_ACK = struct.Struct(_native.HELLO_ACK_FORMAT)
_RESULT = struct.Struct(_native.AUTH_RESULT_FORMAT)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _connector_handshake(port: int, my_id: int, peer_id: int, secret: bytes, nonce_c: bytes) -> tuple[bytes, bytes]:
    """A correct connector handshake (as the engine does it) on a raw socket; returns
    (bytes sent, bytes received)."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        hello = _HELLO.pack(_native.HELLO_MAGIC, _native.PROTOCOL_VERSION, my_id, 9, 0, 1)
        s.sendall(hello)
        ack = _recv_exact(s, _ACK.size)
        magic, status, pid, flags, _, nonce_a = _ACK.unpack(ack)
        assert (magic, status, pid, flags) == (_native.HELLO_MAGIC, 0, peer_id, _native.HELLO_AUTH)
        transcript = struct.pack(_native.HANDSHAKE_TRANSCRIPT_FORMAT, nonce_a, nonce_c, my_id, peer_id, 9, 0, 1)
        mac = hmac.new(secret, b"pccl-data-v2 connector" + transcript, hashlib.sha256).digest()
        proof = nonce_c + mac
        s.sendall(proof)
        result = _recv_exact(s, _RESULT.size)
        return hello + proof, ack + result


def test_a_replayed_data_handshake_is_refused(group) -> None:
    master, comms = group
    target = comms[0]
    sent, received = _connector_handshake(target._engine.port, 4242, target.peer_id, SECRET, auth.new_nonce())
    magic, status, mac = _RESULT.unpack(received[_ACK.size :])
    assert (magic, status) == (_native.HELLO_MAGIC, 0)
    # Replaying the recorded bytes: the acceptor's new nonce makes the recorded MAC wrong.
    with socket.create_connection((HOST, target._engine.port), timeout=10) as s:
        s.sendall(sent[: _HELLO.size])
        ack = _recv_exact(s, _ACK.size)
        assert ack[-16:] != received[_ACK.size - 16 : _ACK.size]  # a fresh challenge
        s.sendall(sent[_HELLO.size :])
        magic, status, mac = _RESULT.unpack(_recv_exact(s, _RESULT.size))
        assert status == _native.HELLO_STATUS_AUTH_FAILED and mac == bytes(32)
        assert s.recv(1) == b""  # and it closes the connection
    assert_undisturbed(master, comms, comms[0].epoch)


# ---------------------------------------------------------------- the secret is never on the wire


class Relay:
    """A TCP relay that records every byte in both directions."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.captured = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is self.listener:
                    a, _ = self.listener.accept()
                    b = socket.create_connection((HOST, self.target))
                    pairs[a], pairs[b] = b, a
                    sel.register(a, selectors.EVENT_READ)
                    sel.register(b, selectors.EVENT_READ)
                    continue
                if s not in pairs:  # its partner closed earlier in this batch
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self.captured += data
                    pairs[s].sendall(data)
                else:
                    other = pairs.pop(s)
                    pairs.pop(other, None)
                    for x in (s, other):
                        sel.unregister(x)
                        x.close()
        for s in pairs:
            s.close()
        self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_secret_never_appears_on_the_wire() -> None:
    """Everything a peer and the master exchange (control plane, through a recording
    relay) and every data-plane handshake byte (engine to engine, recorded by a relay
    standing in for the acceptor's port) is free of the secret."""
    with pccl.Master(secret=SECRET) as master:
        relay = Relay(int(master.address.rsplit(":", 1)[1]))
        comm = pccl.Communicator(f"{HOST}:{relay.port}", secret=SECRET)
        data_relay = None
        other = _native.Engine(peer_id=31337, secret=SECRET)
        try:
            comm.connect(timeout=20)
            x = np.ones(64, np.float32)
            assert comm.all_reduce(x, timeout=20).world_size == 1
            data_relay = Relay(comm._engine.port)
            other.set_ring(3, [(31337, HOST, other.port), (comm.peer_id, HOST, data_relay.port)], 0, timeout=10)
            assert other.live_connections(comm.peer_id, 3) == 1
        finally:
            other.close()
            comm.close()
            relay.close()
            if data_relay is not None:
                data_relay.close()
    control, data = bytes(relay.captured), bytes(data_relay.captured)
    assert b"auth_begin" in control and b"status" not in control  # the relay saw the exchange
    assert len(data) >= _HELLO.size + _ACK.size + 48 + _RESULT.size
    for captured in (control, data):
        assert SECRET not in captured
        assert SECRET[:8] not in captured and SECRET[-8:] not in captured
        assert hashlib.sha256(SECRET).digest() not in captured


def test_the_python_handshake_codec_is_the_engines() -> None:
    """pccl_py.wire.auth speaks the connector side of the data-plane handshake (the
    master's liveness watcher); its layouts and labels are the binding's."""
    assert auth._HELLO.format == _native.HELLO_FORMAT and auth._HELLO.size == _native.HELLO_SIZE
    assert auth._HELLO_ACK.size == _native.HELLO_ACK_SIZE
    assert auth._AUTH_PROOF.size == _native.AUTH_PROOF_SIZE and auth._AUTH_RESULT.size == _native.AUTH_RESULT_SIZE
    assert auth._TRANSCRIPT.format == _native.HANDSHAKE_TRANSCRIPT_FORMAT
    assert (auth._DATA_CONNECTOR, auth._DATA_ACCEPTOR) == (
        _native.HANDSHAKE_CONNECTOR_LABEL,
        _native.HANDSHAKE_ACCEPTOR_LABEL,
    )
    assert auth.NONCE_BYTES == _native.NONCE_BYTES


def test_the_hello_goes_right_behind_the_proof_without_waiting_for_the_verdict() -> None:
    """One round trip less per connect() with a secret: a master that holds its verdict
    receives the hello before it has answered the proof (it handles both in order)."""
    from pccl_py.config import Config
    from pccl_py.peer.control import ControlChannel
    from pccl_py.peer.session import Session

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 5000)
    port = router.bind_to_random_port(f"tcp://{HOST}")
    channel = ControlChannel(f"{HOST}:{port}", Config(), Session(7, 1.0), lambda: None)
    channel.start(5.0)
    hello = protocol.make("hello", **HELLO)
    done = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            channel.authenticate(SECRET, time.monotonic() + 10, then=hello)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)
        done.set()

    def receive() -> tuple[bytes, dict[str, Any]]:
        while True:  # heartbeats may come in between
            rid, data = router.recv_multipart()
            msg = protocol.decode(data, 1 << 20)
            if msg["t"] != "hb":
                return rid, msg

    worker = threading.Thread(target=run)
    worker.start()
    try:
        rid, begin = receive()
        assert begin["t"] == "auth_begin"
        ours = auth.new_nonce()
        proof = auth.master_proof(SECRET, begin["nonce"], ours)
        router.send_multipart([rid, protocol.encode(protocol.make("auth_challenge", nonce=ours, proof=proof))])
        proved = receive()[1]
        assert proved["t"] == "auth" and auth.verify(auth.client_proof(SECRET, ours, begin["nonce"]), proved["mac"])
        then = receive()[1]  # no verdict sent yet
        assert then == hello
        assert not done.is_set()  # authenticate() still waits for the verdict
        router.send_multipart([rid, protocol.encode(protocol.make("auth_ok"))])
        assert done.wait(5.0) and not failed, failed
    finally:
        worker.join(10)
        channel.close()
        router.close()
        ctx.term()
