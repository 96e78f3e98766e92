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

import torch

from flip.models.layers import MLP, CrossNet, IdModel


class DCN(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        cross_layers: int = 2,
    ) -> int:
        D = self.num_fields * self.embedding_dim
        self.cross = CrossNet(D, cross_layers)
        self.dnn = MLP(D, list(dnn_hidden_units), dropout, batch_norm)
        return D + self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(x).flatten(1)  # (B, D)
        return torch.cat([self.cross(x0), self.dnn(x0)], dim=1)  # (B, D + H)
