"""``python -m gpt2lab.generate``: continue prompts with a trained model, from the command line or Python."""

import json
import re
import subprocess
import sys

import pytest
import torch

from gpt2lab.inference.generator import TextGenerator, complete


@pytest.fixture
def generate_cli(run_main):
    """``python -m gpt2lab.generate ARGS``, run in this process (the first test starts a real one)."""

    def _generate(*args: str, cwd) -> subprocess.CompletedProcess:
        return run_main("gpt2lab.generate", *args, cwd=cwd)

    return _generate


def test_a_prompt_as_typed_in_a_shell_streams_its_continuation(generate_cli, trained_run, tmp_path):
    # prompt="def fibonacci(n):" reaches the program without its quotes; the parentheses must not trip Hydra.
    args = [f"ckpt={trained_run}", "prompt=def fibonacci(n):", "inference.max_new_tokens=12", "inference.seed=3"]
    first = subprocess.run(
        [sys.executable, "-m", "gpt2lab.generate", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("def fibonacci(n):") and len(first.stdout) > len("def fibonacci(n):\n")
    assert generate_cli(*args, cwd=tmp_path).stdout == first.stdout  # a seed makes it reproducible


def test_prompts_file_with_several_sequences_each_written_to_output(generate_cli, trained_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("import os\n\nclass Foo:\n")
    out = tmp_path / "new" / "samples.jsonl"  # its directory is made
    result = generate_cli(
        f"ckpt={trained_run}", "prompts_file=prompts.txt", "inference.num_return_sequences=3",
        "inference.max_new_tokens=8", f"output={out}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["prompt"], s["sequence"]) for s in samples] == [
        ("import os", 0), ("import os", 1), ("import os", 2), ("class Foo:", 0), ("class Foo:", 1), ("class Foo:", 2)
    ]  # fmt: skip
    assert all(s["settings"]["max_new_tokens"] == 8 for s in samples)
    assert "--- 'class Foo:' [2]" in result.stdout


def test_stop_strings_and_end_of_text_end_a_completion(trained_run):
    generator = TextGenerator(str(trained_run), device="cpu")
    settings = {"max_new_tokens": 60, "do_sample": False, "repetition_penalty": 1.0}
    (free,) = generator.generate_text("def", settings, out=None)
    assert len(free) > 2
    stop = free[1:3]  # a string the greedy completion contains
    (stopped,) = generator.generate_text("def", settings | {"stop": [stop]}, out=None)
    assert stopped == free[: free.index(stop)]


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 has no force_eager stance")
def test_a_model_compiled_for_training_decodes_without_compiling_again(trained_run):
    # compile: true compiles the model in place; the end-of-run sample and callbacks.samples decode with it, and
    # each decoding shape (the prompt, the one-token step) would be compiled anew: over a minute on a GPU
    from torch._dynamo.utils import counters

    generator = TextGenerator(str(trained_run), device="cpu")
    model, window = generator.model, torch.randint(0, 100, (2, generator.model.config.context_length))
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="eager")  # dynamo's capture without inductor: what is counted is the same
    model(window, window)
    assert counters["stats"]["unique_graphs"] == 1
    (text,) = complete(model, generator.tokenizer, ["def"], {"max_new_tokens": 5, "do_sample": False})
    assert text and counters["stats"]["unique_graphs"] == 1
    model(window, window)  # training goes on with its graph
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prompt="], "the prompt is empty"),
        ([], 'no prompt: give prompt="..." or prompts_file='),
        (["prompts_file=missing.txt"], "prompts_file='missing.txt': no such file"),
        (["prompts_file=empty.txt"], "prompts_file='empty.txt' has no prompts"),
        (["prompt=x", "inference.top_p=1.5"], r"inference.top_p=1.5: expected in \(0, 1\]"),
        (["prompt=x", "inference.top_p=0"], r"inference.top_p=0.0: expected in \(0, 1\]"),
        (["prompt=x", "inference.top_k=0"], "inference.top_k=0: expected at least 1, or null"),
        (["prompt=x", "inference.temperature=0"], "inference.temperature=0.0: expected > 0 when sampling"),
        (["prompt=x", "inference.max_new_tokens=0"], "inference.max_new_tokens=0: expected at least 1"),
        (["prompt=x", "ckpt=last", "paths.log_dir=nowhere"], "ckpt=last: no run under nowhere/"),
        (["prompt=x", "device=foo"], "device='foo' cannot be used here .*use device=auto"),
        (["prompt=x", "output=empty.txt/x.jsonl"], "output='empty.txt/x.jsonl' cannot be written"),
        (["prompt=x", "output=."], "output='.' is a directory: name a file"),
    ],
)
def test_bad_input_is_one_error_line(generate_cli, trained_run, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    ckpt = [] if any(a.startswith("ckpt=") for a in args) else [f"ckpt={trained_run}"]
    result = generate_cli(*ckpt, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert re.search("Error: " + message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_greedy_decoding_needs_no_temperature(generate_cli, trained_run, tmp_path):
    args = [f"ckpt={trained_run}", "prompt=def", "inference.do_sample=false", "inference.max_new_tokens=8"]
    zero = generate_cli(*args, "inference.temperature=0", cwd=tmp_path)
    assert zero.returncode == 0, zero.stderr[-3000:]
    one = generate_cli(*args, "inference.temperature=1", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert zero.stdout.startswith("def") and len(zero.stdout) > len("def\n")
    assert zero.stdout == one.stdout  # greedy: the temperature changes nothing


def test_the_samples_callback_writes_every_nth_validation(train_cli, tmp_path, corpus_file, cache_dir):
    from conftest import TINY

    run = tmp_path / "run"
    result = train_cli(
        *TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
        "callbacks.samples.every_n_validations=2", "callbacks.samples.prompts=[import,class]", "test=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    # validations at steps 4 and 8 (trainer.val_check_interval=4): the second one writes, with its step
    assert [(s["step"], s["prompt"]) for s in samples] == [(8, "import"), (8, "class")]
    assert all(s["completion"] for s in samples)


def test_a_multirun_generates_once_per_setting(generate_cli, trained_run, tmp_path):
    result = generate_cli(
        "-m", f"ckpt={trained_run}", "prompt=def", "inference.temperature=0.5,1.0", "inference.max_new_tokens=4",
        "inference.seed=0", "output=samples.jsonl", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Each job appends its one sample to output= and has its own run directory with its log.
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["settings"]["temperature"]) for s in samples] == [("def", 0.5), ("def", 1.0)]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert "Appended 1 samples to samples.jsonl" in (tmp_path / "sweep" / job / "generate.log").read_text()
    assert result.stdout == "".join(f"def{s['completion']}\n" for s in samples)  # each job printed its own
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # the sweep summary: nothing to optimise here


def test_one_stop_string_is_taken_as_a_list_of_one(generate_cli, trained_run, tmp_path):
    """Issue 27 #10: inference.stop='\\n' was refused ("str is not a ListConfig"); one tag is one tag too."""
    args = [f"ckpt={trained_run}", "prompt=def", "inference.max_new_tokens=40", "inference.do_sample=false"]
    free = generate_cli(*args, "inference.repetition_penalty=1.0", cwd=tmp_path)
    assert free.returncode == 0, free.stderr[-3000:]
    stop = free.stdout[4:6]  # what the greedy continuation holds after "def "
    one = generate_cli(*args, "inference.repetition_penalty=1.0", f"inference.stop={stop!r}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.rstrip("\n") == free.stdout[: free.stdout.index(stop, 4)].rstrip("\n")
    wrong = generate_cli(*args, "inference.stop=[1,2]", cwd=tmp_path)
    assert (
        wrong.returncode == 1 and "inference.stop=" in wrong.stderr and "a string or a list of strings" in wrong.stderr
    )
