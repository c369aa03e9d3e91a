"""gpt2lab serve, through the official ``openai`` client and raw HTTP, against a server this module starts on
127.0.0.1 (a real ``python -m gpt2lab.serve`` process: LitServe, its worker, uvicorn). What users rely on: the
completions match ``gpt2lab generate``'s, streamed or not; stop strings, n and seed; usage counts; every bad
request a 4xx OpenAI error naming its field, the server serving on; the API key; chat with a chat model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from gpt2lab.inference.generator import TextGenerator, complete

openai = pytest.importorskip("openai")

KEY = "test-key-5f2c9a7e41"  # long enough to be searched for in the logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m gpt2lab.serve`` process and what to reach it with."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.cwd = free_port(), cwd
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = cwd / "server.out"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpt2lab.serve", f"port={self.port}", "device=cpu", *args],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True,  # its workers stop with it
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server stopped: {self.output.read_text()[-3000:]}")
            try:
                if httpx2.get(f"{self.url}/health", headers=self.auth(), timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not start: {self.output.read_text()[-3000:]}")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, content: bytes | str, headers: dict[str, str] | None = None) -> httpx2.Response:
        return httpx2.post(f"{self.url}{path}", content=content, headers={**self.auth(), **(headers or {})}, timeout=60)

    def logs(self) -> str:
        return self.output.read_text() + "".join(p.read_text() for p in self.cwd.rglob("*.log"))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory) -> Iterator[Server]:
    """The trained tiny model (context 32) served with its API key from the environment."""
    running = Server(
        f"ckpt={trained_run}", "serve.max_body_bytes=4096", "serve.log_level=info",
        cwd=tmp_path_factory.mktemp("serve"), env={"GPT2LAB_API_KEY": KEY},
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(trained_run) -> TextGenerator:
    return TextGenerator(str(trained_run), device="cpu")


def greedy(reference: TextGenerator, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
    """What ``gpt2lab generate`` prints for ``prompt`` decoding greedily."""
    settings = {"max_new_tokens": max_tokens, "do_sample": False, "stop": stop or [], "repetition_penalty": 1.0}
    return complete(reference.model, reference.tokenizer, [prompt], settings)[0]


def test_a_completion_is_what_generate_writes(server, reference):
    answer = server.client().completions.create(model="gpt2lab", prompt="def ", max_tokens=12, temperature=0)
    (choice,) = answer.choices
    assert choice.text == greedy(reference, "def ", 12)
    prompt_tokens = len(reference.tokenizer.encode("def ").ids)
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    assert choice.finish_reason == ("length" if answer.usage.completion_tokens == 12 else "stop")


def test_a_streamed_completion_is_the_same_text(server, reference):
    stream = server.client().completions.create(
        model="gpt2lab", prompt="import ", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(reference, "import ", 12)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did stream
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_a_stop_string_ends_the_completion_before_it(server, reference):
    full = greedy(reference, "class ", 16)
    stop = full[4:6]
    answer = server.client().completions.create(model="gpt2lab", prompt="class ", max_tokens=16, temperature=0,
                                                stop=[stop, "never"])  # fmt: skip
    assert answer.choices[0].text == full[: full.index(stop)] == greedy(reference, "class ", 16, [stop])
    assert answer.choices[0].finish_reason == "stop"


def test_n_choices_and_a_seed_that_gives_the_same_text_twice(server):
    client = server.client()
    ask = lambda seed: client.completions.create(  # noqa: E731
        model="gpt2lab", prompt="def ", max_tokens=10, temperature=1.0, n=3, seed=seed
    )
    first, again, other = ask(5), ask(5), ask(6)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == texts
    assert len(set(texts)) > 1  # the choices are different draws
    assert [c.text for c in other.choices] != texts
    assert 3 <= first.usage.completion_tokens <= 30  # the three choices' tokens, each at most max_tokens


def test_a_plain_model_refuses_chat_and_lists_itself(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt2lab", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in str(refused.value)
    assert [m.id for m in client.models.list()] == ["gpt2lab"]


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
        ({"model": "gpt2lab", "prompt": "a", "max_tokens": -5}, 400, "max_tokens", "at least 1"),
        ({"model": "gpt2lab", "prompt": "a", "max_tokens": 500}, 400, "max_tokens", "at most"),
        ({"model": "gpt2lab", "prompt": "x = 1\n" * 40}, 400, "prompt", "context"),
        ({"model": "gpt2lab", "prompt": "a", "temperature": -1}, 400, "temperature", "0 (greedy) to 2"),
        ({"model": "gpt2lab", "prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
        ({"model": "gpt2lab", "prompt": "a", "n": 1000}, 400, "n", "serve.max_n"),
        ({"model": "gpt2lab", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens", "integer"),
        ({"model": "gpt2lab", "prompt": "a", "logprobs": 3}, 400, "logprobs", "not supported"),
        ({"model": "gpt2lab"}, 400, "prompt", "required"),
        ({"model": "gpt2lab", "prompt": "a" * 5000}, 413, None, "serve.max_body_bytes"),
    ],
)
def test_a_bad_request_is_a_4xx_naming_the_field(server, body, status, param, words):
    answer = server.post("/v1/completions", json.dumps(body))
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert server.client().completions.create(model="gpt2lab", prompt="a", max_tokens=2).choices  # still serving


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"\xff\xfe{}", "not UTF-8"), (b"{not json", "not JSON"), (b"[1, 2]", "JSON object")],
)
def test_a_body_that_is_not_json_is_a_400(server, content, words):
    answer = server.post("/v1/completions", content, {"Content-Type": "application/json"})
    assert answer.status_code == 400 and words in answer.json()["error"]["message"]


def test_the_api_key_is_required_and_never_logged(server):
    for key in ("wrong-key", ""):
        with pytest.raises(openai.AuthenticationError):
            server.client(key or "x").completions.create(model="gpt2lab", prompt="a", max_tokens=2)
    assert httpx2.get(f"{server.url}/v1/models", timeout=10).status_code == 401  # no header at all
    assert server.client().completions.create(model="gpt2lab", prompt="a", max_tokens=2).choices
    logs = server.logs()
    assert "POST /v1/completions" in logs  # the request log is there ...
    assert KEY not in logs  # ... the key is not


def rss(pid: int) -> int:
    """Resident memory of a process and its children, in bytes (Linux)."""
    children = subprocess.run(["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True).stdout.split()
    total = 0
    for p in children:
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def test_64_concurrent_requests_are_all_answered_and_memory_stays_flat(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:  # streaming half
            stream = await client.completions.create(model="gpt2lab", prompt=f"x{i} = ", max_tokens=10, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        answer = await client.completions.create(model="gpt2lab", prompt=f"y{i} = ", max_tokens=10)
        return answer.choices[0].text

    async def round_of_64() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    first = asyncio.run(round_of_64())
    after_first = rss(server.process.pid)
    second = asyncio.run(round_of_64())
    after_second = rss(server.process.pid)
    assert len(first) == len(second) == 64 and all(isinstance(t, str) for t in first + second)
    assert after_second - after_first < 0.05 * after_first, (after_first, after_second)
