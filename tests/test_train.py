import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, run_cli, start_cli
from hydra.utils import instantiate

from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.lit.callbacks import ProgressBar
from gpt2lab.lit.module import GPT2LitModule
from gpt2lab.train.run import train, train_run


def cli_args(corpus_file: Path, cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *extra]


def final_val_loss(run_dir: Path) -> float:
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


def test_short_run_leaves_checkpoints_metrics_and_results(tmp_path, corpus_file, cache_dir):
    run = tmp_path / "run"
    result = run_cli(*cli_args(corpus_file, cache_dir, run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "tokenizer.json", "metrics.csv", "results.json", "train.log", ".hydra/overrides.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((run / "results.json").read_text())
    assert Path(results["best_checkpoint"]).is_file() and results["global_step"] == 8
    assert results["metrics"]["val/loss"] < results["initial_val_loss"]
    assert {"test/loss", "test/ppl", "val/ppl", "val/bpb", "test/bpb"} <= set(results["metrics"])
    # bits per byte: the tokenizer-independent loss; a 320-token BPE spans about 1.4 bytes per token
    assert 1.2 < results["metrics"]["val/loss"] / (results["metrics"]["val/bpb"] * 0.6931) < 1.7
    assert results["tokens_per_sec"] > 0 and results["duration_s"] > 0
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss", "val/loss", "val/ppl", "val/bpb", "lr", "train/grad_norm", "perf/tokens_per_sec"):
        assert column in header
    log = (run / "train.log").read_text()
    assert "Sample:" in log
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(4, "def "), (4, "The "), (8, "def "), (8, "The ")]
    assert all(s["completion"] for s in samples)
    # One numbering (issue 27 #11): validations are logged at the steps the checkpoints and samples name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    named = sorted(int(p.name[4:10]) for p in (run / "checkpoints").glob("step*.ckpt"))
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [0, *named] == [0, 4, 8]
    assert "step" not in results["metrics"]
    # Said at the start: where the run goes, and (5 steps past the first) how long the rest will take here.
    assert log.index(f"Run directory: {run}") < log.index("Estimated training time: ")
    assert re.search(r"Estimated training time: \d+ s for the remaining 2 steps at [\d.]+ s/step", log)
    # lr is logged on the steps Lightning writes, numbered as checkpoints are (after that many steps), with that
    # step's value (warmup: 5e-3 * step / 51).
    lr_rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["lr"]]
    assert [int(r["step"]) for r in lr_rows] == [2, 4, 6, 8]
    for r in lr_rows:
        assert float(r["lr"]) == pytest.approx(5e-3 * int(r["step"]) / 51, rel=1e-5)
        assert float(r["train/grad_norm"]) > 0

    # The checkpoint alone rebuilds model and tokenizer.
    model, tokenizer = load_checkpoint(run / "checkpoints" / "last.ckpt")
    ids = torch.tensor([tokenizer.encode("def main():").ids])
    assert model(ids)[0].shape == (1, ids.shape[1], tokenizer.get_vocab_size())


def test_train_returns_the_optimized_metric(compose_cfg):
    cfg = compose_cfg("optimized_metric=val/ppl", "sample=null", "test=false")
    value = train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert value == pytest.approx(results["metrics"]["val/ppl"])


def test_fast_dev_run_works(compose_cfg, caplog):
    cfg = compose_cfg("trainer.fast_dev_run=true")
    with caplog.at_level("INFO", logger="gpt2lab.train"):
        run = train_run(cfg)
    # One training step (and one validation and test batch), whose loss is a number
    assert run.results["global_step"] == 1 and math.isfinite(run.results["metrics"]["train/loss"])
    # Nothing a later run, `gpt2lab runs` or ckpt_path=last would take for a run: no checkpoint, no results.json
    out = Path(cfg.paths.output_dir)
    assert run.results["best_checkpoint"] == "" and not list(out.rglob("*.ckpt"))
    assert not (out / "results.json").exists() and not (out / "metrics.csv").exists()
    assert "fast_dev_run: results.json not written" in caplog.text


def test_killed_run_resumes_to_the_same_final_loss(train_cli, tmp_path, corpus_file, cache_dir):
    # Short epochs (10 batches) so that the kill lands mid-epoch after an epoch boundary; dropout on,
    # so that the RNG state has to be restored too.
    common = [
        "trainer.max_steps=24", "trainer.limit_train_batches=10", "trainer.val_check_interval=4",
        "trainer.check_val_every_n_epoch=null", "model.dropout=0.1", "model.residual_dropout=0.1",
        "model.attention_dropout=0.1", "sample=null", "test=false",
    ]  # fmt: skip
    whole, killed, resumed = tmp_path / "whole", tmp_path / "killed", tmp_path / "resumed"
    kill = ["+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=14"]
    # A real process, for SIGKILL to kill; it starts (imports) while the whole run trains here.
    crash_log = tmp_path / "crash.log"
    crash = start_cli(*cli_args(corpus_file, cache_dir, killed, *common, *kill), cwd=tmp_path, output=crash_log)
    try:
        assert train_cli(*cli_args(corpus_file, cache_dir, whole, *common), cwd=tmp_path).returncode == 0
        crash.wait(timeout=300)
    finally:
        crash.kill()
    assert crash.returncode != 0 and not (killed / "results.json").exists(), crash_log.read_text()[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 12
    result = train_cli(*cli_args(corpus_file, cache_dir, resumed, *common, f"ckpt_path={last}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["global_step"] == 24
    assert final_val_loss(resumed) == pytest.approx(final_val_loss(whole), abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_heads=3"], "model.num_heads=3 does not divide model.d_model=32"),
        (["model.vocab_size=100"], r"tokenizer vocabulary \(320\) is larger than model.vocab_size \(100\)"),
        (["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt': no such file"),
        (["model.context_length=100000", "data.val_split=0.01"], "too few for one training window"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt': no such file"),
        (["ckpt_path=last", "paths.log_dir=/nonexistent"], "ckpt_path=last: no run under /nonexistent"),
        (["data=hub", "data.name=wikitext", "data.path=null"], "could not load wikitext"),
        (["trainer.accelerator=gpu"], "No supported gpu backend found! This machine has no GPU: add trainer=cpu"),
        (["trainer.precision=banana"], "trainer: ValueError: Precision 'banana' is invalid"),
        (["compile=true", "compile_mode=fastest"], "compile_mode='fastest': expected one of default, "),
        (
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "optimizer=adamw"],
            "FSDP shards over CUDA GPUs only; on CPUs use trainer=ddp trainer.accelerator=cpu",
        ),
        (["compile_mode=fastest"], "compile_mode='fastest': expected one of default, "),
        (
            ["compile=true", "compile_mode=reduce-overhead", "trainer.accumulate_grad_batches=2"],
            r"compile_mode=reduce-overhead replays CUDA graphs, .* cannot accumulate them \(trainer.accumulate_grad_batches=2\)",
        ),
        (
            ["+compile_options.coordinate_descent_tunin=true"],
            "compile_options.coordinate_descent_tunin: not a TorchInductor option .* Did you mean coordinate_descent_tuning",
        ),
        (["data.batch_size=0"], "data.batch_size=0: expected a positive number"),
        (["trainer.num_nodes=2"], "trainer.num_nodes=2: start this command on every machine with torchrun or srun"),
        (["float32_matmul_precision=low"], "float32_matmul_precision='low': expected highest, high or medium"),
        (
            ["tokenizer=pretrained", "tokenizer.name=/missing/tokenizer.json"],
            "tokenizer.name='/missing/tokenizer.json': no such file",
        ),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0: expected a positive learning rate"),
        (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas=\[0.9, 1.5\]: expected two numbers in \[0, 1\)"),
        (["optimizer.eps=-1e-8"], "optimizer.eps=-1e-08: expected a small non-negative number"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: expected a non-negative decay"),
        (["scheduler.warmup_steps=-5"], "scheduler.warmup_steps=-5: expected 0 or more steps"),
        (
            ["scheduler.min_lr_ratio=1.5"],
            r"scheduler.min_lr_ratio=1.5: expected a fraction of optimizer.lr in \[0, 1\]",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(compose_cfg, monkeypatch, overrides, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(*overrides))


def test_not_a_checkpoint_and_other_model(compose_cfg, tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="bogus.ckpt. is not a checkpoint: not a file written by torch.save"):
        train(compose_cfg(f"ckpt_path={bogus}"))
    cfg = compose_cfg("sample=null", "test=false")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"holds a different model \(model.num_layers: checkpoint 2 vs now 3\)"):
        train(compose_cfg(f"ckpt_path={last}", "model.num_layers=3"))
    assert torch.load(last, weights_only=False)["global_step"] == 8  # the failed resume left it intact
    with pytest.raises(ConfigError, match=r"is at step 8, and trainer.max_steps=8 leaves nothing to train"):
        train(compose_cfg(f"ckpt_path={last}"))


def test_cli_error_is_a_message_not_a_traceback(train_cli, tmp_path, corpus_file, cache_dir):
    result = train_cli(*cli_args(corpus_file, cache_dir, tmp_path / "r", "model.num_heads=3"), cwd=tmp_path)
    assert result.returncode == 1
    assert "Error: model.num_heads=3 does not divide model.d_model=32" in result.stderr
    assert "Traceback" not in result.stderr


def test_out_of_memory_names_the_knobs_and_keeps_checkpoints(train_cli, tmp_path, corpus_file, cache_dir):
    oom = ["+callbacks.oom._target_=helpers.OutOfMemoryAtStep", "+callbacks.oom.step=6", "trainer.val_check_interval=2"]
    run = tmp_path / "r"
    result = train_cli(*cli_args(corpus_file, cache_dir, run, "data.batch_size=8", *oom), cwd=tmp_path)
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("Error: out of GPU memory") :]
    for knob in (
        "data.batch_size=4 trainer.accumulate_grad_batches=2",
        "model.gradient_checkpointing=true",
        "trainer.precision=bf16-mixed",
        "trainer=fsdp",
    ):
        assert knob in error
    assert "Traceback" not in result.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the last validation before the failure (step 6) wrote a whole checkpoint


def test_launcher_process_count_must_match_devices_times_nodes(compose_cfg, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # as torchrun sets it, for 4 processes
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(
        ConfigError, match=r"trainer.num_nodes=1 x trainer.devices=2 = 2 ranks, but the launcher started 4"
    ):
        train(compose_cfg("trainer.devices=2", "trainer.accelerator=cpu"))


def test_out_of_memory_at_micro_batch_one_does_not_suggest_halving_it(compose_cfg):
    from types import SimpleNamespace

    from gpt2lab.lit.trainer import out_of_memory_message

    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device="cuda:0"))
    message = out_of_memory_message(compose_cfg("data.batch_size=1"), trainer)
    assert "data.batch_size=" not in message and "model.gradient_checkpointing=true" in message


def test_compile_mode_and_options_reach_torch_compile(compose_cfg, monkeypatch):
    from gpt2lab.lit import GPT2LitModule

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append((type(self).__name__, kwargs)))
    cfg = compose_cfg("compile=true", "compile_mode=reduce-overhead", "+compile_options.coordinate_descent_tuning=true")
    module = GPT2LitModule(
        instantiate(cfg.model, vocab_size=64),
        cfg.optimizer,
        compile=True,
        compile_mode=cfg.compile_mode,
        compile_options=cfg.compile_options,
    )
    plain = GPT2LitModule(instantiate(cfg.model, vocab_size=64), cfg.optimizer, compile=True)
    plain.configure_model()
    assert seen.pop() == ("GPT2Model", {"options": {}})  # no mode, no options: torch.compile's defaults
    module.configure_model()
    module.configure_model()  # Lightning may call it again (e.g. for the test after fit): compiled once
    # The mode's own options (CUDA graphs for reduce-overhead), then the explicit ones on top.
    assert seen == [("GPT2Model", {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}})]
    assert module.hparams.compile_options == {"coordinate_descent_tuning": True}  # saved in checkpoints


def test_each_stage_gets_its_own_module_as_under_fsdp_on_the_single_device_strategy(compose_cfg, monkeypatch, caplog):
    # The per-stage module handling that FSDP gets, with FSDP swapped for the single-device strategy on the CPU
    # (FSDP itself needs GPUs: the gpu tests run it): the step-0 validation and the test must not see the module
    # that fit() trained, and the sample comes from the best checkpoint file.
    from pytorch_lightning.strategies import SingleDeviceStrategy

    import gpt2lab.train.run as train_module

    monkeypatch.setattr(train_module, "FSDPStrategy", SingleDeviceStrategy)
    seen = []
    real_validate, real_test = pl.Trainer.validate, pl.Trainer.test
    monkeypatch.setattr(
        pl.Trainer, "validate", lambda self, m, **kw: seen.append(("validate", m)) or real_validate(self, m, **kw)
    )
    monkeypatch.setattr(
        pl.Trainer, "test", lambda self, m, **kw: seen.append(("test", m, kw["ckpt_path"])) or real_test(self, m, **kw)
    )
    real_fit = pl.Trainer.fit
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, m, **kw: seen.append(("fit", m)) or real_fit(self, m, **kw))
    cfg = compose_cfg()
    with caplog.at_level("INFO", logger="gpt2lab.train"):
        train(cfg)
    (_, validated), (_, fitted), (_, tested, ckpt) = seen
    assert len({id(validated), id(fitted), id(tested)}) == 3
    assert Path(ckpt).name.startswith("step000008")  # the best checkpoint, loaded into the fresh module
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["initial_val_loss"] > results["best_val_loss"]
    assert "test/loss" in results["metrics"]
    assert "Sample (best checkpoint):" in caplog.text

    seen.clear()
    train(compose_cfg("trainer.enable_checkpointing=false"))
    assert [s[0] for s in seen] == ["validate", "fit"]
    assert "test skipped: under FSDP the test reads the best checkpoint, and none was saved" in caplog.text


@pytest.mark.parametrize("devices", ["1", "auto", "'0,'"])
def test_fsdp_on_one_gpu_is_refused_before_anything_runs(compose_cfg, monkeypatch, devices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_cfg("trainer=fsdp", f"trainer.devices={devices}")
    with pytest.raises(ConfigError, match="trainer=fsdp with one process: FSDP shards over several GPUs"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_compile_settings_without_compile_are_flagged(compose_cfg, caplog):
    with caplog.at_level("WARNING", logger="gpt2lab.train"):
        train(compose_cfg("+compile_options.coordinate_descent_tuning=true", "sample=null", "test=false"))
    assert "take effect with compile=true only" in caplog.text


def test_training_reads_values_back_only_on_logging_steps(compose_cfg, monkeypatch):
    """No host sync per step: a tensor is read back to Python (``.item()``, which waits for the GPU) only on
    the steps that write logs or redraw the progress bar, not after every batch."""
    current = {"batch": None}
    read_at: set[int] = set()
    real_item, real_start = torch.Tensor.item, GPT2LitModule.on_train_batch_start

    def item(self):
        if current["batch"] is not None:
            read_at.add(current["batch"])
        return real_item(self)

    def on_train_batch_start(self, batch, batch_idx):
        current["batch"] = batch_idx
        return real_start(self, batch, batch_idx)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(GPT2LitModule, "on_train_batch_start", on_train_batch_start)
    cfg = compose_cfg(
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "trainer.log_every_n_steps=4",
        "trainer.enable_progress_bar=true",
        "callbacks.progress_bar.refresh_rate=4",
        "optimizer.fused=true",  # as on GPUs; the CPU's unfused AdamW reads its (CPU) step counter every step
        "sample=null",
        "test=false",
    )
    train(cfg)
    assert read_at and read_at <= {3, 7, 11}  # batch indices from 0: the 4th, 8th and 12th steps


def test_progress_bar_shows_the_logged_training_loss():
    bar = ProgressBar(refresh_rate=10, metrics=["train/loss", "train/grad_norm"])
    trainer = SimpleNamespace(
        loggers=[], progress_bar_metrics={"val/loss": 2.5}, callback_metrics={"train/loss": torch.tensor(1.25)}
    )
    assert bar.get_metrics(trainer, None) == {"val/loss": 2.5, "train/loss": 1.25}  # grad_norm not logged yet


@pytest.mark.parametrize("optimize_ddp", [False, True])
def test_compile_optimize_ddp_sets_dynamo_under_ddp(compose_cfg, monkeypatch, optimize_ddp):
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    cfg = compose_cfg("compile=true", f"compile_optimize_ddp={optimize_ddp}")
    module = GPT2LitModule(
        instantiate(cfg.model, vocab_size=64), cfg.optimizer, compile=True, compile_optimize_ddp=optimize_ddp
    )
    module._trainer = SimpleNamespace(strategy=pl.strategies.DDPStrategy())
    with torch._dynamo.config.patch(optimize_ddp=not optimize_ddp):  # restored afterwards
        module.configure_model()
        assert torch._dynamo.config.optimize_ddp is optimize_ddp


def test_optimizer_values_are_checked_before_any_data_is_read(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="optimizer.lr=-1.0"):
        train(compose_cfg("optimizer.lr=-1", f"paths.cache_dir={tmp_path / 'fresh'}"))
    assert not (tmp_path / "fresh").exists()  # no tokenizer trained, no token files written


@pytest.mark.parametrize(
    "length",
    [
        ["trainer.max_steps=6", "trainer.val_check_interval=250"],  # fewer steps than the interval
        ["trainer.max_steps=6", "trainer.val_check_interval=4"],  # last step off the interval's grid
        ["trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.limit_train_batches=6"],  # an epoch, counted
    ],
)
def test_training_ends_with_a_validation_of_its_last_step(compose_cfg, length):
    cfg = compose_cfg(*length, "sample=null", "test=false")
    value = train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["global_step"] == 6
    assert Path(results["best_checkpoint"]).name.startswith("step000006")  # the end of training is a candidate
    assert value == pytest.approx(results["metrics"]["val/loss"])
    assert value < results["initial_val_loss"]


def test_fractional_val_check_interval_is_a_fraction_of_an_epoch(compose_cfg):
    # Lightning's documented meaning: 0.5 validates twice per epoch.
    cfg = compose_cfg(
        "trainer.max_epochs=1", "trainer.limit_train_batches=10", "trainer.val_check_interval=0.5",
        "trainer.max_steps=-1", "sample=null", "test=false", "scheduler.warmup_steps=2",
    )  # fmt: skip
    train(cfg)
    run = Path(cfg.paths.output_dir)
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/loss")]
    assert steps == [0, 5, 10]  # step 0 (before training), then after steps 5 and 10, as checkpoints are named
    lr = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("lr")]
    # max_steps=-1: the schedule spans the epoch's 10 steps, so the last logged lr is well into the decay
    assert lr[-1] < 0.5 * max(lr)


def test_a_diverging_run_stops_with_an_error_and_no_nan_checkpoint(train_cli, tmp_path, corpus_file, cache_dir):
    run = tmp_path / "r"
    args = ["optimizer=adamw", "optimizer.lr=3e3", "trainer.max_steps=20", "trainer.val_check_interval=10",
            "trainer.log_every_n_steps=4"]  # fmt: skip
    result = train_cli(*cli_args(corpus_file, cache_dir, run, *args), cwd=tmp_path)
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("Error: training diverged") :]
    step = int(re.search(r"NaN or infinite by step (\d+) \(learning rate [\d.e+-]+ then", error).group(1))
    assert step < 10  # at the first logging step that saw it, not at the end of the run
    assert "optimizer.lr=3000.0" in error and "Lower optimizer.lr" in error
    assert "Traceback" not in result.stderr
    assert not [p for p in (run / "checkpoints").glob("*.ckpt") if "nan" in p.name]


def test_scheduler_null_trains_at_a_constant_learning_rate(train_cli, tmp_path, corpus_file, cache_dir):
    for n, removal in enumerate(["scheduler=null", "~scheduler"]):
        run = tmp_path / f"r{n}"
        result = train_cli(*cli_args(corpus_file, cache_dir, run, removal, "sample=null", "test=false"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lrs = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("lr")]
        assert lrs == [pytest.approx(5e-3)] * 4  # the tiny preset's optimizer.lr at each logged step, unscheduled
        assert "scheduler: null" in (run / "config.yaml").read_text()


def test_resume_from_a_run_directory_and_from_last_skipping_other_models(train_cli, tmp_path, corpus_file, cache_dir):
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    assert train_cli(*args, "hydra.run.dir=outputs/first", cwd=tmp_path).returncode == 0
    assert train_cli(*args, "model.d_model=64", "hydra.run.dir=outputs/other", cwd=tmp_path).returncode == 0

    # `last` passes over the newer run of another width, says so, and records the file it took.
    result = train_cli(*args, "ckpt_path=last", "trainer.max_steps=12", "hydra.run.dir=outputs/last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "outputs/first/checkpoints/last.ckpt" in output
    assert json.loads((tmp_path / "outputs/last/results.json").read_text())["global_step"] == 12
    assert (
        "skipping outputs/other/checkpoints/last.ckpt, a different model (model.d_model: checkpoint 64 vs now 32)"
        in output
    )
    resumed = json.loads((tmp_path / "outputs/last/results.json").read_text())["resumed_from"]
    assert resumed.endswith("checkpoints/last.ckpt") and "other" not in resumed
    assert f"ckpt_path: {resumed}" in (tmp_path / "outputs/last/config.yaml").read_text()
    assert f"Resuming from {resumed}" in output
    assert "dirpath has changed" not in output

    # A run directory stands for its checkpoints/last.ckpt.
    result = train_cli(
        *args, "ckpt_path=outputs/first", "trainer.max_steps=10", "hydra.run.dir=outputs/dir", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "outputs/dir/results.json").read_text())
    assert results["resumed_from"] == "outputs/first/checkpoints/last.ckpt" and results["global_step"] == 10

    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = train_cli(*args, f"ckpt_path={empty}", "hydra.run.dir=outputs/x", cwd=tmp_path)
    assert result.returncode == 1 and "is a directory without checkpoints/last.ckpt" in result.stderr


def test_the_last_step_logs_its_own_values_off_the_logging_grid(compose_cfg):
    # log_every_n_steps=2 logs the 2nd, 4th and 6th steps; the 7th and last is written too, with its own values.
    cfg = compose_cfg("trainer.max_steps=7", "trainer.val_check_interval=250", "sample=null", "test=false")
    train(cfg)
    rows = [r for r in csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open()) if r.get("lr")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 7]
    assert float(rows[-1]["lr"]) == pytest.approx(5e-3 * 7 / 51, rel=1e-5)  # the 7th step's warmup lr
    assert rows[-1]["train/grad_norm"] != rows[-2]["train/grad_norm"]
    assert rows[-1]["perf/tokens_per_sec"] != rows[-2]["perf/tokens_per_sec"]
