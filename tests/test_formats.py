"""Task formats (data.format): chat, summarization and instruction records, a loss on the answer only, packed
windows, the token cache beside them, the chat template through the checkpoint to ``gpt2lab.chat``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY, export_all, train_in_process

from gpt2lab.chat import Chat, repl
from gpt2lab.checkpoint import load_checkpoint, saved_chat_template
from gpt2lab.data import GPT2DataModule
from gpt2lab.data.formats import ChatTemplate, TaskFormat, encode_examples, pack, split_batch
from gpt2lab.data.token_files import damaged_token_files
from gpt2lab.errors import ConfigError
from gpt2lab.generate import TextGenerator  # with interactive_mode, the terminal chat
from gpt2lab.model.cross_entropy import IGNORE_INDEX
from gpt2lab.tokenizers import EOS_TOKEN, token_byte_lengths

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "fast",
    "over",
    "green",
    "hills",
    "and",
    "wide",
    "rivers",
    "under",
    "bright",
    "blue",
    "skies",
]
SEPARATOR = {"summarization": "\nTL;DR: ", "instruction": "\n\n### Response:\n"}
CONTEXT = 64
FORMAT_RUN = [
    "tokenizer=bpe",
    "tokenizer.vocab_size=320",
    "tokenizer.show_progress=false",
    f"model.context_length={CONTEXT}",
    *[o for o in TINY if o.startswith(("model.d_", "model.num_", "trainer.enable_"))],
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1.0",
    "trainer.limit_test_batches=2",
    "sample=null",
]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_records(path: Path, fmt: str, n: int = 80, seed: int = 0) -> list[dict]:
    """A JSONL file of ``n`` records of ``fmt``, as a user would write it (docs/presets.md, Tasks)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if fmt == "chat":
            messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
            for _ in range(rng.randint(1, 2)):
                messages += [
                    {"role": "user", "content": words(rng, 2, 8) + "?"},
                    {"role": "assistant", "content": words(rng, 1, 6) + "."},
                ]
            records.append({"messages": messages})
        elif fmt == "summarization":
            records.append({"document": words(rng, 8, 40) + ".", "summary": words(rng, 2, 6)})
        else:
            records.append({"prompt": "Say " + words(rng, 2, 8), "completion": words(rng, 1, 6)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture(scope="module")
def record_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("records")
    files = {}
    for fmt in ("chat", "summarization", "instruction"):
        files[fmt] = root / f"{fmt}.jsonl"
        write_records(files[fmt], fmt)
    return files


def datamodule(path: Path, fmt: str, cache_dir: Path, **kwargs) -> GPT2DataModule:
    dm = GPT2DataModule(
        source="files",
        path=str(path),
        format=fmt,
        max_length=kwargs.pop("max_length", CONTEXT),
        batch_size=4,
        cache_dir=str(cache_dir),
        tokenizer={"kind": "bpe", "vocab_size": 320, "show_progress": False},
        **kwargs,
    )
    dm.setup()
    return dm


def windows(dm: GPT2DataModule, split: str):
    """Each window of a split, as the module reads it (``split_batch``): its token ids and which are labels."""
    ds = dm.datasets[split]
    for i in range(len(ds)):
        window = ds[i]
        inputs, labels = split_batch(window[None])
        last = window[-1:]
        ids = torch.cat([inputs[0], torch.where(last < 0, ~last, last)])
        labelled = labels[0] != IGNORE_INDEX
        assert torch.equal(labels[0][labelled], ids[1:][labelled])  # a label is the next token
        yield ids.tolist(), [False, *labelled.tolist()]


def examples(ids: list[int], labelled: list[bool], eos: int):
    """A window cut into its examples (each ends with end-of-text; padding after the last is left out)."""
    start = 0
    for j, token in enumerate(ids):
        if token == eos:
            yield ids[start : j + 1], labelled[start : j + 1]
            start = j + 1


# -- each format trains through the real entry point ---------------------------------------------------------
@pytest.mark.parametrize("fmt", ["chat", "summarization", "instruction"])
def test_each_format_trains_through_train_py(fmt, record_files, cache_dir, tmp_path, train_cli):
    run = tmp_path / "run"
    result = train_cli(
        f"data={fmt}", "data.source=files", f"data.path={record_files[fmt]}", *FORMAT_RUN,
        f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 4 and math.isfinite(results["metrics"]["val/loss"])
    assert "packing efficiency" in result.stdout + result.stderr


# -- the loss covers the answer only -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["summarization", "instruction"])
def test_only_the_answer_carries_loss(fmt, record_files, cache_dir):
    """Every labelled token of every window is the answer (the summary, the completion) or the end-of-text after
    it, and every token of the answer is labelled: the text before it, up to the separator, carries none."""
    records = [json.loads(line) for line in record_files[fmt].read_text().splitlines()]
    answers = {r["summary" if fmt == "summarization" else "completion"] for r in records}
    dm = datamodule(record_files[fmt], fmt, cache_dir)
    tok, eos = dm.tokenizer, dm.tokenizer.token_to_id(EOS_TOKEN)
    seen = 0
    for split in ("train", "validation"):
        for ids, labelled in windows(dm, split):
            for example, marks in examples(ids, labelled, eos):
                first = marks.index(True)
                assert all(marks[first:]), "the labelled tokens are one run at the end of the example"
                prompt, answer = tok.decode(example[:first]), tok.decode(example[first:], skip_special_tokens=False)
                assert prompt.endswith(SEPARATOR[fmt]), prompt
                assert answer.endswith(EOS_TOKEN) and answer.removesuffix(EOS_TOKEN) in answers, answer
                seen += 1
    assert seen == sum(dm.stats[s]["examples"] for s in ("train", "validation"))


def test_only_the_assistant_turns_carry_loss(record_files, cache_dir):
    """Walking each window token by token: a token is labelled exactly when it is inside an assistant turn (its
    content and its <|end|>); system and user turns, role tokens and end-of-text carry no loss."""
    dm = datamodule(record_files["chat"], "chat", cache_dir)
    template, tok = ChatTemplate(), dm.tokenizer
    role_of = {tok.token_to_id(token): role for role, token in template.roles.items()}
    end = tok.token_to_id(template.end)
    labelled_tokens = 0
    for split in ("train", "validation"):
        for ids, labelled in windows(dm, split):
            role = None
            for position, (token, label) in enumerate(zip(ids, labelled, strict=True)):
                if token in role_of:
                    role = role_of[token]
                    assert not label
                    continue
                inside = role == "assistant"
                if position > 0:  # a window's first token is never a label
                    assert label == inside, (tok.decode(ids, skip_special_tokens=False), position)
                labelled_tokens += label
                if token == end:
                    role = None
    assert labelled_tokens == sum(dm.stats[s]["scored_tokens"] for s in ("train", "validation")) > 0


# -- packing ---------------------------------------------------------------------------------------------------
def test_packing_puts_several_examples_in_a_window_and_keeps_them_whole(record_files, cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="gpt2lab.data.datamodule"):
        packed = datamodule(record_files["chat"], "chat", cache_dir)
    unpacked = datamodule(record_files["chat"], "chat", cache_dir, packing=False)
    stats, alone = packed.stats["train"], unpacked.stats["train"]
    assert stats["examples"] == alone["examples"] == alone["windows"] > 2 * stats["windows"]
    assert stats["real_tokens"] == alone["real_tokens"] and stats["scored_tokens"] == alone["scored_tokens"]
    efficiency = stats["real_tokens"] / stats["tokens"]
    assert efficiency > 0.8 > alone["real_tokens"] / alone["tokens"]
    assert f"packing efficiency {100 * efficiency:.1f}%" in caplog.text
    tok = packed.tokenizer
    starts = {tok.token_to_id(t) for t in ("<|system|>", "<|user|>")}
    eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id("<|pad|>")
    for ids, _ in windows(packed, "train"):
        assert ids[0] in starts  # each window starts with a conversation, never the rest of one
        # after each end-of-text comes a new conversation or padding, and the last one ends in the window
        assert all(ids[j] in starts | {pad} for j in range(1, len(ids)) if ids[j - 1] == eos)
        assert [t for t in ids if t != pad][-1] == eos
    assert max(sum(t == eos for t in ids) for ids, _ in windows(packed, "train")) >= 3


def test_pack_places_every_example_whole_in_one_window():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    window_of, offset_of, n = pack(lengths, 65)
    used = np.zeros((n, 65), dtype=int)
    for w, o, size in zip(window_of, offset_of, lengths, strict=True):
        assert o + size <= 65
        used[w, o : o + size] += 1
    assert used.max() == 1  # no two examples share a token
    assert n <= math.ceil(lengths.sum() / 65) * 1.05  # best fit wastes little
    assert pack(lengths, 65, packing=False)[2] == 500


def test_an_example_longer_than_the_window_is_truncated_or_dropped(tmp_path, cache_dir, caplog):
    path = tmp_path / "long.jsonl"
    records = write_records(path, "summarization", n=40)
    records[5]["document"] = " ".join(["river"] * 300)  # far longer than a window of 65 tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO, logger="gpt2lab.data.datamodule"):
        dm = datamodule(path, "summarization", cache_dir, val_split=0.1, test_split=0.0)
    truncated = sum(s["truncated"] for s in dm.stats.values())
    assert truncated >= 1 and "longer than a window of 65 tokens" in caplog.text and "were truncated" in caplog.text
    assert sum(s["examples"] for s in dm.stats.values()) == 40
    # the truncated one kept its summary whole, behind what fits of its document
    summary = records[5]["summary"]
    tok, eos = dm.tokenizer, dm.tokenizer.token_to_id(EOS_TOKEN)
    found = [
        tok.decode(example, skip_special_tokens=False)
        for split in dm.datasets
        for ids, labelled in windows(dm, split)
        for example, _ in examples(ids, labelled, eos)
        if len(example) == CONTEXT + 1
    ]
    assert found and all(text.endswith(f"\nTL;DR: {summary}{EOS_TOKEN}") for text in found)
    dropped = datamodule(path, "summarization", cache_dir, val_split=0.1, test_split=0.0, overlong="drop")
    assert sum(s["dropped_too_long"] for s in dropped.stats.values()) == truncated
    assert sum(s["examples"] for s in dropped.stats.values()) == 40 - truncated


def test_a_record_with_nothing_to_score_is_dropped_and_counted(tmp_path, cache_dir, caplog):
    path = tmp_path / "chat.jsonl"
    records = write_records(path, "chat", n=40)
    for r in records[:6]:
        r["messages"] = [m for m in r["messages"] if m["role"] != "assistant"]  # nobody answers
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO, logger="gpt2lab.data.datamodule"):
        dm = datamodule(path, "chat", cache_dir, val_split=0.1, test_split=0.0)
    assert sum(s["dropped_nothing_to_score"] for s in dm.stats.values()) == 6
    assert sum(s["examples"] for s in dm.stats.values()) == 34
    assert "were dropped: they have nothing to score (the assistant turns empty or missing)" in caplog.text


# -- the configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "hub", "columns"),
    [
        ("chat", ("HuggingFaceH4/no_robots", None), {"messages_column": "messages"}),
        (
            "summarization",
            ("abisee/cnn_dailymail", "3.0.0"),
            {"document_column": ("article", "document"), "summary_column": ("highlights", "summary")},
        ),
        (
            "instruction",
            ("tatsu-lab/alpaca", None),
            {"prompt_column": (["instruction", "input"], "prompt"), "completion_column": ("output", "completion")},
        ),
    ],
)
def test_each_format_config_names_a_hub_dataset_and_reads_files_too(compose_cfg, fmt, hub, columns):
    """data=<format> is a real Hub dataset with its columns; data.source=files reads the README's record shape,
    without the Hub keys (which data=files refuses)."""
    data = compose_cfg(f"data={fmt}", tiny=False).data
    assert (data.source, data.name, data.config_name, data.format) == ("hub", *hub, fmt)
    for key, value in columns.items():
        assert data[key] == (value[0] if isinstance(value, tuple) else value)
    files = compose_cfg(f"data={fmt}", "data.source=files", "data.path=my.jsonl", tiny=False).data
    assert (files.name, files.config_name, files.path) == (None, None, "my.jsonl")
    for key, value in columns.items():
        assert files[key] == (value[1] if isinstance(value, tuple) else value)


# -- the token cache -----------------------------------------------------------------------------------------
def test_the_token_cache_keeps_the_mask_and_is_keyed_by_format_and_window(record_files, cache_dir):
    dm = datamodule(record_files["instruction"], "instruction", cache_dir)
    token_dir = dm._token_dir
    meta = json.loads((token_dir / "meta.json").read_text())
    assert {"train.bin", "train.mask.bin"} <= set(meta["files"]) and meta["format"]["window"] == CONTEXT + 1
    assert datamodule(record_files["instruction"], "instruction", cache_dir)._token_dir == token_dir  # reused
    assert datamodule(record_files["instruction"], "instruction", cache_dir, max_length=32)._token_dir != token_dir
    assert datamodule(record_files["instruction"], "instruction", cache_dir, packing=False)._token_dir != token_dir
    mask = token_dir / "validation.mask.bin"
    data = bytearray(mask.read_bytes())
    data[10] ^= 1
    mask.write_bytes(bytes(data))
    assert damaged_token_files(token_dir) == "validation.mask.bin does not have the content recorded in meta.json"
    again = datamodule(record_files["instruction"], "instruction", cache_dir)  # written again, whole
    assert damaged_token_files(again._token_dir) is None
    with pytest.raises(ConfigError, match="eval.stride=8: strided windows are for running text"):
        again.eval_dataloader("validation", stride=8)
    # split=all (evaluation): every split's windows of whole examples, one after the other
    whole = again.eval_dataloader("all").dataset
    assert [w.tolist() for w in whole] == [w.tolist() for d in again.datasets.values() for w in d]


# -- the loss and bits per byte of masked windows, in training and in evaluation ------------------------------
def test_evaluate_reports_the_summary_loss(record_files, cache_dir, tmp_path, train_cli, run_main):
    run = tmp_path / "run"
    result = train_cli(
        "data=summarization", "data.source=files", f"data.path={record_files['summarization']}", *FORMAT_RUN,
        f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best_val_loss = json.loads((run / "results.json").read_text())["best_val_loss"]
    out = tmp_path / "eval"
    result = run_main(
        "gpt2lab.evaluate", f"ckpt={run}", "split=validation", f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["format"] == "summarization" and "over the summaries only" in result.stdout + result.stderr
    assert metrics["loss"] == pytest.approx(best_val_loss, rel=1e-4)  # training's val/loss is the summary loss
    # By hand: the mean cross-entropy of the summary tokens only, and the bits of their text tokens over their bytes
    # (the end-of-text that ends each summary, 0 bytes, counts in the loss only)
    model, tokenizer = load_checkpoint(metrics["checkpoint"])
    dm = datamodule(record_files["summarization"], "summarization", cache_dir)
    nats = text_nats = count = special = n_bytes = 0
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer))
    with torch.no_grad():
        for window in dm.datasets["validation"]:
            inputs, labels = split_batch(window[None])
            logits, _ = model(inputs, labels, return_logits=True)
            per_token = F.cross_entropy(logits[0], labels[0], ignore_index=IGNORE_INDEX, reduction="none")
            nats += per_token.sum().item()
            scored = labels[0] != IGNORE_INDEX
            text = scored & (byte_lengths[labels[0].clamp(min=0)] > 0)
            text_nats += per_token[text].sum().item()
            count, special = count + int(scored.sum()), special + int((scored & ~text).sum())
            n_bytes += byte_lengths[labels[0][scored]].sum().item()
    assert metrics["tokens"] == count == dm.stats["validation"]["scored_tokens"]
    assert metrics["special_tokens"] == special > 0
    assert metrics["loss"] == pytest.approx(nats / count, rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(text_nats / (n_bytes * math.log(2)), rel=1e-4)


# -- the chat template: tokenizer, checkpoint, gpt2lab.chat ---------------------------------------------------
@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, record_files, cache_dir) -> Path:
    return train_in_process(
        tmp_path_factory.mktemp("chat") / "run",
        [
            "data=chat",
            "data.source=files",
            f"data.path={record_files['chat']}",
            *FORMAT_RUN,
            f"paths.cache_dir={cache_dir}",
            "test=false",
        ],
    )


def test_the_chat_template_round_trips_through_the_checkpoint(chat_run):
    ckpt = chat_run / "checkpoints" / "last.ckpt"
    template = ChatTemplate.from_dict(saved_chat_template(ckpt))
    assert template == ChatTemplate()
    _, tokenizer = load_checkpoint(ckpt)
    for token in template.special_tokens():
        assert tokenizer.token_to_id(token) is not None
        assert tokenizer.encode(f"a{token}b").ids[1] == tokenizer.token_to_id(token)  # one token, never split
    # the prompt gpt2lab.chat renders is, token for token, the start of the training example of that conversation
    messages = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat on a mat."}]
    fmt = TaskFormat("chat", columns={"messages_column": "messages"})
    example = encode_examples({"messages": [messages], "_record": [0]}, fmt, tokenizer, CONTEXT + 1, "truncate")
    prompt = tokenizer.encode(template.prompt(messages[:1])).ids
    assert example["ids"][0][: len(prompt)] == prompt
    assert example["mask"][0][len(prompt) :] == [1] * (len(example["ids"][0]) - len(prompt) - 1) + [0]


def test_chat_renders_the_conversation_with_the_template(chat_run, monkeypatch, capsys):
    generator = TextGenerator(str(chat_run), device="cpu")
    template = ChatTemplate.from_dict(saved_chat_template(generator.path))
    chat = Chat(generator, {"max_new_tokens": 6, "do_sample": False}, template)
    assert chat.context("hello") == "<|user|>hello<|end|><|assistant|>"
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "sat."}]
    assert chat.context("again") == "<|user|>hi<|end|><|assistant|>sat.<|end|><|user|>again<|end|><|assistant|>"
    # a reply ends at <|end|>: what the model writes after it is not part of the reply
    tok = generator.tokenizer
    steps = [tok.encode(" cat").ids[0], tok.token_to_id("<|end|>"), tok.encode(" dog").ids[0]]
    monkeypatch.setattr(generator.model, "generate_stream", lambda *a, **k: iter(torch.tensor([t]) for t in steps))
    assert chat.reply("and?") == " cat"
    assert chat.messages[-2:] == [{"role": "user", "content": "and?"}, {"role": "assistant", "content": " cat"}]
    monkeypatch.undo()
    # the terminal conversation says it uses the template
    lines = iter(["the cat?"])

    def typed(prompt: str) -> str:
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr("builtins.input", typed)
    generator.interactive_mode({"max_new_tokens": 4, "stop": [], "seed": 0})
    screen = capsys.readouterr().out
    assert "its chat template, gpt2lab-chat-v1: a reply ends at <|end|>" in screen and "model> " in screen


def test_a_template_reply_of_several_paragraphs_is_not_cut_at_a_blank_line(chat_run, monkeypatch, capsys):
    """conf/chat.yaml's blank-line stop ends a plain model's reply; a model with a template ends its turn at
    <|end|>, so the blank line is dropped unless the user gave inference.stop."""
    generator = TextGenerator(str(chat_run), device="cpu")
    tok = generator.tokenizer
    steps = [*tok.encode("one.\n\ntwo.").ids, tok.token_to_id("<|end|>")]
    monkeypatch.setattr(generator.model, "generate_stream", lambda *a, **k: iter(torch.tensor([t]) for t in steps))
    for stop_given, reply in ((False, "one.\n\ntwo."), (True, "one.")):
        lines = iter(["hi"])

        def typed(prompt: str, lines=lines) -> str:
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None  # Ctrl-D

        monkeypatch.setattr("builtins.input", typed)
        capsys.readouterr()
        repl(generator, {"max_new_tokens": len(steps), "stop": ["\\n\\n"], "seed": 0}, stop_given=stop_given)
        assert capsys.readouterr().out.split("model> ")[1].rstrip("\n") == reply


@pytest.fixture(scope="module")
def chat_export(chat_run, tmp_path_factory) -> Path:
    """The chat run exported in every format (``format=all``), as the command line composes it."""
    return export_all(chat_run, tmp_path_factory.mktemp("chat_export"), "onnx.optimize=none")


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "the cat?"},
    {"role": "assistant", "content": "sat on a mat."},
    {"role": "user", "content": "and the dogs?"},
    {"role": "assistant", "content": "ran fast over green hills."},
]


def test_the_hf_export_of_a_chat_model_has_its_template_and_end_of_turn(chat_run, chat_export):
    """transformers' apply_chat_template gives gpt2lab's tokens: the training example's (without the end-of-text
    that separates examples) and, with add_generation_prompt, the prompt gpt2lab.chat continues; a reply ends at
    <|end|>, where generate stops (issue 27 #4)."""
    from transformers import AutoTokenizer, GenerationConfig

    template = ChatTemplate.from_dict(saved_chat_template(chat_run / "checkpoints" / "last.ckpt"))
    _, tokenizer = load_checkpoint(chat_run / "checkpoints" / "last.ckpt")
    end = tokenizer.token_to_id("<|end|>")
    hf = AutoTokenizer.from_pretrained(chat_export / "hf")
    assert hf.eos_token == "<|end|>" and hf.eos_token_id == end and hf.padding_side == "left"
    assert GenerationConfig.from_pretrained(chat_export / "hf").eos_token_id == end
    fmt = TaskFormat("chat", columns={"messages_column": "messages"})
    example = encode_examples({"messages": [CONVERSATION], "_record": [0]}, fmt, tokenizer, 10 * CONTEXT, "drop")
    assert example["ids"][0][-1] == tokenizer.token_to_id(EOS_TOKEN)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == template.render(CONVERSATION)
    assert list(hf.apply_chat_template(CONVERSATION, return_dict=True)["input_ids"]) == example["ids"][0][:-1]
    question = CONVERSATION[:-1]
    assert hf.apply_chat_template(question, add_generation_prompt=True, tokenize=False) == template.prompt(question)
    assert list(hf.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]) == (
        tokenizer.encode(template.prompt(question)).ids
    )
    # ... which is the start of the training example: the model is prompted as it was trained
    assert example["ids"][0][: len(tokenizer.encode(template.prompt(question)).ids)] == (
        tokenizer.encode(template.prompt(question)).ids
    )
    with pytest.raises(Exception, match="the chat template knows the roles system, user, assistant, not tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # The other formats carry the same tokenizer config
    for fmt_dir in ("onnx", "torchscript"):
        other = json.loads((chat_export / fmt_dir / "tokenizer_config.json").read_text())
        assert other == json.loads((chat_export / "hf" / "tokenizer_config.json").read_text())
        assert other["chat_template"] == template.jinja() and other["eos_token"] == "<|end|>"


def test_a_chat_models_card_prompts_it_with_a_conversation(chat_run, chat_export):
    """The card's transformers snippet is a chat: it runs as pasted and prints the model's greedy reply, which
    gpt2lab's model gives for the same conversation; the ONNX and TorchScript snippets prompt in the template."""
    model, tokenizer = load_checkpoint(chat_run / "checkpoints" / "last.ckpt")
    template = ChatTemplate.from_dict(saved_chat_template(chat_run / "checkpoints" / "last.ckpt"))
    snippets = {}
    for fmt in ("hf", "onnx", "torchscript"):
        card = (chat_export / fmt / "README.md").read_text()
        assert re.search(r"^# .*gpt2lab GPT-2 \(\d+K\) chat model trained on chat\.jsonl$", card, re.M)
        assert "conversational" in yaml.safe_load(card.split("---")[1])["tags"]
        (snippets[fmt],) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert "apply_chat_template(messages, add_generation_prompt=True" in snippets["hf"]
    (message,) = re.findall(r'^messages = \[\{"role": "user", "content": "(.*)"\}\]$', snippets["hf"], re.M)
    prompt = tokenizer.encode(template.prompt([{"role": "user", "content": message}])).ids
    reply = model.generate(torch.tensor([prompt]), 20, do_sample=False)[0, len(prompt) :].tolist()
    end = tokenizer.token_to_id(template.end)
    reply = reply[: reply.index(end)] if end in reply else reply
    for fmt, snippet in snippets.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(snippet, f"{fmt}/README.md", "exec"), {})
        if fmt == "hf":  # the reply alone, which generate ends at <|end|>
            assert out.getvalue() == tokenizer.decode(reply) + "\n"
        else:
            assert repr(template.prompt([{"role": "user", "content": message}])) in snippet
            assert out.getvalue().startswith(message)


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "record", "kwargs", "message"),
    [
        ("chat", {"turns": []}, {}, r"data.messages_column='messages' is not a column of .*bad.jsonl.*\['turns'\]"),
        (
            "summarization",
            {"document": "a", "highlights": "b"},
            {},
            r"data.summary_column='summary' is not a column .*'highlights'.*set data.summary_column",
        ),
        (
            "chat",
            {"messages": [{"content": "hi"}]},
            {},
            r"bad.jsonl.*record \d+ \(from 0, in the files' order\).*message 0 has no 'role': each message is \{\"role\"",
        ),
        (
            "chat",
            {"messages": [{"role": "bot", "content": "hi"}]},
            {},
            r"record \d+ .*message 0 has the role 'bot'.*use one of system, user, assistant",
        ),
        ("poetry", {"text": "a"}, {}, r"data.format='poetry': expected one of plain, chat, summarization, instruction"),
        ("instruction", {"prompt": "a", "completion": "b"}, {"overlong": "cut"}, r"data.overlong='cut'"),
    ],
)
def test_bad_records_and_settings_name_the_key_and_the_fix(tmp_path, cache_dir, fmt, record, kwargs, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [record] * 20) + "\n")
    with pytest.raises(ConfigError, match=message):
        datamodule(path, fmt, cache_dir, **kwargs)


def test_a_text_file_is_not_records(tmp_path, cache_dir, train_cli):
    (tmp_path / "notes.txt").write_text("some text\n\nmore text\n")
    args = ("data=chat", "data.source=files", "data.path=notes.txt", *FORMAT_RUN, f"paths.cache_dir={cache_dir}")
    result = train_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert "Error: data.path='notes.txt': a task format (data.format) reads records" in result.stderr


def test_a_bad_record_is_numbered_in_the_files_order_whichever_split_it_went_to(tmp_path, cache_dir):
    """Record 30 is the file's 31st line, wherever the random split put it: the number finds it in the file."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"rol": "user", "content": "hi"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] * 30 + [bad] + [good] * 9) + "\n")
    with pytest.raises(ConfigError, match=r"record 30 \(from 0, in the files' order\), in the \w+ split, message 0"):
        datamodule(path, "chat", cache_dir)


def test_a_records_file_without_data_source_files_names_data_source_not_data_files(tmp_path, train_cli):
    """data=files would throw the chat format away: the fix keeps data=chat and reads the file."""
    result = train_cli("data=chat", "data.path=chat.jsonl", cwd=tmp_path)
    assert result.returncode == 1
    error = "Error: data.path='chat.jsonl' is read by data=files only, and data.source is 'hub': add data.source=files"
    assert error in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(
    not hasattr(datasets, "Json"), reason="datasets without its Json feature reads mixed kinds otherwise"
)
def test_a_content_that_is_not_text_among_text_is_named_without_blaming_a_good_record(tmp_path, cache_dir):
    """One content 5 among texts: datasets then decodes every content as JSON (the text "28." as 28.0), so the
    error names the field and the fix rather than the first good record that decodes to a number."""
    turns = [{"role": "user", "content": "What is 10 + 18?"}, {"role": "assistant", "content": "28."}]
    bad = [{"role": "user", "content": 5}, {"role": "assistant", "content": "5."}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in [turns] * 30 + [bad]) + "\n")
    with pytest.raises(ConfigError, match=r"messages\[\]\.content holds values of several kinds.*\(\"5\", not 5\)"):
        datamodule(path, "chat", cache_dir)
