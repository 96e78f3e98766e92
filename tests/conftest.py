"""pytest set-up: telemetry off, no mirror leaking into tests, and the fixtures every folder uses."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _no_mirror_env(monkeypatch):
    """Tests choose their mirror explicitly; the CI-wide FLIP_DATA_MIRROR must not leak into them."""
    monkeypatch.delenv("FLIP_DATA_MIRROR", raising=False)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """``make(rows, **synthetic)``: a processed synthetic dataset (``helpers.write_synthetic``), built once
    per set of arguments in the session. Tests must not modify it."""
    from helpers import write_synthetic

    built: dict[tuple, object] = {}

    def make(rows: int, **synthetic):
        key = (rows, *sorted(synthetic.items()))
        if key not in built:
            built[key] = write_synthetic(tmp_path_factory.mktemp(f"synthetic-{rows}"), rows, **synthetic)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """``make(data, texts, dropout=True)``: a tiny BERT knowing the words of the first ``texts`` training
    texts of ``data`` (``helpers.write_tiny_bert_for``), built once per set of arguments in the session."""
    from helpers import write_tiny_bert_for

    built: dict[tuple, object] = {}

    def make(data, texts: int, dropout: bool = True):
        key = (str(data), texts, dropout)
        if key not in built:
            built[key] = write_tiny_bert_for(tmp_path_factory.mktemp("tiny-bert"), data, texts, dropout)
        return built[key]

    return make
