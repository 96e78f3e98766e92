"""The deploy tests' shared fixture: one real bundle, built once per session by the real pipeline."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from helpers import preset_config


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A processed synthetic dataset, a two-seed scratch run on it, and its bundle. Tests must not
    modify them (copy the bundle to corrupt it)."""
    from flip.data.preprocess import preprocess, split_values
    from flip.deploy.package import package
    from flip.train.finetune import finetune

    root = tmp_path_factory.mktemp("deploy")
    cfg = preset_config("served")
    data = root / "data"
    preprocess(cfg, root / "raw", data, progress=False)
    finetune(cfg, data, root / "run")
    info = package(root / "run", data, root / "bundle")
    test = split_values(data, "test")
    pq.write_table(test, root / "test.parquet")
    torch.set_num_threads(1)
    return {"root": root, "data": data, "bundle": root / "bundle", "info": info, "test": test}
