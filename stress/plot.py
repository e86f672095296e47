"""The churn run's timeline as a PNG: peers alive, all-reduces completed per second, and
the faults as marks (one row per kind), drawn from the same records the invariants
are checked on."""

from __future__ import annotations

from typing import Any

from stress.invariants import alive_intervals

_KINDS = ("kill", "restart", "stall", "leave", "join", "master_kill")
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
    span = max(1.0, t_end - t0)
    fig, (ax_alive, ax_ops, ax_faults) = plt.subplots(
        3, 1, sharex=True, figsize=(12, 6.5), height_ratios=(1, 1.3, 0.9)
    )
    series = alive_intervals(records, faults)
    if series:
        xs = [t - t0 for t, _ in series] + [t_end - t0]
        ys = [n for _, n in series] + [series[-1][1]]
        ax_alive.step(xs, ys, where="post", color="tab:blue", lw=0.8)
    ax_alive.set_ylabel("peers alive")
    ax_alive.grid(alpha=0.3)
    # Bins of 1 s for short runs, wider for long ones (about 300 bins), as a rate.
    width = max(1.0, span / 300)
    bins = int(span / width) + 1
    ok = [r["ts"] - t0 for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and r["ok"]]
    failed = [r["ts"] - t0 for r in records if r.get("event") == "end" and r.get("what") == "allreduce" and not r["ok"]]
    weight = 1.0 / width
    ax_ops.hist(ok, bins=bins, range=(0, bins * width), weights=[weight] * len(ok), color="tab:green",
                alpha=0.85, label="all-reduce calls ok (all peers)")
    if failed:
        ax_ops.hist(failed, bins=bins, range=(0, bins * width), weights=[weight] * len(failed), color="tab:red",
                    alpha=0.9, label="failed (typed error)")
    ax_ops.set_ylabel("per second")
    ax_ops.legend(loc="upper left", fontsize=8)
    ax_ops.grid(alpha=0.3)
    for row, kind in enumerate(_KINDS):
        ts = [f["ts"] - t0 for f in faults if f["kind"] == kind]
        ax_faults.scatter(ts, [row] * len(ts), marker="|", s=120, color=_COLOURS[kind], linewidths=1.2)
    ax_faults.set_yticks(range(len(_KINDS)), [f"{k} ({sum(1 for f in faults if f['kind'] == k)})" for k in _KINDS],
                         fontsize=8)
    ax_faults.set_ylim(-0.7, len(_KINDS) - 0.3)
    ax_faults.set_xlabel("seconds")
    ax_faults.grid(alpha=0.3, axis="x")
    ax_alive.set_title(title or "churn run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
