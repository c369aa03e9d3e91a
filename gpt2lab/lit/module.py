"""The LightningModule: GPT-2 plus its loss, logging, optimizer and schedule.

The checkpoint it writes is self-contained: ``hyper_parameters`` rebuild the model, and the
``gpt2lab`` entry carries the tokenizer, so ``load_checkpoint(path)`` needs nothing else. Any other causal
language model (``model=hf``, ``model=module``) comes as a ``CausalLM`` (gpt2lab/model/adapter.py), which has
GPT2Model's ``forward(input_ids, labels) -> (logits, loss)``: the steps below are the same for both.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from tokenizers import Tokenizer

from gpt2lab.checkpoint import Payload, read_payload, set_rng_states, write_payload
from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.data.formats import split_batch
from gpt2lab.errors import ConfigError
from gpt2lab.lit.float8 import convert_to_float8
from gpt2lab.lit.optimization import build_optimizer
from gpt2lab.model import GPT2Config, GPT2Model
from gpt2lab.model.adapter import build_model
from gpt2lab.model.cross_entropy import IGNORE_INDEX
from gpt2lab.tokenizers import token_byte_lengths

log = logging.getLogger(__name__)


def check_compile_options(cfg: DictConfig) -> None:
    """``compile_mode`` must be one of torch.compile's modes and each ``compile_options`` key a TorchInductor
    option, so a typo fails here rather than after the data has been prepared; and CUDA graphs cannot
    accumulate gradients."""
    modes = ("default", *torch._inductor.list_mode_options())
    if cfg.compile_mode is not None and cfg.compile_mode not in modes:
        raise ConfigError(f"compile_mode={cfg.compile_mode!r}: expected one of {', '.join(modes)} (or null)")
    known = set(torch._inductor.list_options())
    for key in cfg.compile_options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"compile_options.{key}: not a TorchInductor option (torch._inductor.list_options() has them).{hint}"
            )
    if not cfg.compile and (cfg.compile_mode or cfg.compile_options):
        log.warning("compile_mode and compile_options take effect with compile=true only; this run is not compiled")
    options = inductor_options(cfg.compile_mode, cfg.compile_options)
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    if cfg.compile and options.get("triton.cudagraphs") and accumulate > 1:
        raise ConfigError(
            f"compile_mode={cfg.compile_mode} replays CUDA graphs, whose output buffers hold the gradients and are "
            f"overwritten by the next micro-batch, so it cannot accumulate them (trainer.accumulate_grad_batches="
            f"{accumulate}): set trainer.accumulate_grad_batches=1 (raise data.batch_size instead), or use "
            "compile_mode=max-autotune-no-cudagraphs or the default mode"
        )


def inductor_options(mode: str | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """TorchInductor options for torch.compile: a mode is a named set of them, and explicit ``options`` go on top
    (torch.compile itself takes a mode or options, not both)."""
    return {**torch._inductor.list_mode_options(mode or "default"), **(options or {})}


class GPT2LitModule(pl.LightningModule):
    """Trains a ``GPT2Model`` (or a ``CausalLM``) on (B, T + 1) token windows. ``model`` is a GPT2Config (or its
    fields), or the config of another model, with its ``_target_`` (see ``gpt2lab.model.adapter.build_model``)."""

    def __init__(
        self,
        model: GPT2Config | DictConfig | dict[str, Any],
        optimizer: DictConfig | dict[str, Any],
        scheduler: DictConfig | dict[str, Any] | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_options: dict[str, Any] | None = None,
        compile_optimize_ddp: bool = False,
    ) -> None:
        super().__init__()
        # Train mode from the start: transformers' from_pretrained returns its model in eval mode, a module handed
        # to the Python API may come so, and Lightning (since 2.2) keeps each submodule in the mode it finds.
        self.model = build_model(model).train()
        gpt2 = isinstance(self.model, GPT2Model)
        to_dict = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
        self.save_hyperparameters(
            {
                "model": dataclasses.asdict(self.model.config) if gpt2 else self.model.spec,
                "optimizer": to_dict(optimizer),
                "scheduler": to_dict(scheduler),
                "compile": compile,
                "compile_mode": compile_mode,
                "compile_options": to_dict(compile_options) or {},
                "compile_optimize_ddp": compile_optimize_ddp,
            }
        )
        self.tokenizer: Tokenizer | None = None  # set by the trainer script; saved into checkpoints
        self.chat_template: dict[str, Any] | None = None  # data.format=chat's (ChatTemplate.to_dict); saved too
        self._pending_rng: dict[str, Any] | None = None
        self._eval_sums: list[torch.Tensor] = []  # per batch: (nats, tokens, bytes, special nats, special tokens)
        self._bytes_per_token: torch.Tensor | None = None
        self.eval_totals: dict[str, float] = {}  # of the last evaluation: see _log_eval
        self._compiled = False
        self._all_finite: torch.Tensor | None = None  # stays on the device: read only on logging steps

    def setup(self, stage: str) -> None:
        # The chat template of data.format=chat goes into the checkpoints, beside the tokenizer that has its tokens
        template = getattr(self.trainer.datamodule, "chat_template", None)
        if template is not None:
            self.chat_template = template.to_dict()

    def on_train_start(self) -> None:
        # The training steps run with the model's dropout, whatever mode loading weights left it in; each
        # validation switches it to eval and back to this.
        self.model.train()

    def configure_model(self) -> None:
        """Compile the model in place, before the strategy wraps it, so state_dict keys stay those of the
        plain model. Under DDP the whole model is one compiled call inside the wrapper; under FSDP each
        decoder block, the unit FSDP gathers, is compiled, as PyTorch advises for its wrapper modules. With
        ``model.float8`` a fit first swaps the blocks' linear layers for torchao's float8 ones (``lit/float8.py``)."""
        float8 = isinstance(self.model, GPT2Model) and self.model.config.float8
        if float8 and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            convert_to_float8(self.model, self.model.config.float8_recipe)  # converts nothing a second time
        if not self.hparams.compile or self._compiled:
            return
        if self._trainer is not None and isinstance(self.trainer.strategy, DDPStrategy):
            # torch.compile's DDPOptimizer splits the graph at DDP's gradient buckets, so that each bucket's
            # all-reduce overlaps the rest of the backward. The split graphs fuse less: on 2 H200s with GPT-2
            # small, one graph with the all-reduce at the end ran 1.95x one GPU against 1.88x (docs/multi-gpu.md).
            torch._dynamo.config.optimize_ddp = bool(self.hparams.get("compile_optimize_ddp", False))
        options = inductor_options(self.hparams.get("compile_mode"), self.hparams.get("compile_options"))  # checked
        sharded = isinstance(self.trainer.strategy, FSDPStrategy) if self._trainer is not None else False
        if sharded and not isinstance(self.model, GPT2Model):
            raise ConfigError(
                "compile=true under trainer=fsdp compiles gpt2lab's GPT-2 block by block; this model is not it"
            )
        for module in self.model.blocks if sharded else [self.model]:
            module.compile(options=options)
        self._compiled = True

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(input_ids, labels)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        # Task formats store the tokens that carry no loss as ~id: their labels become -100 (IGNORE_INDEX)
        _, loss = self(*split_batch(batch))
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        finite = torch.isfinite(loss.detach())  # a device op: checked on the logging steps, not each step
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        # A tensor, not a float: Lightning reads it back only every log_every_n_steps, so no host sync per step.
        # Not prog_bar=True, which would read it back after every batch; gpt2lab's ProgressBar shows it.
        self.log("train/loss", loss, on_step=True)
        return loss

    # Evaluation: sums over all batches (then over ranks) of the loss in nats, the predicted tokens and the
    # bytes of text they stand for; loss = nats / tokens and perplexity = exp(loss), over every scored token.
    # Bits per byte = the nats of the tokens that stand for text / (their bytes * ln 2), which does not depend on the
    # tokenizer, so runs with different vocabularies compare. They leave out the predictions of the tokens of 0
    # bytes, the special tokens (end-of-text, <|end|>): the compressors they are set beside see the decoded text,
    # without its boundaries, and pay nothing for them. With a task format only the scored tokens count (the
    # summary, the assistant turns): the loss is theirs, and bits per byte are their text tokens' nats over their bytes.
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: torch.Tensor) -> None:
        inputs, labels = split_batch(batch)  # a strided evaluation's context tokens come as ~id: not scored
        # Each token's loss, (B, T) nats, 0 where not scored: the plain logits' (training's steps keep the fused mean).
        # Summed here at once: with compile_mode=reduce-overhead it lives in a CUDA graph's buffer, which the next
        # batch overwrites.
        _, nats = self.model(inputs, labels, reduction="none")
        nats = nats.detach().float()
        scored = labels != IGNORE_INDEX
        if self.tokenizer is not None:
            n_bytes = torch.where(scored, self._token_bytes(labels.device)[labels.clamp(min=0)], 0)
            special = scored & (n_bytes == 0)  # end-of-text, <|end|>: tokens of no text
        else:
            n_bytes, special = torch.zeros_like(labels), torch.zeros_like(scored)
        sums = [nats.sum(), scored.sum(), n_bytes.sum(), torch.where(special, nats, 0.0).sum(), special.sum()]
        self._eval_sums.append(torch.stack([s.float() for s in sums]))

    def _token_bytes(self, device: torch.device) -> torch.Tensor:
        if self._bytes_per_token is None or self._bytes_per_token.device != device:
            self._bytes_per_token = torch.tensor(token_byte_lengths(self.tokenizer), device=device)
        return self._bytes_per_token

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        if not self._eval_sums:
            return
        sums = self.trainer.strategy.reduce(torch.stack(self._eval_sums).sum(0), reduce_op="sum")
        self._eval_sums.clear()
        nats, tokens, n_bytes, special_nats, special = sums
        loss = nats / tokens
        if stage == "val" and self.trainer.state.fn == TrainerFn.FITTING and not torch.isfinite(loss):
            # Raised before ModelCheckpoint sees the value, so a NaN never becomes a (best) checkpoint.
            self._diverged(f"the validation loss is {loss.item()}")
        # Already the totals over ranks; sync_dist=True only tells Lightning so (the values agree).
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        if stage == "val":  # after that many steps (see on_before_optimizer_step); the test's step is already so
            self.log("step", float(self.trainer.global_step), sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss), sync_dist=True)
        self.log(f"{stage}/tokens", tokens, sync_dist=True)  # what the numbers cover: the split, or its first batches
        text_nats = nats - special_nats  # bits per byte leave out the special tokens' predictions (0 bytes each)
        if self.tokenizer is not None:
            self.log(f"{stage}/bpb", text_nats / (n_bytes * math.log(2)), sync_dist=True)
        self.eval_totals = {
            "nats": float(nats),
            "tokens": int(tokens),
            "bytes": int(n_bytes),
            "text_nats": float(text_nats),
            "special_tokens": int(special),
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The steps Lightning writes to the logger, and the last one (on_train_batch_end has it written too)
        if self.trainer._logger_connector.should_update_logs or self._steps_to_the_end(1):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True)
            self.log("lr", optimizer.param_groups[0]["lr"], on_step=True)
            # The x-axis of every logger: the number of optimizer steps done once this one is, as checkpoint names,
            # samples and validations count them (Lightning's own count would put this step at one less).
            self.log("step", float(self.trainer.global_step + 1), on_step=True)
            # Logging reads these values back anyway: checking them here adds no host sync of its own.
            if not bool(torch.isfinite(norm)) or not self._losses_finite():
                what = "the training loss" if not self._losses_finite() else "the gradient norm"
                self._diverged(f"{what} became NaN or infinite")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning validates on the val_check_interval grid only, so a run whose last step is off that grid
        # (max_steps below the interval, or not a multiple of it) would end without a final validation loss,
        # best checkpoint or objective. should_stop is Lightning's documented way to have it validate now.
        if self._is_last_step() and self.trainer.enable_validation:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if not self._losses_finite():  # a non-finite loss after the last logging step
            self._diverged("the training loss became NaN or infinite")

    def _steps_to_the_end(self, steps_ahead: int = 0) -> bool:
        """Whether ``max_steps`` is reached after ``steps_ahead`` more optimizer steps."""
        max_steps = self.trainer.max_steps
        return max_steps not in (None, -1) and self.trainer.global_step + steps_ahead >= max_steps

    def _is_last_step(self) -> bool:
        trainer = self.trainer
        if trainer.fit_loop._should_accumulate():
            return False
        if self._steps_to_the_end():
            return True
        max_epochs = trainer.max_epochs
        last_epoch = max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs
        return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def _losses_finite(self) -> bool:
        return self._all_finite is None or bool(self._all_finite)

    def _diverged(self, what: str) -> None:
        """Stop a run whose numbers are no longer numbers, saying where and how to go on."""
        checkpoint = self.trainer.checkpoint_callback
        last_good = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
        raise ConfigError(
            f"training diverged: {what} by step {self.trainer.global_step} (learning rate {lr:.3g} then, "
            f"optimizer.lr={self.hparams.optimizer.get('lr')}). "
            + (f"The last good checkpoint is {last_good}. " if last_good else "No checkpoint was saved before it. ")
            + "Lower optimizer.lr, raise scheduler.warmup_steps, or keep trainer.gradient_clip_val set"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.hparams.optimizer, self.device, self._uses_grad_scaler())
        if not self.hparams.scheduler or not self.hparams.scheduler.get("_target_"):
            return {"optimizer": optimizer}  # a constant learning rate
        scheduler_cfg = dict(self.hparams.scheduler)
        if "max_steps" in scheduler_cfg and (scheduler_cfg["max_steps"] is None or scheduler_cfg["max_steps"] < 0):
            # Runs whose length is set in epochs (trainer.max_steps=-1): decay over the steps Lightning will take.
            scheduler_cfg["max_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = hydra.utils.instantiate(scheduler_cfg, _partial_=True, _execution_whitelist_=TRUSTED_TARGETS)(
            optimizer
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _uses_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for fused optimizers, for fear of a GradScaler
        # that has not unscaled the gradients yet. With bf16 there is no scaler, so clip directly.
        if (
            gradient_clip_val
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and not self._uses_grad_scaler()
        ):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints: the tokenizer and the RNG travel with the weights ---------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_payload(checkpoint, Payload(self.tokenizer, self.chat_template))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        payload = read_payload(checkpoint)
        if payload.tokenizer is not None:
            self.tokenizer = payload.tokenizer
        self.chat_template = payload.chat_template
        self._pending_rng = payload.rng

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the RNG right before the first resumed step (after dataloaders and sanity checks
        # have drawn from it), so dropout masks match those of an uninterrupted run.
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None
