"""The LitServe worker: the model loaded on its device, fed by LitServe's continuous batching loop one step at a
time. Requests reach it already checked and tokenized (``spec.py``, in the HTTP process); it answers each choice's
text as it is decoded, and a last message with the finish reason and the token counts.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi import Request
from litserve.loops import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from gpt2lab.serve.batching import Batcher, Choice


@dataclass(frozen=True)
class ModelSource:
    """Where the worker loads the model from: a checkpoint (``ckpt``) or an ONNX export directory (``onnx``)."""

    ckpt: str | None
    onnx: str | None
    device: str  # auto: LitServe's choice for the worker (the GPU if there is one)
    rows: int  # choices decoded at once
    top_k: int | None


class IdleAwareLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, resting while nothing is being decoded: LitServe's own returns
    at once and is called again at once, keeping a core busy on an idle server."""

    async def run(self, lit_api: ls.LitAPI, *args: Any) -> None:
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.002)
            return
        await super().run(lit_api, *args)


class GPT2LabAPI(ls.LitAPI):
    """The model behind the server. ``authorize`` (the API key) runs in the HTTP process, the rest in the worker."""

    def __init__(self, source: ModelSource, spec: ls.specs.base.LitSpec, api_key: str | None) -> None:
        super().__init__(max_batch_size=source.rows, spec=spec, loop=IdleAwareLoop(max_sequence_length=1 << 30))
        self.source, self._key = source, api_key

    def setup(self, device: str) -> None:
        # Ctrl-C reaches every process of the terminal's group: the main process stops this one, which would
        # otherwise print a KeyboardInterrupt traceback of its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        source = self.source
        if source.onnx is not None:
            from gpt2lab.inference.onnx import ONNXSlots, ONNXTextGenerator

            generator = ONNXTextGenerator(source.onnx)
            slots = ONNXSlots(generator.decoder, source.rows)
        else:
            from gpt2lab.inference.generator import TextGenerator
            from gpt2lab.model.generation import DecodeSlots

            generator = TextGenerator(source.ckpt, device if source.device == "auto" else source.device)
            slots = DecodeSlots(generator.model, source.rows)
        self.batcher = Batcher(slots, generator.tokenizer, source.rows, source.top_k)

    def add_request(self, uid: str, request: dict[str, Any]) -> None:
        self.batcher.add(Choice(uid=uid, **request))

    def has_capacity(self) -> bool:
        # Always: a choice that finds no free row waits in the batcher, which gives it the first row freed, at the
        # next step. LitServe's own queue of waiting requests is looked at again only when its next read of new
        # requests times out (a second), which would leave rows idle meanwhile.
        return True

    def has_active_requests(self) -> bool:
        return self.batcher.busy()

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        """Decode until there is something to send: LitServe's loop rests 10 ms after a step that sends nothing,
        and a step in which only choices that are answered whole moved on sends nothing."""
        while True:
            outputs = []
            for uid, text, finish, choice in self.batcher.step():
                if not choice.stream and not finish:
                    continue  # one message when it ends: each costs a trip through LitServe's queues
                message: dict[str, Any] = {"text": text if choice.stream else choice.text, "finish_reason": finish}
                if finish:
                    message |= {"prompt_tokens": len(choice.prompt), "completion_tokens": choice.sampled}
                outputs.append(Output(uid, message, LitAPIStatus.OK))
                if finish:
                    outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
            if outputs or not self.batcher.busy():
                return outputs

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output  # a dict, sent as JSON

    def authorize(self, request: Request) -> None:
        self.spec.check_key(request, self._key)
