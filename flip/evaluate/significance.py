"""Paired comparison of two strategies' test AUCs on the same rows: DeLong's test, over seeds.

Each strategy is trained under several seeds, and each seed's model scores the same test rows. The
question "did A beat B here" is about the mean AUC over seeds, ``Δ = mean_s AUC(A_s) − mean_s
AUC(B_s)``: a linear contrast of the AUCs of ``k_A + k_B`` models scored on one set of rows.

DeLong, DeLong & Clarke-Pearson (1988) give the covariance of the AUCs of several scores on the
same rows from their *structural components* (placement values): for a positive row ``i`` of
score ``r``, ``V10[r, i]`` is the fraction of negatives it outranks (ties count one half); for a
negative row ``j``, ``V01[r, j]`` the fraction of positives that outrank it. Then

    AUC[r]       = mean_i V10[r, i] = mean_j V01[r, j]
    S            = cov(V10) / m + cov(V01) / n          (m positives, n negatives)
    Var(c · AUC) = cᵀ S c

The placement values are computed from mid-ranks in O(N log N) per score (Sun & Xu, 2014), and the
contrast ``c`` holds ``+1/k_A`` for A's seeds and ``−1/k_B`` for B's. The 95% interval is
``Δ ± 1.96·se`` and the two-sided p-value ``2Φ(−|Δ|/se)``. This interval is the uncertainty from
the finite test rows for the models that were trained; the spread of Δ over seeds (training noise)
is reported beside it, never folded in silently.

Only numpy and the standard library are used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["auc_covariance", "midranks", "paired_delta", "placement_values"]

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(x)]))
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def placement_values(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` (k, N), binary ``y`` (N,) -> ``V10`` (k, m) over positives, ``V01`` (k, n) over negatives."""
    y = np.asarray(y).reshape(-1).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("both classes are needed for an AUC comparison")
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for r, s in enumerate(scores):
        pos, neg = s[y], s[~y]
        tz = midranks(s)
        tx, ty = midranks(pos), midranks(neg)
        v10[r] = (tz[y] - tx) / n  # negatives below each positive (ties one half)
        v01[r] = 1.0 - (tz[~y] - ty) / m  # positives above each negative
    return v10, v01


def auc_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) of the ``scores`` rows and DeLong's covariance matrix (k, k) of them."""
    v10, v01 = placement_values(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    aucs = v10.mean(axis=1)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def paired_delta(y: np.ndarray, a: dict[Any, np.ndarray], b: dict[Any, np.ndarray]) -> dict[str, Any]:
    """Δ = mean AUC of ``a``'s seeds − mean AUC of ``b``'s, on the same rows, with DeLong's interval.

    ``a`` and ``b`` map seed -> probabilities (N,) aligned with ``y``. Returns ``delta``, ``se``,
    ``ci_low``/``ci_high`` (95%), ``p_value`` (two-sided, H0: equal mean AUC), ``rows``, the seeds,
    and the spread over seeds: ``per_seed`` (Δ of each seed present in both, else each of ``a``'s
    seeds against ``b``'s mean) and its ``seed_std`` (ddof=1; 0 for one seed).
    """
    keys_a, keys_b = list(a), list(b)
    if not keys_a or not keys_b:
        raise ValueError("each side needs at least one seed")
    scores = np.stack([np.asarray(a[k], dtype=np.float64) for k in keys_a] +
                      [np.asarray(b[k], dtype=np.float64) for k in keys_b])
    aucs, cov = auc_covariance(y, scores)
    ka, kb = len(keys_a), len(keys_b)
    c = np.concatenate([np.full(ka, 1.0 / ka), np.full(kb, -1.0 / kb)])
    delta = float(c @ aucs)
    var = float(max(c @ cov @ c, 0.0))
    se = math.sqrt(var)
    p = 2.0 * _normal_sf(abs(delta) / se) if se > 0 else (1.0 if delta == 0 else 0.0)
    auc_a = dict(zip(keys_a, aucs[:ka]))
    auc_b = dict(zip(keys_b, aucs[ka:]))
    shared = [k for k in keys_a if k in auc_b]
    per_seed = ({str(k): float(auc_a[k] - auc_b[k]) for k in shared} if shared else
                {str(k): float(auc_a[k] - np.mean(aucs[ka:])) for k in keys_a})
    vals = np.array(list(per_seed.values()))
    return {
        "delta": delta,
        "se": se,
        "ci_low": delta - Z95 * se,
        "ci_high": delta + Z95 * se,
        "p_value": float(p),
        "rows": int(len(np.asarray(y))),
        "seeds": [ka, kb],
        "per_seed": per_seed,
        "seed_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        "method": "DeLong test on the mean AUC over seeds (same test rows)",
    }
