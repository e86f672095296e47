"""The WAN emulator (pccl_py.tools.wan): each knob of the link model measured through
real sockets in the emulated hosts, the hosts' access links (an uplink and a downlink
shared by all pairs), run-time changes, silent partitions, cleanup, and a master with
two pccl peers doing an exact all-reduce behind a 20 ms RTT.

Needs root, /dev/net/tun and iproute2 (skipped otherwise, with the reason). Bounds are
generous for a loaded 2-core machine but each one fails when its knob does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pccl_py.tools import wan
from pccl_py.tools.netns import NetnsError
from pccl_py.tools.wan import HostSpec, LinkSpec, WanNet, WanSpec

REPO = Path(__file__).resolve().parents[2]
SO_TIMESTAMPNS = 35  # Linux: receive timestamps (CLOCK_REALTIME) as SCM_TIMESTAMPNS


def test_link_spec_parse() -> None:
    spec = LinkSpec.parse("rtt=100ms,rate=1gbit,loss=0.01,jitter=20ms,queue=50ms")
    assert spec == LinkSpec(rtt_s=0.1, rate_bits=10**9, loss=0.01, jitter_s=0.02, queue_s=0.05)
    assert spec.delay_s == pytest.approx(0.05)
    assert LinkSpec.parse(str(spec)) == spec
    assert LinkSpec.parse("rtt=500us,loss=2%") == LinkSpec(rtt_s=0.0005, loss=0.02)
    assert LinkSpec.parse("rate=200mbit").rtt_s == 0.0
    for bad, why in (
        ("rtt=100", "us, ms or s"),
        ("rtt=100ms,bandwidth=1gbit", "rtt, rate, loss, jitter, queue"),
        ("rate=1gbps", "bit, kbit, mbit or gbit"),
        ("loss=1.5", "between 0 and 1"),
        ("rtt=1ms,rtt=2ms", "given twice"),
        ("rtt", "KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=why):
            LinkSpec.parse(bad)


def test_host_and_wan_spec_parse() -> None:
    assert HostSpec.parse("up=1gbit,down=100mbit,queue=20ms") == HostSpec(10**9, 10**8, 0.02, 0.02)
    assert HostSpec.parse("access=1gbit") == HostSpec(10**9, 10**9)
    assert HostSpec.parse("up=10mbit") == HostSpec(up_bits=10**7)
    assert HostSpec.parse("") == HostSpec() and not HostSpec().limited
    # The pair keys keep their meaning; the host keys set every host's access link.
    assert WanSpec.parse("rtt=100ms,rate=1gbit") == WanSpec(LinkSpec(rtt_s=0.1, rate_bits=10**9), HostSpec())
    spec = WanSpec.parse("rtt=100ms,access=1gbit,queue=20ms,access_queue=10ms")
    assert spec == WanSpec(LinkSpec(rtt_s=0.1, queue_s=0.02), HostSpec(10**9, 10**9, 0.01, 0.01))
    assert WanSpec.parse(str(spec)) == spec
    assert spec.rate_bits == 10**9
    up_down = WanSpec.parse("rtt=20ms,rate=2gbit,up=100mbit,down=500mbit")
    assert WanSpec.parse(str(up_down)) == up_down and up_down.rate_bits == 10**8
    assert HostSpec.parse(str(HostSpec(10**8, 10**9, 0.02, 0.02))) == HostSpec(10**8, 10**9, 0.02, 0.02)
    assert HostSpec.parse(str(HostSpec(10**8, 0, 0.01, 0.2))) == HostSpec(10**8, 0, 0.01, 0.2)
    for parse, bad, why in (
        (HostSpec.parse, "access=1gbit,up=1gbit", "either"),
        (HostSpec.parse, "rtt=10ms", "up, down, access, queue, up_queue, down_queue"),
        (HostSpec.parse, "up=fast", "bit, kbit, mbit or gbit"),
        (WanSpec.parse, "rtt=10ms,uplink=1gbit", "access_queue"),
        (WanSpec.parse, "access=1gbit,access=2gbit", "given twice"),
        (WanSpec.parse, "access_queue=5", "us, ms or s"),
    ):
        with pytest.raises(ValueError, match=why):
            parse(bad)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def available() -> None:
    why = wan.unavailable()
    if why is not None:
        pytest.skip(why)


def _udp(net: WanNet, host: int) -> socket.socket:
    s = net.call_in(host, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.bind((net.ips[host], 0))
    return s


@pytest.fixture
def pair(available: None) -> Iterator[WanNet]:
    with WanNet(2, LinkSpec(rtt_s=0.02)) as net:
        yield net


def _kernel_rx_ns(anc: list[tuple[int, int, bytes]]) -> int:
    sec, ns = struct.unpack("qq", anc[0][2][:16])
    return int(sec * 10**9 + ns)


def _round_trips(net: WanNet, count: int) -> list[float]:
    """Round trips between hosts 0 and 1 as the network sees them: each leg from just
    before its sendto to the kernel's receive timestamp, so the test process's own
    wakeups (slow on a loaded machine) do not count, the relay's do."""
    a, b = _udp(net, 0), _udp(net, 1)
    try:
        for s in (a, b):
            s.settimeout(5.0)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rtts = []
        for i in range(count):
            t0 = time.time_ns()
            a.sendto(i.to_bytes(4, "big"), b.getsockname())
            data, anc, _, peer = b.recvmsg(64, 64)
            there = _kernel_rx_ns(anc) - t0
            t1 = time.time_ns()
            b.sendto(data, peer)
            _, anc, _, _ = a.recvmsg(64, 64)
            rtts.append((there + _kernel_rx_ns(anc) - t1) / 1e9)
        return rtts
    finally:
        a.close()
        b.close()


def _leftovers(prefix: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [n for n in names if n.startswith(prefix)] + [line for line in links.splitlines() if prefix in line]


# --------------------------------------------------------------------------- the knobs


def _check_rtt(rtts: list[float], rtt: float) -> None:
    """Never faster than the link; the typical round trip (the lower quartile, since on a
    saturated machine the relay thread itself waits for a core now and then) within
    1 ms of it; the median within 5 ms."""
    ordered = sorted(rtts)
    assert ordered[0] >= rtt - 1e-4, ordered
    assert abs(ordered[len(ordered) // 4] - rtt) < 1e-3, ordered
    assert abs(statistics.median(ordered) - rtt) < 5e-3, ordered


def test_delay_and_set_link_at_run_time(pair: WanNet) -> None:
    _check_rtt(_round_trips(pair, 40), 0.020)
    pair.set_link(LinkSpec(rtt_s=0.06))
    assert pair.link_of(0, 1).rtt_s == 0.06
    _check_rtt(_round_trips(pair, 32), 0.060)
    # One direction only: 0->1 keeps 30 ms, 1->0 drops to 5 ms.
    pair.set_link(LinkSpec(rtt_s=0.01), src=1, dst=0)
    _check_rtt(_round_trips(pair, 32), 0.035)


def test_rate_limits_a_tcp_transfer(available: None) -> None:
    rate = 100_000_000
    with WanNet(2, LinkSpec(rtt_s=0.004, rate_bits=rate)) as net:
        listener = net.call_in(1, socket.socket)
        listener.bind((net.ips[1], 0))
        listener.listen(1)
        sender = net.call_in(0, socket.socket)
        stop = threading.Event()

        def send() -> None:
            buf = bytes(1 << 16)
            try:
                while not stop.is_set():
                    sender.sendall(buf)
            except OSError:
                pass

        try:
            sender.connect(listener.getsockname())
            conn, _ = listener.accept()
            thread = threading.Thread(target=send, daemon=True)
            thread.start()
            buf = bytearray(1 << 20)
            start = time.monotonic()
            received, t_first = 0, None
            while time.monotonic() - start < 3.5:
                n = conn.recv_into(buf)
                now = time.monotonic()
                if now - start >= 1.0:  # past slow start: count the steady state
                    if t_first is None:
                        t_first = now
                    else:
                        received += n
            assert t_first is not None
            goodput = received * 8 / (time.monotonic() - t_first)
            stop.set()
            conn.close()
            thread.join(10)
        finally:
            stop.set()
            sender.close()
            listener.close()
        stats = net.stats()
    # Headers take ~0.6% at MTU 9000; TCP keeps the pipe full once past slow start.
    assert 0.85 * rate <= goodput <= 1.05 * rate, f"{goodput / 1e6:.1f} Mbit/s over a 100 Mbit/s link"
    assert stats["error"] == ""


def test_loss(available: None) -> None:
    sent = 4000
    with WanNet(2, LinkSpec(loss=0.1), seed=7) as net:
        a, b = _udp(net, 0), _udp(net, 1)
        try:
            b.settimeout(0.5)
            got = 0
            for batch in range(sent // 100):
                for i in range(100):
                    a.sendto((batch * 100 + i).to_bytes(4, "big"), b.getsockname())
                time.sleep(0.003)
                b.setblocking(False)
                try:
                    while True:
                        b.recv(64)
                        got += 1
                except BlockingIOError:
                    pass
            b.settimeout(0.5)
            try:
                while True:
                    b.recv(64)
                    got += 1
            except TimeoutError:
                pass
        finally:
            a.close()
            b.close()
        link = next(entry for entry in net.stats()["links"] if entry["src"] == 0)
    assert link["dropped_loss"] + link["packets"] == sent, link
    assert got == link["packets"], (got, link)
    assert 0.07 <= 1 - got / sent <= 0.13, f"{1 - got / sent:.3f} lost at loss=0.1"


def test_jitter_never_reorders(available: None) -> None:
    with WanNet(2, LinkSpec(rtt_s=0.02, jitter_s=0.005)) as net:
        a, b = _udp(net, 0), _udp(net, 1)
        try:
            b.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            b.settimeout(5.0)
            sent_at = [0] * 300
            order, delays = [], []

            def receive() -> None:  # concurrently: 300 datagrams would overflow the receive buffer
                for _ in range(300):
                    data, anc, _, _ = b.recvmsg(64, 64)
                    sec, ns = struct.unpack("qq", anc[0][2][:16])
                    seq = int.from_bytes(data, "big")
                    order.append(seq)
                    delays.append((sec * 10**9 + ns - sent_at[seq]) / 1e9)

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            for i in range(300):
                sent_at[i] = time.time_ns()
                a.sendto(i.to_bytes(4, "big"), b.getsockname())
                time.sleep(0.001)
            receiver.join(10)
        finally:
            a.close()
            b.close()
    assert order == sorted(order) == list(range(300))
    # One-way 10 ms +- 5 ms: spread out, never below 5 ms.
    assert min(delays) >= 0.005 - 1e-4, min(delays)
    assert max(delays) - min(delays) > 0.003, (min(delays), max(delays))
    assert statistics.pstdev(delays) > 0.001


def test_partition_is_silent_and_heals(available: None) -> None:
    # A sender process in host 0 writes a line every 20 ms over TCP; host 1 reads.
    script = (
        "import socket, sys, time\n"
        "c = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "while True:\n    c.sendall(b'x' * 100 + b'\\n'); time.sleep(0.02)\n"
    )
    with WanNet(2, LinkSpec(rtt_s=0.01)) as net:
        listener = net.call_in(1, socket.socket)
        listener.bind((net.ips[1], 0))
        listener.listen(1)
        proc = subprocess.Popen(
            [*net.exec_prefix(0), sys.executable, "-c", script, net.ips[1], str(listener.getsockname()[1])]
        )
        try:
            listener.settimeout(30.0)
            conn, _ = listener.accept()
            conn.settimeout(5.0)
            assert conn.recv(4096)
            net.partition(0)
            time.sleep(0.2)
            conn.settimeout(0.05)
            try:  # what was in flight before the cut
                while conn.recv(65536):
                    pass
            except TimeoutError:
                pass
            conn.settimeout(1.5)
            with pytest.raises(TimeoutError):  # a blocked recv sees nothing: no data, no EOF, no reset
                conn.recv(4096)
            assert proc.poll() is None, "the sender must stay alive through a partition"
            dropped = sum(entry["dropped_partition"] for entry in net.stats()["links"])
            assert dropped > 0
            drops = net.drops()  # the same counters, summed by cause
            assert drops["dropped_partition"] >= dropped and drops["dropped_loss"] == 0
            net.partition(0, on=False)
            conn.settimeout(15.0)  # TCP retransmits on its backed-off timer
            assert conn.recv(4096)
            assert proc.poll() is None
            conn.close()
        finally:
            proc.kill()
            proc.wait()
            listener.close()


def test_close_removes_everything_also_after_a_failed_setup(
    available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"wq{os.getpid() % 100000}"
    with WanNet(3, LinkSpec(rtt_s=0.002)) as net:
        assert len(_leftovers(prefix)) >= 3
        assert _round_trips(net, 2)
    assert _leftovers(prefix) == []

    real_run = wan._run

    def failing_run(*args: str) -> str:
        if "addr" in args and "add" in args and args[2] == net.namespaces[1]:
            raise NetnsError("injected failure")
        return real_run(*args)

    monkeypatch.setattr(wan, "_run", failing_run)
    net = WanNet(3, LinkSpec())
    with pytest.raises(NetnsError, match="injected failure"), net:
        pass
    assert _leftovers(prefix) == []


# --------------------------------------------------------------------------- access links


def _tcp_goodputs(net: WanNet, flows: list[tuple[int, int]], warmup: float, seconds: float) -> list[float]:
    """Bulk TCP streams src -> dst, all at once; each one's goodput (bits/s) over
    `seconds` after `warmup` (past slow start), counted by its receiver."""
    stop = threading.Event()
    goodputs = [0.0] * len(flows)
    sockets: list[socket.socket] = []

    def send(sock: socket.socket) -> None:
        buf = bytes(1 << 16)
        try:
            while not stop.is_set():
                sock.sendall(buf)
        except OSError:
            pass

    def receive(k: int, conn: socket.socket, start: float) -> None:
        buf = bytearray(1 << 20)
        counted = 0
        conn.settimeout(5.0)
        while (now := time.monotonic()) < start + warmup + seconds:
            n = conn.recv_into(buf)
            if now >= start + warmup:
                counted += n
        goodputs[k] = counted * 8 / seconds

    try:
        pairs = []
        for src, dst in flows:
            listener = net.call_in(dst, socket.socket)
            sockets.append(listener)
            listener.bind((net.ips[dst], 0))
            listener.listen(1)
            sender = net.call_in(src, socket.socket)
            sockets.append(sender)
            sender.connect(listener.getsockname())
            conn, _ = listener.accept()
            sockets.append(conn)
            pairs.append((sender, conn))
        start = time.monotonic()
        threads = [threading.Thread(target=send, args=(s,), daemon=True) for s, _ in pairs]
        threads += [threading.Thread(target=receive, args=(k, c, start), daemon=True) for k, (_, c) in enumerate(pairs)]
        for t in threads:
            t.start()
        for t in threads[len(pairs):]:
            t.join(warmup + seconds + 10)
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
    return goodputs


def test_uplink_is_shared_by_every_pair(available: None) -> None:
    # Pairs of 100 Mbit/s each: alone they would carry 200 Mbit/s out of host 0.
    rate = 100_000_000
    with WanNet(3, LinkSpec(rtt_s=0.004, rate_bits=rate), host=HostSpec()) as net:
        net.set_host(0, HostSpec(up_bits=rate))
        assert net.host_of(0) == HostSpec(up_bits=rate) and not net.host_of(1).limited
        goodputs = _tcp_goodputs(net, [(0, 1), (0, 2)], warmup=1.0, seconds=2.0)
        assert net.stats()["error"] == ""
    total = sum(goodputs)
    assert 0.85 * rate <= total <= 1.05 * rate, f"{[g / 1e6 for g in goodputs]} Mbit/s through a 100 Mbit/s uplink"
    assert min(goodputs) > 0.15 * rate, goodputs  # both streams move


def test_downlink_is_shared_by_every_pair(available: None) -> None:
    rate = 100_000_000
    spec = WanSpec.parse("rtt=4ms,rate=100mbit,down=100mbit")
    with WanNet(3, spec.link, host=spec.host) as net:
        goodputs = _tcp_goodputs(net, [(0, 2), (1, 2)], warmup=1.0, seconds=2.0)
        assert net.stats()["error"] == ""
    total = sum(goodputs)
    assert 0.85 * rate <= total <= 1.05 * rate, f"{[g / 1e6 for g in goodputs]} Mbit/s into a 100 Mbit/s downlink"
    assert min(goodputs) > 0.15 * rate, goodputs


def test_access_queue_drops_are_counted(available: None) -> None:
    # Bursts far beyond 10 Mbit/s with 5 ms queues: host 0's uplink drops what it cannot
    # queue; host 2's downlink, fed by two unlimited pairs, drops too.
    with WanNet(3, LinkSpec(), host=HostSpec(down_bits=10_000_000, down_queue_s=0.005)) as net:
        net.set_host(0, HostSpec(up_bits=10_000_000, up_queue_s=0.005))
        net.set_host(1, HostSpec())
        a, b, c = _udp(net, 0), _udp(net, 1), _udp(net, 2)
        sent = 300
        try:
            for i in range(sent):
                a.sendto(bytes(1400), c.getsockname())
                b.sendto(bytes(1400), c.getsockname())
            time.sleep(0.3)
        finally:
            for s in (a, b, c):
                s.close()
        stats = net.stats()
    hosts = {h["host"]: h for h in stats["hosts"]}
    links = {(e["src"], e["dst"]): e for e in stats["links"]}
    up0, down2 = hosts[0]["dropped_up_queue"], hosts[2]["dropped_down_queue"]
    assert up0 > sent // 4, hosts  # ~4 packets fit in 5 ms at 10 Mbit/s
    assert down2 > sent // 4, hosts
    assert hosts[1]["dropped_up_queue"] == 0 and hosts[2]["dropped_up_queue"] == 0, hosts
    # Every packet is accounted for: delivered or dropped at one of the two access links.
    delivered = links[(0, 2)]["packets"] + links[(1, 2)]["packets"]
    assert delivered + up0 + down2 == 2 * sent, (delivered, hosts)


def test_delay_with_access_links(available: None) -> None:
    with WanNet(2, LinkSpec(rtt_s=0.02), host=HostSpec.parse("access=1gbit")) as net:
        _check_rtt(_round_trips(net, 40), 0.020)
        # A slow uplink adds its serialization once per leg: a 32-byte packet at 100 kbit/s.
        net.set_host(None, HostSpec(up_bits=100_000))
        _check_rtt(_round_trips(net, 8), 0.020 + 2 * 32 * 8 / 1e5)


def test_downlink_never_reorders_a_pair(available: None) -> None:
    # Two jittered pairs into one downlink: their packets interleave there, each pair's
    # must come out in the order it was sent.
    count = 400
    with WanNet(3, LinkSpec(rtt_s=0.02, jitter_s=0.005), host=HostSpec.parse("down=100mbit")) as net:
        senders, r = [_udp(net, 0), _udp(net, 1)], _udp(net, 2)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        r.settimeout(5.0)
        got: dict[int, list[int]] = {0: [], 1: []}
        try:

            def receive() -> None:
                with contextlib.suppress(TimeoutError):
                    while len(got[0]) + len(got[1]) < 2 * count:
                        data = r.recv(2048)
                        got[data[0]].append(int.from_bytes(data[1:5], "big"))

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            for burst in range(count // 20):  # 2 x 20 x 1028 bytes per 4 ms: ~80 Mbit/s
                for i in range(burst * 20, burst * 20 + 20):
                    for k, s in enumerate(senders):
                        s.sendto(bytes([k]) + i.to_bytes(4, "big") + bytes(995), r.getsockname())
                time.sleep(0.004)
            receiver.join(10)
        finally:
            for s in (*senders, r):
                s.close()
        drops = net.stats()["hosts"][2]["dropped_down_queue"]
    for k in (0, 1):
        assert got[k] == sorted(got[k]), f"pair {k}->2 reordered"
        assert len(got[k]) + drops >= count * 0.9, (len(got[k]), drops)


# --------------------------------------------------------------------------- end to end


class _Peer:
    """tests/helpers/netns_peer.py in an emulated host: JSON commands in, records out."""

    def __init__(self, prefix: list[str], ip: str, master: str, log: Path, config: dict[str, float]) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(REPO / "tests" / "helpers" / "netns_peer.py"), master, ip, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
        )
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.records.put(json.loads(line))

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            return self.records.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no record from the peer (exit code {self.proc.poll()})") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _cc_of_connection(net: WanNet, ask: str | None) -> tuple[str, str]:
    """A TCP connection from host 0 to host 1 (the client asking for `ask` per socket once
    connected, as the engine does; None: not asking): the congestion control of its
    client and server ends, as the kernel reports it (TCP_CONGESTION). A route's congctl
    is applied at connect(), over what a socket asked for before."""
    server = net.call_in(1, lambda: socket.create_server((net.ips[1], 0)))
    try:
        client = net.call_in(0, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with client:
            client.settimeout(5)
            client.connect(server.getsockname())
            if ask is not None:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, ask.encode())
            conn, _ = server.accept()
            with conn:
                def name(s: socket.socket) -> str:
                    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()

                return name(client), name(conn)
    finally:
        server.close()


def test_hosts_congestion_control(available: None) -> None:
    """cc= makes it every connection's between hosts, also one the machine does not let
    a namespace default to (net.ipv4.tcp_allowed_congestion_control, global, untouched):
    the route carries it. A socket that asks for another one gets that one."""
    offered = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    for cc in (c for c in ("reno", "cubic") if c in offered and c != default):
        with WanNet(2, LinkSpec(rtt_s=0.002), cc=cc) as net:
            assert _cc_of_connection(net, None) == (cc, cc)
            other = default if default != cc else "reno"
            assert _cc_of_connection(net, other)[0] == other
    with WanNet(2, LinkSpec(rtt_s=0.002)) as net:  # no cc: the machine's default
        assert _cc_of_connection(net, None) == (default, default)


def _max_pacing_bits(ss_info: str) -> float | None:
    """The pacing cap in an `ss -ti` info line ("pacing_rate 1.2Gbps/366.7Mbps"), bits/s."""
    for word in ss_info.split():
        if word.startswith("pacing_rate"):
            continue
        if "/" in word and word.endswith("bps") and word[0].isdigit():
            cap = word.split("/")[1][: -len("bps")]
            scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(cap[-1], 1.0)
            return float(cap.rstrip("KMG")) * scale
    return None


def test_an_auto_sized_pool_is_paced_at_its_share(available: None) -> None:
    """Behind 100 ms, the default buffers size a pool at several connections; each is
    capped (SO_MAX_PACING_RATE) at its part of the share, as the kernel reports it."""
    import pccl_py._native as nat

    with WanNet(2, LinkSpec(rtt_s=0.1, rate_bits=1_000_000_000)) as net:
        engines = [net.call_in(i, lambda i=i: nat.Engine(peer_id=i + 1, host=net.ips[i], connections_per_peer=0))
                   for i in range(2)]
        try:
            ring = [(e.peer_id, net.ips[i], e.port) for i, e in enumerate(engines)]
            threads = [threading.Thread(target=lambda r=r: net.call_in(r, lambda: engines[r].set_ring(1, ring, r,
                                                                                                       timeout=20)))
                       for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            size = engines[0].pool_size(engines[1].peer_id)
            want = nat.auto_pacing_rate(1, size) * 8
            out = subprocess.run(net.exec_prefix(0) + ["ss", "-Htin", "state", "established",
                                                       f"( dport = :{engines[1].port} )"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            infos = [line for line in out.splitlines() if line.startswith((" ", "\t"))]
            assert len(infos) == size, out
            caps = [_max_pacing_bits(info) for info in infos]
            if want == 0:
                assert caps == [None] * size, out
            else:
                assert size >= 2
                assert all(c is not None and abs(c - want) < 0.01 * want for c in caps), (want, out)
        finally:
            for e in engines:
                e.close()


def test_master_and_two_peers_all_reduce_behind_20ms(available: None, tmp_path: Path) -> None:
    import pccl_py as pccl

    config = {"heartbeat_timeout": 10.0}
    with WanNet(3, LinkSpec(rtt_s=0.02, rate_bits=1_000_000_000)) as net:
        # The master runs in host 2: its listener and threads live there.
        master = net.call_in(2, lambda: pccl.Master(host=net.ips[2], port=0, config=pccl.Config(**config)).start())
        peers: list[_Peer] = []
        try:
            for i in range(2):  # a newcomer is admitted by the members' join_group()
                peer = _Peer(net.exec_prefix(i), net.ips[i], master.address, tmp_path / f"peer{i}.log", config)
                peers.append(peer)
                for p in peers[:-1]:
                    p.send({"cmd": "join", "world": i + 1})
                rec = peer.next(60)
                assert rec.get("event") == "connected", rec
                for p in peers[:-1]:
                    assert p.next(60).get("world") == i + 1
            for p in peers:
                p.send({"cmd": "all_reduce", "n": 1 << 18, "reps": 2})
            records = [p.next(120) for p in peers]
            assert all(r.get("ok") for r in records), records
            assert all(r["value"] == 2.0 and r["world"] == 2 for r in records), records
            # Every byte crossed the emulator: a ring step alone takes a 10 ms one-way trip.
            assert min(min(r["seconds"]) for r in records) >= 0.02
            forwarded = {(e["src"], e["dst"]): e["bytes"] for e in net.stats()["links"]}
            assert forwarded[(0, 1)] > 1 << 20 and forwarded[(1, 0)] > 1 << 20, forwarded
            assert forwarded[(0, 2)] > 0 and forwarded[(2, 1)] > 0, forwarded
        finally:
            for p in peers:
                p.close()
            master.close()
