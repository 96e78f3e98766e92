"""xDeepFM (Lian et al., KDD'18): LR + CIN + DNN sharing one embedding, as in FuxiCTR.

    e   = Embedding(x)                              (B, F, d)
    c   = CIN(e)                                    (B, sum_k H_k)   sum-pooled feature maps
    h   = DNN(flatten(e))                           (B, H)
    v   = [c ; h]                                   (B, sum_k H_k + H)  = encode(x)
    y   = w^T v + b + sum_f w_lr[x_f]               (B,)         = logit(v) + LR(x)

The paper's (and FuxiCTR's) separate CIN and DNN output units sum to one ``Linear`` on the
concatenation, so ``logit`` on ``v`` is exactly the original model. The first-order LR term is
added in ``forward`` and is not part of ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.models.layers import CIN, MLP, IdModel, LogisticRegression


class XDeepFM(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        cin_layer_units: Sequence[int] = (128, 128),
    ) -> int:
        self.first_order = LogisticRegression(self.vocab_size)
        self.cin = CIN(self.num_fields, list(cin_layer_units))
        self.dnn = MLP(self.num_fields * self.embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        return self.cin.output_dim + self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        return torch.cat([self.cin(e), self.dnn(e.flatten(1))], dim=1)  # (B, sum H_k + H)
