"""Shared fixtures. Real data lives in ../shared/data and is read from there, never copied."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VIGIL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {SHARED_DATA} is missing")
        pytest.skip(f"shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _artifact_dir(settings, tmp_path):
    """Every test writes model and baseline artifacts into its own temporary folder."""
    settings.VIGIL_ARTIFACT_DIR = tmp_path / "artifacts"
