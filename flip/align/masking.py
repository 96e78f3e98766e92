"""Field-level data masking (paper §3.3.1), vectorised over the batch.

Notation: ``B`` rows, ``F`` fields, ``L`` tokens.

**How many fields.** Each row masks exactly ``n = max(1, int(ratio * F))`` fields (0 when
``ratio <= 0``), drawn uniformly without replacement among the row's *available* fields. This is
the authors' count (``int(F * r)``: 1 of 8 fields at r = 0.15, 2 of 15), which the paper phrases
as "a ratio r of the fields"; the ``max(1, .)`` only matters when ``F * r < 1`` (e.g. 5 fields at
0.15), where plain ``int`` would mask nothing and silently switch the objective off. A fixed
count (not a Bernoulli draw per field) keeps every row's reconstruction task the same size. A
row with fewer than ``n`` available fields masks all of them; a row with none masks nothing
(the losses average over what was masked and handle an empty batch).

**Available fields.** On the text side a field is available when its value tokens survived
truncation completely (``tok_end > tok_start``, see ``flip.data.tokens``); on the tabular side
when its id is not padding.

**Text.** ``mask_text`` replaces *every* token of a chosen field's value with the mask token
(100 %, no BERT 80/10/10: the authors' choice) and leaves field names, "is" and punctuation
alone. The ablation "w/o field-level masking" (``mask_random_tokens``) masks the *same number of
tokens per row* as field-level masking would have, chosen uniformly among the row's non-special
tokens (field names included), so both variants have the same expected number of masked tokens.

**Tabular.** ``mask_tabular`` replaces the chosen fields' ids with the shared ``[MASK]`` feature
(global id 1), which is not field-specific (the paper, after MAP).

The random draws use an explicit ``torch.Generator`` (on the generator's device; results are
moved to the data's device) so that the training loop can make masking reproducible.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def fields_to_mask(num_fields: int, ratio: float) -> int:
    """Number of fields masked per row: ``max(1, int(ratio * F))``; 0 when ``ratio <= 0``."""
    if ratio <= 0 or num_fields <= 0:
        return 0
    return min(num_fields, max(1, int(num_fields * ratio)))


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def choose_random(candidates: torch.Tensor, count: torch.Tensor | int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per row, ``count`` positions drawn uniformly without replacement among ``candidates``.

    ``candidates`` (B, N) bool, ``count`` int or (B,) long. Returns (B, N) bool; a row with fewer
    candidates than ``count`` gets all of them.
    """
    B, N = candidates.shape
    scores = _uniform((B, N), generator, candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)  # non-candidates sort last
    order = scores.argsort(dim=1)  # (B, N) positions by random score
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    count = torch.as_tensor(count, device=candidates.device)
    if count.dim() == 1:
        count = count[:, None]
    return (ranks < count) & candidates


def choose_fields(batch_size: int, num_fields: int, ratio: float, generator: torch.Generator | None = None,
                  available: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, F) bool: the fields to mask, ``fields_to_mask(F, ratio)`` per row among ``available``.

    ``available`` (B, F) bool (default: every field). See the module docstring for the count.
    """
    if available is None:
        available = torch.ones(batch_size, num_fields, dtype=torch.bool, device=device)
    else:
        available = available.bool()
        if device is not None:
            available = available.to(device)
    if tuple(available.shape) != (batch_size, num_fields):
        raise ValueError(f"available has shape {tuple(available.shape)}, expected {(batch_size, num_fields)}")
    n = fields_to_mask(num_fields, ratio)
    if n == 0:
        return torch.zeros_like(available)
    return choose_random(available, n, generator)


def field_token_mask(tok_start: torch.Tensor, tok_end: torch.Tensor, chosen: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) bool: the tokens of the chosen fields' values.

    ``tok_start``/``tok_end`` (B, F) token spans ``[start, end)``, ``chosen`` (B, F) bool.
    """
    pos = torch.arange(length, device=tok_start.device)  # (L,)
    inside = (pos >= tok_start[..., None]) & (pos < tok_end[..., None])  # (B, F, L)
    return (inside & chosen.bool()[..., None]).any(dim=1)


def mask_text(input_ids: torch.Tensor, tok_start: torch.Tensor, tok_end: torch.Tensor, chosen: torch.Tensor,
              mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Field-level text masking: every value token of a chosen field becomes the mask token.

    ``input_ids`` (B, L), ``tok_start``/``tok_end`` (B, F), ``chosen`` (B, F) bool.
    Returns ``masked_ids`` (B, L) and ``mlm_labels`` (B, L): the original id at masked positions,
    ``-100`` elsewhere.
    """
    where = field_token_mask(tok_start, tok_end, chosen, input_ids.shape[1])
    return _apply_token_mask(input_ids, where, mask_token_id)


def mask_random_tokens(input_ids: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor | int,
                       mask_token_id: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level masking (ablation "w/o field-level masking"): ``count`` random tokens per row.

    ``candidates`` (B, L) bool: maskable tokens (real, non-special). ``count`` int or (B,).
    Returns ``masked_ids``, ``mlm_labels`` as ``mask_text``.
    """
    where = choose_random(candidates, count, generator)
    return _apply_token_mask(input_ids, where, mask_token_id)


def _apply_token_mask(input_ids: torch.Tensor, where: torch.Tensor, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    masked = input_ids.masked_fill(where, mask_token_id)
    labels = input_ids.masked_fill(~where, IGNORE_INDEX)
    return masked, labels


def maskable_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: real tokens that are not special ([CLS], [SEP], [PAD], [UNK], ...)."""
    special = torch.isin(input_ids, special_ids.to(input_ids.device))
    return attention_mask.bool() & ~special


def mask_tabular(x: torch.Tensor, chosen: torch.Tensor, mask_id: int = 1) -> torch.Tensor:
    """(B, F) ids -> (B, F) ids with the chosen fields replaced by the shared ``[MASK]`` feature."""
    return x.masked_fill(chosen.bool(), mask_id)


__all__ = ["IGNORE_INDEX", "choose_fields", "choose_random", "field_token_mask", "fields_to_mask",
           "mask_random_tokens", "mask_tabular", "mask_text", "maskable_tokens"]
