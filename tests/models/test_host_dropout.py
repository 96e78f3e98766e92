"""Host dropout (``plm.fast_dropout``): the same dropout as torch's, from other random bits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flip.config import PlmConfig
from flip.models.host_dropout import (
    ATTENTION_NAME,
    HostDropout,
    host_dropout,
    host_dropout_attention,
    host_keep_mask,
)


def test_keep_mask_has_the_rate_of_dropout():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.1
    keep = host_keep_mask((1000, 2000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 2000)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # neighbouring elements are independent: P(both kept) = (1 - p)^2
    flat = keep.flatten().float()
    assert abs((flat[:-1] * flat[1:]).mean().item() - (1 - p) ** 2) < 6 * sigma


def test_masks_follow_torchs_seed_and_advance():
    torch.manual_seed(7)
    a, b = host_keep_mask((64, 64), 0.5), host_keep_mask((64, 64), 0.5)
    torch.manual_seed(7)
    a2 = host_keep_mask((64, 64), 0.5)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    # the state that decides the next mask is torch's CPU generator state (what the loop checkpoints)
    state = torch.get_rng_state()
    c = host_keep_mask((64, 64), 0.5)
    torch.set_rng_state(state)
    assert torch.equal(c, host_keep_mask((64, 64), 0.5))


def test_host_dropout_values_and_gradient():
    torch.manual_seed(1)
    h = torch.randn(300, 400, requires_grad=True)
    p = 0.25
    out = host_dropout(h, p)
    kept = out != 0
    torch.testing.assert_close(out[kept], h.detach()[kept] / (1 - p))
    out.sum().backward()
    torch.testing.assert_close(h.grad, kept.float() / (1 - p))


def test_module_is_identity_in_eval_and_drops_in_training():
    layer = HostDropout(0.3)
    h = torch.randn(50, 60)
    layer.eval()
    assert torch.equal(layer(h), h)
    layer.train()
    torch.manual_seed(3)
    out = layer(h)
    assert 0.2 < (out == 0).float().mean().item() < 0.4
    assert HostDropout(0.0).train()(h) is not None and torch.equal(HostDropout(0.0).train()(h), h)


def test_attention_equals_sdpa_when_nothing_is_dropped():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, 7, 4) for _ in range(3))
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[0, :, :, 5:] = False  # padding keys of row 0
    module = nn.Module()
    module.is_causal = False
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.5)
    # p below 2^-33: the threshold rounds to 0, every element is kept (scale 1 in float32)
    got, _ = host_dropout_attention(module, q, k, v, mask, dropout=1e-13, scaling=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # with dropout, each row's weights are the softmax's scaled by keep / (1 - p)
    got_none, _ = host_dropout_attention(module, q, k, v, None, dropout=1e-13, scaling=0.5)
    want_none, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.5)
    torch.testing.assert_close(got_none, want_none, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from helpers import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), corpus=["user is 1. item is 2."] * 4)


def test_encoder_with_host_dropout_is_the_same_model(tiny_bert_dir):
    from flip.models.plm import load_plm

    stock, tok = load_plm(PlmConfig(name=str(tiny_bert_dir), fast_dropout=False))
    fast, _ = load_plm(PlmConfig(name=str(tiny_bert_dir), fast_dropout=True))
    assert fast.model.config._attn_implementation == ATTENTION_NAME
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    # a loaded model is in evaluation mode, and so is every swapped module
    assert not any(m.training for m in fast.model.modules()) and not any(m.training for m in stock.model.modules())
    assert stock.state_dict().keys() == fast.state_dict().keys()
    enc = tok(["user is 1. item is 2.", "user is 3."], padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    stock.eval(), fast.eval()
    torch.testing.assert_close(fast(ids, attn), stock(ids, attn), rtol=0, atol=0)  # evaluation: the stock path
    fast.train()
    torch.manual_seed(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        a = fast(ids, attn)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::bernoulli_" not in ops and "aten::_safe_softmax" not in ops  # no torch dropout, no SDPA math
    torch.manual_seed(5)
    b = fast(ids, attn)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic under torch's seed
    assert not torch.allclose(a, fast.eval()(ids, attn))  # and it does drop
    a.sum().backward()  # gradients flow through the host path
    assert all(p.grad is not None for n, p in fast.named_parameters() if "word_embeddings" in n)


def test_saved_encoder_does_not_name_the_attention(tiny_bert_dir, tmp_path):
    import json

    from flip.models.plm import load_plm

    fast, _ = load_plm(PlmConfig(name=str(tiny_bert_dir), fast_dropout=True))
    fast.save_pretrained(tmp_path / "plm")
    config = json.loads((tmp_path / "plm" / "config.json").read_text())
    assert ATTENTION_NAME not in json.dumps(config)
    again, _ = load_plm(PlmConfig(name=str(tmp_path / "plm"), fast_dropout=False))
    assert again.model.config._attn_implementation != ATTENTION_NAME
