"""The first thing a user runs: ``python train.py`` with no arguments (within 5 minutes on 2 cores)."""

import json
import subprocess
import sys

import pytest
from conftest import cli_env, run_cli


@pytest.mark.slow
def test_default_run_halves_the_validation_loss_and_beats_xz_on_its_test_split(tmp_path):
    env = {"GPT2LAB_CACHE_DIR": str(tmp_path / "cache")}
    result = run_cli(cwd=tmp_path, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "outputs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["global_step"] == 680
    assert results["metrics"]["val/loss"] <= 0.5 * results["initial_val_loss"]
    assert results["metrics"]["test/loss"] < 0.6 * results["initial_val_loss"]
    # Issue 30's target: the test split's bits per byte below what xz -9e makes of the same bytes
    evaluate = [sys.executable, "-m", "gpt2lab.evaluate", "ckpt=best", "split=test", "hydra.run.dir=scored"]
    scored = subprocess.run(evaluate, cwd=tmp_path, env=cli_env(env), capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((tmp_path / "scored" / "eval.json").read_text())
    assert metrics["bits_per_byte"] < metrics["compressors"]["xz -9e"], metrics
