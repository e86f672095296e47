"""The churn orchestrator: a real master and many peer processes on loopback, faults
injected at random from a seeded schedule, invariants checked from the events.

Faults: kill (SIGKILL), stall (SIGSTOP, then SIGCONT after a random time, some shorter
and some longer than the heartbeat timeout), leave (SIGTERM: the peer leaves
gracefully), join (a fresh peer process), restart (SIGKILL, then a fresh process in the
same slot), master_restart (SIGKILL the master, start it again at the same address).
Never fewer than `min_alive` peers are left running and unstopped.

With `wan` (a pccl_py.tools.wan.WanSpec; root only), the run happens behind the WAN
emulator: max_peers + 1 emulated hosts, peer slot s in host s % max_peers (a restarted
slot comes back in the same host), the master in the last host, every byte between
them (control plane included) crossing the modelled links.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pccl_py.tools.wan import WanNet, WanSpec
from stress.invariants import Params, check

FAULT_KINDS = ("kill", "stall", "leave", "join", "restart", "master_restart")


@dataclass
class Scenario:
    seconds: float = 60.0
    seed: int = 0
    peers: int = 4  # started at once
    max_peers: int = 6
    min_alive: int = 2
    fault_every: float = 3.0  # mean seconds between faults (exponential)
    warmup: float = 4.0  # no faults before this many seconds
    weights: dict[str, float] = field(
        default_factory=lambda: {"kill": 3, "stall": 2, "leave": 1.5, "join": 2, "restart": 2, "master_restart": 0.7}
    )
    stall_seconds: tuple[float, float] = (0.3, 4.0)
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.5
    op_timeout: float = 30.0
    window: float = 15.0
    bug: str | None = None  # test only: one peer misbehaves (see stress.peer.BUGS)
    step_pause: float = 0.0
    wan: WanSpec | None = None  # run behind the WAN emulator (see the module docstring)


@dataclass
class Proc:
    slot: int
    popen: subprocess.Popen[bytes]
    started: float
    stopped: bool = False
    leaving: bool = False
    reaped: bool = False  # its exit was seen (and judged) during the run

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orchestrator:
    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        self.dir = workdir
        self.events_dir = workdir / "events"
        self.events_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.master: subprocess.Popen[bytes] | None = None
        self.procs: list[Proc] = []  # every peer process ever started
        self.faults: list[dict[str, Any]] = []
        self.next_slot = 0
        self.bug_given = False
        self.problems: list[dict[str, Any]] = []  # hygiene and harness-level violations
        self.net: WanNet | None = None  # scenario.wan: the emulated hosts

    @property
    def master_host(self) -> str:
        return self.net.ips[-1] if self.net is not None else "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.master_host}:{self.port}"

    def _in_host(self, slot: int | None) -> tuple[list[str], str]:
        """(argv prefix, listen address) of peer `slot`, or of the master (None)."""
        if self.net is None:
            return [], "127.0.0.1"
        host = self.net.hosts - 1 if slot is None else slot % (self.net.hosts - 1)
        return self.net.exec_prefix(host), self.net.ips[host]

    def _master_listening(self) -> bool:
        if self.net is None:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        probe = self.net.call_in(self.net.hosts - 1, socket.socket)
        with probe:
            return probe.connect_ex((self.master_host, self.port)) == 0

    # ------------------------------------------------------------------ processes

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start_master(self) -> None:
        log = open(self.dir / "master.log", "ab")  # noqa: SIM115 - owned by the child
        prefix, host = self._in_host(None)
        cmd = [
            *prefix, sys.executable, "-m", "pccl_py.cli.main", "master", "--host", host, "--port", str(self.port),
            "--heartbeat-interval", str(self.sc.heartbeat_interval),
            "--heartbeat-timeout", str(self.sc.heartbeat_timeout),
            "--event-log", str(self.events_dir / "master.jsonl"),
        ]
        self.master = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                raise RuntimeError(f"the master exited at start (see {self.dir / 'master.log'})")
            if self._master_listening():
                return
            time.sleep(0.05)
        raise RuntimeError("the master did not start listening")

    def start_peer(self, slot: int | None = None) -> Proc:
        if slot is None:
            slot = self.next_slot
            self.next_slot += 1
        prefix, host = self._in_host(slot)
        cmd = [
            *prefix, sys.executable, "-m", "stress.peer", "--master", self.address, "--index", str(slot),
            "--host", host,
            "--events", str(self.events_dir / f"peer-{slot}.jsonl"),
            "--heartbeat-interval", str(self.sc.heartbeat_interval),
            "--heartbeat-timeout", str(self.sc.heartbeat_timeout),
            "--op-timeout", str(self.sc.op_timeout),
            "--step-pause", str(self.sc.step_pause),
        ]
        if self.sc.bug and not self.bug_given:
            cmd += ["--bug", self.sc.bug]
            self.bug_given = True
        log = open(self.dir / f"peer-{slot}.log", "ab")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()
        proc = Proc(slot, popen, time.time())
        self.procs.append(proc)
        return proc

    def live(self) -> list[Proc]:
        """Running, not stopped, not asked to leave."""
        return [p for p in self.procs if p.running() and not p.stopped and not p.leaving]

    def record(self, kind: str, **fields: Any) -> None:
        self.faults.append({"ts": time.time(), "kind": kind, **fields})

    # ------------------------------------------------------------------ faults

    def pick_fault(self) -> str | None:
        live = self.live()
        running = [p for p in self.procs if p.running() and not p.leaving]
        kinds, weights = [], []
        for kind, weight in self.sc.weights.items():
            if weight <= 0:
                continue
            if kind in ("kill", "stall", "leave", "restart") and len(live) <= self.sc.min_alive:
                continue
            if kind == "join" and len(running) >= self.sc.max_peers:
                continue
            if kind == "master_restart" and self._master_due is not None:
                continue
            kinds.append(kind)
            weights.append(weight)
        if not kinds:
            return None
        return self.rng.choices(kinds, weights)[0]

    def inject(self, kind: str) -> None:
        live = self.live()
        victim = self.rng.choice(live) if live else None
        if kind == "kill" and victim:
            victim.popen.send_signal(signal.SIGKILL)
            self.record("kill", pid=victim.pid, slot=victim.slot)
        elif kind == "restart" and victim:
            victim.popen.send_signal(signal.SIGKILL)
            self.record("restart", pid=victim.pid, slot=victim.slot)
            victim.popen.wait()
            fresh = self.start_peer(victim.slot)
            self.record("start", pid=fresh.pid, slot=fresh.slot)
        elif kind == "stall" and victim:
            lo, hi = self.sc.stall_seconds
            seconds = self.rng.uniform(lo, hi)
            victim.popen.send_signal(signal.SIGSTOP)
            victim.stopped = True
            self.record("stall", pid=victim.pid, slot=victim.slot, seconds=seconds)
            self._pending_resumes.append((time.time() + seconds, victim))
        elif kind == "leave" and victim:
            victim.popen.send_signal(signal.SIGTERM)
            victim.leaving = True
            self.record("leave", pid=victim.pid, slot=victim.slot)
        elif kind == "join":
            fresh = self.start_peer()
            self.record("join", pid=fresh.pid, slot=fresh.slot)
        elif kind == "master_restart":
            assert self.master is not None
            self.master.send_signal(signal.SIGKILL)
            self.master.wait()
            self.record("master_kill", pid=self.master.pid)
            self._master_due = time.time() + self.rng.uniform(0.5, 3.0)

    def _resume_due(self, now: float) -> None:
        due = [(t, p) for t, p in self._pending_resumes if t <= now]
        self._pending_resumes = [(t, p) for t, p in self._pending_resumes if t > now]
        for _, proc in due:
            if proc.running():
                proc.popen.send_signal(signal.SIGCONT)
            proc.stopped = False

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        self._pending_resumes: list[tuple[float, Proc]] = []
        self._master_due: float | None = None
        t_start = time.time()
        if self.sc.wan is not None:
            self.net = WanNet(self.sc.max_peers + 1, self.sc.wan.link, host=self.sc.wan.host, seed=self.sc.seed)
            try:
                self.net.up()
            except BaseException:
                self.net.close()
                raise
        try:
            return self._run(t_start)
        finally:
            if self.net is not None:
                self.net.close()

    def _run(self, t_start: float) -> dict[str, Any]:
        self.start_master()
        self.record("master_start", pid=self.master.pid if self.master else -1)
        for _ in range(self.sc.peers):
            proc = self.start_peer()
            self.record("start", pid=proc.pid, slot=proc.slot)
        end = t_start + self.sc.seconds
        next_fault = t_start + self.sc.warmup + self.rng.expovariate(1.0 / self.sc.fault_every)
        try:
            while True:
                now = time.time()
                if now >= end:
                    break
                self._resume_due(now)
                if self._master_due is not None and now >= self._master_due:
                    self._master_due = None
                    self.start_master()
                    self.record("master_start", pid=self.master.pid if self.master else -1)
                self._reap_and_replace()
                if now >= next_fault:
                    kind = self.pick_fault()
                    if kind is not None:
                        self.inject(kind)
                    next_fault = now + self.rng.expovariate(1.0 / self.sc.fault_every)
                time.sleep(0.05)
        finally:
            self.shutdown()
        return self.summarize(t_start)

    def _reap_and_replace(self) -> None:
        """Peers that exited by themselves (not by our faults) are a harness problem; the
        group is kept at >= min_alive by starting fresh peers when too few are running."""
        for proc in self.procs:
            code = proc.popen.poll()
            if code is not None and not proc.reaped:
                proc.reaped = True
                expected = code == -signal.SIGKILL or (proc.leaving and code in (0, -signal.SIGTERM))
                if not expected:
                    self.problems.append({"invariant": "peer_exit", "pid": proc.pid, "slot": proc.slot, "code": code,
                                          "log": str(self.dir / f"peer-{proc.slot}.log")})
        running = [p for p in self.procs if p.running() and not p.leaving]
        while len(running) < self.sc.min_alive:
            fresh = self.start_peer()
            self.record("join", pid=fresh.pid, slot=fresh.slot, reason="keep min_alive")
            running.append(fresh)

    def shutdown(self) -> None:
        if self._master_due is not None:  # the peers need a master to leave through
            self._master_due = None
            self.start_master()
            self.record("master_start", pid=self.master.pid if self.master else -1)
        self.record("run_end")
        for _, proc in self._pending_resumes:
            if proc.running():
                proc.popen.send_signal(signal.SIGCONT)
            proc.stopped = False
        self._pending_resumes = []
        for proc in self.procs:
            if proc.running():
                proc.leaving = True
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.sc.op_timeout + 10
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.problems.append({"invariant": "liveness", "detail": "peer did not leave at the end",
                                      "pid": proc.pid, "slot": proc.slot})
                proc.popen.kill()
                proc.popen.wait()
            else:
                # SIGTERM before its handler is installed (a peer still starting) is a leave too.
                if proc.popen.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM) and not proc.reaped:
                    self.problems.append({"invariant": "peer_exit", "pid": proc.pid, "slot": proc.slot,
                                          "code": proc.popen.returncode})
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(10)
            except subprocess.TimeoutExpired:
                self.problems.append({"invariant": "hygiene", "detail": "master did not exit on SIGTERM"})
                self.master.kill()
                self.master.wait()
        self._check_hygiene()

    def _check_hygiene(self) -> None:
        pids = [p.pid for p in self.procs] + ([self.master.pid] if self.master else [])
        for pid in pids:
            if Path(f"/proc/{pid}").exists():
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().split()[2]
                except OSError:
                    continue
                if state != "Z":
                    self.problems.append({"invariant": "hygiene", "detail": "process left behind", "pid": pid})
        ports = {self.port} | self._peer_ports()
        listening = _listening_ports()
        for port in sorted(ports & listening):
            self.problems.append({"invariant": "hygiene", "detail": "port still listening", "port": port})

    def _peer_ports(self) -> set[int]:
        ports = set()
        for r in self._records():
            if r.get("event") == "join" and "port" in r:
                ports.add(int(r["port"]))
        return ports

    def _records(self) -> list[dict[str, Any]]:
        return read_records(self.events_dir)

    # ------------------------------------------------------------------ summary

    def summarize(self, t_start: float) -> dict[str, Any]:
        records = self._records()
        with open(self.dir / "faults.json", "w", encoding="utf-8") as f:
            json.dump(self.faults, f)
        params = Params(op_timeout=self.sc.op_timeout, window=self.sc.window)
        violations, counts = check(records, self.faults, params)
        violations = self.problems + violations
        faults: dict[str, int] = {k: 0 for k in FAULT_KINDS}
        for f in self.faults:
            if f["kind"] in faults:
                faults[f["kind"]] += 1
            elif f["kind"] == "master_kill":
                faults["master_restart"] += 1
        # Time from each master restart (listening again) to the next all-reduce that
        # succeeded (its verdict came from the new master).
        oks = sorted(r["ts"] for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and r["ok"])
        recoveries = []
        for f in self.faults:
            if f["kind"] == "master_start" and any(g["kind"] == "master_kill" and g["ts"] < f["ts"] for g in self.faults):
                after = [t for t in oks if t > f["ts"]]
                if after:
                    recoveries.append(round(after[0] - f["ts"], 3))
        return {
            "scenario": {k: str(v) if k == "wan" and v is not None else v for k, v in vars(self.sc).items()},
            "wan_drops": self.net.drops() if self.net is not None else None,
            "master_restart_to_next_allreduce_s": recoveries,
            "seconds": round(time.time() - t_start, 1),
            "faults": faults,
            "joins": faults["join"] + faults["restart"],
            "leaves": faults["leave"],
            "processes": len(self.procs),
            **counts,
            "violations": len(violations),
            "violation_details": violations[:200],
            "workdir": str(self.dir),
        }


def _listening_ports() -> set[int]:
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def read_records(events_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(events_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a process killed mid-write leaves a partial last line
    records.sort(key=lambda r: r.get("ts", 0.0))
    return records


def load(workdir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records and the fault log of a finished run's work directory."""
    path = Path(workdir)
    with open(path / "faults.json", encoding="utf-8") as f:
        faults = json.load(f)
    return read_records(path / "events"), faults


def run_scenario(scenario: Scenario, workdir: str | None = None) -> dict[str, Any]:
    path = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pccl-stress-"))
    path.mkdir(parents=True, exist_ok=True)
    return Orchestrator(scenario, path).run()
