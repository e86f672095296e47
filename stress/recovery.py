"""Recovery time after a peer failure, measured (not asserted).

N peer processes run back-to-back SUM all-reduces (retry=True) of `--mib` MiB; after
a warm-up, one peer is SIGKILLed (or SIGSTOPped). Recovery time = from the signal to
the moment the last survivor finishes its first all-reduce that succeeded without
the victim (world N-1). Repeated `--trials` times with a fresh group each time.

    python -m stress.recovery --fault kill --trials 7
    python -m stress.recovery --fault stop --trials 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pccl_py import Config, Master
from pccl_py.testing import PeerGroup, allreduce_worker


def one_trial(fault: str, peers: int, mib: int, warmup_ops: int, config: dict[str, float]) -> dict[str, float]:
    elements = mib * (1 << 20) // 4
    with Master(config=Config(**config)) as master, PeerGroup(
        master.address,
        allreduce_worker,
        dict(world=peers, elements=elements, iterations=100000, retry=True, config=config),
    ) as group:
        for i in range(peers):
            group.start(i)
        ready = 0
        while ready < peers:
            if group.records(120).get("event") == "ready":
                ready += 1
        ops = 0
        while ops < warmup_ops * peers:
            record = group.records(60)
            if "op" in record:
                ops += 1
        victim = peers - 1
        t_fault = time.time()
        (group.kill if fault == "kill" else group.stop)(victim)
        recovered: dict[int, float] = {}
        failures = 0
        while len(recovered) < peers - 1:
            record = group.records(60)
            if "op" not in record or record["index"] == victim:
                continue
            if not record["ok"]:
                failures += 1
            elif record["t_end"] > t_fault and record["world"] == peers - 1 and record["index"] not in recovered:
                expected = sum(range(1, peers))  # survivors fill with index + 1
                if record["value"] != expected or not record["uniform"]:
                    raise AssertionError(f"wrong result after recovery: {record}")
                recovered[record["index"]] = record["t_end"] - t_fault
        return {"recovery_s": max(recovered.values()), "raised": failures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=["kill", "stop"], default="kill")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup-ops", type=int, default=5)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--json", help="append one JSON line per trial to this file")
    args = parser.parse_args(argv)
    config = {"heartbeat_interval": min(1.0, args.heartbeat_timeout / 5), "heartbeat_timeout": args.heartbeat_timeout}
    times = []
    for trial in range(args.trials):
        result = one_trial(args.fault, args.peers, args.mib, args.warmup_ops, config)
        times.append(result["recovery_s"])
        print(f"trial {trial}: {args.fault} 1 of {args.peers} peers, {args.mib} MiB all-reduces: "
              f"recovered in {result['recovery_s'] * 1000:.1f} ms ({result['raised']} calls raised)")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"fault": args.fault, "peers": args.peers, "mib": args.mib, **result}) + "\n")
    print(f"median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms over {len(times)} trials")


if __name__ == "__main__":
    main()
