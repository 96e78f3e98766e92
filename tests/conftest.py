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
