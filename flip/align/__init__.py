"""Modality alignment pretraining (paper §3.3): field-level masking, MLM / MTM / ICL, the pretraining module.

    from flip.align import FlipPretrainModel, load_feature_counts, pretrain_batch

Only torch (+ pyarrow / safetensors, lazily) is imported: this runs on a bare GPU machine.
"""

from __future__ import annotations

from flip.align.model import AlignmentSpec, FlipPretrainModel, load_feature_counts, pretrain_batch

__all__ = ["AlignmentSpec", "FlipPretrainModel", "load_feature_counts", "pretrain_batch"]
