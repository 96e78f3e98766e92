"""Wide & Deep (Cheng et al., DLRS'16), as in FuxiCTR: a wide (first-order LR) part plus a DNN.

    e   = Embedding(x)                              (B, F, d)
    h   = DNN(flatten(e))                           (B, H)       = v = encode(x)
    y   = w^T h + b + sum_f w_lr[x_f]               (B,)         = logit(v) + LR(x)

The wide part uses the raw feature ids only (no hand-crafted cross features, as in FuxiCTR); it
is the first-order term added in ``forward`` and is not part of ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.models.layers import MLP, IdModel, LogisticRegression


class WideDeep(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
    ) -> int:
        self.first_order = LogisticRegression(self.vocab_size)
        self.dnn = MLP(self.num_fields * self.embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        return self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dnn(self.embed(x).flatten(1))  # (B, H)
