"""The ``evaluate`` stage: score every finetuned run on validation and test, and monitor drift.

Reads each run's ``predictions/{valid,test}.parquet`` (row, label, prob) and the processed splits.
Writes into ``out_dir`` (default ``reports/``):

* ``eval.json``: per strategy AUC, logloss, calibration (ECE, Brier, PCOC) on valid and test, AUC by
  user and item training frequency (cold start), prediction drift; data drift per held-out window.
* ``plots/reliability/<strategy>.json`` and ``plots/roc/<strategy>.json``: DVC plots.
* ``evidently/``: Evidently HTML + JSON reports (data drift, prediction drift, quality).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flip.config import Config
from flip.errors import FlipError
from flip.io import atomic_dir, write_json

STRATEGY_ORDER = ["scratch", "flip_id", "plm_scratch", "flip_plm", "flip"]


def _prediction_dir(run: Path) -> Path | None:
    """Where a run keeps its predictions: the run itself, or (several seeds) its first seed's folder."""
    if (run / "predictions" / "test.parquet").exists():
        return run
    seeds = sorted(run.glob("seed-*/predictions/test.parquet"))
    return seeds[0].parents[1] if seeds else None


def find_runs(runs_dir: Path) -> dict[str, Path]:
    """Finished runs under ``runs_dir`` (one folder per strategy), in the paper's order."""
    runs = {}
    for d in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).exists() else []:
        pred = _prediction_dir(d) if d.is_dir() and (d / "metrics.json").exists() else None
        if pred is not None:
            runs[d.name] = pred
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))


def roc_points(y: np.ndarray, p: np.ndarray, n: int = 101) -> list[dict[str, float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    grid = np.linspace(0, 1, n)
    return [{"fpr": float(f), "tpr": float(t)} for f, t in zip(grid, np.interp(grid, fpr, tpr))]


def evaluate(cfg: Config, data_dir: Path, runs_dir: Path, out_dir: Path, *, slices: int = 4,
             drift_rows: int = 20_000) -> dict[str, Any]:
    import pandas as pd
    import pyarrow.parquet as pq

    from flip.data.tensors import load_meta
    from flip.evaluate.calibration import calibration
    from flip.evaluate.coldstart import auc_by_frequency
    from flip.evaluate.metrics import auc, logloss
    from flip.evaluate.monitoring import data_drift, prediction_drift

    started = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    runs = find_runs(runs_dir)
    if not runs:
        raise FlipError(f"no finished runs under {runs_dir} (each needs metrics.json and predictions/): "
                        "run `flip finetune` first")
    meta = load_meta(data_dir)
    fields = [f["name"] for f in meta["fields"]]
    counts = pq.read_table(data_dir / meta["feature_counts"]).column("count").to_numpy()
    keys = [k for k in (meta.get("user_field"), meta.get("item_field")) if k]
    frames = {s: pq.read_table(data_dir / f"{s}.parquet", columns=["row", "label", *fields]).to_pandas()
              for s in ("train", "valid", "test")}

    result: dict[str, Any] = {"dataset": meta["dataset"], "counts": meta["counts"],
                              "user_field": meta.get("user_field"), "item_field": meta.get("item_field"),
                              "strategies": {}}
    plots: dict[str, Any] = {"reliability": {}, "roc": {}}
    test_preds: dict[str, Any] = {}
    with atomic_dir(out_dir / "evidently") as ev:
        result["data_drift"] = data_drift(frames["train"], frames["valid"], frames["test"], fields, ev,
                                          slices=slices, max_rows=drift_rows, seed=cfg.run.seeds[0])
        for name, run in runs.items():
            entry: dict[str, Any] = {}
            preds = {}
            for split in ("valid", "test"):
                p = pq.read_table(run / "predictions" / f"{split}.parquet").to_pandas()
                p = p.merge(frames[split][["row", *keys]], on="row", how="left", validate="one_to_one")
                y, prob = p["label"].to_numpy(np.float64), p["prob"].to_numpy(np.float64)
                cal = calibration(y, prob)
                entry[split] = {"auc": auc(y, prob), "logloss": logloss(y, prob), "rows": len(p),
                                **{k: cal[k] for k in ("ece", "brier", "mean_pred", "mean_label", "pcoc")}}
                if split == "test":
                    entry["cold_start"] = {k: auc_by_frequency(p[k].to_numpy(), y, prob, counts) for k in keys}
                    plots["reliability"][name] = [{**b, "strategy": name} for b in cal["bins"] if b["count"]]
                    plots["roc"][name] = [{**pt, "strategy": name} for pt in roc_points(y, prob)]
                preds[split] = pd.DataFrame({"label": y, "pred": prob})
                if split == "test":
                    test_preds[name] = p[["row", "label", "prob"]]
            entry["prediction_drift"] = prediction_drift(name, preds["valid"], preds["test"], ev, slices=slices)
            result["strategies"][name] = entry
    # strategies scored on different rows (a language model on a subsample): compare on the common rows
    common = set.intersection(*(set(p["row"].tolist()) for p in test_preds.values()))
    if any(len(p) != len(common) for p in test_preds.values()):
        for name, p in test_preds.items():
            q = p[p["row"].isin(common)]
            y, prob = q["label"].to_numpy(np.float64), q["prob"].to_numpy(np.float64)
            result["strategies"][name]["test_common"] = {"rows": len(q), "auc": auc(y, prob),
                                                         "logloss": logloss(y, prob)}
    for kind, per in plots.items():
        for name, rows in per.items():
            write_json(out_dir / "plots" / kind / f"{name}.json", rows)
    best = max(result["strategies"], key=lambda s: result["strategies"][s]["test"]["auc"])
    result["summary"] = {
        "best": best,
        **{f"{s}.test.auc": round(v["test"]["auc"], 4) for s, v in result["strategies"].items()},
        "max_drifted_share": max(w["drifted_share"] for w in result["data_drift"].values()),
    }
    result["seconds"] = round(time.time() - started, 1)
    write_json(out_dir / "eval.json", result)
    return result
