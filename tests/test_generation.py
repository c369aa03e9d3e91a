"""Decoding with the KV cache: the same tokens as re-reading the whole prefix, batched as alone, reproducible."""

import pytest
import torch

from gpt2lab.model import GPT2Config, GPT2Model
from gpt2lab.model.generation import filter_logits, penalize_repetition

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, context_length=32, d_model=32, num_heads=2, num_layers=2, d_ff=64,
        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0, initializer_range=0.5,
    )  # fmt: skip  # a wide init: varied greedy tokens from an untrained model
    return GPT2Model(config).eval()


def test_greedy_with_the_cache_equals_rereading_the_prefix_and_the_full_forward_argmax(model):
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 20, do_sample=False)
    uncached = model.generate(prompt, 20, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 7:].flatten().tolist())) > 3  # a real sequence, not one token repeated
    full = model(cached[:, :-1])[0]  # one forward pass over the whole result
    assert torch.equal(full[:, 6:].argmax(-1), cached[:, 7:])


def test_batched_prompts_of_different_lengths_decode_as_alone(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 3, 5)]
    batch = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding
        batch[row, 7 - len(p) :], mask[row, 7 - len(p) :] = p, 1
    together = model.generate(batch, 15, do_sample=False, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], 15, do_sample=False)
        assert torch.equal(together[row, 7:], alone[0, len(p) :])


def test_sampling_with_a_seed_is_reproducible(model):
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    options = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, num_return_sequences=3)
    first = model.generate(prompt, 12, seed=7, **options)
    assert first.shape == (3, 17) and torch.equal(first[:, :5], prompt.expand(3, 5))
    assert torch.equal(first, model.generate(prompt, 12, seed=7, **options))
    assert not torch.equal(first, model.generate(prompt, 12, seed=8, **options))
    assert len({tuple(r) for r in first[:, 5:].tolist()}) > 1  # the return sequences differ


def test_neutral_settings_leave_the_distribution_unchanged():
    logits = torch.randn(4, VOCAB)
    for neutral in ({}, {"temperature": 1.0, "top_k": None, "top_p": 1.0}, {"top_k": VOCAB}):
        assert torch.equal(filter_logits(logits, **neutral), logits)
    assert torch.equal(
        penalize_repetition(logits, torch.tensor([[1, 2]] * 4), torch.ones(4, 2, dtype=bool), 1.0), logits
    )


def test_top_k_top_p_and_repetition_penalty():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    nucleus = filter_logits(logits, top_p=0.7)  # 0.5, then 0.3 (cumulative 0.5 before it <= 0.7), not 0.15
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0, 0])  # the most likely token always stays
    scores = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    seen, seen_mask = torch.tensor([[0, 1, 3]]), torch.tensor([[True, True, False]])  # token 3: padding
    assert penalize_repetition(scores, seen, seen_mask, 2.0).tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_end_of_text_ends_each_row(model):
    prompt = torch.randint(0, VOCAB, (4,), generator=torch.Generator().manual_seed(4))
    alone = model.generate(prompt[None], 12, do_sample=False)[0, 4:].tolist()
    # The end token: the first greedy token, from the third on, not produced before it.
    end = next(i for i in range(2, 12) if alone[i] not in alone[:i])
    assert end < 8  # every row ends before the first check of finished rows (every 8 tokens)
    # Row 1 is row 0 two tokens on (its prompt ends with row 0's first two new tokens; row 0 is left-padded to
    # its length and decodes as alone): row 1 ends two steps before row 0, then pads while row 0 goes on.
    batch = torch.tensor([[0, 0, *prompt.tolist()], [*prompt.tolist(), *alone[:2]]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    out = model.generate(batch, 30, do_sample=False, attention_mask=mask, eos_token_id=alone[end])
    assert out.shape == (2, 6 + 8)  # stopped at the first check after every row ended, not at 30 new tokens
    assert out[0, 6:].tolist() == alone[: end + 1] + [alone[end]] * (7 - end)
    assert out[1, 6:].tolist() == alone[2 : end + 1] + [alone[end]] * (9 - end)


def test_long_prompts_keep_their_end_and_generation_slides_past_the_context(model, caplog):
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with caplog.at_level("WARNING"):
        out = model.generate(prompt, 50, do_sample=False)
    assert "more than the model's context of 32: keeping its last 32" in caplog.text
    assert out.shape == (1, 90)
    # The first new token is the argmax after the prompt's last 32 tokens.
    assert out[0, 40] == model(prompt[:, -32:])[0][0, -1].argmax()


@pytest.mark.parametrize("mode", ["static cache", "static cache, reused"])
def test_the_fixed_shape_step_decodes_exactly_as_the_dynamic_cache(model, mode):
    """The decoder GPUs use (whole-capacity attention with a mask, the position written given as a tensor,
    then replayed as a CUDA graph) runs eagerly on CPUs too: same tokens, padding and sliding included."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 4, 6)]
    batch, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, 9 - len(p) :], mask[row, 9 - len(p) :] = p, 1
    runs = 2 if mode.endswith("reused") else 1  # a second generation replays the kept step on a fresh prompt
    for _ in range(runs):  # 9 + 40 tokens pass the context of 32: the window slides once
        static = model.generate(batch, 40, do_sample=False, attention_mask=mask, static_cache=True)
    dynamic = model.generate(batch, 40, do_sample=False, attention_mask=mask, static_cache=False)
    assert torch.equal(static, dynamic)
    sampled = [model.generate(batch, 12, seed=3, attention_mask=mask, static_cache=s) for s in (True, False)]
    assert torch.equal(*sampled)


def test_the_static_cache_holds_what_a_generation_needs_rounded_up():
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB, context_length=300, d_model=16, num_heads=2, num_layers=1, d_ff=32, dropout=0.0,
        attention_dropout=0.0, residual_dropout=0.0, initializer_range=0.5,
    )  # fmt: skip
    wide = GPT2Model(config).eval()
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    for new, capacity in ((20, 256), (280, 300)):  # 30 positions -> 256; 290 -> the whole context
        static = wide.generate(prompt, new, do_sample=False, static_cache=True)
        assert torch.equal(static, wide.generate(prompt, new, do_sample=False, static_cache=False))
        assert any(key[:2] == (1, capacity) for key in wide._decode_steps)


def test_the_kept_decode_step_is_reused_and_never_copied_with_the_model(model):
    import copy

    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    model.generate(prompt, 3, do_sample=False, static_cache=True)
    steps = dict(model._decode_steps)
    model.generate(prompt, 3, do_sample=False, static_cache=True)
    assert dict(model._decode_steps) == steps  # the same step, not a second one
    assert [key[0] for key in steps].count(2) == 1  # one per batch size
    assert len(copy.deepcopy(model)._decode_steps) == 0


def test_the_earlier_call_still_works_and_the_stream_yields_what_generate_returns(model):
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(10))
    # generate(input_ids, max_new_tokens, temperature, top_k, generator): the call from before the KV cache
    first = model.generate(prompt, 6, 0.8, 20, torch.Generator().manual_seed(1))
    assert torch.equal(first, model.generate(prompt, 6, 0.8, 20, torch.Generator().manual_seed(1)))
    stream = model.generate_stream(prompt, 6, 0.8, 20, top_p=0.9, seed=4)
    steps = [next(stream)]  # one step at a time, each (B,) as it is produced
    steps += list(stream)
    assert [tuple(s.shape) for s in steps] == [(2,)] * 6
    assert torch.equal(torch.stack(steps, 1), model.generate(prompt, 6, 0.8, 20, top_p=0.9, seed=4)[:, 5:])
