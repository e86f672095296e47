"""A WAN emulator on one Linux machine: one network namespace per emulated host, each
with a TUN device as its only interface (eth0), and one native packet relay
(pccl_py._native.WanRelay) that carries every packet between them through a modelled
link: silent partitions, random loss, a drop-tail queue, serialization at a rate, and
one-way delay with jitter that never reorders a link.

    with WanNet(hosts=3, link=LinkSpec.parse("rtt=100ms,rate=1gbit")) as net:
        ...  # host i: namespace net.namespaces[i], address net.ips[i]
        net.set_link(LinkSpec.parse("rtt=20ms,loss=0.01"), src=0, dst=1)
        net.partition(2)          # host 2's packets vanish; its processes keep running
        net.partition(2, on=False)

A process joins a host with `enter(name)` (pccl_py.tools.netns) or runs under
`ip netns exec NAME`; `call_in(host, fn)` runs fn on a thread inside the host, so the
sockets and threads it creates live there (the caller's own threads stay where they are).

How it is built: each TUN is created in the root namespace by this process (the fd is
attached with IFF_TUN | IFF_NO_PI), then moved into its host's namespace and renamed
eth0; the fd stays attached (checked with TUNGETIFF). The relay thread reads each TUN,
looks the destination address up and writes the packet to the destination's TUN at its
release time. Traffic inside one host (its loopback) does not cross the emulator.

Needs root, /dev/net/tun and iproute2's `ip`; `unavailable()` says why not. Names carry
the creating process's id, addresses are private (10.215.X.0/24), and `close()` removes
every namespace and device it created, also after a partial setup.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from pccl_py.tools import netns
from pccl_py.tools.netns import NetnsError, format_rate, parse_rate

_TUNSETIFF = 0x400454CA
_TUNGETIFF = 0x800454D2
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MTU = 9000
_TXQUEUELEN = 10000  # the TUN's queue towards the relay: deep, so only the model drops
_SUBNET_BASE = "10.215"
_CMD_TIMEOUT = 30.0
_CC = ("reno", "cubic", "bbr")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
T = TypeVar("T")


def parse_duration(text: str) -> float:
    """'100ms' -> 0.1, '250us', '1.5s' (seconds)."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"bad duration {text!r}: expected a number with us, ms or s (e.g. 100ms)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def _format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0ms"
    ms = seconds * 1e3
    return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}us"


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One directed link's model. rtt is the round trip of an idle path (each direction
    gets rtt/2 of one-way delay); rate_bits 0 is unlimited (no serialization, no queue);
    loss is a probability per packet; jitter is added to each packet's one-way delay,
    uniform in [-jitter, +jitter] (never reordering); queue is the drop-tail limit, as the
    time a packet may wait for the link at its rate."""

    rtt_s: float = 0.0
    rate_bits: int = 0
    loss: float = 0.0
    jitter_s: float = 0.0
    queue_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_s <= 60:
            raise ValueError(f"rtt must be between 0 and 60 s, got {self.rtt_s}")
        if self.rate_bits < 0:
            raise ValueError("rate must not be negative")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss must be a probability between 0 and 1, got {self.loss}")
        if not 0 <= self.jitter_s <= 60:
            raise ValueError(f"jitter must be between 0 and 60 s, got {self.jitter_s}")
        if not 0 <= self.queue_s <= 60:
            raise ValueError(f"queue must be between 0 and 60 s, got {self.queue_s}")

    @property
    def delay_s(self) -> float:
        """One-way delay."""
        return self.rtt_s / 2

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """'rtt=100ms,rate=1gbit,loss=0.01,jitter=20ms,queue=50ms'; every key optional
        (durations in us/ms/s, rates in bit/kbit/mbit/gbit, loss a fraction or 'N%')."""
        fields: dict[str, Any] = {}
        names = {"rtt": "rtt_s", "rate": "rate_bits", "loss": "loss", "jitter": "jitter_s", "queue": "queue_s"}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in names:
                raise ValueError(
                    f"bad link spec item {item!r} in {text!r}: expected KEY=VALUE with KEY one of "
                    "rtt, rate, loss, jitter, queue (e.g. rtt=100ms,rate=1gbit,loss=0.01)"
                )
            if names[key] in fields:
                raise ValueError(f"bad link spec {text!r}: {key} given twice")
            try:
                if key == "rate":
                    fields["rate_bits"] = 0 if value.strip() in ("0", "unlimited") else parse_rate(value)
                elif key == "loss":
                    v = value.strip()
                    fields["loss"] = float(v[:-1]) / 100 if v.endswith("%") else float(v)
                else:
                    fields[names[key]] = parse_duration(value)
            except ValueError as e:
                raise ValueError(f"bad link spec {text!r}: {key}: {e}") from None
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"bad link spec {text!r}: {e}") from None

    def __str__(self) -> str:
        parts = [f"rtt={_format_duration(self.rtt_s)}"]
        parts.append(f"rate={format_rate(self.rate_bits)}" if self.rate_bits else "rate=unlimited")
        if self.loss:
            parts.append(f"loss={self.loss:g}")
        if self.jitter_s:
            parts.append(f"jitter={_format_duration(self.jitter_s)}")
        parts.append(f"queue={_format_duration(self.queue_s)}")
        return ",".join(parts)


def unavailable() -> str | None:
    """None if a WanNet can be made here, else why not (for a message or a skip)."""
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip not found)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"needs /dev/net/tun ({e.strerror})"
    from pccl_py import _native

    if not hasattr(_native, "WanRelay"):
        return "the native module was built without the WAN relay (reinstall)"
    probe = f"wqprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
    except NetnsError as e:
        return f"cannot create a network namespace: {e}"
    _quiet("ip", "netns", "del", probe)
    return None


def enter(namespace: str) -> None:
    """Moves the calling thread (and the threads it starts later) into `namespace`."""
    netns.enter(namespace)


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise NetnsError(f"{' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _quiet(*args: str) -> None:
    """A cleanup command: its failure (the thing is already gone) is not an error."""
    try:
        subprocess.run(args, capture_output=True, timeout=_CMD_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def _free_subnet() -> str:
    """A 10.215.X prefix no interface of the root namespace uses. (Hosts of different
    WanNets never meet: each net's namespaces reach only its own relay.)"""
    used = _run("ip", "-4", "-o", "addr", "show")
    start = os.getpid() % 250
    for k in range(250):
        prefix = f"{_SUBNET_BASE}.{(start + k) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    raise NetnsError(f"no free {_SUBNET_BASE}.X.0/24 subnet")


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise NetnsError(f"TUNSETIFF {name}: {e}") from e
    return fd


def _tun_name(fd: int) -> str:
    """The name of the device the TUN fd is attached to (TUNGETIFF)."""
    out = fcntl.ioctl(fd, _TUNGETIFF, bytes(40))
    return out[:16].split(b"\0", 1)[0].decode()


def _tcp_mem_text(mem: tuple[int, int, int]) -> str:
    if len(mem) != 3 or not 0 < mem[0] <= mem[1] <= mem[2]:
        raise ValueError(f"tcp_mem must be (min, default, max) bytes, increasing, got {mem}")
    return " ".join(str(v) for v in mem)


class WanNet:
    """`hosts` namespaces joined by the relay, every directed link modelled by `link`.

    cc: the TCP congestion control in every host (reno, cubic or bbr; None keeps the
    machine's). tcp_mem: (min, default, max) bytes for both tcp_rmem and tcp_wmem in every
    host (None keeps the machine's). seed: the loss and jitter RNG. Owns its namespaces,
    TUN devices and relay thread; `close()` (or leaving the `with`) releases them all."""

    def __init__(
        self,
        hosts: int,
        link: LinkSpec,
        cc: str | None = None,
        tcp_mem: tuple[int, int, int] | None = None,
        seed: int = 0,
    ) -> None:
        if hosts < 2:
            raise ValueError("a WanNet needs at least 2 hosts")
        if cc is not None and cc not in _CC:
            raise ValueError(f"cc must be one of {', '.join(_CC)}, got {cc!r}")
        self.hosts = hosts
        self.link = link
        self.cc = cc
        self.tcp_mem = _tcp_mem_text(tcp_mem) if tcp_mem is not None else None
        self.seed = seed
        self.prefix = f"wq{os.getpid() % 100000}"
        self.namespaces = [f"{self.prefix}n{i}" for i in range(hosts)]
        self.subnet = ""
        self.ips: list[str] = []
        self._tun_fds: list[int] = []
        self._created: list[int] = []  # host indices whose namespace exists
        self._relay: Any = None
        self._lock = threading.Lock()
        self._links: dict[tuple[int, int], LinkSpec] = {}

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
        """Creates the hosts and starts the relay; on failure, call close()."""
        from pccl_py import _native

        self.subnet = _free_subnet()
        self.ips = [f"{self.subnet}.{11 + i}" for i in range(self.hosts)]
        for i, ns in enumerate(self.namespaces):
            tun = f"{self.prefix}t{i}"
            fd = _open_tun(tun)
            self._tun_fds.append(fd)
            _run("ip", "netns", "add", ns)
            self._created.append(i)
            _run("ip", "link", "set", tun, "netns", ns)
            _run("ip", "-n", ns, "link", "set", tun, "name", "eth0")
            if _tun_name(fd) != "eth0":
                raise NetnsError(f"the TUN fd of host {i} is not attached to {ns}'s eth0 after the move")
            _run("ip", "-n", ns, "link", "set", "eth0", "mtu", str(_MTU), "txqueuelen", str(_TXQUEUELEN))
            _run("ip", "-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            sysctls = ["net.ipv6.conf.all.disable_ipv6=1"]  # no IPv6 chatter through the relay
            if self.cc is not None:
                sysctls.append(f"net.ipv4.tcp_congestion_control={self.cc}")
            if self.tcp_mem is not None:
                sysctls += [f"net.ipv4.tcp_rmem={self.tcp_mem}", f"net.ipv4.tcp_wmem={self.tcp_mem}"]
            _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls)
        addresses = [int(ipaddress.IPv4Address(ip)) for ip in self.ips]
        self._relay = _native.WanRelay(self._tun_fds, addresses, seed=self.seed)
        self._close_tun_fds()  # the relay holds its own copies
        self.set_link(self.link)
        self._relay.start()

    # ------------------------------------------------------------------ control

    def set_link(self, link: LinkSpec, src: int | None = None, dst: int | None = None) -> None:
        """Models link src->dst (None: every source / every destination) by `link` from
        now on; packets already queued keep their release times."""
        relay = self._require_relay()
        srcs = range(self.hosts) if src is None else [self._host(src)]
        dsts = range(self.hosts) if dst is None else [self._host(dst)]
        with self._lock:
            for s in srcs:
                for d in dsts:
                    if s != d:
                        relay.set_link(s, d, link.delay_s, link.jitter_s, link.rate_bits, link.loss, link.queue_s)
                        self._links[(s, d)] = link

    def link_of(self, src: int, dst: int) -> LinkSpec:
        with self._lock:
            return self._links[(self._host(src), self._host(dst))]

    def partition(self, host: int, on: bool = True) -> None:
        """Cuts (on) or heals every link to and from `host`. A cut is silent: packets
        vanish, nothing is reset, the host's processes keep running."""
        self._require_relay().set_partitioned(self._host(host), on)

    def partition_link(self, src: int, dst: int, on: bool = True) -> None:
        """Cuts (on) or heals the one directed link src->dst."""
        self._require_relay().set_link_partitioned(self._host(src), self._host(dst), on)

    def stats(self) -> dict[str, Any]:
        """The relay's counters: "links" (per directed link: packets, bytes forwarded;
        dropped_partition/_loss/_queue/_memory, write_errors), "unroutable",
        "pending_packets", "pending_bytes", "error"."""
        out: dict[str, Any] = self._require_relay().stats()
        out["links"] = [entry for entry in out["links"] if entry["src"] != entry["dst"]]
        return out

    def exec_prefix(self, host: int) -> list[str]:
        """The argv prefix that runs a command inside `host` (ip netns exec NAME)."""
        return ["ip", "netns", "exec", self.namespaces[self._host(host)]]

    def call_in(self, host: int, fn: Callable[[], T]) -> T:
        """Runs fn() on a fresh thread that entered `host`, and returns its result (or
        raises its exception). Sockets it opens and threads it starts live in the host."""
        namespace = self.namespaces[self._host(host)]
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                enter(namespace)
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        thread = threading.Thread(target=body, name=f"wan-call-{namespace}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        result: T = box["result"]
        return result

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stops the relay, then removes the TUN devices and namespaces (idempotent)."""
        if self._relay is not None:
            self._relay.close()
            self._relay = None  # its destructor closes its TUN fds, which removes the devices
        self._close_tun_fds()
        for i in self._created:
            _quiet("ip", "netns", "del", self.namespaces[i])
        for i in range(self.hosts):  # a TUN created but never moved (a failure in between)
            name = f"{self.prefix}t{i}"
            if os.path.exists(f"/sys/class/net/{name}"):
                _quiet("ip", "link", "del", name)
        self._created.clear()

    def _close_tun_fds(self) -> None:
        for fd in self._tun_fds:
            os.close(fd)
        self._tun_fds.clear()

    def _require_relay(self) -> Any:
        if self._relay is None:
            raise NetnsError("the WAN emulator is not running")
        return self._relay

    def _host(self, host: int) -> int:
        if not 0 <= host < self.hosts:
            raise ValueError(f"no host {host}: hosts are 0..{self.hosts - 1}")
        return host


__all__ = ["LinkSpec", "WanNet", "enter", "parse_duration", "unavailable"]
