"""The whole DVC pipeline (download → … → report) on synthetic data with a tiny language model,
then an ablation as a DVC experiment: only the stages that depend on the changed param re-run."""

from __future__ import annotations

import json

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

    from flip.errors import FlipError
    from flip.evaluate.ablations import check_committed

    with pytest.raises(FlipError, match="not in the last commit"):  # ablations start from a committed run
        check_committed(repo)
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    tracked = run("git", "ls-files", "reports").split()  # .gitignore keeps the DVC metrics and plots in git only
    assert "reports/metrics.json" in tracked and "reports/plots/roc/flip.json" in tracked
    assert "reports/eval.json" not in tracked and "reports/index.html" not in tracked
    # the report's numbers are this run's: the metrics DVC shows are the ones eval.json holds
    assert len(json.loads(run("dvc", "metrics", "show", "--json"))[""]["data"]["reports/metrics.json"]["data"]) <= 6
    shown = run("dvc", "metrics", "show").splitlines()[0].split()
    assert len(shown) < 40, shown

    # a Table 5 ablation as `make ablations` runs it: queued, run in a temporary copy, read back from
    # `dvc exp show --json` into the report
    run("flip", "ablations", "queue", "--row", "w/o ICL")
    run("dvc", "exp", "run", "--run-all", "-j", "1")
    log = run("dvc", "queue", "logs", "wo-icl")
    ran = {s for s in stages if f"Running stage '{s}'" in log}  # pretraining and what depends on it, no more
    assert ran == {"pretrain", "finetune@flip_id", "finetune@flip_plm", "finetune@flip", "full_flip_id",
                   "package@flip_id", "package@flip", "evaluate", "analyze", "report"}, ran
    shown = json.loads(run("dvc", "exp", "show", "--json"))
    [ablation] = [r for c in shown if c.get("experiments") for e in c["experiments"] for r in e["revs"]]
    assert ablation["name"] == "wo-icl"
    assert ablation["data"]["params"]["params.yaml"]["data"]["pretrain"]["icl_weight"] == 0
    run("flip", "ablations", "collect")
    table = json.loads((repo / "reports/ablations.json").read_text())
    assert [e["row"] for e in table["experiments"]] == ["FLIP", "w/o ICL"]
    assert table["experiments"][1]["flip_auc"] == ablation["data"]["metrics"]["reports/metrics.json"]["data"]["flip"]["auc"]
    assert table["experiments"][0]["flip_auc"] == json.loads((repo / "reports/metrics.json").read_text())["flip"]["auc"]
    run("flip", "report")
    md = (repo / "reports/summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| w/o ICL | wo-icl |"))
    assert f"| {table['experiments'][1]['flip_auc']:.4f} |" in row
