"""Training paths the rest of the suite only composes: ``compile=true`` through TorchInductor (C++ kernels built
with the machine's compiler) and ``trainer.precision=bf16-mixed``, each a few real steps on the CPU, against the
same run in eager fp32."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, train_in_process

from gpt2lab.checkpoint import load_checkpoint

STEPS = 4  # train/loss is logged at steps 2 and 4, val/loss at 0 (validate_at_start) and 4
# A one-step warmup: the full learning rate from the first step, so that 4 steps move the loss by 6% (the tiny
# preset's 50-step warmup would move it by 0.5%) and a tolerance tells a run that trained from one that did not.
WARMUP = "scheduler.warmup_steps=1"


def run_overrides(corpus_file: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The tiny run, cut to STEPS steps with one validation at the end, no test and no sample."""
    return [
        *TINY,
        f"data.path={corpus_file}",
        f"paths.cache_dir={cache_dir}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "test=false",
        "sample=null",
        "trainer.accelerator=cpu",  # on a GPU host too: these are the CPU's paths
        WARMUP,
        *extra,
    ]


def logged_losses(run: Path) -> dict[str, float]:
    """Every logged loss of a run, keyed ``<metric>@<step>`` (``train/loss@2``, ``val/loss@0``...)."""
    losses = {}
    for row in csv.DictReader((run / "metrics.csv").open()):
        for metric in ("train/loss", "val/loss"):
            if row.get(metric):
                losses[f"{metric}@{row['step']}"] = float(row[metric])
    return losses


@pytest.fixture(scope="module")
def eager(tmp_path_factory, corpus_file, cache_dir) -> dict[str, float]:
    """The reference: the same run in eager fp32."""
    run = train_in_process(tmp_path_factory.mktemp("eager") / "run", run_overrides(corpus_file, cache_dir))
    losses = logged_losses(run)
    assert set(losses) == {"val/loss@0", "train/loss@2", "train/loss@4", "val/loss@4"}, losses
    return losses


@pytest.mark.slow
def test_compiled_training_through_inductor_gives_the_eager_losses(eager, tmp_path, corpus_file, cache_dir):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        run = train_in_process(tmp_path / "run", run_overrides(corpus_file, cache_dir, "compile=true"))
        # Inductor compiled the graphs (eval forward, train forward + backward): not the eager fallback.
        assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 2, dict(
            counters["inductor"]
        )
    finally:
        torch._dynamo.reset()  # no compiled code kept for later tests
    compiled = logged_losses(run)
    # The same fp32 arithmetic in fused C++ kernels: only the order of the float sums differs (relative error
    # ~1e-7 per reduction), carried through 4 AdamW steps. Seen: at most 1.7e-7 of the loss. 2e-5 is 100x that
    # and 1/3000 of what the 4 steps move the loss (6%), so a wrong gradient or a skipped step fails.
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=2e-5), key


def test_bf16_mixed_training_trains_and_writes_a_loadable_checkpoint(
    eager, tmp_path, corpus_file, cache_dir, monkeypatch
):
    # What the training steps' matmuls returned: bfloat16 under Lightning's CPU autocast, not fp32 with a label.
    dtypes = set()
    linear = torch.nn.functional.linear

    def recording_linear(*args, **kwargs):
        out = linear(*args, **kwargs)
        if torch.is_grad_enabled():
            dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    run = train_in_process(tmp_path / "run", run_overrides(corpus_file, cache_dir, "trainer.precision=bf16-mixed"))
    assert dtypes == {torch.bfloat16}
    mixed = logged_losses(run)
    assert mixed.keys() == eager.keys()
    assert all(math.isfinite(v) for v in mixed.values()), mixed
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == STEPS
    assert mixed["val/loss@4"] < mixed["val/loss@0"] == pytest.approx(results["initial_val_loss"])
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9) in the matmuls; the loss itself is reduced in fp32,
    # over 256 tokens, from logits still near uniform, so it moves far less. Seen: at most 1.4e-5 of the loss.
    # 1e-3 is 70x that and 1/60 of what the 4 steps move the loss (6%).
    for key, value in eager.items():
        assert mixed[key] == pytest.approx(value, rel=1e-3), key
    # The checkpoint keeps fp32 weights (autocast only casts the matmuls' inputs) and loads without Lightning.
    model, tokenizer = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([tokenizer.encode("def main():").ids])
    logits, _ = model(ids)
    assert logits.shape == (1, ids.shape[1], tokenizer.get_vocab_size()) and torch.isfinite(logits).all()
