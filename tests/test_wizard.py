"""The setup wizard: driven through a terminal as a person would, refused answers asked again with the reason; the
same answers as flags write the same file; the file is the run train.py then trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli_env
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gpt2lab.config import config_tree, register_schemas
from gpt2lab.wizard.__main__ import main
from gpt2lab.wizard.questions import Session

FLAGS = ["--preset", "tiny", "--data", "files", "--tokenizer", "bpe", "--vocab-size", "320", "--model", "gpt2-tiny",
         "--context-length", "64", "--trainer", "cpu", "--precision", "32-true", "--batch-size", "8", "--accumulate",
         "2", "--optimizer", "muon", "--muon-lr", "0.03", "--lr", "0.004", "--scheduler", "wsd", "--decay-fraction", "0.25",
         "--warmup-steps", "5", "--max-steps", "20"]  # fmt: skip


def answer(child: Any, prompt: str, reply: str) -> None:
    """Wait for the prompt in the terminal (a pexpect child), then type the reply and Enter."""
    child.expect_exact(prompt)
    child.sendline(reply)


@pytest.mark.slow
def test_in_a_terminal_the_wizard_asks_refuses_with_the_reason_and_writes_the_flags_file(corpus_file, cache_dir,
                                                                                        tmp_path):  # fmt: skip
    pexpect = pytest.importorskip("pexpect")  # the dev extra has it
    typed = tmp_path / "typed"
    child = pexpect.spawn(
        sys.executable, ["-m", "gpt2lab.wizard", "--config-dir", str(typed)], cwd=str(tmp_path),
        env=cli_env({"GPT2LAB_CACHE_DIR": str(cache_dir), "COLUMNS": "200"}), encoding="utf-8", timeout=60,
    )  # fmt: skip
    child.logfile_read = (tmp_path / "session.txt").open("w")
    answer(child, "Start from which preset?", "tiny")
    child.expect_exact("Step 1/5 · Dataset")
    answer(child, "Dataset (a conf/data option)", "files")
    answer(child, "Path to your text", "/nonexistent/corpus.txt")
    child.expect_exact("✗ data.path='/nonexistent/corpus.txt': no such file or directory")
    answer(child, "Path to your text", str(corpus_file))  # asked again
    child.expect_exact("Step 2/5 · Tokenizer")
    answer(child, "Tokenizer", "bpe")
    answer(child, "Vocabulary size", "320")
    child.expect(r"Tokens: train [\d,]+, validation ([\d,]+)")
    validation_tokens = int(child.match.group(1).replace(",", ""))
    child.expect_exact("Step 3/5 · Model check")
    answer(child, "Model size", "gpt2-tiny")
    answer(child, "Context length (tokens) [128]", str(validation_tokens))  # no window fits the validation split
    child.expect_exact(f"the validation split has {validation_tokens:,} tokens, too few for one window")
    answer(child, "Context length (tokens) [128]", "64")
    answer(child, "Run the model check-up now", "")  # Enter: yes, for a model this small
    child.expect_exact("at batch 1 x 64 on cpu")  # tier 1, shortened: one sequence per probe
    child.expect_exact("Model check-up passed in ")
    child.expect_exact("Step 4/5 · Training parameters")
    answer(child, "Trainer (devices)", "")  # the preset's: cpu
    answer(child, "Precision", "")
    answer(child, "Micro-batch size", "eight")
    child.expect_exact("✗ 'eight' is not a whole number")
    answer(child, "Micro-batch size", "8")
    answer(child, "Gradient accumulation", "2")
    answer(child, "Optimizer (adamw, muon) [muon]", "muon")
    answer(child, "Muon's peak learning rate (attention and MLP matrices) [0.02]", "0.03")
    answer(child, "Peak learning rate (with muon: AdamW's, for embeddings and norms) [0.005]", "0.004")
    answer(child, "Learning-rate schedule", "wsd")
    answer(child, "Fraction of the steps that decays [0.3]", "0.25")
    answer(child, "Warmup steps", "5")
    answer(child, "Optimizer steps", "20")
    child.expect_exact("Step 5/5 · Validation and summary")
    child.expect_exact("training   20 steps of 1,024 tokens (8 x 2 x 1 x 64)")
    answer(child, "Experiment name:", "my run")
    child.expect_exact("✗ name 'my run': use letters, digits")
    answer(child, "Experiment name:", "my_run")
    child.expect_exact("Train with: python train.py experiment=my_run")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    flags = tmp_path / "flags"
    main([*FLAGS, "--data-path", str(corpus_file), "--name", "my_run", "--config-dir", str(flags)])
    assert (flags / "experiment" / "my_run.yaml").read_text() == (typed / "experiment" / "my_run.yaml").read_text()


def test_typed_answers_are_checked_on_the_spot_and_write_the_flags_file(corpus_file, cache_dir, tmp_path,
                                                                       monkeypatch, capsys):  # fmt: skip
    """The questions in order, as input() gets them; a refused answer is asked again after its reason."""
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(cache_dir))
    script = [
        ("Start from which preset?", "tiny"), ("Dataset (a conf/data option)", "files"),
        ("Path to your text", "/nonexistent/corpus.txt"), ("Path to your text", str(corpus_file)),
        ("Tokenizer (", "bpe"), ("Vocabulary size [1024]", "320"), ("Model size", "gpt2-tiny"),
        ("Context length (tokens) [128]", "100000"), ("Context length (tokens) [128]", "64"),
        ("Run the model check-up now", "n"), ("Trainer (devices)", ""), ("Precision", ""),
        ("Micro-batch size", "eight"), ("Micro-batch size", "8"), ("Gradient accumulation", "2"),
        ("Optimizer (", "muon"), ("Muon's peak learning rate (attention and MLP matrices) [0.02]", "0.03"), ("Peak learning rate (with muon", "0.004"),
        ("Learning-rate schedule", "wsd"), ("Fraction of the steps that decays [0.3]", "-1"),
        ("Fraction of the steps that decays [0.3]", "0.25"), ("Warmup steps [50]", "5"), ("Optimizer steps [680]", "20"),
        ("Experiment name", "my_run"),
    ]  # fmt: skip
    replies = iter(script)

    def typed(prompt: str) -> str:
        expected, reply = next(replies)
        assert expected in prompt, (expected, prompt)
        return reply

    monkeypatch.setattr("builtins.input", typed)
    main(["--config-dir", str(tmp_path / "typed")])
    assert next(replies, None) is None
    out = capsys.readouterr().out
    assert "✗ data.path='/nonexistent/corpus.txt': no such file or directory" in out
    assert "too few for one window of 100001 (model.context_length + 1)" in out
    assert "✗ 'eight' is not a whole number" in out
    assert "✗ scheduler.decay_fraction=-1.0: expected the fraction of trainer.max_steps to decay over" in out

    # The same answers as flags: the same file, byte for byte
    flags = tmp_path / "flags"
    main([*FLAGS, "--data-path", str(corpus_file), "--name", "my_run", "--config-dir", str(flags)])
    written = (tmp_path / "typed" / "experiment" / "my_run.yaml").read_text()
    assert (flags / "experiment" / "my_run.yaml").read_text() == written
    assert "- override /data: files\n" in written and f"path: {corpus_file}\n" in written
    assert "- override /optimizer: muon\n" in written and "muon_lr: 0.03\n" in written
    assert "- override /scheduler: wsd\n" in written and "decay_fraction: 0.25\n" in written

    # An experiment of that name is not replaced, unless --force
    with pytest.raises(SystemExit) as refused:
        main([*FLAGS, "--data-path", str(corpus_file), "--name", "my_run", "--config-dir", str(flags)])
    assert refused.value.code == 1 and "exists: choose another name, or pass --force" in capsys.readouterr().err
    main([*FLAGS, "--data-path", str(corpus_file), "--batch-size", "4", "--name", "my_run", "--force",
                 "--config-dir", str(flags)])  # fmt: skip
    assert "batch_size: 4\n" in (flags / "experiment" / "my_run.yaml").read_text()


def test_a_flag_the_config_refuses_stops_with_the_reason(corpus_file, tmp_path, run_main):
    result = run_main("gpt2lab.cli", "wizard", *FLAGS, "--data-path", str(corpus_file), "--max-steps", "-3",
                      "--name", "x", "--config-dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "Error: --max-steps=-3: " in result.stderr, result.stderr
    assert not (tmp_path / "experiment" / "x.yaml").exists()


def test_train_py_runs_the_experiment_the_wizard_wrote(corpus_file, cache_dir, tmp_path, train_cli, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(cache_dir))
    conf = tmp_path / "conf"
    main([*FLAGS, "--data-path", str(corpus_file), "--name", "wizard_run", "--config-dir", str(conf)])
    searchpath = f"hydra.searchpath=[file://{conf}]"

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), job_name="train"):
        cfg = compose("train", overrides=["experiment=wizard_run", searchpath])
    GlobalHydra.instance().clear()
    chosen = (cfg.data.source, cfg.data.path, cfg.tokenizer.kind, cfg.tokenizer.vocab_size, cfg.model.d_model,
              cfg.model.context_length, cfg.trainer.accelerator, cfg.data.batch_size,
              cfg.trainer.accumulate_grad_batches, cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.trainer.max_steps)  # fmt: skip
    assert chosen == ("files", str(corpus_file), "bpe", 320, 128, 64, "cpu", 8, 2, 0.004, 5, 20)

    run = tmp_path / "run"
    result = train_cli("experiment=wizard_run", searchpath, "trainer.max_steps=4", "trainer.val_check_interval=4",
                       "trainer.limit_val_batches=2", "test=false", "sample=null", f"hydra.run.dir={run}",
                       "trainer.enable_progress_bar=false", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["global_step"] == 4
    assert Path(json.loads((run / "results.json").read_text())["best_checkpoint"]).is_file()


@pytest.mark.parametrize("path", [r"C:\data\my file.txt", "my data/a=b.txt", "it's.txt", "plain/path.txt"])
def test_an_answer_reaches_the_config_as_typed(path):
    # a Windows path's backslashes, spaces, = and quotes: the config the checks see holds the path typed
    with config_tree():
        cfg = Session("tiny", {"data.path": path}).compose()
    assert cfg.data.path == path


def test_the_preset_list_shows_each_description_whole(monkeypatch, capsys):
    """The first question lists the presets with their descriptions wrapped at word boundaries, none cut short
    (the chat preset's was cut to 'no_robo')."""
    from gpt2lab.presets.catalog import read_header
    from gpt2lab.wizard.wizard import ask_preset

    presets = ["chat", "code_generation", "summarization", "tiny"]
    monkeypatch.setattr("builtins.input", lambda prompt: "chat")
    assert ask_preset(presets) == "chat"
    lines = capsys.readouterr().out.splitlines()
    listed = " ".join(lines[1:]).split()
    for preset in presets:
        words = [preset, *read_header(preset).description.split()]
        start = listed.index(preset)
        assert listed[start : start + len(words)] == words  # every word, whole and in order
    assert "(no_robots)," in listed and all(len(line) <= 100 for line in lines)
