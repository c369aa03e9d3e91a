"""gpt2lab's OpenAI-compatible API as a LitServe spec: ``POST /v1/completions``, ``POST /v1/chat/completions`` and
``GET /v1/models``, beside LitServe's own ``/health``.

LitServe's ``OpenAISpec`` serves chat alone, drops ``seed``, ends every choice with ``stop`` and answers a bad
request with a 500. This spec checks each request here, in the HTTP process, before anything reaches the model:
a bad one gets OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status that
names the field, and the server goes on serving. A good one becomes one queued item per choice, tokenized here;
the worker (``api.py``) streams each choice's text back, which is answered whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, ConfigDict, ValidationError
from tokenizers import Tokenizer

from gpt2lab.tokenizers import EOS_TOKEN
from gpt2lab.tokenizers.chat_template import ChatTemplate

MAX_STOPS = 4  # as OpenAI
# Request fields of OpenAI's API that gpt2lab does not do, with the values (besides null) that ask for nothing
UNSUPPORTED = {
    "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,), "tools": ([],), "functions": ([],),
    "response_format": ({"type": "text"},),
}  # fmt: skip


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP process knows of the model: enough to check and tokenize a request."""

    name: str  # the id requests name in "model"
    tokenizer_json: str
    context_length: int
    chat_template: dict[str, Any] | None  # ChatTemplate.to_dict() of a data.format=chat model
    default_max_tokens: int  # when a request gives none (capped by what the context leaves)
    max_n: int
    max_body_bytes: int


class RequestError(Exception):
    """A request answered with OpenAI's error object: ``status``, what is wrong and how to fix it, the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}
        body = {"message": self.message, "type": kind.get(self.status, "invalid_request_error" if self.status < 500
                else "server_error"), "param": self.param, "code": self.code}  # fmt: skip
        return JSONResponse({"error": body}, status_code=self.status)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own errors (401 from the key check, 404 for an unknown path, 413 for a body too large) in
    OpenAI's shape."""
    return RequestError(error.status_code, str(error.detail)).response()


class Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's names and defaults); others are ignored, as OpenAI ignores them."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


class OpenAICompatibleSpec(LitSpec):
    """The endpoints, and the path from a request to the worker's queue and back."""

    def __init__(self, model: ServedModel) -> None:
        super().__init__()
        self.model = model
        self.api_path = "/v1/completions"  # LitServe names the request queue by it
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self._tokenizer: Tokenizer | None = None
        self._readers: set[asyncio.Task] = set()  # kept: the event loop holds its tasks weakly

    @property
    def stream(self) -> bool:  # LitServe's continuous batching streams
        return True

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.model.tokenizer_json)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_tokenizer": None, "_readers": set()}

    @staticmethod
    def check_key(request: Request, key: str | None) -> None:
        """The API key, as OpenAI's clients send it (``Authorization: Bearer <key>``); never logged."""
        if key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def models(self) -> dict[str, Any]:
        entry = {"id": self.model.name, "object": "model", "created": 0, "owned_by": "gpt2lab"}
        return {"object": "list", "data": [entry]}

    async def completions(self, request: Request) -> Response:
        try:
            body = await self.read(request, CompletionRequest)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                raise RequestError(400, "prompt is an empty list: give a text, or a list of texts", "prompt")
            eos = self.tokenizer.token_to_id(EOS_TOKEN)
            encoded = [self.tokenizer.encode(p).ids if p else [eos] for p in prompts]  # nothing: after end-of-text
            choices = [c for ids in encoded for c in self.choices(body, ids, "prompt", [eos], body.max_tokens)]
        except RequestError as e:
            return e.response()
        return await self.answer(body, choices, len(encoded), chat=False)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self.read(request, ChatRequest)
            template = self.template()
            if not body.messages:
                raise RequestError(400, 'messages is empty: give at least one {"role": "user", "content": "..."}',
                                   "messages")  # fmt: skip
            messages = [self.message(m, i, template) for i, m in enumerate(body.messages)]
            ids = self.tokenizer.encode(template.prompt(messages)).ids
            ends = [self.tokenizer.token_to_id(template.end)]  # as gpt2lab chat: end-of-text never comes first
            choices = self.choices(body, ids, "messages", ends, body.max_completion_tokens or body.max_tokens)
        except RequestError as e:
            return e.response()
        return await self.answer(body, choices, 1, chat=True)

    async def read(self, request: Request, shape: type[Sampling]) -> Any:
        """The request's JSON body as ``shape``, or the RequestError that says what is wrong with it."""
        limit = self.model.max_body_bytes
        too_large = RequestError(413, f"the request body is over {limit:,} bytes (serve.max_body_bytes)")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large  # before reading it
        raw = await request.body()
        if len(raw) > limit:
            raise too_large
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the request body is not UTF-8 text: send JSON encoded as UTF-8") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, f"the request body is not JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object, {...}")
        try:
            body = shape.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise RequestError(400, f"{param}: {first['msg']} (got {first.get('input')!r})", param) from None
        if body.model != self.model.name:
            raise RequestError(404, f"the model {body.model!r} does not exist: this server serves {self.model.name!r}"
                               " (GET /v1/models)", "model", "model_not_found")  # fmt: skip
        for name, nothing in UNSUPPORTED.items():
            value = (body.model_extra or {}).get(name)
            if value is not None and value not in nothing:
                raise RequestError(400, f"{name} is not supported by gpt2lab serve: leave it out", name)
        return body

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        template = self.model.chat_template
        return None if template is None else ChatTemplate.from_dict(template)

    def template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise RequestError(400, "this model was not trained on chats (data.format=chat), so it has no chat "
                               "template: send its text to /v1/completions instead", "messages",
                               "chat_not_supported")  # fmt: skip
        return self.chat_template

    @staticmethod
    def message(message: Message, i: int, template: ChatTemplate) -> dict[str, str]:
        if message.role not in template.roles:
            raise RequestError(400, f"messages[{i}].role is {message.role!r}: this model's chat template knows "
                               f"{', '.join(template.roles)}", f"messages[{i}].role")  # fmt: skip
        content = message.content
        if isinstance(content, list):  # content parts: text alone
            if any(part.get("type") != "text" for part in content):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")  # fmt: skip
            content = "".join(str(part.get("text", "")) for part in content)
        if content is None:
            raise RequestError(400, f"messages[{i}] has no content", f"messages[{i}].content")
        return {"role": message.role, "content": content}

    def choices(
        self, body: Sampling, prompt: list[int], prompt_param: str, ends: list[int], max_tokens: int | None
    ) -> list[dict[str, Any]]:
        """The queued item of each of the request's ``n`` choices of ``prompt``, its settings checked."""
        context, m = self.model.context_length, self.model
        if len(prompt) >= context:
            raise RequestError(400, f"the {prompt_param} is {len(prompt)} tokens, and this model's context is "
                               f"{context}, which must hold the {prompt_param} and at least one new token: shorten "
                               f"it", prompt_param, "context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(m.default_max_tokens, context - len(prompt))
        elif max_tokens < 1:
            raise RequestError(400, f"max_tokens is {max_tokens}: give at least 1", "max_tokens")
        elif len(prompt) + max_tokens > context:
            raise RequestError(400, f"max_tokens is {max_tokens}, but the {prompt_param} is {len(prompt)} tokens of "
                               f"this model's context of {context}: give at most {context - len(prompt)}",
                               "max_tokens", "context_length_exceeded")  # fmt: skip
        if not 1 <= body.n <= m.max_n:
            raise RequestError(400, f"n is {body.n}: give 1 to {m.max_n} (serve.max_n)", "n")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise RequestError(400, f"temperature is {temperature}: give 0 (greedy) to 2", "temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise RequestError(400, f"top_p is {top_p}: give a number in (0, 1]", "top_p")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOPS:
            raise RequestError(400, f"stop has {len(stop)} strings: give at most {MAX_STOPS}", "stop")
        seed = random.getrandbits(62) if body.seed is None else body.seed
        return [
            {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
             "seed": (seed + 1_000_003 * i) % 2**62, "stop": [s for s in stop if s], "ends": ends,
             "stream": body.stream}
            for i in range(body.n)
        ]  # fmt: skip

    async def answer(self, body: Sampling, choices: list[dict[str, Any]], prompts: int, chat: bool) -> Response:
        """Queue the choices, then answer: whole, or as server-sent events when ``stream``."""
        events = self.decoded(choices)
        name = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{name}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model.name}
        prompt_tokens = sum(len(c["prompt"]) for c in choices[:: len(choices) // prompts])
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.sse(events, head, len(choices), prompt_tokens, chat, include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        texts, finish, completion_tokens = [""] * len(choices), [None] * len(choices), 0
        try:
            async for i, message in events:
                texts[i] += message["text"]
                finish[i] = message["finish_reason"] or finish[i]
                completion_tokens += message.get("completion_tokens", 0)
        except RequestError as e:
            return e.response()
        if chat:
            answers = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish, strict=True))]  # fmt: skip
        else:
            answers = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish, strict=True))]  # fmt: skip
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse(
            {**head, "object": kind, "choices": answers, "usage": usage(prompt_tokens, completion_tokens)}
        )

    async def sse(
        self, events: AsyncIterator, head: dict, n: int, prompt_tokens: int, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **more: Any) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **more})}\n\n"

        if chat:  # the role first, as OpenAI sends it
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])  # fmt: skip
        completion_tokens = 0
        try:
            async for i, message in events:
                completion_tokens += message.get("completion_tokens", 0)
                piece = {"content": message["text"]} if message["text"] else {}
                part = {"delta": piece} if chat else {"text": message["text"], "logprobs": None}
                yield chunk([{"index": i, **part, "finish_reason": message["finish_reason"]}])
        except RequestError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error', 'code': e.code}})}\n\n"
            return
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"

    async def decoded(self, choices: list[dict[str, Any]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Queue each choice for the worker; yield ``(choice index, message)`` as the worker sends them, the
        choices interleaved. A choice whose client went away is still read to its end, so that its buffer goes."""
        arrived: asyncio.Queue = asyncio.Queue()

        async def read(i: int, uid: str, messages: AsyncIterator) -> None:
            try:
                async for data, status in messages:
                    if status != LitAPIStatus.START:
                        await arrived.put((i, data, status))
            finally:
                self.response_buffer.pop(uid, None)
                await arrived.put((i, None, None))

        for i, choice in enumerate(choices):
            uid, queue, event = uuid.uuid4().hex, deque(), asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), choice))
            reader = asyncio.create_task(read(i, uid, self.data_streamer(queue, event, send_status=True)))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        left = len(choices)
        while left:
            i, data, status = await arrived.get()
            if status is None:
                left -= 1
            elif status == LitAPIStatus.ERROR:
                raise RequestError(500, f"the model failed on this request ({data!r}); see the server's log")
            else:
                yield i, json.loads(data)
