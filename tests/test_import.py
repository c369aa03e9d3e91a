"""Models from elsewhere: pretrained GPT-2 weights into gpt2lab's model (model.init_from), any transformers causal LM
(model=hf), and any nn.Module (model=module), trained through the same LightningModule; bad input refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY
from hydra.utils import execution_whitelist, instantiate
from omegaconf import OmegaConf
from torch import nn

from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.hf import from_transformers, gpt2_config, load_pretrained_gpt2
from gpt2lab.model import GPT2Config
from gpt2lab.model.adapter import CausalLM
from gpt2lab.tokenizers import TokenizerSpec, train_bpe
from gpt2lab.train.run import train

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 64: gpt2lab pads its embedding to 320
# TINY without its model and tokenizer keys: the run's settings for models whose architecture comes from elsewhere
RUN = [o for o in TINY if not o.startswith(("model.", "tokenizer"))] + ["sample=null"]


def small_gpt2(seed: int = 0, n_embd: int = 32, biases: bool = True) -> transformers.GPT2LMHeadModel:
    """A transformers GPT-2 with every tensor random (transformers' own init zeroes the biases)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 if biases or not name.endswith("bias") else torch.zeros_like(p))
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def bpe(corpus_file):
    return train_bpe([corpus_file.read_text()], VOCAB, show_progress=False)


def save_with_tokenizer(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, bpe, corpus_file):
    """A small transformers GPT-2 trained for a few dozen steps on the corpus (so its loss is well under ln(V)),
    saved with its tokenizer as save_pretrained writes them."""
    model = small_gpt2()
    ids = torch.tensor(bpe.encode(corpus_file.read_text()[:60_000]).ids)
    windows = ids[: len(ids) // 33 * 33].view(-1, 33)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_with_tokenizer(model.eval(), bpe, tmp_path_factory.mktemp("pretrained"))


# -- GPT-2 weights into GPT2Model ----------------------------------------------------------------------------------
def test_gpt2_weights_give_the_same_logits_with_and_without_biases(tmp_path):
    x = torch.randint(0, VOCAB, (2, 40))
    hf = small_gpt2()
    ours = from_transformers(hf).eval()
    assert ours.config.padded_vocab_size == 320 and ours.config.vocab_size == VOCAB
    assert (ours(x)[0] - hf(x).logits).abs().max() < 1e-5
    hf.save_pretrained(tmp_path / "biases")
    assert (load_pretrained_gpt2(str(tmp_path / "biases")).eval()(x)[0] - hf(x).logits).abs().max() < 1e-5

    # Without biases: a GPT-2 whose biases are all zero is the same function as gpt2lab's model.use_bias=false
    bias_free = small_gpt2(seed=1, biases=False)
    bias_free.save_pretrained(tmp_path / "zero_biases")
    ours = load_pretrained_gpt2(str(tmp_path / "zero_biases"), use_bias=False).eval()
    assert not any(name.endswith("bias") for name, _ in ours.named_parameters())
    assert (ours(x)[0] - bias_free(x).logits).abs().max() < 1e-5
    # ... and one with biases has no place to put them: refused, naming the tensor
    with pytest.raises(ConfigError, match=r"h\.0\.ln_1\.bias is not zero, and model\.use_bias=false"):
        load_pretrained_gpt2(str(tmp_path / "biases"), use_bias=False)


@pytest.mark.parametrize("layout", ["hub safetensors", "sharded safetensors", "pytorch_model.bin"])
def test_gpt2_weights_in_the_hubs_file_layouts(tmp_path, layout):
    """The files of the Hub's GPT-2s: tensors named as transformers' GPT2Model (no ``transformer.`` prefix, no
    lm_head) beside each layer's causal-mask buffer ``attn.bias`` (1, 1, n, n), in one safetensors file, in shards
    with an index, or in a pickle-free ``pytorch_model.bin`` read with weights_only."""
    from safetensors.torch import save_file

    hf = small_gpt2(seed=2)
    n = hf.config.n_positions
    state = {k: v.detach().clone().contiguous() for k, v in hf.transformer.state_dict().items()}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf.config.to_json_file(tmp_path / "config.json")
    if layout == "hub safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    elif layout == "sharded safetensors":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(tmp_path / file))
        index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (load_pretrained_gpt2(str(tmp_path)).eval()(x)[0] - hf(x).logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("name", "n_embd", "n_layer", "n_head"),
    [("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25),
     ("distilgpt2", 768, 6, 12)],
)  # fmt: skip
def test_the_five_sizes_configs_map_onto_gpt2config(name, n_embd, n_layer, n_head):
    """The config.json of each of the five Hub GPT-2s (their architecture keys) as GPT2Config."""
    hf = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head).to_dict()
    config, changed = gpt2_config(hf, GPT2Config(), source=name)
    assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == (n_embd, n_layer, n_head, 4 * n_embd)
    assert (config.vocab_size, config.padded_vocab_size, config.context_length) == (50257, 50304, 1024)
    assert ("vocab_size: 50257 -> 50257" not in changed) and (n_embd == 768 or f"d_model: 768 -> {n_embd}" in changed)


def test_fine_tuning_starts_from_the_pretrained_loss(compose_cfg, pretrained_dir, corpus_file, caplog):
    """python train.py model.init_from=<dir>: the architecture and tokenizer are the directory's, and the step-0
    validation loss is the transformers model's own loss on the same windows, not ln(vocab)."""
    cfg = compose_cfg(*RUN, f"data.path={corpus_file}", f"model.init_from={pretrained_dir}", "trainer.max_steps=4",
                      "test=false", tiny=False)  # fmt: skip
    caplog.set_level("INFO")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    results = json.loads((run / "results.json").read_text())
    assert "sets the architecture: " in caplog.text and "d_model: 128 -> 32" in caplog.text
    assert (
        json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
        == json.loads((pretrained_dir / "tokenizer.json").read_text())["model"]["vocab"]
    )

    # The transformers model's loss on the windows the run validated (the val loader's first 2 batches); the data
    # as the run resolved it (the window follows the architecture init_from set), which config.yaml records
    written = OmegaConf.load(run / "config.yaml")
    with execution_whitelist("gpt2lab.*"):
        datamodule = instantiate(written.data, tokenizer=TokenizerSpec(kind="pretrained", name=str(pretrained_dir)))
    datamodule.setup()
    hf = transformers.GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    nats = tokens = 0
    with torch.no_grad():
        for _, batch in zip(range(2), datamodule.val_dataloader(), strict=False):
            logits = hf(batch[:, :-1]).logits
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            tokens += batch[:, 1:].numel()
    assert results["initial_val_loss"] == pytest.approx(float(nats / tokens), abs=1e-4)
    assert results["initial_val_loss"] < math.log(VOCAB) - 1.0
    assert results["metrics"]["val/loss"] < results["initial_val_loss"] + 0.1  # fine-tuning, not starting over
    model, _ = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.config.d_model == 32 and model.config.vocab_size == VOCAB


def test_init_from_a_hub_name_reads_the_hugging_face_cache(compose_cfg, pretrained_dir, monkeypatch, tmp_path):
    """model.init_from=gpt2 is the Hub's GPT-2: its files as huggingface_hub caches them (here a cache filled by
    hand, the Hub switched off) give the architecture, the weights and the tokenizer, and the config records the
    directory that was read."""
    import shutil

    from gpt2lab.hf import import_model_config

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(pretrained_dir, snapshot)
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    hf = transformers.GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (load_pretrained_gpt2("gpt2").eval()(x)[0] - hf(x).logits).abs().max() < 1e-5
    cfg = compose_cfg(*RUN, "model.init_from=gpt2", tiny=False)
    assert import_model_config(cfg.model) == str(snapshot)  # the tokenizer's directory too
    assert cfg.model.init_from == str(snapshot) and (cfg.model.d_model, cfg.model.vocab_size) == (32, VOCAB)


# -- any transformers causal LM: model=hf --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama's config only: its architecture, trained from scratch with the run's tokenizer."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    directory = tmp_path_factory.mktemp("llama")
    config.save_pretrained(directory)
    return directory


def test_a_transformers_model_trains_resumes_and_evaluates(compose_cfg, llama_dir, corpus_file, run_main, tmp_path):
    cfg = compose_cfg(*RUN, "tokenizer=bpe", "tokenizer.vocab_size=320", f"data.path={corpus_file}", "model=hf",
                      f"model.name_or_path={llama_dir}", "model.pretrained=false", "model.context_length=32",
                      "test=false", tiny=False)  # fmt: skip
    train(cfg)
    run = Path(cfg.paths.output_dir)
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["val/loss"] < results["initial_val_loss"]
    model, tokenizer = load_checkpoint(run / "checkpoints" / "last.ckpt")  # from the checkpoint alone
    assert isinstance(model, CausalLM) and model.module.config.model_type == "llama"
    assert model.module.config.vocab_size == 320 and model.config.context_length == 32

    resumed = tmp_path / "resumed"
    args = [*RUN, "tokenizer=bpe", "tokenizer.vocab_size=320", f"data.path={corpus_file}", "model=hf",
            f"model.name_or_path={llama_dir}", "model.pretrained=false", "model.context_length=32", "test=false",
            f"ckpt_path={run}", "trainer.max_steps=12", f"hydra.run.dir={resumed}"]  # fmt: skip
    result = run_main("gpt2lab.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["global_step"] == 12

    evaluated = run_main("gpt2lab.evaluate", f"ckpt={resumed}", "split=validation", "eval.compressors=false",
                         f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["loss"] < math.log(320)

    generated = run_main("gpt2lab.generate", f"ckpt={resumed}", "prompt=def ", cwd=tmp_path)
    assert generated.returncode == 1
    assert "Error: " in generated.stderr and "generation and chat are written for" in generated.stderr


@pytest.mark.slow
def test_a_transformers_model_sweeps(llama_dir, corpus_file, tmp_path):
    """python train.py -m model=hf ...: every job of a multirun trains the transformers model; the sweep's summary
    lists them."""
    from conftest import run_cli

    args = [*RUN, "tokenizer=bpe", "tokenizer.vocab_size=320", f"data.path={corpus_file}", "model=hf",
            f"model.name_or_path={llama_dir}", "model.pretrained=false", "model.context_length=32", "test=false",
            "optimizer.lr=1e-3,3e-3", "hydra.sweep.dir=sweep"]  # fmt: skip
    result = run_cli("-m", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "sweep" / "summary.csv").read_text()
    assert summary.count("finished") == 2 and "optimizer.lr=0.003" in summary


def test_pretrained_transformers_gpt2_scores_as_the_imported_one(compose_cfg, pretrained_dir, corpus_file):
    """model=hf on the pretrained directory: its weights and tokenizer, and the same step-0 loss as init_from."""
    losses = []
    for model in (["model=hf", f"model.name_or_path={pretrained_dir}"], [f"model.init_from={pretrained_dir}"]):
        cfg = compose_cfg(*RUN, f"data.path={corpus_file}", *model, "trainer.max_steps=2", "test=false", tiny=False)
        train(cfg)
        losses.append(json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())["initial_val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


# -- any nn.Module: model=module -----------------------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """forward(idx) -> logits: a bigram model."""

    def __init__(self, vocab_size: int, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab_size, dim), nn.Linear(dim, vocab_size)

    def forward(self, idx):
        return self.out(self.embed(idx))


class TupleWithMask(LogitsOnly):
    """forward(input_ids, attention_mask) -> (logits, None): the mask is required."""

    def forward(self, input_ids, attention_mask):
        assert attention_mask.shape == input_ids.shape
        return self.out(self.embed(input_ids)), None


class DictWithPositions(LogitsOnly):
    """forward(input_ids, position_ids, labels=None) -> {"logits", "loss"}: positions required, labels ignored."""

    def __init__(self, vocab_size: int, dim: int = 16) -> None:
        super().__init__(vocab_size, dim)
        self.positions = nn.Embedding(64, dim)

    def forward(self, input_ids, position_ids, labels=None):
        return {"logits": self.out(self.embed(input_ids) + self.positions(position_ids)), "loss": None}


@pytest.mark.parametrize("module", [LogitsOnly, TupleWithMask, DictWithPositions])
def test_modules_of_different_signatures_are_driven(module):
    lm = CausalLM(module(50), context_length=16, vocab_size=50)
    x = torch.randint(0, 50, (3, 16))
    logits, loss = lm(x, x, return_logits=True)
    assert logits.shape == (3, 16, 50)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).item())
    assert lm(x)[1] is None


def test_a_module_trains_through_train_py(compose_cfg, corpus_file):
    cfg = compose_cfg(*RUN, "tokenizer=bpe", "tokenizer.vocab_size=320", f"data.path={corpus_file}", "model=module",
                      "model.module._target_=test_import.DictWithPositions", "+model.module.vocab_size=${model.vocab_size}",
                      "model.context_length=32", "test=false", "optimizer=adamw", tiny=False)  # fmt: skip
    with execution_whitelist("test_import.*"):  # (no hidden matrices for Muon: AdamW)
        train(cfg)
        results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
        assert results["metrics"]["val/loss"] < results["initial_val_loss"]
        model, _ = load_checkpoint(Path(results["best_checkpoint"]))
    assert isinstance(model.module, DictWithPositions) and model.module.out.out_features == 320


class NeedsTemperature(LogitsOnly):
    def forward(self, input_ids, temperature):
        return self.out(self.embed(input_ids)) / temperature


class ReturnsLoss(LogitsOnly):
    def forward(self, input_ids):
        return self.out(self.embed(input_ids)).mean()


class NoArguments(LogitsOnly):
    def forward(self):
        return self.out.weight


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "message"),
    [
        (NeedsTemperature, r"NeedsTemperature.forward\(input_ids, temperature\) cannot be driven: gpt2lab has no "
                           r"value for its required argument temperature. It drives forward\(input_ids, "),
        (ReturnsLoss, r"ReturnsLoss.forward returned a tensor of shape \(\) for token ids of shape \(1, 2\); gpt2lab "
                      r"drives forward\(input_ids"),
        (NoArguments, r"NoArguments.forward\(\) takes no token ids; gpt2lab drives forward\(input_ids"),
    ],
)  # fmt: skip
def test_a_module_that_cannot_be_driven_is_refused_with_the_signature_it_needs(module, message):
    with pytest.raises(ConfigError, match=message):
        CausalLM(module(50), context_length=16)


def test_a_module_with_too_few_logits_is_refused():
    with pytest.raises(ConfigError, match=r"LogitsOnly gives 50 logits per token, fewer than the tokenizer's 320"):
        CausalLM(LogitsOnly(50), context_length=16, vocab_size=320)


def test_init_from_bad_directories_are_refused(tmp_path, pretrained_dir, llama_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"init_from='/nonexistent/gpt2': no such directory"):
        load_pretrained_gpt2("/nonexistent/gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"init_from='.*empty' has no config.json: expected a directory in Hugging"):
        load_pretrained_gpt2(str(tmp_path / "empty"))
    no_weights = tmp_path / "no_weights"
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(no_weights)
    with pytest.raises(ConfigError, match=r"no_weights' has no weights \(none of model.safetensors, "):
        load_pretrained_gpt2(str(no_weights))
    # The hint is required: train such a model as it is, through model=hf
    hint = rf"holds a llama, not a GPT-2: .* train it as it is with model=hf model.name_or_path={re.escape(str(llama_dir))}$"
    with pytest.raises(ConfigError, match=hint):
        load_pretrained_gpt2(str(llama_dir / "."))

    # Weights of another shape: the tensor and both shapes are named
    wrong = tmp_path / "wrong"
    small_gpt2(n_embd=48).save_pretrained(wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"n_embd": 32}))
    with pytest.raises(ConfigError, match=r"tensor wte.weight has shape \(300, 48\), but the model's wte.weight needs "
                                          r"\(300, 32\)"):  # fmt: skip
        load_pretrained_gpt2(str(wrong))

    # A Hub name with the Hub unreachable: one message that says so and what to pass instead
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(
        ConfigError, match=r"init_from='gpt2-medium': the Hub is switched off .* pass a local directory"
    ):
        load_pretrained_gpt2("gpt2-medium")


def test_the_command_line_cannot_quietly_lose_to_pretrained_weights(run_main, tmp_path, pretrained_dir, corpus_file):
    """Issue 27 #6: model.num_layers=4 beside 2-layer weights trained a 2-layer model with only an INFO line, and
    tokenizer=char fed character ids to embeddings trained for BPE. Values given on the command line win, so a
    conflict with the weights is an Error line naming both; a tokenizer with the weights' own vocabulary is fine."""
    common = [*RUN, f"data.path={corpus_file}", f"model.init_from={pretrained_dir}", "trainer.max_steps=2"]
    layers = run_main("gpt2lab.train", *common, "model.num_layers=4", cwd=tmp_path)
    assert layers.returncode == 1
    assert f"Error: model.num_layers=4: model.init_from={pretrained_dir}'s weights have num_layers=2." in layers.stderr
    char = run_main("gpt2lab.train", *common, "tokenizer=char", cwd=tmp_path)
    assert char.returncode == 1
    assert f"Error: tokenizer=char: model.init_from={pretrained_dir}'s weights were trained with the tokenizer of" in (
        char.stderr
    )
    same = ["tokenizer=file", f"tokenizer.path={pretrained_dir / 'tokenizer.json'}", "model.num_layers=2"]
    agreed = run_main("gpt2lab.train", *common, *same, f"hydra.run.dir={tmp_path / 'same'}", cwd=tmp_path)
    assert agreed.returncode == 0, agreed.stderr[-3000:]


def test_bad_input_through_the_command_line(train_cli, tmp_path, corpus_file):
    """Each mistake is one Error line naming the key and the fix, never a traceback."""
    common = [*RUN, f"data.path={corpus_file}", f"hydra.run.dir={tmp_path / 'run'}"]
    module = ["model=module", "model.context_length=8"]
    export = tmp_path / "onnx-export"  # what python -m gpt2lab.export writes beside model.onnx
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "gpt2lab", "gpt2lab": {"d_model": 32}}))
    (export / "model.safetensors").write_bytes(b"")
    cases = [
        (["model.init_from=/nonexistent/dir"], "model.init_from='/nonexistent/dir': no such directory"),
        ([f"model.init_from={export}"], f"model.init_from='{export}' is a gpt2lab ONNX or TorchScript export, whose "
         "weights keep gpt2lab's own names: pass the format=hf export of the same checkpoint"),
        (["model=hf"], "model=hf needs model.name_or_path=<a directory in Hugging Face format"),
        (["model=module"], "model.context_length has no value, and this run needs one: add model.context_length="),
        ([*module, "model.module._target_=torch.nn.Identity"],
         "model.module._target_=torch.nn.Identity is not a trusted target: trust its package with "
         "GPT2LAB_TRUSTED_TARGETS='torch.*'"),
        ([*module, "model.module._target_=test_import.NoSuchLM"],
         "model.module._target_=test_import.NoSuchLM cannot be imported (test_import has no NoSuchLM): check the "
         "class's name and module"),
        ([*module, "model.module._target_=othermod.TinyLM"],
         "model.module._target_=othermod.TinyLM is not a trusted target"),
        # The constructor's arguments: the one forgotten is named, with the signature and how to set it
        ([*module, "model.module._target_=test_import.LogitsOnly"],
         "model.module: test_import.LogitsOnly(vocab_size: int, dim: int = 16) cannot be built from no arguments "
         "(missing a required argument: 'vocab_size'): set its arguments as +model.module.<name>=<value>"),
        ([*module, "model.module._target_=test_import.LogitsOnly", "+model.module.vocab_size=${model.vocab_size}",
          "+model.module.width=8"], "(got an unexpected keyword argument 'width')"),
        # A forward gpt2lab cannot drive: the signature it needs
        ([*module, "model.module._target_=test_import.NeedsTemperature", "+model.module.vocab_size=${model.vocab_size}"],
         "NeedsTemperature.forward(input_ids, temperature) cannot be driven: gpt2lab has no value for its required "
         "argument temperature. It drives forward(input_ids, attention_mask=None, position_ids=None, labels=None)"),
    ]  # fmt: skip
    for args, message in cases:
        with execution_whitelist("test_import.*"):
            result = train_cli(*common, *args, cwd=tmp_path)
        assert result.returncode == 1, args
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
