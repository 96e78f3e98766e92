"""evaluate → report on a small synthetic run; the HTML renders in headless Chromium with its figures."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from flip.config import load_config
from helpers import pinned_overrides
from flip.data.preprocess import preprocess
from flip.evaluate.evaluate import evaluate
from flip.evaluate.report import report
from flip.train.finetune import finetune

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(None, pinned_overrides(*["data.dataset=synthetic", "data.synthetic.rows=4000", "run.progress=false",
                             "finetune.epochs=2", "id_model.dnn_hidden_units=[32]"]))
    data = tmp / "processed"
    preprocess(cfg, tmp, data, progress=False)
    for name, model, seeds in (("scratch", "dcnv2", "[1,2,3]"), ("flip_id", "deepfm", "[1,2]")):  # distinct predictions
        finetune(load_config(None, pinned_overrides(*["data.dataset=synthetic", "run.progress=false", f"run.seeds={seeds}",
                                    "finetune.epochs=2", f"id_model.name={model}", "id_model.dnn_hidden_units=[32]",
                                    "finetune.lr_grid=[0.001,0.003]"])),
                 data, tmp / "runs" / name)
    out = tmp / "reports"
    result = evaluate(cfg, data, tmp / "runs", out, drift_rows=2000)
    report(out)
    return out, result


def test_eval_json_holds_metrics_calibration_cold_start_and_drift(reports):
    out, result = reports
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["strategies"]) == {"scratch", "flip_id"}
    s = saved["strategies"]["scratch"]
    for split in ("valid", "test"):
        assert 0.5 < s[split]["auc"] <= 1 and s[split]["logloss"] > 0
        assert 0 <= s[split]["ece"] < 0.5 and 0 < s[split]["brier"] < 0.5
    assert [b["bucket"] for b in s["cold_start"]["user_id"]][0] == "0 (cold)"
    assert {"valid", "test", "test_slice_1", "test_slice_4"} <= set(saved["data_drift"])
    assert (out / "evidently" / saved["data_drift"]["test"]["html"]).exists()
    assert "pred_drift" in s["prediction_drift"]["test"]
    assert json.loads((out / "plots" / "reliability" / "scratch.json").read_text())[0]["strategy"] == "scratch"
    # seeds: the mean, the spread and every seed's value
    assert list(s["test"]["auc_per_seed"]) == ["seed-1", "seed-2", "seed-3"]
    assert s["test"]["auc"] == pytest.approx(sum(s["test"]["auc_per_seed"].values()) / 3)
    assert s["test"]["auc_std"] > 0
    # the paired comparison on the same rows, with the selection that produced each run
    d = saved["strategies"]["flip_id"]["delta_vs_scratch"]
    assert d["delta"] == pytest.approx(saved["strategies"]["flip_id"]["test"]["auc"] - s["test"]["auc"])
    assert d["ci_low"] < d["delta"] < d["ci_high"] and 0 <= d["p_value"] <= 1 and d["seeds"] == [2, 3]
    assert "delta_vs_scratch" not in s
    for st in saved["strategies"].values():
        assert [c["lr"] for c in st["selection"]["candidates"]] == [0.001, 0.003]
        assert all(0.5 < c["valid_auc"] <= 1 for c in st["selection"]["candidates"])
    assert saved["headline"].startswith("No FLIP-vs-ID comparison")  # no flip run here


def test_report_markdown_puts_numbers_beside_the_paper(reports):
    out, _ = reports
    md = (out / "summary.md").read_text()
    assert "| scratch | DCNv2 |" in md and "| flip_id | FLIP_ID |" in md
    ev = json.loads((out / "eval.json").read_text())
    d = ev["strategies"]["flip_id"]["delta_vs_scratch"]
    assert f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" in md
    assert "Learning-rate selection" in md and "lr=0.003" in md


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium_with_its_figures(reports, tmp_path):
    out, _ = reports
    page = out / "index.html"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "FLIP evaluation report" in dom
    expected = int(dom.split('data-figures="')[1].split('"')[0])
    loaded = int(dom.split('data-figures-loaded="')[1].split('"')[0])
    assert expected >= 3 and loaded == expected
    shot = tmp_path / "report.png"
    subprocess.run([*cmd[:-2], f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
