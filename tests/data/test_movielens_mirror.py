"""The genuine MovieLens-1M copy (users 1-2999) under ../shared/data: exact counts. Skips when absent."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import SHARED_DATA, ml1m_available
from flip.cli import app
from flip.data.tensors import load_meta

pytestmark = [pytest.mark.mirror, pytest.mark.skipif(not ml1m_available(), reason="no MovieLens-1M copy")]


def test_movielens_copy_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIP_DATA_MIRROR", str(SHARED_DATA))
    runner = CliRunner()
    raw, out = tmp_path / "raw" / "movielens-1m", tmp_path / "processed" / "movielens-1m"
    assert runner.invoke(app, ["download", "--out", str(raw), "-q"]).exit_code == 0
    result = runner.invoke(app, ["preprocess", "--raw", str(raw), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    meta = load_meta(out)
    assert meta["counts"] == {"total": 360_434, "train": 288_347, "valid": 36_043, "test": 36_044}
    assert abs(meta["positive_rate"]["total"] - 0.7744) < 1e-4  # 77.44 % positive (the copy's README)
    assert [f["name"] for f in meta["fields"]] == [
        "user_id", "gender", "age", "occupation", "zipcode", "movie_id", "title", "genres"]
    assert meta["time_range"]["train"][1] <= meta["time_range"]["valid"][0] <= meta["time_range"]["test"][0]
