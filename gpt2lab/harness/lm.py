"""gpt2lab's models as an lm-evaluation-harness model: ``lm_eval --model gpt2lab --model_args ckpt=...``.

Importing this module registers the name ``gpt2lab`` with lm-eval's model registry. lm-eval does the task
side (prompts, few-shot examples, metrics, tokenizing context and continuation, the rolling windows); this
class only scores and continues token ids:

- ``loglikelihood``: requests sorted by length (longest first, so a batch pads little), right-padded, one
  forward pass per batch; only the continuation's positions go through the softmax.
- ``loglikelihood_rolling``: lm-eval's own disjoint windows of the context length, scored as above.
- ``generate_until``: gpt2lab's KV-cache decoding, left-padded batches, stop strings and end-of-text. A model
  of ``model=hf`` or ``model=module`` has no KV cache here: it is decoded greedily one forward at a time.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from torch import nn

from gpt2lab.errors import ConfigError
from gpt2lab.hf import load_pretrained_gpt2
from gpt2lab.inference.generator import TextGenerator, complete, usable_device
from gpt2lab.tokenizers import EOS_TOKEN, load_pretrained

log = logging.getLogger("gpt2lab.harness")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("gpt2lab")
class GPT2LabLM(TemplateLM):
    """A gpt2lab checkpoint for lm-eval. ``ckpt`` is what ``ckpt=`` takes everywhere: a ``.ckpt`` file, a run
    directory (its best checkpoint), ``last`` or ``best`` (under ``log_dir``); or ``init_from``: GPT-2 weights by Hub
    name or Hugging Face directory, in gpt2lab's model, as ``model.init_from`` starts training from them.
    ``dtype`` is the precision the forward pass runs in (log-probabilities are always taken in float32)."""

    def __init__(
        self,
        ckpt: str | None = None,
        init_from: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = 16,
        dtype: str = "float32",
        log_dir: str = "outputs",
        max_batch_size: int | None = None,  # lm-eval passes it; batches here are fixed-size
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"--model_args {', '.join(unknown)}: not an argument of the gpt2lab model; it takes "
                "ckpt=<.ckpt file | run directory | last | best> (or init_from=<gpt2 | Hugging Face directory>), "
                "device, batch_size, dtype and log_dir"
            )
        if (ckpt is None) == (init_from is None):
            raise ConfigError(
                "--model_args: give ckpt=<.ckpt file | run directory | last | best> (a gpt2lab checkpoint), or "
                "init_from=<gpt2 | a Hugging Face GPT-2 directory> (GPT-2 weights, as model.init_from reads them)"
            )
        if ckpt is not None:
            generator = TextGenerator(str(ckpt), device=device or "auto", log_dir=log_dir)
            model, tokenizer = generator.model, generator.tokenizer
        else:  # what training with model.init_from=... starts from, before any step
            model = load_pretrained_gpt2(str(init_from)).to(usable_device(device or "auto")).eval()
            tokenizer = load_pretrained(str(init_from))
        self._setup(model, tokenizer, batch_size, dtype)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> GPT2LabLM:
        """``--model_args`` win over lm-eval's own ``--device`` and ``--batch_size`` (lm-eval would pass both). lm-eval's
        ``--device`` defaults to ``cuda:0``: one this machine cannot use means ``auto``, as lm-eval's ``hf`` takes it."""
        given = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" in given and "device" not in arg_dict:
            try:
                usable_device(str(given["device"]))
            except ConfigError:
                log.info("--device %s cannot be used here: the model runs on device=auto", given["device"])
                given["device"] = "auto"
        return cls(**(given | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GPT2LabLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer: Tokenizer, batch_size: int | str | None = 16, dtype: str = "float32"
    ) -> GPT2LabLM:
        """A model already in memory, on its device (the training callback's): nothing is copied or loaded."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, tokenizer, batch_size, dtype)
        return lm

    def _setup(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int | str | None, dtype: str) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"--model_args dtype={dtype}: expected one of {', '.join(DTYPES)}")
        self.model, self.tokenizer_ = model, tokenizer
        self.dtype = DTYPES[dtype]
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(model.config.context_length)
        self._device = next(model.parameters()).device
        self._eot = tokenizer.token_to_id(EOS_TOKEN)
        if self._eot is None:
            raise ConfigError(f"the checkpoint's tokenizer has no {EOS_TOKEN} token, which lm-eval's scoring needs")

    # What lm-eval's TemplateLM needs to tokenize context and continuation as every model of lm-eval does.
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "gpt2lab"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of right-padded ids: padding at the end never changes the positions before it."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                return self.model(input_ids)[0]
        finally:
            self.model.train(was_training)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(log-probability of the continuation, whether greedy decoding gives it)`` for each
        ``(request, context ids, continuation ids)``. The input is context + continuation less its last token,
        cut from the left to the context length."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for batch in order.get_batched(n=self.batch_size):
            longest = max(len(continuation) for _, _, continuation in batch)
            if longest > self.max_length:
                raise ConfigError(
                    f"a continuation of {longest} tokens is longer than the model's context ({self.max_length} "
                    "tokens), so it cannot be scored: choose tasks whose answers fit the model"
                )
            inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in batch]
            width = max(len(ids) for ids in inputs)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, row_ids in enumerate(inputs):
                ids[row, : len(row_ids)] = torch.tensor(row_ids)
            logits = self._logits(ids.to(self.device))
            # Each row's continuation is predicted at the positions just before its tokens.
            rows = torch.cat([torch.full((len(c),), r) for r, (_, _, c) in enumerate(batch)])
            cols = torch.cat(
                [torch.arange(len(i) - len(c), len(i)) for i, (_, _, c) in zip(inputs, batch, strict=True)]
            )
            logprobs = F.log_softmax(logits[rows.to(self.device), cols.to(self.device)].float(), dim=-1)
            targets = torch.tensor([t for _, _, c in batch for t in c], device=self.device)
            picked = logprobs.gather(1, targets[:, None])[:, 0].cpu()  # one copy to the host per batch
            greedy = (logprobs.argmax(-1) == targets).cpu()
            start = 0
            for request, _, continuation in batch:
                end = start + len(continuation)
                answer = (float(picked[start:end].sum()), bool(greedy[start:end].all()))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                results.append(answer)
                start = end
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: lm-eval's disjoint windows of the context length, the first
        predicted after end-of-text, all scored in batches together."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            rolling = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its stop strings, end-of-text or ``max_gen_toks``; the context is
        cut from the left so that context and continuation fit the model."""
        eos = self.tokenizer_.decode([self._eot], skip_special_tokens=False)
        encoded = {context: self.tok_encode(context) for context, _ in (request.args for request in requests)}
        order = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(encoded[args[0]]), args[0]),
            group_fn=lambda args: args[1],
            group_by="gen_kwargs",
        )
        results = []
        for batch in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*batch, strict=True)
            settings = normalize_gen_kwargs(dict(all_kwargs[0]), default_max_gen_toks=256)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            new_tokens = min(settings.pop("max_gen_toks"), self.max_length - 1)
            prompts = [encoded[c][-(self.max_length - new_tokens) :] or [self._eot] for c in contexts]
            texts = self._continue(prompts, new_tokens, until, settings)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts, strict=True):
                text = postprocess_generated_text(text, until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
        return order.get_original(results)

    @torch.inference_mode()
    def _continue(self, prompts: list[list[int]], new_tokens: int, until: list[str], settings: dict) -> list[str]:
        """The text each prompt (token ids) continues with, cut before the first stop string."""
        sampling = {
            "max_new_tokens": new_tokens,
            "stop": until,
            "do_sample": bool(settings.get("do_sample")),
            "temperature": float(settings.get("temperature") or 1.0),
            "top_p": settings.get("top_p"),
            "top_k": settings.get("top_k"),
            "seed": settings.get("seed", 1234),
        }
        if not hasattr(self.model, "generate_stream"):  # model=hf / model=module: no KV cache here
            return [self._greedy_without_cache(p, new_tokens, until) for p in prompts]
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            return complete(self.model, self.tokenizer_, prompts, sampling)  # gpt2lab generate's decoding loop

    def _greedy_without_cache(self, prompt: list[int], new_tokens: int, until: list[str]) -> str:
        tokens: list[int] = []
        for _ in range(new_tokens):
            window = (prompt + tokens)[-self.max_length :]
            token = int(self._logits(torch.tensor([window], device=self.device))[0, -1].argmax())
            if token == self._eot:
                break
            tokens.append(token)
            if any(stop in self.tok_decode(tokens) for stop in until):
                break
        return self.tok_decode(tokens)


def _batch_size(value: int | str | None) -> int:
    """lm-eval's ``--batch_size`` (a number, or ``auto``, taken here as 16: batches are sorted by length)."""
    if value is None or str(value).startswith("auto"):
        return 16
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"batch_size={value}: expected a positive number of requests per forward pass")
    return size
