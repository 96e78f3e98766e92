"""PNN (Qu et al., ICDM'16), as in FuxiCTR: a product layer then a DNN.

    e   = Embedding(x)                              (B, F, d)
    p   = [<e_i, e_j>]_{i<j}                        (B, P)       IPNN (default), P = F(F-1)/2
          or flatten(f_S f_S^T), f_S = sum_f e_f    (B, d*d)     OPNN (``product_type="outer"``)
    z   = [flatten(e) ; p]                          (B, D + P)   linear signals ++ product signals
    h   = DNN(z)                                    (B, H)       = v = encode(x)
    y   = w^T h + b                                 (B,)         = logit(v)

No first-order term. ``IdModelConfig`` has no product-type knob, so ``build_id_model`` builds the
IPNN used by FuxiCTR and the FLIP paper; OPNN is available through the constructor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flip.models.layers import MLP, IdModel, InnerProduct, OuterProduct, init_weights

if TYPE_CHECKING:
    from flip.config import IdModelConfig


class PNN(IdModel):
    def __init__(
        self,
        num_fields: int,
        vocab_size: int,
        embedding_dim: int = 32,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        product_type: str = "inner",
    ) -> None:
        super().__init__(num_fields, vocab_size, embedding_dim)
        if product_type == "inner":
            self.product = InnerProduct(num_fields)
        elif product_type == "outer":
            self.product = OuterProduct(embedding_dim)
        else:
            raise ValueError(f"product_type must be 'inner' or 'outer', got {product_type!r}")
        self.dnn = MLP(num_fields * embedding_dim + self.product.output_dim, list(dnn_hidden_units), dropout, batch_norm)
        self.output_dim = self.dnn.output_dim
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: IdModelConfig, num_fields: int, vocab_size: int) -> "PNN":
        return cls(num_fields, vocab_size, cfg.embedding_dim, cfg.dnn_hidden_units, cfg.dropout, cfg.batch_norm)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        z = torch.cat([e.flatten(1), self.product(e)], dim=1)  # (B, D + P)
        return self.dnn(z)  # (B, H)
