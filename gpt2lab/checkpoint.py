"""gpt2lab checkpoints (Lightning ``.ckpt`` files): the payload gpt2lab adds to them, and finding, checking and
loading them.

Lightning writes the weights, optimizer and loop state; gpt2lab adds one entry, ``checkpoint["gpt2lab"]``
(``Payload``): the tokenizer, the chat template of a chat-format run, and the RNG states, so that a checkpoint
alone rebuilds the model with its tokenizer and a resumed run draws the same dropout masks. It is written
(``write_payload``, from the LightningModule's ``on_save_checkpoint``) and read (``read_payload``) here only."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from gpt2lab.config.schemas import OPTIMIZER_OPTIONS, SCHEDULE_OPTIONS
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Model
from gpt2lab.model.adapter import CausalLM, build_model

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "gpt2lab"
CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class Payload:
    """What gpt2lab keeps in a checkpoint beside Lightning's state."""

    tokenizer: Tokenizer | None = None
    chat_template: dict[str, Any] | None = None  # ChatTemplate.to_dict() of a data.format=chat run
    rng: dict[str, Any] | None = None  # read back only: written as the RNG states at the time of writing


def write_payload(checkpoint: dict[str, Any], payload: Payload) -> None:
    """Add ``payload`` to a checkpoint Lightning is writing, with the RNG states of this moment."""
    checkpoint[CHECKPOINT_KEY] = {
        "format": CHECKPOINT_FORMAT,
        "tokenizer": payload.tokenizer.to_str() if payload.tokenizer is not None else None,
        "chat_template": payload.chat_template,
        "rng": rng_states(),
    }


def read_payload(checkpoint: dict[str, Any]) -> Payload:
    """The payload of a loaded checkpoint (empty for a checkpoint written without one)."""
    extra = checkpoint.get(CHECKPOINT_KEY, {})
    tokenizer = Tokenizer.from_str(extra["tokenizer"]) if extra.get("tokenizer") else None
    return Payload(tokenizer, extra.get("chat_template"), extra.get("rng"))


def rng_states() -> dict[str, Any]:
    # Plain lists and tensors only, so that checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_ckpt_path(
    ckpt_path: str | None,
    log_dir: str | os.PathLike,
    exclude: Path | None = None,
    model: dict[str, Any] | None = None,
) -> str | None:
    """The checkpoint ``ckpt_path`` names: ``None``, a ``.ckpt`` file, a run directory (its
    ``checkpoints/last.ckpt``), ``last``: the newest ``last.ckpt`` under ``log_dir``, or ``auto``: this run
    directory's (``exclude``) own ``checkpoints/last.ckpt`` when there is one, else None. Given the ``model``
    about to be trained, ``last`` skips checkpoints of another architecture (saying so), and any other
    checkpoint of another architecture is refused, naming the keys that differ."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":  # the same command run again after any stop: go on where this run directory left off
        last = (exclude if exclude is not None else Path.cwd()) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            _refuse_auto_in_a_new_run_dir()
            if model is not None:
                log.info("ckpt_path=auto: no %s yet, starting from scratch", last)
            return None
        if model is not None:
            check_resumable(last, model)
        return str(last)
    if ckpt_path != "last":
        path = _checkpoint_file(ckpt_path)
        if model is not None:
            check_resumable(path, model)
        return str(path)
    candidates = sorted(
        (p for p in Path(log_dir).glob("**/checkpoints/last.ckpt") if exclude is None or exclude not in p.parents),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not candidates:
        raise ConfigError(f"ckpt_path=last: no run under {log_dir}/ has a checkpoints/last.ckpt to resume from")
    if model is None:
        return str(candidates[0])
    for path in candidates:
        diff = model_diff(read_checkpoint(path)["hyper_parameters"]["model"], model)
        if not diff:
            return str(path)
        log.info("ckpt_path=last: skipping %s, a different model (%s)", path, diff)
    raise ConfigError(
        f"ckpt_path=last: none of the {len(candidates)} last.ckpt files under {log_dir}/ holds this model "
        "(see the lines above for how each differs): pass the run's own settings, or ckpt_path=<a .ckpt file>"
    )


def _checkpoint_file(ckpt_path: str) -> Path:
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        last = path / "last.ckpt" if path.name == "checkpoints" else path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} is a directory without {last.relative_to(path)}: name a run directory "
                "that saved checkpoints, or a .ckpt file under <run>/checkpoints/"
            )
        return last
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: no such file (use a .ckpt file under <run>/checkpoints/, a run directory, "
            "or ckpt_path=last)"
        )
    return path


def find_checkpoint(ckpt: str | None, log_dir: str | os.PathLike) -> Path:
    """The checkpoint a trained model is used from (evaluation, generation): a ``.ckpt`` file; a run
    directory, for its best checkpoint; ``last`` or ``best``, the last or best checkpoint of the newest run
    under ``log_dir``."""
    if not ckpt:
        raise ConfigError("ckpt=... is required: a .ckpt file, a run directory, or last / best (the newest run's)")
    if ckpt in ("last", "best"):
        lasts = sorted(Path(log_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not lasts:
            raise ConfigError(f"ckpt={ckpt}: no run under {log_dir}/ has saved checkpoints (paths.log_dir={log_dir})")
        return lasts[-1] if ckpt == "last" else best_checkpoint(lasts[-1].parent.parent)
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return best_checkpoint(path.parent if path.name == "checkpoints" else path)
    if not path.is_file():
        raise ConfigError(f"ckpt={ckpt!r}: no such file or directory (a .ckpt file, a run directory, last or best)")
    return path


def best_checkpoint(run_dir: Path) -> Path:
    """A run's best checkpoint by its monitored metric, as its ModelCheckpoint recorded it; else its last."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"ckpt={str(run_dir)!r}: the directory has no checkpoints/last.ckpt; is it a run directory?")
    states = read_checkpoint(last).get("callbacks", {})
    for key, state in states.items():
        best = Path(state.get("best_model_path") or "") if key.startswith("ModelCheckpoint") else None
        if best and best.name:
            # The run directory's own file first: a copied run's checkpoint still names the original's path.
            here = run_dir / "checkpoints" / best.name
            return here if here.is_file() else best if best.is_file() else last
    return last


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, or fail with a message that says what is wrong with the file."""
    if not zipfile.is_zipfile(path):  # what torch.save writes
        with open(path, "rb") as f:
            begun = f.read(4) == b"PK\x03\x04"  # a zip archive's first entry, without the index at its end
        if begun:
            raise ConfigError(
                f"{str(path)!r} is truncated or damaged: it begins as a checkpoint but ends after "
                f"{os.path.getsize(path):,} bytes without its index (a full disk or an interrupted copy?)"
            )
        raise ConfigError(f"{str(path)!r} is not a checkpoint: not a file written by torch.save (a .ckpt of a run)")
    try:
        # weights_only: never runs code from the file; mmap: reading the hyper-parameters does not read the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "model" not in checkpoint.get("hyper_parameters", {})
    ):
        raise ConfigError(f"{str(path)!r} is not a gpt2lab checkpoint (no state_dict or model hyper-parameters)")
    return checkpoint


def check_steps_left(path: str | os.PathLike, max_steps: int) -> None:
    """A resumed run must have steps left to take; otherwise Lightning would end at once and report nothing."""
    step = read_checkpoint(path).get("global_step", 0)
    if max_steps not in (None, -1) and step >= max_steps:
        raise ConfigError(
            f"ckpt_path={str(path)!r} is at step {step}, and trainer.max_steps={max_steps} leaves nothing to train: "
            f"raise trainer.max_steps above {step}"
        )


def check_same_optimization(
    path: str | os.PathLike, optimizer: dict[str, Any], scheduler: dict[str, Any] | None
) -> None:
    """A resumed run steps its checkpoint's optimizer: the state of one (AdamW's moments, Muon's momentum) is not
    the state of another, and starting the new one fresh would change the run without a word. Refuse, with both
    ways on: resume with the checkpoint's optimizer, or start a new run from its weights. Another schedule is
    allowed (extending a run may call for one) but said: the learning rate follows it from the checkpoint's step."""
    hparams = read_checkpoint(path).get("hyper_parameters") or {}
    before, now = (hparams.get("optimizer") or {}).get("_target_"), optimizer.get("_target_")
    if before and now and before != now:
        raise ConfigError(
            f"ckpt_path={str(path)!r} was trained with {_option(before)}, and this run's config has {_option(now)}: "
            "one's state cannot go on in the other, and a fresh one would change the run unannounced. Resume with "
            f"{_option(before)} (add it to the command, with the run's other settings), or start a new run from its "
            f"weights: python -m gpt2lab.export ckpt={path} format=hf output_dir=<dir>, then python train.py "
            f"model.init_from=<dir> {_option(now)} (the new optimizer starts fresh, at step 0)"
        )
    before = (hparams.get("scheduler") or {}).get("_target_")
    now = (scheduler or {}).get("_target_")
    if "scheduler" in hparams and before != now:
        log.warning(
            "ckpt_path=%s was trained with %s, and this run's config has %s: from its step on, the learning rate "
            "follows the new schedule (add %s to the command to keep the run's own)",
            path, _option(before, "scheduler"), _option(now, "scheduler"), _option(before, "scheduler"),
        )  # fmt: skip


def _option(target: str | None, group: str = "optimizer") -> str:
    """A recorded ``_target_`` as the command line names its option: ``optimizer=muon``, ``scheduler=null``."""
    names = OPTIMIZER_OPTIONS if group == "optimizer" else SCHEDULE_OPTIONS
    return f"{group}={names.get(target, target) if target else 'null'}"


def model_diff(saved: dict[str, Any], model: dict[str, Any]) -> str:
    """The architecture keys on which a checkpoint's model and ``model`` differ, as text; empty if none."""
    ignore = {"gradient_checkpointing", "dropout", "attention_dropout", "residual_dropout", "fused_loss", "init_from"}
    ignore |= {"float8", "float8_recipe"}  # how the matmuls run, not the weights: a run may resume with it toggled
    diff = {k: (saved.get(k), v) for k, v in model.items() if k not in ignore and saved.get(k) != v}
    return ", ".join(f"model.{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())


def _refuse_auto_in_a_new_run_dir() -> None:
    """``ckpt_path=auto`` in a run directory named by the clock (the default ``outputs/<date>/<time>``) can never
    find the stopped run's checkpoint: the command run again gets a new directory and would silently start from
    scratch, so it is refused with the fix. Sweeps and runs with a fixed ``hydra.run.dir`` are left alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.RUN and "${now:" in str(OmegaConf.to_container(hydra_cfg.run)["dir"]):
        raise ConfigError(
            "ckpt_path=auto resumes from this run directory's own checkpoints/last.ckpt, but hydra.run.dir is "
            "new on every run (outputs/<date>/<time>), so it would always start from scratch: name the run, "
            "hydra.run.dir=outputs/<name> ckpt_path=auto (the same on every restart), or resume the newest run "
            "with ckpt_path=last"
        )


def check_resumable(path: str | os.PathLike, model: dict[str, Any]) -> None:
    """Resuming needs the same architecture; name the keys that differ instead of a shape error."""
    diff = model_diff(read_checkpoint(path)["hyper_parameters"]["model"], model)
    if diff:
        raise ConfigError(f"ckpt_path={str(path)!r} holds a different model ({diff}); resume with the run's own config")


# What a resumed run must share with its checkpoint's run besides the architecture: the tokenizer, the data (source,
# split, window) and the batch layout. Left out: settings that change how the same batches are computed or read
# (workers, evaluation batch size, cache directory, seeds), which a resumed run may change freely.
SETTINGS_IGNORED = {
    "data": {"_target_", "eval_batch_size", "num_workers", "pin_memory", "preprocessing_num_workers", "shard_mb",
             "cache_dir", "seed", "offline_fallback"},
    "tokenizer": {"_target_", "show_progress"},
}  # fmt: skip
# Settings added after runs were recorded without them: at this value they are left out of the record, so that a
# checkpoint from before them compares equal.
RECORDED_WHEN_SET = {"data.streaming": False}
WORLD_SIZE = "world size (trainer.devices x trainer.num_nodes)"
RUN_SETTINGS_KEY = "RunSettings"  # the state key of gpt2lab.lit.callbacks.RunSettings in a checkpoint's callbacks


def run_settings(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """The settings of this run that a run resuming from its checkpoints must share, as ``{"data.path": ...}``;
    recorded in every checkpoint (``gpt2lab.lit.callbacks.RunSettings``) and compared by ``check_same_run``."""
    settings: dict[str, Any] = {}
    for group in ("data", "tokenizer"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key in SETTINGS_IGNORED[group] or RECORDED_WHEN_SET.get(f"{group}.{key}", ...) == value:
                continue
            local = key == "path" and isinstance(value, str) and "://" not in value
            settings[f"{group}.{key}"] = os.path.abspath(os.path.expanduser(value)) if local else value
    settings["trainer.accumulate_grad_batches"] = cfg.trainer.accumulate_grad_batches
    settings[WORLD_SIZE] = world_size
    return settings


def check_same_run(
    path: str | os.PathLike, settings: dict[str, Any], tokenizer: Tokenizer, strict: bool = True
) -> None:
    """Refuse to resume from a checkpoint whose run had another tokenizer, other data or another batch layout,
    naming the keys that differ (the run would go on with other batches or other token ids than the ones it
    trained on, and say nothing); with ``strict=False`` (``resume.strict=false``), warn and go on. A checkpoint
    written before the settings were recorded is compared on its tokenizer only."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("callbacks", {}).get(RUN_SETTINGS_KEY)
    differ = [] if saved is None else [k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k)]
    saved_tokenizer = checkpoint.get(CHECKPOINT_KEY, {}).get("tokenizer")
    tokenizer_keys = [k for k in differ if k.startswith("tokenizer.")]
    differ = [k for k in differ if k not in tokenizer_keys]  # the tokenizer itself decides, below
    if saved_tokenizer and saved_tokenizer != tokenizer.to_str():
        differ += tokenizer_keys or ["tokenizer"]
    if not differ:
        if saved is None:
            log.info("%s predates recorded run settings: only its model and tokenizer are compared", path)
        return
    described = "; ".join(
        f"{key}: checkpoint {_vocabulary(saved_tokenizer)} vs now {_vocabulary(tokenizer.to_str())}"
        if key == "tokenizer"
        else f"{key}: checkpoint {saved.get(key, '(not set)')} vs now {settings.get(key, '(not set)')}"
        for key in sorted(differ)
    )
    if strict:
        raise ConfigError(
            f"ckpt_path={str(path)!r} was written by a run with other settings ({described}). Resume with that run's "
            "settings, or add resume.strict=false to go on with these (the run then differs from one never stopped)"
        )
    log.warning("resume.strict=false: resuming from %s, whose run had other settings (%s)", path, described)


def _vocabulary(tokenizer_json: str) -> str:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:12]
    return f"a tokenizer of {tokenizer.get_vocab_size()} tokens (sha256 {digest})"


def saved_chat_template(path: str | os.PathLike) -> dict[str, Any] | None:
    """The chat template a ``data.format=chat`` run saved in its checkpoint (``ChatTemplate.to_dict``), or None."""
    return read_payload(read_checkpoint(path)).chat_template


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[GPT2Model | CausalLM, Tokenizer | None]:
    """Rebuild the trained model and its tokenizer from a checkpoint alone (a model other than gpt2lab's GPT-2 from
    its recorded config: ``model=hf`` needs transformers, ``model=module`` the module's package)."""
    checkpoint = read_checkpoint(path)
    model = build_model(checkpoint["hyper_parameters"]["model"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), read_payload(checkpoint).tokenizer
