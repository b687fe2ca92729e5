"""Shared fixtures: the real datasets (through MEDVQA_DATA) and small helpers."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder with the real datasets (MEDVQA_DATA); skipped locally when absent, an error in CI."""
    value = os.environ.get("MEDVQA_DATA", "")
    path = Path(value) if value else None
    if path is None or not (path / "slake").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"MEDVQA_DATA={value!r} does not hold the real datasets; .ci/run sets it to ../shared/datasets")
        pytest.skip("real datasets not available (set MEDVQA_DATA)")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small generated synthetic dataset shared by the data tests."""
    from medvqa.data import generate_synthetic
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "ds", n_images=120, seed=3)
