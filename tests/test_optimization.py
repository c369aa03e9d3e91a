"""optimizer=muon and scheduler=wsd: which parameters each optimizer trains, exact state through checkpoints, the
schedule's shape and its end moving with trainer.max_steps, the Error lines, and Muon runs that resume, refuse another
optimizer's checkpoint, and load in evaluate, generate, export and model.init_from."""

import json

import pytest
import torch
from conftest import REPO, TINY, export_all
from omegaconf import OmegaConf
from test_train import cli_args, final_val_loss

from gpt2lab.errors import ConfigError
from gpt2lab.lit.optimization import (
    MuonWithAdamW,
    _float32_orthogonalisation,
    _newton_schulz_float32,
    adamw_groups,
    hidden_matrices,
    muon_groups,
    warmup_cosine,
    warmup_stable_decay,
)
from gpt2lab.model import GPT2Config, GPT2Model

MUON = ["optimizer=muon", "optimizer.muon_lr=0.02"]


def _model() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=64, context_length=16, d_model=32, num_heads=2, num_layers=2, d_ff=64))


def _grads(model: GPT2Model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def test_muon_trains_the_attention_and_mlp_matrices_and_adamw_the_rest():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = sorted(names[id(p)] for p in hidden_matrices(model))
    assert hidden == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    )
    groups = muon_groups(model, weight_decay=0.1)
    assert [g.get("muon", False) for g in groups] == [False, False, True]
    assert [names[id(p)] for p in groups[0]["params"]] == ["wte.weight", "wpe.weight"]  # the tied output layer too
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0  # biases and gains: no decay
    assert all(p.dim() == 1 for p in groups[1]["params"])
    covered = [id(p) for g in groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # each parameter once


def test_a_transformers_model_gives_muon_its_blocks_matrices_and_keeps_its_output_layer_for_adamw():
    import transformers

    from gpt2lab.model.adapter import CausalLM

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = CausalLM(transformers.GPT2LMHeadModel(config), context_length=16, vocab_size=64)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = sorted(names[id(p)].split("transformer.")[-1] for p in hidden_matrices(model))
    assert hidden == sorted(
        f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert not any(p is untied.lm_head.weight for p in hidden_matrices(CausalLM(untied, 16, 64)))


def test_a_step_is_torch_muon_on_the_matrices_and_adamw_on_the_rest():
    model, reference = _model(), _model()
    optimizer = MuonWithAdamW(muon_groups(model, 0.1), lr=3e-3, muon_lr=0.05, weight_decay=0.1)
    groups = muon_groups(reference, 0.1)
    adamw = torch.optim.AdamW(groups[:2], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    muon = torch.optim.Muon([{"params": groups[2]["params"]}], lr=0.05, weight_decay=0.0)
    for seed in range(3):
        _grads(model, seed)
        _grads(reference, seed)
        optimizer.step()
        adamw.step()
        with _float32_orthogonalisation(on_cpu=True):  # as MuonWithAdamW steps on a CPU (the next test)
            muon.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-3, 3e-3, 0.05]


def test_on_a_cpu_the_orthogonalisation_is_torch_s_iteration_in_float32():
    import torch.optim._muon as torch_muon

    original = torch_muon._zeropower_via_newtonschulz
    grad = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    theirs = original(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    ours = _newton_schulz_float32(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert theirs.dtype == torch.bfloat16 and ours.dtype == torch.float32 and ours.shape == grad.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=0.05, atol=0.01)  # bfloat16's precision
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5  # orthogonalised, as Muon's iteration leaves it
    model = _model()
    optimizer = MuonWithAdamW(muon_groups(model, 0.0))
    _grads(model, 0)
    optimizer.step()
    assert torch_muon._zeropower_via_newtonschulz is original  # torch's own again after the step


def test_the_state_goes_through_a_checkpoint_and_steps_on_exactly(tmp_path):
    model = _model()
    optimizer = MuonWithAdamW(muon_groups(model, 0.0), muon_lr=0.05)
    for seed in range(2):
        _grads(model, seed)
        optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    state = optimizer.state_dict()  # one standard optimizer state: a number per parameter, AdamW's first
    assert sorted(state["state"]) == list(range(sum(1 for _ in model.parameters())))
    assert "momentum_buffer" in state["state"][len(state["state"]) - 1]  # the last parameters are Muon's
    assert "exp_avg" in state["state"][0]

    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    again = _model()
    again.load_state_dict(saved["model"])
    resumed = MuonWithAdamW(muon_groups(again, 0.0), muon_lr=0.05)
    resumed.load_state_dict(saved["optimizer"])
    for m, o in ((model, optimizer), (again, resumed)):
        _grads(m, 7)
        o.step()
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # A schedule sets the learning rates on the loaded optimizer's groups: both optimizers still follow them
    for group in resumed.param_groups:
        group["lr"] = 0.0
    before = [p.clone() for p in again.parameters()]
    _grads(again, 8)
    resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), before, strict=True))


def test_an_adamw_state_does_not_load_into_muon():
    model = _model()
    adamw = torch.optim.AdamW(adamw_groups(model.parameters(), 0.1))
    _grads(model, 0)
    adamw.step()
    with pytest.raises(ConfigError, match="does not fit optimizer=muon's groups"):
        MuonWithAdamW(muon_groups(model, 0.0)).load_state_dict(adamw.state_dict())


def _factors(schedule, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = schedule(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_wsd_warms_up_holds_and_decays_over_the_last_fraction():
    lr = _factors(lambda o: warmup_stable_decay(o, warmup_steps=10, max_steps=100, decay_fraction=0.2), 100)
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert all(f == 1.0 for f in lr[10:80])  # the stable stretch: warmup to the start of the last fifth
    assert lr[80:] == sorted(lr[80:], reverse=True) and lr[80] == 1.0 and lr[99] == pytest.approx(1 / 20)
    floor = _factors(lambda o: warmup_stable_decay(o, 0, 100, decay_fraction=0.5, min_lr_ratio=0.1), 101)
    assert floor[100] == pytest.approx(0.1) and floor[75] == pytest.approx(0.55)
    assert set(_factors(lambda o: warmup_stable_decay(o, 0, 50, decay_fraction=0.0), 50)) == {1.0}


def test_raising_max_steps_on_resume_moves_the_decay_to_the_new_end():
    """The scheduler's state is its step; the schedule is rebuilt from the run's config, so a run resumed from
    step 70 of 100 with max_steps 200 goes on at the peak and decays over steps 160-200."""
    param = torch.zeros(1, requires_grad=True)
    first = torch.optim.SGD([param], lr=1.0)
    scheduler = warmup_stable_decay(first, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    for _ in range(70):
        first.step()
        scheduler.step()
    state = {"optimizer": first.state_dict(), "scheduler": scheduler.state_dict()}
    # As Lightning resumes: configure_optimizers with the new trainer.max_steps, then both states loaded
    again = torch.optim.SGD([param], lr=1.0)
    longer = warmup_stable_decay(again, warmup_steps=10, max_steps=200, decay_fraction=0.2)
    again.load_state_dict(state["optimizer"])
    longer.load_state_dict(state["scheduler"])
    lrs = []
    for _ in range(130):
        lrs.append(again.param_groups[0]["lr"])
        again.step()
        longer.step()
    assert lrs[:90] == [1.0] * 90  # steps 70-159: the stable stretch, where the old run would have decayed
    assert lrs[90] == 1.0 and lrs[129] == pytest.approx(1 / 40)  # the decay over the last 40 of 200
    cosine = _factors(lambda o: warmup_cosine(o, 0, 100, 0.1), 100)  # the other schedule is untouched
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.muon_lr=-0.02"], "optimizer.muon_lr=-0.02: expected a positive learning rate for Muon's"),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0: expected a positive learning rate"),
        (["optimizer.momentum=1.5"], "optimizer.momentum=1.5: expected Muon's momentum in [0, 1)"),
        (["optimizer.adjust_lr_fn=fast"], "optimizer.adjust_lr_fn=fast: expected null, original or match_rms_adamw"),
        (["scheduler=wsd", "scheduler.decay_fraction=1.5"], "scheduler.decay_fraction=1.5: expected the fraction"),
        (["scheduler=wsd", "scheduler.decay_fraction=-0.1"], "scheduler.decay_fraction=-0.1: expected the fraction"),
        (["trainer=fsdp"], "optimizer=muon with trainer=fsdp: Muon orthogonalises each weight matrix whole"),
        (
            [
                "model=module",
                "model.module._target_=helpers.Bigram",
                "+model.module.vocab_size=320",
                "model.context_length=32",
            ],  # fmt: skip
            "optimizer=muon: this model (CausalLM) has no 2-D hidden weights for Muon to train",
        ),
    ],
)
def test_bad_values_are_one_error_line_before_any_data_is_read(train_cli, tmp_path, cache_dir, overrides, message):
    # data.path does not exist: a check that ran after reading data would fail on the file instead
    tiny = [o for o in TINY if not o.startswith("model.")] if "model=module" in overrides else TINY
    args = [*tiny, "data.path=/nonexistent/corpus.txt", f"paths.cache_dir={cache_dir}", *MUON, *overrides]
    result = train_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_an_older_torch_gets_the_version_muon_needs(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"needs torch.optim.Muon, which torch 2.9 brought; .*optimizer=adamw"):
        MuonWithAdamW(muon_groups(_model(), 0.0))


def test_muon_and_wsd_show_in_help_the_presets_table_and_a_study(train_cli, tmp_path):
    from gpt2lab.presets.catalog import compose_preset, optimization

    result = train_cli("--help", cwd=tmp_path)
    assert "optimizer: adamw, muon" in result.stdout and "scheduler: warmup_cosine, wsd" in result.stdout
    assert optimization(compose_preset("tiny", ["optimizer=adamw", "scheduler=wsd"])) == "adamw (lr 0.005), wsd"
    assert optimization(compose_preset("small", ["optimizer=muon"])) == "muon (lr 0.002, muon_lr 0.02), warmup_cosine"
    study = train_cli("hparams_search=optuna_muon", "--cfg", "hydra", cwd=tmp_path)  # optuna's study, Muon's lr too
    assert "optimizer.muon_lr: tag(log, interval(5e-3, 1e-1))" in study.stdout
    assert "optimizer.lr: tag(log, interval(3e-4, 1e-2))" in study.stdout


def test_a_muon_run_with_accumulation_stopped_and_resumed_ends_at_the_same_loss(
    train_cli, tmp_path, corpus_file, cache_dir
):
    """Both optimizers' state and the schedule's step come back: the resumed run ends where the whole run does."""
    common = [*MUON, "scheduler=wsd", "scheduler.warmup_steps=2", "scheduler.max_steps=8",
              "trainer.accumulate_grad_batches=2", "sample=null", "test=false"]  # fmt: skip
    whole, stopped, resumed = tmp_path / "whole", tmp_path / "stopped", tmp_path / "resumed"
    for run, extra in ((whole, []), (stopped, ["trainer.max_steps=4"])):
        result = train_cli(*cli_args(corpus_file, cache_dir, run, *common, *extra), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    last = stopped / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 4 and len(state["optimizer_states"][0]["param_groups"]) == 3
    result = train_cli(*cli_args(corpus_file, cache_dir, resumed, *common, f"ckpt_path={last}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((resumed / "results.json").read_text())["global_step"] == 8
    assert final_val_loss(resumed) == pytest.approx(final_val_loss(whole), abs=1e-5)
    assert final_val_loss(whole) < json.loads((whole / "results.json").read_text())["initial_val_loss"]


def test_an_adamw_run_is_not_continued_with_muon_and_another_schedule_is_said(
    train_cli, tmp_path, corpus_file, cache_dir
):
    adamw = tmp_path / "adamw"
    old_default = ["optimizer=adamw", "scheduler=warmup_cosine"]
    result = train_cli(
        *cli_args(corpus_file, cache_dir, adamw, *old_default, "sample=null", "test=false"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = adamw / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    refused = train_cli(
        *cli_args(corpus_file, cache_dir, tmp_path / "muon", *MUON, "trainer.max_steps=12", f"ckpt_path={last}"),
        cwd=tmp_path,
    )
    assert refused.returncode == 1
    assert (
        f"Error: ckpt_path='{last}' was trained with optimizer=adamw, and this run's config has optimizer=muon: one's "
        "state cannot go on in the other" in refused.stderr
    )
    assert "python train.py model.init_from=<dir> optimizer=muon" in refused.stderr
    assert last.read_bytes() == before  # the checkpoint stays as it was
    # Another schedule is allowed, and said
    args = cli_args(
        corpus_file,
        cache_dir,
        tmp_path / "wsd",
        "optimizer=adamw",
        "scheduler=wsd",
        "trainer.max_steps=12",
        f"ckpt_path={last}",
    )
    extended = train_cli(*args, "sample=null", "test=false", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert (
        "was trained with scheduler=warmup_cosine, and this run's config has scheduler=wsd: from its step on, the "
        "learning rate follows the new schedule (add scheduler=warmup_cosine to the command"
    ) in extended.stdout + extended.stderr


def test_a_muon_checkpoint_evaluates_generates_exports_and_starts_another_run(
    train_cli, run_main, tmp_path, corpus_file, cache_dir
):
    run = tmp_path / "muon"
    result = train_cli(*cli_args(corpus_file, cache_dir, run, *MUON, "test=false"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    evaluated = run_main("gpt2lab.evaluate", f"ckpt={ckpt}", "split=validation", "eval.compressors=false", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "bits per byte" in evaluated.stdout
    generated = run_main("gpt2lab.generate", f"ckpt={ckpt}", "prompt=def", "inference.max_new_tokens=8", cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-3000:]
    exported = export_all(run / "checkpoints" / "last.ckpt", tmp_path / "exported", "format=hf")
    (hf,) = {p.parent for p in exported.rglob("config.json")}
    # Its weights start a new run, with either optimizer (the optimizer starts fresh)
    again = tmp_path / "again"
    tiny = [o for o in TINY if not o.startswith("tokenizer")]  # the weights' own tokenizer comes with them
    args = [*tiny, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={again}",
            "optimizer=adamw", f"model.init_from={hf}", "trainer.max_steps=4", "test=false", "sample=null"]  # fmt: skip
    result = train_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    initial = json.loads((again / "results.json").read_text())["initial_val_loss"]
    assert initial == pytest.approx(final_val_loss(run), rel=0.02)  # it starts where the Muon run ended
    assert OmegaConf.load(again / "config.yaml").optimizer._target_ == "torch.optim.AdamW"


@pytest.mark.slow
def test_a_sweep_searches_muon_s_learning_rates(train_cli, tmp_path, corpus_file, cache_dir):
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    (conf / "muon_lrs.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: gpt2lab_optuna\n"
        "hydra:\n  sweep:\n    subdir: trial_${optuna_trial}\n  sweeper:\n    n_trials: 3\n    sampler:\n      seed: 1\n    params:\n"
        "      optimizer.muon_lr: tag(log, interval(0.005, 0.1))\n      optimizer.lr: tag(log, interval(1e-3, 1e-2))\n"
    )
    sweep = tmp_path / "study"
    # optimizer.muon_lr is not given: a value on the command line would take it out of the space
    args = ["-m", "--config-dir", str(tmp_path / "conf"), "hparams_search=muon_lrs", *TINY, "optimizer=muon",
            f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.study_name=m", "test=false", "sample=null"]  # fmt: skip
    result = train_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="m", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for trial in study.trials:
        written = OmegaConf.load(sweep / f"trial_{trial.number}" / "config.yaml").optimizer
        assert written._target_ == "gpt2lab.lit.optimization.MuonWithAdamW"
        assert written.muon_lr == pytest.approx(trial.params["optimizer.muon_lr"])
        assert written.lr == pytest.approx(trial.params["optimizer.lr"])
    assert len({t.params["optimizer.muon_lr"] for t in study.trials}) == 3


def test_the_muon_config_names_its_keys_as_the_optimizer_takes_them():
    """conf/optimizer/muon.yaml and MuonWithAdamW agree: every key is an argument, every argument a key."""
    import inspect

    keys = set(OmegaConf.load(REPO / "conf" / "optimizer" / "muon.yaml")) - {"defaults", "_target_"}
    arguments = set(inspect.signature(MuonWithAdamW).parameters) - {"params"}
    assert keys == arguments
