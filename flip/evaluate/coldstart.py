"""AUC by how often a user (or item) was seen in training: does text help sparse interactions?"""

from __future__ import annotations

from typing import Any

import numpy as np

# training-frequency buckets: [lo, hi] inclusive; 0 = never seen in training (cold start)
BUCKETS = [(0, 0), (1, 5), (6, 20), (21, 100), (101, 10**12)]


def bucket_name(lo: int, hi: int) -> str:
    return "0 (cold)" if hi == 0 else (f"{lo}+" if hi >= 10**12 else f"{lo}-{hi}")


def auc_by_frequency(ids: np.ndarray, y: np.ndarray, p: np.ndarray, train_counts: np.ndarray, *,
                     min_rows: int = 100) -> list[dict[str, Any]]:
    """Split rows by the training frequency of their id (``train_counts[id]``) and score each bucket.

    ``ids`` are global feature ids of one field (a field's OOV id has count 0: cold start);
    ``train_counts`` counts them in the rows the model trained on. A bucket with fewer than
    ``min_rows`` rows, or with one class only, is marked ``too_few_rows``: its AUC is noise.
    """
    from sklearn.metrics import log_loss, roc_auc_score

    freq = np.asarray(train_counts)[np.asarray(ids)]
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    out = []
    for lo, hi in BUCKETS:
        sel = (freq >= lo) & (freq <= hi)
        n = int(sel.sum())
        both = n > 0 and 0 < y[sel].sum() < n
        out.append({
            "bucket": bucket_name(lo, hi), "lo": lo, "hi": hi, "rows": n, "too_few_rows": n < min_rows or not both,
            "positive_rate": float(y[sel].mean()) if n else None,
            "auc": float(roc_auc_score(y[sel], p[sel])) if both else None,
            "logloss": float(log_loss(y[sel], np.clip(p[sel], 1e-7, 1 - 1e-7), labels=[0, 1])) if n else None,
        })
    return out
