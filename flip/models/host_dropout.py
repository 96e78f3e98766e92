"""Dropout of the language model on the CPU, with masks from a fast bit generator (``plm.fast_dropout``).

    plm, tokenizer = load_plm(cfg.plm)        # cfg.plm.fast_dropout: True calls use_host_dropout(plm.model)

The maths is dropout's, ``h * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` i.i.d.; only where the random
bits come from changes. PyTorch's CPU ``bernoulli_`` draws every element from one Mersenne Twister, serially
(MKL's parallel path exists on Intel CPUs only), and a transformer's training step draws 19 masks per
pass, the attention ones of B x heads x L x L elements: on a 2-core AMD CPU that was ~15% of a FLIP
pretraining step, and the SDPA math kernel that attention dropout forces on the CPU added its safe
softmax and copies (README: the faster language-model step). Here a mask is

    keep = U >= round(p * 2^32),  U = 32-bit words of NumPy's PCG64 seeded with one 63-bit draw
                                      from torch's default CPU generator

so it costs one draw of torch's generator (whose state the training loop checkpoints: a run is
deterministic under its seed and resumes exactly) plus ~1 ms per million elements, and the same seed
gives the same masks on every CPU (torch's own masks differ between Intel and AMD). ``P(keep)`` is
``1 - round(p * 2^32) / 2^32``, within 2^-33 of ``1 - p`` (``torch.rand`` resolves 2^-24).

``use_host_dropout(model)`` swaps every ``nn.Dropout`` of a Hugging Face encoder for
:class:`HostDropout` (same ``p``, no parameters: the state dict is unchanged) and makes its attention
:func:`host_dropout_attention` (registered with transformers' ``AttentionInterface`` as
``flip_host_dropout``): softmax(QKᵀ·scale + mask) · dropout · V, as HF's eager attention, when
training on the CPU with p > 0; otherwise (evaluation, accelerators, torch.compile) the stock SDPA
function and ``F.dropout``. The attention name is not written by ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "flip_host_dropout"


def host_keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, True with probability 1 - p (module docstring), drawn with one
    63-bit draw of torch's default CPU generator."""
    n = 1
    for size in shape:
        n *= int(size)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
    words = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = words >= np.uint32(min(round(p * 2**32), 2**32 - 1))
    return torch.from_numpy(keep).view(tuple(shape))


def host_dropout(h: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of a CPU tensor in training: ``h * keep / (1 - p)``."""
    scale = host_keep_mask(h.shape, p).to(h.dtype).mul_(1.0 / (1.0 - p))
    return h * scale


def _host_path(h: torch.Tensor, p: float, training: bool) -> bool:
    compiling = getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()
    return training and 0.0 < p < 1.0 and h.device.type == "cpu" and not compiling


class HostDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training masks come from :func:`host_keep_mask`; ``F.dropout`` elsewhere."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not _host_path(h, self.p, self.training):
            return F.dropout(h, self.p, self.training, self.inplace)
        return host_dropout(h, self.p)


def host_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``): (B, H, L, d) query/key/value, the
    SDPA-style mask (bool, True = attend, or additive float, or None) -> ((B, L, H, d) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _host_path(query, dropout, True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = host_dropout(scores.softmax(dim=-1), dropout)
    out = torch.matmul(probs.to(value.dtype), value)  # (B, H, L, d)
    return out.transpose(1, 2).contiguous(), None


def use_host_dropout(model: nn.Module) -> nn.Module:
    """Give a Hugging Face encoder host dropout (module docstring); returns it. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, host_dropout_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", ATTENTION_NAME):
        config._attn_implementation = ATTENTION_NAME
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, HostDropout(child.p, child.inplace).train(child.training))
    return model


__all__ = ["ATTENTION_NAME", "HostDropout", "host_dropout", "host_dropout_attention", "host_keep_mask",
           "use_host_dropout"]
