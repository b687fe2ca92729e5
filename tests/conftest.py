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
    from medvqa.data.synthetic import generate_synthetic
    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "ds", n_images=120, seed=3)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab and the book in headless Chromium (`make browser` "
                                       "installs it; select with -m browser, leave out with -m 'not browser')")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Every chapter run once headless in the smoke profile (one seed, two chapters at a time, as `make reproduce`
    runs them): (results folder, runs). Its checkpoints under runs/ are what the browser tests load."""
    import medvqa.runner.reproduce as rep
    results = tmp_path_factory.mktemp("smoke-results")
    runs = rep.reproduce("smoke", overrides={"seeds": 1}, results_dir=results, timeout=900, jobs=2)
    return results, runs
