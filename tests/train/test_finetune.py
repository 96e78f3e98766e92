"""flip.train.finetune with the real ID models on the tiny learnable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from flip.metrics import auc, logloss
from flip.io import read_json
from flip.runs import RunDir
from flip.train import SimulatedCrash, crash_after, finetune, load_ctr_data

SCORES = [("valid", "auc"), ("valid", "logloss"), ("test", "auc"), ("test", "logloss")]


def scores(metrics):
    return {f"{s}.{m}": metrics[s][m] for s, m in SCORES}


def log_records(out, event=None):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if event is None or r["event"] == event]


def test_scratch_learns_and_writes_outputs(tiny_dataset, tmp_path, make_config):
    cfg = make_config(finetune={"epochs": 6, "patience": 6})
    metrics = finetune(cfg, tiny_dataset, tmp_path)
    epochs = log_records(tmp_path, "epoch")
    losses = [r["train_loss"] for r in epochs]
    assert losses[-1] < losses[0] - 0.1  # the loss falls
    assert metrics["valid"]["auc"] > 0.7 and metrics["test"]["auc"] > 0.7
    for key in ("samples_per_second", "epochs", "best_epoch", "seconds"):
        assert metrics["train"][key] > 0
    assert metrics["params"] > 0
    assert read_json(tmp_path / "config.json") == cfg.to_dict()
    assert read_json(tmp_path / "metrics.json") == json.loads(json.dumps(metrics))
    assert not (tmp_path / "checkpoint").exists()

    # predictions and weights are those of the best epoch and reproduce the metrics
    for split in ("valid", "test"):
        pred = pq.read_table(tmp_path / "predictions" / f"{split}.parquet")
        assert pred.column_names == ["row", "label", "prob"]
        truth = pq.read_table(tiny_dataset / f"{split}.parquet", columns=["row", "label"])
        assert pred.column("row").to_pylist() == truth.column("row").to_pylist()
        assert pred.column("label").to_pylist() == truth.column("label").to_pylist()
        y, p = pred.column("label").to_numpy(), pred.column("prob").to_numpy()
        assert auc(y, p) == metrics[split]["auc"] and logloss(y, p) == metrics[split]["logloss"]
    from flip.models import build_id_model

    data = load_ctr_data(tiny_dataset)
    model = build_id_model(cfg.id_model, data.num_fields, data.vocab_size)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    model.eval()
    with torch.inference_mode():
        prob = torch.sigmoid(model(data.splits["test"].x).double()).numpy()
    assert auc(data.splits["test"].y.numpy(), prob) == pytest.approx(metrics["test"]["auc"], abs=1e-12)


def test_early_stopping_keeps_best_valid_weights(tiny_dataset, tmp_path, make_config):
    # a large learning rate and many epochs: the tiny data is overfitted and validation AUC drops
    cfg = make_config(finetune={"epochs": 30, "patience": 2, "lr": 0.03, "l2_embedding": 0.0})
    metrics = finetune(cfg, tiny_dataset, tmp_path)
    epochs = log_records(tmp_path, "epoch")
    aucs = [r["valid_auc"] for r in epochs]
    best = int(np.argmax(aucs)) + 1
    assert metrics["train"]["best_epoch"] == best
    assert metrics["train"]["epochs"] == len(epochs) == best + 2 < 30  # stopped after patience epochs
    assert metrics["valid"]["auc"] == aucs[best - 1] != aucs[-1]  # best weights, not the last ones
    assert metrics["valid"]["logloss"] == epochs[best - 1]["valid_logloss"]
    assert log_records(tmp_path, "early_stop")[0]["best_epoch"] == best


def test_same_seed_identical_different_seed_different(tiny_dataset, tmp_path, make_config):
    a = finetune(make_config(run={"seeds": [11]}), tiny_dataset, tmp_path / "a")
    b = finetune(make_config(run={"seeds": [11]}), tiny_dataset, tmp_path / "b")
    c = finetune(make_config(run={"seeds": [12]}), tiny_dataset, tmp_path / "c")
    assert scores(a) == scores(b)
    assert a["train"]["best_epoch"] == b["train"]["best_epoch"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert scores(a)["valid.auc"] != scores(c)["valid.auc"]
    assert scores(a)["test.logloss"] != scores(c)["test.logloss"]


def test_resume_after_mid_epoch_kill_matches_uninterrupted(tiny_dataset, tmp_path, make_config):
    # 3000 rows / 256 = 12 batches per epoch; checkpoints every 5 batches and at epoch ends
    cfg = make_config(finetune={"epochs": 3, "patience": 3}, run={"checkpoint_every": 5})
    reference = finetune(make_config(finetune={"epochs": 3, "patience": 3}), tiny_dataset, tmp_path / "ref")

    out = tmp_path / "resumed"
    # killed in epoch 2, batch 7: the last checkpoint is epoch 2, batch 5
    with crash_after(19), pytest.raises(SimulatedCrash):
        finetune(cfg, tiny_dataset, out)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "metrics.json").exists()
    with crash_after(10), pytest.raises(SimulatedCrash):  # killed again, in epoch 3
        finetune(cfg, tiny_dataset, out)
    resumed = finetune(cfg, tiny_dataset, out)

    assert scores(resumed) == scores(reference)
    for key in ("epochs", "best_epoch", "steps", "loss"):
        assert resumed["train"][key] == reference["train"][key]
    resumes = log_records(out, "resume")
    assert [(r["epoch"], r["step"]) for r in resumes] == [(2, 5), (3, 0)]
    assert [r["train_loss"] for r in log_records(out, "epoch")] == [
        r["train_loss"] for r in log_records(tmp_path / "ref", "epoch")
    ]
    assert not (out / "checkpoint").exists()

    # a finished run is recognised: nothing is trained again
    before = (out / "log.jsonl").read_bytes()
    assert finetune(cfg, tiny_dataset, out) == resumed
    assert (out / "log.jsonl").read_bytes() == before


def test_multi_seed_aggregation(tiny_dataset, tmp_path, make_config):
    cfg = make_config(finetune={"epochs": 2}, run={"seeds": [1, 2, 3]})
    agg = finetune(cfg, tiny_dataset, tmp_path)
    per = [read_json(tmp_path / f"seed-{s}" / "metrics.json") for s in (1, 2, 3)]
    for s in (1, 2, 3):
        assert read_json(tmp_path / f"seed-{s}" / "config.json")["run"]["seeds"] == [s]
    for split, metric in SCORES:
        values = np.array([m[split][metric] for m in per])
        assert agg[split][metric] == pytest.approx(values.mean(), rel=1e-12)
        assert agg["mean"][split][metric] == agg[split][metric]
        assert agg["std"][split][metric] == pytest.approx(values.std(ddof=1), rel=1e-9)
        assert [agg["per_seed"][f"seed-{s}"][split][metric] for s in (1, 2, 3)] == list(values)
    assert read_json(tmp_path / "metrics.json")["seeds"] == [1, 2, 3]
    assert read_json(tmp_path / "config.json")["run"]["seeds"] == [1, 2, 3]
    # the seed-2 run alone, in its own directory, gives that seed's numbers
    alone = finetune(make_config(finetune={"epochs": 2}, run={"seeds": [2]}), tiny_dataset, tmp_path / "alone")
    assert scores(alone) == scores(per[1])


def test_max_rows_and_adamw(tiny_dataset, tmp_path, make_config):
    cfg = make_config(finetune={"epochs": 1, "max_rows": 1000, "optimizer": "adamw", "weight_decay": 0.01})
    finetune(cfg, tiny_dataset, tmp_path)
    start = log_records(tmp_path, "start")[0]
    assert start["n_train"] == 1000 and start["steps_per_epoch"] == 4
    from flip.train.builders import build_scratch

    task = build_scratch(cfg, load_ctr_data(tiny_dataset), torch.device("cpu"))
    assert type(task.optimizer) is torch.optim.AdamW
    assert task.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_unknown_strategy_and_optimizer(tiny_dataset, tmp_path, make_config):
    with pytest.raises(ValueError, match=r"unknown finetune.strategy='nope'; valid strategies: .*scratch"):
        finetune(make_config(finetune={"strategy": "nope"}), tiny_dataset, tmp_path)
    from flip.errors import FlipError  # FLIP's strategies are registered (flip.train.builders)

    with pytest.raises(FlipError, match=r"run `flip pretrain` first or pass --pretrained DIR"):
        finetune(make_config(finetune={"strategy": "flip"}), tiny_dataset, tmp_path)
    with pytest.raises(ValueError, match="adam or adamw"):
        finetune(make_config(finetune={"optimizer": "sgd"}), tiny_dataset, tmp_path)


def test_embedding_regulariser_is_lookup_l2_averaged_over_batch(tiny_dataset, make_config):
    import torch.nn.functional as F

    from flip.train.builders import build_scratch

    cfg = make_config(finetune={"l2_embedding": 0.5})
    data = load_ctr_data(tiny_dataset)
    task = build_scratch(cfg, data, torch.device("cpu"))
    task.model.eval()  # no dropout: the two computations see the same network
    idx = torch.arange(10, 74)
    x, y = data.train.x[idx], data.train.y[idx]
    expected = F.binary_cross_entropy_with_logits(task.model(x), y) + 0.5 * task.model.embedding(x).pow(2).sum() / 64
    assert task.loss(idx).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["dcnv2", "dcn", "deepfm", "autoint", "xdeepfm", "pnn", "widedeep", "afn", "afm"])
def test_every_id_model_trains_with_scratch(tiny_dataset, tmp_path, make_config, name):
    cfg = make_config(id_model={"name": name, "afn_log_neurons": 16, "attention_dim": 8, "cin_layer_units": [8]},
                      finetune={"epochs": 1, "max_rows": 1024})
    metrics = finetune(cfg, tiny_dataset, tmp_path)
    assert np.isfinite(metrics["valid"]["logloss"]) and metrics["train"]["best_epoch"] == 1


def test_precision_setting():
    from flip.train.precision import native_bf16, use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("fp32", cpu) is False and use_bf16("bf16", cpu) is True
    assert use_bf16("auto", cpu) == native_bf16(cpu)
    assert use_bf16("auto", torch.device("meta")) is False
    with pytest.raises(ValueError, match="finetune.precision='fp16' must be auto, bf16 or fp32"):
        use_bf16("fp16", cpu, "finetune.precision")


def test_bf16_training_autocasts_the_forward_and_scores_in_fp32(tiny_dataset, tmp_path, make_config):
    from flip.train.builders import build_scratch

    cfg = make_config(finetune={"precision": "bf16", "epochs": 6, "patience": 6})
    data = load_ctr_data(tiny_dataset)
    task = build_scratch(cfg, data, torch.device("cpu"))
    seen = []
    task.model.fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss = task.loss(torch.arange(64))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32  # bf16 products, fp32 loss
    assert all(p.dtype == torch.float32 for p in task.model.parameters())  # fp32 master weights
    with torch.inference_mode():
        logits = task.predict("test", torch.arange(32))
    assert seen[-1] == torch.float32 and logits.dtype == torch.float32  # scoring: fp32

    bf16 = finetune(cfg, tiny_dataset, tmp_path / "bf16")
    again = finetune(cfg, tiny_dataset, tmp_path / "again")
    fp32 = finetune(make_config(finetune={"precision": "fp32", "epochs": 6, "patience": 6}), tiny_dataset,
                    tmp_path / "fp32")
    assert scores(bf16) == scores(again)  # deterministic under a seed
    assert scores(bf16) != scores(fp32)  # a different computation ...
    assert bf16["test"]["auc"] > 0.7  # ... that learns as well
    assert bf16["test"]["auc"] == pytest.approx(fp32["test"]["auc"], abs=0.03)
    assert read_json(tmp_path / "bf16" / "run.json")["precision"] == "bf16"


def test_oov_dropout_trains_the_oov_rows(tiny_dataset, tmp_path, make_config):
    from flip.train.builders import build_scratch

    data = load_ctr_data(tiny_dataset)
    oov = torch.tensor([f["oov_id"] for f in data.meta["fields"]])
    seen = []

    def batch_ids(p):
        task = build_scratch(make_config(finetune={"oov_dropout": p}), data, torch.device("cpu"))
        task.model.embedding.register_forward_hook(lambda m, i, out: seen.append(i[0].clone()))
        torch.manual_seed(0)
        task.loss(torch.arange(2000))
        return seen[-1]

    x = data.train.x[:2000]
    assert torch.equal(batch_ids(0.0), x)  # off: the batch as stored
    dropped = batch_ids(0.25)
    replaced = dropped != x
    assert torch.equal(dropped[replaced], oov.expand_as(x)[replaced])  # replaced ids are the field's OOV id
    assert abs((dropped == oov).float().mean().item() - 0.25) < 0.02  # at about the asked rate
    with pytest.raises(ValueError, match="oov_dropout"):
        build_scratch(make_config(finetune={"oov_dropout": 1.0}), data, torch.device("cpu"))

    # in training, the OOV rows move away from their initialisation only with oov_dropout > 0
    from safetensors.torch import load_file

    from flip.models import build_id_model

    cfg = make_config(finetune={"oov_dropout": 0.1, "epochs": 2})
    finetune(cfg, tiny_dataset, tmp_path / "on")
    finetune(make_config(finetune={"epochs": 2}), tiny_dataset, tmp_path / "off")
    torch.manual_seed(cfg.run.seeds[0])
    init = build_id_model(cfg.id_model, data.num_fields, data.vocab_size).embedding.weight.detach()[oov]
    on = load_file(tmp_path / "on" / "model.safetensors")["embedding.weight"][oov]
    off = load_file(tmp_path / "off" / "model.safetensors")["embedding.weight"][oov]
    assert (on - init).norm() > 10 * (off - init).norm()


def test_learning_rate_selection_on_validation_only(tiny_dataset, tmp_path, make_config):
    """Each candidate trains with the first seed and never sees the test split; the best validation AUC
    wins; its run becomes the first seed's run and is scored on test once; the other seeds use it."""
    cfg = make_config(finetune={"epochs": 3, "patience": 3, "lr_grid": [1e-5, 1e-2]}, run={"seeds": [7, 8]})
    metrics = finetune(cfg, tiny_dataset, tmp_path)
    sel = RunDir(tmp_path).selection()  # selection.json: the metrics are the seeds' alone
    assert "selection" not in metrics and "selection" not in read_json(tmp_path / "metrics.json")
    assert [c["lr"] for c in sel["candidates"]] == [1e-5, 1e-2] and sel["seed"] == 7
    best = max(sel["candidates"], key=lambda c: c["valid_auc"])
    assert sel["selected"]["lr"] == best["lr"] == 1e-2  # 1e-5 barely moves in 3 epochs
    for c in sel["candidates"]:
        cand = tmp_path / "candidates" / f"lr={c['lr']:g}"
        assert read_json(cand / "metrics.json")["valid"]["auc"] == c["valid_auc"]
        assert "test" not in read_json(cand / "metrics.json")  # never scored on test
        assert not (cand / "predictions" / "test.parquet").exists()
        assert not any(r["event"] == "test" for r in log_records(cand))
    # the winner is the first seed's run: same weights, same validation score, now with a test score
    first = tmp_path / "seed-7"
    winner = tmp_path / "candidates" / "lr=0.01"
    assert load_file(first / "model.safetensors").keys() == load_file(winner / "model.safetensors").keys()
    assert all(torch.equal(load_file(first / "model.safetensors")[k], v)
               for k, v in load_file(winner / "model.safetensors").items())
    m7 = read_json(first / "metrics.json")
    assert m7["valid"]["auc"] == best["valid_auc"] and "auc" in m7["test"]
    assert read_json(tmp_path / "seed-8" / "config.json")["finetune"]["lr"] == 1e-2
    assert metrics["per_seed"]["seed-7"]["test"] == m7["test"]
    # the test score of the adopted run is what its weights give
    y, p = (pq.read_table(first / "predictions" / "test.parquet").column(c).to_numpy() for c in ("label", "prob"))
    assert auc(y, p) == m7["test"]["auc"]
    # running again finds every run finished: nothing retrains, the same metrics come back
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")}
    assert finetune(cfg, tiny_dataset, tmp_path) == json.loads(json.dumps(metrics))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")} == mtimes


def test_one_candidate_means_no_selection(tiny_dataset, tmp_path, make_config):
    cfg = make_config(finetune={"epochs": 1, "lr_grid": [3e-3]})
    metrics = finetune(cfg, tiny_dataset, tmp_path)
    assert "selection" not in metrics and not (tmp_path / "candidates").exists()
    assert RunDir(tmp_path).selection() is None
    assert read_json(tmp_path / "config.json")["finetune"]["lr"] == 3e-3


def test_train_rows_and_eval_rows_apply_to_every_strategy(tiny_dataset, tmp_path, make_config):
    cfg = make_config(finetune={"epochs": 1, "train_rows": 1000, "eval_rows": 200})
    finetune(cfg, tiny_dataset, tmp_path)
    assert log_records(tmp_path, "start")[0]["n_train"] == 1000
    rows = pq.read_table(tmp_path / "predictions" / "test.parquet").column("row").to_numpy()
    all_rows = pq.read_table(tiny_dataset / "test.parquet", columns=["row"]).column("row").to_numpy()
    assert len(rows) == 200 and rows[0] == all_rows[0] and rows[-1] == all_rows[-1]  # evenly spaced


def test_resuming_and_discarding_a_checkpoint_are_said_on_the_terminal(tiny_dataset, tmp_path, make_config, capsys):
    cfg = make_config(finetune={"epochs": 2}, run={"checkpoint_every": 5, "progress": True})
    out = tmp_path / "run"
    with crash_after(7), pytest.raises(SimulatedCrash):
        finetune(cfg, tiny_dataset, out)
    capsys.readouterr()
    with crash_after(3), pytest.raises(SimulatedCrash):
        finetune(cfg, tiny_dataset, out)
    assert f"resuming {out} from its checkpoint: epoch 1, step 5 of 12" in capsys.readouterr().err
    changed = make_config(finetune={"epochs": 2, "lr": 1e-2}, run={"checkpoint_every": 5, "progress": True})
    finetune(changed, tiny_dataset, out)
    err = capsys.readouterr().err
    assert "its checkpoint was made with other settings or data: starting fresh" in err
    assert "from its checkpoint" not in err
    assert "epoch 2/2: train loss" in err and "valid AUC" in err


def test_every_strategy_names_a_builder_in_flip_train_builders():
    """The table spells each builder out as ``flip.train.builders:build_<name>``, so grep finds it."""
    import inspect

    from flip.strategy_table import STRATEGIES
    from flip.train import builders

    for name, strategy in STRATEGIES.items():
        assert strategy.build == f"flip.train.builders:build_{name}"
        assert strategy.builder is getattr(builders, f"build_{name}")
        assert list(inspect.signature(strategy.builder).parameters) == ["cfg", "data", "device", "pretrained"]


def test_a_split_beyond_the_resident_budget_trains_exactly_as_one_in_memory(tiny_dataset, tmp_path, make_config):
    """run.resident_mib: the ids of a larger split live in a memory-mapped file and batches are gathered
    from it; the run is the in-memory run, bit for bit (weights and scores)."""
    import importlib

    finetune_mod = importlib.import_module("flip.train.finetune")  # (flip.train.finetune is also the function)

    real = finetune_mod.load_ctr_data
    budgets = []

    def tiny_budget(*args, **kwargs):  # the tiny splits are far below 1 MiB: put the budget at 1 KiB
        budgets.append(kwargs.get("budget_bytes"))
        kwargs["budget_bytes"] = 1024
        data = real(*args, **kwargs)
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        assert not maps or "flip-tensor-" in maps
        return data

    a = finetune(make_config(run={"seeds": [11]}), tiny_dataset, tmp_path / "a")
    old = finetune_mod.load_ctr_data
    finetune_mod.load_ctr_data = tiny_budget
    try:
        b = finetune(make_config(run={"seeds": [11]}), tiny_dataset, tmp_path / "b")
    finally:
        finetune_mod.load_ctr_data = old
    assert budgets == [2048 << 20]  # run.resident_mib reaches the loader
    assert scores(a) == scores(b)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
