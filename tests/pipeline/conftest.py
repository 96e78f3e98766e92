"""Fixtures for pipeline tests: a temporary DVC repository on synthetic data."""

from __future__ import annotations

import pytest

from pipeline_repo import make_dvc_repo, synthetic


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    run = make_dvc_repo(tmp_path, synthetic)
    monkeypatch.chdir(tmp_path)
    return run
