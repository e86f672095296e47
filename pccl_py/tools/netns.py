"""A WAN-like network on one Linux machine: one network namespace per peer, each joined
to a bridge in the root namespace by a veth pair, each peer's egress shaped to a fixed
rate with an htb qdisc.

    with ShapedNet(peers=4, rate_bits=parse_rate("200mbit")) as net:
        ...  # peer i runs in namespace net.namespaces[i] with address net.ips[i];
             # something in the root namespace (a master) listens on net.hub_ip
        net.set_rate(parse_rate("1gbit"))

A process joins a namespace with `enter(name)` (setns(2) on /var/run/netns/NAME, what
`ip netns exec` does for the network); call it before the process opens any socket or
starts a thread, since setns moves only the calling thread.

Needs root and iproute2 (`ip`, `tc`); `unavailable()` says why not when they are missing.
Names carry the creating process's id (unique per machine), addresses are private
(10.214.X.0/24, X chosen free on this machine), and `close()` removes every namespace
and link it created, also after a partial `up()`.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from types import TracebackType
from typing import Self

CLONE_NEWNET = 0x40000000
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}
_SUBNET_BASE = "10.214"
_CMD_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the failing command's output attached)."""


def parse_rate(text: str) -> int:
    """'1gbit' -> 1_000_000_000 bits/s, '200mbit', '500kbit', '64000bit' (tc's SI units)."""
    m = _RATE_RE.match(text)
    if m is None:
        raise ValueError(f"bad rate {text!r}: expected a number with bit, kbit, mbit or gbit (e.g. 200mbit)")
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if bits < 8000 or bits != int(bits):
        raise ValueError(f"bad rate {text!r}: must be a whole number of bits/s, at least 8kbit")
    return int(bits)


def format_rate(bits: int) -> str:
    for unit in ("gbit", "mbit", "kbit"):
        scale = _RATE_UNITS[unit]
        if bits >= scale and bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


def unavailable() -> str | None:
    """None if shaped namespaces can be made here, else why not (for a message or a skip)."""
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links and tc qdiscs)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2 ({', '.join(missing)} not found)"
    probe = f"pqprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_CMD_TIMEOUT, check=False)
    return None


def enter(namespace: str) -> None:
    """Moves the calling thread (and the threads it starts later) into `namespace`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({namespace}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise NetnsError(f"{' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> str:
    """A 10.214.X prefix no interface of the root namespace uses (other ShapedNets' bridges)."""
    used = _run("ip", "-4", "-o", "addr", "show")
    start = os.getpid() % 250
    for k in range(250):
        prefix = f"{_SUBNET_BASE}.{(start + k) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    raise NetnsError(f"no free {_SUBNET_BASE}.X.0/24 subnet")


def htb_burst_bytes(rate_bits: int) -> int:
    """htb's bucket: 1 ms at the rate, at least two 64 KiB GSO packets (veth sends those)."""
    return max(128 << 10, rate_bits // 8 // 1000)


class ShapedNet:
    """`peers` namespaces on a bridge, each one's egress (eth0) shaped to one rate by htb.

    Traffic from peer i leaves through its eth0 at most at the rate; it enters peer j
    unshaped (the sender's shaper already limited it). So every peer has an uplink of
    `rate` and a downlink of up to (peers-1) * rate, as hosts on a switched WAN."""

    def __init__(self, peers: int, rate_bits: int) -> None:
        if peers < 1:
            raise ValueError("peers must be at least 1")
        self.peers = peers
        self.rate_bits = rate_bits
        self.prefix = f"pq{os.getpid() % 100000}"
        self.bridge = f"{self.prefix}br"
        self.namespaces = [f"{self.prefix}n{i}" for i in range(peers)]
        self.subnet = ""
        self.hub_ip = ""
        self.ips: list[str] = []
        self._created_bridge = False
        self._created: list[int] = []  # peer indices whose namespace exists

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def up(self) -> None:
        self.subnet = _free_subnet()
        self.hub_ip = f"{self.subnet}.1"
        self.ips = [f"{self.subnet}.{11 + i}" for i in range(self.peers)]
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _run("ip", "addr", "add", f"{self.hub_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            host_end, ns_end = f"{self.prefix}h{i}", f"{self.prefix}p{i}"
            _run("ip", "netns", "add", ns)
            self._created.append(i)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _run("ip", "link", "set", ns_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "link", "set", ns_end, "name", "eth0")
            _run(*inside, "ip", "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
            htb = self._htb(self.rate_bits)
            _run(*inside, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", *htb)

    def set_rate(self, rate_bits: int) -> None:
        """Changes every peer's egress rate in place (open connections stay up)."""
        htb = self._htb(rate_bits)
        for ns in self.namespaces:
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "tc", "class", "change", "dev", "eth0", "parent", "1:", "classid", "1:10", *htb)
        self.rate_bits = rate_bits

    def qdisc_stats(self, peer: int) -> str:
        """`tc -s class show` of one peer's eth0 (sent bytes, drops, overlimits)."""
        return _run("ip", "netns", "exec", self.namespaces[peer], "tc", "-s", "class", "show", "dev", "eth0")

    def close(self) -> None:
        """Removes every namespace (its veth pair goes with it), leftover host ends and the bridge."""
        for i in self._created:
            ns = self.namespaces[i]
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_CMD_TIMEOUT, check=False)
        for i in self._created:
            link = f"{self.prefix}h{i}"
            if os.path.exists(f"/sys/class/net/{link}"):
                subprocess.run(["ip", "link", "del", link], check=False, capture_output=True, timeout=_CMD_TIMEOUT)
        self._created.clear()
        if self._created_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True, timeout=_CMD_TIMEOUT)
            self._created_bridge = False

    @staticmethod
    def _htb(rate_bits: int) -> tuple[str, ...]:
        burst = str(htb_burst_bytes(rate_bits))
        rate = f"{rate_bits}bit"
        return ("htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst)


__all__ = ["NetnsError", "ShapedNet", "enter", "format_rate", "htb_burst_bytes", "parse_rate", "unavailable"]
