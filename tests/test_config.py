import inspect
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import CONF, REPO, TINY
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from gpt2lab.config import TRUSTED_TARGETS, TrainerSchema

GROUPS = [
    "model",
    "data",
    "tokenizer",
    "trainer",
    "optimizer",
    "scheduler",
    "callbacks",
    "logger",
    "preset",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose_cfg, group, option):
    extra = {"data": ["data.path=x.txt", "data.name=x"], "tokenizer": ["tokenizer.path=t.json"]}.get(group, [])
    extra += {("model", "hf"): ["model.name_or_path=gpt2"], ("model", "module"): ["model.context_length=64"]}.get(
        (group, option), []
    )
    cfg = compose_cfg(f"{group}={option}", *extra, tiny=False)
    assert cfg.model._target_ and cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if option not in ("hf", "module"):  # GPT-2 sizes; model=hf and model=module take theirs from the model
        assert cfg.model.d_model > 0


def test_model_sizes_are_gpt2s(compose_cfg):
    sizes = {
        "gpt2": (768, 12, 12),
        "gpt2-medium": (1024, 16, 24),
        "gpt2-large": (1280, 20, 36),
        "gpt2-xl": (1600, 25, 48),
    }
    for name, (d, h, n) in sizes.items():
        m = compose_cfg(f"model={name}", "preset=small", tiny=False).model
        assert (m.d_model, m.num_heads, m.num_layers, m.d_ff, m.context_length) == (d, h, n, 4 * d, 1024)
        cfg = instantiate(m, vocab_size=50257, _execution_whitelist_=TRUSTED_TARGETS)
        assert cfg.dropout == 0.1 and cfg.layer_norm_epsilon == 1e-5 and cfg.use_bias


def test_presets_are_coherent_recipes(compose_cfg):
    tiny = compose_cfg(tiny=False)
    assert tiny.model.d_model < 512 and tiny.data.source == "pystdlib" and tiny.trainer.accelerator == "cpu"
    assert tiny.data.max_length == tiny.model.context_length
    assert tiny.scheduler.max_steps == tiny.trainer.max_steps
    small = compose_cfg("preset=small", tiny=False)
    assert small.model.d_model == 768 and small.trainer.precision == "bf16-mixed"
    assert small.compile is True  # a preset's top-level values win over train.yaml's
    # the command line wins over a preset's choices
    assert compose_cfg("preset=small", "data=wikitext2", tiny=False).data.config_name == "wikitext-2-raw-v1"
    assert compose_cfg("preset=small", "model=gpt2-medium", tiny=False).model.d_model == 1024


def test_every_lightning_trainer_argument_is_a_trainer_key(compose_cfg):
    args = {n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"}
    assert args <= set(TrainerSchema.__dataclass_fields__)
    cfg = compose_cfg("trainer.fast_dev_run=true", "trainer.limit_train_batches=10", "trainer.precision=bf16-mixed")
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.limit_train_batches == 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_layer=4", "Key 'num_layer' not in 'ModelSchema'"),
        ("trainer.max_step=4", "Key 'max_step' not in 'TrainerSchema'"),
        ("optimizer=adamw optimizer.learning_rate=1", "Key 'learning_rate' not in 'AdamWSchema'"),
        ("optimizer=muon optimizer.muon_lrr=1", "Key 'muon_lrr' not in 'MuonSchema'. Did you mean: 'muon_lr'?"),
        ("scheduler=wsd scheduler.decay_fractoin=1", "Key 'decay_fractoin' not in 'WSDSchema'"),
        ("model.num_layers=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(compose_cfg, override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_cfg(*override.split())
    text = str(info.value) + str(info.value.__cause__)
    assert message in text


def test_cli_rejects_a_typo_naming_the_key_before_reading_data(run_main, tmp_path):
    result = run_main("gpt2lab.train", "model.num_layer=4", cwd=tmp_path)
    assert result.returncode != 0
    assert "num_layer" in result.stderr and "Did you mean" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_bad_input_in_a_run_is_said_once_and_kept_in_its_log(run_main, tmp_path):
    """Issue 27 #9: each error was printed twice, as a logger [ERROR] line and as the Error: line."""
    result = run_main("gpt2lab.train", "model.num_heads=3", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 1
    assert (result.stdout + result.stderr).count("model.num_heads=3") == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: model.num_heads=3")
    assert "[ERROR] - model.num_heads=3" in (tmp_path / "run" / "train.log").read_text()


def test_ctrl_c_while_preparing_data_stops_without_a_traceback(run_main, tmp_path, corpus_file, monkeypatch):
    """Issue 27 #9: Ctrl-C during start-up or data preparation printed a KeyboardInterrupt traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gpt2lab.data.datamodule.load_corpus", interrupted)
    result = run_main("gpt2lab.train", *TINY, f"data.path={corpus_file}", cwd=tmp_path)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "Stopped: train was interrupted (Ctrl-C)."


def test_cli_unknown_group_option_lists_the_choices(run_main, tmp_path):
    result = run_main("gpt2lab.train", "model=gpt3", cwd=tmp_path)
    assert result.returncode != 0
    assert "model/gpt3" in result.stderr and "gpt2-tiny" in result.stderr


def test_cli_help_and_cfg(run_main, tmp_path):
    help_text = run_main("gpt2lab.train", "--help", cwd=tmp_path).stdout
    for group in ("model:", "data:", "tokenizer:", "trainer:", "preset:"):
        assert group in help_text
    assert "gpt2-xl" in help_text and "wikitext103" in help_text
    job = run_main("gpt2lab.train", "--cfg", "job", "model.num_layers=3", cwd=tmp_path).stdout
    assert "num_layers: 3" in job and "_target_: pytorch_lightning.Trainer" in job


def test_thin_train_script_and_console_script(tmp_path, monkeypatch, capsys):
    # The installed console script (next to this Python), in a real process
    script = Path(sys.executable).parent / "gpt2lab-train"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    help_text = result.stdout
    assert help_text.startswith("train is powered by Hydra.")
    assert "\nmodel: gpt2, gpt2-large, gpt2-medium, gpt2-tiny, gpt2-xl, hf, module\n" in help_text
    assert "\npreset: chat, code_generation, large, medium, small, summarization, tiny\n" in help_text
    config = help_text.split("== Config ==", 1)[1]  # conf/train.yaml as composed: its sections, then its own keys
    sections = {"model", "data", "tokenizer", "trainer", "optimizer", "scheduler", "callbacks", "logger", "seed"}
    assert sections <= set(re.findall(r"^(\w+):", config, re.MULTILINE))
    assert "  _target_: pytorch_lightning.Trainer\n" in config and "\noptimized_metric: val/loss\n" in config
    # train.py is the same command: its help is the console script's, word for word
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), "--help"])
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as ended:
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
    assert ended.value.code == 0 and capsys.readouterr().out == help_text


@pytest.mark.parametrize("text", [r"print('a\b')", "it's", "ends with \\", r"a\'b", "def f(n):", r"C:\dir\\file", "x"])
def test_a_prompt_on_the_command_line_reaches_the_config_as_typed(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gpt2lab.config import literal_overrides
    from gpt2lab.generate import quoted

    parser = OverridesParser.create()
    assert parser.parse_override(literal_overrides([f"prompt={text}"], ("prompt",))[0]).value() == text
    assert parser.parse_override(f"prompt={quoted(text)}").value() == text  # the torch-free path of generate onnx=
