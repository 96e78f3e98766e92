"""Evaluation of CTR predictions: ranking and probability metrics (``metrics``); calibration, cold-start
and monitoring live in their own modules."""

from flip.evaluate.metrics import auc, logloss

__all__ = ["auc", "logloss"]
