"""`dvc repro validate` (download → preprocess → validate) in a temporary git repo, on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_the_data_stages_and_then_nothing(dvc_repo):
    out = dvc_repo("dvc", "repro", "validate")
    for stage in ("download", "preprocess", "validate"):
        assert f"Running stage '{stage}'" in out
    meta = json.loads(Path("data/processed/synthetic/meta.json").read_text())
    assert meta["counts"] == {"total": 3000, "train": 2400, "valid": 300, "test": 300}
    metrics = json.loads(Path("reports/validation.json").read_text())
    assert metrics["success"]
    assert Path("reports/gx_docs/index.html").exists()
    # second run: everything is up to date
    again = dvc_repo("dvc", "repro", "validate")
    assert "Running stage" not in again
    # the validation record is an output, not a DVC metric (the metrics are evaluate's headline numbers)
    assert "validation.json" not in dvc_repo("dvc", "metrics", "show")
    # a params change re-runs exactly the stages that read it
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["preprocess"]["min_count"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc_repo("dvc", "repro", "validate")
    assert "Running stage 'preprocess'" in third and "Running stage 'download'" not in third
