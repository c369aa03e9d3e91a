"""A CPU run on a machine that another process keeps busy trains with the cores left free, for the run only."""

import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.errors import ConfigError
from gpt2lab.lit import cpu_threads
from gpt2lab.train import run as train_run


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.exists("/proc/stat"), reason="Linux only")
def test_busy_cores_sees_a_process_spinning_on_a_core():
    core = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    try:
        assert cpu_threads.busy_cores({core}, interval_s=0.5) > 0.7
    finally:
        hog.kill()


@pytest.fixture
def two_cores_one_busy(monkeypatch):
    """A 2-core machine where other processes keep 1.1 cores busy, and no thread count set by the user."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 1.1)


def test_training_threads_leave_the_busy_cores_alone(monkeypatch, caplog, threads, two_cores_one_busy):
    torch.set_num_threads(2)
    with cpu_threads.use_free_cores() as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert "Other processes keep 1.1 of this machine's 2 CPU cores busy: training with 1 thread(s)" in caplog.text
    assert torch.get_num_threads() == 2  # the count before the block, once it ends

    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 0.2)  # an idle machine: all cores
    with cpu_threads.use_free_cores() as used:
        assert used == 2 and torch.get_num_threads() == 2

    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 2.0)  # fully busy: still one thread
    with cpu_threads.use_free_cores() as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    with cpu_threads.use_free_cores() as used:
        assert used == 2 and torch.get_num_threads() == 2


def test_the_thread_count_comes_back_when_the_block_raises(threads, two_cores_one_busy):
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="stop"), cpu_threads.use_free_cores():
        assert torch.get_num_threads() == 1
        raise RuntimeError("stop")
    assert torch.get_num_threads() == 2


def test_an_in_process_run_gives_the_thread_count_back(
    compose_cfg, tmp_path, monkeypatch, caplog, threads, two_cores_one_busy
):
    # What a notebook calling train_model sees: the run trains with the free core, and the notebook's count stands
    # after it, whether the run ends well or raises.
    seen = []
    prepare_data = train_run.prepare_data
    monkeypatch.setattr(
        train_run, "prepare_data", lambda plan: seen.append(torch.get_num_threads()) or prepare_data(plan)
    )
    torch.set_num_threads(2)
    train_run.train(compose_cfg("sample=null", "test=false", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert seen == [1] and "training with 1 thread(s) instead of 2" in caplog.text
    assert torch.get_num_threads() == 2

    bogus = tmp_path / "bogus.ckpt"  # the run fails after it chose its threads (resuming from a non-checkpoint)
    bogus.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a checkpoint"):
        train_run.train(compose_cfg(f"ckpt_path={bogus}"))
    assert seen == [1, 1] and torch.get_num_threads() == 2
