"""DCNv2 (Wang et al., WWW'21), parallel structure, as in FuxiCTR and the FLIP authors' code.

    e   = Embedding(x)                         (B, F, d)    one shared table
    x_0 = flatten(e)                           (B, D)       D = F * d
    c   = CrossNet(x_0)                        (B, D)       full-rank CrossNetV2 or DCN-Mix
    h   = DNN(x_0)                             (B, H)       H = dnn_hidden_units[-1]
    v   = [c ; h]                              (B, D + H)   = encode(x)
    y   = w^T v + b                            (B,)         = logit(v)

``low_rank_mixture=True`` (the default, as in the FLIP authors' code) uses DCN-Mix: a mixture of
``num_experts`` low-rank (rank ``low_rank``) experts per cross layer; ``False`` uses the full-rank
``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (FuxiCTR's default). No first-order term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.models.layers import MLP, CrossNetMix, CrossNetV2, IdModel


class DCNv2(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        cross_layers: int = 2,
        low_rank_mixture: bool = True,
        low_rank: int = 32,
        num_experts: int = 4,
    ) -> int:
        D = self.num_fields * self.embedding_dim
        if low_rank_mixture:
            self.cross = CrossNetMix(D, cross_layers, low_rank, num_experts)
        else:
            self.cross = CrossNetV2(D, cross_layers)
        self.dnn = MLP(D, list(dnn_hidden_units), dropout, batch_norm)
        return D + self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(x).flatten(1)  # (B, D)
        c = self.cross(x0)  # (B, D)
        h = self.dnn(x0)  # (B, H)
        return torch.cat([c, h], dim=1)  # (B, D + H)
