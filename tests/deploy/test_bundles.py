"""Broken or tampered model bundles: `flip predict` and `flip gate` answer exit 2 with one paragraph that
names the file and the fix, write nothing, and never download anything.

Each case copies the real bundle of the ``served`` fixture (conftest.py), corrupts the copy, and runs the
commands in-process through typer's CliRunner (the subprocess cases: the network probe of a bundle that
lost its language-model folder, and the registry)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flip.cli import app

FLIP = str(Path(sys.executable).parent / "flip")


def _json(bundle: Path, change) -> None:
    info = json.loads((bundle / "model.json").read_text())
    change(info)
    (bundle / "model.json").write_text(json.dumps(info))


def _vocab(bundle: Path, change) -> None:
    table = pq.read_table(bundle / "vocab.parquet").to_pydict()
    change(table)
    pq.write_table(pa.table(table), bundle / "vocab.parquet")


def _cut(name: str, keep: float = 0.5):
    def corrupt(bundle: Path) -> None:
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[: int(len(data) * keep)])
    return corrupt


def _rename_weight(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(bundle / "model.safetensors"))
    key = sorted(state)[0]
    state["renamed." + key] = state.pop(key)
    save_file(state, str(bundle / "model.safetensors"))


def _set_id(value: int):
    def change(table):
        table["id"][3] = value
    return change


# (case, corruption, a fragment the message must hold)
CASES = [
    ("no bundle_version", lambda b: _json(b, lambda i: i.pop("bundle_version")), "has no bundle_version"),
    ("unknown bundle_version", lambda b: _json(b, lambda i: i.update(bundle_version="1")), "unknown bundle_version"),
    ("newer bundle_version", lambda b: _json(b, lambda i: i.update(bundle_version=7)), "written by a newer flip"),
    ("model.json cut", _cut("model.json"), "model.json is not valid JSON"),
    ("fields renamed", lambda b: _json(b, lambda i: i["fields"][0].update(name="customer")),
     "are not those of model.json"),
    ("id beyond vocab_size", lambda b: _vocab(b, _set_id(10**6)), "row 4, column 'id'"),
    ("negative id", lambda b: _vocab(b, _set_id(-1)), "outside the model's vocabulary"),
    ("vocab.parquet cut", _cut("vocab.parquet"), "vocab.parquet is unreadable"),
    ("model.safetensors cut", _cut("model.safetensors", 0.7), "model.safetensors is not a readable safetensors"),
    ("model.safetensors header cut", _cut("model.safetensors", 0.0001), "model.safetensors is not a readable"),
    ("weights of another shape", lambda b: _json(b, lambda i: i["config"]["id_model"].update(embedding_dim=12)),
     "the weights do not fit the model that model.json describes (shape of"),
    ("a weight renamed", _rename_weight, "missing "),
    ("no vocab.parquet", lambda b: (b / "vocab.parquet").unlink(), "the bundle has no vocab.parquet"),
    ("no model.safetensors", lambda b: (b / "model.safetensors").unlink(), "the bundle has no model.safetensors"),
    ("no model.json", lambda b: (b / "model.json").unlink(), "is not a model bundle (no model.json)"),
]


def _one_paragraph(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # typer.Exit(2), no other exception escaped
    text = result.stderr.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def bundle_copy(served, tmp_path, monkeypatch):
    """A fresh copy of the real bundle, and the working directory set to ``tmp_path`` (no params.yaml)."""
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "bundle"
    shutil.copytree(served["bundle"], copy)
    return copy


def _predict(bundle: Path, served, out: Path):
    return CliRunner().invoke(app, ["predict", "--model", str(bundle), "--input", str(served["root"] / "test.parquet"),
                                    "--out", str(out), "--quiet"])


def _gate(challenger: Path, champion: str, served, out: Path):
    return CliRunner().invoke(app, ["gate", "--challenger", str(challenger), "--champion", champion,
                                    "--data", str(served["data"]), "--out", str(out)])


def test_the_intact_copy_serves(served, bundle_copy, tmp_path):
    """The control: the copy itself predicts and passes the gate (so each refusal below is the corruption's)."""
    result = _predict(bundle_copy, served, tmp_path / "scores.parquet")
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "scores.parquet").num_rows == served["test"].num_rows
    result = _gate(bundle_copy, str(served["bundle"]), served, tmp_path / "gate.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "gate.json").read_text())["champion"]["path"] == str(served["bundle"])


@pytest.mark.parametrize("case, corrupt, expected", CASES, ids=[c[0] for c in CASES])
def test_a_broken_bundle_is_one_paragraph_and_no_output(served, bundle_copy, tmp_path, case, corrupt, expected):
    corrupt(bundle_copy)
    text = _one_paragraph(_predict(bundle_copy, served, tmp_path / "scores.parquet"))
    assert expected in text and str(bundle_copy) in text, text
    assert not (tmp_path / "scores.parquet").exists()
    # the gate: as the challenger, and as the champion beside an intact challenger
    assert _one_paragraph(_gate(bundle_copy, "none", served, tmp_path / "gate.json")) == text
    assert _one_paragraph(_gate(served["bundle"], str(bundle_copy), served, tmp_path / "gate.json")) == text
    assert not (tmp_path / "gate.json").exists()


# ------------------------------------------------------------------------------ flip package --out
def test_package_into_the_models_folder_refuses_and_into_its_own_bundle_reruns(served, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    shutil.copytree(served["root"] / "run", models / "finetune" / "scratch")
    (models / "pretrain").mkdir()
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    args = ["package", "--run", str(models / "finetune" / "scratch"), "--data", str(served["data"])]
    result = CliRunner().invoke(app, [*args, "--out", "models"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    text = result.stderr.strip()
    assert "\n" not in text and "models holds files that flip package did not write: finetune, pretrain" in text
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before  # every run is still there
    for _ in range(2):  # its own bundle: replaced
        result = CliRunner().invoke(app, [*args, "--out", "models/serve/scratch"])
        assert result.exit_code == 0, result.output
    assert (models / "serve" / "scratch" / ".flip-output").read_text() == '{"stage": "package"}\n'
    result = CliRunner().invoke(app, [*args, "--out", "models/finetune"])  # a folder of runs
    assert result.exit_code == 2 and "did not write: scratch" in result.stderr
    assert (models / "finetune" / "scratch" / "metrics.json").exists()


# ------------------------------------------------------------------- a bundle with a language model
@pytest.fixture(scope="module")
def plm_bundle(served, tiny_bert, tmp_path_factory):
    """A real bundle of a language-model strategy (plm_scratch, tiny BERT) on the served dataset."""
    from flip.deploy.package import package
    from flip.train.finetune import finetune
    from helpers import preset_config

    root = tmp_path_factory.mktemp("plm-bundle")
    bert = tiny_bert(served["data"], 200)
    cfg = preset_config("served", {
        "plm": {"name": str(bert), "max_length": 48, "cache_dir": str(root / "tokens")},
        "finetune": {"strategy": "plm_scratch", "epochs": 1, "plm_epochs": 1, "plm_lr": 1e-3, "train_rows": 600,
                     "eval_rows": 300},
        "run": {"seeds": [1], "device": "cpu"},
    })
    finetune(cfg, served["data"], root / "run")
    package(root / "run", served["data"], root / "bundle")
    return root / "bundle"


@pytest.mark.slow
def test_a_language_model_bundle_without_plm_is_refused_without_the_network(served, plm_bundle, tmp_path):
    shutil.copytree(plm_bundle, tmp_path / "bundle")
    out = tmp_path / "scores.parquet"
    small = tmp_path / "test.parquet"
    pq.write_table(served["test"].slice(0, 64), small)
    # a listening socket stands in for the Hub: it must see no connection
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    hub.setblocking(False)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "TQDM_DISABLE": "1",
           "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf-home")}

    def predict() -> subprocess.CompletedProcess:  # the bundle by a relative path, as a user types it
        return subprocess.run([FLIP, "predict", "--model", "bundle", "--input", str(small), "--out", str(out), "-q"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)

    control = _predict(tmp_path / "bundle", {"root": tmp_path, "test": None}, out)  # the intact copy scores
    assert control.exit_code == 0, control.output
    assert pq.read_table(out).num_rows == 64
    out.unlink()
    shutil.rmtree(tmp_path / "bundle" / "plm")
    done = predict()
    assert done.returncode == 2, done.stderr
    text = done.stderr.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "language-model folder bundle/plm is missing" in text and not out.exists()
    with pytest.raises(BlockingIOError):
        hub.accept()
    hub.close()


# ----------------------------------------------------------------------------------- the registry
@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A git + DVC project declaring the artifact flip_id, with no version registered."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text("artifacts:\n  flip_id:\n    path: models/serve/flip_id\n    type: model\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"],
                   cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["flip_id@v9.9.9", "flip_id@nosuchstage"])
def test_an_unknown_version_or_stage_is_one_paragraph(served, registry, spec):
    out = registry / "scores.parquet"
    text = _one_paragraph(_predict(Path(spec), served, out))
    ref = spec.split("@")[1]
    assert f"cannot fetch flip_id {ref}" in text and "Fix:" in text and "gto show" in text, text
    assert not out.exists()
    text = _one_paragraph(_gate(served["bundle"], spec, served, registry / "gate.json"))
    assert f"cannot fetch flip_id {ref}" in text and not (registry / "gate.json").exists()
