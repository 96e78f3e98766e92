"""Evidently (0.7 API) reports on held-out chronological windows: data drift, prediction drift, quality.

Windows: the validation split, the test split, and the test split cut into ``slices`` consecutive
time slices. Data drift compares each window's fields (and label) with the training split; prediction
drift and classification quality compare a model's test-window scores with its validation scores.
Evidently is imported inside the functions (~6 s import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _windows(test: Any, slices: int) -> dict[str, Any]:
    bounds = np.linspace(0, len(test), slices + 1).astype(int)
    return {f"test_slice_{k + 1}": test.iloc[bounds[k]: bounds[k + 1]] for k in range(slices) if bounds[k + 1] > bounds[k]}


def _value(metrics: list[dict], prefix: str) -> Any:
    for m in metrics:
        if m["metric_name"].startswith(prefix):
            return m["value"]
    return None


def data_drift(train: Any, valid: Any, test: Any, fields: list[str], out_dir: Path, *, slices: int = 4,
               max_rows: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Drift of every field and the label between the training split and each held-out window.

    Windows larger than ``max_rows`` are sampled (fixed seed) to keep the reports fast and small.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [*fields, "label"]
    definition = DataDefinition(categorical_columns=columns)

    def prep(df: Any) -> Any:
        df = df[columns].astype(str)
        return df.sample(n=max_rows, random_state=seed) if len(df) > max_rows else df

    reference = Dataset.from_pandas(prep(train), data_definition=definition)
    windows = {"valid": valid, "test": test, **_windows(test, slices)}
    summary: dict[str, Any] = {}
    for name, df in windows.items():
        snap = Report([DataDriftPreset(columns=columns)]).run(
            current_data=Dataset.from_pandas(prep(df), data_definition=definition), reference_data=reference)
        snap.save_html(str(out_dir / f"data_drift_{name}.html"))
        snap.save_json(str(out_dir / f"data_drift_{name}.json"))
        metrics = snap.dict()["metrics"]
        per_column = {m["config"].get("column"): float(m["value"]) for m in metrics
                      if m["metric_name"].startswith("ValueDrift")}
        count = _value(metrics, "DriftedColumnsCount") or {}
        summary[name] = {"rows": len(df), "drifted_columns": int(count.get("count", 0)),
                         "drifted_share": float(count.get("share", 0.0)), "drift_score": per_column,
                         "html": f"data_drift_{name}.html"}
    return summary


def prediction_drift(strategy: str, valid: Any, test: Any, out_dir: Path, *, slices: int = 4) -> dict[str, Any]:
    """Score drift (test windows vs validation) and classification quality of one model's predictions."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import DummyLogLoss, LogLoss, MeanValue, RocAuc, ValueDrift
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(numerical_columns=["pred"], categorical_columns=["label"],
                                classification=[BinaryClassification(target="label", prediction_probas="pred")])

    def ds(df: Any) -> Any:
        return Dataset.from_pandas(df[["label", "pred"]].assign(label=df["label"].astype(int)),
                                   data_definition=definition)

    reference = ds(valid)
    summary: dict[str, Any] = {}
    for name, df in {"test": test, **_windows(test, slices)}.items():
        if df["label"].nunique() < 2:
            continue
        snap = Report([ValueDrift(column="pred"), ClassificationPreset(), LogLoss(), DummyLogLoss(), RocAuc(),
                       MeanValue(column="pred"), MeanValue(column="label")]).run(
            current_data=ds(df), reference_data=reference)
        stem = f"predictions_{strategy}_{name}"
        snap.save_html(str(out_dir / f"{stem}.html"))
        snap.save_json(str(out_dir / f"{stem}.json"))
        metrics = snap.dict()["metrics"]
        means = [m["value"] for m in metrics if m["metric_name"].startswith("MeanValue")]
        summary[name] = {"rows": len(df), "pred_drift": float(_value(metrics, "ValueDrift(column=pred")),
                         "auc": _value(metrics, "RocAuc"), "logloss": _value(metrics, "LogLoss"),
                         "dummy_logloss": _value(metrics, "DummyLogLoss"),
                         "mean_pred": means[0] if means else None, "mean_label": means[1] if len(means) > 1 else None,
                         "html": f"{stem}.html"}
    return summary
