"""Shared-state synchronisation, measured (not asserted). Peers are separate processes
(tests/helpers/state_workers.py's state_worker); the master runs in this process.

(a) joiner: the sources form the group, then a RECEIVE_ONLY peer with a zero-filled
    state joins it (admitted by their update_topology(), as a member's loop admits
    one: the members open and warm their pools to it) and receives the whole state
    (`--mib` MiB in `--entries` float32 entries) from 1 and from 3 sources. The sources
    call sync first; the joiner's sync_shared_state() is timed end to end (hash its
    own state, plan, fetch, verify, result) and its transfer phase (fetch + hash
    verification) on its own. Repeated `--reps` times (the joiner zeroes its state
    again before each, so its pages are touched), median reported.
(a') fresh joiner (`--only fresh`): the same, but the joiner's state is freshly
    allocated before each rep, pages never touched, as a joiner's usually is: the
    kernel must fault in (and zero) every page the receive lands in. The engine faults
    them in ahead of the bytes on a thread of its own (Config.prefault). `--fresh-memory`:
    np.zeros (numpy advises huge pages for it) or plain anonymous memory (as torch.empty
    gives: 4 KiB pages unless advised). The old state is freed just before, so the new
    one reuses its pages; `--fresh-idle S` frees it S (+1) s before instead: on a VM with
    free page reporting the host has taken those pages back by then, and faulting them
    in again costs its time too. SharedState populates its pages from construction on
    (prefault=True; `--no-state-prefault` turns that off); `--fresh-lead S` builds the
    state S s before the sync, as a joiner does before it connects and is admitted.
(a'') over a WAN (`--wan SPEC`, root): (a) or (a') with every source, the joiner and
    the master in hosts of the WAN emulator (pccl_py.tools.wan; SPEC as for
    `pccl bench --wan`, e.g. rtt=100ms,access=1gbit: 100 ms round trips, every host
    1 Gbit/s up and down). Both times are also reported as a fraction of the joiner's
    downlink (what its downlink could carry in that time), with the emulator's drops:
    each rep's at the sources' uplinks and the joiner's downlink, and the downlink's
    per 100 ms slot of the delivery timeline ("drops at SLOT:COUNT"). Each rep also
    prints the connections the joiner has opened so far (a fetch over the sources' own
    pools to it opens none) and the padding each source has sent so far to warm them.
(b) no-transfer sync: `--peers` peers with identical state call sync_shared_state()
    back to back (`--syncs` times after a warm-up); the time of one sync = the slowest
    peer's call in that round; median reported. Repeated with 1 MiB: the fixed cost.
    Every peer hashes its whole state at every sync, so with all peers on one host
    this is bounded below by hashing peers * size on all cores at once, which is
    measured too ("floor"; memory bandwidth, not the digest, limits it).
(c) digest: xxh3-64 (pccl_py.shared_state.digest) of a `--mib` MiB buffer, one core.

    python -m stress.state_transfer
    python -m stress.state_transfer --mib 256 --reps 5 --syncs 15 --json results.jsonl
    python -m stress.state_transfer --only joiner fresh --mib 256 --entries 1 --sources 3 --reps 5
    python -m stress.state_transfer --only joiner --wan rtt=100ms,access=1gbit --sources 3 --entries 1

GB/s is 1e9 bytes per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import numpy as np

from pccl_py import Master
from pccl_py.peer.shared_state import digest
from pccl_py.testing import PeerGroup
from pccl_py.tools.wan import WanNet, WanSpec
from tests.helpers.state_workers import fill, state_worker


def _spec(mib: int, entries: int, zero: bool = False) -> list[tuple[str, str, int, int | None]]:
    per_entry = (mib << 20) // entries // 4
    return [(f"entry{i}", "float32", per_entry, None if zero else 100 + i) for i in range(entries)]


class _Peers:
    """A PeerGroup of state workers, each with its own pipe; with `net`, peer i runs in
    the WAN emulator's host i."""

    def __init__(self, master: Master, world: int, net: WanNet | None = None) -> None:
        self.group = PeerGroup(master.address, state_worker, dict(world=world))
        self.net = net
        self.conns: dict[int, Any] = {}
        self._child: list[Any] = []
        self._ctx = mp.get_context("spawn")

    def start(
        self, index: int, spec: list[Any], config: dict[str, Any] | None = None, world: int | None = None
    ) -> None:
        """`world`: the group size the peer waits for before it is ready (default: all)."""
        parent, child = self._ctx.Pipe()
        self.conns[index] = parent
        self._child.append(child)
        where = {} if self.net is None else {"namespace": self.net.namespaces[index], "host": self.net.ips[index]}
        size = {} if world is None else {"world": world}
        self.group.start(index, conn=child, spec=spec, config=config, **where, **size)

    def recv(self, index: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.conns[index].poll(0.2):
            if not self.group.processes[index].is_alive():
                raise RuntimeError(f"peer {index} exited (code {self.group.processes[index].exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {index} did not answer within {timeout}s")
        record = self.conns[index].recv()
        if record.get("event") == "crashed":
            raise RuntimeError(f"peer {index} crashed: {record['error']}")
        return record

    def wait_ready(self, indices: list[int] | None = None, timeout: float = 120) -> None:
        for index in self.conns if indices is None else indices:
            record = self.recv(index, timeout)
            if record.get("event") != "ready":
                raise RuntimeError(f"peer {index}: {record}")

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send({"cmd": "close"})
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for proc in self.group.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        self.group.close()
        for conn in [*self.conns.values(), *self._child]:
            conn.close()


def _check(record: dict[str, Any], what: str) -> dict[str, Any]:
    if not record.get("ok"):
        raise RuntimeError(f"{what} failed: {record}")
    return record


def joiner_transfer(
    sources: int,
    mib: int,
    entries: int,
    reps: int,
    fresh: str | None = None,
    fresh_idle: float = 0.0,
    prefault: bool = True,
    fresh_lead: float = 0.0,
    state_prefault: bool = True,
    wan: WanSpec | None = None,
    connections: int | None = None,
    sysctls: dict[str, str] | None = None,
    joiner_buffer: int = 0,
) -> dict[str, Any]:
    """(a), or (a') with `fresh` ("numpy" or "plain", tests/helpers/state_workers.py): the
    joiner's state is newly allocated before each rep; with `fresh_idle`, the old one is
    freed that long before (plus the 1 s the sources get), instead of just before.
    `prefault`: the joiner's Config.prefault. `fresh_lead`: the fresh state is built that
    long before the timed sync (a joiner builds it, then connects and is admitted);
    `state_prefault`: its SharedState(prefault=...). `wan`: sources in hosts 0..sources-1
    of a WAN emulator, the joiner in the next, the master in the last. `connections`:
    every peer's Config.connections_per_peer (None: the default). `sysctls`: set in every
    emulated host (WanNet(sysctls=...)). `joiner_buffer`: the joiner's
    Config.socket_buffer_bytes (0: the default)."""
    total = sum(n * 4 for _, _, n, _ in _spec(mib, entries))
    with contextlib.ExitStack() as stack:
        net: WanNet | None = None
        if wan is not None:
            net = stack.enter_context(WanNet(sources + 2, wan.link, host=wan.host, sysctls=sysctls))
            master_ip = net.ips[-1]
            master = net.call_in(sources + 1, lambda: Master(host=master_ip).start())
        else:
            master = Master().start()
        stack.callback(master.close)
        peers = _Peers(master, world=sources + 1, net=net)
        try:
            common = {} if connections is None else {"connections_per_peer": connections}
            # The sources form the group first; the joiner then joins it, admitted by
            # their update_topology() (as a member's loop admits one), so that it is a
            # join: the members open and warm their pools to it (Engine.prepare).
            for i in range(sources):
                peers.start(i, _spec(mib, entries), config=common, world=sources)
            peers.wait_ready(list(range(sources)))
            for i in range(sources):
                peers.conns[i].send({"cmd": "grow", "world": sources + 1})
            joiner_config = {
                **common,
                **({} if prefault else {"prefault": False}),
                **({"socket_buffer_bytes": joiner_buffer} if joiner_buffer else {}),
            }
            peers.start(sources, _spec(mib, entries, zero=True), config=joiner_config)
            peers.wait_ready([sources])
            for i in range(sources):
                _check(peers.recv(i, 120), "admitting the joiner")
            times, fetch_times, reference = [], [], None
            for rep in range(reps):
                for i in range(sources):
                    peers.conns[i].send({"cmd": "sync", "revision": rep, "timeout": 120})
                time.sleep(1.0)  # the sources have hashed and submitted: time the joiner alone
                again: dict[str, Any] = (
                    {"fresh": fresh, "lead": fresh_lead, "state_prefault": state_prefault} if fresh else {"zero": True}
                )
                before = net.drops() if net is not None else {}
                watch = _Arrivals(net, sources) if net is not None else contextlib.nullcontext()
                with watch:
                    peers.conns[sources].send(
                        {"cmd": "sync", "revision": 0, "strategy": "RECEIVE_ONLY", "timeout": 120, **again}
                    )
                    joiner = _check(peers.recv(sources, 180), "joiner sync")
                served = [_check(peers.recv(i, 180), "source sync") for i in range(sources)]
                if joiner["rx"] < total or joiner["received"] != entries:
                    raise RuntimeError(f"joiner received {joiner['rx']} bytes, {joiner['received']} entries")
                reference = reference or served[0]["hashes"]
                if joiner["hashes"] != reference or any(s["hashes"] != reference for s in served):
                    raise RuntimeError("peers hold different state after the sync")
                if not prefault and joiner["prefaulted"]:
                    raise RuntimeError(
                        "Config(prefault=False) did not reach the joiner's engine: the Communicator must pass "
                        "prefault=cfg.prefault to _native.Engine"
                    )
                if fresh and fresh_idle > 0:
                    peers.conns[sources].send({"cmd": "drop"})
                    _check(peers.recv(sources, 60), "joiner drop")
                    time.sleep(fresh_idle)
                times.append(joiner["elapsed"][0])
                fetch_times.append(joiner["fetch_s"][0])
                tx = [s["tx"] for s in served]
                of_downlink = (
                    f" = {_of_downlink(total, times[-1], wan):.2f} / {_of_downlink(total, fetch_times[-1], wan):.2f} "
                    "of the joiner's downlink"
                    if wan is not None
                    else ""
                )
                if isinstance(watch, _Arrivals):
                    of_downlink += f"; {watch.summary(_downlink_bits(wan) if wan else 0)}"
                if net is not None:  # the rep's own drops (sources' uplinks, the joiner's downlink)
                    after = net.drops()
                    rep_drops = {k: after[k] - before.get(k, 0) for k in ("dropped_up_queue", "dropped_down_queue")}
                    of_downlink += f", drops up/down {rep_drops['dropped_up_queue']}/{rep_drops['dropped_down_queue']}"
                bounded = (
                    "none"
                    if joiner["window"] is None
                    else f"{joiner['window'] / 2**20:.1f} MiB at a {joiner['window_rtt'] * 1e3:.0f} ms round trip"
                )
                print(
                    f"  {'fresh ' if fresh else ''}joiner from {sources} source(s), rep {rep}: "
                    f"sync {times[-1] * 1000:.0f} ms "
                    f"({total / times[-1] / 1e9:.2f} GB/s), transfer+verify {fetch_times[-1] * 1000:.0f} ms "
                    f"({total / fetch_times[-1] / 1e9:.2f} GB/s){of_downlink}, served per source MiB "
                    f"{[t >> 20 for t in tx]}, prefaulted so far {joiner['prefaulted'] >> 20} MiB, "
                    f"connections the joiner opened so far {joiner['opened']}, padding the sources sent so far MiB "
                    f"{[s['padded'] >> 20 for s in served]}, receive windows bounded to {bounded}",
                    flush=True,
                )
            drops = net.drops() if net is not None else None
        finally:
            peers.close()
    sync_s, fetch_s = statistics.median(times), statistics.median(fetch_times)
    over_wan = (
        {
            "wan": str(wan),
            "downlink_bits": _downlink_bits(wan),
            "sync_of_downlink": _of_downlink(total, sync_s, wan),
            "transfer_of_downlink": _of_downlink(total, fetch_s, wan),
            "wan_drops": drops,
        }
        if wan is not None
        else {}
    )
    return {
        "test": "joiner_fresh" if fresh else "joiner",
        "sources": sources,
        "entries": entries,
        "connections_per_peer": connections,
        "host_sysctls": sysctls or None,
        "joiner_socket_buffer_bytes": joiner_buffer or None,
        "sync_s_per_rep": times,
        "transfer_s_per_rep": fetch_times,
        "prefault": prefault,
        "fresh_memory": fresh,
        "fresh_idle_s": fresh_idle if fresh else None,
        "fresh_lead_s": fresh_lead if fresh else None,
        "state_prefault": state_prefault if fresh else None,
        "bytes": total,
        "sync_s": sync_s,
        "sync_gbps": total / sync_s / 1e9,
        "transfer_s": fetch_s,
        "transfer_gbps": total / fetch_s / 1e9,
        "reps": reps,
        **over_wan,
    }


class _Arrivals:
    """While open: the bytes each source (hosts below `joiner`) has delivered into the
    joiner's host, from the emulator's counters every 20 ms: the ramp-up and the stragglers."""

    def __init__(self, net: WanNet, joiner: int, every: float = 0.02) -> None:
        self.net, self.joiner, self.every = net, joiner, every
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)

    def _read(self) -> tuple[list[int], int]:
        """Bytes into the joiner per source, and the joiner's downlink drops so far."""
        stats = self.net.stats()
        into = sorted((e["src"], e["bytes"]) for e in stats["links"] if e["dst"] == self.joiner and e["src"] < self.joiner)
        return [nbytes for _, nbytes in into], stats["hosts"][self.joiner]["dropped_down_queue"]

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.every):
            now, (into, dropped) = time.perf_counter() - t0, self._read()
            self.samples.append((now, into))
            self.drops.append((now, dropped))

    def __enter__(self) -> Self:
        self.base, self.drops_base = self._read()
        self.drops: list[tuple[float, int]] = []
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, downlink_bits: int) -> str:
        """When the bulk began (the first 1 MiB in) and each source ended (its last
        sample's growth), ms from the sync command; the best 200 ms window's rate."""
        if not self.samples:
            return "no samples"
        got = [(t, [b - b0 for b, b0 in zip(v, self.base, strict=True)]) for t, v in self.samples]
        start = next((t for t, v in got if sum(v) >= 1 << 20), got[-1][0])
        ends = []
        for k in range(len(self.base)):
            final = got[-1][1][k]
            ends.append(next(t for t, v in got if v[k] >= final - (64 << 10)))
        window = max(1, round(0.2 / self.every))
        best = max(
            (sum(got[i][1]) - sum(got[i - window][1])) * 8 / (got[i][0] - got[i - window][0])
            for i in range(window, len(got))
        ) if len(got) > window else 0.0
        peak = f"{best / downlink_bits:.2f} of the downlink" if downlink_bits else f"{best / 1e9:.2f} Gbit/s"
        shape = ""
        if downlink_bits:  # per 100 ms from the sync command: tenths of the downlink
            step = max(1, round(0.1 / self.every))
            tenths = [
                min(9, int(10 * (sum(got[i][1]) - sum(got[i - step][1])) * 8 / (got[i][0] - got[i - step][0]) / downlink_bits))
                for i in range(step, len(got), step)
            ]
            shape = ", per 100 ms in tenths " + "".join(str(t) for t in tenths)
            dropped = [d - self.drops_base for _, d in self.drops]
            bins = [dropped[i] - dropped[i - step] for i in range(step, len(dropped), step)]
            if any(bins):  # downlink drops per 100 ms, where there were any: "slot:count"
                shape += ", drops at " + " ".join(f"{k + 1}:{n}" for k, n in enumerate(bins) if n)
        ends_ms = [round(e * 1e3) for e in ends]
        return f"bulk from {start * 1e3:.0f} ms, sources done at {ends_ms} ms, best 200 ms {peak}{shape}"


def _downlink_bits(wan: WanSpec) -> int:
    """What the joiner can receive at: its downlink, else the spec's narrowest rate."""
    return wan.host.down_bits or wan.rate_bits


def _of_downlink(nbytes: int, seconds: float, wan: WanSpec | None) -> float:
    """`nbytes` in `seconds` as a fraction of the joiner's downlink (0 if unlimited)."""
    bits = _downlink_bits(wan) if wan is not None else 0
    return nbytes * 8 / seconds / bits if bits else 0.0


def no_transfer_sync(n_peers: int, mib: int, entries: int, syncs: int) -> dict[str, Any]:
    with Master() as master:
        peers = _Peers(master, world=n_peers)
        try:
            for i in range(n_peers):
                peers.start(i, _spec(mib, entries))
            peers.wait_ready()
            for i in range(n_peers):
                peers.conns[i].send({"cmd": "sync", "revision": 0, "repeat": syncs + 1, "timeout": 120})
            records = [_check(peers.recv(i, 300), "sync") for i in range(n_peers)]
        finally:
            peers.close()
    for r in records:
        if r["rx"] or r["tx"]:
            raise RuntimeError(f"a no-transfer sync moved bytes: {r}")
    rounds = [max(r["elapsed"][k] for r in records) for k in range(1, syncs + 1)]  # warm-up dropped
    per_peer = [r["elapsed"][k] for r in records for k in range(1, syncs + 1)]
    return {
        "test": "no_transfer_sync",
        "peers": n_peers,
        "bytes": sum(n * 4 for _, _, n, _ in _spec(mib, entries)),
        "median_s": statistics.median(rounds),
        "min_s": min(rounds),
        "max_s": max(rounds),
        "median_per_peer_s": statistics.median(per_peer),
        "syncs": syncs,
    }


def hashing_floor(n_peers: int, mib: int, reps: int = 5) -> dict[str, Any]:
    """What (b) cannot go below with every peer on this host: `n_peers` states of `mib`
    MiB hashed at once on every core (threads; the digest releases the GIL), as the
    peers of a no-transfer sync must. Memory bandwidth bounds it, not the digest."""
    buffers = [np.empty(mib << 20, np.uint8) for _ in range(n_peers)]
    for i, b in enumerate(buffers):
        fill(b, i + 1)
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(digest, buffers))  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(digest, buffers))
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    total = sum(b.nbytes for b in buffers)
    return {"test": "hashing_floor", "peers": n_peers, "bytes": total, "threads": threads, "median_s": t, "gbps": total / t / 1e9}


def digest_throughput(mib: int, reps: int = 7) -> dict[str, Any]:
    buffer = np.empty(mib << 20, np.uint8)
    fill(buffer, 7)
    digest(buffer)  # warm-up (page faults)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        digest(buffer)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"test": "digest", "bytes": buffer.nbytes, "median_s": t, "gbps": buffer.nbytes / t / 1e9}


def _wan_arg(text: str) -> WanSpec:
    try:
        return WanSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="state size (MiB)")
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--sources", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--reps", type=int, default=3, help="joiner transfers per source count")
    parser.add_argument("--peers", type=int, default=4, help="peers of the no-transfer sync")
    parser.add_argument("--syncs", type=int, default=9, help="timed no-transfer syncs (after 1 warm-up)")
    parser.add_argument(
        "--only", choices=["joiner", "fresh", "sync", "digest"], nargs="+", default=["joiner", "fresh", "sync", "digest"]
    )
    parser.add_argument(
        "--fresh-memory",
        choices=["numpy", "plain"],
        default="numpy",
        help="fresh joiner: np.zeros (numpy advises huge pages for it) or plain anonymous memory without "
        "that advice, as torch.empty or malloc give (4 KiB pages unless the engine advises otherwise)",
    )
    parser.add_argument(
        "--fresh-idle",
        type=float,
        default=0.0,
        help="fresh joiner: free the state this many seconds (+1) before the next is allocated, instead of "
        "just before. Under a hypervisor with free page reporting (virtio-balloon), memory left free "
        "for ~2 s goes back to the host, and faulting it in again then costs the host's time too",
    )
    parser.add_argument(
        "--no-prefault", action="store_true", help="joiner: Config(prefault=False), receives fault their pages in"
    )
    parser.add_argument(
        "--fresh-lead",
        type=float,
        default=0.0,
        help="fresh joiner: build the new state this many seconds before its timed sync, as a joiner builds "
        "its state, then connects and is admitted (SharedState starts populating its pages at construction)",
    )
    parser.add_argument(
        "--no-state-prefault",
        action="store_true",
        help="fresh joiner: SharedState(prefault=False), no population from construction on",
    )
    parser.add_argument(
        "--wan",
        type=_wan_arg,
        metavar="SPEC",
        help="joiner: sources, joiner and master each in a host of the WAN emulator (root), SPEC as for "
        "pccl bench --wan: per-pair rtt, rate, loss, jitter, queue; per-host up, down, access (both), "
        "access_queue; e.g. rtt=100ms,access=1gbit (docs/wan.md)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        metavar="K",
        help="joiner: every peer's Config.connections_per_peer (default: the Config's, sized from the round trip)",
    )
    parser.add_argument(
        "--host-sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--wan: a net.ipv4 sysctl for every emulated host (repeatable), e.g. "
        "net.ipv4.tcp_slow_start_after_idle=0; default: the machine's",
    )
    parser.add_argument(
        "--joiner-socket-buffer",
        type=int,
        default=0,
        metavar="BYTES",
        help="joiner: Config.socket_buffer_bytes (SO_SNDBUF and SO_RCVBUF of its connections; the kernel "
        "doubles it), which bounds the receive window each source gets; default: the Config's",
    )
    parser.add_argument("--json", help="append one JSON line per result to this file")
    args = parser.parse_args(argv)
    if args.wan is not None:
        from pccl_py.tools.wan import unavailable

        why = unavailable()
        if why is not None:
            parser.error(f"--wan: the WAN emulator {why}")
    results = []
    # The numbers are only as good as the machine is quiet: say how loaded it was.
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if "digest" in args.only:
        r = digest_throughput(args.mib)
        results.append(r)
        print(f"(c) digest xxh3-64 of {args.mib} MiB: {r['median_s'] * 1000:.1f} ms, {r['gbps']:.2f} GB/s", flush=True)
    for label, fresh in (("joiner", None), ("fresh", args.fresh_memory)):
        if label not in args.only:
            continue
        for sources in args.sources:
            r = joiner_transfer(
                sources,
                args.mib,
                args.entries,
                args.reps,
                fresh=fresh,
                fresh_idle=args.fresh_idle,
                prefault=not args.no_prefault,
                fresh_lead=args.fresh_lead,
                state_prefault=not args.no_state_prefault,
                wan=args.wan,
                connections=args.connections,
                sysctls=dict(item.split("=", 1) for item in args.host_sysctl),
                joiner_buffer=args.joiner_socket_buffer,
            )
            results.append(r)
            what = "(a) joiner" + (" (prefault off)" if args.no_prefault else "")
            if fresh:
                idle = f", freed {args.fresh_idle + 1:.0f} s before" if args.fresh_idle > 0 else ""
                off = ", prefault off" if args.no_prefault else ""
                off += ", SharedState(prefault=False)" if args.no_state_prefault else ""
                lead = f", built {args.fresh_lead:g} s before the sync" if args.fresh_lead > 0 else ""
                what = f"(a') fresh joiner (untouched {fresh} pages{idle}{lead}{off})"
            over = ""
            if args.wan is not None:
                over = (
                    f" over {args.wan}: {r['sync_of_downlink']:.2f} / {r['transfer_of_downlink']:.2f} of the "
                    f"joiner's downlink, drops {r['wan_drops']}"
                )
            print(
                f"{what} receives {args.mib} MiB ({args.entries} entries) from {sources} source(s): "
                f"sync {r['sync_s'] * 1000:.0f} ms = {r['sync_gbps']:.2f} GB/s; "
                f"transfer+verify {r['transfer_s'] * 1000:.0f} ms = {r['transfer_gbps']:.2f} GB/s "
                f"(median of {args.reps}){over}",
                flush=True,
            )
    if "sync" in args.only:
        r = hashing_floor(args.peers, args.mib)
        results.append(r)
        print(
            f"(b) floor: {args.peers} x {args.mib} MiB hashed at once on {r['threads']} cores: "
            f"{r['median_s'] * 1000:.1f} ms ({r['gbps']:.1f} GB/s in all)",
            flush=True,
        )
        # The same at 1 MiB: the fixed cost (control round trips), without the hashing.
        for mib in (args.mib, 1):
            r = no_transfer_sync(args.peers, mib, args.entries, args.syncs)
            results.append(r)
            print(
                f"(b) no-transfer sync of {mib} MiB at N={args.peers}: median {r['median_s'] * 1000:.1f} ms per sync "
                f"(min {r['min_s'] * 1000:.1f}, max {r['max_s'] * 1000:.1f}; per-peer call median "
                f"{r['median_per_peer_s'] * 1000:.1f} ms; {args.syncs} syncs)",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f} at end", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
