"""``python -m gpt2lab.bench`` on CPU: the figures it reports, the reference beside them, and bad input."""

import json
import math
import sys

import pytest
from conftest import TINY
from hydra.core.global_hydra import GlobalHydra

from gpt2lab.bench.__main__ import main


def table_rows(out: str) -> list[list[str]]:
    """The cells of each row of the Markdown tables in ``out`` (header and rule left out)."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [row for row in rows if row[0] not in ("run", "model") and not set(row[0]) <= set("-:")]


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The cores as a quiet machine's (3% busy with others): pytest may share them, and the guard would wait."""
    from gpt2lab.bench import machine

    monkeypatch.setattr(machine, "busy_share", lambda: 0.03)


@pytest.fixture
def bench_args(corpus_file, cache_dir):
    GlobalHydra.instance().clear()
    yield [*TINY, "trainer=cpu", f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}"]
    GlobalHydra.instance().clear()


def test_bench_reports_each_micro_batch(bench_args, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*bench_args, "-b", "4", "8", "--steps", "3", "--warmup", "1", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["micro_batch"] for r in runs] == [4, 8]
    for r in runs:
        assert r["seq_len"] == 32 and r["accumulate"] == 1 and r["world_size"] == 1 and r["steps_timed"] == 3
        assert r["tokens_per_sec"] == pytest.approx(r["micro_batch"] * 32 / (r["step_ms"] / 1e3), rel=0.01)
        assert r["parameters"] > 0 and r["flops_per_token"] > 6 * r["parameters"] * 0.9
    printed = capsys.readouterr().out
    assert [row[:2] for row in table_rows(printed)] == [["gpt2lab x1", "4"], ["gpt2lab x1", "8"]]
    under_table = printed[printed.rindex("|\n") + 2 :]  # the load it was measured at, on the line under the table
    assert (
        under_table.startswith("load: other processes kept 3% of the ")
        and "busy at the start, 3% at the end" in under_table
    )
    assert json.loads(out.read_text())["busy_share"] == {"start": 0.03, "end": 0.03}


def test_bench_counts_accumulated_micro_batches_in_a_step(bench_args, tmp_path):
    out = tmp_path / "bench.json"
    # Overrides may follow -b's numbers directly.
    assert main(["-b", "4", *bench_args, "--accumulate", "2", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["accumulate"] == 2
    assert run["tokens_per_sec"] == pytest.approx(2 * 4 * 32 / (run["step_ms"] / 1e3), rel=0.01)


def test_bench_prints_the_reference_beside_gpt2lab(bench_args, tmp_path, capsys):
    # A stand-in for reference_step.py: same command line (B and STEPS in the environment), same JSON line.
    fake = tmp_path / "reference_step.py"
    fake.write_text(
        "import json, os, sys\n"
        "print(json.dumps(dict(matmul_bf16_tflops=1.0)))\n"
        "print(json.dumps(dict(name=sys.argv[1], B=int(os.environ['B']), params_M=1.0, step_ms=10.0,\n"
        "                      tok_s=10, mfu_989=0.5, warmup_s=1.0, peak_mem_GB=1.0)))\n"
    )
    assert main([*bench_args, "-b", "4", "--steps", "2", "--warmup", "1", "--reference", str(fake)]) == 0
    reference, ours = table_rows(capsys.readouterr().out)
    assert reference == ["reference nano_compile", "4", "1.0M", "10", "50.0%", "10.0", "1.0", "1.0", ""]
    assert ours[0] == "gpt2lab x1" and ours[-1].endswith("x")  # the ratio to the reference's tokens/s


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["modle.d_model=8"], "Did you mean: 'model'?"),
        (["-b", "0"], "--micro-batch must be at least 1"),
        (["--json", "/nonexistent/dir/bench.json"], "the directory /nonexistent/dir does not exist"),
        (["--reference", "/nonexistent/reference_step.py"], "--reference /nonexistent/reference_step.py: no such file"),
        (["trainer.devices=2", "-b", "4", "8"], "with several devices, measure one --micro-batch per invocation"),
        (["--memory"], "--memory measures GPU memory; this machine has no CUDA GPU"),
    ],
)
def test_bench_bad_input_gets_a_clear_error(bench_args, capsys, args, message):
    assert main([*bench_args, *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_runs_as_a_module(bench_args):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "gpt2lab.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--micro-batch" in result.stdout and "--memory" in result.stdout


def test_memory_search_fits_a_line_and_steps_down_on_out_of_memory(monkeypatch):
    """Static 2 GB + 0.5 GB per sequence on a 10 GB device: the line predicts 15, which runs out of
    memory here (as fragmentation can make it), so the search steps down 10% and confirms 13."""
    import torch

    from gpt2lab.bench import training as bench
    from gpt2lab.errors import ConfigError

    tried = []

    def fake_measure(overrides, micro_batch, steps, warmup, accumulate):
        tried.append(micro_batch)
        if micro_batch > 13:
            raise ConfigError("out of GPU memory") from torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"peak_mem_gb": 2.0 + 0.5 * micro_batch}

    monkeypatch.setattr(bench, "measure", fake_measure)
    row = bench.largest_micro_batch([], capacity_gb=10.0)
    assert row == {"largest_micro_batch": 13, "static_gb": 2.0, "activation_gb_per_sequence": 0.5}
    assert tried == [1, 2, 15, 13]


def test_gpt2lab_model_runs_in_the_reference_loop(bench_args, tmp_path, capsys):
    # A stand-in reference with the real script's interface: a module-level device and bench(name, model,
    # loss_fn, n_params) that times loss_fn on random tokens below 50257 and prints one JSON line.
    fake = tmp_path / "reference_step.py"
    fake.write_text(
        "import json, os, sys, torch\n"
        "dev = 'cpu'\n"
        "def bench(name, model, loss_fn, n_params):\n"
        "    x = torch.randint(0, 50257, (int(os.environ['B']), 8))\n"
        "    loss = loss_fn(x, x)\n"
        "    loss.backward()\n"
        "    print(json.dumps(dict(name=name, B=x.shape[0], params_M=n_params / 1e6, step_ms=1.0, tok_s=8,\n"
        "                          mfu_989=0.1, warmup_s=0.0, peak_mem_GB=0.0, loss=loss.item())))\n"
        "if __name__ == '__main__':\n"
        "    print(json.dumps(dict(name=sys.argv[1], B=int(os.environ['B']), params_M=1.0, step_ms=10.0,\n"
        "                          tok_s=10, mfu_989=0.5, warmup_s=1.0, peak_mem_GB=1.0)))\n"
    )
    out = tmp_path / "bench.json"
    args = [*bench_args, "model.vocab_size=50257", "-b", "2", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert main([*args, "--reference", str(fake), "--reference-variants", "nano_compile", "gpt2lab-model"]) == 0
    nano, ours = json.loads(out.read_text())["reference"]
    assert nano["name"] == "nano_compile" and ours["name"] == "gpt2lab-model" and ours["B"] == 2
    assert ours["loss"] == pytest.approx(math.log(50257), abs=0.5)  # the model the overrides describe, untrained
    assert ["reference gpt2lab-model", "2"] in [row[:2] for row in table_rows(capsys.readouterr().out)]


def test_reference_loop_refuses_a_vocabulary_below_the_references(tmp_path, corpus_file, cache_dir):
    import subprocess

    fake = tmp_path / "reference_step.py"
    fake.write_text("dev = 'cpu'\n")
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "model.vocab_size=320"]
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.bench.reference_loop", str(fake), *args], capture_output=True, text=True
    )
    assert result.returncode == 2 and "model.vocab_size=320: the reference's tokens need 50257" in result.stderr
