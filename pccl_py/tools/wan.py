"""A WAN emulator on one Linux machine: one network namespace per emulated host, each
with a TUN device as its only interface (eth0), and one native packet relay
(pccl_py._native.WanRelay) that carries every packet between them through a modelled
link: silent partitions, random loss, a drop-tail queue, serialization at a rate, and
one-way delay with jitter that never reorders a link; and, per host, an access link
(an uplink and a downlink rate, each with its queue) that all its pairs share.

    with WanNet(hosts=3, link=LinkSpec.parse("rtt=100ms"), host=HostSpec.parse("access=1gbit")) as net:
        ...  # host i: namespace net.namespaces[i], address net.ips[i]
        net.set_link(LinkSpec.parse("rtt=20ms,loss=0.01"), src=0, dst=1)
        net.set_host(2, HostSpec.parse("up=100mbit,down=1gbit"))
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

import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from pccl_py.tools import netns
from pccl_py.tools.netns import NetnsError
from pccl_py.tools.wan_spec import HostSpec, LinkSpec, WanSpec, parse_duration

_TUNSETIFF = 0x400454CA
_TUNGETIFF = 0x800454D2
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MTU = 9000
_TXQUEUELEN = 10000  # the TUN's queue towards the relay: deep, so only the model drops
_SUBNET_BASE = "10.215"
_CMD_TIMEOUT = 30.0
CONGESTION_CONTROLS = ("reno", "cubic", "bbr")  # what WanNet(cc=...) may set in every host
T = TypeVar("T")


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


def _allowed_everywhere(cc: str) -> bool:
    """Whether a namespace other than the first may default to `cc`: only algorithms the
    machine allows to everyone (net.ipv4.tcp_allowed_congestion_control, a global
    setting this module does not change) qualify."""
    try:
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
            return cc in f.read().split()
    except OSError:
        return True


class WanNet:
    """`hosts` namespaces joined by the relay, every directed link modelled by `link` and
    every host's access link by `host` (None: unlimited).

    cc: the TCP congestion control in every host (reno, cubic or bbr; None keeps the
    machine's): of every connection between hosts that does not ask for another one
    itself (TCP_CONGESTION), through the route's congctl. tcp_mem: (min, default, max)
    bytes for both tcp_rmem and tcp_wmem in every host (None keeps the machine's). sysctls: more net.ipv4 sysctls for every host (each
    namespace has its own), e.g. {"net.ipv4.tcp_slow_start_after_idle": "0"}. seed: the loss and jitter RNG. Owns its namespaces,
    TUN devices and relay thread; `close()` (or leaving the `with`) releases them all."""

    def __init__(
        self,
        hosts: int,
        link: LinkSpec,
        host: HostSpec | None = None,
        cc: str | None = None,
        tcp_mem: tuple[int, int, int] | None = None,
        sysctls: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        if hosts < 2:
            raise ValueError("a WanNet needs at least 2 hosts")
        if cc is not None and cc not in CONGESTION_CONTROLS:
            raise ValueError(f"cc must be one of {', '.join(CONGESTION_CONTROLS)}, got {cc!r}")
        self.hosts = hosts
        self.link = link
        self.host = host or HostSpec()
        self.cc = cc
        self.tcp_mem = _tcp_mem_text(tcp_mem) if tcp_mem is not None else None
        self.sysctls = dict(sysctls or {})
        for key in self.sysctls:
            if not key.startswith("net.ipv4."):
                raise ValueError(f"only net.ipv4 sysctls (per namespace) can be set in a host, got {key!r}")
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
        self._access: dict[int, HostSpec] = {}

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
                # The route to the other hosts carries it (congctl): it holds for every
                # connection between hosts that does not ask for another per socket, even
                # where the namespace may not default to it. The default too, where it may.
                _run("ip", "-n", ns, "route", "replace", f"{self.subnet}.0/24", "dev", "eth0", "proto", "kernel",
                     "scope", "link", "src", self.ips[i], "congctl", self.cc)
            if self.cc is not None and _allowed_everywhere(self.cc):
                sysctls.append(f"net.ipv4.tcp_congestion_control={self.cc}")
            if self.tcp_mem is not None:
                sysctls += [f"net.ipv4.tcp_rmem={self.tcp_mem}", f"net.ipv4.tcp_wmem={self.tcp_mem}"]
            sysctls += [f"{key}={value}" for key, value in self.sysctls.items()]
            _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *sysctls)
        addresses = [int(ipaddress.IPv4Address(ip)) for ip in self.ips]
        self._relay = _native.WanRelay(self._tun_fds, addresses, seed=self.seed)
        self._close_tun_fds()  # the relay holds its own copies
        self.set_link(self.link)
        self.set_host(None, self.host)
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

    def set_host(self, host: int | None, spec: HostSpec) -> None:
        """Models the access link of `host` (None: every host) by `spec` from now on:
        packets entering its uplink, or reaching its downlink, afterwards."""
        relay = self._require_relay()
        with self._lock:
            for h in range(self.hosts) if host is None else [self._host(host)]:
                relay.set_host(h, spec.up_bits, spec.down_bits, spec.up_queue_s, spec.down_queue_s)
                self._access[h] = spec

    def host_of(self, host: int) -> HostSpec:
        with self._lock:
            return self._access[self._host(host)]

    def set_wan(self, spec: WanSpec) -> None:
        """Every pair link to spec.link, every host's access link to spec.host."""
        self.set_link(spec.link)
        self.set_host(None, spec.host)

    def partition(self, host: int, on: bool = True) -> None:
        """Cuts (on) or heals every link to and from `host`. A cut is silent: packets
        vanish, nothing is reset, the host's processes keep running."""
        self._require_relay().set_partitioned(self._host(host), on)

    def partition_link(self, src: int, dst: int, on: bool = True) -> None:
        """Cuts (on) or heals the one directed link src->dst."""
        self._require_relay().set_link_partitioned(self._host(src), self._host(dst), on)

    def stats(self) -> dict[str, Any]:
        """The relay's counters: "links" (per directed link: packets, bytes forwarded;
        dropped_partition/_loss/_queue/_memory, write_errors), "hosts" (per host: its
        access link's dropped_up_queue, dropped_down_queue), "unroutable",
        "pending_packets", "pending_bytes", "error"."""
        out: dict[str, Any] = self._require_relay().stats()
        out["links"] = [entry for entry in out["links"] if entry["src"] != entry["dst"]]
        return out

    def drops(self) -> dict[str, int]:
        """The relay's drops so far by cause, summed over every link (dropped_partition,
        _loss, _queue, _memory) and every host (dropped_up_queue, dropped_down_queue)."""
        stats = self.stats()
        causes = ("dropped_partition", "dropped_loss", "dropped_queue", "dropped_memory")
        out = {cause: sum(link[cause] for link in stats["links"]) for cause in causes}
        for cause in ("dropped_up_queue", "dropped_down_queue"):
            out[cause] = sum(h[cause] for h in stats["hosts"])
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


__all__ = ["HostSpec", "LinkSpec", "WanNet", "WanSpec", "enter", "parse_duration", "unavailable"]
