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

import torch

from flip.models.layers import MLP, IdModel, InnerProduct, OuterProduct


class PNN(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        product_type: str = "inner",
    ) -> int:
        if product_type == "inner":
            self.product = InnerProduct(self.num_fields)
        elif product_type == "outer":
            self.product = OuterProduct(self.embedding_dim)
        else:
            raise ValueError(f"product_type must be 'inner' or 'outer', got {product_type!r}")
        in_dim = self.num_fields * self.embedding_dim + self.product.output_dim
        self.dnn = MLP(in_dim, list(dnn_hidden_units), dropout, batch_norm)
        return self.dnn.output_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        z = torch.cat([e.flatten(1), self.product(e)], dim=1)  # (B, D + P)
        return self.dnn(z)  # (B, H)
