"""Evaluation, one module per command: ``scoring`` (``flip evaluate``: every finetuned run on validation
and test, calibration, cold start, DeLong's paired test), ``drift`` (``flip drift``: Evidently, the one
drift computation), ``analysis`` (``flip analyze``: the alignment figures), ``ablations`` (``flip
ablations``: Table 5) and ``report`` (``flip report``). The metrics themselves (AUC, log loss) live below
both training and evaluation, in :mod:`flip.metrics`."""
