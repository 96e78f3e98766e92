"""CTR metrics on plain arrays: ROC-AUC and log loss (binary cross-entropy).

Both delegate to scikit-learn on float64 copies so that numbers match ``sklearn.metrics``
exactly. ``logloss`` clips probabilities as ``sklearn.metrics.log_loss`` does (to
``[eps, 1 - eps]`` with ``eps`` the float64 machine epsilon). Inputs may be numpy arrays, torch
tensors or sequences; every function returns a Python ``float``.

Without scikit-learn (a bare GPU machine with torch + transformers + pyarrow only) the same two
metrics are computed in numpy: AUC as the Mann-Whitney statistic with tied scores counting one
half (equal to sklearn's trapezoidal ROC area up to float rounding), log loss with the same
clipping.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:
    from sklearn.metrics import log_loss as _sk_log_loss
    from sklearn.metrics import roc_auc_score as _sk_roc_auc_score
except ImportError:  # bare training machine: numpy fallbacks below
    _sk_log_loss = _sk_roc_auc_score = None

__all__ = ["auc", "logloss", "as_float64"]


def as_float64(values: Any) -> np.ndarray:
    """1-D float64 numpy copy of an array-like (numpy array, torch tensor, list)."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check(y: np.ndarray, p: np.ndarray) -> None:
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("no samples to score")


def auc(y: Any, p: Any) -> float:
    """Area under the ROC curve of scores ``p`` for binary labels ``y`` (ties count one half).

    Returns ``nan`` when ``y`` holds a single class (AUC is undefined there), instead of raising
    as scikit-learn does, so that a degenerate validation split does not crash a long run.
    """
    y64, p64 = as_float64(y), as_float64(p)
    _check(y64, p64)
    if np.unique(y64).size < 2:
        return math.nan
    if _sk_roc_auc_score is None:
        return _np_auc(y64, p64)
    return float(_sk_roc_auc_score(y64, p64))


def logloss(y: Any, p: Any) -> float:
    """Mean binary cross-entropy of probabilities ``p`` for labels ``y`` (natural log)."""
    y64, p64 = as_float64(y), as_float64(p)
    _check(y64, p64)
    if _sk_log_loss is None:
        return _np_logloss(y64, p64)
    return float(_sk_log_loss(y64, p64, labels=[0.0, 1.0]))


def _np_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (both classes present)."""
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(p)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    pos = y == 1
    n_pos = float(pos.sum())
    n_neg = float(len(y) - n_pos)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _np_logloss(y: np.ndarray, p: np.ndarray) -> float:
    eps = np.finfo(np.float64).eps
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
