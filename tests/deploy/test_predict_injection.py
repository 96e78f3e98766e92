"""No input runs as code in `flip predict`: the input's column names, ``--id-column``, the input's file
names and the bundle's field names and titles (model.json is a file like any other) are matched in
Python and never become SQL. Each crafted input is scored correctly or ends with exit 2 and one
paragraph; nothing is written outside the output."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flip.cli import app
from flip.deploy.predict import predict
from helpers import assert_one_paragraph_failure

runner = CliRunner()
ROWS = 40


@pytest.fixture(scope="module")
def base(served):  # the bundle fixture of tests/deploy/conftest.py
    """The first test rows (fields + label) and their probabilities scored plainly."""
    rows = served["test"].slice(0, ROWS).to_pandas()
    path = served["root"] / "base.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)
    predict(served["bundle"], [path], served["root"] / "base-scores.parquet", progress=False)
    prob = pd.read_parquet(served["root"] / "base-scores.parquet")["prob"].to_numpy()
    return {"rows": rows, "prob": prob, "bundle": served["bundle"]}


def write_input(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    else:
        frame.to_csv(path, index=False)
    return path


def run_predict(bundle: Path, inputs: list[Path], out: Path, id_column: str | None = None):
    args = ["predict", "--model", str(bundle), "--out", str(out), "--quiet"]
    for p in inputs:
        args += ["--input", str(p)]
    if id_column is not None:
        args += ["--id-column", id_column]
    return runner.invoke(app, args)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_id_column_named_to_break_out_is_copied_as_a_name(base, tmp_path, suffix):
    target = tmp_path / "pwned.csv"
    evil = f"id\" ; COPY (SELECT 1) TO '{target}'; --"
    other = f"x'); COPY (SELECT 2) TO '{target}'; SELECT ('"
    frame = base["rows"].assign(**{evil: [f"r{i}" for i in range(ROWS)], other: "noise"})
    path = write_input(frame, tmp_path / f"new{suffix}")
    out = tmp_path / "scores.parquet"
    result = run_predict(base["bundle"], [path], out, id_column=evil)
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out)
    assert list(scores.columns) == [evil, "prob", "label"] and list(scores[evil]) == [f"r{i}" for i in range(ROWS)]
    assert np.abs(scores["prob"].to_numpy() - base["prob"]).max() <= 1e-6
    assert not target.exists()


def test_a_missing_id_column_with_quotes_is_one_paragraph(base, tmp_path):
    target = tmp_path / "pwned.csv"
    path = write_input(base["rows"], tmp_path / "new.csv")
    out = tmp_path / "scores.csv"
    evil = f"nope\"; COPY (SELECT 1) TO '{target}'; --"
    result = run_predict(base["bundle"], [path], out, id_column=evil)
    assert_one_paragraph_failure(result, out, "no id column", repr(evil), "--id-column")
    assert not target.exists()


def test_an_id_column_named_like_an_output_column_is_refused(base, tmp_path):
    path = write_input(base["rows"].assign(prob=range(ROWS)), tmp_path / "new.parquet")
    out = tmp_path / "scores.parquet"
    assert_one_paragraph_failure(run_predict(base["bundle"], [path], out, id_column="prob"), out, "'prob'")


def test_input_file_names_with_quotes_are_values(base, tmp_path):
    target = tmp_path / "pwned.csv"
    folder = tmp_path / "it's"
    folder.mkdir()
    path = write_input(base["rows"], folder / f"a'], header=true); COPY (SELECT 1) TO '{target.name}'; --\".csv")
    out = tmp_path / "scores.parquet"
    result = run_predict(base["bundle"], [path], out)
    assert result.exit_code == 0, result.output
    assert np.abs(pd.read_parquet(out)["prob"].to_numpy() - base["prob"]).max() <= 1e-6
    assert not target.exists() and not (Path.cwd() / target.name).exists()


def test_field_names_and_titles_from_model_json_are_names(base, tmp_path):
    """A tampered model.json: a field named and titled to break out of a quoted name or literal."""
    target = tmp_path / "pwned.csv"
    bundle = tmp_path / "bundle"
    shutil.copytree(base["bundle"], bundle)
    info = json.loads((bundle / "model.json").read_text())
    old = info["fields"][2]["name"]
    new = f"gen\"der'; COPY (SELECT 1) TO '{target}'; --"
    info["fields"][2]["name"] = new
    info["fields"][3]["title"] = f"A'ge\"); COPY (SELECT 2) TO '{target}'; --"
    (bundle / "model.json").write_text(json.dumps(info))
    vocab = pq.read_table(bundle / "vocab.parquet").to_pandas()
    vocab["field"] = vocab["field"].replace(old, new)
    pq.write_table(pa.Table.from_pandas(vocab, preserve_index=False), bundle / "vocab.parquet")
    old_age = info["fields"][3]["name"]
    frame = base["rows"].rename(columns={old: new, old_age: info["fields"][3]["title"]})
    path = write_input(frame, tmp_path / "new.csv")
    out = tmp_path / "scores.parquet"
    result = run_predict(bundle, [path], out)
    assert result.exit_code == 0, result.output
    assert np.abs(pd.read_parquet(out)["prob"].to_numpy() - base["prob"]).max() <= 1e-6
    assert not target.exists()
    # and an input without that column is told so in one paragraph
    frame = base["rows"].drop(columns=[old])
    out = tmp_path / "scores2.parquet"
    assert_one_paragraph_failure(run_predict(bundle, [write_input(frame, tmp_path / "new2.csv")], out),
                                 out, "no column for the model's field", repr(new))
    assert not target.exists()


NOISE = list("abXY09_ -") + ['"', "'", ";", "--", "\\", "/*", "(", ")", ",", "ü", "中", "🙂", "\t", "\n", "$1"]
SQL_BITS = ['" ; COPY (SELECT 1) TO \'{target}\'; --', "'); DROP TABLE rows; --", "\" OR 1=1 --", "_id", "c_0",
            "v_0", "label", "row", "id", "user_id"]


@pytest.mark.slow
def test_random_column_names_and_id_columns_score_or_fail_in_one_paragraph(base, tmp_path):
    """Seeded random names for an id column and an extra column (quotes, semicolons, line breaks,
    comments, backslashes, unicode, empty) in CSV and Parquet inputs, with ``--id-column`` naming the id
    column (or sometimes a column that is not there): each case scores every row with the same
    probabilities and copies the ids under the name given, or ends with exit 2 and one paragraph."""
    rng = random.Random(19)
    scored = failed = 0
    for case in range(80):
        root = tmp_path / f"case{case}"
        root.mkdir()
        target = root / "pwned.csv"

        def name() -> str:
            kind = rng.random()
            noise = "".join(rng.choice(NOISE) for _ in range(rng.randint(0, 5)))
            if kind < 0.05:
                return ""
            return (rng.choice(SQL_BITS).format(target=target) if kind < 0.4 else "k") + noise

        id_name, extra = name(), name()
        if id_name == extra or id_name in base["rows"].columns or extra in base["rows"].columns:
            continue  # (a duplicate column name: not what this test is about)
        ids = [f"{id_name[:3]}#{i}" for i in range(ROWS)]
        frame = base["rows"].copy()
        frame[id_name] = ids
        frame[extra] = "x"
        path = write_input(frame, root / ("new.csv" if case % 2 else "new.parquet"))
        asked = id_name if rng.random() > 0.1 else id_name + "?"
        out = root / "scores.parquet"
        result = run_predict(base["bundle"], [path], out, id_column=asked)
        assert not target.exists(), (case, id_name, extra)
        assert sorted(p.name for p in root.iterdir()) == sorted([path.name] + (["scores.parquet"]
                                                                              if result.exit_code == 0 else []))
        if result.exit_code == 0:
            scored += 1
            scores = pd.read_parquet(out)
            assert list(scores.columns) == [asked or "row", "prob", "label"], (case, id_name)
            if asked:
                assert list(scores[asked].astype(str)) == ids, (case, id_name)
            assert np.abs(scores["prob"].to_numpy() - base["prob"]).max() <= 1e-6, (case, id_name, extra)
        else:
            failed += 1
            assert_one_paragraph_failure(result, out)
    assert scored >= 30 and failed >= 3, (scored, failed)
