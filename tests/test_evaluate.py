"""``python -m gpt2lab.evaluate``: loss, perplexity and bits per byte of a checkpoint on any split."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint
from gpt2lab.cli import VERBS
from gpt2lab.data.formats import split_batch
from gpt2lab.errors import ConfigError
from gpt2lab.evaluate.evaluator import Evaluator, compressor_bits_per_byte, print_metrics

SHORT_PARAGRAPH = 'def add(a, b):\n    """Return the sum of a and b, two numbers."""\n    return a + b  # the sum'


@pytest.fixture
def evaluate_cli(run_main, cache_dir):
    """``python -m gpt2lab.evaluate ARGS``, run in this process (the console script test starts a real one)."""

    def _evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return run_main("gpt2lab.evaluate", f"paths.cache_dir={cache_dir}", *args, cwd=cwd)

    return _evaluate


def datamodule_for(run: Path, cache_dir: Path):
    from gpt2lab.data import GPT2DataModule
    from gpt2lab.tokenizers import TokenizerSpec

    data = {
        k: v for k, v in OmegaConf.to_container(OmegaConf.load(run / "config.yaml").data).items() if k != "_target_"
    }
    data |= {"cache_dir": str(cache_dir), "tokenizer": TokenizerSpec(kind="file", path=str(run / "tokenizer.json"))}
    datamodule = GPT2DataModule(**data)
    datamodule.setup()
    return datamodule


def test_evaluate_a_run_directory_on_its_own_test_split(evaluate_cli, trained_run, tmp_path):
    result = evaluate_cli(f"ckpt={trained_run}", "trainer.accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_file,) = (tmp_path / "outputs" / "evaluate").glob("*/*/eval.json")
    metrics = json.loads(eval_file.read_text())
    assert Path(metrics["checkpoint"]).name.startswith("step000040")  # the run's best checkpoint
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    # Bits per byte: the bits of the text's tokens spread over its UTF-8 bytes. The end-of-text predictions, one per
    # document and of 0 bytes, count in the loss, not in bits per byte (by hand: test_bits_per_byte_leave_out_...)
    assert metrics["special_tokens"] == metrics["data"]["test"]["documents"] > 1
    assert metrics["bits_per_byte"] < metrics["loss"] * metrics["tokens"] / (metrics["bytes"] * math.log(2))
    assert metrics["tokens"] == metrics["data"]["test"]["tokens"]  # every token of the split
    assert metrics["scored"] == "every token"
    assert set(metrics["compressors"]) == {"gzip -9", "bz2 -9", "xz -9e"}
    assert 0 < metrics["compressors"]["xz -9e"] < metrics["compressors"]["gzip -9"] < 8
    for row in ("model", "gzip -9", "xz -9e"):  # the table's rows, padded to its widest name
        assert re.search(rf"^\| {row} +\| +\d\.\d{{3}} \|$", result.stdout + result.stderr, re.M), row


def test_a_file_named_on_the_command_line_is_scored_whole(evaluate_cli, trained_run, tmp_path):
    from gpt2lab.data.pystdlib import pystdlib_documents

    (tmp_path / "held_out.txt").write_text("\n\n".join(t[:2000].strip() for t in pystdlib_documents()[1][3:60:4]))
    args = [f"ckpt={trained_run}", "data=files", "data.path=held_out.txt", "eval.compressors=false"]
    runs = {}
    for split in ([], ["split=test"]):
        result = evaluate_cli(*args, *split, f"hydra.run.dir=eval{len(runs)}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((tmp_path / f"eval{len(runs)}" / "eval.json").read_text())
        runs[metrics["split"]] = metrics
    whole, test = runs["all"], runs["test"]  # data=files: split=all unless split= is given
    # Every token of the file's documents is scored, none held out.
    assert set(whole["data"]) == {"train"} and whole["tokens"] == whole["data"]["train"]["tokens"]
    assert whole["tokens"] > 10 * test["tokens"] > 0
    # A text of three short paragraphs is enough (its test split would be nothing: one document held out)
    (tmp_path / "short.txt").write_text("\n\n".join([SHORT_PARAGRAPH] * 3))
    result = evaluate_cli(*args[:2], "data.path=short.txt", *args[3:], "hydra.run.dir=short", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "short" / "eval.json").read_text())["tokens"] > 0


def test_bytes_are_those_of_the_scored_text(trained_run, cache_dir, capsys):
    model, tokenizer = load_checkpoint(find_checkpoint(str(trained_run), "unused"))
    datamodule = datamodule_for(trained_run, cache_dir)
    loader = datamodule.eval_dataloader("validation")
    metrics = Evaluator(model, loader, device="cpu", tokenizer=tokenizer).evaluate()
    scored = datamodule.datasets["validation"].tokens.tolist()  # all of them: the first after an end-of-text
    assert metrics["tokens"] == len(scored)
    assert metrics["bytes"] == len(tokenizer.decode(scored, skip_special_tokens=True).encode("utf-8"))
    capsys.readouterr()
    print_metrics(metrics)  # the Python API's table, as the command prints it
    table = capsys.readouterr().out
    assert f"loss {metrics['loss']:.4f}" in table
    assert re.search(rf"^\| model +\| +{metrics['bits_per_byte']:.3f} \|$", table, re.M), table


def test_bits_per_byte_leave_out_the_end_of_text_predictions(trained_run, cache_dir, capsys):
    """Issue 28: the compressors see the decoded text without its document boundaries, so the model's bits per byte
    leave out its end-of-text predictions (0 bytes each); the loss and perplexity stay over every token."""
    model, tokenizer = load_checkpoint(find_checkpoint(str(trained_run), "unused"))
    datamodule = datamodule_for(trained_run, cache_dir)
    metrics = Evaluator(model, datamodule.eval_dataloader("validation"), device="cpu", tokenizer=tokenizer).evaluate()
    # By hand, from the model's logits: each label's nats, in float64
    eos = tokenizer.token_to_id("<|endoftext|>")
    all_nats = text_nats = 0.0
    tokens, boundaries, text = 0, 0, []
    model.eval()
    with torch.no_grad():
        for batch in datamodule.eval_dataloader("validation"):
            inputs, labels = split_batch(batch)
            logits, _ = model(inputs)
            scored = labels != -100
            log_probs = logits.double().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            nats, ids = -log_probs[scored], labels[scored]
            all_nats += nats.sum().item()
            text_nats += nats[ids != eos].sum().item()
            tokens, boundaries, text = tokens + len(ids), boundaries + int((ids == eos).sum()), text + ids.tolist()
    n_bytes = len(tokenizer.decode(text, skip_special_tokens=True).encode("utf-8"))  # the text the compressors see
    assert boundaries == metrics["special_tokens"] == datamodule.stats["validation"]["documents"] > 1  # several
    assert metrics["tokens"] == tokens and metrics["bytes"] == n_bytes
    assert metrics["loss"] == pytest.approx(all_nats / tokens, rel=1e-5)  # every token, end-of-text included
    assert metrics["bits_per_byte"] == pytest.approx(text_nats / (n_bytes * math.log(2)), rel=1e-5)
    assert text_nats < all_nats - boundaries * 1e-3  # the end-of-text predictions cost something: left out
    capsys.readouterr()
    print_metrics(metrics)
    out = capsys.readouterr().out
    assert (
        f"The model's bits per byte leave out its {boundaries:,} end-of-text predictions (0 bytes each): "
        "the compressors see the same text, without boundaries." in out
    ), out


def test_sliding_window_scores(trained_run, cache_dir):
    model, tokenizer = load_checkpoint(find_checkpoint(str(trained_run), "unused"))
    datamodule = datamodule_for(trained_run, cache_dir)

    def score(stride):
        loader = datamodule.eval_dataloader("validation", stride)
        return Evaluator(model, loader, device="cpu", tokenizer=tokenizer).evaluate()

    blocks, full_stride, overlapping = score(None), score(32), score(8)
    # stride = context is the non-overlapping mode: the same windows, every label scored once
    assert full_stride["loss"] == pytest.approx(blocks["loss"], abs=1e-6)
    assert full_stride["tokens"] == blocks["tokens"] and full_stride["bytes"] == blocks["bytes"]
    # The same tokens and bytes at every stride; with more context per prediction a trained model scores better
    assert overlapping["tokens"] == blocks["tokens"] and overlapping["bytes"] == blocks["bytes"]
    assert overlapping["loss"] < blocks["loss"]
    assert overlapping["bits_per_byte"] < blocks["bits_per_byte"]


def test_every_token_of_a_file_is_scored_once_at_every_stride(evaluate_cli, trained_run, tmp_path):
    """Issue 27 #2: a file's last partial window is scored too, the first token after an end-of-text, and every
    stride scores the same tokens and bytes, so that more context can only help."""
    from gpt2lab.data.pystdlib import pystdlib_documents

    _, tokenizer = load_checkpoint(find_checkpoint(str(trained_run), "unused"))
    paragraphs = [q.strip() for t in pystdlib_documents()[1][5:40:7] for q in t[:700].split("\n\n") if q.strip()]
    (tmp_path / "held_out.txt").write_text("\n\n".join(paragraphs))
    tokens = sum(len(tokenizer.encode(p).ids) + 1 for p in paragraphs)  # each paragraph ends with an end-of-text
    assert tokens % 32 and tokens > 5 * 32  # a last window that is not full
    result = evaluate_cli(
        "-m", f"ckpt={trained_run}", "data=files", "data.path=held_out.txt", "eval.stride=null,32,8,1",
        "eval.compressors=false", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(job) / "eval.json").read_text()) for job in range(4)]
    for metrics in runs:
        assert metrics["tokens"] == tokens and metrics["scored"] == "every token"
        assert metrics["bytes"] == sum(len(p.encode()) for p in paragraphs)  # end-of-text is no byte
        assert metrics["special_tokens"] == len(paragraphs)  # their end-of-text predictions: not in bits per byte
    blocks, full_stride, eight, one = runs
    assert full_stride["loss"] == pytest.approx(blocks["loss"], abs=1e-6)  # stride = context: the same windows
    # With context, strided windows score better than non-overlapping ones. Between strides 8 and 1 the fixture's
    # model, trained for 8 steps, gains nothing it can show (the two differ by 1e-5 either way with its seed).
    assert max(one["bits_per_byte"], eight["bits_per_byte"]) < blocks["bits_per_byte"]


@pytest.mark.parametrize(
    "texts",
    [
        [SHORT_PARAGRAPH] * 6,
        [f"x = {i}" for i in range(6)],  # half of it (a training split) would be shorter than the model's context
        [SHORT_PARAGRAPH] * 2,  # too few documents to hold any out
        ["The sum of two numbers."],
    ],
)
def test_a_short_text_is_scored_whole(evaluate_cli, trained_run, tmp_path, texts):
    """Issue 27 #5: a few paragraphs, or a single sentence, shorter than the model's context: scored, every token."""
    _, tokenizer = load_checkpoint(find_checkpoint(str(trained_run), "unused"))
    (tmp_path / "short.txt").write_text("\n\n".join(texts))
    result = evaluate_cli(f"ckpt={trained_run}", "data=files", "data.path=short.txt", "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert metrics["tokens"] == sum(len(tokenizer.encode(t).ids) + 1 for t in texts)
    assert metrics["bytes"] == sum(len(t.encode()) for t in texts) and metrics["scored"] == "every token"
    assert metrics["special_tokens"] == len(texts)
    assert math.isfinite(metrics["bits_per_byte"]) and metrics["compressors"]


def test_compressors_measure_bits_per_byte():
    text = ("the quick brown fox jumps over the lazy dog " * 200).encode()
    rates = compressor_bits_per_byte(text)
    assert all(0 < rate < 1 for rate in rates.values())  # very repetitive text: far below 8 bits per byte
    assert compressor_bits_per_byte(b"") == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "ckpt=... is required: a .ckpt file, a run directory, or last / best"),
        (["ckpt=last", "paths.log_dir=nowhere"], "ckpt=last: no run under nowhere/ has saved checkpoints"),
        (["ckpt=missing.ckpt"], "ckpt='missing.ckpt': no such file or directory"),
        (["ckpt=RUN", "split=dev"], "split='dev': the data has no such split; it has train, validation, test, or all"),
        (["ckpt=RUN", "eval.stride=0"], r"eval.stride=0: expected 1 to the context length \(32\), or null"),
        (["ckpt=RUN", "eval.stride=33"], r"eval.stride=33: expected 1 to the context length \(32\), or null"),
        (["ckpt=NOTCKPT"], "'.*not.ckpt' is not a checkpoint: not a file written by torch.save"),
        (["ckpt=EMPTYDIR"], "ckpt=.*empty.: the directory has no checkpoints/last.ckpt; is it a run directory?"),
        (["ckpt=RUN", "data=files", "data.path=blank.txt"], "the corpus is empty after filtering"),
        (
            ["ckpt=RUN", "data=files", "data.path=short.txt", "split=test"],
            r"the corpus has 5 documents, and data.val_split \+ data.test_split holds out 1, too few for a validation "
            "and a test document: add text, raise data.val_split and data.test_split, or data.test_split=0",
        ),
    ],
)
def test_bad_input_is_one_error_line(evaluate_cli, trained_run, tmp_path, args, message):
    import re

    (tmp_path / "not.ckpt").write_text("text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("\n\n".join([SHORT_PARAGRAPH] * 5))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    replace = {"RUN": str(trained_run), "NOTCKPT": str(tmp_path / "not.ckpt"), "EMPTYDIR": str(tmp_path / "empty")}
    args = [
        a.replace("=" + a.split("=", 1)[1], "=" + replace.get(a.split("=", 1)[1], a.split("=", 1)[1])) for a in args
    ]
    result = evaluate_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert re.search("Error: " + message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_tokenizer_setting_is_ignored_with_a_word(evaluate_cli, trained_run, tmp_path):
    result = evaluate_cli(f"ckpt={trained_run}", "tokenizer=char", "eval.compressors=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the model is evaluated with the tokenizer it was trained with" in result.stdout + result.stderr


def test_find_checkpoint_last_and_best(trained_run):
    log_dir = trained_run.parent
    assert find_checkpoint("last", log_dir) == trained_run / "checkpoints" / "last.ckpt"
    assert find_checkpoint("best", log_dir).name.startswith("step000040")
    best = find_checkpoint(str(trained_run), log_dir)
    assert find_checkpoint(str(trained_run / "checkpoints"), log_dir) == best  # the run's checkpoints directory
    assert find_checkpoint(str(best), log_dir) == best  # a .ckpt file, as it is
    with pytest.raises(ConfigError, match="no such file or directory"):
        find_checkpoint(str(log_dir / "nope.ckpt"), log_dir)


def test_one_console_script_for_every_verb(run_main, trained_run, tmp_path, cache_dir):
    usage = run_main("gpt2lab.cli", cwd=tmp_path)
    assert usage.returncode == 2 and all(f"\n  {verb:10s} {what}\n" in usage.stderr for verb, what in VERBS.items())
    assert run_main("gpt2lab.cli", "--help", cwd=tmp_path).returncode == 0
    unknown = run_main("gpt2lab.cli", "evaluat", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'evaluat'" in unknown.stderr
    # gpt2lab <verb> --help, each verb's own help: run here, through the console script's main() (a process each
    # would cost seconds of imports apiece; the one below is real).
    configs = {}
    for verb in VERBS:
        shown = run_main("gpt2lab.cli", verb, "--help", cwd=tmp_path)
        assert shown.returncode == 0, (verb, shown.stderr[-3000:])
        if (CONF / f"{verb}.yaml").is_file():  # a Hydra app: its conf/<verb>.yaml, composed, with its own keys
            assert shown.stdout.startswith(f"{verb} is powered by Hydra."), (verb, shown.stdout[:200])
            configs[verb] = shown.stdout.split("== Config ==", 1)[1]
            own = set(OmegaConf.load(CONF / f"{verb}.yaml")) - {"defaults", "hydra"}
            assert own <= set(re.findall(r"^(\w+):", configs[verb], re.MULTILINE)), verb
        else:  # argparse: its usage line and options (lm-eval: lm-evaluation-harness's own command line)
            prog = "lm-eval" if verb == "lm-eval" else rf"(gpt2lab |python -m gpt2lab\.){verb}"
            assert re.match(rf"usage: {prog} \[-h\]", shown.stdout), (verb, shown.stdout)
            assert "\n  -h, --help " in shown.stdout, verb
    assert len(configs) == 7 and len(set(configs.values())) == 7  # train evaluate generate chat serve export check
    # The installed console script, in a real process of gpt2lab evaluate.
    cli = [str(Path(sys.executable).parent / "gpt2lab")]
    result = subprocess.run(
        [*cli, "evaluate", f"ckpt={trained_run}", "split=validation", "eval.compressors=false",
         f"paths.cache_dir={cache_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_file,) = (tmp_path / "outputs" / "evaluate").glob("*/*/eval.json")
    assert json.loads(eval_file.read_text())["split"] == "validation"
    # Lightning's advert, its note on a default and its deprecation warning say nothing about the evaluation.
    for noise in ("💡 Tip", "was configured so 100%", "LeafSpec"):
        assert noise not in result.stdout + result.stderr


@pytest.mark.slow
def test_evaluation_under_ddp_scores_as_one_process(evaluate_cli, trained_run, tmp_path, cache_dir):
    """trainer=ddp: two CPU processes (gloo) each score a share of the windows, and the totals add up."""
    from conftest import cli_env

    args = [f"ckpt={trained_run}", "split=validation", "eval.compressors=false", f"paths.cache_dir={cache_dir}"]
    one = evaluate_cli(*args, "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    two = subprocess.run(
        [sys.executable, "-m", "gpt2lab.evaluate", *args, *ddp, "hydra.run.dir=two"],
        cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, shared = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", "two"))
    # Every token once, each window on one rank only: of an odd number of windows (157 here) Lightning's
    # DistributedSampler would score one twice so that both ranks get as many; here one rank gets a blank window.
    assert shared["tokens"] == single["tokens"] == single["data"]["validation"]["tokens"]
    assert shared["bytes"] == single["bytes"]
    assert shared["loss"] == pytest.approx(single["loss"], rel=0.01)
    assert shared["bits_per_byte"] == pytest.approx(single["bits_per_byte"], rel=0.01)


def test_a_multirun_returns_bits_per_byte_to_the_sweep(evaluate_cli, trained_run, tmp_path):
    result = evaluate_cli(
        "-m", f"ckpt={trained_run}", "split=validation", "eval.stride=null,16", "eval.compressors=false",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):  # optimized_metric (default bits_per_byte) is each job's objective in the sweep summary
        objective = json.loads((tmp_path / "sweep" / job / "job_summary.json").read_text())["objective"]
        assert objective == json.loads((tmp_path / "sweep" / job / "eval.json").read_text())["bits_per_byte"]
    assert (tmp_path / "sweep" / "summary.csv").is_file()
