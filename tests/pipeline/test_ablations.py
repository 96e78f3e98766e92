"""The paper's Table 5 ablations: each one through pretraining, finetuning, evaluation, the alignment
analysis and the report on synthetic data; and their rows read back from ``dvc exp show --json``."""

from __future__ import annotations

import pytest
from helpers import preset_tree
from report_numbers import allowed_numbers, paper_numbers, read_sources, untraceable

from flip.config import apply_override, config_from_dict, parse_override
from flip.evaluate.ablations import TABLE5, collect, experiment_name, overrides, table5_row


def base_tree(data, bert, tokens) -> dict:
    return {
        "data": {"dataset": "synthetic"},
        "id_model": {"name": "dcnv2", "embedding_dim": 8, "dnn_hidden_units": [16], "cross_layers": 1,
                     "low_rank": 4, "num_experts": 2},
        "plm": {"name": str(bert), "max_length": 48, "cache_dir": str(tokens)},
        "pretrain": {"epochs": 1, "batch_size": 64, "max_steps": 3, "warmup_steps": 0, "train_rows": 0,
                     "precision": "fp32"},
        "finetune": {"epochs": 1, "train_rows": 300, "eval_rows": 120, "lr_grid": [], "plm_epochs": 1,
                     "plm_batch_size": 64, "eval_batch_size": 512, "precision": "fp32"},
        "evaluate": {"pages": "none", "slices": 2, "drift_rows": 500},
        "run": {"seeds": [1], "device": "cpu", "threads": 1, "progress": False},
    }


@pytest.fixture(scope="module")
def synthetic(synthetic_data, tiny_bert, tmp_path_factory):
    data = synthetic_data(1500, fields=5)
    return tmp_path_factory.mktemp("ablations"), data, tiny_bert(data, 200)


@pytest.mark.slow
@pytest.mark.parametrize("row", list(TABLE5))
def test_every_table5_ablation_runs_end_to_end(synthetic, tmp_path, row):
    """pretrain -> finetune (scratch, flip_id, flip) -> evaluate -> analyze -> report, with the row's
    params; "w/o ICL" and "w/o MLM&MTM&ICL" used to stop in analyze, and all three objectives off
    leaves nothing to pretrain."""
    import torch

    from flip.evaluate.analysis import analyze
    from flip.evaluate.scoring import evaluate
    from flip.evaluate.drift import drift
    from flip.evaluate.report import report
    from flip.train.finetune import finetune
    from flip.train.pretrain import pretrain

    root, data, bert = synthetic
    tree = preset_tree("pinned", base_tree(data, bert, root / "tokens"))
    for text in overrides(row):
        apply_override(tree, *parse_override(text))
    cfg = config_from_dict(tree)
    for key, value in TABLE5[row].items():  # the row's params reached the typed config
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    grad = torch.is_grad_enabled()
    pre = tmp_path / "pretrain"
    pretrain(cfg, data, pre)
    runs = tmp_path / "finetune"
    for strategy in ("scratch", "flip_id", "flip"):
        tree["finetune"]["strategy"] = strategy
        finetune(config_from_dict(tree), data, runs / strategy, pretrained=None if strategy == "scratch" else pre)
    reports = tmp_path / "reports"
    drift(cfg, data, reports / "drift")  # the drift stage: evaluate reads its test-window verdict
    ev = evaluate(cfg, data, runs, reports)
    assert set(ev["strategies"]) == {"scratch", "flip_id", "flip"}
    assert all(0.0 <= s["test"]["auc"] <= 1.0 for s in ev["strategies"].values())
    result = analyze(data, pre, reports / "analysis", rows=32,
                     extra_runs={"scratch": runs / "scratch" / "model.safetensors"})
    torch.set_grad_enabled(grad)
    if cfg.pretrain.icl_weight == 0:
        assert "icl_weight = 0" in result["fig5"]["skipped"]
    else:
        assert len(result["fig5"]["similarity"]) == 5
    report(reports, pretrain_dir=pre, analysis_dir=reports / "analysis")
    md = (reports / "summary.md").read_text()
    assert "## Did FLIP help here?" in md and "| flip | FLIP |" in md
    # every number in it is this run's (pretraining, evaluation, analysis) or the paper's
    sources = read_sources(reports / "eval.json", reports / "metrics.json", *(reports / "plots").rglob("*.json"),
                           pre / "metrics.json", pre / "config.json", reports / "analysis" / "analysis.json")
    assert untraceable(md, allowed_numbers(*sources, *paper_numbers())) == []


# ------------------------------------------------------------------ reading dvc exp show --json
def _rev(rev: str, name: str | None, pretrain: dict, auc: float | None) -> dict:
    params = {"pretrain": {"mlm_weight": 1.0, "mtm_weight": 1.0, "icl_weight": 1.0, "field_level_masking": True,
                           "joint_reconstruction": True, **pretrain}, "finetune": {"lr": 0.001}}
    metrics = {} if auc is None else {"reports/metrics.json": {"data": {
        "flip": {"auc": auc, "logloss": 0.5}, "flip_id": {"auc": auc - 0.01}}}}
    return {"rev": rev, "name": name, "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                                               "metrics": metrics}, "error": None, "experiments": None}


def test_ablation_rows_are_recognised_by_their_params_not_their_names():
    """The layout of `dvc exp show --json` (DVC 3.67): commits with their experiments' revisions."""
    base = _rev("a" * 40, "main", {}, 0.80)
    base["experiments"] = [
        {"name": n, "revs": [_rev(r * 40, n, p, auc)], "executor": {"state": "success"}}
        for n, r, p, auc in [("wo-icl", "b", {"icl_weight": 0}, 0.79),                        # queued by make ablations
                             ("hand-made", "c", {"mlm_weight": 0, "mtm_weight": 0.0}, 0.78),  # dvc exp run -S by hand
                             ("not-table-5", "d", {"mlm_weight": 0.5}, 0.70),                 # another experiment
                             ("failed", "e", {"mtm_weight": 0}, None)]]                       # no metrics: left out
    workspace = _rev("workspace", None, {}, 0.80)
    table = collect([workspace, base])
    assert [(e["row"], e["name"], e["flip_auc"]) for e in table["experiments"]] == [
        ("FLIP", "main", 0.80), ("w/o ICL", "wo-icl", 0.79), ("w/o MLM&MTM", "hand-made", 0.78)]  # Table 5's order
    assert table["experiments"][1]["settings"] == "pretrain.icl_weight=0"


def test_table5_rows_need_exactly_their_changes():
    base = {"pretrain.mlm_weight": 1.0, "pretrain.mtm_weight": 1.0, "pretrain.icl_weight": 1.0,
            "pretrain.field_level_masking": True, "pretrain.joint_reconstruction": True, "finetune.lr": 0.001}
    assert table5_row({**base, "pretrain.field_level_masking": False}, base) == "w/o Field-level Masking"
    assert table5_row({**base, "pretrain.icl_weight": 0, "finetune.lr": 0.01}, base) is None  # two things changed
    assert table5_row(base, base) is None
    assert experiment_name("w/o MLM&MTM&ICL") == "wo-mlm-mtm-icl"
    assert overrides("w/o Joint Reconstruction") == ["pretrain.joint_reconstruction=false"]
