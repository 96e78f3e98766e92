"""evaluate → report on a small synthetic run; the HTML renders in headless Chromium with its figures."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from flip.config import load_config
from helpers import preset_overrides
from flip.data.preprocess import preprocess
from flip.evaluate.scoring import evaluate
from flip.evaluate.drift import drift
from flip.evaluate.report import report
from flip.train.finetune import finetune

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(None, preset_overrides(*["data.dataset=synthetic", "data.synthetic.rows=4000", "run.progress=false",
                             "finetune.epochs=2", "id_model.dnn_hidden_units=[32]", "evaluate.drift_rows=2000"]))
    data = tmp / "processed"
    preprocess(cfg, tmp, data, progress=False)
    for name, model, seeds in (("scratch", "dcnv2", "[1,2,3]"), ("flip_id", "deepfm", "[1,2]")):  # distinct predictions
        finetune(load_config(None, preset_overrides(*["data.dataset=synthetic", "run.progress=false", f"run.seeds={seeds}",
                                    "finetune.epochs=2", f"id_model.name={model}", "id_model.dnn_hidden_units=[32]",
                                    "finetune.lr_grid=[0.001,0.003]"])),
                 data, tmp / "runs" / name)
    out = tmp / "reports"
    drift(cfg, data, out / "drift")  # the drift stage: evaluate reads its test-window verdict
    result = evaluate(cfg, data, tmp / "runs", out)
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
    assert {"valid", "test", *(f"test_slice_{k}" for k in range(1, 5))} == set(saved["data_drift"])
    drift = saved["data_drift"]["test"]
    # ID-like columns apart from attributes, the label apart from features
    assert set(drift["id_like"]) >= {"user_id", "item_id"} and not set(drift["id_like"]) & set(drift["attributes"])
    assert "label" not in drift["attributes"] and set(drift["positive_rate"]) == {"train", "window"}
    # evaluate.pages=main: one page per strategy, and the test window's data-drift page is the drift stage's;
    # JSON for every window (the test window's data drift: the drift stage's, read, not recomputed)
    pages = sorted(x.name for x in (out / "evidently").glob("*.html"))
    assert pages == ["predictions_flip_id_test.html", "predictions_scratch_test.html"]
    assert drift["html"] == "../drift/window_drift.html" and (out / "drift" / "window_drift.html").exists()
    assert len(list((out / "evidently").glob("*.json"))) == 5 + 2 * 5
    assert "pred_drift" in s["prediction_drift"]["test"] and s["prediction_drift"]["test_slice_1"]["html"] is None
    # cold start on the same rows for every strategy, counted in the rows they trained on, thin buckets marked
    buckets = [[(b["bucket"], b["rows"]) for b in st["cold_start"]["user_id"]] for st in saved["strategies"].values()]
    assert buckets[0] == buckets[1] and sum(n for _, n in buckets[0]) == s["test"]["rows"]
    assert all(b["too_few_rows"] == (b["rows"] < 100 or b["auc"] is None) for b in s["cold_start"]["user_id"])
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


def test_dvc_metrics_hold_the_headline_numbers_only(reports):
    out, result = reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"rows", "scratch", "flip_id"}
    assert metrics["flip_id"] == {"auc": round(result["strategies"]["flip_id"]["test"]["auc"], 6),
                                  "logloss": round(result["strategies"]["flip_id"]["test"]["logloss"], 6),
                                  "ece": round(result["strategies"]["flip_id"]["test"]["ece"], 6),
                                  "delta_auc": round(result["strategies"]["flip_id"]["delta_vs_scratch"]["delta"], 6)}
    assert metrics["rows"]["compared"] == result["strategies"]["scratch"]["test"]["rows"]
    # the plots: one file per strategy and the diagonal, overlaid by dvc.yaml's top-level plots
    assert sorted(x.name for x in (out / "plots" / "roc").iterdir()) == ["diagonal.json", "flip_id.json", "scratch.json"]


def test_every_number_in_the_report_comes_from_the_run_or_the_paper(reports):
    """Tables, headline and captions: each number is in eval.json, metrics.json, the plots or the paper's tables."""
    from report_numbers import allowed_numbers, paper_numbers, read_sources, untraceable

    out, _ = reports
    md = (out / "summary.md").read_text()
    sources = read_sources(out / "eval.json", out / "metrics.json", *(out / "plots").rglob("*.json"))
    assert untraceable(md, allowed_numbers(*sources, *paper_numbers())) == []
    # and the check can fail: a number from elsewhere is caught
    assert untraceable(md + "\n| scratch | 0.123456789 |\n", allowed_numbers(*sources)) != []
    # the report reads no benchmark file: only this run's outputs and the paper
    assert "ID-based baselines" not in md and "## This run" in md


def test_report_markdown_puts_numbers_beside_the_paper(reports):
    out, _ = reports
    md = (out / "summary.md").read_text()
    assert "| scratch | DCNv2 |" in md and "| flip_id | FLIP_ID |" in md
    ev = json.loads((out / "eval.json").read_text())
    d = ev["strategies"]["flip_id"]["delta_vs_scratch"]
    assert f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" in md
    assert "Learning-rate selection" in md and "lr=0.003" in md
    assert "paper AUC (Wang et al., RecSys '24, Table 2)" in md


def test_report_shows_the_pretraining_scaling_study_of_its_dataset_only(reports, tmp_path):
    from report_numbers import allowed_numbers, paper_numbers, read_sources, untraceable

    out, _ = reports
    copy = tmp_path / "reports"
    shutil.copytree(out, copy)
    points = [{"rows": r, "seeds": 3, "delta": d, "ci_low": d - 0.001, "ci_high": d + 0.001, "p_value": p,
               "per_seed": {"2012": d - 0.0002, "2013": d, "2014": d + 0.0002}, "time": t, "samples_per_second": 22.5}
              for r, d, p, t in ((2000, 0.0003, 0.41, 90.0), (8000, 0.0007, 0.088, 355.0), (32000, 0.0017, 0.004, 1405.0))]
    points[-1].update(machine="AMD EPYC", date="2026-12-07 23:50 UTC")  # a point from a later call, elsewhere
    study = tmp_path / "pretrain_scaling.json"
    study.write_text(json.dumps({"dataset": "synthetic", "date": "2026-12-04 22:00 UTC", "idle": True,
                                 "paper_flip_id_delta": 0.0052, "points": points}))
    report(copy, scaling=study)
    md = (copy / "summary.md").read_text()
    assert "| 32,000 | 3 | +0.0017 [+0.0007, +0.0027] | 0.004 |" in md and "| AMD EPYC 2026-12-07 |" in md
    assert "![pretrain_scaling](figures/pretrain_scaling.png)" in md and "idle machine" in md
    assert (copy / "figures" / "pretrain_scaling.png").stat().st_size > 1000
    sources = read_sources(copy / "eval.json", copy / "metrics.json", study, *(copy / "plots").rglob("*.json"))
    assert untraceable(md, allowed_numbers(*sources, *paper_numbers())) == []
    # a study of another dataset is not shown as this one's
    study.write_text(json.dumps({"dataset": "movielens-1m", "points": points}))
    report(copy, scaling=study)
    md = (copy / "summary.md").read_text()
    assert "No pretraining-scaling study for this dataset yet" in md and "+0.0017 [" not in md


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
