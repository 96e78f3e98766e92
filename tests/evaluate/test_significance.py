"""DeLong's paired test against hand computations, brute force and a bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flip.evaluate.significance import auc_covariance, midranks, paired_delta, placement_values


def test_midranks_average_ties():
    assert midranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_placement_values_by_hand():
    # positives score 0.9, 0.4; negatives 0.4, 0.1, 0.2
    y = np.array([1, 1, 0, 0, 0])
    s = np.array([0.9, 0.4, 0.4, 0.1, 0.2])
    v10, v01 = placement_values(y, s)
    # 0.9 beats all three negatives; 0.4 beats 0.1 and 0.2 and ties 0.4 (one half)
    assert v10[0].tolist() == pytest.approx([1.0, 2.5 / 3])
    # negative 0.4: beaten by 0.9, tied with 0.4 -> 1.5/2; 0.1 and 0.2: beaten by both
    assert v01[0].tolist() == pytest.approx([0.75, 1.0, 1.0])
    aucs, cov = auc_covariance(y, s)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s)) == pytest.approx((1 + 2.5 / 3) / 2)
    # S = var(V10)/m + var(V01)/n with ddof=1, by hand
    var10 = np.var([1.0, 2.5 / 3], ddof=1)
    var01 = np.var([0.75, 1.0, 1.0], ddof=1)
    assert cov[0, 0] == pytest.approx(var10 / 2 + var01 / 3)


def test_covariance_matches_brute_force_placements():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    scores = np.stack([y + rng.normal(0, 1, 60), y + rng.normal(0, 1.5, 60), np.round(rng.random(60), 1)])
    aucs, cov = auc_covariance(y, scores)
    pos, neg = y == 1, y == 0

    def psi(a, b):
        return (a > b) + 0.5 * (a == b)

    v10 = np.array([[np.mean(psi(p, s[neg])) for p in s[pos]] for s in scores])
    v01 = np.array([[np.mean(psi(s[pos], q)) for q in s[neg]] for s in scores])
    expected = np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()
    assert np.allclose(cov, expected)
    assert np.allclose(aucs, [roc_auc_score(y, s) for s in scores])


@pytest.mark.slow
def test_paired_delta_contrast_over_seeds_and_bootstrap_agreement():
    rng = np.random.default_rng(1)
    n = 4000
    y = rng.integers(0, 2, n)
    base = y * 0.8 + rng.normal(0, 1, n)
    a = {s: base + 0.35 * y + rng.normal(0, 0.3, n) for s in (1, 2, 3)}  # better than b
    b = {s: base + rng.normal(0, 0.3, n) for s in (1, 2, 3)}
    out = paired_delta(y, a, b)
    aucs_a = [roc_auc_score(y, a[s]) for s in a]
    aucs_b = [roc_auc_score(y, b[s]) for s in b]
    assert out["delta"] == pytest.approx(np.mean(aucs_a) - np.mean(aucs_b))
    assert out["per_seed"] == pytest.approx({str(s): aucs_a[i] - aucs_b[i] for i, s in enumerate(a)})
    assert out["seed_std"] == pytest.approx(np.std(np.array(aucs_a) - np.array(aucs_b), ddof=1))
    assert out["ci_low"] < out["delta"] < out["ci_high"] and out["p_value"] < 1e-3
    # the paired bootstrap over rows estimates the same standard error
    deltas = []
    for _ in range(300):
        i = rng.integers(0, n, n)
        deltas.append(np.mean([roc_auc_score(y[i], a[s][i]) for s in a]) -
                      np.mean([roc_auc_score(y[i], b[s][i]) for s in b]))
    assert np.std(deltas) == pytest.approx(out["se"], rel=0.2)


def test_identical_scores_give_no_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = rng.random(200)
    out = paired_delta(y, {0: s}, {0: s.copy()})
    assert out["delta"] == 0 and out["p_value"] == 1.0 and out["se"] == 0


def test_null_difference_is_not_significant():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 3000)
    out = paired_delta(y, {0: y + rng.normal(0, 1, 3000)}, {0: y + rng.normal(0, 1, 3000)})
    assert out["p_value"] > 0.01 and out["ci_low"] < 0 < out["ci_high"]
    assert math.isclose(out["ci_high"] - out["delta"], 1.959963984540054 * out["se"])
