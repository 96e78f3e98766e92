"""The ``evaluate`` stage: score every finetuned run on validation and test, and monitor drift.

Reads each run through :class:`flip.runs.RunDir` (its seeds, their predictions, configuration, log and
the learning-rate selection) and the processed splits. Writes into ``out_dir`` (default ``reports/``):

* ``eval.json`` (the full record, not a DVC metric): per strategy (``strategies.<name>``) the
  mean over seeds of AUC and logloss (with the std and every seed's value), calibration (ECE,
  Brier, PCOC) on valid and test, the rows, epochs and learning-rate selection it trained with, AUC
  by user and item frequency in the rows it trained on (cold start; thin buckets marked), prediction
  drift, and the paired comparison against ``scratch`` (``delta_vs_scratch``: ΔAUC with its 95%
  interval and p-value from DeLong's test on the same test rows, plus the spread over seeds;
  ``flip`` also ``delta_vs_flip_id``). Every strategy of a group is scored on the rows they all
  share. ``full_data`` holds the same for the ID strategies trained on the whole split (``--full``),
  a separate group never mixed into the equal-data table. ``headline`` is the one-sentence answer;
  ``data_drift`` holds each held-out window's attribute, ID-like and label drift (the test window's
  is the drift stage's ``reports/drift/drift.json``, read as it is: :func:`data_drift`); ``config`` is
  the settings the runs trained with.
* ``metrics.json``: the DVC metrics, the headline numbers only (:func:`headline_metrics`).
* ``plots/reliability/`` and ``plots/roc/``: DVC plots, one file per strategy plus the diagonal.
* ``evidently/``: Evidently JSON for every window but the test window's data drift (that one is in
  ``reports/drift/``), HTML pages as ``evaluate.pages`` says.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from flip.config import Config
from flip.errors import FlipError
from flip.io import atomic_dir, write_json
from flip.runs import RunDir
from flip.strategy_table import REPORT_ORDER, STRATEGIES

STRATEGY_ORDER = list(REPORT_ORDER)
BASELINE = "scratch"
# paired comparisons written to eval.json: (strategy, against) -> key
COMPARISONS = {("flip", "flip_id"): "delta_vs_flip_id"}


def seed_runs(run: Path) -> dict[str, RunDir]:
    """The finished seeds of a run that scored the test split: ``{"seed-<s>": RunDir}`` (one seed: the
    run itself), in the order of its ``run.seeds``."""
    return {name: seed for name, seed in RunDir(run).seeds().items() if seed.has_predictions("test")}


def find_runs(runs_dir: Path) -> dict[str, Path]:
    """Finished runs under ``runs_dir`` (one folder per strategy), in the paper's order."""
    runs = {}
    for d in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).exists() else []:
        if d.is_dir() and RunDir(d).is_finished() and seed_runs(d):
            runs[d.name] = d
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))


def roc_points(y: np.ndarray, p: np.ndarray, n: int = 101) -> list[dict[str, float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    grid = np.linspace(0, 1, n)
    return [{"fpr": float(f), "tpr": float(t)} for f, t in zip(grid, np.interp(grid, fpr, tpr))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def run_settings(run: Path, seeds: dict[str, RunDir]) -> dict[str, Any]:
    """What a run trained on: rows, epochs, batch size, learning rates (selected) and the selection."""
    first = next(iter(seeds.values()))
    config = first.config()
    f = config.get("finetune", {})
    selection = RunDir(run).selection() or {  # one candidate: the fixed rates, scored like a selection's
        "metric": "valid_auc", "seed": first.info().get("seed"),
        "candidates": [{"lr": f.get("lr"), "plm_lr": f.get("plm_lr"),
                        "valid_auc": first.metrics().get("valid", {}).get("auc")}],
        "selected": {"lr": f.get("lr"), "plm_lr": f.get("plm_lr")}, "grid": None}
    epochs = [d.metrics().get("train", {}).get("epochs") for d in seeds.values()]
    strategy = STRATEGIES.get(Path(run).name)
    uses_plm, uses_id = (strategy.uses_plm, strategy.uses_id) if strategy else (False, True)
    return {"train_rows": first.train_rows(), "batch_size": first.batch_size(), "epochs_run": epochs,
            "max_epochs": f.get("plm_epochs") if uses_plm else f.get("epochs"),
            "id_model": config.get("id_model", {}).get("name") if uses_id else None,
            "plm": config.get("plm", {}).get("name") if uses_plm else None,
            "pretrained": first.info().get("pretrained"), "selection": selection, "seeds": list(seeds)}


def training_counts(train: Any, keys: list[str], rows: int | None, vocab_size: int) -> dict[str, np.ndarray]:
    """How often each id of the user and item fields occurs in the rows a group trained on (the most
    recent ``rows`` training rows; ``None`` or 0 = all): the cold-start buckets' frequencies."""
    used = train.tail(rows) if rows else train
    return {k: np.bincount(used[k].to_numpy(), minlength=vocab_size) for k in keys}


def _score_group(runs: dict[str, Path], frames: dict[str, Any], keys: list[str], vocab_size: int,
                 ev_dir: Path | None, evaluate_cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every strategy of one comparison group, on the test rows they all share, with paired deltas."""
    import pandas as pd

    from flip.evaluate.calibration import calibration
    from flip.evaluate.coldstart import auc_by_frequency
    from flip.metrics import auc, logloss
    from flip.evaluate.drift import prediction_drift, sample_frame
    from flip.evaluate.significance import paired_delta

    preds: dict[str, dict[str, dict[str, Any]]] = {}  # strategy -> split -> seed -> frame
    seeds_of: dict[str, dict[str, RunDir]] = {}
    for name, run in runs.items():
        seeds_of[name] = seed_runs(run)
        preds[name] = {split: {s: d.predictions(split) for s, d in seeds_of[name].items()}
                       for split in ("valid", "test")}
    # the rows every strategy and seed scored: the comparison is on exactly these
    common = {split: np.unique(functools.reduce(np.intersect1d, [f["row"].to_numpy() for per in preds.values()
                                                                  for f in per[split].values()]))
              for split in ("valid", "test")}
    result: dict[str, Any] = {}
    plots: dict[str, Any] = {"reliability": {}, "roc": {}}
    aligned: dict[str, dict[str, np.ndarray]] = {}
    settings = {name: run_settings(runs[name], seeds_of[name]) for name in runs}
    trained_on = {s["train_rows"] for s in settings.values()}
    counts = training_counts(frames["train"], keys, trained_on.pop() if len(trained_on) == 1 else None, vocab_size)
    few = evaluate_cfg.min_bucket_rows
    y_test = None
    for name, per in preds.items():
        entry: dict[str, Any] = settings[name]
        for split in ("valid", "test"):
            rows = pd.Index(common[split])
            frames_s = {s: f.set_index("row").loc[rows] for s, f in per[split].items()}
            y = next(iter(frames_s.values()))["label"].to_numpy(np.float64)
            aucs = [auc(y, f["prob"].to_numpy(np.float64)) for f in frames_s.values()]
            lls = [logloss(y, f["prob"].to_numpy(np.float64)) for f in frames_s.values()]
            cals = [calibration(y, f["prob"].to_numpy(np.float64)) for f in frames_s.values()]
            m_auc, s_auc = _mean_std(aucs)
            m_ll, s_ll = _mean_std(lls)
            entry[split] = {"auc": m_auc, "auc_std": s_auc, "logloss": m_ll, "logloss_std": s_ll, "rows": len(rows),
                            "auc_per_seed": dict(zip(frames_s, aucs)),
                            **{k: float(np.mean([c[k] for c in cals])) for k in ("ece", "brier", "mean_pred",
                                                                                  "mean_label", "pcoc")}}
            if split == "test":
                y_test = y
                aligned[name] = {s: f["prob"].to_numpy(np.float64) for s, f in frames_s.items()}
                first_seed, first = next(iter(frames_s.items()))
                prob = first["prob"].to_numpy(np.float64)
                entry["plots_seed"] = first_seed
                joined = first.join(frames["test"].set_index("row")[keys]) if keys else first
                entry["cold_start"] = {k: auc_by_frequency(joined[k].to_numpy(), y, prob, counts[k], min_rows=few)
                                       for k in keys}
                plots["reliability"][name] = [{**b, "strategy": name, "too_few_rows": b["count"] < few}
                                              for b in cals[0]["bins"] if b["count"]]
                plots["roc"][name] = [{**pt, "strategy": name} for pt in roc_points(y, prob)]
        if ev_dir is not None:  # Evidently on a seeded sample of each split (exact AUC/logloss: entry[split])
            first_valid = sample_frame(next(iter(per["valid"].values())), evaluate_cfg.drift_rows)
            first_test = sample_frame(next(iter(per["test"].values())), evaluate_cfg.drift_rows)
            entry["prediction_drift"] = prediction_drift(
                name, pd.DataFrame({"label": first_valid["label"].to_numpy(np.float64), "pred": first_valid["prob"]}),
                pd.DataFrame({"label": first_test["label"].to_numpy(np.float64), "pred": first_test["prob"]}),
                ev_dir, slices=evaluate_cfg.slices, pages=evaluate_cfg.pages)
        result[name] = entry
    for name in result:
        if BASELINE in aligned and name != BASELINE:
            result[name]["delta_vs_scratch"] = paired_delta(y_test, aligned[name], aligned[BASELINE])
        for (a, b), key in COMPARISONS.items():
            if name == a and b in aligned:
                result[name][key] = paired_delta(y_test, aligned[a], aligned[b])
    return result, plots


def headline(strategies: dict[str, Any]) -> str:
    """One sentence: did FLIP beat the ID model trained on the same rows, by how much, how sure."""
    flip, base = strategies.get("flip"), strategies.get(BASELINE)
    if not flip or not base or "delta_vs_scratch" not in flip:
        return "No FLIP-vs-ID comparison in this run (it needs both the flip and the scratch strategy)."
    d = flip["delta_vs_scratch"]
    verdict = ("FLIP beat" if d["ci_low"] > 0 else "FLIP did worse than" if d["ci_high"] < 0
               else "FLIP did not differ significantly from")
    return (f"{verdict} the ID model trained on the same {base['train_rows']:,} rows: test AUC "
            f"{flip['test']['auc']:.4f} vs {base['test']['auc']:.4f}, ΔAUC {d['delta']:+.4f} "
            f"(95% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}, p = {d['p_value']:.2g}; "
            f"{d['seeds'][0]} vs {d['seeds'][1]} seeds, {d['rows']:,} test rows).")


def headline_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics (``reports/metrics.json``): per strategy test AUC, logloss, ECE and ΔAUC vs
    scratch on the same rows, the full-data runs likewise, and the data counts. Everything else
    (seeds, intervals, calibration bins, cold start, drift) stays in ``eval.json``, which is not a
    metric: ``dvc metrics show`` and ``dvc exp show`` stay readable."""
    def short(s: dict[str, Any]) -> dict[str, float]:
        m = {"auc": round(s["test"]["auc"], 6), "logloss": round(s["test"]["logloss"], 6),
             "ece": round(s["test"]["ece"], 6)}
        if "delta_vs_scratch" in s:
            m["delta_auc"] = round(s["delta_vs_scratch"]["delta"], 6)
        return m

    first = next(iter(result["strategies"].values()))
    return {"rows": {"train": result["counts"]["train"], "valid": result["counts"]["valid"],
                     "test": result["counts"]["test"], "compared": first["test"]["rows"]},
            **{name: short(s) for name, s in result["strategies"].items()},
            **({"full_data": {name: short(s) for name, s in result["full_data"].items()}}
               if result.get("full_data") else {})}


# the diagonal drawn with the strategies: chance (ROC), perfect calibration (reliability)
DIAGONALS = {"roc": ("diagonal", "fpr", "tpr"), "reliability": ("diagonal", "mean_pred", "frac_pos")}


def data_drift(cfg: Config, data_dir: Path, meta: dict[str, Any], ev_dir: Path, drift_dir: Path) -> dict[str, Any]:
    """Each held-out window's data drift (``eval.json`` ``data_drift``): the test window's is the drift
    stage's record (``drift_dir/drift.json``, the verdict the retrain flow applies its policy to), read,
    not computed again; the validation split and the test split's time slices are tested here with
    the same rule (raw values, ``evaluate.drift_rows`` sample, fixed seed, retrain thresholds). Each
    window's ``html`` is relative to ``ev_dir`` (the test window's page lies in ``drift_dir``)."""
    import os

    from flip.evaluate.drift import drift_settings, read_drift, windows_drift

    test_drift = read_drift(cfg, data_dir, drift_dir)
    if test_drift.get("html"):
        test_drift["html"] = Path(os.path.relpath(Path(drift_dir) / test_drift["html"], ev_dir)).as_posix()
    test_drift["source"] = (Path(drift_dir) / "drift.json").as_posix()
    settings = drift_settings(cfg)
    return windows_drift(data_dir, meta, ev_dir, slices=cfg.evaluate.slices, pages=cfg.evaluate.pages,
                         drift_share=settings["drift_share"], target_drift=settings["target_drift"],
                         max_rows=settings["max_rows"], seed=settings["seed"], test_drift=test_drift)


def evaluate(cfg: Config, data_dir: Path, runs_dir: Path, out_dir: Path, *,
             full_dir: Path | None = None, drift_dir: Path | None = None) -> dict[str, Any]:
    """Score the runs under ``runs_dir`` (the equal-data comparison) and, when given, the full-data ID
    runs under ``full_dir``; write ``eval.json``, ``metrics.json``, DVC plots and Evidently reports
    into ``out_dir``. The test window's data drift is read from the drift stage's ``drift_dir``
    (default ``out_dir/drift``, where dvc.yaml's drift stage writes)."""
    import pyarrow.parquet as pq

    from flip.data.tensors import load_meta

    started = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    drift_dir = Path(drift_dir) if drift_dir is not None else out_dir / "drift"
    runs = find_runs(runs_dir)
    if not runs:
        raise FlipError(f"no finished runs under {runs_dir} (each needs metrics.json and predictions/): "
                        "run `flip finetune` first")
    full_runs = find_runs(full_dir) if full_dir is not None else {}
    meta = load_meta(data_dir)
    keys = [k for k in (meta.get("user_field"), meta.get("item_field")) if k]
    # what scoring reads of the splits: the user/item ids (cold-start buckets), not whole splits
    frames = {"train": pq.read_table(data_dir / "train.parquet", columns=keys).to_pandas(),
              "test": pq.read_table(data_dir / "test.parquet", columns=["row", *keys]).to_pandas()}
    e = cfg.evaluate

    first_seed = next(iter(seed_runs(next(iter(runs.values()))).values()))
    result: dict[str, Any] = {"dataset": meta["dataset"], "counts": meta["counts"],
                              "user_field": meta.get("user_field"), "item_field": meta.get("item_field"),
                              "config": first_seed.config()}
    print(f"[evaluate] {len(runs)} strategies ({', '.join(runs)}) + {len(full_runs)} full-data run(s); "
          "Evidently drift reports ...", flush=True)
    with atomic_dir(out_dir / "evidently", "evaluate", ("*.html", "*.json")) as ev:
        result["data_drift"] = data_drift(cfg, data_dir, meta, ev, drift_dir)
        result["strategies"], plots = _score_group(runs, frames, keys, meta["vocab_size"], ev, e)
    print(f"[evaluate] scored the equal-data runs ({time.time() - started:.0f}s)", flush=True)
    if full_runs:
        result["full_data"], _ = _score_group(full_runs, frames, keys, meta["vocab_size"], None, e)
    with atomic_dir(out_dir / "plots", "evaluate", tuple(DIAGONALS)) as tmp:
        for kind, per in plots.items():
            name, x, y = DIAGONALS[kind]
            for strategy, rows in {**per, name: [{x: 0.0, y: 0.0}, {x: 1.0, y: 1.0}]}.items():
                write_json(tmp / kind / f"{strategy}.json", rows)
    strategies = result["strategies"]
    result["headline"] = headline(strategies)
    result["seconds"] = round(time.time() - started, 1)
    write_json(out_dir / "eval.json", result)
    write_json(out_dir / "metrics.json", headline_metrics(result))
    return result
