"""DeepFM (Guo et al., IJCAI'17): LR + FM + DNN sharing one embedding, as in FuxiCTR.

    e   = Embedding(x)                              (B, F, d)
    f   = 0.5 ((sum_f e_f)^2 - sum_f e_f^2)         (B, d)       FM interaction vector
    h   = DNN(flatten(e))                           (B, H)
    v   = [f ; h]                                   (B, d + H)   = encode(x)
    y   = w^T v + b + sum_f w_lr[x_f]               (B,)         = logit(v) + LR(x)

Choice of ``v``: the paper's FM term is ``sum_k f_k`` (a fixed all-ones weight on ``f``) and its
DNN ends in its own ``Linear(H, 1)``; here both are the slices of one learned ``Linear(d + H, 1)``
on ``v = [f ; h]``, so ``logit`` is linear in ``v`` (the FM weights become learnable, a strict
generalisation). The first-order LR term is added in ``forward`` and is not part of ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.models.layers import MLP, FMInteraction, IdModel, LogisticRegression


class DeepFM(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
    ) -> int:
        self.first_order = LogisticRegression(self.vocab_size)
        self.fm = FMInteraction()
        self.dnn = MLP(self.num_fields * self.embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        return self.embedding_dim + self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        f = self.fm(e)  # (B, d)
        h = self.dnn(e.flatten(1))  # (B, H)
        return torch.cat([f, h], dim=1)  # (B, d + H)
