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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flip.config import RetrainConfig
from flip.data.preprocess import split_values
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
    """Apply the gate; returns (promote, reasons) where reasons explain a refusal (or say why it passed)."""
    reasons = []
    if not challenger["auc"] >= rule.min_auc:  # (nan: the window has one class only)
        reasons.append(f"the challenger's AUC on the newest window is {challenger['auc']:.4f}, below the floor "
                       f"retrain.min_auc={rule.min_auc:g}: the new data may be broken (labels, features)")
    if champion is not None and delta is not None:
        if delta["delta"] < -rule.max_auc_drop:
            reasons.append(f"ΔAUC vs the champion is {delta['delta']:+.4f} [{delta['ci_low']:+.4f}, "
                           f"{delta['ci_high']:+.4f}], worse than -retrain.max_auc_drop={-rule.max_auc_drop:g}")
        d_ll = challenger["logloss"] - champion["logloss"]
        if d_ll > rule.max_logloss_rise:
            reasons.append(f"Δlogloss vs the champion is {d_ll:+.4f}, above retrain.max_logloss_rise="
                           f"{rule.max_logloss_rise:g}")
    if reasons:
        return False, reasons
    if champion is None:
        return True, ["no champion yet: the first model that meets the AUC floor is promoted"]
    return True, [f"ΔAUC {delta['delta']:+.4f} ≥ {-rule.max_auc_drop:g} and Δlogloss "
                  f"{challenger['logloss'] - champion['logloss']:+.4f} ≤ {rule.max_logloss_rise:g}"]


def gate(challenger: Path, champion: Path | None, data_dir: Path, rule: RetrainConfig, out: Path, *,
         artifact: str = "", champion_version: str = "") -> dict[str, Any]:
    """Score both bundles on the newest window of ``data_dir``, compare them, decide; write ``out`` (JSON)."""
    from flip.evaluate.metrics import auc, logloss
    from flip.evaluate.significance import paired_delta

    meta = read_json(Path(data_dir) / "meta.json")
    table = split_values(data_dir, "test")
    y, p_new, oov_new = score_window(challenger, table)
    result: dict[str, Any] = {
        "artifact": artifact or Path(challenger).name,
        "window": {"split": "test", "rows": int(len(y)), "time_range": meta.get("time_range", {}).get("test"),
                   "positive_rate": float(y.mean()) if len(y) else None},
        "challenger": {"path": str(challenger), "auc": auc(y, p_new), "logloss": logloss(y, p_new), "oov_rows": oov_new},
        "champion": None,
        "delta": None,
        "rule": {"min_auc": rule.min_auc, "max_auc_drop": rule.max_auc_drop,
                 "max_logloss_rise": rule.max_logloss_rise},
    }
    if champion is not None:
        y_old, p_old, oov_old = score_window(champion, table)
        assert np.array_equal(y_old, y), "both models must score the same rows"
        result["champion"] = {"path": str(champion), "version": champion_version, "auc": auc(y, p_old),
                              "logloss": logloss(y, p_old), "oov_rows": oov_old}
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
