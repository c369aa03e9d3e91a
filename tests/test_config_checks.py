"""validate_config: impossible settings found before any work, all of them at once, by train.py and the wizard."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import execution_whitelist, instantiate

from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.errors import ConfigError
from gpt2lab.train.checks import validate_config


def test_the_default_tiny_config_passes(compose_cfg):
    assert validate_config(compose_cfg()) == (True, [])


def test_every_problem_is_reported_at_once_and_train_py_stops_with_all_of_them(compose_cfg, train_cli, tmp_path):
    bad = ["model.num_heads=3", "model.vocab_size=100", "trainer.accumulate_grad_batches=0", "optimizer.lr=-1",
           "float32_matmul_precision=fastest"]  # fmt: skip
    ok, errors = validate_config(compose_cfg(*bad))
    assert not ok and len(errors) == 5, errors
    for expected in (
        "model.num_heads=3 does not divide model.d_model=32",
        "tokenizer vocabulary (320) is larger than model.vocab_size (100)",
        "trainer.accumulate_grad_batches=0: expected a whole number of micro-batches",
        "optimizer.lr=-1.0: expected a positive learning rate",
        "float32_matmul_precision='fastest': expected highest, high or medium",
    ):
        assert any(expected in e for e in errors), (expected, errors)

    result = train_cli("data=files", "data.path=/nonexistent.txt", *bad, f"hydra.run.dir={tmp_path / 'run'}",
                       cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "Error: 5 problems in the config:\n  - " in result.stderr and "does not divide" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing was built: not even the data was read


@pytest.mark.parametrize("steps", [0, -2])
def test_a_run_of_no_steps_is_refused_naming_the_key(compose_cfg, steps):
    """Issue 27 #15: trainer.max_steps=0 tested and sampled an untrained model and reported the run finished."""
    ok, errors = validate_config(compose_cfg(f"trainer.max_steps={steps}"))
    assert not ok and errors[0].startswith(f"trainer.max_steps={steps}: expected a positive number of optimizer steps")


def test_the_context_is_checked_against_known_token_counts_as_the_data_module_checks_it(compose_cfg):
    cfg = compose_cfg("model.context_length=512")
    ok, errors = validate_config(cfg, {"train": 100_000, "validation": 400, "test": 400})
    assert not ok and errors == [
        "the validation split has 400 tokens, too few for one window of 513 (model.context_length + 1): lower "
        "model.context_length below 399, or add data, or raise data.val_split"
    ]
    assert validate_config(cfg, {"train": 100_000, "validation": 513})[0]  # one window exactly
    assert validate_config(cfg)[0]  # token counts unknown: left to the data module

    # The same verdict as the data module's, on the tokens it counted
    with execution_whitelist(TRUSTED_TARGETS):
        datamodule = instantiate(cfg.data, tokenizer=instantiate(cfg.tokenizer))
    datamodule.prepare_data()
    tokens = datamodule.stats["validation"]["tokens"]
    too_long = compose_cfg(f"model.context_length={tokens}")
    ok, errors = validate_config(too_long, {s: v["tokens"] for s, v in datamodule.stats.items()})
    assert not ok and errors[0].startswith(f"the validation split has {tokens:,} tokens, too few")
    with execution_whitelist(TRUSTED_TARGETS):
        datamodule = instantiate(too_long.data, tokenizer=instantiate(too_long.tokenizer))
    with pytest.raises(ConfigError, match="the validation split has .* too few for one training window"):
        datamodule.setup()


def test_the_train_split_must_hold_a_batch_for_every_device(compose_cfg):
    cfg = compose_cfg("data.batch_size=8", "trainer.devices=2", "trainer.accelerator=cpu")
    ok, errors = validate_config(cfg, {"train": 33 * 10 + 1, "validation": 1000})  # 10 windows of 33 tokens
    assert (
        not ok and "makes 10 windows of 33 tokens, fewer than one batch of data.batch_size=8 x 2 devices" in errors[0]
    )
    assert validate_config(cfg, {"train": 33 * 16 + 1, "validation": 1000})[0]


def test_bf16_on_a_gpu_without_it_is_refused(compose_cfg, monkeypatch):
    cfg = compose_cfg("trainer.accelerator=gpu", "trainer.precision=bf16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    ok, errors = validate_config(cfg)
    assert errors == [
        "trainer.precision=bf16-mixed: this GPU (Tesla V100-SXM2-16GB) has no bfloat16 support; use "
        "trainer.precision=16-mixed (or 32-true)"
    ]
    assert validate_config(compose_cfg("trainer.accelerator=gpu", "trainer.precision=16-mixed"))[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert validate_config(cfg)[0]
