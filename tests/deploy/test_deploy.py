"""Bundles, `flip predict`, the TorchScript export, the gate rule and the vocabulary map of a reused
pretraining, on a synthetic dataset preprocessed by the real pipeline and a model trained on it (the
``served`` fixture of conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flip.config import RetrainConfig
from flip.deploy.gate import decide
from flip.deploy.package import load_bundle
from flip.deploy.predict import predict

FLIP = str(Path(sys.executable).parent / "flip")


def test_bundle_holds_the_best_validation_seed(served):
    info, run = served["info"], served["root"] / "run"
    valid = {s: json.loads((run / f"seed-{s}" / "metrics.json").read_text())["valid"]["auc"] for s in (1, 2)}
    assert info["seed"] == max(valid, key=valid.get) and info["valid_auc"] == valid[info["seed"]]
    assert {p.name for p in served["bundle"].iterdir()} == {"model.json", "model.safetensors", "vocab.parquet",
                                                          "model.pt", ".flip-output"}


def test_predict_reproduces_the_runs_test_predictions_and_auc(served):
    out = served["root"] / "scores.parquet"
    summary = predict(served["bundle"], [served["root"] / "test.parquet"], out, progress=False, batch_rows=512)
    mine = pd.read_parquet(out)
    seed_dir = served["root"] / "run" / f"seed-{served['info']['seed']}"
    theirs = pd.read_parquet(seed_dir / "predictions" / "test.parquet")
    assert list(mine["row"]) == list(theirs["row"])  # input order kept, ids copied
    assert np.abs(mine["prob"].to_numpy() - theirs["prob"].to_numpy()).max() <= 1e-6
    test_auc = json.loads((seed_dir / "metrics.json").read_text())["test"]["auc"]
    assert summary["auc"] == pytest.approx(test_auc, abs=1e-9) and summary["rows"] == len(theirs)
    assert summary["oov_rows"]["gender"] == 0


def test_torchscript_export_gives_predicts_probabilities(served):
    scripted = torch.jit.load(str(served["bundle"] / "model.pt"))
    fields = [f["name"] for f in served["info"]["fields"]]
    test = pq.read_table(served["data"] / "test.parquet", columns=fields).to_pandas()
    with torch.no_grad():
        p_script = scripted(torch.from_numpy(test[fields].to_numpy().astype(np.int64))).numpy()
    out = served["root"] / "scores.csv"
    predict(served["bundle"], [served["root"] / "test.parquet"], out, progress=False)
    p_predict = pd.read_csv(out)["prob"].to_numpy()
    assert np.abs(p_script - p_predict).max() <= 1e-5


def test_unseen_values_take_the_oov_id_and_are_counted(served):
    table = served["test"].slice(0, 50).to_pandas()
    table.loc[:9, "user_id"] = "someone new"
    table = table.drop(columns=["label"])
    path = served["root"] / "new.csv"
    table.to_csv(path, index=False)
    summary = predict(served["bundle"], [path], served["root"] / "new-scores.parquet", progress=False)
    assert summary["oov_rows"]["user_id"] >= 10 and "auc" not in summary
    bundle = load_bundle(served["bundle"])
    oov = {f["name"]: f["oov_id"] for f in bundle.fields}
    vocab = pq.read_table(served["bundle"] / "vocab.parquet").to_pandas()
    ids = {(r.field, r.value): r.id for r in vocab.itertuples()}
    x = torch.tensor([[ids.get((name, str(table.loc[0, name])), oov[name]) for name in oov]])
    assert x[0, 0] == oov["user_id"]
    expected = torch.sigmoid(bundle.model(x)).item()
    assert pd.read_parquet(served["root"] / "new-scores.parquet")["prob"][0] == pytest.approx(expected, abs=1e-7)


def _flip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FLIP, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.slow
def test_bad_label_is_one_paragraph_exit_2_and_no_output(served):
    table = served["test"].slice(0, 30).to_pandas()
    table["label"] = table["label"].astype(str)
    table.loc[[4, 7], "label"] = "yes"
    path = served["root"] / "bad.csv"
    table.to_csv(path, index=False)
    out = served["root"] / "bad-scores.csv"
    done = _flip("predict", "--model", str(served["bundle"]), "--input", str(path), "--out", str(out), cwd=served["root"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"file {path}" in done.stderr and "row 5" in done.stderr and "'label'" in done.stderr
    assert "2 row(s)" in done.stderr and not out.exists()


@pytest.mark.slow
def test_missing_field_column_names_the_field(served):
    path = served["root"] / "nofield.parquet"
    pq.write_table(served["test"].drop(["city"]), path)
    done = _flip("predict", "--model", str(served["bundle"]), "--input", str(path), "--out",
                 str(served["root"] / "x.parquet"), cwd=served["root"])
    assert done.returncode == 2 and "column 'city'" in done.stderr and "Traceback" not in done.stderr


def test_gate_rule():
    rule = RetrainConfig(min_auc=0.6, max_auc_drop=0.01, max_logloss_rise=0.02)
    ok, why = decide({"auc": 0.7, "logloss": 0.5}, None, None, rule)
    assert ok and "no champion" in why[0]
    ok, why = decide({"auc": 0.52, "logloss": 0.69}, None, None, rule)
    assert not ok and "below the floor" in why[0]
    ok, _ = decide({"auc": float("nan"), "logloss": 0.69}, None, None, rule)
    assert not ok  # one class in the window: never promoted blindly
    champion = {"auc": 0.71, "logloss": 0.50}
    ok, _ = decide({"auc": 0.705, "logloss": 0.51}, champion, {"delta": -0.005, "ci_low": -0.02, "ci_high": 0.01}, rule)
    assert ok
    ok, why = decide({"auc": 0.69, "logloss": 0.50}, champion, {"delta": -0.02, "ci_low": -0.03, "ci_high": -0.01}, rule)
    assert not ok and "ΔAUC" in why[0]
    ok, why = decide({"auc": 0.71, "logloss": 0.53}, champion, {"delta": 0.0, "ci_low": -0.01, "ci_high": 0.01}, rule)
    assert not ok and "logloss" in why[0]


def test_vocabulary_map_sends_known_values_to_their_rows_and_new_ones_to_oov(tmp_path):
    from flip.train.builders import vocabulary_map

    old_meta = {"vocab_size": 7, "fields": [{"name": "user", "oov_id": 2}, {"name": "item", "oov_id": 5}]}
    pq.write_table(pa.table({"field": ["user", "user", "item"], "value": ["a", "b", "x"], "id": [3, 4, 6]}),
                   tmp_path / "vocab.parquet")
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    # the new dataset: user b (now id 3), new user c (id 4), a new item y (id 6) and the old item x (id 7)
    new_meta = {"vocab_size": 8, "fields": [{"name": "user", "oov_id": 2}, {"name": "item", "oov_id": 5}]}
    pq.write_table(pa.table({"field": ["user", "user", "item", "item"], "value": ["b", "c", "y", "x"],
                             "id": [3, 4, 6, 7]}), new_dir / "vocab.parquet")
    rows = vocabulary_map(tmp_path, old_meta, new_dir, new_meta)
    assert rows.tolist() == [0, 1, 2, 4, 2, 5, 5, 6]
