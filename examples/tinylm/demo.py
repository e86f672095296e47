"""DiLoCo demo: a local master and 4 peers train the tiny language model on CPU; one
peer is SIGKILLed about a third of the way in and a new one joins a little later. The
group keeps training, the newcomer receives the global parameters and the outer
optimizer's state bit-exactly, and every peer ends with the same bytes.

    python examples/tinylm/demo.py                       # about 3 minutes on 2 cores
    python examples/tinylm/demo.py --outer-steps 10 --sync-every 50 --plot out/loss.png

Shows a live table, then writes a plot of the validation loss (churn marked) and
prints a summary. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `examples.tinylm` importable (here and in the peers)
    sys.path.insert(0, str(ROOT))

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from examples.tinylm.train import worker
from pccl_py import Master
from pccl_py.testing import PeerGroup


@dataclass
class PeerView:
    status: str = "starting"
    outer: int | None = None
    world: int | None = None
    val: float | None = None
    round_s: float | None = None
    inner: int = 0
    hash: str = ""
    allreduces: int = 0


@dataclass
class Demo:
    peers: dict[int, PeerView] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    marks: list[tuple[float, str, str]] = field(
        default_factory=list
    )  # (outer step, label, colour) for the plot
    records: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0
    last_world: int = 0
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def event(self, text: str) -> None:
        self.events.append(f"{self.elapsed():5.1f}s {text}")

    def top(self) -> int:
        return max((v.outer or 0 for v in self.peers.values()), default=0)


def render(demo: Demo, args: argparse.Namespace) -> Group:
    table = Table(
        title=f"pccl_py DiLoCo demo: tiny LM, H={args.sync_every} inner steps per outer step "
        f"({demo.elapsed():5.1f}s)"
    )
    for name, justify in [
        ("peer", "left"),
        ("status", "left"),
        ("outer step", "right"),
        ("world", "right"),
        ("val loss", "right"),
        ("last outer step", "right"),
        ("state hash", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for index, v in sorted(demo.peers.items()):
        style = {"killed": "red", "done": "green", "starting": "dim"}.get(v.status.split()[0], "")
        table.add_row(
            str(index),
            v.status,
            "-" if v.outer is None else f"{v.outer}/{args.outer_steps}",
            "-" if v.world is None else str(v.world),
            "-" if v.val is None else f"{v.val:.4f}",
            "-" if v.round_s is None else f"{v.round_s * 1000:.0f} ms",
            v.hash,
            style=style,
        )
    lines = demo.events[-6:] or ["none yet"]
    events = Text("churn events:\n" + "\n".join("  " + e for e in lines), style="yellow")
    return Group(table, events)


@contextlib.contextmanager
def ignoring_sigint() -> Iterator[None]:
    """Peers start with SIGINT ignored (dispositions set to ignore survive exec), so a
    Ctrl-C reaches only this process, which then kills them: no tracebacks from 5
    processes at once."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def handle(demo: Demo, r: dict[str, Any]) -> None:
    demo.records.append(r)
    v = demo.peers.setdefault(r["index"], PeerView())
    ev = r["event"]
    if ev == "joined":
        v.status, v.world = "syncing state", r["world"]
    elif ev == "synced":
        v.status, v.outer = "training", r["outer"]
        if r["rx"]:
            demo.event(
                f"peer {r['index']} admitted at outer step {r['outer']}, "
                f"received {r['rx'] / 1e6:.1f} MB of state"
            )
            demo.marks.append((r["outer"], f"peer {r['index']} joins", "tab:green"))
    elif ev == "outer":
        if r["outer"] > demo.last_step:  # the first report of a new outer step
            if demo.last_world and r["world"] != demo.last_world:
                demo.event(
                    f"outer step {r['outer']}: all-reduce over {r['world']} peers (was {demo.last_world})"
                )
            demo.last_step, demo.last_world = r["outer"], r["world"]
        if v.status != "killed":
            v.status = "training"
        v.outer, v.world, v.val, v.round_s = r["outer"], r["world"], r["val"], r["round_s"]
        v.hash, v.allreduces, v.inner = r["hash"], r["allreduces"], r["inner_steps"]
    elif ev == "done":
        v.status, v.val = "done", r["val"]


def plot(demo: Demo, path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps: dict[int, dict[str, Any]] = {}
    for r in demo.records:
        if r["event"] == "outer":
            best = steps.get(r["outer"])
            if best is None or r["index"] < best["index"]:
                steps[r["outer"]] = r
    xs = sorted(steps)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(xs, [steps[s]["val"] for s in xs], marker="o", ms=4, label="validation loss (global parameters)")
    ax2 = ax.twinx()
    ax2.step(
        xs,
        [steps[s]["world"] for s in xs],
        where="mid",
        color="tab:gray",
        alpha=0.5,
        label="peers in the all-reduce",
    )
    ax2.set_ylim(0, max(args.peers + 1, 5))
    ax2.set_ylabel("peers in the all-reduce", color="tab:gray")
    top = max(steps[s]["val"] for s in xs) if xs else 1.0
    bottom = min(steps[s]["val"] for s in xs) if xs else 0.0
    for k, (step, label, colour) in enumerate(demo.marks):
        ax.axvline(step, color=colour, ls="--", lw=1)
        # staggered, so that labels of nearby events do not overlap
        ax.text(step, top - 0.08 * k * (top - bottom), " " + label, color=colour, va="top", fontsize=9)
    ax.set_xlabel(f"outer step ({args.sync_every} inner steps each)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"DiLoCo on {args.peers} CPU peers with a SIGKILL and a join")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def summary(demo: Demo, args: argparse.Namespace, console: Console, killed: int | None, joiner: int) -> bool:
    outer = [r for r in demo.records if r["event"] == "outer"]
    done = {r["index"]: r for r in demo.records if r["event"] == "done"}
    if not outer:
        console.print("[red]no outer step completed[/]")
        return False
    last_step = max(r["outer"] for r in outer)
    by_step: dict[int, set[str]] = {}
    for r in outer:
        by_step.setdefault(r["outer"], set()).add(r["hash"])
    differing = [s for s, hs in by_step.items() if len(hs) > 1]
    final_hashes = {r["hash"] for r in outer if r["outer"] == last_step}
    finishers = sorted({r["index"] for r in outer if r["outer"] == last_step})
    identical = len(final_hashes) == 1 and not differing
    tx = sum(r["tx"] for r in outer)
    sync_rx = sum(r["rx"] for r in demo.records if r["event"] == "synced")
    first_val = min(outer, key=lambda r: (r["outer"], r["index"]))["val"]
    final_val = (
        done[min(done)]["val"]
        if done
        else min((r for r in outer if r["outer"] == last_step), key=lambda r: r["index"])["val"]
    )
    inner = max(r["inner_steps"] for r in outer)
    worlds = [min(r["world"] for r in outer if r["outer"] == s) for s in sorted(by_step)]
    joined = any(r["event"] == "synced" and r["index"] == joiner for r in demo.records)
    faults = (
        [f"SIGKILL of peer {killed} (world {max(worlds)} -> {min(worlds)})"] if killed is not None else []
    )
    if joined:
        faults.append(f"peer {joiner} joined mid-run")
    ok = identical and (killed is None or min(worlds) < args.peers)
    per_step_ddp = last_step * args.sync_every
    hashes = ", ".join(sorted(final_hashes))
    rows = [
        ("final validation loss", f"{final_val:.4f}  (after outer step 1: {first_val:.4f})"),
        ("steps", f"{last_step} outer steps, {inner} inner steps per peer (H={args.sync_every})"),
        (
            "all-reduces",
            f"{last_step} (one per outer step; per-step data-parallel would need {per_step_ddp})",
        ),
        (
            "bytes",
            f"{tx / 1e6:.1f} MB sent by all peers in all-reduces, "
            f"{sync_rx / 1e6:.1f} MB of state to the joiner",
        ),
        ("faults survived", ", ".join(faults) or "none"),
        (
            "identical state",
            f"{'yes' if identical else 'NO'}: peers {finishers} end with hash {hashes}"
            + (f"; differing at steps {differing}" if differing else "; equal at every outer step"),
        ),
        ("world size per step", " ".join(map(str, worlds))),
        ("wall time", f"{demo.elapsed():.0f} s"),
        ("plot", args.plot),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, value)
    console.print()
    console.rule("[bold]Summary")
    console.print(grid)
    return ok


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--outer-steps", type=int, default=16)
    parser.add_argument("--sync-every", type=int, default=25, help="inner steps per outer step (H)")
    parser.add_argument(
        "--kill-at",
        type=int,
        default=0,
        help="SIGKILL the last peer after this outer step (default: a third of the way)",
    )
    parser.add_argument(
        "--join-at", type=int, default=0, help="start the new peer after this outer step (default: kill + 1)"
    )
    parser.add_argument("--no-churn", action="store_true", help="no kill, no join")
    parser.add_argument("--plot", default="out/demo_loss.png")
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    args = parser.parse_args()
    kill_at = args.kill_at or max(1, args.outer_steps // 3)
    join_at = args.join_at or kill_at + 1
    victim, joiner = args.peers - 1, args.peers
    console = Console()
    demo = Demo()
    for i in range(args.peers):
        demo.peers[i] = PeerView()
    cfg = {
        "mode": "diloco",
        "world": args.peers,
        "outer_steps": args.outer_steps,
        "sync_every": args.sync_every,
        "lr": args.lr,
    }
    killed: int | None = None
    kill_due: float | None = None
    join_started = False
    # SIGTERM ends the demo like Ctrl-C does: the context managers below stop every peer.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Master() as master, PeerGroup(master.address, worker, cfg) as group:
            console.print(
                f"master at {master.address}; starting {args.peers} peers (importing torch takes a while)"
            )
            with ignoring_sigint():
                for i in range(args.peers):
                    group.start(i)
            with Live(render(demo, args), console=console, refresh_per_second=4) as live:
                while True:
                    active = [i for i, v in demo.peers.items() if v.status not in ("killed", "done")]
                    # Finished when every peer is done; a joiner still waiting for
                    # admission when the others finish is stopped with them.
                    if all(demo.peers[i].status in ("starting",) and i == joiner for i in active):
                        break
                    try:
                        r = group.records(0.25)
                        handle(demo, r)
                    except queue.Empty:
                        pass
                    now = time.monotonic()
                    if not args.no_churn:
                        if kill_due is None and killed is None and (demo.peers[victim].outer or 0) >= kill_at:
                            kill_due = (
                                now + 1.0
                            )  # into its next inner phase (not while it writes to the queue)
                        if kill_due is not None and now >= kill_due:
                            group.kill(victim)
                            killed, kill_due = victim, None
                            demo.peers[victim].status = "killed"
                            at = demo.peers[victim].outer or 0
                            demo.event(f"SIGKILL peer {victim} after outer step {at}")
                            demo.marks.append((at + 0.5, f"SIGKILL peer {victim}", "tab:red"))
                        if killed is not None and not join_started and demo.top() >= join_at:
                            with ignoring_sigint():
                                group.start(joiner, joining=True, world=1)
                            demo.peers[joiner] = PeerView(status="starting (joins at an outer step)")
                            join_started = True
                            demo.event(f"peer {joiner} starts and asks to join")
                    for i, proc in list(group.processes.items()):
                        v = demo.peers[i]
                        if not proc.is_alive() and v.status not in ("killed", "done"):
                            v.status = f"exited ({proc.exitcode})"
                            demo.event(f"peer {i} exited unexpectedly with code {proc.exitcode}")
                    if any(v.status.startswith("exited") for v in demo.peers.values()):
                        break
                    live.update(render(demo, args))
                live.update(render(demo, args))
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: peers stopped[/]")
        return 130
    plot(demo, args.plot, args)
    ok = summary(demo, args, console, killed, joiner)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
