import math

import pytest
import torch

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Config, GPT2Model


def tiny(**overrides) -> GPT2Model:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=101, context_length=16, d_model=32, num_heads=4, num_layers=2, d_ff=64)
    return GPT2Model(GPT2Config(**(kwargs | overrides)))


def test_shapes_and_initial_loss_near_uniform():
    model = tiny().eval()
    x, y = torch.randint(0, 101, (2, 3, 16))
    logits, loss = model(x, y, return_logits=True)
    assert logits.shape == (3, 16, 101)  # padded vocabulary rows are sliced off
    assert model.wte.weight.shape[0] == 128
    assert abs(loss.item() - math.log(101)) < 0.1
    assert model(x)[1] is None
    assert model(x, y)[0] is None  # training asks for the loss alone


def test_loss_over_padded_vocabulary_equals_loss_over_the_real_one():
    model = tiny().eval()
    x, y = torch.randint(0, 101, (2, 3, 16))
    y[0, :4] = -100  # ignored positions stay ignored
    loss = model(x, y)[1]
    loss.backward()
    logits = model(x)[0]
    assert logits.shape[-1] == 101
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert model.wte.weight.grad[101:].abs().max().item() == 0  # padding rows get no gradient from the loss
    assert "logit_bias" not in model.state_dict()  # the -inf mask is rebuilt, never saved


def test_padding_mask_survives_bf16_autocast():
    model = tiny().eval()
    x, y = torch.randint(0, 101, (2, 3, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)[1]
    assert loss.item() == pytest.approx(model(x, y)[1].item(), abs=0.02)


def test_gpt2_small_has_gpt2s_parameter_count():
    # 124,439,808 is the count of the released GPT-2 small (tied embeddings counted once).
    model = GPT2Model(GPT2Config(pad_vocab_size_multiple=1))
    assert model.num_parameters() == 124_439_808
    assert model.lm_head.weight is model.wte.weight


def test_residual_projections_get_scaled_init():
    model = GPT2Model(GPT2Config(vocab_size=64, context_length=8, d_model=256, num_heads=4, num_layers=8, d_ff=1024))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_causality_later_tokens_never_change_earlier_logits():
    model = tiny().eval()
    x = torch.randint(0, 101, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_overfits_one_batch():
    model = tiny(dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    x = torch.randint(0, 101, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 101, (2, 17))
    grads = []
    for flag in (False, True):
        model = tiny(gradient_checkpointing=flag, dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
        model(x[:, :-1], x[:, 1:])[1].backward()
        grads.append(model.wte.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_no_bias_option_removes_biases():
    model = tiny(use_bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"model.num_heads=5 does not divide model.d_model=32"):
        GPT2Config(d_model=32, num_heads=5)


def test_generate_extends_the_prompt():
    model = tiny().eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, top_k=5)
    assert out.shape == (1, 23)
    assert out[0, :3].tolist() == [1, 2, 3]


def test_builds_on_the_meta_device_and_materialises_with_init_weights():
    # Deferred initialisation, as under FSDP: no memory is allocated until the parameters are materialised.
    config = GPT2Config(vocab_size=101, context_length=16, d_model=32, num_heads=4, num_layers=2, d_ff=64)
    with torch.device("meta"):
        model = GPT2Model(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    built = tiny()
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in built.named_parameters()}
    assert model.num_parameters() == built.num_parameters()

    model.to_empty(device="cpu")  # uninitialised memory, and the output layer no longer shares the embedding
    for m in (model, built):
        torch.manual_seed(0)
        m.init_weights()
    assert model.lm_head.weight is model.wte.weight
    # Every tensor is set by init_weights, none left as to_empty's memory: the same as a CPU-built model's.
    for (name, a), b in zip(model.state_dict().items(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(model.logit_bias, built.logit_bias)
    x, y = torch.randint(0, 101, (2, 3, 16))
    loss = model.eval()(x, y)[1]
    assert abs(loss.item() - math.log(101)) < 0.1  # GPT-2's init: near-uniform predictions over the real vocabulary
    assert model(x)[0].shape == (3, 16, 101)
