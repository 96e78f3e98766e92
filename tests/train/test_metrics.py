"""flip.metrics: AUC and log loss agree with scikit-learn and with hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from flip.metrics import auc, logloss


def test_auc_by_hand():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs (pos > neg): (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-15)
    # a tie counts one half: pos 0.5 vs neg 0.5 -> 0.5, pos 0.9 vs neg 0.5 -> 1, of 2 pairs
    assert auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75, abs=1e-15)
    assert auc([1, 0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2, 0.7]) == 1.0


def test_logloss_by_hand():
    y, p = [1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.5)) / 4
    assert logloss(y, p) == pytest.approx(expected, rel=1e-12)


def test_match_sklearn_on_fixed_arrays():
    rng = np.random.default_rng(123)
    y = rng.integers(0, 2, 1000)
    p = np.clip(rng.random(1000) * 0.6 + 0.4 * y, 0, 1).astype(np.float32)  # float32 input
    assert auc(y, p) == roc_auc_score(y, p.astype(np.float64))
    assert logloss(y, p) == log_loss(y, p.astype(np.float64))
    assert isinstance(auc(y, p), float) and isinstance(logloss(y, p), float)


def test_accepts_tensors_and_clips_like_sklearn():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # two certain mistakes
    value = logloss(y, p)
    assert math.isfinite(value)
    assert value == log_loss(y.numpy(), p.numpy())
    assert auc(y, p) == roc_auc_score(y.numpy(), p.numpy())


def test_single_class_auc_is_nan_and_logloss_defined():
    assert math.isnan(auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert logloss([1, 1], [0.5, 0.5]) == pytest.approx(math.log(2))


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        auc([0, 1], [0.5])
    with pytest.raises(ValueError):
        logloss([], [])


def test_numpy_metric_fallbacks_match_sklearn():
    from flip import metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000).astype(np.float64)
    p = np.round(rng.random(5000), 2)  # many ties
    p[:3] = [0.0, 1.0, 1.0]
    assert metrics._np_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert metrics._np_logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
