"""The validate stage: the pandera contract fails hard on bad processed data; GE writes Data Docs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flip.config import load_config
from flip.data.preprocess import preprocess
from flip.data.schemas import validate_processed
from flip.data.tensors import load_meta
from flip.errors import DataError


@pytest.fixture
def processed(tmp_path):
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic.rows=2000"])
    out = tmp_path / "processed" / "synthetic"
    preprocess(cfg, tmp_path, out, progress=False)
    return cfg, out


def test_contract_passes_on_fresh_output(processed):
    _, out = processed
    summary = validate_processed(out, load_meta(out))
    assert summary["success"] and summary["splits"]["train"]["rows"] == 1600


def rewrite(path, fn):
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


@pytest.mark.parametrize(
    "case, split, fn, fragment",
    [
        ("id outside its field", "train",
         lambda t: t.set_column(t.schema.get_field_index("gender"), "gender",
                                pa.array([999999] * len(t), pa.int32())), "gender"),
        ("label not 0/1", "valid",
         lambda t: t.set_column(t.schema.get_field_index("label"), "label", pa.array([2] * len(t), pa.int8())), "label"),
        ("time order broken", "test", lambda t: t.take(pa.array(list(range(len(t)))[::-1])), "time order"),
        ("span outside the text", "train",
         lambda t: t.set_column(t.schema.get_field_index("span_end"), "span_end",
                                pc.list_slice(t.column("span_end"), 0, 3)), "span"),
    ],
)
def test_contract_failures_are_reported(processed, case, split, fn, fragment):
    _, out = processed
    rewrite(out / f"{split}.parquet", fn)
    with pytest.raises(DataError) as err:
        validate_processed(out, load_meta(out))
    assert f"{split}.parquet" in str(err.value) and fragment in str(err.value)


def test_leakage_between_splits_is_caught(processed):
    _, out = processed
    train = pq.read_table(out / "train.parquet")
    pq.write_table(train, out / "valid.parquet")  # valid now holds training rows
    with pytest.raises(DataError, match="overlap"):
        validate_processed(out, load_meta(out))


@pytest.mark.slow
def test_great_expectations_quality_and_data_docs(processed, tmp_path):
    from flip.data.validate import validate

    cfg, out = processed
    reports = tmp_path / "reports"
    result = validate(cfg, out, reports)
    assert result["success"] and not result["failures"]
    assert (reports / "gx_docs" / "index.html").exists()
    saved = json.loads((reports / "validation.json").read_text())
    assert saved["counts"]["total"] == 2000 and saved["quality"]["train_quality"]["success"]

    # a label rate outside the band fails the stage and keeps the failed report aside
    bad = load_config(None, ["data.dataset=synthetic", "validate.positive_rate_band=[0.9, 1.0]"])
    with pytest.raises(DataError, match="expect_column_mean_to_be_between"):
        validate(bad, out, reports)
    assert (reports / "gx_docs-failed" / "index.html").exists()
    assert json.loads((reports / "validation.json").read_text())["success"]  # previous output untouched


@pytest.mark.slow
def test_a_time_far_outside_the_logs_period_fails_the_batch_check(processed, tmp_path):
    """The first training row at 1970-01-02 (a line cut inside its timestamp) among 2020 ones."""
    from flip.data.validate import validate

    cfg, out = processed
    ts = pq.read_table(out / "train.parquet").column("timestamp").to_pylist()
    rewrite(out / "train.parquet", lambda t: t.set_column(
        t.schema.get_field_index("timestamp"), "timestamp", pa.array([97732] + ts[1:], pa.int64())))
    with pytest.raises(DataError, match="expect_column_values_to_be_between"):
        validate(cfg, out, tmp_path / "reports")


@pytest.mark.slow
def test_data_docs_work_offline_and_list_every_validation(processed, tmp_path):
    """No stylesheet, script or image from a CDN; the index lists each validation as a plain link."""
    import re

    from flip.data.validate import validate

    cfg, out = processed
    validate(cfg, out, tmp_path / "reports")
    docs = tmp_path / "reports" / "gx_docs"
    pages = list(docs.rglob("*.html"))
    assert len(pages) >= 7
    for page in pages:
        text = page.read_text()
        assert not re.search(r'<(link|script|img)[^>]+(href|src)="https?://', text), page
        assert "<script" not in text and "static/styles/offline.css" in text
    index = (docs / "index.html").read_text()
    links = re.findall(r'<a href="(validations/[^"]+)">(\w+)</a>', index)
    assert sorted(name for _, name in links) == ["test_quality", "train_quality", "valid_quality"]
    assert all((docs / href).exists() for href, _ in links)
    assert index.count("fa-check-circle text-success") == 3 and "::before" in (
        docs / "static" / "styles" / "offline.css").read_text()


@pytest.mark.slow
def test_attribute_values_unseen_in_training_fail_the_window_check(processed, tmp_path):
    """A new window whose gender is mostly a value training never saw fails; new users do not."""
    from flip.data.validate import validate

    cfg, out = processed
    meta = load_meta(out)
    oov = {f["name"]: f["oov_id"] for f in meta["fields"]}
    t = pq.read_table(out / "test.parquet")
    rewrite(out / "test.parquet", lambda t: t.set_column(  # every user unseen: expected in a newer window
        t.schema.get_field_index("user_id"), "user_id", pa.array([oov["user_id"]] * len(t), pa.int32())))
    assert validate(cfg, out, tmp_path / "ok")["success"]
    gender = t.column("gender").to_pylist()
    cut = len(gender) // 10  # 10% of the window: above validate.max_unseen_share = 0.05
    rewrite(out / "test.parquet", lambda t: t.set_column(
        t.schema.get_field_index("gender"), "gender", pa.array([oov["gender"]] * cut + gender[cut:], pa.int32())))
    with pytest.raises(DataError, match=r"test: expect_column_values_to_not_be_in_set\(gender\)"):
        validate(cfg, out, tmp_path / "bad")


@pytest.mark.slow
def test_a_split_above_the_sample_bound_is_checked_exactly_and_sampled_for_great_expectations(
        processed, tmp_path, monkeypatch):
    """Splits above GX_SAMPLE_ROWS: Great Expectations sees a seeded sample (Data Docs), and the same
    expectations over all rows in DuckDB decide: one 1970 timestamp (the first of 1,600 rows) fails the stage
    whether or not the sample holds it."""
    import flip.data.validate as validate_module
    from flip.data.validate import exact_checks, validate

    cfg, out = processed
    monkeypatch.setattr(validate_module, "GX_SAMPLE_ROWS", 300)
    result = validate(cfg, out, tmp_path / "ok")
    assert result["success"] and not result["failures"]
    q = result["quality"]
    assert q["train_quality"]["sample_rows"] == 300 and q["train_exact"] == {"success": True, "failed": [],
                                                                             "rows": 1600}
    assert (tmp_path / "ok" / "gx_docs" / "index.html").exists()

    meta = load_meta(out)
    band = validate_module.time_band(out)
    assert exact_checks(out / "train.parquet", meta, cfg, "train", band, expected=1601)[2] == [
        "expect_table_row_count_to_equal(): observed 1600"]
    ts = pq.read_table(out / "train.parquet").column("timestamp").to_pylist()
    rewrite(out / "train.parquet", lambda t: t.set_column(
        t.schema.get_field_index("timestamp"), "timestamp", pa.array([97732] + ts[1:], pa.int64())))
    with pytest.raises(DataError, match=r"train: expect_column_values_to_be_between\(timestamp\): observed min 97732"):
        validate(cfg, out, tmp_path / "bad")
    bad = load_config(None, ["data.dataset=synthetic", "validate.positive_rate_band=[0.9, 1.0]"])
    _, failed, _ = exact_checks(out / "valid.parquet", meta, bad, "valid", band)
    assert [f.split(":")[0] for f in failed] == ["expect_column_mean_to_be_between(label)"]
