"""A params.yaml holding only a ``data:`` section: ``flip <stage>`` takes the defaults, and DVC (which
needs every key dvc.yaml interpolates or declares) gets them from ``flip params --complete``, which
``make data`` and ``make run`` call first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from flip.config import Config, ConfigError, complete_params, load_config

SHORT = """\
# my own data (the rest: defaults)
data:
  dataset: synthetic      # the generator
  synthetic: {rows: 3000}
"""


def test_complete_keeps_the_users_values_and_comments_and_adds_every_default(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(SHORT)
    added = complete_params(path)
    assert {"data.raw_dir", "data.processed_dir", "data.synthetic.seed", "validate", "retrain"} <= set(added)
    text = path.read_text()
    assert text.startswith("# my own data (the rest: defaults)\ndata:\n  dataset: synthetic      # the generator\n")
    tree = yaml.safe_load(text)  # PyYAML, as other readers of params.yaml use: every float stays a float
    cfg = load_config(path)
    assert cfg.data.synthetic.rows == 3000 and cfg.data.dataset == "synthetic"
    defaults = Config().to_dict()
    assert tree["pretrain"] == defaults["pretrain"] and tree["finetune"] == defaults["finetune"]
    assert set(tree) == set(defaults) and set(tree["data"]) == set(defaults["data"])
    assert complete_params(path) == [] and path.read_text() == text  # complete already: left as it is


def test_complete_refuses_a_typo_and_writes_nothing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  datset: synthetic\n")
    with pytest.raises(ConfigError, match="unknown key.*data.datset"):
        complete_params(path)
    assert path.read_text() == "data:\n  datset: synthetic\n" and [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_make_data_and_make_run_complete_the_params_before_dvc():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("data", "run"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n|ifeq.*\n|else\n|endif\n)+)", makefile, re.M).group(1)
        assert "flip params --complete" in recipe.splitlines()[0], (target, recipe)
        assert "dvc " in recipe


@pytest.mark.slow
def test_dvc_repro_validate_on_a_data_only_params_yaml(dvc_repo):
    Path("params.yaml").write_text(SHORT)
    out = dvc_repo("flip", "params", "--complete")
    assert "added" in out and "validate" in out
    out = dvc_repo("dvc", "repro", "validate")
    for stage in ("download", "preprocess", "validate"):
        assert f"Running stage '{stage}'" in out
    meta = json.loads(Path("data/processed/synthetic/meta.json").read_text())
    assert meta["counts"]["total"] == 3000
    assert json.loads(Path("reports/validation.json").read_text())["success"]
    assert Path("params.yaml").read_text().startswith(SHORT.splitlines()[0])
