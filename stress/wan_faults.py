"""Network faults behind the WAN emulator (pccl_py.tools.wan), measured as a user sees
them: peers in emulated hosts run the obvious loop, `all_reduce(x, retry=True)` back
to back, while one host is silently partitioned (its packets vanish, its processes
keep running), for good or for a while.

    python -m stress.wan_faults --wan rtt=100ms,rate=1gbit --peers 4 --mib 64 --case partition
    python -m stress.wan_faults --wan rtt=100ms,rate=1gbit --peers 4 --kib 1 --case outage --outage 2.5
    python -m stress.wan_faults --wan rtt=300ms,jitter=20ms,rate=1gbit --peers 4 --case steady --seconds 600

partition: host 0 is cut off mid-op and stays cut off. Printed: for each survivor, how
long after the cut its call returned and how (the bar: the same outcome everywhere, a
successful retry within 3 s), and when and how the cut-off peer's call ended (the bar:
a typed error within 3 s, never its op timeout).
join: --peers - 1 peers run the natural loop (docs/api.md) and one more joins; printed:
how long its connect() took and when its first all-reduce (world --peers) ended, from
the start of connect() (the bar: within 1.5 s for 16 MiB at RTT 100 ms).
outage: host 0 is cut off for --outage seconds, then heals. Printed: for every peer the
longest time between two returns of its calls around the outage, less the usual op
time (the stall; the bar: outage + 1 s at most, 3.5 s for a 2.5 s outage).

The master runs in a host of its own, with the default heartbeats. Needs root (see
`pccl_py.tools.wan.unavailable()`). Nothing is left behind: the peers are stopped and
the hosts removed on every exit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- the peer


def worker(master: str, host: str, world: int, elements: int, seconds: float, mode: str) -> int:
    """One peer: connect, wait for the group of `world` (mode "plain" and "natural"; a
    "joiner" goes straight to its loop), then all-reduce back to back for `seconds`,
    one JSON line per call (wall-clock times: every process of the run shares the
    machine's clock). "natural" and "joiner" run the loop of docs/api.md: admit pending
    peers (`pending_peers()`, `update_topology()`) before each all-reduce."""
    import numpy as np

    import pccl_py as pccl

    comm = pccl.Communicator(master, host=host, name=f"wan-{host}")

    def say(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    try:
        t_connect = time.time()
        comm.connect(timeout=60)
        say({"event": "connected", "t0": t_connect, "t1": time.time()})
        if mode != "joiner":
            pccl.join_group(comm, world, timeout=120)
        say({"event": "ready", "peer": comm.peer_id})
        engine = comm._engine  # the tool reads the engine's connection counters
        assert engine is not None
        x = np.empty(elements, np.float32)
        end = time.time() + seconds
        while time.time() < end:
            x.fill(1.0)
            t0 = time.time()
            try:
                if mode != "plain" and comm.pending_peers() > 0:
                    comm.update_topology()
                info = comm.all_reduce(x, retry=True)
            except pccl.PcclError as exc:
                say({"event": "call", "t0": t0, "t1": time.time(), "ok": False, "error": type(exc).__name__,
                     "msg": str(exc)[:300]})
                if isinstance(exc, pccl.Aborted):
                    return 0  # out of the group (a loop would rejoin here)
                continue
            say({"event": "call", "t0": t0, "t1": time.time(), "ok": True, "world": info.world_size,
                 "attempts": info.attempts, "value": float(x[0]), "epoch": info.epoch,
                 "opened": engine.connections_opened, "kept": engine.connections_kept})
        return 0
    finally:
        comm.close()


# ---------------------------------------------------------------------- the run


class PeerProc:
    """A peer process whose stdout JSON lines are collected (also used by stress.wan_join)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO)
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        self.all: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                with self._lock:
                    self.all.append(record)
                self.records.put(record)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.all)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """The next record of `event`; raises RuntimeError at the deadline, or at once
        when the process has exited (its log names why)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                record = self.records.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.records.empty():
                    raise RuntimeError(f"peer exited ({self.proc.returncode}) before {event!r}: see {self._log.name}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {event!r} from the peer within {timeout:g}s: see {self._log.name}") from None
                continue
            if record.get("event") == event:
                return record

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pccl_py as pccl
    from pccl_py.tools.wan import WanNet, WanSpec, unavailable

    why_not = unavailable()
    if why_not:
        raise SystemExit(f"the WAN emulator is unavailable: {why_not}")
    elements = (args.mib << 20) // 4 if args.mib else max(1, (args.kib << 10) // 4)
    workdir = Path(args.workdir or f"/tmp/pccl-wan-faults-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    spec = WanSpec.parse(args.wan)
    with WanNet(args.peers + 1, spec.link, host=spec.host, cc=args.cc) as net:
        master = net.call_in(args.peers, lambda: pccl.Master(host=net.ips[args.peers], port=0).start())
        procs: list[PeerProc] = []
        try:
            members = args.peers - 1 if args.case == "join" else args.peers
            mode = "natural" if args.case == "join" else "plain"

            def start(i: int, mode: str) -> PeerProc:
                argv = [*net.exec_prefix(i), sys.executable, "-m", "stress.wan_faults", "--worker", master.address,
                        net.ips[i], str(members), str(elements), str(args.seconds), mode]
                return PeerProc(argv, workdir / f"peer{i}.log")

            for i in range(members):
                procs.append(start(i, mode))
            for p in procs:
                p.wait_for("ready", 180)
            for p in procs:  # warm: every peer completed a few calls
                for _ in range(args.warm):
                    p.wait_for("call", 120)
            if args.case == "steady":
                return _steady_report(args, procs)
            if args.case == "join":
                procs.append(start(members, "joiner"))
                joined = procs[-1].wait_for("call", 120)
                time.sleep(args.after)
                return _join_report(args, procs[-1], joined)
            # Cut host 0 off a moment after one of its calls began: mid-op.
            last = procs[0].wait_for("call", 120)
            time.sleep(min(0.3, max(0.0, (last["t1"] - last["t0"]) / 3)))
            t_cut = time.time()
            net.partition(0)
            if args.case == "outage":
                time.sleep(args.outage)
                net.partition(0, on=False)
                t_heal = time.time()
            time.sleep(args.after)
        finally:
            for p in procs:
                p.close()
            master.close()
    return _report(args, procs, t_cut, t_heal if args.case == "outage" else None)


def _steady_report(args: argparse.Namespace, procs: list[PeerProc]) -> dict[str, Any]:
    """No fault: the loop runs for --seconds; a healthy WAN (jitter included) must
    never cost a call, a member (a false eviction), or a stall."""
    t_start = time.time()
    deadline = t_start + args.seconds
    while time.time() < deadline and all(p.proc.poll() is None for p in procs):
        time.sleep(1.0)
    hosts = []
    for i, p in enumerate(procs):
        calls = [r for r in p.all if r.get("event") == "call" and r["t0"] >= t_start]
        times = [r["t1"] - r["t0"] for r in calls]
        hosts.append({
            "host": i,
            "calls": len(calls),
            "failed": [f"{r['error']}: {r['msg'][:120]}" for r in calls if not r["ok"]][:5],
            "smaller_world": sum(1 for r in calls if r["ok"] and r["world"] < args.peers),
            "retried": sum(1 for r in calls if r["ok"] and r["attempts"] > 1),
            "median_call_s": round(statistics.median(times), 3) if times else None,
            "max_call_s": round(max(times), 3) if times else None,
            "exited": p.proc.poll(),
        })
    return {"case": "steady", "wan": args.wan, "peers": args.peers, "bytes": (args.mib << 20) or (args.kib << 10),
            "seconds": round(time.time() - t_start, 1), "hosts": hosts}


def _join_report(args: argparse.Namespace, joiner: PeerProc, first: dict[str, Any]) -> dict[str, Any]:
    connected = next(r for r in joiner.all if r.get("event") == "connected")
    return {
        "case": "join", "wan": args.wan, "peers": args.peers, "bytes": (args.mib << 20) or (args.kib << 10),
        "connect_s": round(connected["t1"] - connected["t0"], 3),
        "first_call_done_s": round(first["t1"] - connected["t0"], 3),
        "first_call": (f"ok, world {first['world']}, {first['attempts']} attempts, value {first['value']}"
                       if first["ok"] else f"{first['error']}: {first['msg'][:120]}"),
    }


def _report(args: argparse.Namespace, procs: list[PeerProc], t_cut: float, t_heal: float | None) -> dict[str, Any]:
    peers = []
    for i, p in enumerate(procs):
        calls = [r for r in p.all if r.get("event") == "call"]
        before = [r for r in calls if r["t1"] < t_cut]
        usual = statistics.median(r["t1"] - r["t0"] for r in before) if before else 0.0
        hit = next((r for r in calls if r["t1"] >= t_cut), None)
        ends = [r["t1"] for r in calls]
        # The stall: the longest time between two returns around the cut, less the usual call.
        around = [t for t in ends if t_cut - 10 <= t <= t_cut + 30]
        gaps = [b - a for a, b in itertools.pairwise(around)]
        if hit is not None and before:
            gaps.append(hit["t1"] - before[-1]["t1"])
        peers.append({
            "host": i,
            "usual_call_s": round(usual, 3),
            "returned_after_cut_s": round(hit["t1"] - t_cut, 3) if hit else None,
            "outcome": (f"ok, world {hit['world']}, {hit['attempts']} attempts, value {hit['value']}"
                        if hit and hit["ok"] else (f"{hit['error']}: {hit['msg'][:120]}" if hit else "no call returned")),
            "stall_s": round(max(gaps) - usual, 3) if gaps else None,
            "calls_ok_after": sum(1 for r in calls if r["t1"] > t_cut and r["ok"]),
            # Connections the call that returned first after the cut opened, and kept
            # from the older epoch (a re-ring keeps idle pools warm), since the call before.
            **({"opened_by_retry": hit["opened"] - before[-1]["opened"], "kept_by_retry": hit["kept"] - before[-1]["kept"]}
               if hit and hit["ok"] and before and "opened" in hit and "opened" in before[-1] else {}),
        })
    out = {"case": args.case, "wan": args.wan, "peers": args.peers, "bytes": (args.mib << 20) or (args.kib << 10),
           "outage_s": args.outage if t_heal else None, "hosts": peers}
    return out


def add_wan_argument(parser: argparse.ArgumentParser) -> None:
    """--wan, as the WAN measurements here (this module and stress.wan_join) take it."""
    parser.add_argument("--wan", default="rtt=100ms,rate=1gbit",
                        help="the emulated WAN (pccl_py.tools.wan.WanSpec): per-pair rtt, rate, loss, jitter, "
                        "queue; per-host up, down, access, access_queue")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--cc, --workdir and --json, as the WAN measurements here take them."""
    parser.add_argument("--cc", default=None, help="congestion control in every host (bbr, cubic, reno)")
    parser.add_argument("--workdir", help="peer logs go here (default: a temp dir)")
    parser.add_argument("--json", help="append the result as one JSON line to this file")


def append_json(path: str | None, result: dict[str, Any]) -> None:
    """--json: the result as one more JSON line of `path` (None: nothing)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        master, host, world, elements, seconds, mode = argv[1:7]
        return worker(master, host, int(world), int(elements), float(seconds), mode)
    parser = argparse.ArgumentParser(prog="python -m stress.wan_faults", description=__doc__.split("\n\n")[0])
    add_wan_argument(parser)
    parser.add_argument("--peers", type=int, default=4)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--mib", type=int, default=0, help="all-reduce size in MiB")
    size.add_argument("--kib", type=int, default=1, help="all-reduce size in KiB (default 1)")
    parser.add_argument("--case", choices=("partition", "outage", "join", "steady"), default="partition",
                        help="steady: no fault for --seconds (false evictions, failed or retried calls)")
    parser.add_argument("--outage", type=float, default=2.5, help="seconds host 0 stays cut off (--case outage)")
    parser.add_argument("--after", type=float, default=8.0, help="seconds measured after the cut (or the heal)")
    parser.add_argument("--warm", type=int, default=2, help="calls every peer completes before the cut")
    parser.add_argument("--seconds", type=float, default=600.0, help="the peers' loop length (they are stopped sooner)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    append_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
