"""Hugging Face ``transformers`` interop: gpt2lab's GPT-2 and ``GPT2LMHeadModel`` both ways, and any causal LM in.

- ``to_transformers(model)``: gpt2lab's GPT-2 as a ``GPT2LMHeadModel`` with the same weights.
- ``from_transformers(hf_model)`` and ``load_pretrained_gpt2(name_or_dir)``: GPT-2 weights of any size into
  ``GPT2Model``; ``model.init_from=<dir or Hub name>`` in training (``import_model_config``, ``load_gpt2_weights``),
  with rows added for tokens a data format adds to the pretrained tokenizer (``grow_vocab``).
- ``causal_lm(name_or_path)``: any ``AutoModelForCausalLM`` as a ``CausalLM`` that GPT2LitModule trains
  (``model=hf``).

transformers' GPT-2 keeps the projections in ``Conv1D`` layers, whose weights are the transpose of ``nn.Linear``'s,
and has no vocabulary padding (gpt2lab pads the embedding to a multiple of 64). Reading GPT-2 weights needs only
``safetensors`` (or torch, for ``pytorch_model.bin``); ``to_transformers`` and ``model=hf`` need ``transformers``
(``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from gpt2lab import hub
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Config, GPT2Model
from gpt2lab.model.adapter import CausalLM, is_gpt2

log = logging.getLogger(__name__)

HUB_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")  # also as openai-community/<name>
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# GPT2Config key <- transformers' GPT2Config key
GPT2_KEYS = {"vocab_size": "vocab_size", "context_length": "n_positions", "d_model": "n_embd", "num_heads": "n_head",
             "num_layers": "n_layer", "layer_norm_epsilon": "layer_norm_epsilon"}  # fmt: skip
# Settings of transformers' GPT-2 that gpt2lab's model does not have: only their defaults can be imported.
GPT2_FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
              "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
              "add_cross_attention": (False,), "tie_word_embeddings": (True,)}  # fmt: skip


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError('transformers is not installed: pip install -e ".[hf]"') from e
    return transformers


def gpt2_tensor_names(num_layers: int) -> Iterator[tuple[str, str, bool]]:
    """(gpt2lab name, transformers name, transposed) for every tensor of GPT-2; transformers' names without the
    ``transformer.`` prefix. The Conv1D projections are transposed; the output layer is tied to ``wte``."""
    yield from (("wte.weight", "wte.weight", False), ("wpe.weight", "wpe.weight", False))
    for i in range(num_layers):
        for ours, theirs, transposed in (
            ("ln_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
            ("ln_2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True),
        ):  # fmt: skip
            yield f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", transposed
            yield f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False
    yield from (("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False))


def to_transformers(model: GPT2Model) -> Any:
    """A ``transformers.GPT2LMHeadModel`` computing the same logits as ``model`` (float32: within 1e-5). A model
    without biases (``use_bias=False``) gets zero biases, where transformers' GPT-2 has them: the same function."""
    transformers = _transformers()
    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model, n_layer=c.num_layers,
        n_head=c.num_heads, n_inner=c.d_ff, activation_function="gelu_new", layer_norm_epsilon=c.layer_norm_epsilon,
        bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    ours["wte.weight"] = ours["wte.weight"][: c.vocab_size]  # no padding rows
    for name, _, _ in gpt2_tensor_names(c.num_layers):
        if name not in ours:  # use_bias=False: a zero bias of the layer's width
            weight = ours[name.removesuffix("bias") + "weight"]
            ours[name] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    state = {
        "transformer." + theirs: ours[name].T if transposed else ours[name]
        for name, theirs, transposed in gpt2_tensor_names(c.num_layers)
    }
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to wte
        raise RuntimeError(f"weights did not map onto transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.wte.weight.device).eval()


def from_transformers(hf_model: Any, **overrides: Any) -> GPT2Model:
    """A ``GPT2Model`` computing the same logits as a ``transformers`` GPT-2 (``GPT2LMHeadModel``); ``overrides``
    are GPT2Config fields other than the architecture (dropout, ``use_bias=False`` for zero biases, ...)."""
    config = gpt2_config(hf_model.config.to_dict(), GPT2Config(**overrides), source="the transformers model")[0]
    model = GPT2Model(config)
    load_gpt2_weights(model, hf_model.state_dict(), source="the transformers model")
    return model.to(next(hf_model.parameters()).device)


def load_pretrained_gpt2(name_or_path: str, **overrides: Any) -> GPT2Model:
    """GPT-2 weights from a directory in Hugging Face format, or by Hub name (``gpt2`` ... ``gpt2-xl``,
    ``distilgpt2``), as a ``GPT2Model``; ``overrides`` as for ``from_transformers``."""
    directory = pretrained_dir(name_or_path, key="init_from")
    config = gpt2_config(read_config(directory, "init_from"), GPT2Config(**overrides), name_or_path, "init_from")[0]
    model = GPT2Model(config)
    load_gpt2_weights(model, read_weights(directory, "init_from"), name_or_path, "init_from")
    return model


# -- model.init_from: a pretrained GPT-2 into training ------------------------------------------------------------
def import_model_config(model_cfg: DictConfig) -> str | None:
    """Before any data is read: check the Hugging Face source ``model_cfg`` names and write into it what comes from
    there (the architecture of ``model.init_from``; the context and vocabulary of ``model=hf``). Returns where the
    run's tokenizer comes from (a directory or Hub name), or None to keep the configured one."""
    if is_gpt2(model_cfg):
        if not model_cfg.get("init_from"):
            return None
        directory = pretrained_dir(model_cfg.init_from, key="model.init_from")
        weights_file(directory, "model.init_from")  # a directory without weights fails now, not after the data
        base = GPT2Config(**{k: v for k, v in model_cfg.items() if k != "_target_"})
        hf_config = read_config(directory, "model.init_from")
        config, changed = gpt2_config(hf_config, base, model_cfg.init_from, "model.init_from")
        for key in GPT2_KEYS.keys() | {"d_ff"}:
            model_cfg[key] = getattr(config, key)
        model_cfg.init_from = str(directory)  # a Hub name, resolved: config.yaml records the files used
        if changed:
            log.info("model.init_from=%s sets the architecture: %s", directory, ", ".join(changed))
        return str(directory)
    if model_cfg.get("_target_") == "gpt2lab.model.adapter.CausalLM" and OmegaConf.is_missing(
        model_cfg.module, "_target_"
    ):
        raise ConfigError(
            "model=module needs your nn.Module: model.module._target_=<package.Class>, its arguments as "
            "+model.module.<name>=<value>, and GPT2LAB_TRUSTED_TARGETS='<package>.*'"
        )
    if model_cfg.get("_target_") != "gpt2lab.hf.causal_lm":
        return None
    if OmegaConf.is_missing(model_cfg, "name_or_path"):
        raise ConfigError(
            "model=hf needs model.name_or_path=<a directory in Hugging Face format (config.json, and weights unless "
            "model.pretrained=false), or a Hub name such as EleutherAI/pythia-70m>"
        )
    hf_config = _auto_config(model_cfg.name_or_path)
    local = Path(model_cfg.name_or_path).expanduser()
    if model_cfg.pretrained and local.is_dir():
        weights_file(local, "model.name_or_path", "; model.pretrained=false trains its architecture from scratch")
    if model_cfg.context_length is None:
        positions = _max_positions(hf_config)
        model_cfg.context_length = min(positions, 1024) if positions else 1024
        log.info(
            "model.context_length=%d (%s allows %s positions; set model.context_length to train other windows)",
            model_cfg.context_length, model_cfg.name_or_path, positions,
        )  # fmt: skip
    if not model_cfg.pretrained:
        return None  # a fresh model: the configured tokenizer, and the model's vocabulary follows it
    model_cfg.vocab_size = hf_config.vocab_size
    if local.is_dir():
        return str(local) if any((local / f).is_file() for f in ("tokenizer.json", "vocab.json")) else None
    return model_cfg.name_or_path


def pretrained_dir(name_or_path: str, key: str) -> Path:
    """The local directory ``name_or_path`` names, or the Hub model's files downloaded (config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}={name_or_path!r} has no config.json: expected a directory in Hugging Face format "
                "(config.json and model.safetensors, as save_pretrained writes them)"
            )
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(
            f"{key}={name_or_path!r}: no such directory (a directory in Hugging Face format, or a Hub name such as "
            f"{', '.join(HUB_GPT2)})"
        )
    offline = hub.go_offline_if_unreachable()
    from huggingface_hub import snapshot_download

    try:
        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
        directory = Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=bool(offline)))
        if not any((directory / f).is_file() for f in WEIGHT_FILES[:2]):  # an older repository: pickled weights
            patterns = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
            directory = Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=bool(offline)))
    except Exception as e:  # huggingface_hub's errors for unknown repositories, no network, no cache
        if offline:
            raise ConfigError(
                f"{key}={name_or_path!r}: {offline}, and it is not in the local cache: pass a local directory in "
                "Hugging Face format instead (config.json and model.safetensors, as save_pretrained writes them)"
            ) from e
        raise ConfigError(
            f"{key}={name_or_path!r}: neither a local directory nor a model on the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
    return directory


def read_config(directory: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={str(directory)!r}: config.json is not readable JSON ({e})") from e


def gpt2_config(
    hf_config: Mapping[str, Any], base: GPT2Config, source: str, key: str | None = None
) -> tuple[GPT2Config, list[str]]:
    """``base`` with the architecture of a transformers GPT-2 config; also the changed keys, as ``key: old -> new``.
    ``key`` is the setting that named ``source`` (``model.init_from``), for the error messages."""
    where = f"{key}={source!r}" if key else repr(source)
    model_type = hf_config.get("model_type")
    if model_type == "gpt2lab":  # config.json of python -m gpt2lab.export's onnx and torchscript directories
        raise ConfigError(
            f"{where} is a gpt2lab ONNX or TorchScript export, whose weights keep gpt2lab's own names: pass the "
            "format=hf export of the same checkpoint (python -m gpt2lab.export ckpt=... format=hf output_dir=...)"
        )
    if model_type != "gpt2":
        raise ConfigError(
            f"{where} holds a {model_type or 'model of unknown type'}, not a GPT-2: gpt2lab's own model loads GPT-2 "
            f"weights only; train it as it is with model=hf model.name_or_path={source}"
        )
    for name, allowed in GPT2_FIXED.items():
        if name in hf_config and hf_config[name] not in allowed:
            raise ConfigError(
                f"{where}: {name}={hf_config[name]!r} in its config.json, which gpt2lab's GPT-2 does not have "
                f"(it has {allowed[0]!r}); train it with model=hf model.name_or_path={source}"
            )
    values = {ours: hf_config[theirs] for ours, theirs in GPT2_KEYS.items() if hf_config.get(theirs) is not None}
    values["d_ff"] = hf_config.get("n_inner") or 4 * values["d_model"]
    changed = [f"{k}: {getattr(base, k)} -> {v}" for k, v in values.items() if getattr(base, k) != v]
    fields = {k: v for k, v in vars(base).items() if k in GPT2Config.__dataclass_fields__}
    return GPT2Config(**(fields | values)), changed


def weights_file(directory: Path, key: str, hint: str = "") -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(
        f"{key}={str(directory)!r} has no weights (none of {', '.join(WEIGHT_FILES)}): a directory in Hugging Face "
        f"format holds config.json and model.safetensors, as save_pretrained writes them{hint}"
    )


def read_weights(directory: Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model directory: safetensors (sharded or not), else ``pytorch_model.bin``
    (read with ``weights_only``: never runs code from the file)."""
    path = weights_file(directory, key)
    files = (
        sorted({directory / f for f in json.loads(path.read_text())["weight_map"].values()})
        if path.name.endswith(".index.json")
        else [path]
    )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ConfigError(f'{key}={str(directory)!r}: reading safetensors: pip install -e ".[hf]"') from e
            state |= load_file(str(file))
        else:
            state |= torch.load(file, map_location="cpu", weights_only=True)
    return state


def load_pretrained_weights(model: GPT2Model, directory: str) -> None:
    """``model.init_from``: the GPT-2 weights of a directory in Hugging Face format into ``model``."""
    load_gpt2_weights(model, read_weights(Path(directory), "model.init_from"), directory, "model.init_from")


@torch.no_grad()
def load_gpt2_weights(model: GPT2Model, state: Mapping[str, torch.Tensor], source: str, key: str | None = None) -> None:
    """Copy transformers' GPT-2 tensors (``GPT2LMHeadModel`` or ``GPT2Model`` names) into ``model``: Conv1D weights
    transposed, the vocabulary into the first rows of the padded embedding. Every tensor must be there with the
    model's shape, except that the model may have more vocabulary rows (tokens added to the pretrained tokenizer,
    ``grow_vocab``): they start as the mean of the pretrained rows. With ``use_bias=False`` every bias must be zero
    (the model has no place for it)."""
    where = f"{key}={source!r}" if key else repr(source)
    theirs = {k.removeprefix("transformer."): v for k, v in state.items()}
    head = theirs.pop("lm_head.weight", None)
    for name in [k for k in theirs if k.endswith((".attn.bias", ".attn.masked_bias")) and theirs[k].dim() != 1]:
        del theirs[name]  # the causal mask of older transformers versions, saved as a buffer
    ours = model.state_dict()
    c = model.config
    embedding = None
    for name, their_name, transposed in gpt2_tensor_names(c.num_layers):
        if their_name not in theirs:
            raise ConfigError(f"{where} has no tensor {their_name!r}, which GPT-2 has: is it a complete GPT-2?")
        tensor = theirs.pop(their_name)
        tensor = tensor.T if transposed else tensor
        if name not in ours:  # a bias of a model without biases
            if tensor.any():
                raise ConfigError(
                    f"{where}: {their_name} is not zero, and model.use_bias=false has no place for it; "
                    "keep model.use_bias=true (GPT-2 has biases)"
                )
            continue
        target = ours[name]
        if name == "wte.weight":
            embedding = tensor
            target = target[: min(len(tensor), c.vocab_size)]
        if tensor.shape != target.shape:
            shown = tuple(tensor.T.shape if transposed else tensor.shape)
            raise ConfigError(
                f"{where}: tensor {their_name} has shape {shown}, but the model's {name} needs "
                f"{tuple(target.T.shape if transposed else target.shape)} (in transformers' layout)"
            )
        target.copy_(tensor)
    if left := sorted(theirs):
        raise ConfigError(f"{where} has tensors GPT-2 does not: {', '.join(left[:5])}")
    rows = len(embedding)
    if head is not None and not torch.equal(head, ours["wte.weight"][:rows].to(head.dtype)):
        raise ConfigError(f"{where}: lm_head.weight is not tied to wte.weight, as gpt2lab's GPT-2 (and GPT-2) has it")
    # Rows for added tokens: an average token's embedding (as transformers' resize_token_embeddings does), so their
    # inputs look like text the model knows and their logits (tied) start at an ordinary level, neither dominating
    # the softmax nor out of reach
    model.wte.weight[rows : c.vocab_size] = embedding.mean(0, dtype=torch.float32).to(model.wte.weight.dtype)
    model.wte.weight[c.vocab_size :] = 0.0  # the padding rows: never a target (their logits are -inf in the loss)


def grow_vocab(model_cfg: DictConfig, tokenizer: Tokenizer) -> None:
    """Pretrained weights with their own tokenizer, to which a data format added tokens (``data.format=chat``'s role
    and end tokens): ``model.vocab_size`` grows to the tokenizer's, so that those tokens get rows.
    ``load_gpt2_weights`` starts gpt2lab's new rows at the mean of the pretrained ones; ``causal_lm`` resizes a
    transformers model with its own ``resize_token_embeddings``. A tokenizer no larger than the weights changes
    nothing: the rows it does not use stay."""
    rows, vocab = model_cfg.get("vocab_size"), tokenizer.get_vocab_size()
    if rows is None or vocab <= rows:
        return
    added = [tokenizer.id_to_token(i) for i in range(rows, vocab)]
    shown = ", ".join(map(str, added[:8])) + (f" and {len(added) - 8} more" if len(added) > 8 else "")
    log.info(
        "Vocabulary: %d rows added to the pretrained %d (model.vocab_size=%d) for the tokens the tokenizer has beyond "
        "them (%s), initialised from the mean of the pretrained embeddings",
        len(added), rows, vocab, shown,
    )  # fmt: skip
    model_cfg.vocab_size = vocab


# -- model=hf: any causal language model of transformers ----------------------------------------------------------
def _auto_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    transformers = _transformers()
    local = Path(name_or_path).expanduser()
    if not local.is_dir() and (local.exists() or name_or_path.startswith((".", "/", "~"))):
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no such directory (a local directory or a Hub name)")
    offline = None if local.is_dir() else hub.go_offline_if_unreachable()
    try:
        return transformers.AutoConfig.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                                       trust_remote_code=trust_remote_code)  # fmt: skip
    except (OSError, ValueError) as e:
        why = f"{offline}, and it is not in the local cache; pass a local directory" if offline else f"{e}"
        raise ConfigError(f"model.name_or_path={name_or_path!r}: no model config there ({why})") from e


def _max_positions(hf_config: Any) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        if isinstance(getattr(hf_config, name, None), int):
            return getattr(hf_config, name)
    return None


def causal_lm(
    name_or_path: str,
    pretrained: bool = True,
    context_length: int | None = None,
    vocab_size: int | None = None,
    trust_remote_code: bool = False,
    config: dict[str, Any] | None = None,
) -> CausalLM:
    """A ``transformers.AutoModelForCausalLM`` (``model=hf``): with ``pretrained``, the weights at ``name_or_path``
    (resized by transformers, new rows around the mean, to ``vocab_size`` when that is larger); else the architecture
    only, freshly initialised, with ``vocab_size`` rows. ``config`` (a checkpoint's record of the architecture) builds
    it without reading ``name_or_path``."""
    transformers = _transformers()
    if config is not None:
        hf_config = transformers.AutoConfig.for_model(**config)
    else:
        hf_config = _auto_config(name_or_path, trust_remote_code)
    if pretrained and config is None:
        local = Path(name_or_path).expanduser()
        source = str(local) if local.is_dir() else name_or_path
        if local.is_dir():
            weights_file(local, "model.name_or_path")  # transformers' own message names neither key nor fix
        module = transformers.AutoModelForCausalLM.from_pretrained(
            source, config=hf_config, trust_remote_code=trust_remote_code
        )
        if vocab_size and vocab_size > module.config.vocab_size:  # tokens added to its tokenizer (grow_vocab)
            module.resize_token_embeddings(vocab_size, mean_resizing=True)
    else:
        if vocab_size and config is None:
            hf_config.vocab_size = vocab_size
        module = transformers.AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    context_length = context_length or _max_positions(hf_config) or 1024
    spec = {
        "_target_": "gpt2lab.hf.causal_lm", "name_or_path": name_or_path, "pretrained": False,
        "context_length": context_length, "vocab_size": module.config.vocab_size,
        "trust_remote_code": trust_remote_code, "config": json.loads(module.config.to_json_string(use_diff=True)),
    }  # fmt: skip
    return CausalLM(module, context_length, vocab_size=vocab_size, spec=spec)
