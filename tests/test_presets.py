"""Presets (conf/preset/): each composes and trains, its header's numbers are the composed config's, and
``gpt2lab presets`` lists them with measured (and cached) time estimates, copies one into conf/experiment/,
recommends one for a goal and a budget; ``trainer.time_budget`` fits a run's steps to a wall-clock budget."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import CONF, TINY
from huggingface_hub import constants
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import execution_whitelist
from omegaconf import OmegaConf
from test_hub import hub_online, unreachable_hub  # noqa: F401 (fixtures: the Hub a closed local port, its cache empty)

from gpt2lab.config import TRUSTED_TARGETS, register_schemas
from gpt2lab.console import format_duration, parse_duration
from gpt2lab.errors import ConfigError
from gpt2lab.presets import probe as throughput
from gpt2lab.presets.catalog import GOALS, compose_preset, preset_names, read_header, recipe
from gpt2lab.presets.probe import model_config, probe_key, run_seconds, steps_for_budget

PRESETS = ["tiny", "small", "medium", "large", "code_generation", "chat", "summarization"]
TASK_DATA = {"chat", "summarization"}  # presets whose data is records (data.format), not running text
# The model and run shrunk to seconds on a CPU; everything else is the preset's own.
SHRINK = [
    *[o for o in TINY if not o.startswith(("data=", "data.batch_size", "trainer.max_steps"))],
    "trainer=cpu",
    "compile=false",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.accumulate_grad_batches=2",
    "data.num_workers=0",
    "data.pin_memory=false",
    "sample=null",
    "test=false",
]
WORDS = [
    "the",
    "a",
    "model",
    "trains",
    "on",
    "text",
    "and",
    "code",
    "while",
    "each",
    "step",
    "reads",
    "windows",
    "of",
    "tokens",
    "from",
    "files",
]


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Chat and summarization records, as a user writes them (one JSON object per line)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("presets-records")
    chats = [
        {
            "messages": [
                {"role": "user", "content": _words(rng, 3, 9) + "?"},
                {"role": "assistant", "content": _words(rng, 2, 8)},
            ]
        }
        for _ in range(120)
    ]
    pairs = [{"document": _words(rng, 10, 40) + ".", "summary": _words(rng, 2, 6)} for _ in range(120)]
    files = {"chat": root / "chat.jsonl", "summarization": root / "summarization.jsonl"}
    for name, records in (("chat", chats), ("summarization", pairs)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def data_overrides(name: str, corpus_file: Path, task_files: dict[str, Path]) -> list[str]:
    """Local data for the preset: its own format read from files, or running text for the others (the Hub and the
    offline corpus are not what these tests are about)."""
    if name == "chat":  # fine-tuning from the Hub's GPT-2; from pretrained weights: tests/test_hf.py
        return ["data.source=files", f"data.path={task_files[name]}", "model.init_from=null"]
    if name in TASK_DATA:
        return ["data.source=files", f"data.path={task_files[name]}"]
    return ["data=files", f"data.path={corpus_file}"]


def test_the_presets_are_the_documented_ones():
    assert preset_names() == PRESETS


# -- every preset composes and trains ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_trains_a_few_steps(name, compose_cfg, corpus_file, task_files):
    from gpt2lab.train.run import train

    full = compose_cfg(f"preset={name}", tiny=False)
    cfg = compose_cfg(f"preset={name}", *SHRINK, *data_overrides(name, corpus_file, task_files), tiny=False)
    # shrunk, but the preset's own recipe otherwise: its learning rate, schedule and data format
    assert cfg.optimizer.lr == full.optimizer.lr and cfg.scheduler.warmup_steps == full.scheduler.warmup_steps
    assert cfg.data.get("format") == full.data.get("format")
    train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["global_step"] == 2 and math.isfinite(results["metrics"]["train/loss"])
    if name not in TASK_DATA:  # (chat adds its role tokens to the vocabulary the recipe counts)
        with open(Path(cfg.paths.output_dir) / "config.yaml") as f:
            trained = OmegaConf.load(f)
        # the headers count parameters the way training builds the model
        assert recipe(name, trained).parameters == results["parameters"]


# -- the headers' numbers are the composed config's -------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_the_header_numbers_match_the_composed_config(name):
    header, cfg = read_header(name), compose_preset(name)
    r = recipe(name, cfg)
    assert header.description and not header.description.startswith("@")
    assert header.parameters == r.parameters  # counted on the built model
    tokens_per_step = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.model.context_length
    assert header.tokens_per_step == tokens_per_step == r.tokens_per_step
    assert header.steps == cfg.trainer.max_steps
    assert header.total_tokens == cfg.trainer.max_steps * tokens_per_step


def test_preset_sizes_are_the_gpt2_family():
    sizes = {n: recipe(n, compose_preset(n)).parameters / 1e6 for n in ("small", "medium", "large")}
    assert 120 < sizes["small"] < 130 and 340 < sizes["medium"] < 360 and 760 < sizes["large"] < 780
    for name in ("small", "medium", "large", "code_generation"):  # the Hub's data, or offline the installed code
        assert compose_preset(name).data.offline_fallback == "pysource"


# -- gpt2lab presets ls: measured, cached estimates -------------------------------------------------------------
def test_presets_ls_measures_once_and_then_reads_the_cache(run_main, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = run_main(
        "gpt2lab.cli", "presets", "ls", "--only", "tiny", cwd=tmp_path, env={"GPT2LAB_CACHE_DIR": str(cache)}
    )
    assert first.returncode == 0, first.stderr
    assert "Measuring tiny" in first.stderr and "measured now" in first.stdout
    row = next(line for line in first.stdout.splitlines() if line.startswith("tiny "))
    assert "941K" in row and "2.79M (4.1K)" in row  # parameters, total tokens (per step)
    stored = json.loads((cache / "throughput" / "probes.json").read_text())
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(cache))
    cfg = compose_preset("tiny")
    probe = stored[probe_key(cfg)]  # keyed by this device and the probed config
    assert probe["preset"] == "tiny" and probe["step_s"] > 0 and probe["eval_batch_s"] > 0
    estimate = format_duration(run_seconds(cfg, throughput.Probe(**probe)))
    assert estimate in row  # the table shows the measured estimate, not a constant

    def no_measuring(cfg):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(throughput, "_measure", no_measuring)
    second_env = {"GPT2LAB_CACHE_DIR": str(cache)}
    second = run_main("gpt2lab.presets", "--only", "tiny", cwd=tmp_path, env=second_env)
    assert second.returncode == 0, second.stderr
    assert "Measuring" not in second.stderr and "cached" in second.stdout and estimate in second.stdout
    # overrides may follow the options, as on any command line: the same probe, 100 steps of 4.1K tokens
    third = run_main("gpt2lab.presets", "--only", "tiny", "trainer.max_steps=100", cwd=tmp_path, env=second_env)
    assert third.returncode == 0, third.stderr
    assert "410K (4.1K)" in third.stdout and "cached" in third.stdout
    # another micro-batch is another probe
    assert probe_key(compose_preset("tiny", ["data.batch_size=8"])) != probe_key(cfg)


def test_a_large_model_is_probed_in_parts_on_a_cpu_and_scaled(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(tmp_path))
    shrink = ["model.d_model=64", "model.num_heads=2", "model.d_ff=128", "model.context_length=64"]
    cfg = compose_preset("small", [*shrink, "tokenizer.vocab_size=512"])
    monkeypatch.setattr(throughput, "CPU_PROBE_FLOPS", 0)  # as if this small model were GPT-2 sized
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: False)  # the CPU's probe, on any machine
    timed = {}
    real = throughput._time_step

    def record(config, batch, *args, block=False, **kwargs):
        name = "_time_block" if block else "_time_model"
        timed[name] = (config.num_layers, batch)
        timed[name + "_s"] = real(config, batch, *args, block=block, **kwargs)
        return timed[name + "_s"]

    monkeypatch.setattr(throughput, "_time_step", record)
    probe = throughput.measure_throughput(cfg)
    # the model with 1 of its 12 blocks, and a block alone, on 16 of the 32 windows of 64 tokens (1024 tokens)
    assert timed["_time_model"] == (1, 16) and timed["_time_block"] == (12, 16)
    accumulate = cfg.trainer.accumulate_grad_batches
    assert "extrapolated to 12" in probe.method and f"scaled to 32 x {accumulate}" in probe.method
    (fb1, opt1, _), (fb, opt, _) = timed["_time_model_s"], timed["_time_block_s"]
    assert probe.step_s == pytest.approx(accumulate * (fb1 + 11 * fb) * 32 / 16 + opt1 + 11 * opt)


# -- gpt2lab presets cp ------------------------------------------------------------------------------------------
@pytest.fixture
def conf_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the config tree that ``presets cp`` writes into (the checkout's stays as it is)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setattr("gpt2lab.config.tree.config_path", lambda: str(conf))
    monkeypatch.setattr("gpt2lab.config.experiments.config_path", lambda: str(conf))
    return conf


def _compose(conf: Path, overrides: list[str]) -> dict:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("name", PRESETS)
def test_cp_writes_an_experiment_that_composes_like_the_preset(name, conf_copy, tmp_path, run_main):
    result = run_main("gpt2lab.cli", "presets", "cp", name, "my_recipe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "python train.py experiment=my_recipe" in result.stdout
    written = conf_copy / "experiment" / "my_recipe.yaml"
    assert written.read_text().startswith("# @package _global_\n")
    assert _compose(conf_copy, ["experiment=my_recipe"]) == _compose(conf_copy, [f"preset={name}"])


def test_cp_never_overwrites(conf_copy, tmp_path, run_main):
    target = conf_copy / "experiment" / "mine.yaml"
    target.write_text("# my edits\n")
    result = run_main("gpt2lab.presets", "cp", "small", "mine", cwd=tmp_path)
    assert result.returncode == 1 and "Error:" in result.stderr and "exists" in result.stderr
    assert target.read_text() == "# my edits\n"


# -- --recommend -------------------------------------------------------------------------------------------------
def _seed_cache(step_seconds: dict[str, float]) -> None:
    """Probes as a measurement would have stored them, with known step times (the choice is what is tested)."""
    for name, step_s in step_seconds.items():
        cfg = compose_preset(name)
        path = throughput.cache_file(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = throughput._read_cache(path)
        cache[probe_key(cfg)] = {"device": "test", "step_s": step_s, "eval_batch_s": step_s / 10, "method": "seeded"}
        path.write_text(json.dumps(cache))


def test_recommend_picks_the_preset_the_budget_trains(tmp_path, monkeypatch, run_main):
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(tmp_path))
    # small: 20,000 steps of 1 s (about 5.6 h with validation); tiny: 680 steps of 0.1 s
    _seed_cache({"small": 1.0, "tiny": 0.1, "medium": 3.0, "large": 8.0})
    five_hours = run_main("gpt2lab.cli", "presets", "--recommend", "goal=learning", "time_budget_hours=5", cwd=tmp_path)
    assert five_hours.returncode == 0, five_hours.stderr
    assert "Recommended for goal=learning in 5 h 00 min: small" in five_hours.stdout
    assert "trainer.time_budget=5h" in five_hours.stdout and "Why:" in five_hours.stdout
    ten_minutes = run_main("gpt2lab.presets", "--recommend", "goal=learning", "time_budget_hours=0.1", cwd=tmp_path)
    assert ": tiny (" in ten_minutes.stdout and "time_budget" not in ten_minutes.stdout.splitlines()[1]
    # quality: the largest model trained on at least half its recipe (medium's 13,500 x 3 s is 11 h)
    quality = run_main("gpt2lab.presets", "--recommend", "goal=quality", "time_budget_hours=8", cwd=tmp_path)
    assert ": medium (" in quality.stdout and "trainer.time_budget=8h" in quality.stdout
    assert set(GOALS) >= {"learning", "quality", "code", "chat", "summarization"}


@pytest.mark.usefixtures("unreachable_hub")
def test_recommend_says_what_a_run_needs_from_an_unreachable_hub(tmp_path, monkeypatch, run_main):
    """goal=chat fine-tunes model.init_from=gpt2 on HuggingFaceH4/no_robots: with the Hub unreachable and neither in
    the cache, the recommendation names both, the one command that fetches them where the run looks, and the
    offline alternative; with both cached, it is the plain command."""
    monkeypatch.setenv("GPT2LAB_CACHE_DIR", str(tmp_path))
    _seed_cache({"chat": 1.0})
    offline = run_main("gpt2lab.presets", "--recommend", "goal=chat", "time_budget_hours=5", cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    lines = offline.stdout.splitlines()
    assert lines[1].startswith("  python train.py preset=chat")
    assert lines[2] == (
        f"Needs first, from the Hugging Face Hub (not in the local cache, and the Hub at {constants.ENDPOINT} is "
        "unreachable from this machine, so only the local cache was searched):"
    )
    assert lines[3] == (
        "  - model.init_from=gpt2 (the pretrained weights); offline, give instead: "
        "model.init_from=<a local GPT-2 directory in Hugging Face format>"
    )
    assert lines[4] == (
        "  - data.name=HuggingFaceH4/no_robots (the training data); offline, give instead: "
        "data.source=files data.path=<your .jsonl>"
    )
    assert lines[6] == (
        '    python -c "from gpt2lab.hf import pretrained_dir; import datasets; '
        "pretrained_dir('gpt2', 'model.init_from'); "
        f"datasets.load_dataset('HuggingFaceH4/no_robots', cache_dir='{tmp_path / 'hf'}')\""
    )
    assert lines[7].startswith("Why: ")

    # The model as huggingface_hub caches it (tests/test_import.py), the dataset as datasets caches it
    snapshot = Path(constants.HF_HUB_CACHE) / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    ready = run_main("gpt2lab.presets", "--recommend", "goal=chat", "time_budget_hours=5", cwd=tmp_path)
    assert "data.name=HuggingFaceH4/no_robots" in ready.stdout and "model.init_from" not in ready.stdout
    built = tmp_path / "hf" / "HuggingFaceH4___no_robots" / "default" / "0.0.0" / "abc123"
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
    ready = run_main("gpt2lab.presets", "--recommend", "goal=chat", "time_budget_hours=5", cwd=tmp_path)
    assert ready.returncode == 0 and "Needs first" not in ready.stdout
    assert ready.stdout.splitlines()[1] == lines[1]
    assert ready.stdout.splitlines()[2].startswith("Why: ")


def test_a_recommendation_that_downloads_nothing_does_not_ask_the_hub(tmp_path, monkeypatch):
    """small falls back to pysource offline (data.offline_fallback), tiny reads the bundled corpus: no probe."""
    from gpt2lab.presets.needs import unmet_needs

    monkeypatch.setattr("gpt2lab.hub.reachable", lambda *a: pytest.fail("the Hub was probed"))
    for name in ("tiny", "small"):
        assert unmet_needs(compose_preset(name)) == ([], "")


# -- trainer.time_budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("10min", 600),
        ("2h", 7200),
        ("1h30m", 5400),
        ("01:30:00", 5400),
        ("00:01:30:00", 5400),
        ("45", 45),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["01:30:00", "1h30m"])
def test_time_budget_composes_from_the_command_line(text, compose_cfg):
    assert parse_duration(compose_cfg(f"trainer.time_budget={text}").trainer.time_budget) == 5400


@pytest.mark.parametrize("text", ["2 hours", "soon", "0s", "1:75:00", "", "-5m"])
def test_bad_durations_name_the_key_and_the_forms(text):
    with pytest.raises(ConfigError, match=r"trainer.time_budget=.*expected a positive duration such as 90s"):
        parse_duration(text, key="trainer.time_budget")


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "wsd"])
def test_time_budget_sets_max_steps_from_the_probe_and_max_time(compose_cfg, cache_dir, scheduler):
    from gpt2lab.train.run import train

    cfg = compose_cfg("trainer.time_budget=4s", "sample=null", "test=false", f"scheduler={scheduler}")
    path = throughput.cache_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = throughput._read_cache(path)  # a measured step of 0.5 s: the budget fits 7 steps and their validation
    cache[probe_key(cfg)] = {"device": "test", "step_s": 0.5, "eval_batch_s": 0.025, "method": "seeded"}
    path.write_text(json.dumps(cache))
    expected, _ = steps_for_budget(cfg, 4 * 0.95, throughput.Probe(**cache[probe_key(cfg)]))
    train(cfg)
    written = OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml")
    assert written.trainer.max_steps == expected == 7
    assert written.scheduler.max_steps == expected  # the decay (cosine, or wsd's last stretch) ends with the run
    assert written.trainer.max_time == "00:00:00:14"  # the budget and a margin: training stops there in any case
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["global_step"] == expected


def test_time_budget_fails_early_on_a_bad_value_and_a_typo_still_fails(train_cli, tmp_path, cache_dir, corpus_file):
    base = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    bad = train_cli(*base, "trainer.time_budget=soon", cwd=tmp_path)
    assert bad.returncode == 1 and "Error: trainer.time_budget='soon': expected a positive duration" in bad.stderr
    typo = train_cli(*base, "trainer.time_budgt=2h", cwd=tmp_path)
    assert typo.returncode == 1 and "time_budgt" in typo.stderr and "TrainerSchema" in typo.stderr


def test_the_trainer_never_sees_time_budget(compose_cfg):
    from gpt2lab.lit.trainer import make_trainer

    with execution_whitelist(TRUSTED_TARGETS):
        trainer = make_trainer(compose_cfg("trainer.time_budget=1h30m", "trainer.max_steps=3").trainer)
    assert trainer.max_steps == 3


# -- bad inputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "--only", "tiny,huge"], "Error: preset 'huge': no such preset"),
        (["cp", "huge", "mine"], "Error: preset 'huge': no such preset"),
        (["cp", "small"], "Error: presets cp takes two names"),
        (["cp", "small", "../escape"], "Error: name '../escape': use letters, digits"),
        (["--recommend", "goal=fame", "time_budget_hours=1"], "Error: goal='fame': expected one of learning"),
        (["--recommend", "goal=learning", "time_budget_hours=lots"], "Error: time_budget_hours='lots'"),
        (["ls", "model.num_layer=2"], "Key 'num_layer' not in 'ModelSchema'"),
    ],
)
def test_bad_input_is_one_error_line(args, message, run_main, tmp_path):
    result = run_main("gpt2lab.presets", *args, cwd=tmp_path, env={"GPT2LAB_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_probe_refuses_models_it_cannot_build(compose_cfg):
    cfg = compose_cfg("model=hf", "model.name_or_path=gpt2", tiny=False)
    with pytest.raises(ConfigError, match="trainer.time_budget"):
        model_config(cfg)


@pytest.mark.slow
def test_time_budget_stops_training_cleanly_at_max_time(compose_cfg):
    """A probe that promised far more steps than the budget holds: max_time ends training at the budget plus its
    margin, with the last checkpoint written and results reported."""
    from gpt2lab.train.run import train

    cfg = compose_cfg("trainer.time_budget=2s", "sample=null", "test=false", "trainer.val_check_interval=50")
    path = throughput.cache_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = throughput._read_cache(path)
    cache[probe_key(cfg)] = {"device": "test", "step_s": 1e-5, "eval_batch_s": 1e-6, "method": "seeded"}
    path.write_text(json.dumps(cache))
    train(cfg)
    run = Path(cfg.paths.output_dir)
    written = OmegaConf.load(run / "config.yaml")
    assert written.trainer.max_time == "00:00:00:12" and written.trainer.max_steps > 100_000
    results = json.loads((run / "results.json").read_text())
    assert 0 < results["global_step"] < written.trainer.max_steps  # stopped by the time limit, not the steps
    assert (run / "checkpoints" / "last.ckpt").is_file()
