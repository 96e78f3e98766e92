"""Evaluation of finetuned runs: calibration, cold start, drift monitoring (Evidently), DeLong's paired
test, the alignment analysis, the Table 5 ablations and the report. The metrics themselves (AUC, log
loss) live below both training and evaluation, in :mod:`flip.metrics`."""
