"""A CPU run on a machine that another process keeps busy trains with the cores left free."""

import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.lit import cpu_threads


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


def test_training_threads_leave_the_busy_cores_alone(monkeypatch, caplog, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 1.1)
    torch.set_num_threads(2)
    assert cpu_threads.use_free_cores() == 1 and torch.get_num_threads() == 1
    assert "Other processes keep 1.1 of this machine's 2 CPU cores busy: training with 1 thread(s)" in caplog.text

    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 0.2)  # an idle machine: all cores
    assert cpu_threads.use_free_cores() == 2 and torch.get_num_threads() == 2

    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores: 2.0)  # fully busy: still one thread
    assert cpu_threads.use_free_cores() == 1
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    assert cpu_threads.use_free_cores() == 2 and torch.get_num_threads() == 2
