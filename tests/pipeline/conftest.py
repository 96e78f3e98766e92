"""Fixtures for pipeline tests: a temporary DVC repository on synthetic data."""

from __future__ import annotations

import pytest

from pipeline_repo import make_dvc_repo, synthetic


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    run = make_dvc_repo(tmp_path, synthetic)
    monkeypatch.chdir(tmp_path)
    return run


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (a subprocess API on a fresh SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
