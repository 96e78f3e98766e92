"""Calibration of predicted click probabilities: ECE, Brier score, PCOC and reliability bins."""

from __future__ import annotations

from typing import Any

import numpy as np


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins over [0, 1]: count, mean prediction and observed click rate per bin."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"bin": b, "lo": b / bins, "hi": (b + 1) / bins, "count": n,
                    "mean_pred": float(p[sel].mean()) if n else None,
                    "frac_pos": float(y[sel].mean()) if n else None})
    return out


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error (bin-weighted |observed − predicted|), Brier score, and PCOC.

    PCOC (predicted over observed clicks) = mean(p) / mean(y): 1.0 is calibrated in the large.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    rel = reliability_bins(y, p, bins)
    n = len(y)
    ece = sum(r["count"] / n * abs(r["frac_pos"] - r["mean_pred"]) for r in rel if r["count"])
    return {
        "ece": float(ece),
        "brier": float(np.mean((p - y) ** 2)),
        "mean_pred": float(p.mean()),
        "mean_label": float(y.mean()),
        "pcoc": float(p.mean() / y.mean()) if y.mean() > 0 else None,
        "bins": rel,
    }
