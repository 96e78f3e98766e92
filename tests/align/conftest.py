"""Fixtures for the alignment tests: tiny BERT / RoBERTa built in code, a real synthetic dataset.

Everything is session-scoped and offline: the tiny models come from ``tiny_plm.py``, the dataset
from ``flip preprocess`` on the synthetic source (5 000 rows, about a second).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_plm import make_tiny_bert, make_tiny_roberta  # noqa: E402

from flip.config import PlmConfig, config_from_dict  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from flip.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("synthetic")
    cfg = config_from_dict({"data": {"dataset": "synthetic", "synthetic": {"rows": 5000}}})
    out = root / "processed" / "synthetic"
    preprocess(cfg, root / "raw", out, progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_texts(synthetic_dir) -> list[str]:
    from flip.data.tensors import load_text

    return load_text(synthetic_dir, "train")[0][:500]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, synthetic_texts) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), corpus=synthetic_texts)


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory, synthetic_texts) -> Path:
    return make_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), corpus=synthetic_texts)


@pytest.fixture(scope="session")
def bert(bert_dir):
    from flip.models.plm import load_plm

    return load_plm(PlmConfig(name=str(bert_dir), max_length=64))


@pytest.fixture(scope="session")
def roberta(roberta_dir):
    from flip.models.plm import load_plm

    return load_plm(PlmConfig(name=str(roberta_dir), max_length=64))
