"""Challenger against champion on the newest window: promote only if the gate holds.

Both bundles score the same rows: the newest held-out window, i.e. the test split of the newly
processed data (the last ``preprocess.test_fraction`` of the time order). Each model maps the raw
values through its *own* training vocabulary (the champion was trained on older data), exactly as
``flip predict`` does. The comparison is paired (DeLong's test on the same rows,
:func:`flip.evaluate.significance.paired_delta`), and the challenger is promoted when

* its AUC on the window is at least ``retrain.min_auc`` (a broken week of data, e.g. shuffled
  labels, scores near 0.5 whatever the champion does), and
* ΔAUC = challenger − champion ≥ −``retrain.max_auc_drop``, and
* Δlogloss = challenger − champion ≤ ``retrain.max_logloss_rise``.

Without a champion (the first run) only the first rule applies.

The gate fails closed. Every comparison is written ``not (x >= bound)`` so that a NaN never passes; a
window with one class (AUC undefined) is refused with that reason; a champion whose training rows
may lie in the window (its ``model.json`` ``train_time_range`` does not end before the window's first
timestamp, or is missing) is refused, as scoring it on its own training rows would flatter it. Data
without timestamps is ordered by file and row (``ts`` is the row order there), so the same test holds.
The decision records the md5 DVC would record for the challenger bundle (:func:`~flip.deploy.registry.dir_md5`):
a promotion registers that bundle or nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flip.config import RetrainConfig
from flip.data.preprocess import split_values
from flip.errors import FlipError
from flip.io import read_json, write_json


def score_window(bundle_dir: Path, table: Any) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(labels, probabilities, OOV rows per field) of a bundle on a window table."""
    from flip.deploy.package import load_bundle
    from flip.deploy.predict import score_stream

    bundle = load_bundle(bundle_dir)
    stream, _ = score_stream(bundle, table=table, id_column="row")
    ys, ps, oov = [], [], np.zeros(len(bundle.fields), dtype=np.int64)
    for b in stream:
        ys.append(b.label)
        ps.append(b.prob)
        oov += b.oov
    return np.concatenate(ys), np.concatenate(ps), {f["name"]: int(n) for f, n in zip(bundle.fields, oov)}


def decide(challenger: dict[str, float], champion: dict[str, float] | None, delta: dict[str, Any] | None,
           rule: RetrainConfig) -> tuple[bool, list[str]]:
    """Apply the gate; returns (promote, reasons) where reasons explain a refusal (or say why it passed).
    Each test is ``not (value within bound)``: NaN (one class, a broken model) refuses."""
    reasons = []
    if not challenger["auc"] >= rule.min_auc:  # (nan: the window has one class only)
        reasons.append(f"the challenger's AUC on the newest window is {challenger['auc']:.4f}, below the floor "
                       f"retrain.min_auc={rule.min_auc:g}: the new data may be broken (labels, features)")
    if not math.isfinite(challenger["logloss"]):
        reasons.append(f"the challenger's logloss on the newest window is {challenger['logloss']}: its "
                       "probabilities are not finite")
    if champion is not None:
        if delta is None:
            reasons.append("a champion is given but there is no paired comparison with it")
        else:
            if not delta["delta"] >= -rule.max_auc_drop:
                reasons.append(f"ΔAUC vs the champion is {delta['delta']:+.4f} [{delta['ci_low']:+.4f}, "
                               f"{delta['ci_high']:+.4f}], worse than -retrain.max_auc_drop={-rule.max_auc_drop:g}")
            d_ll = challenger["logloss"] - champion["logloss"]
            if not d_ll <= rule.max_logloss_rise:
                reasons.append(f"Δlogloss vs the champion is {d_ll:+.4f}, above retrain.max_logloss_rise="
                               f"{rule.max_logloss_rise:g}")
    if reasons:
        return False, reasons
    if champion is None:
        return True, ["no champion yet: the first model that meets the AUC floor is promoted"]
    return True, [f"ΔAUC {delta['delta']:+.4f} ≥ {-rule.max_auc_drop:g} and Δlogloss "
                  f"{challenger['logloss'] - champion['logloss']:+.4f} ≤ {rule.max_logloss_rise:g}"]


def _time_range(value: Any) -> tuple[float, float] | None:
    """A ``[first, last]`` timestamp pair as numbers, or None when absent or malformed."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    try:
        first, last = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return (first, last) if math.isfinite(first) and math.isfinite(last) else None


def overlap_reason(window: Any, champion_train: Any, champion: str) -> str | None:
    """Why the window may hold the champion's training rows (None: the window starts after them)."""
    w, t = _time_range(window), _time_range(champion_train)
    if w is None:
        return ("the newest window has no time range (meta.json time_range.test): the gate cannot show the "
                "champion was not trained on its rows; run `flip preprocess` again")
    if t is None:
        return (f"the champion {champion} records no training time range (model.json train_time_range, "
                "written by `flip package`): the gate cannot show it was not trained on the window's rows; "
                "repackage it or pass --champion none")
    if not w[0] > t[1]:
        return (f"the newest window (timestamps {window[0]}..{window[1]}) overlaps the champion {champion}'s "
                f"training rows ({champion_train[0]}..{champion_train[1]}): it would be scored on rows it was "
                "trained on. Fix: gate on data newer than the champion's training data (or, for data without "
                "timestamps, rows appended after them)")
    return None


def gate(challenger: Path, champion: Path | None, data_dir: Path, rule: RetrainConfig, out: Path, *,
         artifact: str = "", champion_version: str = "") -> dict[str, Any]:
    """Score both bundles on the newest window of ``data_dir``, compare them, decide; write ``out`` (JSON).
    ``challenger.md5`` is the bundle's DVC hash, taken before scoring (what a promotion must register)."""
    from flip.deploy.registry import dir_md5
    from flip.metrics import auc, logloss
    from flip.evaluate.significance import paired_delta

    meta = read_json(Path(data_dir) / "meta.json")
    window = meta.get("time_range", {}).get("test")
    md5 = dir_md5(challenger)
    table = split_values(data_dir, "test")
    y, p_new, oov_new = score_window(challenger, table)
    classes = np.unique(y)
    result: dict[str, Any] = {
        "artifact": artifact or Path(challenger).name,
        "window": {"split": "test", "rows": int(len(y)), "time_range": window,
                   "positive_rate": float(y.mean()) if len(y) else None},
        "challenger": {"path": str(challenger), "md5": md5, "auc": auc(y, p_new) if len(y) else math.nan,
                       "logloss": logloss(y, p_new) if len(y) else math.nan, "oov_rows": oov_new},
        "champion": None,
        "delta": None,
        "rule": {"min_auc": rule.min_auc, "max_auc_drop": rule.max_auc_drop,
                 "max_logloss_rise": rule.max_logloss_rise},
    }
    refused: list[str] = []
    if classes.size < 2:
        only = f"all {int(classes[0])}" if classes.size else "no rows"
        refused.append(f"the newest window has only one class ({len(y):,} rows, {only}): AUC undefined, the gate "
                       "cannot compare models on it. Fix: wait for a window with clicks and non-clicks, or check the "
                       "labels of the new data")
    if champion is not None:
        name = champion_version or str(champion)
        from flip.deploy.package import read_bundle_info

        train_range = read_bundle_info(Path(champion)).get("train_time_range")  # (checked: a broken bundle is refused)
        result["champion"] = {"path": str(champion), "version": champion_version, "md5": dir_md5(champion),
                              "train_time_range": train_range}
        why = overlap_reason(window, train_range, name)
        if why:
            refused.append(why)
    if refused:
        result["promote"], result["reasons"] = False, refused
        write_json(out, result)
        return result
    if champion is not None:
        y_old, p_old, oov_old = score_window(champion, table)
        if not np.array_equal(y_old, y):
            raise FlipError(f"the challenger {challenger} and the champion {champion} scored different rows of "
                            f"{data_dir}: the paired comparison is impossible. Fix: check both bundles' fields.")
        result["champion"].update(auc=auc(y, p_old), logloss=logloss(y, p_old), oov_rows=oov_old)
        d = paired_delta(y, {"challenger": p_new}, {"champion": p_old})
        result["delta"] = {"auc": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                           "p_value": d["p_value"], "logloss": result["challenger"]["logloss"] - result["champion"]["logloss"],
                           "rows": d["rows"]}
        delta_for_rule = {"delta": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}
    else:
        delta_for_rule = None
    promote, reasons = decide(result["challenger"], result["champion"], delta_for_rule, rule)
    result["promote"] = promote
    result["reasons"] = reasons
    write_json(out, result)
    return result
