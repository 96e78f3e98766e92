"""Four weeks of scheduled retraining under prefect_test_harness, on weekly CSV click logs with a tiny
language model: week 1 promotes, a rerun without new data runs nothing after the data check, an
ordinary week 2 promotes a new version, a week 3 with shuffled labels is refused (the champion stays),
and a drifted week 4 stops before training. The GTO registry then holds exactly those versions.

One project lives through the module (the ``weeks`` fixture); each test is one phase and names it. A
phase runs once, in order, when the first test asks for it or for a later one: a failing week fails its
own test, and the later weeks still run and are checked."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from helpers import ROOT
from weekly import read_summaries, week_log, weekly_params

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
sys.path.insert(0, str(ROOT / "flows"))
os.environ.setdefault("FLIP_STAGE_RETRY_DELAY", "0")


class Weeks:
    """The weekly project and its retrain runs: ``weeks["week 2"]`` is that phase's (state, result),
    after every earlier phase has run."""

    def __init__(self, root: Path) -> None:
        from pipeline_repo import make_dvc_repo
        from helpers import make_tiny_bert

        self.repo = root / "repo"
        self.repo.mkdir()
        self.run = make_dvc_repo(self.repo, weekly_params(make_tiny_bert(root / "bert")))
        (self.repo / "incoming").mkdir()
        (self.repo / ".gitignore").write_text("/incoming/\n")
        self.phases: dict[str, Callable[[], Any]] = {
            "week 1": lambda: self.week(1),
            "rerun": self.retrain,  # the same week again: no new data
            "reuse": self.reuse_pretraining,
            "week 2": lambda: self.week(2),
            "week 3": lambda: self.week(3, shuffle_labels=True),
            "week 4": lambda: self.week(4, drifted=True),
        }
        self.done: dict[str, Any] = {}

    def __getitem__(self, phase: str) -> Any:
        for name in list(self.phases)[: list(self.phases).index(phase) + 1]:
            if name not in self.done:
                self.done[name] = self.phases[name]()
        return self.done[phase]

    def retrain(self):
        from pipeline import retrain

        state = retrain(project=str(self.repo), pull_new_data=True, return_state=True)
        return state, state.result(raise_on_failure=False)

    def week(self, n: int, **kw):
        week_log(n, **kw).to_csv(self.repo / "incoming" / f"week-{n:02d}.csv", index=False)
        return self.retrain()

    def reuse_pretraining(self) -> None:
        """From now on, retrains reuse week 1's pretraining (its ID embeddings mapped onto each new vocabulary)."""
        params = yaml.safe_load((self.repo / "params.yaml").read_text())
        params["retrain"]["pretrain"] = "reuse"
        (self.repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.run("git", "commit", "-qm", "retrain: reuse the pretraining", "params.yaml")  # a promotion needs clean code


@pytest.fixture(scope="module")
def weeks(prefect_server, tmp_path_factory) -> Weeks:
    return Weeks(tmp_path_factory.mktemp("retrain"))


def test_week_1_without_a_champion_promotes(weeks):
    from pipeline import STAGE_GROUPS

    state, result = weeks["week 1"]
    assert state.is_completed(), state.message
    assert result["status"] == "Promoted" and result["promoted"]["flip_id"]["version"] == "v0.0.1"
    assert result["gates"]["flip_id"]["champion"] is None and result["gates"]["flip_id"]["challenger"]["auc"] > 0.6
    assert not result["drift"]["drift"]
    assert list(result["outputs"]) == [s for stages in STAGE_GROUPS.values() for s in stages]  # every stage ran
    for paths in result["outputs"].values():
        assert all((weeks.repo / p).exists() for p in paths), paths
    assert result["reports/metrics.json"]["flip_id"]["auc"] > 0.5
    assert "Running stage" not in weeks.run("dvc", "repro")  # the flow's runs are DVC's runs


def test_a_rerun_without_new_data_runs_nothing_after_the_data_check(weeks):
    state, result = weeks["rerun"]
    assert state.is_completed() and result["status"] == "NoNewData", result["message"]
    assert result["stages_run"] == []


def test_week_2_is_gated_against_v1_and_promoted_reusing_the_pretraining(weeks):
    state, result = weeks["week 2"]  # trained on weeks 1-2, compared with v0.0.1 on the newest window
    assert state.is_completed(), state.message
    gate = result["gates"]["flip_id"]
    assert gate["champion"]["version"] == "v0.0.1" and gate["delta"]["ci_low"] <= gate["delta"]["auc"] <= gate["delta"]["ci_high"]
    assert result["promoted"]["flip_id"]["version"] == "v0.0.2"
    assert {"preprocess", "full_flip_id", "package@flip_id"} <= set(result["stages_run"])
    assert "pretrain" not in result["stages_run"]  # reused: new users and items start from their OOV rows


def test_week_3_with_shuffled_labels_is_refused_and_the_champion_stays(weeks):
    state, result = weeks["week 3"]  # a broken job upstream
    assert state.is_failed() and state.name == "NotPromoted", state
    assert not result["gates"]["flip_id"]["promote"] and "below the floor" in result["gates"]["flip_id"]["reasons"][0]
    assert result["promoted"] == {} and "champion stays" in state.message
    summaries = read_summaries()  # the run's markdown artefact, as the UI shows it
    assert any("| flip_id | v0.0.2 |" in s and "| refused |" in s for s in summaries), summaries[-1:]


def test_week_4_drifted_stops_before_anything_trains(weeks):
    state, result = weeks["week 4"]  # a new market; retrain.drift_policy=stop
    assert state.is_failed() and state.name == "DriftStopped", state
    assert result["drift"]["drift"] and set(result["drift"]["drifted_attributes"]) >= {"gender", "age", "city"}
    assert not set(result["stages_run"]) & {"pretrain", "full_flip_id", "package@flip_id", "evaluate"}


def test_the_registry_holds_v1_and_v2_and_the_prod_model_scores(weeks):
    from flip.deploy.registry import in_stage

    weeks["week 4"]
    repo, run = weeks.repo, weeks.run
    assert in_stage(repo, "flip_id", "prod")["version"] == "v0.0.2"
    tags = run("git", "tag").split()
    assert sorted(t for t in tags if "@" in t) == ["flip_id@v0.0.1", "flip_id@v0.0.2"]
    shown = run(str(Path(sys.executable).parent / "gto"), "show", "flip_id")
    assert "v0.0.2" in shown and "prod" in shown
    out = run(str(Path(sys.executable).parent / "flip"), "predict", "--model", "flip_id@prod", "--input",
              "incoming/week-02.csv", "--out", "scores.parquet", "--quiet")
    assert "scored 2,000 rows" in out and (repo / "scores.parquet").exists()
