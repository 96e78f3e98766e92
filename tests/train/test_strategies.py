"""FLIP's finetuning strategies (flip.train.builders) from a real (tiny) pretraining run.

One pretraining run (tiny random BERT + small DCNv2 on the synthetic dataset, a few steps) is made
per module; every strategy then finetunes end to end through ``flip.train.finetune.finetune``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flip.config import config_from_dict  # noqa: E402
from helpers import preset_config  # noqa: E402
from flip.errors import FlipError  # noqa: E402
from flip.train import finetune, load_ctr_data  # noqa: E402
from flip.train.callbacks import SimulatedCrash, crash_after  # noqa: E402
from flip.train.loop import predict_probs, seed_everything  # noqa: E402
from flip.train.pretrain import pretrain  # noqa: E402



@pytest.fixture(scope="module")
def env(tmp_path_factory, synthetic_data, tiny_bert):
    """(dataset, tiny BERT, token cache, pretraining run directory)."""
    root = tmp_path_factory.mktemp("strategies")
    data = synthetic_data(2000)
    bert = tiny_bert(data, 300)
    tokens = root / "tokens"
    pre = root / "pretrain"
    pretrain(make_cfg((data, bert, tokens, pre), pretrain={"epochs": 1, "batch_size": 64, "lr": 5e-3, "plm_lr": 5e-3,
                                                              "max_steps": 8}),
             data, pre)
    return data, bert, tokens, pre


def make_cfg(env, **sections):
    _, bert, tokens, _ = env
    return preset_config("tiny_strategies", {"plm": {"name": str(bert), "cache_dir": str(tokens)}}, sections)


def strategy_cfg(env, strategy, **finetune_values):
    return make_cfg(env, finetune={"strategy": strategy, **finetune_values})


@pytest.mark.parametrize("strategy", ["flip_id", "flip_plm", "plm_scratch", "flip"])
def test_strategy_finetunes_end_to_end(env, tmp_path, strategy):
    data, _, _, pre = env
    metrics = finetune(strategy_cfg(env, strategy), data, tmp_path, pretrained=pre)
    for split in ("valid", "test"):
        assert 0.5 < metrics[split]["auc"] <= 1.0 and metrics[split]["logloss"] > 0
    assert metrics["train"]["epochs"] >= 1
    epochs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("valid_auc" in r for r in epochs if r["event"] == "epoch")
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["strategy"] == strategy and run["pretrained"] == str(pre)
    assert (tmp_path / "predictions" / "test.parquet").exists()
    weights = load_file(tmp_path / "model.safetensors")
    if strategy == "flip_id":  # a plain ID model: serves at the ID model's cost
        from flip.models import build_id_model

        model = build_id_model(strategy_cfg(env, strategy).id_model, 8, json.loads((data / "meta.json").read_text())[
            "vocab_size"])
        model.load_state_dict(weights)
    if strategy == "flip":
        assert weights["alpha"].shape == (1,) and weights["alpha"].item() != 0.0  # learnt from alpha_init = 0


def test_flip_id_starts_from_the_pretrained_id_tower(env):
    from flip.train.builders import build_flip_id

    data_dir, _, _, pre = env
    cfg = strategy_cfg(env, "flip_id")
    seed_everything(4)  # not the pretraining seed (3), whose initial fc is the pretrained run's (untrained) fc
    task = build_flip_id(cfg, load_ctr_data(data_dir), torch.device("cpu"), pre)
    pretrained = load_file(pre / "id_model.safetensors")
    state = task.model.state_dict()
    for key, value in pretrained.items():
        if key == "fc.weight":  # a fresh Linear_ID: not the (untrained) pretraining one (bias: both 0)
            assert not torch.equal(state[key], value), key
        elif not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    # trained exactly like scratch: same task class, optimizer and regulariser
    from flip.train.tasks import TabularTask

    assert isinstance(task, TabularTask) and type(task.optimizer).__name__ == "Adam"
    assert task.l2_embedding == cfg.finetune.l2_embedding


def test_flip_loss_is_eq15_and_alpha_is_reported(env):
    from flip.train.tasks import FlipTask
    from flip.train.builders import build_flip

    data_dir, _, _, pre = env
    cfg = strategy_cfg(env, "flip", alpha_init=0.3, l2_embedding=0.0)
    seed_everything(3)
    task = build_flip(cfg, load_ctr_data(data_dir), torch.device("cpu"), pre)
    assert isinstance(task, FlipTask) and task.summary() == {"alpha": pytest.approx(0.3)}
    model = task.model
    model.eval()  # no dropout: two forward passes agree
    idx = torch.arange(40)
    loss = task.loss(idx)
    x = task.data.train.x[idx]
    b = task.tokens["train"].batch(idx)
    y = task.data.train.y[idx]
    lid = model.id_model(x)
    lplm = model.plm_head(model.plm.cls(model.plm(b["input_ids"], b["attention_mask"]))).squeeze(-1)
    joint = 0.3 * lid + 0.7 * lplm
    expected = sum(F.binary_cross_entropy_with_logits(z, y) for z in (joint, lid, lplm))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # two learning rates: the PLM encoder at plm_lr, the rest (ID tower, heads, alpha) at lr
    groups = task.optimizer.param_groups
    assert [g["lr"] for g in groups] == [cfg.finetune.plm_lr, cfg.finetune.lr]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.plm.parameters()}
    assert any(p is model.alpha for p in groups[1]["params"])
    # scoring in batches of the task's max_eval_rows (which caps eval_batch_size) = one pass
    whole = predict_probs(task, "valid", 10_000, torch.device("cpu"))
    task.max_eval_rows = 7
    assert np.allclose(predict_probs(task, "valid", 10_000, torch.device("cpu")), whole, atol=1e-6)


def test_flip_alpha_in_metrics(env, tmp_path):
    data, _, _, pre = env
    metrics = finetune(strategy_cfg(env, "flip", plm_epochs=1), data, tmp_path, pretrained=pre)
    assert metrics["alpha"] == pytest.approx(load_file(tmp_path / "model.safetensors")["alpha"].item())
    assert json.loads((tmp_path / "metrics.json").read_text())["alpha"] == metrics["alpha"]


def test_missing_or_incomplete_pretraining_run_is_a_clear_error(env, tmp_path):
    data = env[0]
    for strategy in ("flip_id", "flip_plm", "flip"):
        with pytest.raises(FlipError, match=r"run `flip pretrain` first or pass --pretrained DIR"):
            finetune(strategy_cfg(env, strategy), data, tmp_path / strategy)
        with pytest.raises(FlipError, match=r"is not a finished pretraining run \(missing"):
            finetune(strategy_cfg(env, strategy), data, tmp_path / strategy, pretrained=tmp_path / "nothing")
    assert not (tmp_path / "flip_id" / "metrics.json").exists()
    # another ID-model configuration than the pretraining run's
    with pytest.raises(FlipError, match=r"id_model.embedding_dim=8 \(here 16\)"):
        finetune(make_cfg(env, finetune={"strategy": "flip_id"}, id_model={"embedding_dim": 16}), data,
                 tmp_path / "x", pretrained=env[3])


def test_changed_pretraining_invalidates_a_finished_finetuning_run(env, tmp_path):
    data, _, _, pre = env
    copy = tmp_path / "pretrain"
    shutil.copytree(pre, copy)
    cfg = strategy_cfg(env, "flip_id", epochs=1)
    out = tmp_path / "run"
    first = finetune(cfg, data, out, pretrained=copy)
    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    assert finetune(cfg, data, out, pretrained=copy) == json.loads(json.dumps(first))  # finished: reused
    assert json.loads((out / "run.json").read_text())["fingerprint"] == fingerprint

    weights = load_file(copy / "id_model.safetensors")
    weights["embedding.weight"] = weights["embedding.weight"] * 2
    save_file(weights, str(copy / "id_model.safetensors"))
    second = finetune(cfg, data, out, pretrained=copy)
    assert json.loads((out / "run.json").read_text())["fingerprint"] != fingerprint
    assert second["valid"] != first["valid"]


def test_flip_resumes_after_a_crash_with_identical_results(env, tmp_path):
    data, _, _, pre = env
    cfg = make_cfg(env, finetune={"strategy": "flip", "epochs": 2, "batch_size": 256},
                   run={"checkpoint_every": 2})
    reference = finetune(cfg, data, tmp_path / "a", pretrained=pre)
    with crash_after(5), pytest.raises(SimulatedCrash):
        finetune(cfg, data, tmp_path / "b", pretrained=pre)
    resumed = finetune(cfg, data, tmp_path / "b", pretrained=pre)
    for split in ("valid", "test"):
        assert resumed[split] == reference[split]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_analysis_figures_from_the_pretraining_run(env, tmp_path):
    """Fig. 5 (one field masked per modality) and Fig. 6 (SVD of ID embeddings) from a real run."""
    from flip.evaluate.analysis import ALIGNED_ONLY, analyze

    data, _, _, pre = env
    scratch = tmp_path / "scratch"
    finetune(strategy_cfg(env, "scratch", epochs=1), data, scratch)
    out = tmp_path / "analysis"
    result = analyze(data, pre, out, extra_runs={"scratch": scratch / "model.safetensors"}, rows=64)
    fields = json.loads((data / "meta.json").read_text())["fields"]
    sim = result["fig5"]["similarity"]
    assert len(sim) == len(fields) and all(len(r) == len(fields) for r in sim)
    assert all(-1.0 <= v <= 1.0 for r in sim for v in r)  # mean of dot products of unit vectors
    assert list(result["fig6"]) == ["scratch", ALIGNED_ONLY]  # the finetuned runs first, as the paper compares
    assert all(v["effective_rank"] >= 1.0 for v in result["fig6"].values())
    for name in ("fig5_field_similarity.png", "fig6_embedding_svd.png", "analysis.json"):
        assert (out / name).stat().st_size > 1000


def test_analysis_without_icl_heads_skips_fig5(env, tmp_path):
    """The "w/o ICL" ablation (pretrain.icl_weight=0) must not fail the analyze stage."""
    from flip.evaluate.analysis import ALIGNED_ONLY, analyze

    data, bert, tokens, _ = env
    pre = tmp_path / "pretrain-no-icl"
    pretrain(make_cfg((data, bert, tokens, pre), pretrain={"epochs": 1, "batch_size": 64, "max_steps": 2,
                                                           "icl_weight": 0.0}), data, pre)
    result = analyze(data, pre, tmp_path / "analysis", rows=32)
    assert "icl_weight = 0" in result["fig5"]["skipped"] and ALIGNED_ONLY in result["fig6"]
    assert (tmp_path / "analysis" / "fig6_embedding_svd.png").exists()


def test_a_reused_pretraining_maps_its_embeddings_onto_a_newer_vocabulary(env, tmp_path):
    """retrain.pretrain=reuse: newer data (other users and items) finetune from the old run; a value both
    vocabularies know keeps its pretrained row, an unseen one starts from its field's OOV row."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from flip.data.preprocess import preprocess
    from flip.evaluate.analysis import ALIGNED_ONLY, analyze
    from flip.models import build_id_model
    from flip.train.builders import load_pretrained_id_model, pretrained_rows

    _, bert, tokens, pre = env
    newer = tmp_path / "processed" / "newer"
    preprocess(config_from_dict({"data": {"dataset": "synthetic", "synthetic": {"rows": 2600, "users": 700}}}),
               tmp_path / "raw", newer, progress=False)
    meta = json.loads((newer / "meta.json").read_text())
    rows = pretrained_rows(pre, newer)
    assert rows is not None and len(rows) == meta["vocab_size"]
    model = build_id_model(make_cfg(env).id_model, len(meta["fields"]), meta["vocab_size"])
    load_pretrained_id_model(model, pre, rows)
    old = load_file(str(pre / "id_model.safetensors"))["embedding.weight"]
    old_ids = {(r["field"], r["value"]): r["id"] for r in pq.read_table(pre / "vocab.parquet").to_pylist()}
    new_ids = pq.read_table(newer / "vocab.parquet").to_pylist()
    shared = next(r for r in new_ids if (r["field"], r["value"]) in old_ids and r["id"] != old_ids[(r["field"], r["value"])])
    unseen = next(r for r in new_ids if (r["field"], r["value"]) not in old_ids)
    emb = model.embedding.weight.detach()
    assert torch.equal(emb[shared["id"]], old[old_ids[(shared["field"], shared["value"])]])
    oov_old = {f["name"]: f["oov_id"] for f in json.loads((pre / "dataset_meta.json").read_text())["fields"]}
    assert torch.equal(emb[unseen["id"]], old[oov_old[unseen["field"]]])
    # the whole strategy runs, and so does the analysis of the old run on the newer data
    m = finetune(make_cfg((newer, bert, tokens, pre), finetune={"strategy": "flip_id", "epochs": 1}), newer,
                 tmp_path / "flip_id", pretrained=pre)
    assert 0.0 <= m["test"]["auc"] <= 1.0
    assert ALIGNED_ONLY in analyze(newer, pre, tmp_path / "analysis", rows=32)["fig6"]
