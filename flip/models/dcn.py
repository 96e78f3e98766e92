"""DCN (Wang et al., ADKDD'17): cross network (v1) in parallel with a DNN, as in FuxiCTR.

    e   = Embedding(x)                         (B, F, d)
    x_0 = flatten(e)                           (B, D)       D = F * d
    c   = CrossNet(x_0)                        (B, D)       x_{l+1} = x_0 (x_l . w_l) + b_l + x_l
    h   = DNN(x_0)                             (B, H)
    v   = [c ; h]                              (B, D + H)   = encode(x)
    y   = w^T v + b                            (B,)         = logit(v)

No first-order term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flip.models.layers import MLP, CrossNet, IdModel, init_weights

if TYPE_CHECKING:
    from flip.config import IdModelConfig


class DCN(IdModel):
    def __init__(
        self,
        num_fields: int,
        vocab_size: int,
        embedding_dim: int = 32,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        cross_layers: int = 2,
    ) -> None:
        super().__init__(num_fields, vocab_size, embedding_dim)
        D = num_fields * embedding_dim
        self.cross = CrossNet(D, cross_layers)
        self.dnn = MLP(D, list(dnn_hidden_units), dropout, batch_norm)
        self.output_dim = D + self.dnn.output_dim
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: IdModelConfig, num_fields: int, vocab_size: int) -> "DCN":
        return cls(
            num_fields, vocab_size, cfg.embedding_dim, cfg.dnn_hidden_units, cfg.dropout, cfg.batch_norm,
            cfg.cross_layers,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(x).flatten(1)  # (B, D)
        return torch.cat([self.cross(x0), self.dnn(x0)], dim=1)  # (B, D + H)
