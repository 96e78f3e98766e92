"""flip.train.loop with a scripted task: early stopping, best weights, seeds aggregation, reuse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flip.metrics import auc
from flip.io import read_json
from flip.train.fingerprint import config_fingerprint
from flip.train.loop import EvalSet, LoopSettings, Task, fit
from flip.train.selection import aggregate_seeds, run_seeds


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.zeros(()))


class ScriptedTask(Task):
    """One SGD step per epoch adds 1 to ``t``; after epoch ``e`` the predictions have quality
    ``QUALITY[e]`` (logit = noise + q * (2y - 1)), so the validation AUC follows the script."""

    def __init__(self, quality: list[float], n: int = 400) -> None:
        self.quality = quality
        self.model = Counter()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.n_train = 8
        rng = np.random.default_rng(0)
        self.noise, self.eval_sets = {}, {}
        for split in ("valid", "test"):
            y = (rng.random(n) < 0.5).astype(np.float32)
            self.noise[split] = torch.from_numpy(rng.normal(size=n))
            self.eval_sets[split] = EvalSet(y=torch.from_numpy(y), row=np.arange(n) + (0 if split == "valid" else n))

    def loss(self, idx):
        return -self.model.t * 1.0

    def logits(self, split, q):
        y = self.eval_sets[split].y.double()
        return self.noise[split] + q * (2 * y - 1)

    def predict(self, split, idx):
        q = self.quality[int(round(self.model.t.item()))]
        return self.logits(split, q)[idx]


def run_scripted(tmp_path, quality, patience, epochs=None):
    settings = LoopSettings(epochs=epochs or len(quality) - 1, batch_size=8, patience=patience, progress=False)
    holder = {}

    def build():
        holder["task"] = ScriptedTask(quality)
        return holder["task"]

    metrics = fit(build, settings, tmp_path, seed=0, config={"x": 1}, fingerprint="f")
    return metrics, holder["task"]


def epochs_logged(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "epoch"]


def test_early_stopping_after_patience_restores_best(tmp_path):
    quality = [0.0, 0.2, 0.8, 0.5, 0.6, 0.3, 3.0, 3.0]  # index = epoch; best 2, then 2 worse epochs
    metrics, task = run_scripted(tmp_path, quality, patience=2)
    assert metrics["train"]["epochs"] == 4  # epochs 3 and 4 did not improve on epoch 2
    assert metrics["train"]["best_epoch"] == 2
    assert task.model.t.item() == 2.0  # best weights restored
    y_test = task.eval_sets["test"].y.numpy()
    assert metrics["test"]["auc"] == auc(y_test, task.logits("test", 0.8).numpy())
    logged = epochs_logged(tmp_path)
    assert [r["epoch"] for r in logged] == [1, 2, 3, 4]
    assert metrics["valid"]["auc"] == max(r["valid_auc"] for r in logged) == logged[1]["valid_auc"]
    events = [json.loads(line)["event"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "early_stop" in events and events.count("test") == 1
    assert not (tmp_path / "checkpoint").exists()
    import pyarrow.parquet as pq

    pred = pq.read_table(tmp_path / "predictions" / "test.parquet").to_pandas()
    assert list(pred.columns) == ["row", "label", "prob"]
    assert pred["row"].tolist() == list(range(400, 800))
    assert auc(pred["label"], pred["prob"]) == metrics["test"]["auc"]


def test_improvement_resets_patience(tmp_path):
    quality = [0.0, 0.2, 0.8, 0.5, 0.9, 0.3, 0.4, 3.0]
    metrics, _ = run_scripted(tmp_path, quality, patience=2)
    assert (metrics["train"]["best_epoch"], metrics["train"]["epochs"]) == (4, 6)


def test_patience_zero_trains_all_epochs_and_keeps_best(tmp_path):
    quality = [0.0, 0.2, 0.8, 0.5, 0.6, 0.3]
    metrics, task = run_scripted(tmp_path, quality, patience=0)
    assert (metrics["train"]["best_epoch"], metrics["train"]["epochs"]) == (2, 5)
    assert task.model.t.item() == 2.0


def test_finished_run_is_recognised(tmp_path):
    quality = [0.0, 0.2, 0.8, 0.5, 0.6]
    first, _ = run_scripted(tmp_path, quality, patience=2)
    calls = []

    def build():
        calls.append(1)
        return ScriptedTask(quality)

    settings = LoopSettings(epochs=4, batch_size=8, patience=2, progress=False)
    again = fit(build, settings, tmp_path, seed=0, config={"x": 1}, fingerprint="f")
    assert again == first and not calls
    other = fit(build, settings, tmp_path, seed=0, config={"x": 2}, fingerprint="g")  # new config: rerun
    assert calls and other["test"] == first["test"]
    assert read_json(tmp_path / "run.json")["fingerprint"] == "g"
    assert read_json(tmp_path / "config.json") == {"x": 2}


def test_fingerprint_ignores_only_non_semantic_keys():
    base = {"finetune": {"lr": 1e-3}, "run": {"progress": True, "seeds": [1], "checkpoint_every": 0}}
    same = {"finetune": {"lr": 1e-3}, "run": {"progress": False, "seeds": [2], "checkpoint_every": 50}}
    other = {"finetune": {"lr": 2e-3}, "run": {"progress": True, "seeds": [1], "checkpoint_every": 0}}
    assert config_fingerprint(base, 1) == config_fingerprint(same, 1)
    assert config_fingerprint(base, 1) != config_fingerprint(base, 2)
    assert config_fingerprint(base, 1) != config_fingerprint(other, 1)
    assert config_fingerprint(base, 1, {"d": 1}) != config_fingerprint(base, 1, {"d": 2})


def test_aggregate_seeds_mean_std_per_seed():
    per_seed = {
        1: {"valid": {"auc": 0.70, "logloss": 0.5}, "train": {"epochs": 3}, "params": 10},
        2: {"valid": {"auc": 0.80, "logloss": 0.4}, "train": {"epochs": 4}, "params": 10},
        3: {"valid": {"auc": 0.90, "logloss": 0.3}, "train": {"epochs": 8}, "params": 10},
    }
    agg = aggregate_seeds(per_seed)
    assert agg["valid"]["auc"] == pytest.approx(0.8) == agg["mean"]["valid"]["auc"]
    assert agg["std"]["valid"]["auc"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert agg["std"]["valid"]["logloss"] == pytest.approx(0.1)
    assert agg["train"]["epochs"] == pytest.approx(5.0)
    assert agg["std"]["train"]["epochs"] == pytest.approx(math.sqrt(7.0))
    assert agg["params"] == 10 and agg["std"]["params"] == 0.0
    assert agg["seeds"] == [1, 2, 3]
    assert agg["per_seed"]["seed-2"] == per_seed[2]


def test_run_seeds_layout(tmp_path, make_config):
    cfg = make_config(run={"seeds": [3, 5]})
    seen = []

    def run_one(cfg_s, out):
        seen.append((cfg_s.run.seeds, out))
        return {"valid": {"auc": 0.5 + cfg_s.run.seeds[0] / 100}}

    result = run_seeds(cfg, tmp_path, run_one)
    assert seen == [([3], tmp_path / "seed-3"), ([5], tmp_path / "seed-5")]
    assert result["valid"]["auc"] == pytest.approx(0.54)
    assert read_json(tmp_path / "metrics.json") == json.loads(json.dumps(result))
    assert read_json(tmp_path / "config.json")["run"]["seeds"] == [3, 5]
    single = run_seeds(make_config(run={"seeds": [9]}), tmp_path / "one", run_one)
    assert seen[-1] == ([9], tmp_path / "one") and "per_seed" not in single
    with pytest.raises(ValueError, match="duplicates"):
        run_seeds(make_config(run={"seeds": [1, 1]}), tmp_path / "dup", run_one)


class RecordingTask(Task):
    """No evaluation sets; ``loss`` notes the gradient-sync flag the loop set on ``ddp`` and returns
    two statistics: the batch's first row id and 1."""

    stat_names = ("first", "one")

    def __init__(self, n_train: int) -> None:
        from types import SimpleNamespace

        self.model = Counter()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.n_train, self.eval_sets = n_train, {}
        self.ddp = SimpleNamespace(require_backward_grad_sync=None)
        self.syncs: list[bool] = []

    def loss(self, idx):
        self.syncs.append(self.ddp.require_backward_grad_sync)
        stats = torch.tensor([float(idx[0]), 1.0], dtype=torch.float64)
        return self.model.t * 1.0, stats


def test_loop_owns_gradient_sync_and_writes_task_statistics(tmp_path):
    """7 batches of an epoch, 3 per optimizer step: gradients sync with the 3rd, 6th and (epoch end) 7th
    batch; the task's statistics are averaged over each record's rows, in step and epoch records."""
    holder = {}

    def build():
        holder["task"] = RecordingTask(n_train=26)
        return holder["task"]

    settings = LoopSettings(epochs=1, batch_size=4, patience=0, progress=False, grad_accum=3, log_every=2,
                            optimizer_steps=True)
    metrics = fit(build, settings, tmp_path, seed=0, config={}, fingerprint="f")
    assert holder["task"].syncs == [False, False, True, False, False, True, True]
    assert metrics["train"]["steps"] == 3
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [(r["step"], r["epoch_step"]) for r in steps] == [(0, 2), (1, 4), (2, 6), (3, 7)]  # optimizer steps
    assert all(r["one"] == pytest.approx(1.0) for r in steps)
    [epoch] = [r for r in records if r["event"] == "epoch"]
    assert epoch["one"] == pytest.approx(1.0) and epoch["first"] is not None
    assert steps[-1]["first"] == pytest.approx(float(torch.randperm(26, generator=torch.Generator().manual_seed(0))[24]))


def test_fit_reads_in_one_screen():
    """fit() stays a short loop: the rest is callbacks (flip.train.callbacks) and helpers."""
    import inspect

    assert len(inspect.getsource(fit).splitlines()) <= 120


def test_crash_hook_is_installed_only_inside_its_block_and_the_run_resumes(tmp_path):
    from flip.train.callbacks import SimulatedCrash, crash_after

    quality = [0.0, 0.1, 0.2, 0.3, 0.8, 0.5, 0.6, 0.7, 0.4, 0.3, 0.2, 0.9, 1.0, 0.1, 0.2, 0.3, 0.4]  # by batch
    settings = LoopSettings(epochs=4, batch_size=2, patience=0, progress=False, checkpoint_every=1)
    build = lambda: ScriptedTask(quality)  # noqa: E731
    reference = fit(build, settings, tmp_path / "ref", seed=0, config={"x": 1}, fingerprint="f")
    with crash_after(6), pytest.raises(SimulatedCrash):  # 4 batches an epoch: killed in epoch 2
        fit(build, settings, tmp_path / "run", seed=0, config={"x": 1}, fingerprint="f")
    assert (tmp_path / "run" / "checkpoint" / "state.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()
    resumed = fit(build, settings, tmp_path / "run", seed=0, config={"x": 1}, fingerprint="f")  # no hook now
    resumes = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
               if r["event"] == "resume"]
    assert [(r["epoch"], r["step"]) for r in resumes] == [(2, 2)]
    assert resumed["test"] == reference["test"] and resumed["train"]["best_epoch"] == reference["train"]["best_epoch"]


def test_the_end_of_fit_hook_writes_the_outputs_and_metrics_come_last(tmp_path):
    """Task.save_outputs: a task writes its own files and gives metrics.json its content; the loop writes
    config.json, run.json and then metrics.json (whose absence means unfinished)."""
    from flip.runs import RunDir

    seen = {}

    class OwnOutputs(ScriptedTask):
        def save_outputs(self, run, weights, metrics, info, log):
            seen.update(files=sorted(p.name for p in run.path.iterdir()), info=info, events=[r["event"] for r in log])
            run.write_weights({"t2": weights["t"] * 2}, "doubled.safetensors")
            return {"mine": metrics["train"]["epochs"]}

    settings = LoopSettings(epochs=2, batch_size=8, patience=0, progress=False)
    metrics = fit(lambda: OwnOutputs([0.0, 0.2, 0.8]), settings, tmp_path, seed=0, config={}, fingerprint="f",
                  info={"stage": "x"})
    assert metrics == {"mine": 2} == RunDir(tmp_path).metrics()
    assert "metrics.json" not in seen["files"] and "run.json" not in seen["files"]
    assert seen["info"]["stage"] == "x" and seen["events"][-1] == "test"
    assert not (tmp_path / "model.safetensors").exists()
    assert RunDir(tmp_path).weights_file.with_name("doubled.safetensors").exists()
