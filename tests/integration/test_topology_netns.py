"""optimize_topology() on a WAN-like network built on one machine: four peers, each in
its own network namespace, joined by veth links to a bridge in the root namespace
(where the master runs). Each namespace shapes its egress per destination with htb
classes and u32 filters: every hop of the initial ring (the join order) is made ~10x
slower than the other paths, so only the reversed ring is fast. The test measures an
all-reduce, optimizes, checks the new ring avoids every slow hop, and measures again.

Needs root, `ip` and `tc` (iproute2); skipped otherwise. Every namespace, link and
process it creates is removed in `finally`. Only private addresses (10.213.x.0/24)
are used, inside the namespaces and on the bridge.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pccl_py as pccl

PEERS = 4
FAST = "200mbit"
SLOW = "20mbit"
ELEMENTS = 512 << 10  # 2 MiB of float32
REPS = 3
REPO = Path(__file__).resolve().parents[2]
PEER_CONFIG = {"probe_bytes": 256 << 10, "heartbeat_timeout": 10.0}


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


def _netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"ptprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class WanNet:
    """A bridge in the root namespace and PEERS namespaces, each with a veth to it and
    an htb root qdisc on its egress: class 1:10 (FAST, the default) and 1:20 (SLOW)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.prefix = f"pt{tag}"
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.bridge = f"{self.prefix}br"
        self.hub_ip = f"{self.subnet}.1"
        self.namespaces = [f"{self.prefix}n{i}" for i in range(PEERS)]
        self.ips = [f"{self.subnet}.{11 + i}" for i in range(PEERS)]

    def up(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.hub_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            host_end = f"{self.prefix}h{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"{self.prefix}p{i}")
            _run("ip", "link", "set", f"{self.prefix}p{i}", "netns", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", f"{self.prefix}p{i}", "name", "eth0")
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            tc = ("ip", "netns", "exec", ns, "tc")
            _run(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10", "r2q", "100")
            _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", FAST)
            _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", SLOW)

    def slow_down(self, src: int, dst: int) -> None:
        """Traffic from namespace `src` to namespace `dst` goes through the SLOW class."""
        _run(
            "ip", "netns", "exec", self.namespaces[src], "tc", "filter", "add", "dev", "eth0", "parent", "1:",
            "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst", f"{self.ips[dst]}/32", "flowid", "1:20",
        )

    def down(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for i in range(PEERS):
            subprocess.run(["ip", "link", "del", f"{self.prefix}h{i}"], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


class NetnsPeer:
    """tests/netns_peer.py running in a namespace; JSON records read on a thread."""

    def __init__(self, ns: str, ip: str, master: str, log: Path) -> None:
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(REPO / "tests" / "helpers" / "netns_peer.py"), master, ip,
             json.dumps(PEER_CONFIG)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO,
        )
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.records.put(json.loads(line))
            except ValueError:
                pass

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 120.0) -> dict[str, Any]:
        try:
            return self.records.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no record from peer (exit code {self.proc.poll()})") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def wan_net() -> Iterator[WanNet]:
    why = _netns_available()
    if why is not None:
        pytest.skip(why)
    net = WanNet()
    try:
        net.up()
        yield net
    finally:
        net.down()


def _all(peers: list[NetnsPeer], cmd: dict[str, Any]) -> list[dict[str, Any]]:
    for p in peers:
        p.send(cmd)
    records = [p.next() for p in peers]
    bad = [r for r in records if not r.get("ok")]
    assert not bad, bad
    return records


def _all_reduce_seconds(peers: list[NetnsPeer]) -> float:
    """Median over REPS of the slowest peer's all-reduce time."""
    records = _all(peers, {"cmd": "all_reduce", "n": ELEMENTS, "reps": REPS})
    assert all(r["value"] == PEERS for r in records)
    return statistics.median(max(r["seconds"][i] for r in records) for i in range(REPS))


def test_optimize_topology_avoids_slow_links(wan_net: WanNet, tmp_path: Path) -> None:
    config = pccl.Config(**PEER_CONFIG)  # type: ignore[arg-type]
    peers: list[NetnsPeer] = []
    with pccl.Master(host=wan_net.hub_ip, port=0, config=config) as master:
        try:
            index_of: dict[int, int] = {}
            for i in range(PEERS):  # one at a time: the initial ring is the join order
                peers.append(NetnsPeer(wan_net.namespaces[i], wan_net.ips[i], master.address, tmp_path / f"peer{i}.log"))
                for p in peers[:-1]:
                    p.send({"cmd": "join", "world": i + 1})
                rec = peers[i].next()
                assert rec.get("event") == "connected", rec
                index_of[rec["peer"]] = i
                for p in peers[:-1]:
                    assert p.next()["world"] == i + 1

            initial = master.status()["groups"]["0"]["ring"]
            hops = [(index_of[initial[k]], index_of[initial[(k + 1) % PEERS]]) for k in range(PEERS)]
            slow = set(hops)  # every hop of the initial ring; the reversed ring has none
            for src, dst in slow:
                wan_net.slow_down(src, dst)

            before = _all_reduce_seconds(peers)
            opt = _all(peers, {"cmd": "optimize"})
            status = master.status()["groups"]["0"]
            ring = [index_of[p] for p in status["ring"]]
            after = _all_reduce_seconds(peers)

            rates = {(index_of[a], index_of[b]): r for a, b, r in status["bandwidth"]}
            print(
                f"\ninitial ring {[index_of[p] for p in initial]} (slow hops {sorted(slow)}), optimized ring {ring}\n"
                f"all-reduce of {ELEMENTS * 4 >> 20} MiB over {PEERS} peers: before {before:.3f}s, "
                f"after {after:.3f}s ({before / after:.1f}x); optimize_topology() took "
                f"{max(r['elapsed'] for r in opt):.2f}s\n"
                "probed MB/s: " + ", ".join(f"{a}->{b} {r / 1e6:.1f}" for (a, b), r in sorted(rates.items()))
            )
            assert len(rates) == PEERS * (PEERS - 1), "every directed pair is measured"
            assert max(rates[p] for p in slow) < min(r for p, r in rates.items() if p not in slow)
            new_hops = {(ring[k], ring[(k + 1) % PEERS]) for k in range(PEERS)}
            assert not new_hops & slow, f"the optimized ring {ring} still uses a slow hop"
            assert all(r["epoch"] == opt[0]["epoch"] for r in opt)
            assert before / after >= 2.0, f"all-reduce did not get faster: {before:.3f}s -> {after:.3f}s"
        finally:
            for p in peers:
                p.close()
