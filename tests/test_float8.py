"""``model.float8``: torchao's float8 training as a model-level switch. On CPU: the checks at the start of a run (one
``Error:`` line each, before any data is read), the config keys, and the conversion itself (torchao converts CPU
modules, and its ``emulate`` option runs them): the state_dict keys stay the plain model's, so checkpoints do not
change, and only a fit converts. The speed and the loss against bf16 are measured on a GPU (docs/performance.md)."""

import types

import pytest
import torch
from conftest import TINY
from pytorch_lightning.trainer.states import TrainerFn

from gpt2lab.checkpoint import model_diff
from gpt2lab.errors import ConfigError
from gpt2lab.lit import float8
from gpt2lab.model import GPT2Config, GPT2Model

NO_DATA = "data.path=/nonexistent/corpus.txt"  # a check that ran after reading data would fail on the file instead


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer=cpu", "model.float8=true"],
            "model.float8=true runs the matmuls on a GPU's float8 tensor cores, and this run has "
            "trainer.accelerator=cpu: use trainer=gpu, or model.float8=false",
        ),
        (["model.float8_recipe=blockwise"], "model.float8_recipe=blockwise: expected one of tensorwise, rowwise"),
    ],
)
def test_bad_float8_settings_are_one_error_line_before_any_data_is_read(
    train_cli, tmp_path, cache_dir, overrides, message
):
    result = train_cli(*TINY, NO_DATA, f"paths.cache_dir={cache_dir}", *overrides, cwd=tmp_path)
    assert message in one_error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_float8_without_a_cuda_gpu_is_one_error_line(train_cli, tmp_path, cache_dir):
    result = train_cli(*TINY, NO_DATA, f"paths.cache_dir={cache_dir}", "trainer.accelerator=auto", "model.float8=true",
                       cwd=tmp_path)  # fmt: skip
    assert (
        "model.float8=true needs a CUDA GPU of compute capability 8.9 or more (H100, H200, L4, RTX 40xx), and this "
        "machine has no CUDA GPU: set model.float8=false"
    ) in one_error_line(result)


def test_float8_names_a_gpu_without_float8_tensor_cores_and_asks_for_torchao(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    model, trainer = {"float8": True}, {"accelerator": "gpu"}
    with pytest.raises(ConfigError, match=r"this one, NVIDIA A100-SXM4-80GB, has 8\.0 and no float8 tensor cores"):
        float8.check_float8(model, trainer)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(float8.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"which is not installed: pip install torchao \(or pip install -e '\.\[gpu\]'\)"
    ):
        float8.check_float8(model, trainer)
    float8.check_float8({"float8": False}, {"accelerator": "cpu"})  # off: nothing to check


def test_float8_keys_are_the_gpt2_models_only(compose_cfg):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    cfg = compose_cfg()
    assert cfg.model.float8 is False and cfg.model.float8_recipe == "tensorwise"
    assert compose_cfg("model=gpt2-medium", "model.float8=true").model.float8 is True
    for overrides, message in [
        (
            ["model.float8_recpie=rowwise"],
            "Key 'float8_recpie' not in 'ModelSchema'. Did you mean one of: 'float8_recipe', 'float8'?",
        ),
        (["model=hf", "model.float8=true"], "Key 'float8' not in 'HFModelSchema'"),
    ]:
        with pytest.raises((ConfigCompositionException, ValidationError)) as info:
            compose_cfg(*overrides, tiny=False)
        assert message in str(info.value) + str(info.value.__cause__)


def test_a_run_may_resume_with_float8_toggled():
    plain = GPT2Config(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=64).__dict__
    assert model_diff(plain, plain | {"float8": True, "float8_recipe": "rowwise"}) == ""


def _model(d_ff: int = 128) -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=200, context_length=16, d_model=48, num_heads=2, num_layers=2, d_ff=d_ff,
                        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0, float8=True)  # fmt: skip
    return GPT2Model(config)


def test_conversion_keeps_the_state_dict_and_the_tied_output_layer():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    model = _model(d_ff=200)  # the MLP's 48 x 200 layers are not multiples of 16: left as they are
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    assert float8.convert_to_float8(model, "tensorwise") == 4  # qkv and the attention's projection, 2 layers
    assert float8.convert_to_float8(model, "tensorwise") == 0  # a second call converts nothing
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj")}
    state = model.state_dict()
    assert list(state) == list(plain) and all(torch.equal(state[k], v) for k, v in plain.items())
    assert all(type(v) is torch.Tensor for v in state.values())  # plain tensors: loadable without torchao
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("recipe", float8.RECIPES)
def test_a_converted_model_trains_as_the_plain_one_within_float8_rounding(recipe):
    pytest.importorskip("torchao")
    plain, converted = _model(), _model()
    assert float8.convert_to_float8(converted, recipe, emulate=True) == 8
    x = torch.randint(0, 200, (2, 17))
    losses = []
    for model in (plain, converted):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    grad, plain_grad = converted.blocks[0].mlp.fc.weight.grad, plain.blocks[0].mlp.fc.weight.grad
    assert torch.allclose(grad, plain_grad, atol=0.1 * plain_grad.abs().max().item())


def test_only_a_fit_converts_the_model():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from gpt2lab.lit.module import GPT2LitModule

    for fn, converts in [(TrainerFn.TESTING, False), (TrainerFn.VALIDATING, False), (TrainerFn.FITTING, True)]:
        module = GPT2LitModule(_model().config, optimizer={"lr": 1e-3})
        module._trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn=fn))
        keys = list(module.state_dict())
        module.configure_model()
        assert any(isinstance(m, Float8Linear) for m in module.modules()) is converts
        assert list(module.state_dict()) == keys
        assert module.hparams.model["float8"] is True
