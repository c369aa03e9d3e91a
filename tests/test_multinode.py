"""Several machines with Lightning's own multi-node support: ranks started by torchrun or by SLURM (srun,
or Hydra's submitit launcher). Not runnable here beyond one machine: the configs are composed, the
Trainer is built with the environment torchrun / srun give rank 9 of 16, the submitit launcher renders
its sbatch script, and a real torchrun run trains on CPU with two processes."""

import json
import logging
import os
import subprocess
import sys

import pytest
import submitit
from conftest import CONF, REPO, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import execution_whitelist, instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import open_dict
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from gpt2lab.config import TRUSTED_TARGETS, register_schemas
from gpt2lab.lit.ddp import ExternalRanks
from gpt2lab.lit.trainer import make_trainer
from gpt2lab.model.gpt2 import DecoderBlock

# What torchrun and srun set for global rank 9 of 16: the second of 8 processes on the second of 2 nodes.
TORCHRUN_ENV = {
    "TORCHELASTIC_RUN_ID": "job1", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "16",
    "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
}  # fmt: skip
SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_NNODES": "2", "SLURM_NODELIST": "node[1-2]", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
}  # fmt: skip
TWO_NODES = ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8"]


@pytest.fixture
def launched_by(monkeypatch):
    """Set the environment of a rank started by ``torchrun`` or ``srun`` (and only that one)."""

    def _launched_by(launcher: str, **changes: str) -> None:
        for key in [*TORCHRUN_ENV, *SLURM_ENV]:
            monkeypatch.delenv(key, raising=False)
        for key, value in {**(TORCHRUN_ENV if launcher == "torchrun" else SLURM_ENV), **changes}.items():
            monkeypatch.setenv(key, value)

    return _launched_by


def compose_with_hydra(*overrides: str):
    """The real config tree with its ``hydra`` node, as ``train.py`` composes it."""
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None, job_name="train"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_ddp_on_two_nodes_composes(compose_cfg):
    cfg = compose_cfg(*TWO_NODES, tiny=False)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 8)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    with execution_whitelist(TRUSTED_TARGETS):
        strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy) is DDPStrategy and strategy._ddp_kwargs["gradient_as_bucket_view"] is True


def test_fsdp_on_two_nodes_composes(compose_cfg):
    overrides = ["trainer=fsdp", "model=gpt2-large", "model.gradient_checkpointing=true", "trainer.num_nodes=2"]
    cfg = compose_cfg(*overrides, tiny=False)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.accelerator) == (2, "auto", "gpu")
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.gradient_checkpointing) == (1280, 36, True)
    with execution_whitelist(TRUSTED_TARGETS):
        strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DecoderBlock}


def test_small_preset_on_sixteen_gpus_makes_gpt3s_tokens_per_step(compose_cfg):
    """The README's two-node recipe: 16 ranks with no accumulation make the GPT-3 paper's 0.5M tokens per step,
    four times the preset's one-GPU 131K (4 micro-batches of 32 x 1024)."""
    one_gpu = compose_cfg("preset=small", tiny=False)
    cfg = compose_cfg("preset=small", *TWO_NODES, "trainer.accumulate_grad_batches=1", tiny=False)
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy") and cfg.trainer.precision == "bf16-mixed"

    def tokens_per_step(c) -> int:
        ranks = c.trainer.devices * c.trainer.num_nodes
        return c.data.batch_size * c.model.context_length * c.trainer.accumulate_grad_batches * ranks

    assert tokens_per_step(cfg) == 4 * tokens_per_step(one_gpu) == 32 * 1024 * 16


@pytest.mark.parametrize(
    ("launcher", "environment"), [("torchrun", TorchElasticEnvironment), ("srun", SLURMEnvironment)]
)
def test_trainer_takes_its_rank_from_torchrun_or_srun(compose_cfg, launched_by, launcher, environment):
    """The two-node DDP Trainer, on CPU in place of the GPUs, as rank 9 of 16: Lightning reads the rank
    from the launcher's environment and starts no processes of its own."""
    launched_by(launcher)
    cfg = compose_cfg(*TWO_NODES, "trainer.accelerator=cpu", "trainer.precision=32-true", tiny=False)
    with execution_whitelist(TRUSTED_TARGETS):
        trainer = make_trainer(cfg.trainer, logger=False)
    assert type(trainer.strategy.cluster_environment) is environment
    assert trainer.strategy.cluster_environment.creates_processes_externally
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (9, 1, 1, 16)
    trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)  # as at launch


def test_srun_tasks_per_node_must_equal_devices(compose_cfg, launched_by):
    """Lightning checks this when it starts training: 8 tasks per node, but a Trainer for 4 devices."""
    launched_by("srun")
    cfg = compose_cfg(
        *TWO_NODES, "trainer.devices=4", "trainer.accelerator=cpu", "trainer.precision=32-true", tiny=False
    )
    with execution_whitelist(TRUSTED_TARGETS):
        trainer = make_trainer(cfg.trainer, logger=False)
    with pytest.raises(ValueError, match="ntasks-per-node=8"):
        trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)


def test_submitit_launcher_for_multi_node_jobs(tmp_path, monkeypatch):
    """``hydra/launcher=submitit_slurm`` with the fields Lightning's SLURMEnvironment checks: the sbatch
    script submitit would submit asks for 2 nodes of 8 tasks and starts them with srun."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_with_hydra(
        "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=8",
        "hydra.launcher.gpus_per_node=8", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=1440",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", *TWO_NODES,
    )  # fmt: skip
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg.nodes, launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node) == (2, 8, 8)
    assert launcher_cfg.nodes == cfg.trainer.num_nodes and launcher_cfg.tasks_per_node == cfg.trainer.devices

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's SLURM executor wants srun on the PATH
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    scripts = []

    def render_instead_of_submitting(executor, *args):
        scripts.append(executor._executor._make_submission_file_text("python -m submitit.core._submit", "0"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", render_instead_of_submitting)
    launcher = SlurmLauncher(**{k: v for k, v in launcher_cfg.items() if k != "_target_"})
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["seed=1"]], initial_job_idx=0)
    lines = scripts[0].splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=1440"):
        assert f"#SBATCH {flag}" in lines
    assert lines[-1].startswith("srun ")


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_other_ranks_write_no_hydra_dir_and_their_own_log(launched_by, launcher):
    cfg = compose_with_hydra("hydra.run.dir=outputs/run")
    launched_by(launcher)
    ExternalRanks().on_run_start(cfg)
    assert cfg.hydra.output_subdir is None and cfg.hydra.job.name == "train_ddp_rank_9"

    cfg = compose_with_hydra("hydra.run.dir=outputs/run")
    launched_by(launcher, RANK="0", SLURM_PROCID="0")
    ExternalRanks().on_run_start(cfg)
    assert cfg.hydra.output_subdir == ".hydra" and cfg.hydra.job.name == "train"


def test_a_single_task_under_slurm_is_an_ordinary_run(launched_by):
    launched_by("srun", SLURM_NTASKS="1", SLURM_PROCID="0")
    cfg = compose_with_hydra()  # the default, time-stamped run directory
    ExternalRanks().on_run_start(cfg)
    assert cfg.hydra.output_subdir == ".hydra" and cfg.hydra.job.name == "train"


def test_time_stamped_run_dir_is_refused_under_torchrun(train_cli, tmp_path, corpus_file, cache_dir):
    """Ranks started a second apart would each make their own directory: stop before any is made."""
    env = {**TORCHRUN_ENV, "RANK": "0"}
    result = train_cli(*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "Error: hydra.run.dir=${paths.log_dir}/${now:" in result.stderr
    assert "hydra.run.dir=outputs/<name>" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_multirun_is_refused_under_srun(launched_by, capsys):
    launched_by("srun")
    with pytest.raises(SystemExit) as refused:
        ExternalRanks().on_multirun_start(compose_with_hydra())
    assert refused.value.code == 1  # bad input's exit status, as train.py's Error: lines end
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        "Error: a multirun (-m) under torchrun/srun would run the whole sweep on each of the 16 ranks"
    )


def test_submitit_task_of_a_multi_node_job_logs_to_its_own_file(tmp_path, launched_by):
    """In a sweep, each SLURM task runs the job itself (rank 9 here): it moves off the job's train.log."""
    cfg = compose_with_hydra()
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path)
    launched_by("srun")
    root = logging.getLogger()
    root.addHandler(logging.FileHandler(tmp_path / "train.log"))  # as Hydra set up the job's log

    def file_handlers() -> list[logging.FileHandler]:
        return [h for h in root.handlers if isinstance(h, logging.FileHandler) and str(tmp_path) in h.baseFilename]

    try:
        ExternalRanks().on_job_start(cfg)
        assert [h.baseFilename for h in file_handlers()] == [str(tmp_path / "train_ddp_rank_9.log")]
    finally:
        for handler in file_handlers():
            root.removeHandler(handler)
            handler.close()


def torchrun(*args: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 train.py ARGS``: one node, two ranks, as run_cli sets up."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return subprocess.run(
        [*command, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_torchrun_run_and_resume(tmp_path, corpus_file, cache_dir):
    """Two CPU ranks started by torchrun: one run directory, files from rank 0, a log from rank 1; then a
    second run resumes from ckpt_path=last (each rank resolves it to the same file)."""
    cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "sample=null"]
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "trainer=ddp", *cpu]
    result = torchrun(*args, "hydra.run.dir=outputs/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["run"]
    run = tmp_path / "outputs" / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 8 and results["metrics"]["test/loss"] > 0
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Results in" in (run / "train.log").read_text()
    assert "Results in" not in (run / "train_ddp_rank_1.log").read_text()  # rank 1 logs, but writes no files

    result = torchrun(*args, "trainer.max_steps=12", "ckpt_path=last", "hydra.run.dir=outputs/resumed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((tmp_path / "outputs" / "resumed" / "results.json").read_text())
    assert resumed["global_step"] == 12 and resumed["initial_val_loss"] is None  # resumed, not started afresh
    output = result.stdout + result.stderr
    assert "Restored all states from the checkpoint at outputs/run/checkpoints/last.ckpt" in output
