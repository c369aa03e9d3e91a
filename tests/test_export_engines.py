"""The ``format=hf`` export as serving engines read it (issue 29, "Beyond one machine"): ``vllm serve <dir>`` and a
LitServe ``LitAPI`` that loads the directory. Neither engine runs here; what they take from the directory does, through
transformers' Auto classes and the safetensors file.

What vLLM reads was taken from its source at commit e7dffa6 (the 0.8.5-0.9 line): ``transformers_utils/config.py``
(``AutoConfig.from_pretrained``; ``GenerationConfig.from_pretrained``, falling back to the model config),
``model_executor/models/registry.py`` (``architectures`` picks the model class), ``model_executor/models/gpt2.py``
(the weights it loads and how) and ``config.py`` (``max_model_len``: the smallest of ``max_position_embeddings``,
``n_positions`` and a few other keys, which later versions may also bound by ``tokenizer_config.json``'s
``model_max_length``; sampling defaults from ``generation_config.json``'s temperature, top_k, top_p, min_p,
repetition_penalty and max_new_tokens only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import export_all

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint

pytest.importorskip("transformers")
TEXTS = ["def fibonacci(n):\n    return n", "  tabs\tand\nnewlines, ünïcödé ✓", "a<|endoftext|>b"]
# generation_config.json fields vLLM turns into default sampling parameters (generation_config="auto", its default)
VLLM_SAMPLING_DEFAULTS = {"repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens"}


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_checkpoint(find_checkpoint(str(trained_run), "outputs"))


@pytest.fixture(scope="module")
def hf_dir(trained_run, tmp_path_factory) -> Path:
    """The tiny trained run exported as ``python -m gpt2lab.export ckpt=<run> format=hf output_dir=...`` does it."""
    return export_all(trained_run, tmp_path_factory.mktemp("engines"), "format=hf")


def test_config_is_a_gpt2_that_vllm_builds_with_the_context_as_max_model_len(hf_dir, trained):
    """vLLM picks its model class by ``architectures`` and builds it from ``AutoConfig``; the asserts in its
    ``GPT2Model`` must hold; ``max_model_len`` is the smallest length key, here the context."""
    from transformers import AutoConfig, AutoTokenizer

    model, _ = trained
    config = AutoConfig.from_pretrained(hf_dir)
    assert config.model_type == "gpt2" and config.architectures == ["GPT2LMHeadModel"]
    assert config.n_positions == config.max_position_embeddings == model.config.context_length
    assert config.hidden_size == model.config.d_model and config.hidden_size % config.num_attention_heads == 0
    assert config.n_inner == model.config.d_ff and config.activation_function == "gelu_new"
    assert not (config.add_cross_attention or config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn)
    assert config.tie_word_embeddings  # vLLM's lm_head is the embedding; the file need not hold lm_head.weight
    # Every id the tokenizer can produce has a row: a vocabulary larger than the model's would index past wte
    assert config.vocab_size == model.config.vocab_size == len(AutoTokenizer.from_pretrained(hf_dir))
    # Newer vLLM also bounds max_model_len by the tokenizer's model_max_length: the same number, so no surprise
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["model_max_length"] == config.n_positions


def test_tokenizer_is_fast_and_encodes_as_gpt2lab_with_the_configs_special_ids(hf_dir, trained):
    """vLLM (tokenizer_mode=auto) loads ``AutoTokenizer`` and warns on a slow one; a completion prompt is
    encoded with the special tokens a tokenizer adds (GPT-2 adds none, as gpt2lab's own generation does not)
    and stops at ``eos_token_id``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    _, tokenizer = trained
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tokenizer.is_fast
    for text in TEXTS:
        ids = hf_tokenizer(text, add_special_tokens=True).input_ids
        assert ids == tokenizer.encode(text).ids
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)
    # vLLM detokenizes with skip_special_tokens=True unless asked: the end of text is special and leaves no trace
    ids = hf_tokenizer(TEXTS[0]).input_ids + [hf_tokenizer.eos_token_id]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[0]
    config, generation = AutoConfig.from_pretrained(hf_dir), GenerationConfig.from_pretrained(hf_dir)
    for ids in (config, generation):
        assert ids.eos_token_id == hf_tokenizer.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
        assert ids.bos_token_id == hf_tokenizer.bos_token_id and ids.pad_token_id == hf_tokenizer.pad_token_id
    assert hf_tokenizer.pad_token_id != hf_tokenizer.eos_token_id
    # A plain language model has no chat template: vLLM's /v1/chat/completions refuses it, as gpt2lab serve does
    assert hf_tokenizer.chat_template is None


def test_generation_config_gives_eos_and_the_context_but_no_sampling_defaults(hf_dir, trained):
    """vLLM adds ``generation_config.json``'s eos to each request's stop tokens and takes sampling defaults from it:
    the export sets none, so a request's temperature and top_p are vLLM's (and OpenAI's) defaults."""
    from transformers import GenerationConfig

    model, _ = trained
    generation = GenerationConfig.from_pretrained(hf_dir)
    assert generation.eos_token_id is not None and generation.max_length == model.config.context_length
    assert not VLLM_SAMPLING_DEFAULTS & set(generation.to_diff_dict())


def test_automodel_logits_are_gpt2labs(hf_dir, trained):
    """What a LitServe ``LitAPI`` would load in ``setup(device)``: ``AutoModelForCausalLM`` on the directory."""
    from transformers import AutoModelForCausalLM

    model, _ = trained
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, model.config.context_length), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4


def vllm_weight_names(num_layers: int) -> set[str]:
    """The parameters of vLLM's ``GPT2LMHeadModel`` (e7dffa6 ``gpt2.py``) that a checkpoint fills, besides the tied
    ``lm_head.weight``."""
    per_layer = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    names = {
        f"transformer.h.{i}.{part}.{kind}"
        for i in range(num_layers)
        for part in per_layer
        for kind in ("weight", "bias")
    }
    return names | {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }


def vllm_view(directory: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` as vLLM's GPT-2 ``load_weights`` takes it: the attention masks skipped, ``transformer.``
    put in front of a bare name, and the Conv1D matrices (``c_attn``, ``c_proj``, ``c_fc``) transposed into
    ``nn.Linear`` layout."""
    from safetensors.torch import load_file

    weights = {}
    for name, tensor in load_file(directory / "model.safetensors").items():
        if ".attn.bias" in name or ".attn.masked_bias" in name:
            continue
        name = name if name.startswith(("transformer.", "lm_head")) else "transformer." + name
        conv1d = any(part in name for part in ("c_attn", "c_proj", "c_fc")) and name.endswith(".weight")
        weights[name] = tensor.t() if conv1d else tensor
    return weights


def layer_norm(w: dict[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)


def linear(w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def linear_layout_logits(w: dict[str, torch.Tensor], config, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward over ``nn.Linear``-layout weights, with q, k, v split from ``c_attn``'s output in that order,
    as vLLM's ``GPT2Attention`` splits it: the transposes above are the right ones only if this gives the logits."""
    heads, eps = config.num_attention_heads, config.layer_norm_epsilon
    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][torch.arange(ids.shape[1])]  # (B, T, C)
    for i in range(config.num_hidden_layers):
        h = f"transformer.h.{i}."
        qkv = linear(w, h + "attn.c_attn", layer_norm(w, h + "ln_1", x, eps)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv)  # (B, nh, T, hs)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + linear(w, h + "attn.c_proj", attended)
        hidden = F.gelu(linear(w, h + "mlp.c_fc", layer_norm(w, h + "ln_2", x, eps)), approximate="tanh")  # gelu_new
        x = x + linear(w, h + "mlp.c_proj", hidden)
    x = layer_norm(w, "transformer.ln_f", x, eps)
    return x @ w.get("lm_head.weight", w["transformer.wte.weight"]).T


def test_safetensors_holds_what_vllms_gpt2_loader_expects(hf_dir, trained):
    """One ``model.safetensors`` (vLLM's default load_format tries safetensors first), no pickles, and after vLLM's
    renaming exactly its GPT-2 parameters, of their shapes; through its transposes they give gpt2lab's logits."""
    from transformers import AutoConfig

    model, _ = trained
    assert [p.name for p in hf_dir.glob("*.safetensors")] == ["model.safetensors"]
    assert not [p for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    config = AutoConfig.from_pretrained(hf_dir)
    weights = vllm_view(hf_dir)
    assert set(weights) - {"lm_head.weight"} == vllm_weight_names(config.num_hidden_layers)
    d, inner = config.hidden_size, config.n_inner
    assert weights["transformer.wte.weight"].shape == (config.vocab_size, d)
    assert weights["transformer.wpe.weight"].shape == (config.n_positions, d)
    for i in range(config.num_hidden_layers):
        shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (inner, d), "mlp.c_proj": (d, inner)}
        for part, shape in shapes.items():
            assert weights[f"transformer.h.{i}.{part}.weight"].shape == shape
            assert weights[f"transformer.h.{i}.{part}.bias"].shape == shape[:1]
    ids = torch.randint(0, config.vocab_size, (2, config.n_positions), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (linear_layout_logits(weights, config, ids) - model(ids)[0]).abs().max() < 1e-4
