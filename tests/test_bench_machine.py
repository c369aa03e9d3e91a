"""Every bench's guard against a busy machine, the load under its tables, and the bandwidth limit of decoding: the
reader, the clock and the bandwidth patched, so nothing here depends on how busy the machine running it is."""

import os

import pytest
import torch

from gpt2lab.bench import machine
from gpt2lab.bench.__main__ import main
from gpt2lab.errors import ConfigError
from gpt2lab.lit import speed


class FakeClock:
    """``monotonic`` and ``sleep`` for the guard: sleeping moves the clock, and nothing really waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(machine, "monotonic", fake.monotonic)
    monkeypatch.setattr(machine, "sleep", fake.sleep)
    return fake


def readings(monkeypatch, *shares: float) -> list[float]:
    """Patch the busy reader to return ``shares`` in turn (the last one from then on); the list of those read."""
    read: list[float] = []

    def busy_share() -> float:
        read.append(shares[min(len(read), len(shares) - 1)])
        return read[-1]

    monkeypatch.setattr(machine, "busy_share", busy_share)
    return read


def test_a_quiet_machine_is_measured_at_once(monkeypatch, clock):
    readings(monkeypatch, 0.03)
    assert machine.wait_for_free_cores() == 0.03
    assert clock.slept == []


def test_busy_cores_stop_the_bench_after_the_bounded_wait_naming_the_option(monkeypatch, clock, capsys):
    read = readings(monkeypatch, 0.55)
    with pytest.raises(ConfigError) as e:
        machine.wait_for_free_cores(wait_s=12)
    assert "other processes keep 55% of the" in str(e.value) and "after 12 s of waiting" in str(e.value)
    assert "--busy-ok measures anyway" in str(e.value)
    assert clock.now == 12 and all(s <= machine.POLL_S for s in clock.slept)  # never past the bound
    assert len(read) == 1 + len(clock.slept)  # one reading at once, one after each pause
    assert "Waiting up to 12 s" in capsys.readouterr().err


def test_the_bench_goes_on_once_the_cores_are_free(monkeypatch, clock):
    readings(monkeypatch, 0.9, 0.6, 0.04)
    assert machine.wait_for_free_cores(wait_s=60) == 0.04
    assert clock.now == 2 * machine.POLL_S


def test_busy_ok_measures_at_once_and_keeps_the_reading(monkeypatch, clock, capsys):
    readings(monkeypatch, 1.0)
    assert machine.wait_for_free_cores(busy_ok=True) == 1.0
    assert clock.slept == [] and "Measuring anyway (--busy-ok)" in capsys.readouterr().err


def test_a_gpu_bench_needs_only_some_cores_free(monkeypatch, clock):
    readings(monkeypatch, 0.3)
    assert machine.wait_for_free_cores(wait_s=0, gpu=True) == 0.3
    with pytest.raises(ConfigError, match="a CPU bench measures at 10% or less"):
        machine.wait_for_free_cores(wait_s=0)


def test_a_negative_wait_is_bad_input(monkeypatch):
    readings(monkeypatch, 0.0)
    with pytest.raises(ConfigError, match="--busy-wait -1: expected 0 or more seconds"):
        machine.wait_for_free_cores(wait_s=-1)


@pytest.mark.parametrize(
    "command",
    [
        ["decode", "--model", "gpt2-tiny", "-b", "1"],
        ["export", "--model", "gpt2-tiny"],
        ["preset=tiny", "trainer=cpu", "-b", "4"],
    ],
    ids=["decode", "export", "training"],
)
def test_every_bench_command_refuses_a_busy_machine_in_one_error_line(monkeypatch, clock, capsys, command):
    readings(monkeypatch, 0.8)
    assert main([*command, "--busy-wait", "3"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--busy-ok measures anyway" in errors[0]
    assert clock.now == 3


def test_the_load_reads_the_same_under_every_table():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert speed.describe_load(0.02, 0.125) == (
        f"load: other processes kept 2% of the {cores} CPU cores busy at the start, 12% at the end"
    )
    assert speed.describe_load(None, 0.5) == f"load: other processes kept 50% of the {cores} CPU cores busy at the end"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_busy_share_leaves_out_the_benchs_own_cpu_time(monkeypatch):
    """The cores were busy for 1.5 cores' worth over the reading, 1 of them this process's own: 0.5 of 2 cores is
    others'."""
    from types import SimpleNamespace

    from gpt2lab.lit import cpu_threads

    cpu = iter([10.0, 11.0])  # this process's CPU seconds before and after a 1 s reading
    wall = iter([0.0, 1.0])
    monkeypatch.setattr(speed, "time", SimpleNamespace(process_time=lambda: next(cpu), perf_counter=lambda: next(wall)))
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda cores, interval_s: 1.5)
    assert speed.busy_share() == pytest.approx(0.25)


def test_decoding_rows_give_their_share_of_the_bandwidth_limit(monkeypatch, capsys):
    """A patched bandwidth of 100 tokens' weights per second and patched timings (64 new tokens in 0.8 s at batch 1:
    80 tokens/s): 80% of the limit, in the table and in the sentence under it."""
    from gpt2lab.bench import decode

    readings(monkeypatch, 0.01)
    model = decode.build_model("gpt2-tiny", torch.device("cpu"), torch.float32)
    weight_bytes = machine.weight_bytes_per_token(model)
    monkeypatch.setattr(machine, "copy_bandwidth", lambda device: 100.0 * weight_bytes)
    monkeypatch.setattr(decode, "median_seconds", lambda run, repeats, device: [0.8])
    assert main(["decode", "--model", "gpt2-tiny", "-b", "1", "2", "--new", "64", "--no-hf", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    header, _, row = [line for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in header.strip("|").split("|")][-1] == "batch 1, share of the bandwidth limit"
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "gpt2lab generate (dynamic cache, eager)", "80 tokens/s", "160 tokens/s", "80.0%",
    ]  # fmt: skip
    assert "load: other processes kept 1% of the" in out and "busy at the start, 1% at the end" in out
    assert f"Batch 1 bound by memory bandwidth: 100 tokens/s ({weight_bytes / 1e9:.2f} GB of weights" in out
    assert "gpt2lab reaches 80.0%" in out


def test_weights_read_per_token_leave_out_lookups_only():
    """Every weight once (the tied output matrix once), but not the position table, of which a token reads a row."""
    from gpt2lab.bench.decode import build_model

    model = build_model("gpt2-tiny", torch.device("cpu"), torch.float32)
    expected = (model.num_parameters() - model.wpe.weight.numel()) * 4
    assert machine.weight_bytes_per_token(model) == expected
    assert machine.weight_bytes_per_token(model.to(torch.bfloat16)) == expected // 2


def test_onnx_weights_read_per_token_count_int8_as_one_byte_and_leave_out_gathers(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.zeros((10, 4), np.float32), "table"),  # only looked up
        numpy_helper.from_array(np.zeros((4, 4), np.float32), "w"),  # 64 bytes
        numpy_helper.from_array(np.zeros((4, 4), np.int8), "q"),  # 16 bytes
        numpy_helper.from_array(np.zeros((), np.int8), "zero"),  # 1 byte
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("MatMulInteger", ["y8", "q", "zero"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("z", TensorProto.INT32, [1, 4])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert machine.onnx_weight_bytes_per_token(tmp_path / "m.onnx") == 64 + 16 + 1


def test_the_export_table_gives_decodings_share_of_each_runtimes_limit():
    from gpt2lab.bench.export import format_benchmark

    result = {
        "runtime": "onnxruntime",
        "machine": {"cpu": "a CPU", "cores": 2, "threads": 2, "busy_share": 0.04, "busy_at_start": 0.02},
        "rows": {
            "forward, batch 1 x 128 tokens (ms)": {"pytorch": 200.0, "exported": 100.0},
            "greedy decoding, batch 1, 32 + 64 tokens (tokens/s)": {"pytorch": 36.0, "exported": 90.0},
        },
        "limits": {"pytorch": 40.0, "exported": 150.0},
    }
    text = format_benchmark(result)
    assert "load: other processes kept 2% of the" in text and "busy at the start, 4% at the end" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert rows[-2] == ["greedy decoding, batch 1, 32 + 64 tokens (tokens/s)", "36.0", "90.0", "2.50x"]
    assert rows[-1] == ["share of its bandwidth limit (limit in tokens/s)", "90% of 40", "60% of 150", ""]


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    ticks = iter([0.0, 0.5] * 3)  # every timed copy of 1 MB takes 0.5 s: 2 MB moved, 4 MB/s
    monkeypatch.setattr(machine, "perf_counter", lambda: next(ticks))
    assert machine.copy_bandwidth(nbytes=2**20, repeats=3) == pytest.approx(2 * 2**20 / 0.5)
