"""AFN (Cheng et al., AAAI'20): adaptive factorization network, as in FuxiCTR (``ensemble_dnn=False``).

    e   = Embedding(x)                                      (B, F, d)
    l   = BN(ln max(|e|, 1e-5))                             (B, F, d)
    y_j = BN(exp(sum_f w_{j,f} l_f))        j = 1..N        (B, N, d)   N = afn_log_neurons
    h   = DNN(flatten(y))                                   (B, H)      = v = encode(x)
    out = w^T h + b                                         (B,)        = logit(v)

Each logarithmic neuron ``y_j = prod_f |e_f|^{w_{j,f}}`` learns a cross feature of arbitrary order.
AFN+ (the ensemble with a second, separately embedded DNN) is not built: FLIP aligns the single
shared embedding table. No first-order term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flip.models.layers import MLP, IdModel, LogTransform, init_weights

if TYPE_CHECKING:
    from flip.config import IdModelConfig


class AFN(IdModel):
    def __init__(
        self,
        num_fields: int,
        vocab_size: int,
        embedding_dim: int = 32,
        dnn_hidden_units: Sequence[int] = (300, 300, 128),
        dropout: float = 0.1,
        batch_norm: bool = False,
        afn_log_neurons: int = 400,
    ) -> None:
        super().__init__(num_fields, vocab_size, embedding_dim)
        self.log_transform = LogTransform(num_fields, afn_log_neurons)
        self.dnn = MLP(afn_log_neurons * embedding_dim, list(dnn_hidden_units), dropout, batch_norm)
        self.output_dim = self.dnn.output_dim
        self.fc = nn.Linear(self.output_dim, 1)
        self.apply(init_weights)

    @classmethod
    def from_config(cls, cfg: IdModelConfig, num_fields: int, vocab_size: int) -> "AFN":
        return cls(
            num_fields, vocab_size, cfg.embedding_dim, cfg.dnn_hidden_units, cfg.dropout, cfg.batch_norm,
            cfg.afn_log_neurons,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        y = self.log_transform(self.embed(x))  # (B, N * d)
        return self.dnn(y)  # (B, H)
