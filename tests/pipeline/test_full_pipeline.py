"""The whole DVC pipeline (download → … → report) on synthetic data with a tiny language model,
then an ablation as a DVC experiment: only the stages that depend on the changed param re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_tiny_bert
from pipeline_repo import make_dvc_repo, tiny_profile

pytestmark = pytest.mark.slow


def test_dvc_repro_whole_pipeline_then_an_ablation(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    repo = tmp_path / "repo"
    repo.mkdir()
    run = make_dvc_repo(repo, tiny_profile(bert))
    out = run("dvc", "repro")
    stages = ["download", "preprocess", "validate", "drift", "pretrain", "scratch", "finetune@flip_id",
              "finetune@flip_plm", "finetune@flip", "full_scratch", "full_flip_id", "package@flip_id", "package@flip",
              "evaluate", "analyze", "report"]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, stage
    ev = json.loads((repo / "reports/eval.json").read_text())
    assert set(ev["strategies"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    # equal data: every strategy trained on the same rows and is scored on the same test rows
    assert {s["train_rows"] for s in ev["strategies"].values()} == {400}
    assert {s["test"]["rows"] for s in ev["strategies"].values()} == {150}
    for name in ("flip_id", "flip_plm", "flip"):
        d = ev["strategies"][name]["delta_vs_scratch"]
        assert d["ci_low"] <= d["delta"] <= d["ci_high"] and 0 <= d["p_value"] <= 1 and d["rows"] == 150
    assert "delta_vs_flip_id" in ev["strategies"]["flip"]
    # the full-data ID runs stand beside it, on the whole test split
    assert set(ev["full_data"]) == {"scratch", "flip_id"}
    assert ev["full_data"]["scratch"]["test"]["rows"] == ev["counts"]["test"] > 150
    assert ev["headline"].startswith("FLIP ")
    assert (repo / "reports/index.html").exists() and (repo / "reports/analysis/fig5_field_similarity.png").exists()
    assert "Running stage" not in run("dvc", "repro")  # nothing left to do

    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    exp = run("dvc", "exp", "run", "-S", "pretrain.mlm_weight=0")  # "w/o MLM"
    ran = {s for s in stages if f"Running stage '{s}'" in exp}
    assert ran == {"pretrain", "finetune@flip_id", "finetune@flip_plm", "finetune@flip", "full_flip_id",
                   "package@flip_id", "package@flip", "evaluate", "analyze", "report"}, ran
