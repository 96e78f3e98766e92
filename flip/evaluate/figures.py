"""The report's own figures (PNG), drawn from numbers the evaluate and pretrain stages wrote.

Each function takes those numbers and a path, and returns the one-line reading the report prints
under the figure. matplotlib is imported inside the functions (the Agg backend, no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability(bins: dict[str, list[dict[str, Any]]], path: Path) -> str:
    """Every strategy's reliability curve on one chart, the diagonal (perfect calibration), and below
    it how many test rows fall in each bin (a point drawn from a few rows is noise)."""
    plt = _pyplot()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for name, rows in bins.items():
        rows = [b for b in rows if b["count"]]
        if not rows:
            continue
        line, = ax.plot([b["mean_pred"] for b in rows], [b["frac_pos"] for b in rows], marker="o", ms=4, label=name)
        few = [b for b in rows if b.get("too_few_rows")]
        ax.scatter([b["mean_pred"] for b in few], [b["frac_pos"] for b in few], s=60, facecolors="none",
                   edgecolors=line.get_color())
        ax_n.step([b["mean_pred"] for b in rows], [b["count"] for b in rows], where="mid", color=line.get_color())
    ax.set(ylabel="observed click rate", xlim=(0, 1), ylim=(0, 1), title="Reliability on the test rows")
    ax.legend(fontsize=7, loc="upper left")
    ax_n.set(xlabel="mean predicted click probability (bin)", ylabel="rows", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("Points on the dashed diagonal are calibrated; above it the model under-predicts clicks, below it "
            "over-predicts. Lower panel: test rows per bin (hollow circles: bins with too few rows to read).")


def cold_start(key: str, field: str, series: dict[str, list[dict[str, Any]]], train_rows: int | None,
               path: Path) -> str:
    """Test AUC per training-frequency bucket of the user (or item), one bar per strategy, on the same
    rows for every strategy; each bucket names its row count, and thin buckets are hatched."""
    plt = _pyplot()
    buckets = next(iter(series.values()))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(series)
    for i, (name, rows) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(rows))]
        aucs = [r["auc"] if r["auc"] is not None else 0.0 for r in rows]
        bars = ax.bar(xs, aucs, width, label=name)
        for bar, r in zip(bars, rows):
            if r.get("too_few_rows"):
                bar.set(alpha=0.35, hatch="//")
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    labels = [f"{b['bucket']}\n{b['rows']:,} rows" + ("\n(too few)" if b.get("too_few_rows") else "") for b in buckets]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))], labels, fontsize=7)
    seen = f"the {train_rows:,} training rows used" if train_rows else "the training split"
    ax.set(ylim=(0, 1), xlabel=f"{key} ({field}) interactions in {seen}", ylabel="test AUC",
           title=f"AUC by {key} frequency (cold start)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return (f"Every strategy is scored on the same test rows, split by how often their {key} occurs in {seen}; "
            "dashed line: chance (0.5). Hatched bars rest on too few rows (or one class) to read.")


def pretraining_losses(steps: list[dict[str, Any]], path: Path) -> str | None:
    """The pretraining objectives per logged step (None when the log has no steps)."""
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = {"mlm": "MLM (masked language modelling)", "mtm": "MTM (masked tabular modelling, NCE)",
             "icl": "ICL (instance-level contrastive)", "loss": "total (weighted sum)"}
    for key, label in names.items():
        pts = [(r["global_step"] if "global_step" in r else r["step"], r[key]) for r in steps
               if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats)", title="Pretraining losses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("Each objective's loss over pretraining steps (training batches, not held-out data); falling curves "
            "mean the two modalities are learning to reconstruct and match each other.")


def pretrain_scaling(points: list[dict[str, Any]], path: Path, paper: float | None = None) -> str:
    """FLIP_ID − scratch test AUC (mean over seeds, DeLong's 95% interval) against the number of
    pretraining rows, on a log axis; zero and the paper's gain as lines (``benchmarks/pretrain_scaling.py``)."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p["rows"])
    xs = [p["rows"] for p in pts]
    ys = [p["delta"] for p in pts]
    err = [[p["delta"] - p["ci_low"] for p in pts], [p["ci_high"] - p["delta"] for p in pts]]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    ax.axhline(0.0, c="grey", lw=1)
    if paper is not None:
        ax.axhline(paper, ls="--", c="tab:red", lw=1, label=f"paper, 30 epochs over every row: {paper:+.4f}")
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, lw=1.4, label="this project: mean of seeds, 95% CI")
    for x, p in zip(xs, pts):
        ax.annotate(f"p={p['p_value']:.2g}", (x, p["ci_high"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.minorticks_off()
    ax.set(xlabel="pretraining rows (most recent training rows, one epoch)", ylabel="ΔAUC, FLIP_ID − scratch",
           title="FLIP_ID's gain against pretraining (whole test split)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("Each point: FLIP_ID finetuned on the whole training split after pretraining on that many rows, minus "
            "the ID model from scratch with the same seeds, on the same test rows (DeLong's 95% interval).")
