"""The first thing a user runs: ``python train.py`` with no arguments (within 5 minutes on 2 cores)."""

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_default_run_halves_the_validation_loss(tmp_path):
    result = run_cli(cwd=tmp_path, timeout=900, env={"GPT2LAB_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "outputs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["global_step"] == 700
    assert results["metrics"]["val/loss"] <= 0.5 * results["initial_val_loss"]
    assert results["metrics"]["test/loss"] < 0.6 * results["initial_val_loss"]
