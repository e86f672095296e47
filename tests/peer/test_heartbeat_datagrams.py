"""Heartbeat datagrams (pccl_py.wire.beats): each peer's reach the master, which answers
only those with the peer's token; a master whose control port number is taken for UDP
uses another and names it in the welcome; a restarted master hands out new tokens; and
a peer with datagrams turned off lives on its TCP heartbeats (judged with the
retransmission allowance added). A silent partition over the WAN emulator, where the
datagrams decide how fast it is seen: tests/integration/test_wan_faults.py."""

from __future__ import annotations

import socket
import time

import pytest
from rich.console import Console

import pccl_py as pccl
from pccl_py.cli.status import render
from pccl_py.wire import beats

pytestmark = pytest.mark.timeout(120)

FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)


def _wait(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def _datagrams(master: pccl.Master, peer_id: int) -> bool:
    return bool(master.status()["peers"].get(str(peer_id), {}).get("datagrams"))


def _ask(port: int, payload: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(payload, ("127.0.0.1", port))
        try:
            return s.recv(64)
        except TimeoutError:
            return None


def test_the_master_answers_only_datagrams_with_the_peers_token() -> None:
    with pccl.Master(config=FAST) as master, pccl.Communicator(master.address, config=FAST) as peer:
        peer.connect(timeout=20)
        _wait(lambda: _datagrams(master, peer.peer_id), "the peer's heartbeat datagrams never reached the master")
        port = master._membership.beat_port
        assert port == int(master.address.rpartition(":")[2])  # the control port's number, free for UDP
        token = master._membership.peers[peer.peer_id].beat_token
        answer = _ask(port, beats.encode(beats.BEAT, peer.peer_id, token))
        assert answer == beats.encode(beats.ANSWER, peer.peer_id, token)
        forged = bytes(b ^ 0xFF for b in token)
        assert _ask(port, beats.encode(beats.BEAT, peer.peer_id, forged)) is None
        assert _ask(port, beats.encode(beats.BEAT, peer.peer_id + 1, token)) is None
        assert _ask(port, b"PCHB" + bytes(10)) is None

        console = Console(width=250, record=True)
        console.print(render(master.status()))
        assert "udp + tcp" in console.export_text()


def test_a_taken_udp_port_moves_the_datagrams_and_a_restart_renews_the_token() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", port))
    master = pccl.Master(port=port, config=FAST)
    master.start()
    try:
        with pccl.Communicator(master.address, config=FAST) as peer:
            peer.connect(timeout=20)
            assert master._membership.beat_port not in (0, port)
            _wait(lambda: _datagrams(master, peer.peer_id), "no datagrams through the other UDP port")
            first = master._membership.peers[peer.peer_id].beat_token

            squatter.close()  # a restarted master (same control port) now gets that UDP port
            master.close()
            master = pccl.Master(port=port, config=FAST)
            master.start()
            assert master._membership.beat_port == port
            _wait(lambda: _datagrams(master, peer.peer_id), "the rejoined peer's datagrams never reached the new master")
            assert master._membership.peers[peer.peer_id].beat_token != first
    finally:
        squatter.close()
        master.close()


def test_a_peer_without_datagrams_lives_on_tcp_heartbeats() -> None:
    tcp_only = FAST.replace(heartbeat_datagrams=False)
    with pccl.Master(config=FAST) as master, pccl.Communicator(master.address, config=tcp_only) as peer:
        peer.connect(timeout=20)
        time.sleep(2 * (FAST.heartbeat_timeout + beats.STREAM_ALLOWANCE))
        status = master.status()["peers"]
        assert str(peer.peer_id) in status, "a peer beating over TCP only was evicted"
        assert status[str(peer.peer_id)]["datagrams"] is False
        console = Console(width=250, record=True)
        console.print(render(master.status()))
        assert "tcp only (+1 s)" in console.export_text()
        record = master._membership.peers[peer.peer_id]
        now = time.monotonic()  # its last TCP heartbeat came within an interval
        assert master._membership.silent(record, now + FAST.heartbeat_timeout + 0.3) is None
        why = master._membership.silent(record, now + FAST.heartbeat_timeout + beats.STREAM_ALLOWANCE + 0.3)
        assert why is not None and "over TCP" in why
