"""Wide & Deep (Cheng et al., DLRS'16), as in FuxiCTR: a wide (first-order LR) part plus a DNN.

    e   = Embedding(x)                              (B, F, d)
    h   = DNN(flatten(e))                           (B, H)       = v = encode(x)
    y   = w^T h + b + sum_f w_lr[x_f]               (B,)         = logit(v) + LR(x)

The wide part uses the raw feature ids only (no hand-crafted cross features, as in FuxiCTR); it
is the first-order term added in ``forward`` and is not part of ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flip.models.layers import MLP, IdModel, LogisticRegression, init_weights

if TYPE_CHECKING:
    from flip.config import IdModelConfig


class WideDeep(IdModel):
    def __init__(
        self,
        num_fields: int,
        vocab_size: int,
        embedding_dim: int = 32,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, vocab_size, embedding_dim)
        self.first_order = LogisticRegression(vocab_size)
        self.dnn = MLP(num_fields * embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        self.output_dim = self.dnn.output_dim
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: IdModelConfig, num_fields: int, vocab_size: int) -> "WideDeep":
        return cls(num_fields, vocab_size, cfg.embedding_dim, cfg.dnn_hidden_units, cfg.dropout, cfg.batch_norm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dnn(self.embed(x).flatten(1))  # (B, H)
