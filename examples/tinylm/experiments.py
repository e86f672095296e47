"""DiLoCo experiments on the tiny LM, each a local master plus peer processes on CPU.

    python -m examples.tinylm.experiments quality   # DiLoCo (H=50) vs per-step data-parallel
    python -m examples.tinylm.experiments churn     # a kill and a join vs the same run without
    python -m examples.tinylm.experiments async     # AsyncDiLoCo vs DiLoCo over a slow link
    python -m examples.tinylm.experiments compression --json out/compression.json
                                                    # fp32 / uint8 / sparse / streaming outer steps

Every subcommand prints a table and ends with one JSON line (prefix "RESULT ") that
holds its numbers; `--plot` saves a figure (default docs/diloco_<experiment>.png),
`--records DIR` keeps every run's records. --sync-every, --outer-steps, --lr, --batch,
... set examples.tinylm.train.TrainConfig; --outer-lr/--outer-momentum replace the
outer optimizer (see tuned_worker). Peers run one torch thread each; on a 2-core
machine `quality` takes about 15 minutes, `churn` 4, `async` 7 (docs/diloco.md).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `examples.tinylm` importable (here and in the peers)
    sys.path.insert(0, str(ROOT))

import itertools

from examples.tinylm.train import TrainConfig, worker
from pccl_py import Master
from pccl_py.testing import PeerGroup

Record = dict[str, Any]


# --------------------------------------------------------------------------- outer optimizer


def tuned_worker(
    master: str,
    index: int,
    out: Any,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    **overrides: Any,
) -> None:
    """train.worker with another outer optimizer: SGD(lr=outer_lr, momentum=outer_momentum,
    Nesterov when momentum > 0) instead of DiLoCo's default SGD(0.7, 0.9, Nesterov).
    train.py builds DiLoCo itself, so its classes are swapped for ones that pass the
    outer-optimizer factory."""
    import torch

    from examples.tinylm import train as train_mod

    def make_outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)

    def tuned(base: type) -> type:
        class Tuned(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.setdefault("outer_optimizer", make_outer)
                super().__init__(*args, **kwargs)

        Tuned.__name__ = f"Tuned{base.__name__}"
        return Tuned

    train_mod.DiLoCo = tuned(train_mod.DiLoCo)  # type: ignore[misc]
    train_mod.AsyncDiLoCo = tuned(train_mod.AsyncDiLoCo)  # type: ignore[misc]
    train_mod.StreamingDiLoCo = tuned(train_mod.StreamingDiLoCo)  # type: ignore[misc]
    worker(master, index, out, **overrides)


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    """The records of one training run plus what the driver did to it."""

    label: str
    cfg: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)  # (outer step, what happened)
    wall_s: float = 0.0
    killed: set[int] = field(default_factory=set)

    def outer(self, index: int | None = None) -> list[Record]:
        return [r for r in self.records if r["event"] == "outer" and (index is None or r["index"] == index)]

    def by_step(self) -> dict[int, list[Record]]:
        steps: dict[int, list[Record]] = defaultdict(list)
        for r in self.outer():
            steps[r["outer"]].append(r)
        return dict(sorted(steps.items()))

    def curve(self) -> tuple[list[int], list[float]]:
        """Validation loss after each outer step (every peer evaluates the same
        parameters, so any one's value is the group's) against inner steps per peer."""
        xs, ys = [], []
        for recs in self.by_step().values():
            first = min(recs, key=lambda r: r["index"])
            xs.append(first["inner_steps"])
            ys.append(first["val"])
        return xs, ys

    def final_val(self) -> float:
        done = [r["val"] for r in self.records if r["event"] == "done"]
        return statistics.fmean(done)

    def final_val_spread(self) -> float:
        done = [r["val"] for r in self.records if r["event"] == "done"]
        return max(done) - min(done)

    def allreduces(self) -> int:
        return max(r["allreduces"] for r in self.outer())

    def inner_steps(self) -> int:
        return max(r["inner_steps"] for r in self.outer())

    def tx_bytes(self) -> int:
        """Bytes sent by one peer over the run (sum of its outer steps' all-reduces)."""
        per_peer: dict[int, int] = defaultdict(int)
        for r in self.outer():
            per_peer[r["index"]] += r.get("tx", 0)
        return max(per_peer.values()) if per_peer else 0

    def hash_mismatches(self) -> list[int]:
        """Outer steps at which the peers' shared-state hashes differ."""
        return [s for s, recs in self.by_step().items() if len({r.get("hash") for r in recs}) > 1]

    def round_times(self, skip: int = 1) -> dict[str, list[float]]:
        """Per peer and round: the time between consecutive outer records ("round": inner
        steps + outer step + evaluation) and that time less the outer step ("compute")."""
        out: dict[str, list[float]] = {"round": [], "compute": [], "outer": []}
        for index in {r["index"] for r in self.outer()}:
            recs = self.outer(index)
            for prev, cur in list(itertools.pairwise(recs))[skip:]:
                dt = cur["t"] - prev["t"]
                out["round"].append(dt)
                out["compute"].append(dt - cur["round_s"])
                out["outer"].append(cur["round_s"])
        return out


def run_group(
    label: str,
    workers: int = 4,
    *,
    kill: tuple[int, int] | None = None,
    join: tuple[int, int] | None = None,
    timeout: float = 3600.0,
    verbose: bool = True,
    **cfg: Any,
) -> Run:
    """Trains with `workers` peers (indices 0..workers-1) against an in-process master.
    kill=(index, s): SIGKILL that peer once it has reported outer step s (shortly into
    its next inner phase, never while it writes to the result queue). join=(index, s):
    start a new peer with that index (joining=True) once the group reached step s."""
    cfg = {**cfg, "world": workers}
    run = Run(label, dict(cfg))
    start = time.monotonic()
    target = tuned_worker if ("outer_lr" in cfg or "outer_momentum" in cfg) else worker
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with Master() as master, PeerGroup(master.address, target, cfg) as group:
        for i in range(workers):
            group.start(i)
        live = set(range(workers))
        done: set[int] = set()
        kill_due: float | None = None
        joined = False
        top = 0
        victim, kill_after = kill if kill else (-1, 0)
        newcomer, join_after = join if join else (-1, 0)
        admitted: set[int] = set()
        while live - done:
            if joined and live - done == {newcomer} and newcomer not in admitted:
                # The others finished before the joiner was admitted (a run shorter than a
                # peer's start-up): it would start a group of its own. Stop it.
                _say(verbose, f"[{label}] peer {newcomer} was not admitted before the others finished")
                break
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{label}: not done after {timeout}s")
            try:
                r = group.records(1.0)
            except queue.Empty:
                r = None
            now = time.monotonic()
            if kill_due is not None and now >= kill_due:
                group.kill(victim)
                live.discard(victim)
                run.killed.add(victim)
                run.events.append((top, f"kill {victim}"))
                _say(verbose, f"[{label}] SIGKILL peer {victim} after outer step {top}")
                kill_due = None
            for i in live - done:
                proc = group.processes[i]
                if not proc.is_alive() and proc.exitcode not in (0, None):
                    raise RuntimeError(f"{label}: peer {i} exited with {proc.exitcode}")
            if r is None:
                continue
            r["wall"] = now - start
            run.records.append(r)
            ev = r["event"]
            if ev == "joined":
                admitted.add(r["index"])
            elif ev == "done":
                done.add(r["index"])
            elif ev == "synced" and r["index"] not in range(workers):
                run.events.append((r["outer"], f"{r['index']} synced"))
                _say(
                    verbose,
                    f"[{label}] peer {r['index']} joined and synced at outer step {r['outer']} ({r['rx']} B)",
                )
            elif ev == "outer":
                if r["outer"] > top:
                    top = r["outer"]
                    _say(
                        verbose,
                        f"[{label}] outer {top:3d}/{cfg.get('outer_steps')}  world {r['world']}  "
                        f"val {r['val']:.4f}  t {r['t']:6.1f}s  wall {now - start:6.1f}s",
                    )
                if r["index"] == victim and r["outer"] >= kill_after and victim in live and kill_due is None:
                    kill_due = now + 1.0
                if join and not joined and top >= join_after:
                    group.start(newcomer, joining=True, world=1)
                    live.add(newcomer)
                    joined = True
                    run.events.append((top, f"{newcomer} starts"))
                    _say(verbose, f"[{label}] starting peer {newcomer} (joining) after outer step {top}")
    run.wall_s = time.monotonic() - start
    return run


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h == header[0] else "right")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=120).print(table)


def _result(payload: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- quality


def quality(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {"sync_every": 50, "outer_steps": 16, **cfg}
    diloco = run_group("diloco", args.workers, mode="diloco", **cfg)
    ddp = run_group("ddp", args.workers, mode="ddp", **cfg)
    _dump(args, diloco, ddp)
    d, b = diloco.final_val(), ddp.final_val()
    gap = (d - b) / b
    rows = [
        [
            f"DiLoCo (H={cfg['sync_every']})",
            diloco.inner_steps(),
            diloco.allreduces(),
            d,
            f"{diloco.wall_s:.0f}",
        ],
        ["per-step AVG (ddp)", ddp.inner_steps(), ddp.allreduces(), b, f"{ddp.wall_s:.0f}"],
    ]
    _table(
        f"{args.workers} peers, same samples: final validation loss (relative gap {100 * gap:+.2f}%)",
        ["run", "inner steps/peer", "all-reduces", "final val loss", "wall s"],
        rows,
    )
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, name in ((ddp, "per-step gradient AVG (ddp)"), (diloco, f"DiLoCo, H={cfg['sync_every']}")):
        xs, ys = run.curve()
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            label=f"{name}: final {run.final_val():.4f}, {run.allreduces()} all-reduces",
        )
    ax.set_xlabel("inner steps per peer")
    ax.set_ylabel("validation loss")
    ax.set_title(f"tiny LM, {args.workers} peers, same samples (gap {100 * gap:+.2f}%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, args.plot or "docs/diloco_quality.png")
    result = {
        "experiment": "quality",
        "workers": args.workers,
        "cfg": cfg,
        "diloco_final_val": d,
        "ddp_final_val": b,
        "relative_gap": gap,
        "within_3pct": abs(gap) <= 0.03 if args.two_sided else gap <= 0.03,
        "diloco_allreduces": diloco.allreduces(),
        "ddp_allreduces": ddp.allreduces(),
        "diloco_curve": diloco.curve(),
        "ddp_curve": ddp.curve(),
        "wall_s": {"diloco": round(diloco.wall_s, 1), "ddp": round(ddp.wall_s, 1)},
    }
    _result(result)
    return result


# --------------------------------------------------------------------------- churn


def churn(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {"sync_every": 25, "outer_steps": 15, **cfg}
    n = cfg["outer_steps"]
    kill_at, join_at = args.kill_at or max(1, n // 3), args.join_at or max(2, n // 3 + 1)
    new = args.workers
    churned = run_group(
        "churn", args.workers, mode="diloco", kill=(args.workers - 1, kill_at), join=(new, join_at), **cfg
    )
    steady = run_group("steady", args.workers, mode="diloco", **cfg) if not args.skip_baseline else None

    _dump(args, churned, steady)
    # The joiner's hashes against the others' at every outer step it reported.
    synced = next((r for r in churned.records if r["event"] == "synced" and r["index"] == new), None)
    if synced is None:
        raise SystemExit(
            f"peer {new} was never admitted: make the run longer (--outer-steps) or join earlier"
        )
    compared, equal = 0, 0
    by_step = churned.by_step()
    for recs in by_step.values():
        mine = [r["hash"] for r in recs if r["index"] == new]
        theirs = {r["hash"] for r in recs if r["index"] != new}
        if mine:
            compared += 1
            equal += int(len(theirs) == 1 and mine[0] in theirs)
    joiner_steps = sorted(s for s, recs in by_step.items() if any(r["index"] == new for r in recs))
    worlds = {s: sorted({r["world"] for r in recs}) for s, recs in by_step.items()}
    c = churned.final_val()
    base = steady.final_val() if steady else float("nan")
    rel = (c - base) / base if steady else float("nan")
    rows = [
        [
            "with churn",
            f"kill {args.workers - 1} @{kill_at}, join {new}",
            c,
            churned.allreduces(),
            len(churned.hash_mismatches()),
        ],
    ]
    if steady:
        rows.append(["without churn", "-", base, steady.allreduces(), len(steady.hash_mismatches())])
    _table(
        f"DiLoCo with churn vs without (relative difference {100 * rel:+.2f}%)",
        ["run", "churn", "final val loss", "all-reduces", "steps with differing hashes"],
        rows,
    )
    print(
        f"joiner {new}: synced at outer step {synced['outer']} ({synced['rx']} B received); "
        f"its hash equals the others' at {equal}/{compared} outer steps "
        f"(steps {joiner_steps[0]}..{joiner_steps[-1]})"
        if joiner_steps
        else f"joiner {new} synced at {synced['outer']} but reported no outer step"
    )
    print("world size per outer step:", " ".join(f"{s}:{'/'.join(map(str, w))}" for s, w in worlds.items()))

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if steady:
        xs, ys = steady.curve()
        ax.plot(xs, ys, marker="o", ms=3, label=f"no churn: final {base:.4f}")
    xs, ys = churned.curve()
    ax.plot(xs, ys, marker="o", ms=3, label=f"kill + join: final {c:.4f}")
    h = cfg["sync_every"]
    ax.axvline(kill_at * h, color="tab:red", ls="--", lw=1)
    ax.text(kill_at * h, max(ys), f" SIGKILL peer {args.workers - 1}", color="tab:red", va="top", fontsize=8)
    ax.axvline(synced["outer"] * h, color="tab:green", ls="--", lw=1)
    ax.text(
        synced["outer"] * h, max(ys) * 0.93, f" peer {new} joins", color="tab:green", va="top", fontsize=8
    )
    ax.set_xlabel("inner steps per peer")
    ax.set_ylabel("validation loss")
    ax.set_title(f"DiLoCo (H={h}) with a kill and a join ({100 * rel:+.2f}% vs no churn)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, args.plot or "docs/diloco_churn.png")
    result = {
        "experiment": "churn",
        "cfg": cfg,
        "kill": [args.workers - 1, kill_at],
        "join": [new, join_at],
        "joiner_synced_at": synced["outer"],
        "joiner_sync_rx_bytes": synced["rx"],
        "joiner_hash_equal_steps": equal,
        "joiner_compared_steps": compared,
        "hash_mismatch_steps": churned.hash_mismatches(),
        "worlds": worlds,
        "churn_final_val": c,
        "steady_final_val": base,
        "relative_diff": rel,
        "within_5pct": bool(abs(rel) <= 0.05) if steady else None,
        "outer_steps_reached": max(by_step),
        "wall_s": {"churn": round(churned.wall_s, 1), "steady": round(steady.wall_s, 1) if steady else None},
    }
    _result(result)
    return result


# --------------------------------------------------------------------------- async


def async_(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {"sync_every": 25, "outer_steps": 10, **cfg}
    delay = 0.0 if args.loss_only else args.comm_delay
    n = cfg["outer_steps"]
    # --loss-only: no delay and no no-delay run, only the loss cost of AsyncDiLoCo's lag.
    # Without apply_on_arrival the delay changes no number the peers compute; with it
    # (the default) the delay decides at which inner step the average lands, which the
    # records keep ("arrived_at"), so the loss cost grows with the delay: measure both.
    base = None if args.loss_only else run_group("compute", args.workers, mode="diloco", **cfg)
    sync = run_group("sync", args.workers, mode="diloco", comm_delay=delay, **cfg)
    # AsyncDiLoCo applies each update one round late: with outer_steps=n-1 it runs n
    # rounds (n*H inner steps) and applies n updates (the last in finish()), the same
    # samples and number of updates as the synchronous run.
    asy = run_group("async", args.workers, mode="async", comm_delay=delay, **{**cfg, "outer_steps": n - 1})
    _dump(args, base, sync, asy)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    # "Pure compute" (inner steps + evaluation, no communication) is measured two ways:
    # the time a run's peers spend outside the outer step, in that same run (immune to
    # load on a shared machine changing between runs), and the fastest round of the run
    # without delay (compared with each run's fastest round).
    runs = {k: r for k, r in (("base", base), ("sync", sync), ("async", asy)) if r is not None}
    times = {k: r.round_times() for k, r in runs.items()}
    m = {
        k: {q: med(v[q]) for q in ("round", "compute", "outer")} | {"min_round": min(v["round"])}
        for k, v in times.items()
    }
    names = {
        "base": "DiLoCo, no delay",
        "sync": f"DiLoCo, +{delay}s per all-reduce",
        "async": f"AsyncDiLoCo, +{delay}s per all-reduce",
    }
    floor = m["base"]["min_round"] if "base" in m else None

    def vs_floor(x: float) -> str | float | None:
        return "-" if floor is None else f"{100 * (x / floor - 1):+.1f}%"

    _table(
        f"{args.workers} peers, H={cfg['sync_every']}, outer SGD lr {cfg.get('outer_lr', 0.7)} momentum "
        f"{cfg.get('outer_momentum', 0.9)}: seconds per outer round (median over peers x rounds 2..)",
        [
            "run",
            "s/round",
            "compute s",
            "outer step s",
            "round vs compute",
            "fastest round",
            "vs no-delay fastest",
            "final val loss",
        ],
        [
            [
                names[k],
                m[k]["round"],
                m[k]["compute"],
                m[k]["outer"],
                f"{100 * (m[k]['round'] / m[k]['compute'] - 1):+.1f}%",
                m[k]["min_round"],
                vs_floor(m[k]["min_round"]),
                run.final_val(),
            ]
            for k, run in runs.items()
        ],
    )
    loss_cost = (asy.final_val() - sync.final_val()) / sync.final_val()
    # When each round's average reached AsyncDiLoCo's peers (inner steps into the next
    # round; H: at its end), over peers and rounds 2..
    arrivals = [r["arrived_at"] for r in asy.outer() if r.get("arrived_at") is not None and r["outer"] > 0]
    arrived = statistics.median(arrivals) if arrivals else None
    print(
        f"loss cost of the one-round delay: async {asy.final_val():.4f} vs sync {sync.final_val():.4f} "
        f"({100 * loss_cost:+.2f}%); averages applied after a median of {arrived} of {cfg['sync_every']} "
        "inner steps"
    )
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for run, name in ((sync, "DiLoCo"), (asy, "AsyncDiLoCo")):
        recs = run.outer(0)
        label = f"{name}: final {run.final_val():.4f}"
        left.plot([r["inner_steps"] for r in recs], [r["val"] for r in recs], marker="o", ms=3, label=label)
        right.plot([r["t"] for r in recs], [r["val"] for r in recs], marker="o", ms=3, label=label)
    left.set_xlabel("inner steps per peer")
    left.set_ylabel("validation loss")
    right.set_xlabel(f"seconds since training start (peer 0), +{delay}s per all-reduce")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{args.workers} peers, H={cfg['sync_every']}, outer SGD lr {cfg.get('outer_lr', 0.7)}, "
        f"momentum {cfg.get('outer_momentum', 0.9)}"
    )
    fig.tight_layout()
    _save(fig, args.plot or "docs/diloco_async.png")
    result = {
        "experiment": "async",
        "cfg": cfg,
        "comm_delay": delay,
        "seconds": m,
        "async_round_vs_compute": m["async"]["round"] / m["async"]["compute"] - 1,
        "sync_round_vs_compute": m["sync"]["round"] / m["sync"]["compute"] - 1,
        "async_fastest_vs_no_delay_fastest": m["async"]["min_round"] / floor - 1 if floor else None,
        "sync_fastest_vs_no_delay_fastest": m["sync"]["min_round"] / floor - 1 if floor else None,
        "async_within_10pct": m["async"]["round"] <= 1.10 * m["async"]["compute"],
        "sync_pays_delay": m["sync"]["outer"] >= delay if delay else None,
        "sync_final_val": sync.final_val(),
        "async_final_val": asy.final_val(),
        "no_delay_final_val": base.final_val() if base else None,
        "async_loss_cost": loss_cost,
        "async_arrived_at_median": arrived,
        "inner_steps": {"sync": sync.inner_steps(), "async": asy.inner_steps()},
        "wall_s": {k: round(r.wall_s, 1) for k, r in runs.items()},
    }
    _result(result)
    return result


def _dump(args: argparse.Namespace, *runs: Run | None) -> None:
    """--records DIR: every run's records as JSON lines, DIR/<experiment>-<label>.jsonl."""
    if not args.records:
        return
    Path(args.records).mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run is not None:
            with open(Path(args.records) / f"{args.experiment}-{run.label}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in run.records)


def _save(fig: Any, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=["quality", "churn", "async", "compression"])
    parser.add_argument("--json", default=None, help="also write the RESULT object to this file")
    parser.add_argument(
        "--compress",
        action="append",
        default=None,
        help="pccl_py.Compression fields of the outer step, e.g. topk=32,chunk=4096,bits=2 (churn, async; "
        "compression: one sparse row per --compress, default topk=40,chunk=4096,bits=2,average=senders)",
    )
    parser.add_argument(
        "--methods", default=None, help="compression: rows to run (default fp32,uint8,sparse,streaming)"
    )
    parser.add_argument(
        "--sparse-outer",
        action="append",
        default=None,
        help="compression: outer SGD 'LR,MOMENTUM' of the sparse rows, one per --compress ('-': default)",
    )
    parser.add_argument("--fragments", type=int, default=4, help="compression: Streaming DiLoCo's fragments")
    parser.add_argument("--eager", type=float, default=None, help="async: AsyncDiLoCo's eager coefficient")
    parser.add_argument(
        "--lookahead", type=int, choices=[0, 1], default=None, help="async: AsyncDiLoCo's lookahead (default 1)"
    )
    parser.add_argument(
        "--apply-on-arrival",
        type=int,
        choices=[0, 1],
        default=None,
        help="async: AsyncDiLoCo's apply_on_arrival (default 1; 0: the average waits for the round's end)",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--records", default=None, help="write every run's records (JSON lines) into this folder"
    )
    parser.add_argument("--plot", default=None, help="figure path (default: docs/diloco_<experiment>.png)")
    parser.add_argument(
        "--kill-at", type=int, default=0, help="churn: outer step after which the last peer is killed"
    )
    parser.add_argument(
        "--join-at", type=int, default=0, help="churn: outer step after which a new peer starts"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="churn: skip the run without churn")
    parser.add_argument(
        "--two-sided",
        action="store_true",
        help="quality: require |gap| <= 3%% (default: DiLoCo at most 3%% worse)",
    )
    parser.add_argument("--comm-delay", type=float, default=4.0, help="async: extra seconds per all-reduce")
    parser.add_argument(
        "--loss-only", action="store_true", help="async: no delay, no no-delay run: only the loss cost"
    )
    parser.add_argument("--outer-lr", type=float, default=None, help="outer SGD learning rate (default 0.7)")
    parser.add_argument(
        "--outer-momentum", type=float, default=None, help="outer SGD Nesterov momentum (default 0.9)"
    )
    defaults = asdict(TrainConfig())
    for name in (
        "sync_every",
        "outer_steps",
        "batch",
        "lr",
        "seed",
        "eval_batches",
        "dim",
        "layers",
        "heads",
        "context",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=None)
    args = parser.parse_args(argv)
    cfg = {
        k: v for k, v in vars(args).items() if k in defaults and k not in ("comm_delay", "compress", "fragments", "eager", "lookahead", "apply_on_arrival") and v is not None
    }
    cfg.update({k: getattr(args, k) for k in ("outer_lr", "outer_momentum") if getattr(args, k) is not None})
    if args.compress and args.experiment != "compression":
        cfg["compress"] = args.compress[0]
    if args.eager is not None:
        cfg["eager"] = args.eager
    if args.lookahead is not None:
        cfg["lookahead"] = args.lookahead
    if args.apply_on_arrival is not None:
        cfg["apply_on_arrival"] = args.apply_on_arrival
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from examples.tinylm.exp_compression import METHODS, SPARSE_DEFAULT, compression  # noqa: F401

    experiments = {"quality": quality, "churn": churn, "async": async_, "compression": compression}
    result = experiments[args.experiment](args, cfg)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
