"""gpt2lab's GPT-2 as a transformers GPT2LMHeadModel: the same logits and the same greedy tokens. Pretrained weights
whose tokenizer a data format extends (data.format=chat): the added tokens get rows, the pretrained ones stay."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gpt2lab.model import GPT2Config, GPT2Model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("use_bias", [True, False])
def test_transformers_copy_computes_the_same_logits_and_tokens(use_bias):
    """Also for a model without biases (model.use_bias=false), which transformers' GPT-2 gets as zero biases, so
    that format=hf (and the default format=all) exports it."""
    from gpt2lab.hf import from_transformers, to_transformers

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, context_length=64, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0, use_bias=use_bias)  # fmt: skip
    model = GPT2Model(config).eval()
    with torch.no_grad():  # LayerNorm weights other than ones, so that a misplaced tensor shows
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = to_transformers(model)
    if not use_bias:
        assert not hf.transformer.h[0].attn.c_attn.bias.any() and not hf.transformer.ln_f.bias.any()
        back = from_transformers(hf, use_bias=False, dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
        assert back.config == config
    x = torch.randint(0, 1000, (2, 30))
    assert (model(x)[0] - hf(x).logits).abs().max() < 1e-5
    ours = model.generate(x, 12, do_sample=False)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert torch.equal(ours, theirs)


def test_hf_round_trip_back_into_gpt2lab_gives_the_same_weights():
    """gpt2lab -> transformers -> gpt2lab: every tensor comes back (padding rows zero), and the logits with it."""
    from gpt2lab.hf import from_transformers, to_transformers

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, context_length=64, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)  # fmt: skip
    model = GPT2Model(config).eval()
    back = from_transformers(to_transformers(model), dropout=0.0, attention_dropout=0.0, residual_dropout=0.0).eval()
    assert back.config == config
    for name, tensor in model.state_dict().items():
        expected = tensor[: config.vocab_size] if name in ("wte.weight", "lm_head.weight") else tensor
        assert torch.equal(back.state_dict()[name][: len(expected)], expected), name
    x = torch.randint(0, 1000, (2, 30))
    assert torch.equal(back(x)[0], model(x)[0])


def test_decode_bench_puts_transformers_beside_gpt2lab():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.bench", "decode", "--model", "gpt2-tiny", "-b", "1", "2", "--prompt", "8",
         "--new", "8", "--repeats", "1", "--busy-ok"],  # pytest may share the cores
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "tokens/s" in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "gpt2lab generate (dynamic cache, eager)",  # on a GPU, the CUDA-graph row comes first
        "transformers generate, dynamic cache",
    ]
    assert all(len(re.findall(r"[\d,]+ tokens/s", row)) == 2 for row in rows)  # batch 1 and batch 2
    assert "gpt2lab (fastest row) / transformers generate, dynamic cache: " in result.stdout


# -- pretrained GPT-2 plus tokens a data format adds (data.format=chat): the vocabulary grows -------------------
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, corpus_file):
    """A random transformers GPT-2 of 300 tokens (gpt2lab pads it to 320), saved with its 300-token tokenizer."""
    from test_import import VOCAB, save_with_tokenizer, small_gpt2

    from gpt2lab.tokenizers import train_bpe

    bpe = train_bpe([corpus_file.read_text()], VOCAB, show_progress=False)
    assert bpe.get_vocab_size() == VOCAB
    return save_with_tokenizer(small_gpt2(), bpe, tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    from test_formats import write_records

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    write_records(path, "chat")
    return path


def chat_args(pretrained_dir, chat_file, *more: str) -> list[str]:
    """A chat fine-tuning run from ``pretrained_dir``: its architecture and tokenizer, the chat fixture's data."""
    from test_formats import FORMAT_RUN

    keep = [o for o in FORMAT_RUN if not o.startswith(("tokenizer", "model."))]
    return ["data=chat", "data.source=files", f"data.path={chat_file}", *keep, "test=false", *more]


def test_chat_fine_tuning_of_pretrained_gpt2_gives_the_chat_tokens_mean_rows(
    compose_cfg, pretrained_dir, chat_file, caplog
):
    """model.init_from=<dir> data=chat: the tokenizer's 300 tokens plus the template's 4 get 304 rows (still padded to
    320); the pretrained rows are the weights' own (the step-0 validation loss is that of the directly loaded model,
    whose logits over the pretrained vocabulary are transformers'), the new rows their mean; then it trains."""
    from gpt2lab.checkpoint import load_checkpoint
    from gpt2lab.data.formats import split_batch
    from gpt2lab.hf import load_pretrained_weights
    from gpt2lab.model.cross_entropy import IGNORE_INDEX
    from gpt2lab.train.run import train_run

    cfg = compose_cfg(*chat_args(pretrained_dir, chat_file, f"model.init_from={pretrained_dir}"), tiny=False)
    caplog.set_level("INFO")
    run = train_run(cfg)
    assert "Vocabulary: 4 rows added to the pretrained 300 (model.vocab_size=304)" in caplog.text
    assert ", ".join(CHAT_TOKENS) in caplog.text
    assert [run.tokenizer.token_to_id(t) for t in CHAT_TOKENS] == [300, 301, 302, 303]
    assert run.results["global_step"] == 4 and math.isfinite(run.results["metrics"]["train/loss"])
    model, tokenizer = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert (model.config.vocab_size, model.config.padded_vocab_size) == (304, 320)
    assert tokenizer.token_to_id("<|end|>") == 303

    # The model as the run started: built as train.py builds it, the weights loaded as train.py loads them
    start = GPT2Model(dataclasses.replace(model.config, dropout=0.0, attention_dropout=0.0, residual_dropout=0.0))
    load_pretrained_weights(start, str(pretrained_dir))
    start.eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    wte = hf.transformer.wte.weight.detach()
    assert torch.equal(start.wte.weight[:300], wte)
    assert torch.allclose(start.wte.weight[300:304], wte.mean(0).expand(4, -1), atol=1e-7)
    assert not start.wte.weight[304:].any() and start.lm_head.weight is start.wte.weight
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (start(x)[0][..., :300] - hf(x).logits).abs().max() < 1e-5

    # ... whose validation loss on the run's validation windows is the run's step-0 loss (the data and model as the
    # run resolved them, which config.yaml records: the window follows the architecture init_from set)
    datamodule = run_datamodule(OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml"), run.tokenizer)
    nats = tokens = 0.0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            inputs, labels = split_batch(batch)
            n = (labels != IGNORE_INDEX).sum()
            nats += float(start(inputs, labels)[1]) * float(n)
            tokens += float(n)
            assert (inputs >= 300).any() or (labels >= 300).any()  # the chat tokens are in the windows
    assert run.results["initial_val_loss"] == pytest.approx(nats / tokens, abs=1e-5)


def run_datamodule(cfg, tokenizer):
    from hydra.utils import execution_whitelist, instantiate

    from gpt2lab.tokenizers import TokenizerSpec

    with execution_whitelist("gpt2lab.*"):
        datamodule = instantiate(cfg.data, tokenizer=TokenizerSpec(kind="pretrained", name=cfg.model.init_from))
    datamodule.setup()
    assert datamodule.tokenizer.get_vocab_size() == tokenizer.get_vocab_size()
    return datamodule


def test_init_from_without_added_tokens_keeps_the_weights_vocabulary(compose_cfg, pretrained_dir, corpus_file, caplog):
    """Plain text from the same directory: no rows added, the model has the weights' 300."""
    from gpt2lab.train.run import train_run

    keep = [o for o in chat_args(pretrained_dir, corpus_file) if not o.startswith("data")]
    cfg = compose_cfg("data=files", f"data.path={corpus_file}", *keep, f"model.init_from={pretrained_dir}",
                      "trainer.max_steps=2", tiny=False)  # fmt: skip
    caplog.set_level("INFO")
    run = train_run(cfg)
    assert run.model.config.vocab_size == 300 and "rows added" not in caplog.text


def test_transformers_model_grows_with_its_own_resize(compose_cfg, pretrained_dir, chat_file, caplog):
    """model=hf on the pretrained directory with data=chat: transformers' resize_token_embeddings gives the 4 chat
    tokens rows (the pretrained rows untouched), and it trains."""
    from gpt2lab.train.run import train_run

    cfg = compose_cfg(*chat_args(pretrained_dir, chat_file, "model=hf", f"model.name_or_path={pretrained_dir}",
                                 "model.context_length=64", "trainer.max_steps=2"), tiny=False)  # fmt: skip
    caplog.set_level("INFO")
    run = train_run(cfg)
    assert "Vocabulary: 4 rows added to the pretrained 300 (model.vocab_size=304)" in caplog.text
    module = run.model.module
    assert module.config.vocab_size == 304 and module.get_input_embeddings().weight.shape[0] == 304
    assert module.get_output_embeddings().weight is module.get_input_embeddings().weight  # still tied
    assert run.results["global_step"] == 2 and math.isfinite(run.results["initial_val_loss"])


def test_init_from_a_hub_name_offline_is_one_error_naming_the_fix(run_main, tmp_path, monkeypatch, chat_file):
    """preset=chat's model.init_from=gpt2 with the Hub switched off and nothing cached: one Error line that names
    model.init_from and asks for a local directory in Hugging Face format, before any data is read."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_main("gpt2lab.train", "model.init_from=gpt2", "data=chat", "data.source=files",
                      f"data.path={chat_file}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: model.init_from='gpt2': the Hub is switched off")
    assert "pass a local directory in Hugging Face format instead" in errors[0]
    assert "Traceback" not in result.stderr
