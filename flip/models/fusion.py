"""The finetuning models that read a language model (paper §3.4, Eq. 13-14).

    PlmClassifier(plm)                 (input_ids, attention_mask) -> (B,) logits     flip_plm, plm_scratch
    FlipModel(id_model, plm, alpha)    (x, input_ids, attention_mask) -> (joint, ID, PLM) logits    flip

``plm`` is a ``flip.models.plm.PlmEncoder`` (its ``sentence`` vector: [CLS] or the mean, ``plm.pooling``);
``id_model`` an ``IdModel``. Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn


class PlmClassifier(nn.Module):
    """A ``PlmEncoder`` + ``Linear(D, 1)`` on its [CLS] state: ``(input_ids, mask) -> (B,)`` logits."""

    def __init__(self, plm: nn.Module) -> None:
        super().__init__()
        self.plm = plm
        self.head = nn.Linear(int(plm.hidden_size), 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.plm.sentence(self.plm(input_ids, attention_mask), attention_mask)).squeeze(-1)


class FlipModel(nn.Module):
    """Eq. 13-14: ``α·logit_ID(x) + (1−α)·logit_PLM(text)``; ``forward`` returns (joint, ID, PLM) logits.

    ``logit_ID`` is the ID model's own forward (its ``fc`` = Linear_ID, plus a first-order term
    where the model has one); ``logit_PLM = plm_head([CLS])``; ``alpha`` a learnable (1,) scalar.
    """

    def __init__(self, id_model: nn.Module, plm: nn.Module, alpha_init: float = 0.0) -> None:
        super().__init__()
        self.id_model = id_model
        self.plm = plm
        self.plm_head = nn.Linear(int(plm.hidden_size), 1)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logit_id = self.id_model(x).float()  # (B,)
        sentence = self.plm.sentence(self.plm(input_ids, attention_mask), attention_mask)
        logit_plm = self.plm_head(sentence).squeeze(-1).float()  # (B,)
        alpha = self.alpha.float()
        joint = alpha * logit_id + (1.0 - alpha) * logit_plm  # (B,)
        return joint, logit_id, logit_plm


__all__ = ["FlipModel", "PlmClassifier"]
