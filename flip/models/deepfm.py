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
from typing import TYPE_CHECKING

import torch
from torch import nn

from flip.models.layers import MLP, FMInteraction, IdModel, LogisticRegression, init_weights

if TYPE_CHECKING:
    from flip.config import IdModelConfig


class DeepFM(IdModel):
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
        self.fm = FMInteraction()
        self.dnn = MLP(num_fields * embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        self.output_dim = embedding_dim + self.dnn.output_dim
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: IdModelConfig, num_fields: int, vocab_size: int) -> "DeepFM":
        return cls(num_fields, vocab_size, cfg.embedding_dim, cfg.dnn_hidden_units, cfg.dropout, cfg.batch_norm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        f = self.fm(e)  # (B, d)
        h = self.dnn(e.flatten(1))  # (B, H)
        return torch.cat([f, h], dim=1)  # (B, d + H)
