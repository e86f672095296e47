"""The churn run's timeline as a PNG: peers alive, all-reduces completed per second, and
the faults as marks, drawn from the same records the invariants are checked on."""

from __future__ import annotations

from typing import Any

from stress.invariants import alive_intervals

_COLOURS = {
    "kill": "tab:red",
    "restart": "tab:purple",
    "stall": "tab:orange",
    "leave": "tab:green",
    "join": "tab:blue",
    "master_kill": "black",
}


def timeline(records: list[dict[str, Any]], faults: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min([f["ts"] for f in faults] + [r["ts"] for r in records[:1]])
    t_end = max(f["ts"] for f in faults)
    fig, (ax_alive, ax_ops) = plt.subplots(2, 1, sharex=True, figsize=(12, 5.5), height_ratios=(1, 1.3))
    series = alive_intervals(records, faults)
    if series:
        xs = [t - t0 for t, _ in series] + [t_end - t0]
        ys = [n for _, n in series] + [series[-1][1]]
        ax_alive.step(xs, ys, where="post", color="tab:blue")
    ax_alive.set_ylabel("peers alive")
    ax_alive.grid(alpha=0.3)
    ok = [r["ts"] - t0 for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and r["ok"]]
    failed = [r["ts"] - t0 for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and not r["ok"]]
    bins = max(1, int(t_end - t0) + 1)
    ax_ops.hist(ok, bins=bins, range=(0, bins), color="tab:green", alpha=0.8, label="all-reduce calls ok (all peers)")
    if failed:
        ax_ops.hist(failed, bins=bins, range=(0, bins), color="tab:red", alpha=0.8, label="failed")
    ax_ops.set_ylabel("per second")
    ax_ops.set_xlabel("seconds")
    ax_ops.grid(alpha=0.3)
    seen: set[str] = set()
    for f in faults:
        colour = _COLOURS.get(f["kind"])
        if colour is None:
            continue
        label = f["kind"] if f["kind"] not in seen else None
        seen.add(f["kind"])
        for ax in (ax_alive, ax_ops):
            ax.axvline(f["ts"] - t0, color=colour, alpha=0.6, lw=1, label=label if ax is ax_ops else None)
    ax_ops.legend(loc="upper left", fontsize=8, ncol=4)
    ax_alive.set_title(title or "churn run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
