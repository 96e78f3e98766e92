"""Field choice, tabular masking and the token-level ablation."""

from __future__ import annotations

import pytest
import torch

from flip.align.masking import (
    choose_fields,
    fields_to_mask,
    mask_random_tokens,
    mask_tabular,
    mask_text,
    maskable_tokens,
)


@pytest.mark.parametrize("F, ratio, n", [(8, 0.15, 1), (15, 0.15, 2), (5, 0.15, 1), (8, 0.0, 0), (8, 1.0, 8),
                                         (4, 0.5, 2), (1, 0.15, 1)])
def test_fields_to_mask_is_authors_count_with_at_least_one(F, ratio, n):
    assert fields_to_mask(F, ratio) == n


def test_choose_fields_counts_availability_and_reproducibility():
    B, F = 6, 8
    available = torch.ones(B, F, dtype=torch.bool)
    available[1, :6] = False  # 2 available
    available[2, :7] = False  # 1 available
    available[3] = False  # none
    for seed in range(20):
        chosen = choose_fields(B, F, 0.3, torch.Generator().manual_seed(seed), available)  # n = 2
        assert chosen.dtype == torch.bool and not (chosen & ~available).any()
        assert chosen.sum(1).tolist() == [2, 2, 1, 0, 2, 2]
    a = choose_fields(B, F, 0.3, torch.Generator().manual_seed(3), available)
    b = choose_fields(B, F, 0.3, torch.Generator().manual_seed(3), available)
    assert torch.equal(a, b)
    assert not choose_fields(B, F, 0.0, torch.Generator(), available).any()


def test_choose_fields_is_uniform_over_fields():
    B, F = 8000, 8
    chosen = choose_fields(B, F, 0.15, torch.Generator().manual_seed(0))
    assert (chosen.sum(1) == 1).all()
    freq = chosen.float().mean(0)  # each ~1/8 with sd ~0.0037
    assert torch.allclose(freq, torch.full((F,), 1 / F), atol=0.02)


def test_mask_text_labels_and_overlapping_choices():
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 10, 102, 0]])
    start, end = torch.tensor([[2, 5]]), torch.tensor([[4, 7]])
    masked, labels = mask_text(ids, start, end, torch.tensor([[True, True]]), 103)
    assert masked.tolist() == [[101, 5, 103, 103, 8, 103, 103, 102, 0]]
    assert labels.tolist() == [[-100, -100, 6, 7, -100, 9, 10, -100, -100]]
    masked, labels = mask_text(ids, start, end, torch.tensor([[False, False]]), 103)
    assert torch.equal(masked, ids) and (labels == -100).all()


def test_mask_tabular_uses_shared_mask_feature():
    x = torch.tensor([[5, 20, 33], [6, 21, 34]])
    chosen = torch.tensor([[True, False, False], [False, True, True]])
    assert mask_tabular(x, chosen).tolist() == [[1, 20, 33], [6, 1, 1]]
    assert mask_tabular(x, chosen, mask_id=7).tolist() == [[7, 20, 33], [6, 7, 7]]


def test_token_level_ablation_masks_same_count_never_specials():
    special = torch.tensor([101, 102, 0])
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 102, 0, 0], [101, 11, 12, 102, 0, 0, 0, 0, 0]])
    attn = (ids != 0).long()
    cand = maskable_tokens(ids, attn, special)
    assert cand.tolist()[1] == [False, True, True, False, False, False, False, False, False]
    count = torch.tensor([3, 5])  # row 1 has only 2 candidates
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(ids, dtype=torch.bool)
    for _ in range(50):
        masked, labels = mask_random_tokens(ids, cand, count, 103, g)
        where = labels != -100
        assert where.sum(1).tolist() == [3, 2]
        assert not (where & ~cand).any()
        assert (masked[where] == 103).all() and torch.equal(masked[~where], ids[~where])
        seen |= where
    assert torch.equal(seen, cand)  # every candidate token gets masked sometimes
