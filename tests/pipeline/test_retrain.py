"""Four weeks of scheduled retraining under prefect_test_harness, on weekly CSV click logs with a tiny
language model: week 1 promotes, a rerun without new data runs nothing after the data check, an
ordinary week 2 promotes a new version, a week 3 with shuffled labels is refused (the champion stays),
and a drifted week 4 stops before training. The GTO registry then holds exactly those versions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from weekly import read_summaries, week_log, weekly_params

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
sys.path.insert(0, str(ROOT / "flows"))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")


def test_four_weeks_of_retraining(prefect_server, tmp_path):
    from pipeline import STAGE_GROUPS, retrain
    from pipeline_repo import make_dvc_repo
    from helpers import make_tiny_bert

    from flip.deploy.registry import in_stage

    repo = tmp_path / "repo"
    repo.mkdir()
    run = make_dvc_repo(repo, weekly_params(make_tiny_bert(tmp_path / "bert")))
    (repo / "incoming").mkdir()
    (repo / ".gitignore").write_text("/incoming/\n")

    def week(n: int, **kw):
        week_log(n, **kw).to_csv(repo / "incoming" / f"week-{n:02d}.csv", index=False)
        state = retrain(project=str(repo), pull_new_data=True, return_state=True)
        return state, state.result(raise_on_failure=False)

    # week 1: no champion yet, the model is promoted
    state, result = week(1)
    assert state.is_completed(), state.message
    assert result["status"] == "Promoted" and result["promoted"]["flip_id"]["version"] == "v0.0.1"
    assert result["gates"]["flip_id"]["champion"] is None and result["gates"]["flip_id"]["challenger"]["auc"] > 0.6
    assert not result["drift"]["drift"]
    assert list(result["outputs"]) == [s for stages in STAGE_GROUPS.values() for s in stages]  # every stage ran
    for paths in result["outputs"].values():
        assert all((repo / p).exists() for p in paths), paths
    assert result["reports/metrics.json"]["flip_id"]["auc"] > 0.5
    assert "Running stage" not in run("dvc", "repro")  # the flow's runs are DVC's runs

    # the same week again: no new data, nothing runs after the data check, the champion stays
    state = retrain(project=str(repo), pull_new_data=True, return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_completed() and result["status"] == "NoNewData", result["message"]
    assert result["stages_run"] == []

    # from now on, retrains reuse week 1's pretraining (its ID embeddings mapped onto each new vocabulary)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["retrain"]["pretrain"] = "reuse"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "commit", "-qm", "retrain: reuse the pretraining", "params.yaml")  # a promotion needs clean code

    # week 2, an ordinary week: trained on weeks 1-2, compared with v0.0.1 on the newest window, promoted
    state, result = week(2)
    assert state.is_completed(), state.message
    gate = result["gates"]["flip_id"]
    assert gate["champion"]["version"] == "v0.0.1" and gate["delta"]["ci_low"] <= gate["delta"]["auc"] <= gate["delta"]["ci_high"]
    assert result["promoted"]["flip_id"]["version"] == "v0.0.2"
    assert {"preprocess", "full_flip_id", "package@flip_id"} <= set(result["stages_run"])
    assert "pretrain" not in result["stages_run"]  # reused: new users and items start from their OOV rows

    # week 3 arrives with shuffled labels (a broken job upstream): refused, the champion stays
    state, result = week(3, shuffle_labels=True)
    assert state.is_failed() and state.name == "NotPromoted", state
    assert not result["gates"]["flip_id"]["promote"] and "below the floor" in result["gates"]["flip_id"]["reasons"][0]
    assert result["promoted"] == {} and "champion stays" in state.message
    summaries = read_summaries()  # the run's markdown artefact, as the UI shows it
    assert any("| flip_id | v0.0.2 |" in s and "| refused |" in s for s in summaries), summaries[-1:]

    # week 4: a drifted market; retrain.drift_policy=stop ends the run before anything trains
    state, result = week(4, drifted=True)
    assert state.is_failed() and state.name == "DriftStopped", state
    assert result["drift"]["drift"] and set(result["drift"]["drifted_attributes"]) >= {"gender", "age", "city"}
    assert not set(result["stages_run"]) & {"pretrain", "full_flip_id", "package@flip_id", "evaluate"}

    # the registry: two versions, prod on the second; the prod model scores new rows
    assert in_stage(repo, "flip_id", "prod")["version"] == "v0.0.2"
    tags = run("git", "tag").split()
    assert sorted(t for t in tags if "@" in t) == ["flip_id@v0.0.1", "flip_id@v0.0.2"]
    shown = run(str(Path(sys.executable).parent / "gto"), "show", "flip_id")
    assert "v0.0.2" in shown and "prod" in shown
    out = run(str(Path(sys.executable).parent / "flip"), "predict", "--model", "flip_id@prod", "--input",
              "incoming/week-02.csv", "--out", "scores.parquet", "--quiet")
    assert "scored 2,000 rows" in out and (repo / "scores.parquet").exists()
