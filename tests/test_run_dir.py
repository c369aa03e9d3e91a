"""The run directory as the CLI sets it up: refused with a clear error when it cannot be written, when another
live run holds it or when it holds a finished run; printed when the run starts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY
from test_train import cli_args


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["hydra.run.dir={tmp}/afile/run"], "hydra.run.dir={tmp}/afile/run"),
        (["paths.log_dir={tmp}/afile"], "hydra.run.dir={tmp}/afile/"),  # the default run dir is under log_dir
        (["hydra.run.dir=/proc"], "hydra.run.dir=/proc"),  # exists, but nothing can be written there
        (["-m", "seed=1,2", "hydra.sweep.dir={tmp}/afile/sweep"], "hydra.sweep.dir={tmp}/afile/sweep"),
    ],
)
def test_unwritable_run_directory_is_a_clear_error(train_cli, tmp_path, corpus_file, cache_dir, overrides, key):
    (tmp_path / "afile").write_text("a file, not a directory")  # writes under it fail, even as root
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}"]
    result = train_cli(*args, *(o.format(tmp=tmp_path) for o in overrides), cwd=tmp_path)
    assert result.returncode == 1
    assert f"Error: {key.format(tmp=tmp_path)}" in result.stderr
    assert "writable directory" in result.stderr and "Traceback" not in result.stderr


def test_finished_run_directory_is_refused_also_to_resume_it_there(train_cli, tmp_path, corpus_file, cache_dir):
    run = tmp_path / "run"
    first = train_cli(*cli_args(corpus_file, cache_dir, run, "sample=null", "test=false"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = _files(run)

    again = train_cli(*cli_args(corpus_file, cache_dir, run, "sample=null", "seed=7"), cwd=tmp_path)
    assert again.returncode == 1
    assert f"Error: hydra.run.dir={run} holds a finished run (results.json)" in again.stderr
    assert f"ckpt_path={run} trainer.max_steps=<more steps>" in again.stderr and "Traceback" not in again.stderr
    assert _files(run) == finished  # the finished run's config, metrics and .hydra/ are untouched

    # Resuming it in place would lose its metrics.csv (Lightning's CSV logger deletes it): refused too.
    in_place = cli_args(
        corpus_file, cache_dir, run, "sample=null", "test=false", "trainer.max_steps=12", f"ckpt_path={run}"
    )
    assert train_cli(*in_place, cwd=tmp_path).returncode == 1
    assert _files(run) == finished
    onward = tmp_path / "onward"
    resumed = train_cli(
        *cli_args(
            corpus_file, cache_dir, onward, "sample=null", "test=false", "trainer.max_steps=12", f"ckpt_path={run}"
        ),
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((onward / "results.json").read_text())["global_step"] == 12


def test_live_run_directory_is_refused_and_released_when_its_run_dies(train_cli, tmp_path, corpus_file, cache_dir):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    long_run = cli_args(corpus_file, cache_dir, run, "trainer.max_steps=100000", "trainer.val_check_interval=1000")
    live = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *long_run],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").is_file():  # written once the run is under way
            assert live.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        live_files = _files(run)
        second = train_cli(*cli_args(corpus_file, cache_dir, run, "seed=7"), cwd=tmp_path)
        assert live.poll() is None  # still running, so the second run met it live
        assert second.returncode == 1
        assert f"Error: hydra.run.dir={run} is in use by another run" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == live_files[".hydra/overrides.yaml"]
        assert "seed: 1234" in (run / "config.yaml").read_text()
    finally:
        live.kill()  # SIGKILL: no clean-up runs, the operating system drops the lock
        live.wait()
    third = train_cli(*cli_args(corpus_file, cache_dir, run, "sample=null", "test=false"), cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]


def test_run_directory_is_printed_when_the_run_starts(train_cli, tmp_path, corpus_file, cache_dir):
    """Even a run that stops at once on bad input has said where its log is."""
    run = tmp_path / "run"
    result = train_cli(*cli_args(corpus_file, cache_dir, run, "model.num_heads=3"), cwd=tmp_path)
    assert result.returncode == 1 and "Error: model.num_heads=3" in result.stderr
    assert f"Run directory: {run}" in result.stdout
