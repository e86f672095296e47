"""The TCP congestion control of the data connections (Engine(congestion_control=...))
and what the engine says its connections get from the host.

Checked on the kernel's own view: `ss -tin` lists each established connection's
congestion control, so a connection that kept the host's default shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from engine_harness import HOST

import pccl_py._native as nat

SYSCTL = Path("/proc/sys/net/ipv4")


def _sysctl(name: str) -> str:
    return (SYSCTL / name).read_text().strip()


def _host_default() -> str:
    return _sysctl("tcp_congestion_control")


def _other_than_default() -> str:
    """An algorithm this host offers that is not its default (reno is always built in)."""
    return next(cc for cc in ("reno", "cubic", "bbr") if cc != _host_default() and cc in _sysctl(
        "tcp_available_congestion_control").split())


def _connected_pair(cc: str, connections: int) -> list[nat.Engine]:
    engines = [nat.Engine(peer_id=i + 1, connections_per_peer=connections, congestion_control=cc) for i in range(2)]
    ring = [(e.peer_id, HOST, e.port) for e in engines]
    errors: list[BaseException] = []

    def connect(rank: int) -> None:
        try:
            engines[rank].set_ring(1, ring, rank, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=connect, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors or any(t.is_alive() for t in threads):
        for e in engines:
            e.close()
        raise AssertionError(f"ring setup failed: {errors}")
    return engines


def _algorithms_of_connections(port: int) -> list[str]:
    """The congestion control of every established TCP connection to or from `port`."""
    out = subprocess.run(
        ["ss", "-Htin", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    known = set(_sysctl("tcp_available_congestion_control").split())
    algorithms = []
    for line in out.splitlines():
        if line.startswith((" ", "\t")):  # a connection's info line
            words = [w.split(":")[0] for w in line.split()]
            algorithms.append(next((w for w in words if w in known), "?"))
    return algorithms


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the connections")
def test_every_data_connection_uses_the_congestion_control_asked_for() -> None:
    cc = _other_than_default()
    engines = _connected_pair(cc, connections=2)
    try:
        assert [e.congestion_control for e in engines] == [cc, cc]
        assert [e.congestion_control_note for e in engines] == ["", ""]
        seen = _algorithms_of_connections(engines[0].port)
        # Engine 1's pool of 2 to engine 0's port, each connection seen from both ends.
        assert len(seen) >= 4, seen
        assert set(seen) == {cc}, f"asked for {cc}, the host's default is {_host_default()}: {seen}"
    finally:
        for e in engines:
            e.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the connections")
def test_system_keeps_the_hosts_default() -> None:
    engines = _connected_pair("", connections=1)
    try:
        assert engines[0].congestion_control == _host_default()
        assert engines[0].congestion_control_note == ""
        assert set(_algorithms_of_connections(engines[0].port)) == {_host_default()}
    finally:
        for e in engines:
            e.close()


def test_an_algorithm_the_host_lacks_keeps_its_default_and_says_why() -> None:
    engine = nat.Engine(peer_id=1, congestion_control="nosuchcc")
    try:
        assert engine.congestion_control == _host_default()
        assert "nosuchcc is not available" in engine.congestion_control_note
    finally:
        engine.close()


_REFUSED = """
import pccl_py._native as nat
e = nat.Engine(peer_id=1, congestion_control={cc!r})
print(e.congestion_control)
print(e.congestion_control_note)
e.close()
"""


def _restricted() -> str | None:
    """An algorithm this host offers but does not allow to unprivileged processes."""
    allowed = set(_sysctl("tcp_allowed_congestion_control").split())
    return next((cc for cc in _sysctl("tcp_available_congestion_control").split() if cc not in allowed), None)


@pytest.mark.skipif(_restricted() is None, reason="every algorithm this host offers is allowed to everyone")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop CAP_NET_ADMIN")
def test_an_algorithm_the_process_may_not_use_keeps_the_default_and_says_how_to_allow_it() -> None:
    cc = _restricted()
    assert cc is not None
    prefix = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"] if os.geteuid() == 0 else []
    run = subprocess.run(
        prefix + [sys.executable, "-c", _REFUSED.format(cc=cc)], capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    used, note = run.stdout.splitlines()[:2]
    assert used == _host_default()
    assert note.startswith(f"{cc} is not allowed to this process") and "tcp_allowed_congestion_control" in note


def test_buffer_maxima_follow_the_hosts_limits() -> None:
    """No explicit size: the larger of autotuning's maximum and twice net.core's cap
    (what an explicit setsockopt may reach); an explicit size: the kernel's doubled one."""
    auto_send = int(_sysctl("tcp_wmem").split()[2])
    auto_recv = int(_sysctl("tcp_rmem").split()[2])
    core_send = int(Path("/proc/sys/net/core/wmem_max").read_text())
    core_recv = int(Path("/proc/sys/net/core/rmem_max").read_text())
    engine = nat.Engine(peer_id=1)
    try:
        assert engine.send_buffer_max == max(auto_send, 2 * core_send)
        assert engine.recv_buffer_max == max(auto_recv, 2 * core_recv)
    finally:
        engine.close()
    engine = nat.Engine(peer_id=1, socket_buffer_bytes=1 << 20)
    try:
        assert engine.send_buffer_max == min(1 << 20, core_send) * 2
        assert engine.recv_buffer_max == min(1 << 20, core_recv) * 2
    finally:
        engine.close()
