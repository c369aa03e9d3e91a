"""``gpt2lab runs`` and the curves: a table of the runs under a directory, read from what real runs wrote."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY
from filelock import FileLock
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger

from gpt2lab.errors import ConfigError
from gpt2lab.lit.callbacks import Curves
from gpt2lab.runs.__main__ import main
from gpt2lab.runs.plots import line_style
from gpt2lab.runs.reading import COLUMNS
from gpt2lab.runs.report import format_table, run_table
from gpt2lab.sweep.summary import SweepSummary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _job(sweep: Path, name: str, overrides: list[str], trained: Path | None, error: Exception | None = None) -> None:
    """A multirun job: ``trained``'s files in ``sweep/name``, its outcome written by the sweep's own callback."""
    job_dir = sweep / name
    if trained is not None:
        shutil.copytree(trained, job_dir)
    else:
        job_dir.mkdir(parents=True)
    hydra = {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(job_dir)}}
    cfg = OmegaConf.create({"optimized_metric": "val/loss", "hydra": hydra})
    if error is None:
        ret = JobReturn(overrides, cfg, cfg, status=JobStatus.COMPLETED, _return_value=3.5)
    else:
        ret = JobReturn(overrides, cfg, cfg, status=JobStatus.FAILED, _return_value=error)
    SweepSummary().on_job_end(cfg, ret)


@pytest.fixture(scope="module")
def outputs(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outputs/ tree: a finished run, a killed one (checkpoints, no results.json) and a 3-job multirun."""
    root = tmp_path_factory.mktemp("runs") / "outputs"
    shutil.copytree(trained_run, root / "2026-01-01" / "10-00-00")
    killed = root / "2026-01-01" / "11-00-00"
    shutil.copytree(trained_run, killed)
    (killed / "results.json").unlink()
    sweep = root / "multirun" / "2026-01-02" / "09-00-00"
    _job(sweep, "0", ["optimizer.lr=1e-3", "seed=1"], trained_run)
    _job(sweep, "1", ["optimizer.lr=3e-3", "seed=1"], trained_run)
    _job(sweep, "2", ["optimizer.lr=1e-2", "seed=1"], None, ValueError("model.num_heads=3 does not divide 32"))
    return root


def _names(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows]


def test_the_table_lists_runs_and_jobs_with_their_status(outputs, trained_run):
    rows, _ = run_table(outputs)
    assert _names(rows) == [
        "2026-01-01/10-00-00", "2026-01-01/11-00-00", "multirun/2026-01-02/09-00-00/0",
        "multirun/2026-01-02/09-00-00/1", "multirun/2026-01-02/09-00-00/2",
    ]  # fmt: skip
    assert [r["status"] for r in rows] == ["finished", "killed", "finished", "finished", "failed"]
    finished, killed, job, _, failed = rows
    assert finished["steps"] == 40 and killed["steps"] == 40  # the killed run's steps come from metrics.csv
    assert 0 < finished["best_val_loss"] < 7 and finished["best_val_ppl"] > 1 and finished["tokens_per_s"] > 0
    assert killed["best_val_loss"] == pytest.approx(finished["best_val_loss"])  # the best val/loss in metrics.csv
    assert job["objective"] == 3.5 and job["overrides"] == "optimizer.lr=1e-3 seed=1"
    assert failed["error"] == "ValueError: model.num_heads=3 does not divide 32" and failed["steps"] is None

    table = format_table(rows).splitlines()  # the header, a rule, the rows
    assert table[0].split() == list(COLUMNS) and set(table[1]) == {"─"}
    assert "seed=1" in table[5]  # the runs outside the sweep have no seed override
    sweep_table = format_table(rows[2:]).splitlines()
    # only what differs
    assert sweep_table[3].split()[:3] == ["multirun/2026-01-02/09-00-00/1", "optimizer.lr=3e-3", "finished"]


def test_a_run_held_by_a_live_process_is_running(outputs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(outputs / "2026-01-01" / "11-00-00", run)
    lock = FileLock(run / ".run.lock", blocking=False)
    with lock:
        assert run_table(run)[0][0]["status"] == "running"
    assert run_table(run)[0][0]["status"] == "killed"


def test_filter_sort_and_csv(outputs, capsys):
    assert _names(run_table(outputs, ["status=killed"])[0]) == ["2026-01-01/11-00-00"]
    assert _names(run_table(outputs, ["optimizer.lr=0.003"])[0]) == ["multirun/2026-01-02/09-00-00/1"]  # as numbers
    assert len(run_table(outputs, ["status=finished", "name=multirun/*"])[0]) == 2  # repeated, and a glob
    assert len(run_table(outputs, ["trainer.max_steps=40"])[0]) == 4  # a key of the runs' config.yaml

    by_lr = run_table(outputs, ["name=multirun/*"], sort="optimizer.lr", reverse=True)[0]
    assert [r["name"][-1] for r in by_lr] == ["2", "1", "0"]
    by_steps = run_table(outputs, sort="steps")[0]
    assert by_steps[-1]["status"] == "failed"  # no steps: last

    main([str(outputs), "--csv", "--filter", "status=finished"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 3
    assert rows[1]["overrides"] == "optimizer.lr=1e-3 seed=1"  # whole in the CSV


def test_plot_draws_the_selected_runs_validation_curves(outputs, tmp_path):
    figure = tmp_path / "val.png"
    _, drawn = run_table(outputs, ["status=finished"], plot=figure)
    assert drawn == 3 and figure.read_bytes().startswith(PNG_SIGNATURE)
    # The sweep's own figure and tables, written by the summary callback after each job
    sweep = outputs / "multirun" / "2026-01-02" / "09-00-00"
    assert (sweep / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [r["status"] for r in csv.DictReader((sweep / "summary.csv").open())] == ["finished", "finished", "failed"]
    assert "| 1    | optimizer.lr=3e-3 | finished |" in (sweep / "summary.md").read_text()


def test_plot_of_runs_with_long_overrides_keeps_its_axes(trained_run, tmp_path):
    """An Optuna study's overrides make labels wider than the figure: the legend goes below the axes, which keep
    their size, and the labels are shortened."""
    from matplotlib.image import imread

    sweep = tmp_path / "study"
    for n in range(8):  # every override differs between the trials, as in an Optuna study
        overrides = [f"optimizer.lr=0.000{n}87194737873281", f"model.dropout=0.{n}6037443550700387"]
        overrides += [f"scheduler.warmup_steps={20 + n}", f"data.batch_size={64 + n}", f"model.num_layers={2 + n}"]
        _job(sweep, f"trial_{n}", [*overrides, f"hparams_search=optuna_{n}"], trained_run)
    figure = tmp_path / "val.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when the layout squeezes the axes to nothing
        assert run_table(sweep, plot=figure)[1] == 8
    image = imread(figure)[..., :3].mean(axis=-1)
    spines = ((image < 0.3).mean(axis=0) > 0.3).nonzero()[0]  # columns dark over a third of the height
    assert spines[0] < 0.15 * image.shape[1] and spines[-1] > 0.85 * image.shape[1]  # the axes span the width


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/nowhere"], "nowhere does not exist. Give the directory the runs are under"),
        (["{empty}"], "no runs under"),
        (["{root}", "--sort", "speed"], "--sort speed: no run has this key. Use a column (name, overrides"),
        (["{root}", "--filter", "status"], "--filter 'status': expected key=value"),
        (["{root}", "--filter", "status=done"], "none of the 5 runs under"),
        (["{root}", "--plot", "{empty}/no/such/dir.png"], "the directory"),
    ],
)
def test_bad_input_is_one_error_line(outputs, tmp_path, capsys, args, message):
    args = [a.format(root=outputs, empty=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_the_command_line(outputs, tmp_path):
    """``gpt2lab runs`` as a user types it (the console script's module), then a wrong directory."""
    ok = subprocess.run(
        [sys.executable, "-m", "gpt2lab.cli", "runs", str(outputs), "--sort", "best_val_loss"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].startswith("name") and "killed" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gpt2lab.runs", str(tmp_path / "nowhere")], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.stderr


def test_a_reader_that_stops_early_gets_no_traceback(outputs):
    """``gpt2lab runs outputs | head -1``: the pipe closes before the table is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab.runs", str(outputs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before the process has imported anything, let alone printed
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == b"", err.decode()


def test_a_run_that_raised_shows_its_exception(train_cli, tmp_path, corpus_file, cache_dir, monkeypatch):
    """A bug (not bad input) ends the run with Hydra's 'Job failed' and a traceback in train.log: the error column
    is the exception, from the traceback's last line."""

    def training_step(self, batch, batch_idx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("gpt2lab.lit.module.GPT2LitModule.training_step", training_step)
    run = tmp_path / "run"
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    assert train_cli(*args, cwd=tmp_path).returncode == 1
    (row,) = run_table(run)[0]
    assert row["status"] == "failed"
    assert row["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_a_run_ends_with_its_curves(trained_run):
    from matplotlib.image import imread

    png = trained_run / "curves.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = imread(png).shape
    assert width > 2 * height  # loss, bits per byte and lr side by side


def test_a_diverging_run_is_failed_and_still_drawn(compose_cfg, tmp_path):
    from gpt2lab.train.run import train

    cfg = compose_cfg("optimizer=adamw", "optimizer.lr=3e3", "scheduler.warmup_steps=1", "sample=null", "test=false")
    with pytest.raises(ConfigError, match="training diverged"):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    (row,) = run_table(run)[0]
    assert row["status"] == "failed" and "before its first checkpoint" in row["error"]
    assert (run / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_no_metrics_no_curves(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gpt2lab.lit.callbacks")
    curves = Curves(str(tmp_path))
    curves._draw(SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(tmp_path, name="", version="")]))
    curves._draw(SimpleNamespace(is_global_zero=True, loggers=[]))
    assert not (tmp_path / "curves.png").exists()
    assert "No curves.png: no loss was logged" in caplog.text and "the run has no CSV logger" in caplog.text


def test_a_ctrl_c_stop_is_stopped_not_killed(train_cli, tmp_path, corpus_file, cache_dir):
    """Ctrl-C (and SIGTERM) stop a run cleanly, with last.ckpt written and the stop in train.log: that run is
    ``stopped``, and can be resumed; only a process that died without a word is ``killed``."""
    run = tmp_path / "run"
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    stop = ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.step=5", "+callbacks.stop.signal=SIGINT"]
    stopped = train_cli(*args, "trainer.max_steps=12", "sample=null", *stop, cwd=tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    (row,) = run_table(run)[0]
    assert row["status"] == "stopped" and row["steps"] == 6 and row["error"] == "", row
    assert _names(run_table(tmp_path, ["status=stopped"])[0]) == ["run"]
    # Resumed in the same directory, its log goes on: a stop followed by more training, then silence, is a death
    with (run / "train.log").open("a") as log:
        log.write(f"[2026-12-06 06:03:45,001][gpt2lab.train][INFO] - Resuming from {run}/checkpoints/last.ckpt\n")
    assert run_table(run)[0][0]["status"] == "killed"


def test_plot_gives_each_run_its_own_line_style(trained_run, tmp_path, monkeypatch):
    """Past matplotlib's 10 colours the runs of a figure still differ: no two lines share colour and dash."""
    from matplotlib.colors import to_hex

    sweep = tmp_path / "sweep"
    for n in range(12):
        _job(sweep, str(n), [f"optimizer.lr={n + 1}e-3"], trained_run)
    drawn = []
    monkeypatch.setattr("gpt2lab.runs.plots.save_figure", lambda figure, path: drawn.append(figure))
    assert run_table(sweep, plot=tmp_path / "val.png")[1] == 12
    (figure,) = drawn
    lines = figure.axes[0].get_lines()
    styles = {(to_hex(line.get_color()), line.get_linestyle()) for line in lines}
    assert len(lines) == 12 and len(styles) == 12
    styles = [(to_hex(s["color"]), s["linestyle"], s["marker"]) for s in map(line_style, range(200))]
    assert len({style[:2] for style in styles[:40]}) == 40 and len(set(styles)) == 200  # then the markers differ
