"""AutoInt (Song et al., CIKM'19), as in FuxiCTR: stacked multi-head self-attention over fields.

    e     = Embedding(x)                                        (B, F, d)
    a_0   = e
    a_l   = ReLU(MHSA(a_{l-1}) + W_res a_{l-1})   l = 1..L      (B, F, A)   A = attention_dim
    v     = flatten(a_L)                                        (B, F * A)  = encode(x)
    y     = w^T v + b                                           (B,)        = logit(v)

This is AutoInt itself (FuxiCTR's defaults: no DNN, no wide part, unscaled dot products,
residual connections); ``dnn_hidden_units`` and ``batch_norm`` are not used. ``dropout`` is applied
to the attention weights. No first-order term.
"""

from __future__ import annotations


import torch
from torch import nn

from flip.models.layers import IdModel, MultiHeadSelfAttention


class AutoInt(IdModel):
    def build(
        self,
        *,
        dropout: float = 0.1,
        attention_layers: int = 3,
        attention_heads: int = 2,
        attention_dim: int = 64,
    ) -> int:
        self.attention = nn.Sequential(
            *(
                MultiHeadSelfAttention(self.embedding_dim if i == 0 else attention_dim, attention_dim, attention_heads, dropout)
                for i in range(attention_layers)
            )
        )
        return self.num_fields * (attention_dim if attention_layers else self.embedding_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(self.embed(x))  # (B, F, A)
        return a.flatten(1)  # (B, F * A)
