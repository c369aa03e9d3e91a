"""The code that runs on CUDA GPUs only: the CUDA-graph decoder, the fused output layer + loss (a Triton kernel),
compiled bf16 training, ``generate`` on a GPU and FSDP. Marked ``gpu``: ``nox -s gpu`` (``pytest -m gpu``) runs
them on a GPU host; the default run leaves them out, and without CUDA each one skips, saying why."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, train_in_process
from test_cross_entropy import _errors as fused_loss_errors
from test_cross_entropy import _inputs as fused_loss_inputs
from test_cross_entropy import _plain as plain_loss
from test_serve_batching import Characters

from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.inference.generator import TextGenerator
from gpt2lab.model import GPT2Config, GPT2Model, cross_entropy
from gpt2lab.model.generation import DecodeSlots, DecodeStep
from gpt2lab.serve.batching import Batcher, Choice

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_triton = pytest.mark.skipif(cross_entropy.triton is None, reason="the fused loss needs Triton")

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> GPT2Model:
    """An untrained model whose wide init gives varied greedy tokens (tests/test_generation.py's)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, context_length=32, d_model=32, num_heads=2, num_layers=2, d_ff=64,
        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0, initializer_range=0.5,
    )  # fmt: skip
    return GPT2Model(config).eval()


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full fp32 for the test (a training run earlier in the process may have set TF32, which
    rounds their inputs to 10 bits of mantissa)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# --- the CUDA-graph decoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_graph_decoder_gives_the_eager_tokens(model, dtype):
    gpu = copy.deepcopy(model).to(device="cuda", dtype=dtype)
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(8)).cuda()
    graphed = [gpu.generate(prompt, 40, do_sample=False) for _ in range(2)]  # captured, then replayed
    assert any(key[0] == 3 for key in gpu._decode_steps) and gpu._decode_steps[next(iter(gpu._decode_steps))]._graph
    eager = gpu.generate(prompt, 40, do_sample=False, static_cache=False)
    assert torch.equal(graphed[0], graphed[1])
    assert (graphed[0] == eager).float().mean() > (0.99 if dtype == torch.float32 else 0.9)  # bf16: ties may flip


@needs_triton
def test_the_fused_decoding_kernels_on_cuda_compute_the_models_step(model):
    """bf16 on CUDA takes the fused step (gpt2lab/model/decode_kernels.py); its logits are the model's own step's to
    bf16 rounding (each kernel rounds once where PyTorch rounds after every operation)."""
    gpu = copy.deepcopy(model).to(device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(8)).cuda()
    fused, own = DecodeStep(gpu, 3, 32, static=True), DecodeStep(gpu, 3, 32, static=True)
    assert fused._fused
    own._fused = False
    with torch.no_grad():
        tokens = fused.prefill(prompt, torch.ones_like(prompt)).argmax(-1)
        own.prefill(prompt, torch.ones_like(prompt))
        for _ in range(8):
            a, b = fused(tokens), own(tokens)
            assert (a - b).abs().max() <= 0.02 * b.abs().max() + 0.05
            tokens = b.argmax(-1)


def test_the_servers_slots_on_cuda_decode_each_request_as_alone(model, exact_fp32):
    """gpt2lab serve's continuous batching on a GPU: one CUDA graph per step, rows joining and leaving it at
    different steps and the ring wrapping, each request's greedy tokens those of its own eager decoding."""
    gpu = copy.deepcopy(model).cuda()
    slots = DecodeSlots(gpu, batch_size=3)
    assert slots.decode._graph is not None  # recorded at start, before any row holds keys
    batcher = Batcher(slots, Characters("".join(chr(65 + i) for i in range(VOCAB))), rows=3)
    g = torch.Generator().manual_seed(3)
    requests = {i: (torch.randint(VOCAB, (n,), generator=g).tolist(), new) for i, (n, new) in
                enumerate([(5, 20), (9, 22), (3, 28), (20, 10), (2, 29)])}  # fmt: skip
    done: dict[int, list[int]] = {}
    for step in range(200):
        if step in (0, 2, 4, 6, 9):
            uid = (0, 2, 4, 6, 9).index(step)
            batcher.add(Choice(str(uid), requests[uid][0], requests[uid][1], 0.0, 1.0, 0, stop=[], ends=[]))
        done |= {int(uid): c.tokens for uid, _, finish, c in batcher.step() if finish}
        if len(done) == len(requests):
            break
    assert step > 40  # the 32-column ring went round
    for uid, (prompt, new) in requests.items():
        alone = gpu.generate(torch.tensor([prompt]).cuda(), new, do_sample=False, static_cache=False)[0, len(prompt) :]
        assert done[uid] == alone.tolist(), uid


# --- the fused output layer + loss on CUDA ---------------------------------------------------------------------


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@needs_triton
def test_the_fused_loss_on_cuda_equals_the_plain_loss_and_its_gradients(exact_fp32):
    assert cross_entropy.available(torch.device("cuda"))
    # tests/test_cross_entropy.py's cases (two of the kernel's 4096-column blocks, padding, ignored rows), on CUDA
    inputs = [t.cuda() for t in fused_loss_inputs()]
    # fp32 (relative rounding 6e-8) through 16-term dot products and 4160-term sums of exponentials: about 1e-6;
    # a wrong row, column block or scale is off by far more than 1e-4.
    for name, error in fused_loss_errors(cross_entropy.linear_cross_entropy, plain_loss, *inputs).items():
        assert error < 1e-4, name
    # Under autocast the op runs in bf16 (8-bit mantissa), as F.linear would: the loss to within 1%.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cross_entropy.linear_cross_entropy(*inputs).item()
    assert loss == pytest.approx(
        plain_loss(*(t.double() if t.is_floating_point() else t for t in inputs)).item(), rel=1e-2
    )


@needs_triton
def test_the_model_on_cuda_trains_through_the_fused_loss_as_through_the_plain_one(model, exact_fp32, monkeypatch):
    calls = []
    fused_op = cross_entropy.linear_cross_entropy
    monkeypatch.setattr(cross_entropy, "linear_cross_entropy", lambda *a: calls.append(1) or fused_op(*a))
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    labels = ids.roll(-1, 1)
    labels[:, -1] = cross_entropy.IGNORE_INDEX
    results = {}
    for fused in (True, False):
        gpu = copy.deepcopy(model).cuda().train()
        gpu.config.fused_loss = fused
        _, loss = gpu(ids, labels)
        loss.backward()
        results[fused] = (loss.detach().double(), {n: p.grad.double() for n, p in gpu.named_parameters()})
    assert calls == [1]  # the fused path ran, once, and the plain one did not call it
    assert _relative(results[True][0], results[False][0]) < 1e-5
    for name, grad in results[False][1].items():
        assert _relative(results[True][1][name], grad) < 1e-4, name


# --- training and generating on a GPU --------------------------------------------------------------------------

# The full learning rate from the first step: 4 steps move the loss by about 6%, so a loose tolerance still tells
# a run that trained from one that did not.
GPU_RUN = ["trainer=gpu", "scheduler.warmup_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=4",
           "test=false", "sample=null"]  # fmt: skip


def _final_losses(run: Path) -> dict[str, float]:
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 4
    return {"initial": results["initial_val_loss"], "final": results["metrics"]["val/loss"]}


@needs_triton
def test_compiled_bf16_training_on_cuda_matches_eager(tmp_path, corpus_file, cache_dir):
    base = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", *GPU_RUN]
    eager = _final_losses(train_in_process(tmp_path / "eager", base))
    torch._dynamo.reset()
    try:
        compiled = _final_losses(train_in_process(tmp_path / "compiled", [*base, "compile=true"]))
    finally:
        torch._dynamo.reset()
    for losses in (eager, compiled):
        assert math.isfinite(losses["final"]) and losses["final"] < 0.97 * losses["initial"], losses
    # Both in bf16 (8-bit mantissa); the compiled graph rounds at other places (fused kernels keep fp32
    # intermediates) and runs the fused loss inside the graph. 1% of the loss: a few bf16 roundings, and 1/6 of
    # what the 4 steps move it.
    assert compiled["initial"] == pytest.approx(eager["initial"], rel=1e-2)
    assert compiled["final"] == pytest.approx(eager["final"], rel=1e-2)


def test_muon_on_cuda_steps_with_torch_s_own_iteration_and_trains_compiled_in_bf16(tmp_path, corpus_file, cache_dir):
    import torch.optim._muon as torch_muon

    from gpt2lab.lit.optimization import MuonWithAdamW, muon_groups

    model = GPT2Model(GPT2Config(vocab_size=64, context_length=16, d_model=32, num_heads=2, num_layers=2)).cuda()
    reference = copy.deepcopy(model)
    optimizer = MuonWithAdamW(muon_groups(model, 0.0), fused=True, muon_lr=0.05)
    groups = muon_groups(reference, 0.0)
    adamw = torch.optim.AdamW(groups[:2], lr=3e-3, betas=(0.9, 0.95), fused=True)
    muon = torch.optim.Muon([{"params": groups[2]["params"]}], lr=0.05, weight_decay=0.0)
    seen = []
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = lambda g, *a: seen.append(g.dtype) or original(g, *a)
    try:
        for seed in range(3):
            generator = torch.Generator("cuda").manual_seed(seed)
            for m in (model, reference):
                generator.manual_seed(seed)
                for p in m.parameters():
                    p.grad = torch.randn(p.shape, device="cuda", generator=generator)
            optimizer.step()
            adamw.step()
            muon.step()
    finally:
        torch_muon._zeropower_via_newtonschulz = original
    assert seen  # torch's own (bfloat16) iteration ran on the GPU: the float32 one is for CPUs
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    run = train_in_process(
        tmp_path / "muon",
        [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", *GPU_RUN, "compile=true", "optimizer=muon"],
    )
    torch._dynamo.reset()
    losses = _final_losses(run)
    assert math.isfinite(losses["final"]) and losses["final"] < 0.97 * losses["initial"], losses


def test_generate_on_cuda_decodes_as_on_the_cpu(run_main, trained_run, tmp_path, exact_fp32):
    args = [f"ckpt={trained_run}", "prompt=def main():", "inference.max_new_tokens=12", "inference.do_sample=false"]
    args.append("inference.repetition_penalty=1.0")
    outputs = {
        device: run_main("gpt2lab.generate", *args, f"device={device}", cwd=tmp_path) for device in ("cuda", "cpu")
    }
    for result in outputs.values():
        assert result.returncode == 0, result.stderr[-3000:]
    # Greedy: the command prints the same continuation from the GPU as from the CPU (a 40-step model may well
    # continue with spaces, so the text is compared, not judged).
    assert outputs["cuda"].stdout == outputs["cpu"].stdout
    assert outputs["cuda"].stdout.startswith("def main():") and len(outputs["cuda"].stdout) > len("def main():\n")
    # The same greedy tokens as the CPU's: the GPU decodes with the CUDA-graph step, in fp32.
    on_gpu, on_cpu = TextGenerator(str(trained_run), device="cuda"), TextGenerator(str(trained_run), device="cpu")
    assert next(on_gpu.model.parameters()).is_cuda
    prompt = torch.tensor([on_cpu.tokenizer.encode("def main():").ids])
    greedy = {
        "cuda": on_gpu.model.generate(prompt.cuda(), 8, do_sample=False).cpu(),
        "cpu": on_cpu.model.generate(prompt, 8, do_sample=False),
    }
    assert on_gpu.model._decode_steps  # decoded with the fixed-shape (CUDA-graph) step
    assert torch.equal(greedy["cuda"], greedy["cpu"])


# --- FSDP ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP shards over 2 or more GPUs; this host has fewer")
def test_fsdp_over_two_gpus_trains_and_writes_one_loadable_checkpoint(tmp_path, corpus_file, cache_dir):
    run = tmp_path / "run"
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    result = run_cli(*args, "trainer=fsdp", "trainer.devices=2", "sample=null", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 8
    assert results["metrics"]["val/loss"] < results["initial_val_loss"]
    assert math.isfinite(results["metrics"]["test/loss"])  # the test read the best checkpoint back
    # state_dict_type: full: one file with whole weights, loadable without FSDP
    model, tokenizer = load_checkpoint(run / "checkpoints" / "last.ckpt")
    ids = torch.tensor([tokenizer.encode("def main():").ids])
    assert torch.isfinite(model(ids)[0]).all()
