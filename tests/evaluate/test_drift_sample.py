"""The data-drift sample: drawn in DuckDB from a split's file (the drift stage, never loading the whole
split) or from a DataFrame (evaluate's windows), it is the same rows, seeded, with exact totals."""

from __future__ import annotations

import numpy as np
import pytest

from flip.config import load_config
from flip.data.preprocess import preprocess, split_values
from flip.evaluate.drift import sample_frame, sampled_split, split_slices
from helpers import preset_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-sample")
    cfg = load_config(None, preset_overrides("data.dataset=synthetic", "data.synthetic.rows=3000", "run.progress=false"))
    preprocess(cfg, tmp, tmp / "processed", progress=False)
    return tmp / "processed"


def test_a_files_sample_is_the_frames_sample_with_exact_totals(data):
    whole = split_values(data, "train").to_pandas()
    sample, rows, rate = sampled_split(data, "train", 250)
    assert rows == len(whole) > 250 and rate == float(whole["label"].astype(float).mean())
    assert len(sample) == 250 and sample["row"].is_monotonic_increasing and sample["row"].is_unique
    assert sample.equals(sample_frame(whole, 250).reset_index(drop=True))
    assert set(sample["row"]) <= set(whole["row"])
    # another seed, another sample; the same seed, the same sample (whatever the frame's row order)
    assert not sample.equals(sampled_split(data, "train", 250, seed=1)[0])
    shuffled = whole.sample(frac=1.0, random_state=5)
    assert sample_frame(shuffled, 250).reset_index(drop=True).equals(sample)


def test_a_window_within_the_bound_is_kept_whole(data):
    whole = split_values(data, "test").to_pandas()
    sample, rows, _ = sampled_split(data, "test", len(whole))
    assert rows == len(whole) and sample.equals(whole)
    assert sample_frame(whole, len(whole)) is whole


def test_the_id_like_drift_is_evidentlys_jensen_shannon_distance():
    """ID-like columns are tested outside Evidently (minutes per column of ~20k values there): the same
    Jensen-Shannon distance Evidently computes for a large categorical sample."""
    import numpy as np
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from flip.evaluate.drift import jensen_shannon

    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"user": rng.zipf(1.5, 3000).astype(str)})
    cur = pd.DataFrame({"user": (rng.zipf(1.5, 2000) + 3).astype(str)})
    definition = DataDefinition(categorical_columns=["user"])
    snap = Report([DataDriftPreset(columns=["user"])]).run(
        current_data=Dataset.from_pandas(cur, data_definition=definition),
        reference_data=Dataset.from_pandas(ref, data_definition=definition))
    (metric,) = [m for m in snap.dict()["metrics"] if m["metric_name"].startswith("ValueDrift")]
    assert metric["config"]["method"] == "Jensen-Shannon distance"
    assert jensen_shannon(ref["user"], cur["user"]) == pytest.approx(float(metric["value"]), abs=1e-12)
    assert jensen_shannon(ref["user"], ref["user"]) == 0.0


def test_time_slices_are_consecutive_row_ranges_sampled_like_the_frames_slices(data):
    """evaluate's slice windows, read from the file: the rows and the sample the in-memory slices gave."""
    whole = split_values(data, "test").to_pandas()
    slices = split_slices(data, "test", 4)
    bounds = np.linspace(0, len(whole), 5).astype(int)
    assert list(slices) == [f"test_slice_{k}" for k in range(1, 5)]
    for k, (lo, hi) in enumerate(slices.values()):
        part = whole.iloc[bounds[k]: bounds[k + 1]]
        assert (lo, hi) == (part["row"].iloc[0], part["row"].iloc[-1])
        sample, rows, rate = sampled_split(data, "test", 50, rows_between=(lo, hi))
        assert rows == len(part) > 50 and rate == pytest.approx(part["label"].astype(float).mean())
        assert sample.equals(sample_frame(part, 50).reset_index(drop=True))
    assert split_slices(data, "test", 1) == {"test_slice_1": (whole["row"].iloc[0], whole["row"].iloc[-1])}
