"""The Python API: train_model and load_preset compose the CLI's config tree, write the CLI's run directory, and
return the trained model."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import weakref

import pytest
import torch
import yaml
from conftest import TINY
from hydra.utils import execution_whitelist
from omegaconf import OmegaConf
from torch import nn

import gpt2lab.train.api
from gpt2lab import load_preset, train_model
from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.inference.generator import sample_text

QUIET = ["sample=null", "test=false"]


def test_a_preset_with_overrides_trains_into_the_cli_run_directory(compose_cfg, corpus_file, cache_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    handlers = logging.getLogger().handlers[:]
    tiny = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in TINY)}  # "8" -> 8, "false" -> False
    overrides = {**tiny, "data.path": corpus_file, "paths.cache_dir": str(cache_dir)}
    results = train_model(preset="tiny", overrides=overrides)

    run = results["run_dir"]
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", str(run.relative_to(tmp_path))), run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "config.yaml", "results.json"):
        assert (run / name).is_file(), name
    assert "preset=tiny" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert "Results in " in (run / "train.log").read_text()
    assert logging.getLogger().handlers == handlers  # the job's log handlers went with the job

    assert results["best_model_path"].startswith(str(run / "checkpoints"))
    assert results["final_metrics"]["val/loss"] < results["results"]["initial_val_loss"]
    assert results["results"] == json.loads((run / "results.json").read_text())
    text = sample_text(results["model"], results["tokenizer"], "def", max_new_tokens=8, temperature=0.8, top_k=50)
    assert text.startswith("def") and len(text) > 3

    # The config is the command line's for the same overrides
    cli = compose_cfg("preset=tiny")
    cli.paths.output_dir = str(run)
    assert OmegaConf.to_container(results["config"]) == OmegaConf.to_container(cli, resolve=True)


class Bigram(nn.Module):
    """Not a GPT-2: forward(idx) -> logits."""

    def __init__(self, vocab_size: int = 320, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab_size, dim), nn.Linear(dim, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(idx))


class WithDropout(Bigram):
    """A model with dropout that notes, at each forward pass with gradients (a training step), whether its
    dropout was on."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.dropout_on_in_training_steps = nn.Dropout(0.5), []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.dropout_on_in_training_steps.append(self.drop.training)
        return self.out(self.drop(self.embed(idx)))


def test_a_model_handed_over_in_eval_mode_trains_with_its_dropout(corpus_file, cache_dir, tmp_path):
    """Issue 27: transformers' from_pretrained returns its model in eval mode, and Lightning keeps a submodule's
    mode, so model=hf trained without dropout. Any model gpt2lab trains is in train mode in its training steps."""
    module = WithDropout().eval()
    overrides = ["tokenizer=bpe", "tokenizer.vocab_size=320", "tokenizer.show_progress=false",
                 "model.context_length=32", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "optimizer=adamw",
                 "trainer.enable_progress_bar=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                 *QUIET]  # fmt: skip
    train_model(model=module, dataset=corpus_file, max_steps=6, overrides=overrides)
    assert module.dropout_on_in_training_steps == [True] * 6  # validation after step 3 did not leave it off


def test_an_nn_module_object_trains_in_place(corpus_file, cache_dir, tmp_path, monkeypatch):
    module = Bigram()
    before = module.out.weight.detach().clone()
    overrides = ["tokenizer=bpe", "tokenizer.vocab_size=320", "tokenizer.show_progress=false",
                 "model.context_length=32", "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "optimizer=adamw",
                 "trainer.enable_progress_bar=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                 "optimizer.lr=1e-2", *QUIET]  # fmt: skip
    results = train_model(model=module, dataset=corpus_file, max_steps=12, overrides=overrides)

    assert results["model"].module is module and not torch.equal(module.out.weight, before)
    assert results["final_metrics"]["val/loss"] < results["results"]["initial_val_loss"]
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert config.data.source == "files" and config.data.path == str(corpus_file.resolve())
    assert config.trainer.max_steps == 12 and config.model.context_length == 32
    # Its checkpoint loads again in this session, into a copy (the object trained stays as it is), its class trusted
    # as any model=module class is
    with execution_whitelist("test_api.*"):
        reloaded, _ = load_checkpoint(results["best_model_path"])
    assert isinstance(reloaded.module, Bigram) and reloaded.module is not module
    assert torch.equal(reloaded.module.out.weight, module.out.weight)

    # In another session the key names nothing: the error says how to load the weights, and that works
    monkeypatch.setattr(gpt2lab.train.api, "_MODULES", weakref.WeakValueDictionary())
    with execution_whitelist("test_api.*"), pytest.raises(ConfigError, match="in another Python session") as refused:
        load_checkpoint(results["best_model_path"])
    assert "torch.load(ckpt, weights_only=True)" in str(refused.value)  # never advises running the file's code
    rebuilt = Bigram()
    state = torch.load(results["best_model_path"], weights_only=True)["state_dict"]
    rebuilt.load_state_dict({k.removeprefix("model.module."): v for k, v in state.items()})
    assert torch.equal(rebuilt.out.weight, module.out.weight)


def test_load_preset_composes_the_cli_tree_and_rejects_what_the_cli_rejects(train_cli, corpus_file, cache_dir,
                                                                            tmp_path):  # fmt: skip
    small = load_preset("small", **{"model.num_layers": 6})
    assert (small.model.num_layers, small.model.d_model, small.hydra.runtime.choices.preset) == (6, 768, "small")

    with pytest.raises(ConfigError) as refused:
        load_preset("tiny", **{"trainer.max_stepz": 3})
    cli = train_cli("trainer.max_stepz=3", cwd=tmp_path)
    assert cli.returncode == 1
    assert str(refused.value).startswith("Could not override 'trainer.max_stepz'.\nTo append to your config use")
    assert str(refused.value) in cli.stderr  # the same message, word for word

    # A config from load_preset, edited, runs as it is
    cfg = load_preset("tiny", [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", *QUIET,
                               f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    cfg.trainer.max_steps = 4
    results = train_model(cfg=cfg)
    assert results["results"]["global_step"] == 4 and OmegaConf.is_missing(cfg.hydra.runtime, "output_dir")  # untouched
    with pytest.raises(ConfigError, match=r"train_model\(cfg=\.\.\.\) runs that config as it is"):
        train_model(cfg=cfg, max_steps=3)


def test_import_gpt2lab_stays_light():
    """train_model and load_preset load Hydra, torch and Lightning on first use, not on ``import gpt2lab``."""
    code = "import sys, gpt2lab; print(sorted({'torch', 'hydra', 'pytorch_lightning'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert callable(gpt2lab.train_model) and callable(gpt2lab.load_preset)


@pytest.mark.parametrize("text", ["a\\nb", "it's", "ends with \\", "def f(x):", "C:\\data\\my.txt"])
def test_text_in_overrides_reaches_the_config_as_typed(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gpt2lab.train.api import _as_overrides

    (override,) = _as_overrides({"sample.prompt": text})
    assert OverridesParser.create().parse_override(override).value() == text
