"""AFM (Xiao et al., IJCAI'17): attentional factorization machine, as in FuxiCTR.

    e     = Embedding(x)                                    (B, F, d)
    p_ij  = e_i * e_j                  i < j                (B, P, d)   P = F(F-1)/2
    a_ij  = softmax(h^T ReLU(W p_ij + b))                   (B, P, 1)
    v     = sum_ij a_ij p_ij                                (B, d)      = encode(x)
    y     = w^T v + b + sum_f w_lr[x_f]                     (B,)        = logit(v) + LR(x)

``w`` is the paper's projection ``p``; the global bias lives in ``logit``. ``dropout`` is applied
to the pooled vector ``v`` (the paper's dropout on the pair-wise interaction layer, applied after
pooling as in FuxiCTR's ``dropout2``). The first-order LR term is added in ``forward`` and is not
part of ``v``. ``dnn_hidden_units`` and ``batch_norm`` are not used.
"""

from __future__ import annotations


import torch

from flip.models.layers import AttentionPooling, Dropout, IdModel, LogisticRegression, PairwiseProduct


class AFM(IdModel):
    def build(
        self,
        *,
        dropout: float = 0.1,
        afm_attention_dim: int = 16,
    ) -> int:
        self.first_order = LogisticRegression(self.vocab_size)
        self.pairs = PairwiseProduct(self.num_fields)
        self.attention = AttentionPooling(self.embedding_dim, afm_attention_dim)
        self.dropout = Dropout(dropout)
        return self.embedding_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pairs(self.embed(x))  # (B, P, d)
        return self.dropout(self.attention(p))  # (B, d)
