"""Churn stress run: a real master and many peer processes on loopback, random faults
from a seeded schedule, invariants checked from the structured events.

    python -m stress --seconds 600 --seed 1 --summary stress.json --plot stress.png

Exits 1 when any invariant is violated (details in the summary), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType

from pccl_py.tools.wan import WanSpec
from stress.orchestrator import FAULT_KINDS, Scenario, run_scenario


def _wan_spec(text: str) -> WanSpec:
    try:
        return WanSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C: the run's finally blocks stop the peers and the
    # master and delete the emulated hosts (--wan) instead of leaving them behind.
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the run (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--summary", help="write the JSON summary here")
    parser.add_argument("--plot", help="write the PNG timeline here")
    parser.add_argument("--peers", type=int, default=4, help="peers started at once (default 4)")
    parser.add_argument("--max-peers", type=int, default=6)
    parser.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--window", type=float, default=15.0, help="liveness window W in seconds")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"comma-separated fault kinds to inject, of {','.join(FAULT_KINDS)}")
    parser.add_argument("--heartbeat-interval", type=float, default=Scenario.heartbeat_interval,
                        help=f"the master's heartbeat interval (default {Scenario.heartbeat_interval} s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=Scenario.heartbeat_timeout,
                        help=f"the master's heartbeat timeout (default {Scenario.heartbeat_timeout} s; "
                        "pccl's own defaults are 0.25 s / 1.5 s)")
    parser.add_argument("--workdir", help="keep events and logs here (default: a temp dir)")
    parser.add_argument("--wan", type=_wan_spec, metavar="SPEC",
                        help="run behind the WAN emulator (root): every peer and the master in emulated hosts, "
                             "SPEC is KEY=VALUE,... of per-pair keys rtt, rate, loss, jitter, queue and per-host "
                             "access-link keys up, down, access (both), access_queue, e.g. "
                             "rtt=50ms,rate=1gbit,loss=0.001 or rtt=100ms,access=1gbit (docs/wan.md)")
    parser.add_argument("--bug", help=argparse.SUPPRESS)  # test only: a deliberately broken peer
    args = parser.parse_args(argv)
    if args.wan is not None:
        from pccl_py.tools.wan import unavailable

        why = unavailable()
        if why is not None:
            parser.error(f"--wan: the WAN emulator {why}")
    defaults = Scenario().weights
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {sorted(unknown)}")
    weights = {k: (defaults[k] or 1.0) if k in kinds else 0.0 for k in FAULT_KINDS}
    scenario = Scenario(
        seconds=args.seconds, seed=args.seed, peers=args.peers, max_peers=args.max_peers,
        fault_every=args.fault_every, window=args.window, weights=weights, bug=args.bug, wan=args.wan,
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
    )
    summary = run_scenario(scenario, args.workdir)
    if args.plot:
        from stress.orchestrator import load
        from stress.plot import timeline

        records, faults = load(summary["workdir"])
        timeline(records, faults, args.plot, title=f"churn: {args.seconds:.0f} s, seed {args.seed}")
    text = json.dumps(summary, indent=2, default=str)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    brief = {k: summary[k] for k in ("seconds", "faults", "allreduce_ok", "allreduce_failed", "syncs_ok",
                                     "bytes_moved", "violations")}
    print(json.dumps(brief, default=str))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
