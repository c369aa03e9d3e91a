"""Continuous batching (gpt2lab/serve/batching.py over DecodeSlots and ONNXSlots): requests that join and leave
rows at different steps, across the ring's wrap, decode exactly as each would alone; a seeded row draws the same
tokens whatever shares its batch; text is sent only once no stop string can still begin in it."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.model import GPT2Config, GPT2Model
from gpt2lab.model.generation import DecodeSlots, sample_rows
from gpt2lab.serve.batching import Batcher, Choice

CONTEXT = 24


@pytest.fixture(scope="module")
def model() -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, context_length=CONTEXT, d_model=32, num_heads=2, num_layers=2, d_ff=64)
    return GPT2Model(config).eval()


def alone(model: GPT2Model, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens of ``prompt`` decoded by itself, without any cache: the reference."""
    ids = torch.tensor([prompt])
    steps = model.generate_stream(ids, new, do_sample=False, use_cache=False)
    return [int(t) for t in steps]


class Characters:
    """A tokenizer whose token i is the i-th character of ``alphabet``: enough for ``Choice.add``."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i % len(self.alphabet)] for i in ids)


def greedy(uid: str, prompt: list[int], max_tokens: int) -> Choice:
    return Choice(uid, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=[], ends=[])


def test_requests_joining_and_leaving_decode_as_alone(model):
    """Three rows, five requests of different lengths arriving at different steps; the ring (the whole context,
    24 columns) wraps several times. Every request's greedy tokens equal its own decoding without a cache."""
    slots = DecodeSlots(model, batch_size=3)
    tokenizer = Characters("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ!?")
    batcher = Batcher(slots, tokenizer, rows=3)
    g = torch.Generator().manual_seed(1)
    requests = {f"r{i}": (torch.randint(64, (length,), generator=g).tolist(), new)
                for i, (length, new) in enumerate([(5, 12), (9, 15), (3, 20), (20, 4), (1, 23)])}  # fmt: skip
    arrivals = {0: ["r0"], 2: ["r1", "r2"], 3: ["r3"], 9: ["r4"]}  # r3 and r4 wait for a free row
    tokens: dict[str, list[int]] = {uid: [] for uid in requests}
    finished = set()
    for step in range(80):
        for uid in arrivals.get(step, []):
            batcher.add(greedy(uid, *requests[uid]))
        for uid, _, finish, choice in batcher.step():
            if finish:
                tokens[uid] = choice.tokens
                finished.add(uid)
        if len(finished) == len(requests):
            break
    assert finished == set(requests) and not batcher.busy()
    for uid, (prompt, new) in requests.items():
        assert tokens[uid] == alone(model, prompt, new), uid
    assert step > 1.5 * CONTEXT  # the column every row writes went round the ring and on


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    logits = torch.randn(3, 50)
    seeded = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    alone_row = sample_rows(logits[1:2], [0.9], [0.95], [seeded()])
    others = [torch.Generator().manual_seed(s) for s in (1, 2)]
    together = sample_rows(logits, [1.0, 0.9, 0.0], [1.0, 0.95, 1.0], [others[0], seeded(), others[1]])
    assert together[1] == alone_row[0]
    assert together[2] == logits[2].argmax()  # temperature 0: greedy
    draws = {sample_rows(logits[1:2], [1.0], [1.0], [torch.Generator().manual_seed(s)]).item() for s in range(40)}
    assert len(draws) > 5  # a sampled row does sample


def test_top_p_keeps_each_rows_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    picks = {tuple(sample_rows(logits, [1.0, 1.0], [0.4, 1.0], [torch.Generator().manual_seed(s)] * 2).tolist())
             for s in range(60)}  # fmt: skip
    assert {p[0] for p in picks} == {0}  # top_p 0.4: the most likely token alone
    assert {p[1] for p in picks} == {0, 1, 2}


def test_text_that_may_begin_a_stop_string_waits():
    tokenizer = Characters("abXYcdZ")  # a=0, b=1, X=2, Y=3, Z=6
    choice = Choice("u", [0], 10, 0.0, 1.0, 0, stop=["XY"], ends=[])
    said = [choice.add(t, tokenizer) for t in (0, 1, 2, 6, 2, 3)]
    assert said == [
        ("a", None), ("b", None),
        ("", None),  # X may begin the stop string XY: held
        ("XZ", None),  # it did not
        ("", None), ("", "stop"),  # XY: the text ends before it, and nothing of it was sent
    ]  # fmt: skip
    assert choice.text == "abXZ" and choice.sampled == 6


def test_a_partial_character_waits_for_the_rest():
    class Bytes(Characters):
        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    choice = Choice("u", [0], 10, 0.0, 1.0, 0, stop=[], ends=[])
    e_acute = list("é".encode())
    assert choice.add(ord("a"), Bytes("")) == ("a", None)
    assert choice.add(e_acute[0], Bytes("")) == ("", None)  # half of é
    assert choice.add(e_acute[1], Bytes("")) == ("é", None)


def test_a_choice_ends_at_its_end_token_or_its_length():
    tokenizer = Characters("abcdefgh")
    ended = Choice("u", [0], 10, 0.0, 1.0, 0, stop=[], ends=[7])
    assert [ended.add(t, tokenizer) for t in (0, 1, 7)] == [("a", None), ("b", None), ("", "stop")]
    assert ended.sampled == 3 and ended.tokens == [0, 1]
    short = Choice("u", [0], 2, 0.0, 1.0, 0, stop=[], ends=[7])
    assert [short.add(t, tokenizer) for t in (0, 1)] == [("a", None), ("b", "length")]
