"""flip.runs.RunDir: the layout of a run, read and written in one place."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flip.errors import FlipError
from flip.runs import RunDir
from flip.train.loop import EvalSet, LoopSettings, Task, fit

ROOT = Path(__file__).resolve().parents[2]


class LogisticTask(Task):
    """Logistic regression on a fixed random problem (a real model, optimizer and AUC)."""

    def __init__(self, n: int = 96, d: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d, generator=g)
        self.x = {s: torch.randn(n, d, generator=g) for s in ("train", "valid", "test")}
        self.y = {s: (self.x[s] @ w + 0.5 * torch.randn(n, generator=g) > 0).float() for s in self.x}
        self.model = nn.Linear(d, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.n_train = n
        self.eval_sets = {s: EvalSet(y=self.y[s], row=np.arange(n) + 1000 * i)
                          for i, s in enumerate(("valid", "test"), start=1)}

    def loss(self, idx):
        return nn.functional.binary_cross_entropy_with_logits(self.model(self.x["train"][idx]).squeeze(-1),
                                                              self.y["train"][idx])

    def predict(self, split, idx):
        return self.model(self.x[split][idx]).squeeze(-1)


def train(out: Path, seed: int = 0, fingerprint: str = "fp") -> dict:
    settings = LoopSettings(epochs=2, batch_size=32, patience=0, progress=False)
    return fit(LogisticTask, settings, out, seed=seed, config={"run": {"seeds": [seed]}}, fingerprint=fingerprint,
               info={"stage": "test"})


def test_a_trained_run_read_through_rundir(tmp_path):
    metrics = train(tmp_path / "run", seed=5)
    run = RunDir(tmp_path / "run")
    assert run.is_finished() and run.is_single_seed()
    assert run.finished("fp") == run.metrics() == metrics
    assert run.finished("another") is None
    assert run.info()["seed"] == 5 and run.info()["stage"] == "test" and run.config() == {"run": {"seeds": [5]}}
    assert run.train_rows() == 96 and run.batch_size() == 32
    assert [r["epoch"] for r in run.log("epoch")] == [1, 2] and run.log()[0]["event"] == "start"
    assert set(run.weights()) == {"weight", "bias"}
    test = run.predictions("test")
    assert list(test.columns) == ["row", "label", "prob"] and test["row"].iloc[0] == 2000
    arrays = run.prediction_arrays("test")  # (pandas-free, for the GPU check)
    assert all((arrays[c] == test[c].to_numpy()).all() for c in ("row", "label", "prob"))
    assert run.seeds() == {"seed-5": run} and run.best_seed() == run == run.first_seed()
    assert run.selection() is None and run.candidates() == {}
    assert not run.checkpoint_dir.exists()


def seed_run(parent: RunDir, seed: int, valid_auc: float | None, finished: bool = True) -> RunDir:
    run = parent.seed_dir(seed)
    run.write_info({"seed": seed, "fingerprint": f"fp-{seed}"})
    if finished:
        run.finish({"valid": {"auc": valid_auc}})
    return run


def test_seeds_follow_run_seeds_and_best_seed_is_by_the_metric(tmp_path):
    parent = RunDir(tmp_path / "runs")
    parent.write_config({"run": {"seeds": [3, 10, 4]}})
    s3, s10, s4 = seed_run(parent, 3, 0.70), seed_run(parent, 10, 0.75), seed_run(parent, 4, math.nan)
    seed_run(parent, 7, 0.99)  # an earlier run's seed: not one of this run's
    seed_run(parent, 11, None, finished=False)  # not finished
    assert list(parent.seeds()) == ["seed-3", "seed-10", "seed-4"]  # run.seeds' order, not the folders'
    assert parent.first_seed() == s3
    assert parent.best_seed("valid.auc") == s10  # NaN counts as the lowest
    s10.finish({"valid": {"auc": 0.70}})
    assert parent.best_seed("valid.auc") == s3  # a tie: the earlier seed of run.seeds
    assert parent.best_seed("test.auc") == s3  # missing everywhere: the first
    assert not parent.is_single_seed() and s4.is_single_seed()
    with pytest.raises(FlipError, match="no finished run"):
        RunDir(tmp_path / "empty").best_seed()


def test_adopt_copies_a_candidate_but_leaves_finishing_to_the_caller(tmp_path):
    train(tmp_path / "out" / "candidates" / "lr=0.5", fingerprint="fp-candidate")
    out = RunDir(tmp_path / "out")
    candidate = out.candidates()["lr=0.5"]
    assert candidate == out.candidate("lr=0.5") and candidate.is_finished()
    out.write_selection({"selected": {"lr": 0.5}})
    first = out.seed_dir(1)
    first.adopt(candidate, "fp-final")
    assert first.info()["fingerprint"] == "fp-final" and first.info()["adopted_from"] == str(candidate.path)
    assert not first.is_finished() and first.finished("fp-final") is None  # metrics.json comes last
    assert torch.equal(first.weights()["weight"], candidate.weights()["weight"])
    assert first.log() == candidate.log() and first.has_predictions("valid")
    first.finish({**candidate.metrics(), "test": {"auc": 0.5}})
    assert first.finished("fp-final")["test"] == {"auc": 0.5}
    assert out.selection() == {"selected": {"lr": 0.5}}
    out.remove_candidates()
    assert out.candidates() == {} and out.selection() is None


def test_clear_single_seed_and_the_log_writer(tmp_path):
    train(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    log = run.open_log(run.log()[:1])  # a resumed log: exactly the records given, then appended to
    log("note", value=1)
    assert [r["event"] for r in run.log()] == ["start", "note"] and log.events("note")[0]["value"] == 1
    run.clear_single_seed()
    assert not any(run.path.iterdir())


def _literal_uses(path: Path, literal: str) -> list[int]:
    """Lines where ``literal`` is a string constant in code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == literal
            and id(n) not in docstrings]


def test_metrics_json_has_one_writer():
    """Only flip/runs.py names a run's metrics.json (the evaluate stage's reports/metrics.json is not a
    run's file), and RunDir writes it in one place: finish()."""
    uses = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "flip").rglob("*.py"))
            if (lines := _literal_uses(p, "metrics.json"))}
    assert set(uses) == {"flip/runs.py", "flip/evaluate/scoring.py"}, uses
    evaluate = (ROOT / "flip/evaluate/scoring.py").read_text().splitlines()
    assert all('out_dir / "metrics.json"' in evaluate[n - 1] for n in uses["flip/evaluate/scoring.py"])
    source = (ROOT / "flip/runs.py").read_text()
    assert source.count("write_json(self.metrics_file") == 1 and "write_json(self.path" not in source
    finish = source.split("    def finish(")[1].split("\n    def ")[0]
    assert "write_json(self.metrics_file, metrics)" in finish
