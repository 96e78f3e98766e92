"""End to end on a real processed dataset: 100 AdamW steps make every objective's loss fall.

(ICL sits on a plateau near log(B) for the first few dozen joint steps: the ID model's embeddings
start tiny, so v, and hence the plain linear z_tab of the paper, hardly differ between rows.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import small_id_config

from flip.align import FlipPretrainModel, load_feature_counts, pretrain_batch
from flip.config import PlmConfig, PretrainConfig
from flip.data.tensors import batches, load_meta, load_tabular
from flip.data.tokens import tokenize_split
from flip.models import build_id_model
from flip.models.plm import load_plm


def evaluate(model, x, tokens, idx_list, seed=123):
    """Losses on fixed batches with fixed masks / noise (eval mode: no dropout)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for idx in idx_list:
            out = model(pretrain_batch(x, tokens, idx), g)
            for k in ("mlm", "mtm", "icl"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + out[k].item() / len(idx_list)
    model.train()
    return sums


def setup(synthetic_dir, bert_dir, tmp_path, **cfg):
    torch.manual_seed(0)
    meta = load_meta(synthetic_dir)
    plm, tok = load_plm(PlmConfig(name=str(bert_dir), max_length=64))
    tokens = tokenize_split(synthetic_dir, "train", tok, 64, tmp_path / "tok", progress=False)
    tab = load_tabular(synthetic_dir, "train")
    assert len(tokens) == len(tab) == 4000 and tokens.available.all()  # nothing truncated at 64
    id_model = build_id_model(small_id_config(), len(meta["fields"]), meta["vocab_size"])
    counts = load_feature_counts(synthetic_dir, meta["vocab_size"])
    return FlipPretrainModel(id_model, plm, PretrainConfig(**cfg), meta, counts), tab, tokens


def train(model, tab, tokens, steps, lr=2e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    done = 0
    for epoch in range(100):
        for idx in batches(3000, 64, generator=torch.Generator().manual_seed(epoch), shuffle=True):
            out = model(pretrain_batch(tab.x, tokens, idx), g)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            done += 1
            if done == steps:
                return


HELD_OUT = [torch.arange(3000 + 64 * i, 3064 + 64 * i) for i in range(4)]  # rows never trained on


@pytest.mark.slow
def test_all_losses_fall_on_synthetic(synthetic_dir, bert_dir, tmp_path):
    model, tab, tokens = setup(synthetic_dir, bert_dir, tmp_path)
    before = evaluate(model, tab.x, tokens, HELD_OUT)
    train(model, tab, tokens, steps=100)
    after = evaluate(model, tab.x, tokens, HELD_OUT)
    for name in ("mlm", "mtm", "icl"):
        assert after[name] < 0.9 * before[name], (name, before, after)


@pytest.mark.slow
def test_exact_softmax_mtm_falls_on_synthetic(synthetic_dir, bert_dir, tmp_path):
    model, tab, tokens = setup(synthetic_dir, bert_dir, tmp_path, mtm_loss="softmax", mlm_weight=0.0,
                               icl_weight=0.0)
    before = evaluate(model, tab.x, tokens, HELD_OUT)
    train(model, tab, tokens, steps=40)
    after = evaluate(model, tab.x, tokens, HELD_OUT)
    assert after["mtm"] < 0.9 * before["mtm"], (before, after)
