"""`flip predict` in bounded memory: the vocabulary join in DuckDB (chunked) maps exactly as the
training vocabulary does, AUC/logloss spill beyond a bound and stay exact, and a CSV line or Parquet
value beyond ``--max-line-bytes`` is one paragraph, exit 2, no output (not gigabytes of memory)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import flip.deploy.predict as predict_module
from flip.cli import app
from flip.deploy.package import load_bundle
from flip.deploy.predict import LabelledScores, Vocabulary, predict
from flip.metrics import auc, logloss
from helpers import assert_one_paragraph_failure

runner = CliRunner()


def test_the_duckdb_vocabulary_maps_as_the_training_vocabulary(served):
    """Every value of the test split (and unseen ones) gets the id the vocabulary file gives it."""
    from flip.data.sql import locked_connection

    bundle = load_bundle(served["bundle"])
    table = served["test"].to_pandas()
    names = [f["name"] for f in bundle.fields]
    table.loc[:4, names[0]] = ["never seen", "", "unknown", "x'; DROP TABLE vocab_0; --", "é"]
    values = pa.table({f"v_{k}": pa.array(table[n].astype(str)) for k, n in enumerate(names)})
    vocab = pq.read_table(served["bundle"] / "vocab.parquet").to_pandas()
    with locked_connection(read=[served["bundle"] / "vocab.parquet"]) as con:
        ids = Vocabulary(con, bundle).encode(values)
    for k, f in enumerate(bundle.fields):
        known = dict(zip(vocab.loc[vocab["field"] == f["name"], "value"], vocab.loc[vocab["field"] == f["name"], "id"]))
        want = np.array([known.get(v, f["oov_id"]) for v in values.column(f"v_{k}").to_pylist()])
        assert (ids[:, k] == want).all(), f["name"]
    assert (ids[:4, 0] == bundle.fields[0]["oov_id"]).sum() >= 3


def test_chunked_mapping_gives_the_same_scores(served, monkeypatch, tmp_path):
    """Values mapped 300 rows at a time (several joins, batch boundaries inside chunks) score the rows
    bit for bit as one chunk does."""
    whole = predict(served["bundle"], [served["root"] / "test.parquet"], tmp_path / "a.parquet", progress=False,
                    batch_rows=128)
    monkeypatch.setattr(predict_module, "MAP_ROWS", 300)
    chunked = predict(served["bundle"], [served["root"] / "test.parquet"], tmp_path / "b.parquet", progress=False,
                      batch_rows=128)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert a.equals(b) and whole["oov_rows"] == chunked["oov_rows"] and whole["auc"] == chunked["auc"]


@pytest.mark.parametrize("ties", [False, True])
def test_spilled_auc_and_logloss_equal_the_in_memory_ones(tmp_path, ties):
    rng = np.random.default_rng(3)
    y = (rng.random(50_000) < 0.3).astype(np.int8)
    p = np.clip(rng.random(50_000) * 0.6 + 0.4 * y, 0, 1)
    if ties:  # few distinct scores, and probabilities 0 and 1 (clipped for the logloss)
        p = np.round(p, 2)
    kept, spilled = LabelledScores(tmp_path / "a", in_memory=10**9), LabelledScores(tmp_path / "b", in_memory=1000)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for lo in range(0, len(y), 4096):
        kept.add(y[lo: lo + 4096], p[lo: lo + 4096])
        spilled.add(y[lo: lo + 4096], p[lo: lo + 4096])
    assert kept.result() == {"auc": auc(y, p), "logloss": logloss(y, p)}  # in memory: flip.metrics itself
    assert (tmp_path / "b" / "labelled.parquet").exists() and not (tmp_path / "a" / "labelled.parquet").exists()
    got = spilled.result()
    assert got["auc"] == pytest.approx(auc(y, p), abs=1e-12)
    assert got["logloss"] == pytest.approx(logloss(y, p), abs=1e-12)


def test_one_class_gives_no_auc(tmp_path):
    scores = LabelledScores(tmp_path, in_memory=2)
    scores.add(np.ones(5, dtype=np.int8), np.linspace(0, 1, 5))
    assert scores.result() == {}


def _csv_with_a_huge_line(served, path, at: int, size: int):
    rows = served["test"].to_pandas()  # (~300 rows)
    head, tail = rows.iloc[:at], rows.iloc[at:]
    with open(path, "w", encoding="utf-8") as f:
        head.to_csv(f, index=False)
        line = rows.iloc[0].astype(str).tolist()
        line[2] = "x" * size  # one field of `size` bytes (a lost newline or quote joins many lines into one)
        f.write(",".join(line) + "\n")
        tail.to_csv(f, index=False, header=False)
    return at + 2  # its line number (after the header)


@pytest.mark.parametrize("at", [0, 250])
def test_a_huge_csv_line_is_one_paragraph_and_no_output(served, tmp_path, at):
    path = tmp_path / "huge.csv"
    line = _csv_with_a_huge_line(served, path, at, 50 * 1024 * 1024)
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["predict", "--model", str(served["bundle"]), "--input", str(path), "--out", str(out),
                                 "--quiet", "--max-line-bytes", str(1 << 20)])
    assert_one_paragraph_failure(result, out, f"file {path}", f"line {line:,} is longer than 1,048,576 bytes",
                                 "--max-line-bytes")
    assert "xxxxxxxx" not in result.output  # the line itself is not quoted


def test_the_default_limit_refuses_a_line_over_2_mib_and_reads_one_below(served, tmp_path):
    path = tmp_path / "long.csv"
    _csv_with_a_huge_line(served, path, 10, 3 * 1024 * 1024)
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["predict", "--model", str(served["bundle"]), "--input", str(path), "--out", str(out),
                                 "--quiet"])
    assert_one_paragraph_failure(result, out, "line 12 is longer than 2,097,152 bytes")
    _csv_with_a_huge_line(served, path, 10, 1024 * 1024)  # 1 MiB: read (an unseen value, scored as OOV)
    summary = predict(served["bundle"], [path], out, progress=False)
    assert summary["rows"] == len(served["test"]) + 1 and summary["oov_rows"][served["info"]["fields"][0]["name"]] >= 1


def test_a_huge_parquet_value_names_its_row_and_column(served, tmp_path):
    rows = served["test"].slice(0, 300).to_pandas()
    name = served["info"]["fields"][2]["name"]
    rows[name] = rows[name].astype(object)
    rows.loc[200, name] = "y" * (2 << 20)
    path, out = tmp_path / "huge.parquet", tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)
    result = runner.invoke(app, ["predict", "--model", str(served["bundle"]), "--input", str(path), "--out", str(out),
                                 "--quiet", "--max-line-bytes", str(1 << 20)])
    assert_one_paragraph_failure(result, out, f"file {path}", "row 201", f"column {name!r}", "--max-line-bytes")
