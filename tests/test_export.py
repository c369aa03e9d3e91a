"""``python -m gpt2lab.export``: a trained run out as Hugging Face, ONNX (with a KV cache) and TorchScript
directories, each loaded back by its own runtime: transformers, onnxruntime without torch, torch.jit without
gpt2lab."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import export_all

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint
from gpt2lab.inference import onnx as onnx_generation
from gpt2lab.model import generation

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent


def row(*cells: str) -> str:
    """A regex for one Markdown table row of exactly these cells, as gpt2lab.console.table pads them."""
    return "^\\|" + "".join(rf" +{re.escape(cell)} +\|" for cell in cells) + "$"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The tiny trained run exported in every format (``format=all``), as the command line composes it."""
    return export_all(trained_run, tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_checkpoint(find_checkpoint(str(trained_run), "outputs"))


@pytest.fixture
def export_cli(run_main):
    def _export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return run_main("gpt2lab.export", *args, cwd=cwd)

    return _export


def test_every_directory_holds_tokenizer_config_card_and_safetensors_weights(exported):
    for fmt, own in (("hf", "generation_config.json"), ("onnx", "model.onnx"), ("torchscript", "model.pt")):
        files = {p.name for p in (exported / fmt).iterdir()}
        assert {
            "README.md",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
            own,
        } <= files
        assert not [f for f in files if f.endswith((".bin", ".pkl", ".pickle", ".ckpt"))]
    # One mode for every file, the one a new file gets here (safetensors wrote its weights 0600: issue 27 #17)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in exported.rglob("*") if p.is_file()} == {0o666 & ~umask}
    assert json.loads((exported.parent / "log" / "export.json").read_text())["onnx"]["max_abs_diff"] < 1e-4
    assert not (exported.parent / "all.partial").exists()


def test_hf_round_trip_gives_gpt2labs_logits_and_generates(exported, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = trained
    hf = AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(exported / "hf")
    text = "def fibonacci(n):\n    return n"
    ids = hf_tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.pad_token == "<|pad|>"
    assert json.loads((exported / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"  # transformers 4 and 5 know it
    )
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4
    out = hf.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(ids, 5, do_sample=False))


def test_hf_batched_generation_pads_on_the_left_and_continues_each_prompt(exported):
    """Two prompts of different lengths in one batch: the tokenizer pads the shorter one on the left, so that each
    row's greedy continuation is the one its prompt alone gives (right padding would continue the pads, and
    transformers warns of it). Issue 27 #4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(exported / "hf")
    assert tokenizer.padding_side == "left"
    prompts = ["import os\n", "class Foo:\n    def __init__(self):"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    pads = (batch.attention_mask == 0).sum(1).tolist()
    assert sorted(pads)[0] == 0 and max(pads) > 0 and batch.attention_mask[:, -1].all()
    with torch.no_grad():
        together = hf.generate(**batch, max_new_tokens=8, do_sample=False)
        for i, prompt in enumerate(prompts):
            alone = hf.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)[0]
            row = together[i, pads[i] :]
            assert row[: len(alone)].tolist() == alone.tolist()
            assert (row[len(alone) :] == tokenizer.pad_token_id).all()  # a row that ended early is padded after


def test_hf_text_generation_pipeline_with_its_defaults_stops_at_the_context_length(exported):
    """``pipeline("text-generation", model=dir)("def ")`` with no other argument: the pipeline's default of 256 new
    tokens went past the tiny model's positions (an IndexError in wpe); the export's ``generation_config.json``
    holds the context length as ``max_length``, which the pipeline honours in place of its default. Issue 28."""
    from transformers import pipeline

    context_length = json.loads((exported / "hf" / "config.json").read_text())["n_positions"]
    assert context_length < 256  # else the pipeline's default would fit anyway
    assert json.loads((exported / "hf" / "generation_config.json").read_text())["max_length"] == context_length
    generator = pipeline("text-generation", model=str(exported / "hf"))
    lengths, generate = [], generator.model.generate

    def measured(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[-1])
        return output

    generator.model.generate = measured
    result = generator("def ")
    assert isinstance(result[0]["generated_text"], str) and result[0]["generated_text"].startswith("def ")
    prompt_length = len(generator.tokenizer("def ").input_ids)
    assert len(lengths) == 1 and prompt_length < lengths[0] <= context_length
    generator("def ", max_new_tokens=3, min_new_tokens=3, do_sample=False)  # a length given still wins
    assert lengths[1] == prompt_length + 3


def test_onnx_decoding_gives_gpt2labs_greedy_tokens_with_padding_and_past_the_context(exported, trained):
    model, tokenizer = trained
    decoder = onnx_generation.ONNXDecoder.from_directory(exported / "onnx")
    prompts = [tokenizer.encode(p).ids for p in ("import os\n", "class Foo:\n    def __init__(self):")]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = model.config.context_length + 8  # the window slides once
    ours = np.stack(
        list(onnx_generation.stream_tokens(decoder, ids, mask, new, repetition_penalty=1.3, do_sample=False)), 1
    )
    theirs = model.generate(
        torch.tensor(ids), new, attention_mask=torch.tensor(mask), repetition_penalty=1.3, do_sample=False
    )[:, width:]
    assert ours.tolist() == theirs.tolist()


def test_onnx_graph_runs_attention_layer_norms_and_gelu_as_onnxruntimes_fused_operators(exported, trained):
    """The default export (onnx.optimize=extended) fuses each layer's attention, reading the past and writing the
    present, into com.microsoft MultiHeadAttention, and its residual layer norms and GELU into SkipLayerNormalization
    and FastGelu (issue 31). A graph the fusions stopped matching would still validate and decode, only slower, so
    the operators are counted here; the test above decodes this graph to gpt2lab's greedy tokens."""
    import onnx

    layers = trained[0].config.num_layers
    graph = onnx.load(exported / "onnx" / "model.onnx").graph
    fused = {"MultiHeadAttention": layers, "SkipLayerNormalization": 2 * layers + 1, "FastGelu": layers}
    ops = collections.Counter(node.op_type for node in graph.node if node.domain == "com.microsoft")
    assert {name: ops[name] for name in fused} == fused
    assert not {node.op_type for node in graph.node} & {"Softmax", "Tanh", "LayerNormalization", "Transpose"}
    attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert sorted(name for node in attention for name in node.input[6:8]) == sorted(i.name for i in graph.input[3:])
    assert sorted(name for node in attention for name in node.output[1:]) == sorted(o.name for o in graph.output[1:])
    record = json.loads((exported.parent / "log" / "export.json").read_text())["onnx"]
    assert record["fused"] == fused and record["max_abs_diff"] < 1e-4


def test_onnx_generation_runs_without_torch_and_matches_gpt2lab(exported, trained_run, tmp_path):
    from gpt2lab.inference.generator import TextGenerator

    settings = ["inference.do_sample=false", "inference.max_new_tokens=12"]
    prelude = "import sys; sys.modules['torch'] = None; from gpt2lab.generate.__main__ import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", prelude, f"onnx={exported / 'onnx'}", "prompt=def f(x):", *settings],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" not in re.findall(r"import of (\w+) halted", result.stderr)
    expected = TextGenerator(str(trained_run), device="cpu").generate_text(
        "def f(x):", {"do_sample": False, "max_new_tokens": 12, "repetition_penalty": 1.2}, out=None
    )
    assert result.stdout == "def f(x):" + expected[0] + "\n"


def test_onnx_sampling_follows_the_inference_settings(exported):
    generator = onnx_generation.ONNXTextGenerator(exported / "onnx")
    settings = {"max_new_tokens": 10, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 5, "stream": False}
    first = generator.generate_text(["def", "import"], settings | {"num_return_sequences": 2})
    assert len(first) == 4 and first == generator.generate_text(
        ["def", "import"], settings | {"num_return_sequences": 2}
    )
    greedy = generator.generate_text("def", {"max_new_tokens": 10, "do_sample": False, "repetition_penalty": 1.0})
    assert (
        generator.generate_text("def", {"max_new_tokens": 10, "top_k": 1, "seed": 3, "repetition_penalty": 1.0})
        == greedy
    )


def test_numpy_sampling_filters_are_gpt2labs():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.9, 10, 0.5)):
        ours = onnx_generation.filter_logits(logits.numpy(), temperature, top_k, top_p)
        theirs = generation.filter_logits(logits, temperature, top_k, top_p).numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(theirs))
        assert np.allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)])
    seen = torch.randint(0, 50, (3, 7))
    seen_mask = torch.rand(3, 7) > 0.3
    theirs = generation.penalize_repetition(logits, seen, seen_mask, 1.5).numpy()
    assert np.allclose(
        onnx_generation.penalize_repetition(logits.numpy(), seen.numpy(), seen_mask.numpy(), 1.5), theirs
    )


def test_torchscript_loads_in_a_process_without_gpt2lab(exported, trained, tmp_path):
    model, _ = trained
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    np.save(tmp_path / "ids.npy", ids.numpy())
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(ids)[0].numpy())
    script = (
        "import sys; sys.modules['gpt2lab'] = None\n"
        "import numpy as np, torch\n"
        f"program = torch.jit.load({str(exported / 'torchscript' / 'model.pt')!r})\n"
        "ids = torch.from_numpy(np.load('ids.npy'))\n"
        "print(float((program(ids) - torch.from_numpy(np.load('expected.npy'))).abs().max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) < 1e-5


def test_model_card_has_front_matter_run_results_and_snippets_that_run(exported, trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    for fmt, library in (("hf", "transformers"), ("onnx", "onnx"), ("torchscript", "pytorch")):
        card = (exported / fmt / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["library_name"] == library and front["license"] == "mit"
        assert {"tags", "datasets", "metrics"} <= front.keys() and "gpt2lab" in front["tags"]
        for section in ("Model details", "Training data", "Training procedure", "Evaluation results", "How to use",
                        "Limitations", "Citation"):  # fmt: skip
            assert f"## {section}" in card
        assert f"{results['metrics']['val/loss']:.4f}" in card
        assert re.search(row("tokens trained on", "10,240 (40 steps)"), card, re.M)
        for snippet in re.findall(r"```python\n(.*?)```", card, re.S):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(snippet, f"{fmt}/README.md", "exec"), {})
            assert out.getvalue().startswith("def")


def test_python_api_returns_sizes_differences_and_a_benchmark(trained, tmp_path):
    import onnx

    from gpt2lab.bench.export import format_benchmark
    from gpt2lab.exporters.onnx import ONNXExporter, supported_opsets
    from gpt2lab.exporters.torchscript import TorchScriptExporter

    model, _ = trained
    newest = supported_opsets()[-1]  # the top of the range the opset error offers is written, not replaced by 18
    onnx_result = ONNXExporter(opset_version=newest, optimize="none", validate=True, benchmark=True).export(
        model, tmp_path / "m.onnx"
    )
    assert onnx.load(tmp_path / "m.onnx").opset_import[0].version == newest
    assert onnx_result["output_path"] == str(tmp_path / "m.onnx") and onnx_result["file_size_mb"] > 0
    assert onnx_result["max_abs_diff"] < 1e-4
    assert not any(onnx_result["fused"].values())  # optimize=none: ONNX's own operators only
    table = format_benchmark(onnx_result["benchmark"])
    assert "forward, batch 8" in table and "greedy decoding, batch 1" in table
    ts = TorchScriptExporter(method="trace", benchmark=True).export(model, tmp_path / "ts")
    assert ts["method"] == "trace" and ts["max_abs_diff"] < 1e-5 and ts["benchmark"]["rows"]


@pytest.mark.parametrize(("options", "tolerance"), [({"fp16": True}, 0.05), ({"quantize": "int8"}, 1.0)])
def test_half_and_int8_graphs_are_validated_with_their_own_tolerance(trained, tmp_path, options, tolerance):
    from gpt2lab.exporters.onnx import ONNXExporter, graph_shape

    model = trained[0]
    result = ONNXExporter(**options).export(model, tmp_path)
    assert 1e-5 < result["max_abs_diff"] < tolerance
    assert result["fused"]["MultiHeadAttention"] == model.config.num_layers  # fused before halving or quantizing
    decoder = onnx_generation.ONNXDecoder(result["output_path"], graph_shape(model), model.config.context_length)
    assert len(list(onnx_generation.stream_tokens(decoder, np.array([[5, 6, 7]]), np.ones((1, 3)), 4))) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt=missing.ckpt"], "ckpt='missing.ckpt': no such file or directory"),
        (["format=xml"], "format='xml': expected one of hf, onnx, torchscript or all"),
        (["format=onnx", "onnx.opset_version=12"], "onnx.opset_version=12: the installed exporter writes opsets 18 to"),
        (["format=onnx", "onnx.opset_version=99"], "onnx.opset_version=99: the installed exporter writes opsets 18 to"),
        (["format=onnx", "onnx.optimize=max"], "onnx.optimize='max': expected one of none, basic, extended, all"),
        (["onnx.quantize=int4"], "onnx.quantize='int4': expected null or int8"),
        (["onnx.quantize=int8", "onnx.fp16=true"], "onnx.quantize=int8 and onnx.fp16=true: choose one"),
        (["format=torchscript", "torchscript.method=compile"], "torchscript.method='compile': expected one of auto"),
        (
            ["format=torchscript", "torchscript.method=script"],
            "torchscript.method=script: torch.jit.script cannot compile gpt2lab's model",
        ),
        (
            ["format=hf", "tolerance=-1"],  # beyond any difference: transformers may compute exactly gpt2lab's
            "the Hugging Face export (loaded by AutoModelForCausalLM) differs from gpt2lab's model by up to",
        ),
        (["output_dir=exists"], "output_dir='exists' exists: choose a new directory, or overwrite=true"),
        (["output_dir=null"], "output_dir=... is required"),
    ],
)
def test_bad_input_is_one_error_line(export_cli, trained_run, tmp_path, args, message):
    (tmp_path / "exists").mkdir()
    ckpt = [] if any(a.startswith("ckpt=") for a in args) else [f"ckpt={trained_run}"]
    result = export_cli(*ckpt, "output_dir=out", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert re.search("Error: " + re.escape(message), result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_an_export_beyond_tolerance_fails_saying_by_how_much_and_leaves_nothing(
    export_cli, trained_run, tmp_path, monkeypatch
):
    from gpt2lab.exporters import onnx

    perturbed = onnx.run_decoder
    monkeypatch.setattr(onnx, "run_decoder", lambda *a: [x + 0.01 for x in perturbed(*a)])
    result = export_cli(f"ckpt={trained_run}", "format=onnx", "output_dir=out", "onnx.optimize=none", cwd=tmp_path)
    assert result.returncode == 1
    assert re.search(r"Error: onnxruntime \(model.onnx\) differs from gpt2lab's model by up to 0.01 ", result.stderr)
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]  # no output_dir, no output_dir.partial


def test_overwrite_replaces_an_export_through_the_console_script(run_main, trained_run, tmp_path):
    """gpt2lab export ... overwrite=true benchmark=true: the old directory replaced, the speed table printed."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("an older export")
    result = run_main(
        "gpt2lab.cli", "export", f"ckpt={trained_run}", "format=torchscript", "output_dir=out", "overwrite=true",
        "benchmark=true", "hydra.run.dir=log", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.pt").is_file()
    assert re.search(r"^\| torchscript +\| out/model\.pt +\| +[\d.]+ MB \| +[\d.e-]+ \|$", result.stdout, re.M), (
        result.stdout
    )
    assert "torchscript: torchscript against PyTorch eager on " in result.stdout
    assert re.search(
        r"^\| forward, batch 8 x \d+ tokens \(ms\) +\| +[\d.,]+ \| +[\d.,]+ \| +[\d.]+x \|$", result.stdout, re.M
    )
    assert json.loads((tmp_path / "log" / "export.json").read_text())["torchscript"]["benchmark"]["rows"]


@pytest.mark.slow
def test_bench_export_measures_float32_and_int8_graphs(tmp_path):
    """python -m gpt2lab.bench export: onnxruntime against PyTorch eager for a conf/model size, in float32 and with
    int8 weights: forward at batch 1 and 8, and cached greedy decoding at batch 1."""
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.bench", "export", "--model", "gpt2-tiny", "--repeats", "1", "--busy-ok"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for weights in ("ONNX float32", "ONNX int8 weights"):
        assert f"gpt2-tiny (7.2M parameters, random weights), {weights}: onnxruntime against PyTorch eager" in (
            result.stdout
        )
    rows = re.findall(r"^\| (forward, batch \d|greedy decoding, batch 1)[^|]*\|[^|]+\|[^|]+\| +[\d.]+x \|$",
                      result.stdout, re.M)  # fmt: skip
    assert rows == ["forward, batch 1", "forward, batch 8", "greedy decoding, batch 1"] * 2


def test_model_card_reads_the_corpus_from_the_training_log(trained, trained_run, tmp_path):
    from gpt2lab.exporters.model_card import ModelCardGenerator

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "train.log").write_text(
        "[2026-01-01 00:00:00,000][gpt2lab.data.datamodule][INFO] - Corpus: 3 files (fingerprint 0123abcd)\n"
        "[2026-01-01 00:00:00,000][gpt2lab.data.datamodule][INFO] - train    12 documents   4000 characters   "
        "1234 tokens (3.24 chars/token)\n"
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    card = ModelCardGenerator(license="apache-2.0").generate(trained[0], tmp_path / "out", "onnx", checkpoint=ckpt)
    assert re.search(row("corpus fingerprint", "`0123abcd`"), card, re.M)
    assert re.search(row("train split", "1,234 tokens"), card, re.M)
    assert yaml.safe_load(card.split("---")[1])["license"] == "apache-2.0"


def test_a_model_other_than_gpt2labs_gpt2_is_refused(export_cli, trained_run, tmp_path, monkeypatch):
    import gpt2lab.exporters.export

    monkeypatch.setattr(gpt2lab.exporters.export, "load_checkpoint", lambda path: (torch.nn.Linear(2, 2), None))
    result = export_cli(f"ckpt={trained_run}", "output_dir=out", cwd=tmp_path)
    assert result.returncode == 1
    assert "holds a Linear (model=hf or model=module): export is written for gpt2lab's GPT-2" in result.stderr


def test_model_card_gives_a_checkpoint_only_its_own_results(trained, trained_run, tmp_path):
    """The run's validation and test numbers measured its best checkpoint (step 40): an earlier checkpoint's card
    does not claim them, says how to measure it, and counts the tokens up to its own step."""
    from gpt2lab.exporters.model_card import ModelCardGenerator

    results = json.loads((trained_run / "results.json").read_text())
    assert Path(results["best_checkpoint"]).name.startswith("step000040")
    generator = ModelCardGenerator()
    earlier = next((trained_run / "checkpoints").glob("step000020*.ckpt"))
    card = generator.generate(trained[0], tmp_path, "torchscript", checkpoint=earlier)
    evaluation = card.split("## Evaluation results")[1].split("## How to use")[0]
    assert "| training run" not in evaluation and f"{results['metrics']['val/loss']:.4f}" not in evaluation
    assert f"(step 40), not of this one (step 20): `python -m gpt2lab.evaluate ckpt={earlier}`" in evaluation
    assert re.search(row("tokens trained on", "5,120 (20 steps)"), card, re.M)
    metrics = results["metrics"]
    assert metrics["val/loss"] == results["best_val_loss"]  # the last validation was the best one's
    for same in (Path(results["best_checkpoint"]), trained_run / "checkpoints" / "last.ckpt"):
        card = generator.generate(trained[0], tmp_path, "torchscript", checkpoint=same)
        # 2 batches of 8 windows of 32 tokens: the run validated on that much of its validation split
        scored = ("512, 2 batches (trainer.limit_val_batches=2)", "training run")
        numbers = (f"{metrics['val/loss']:.4f}", f"{metrics['val/ppl']:.2f}", f"{metrics['val/bpb']:.4f}")
        assert re.search(row("corpus.txt", "validation", "none (windows of 32)", *scored, *numbers), card, re.M)


def test_model_card_commands_run_as_pasted(exported, run_main, corpus_file, tmp_path):
    """The cards' shell commands: generate with the ONNX export as pasted; fine-tuning the Hugging Face export as
    pasted plus overrides that make the run short, which starts from the exported weights (step-0 loss well
    under ln(vocabulary))."""
    import shlex

    def command(fmt: str) -> list[str]:
        (block,) = re.findall(r"```bash\n(.*?)```", (exported / fmt / "README.md").read_text(), re.S)
        return shlex.split(block, comments=True)

    generate = command("onnx")
    assert generate[:3] == ["python", "-m", "gpt2lab.generate"]
    result = run_main("gpt2lab.generate", *generate[3:], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("def"), result.stderr[-3000:]

    train = command("hf")
    assert train[:2] == ["gpt2lab", "train"]
    short = ["data=files", f"data.path={corpus_file}", "trainer.max_steps=1", "trainer.val_check_interval=1",
             "trainer.limit_val_batches=2", "sample=null", "test=false", "hydra.run.dir=run"]  # fmt: skip
    result = run_main("gpt2lab.cli", *train[1:], *short, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["initial_val_loss"] < np.log(320) - 0.5


def test_model_card_names_each_evaluations_data_and_keeps_the_held_out_results_apart(
    trained, trained_run, corpus_file, run_main, tmp_path
):
    """Issue 27 #7: the card is titled by the model, not the time of day; each result names its data, split, stride
    and tokens; the run's held-out results come first, an evaluation on other data apart, a repeated one once."""
    from huggingface_hub import ModelCard

    from gpt2lab.exporters.model_card import ModelCardGenerator

    run = tmp_path / "03-16-26"  # the time of day a run directory is named by
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    toy = tmp_path / "toy.txt"
    toy.write_text(corpus_file.read_text()[:6000])
    evaluations = {
        "1": ["split=test"],
        "2": ["split=test"],  # the same evaluation again
        "3": ["data=files", f"data.path={toy.name}", "eval.stride=16"],
    }
    for name, args in evaluations.items():
        result = run_main("gpt2lab.evaluate", f"ckpt={ckpt}", *args, f"hydra.run.dir=outputs/evaluate/{name}",
                          "eval.compressors=false", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    test, toy_result = (json.loads((tmp_path / f"outputs/evaluate/{n}/eval.json").read_text()) for n in "13")
    with contextlib.chdir(tmp_path):  # the run's paths.log_dir, outputs, is where the evaluations went
        card = ModelCardGenerator().generate(trained[0], tmp_path / "out", "hf", checkpoint=ckpt)
    assert ModelCard(card).data.to_dict()["library_name"] == "transformers"  # valid front matter
    (heading,) = re.findall(r"^# .*$", card, re.M)
    assert heading == "# gpt2lab GPT-2 (28K) trained on corpus.txt"
    evaluation = card.split("## Evaluation results")[1].split("## How to use")[0]
    held_out, others = evaluation.split("### Other evaluations")
    windows = "none (windows of 32)"
    numbers = lambda r: (f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['bits_per_byte']:.4f}")  # noqa: E731
    assert "held out of corpus.txt" in held_out
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    val = {"loss": metrics["val/loss"], "perplexity": metrics["val/ppl"], "bits_per_byte": metrics["val/bpb"]}
    scored = "512, 2 batches (trainer.limit_val_batches=2)"
    assert re.search(row("corpus.txt", "validation", windows, scored, "training run", *numbers(val)), held_out, re.M)
    test_row = row("corpus.txt", "test", windows, f"{test['tokens']:,}", "gpt2lab.evaluate", *numbers(test))
    assert len(re.findall(test_row, held_out, re.M)) == 1 and not re.search(test_row, others, re.M)
    toy_row = row("toy.txt", "all (every document)", "16", f"{toy_result['tokens']:,}", "gpt2lab.evaluate",
                  *numbers(toy_result))  # fmt: skip
    assert re.search(toy_row, others, re.M) and "toy.txt" not in held_out
    assert held_out.count("gpt2lab.evaluate") == 1 and others.count("gpt2lab.evaluate") == 1
