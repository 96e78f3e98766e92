"""One drift computation: the retrain flow's verdict (reports/drift/drift.json) is what the report shows.

The drift stage tests the test window once; evaluate reads that record into eval.json's
``data_drift.test`` (it never tests the test window again) and tests the other windows by the same
rule; the report's drift table shows the record. Windows are sampled here (``evaluate.drift_rows``
below the split sizes), where the two stages once drew different samples.
"""

from __future__ import annotations

import json
import posixpath

import pytest

from flip.config import load_config
from flip.data.preprocess import preprocess
from flip.errors import FlipError
from flip.evaluate.scoring import evaluate
from flip.evaluate.drift import DRIFT_SEED, drift
from flip.evaluate.report import report
from flip.train.finetune import finetune
from helpers import preset_overrides

pytestmark = pytest.mark.slow

SETTINGS = ["data.dataset=synthetic", "data.synthetic.rows=3000", "run.progress=false", "run.seeds=[1]",
            "finetune.epochs=1", "finetune.lr_grid=[]", "id_model.dnn_hidden_units=[16]", "evaluate.drift_rows=250",
            "evaluate.slices=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-once")
    cfg = load_config(None, preset_overrides(*SETTINGS))
    data, reports = tmp / "processed", tmp / "reports"
    preprocess(cfg, tmp, data, progress=False)
    verdict = drift(cfg, data, reports / "drift")  # the drift stage: what the retrain flow decides on
    finetune(cfg, data, tmp / "runs" / "scratch")
    evaluate(cfg, data, tmp / "runs", reports)
    report(reports)
    return cfg, data, reports, verdict


def test_the_report_shows_the_drift_stages_verdict(run):
    cfg, data, reports, verdict = run
    flow = json.loads((reports / "drift" / "drift.json").read_text())  # flows/pipeline.py reads this file
    assert flow == json.loads(json.dumps(verdict, default=str))
    assert flow["window_rows"] > cfg.evaluate.drift_rows  # sampled: where the stages used to draw differently
    assert flow["settings"] == {"drift_share": cfg.retrain.drift_share, "target_drift": cfg.retrain.target_drift,
                                "max_rows": cfg.evaluate.drift_rows, "seed": DRIFT_SEED}
    assert "policy" not in flow  # the flow's retrain.drift_policy, not the stage's

    shown = json.loads((reports / "eval.json").read_text())["data_drift"]
    test = shown["test"]
    assert {k: v for k, v in test.items() if k not in ("html", "source")} == {k: v for k, v in flow.items() if k != "html"}
    assert test["source"] == (reports / "drift" / "drift.json").as_posix()
    # its Evidently page is the drift stage's; evaluate did not test the test window again
    assert posixpath.normpath(f"evidently/{test['html']}") == "drift/window_drift.html"
    assert (reports / "drift" / "window_drift.html").exists()
    assert not list((reports / "evidently").glob("data_drift_test.*"))
    # the other windows: tested by evaluate under the same rule and settings
    assert list(shown) == ["valid", "test", "test_slice_1", "test_slice_2"]
    assert all(w["settings"] == flow["settings"] for w in shown.values())

    # the report's drift table: the test window's row is the record
    md = (reports / "summary.md").read_text()
    [row] = [line for line in md.splitlines() if line.startswith("| test | ")]
    verdict_text = "; ".join(flow["reasons"]) or "no drift"
    assert row == (f"| test | {flow['window_rows']:,} | {len(flow['drifted_attributes'])} of {len(flow['attributes'])} | "
                   f"{', '.join(flow['drifted_attributes']) or 'none'} | {', '.join(flow['id_like_drifted']) or 'none'} | "
                   f"{flow['positive_rate']['train']:.4f} | {flow['positive_rate']['window']:.4f} | "
                   f"{verdict_text.replace('|', '/')} |")
    assert 'href="drift/window_drift.html"' in (reports / "index.html").read_text()


def test_evaluate_refuses_a_drift_record_of_other_settings_or_none(run, tmp_path):
    cfg, data, reports, _ = run
    other = load_config(None, preset_overrides(*SETTINGS, "retrain.drift_share=0.9"))
    with pytest.raises(FlipError, match=r"drift\.json was computed with other drift settings.*drift_share 0\.5 there, "
                                        r"0\.9 here.*flip drift"):
        evaluate(other, data, reports.parent / "runs", tmp_path / "reports", drift_dir=reports / "drift")
    with pytest.raises(FlipError, match=r"drift\.json not found.*flip drift"):
        evaluate(cfg, data, reports.parent / "runs", tmp_path / "elsewhere")
