"""Row-sparse embedding updates (``id_model.embedding_updates``, flip.train.sparse_updates).

Lazy Adam by hand on a tiny table, the first sparse step against the dense Adam step, rows a step does
not use left byte-identical (also under weight decay and in pretraining, where the dense path moves
them), the lookup-L2 term and its row-sparse gradient, ``auto`` by vocabulary size, resuming.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flip.config import ConfigError, FinetuneConfig, IdModelConfig, load_config
from flip.errors import SettingError
from flip.models import build_id_model
from flip.train.builders import build_scratch
from flip.train.callbacks import SimulatedCrash, crash_after
from flip.train.finetune import finetune
from flip.train.sparse_updates import SPARSE_ABOVE, LazyAdam, SplitOptimizer, sparse_tables, use_sparse_updates
from flip.train.tasks import load_ctr_data, make_optimizer
from helpers import preset_config

SMALL_ID = {"name": "dcnv2", "embedding_dim": 4, "dnn_hidden_units": [8], "dropout": 0.0, "cross_layers": 1,
            "low_rank": 2, "num_experts": 2}


# ------------------------------------------------------------------------------------ settings
def test_auto_resolves_by_vocabulary_size_and_bad_values_fail():
    assert not use_sparse_updates("auto", SPARSE_ABOVE) and use_sparse_updates("auto", SPARSE_ABOVE + 1)
    assert not use_sparse_updates("auto", SPARSE_ABOVE + 1, distributed=True)  # DDP: dense gradients only
    assert use_sparse_updates("sparse", 10) and not use_sparse_updates("dense", 10 * SPARSE_ABOVE)
    with pytest.raises(SettingError, match="several ranks"):
        use_sparse_updates("sparse", 10, distributed=True)
    with pytest.raises(ConfigError, match="embedding_updates must be auto, dense or sparse"):
        load_config(None, ["id_model.embedding_updates=lazy"])

    cfg = IdModelConfig(**SMALL_ID)
    small = build_id_model(cfg, 3, 50)
    assert sparse_tables("auto", 50, small) == [] and not small.embedding.sparse
    big = build_id_model(cfg, 3, 50)
    assert [t.shape for t in sparse_tables("auto", SPARSE_ABOVE + 1, big)] == [(50, 4)] and big.embedding.sparse


def test_default_scratch_keeps_the_dense_fused_adam(tiny_dataset, make_config):
    task = build_scratch(make_config(), load_ctr_data(tiny_dataset), torch.device("cpu"))
    assert type(task.optimizer) is torch.optim.Adam and not task.model.embedding.sparse
    sparse = build_scratch(make_config(id_model={"embedding_updates": "sparse"}), load_ctr_data(tiny_dataset),
                           torch.device("cpu"))
    assert isinstance(sparse.optimizer, SplitOptimizer) and sparse.model.embedding.sparse
    assert [p.shape for g in sparse.optimizer.sparse.param_groups for p in g["params"]] == [
        sparse.model.embedding.weight.shape]


# ------------------------------------------------------------------------------------ lazy Adam
def lazy_adam_by_hand(w0: np.ndarray, batches: list[list[int]], coef: np.ndarray, lr: float, wd: float,
                      decoupled: bool, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    """Lazy Adam on loss_t = sum_{i in batch_t} <coef, E[i]> (a row used twice counts twice), float64."""
    w, m, v = w0.astype(np.float64).copy(), np.zeros_like(w0, np.float64), np.zeros_like(w0, np.float64)
    for t, batch in enumerate(batches, start=1):
        rows, counts = np.unique([i for i in batch if i != 0], return_counts=True)
        for r, c in zip(rows, counts):
            g = c * coef
            if decoupled:
                w[r] *= 1 - lr * wd
            else:
                g = g + wd * w[r]
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            step = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            w[r] -= step * m[r] / (np.sqrt(v[r]) + eps)
    return w


@pytest.mark.parametrize("decoupled", [False, True])
def test_lazy_adam_matches_the_hand_computation_and_leaves_unused_rows_untouched(decoupled):
    torch.manual_seed(0)
    table = nn.Embedding(8, 3, padding_idx=0, sparse=True)
    w0 = table.weight.detach().clone()
    coef = torch.tensor([0.5, -1.0, 2.0])
    batches = [[1, 2, 2, 0], [3, 1], [2, 5, 5, 5]]  # rows 4, 6, 7 never used; 0 is padding
    opt = LazyAdam([table.weight], lr=0.1, weight_decay=0.05, decoupled=decoupled)
    for batch in batches:
        (table(torch.tensor(batch)) * coef).sum().backward()
        assert table.weight.grad.is_sparse
        opt.step()
        opt.zero_grad(set_to_none=True)
    expected = lazy_adam_by_hand(w0.numpy(), batches, coef.numpy(), 0.1, 0.05, decoupled)
    np.testing.assert_allclose(table.weight.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    for row in (0, 4, 6, 7):  # byte-identical: no weight decay, no momentum on rows a step does not use
        assert torch.equal(table.weight[row], w0[row])
    assert not torch.equal(table.weight[3], w0[3])

    # dense Adam(W) moves row 1 at step 3 (momentum, decay) although step 3 does not use it
    dense = nn.Embedding(8, 3, padding_idx=0)
    dense.weight.data.copy_(w0)
    dopt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([dense.weight], lr=0.1, weight_decay=0.05)
    for batch in batches:
        (dense(torch.tensor(batch)) * coef).sum().backward()
        dopt.step()
        dopt.zero_grad(set_to_none=True)
    assert not torch.equal(dense.weight[4], w0[4])
    assert not np.allclose(dense.weight[1].detach().numpy(), expected[1], rtol=1e-5, atol=1e-6)


def test_first_sparse_step_equals_the_dense_adam_step():
    """From a fresh state one lazy-Adam step moves the used rows as Adam does (Adam moves no other row
    on its first step either); the dense rest of the model steps with the same fused Adam. SparseAdam
    adds eps to sqrt(v) before the bias correction, Adam after it: the steps agree where |g| >> eps,
    hence the loss scale (Adam is otherwise invariant to it)."""
    cfg = IdModelConfig(**SMALL_ID)
    torch.manual_seed(3)
    dense_model = build_id_model(cfg, 4, 40)
    sparse_model = build_id_model(cfg, 4, 40)
    sparse_model.load_state_dict(dense_model.state_dict())
    fcfg = FinetuneConfig(lr=0.01)
    dense_opt = make_optimizer(dense_model.parameters(), fcfg)
    sparse_opt = make_optimizer(sparse_model.parameters(), fcfg, sparse_tables("sparse", 40, sparse_model))
    x = torch.randint(1, 40, (32, 4), generator=torch.Generator().manual_seed(1))
    y = (torch.arange(32) % 2).float()
    losses = []
    for model, opt in ((dense_model, dense_opt), (sparse_model, sparse_opt)):
        loss = 1e4 * F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (name, a), b in zip(dense_model.state_dict().items(), sparse_model.state_dict().values()):
        if name == "embedding.weight":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
            assert not torch.equal(a, dense_model.embedding.weight.new_zeros(a.shape))
        else:
            assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------- regulariser
def test_lookup_l2_is_the_hand_computation_and_its_gradient_is_row_sparse(tiny_dataset, make_config):
    data = load_ctr_data(tiny_dataset)
    cfg = make_config(id_model={"embedding_updates": "sparse"}, finetune={"l2_embedding": 0.5})
    task = build_scratch(cfg, data, torch.device("cpu"))
    plain = build_scratch(make_config(id_model={"embedding_updates": "sparse"}, finetune={"l2_embedding": 0.0}),
                          data, torch.device("cpu"))
    plain.model.load_state_dict(task.model.state_dict())
    for t in (task, plain):  # no dropout: the computations see the same network; float64: the L2 part of
        t.model.eval().double()  # the gradient is recovered by a subtraction
    idx = torch.arange(10, 74)
    x, y = data.train.x[idx], data.train.y[idx]
    E = task.model.embedding.weight.detach()
    expected = F.binary_cross_entropy_with_logits(task.model(x), y) + 0.5 * E[x].pow(2).sum() / 64
    loss = task.loss(idx)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    plain.loss(idx).backward()
    grad, base = task.model.embedding.weight.grad, plain.model.embedding.weight.grad
    assert grad.is_sparse and base.is_sparse
    assert torch.equal(grad.coalesce().indices()[0], torch.unique(x))  # the rows of the batch, nothing else
    counts = torch.bincount(x.flatten(), minlength=E.shape[0]).float()[:, None]
    torch.testing.assert_close(grad.to_dense() - base.to_dense(), 2 * 0.5 / 64 * counts * E, rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------------------------- resuming
def test_sparse_finetuning_resumes_identically(tiny_dataset, tmp_path, make_config):
    # 3000 rows / 256 = 12 batches per epoch; checkpoints every 5 batches and at epoch ends
    settings = {"id_model": {"embedding_updates": "sparse"}, "finetune": {"epochs": 2, "patience": 3,
                                                                         "weight_decay": 1e-4}}
    reference = finetune(make_config(**settings), tiny_dataset, tmp_path / "ref")
    cfg = make_config(**settings, run={"checkpoint_every": 5})
    out = tmp_path / "resumed"
    with crash_after(17), pytest.raises(SimulatedCrash):  # epoch 2, batch 5 checkpointed
        finetune(cfg, tiny_dataset, out)
    ckpt = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert set(ckpt["optimizer"]) == {"dense", "sparse"} and ckpt["optimizer"]["sparse"]["state"]
    resumed = finetune(cfg, tiny_dataset, out)
    assert {k: resumed[k] for k in ("valid", "test")} == {k: reference[k] for k in ("valid", "test")}
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    dense = finetune(make_config(finetune=settings["finetune"]), tiny_dataset, tmp_path / "dense")
    assert dense["valid"] != reference["valid"]  # lazy Adam is another optimiser


# ---------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def pretrain_env(tmp_path_factory, synthetic_data, tiny_bert):
    data = synthetic_data(3000)
    return data, tiny_bert(data, 300), tmp_path_factory.mktemp("sparse-pretrain") / "tokens"


def pretrain_cfg(env, updates: str, run: dict | None = None, **pretrain):
    data, bert, tokens = env
    return preset_config("tiny_pretrain", {
        "id_model": {**SMALL_ID, "embedding_updates": updates},
        "plm": {"name": str(bert), "cache_dir": str(tokens)},
        "pretrain": {"epochs": 1, "batch_size": 32, "lr": 1e-2, "plm_lr": 1e-2, "warmup_steps": 0, "max_steps": 0,
                     "train_rows": 96, "weight_decay": 1e-2, **pretrain},
        "run": run or {},
    })


def test_pretraining_with_sparse_updates_leaves_untouched_rows_untouched(pretrain_env):
    from flip.models.plm import load_tokenizer
    from flip.train.pretrain import PretrainTask, load_pretrain_data

    device = torch.device("cpu")
    moved = {}
    for updates in ("sparse", "dense"):
        cfg = pretrain_cfg(pretrain_env, updates)
        data = load_pretrain_data(cfg, pretrain_env[0], load_tokenizer(cfg.plm.name), device, progress=False)
        torch.manual_seed(1)
        task = PretrainTask(cfg, data, device, seed=1)
        model = task.model
        tables = {"embedding": model.id_model.embedding.weight, "out_embedding": model.mtm.out_embedding.weight,
                  "out_bias": model.mtm.out_bias}
        before = {k: t.detach().clone() for k, t in tables.items()}
        touched = {k: torch.zeros(t.shape[0], dtype=torch.bool) for k, t in tables.items()}
        for start in (0, 32, 64):
            loss, _ = task.loss(torch.arange(start, start + 32))
            loss.backward()
            for k, t in tables.items():
                assert t.grad.is_sparse == (updates == "sparse"), k
                if t.grad.is_sparse:
                    touched[k][t.grad.coalesce().indices()[0]] = True
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
            task.scheduler.step()
        if updates == "sparse":
            assert isinstance(task.optimizer, SplitOptimizer)
            # the ID table: exactly the ids of the 96 rows and [MASK] (the masked table's input)
            used = torch.zeros(data.vocab_size, dtype=torch.bool)
            used[data.x.flatten()] = True
            used[int(data.meta["mask_id"])] = True
            used[0] = False
            assert torch.equal(touched["embedding"], used)
            for k, t in tables.items():
                assert 0 < int(touched[k].sum()) < t.shape[0], k
                assert torch.equal(t.detach()[~touched[k]], before[k][~touched[k]]), k
            untouched = {k: ~touched[k] for k in tables}
        moved[updates] = {k: bool((t.detach()[untouched[k]] != before[k][untouched[k]]).any())
                          for k, t in tables.items()}
    assert moved["sparse"] == {"embedding": False, "out_embedding": False, "out_bias": False}
    assert moved["dense"] == {"embedding": True, "out_embedding": True, "out_bias": True}  # AdamW decays every row


@pytest.mark.parametrize("updates", ["sparse", "dense"])
def test_pretraining_resumes_identically(pretrain_env, tmp_path, updates):
    from safetensors.torch import load_file

    from flip.train.pretrain import pretrain

    cfg = pretrain_cfg(pretrain_env, updates, train_rows=0, max_steps=6, warmup_steps=2)
    reference = pretrain(cfg, pretrain_env[0], tmp_path / "ref")
    out = tmp_path / "crashed"
    crashed = pretrain_cfg(pretrain_env, updates, run={"checkpoint_every": 2}, train_rows=0, max_steps=6,
                           warmup_steps=2)
    with crash_after(3), pytest.raises(SimulatedCrash):
        pretrain(crashed, pretrain_env[0], out)
    resumed = pretrain(crashed, pretrain_env[0], out)
    assert {k: resumed[k] for k in ("loss", "mlm", "mtm", "icl")} == {k: reference[k] for k in ("loss", "mlm", "mtm", "icl")}
    for name in ("heads.safetensors", "id_model.safetensors"):
        a, b = load_file(tmp_path / "ref" / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
