"""FlipPretrainModel: which encoder passes run, which parameters one step changes, masks, states."""

from __future__ import annotations

import pytest
import torch
from helpers import small_id_config

from flip.align import FlipPretrainModel, load_feature_counts, pretrain_batch
from flip.align.masking import field_token_mask
from flip.config import PlmConfig, PretrainConfig
from flip.data.tensors import load_meta, load_tabular
from flip.data.tokens import tokenize_split
from flip.models import build_id_model
from flip.models.plm import load_plm


@pytest.fixture(scope="module")
def data(synthetic_dir, bert, tmp_path_factory):
    meta = load_meta(synthetic_dir)
    tokens = tokenize_split(synthetic_dir, "train", bert[1], 64, tmp_path_factory.mktemp("tok"), progress=False)
    tab = load_tabular(synthetic_dir, "train")
    counts = load_feature_counts(synthetic_dir, meta["vocab_size"])
    return meta, tab, tokens, counts


def build(data, bert_dir, seed=0, **cfg):
    meta, _, _, counts = data
    torch.manual_seed(seed)
    id_model = build_id_model(small_id_config(), len(meta["fields"]), meta["vocab_size"])
    plm, _ = load_plm(PlmConfig(name=str(bert_dir), max_length=64))
    return FlipPretrainModel(id_model, plm, PretrainConfig(**cfg), meta, counts)


def batch_of(data, n=16, start=0):
    _, tab, tokens, _ = data
    return pretrain_batch(tab.x, tokens, torch.arange(start, start + n))


def count_calls(model):
    calls = {"plm": 0, "id": 0}
    real_plm, real_encode = model.plm.forward, model.id_model.encode

    def plm_forward(*a, **k):
        calls["plm"] += 1
        return real_plm(*a, **k)

    def encode(*a, **k):
        calls["id"] += 1
        return real_encode(*a, **k)

    model.plm.forward, model.id_model.encode = plm_forward, encode
    return calls


@pytest.mark.parametrize("weights, joint, passes", [
    ((1, 1, 1), True, (2, 2)),
    ((0, 1, 1), True, (1, 2)),   # no MLM: no masked-text pass
    ((1, 0, 1), True, (2, 1)),   # no MTM: no masked-table pass
    ((0, 0, 1), True, (1, 1)),   # CTRL: complete text + complete table only
    ((1, 0, 0), True, (1, 1)),   # MLM alone: masked text + complete table (v)
    ((1, 0, 0), False, (1, 0)),  # MLM alone w/o joint reconstruction: no ID model at all
    ((0, 1, 0), False, (0, 1)),  # MTM alone w/o joint reconstruction: no PLM at all
])
def test_encoder_passes_and_skipped_objectives(data, bert_dir, weights, joint, passes):
    model = build(data, bert_dir, mlm_weight=weights[0], mtm_weight=weights[1], icl_weight=weights[2],
                  joint_reconstruction=joint)
    calls = count_calls(model)
    out = model(batch_of(data), torch.Generator().manual_seed(0))
    assert (calls["plm"], calls["id"]) == passes
    for name, w in zip(("mlm", "mtm", "icl"), weights):
        assert (getattr(model, name) is None) == (w == 0)
        assert (name in out) == (w > 0) and (f"{name}_acc" in out) == (w > 0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


def test_loss_is_weighted_sum(data, bert_dir):
    model = build(data, bert_dir, mlm_weight=0.5, mtm_weight=2.0, icl_weight=3.0).eval()
    out = model(batch_of(data), torch.Generator().manual_seed(1))
    assert out["loss"].item() == pytest.approx((0.5 * out["mlm"] + 2.0 * out["mtm"] + 3.0 * out["icl"]).item(), rel=1e-6)
    again = model(batch_of(data), torch.Generator().manual_seed(1))  # same generator seed, eval: identical
    assert all(torch.equal(out[k], again[k]) for k in out)
    with pytest.raises(ValueError):
        build(data, bert_dir, mlm_weight=0, mtm_weight=0, icl_weight=0)


def changed_params(model, batch, steps=1):
    """Parameters that one AdamW step moves. eps = 1e-30 so that any nonzero gradient moves its
    parameter: at initialisation some gradients are ~1e-17 (the ID embeddings start at N(0, 1e-4)
    and e.g. the DCN-Mix gate sees their products), which the default eps = 1e-8 would round away."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-30)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(batch, g)["loss"].backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}, before


@pytest.mark.parametrize("weights, joint", [((1, 1, 1), True), ((0, 1, 1), True), ((0, 0, 1), True),
                                            ((1, 1, 0), False)])
def test_one_step_changes_exactly_the_expected_parameters(data, bert_dir, weights, joint):
    model = build(data, bert_dir, mlm_weight=weights[0], mtm_weight=weights[1], icl_weight=weights[2],
                  joint_reconstruction=joint)
    batch = batch_of(data, n=32)
    changed, before = changed_params(model, batch)
    names = {n for n, _ in model.named_parameters()}
    # The ID model's prediction layer is not part of v = encode(x): pretraining never touches it.
    unused = {n for n in names if n.startswith("id_model.fc.") or n.startswith("id_model.lr.")}
    assert unused and not (changed & unused)
    assert changed == names - unused, sorted((names - unused) - changed)
    groups = {"id_model.embedding", "id_model.", "plm.model.embeddings.word_embeddings", "plm.model.encoder."}
    groups |= {"mlm.head."} if weights[0] else set()
    groups |= {"mtm.heads.", "mtm.out_embedding", "mtm.out_bias"} if weights[1] else set()
    groups |= {"mtm.attention.Q"} if weights[1] and joint else set()
    groups |= {"icl.text_proj", "icl.tab_proj"} if weights[2] else set()
    for prefix in groups:
        assert any(n.startswith(prefix) for n in changed), prefix
    assert (model.mlm is not None and model.mlm.head.dense.in_features == 32 + (model.id_model.output_dim if joint else 0)) \
        or not weights[0]
    assert (model.mtm is None) or ((model.mtm.attention is None) == (not joint))
    # padding rows never move; the shared [MASK] feature moves only when MTM masks the table
    emb = model.id_model.embedding.weight
    assert torch.equal(emb[0], before["id_model.embedding.weight"][0])
    assert torch.equal(emb[1], before["id_model.embedding.weight"][1]) == (weights[1] == 0)
    words = model.plm.model.embeddings.word_embeddings.weight
    pad = model.plm.pad_token_id
    assert torch.equal(words[pad], before["plm.model.embeddings.word_embeddings.weight"][pad])


def test_same_fields_and_availability(data, bert_dir):
    model = build(data, bert_dir, same_fields=True, text_mask_ratio=0.3)
    batch = batch_of(data, n=64)
    m = model.mask(batch, torch.Generator().manual_seed(0))
    assert torch.equal(m["text_fields"], m["tab_fields"]) and (m["tab_fields"].sum(1) == 2).all()
    assert torch.equal(m["x_masked"] == 1, m["tab_fields"])
    model = build(data, bert_dir, same_fields=False)
    m = model.mask(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(m["text_fields"], m["tab_fields"])
    assert (m["text_fields"].sum(1) == 1).all() and (m["tab_fields"].sum(1) == 1).all()  # 8 fields, r = 0.15


def test_token_level_masking_ablation_same_count(data, bert_dir):
    model = build(data, bert_dir, field_level_masking=False)
    batch = batch_of(data, n=64)
    m = model.mask(batch, torch.Generator().manual_seed(0))
    where = m["mlm_labels"] != -100
    field_count = field_token_mask(batch["field_tok_start"], batch["field_tok_end"], m["text_fields"],
                                   batch["input_ids"].shape[1]).sum(1)
    assert torch.equal(where.sum(1), field_count)
    assert not torch.isin(batch["input_ids"][where], model.special_ids).any()
    assert (m["masked_ids"][where] == model.plm.mask_token_id).all()
    fl = build(data, bert_dir).mask(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(fl["mlm_labels"] != -100, where)  # a different set of tokens


def test_all_fields_truncated_gives_zero_mlm_not_nan(data, bert_dir):
    model = build(data, bert_dir)
    batch = batch_of(data)
    batch = {**batch, "field_tok_start": torch.zeros_like(batch["field_tok_start"]),
             "field_tok_end": torch.zeros_like(batch["field_tok_end"])}
    out = model(batch, torch.Generator().manual_seed(0))
    assert out["mlm"].item() == 0.0 and int(out["mlm_tokens"]) == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_state_helpers_roundtrip(data, bert_dir, tmp_path):
    from safetensors.torch import load_file

    model = build(data, bert_dir)
    changed_params(model, batch_of(data))
    parts = FlipPretrainModel.split_state_dict(model.state_dict())
    assert parts["id_model"].keys() == model.id_model_state().keys()
    assert parts["plm"].keys() == model.plm_state().keys()
    assert all(k.split(".")[0] in {"mlm", "mtm", "icl"} for k in parts["heads"])

    meta = data[0]
    fresh_id = build_id_model(small_id_config(), len(meta["fields"]), meta["vocab_size"])
    fresh_id.load_state_dict(parts["id_model"])
    fresh_plm, _ = load_plm(PlmConfig(name=str(bert_dir)))
    fresh_plm.load_state_dict(model.plm_state())
    x = batch_of(data)
    model.eval(), fresh_id.eval(), fresh_plm.eval()
    assert torch.equal(fresh_id.encode(x["x"]), model.id_model.encode(x["x"]))
    assert torch.equal(fresh_plm(x["input_ids"], x["attention_mask"]), model.plm(x["input_ids"], x["attention_mask"]))

    out = model.save_parts(tmp_path / "parts")
    ids = load_file(str(out / "id_model.safetensors"))
    assert all(torch.equal(ids[k], v) for k, v in model.id_model_state().items())
    saved_plm, _ = load_plm(PlmConfig(name=str(out / "plm")))
    saved_plm.eval()
    assert torch.allclose(saved_plm(x["input_ids"], x["attention_mask"]), model.plm(x["input_ids"], x["attention_mask"]))


def _loss_and_grads(model, batch, seed=3):
    masks = model.mask(batch, torch.Generator().manual_seed(seed))
    out = model(batch, torch.Generator().manual_seed(seed + 1), masks)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_one_text_pass_computes_the_two_passes_function(data, bert_dir):
    """``one_text_pass``: one PLM call over [complete; masked] text; without dropout (eval mode) the
    losses and every gradient are those of the two calls (to float rounding of the larger matmuls)."""
    batch = batch_of(data, 24)
    two, one = build(data, bert_dir), build(data, bert_dir)
    one.one_text_pass = True
    calls = count_calls(one)
    for m in (two, one):
        m.eval()
    (out2, g2), (out1, g1) = _loss_and_grads(two, batch), _loss_and_grads(one, batch)
    assert calls["plm"] == 1
    for key in ("loss", "mlm", "mtm", "icl"):
        assert torch.allclose(out1[key], out2[key], rtol=1e-5, atol=1e-6), key
    assert g1.keys() == g2.keys()
    for name in g2:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_compiled_plm_computes_the_same_losses(data, bert_dir):
    """``pretrain.compile``: ``torch.compile`` of the PLM (in place, dynamic shapes) gives the eager
    losses and gradients on a tiny model; skipped where the compiler toolchain is missing."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for torch.compile's CPU backend")
    eager, compiled = build(data, bert_dir), build(data, bert_dir)
    compiled.plm.compile(dynamic=True)
    for m in (eager, compiled):
        m.eval()
    for start in (0, 24):  # two widths: the dynamic graph is reused
        batch = batch_of(data, 24, start)
        (oe, ge) = _loss_and_grads(eager, batch)
        try:
            (oc, gc) = _loss_and_grads(compiled, batch)
        except Exception as exc:  # pragma: no cover - a toolchain that cannot build the kernels
            if "BackendCompilerFailed" in type(exc).__name__ or "CppCompileError" in repr(exc):
                pytest.skip(f"torch.compile cannot build here: {type(exc).__name__}")
            raise
        assert torch.allclose(oc["loss"], oe["loss"], rtol=1e-4, atol=1e-5)
        for name in ge:
            assert torch.allclose(gc[name], ge[name], rtol=1e-3, atol=1e-5), name
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compiled in place: the same names


@pytest.mark.parametrize("mtm_loss", ["nce", "softmax"])
def test_indices_and_noise_found_beforehand_give_the_same_step(data, bert_dir, mtm_loss):
    """mask_indices (the host's masked positions, pairs and NCE noise, drawn in forward's order) make
    forward compute exactly what it computes finding and drawing them itself: losses and gradients."""
    model = build(data, bert_dir, mtm_loss=mtm_loss).eval()  # eval: dropout off, so only the generator draws
    batch = batch_of(data, n=24)
    results = []
    for beforehand in (False, True):
        g = torch.Generator().manual_seed(3)
        masks = model.mask(batch, g)
        if beforehand:
            extra = model.mask_indices(masks, g)
            assert extra["mlm_index"].shape[0] == 2 and extra["mtm_index"].shape[0] == 2
            assert ("mtm_noise" in extra) == (mtm_loss == "nce")
            masks = {**masks, **extra}
        model.zero_grad(set_to_none=True)
        out = model(batch, g, masks)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, g.get_state()))
    (a, ga, sa), (b, gb, sb) = results
    for key in ("loss", "mlm", "mtm", "icl", "mlm_acc", "mtm_acc", "mlm_tokens", "mtm_fields"):
        assert torch.equal(a[key], b[key]), key
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    assert torch.equal(sa, sb)  # the generator drew the same numbers in all
