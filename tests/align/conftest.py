"""Fixtures for the alignment tests: tiny BERT / RoBERTa built in code, a real synthetic dataset.

Everything is session-scoped and offline: the tiny models and the dataset (``flip preprocess`` on the
synthetic source, 5 000 rows, about a second) come from the session fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_roberta

from flip.config import PlmConfig


@pytest.fixture(scope="session")
def synthetic_dir(synthetic_data) -> Path:
    return synthetic_data(5000)


@pytest.fixture(scope="session")
def synthetic_texts(synthetic_dir) -> list[str]:
    from flip.data.tensors import load_text

    return load_text(synthetic_dir, "train")[0][:500]


@pytest.fixture(scope="session")
def bert_dir(tiny_bert, synthetic_dir) -> Path:
    return tiny_bert(synthetic_dir, 500)


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
