"""gpt2lab serve with a chat model (data.format=chat), from its checkpoint and from its ONNX export, and the
command's own settings: a reply is what ``gpt2lab chat`` answers, an ONNX export answers as its checkpoint, and a
bad setting is one ``Error:`` line before anything starts."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
from conftest import TINY, export_all, train_in_process
from test_serve import Server, openai

from gpt2lab.checkpoint import saved_chat_template
from gpt2lab.inference.generator import TextGenerator, complete
from gpt2lab.inference.onnx import ONNXSlots, ONNXTextGenerator
from gpt2lab.model.generation import DecodeSlots
from gpt2lab.serve.batching import Batcher, Choice
from gpt2lab.tokenizers.chat_template import ChatTemplate

WORDS = [
    "the",
    "a",
    "model",
    "reads",
    "writes",
    "code",
    "test",
    "data",
    "run",
    "loss",
    "step",
    "token",
    "cache",
    "batch",
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, cache_dir) -> Path:
    rng = random.Random(0)
    records = tmp_path_factory.mktemp("chats") / "chat.jsonl"
    lines = []
    for _ in range(60):
        say = lambda: " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))  # noqa: E731
        lines.append({"messages": [{"role": "user", "content": say() + "?"}, {"role": "assistant", "content": say()}]})
    records.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return train_in_process(
        tmp_path_factory.mktemp("chat") / "run",
        ["data=chat", "data.source=files", f"data.path={records}", f"paths.cache_dir={cache_dir}",
         *[o for o in TINY if not o.startswith(("data=", "model.context_length"))], "model.context_length=64",
         "trainer.max_steps=30", "trainer.val_check_interval=10", "sample=null", "test=false"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def chat_server(chat_run, tmp_path_factory):
    running = Server(f"ckpt={chat_run}", cwd=tmp_path_factory.mktemp("serve_chat"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def onnx_export(chat_run, tmp_path_factory) -> Path:
    return export_all(chat_run / "checkpoints" / "last.ckpt", tmp_path_factory.mktemp("export"), "format=onnx")


@pytest.fixture(scope="module")
def onnx_server(onnx_export, tmp_path_factory):
    running = Server(f"onnx={onnx_export}", cwd=tmp_path_factory.mktemp("serve_onnx"))
    yield running
    running.stop()


MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the model reads?"}]


def chat_reply(chat_run: Path, messages: list[dict], max_tokens: int) -> str:
    """What ``gpt2lab chat`` answers, greedily: the template's prompt, continued to its end-of-turn token."""
    generator = TextGenerator(str(chat_run / "checkpoints" / "last.ckpt"), device="cpu")
    template = ChatTemplate.from_dict(saved_chat_template(generator.path))
    settings = {"max_new_tokens": max_tokens, "do_sample": False, "repetition_penalty": 1.0}
    end = generator.tokenizer.token_to_id(template.end)
    return complete(generator.model, generator.tokenizer, [template.prompt(MESSAGES)], settings, end_token=end)[0]


def test_a_chat_reply_is_what_gpt2lab_chat_answers(chat_server, chat_run):
    client = chat_server.client()
    answer = client.chat.completions.create(model="gpt2lab", messages=MESSAGES, max_tokens=20, temperature=0)
    expected = chat_reply(chat_run, MESSAGES, 20)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model="gpt2lab", messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [([], "messages", "empty"), ([{"role": "robot", "content": "hi"}], "messages[0].role", "knows")],
)
def test_bad_messages_are_a_400_naming_the_field(chat_server, messages, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat_server.client().chat.completions.create(model="gpt2lab", messages=messages)
    error = refused.value.body
    assert error["param"] == param and words in error["message"]


@pytest.mark.slow
def test_an_onnx_export_serves_as_its_checkpoint(onnx_server, chat_server, chat_run):
    for server in (onnx_server, chat_server):
        client = server.client()
        chat = client.chat.completions.create(model="gpt2lab", messages=MESSAGES, max_tokens=16, temperature=0)
        assert chat.choices[0].message.content == chat_reply(chat_run, MESSAGES, 16)
    texts = [s.client().completions.create(model="gpt2lab", prompt="the ", max_tokens=16, temperature=0)
             .choices[0].text for s in (onnx_server, chat_server)]  # fmt: skip
    assert texts[0] == texts[1]
    seeded = [s.client().completions.create(model="gpt2lab", prompt="a ", max_tokens=8, seed=3, n=2)
              for s in (onnx_server, onnx_server)]  # fmt: skip
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]


@pytest.mark.slow
def test_onnx_slots_decode_as_the_checkpoints_slots(onnx_export, chat_run):
    """Requests joining and leaving the rows at different steps, the ring wrapping: onnxruntime's slots give the
    greedy tokens PyTorch's give."""
    generator = TextGenerator(str(chat_run / "checkpoints" / "last.ckpt"), device="cpu")
    onnx = ONNXTextGenerator(onnx_export)
    prompts = [[5, 6, 7], [9] * 12, [3, 4], [20] * 40, [7]]
    news = [30, 25, 40, 20, 50]

    def decode(slots) -> dict[str, list[int]]:
        batcher, done = Batcher(slots, generator.tokenizer, rows=3), {}
        for step in range(400):
            if step in (0, 3, 5, 9, 14):
                i = (0, 3, 5, 9, 14).index(step)
                batcher.add(Choice(str(i), prompts[i], news[i], 0.0, 1.0, 0, stop=[], ends=[]))
            done |= {uid: list(c.tokens) for uid, _, finish, c in batcher.step() if finish}
            if len(done) == len(prompts):
                return done
        raise AssertionError("not all finished")

    assert decode(ONNXSlots(onnx.decoder, 3)) == decode(DecodeSlots(generator.model, 3))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["port=0"], "port=0: expected 1 to 65535"),
        (["serve.max_batch_size=0"], "serve.max_batch_size=0: expected 1 to 4096"),
        (["serve.max_n=0"], "serve.max_n=0: expected >= 1"),
        (["serve.top_k=0"], "serve.top_k=0: expected at least 1"),
        (["onnx=/nowhere"], "not an ONNX export directory"),
        (["ckpt=/nowhere.ckpt"], "nowhere"),
        (["device=cuda:7"], "device='cuda:7' cannot be used here"),
        (["port=PORT_IN_USE"], "cannot be listened on"),
    ],
)
def test_a_bad_setting_is_one_error_line(run_main, trained_run, tmp_path, args, message):
    given = args if any(a.startswith(("ckpt=", "onnx=")) for a in args) else [f"ckpt={trained_run}", *args]
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port something else listens on
        given = [a.replace("PORT_IN_USE", str(busy.getsockname()[1])) for a in given]
        result = run_main("gpt2lab.serve", *given, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_a_typo_in_a_key_fails_naming_it(run_main, trained_run, tmp_path):
    result = run_main("gpt2lab.serve", f"ckpt={trained_run}", "serve.batch=4", cwd=tmp_path)
    assert result.returncode == 1 and "Could not override 'serve.batch'" in result.stderr


def test_a_public_address_is_served_with_a_warning(run_main, trained_run, tmp_path, monkeypatch):
    started = {}
    monkeypatch.setattr("litserve.LitServer.run", lambda self, **kw: started.update(kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_main("gpt2lab.serve", f"ckpt={trained_run}", "host=0.0.0.0", f"port={port}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert started["host"] == "0.0.0.0"
    said = result.stdout + result.stderr
    assert "reachable from other machines" in said and "serve.api_key" in said
