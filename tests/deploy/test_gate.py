"""The gate fails closed: NaN never passes a comparison, a one-class window is refused with its reason,
a champion trained on the window's rows is refused, the decision records the bundle's DVC hash (checked
against `dvc add`), and an unreadable registry makes `flip gate` exit 2 and the retrain flow fail."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flip.config import RetrainConfig
from flip.deploy.gate import decide, gate, overlap_reason
from flip.deploy.registry import dir_md5
from helpers import ROOT, preset_config

sys.path.insert(0, str(Path(__file__).parent))
from registry_repo import ENV, env, make_registry_repo  # noqa: E402

FLIP = str(Path(sys.executable).parent / "flip")
NAN = float("nan")
RULE = RetrainConfig(min_auc=0.55, max_auc_drop=0.01, max_logloss_rise=0.02)


def test_nan_never_passes_a_comparison():
    champion = {"auc": 0.7, "logloss": 0.5}
    ok_delta = {"delta": 0.0, "ci_low": -0.01, "ci_high": 0.01}
    assert decide({"auc": 0.7, "logloss": 0.5}, champion, ok_delta, RULE)[0]
    for challenger, delta, what in [
        ({"auc": NAN, "logloss": 0.5}, ok_delta, "below the floor"),
        ({"auc": 0.7, "logloss": 0.5}, {"delta": NAN, "ci_low": NAN, "ci_high": NAN}, "ΔAUC"),
        ({"auc": 0.7, "logloss": NAN}, ok_delta, "not finite"),
    ]:
        ok, why = decide(challenger, champion, delta, RULE)
        assert not ok and any(what in w for w in why), why
    ok, why = decide({"auc": 0.7, "logloss": 0.5}, {"auc": 0.7, "logloss": NAN}, ok_delta, RULE)
    assert not ok and "Δlogloss" in why[0]
    ok, why = decide({"auc": 0.7, "logloss": 0.5}, champion, None, RULE)
    assert not ok and "no paired comparison" in why[0]


def test_overlap_of_the_window_with_the_champions_training_rows():
    assert overlap_reason([200, 300], [0, 199], "v1") is None
    assert "overlaps the champion v1" in overlap_reason([150, 300], [0, 199], "v1")
    assert "overlaps" in overlap_reason([0, 0], [0, 0], "v1")  # no time order at all (every ts equal)
    assert "records no training time range" in overlap_reason([200, 300], None, "v1")
    assert "no time range" in overlap_reason(None, [0, 199], "v1")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A processed synthetic dataset and the bundle of a one-seed scratch run on it."""
    from flip.data.preprocess import preprocess
    from flip.deploy.package import package
    from flip.train.finetune import finetune

    root = tmp_path_factory.mktemp("gate")
    cfg = preset_config("served", {"data": {"synthetic": {"rows": 2000}}, "id_model": {"dnn_hidden_units": [16]},
                                   "finetune": {"epochs": 1}, "run": {"seeds": [1]}})
    preprocess(cfg, root / "raw", root / "data", progress=False)
    finetune(cfg, root / "data", root / "run")
    package(root / "run", root / "data", root / "bundle")
    return root


@pytest.mark.slow
def test_the_decision_records_the_md5_dvc_records_for_the_bundle(bundle, tmp_path):
    out = tmp_path / "gate.json"
    result = gate(bundle / "bundle", None, bundle / "data", RULE, out, artifact="flip_id")
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["challenger"]["md5"] == dir_md5(bundle / "bundle") and result["challenger"]["auc"] > 0.5
    # DVC's own hashing of the same files (`dvc add` writes the directory's md5 into bundle.dvc)
    repo = tmp_path / "dvc"
    repo.mkdir()
    shutil.copytree(bundle / "bundle", repo / "bundle")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "bundle"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=env())
    recorded = yaml.safe_load((repo / "bundle.dvc").read_text())["outs"][0]["md5"]
    assert recorded == result["challenger"]["md5"]


@pytest.mark.slow
def test_a_one_class_window_is_refused_with_its_reason(bundle, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bundle / "data", data)
    test = pq.read_table(data / "test.parquet")
    zeros = pa.array([0] * test.num_rows, type=test.schema.field("label").type)
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label", zeros), data / "test.parquet")
    result = gate(bundle / "bundle", bundle / "bundle", data, RULE, tmp_path / "gate.json", artifact="flip_id")
    assert result["promote"] is False and math.isnan(result["challenger"]["auc"])
    assert "only one class" in result["reasons"][0] and "AUC undefined" in result["reasons"][0]
    assert json.loads((tmp_path / "gate.json").read_text())["promote"] is False


@pytest.mark.slow
def test_a_champion_trained_on_the_window_is_refused(bundle, tmp_path):
    meta = json.loads((bundle / "data" / "meta.json").read_text())
    window = meta["time_range"]["test"]
    # the champion trained on older rows: the paired comparison runs (itself against itself: ΔAUC 0)
    result = gate(bundle / "bundle", bundle / "bundle", bundle / "data", RULE, tmp_path / "a.json", artifact="flip_id",
                  champion_version="v0.0.1")
    assert result["promote"] and result["delta"]["auc"] == pytest.approx(0.0, abs=1e-12)
    # a champion whose training rows reach into the window
    champion = tmp_path / "champion"
    shutil.copytree(bundle / "bundle", champion)
    info = json.loads((champion / "model.json").read_text())
    info["train_time_range"] = [info["train_time_range"][0], window[0]]
    (champion / "model.json").write_text(json.dumps(info))
    result = gate(bundle / "bundle", champion, bundle / "data", RULE, tmp_path / "b.json", artifact="flip_id",
                  champion_version="v0.0.1")
    assert not result["promote"] and "overlaps the champion v0.0.1's training rows" in result["reasons"][0]
    del info["train_time_range"]
    (champion / "model.json").write_text(json.dumps(info))
    result = gate(bundle / "bundle", champion, bundle / "data", RULE, tmp_path / "c.json", artifact="flip_id")
    assert not result["promote"] and "records no training time range" in result["reasons"][0]


def _damaged_registry(path: Path) -> None:
    """A project whose flip_id tags hold one GTO silently skips (the registry cannot be trusted)."""
    run = make_registry_repo(path)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["retrain"]["artifacts"] = ["flip_id"]
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "lock")
    gto = str(Path(sys.executable).parent / "gto")
    run(gto, "register", "flip_id", "HEAD")
    run(gto, "assign", "flip_id", "--version", "v0.0.1", "--stage", "prod")
    run("git", "tag", "flip_id#prod#x", "HEAD")


@pytest.mark.slow
def test_flip_gate_exits_2_when_the_registry_is_unreadable(bundle, tmp_path):
    project = tmp_path / "proj"
    _damaged_registry(project)
    done = subprocess.run([FLIP, "gate", "--artifact", "flip_id", "--challenger", str(bundle / "bundle"),
                           "--data", str(bundle / "data")], cwd=project, capture_output=True, text=True,
                          env={**env(), "TQDM_DISABLE": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "broken or malformed" in done.stderr and "flip_id#prod#x" in done.stderr
    assert not (project / "reports" / "gate" / "flip_id.json").exists()


@pytest.mark.slow
@pytest.mark.prefect
def test_retrain_fails_without_promoting_when_the_registry_is_unreadable(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FLIP_STAGE_RETRY_DELAY", "0")
    project = tmp_path / "proj"
    _damaged_registry(project)
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout
    sys.path.insert(0, str(ROOT / "flows"))
    from pipeline import retrain

    with prefect_test_harness(server_startup_timeout=180):
        state = retrain(project=str(project), pull_new_data=False, return_state=True)
    assert state.is_failed()
    assert subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout == tags
    assert "flip_id@v0.0.2" not in tags
