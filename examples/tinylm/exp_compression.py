"""The compression experiment (examples.tinylm.experiments compression): bytes sent
against final validation loss for DiLoCo's outer step sent as dense fp32, as a uint8
all-reduce, compressed (top-k + error feedback + 2-bit values, all-gathered), and
Streaming DiLoCo, on the quality experiment's samples and inner steps.

    python -m examples.tinylm.experiments compression --json out/compression.json
    python -m examples.tinylm.experiments compression --methods fp32,sparse \\
        --compress topk=32,chunk=4096,bits=2 --sparse-outer 0.7,0.9 \\
        --compress topk=32,chunk=4096,bits=2,keep_residual=1 --sparse-outer 1,0
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from examples.tinylm.experiments import Run, _dump, _figure, _result, _save, _table, run_group

SPARSE_DEFAULT = "topk=40,chunk=4096,bits=2,average=senders"
SPARSE_OUTER_DEFAULT = "1,0"  # SparseLoCo: outer SGD lr 1, no momentum (the error feedback carries it)
METHODS = ("fp32", "uint8", "sparse", "streaming")


def compression(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """One run per method on the quality experiment's samples and inner steps (H=50, 16
    outer steps): dense fp32 DiLoCo, its all-reduce quantized to uint8, the compressed
    outer step (top-k + error feedback + 2-bit values, all-gathered), Streaming DiLoCo.
    Bytes are what one peer sends per outer step (streaming: also per fragment
    exchange, the peak); the compressed rows count what their all-gather sent,
    payload x (N-1) (Communicator.all_gather)."""
    cfg = {"sync_every": 50, "outer_steps": 16, **cfg}
    specs = args.compress or [SPARSE_DEFAULT]
    # per sparse row: outer SGD "LR,MOMENTUM" ("-" or missing: DiLoCo's default)
    outers = args.sparse_outer or ([] if args.compress else [SPARSE_OUTER_DEFAULT])
    outers = [o if o != "-" else "" for o in outers] + [""] * (len(specs) - len(outers))
    methods = []
    for m in (m.strip() for m in (args.methods or ",".join(METHODS)).split(",")):
        methods += [f"sparse{i or ''}" for i in range(len(specs))] if m == "sparse" else [m]
    settings: dict[str, dict[str, Any]] = {
        "fp32": {"mode": "diloco"},
        "uint8": {"mode": "diloco", "quantize": "uint8"},
        "streaming": {"mode": "streaming", "fragments": args.fragments},
    }
    names = {
        "fp32": "DiLoCo fp32",
        "uint8": "DiLoCo, all-reduce uint8",
        "streaming": f"Streaming DiLoCo, F={args.fragments}",
    }
    for i, (spec, outer) in enumerate(zip(specs, outers, strict=True)):
        key = f"sparse{i or ''}"
        settings[key] = {"mode": "diloco", "compress": spec, **_outer(outer)}
        names[key] = f"compressed ({spec}{', outer SGD ' + outer if outer else ''})"
    runs = {m: run_group(m, args.workers, **{**cfg, **settings[m]}) for m in methods}
    _dump(args, *runs.values())
    base = runs.get("fp32")
    rows, out_rows = [], []
    for m, run in runs.items():
        per_step = statistics.median(r.get("tx", 0) for r in run.outer())
        peak = statistics.median(r.get("peak_tx", r.get("tx", 0)) for r in run.outer())
        val = run.final_val()
        row = {
            "method": m,
            "name": names[m],
            "bytes_per_outer_step": per_step,
            "peak_bytes_per_exchange": peak,
            "total_bytes": run.tx_bytes(),
            "final_val": val,
            # the global parameters' loss (the local models differ from them with
            # keep_residual / streaming's mix; fp32 and uint8: the same)
            "final_val_global": statistics.fmean(
                r.get("val_global", r["val"]) for r in run.records if r["event"] == "done"
            ),
            "wall_s": round(run.wall_s, 1),
            "curve": run.curve(),
            "bytes_curve": _bytes_curve(run),
        }
        if base is not None:
            b_step = statistics.median(r.get("tx", 0) for r in base.outer())
            row["fewer_bytes_x"] = b_step / per_step if per_step else None
            row["fewer_peak_bytes_x"] = b_step / peak if peak else None
            row["val_vs_fp32"] = (val - base.final_val()) / base.final_val()
        out_rows.append(row)
        rows.append(
            [
                names[m],
                f"{per_step:,.0f}",
                f"{peak:,.0f}",
                f"{row.get('fewer_bytes_x') or 0:.1f}x",
                f"{run.tx_bytes():,}",
                val,
                f"{100 * row.get('val_vs_fp32', 0.0):+.2f}%",
                row["final_val_global"],
                f"{run.wall_s:.0f}",
            ]
        )
    _table(
        f"{args.workers} peers, H={cfg['sync_every']}, {cfg['outer_steps']} outer steps: bytes sent per peer",
        ["method", "B/outer step", "peak B/exchange", "vs fp32", "total B", "final val", "vs fp32", "global val", "wall s"],
        rows,
    )
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in out_rows:
        xs, ys = row["bytes_curve"]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{row['name']}: final {row['final_val']:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per peer (cumulative)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"tiny LM, {args.workers} peers, H={cfg['sync_every']}: loss against bytes sent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, args.plot or "docs/diloco_compression.png")
    result = {"experiment": "compression", "workers": args.workers, "cfg": cfg, "rows": out_rows}
    _result(result)
    return result


def _outer(text: str | None) -> dict[str, float]:
    """'LR,MOMENTUM' -> the outer optimizer of one row (tuned_worker)."""
    if not text:
        return {}
    lr, momentum = (float(v) for v in text.split(","))
    return {"outer_lr": lr, "outer_momentum": momentum}


def _bytes_curve(run: Run) -> tuple[list[int], list[float]]:
    """Validation loss after each outer step against the bytes peer 0 (the lowest
    index reporting) had sent by then."""
    xs, ys, sent = [], [], 0
    for recs in run.by_step().values():
        first = min(recs, key=lambda r: r["index"])
        sent += first.get("tx", 0)
        xs.append(sent)
        ys.append(first["val"])
    return xs, ys
