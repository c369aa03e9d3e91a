"""``python -m gpt2lab.check``: the model check-up catches planted faults and passes a healthy model."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt2lab.check.__main__
from gpt2lab.checkup import CheckConfig, failed, run_all_tests, run_all_tier1_tests, run_all_tier2_tests
from gpt2lab.model import DecoderBlock, GPT2Config, GPT2Model

TINY = dict(vocab_size=96, context_length=32, d_model=32, num_heads=2, num_layers=2, d_ff=64)
TINY |= dict(dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
FAST = CheckConfig(
    batch_sizes=[1, 2], probe_length=16, batch_size=2, throughput_seconds=0.05, perturbations=4,
    finetune_steps=10, lr_trial_steps=3,
)  # fmt: skip
FAST_OVERRIDES = [f"model.{k}={v}" for k, v in TINY.items()] + [
    "check.batch_sizes=[1,2]", "check.probe_length=16", "check.throughput_seconds=0.05", "check.finetune_steps=10",
    "check.lr_trial_steps=3", "check.perturbations=4",
]  # fmt: skip


def tiny_model(model_class: type[GPT2Model] = GPT2Model) -> GPT2Model:
    torch.manual_seed(0)
    return model_class(GPT2Config(**TINY))


def statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def check_main(*args: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """``python -m gpt2lab.check ARGS`` in this process, writing to ``run_dir``; its exit status."""
    monkeypatch.setattr(sys, "argv", ["check", *args, f"hydra.run.dir={run_dir}"])
    try:
        gpt2lab.check.__main__.main()
    except SystemExit as e:
        return e.code
    return 0


def test_a_healthy_tiny_model_passes_all_three_tiers(tmp_path):
    model = tiny_model()
    results = run_all_tests(model, FAST, tier=3, output_dir=tmp_path)
    assert not failed(results), [(r.name, r.summary) for r in results if r.status == "fail"]
    assert [r.tier for r in results] == [1] * 8 + [2] * 3 + [3] * 2
    assert all(statuses(results)[name] == "pass" for name in ("gradient flow", "causality", "loss at init"))
    assert statuses(results)["attention patterns"] == "pass"  # the hooked probabilities reproduce SDPA's output
    files = [f for r in results for f in r.files]
    assert "attention/layer1.png" in files and "saliency.png" in files and "training/lr_search.png" in files
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
    finetune = next(r for r in results if r.name == "fine-tuning")
    assert finetune.details["loss_after"] < 0.95 * finetune.details["loss_before"]

    # What each check measured, beyond its verdict
    details = {r.name: r.details for r in results}
    shapes = details["shape robustness"]
    assert shapes["shapes"] == [[b, t] for b in (1, 2) for t in (1, 17, 32)]  # lengths 1, context/2 + 1, context
    assert shapes["length 33"] == "refused (ValueError)"
    assert len(details["gradient flow"]["grad_norms"]) == len(list(model.parameters()))
    assert details["loss at init"]["ln_vocab"] == pytest.approx(math.log(96))
    init = details["init statistics"]["per_layer_type"]
    assert init["blocks.*.attn.qkv.weight"]["expected_std"] == 0.02
    assert init["blocks.*.attn.proj.weight"]["expected_std"] == pytest.approx(0.02 / math.sqrt(2 * 2))  # residual
    memory = details["memory footprint"]
    assert memory["parameters"] == memory["gradients"] == 4 * model.num_parameters()  # fp32, no frozen layer
    assert memory["adamw_state"] == 2 * memory["parameters"] and memory["activations"] > 0
    assert memory["total"] == sum(memory[k] for k in ("parameters", "gradients", "adamw_state", "activations"))
    assert details["forward tokens/s"]["tokens_per_s"] > 0 and details["forward tokens/s"]["batch"] == [2, 32]
    entropy = details["attention patterns"]["normalised_entropy"]
    assert len(entropy) == 2 and all(len(heads) == 2 and all(0.9 < e <= 1 for e in heads) for heads in entropy)
    assert sum(details["feature attribution"]["share"]) == pytest.approx(1.0)
    assert len(details["perturbation sensitivity"]["total_variation"]) == FAST.perturbations
    assert len(details["learning-rate search"]["final_loss"]) == 4 and details["learning-rate search"]["best_lr"] > 0


def test_a_layer_frozen_by_mistake_is_caught():
    model = tiny_model()
    model.blocks[1].mlp.fc.weight.requires_grad_(False)
    settings = dataclasses.asdict(FAST)  # the settings also as a dict, as conf/check.yaml's check section
    (flow,) = [r for r in run_all_tier1_tests(model, settings) if r.name == "gradient flow"]
    assert flow.status == "fail"
    assert "frozen" in flow.summary and "blocks.1.mlp.fc.weight" in flow.summary


class NaNInit(GPT2Model):
    """An initialisation bug: the first MLP's weights scaled by infinity (0 x inf = NaN, the rest Inf)."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and module.out_features == TINY["d_ff"]:
            module.weight.mul_(float("inf"))


def test_a_nan_producing_initialisation_is_caught():
    results = statuses(run_all_tier1_tests(tiny_model(NaNInit), FAST))
    for name in ("init statistics", "output stability", "loss at init", "gradient flow"):
        assert results[name] == "fail", name


def test_attention_that_sees_the_future_is_caught(monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **(kw | {"is_causal": False})))
    model = tiny_model()
    (causality,) = [r for r in run_all_tier1_tests(model, FAST) if r.name == "causality"]
    assert causality.status == "fail" and "sees the future" in causality.summary
    # Tier 2's causal probabilities no longer reproduce what the layer computes: the heatmaps say so.
    (attention,) = [r for r in run_all_tier2_tests(model, FAST) if r.name == "attention patterns"]
    assert attention.status == "warn" and "not causal softmax" in attention.summary


def test_a_residual_branch_that_is_never_added_is_caught(monkeypatch):
    def forward(self, x, cache=None, layer=0):
        self.attn(self.ln_1(x), cache, layer)  # computed, never added to the stream
        return x + self.mlp(self.ln_2(x))

    monkeypatch.setattr(DecoderBlock, "forward", forward)
    (flow,) = [r for r in run_all_tier1_tests(tiny_model(), FAST) if r.name == "gradient flow"]
    assert flow.status == "fail"
    assert "no gradient" in flow.summary and "blocks.0.attn.qkv.weight" in flow.summary


def test_check_writes_the_table_and_reports(monkeypatch, tmp_path, capsys):
    assert check_main(*FAST_OVERRIDES, "tier=2", run_dir=tmp_path, monkeypatch=monkeypatch) == 0
    table = capsys.readouterr().out
    assert "Tier 1: critical" in table and "Tier 2: analysis" in table and "causality" in table
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["failed"] == [] and len(report["results"]) == 11
    assert report["about"]["model"] == "gpt2-tiny"
    markdown = (tmp_path / "check.md").read_text()
    assert re.search(r"^\| causality +\| pass +\|", markdown, re.M), markdown
    assert "![attention/layer0.png](attention/layer0.png)" in markdown


def test_a_checkpoint_skips_the_loss_at_init(monkeypatch, tmp_path, trained_run):
    assert (
        check_main(f"ckpt={trained_run}", "check.throughput_seconds=0.05", run_dir=tmp_path, monkeypatch=monkeypatch)
        == 0
    )
    results = {r["name"]: r for r in json.loads((tmp_path / "check.json").read_text())["results"]}
    assert results["loss at init"]["status"] == "skip" and "trained checkpoint" in results["loss at init"]["summary"]


def test_a_failed_check_ends_in_an_error_line_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(DecoderBlock, "forward", lambda self, x, cache=None, layer=0: x + self.mlp(self.ln_2(x)))
    assert check_main(*FAST_OVERRIDES, run_dir=tmp_path, monkeypatch=monkeypatch) == 1
    assert "Error: failed checks: gradient flow" in capsys.readouterr().err
    assert json.loads((tmp_path / "check.json").read_text())["failed"] == ["gradient flow"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tier=0", "tier=0: expected 1, 2 or 3"),
        ("tier=4", "tier=4: expected 1, 2 or 3"),
        ("ckpt=missing.ckpt", "ckpt='missing.ckpt': no such file"),
        ("check.probe_length=0", "check.probe_length=0: expected positive values"),
    ],
)
def test_bad_input_is_one_error_line(monkeypatch, tmp_path, capsys, override, message):
    assert check_main(override, run_dir=tmp_path, monkeypatch=monkeypatch) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {message}"), errors
    assert not (tmp_path / "check.json").exists()


def test_the_command_line_writes_its_reports_to_a_run_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.check", *FAST_OVERRIDES],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Tier 1: critical" in result.stdout and "gradient flow" in result.stdout
    (report,) = (tmp_path / "outputs" / "check").glob("*/*/check.md")  # the default run directory
    assert (report.parent / "check.json").is_file() and (report.parent / "check.log").is_file()


class CausalBag(nn.Module):
    """A model=module of one's own: each position sees the mean of the embeddings up to it."""

    def __init__(self, vocab_size: int = 96, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab_size, dim), nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        seen = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return self.out(x + self.context(x) / seen)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class PeekingBag(CausalBag):
    """The same, summing from the end: every position sees the tokens after it."""

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1).cumsum(1).flip(1)


def test_a_model_of_your_own_is_checked_through_its_logits(tmp_path):
    from gpt2lab.model.adapter import CausalLM

    torch.manual_seed(0)
    results = run_all_tests(CausalLM(CausalBag(), context_length=32), FAST, tier=3, output_dir=tmp_path)
    assert not failed(results), [(r.name, r.summary) for r in results if r.status == "fail"]
    found = statuses(results)
    assert found["attention patterns"] == "skip"  # read from gpt2lab's attention layers, which it has none of
    assert all(
        found[name] == "pass" for name in ("gradient flow", "causality", "feature attribution", "learning-rate search")
    )
    shapes = next(r for r in results if r.name == "shape robustness")
    assert "logits (B, T, 96)" in shapes.summary  # its vocabulary, read from its logits
    (causality,) = [
        r for r in run_all_tier1_tests(CausalLM(PeekingBag(), context_length=32), FAST) if r.name == "causality"
    ]
    assert causality.status == "fail" and "sees the future" in causality.summary


def test_model_module_from_the_command_line(monkeypatch, tmp_path, capsys):
    from hydra.utils import execution_whitelist

    module = ["model=module", "model.module._target_=test_check.CausalBag", "model.context_length=32"]
    with execution_whitelist("test_check.*"):
        status = check_main(*module, *FAST_OVERRIDES[len(TINY) :], "tier=2", run_dir=tmp_path, monkeypatch=monkeypatch)
    assert status == 0, capsys.readouterr().err[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["about"]["model"] == "module" and report["about"]["config"]["module"]["_target_"].endswith(
        "CausalBag"
    )
    found = {r["name"]: r["status"] for r in report["results"]}
    assert found["causality"] == "pass" and found["attention patterns"] == "skip"


def test_model_hf_is_checked_as_training_builds_it(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    config.save_pretrained(tmp_path / "llama")
    model = [
        "model=hf",
        f"model.name_or_path={tmp_path / 'llama'}",
        "model.pretrained=false",
        "model.context_length=32",
    ]
    run = tmp_path / "check"
    assert check_main(*model, *FAST_OVERRIDES[len(TINY) :], run_dir=run, monkeypatch=monkeypatch) == 0
    results = {r["name"]: r for r in json.loads((run / "check.json").read_text())["results"]}
    assert all(r["status"] == "pass" for r in results.values())
    assert "logits (B, T, 100)" in results["shape robustness"]["summary"]  # its own vocabulary
    assert results["loss at init"]["details"]["ln_vocab"] == pytest.approx(math.log(100))  # freshly initialised
