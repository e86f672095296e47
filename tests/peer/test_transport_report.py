"""What a peer's data connections get from its host reaches the master and `pccl status`:
the congestion control in use, why it is not the one asked for, the socket buffers; and
the peer logs it once, with what to raise where one connection cannot fill a long link.
Also kept across a master restart (the peer rejoins and tells the new master again)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from rich.console import Console

import pccl_py as pccl
from pccl_py.cli.status import render, transport_text
from pccl_py.peer import transport

pytestmark = pytest.mark.timeout(120)

FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)


def _host_default() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def _wait_transport(master: pccl.Master, peer_id: int) -> dict:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peer = master.status()["peers"].get(str(peer_id), {})
        if peer.get("transport"):
            return peer["transport"]
        time.sleep(0.05)
    raise AssertionError(f"peer {peer_id}'s transport report never reached the master")


def test_the_master_lists_each_peers_transport_and_status_renders_it(caplog: pytest.LogCaptureFixture) -> None:
    master = pccl.Master(config=FAST)
    master.start()
    try:
        asked = pccl.Communicator(master.address, config=FAST)
        refused = pccl.Communicator(master.address, group=1, config=pccl.Config(
            heartbeat_interval=0.1, heartbeat_timeout=1.0, congestion_control="nosuchcc"))
        try:
            with caplog.at_level(logging.INFO, logger="pccl_py.peer.transport"):
                asked.connect(timeout=20)
                refused.connect(timeout=20)
            mine = _wait_transport(master, asked.peer_id)
            assert mine == {
                "cc": "bbr" if "bbr" in Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text()
                else _host_default(),
                "cc_note": asked._engine.congestion_control_note,
                "send_buffer": asked._engine.send_buffer_max,
                "recv_buffer": asked._engine.recv_buffer_max,
            }
            other = _wait_transport(master, refused.peer_id)
            assert other["cc"] == _host_default() and "nosuchcc is not available" in other["cc_note"]

            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("nosuchcc is not available" in w for w in warnings), warnings
            infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            assert sum("data plane: TCP congestion control" in i for i in infos) == 2, infos

            console = Console(width=250, record=True)
            console.print(render(master.status()))
            text = console.export_text()
            assert transport_text(mine) in text
            assert f"{_host_default()} !" in text and "nosuchcc is not available" in text

            # A restarted master (same address) learns it again from the rejoin.
            port = int(master.address.rpartition(":")[2])
            master.close()
            master = pccl.Master(port=port, config=FAST)
            master.start()
            assert _wait_transport(master, asked.peer_id) == mine
        finally:
            asked.close()
            refused.close()
    finally:
        master.close()


def test_buffer_advice() -> None:
    # 8 MiB (the kernel's figure for wmem_max = 4 MiB): about 447 Mbit/s at 100 ms.
    assert round(transport.one_connection_bits(8 << 20) / 1e6) == 447
    # The wmem_max that lets one connection carry 1 Gbit/s at 100 ms: doubled by the
    # kernel, two thirds of it payload, 12.5 MB in flight.
    need = transport.wmem_max_for()
    assert transport.one_connection_bits(2 * need) == pytest.approx(1e9, rel=1e-6)
    assert transport_text({}) == "-"
    assert transport_text({"cc": "cubic", "cc_note": "x", "send_buffer": 8 << 20, "recv_buffer": 32 << 20}) == (
        "cubic !, 8/32 MiB"
    )
