"""The deploy tests' shared fixture: one real bundle, built once per session by the real pipeline."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from helpers import pinned_config


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A processed synthetic dataset, a two-seed scratch run on it, and its bundle. Tests must not
    modify them (copy the bundle to corrupt it)."""
    from flip.data.preprocess import preprocess, split_values
    from flip.deploy.package import package
    from flip.train.finetune import finetune

    root = tmp_path_factory.mktemp("deploy")
    cfg = pinned_config({
        "data": {"dataset": "synthetic", "synthetic": {"rows": 3000, "fields": 6}},
        "id_model": {"embedding_dim": 8, "dnn_hidden_units": [32, 16], "low_rank": 4, "num_experts": 2},
        "finetune": {"strategy": "scratch", "epochs": 2, "train_rows": 0, "eval_rows": 0, "lr_grid": [],
                     "batch_size": 256, "eval_batch_size": 512, "precision": "fp32"},
        "run": {"seeds": [1, 2], "threads": 1, "progress": False},
    })
    data = root / "data"
    preprocess(cfg, root / "raw", data, progress=False)
    finetune(cfg, data, root / "run")
    info = package(root / "run", data, root / "bundle")
    test = split_values(data, "test")
    pq.write_table(test, root / "test.parquet")
    torch.set_num_threads(1)
    return {"root": root, "data": data, "bundle": root / "bundle", "info": info, "test": test}
