"""AFN (Cheng et al., AAAI'20): adaptive factorization network, as in FuxiCTR; AFN+ optionally.

    e   = Embedding(x)                                      (B, F, d)
    l   = BN(ln max(|e|, 1e-5))                             (B, F, d)
    y_j = BN(exp(sum_f w_{j,f} l_f))        j = 1..N        (B, N, d)   N = afn_log_neurons
    h   = DNN(flatten(y))                                   (B, H)
    g   = DNN'(flatten(e))                                  (B, H)      AFN+ only
    v   = h  (AFN)   or   [h ; g]  (AFN+)                               = encode(x)
    out = w^T v + b                                         (B,)        = logit(v)

Each logarithmic neuron ``y_j = prod_f |e_f|^{w_{j,f}}`` learns a cross feature of arbitrary order.
``afn_ensemble_dnn=True`` is AFN+ (the paper's stronger variant, FuxiCTR's ``ensemble_dnn=True``):
a plain DNN beside the logarithmic network, its output and the AFN tower's combined linearly
(FuxiCTR: a Linear(2, 1) over the two towers' scalar outputs; here one Linear over both towers'
last hidden layers, which contains that). Unlike FuxiCTR, the DNN reads the same embedding table
as the logarithmic network, not a second one: FLIP aligns one table. No first-order term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flip.models.layers import MLP, IdModel, LogTransform


class AFN(IdModel):
    def build(
        self,
        *,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        afn_log_neurons: int = 400,
        afn_ensemble_dnn: bool = False,
    ) -> int:
        self.log_transform = LogTransform(self.num_fields, afn_log_neurons)
        self.dnn = MLP(afn_log_neurons * self.embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        self.ensemble = (MLP(self.num_fields * self.embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
                         if afn_ensemble_dnn else None)
        return self.dnn.output_dim + (self.ensemble.output_dim if self.ensemble is not None else 0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)  # (B, F, d)
        h = self.dnn(self.log_transform(e))  # (B, H)
        if self.ensemble is None:
            return h
        return torch.cat([h, self.ensemble(e.flatten(1))], dim=1)  # (B, 2H)
