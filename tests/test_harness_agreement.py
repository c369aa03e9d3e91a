"""``lm_eval --model gpt2lab`` against lm-eval's own runner, offline (issue 28).

The same checkpoint scored by ``GPT2LabLM`` and by lm-eval's ``--model hf`` on its Hugging Face export, through
``simple_evaluate`` on task YAML files and jsonl data written here: a rolling log-likelihood task (wikitext's metrics),
a multiple-choice task in HellaSwag's form and a short generation task. And every model kind gpt2lab trains
(``model=hf``, ``model=module``) scores and generates through ``GPT2LabLM`` as its own logits say.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, export_all, train_in_process
from hydra.utils import execution_whitelist
from torch import nn

from gpt2lab.harness.local_tasks import MULTIPLE_CHOICE, ROLLING, generation, write_task

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = ("agree_rolling", "agree_choice", "agree_gen")


def write_tasks(directory: Path, corpus: str) -> Path:
    """Three lm-eval tasks over jsonl data, as a user's ``--include_path`` holds them."""
    paragraphs = [p.strip() for p in corpus.split("\n\n") if len(p.strip()) > 80]
    rolling = [p[:n] for p, n in zip(paragraphs[:6], (40, 90, 150, 260, 60, 400), strict=True)]  # 1 to ~8 windows
    words = [w for w in corpus.split() if w.isalpha() and len(w) < 9]  # endings of a few tokens each
    choice = []
    for i in range(8):  # HellaSwag's form: a context and four endings, the right one the text's own continuation
        start, label = 50 + 37 * i, i % 4
        ctx = " ".join(words[start : start + 5 + label])
        endings = [" " + " ".join(words[start + 5 + label + 13 * k : start + 7 + label + 13 * k]) for k in range(4)]
        choice.append({"ctx": ctx, "endings": endings[-label:] + endings[:-label], "label": label})
    prompts = [p[: 20 + 7 * i] for i, p in enumerate(paragraphs[6:14])]  # different lengths: padded batches
    write_task(directory, "agree_rolling", ({"text": t} for t in rolling), ROLLING)
    write_task(directory, "agree_choice", choice, MULTIPLE_CHOICE)
    write_task(directory, "agree_gen", ({"prompt": p, "answer": "x"} for p in prompts), generation(["\n"], 8))
    return directory


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory, corpus_file):
    from lm_eval.tasks import TaskManager

    directory = write_tasks(tmp_path_factory.mktemp("tasks"), corpus_file.read_text())
    return TaskManager(include_path=str(directory), include_defaults=False)


@pytest.fixture(scope="module")
def varied_run(trained_run, tmp_path_factory) -> Path:
    """The tiny trained run with noise added to its blocks' weights. The trained model greedily continues every
    prompt with spaces, so identical generations would prove little; this one writes varied text."""
    run = tmp_path_factory.mktemp("varied") / "run"
    shutil.copytree(trained_run, run)
    for path in (run / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        noise = torch.Generator().manual_seed(0)
        checkpoint["state_dict"] = {
            name: value + 0.4 * torch.randn(value.shape, generator=noise) if name.startswith("model.blocks.") else value
            for name, value in checkpoint["state_dict"].items()
        }
        torch.save(checkpoint, path)
    return run


@pytest.fixture(scope="module")
def hf_export(varied_run, tmp_path_factory) -> Path:
    """The run exported as ``python -m gpt2lab.export format=hf`` writes it."""
    return export_all(varied_run, tmp_path_factory.mktemp("export"), "format=hf")


def evaluate(model: str, model_args: str, task_manager, batch_size: int) -> dict:
    from lm_eval.evaluator import simple_evaluate

    import gpt2lab.harness.lm  # noqa: F401  (registers --model gpt2lab)

    return simple_evaluate(
        model=model, model_args=model_args, tasks=list(TASKS), task_manager=task_manager, device="cpu",
        batch_size=batch_size, log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def both(varied_run, hf_export, task_manager) -> dict[str, dict]:
    # gpt2lab batches 4 requests of different lengths (right-padded for scoring, left-padded for generation); the hf
    # side runs one request at a time, so its numbers carry no padding at all and are the reference for the batches.
    return {
        "gpt2lab": evaluate("gpt2lab", f"ckpt={varied_run}", task_manager, batch_size=4),
        "hf": evaluate("hf", f"pretrained={hf_export},dtype=float32", task_manager, batch_size=1),
    }


def test_gpt2_weights_given_as_init_from_score_as_their_checkpoint(both, hf_export, task_manager):
    """``--model_args init_from=<Hugging Face directory | gpt2>``: GPT-2 weights in gpt2lab's model, as training with
    model.init_from starts from them. The export's weights are the checkpoint's, so every figure is the same."""
    from gpt2lab.harness.tasks import flat_metrics

    via_init_from = evaluate("gpt2lab", f"init_from={hf_export}", task_manager, batch_size=4)
    assert flat_metrics(via_init_from) == flat_metrics(both["gpt2lab"])
    assert [s["filtered_resps"] for s in samples(via_init_from, "agree_gen")] == [
        s["filtered_resps"] for s in samples(both["gpt2lab"], "agree_gen")
    ]


def samples(results: dict, task: str) -> list[dict]:
    """lm-eval's logged samples of ``task``, in the order of its documents."""
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_rolling_log_likelihood_agrees(both):
    ours, theirs = (both[m]["results"]["agree_rolling"] for m in ("gpt2lab", "hf"))
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=1e-4), metric
    ours, theirs = (samples(both[m], "agree_rolling") for m in ("gpt2lab", "hf"))
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs, strict=True):  # each text's log-likelihood, over one to several windows
        assert a["resps"][0][0] == pytest.approx(b["resps"][0][0], rel=1e-4)


def test_multiple_choice_agrees_score_by_score(both):
    ours, theirs = (both[m]["results"]["agree_choice"] for m in ("gpt2lab", "hf"))
    assert (ours["acc,none"], ours["acc_norm,none"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    ours, theirs = (samples(both[m], "agree_choice") for m in ("gpt2lab", "hf"))
    assert len(ours) == len(theirs) == 8
    picked = []
    for a, b in zip(ours, theirs, strict=True):
        scores = [r[0] for r in a["filtered_resps"]]
        assert len(scores) == 4
        # Each ending's log-likelihood, not only the accuracy, so that a drift in the scores fails here
        assert scores == pytest.approx([r[0] for r in b["filtered_resps"]], rel=1e-4)
        assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]  # greedy or not
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
        picked.append(scores.index(max(scores)))
    assert len(set(picked)) > 1  # the model does not pick the same ending everywhere


def test_greedy_generations_are_identical(both):
    ours, theirs = ([s["filtered_resps"][0] for s in samples(both[m], "agree_gen")] for m in ("gpt2lab", "hf"))
    assert ours == theirs
    # Something that could differ: several different continuations, not all blank (the noise in the weights)
    assert len(set(ours)) >= 3 and sum(bool(text.strip()) for text in ours) >= 3
    assert not any("\n" in text for text in ours)  # cut at the stop string


# -- every model kind gpt2lab trains, through GPT2LabLM ----------------------------------------------------------
class PositionalBag(nn.Module):
    """A model=module of one's own: each position sees the mean of the embeddings up to it and its position."""

    def __init__(self, vocab_size: int, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(64, dim)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        seen = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return self.out(x.cumsum(1) / seen + self.positions(position_ids))


def llama_overrides(directory: Path) -> list[str]:
    import transformers

    # initializer_range: weights large enough that its logits are far from uniform, and its greedy tokens vary
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=64,
                                      initializer_range=0.5)  # fmt: skip
    config.save_pretrained(directory)
    return ["model=hf", f"model.name_or_path={directory}", "model.pretrained=false"]


# A bag of embeddings has no hidden matrices for Muon: AdamW trains it
MODULE = ["model=module", "model.module._target_=test_harness_agreement.PositionalBag",
          "+model.module.vocab_size=${model.vocab_size}", "optimizer=adamw"]  # fmt: skip


@pytest.fixture(scope="module", params=["hf", "module"])
def other_kind(request, tmp_path_factory, corpus_file, cache_dir):
    """A run of ``model=hf`` (a tiny Llama from its config) or ``model=module``, trained for a few steps, and the
    raw logits of its model for ids of shape (B, T)."""
    from gpt2lab.checkpoint import load_checkpoint
    from gpt2lab.harness.lm import GPT2LabLM

    root = tmp_path_factory.mktemp(f"model_{request.param}")
    model = llama_overrides(root / "llama") if request.param == "hf" else MODULE
    run_settings = [o for o in TINY if not o.startswith(("model.", "tokenizer"))]
    with execution_whitelist("test_harness_agreement.*"):
        run = train_in_process(root / "run", [
            *run_settings, "tokenizer=bpe", "tokenizer.vocab_size=320", f"data.path={corpus_file}",
            f"paths.cache_dir={cache_dir}", *model, "model.context_length=32", "trainer.max_steps=4",
            "trainer.val_check_interval=4", "sample=null", "test=false",
        ])  # fmt: skip
        # 4 requests per forward pass: the scoring test's 7 requests of different lengths make two padded batches
        lm = GPT2LabLM(ckpt=str(run), device="cpu", batch_size=4)
        module = load_checkpoint(run / "checkpoints" / "last.ckpt")[0].module.eval()  # its own copy, not the lm's
    if request.param == "hf":
        return request.param, lm, lambda ids: module(input_ids=ids).logits
    return request.param, lm, lambda ids: module(ids, torch.arange(ids.shape[1]).expand_as(ids))


def test_other_model_kinds_score_as_their_logits_say(other_kind, corpus_file):
    from lm_eval.api.instance import Instance

    kind, lm, logits_of = other_kind
    words = [w for w in corpus_file.read_text().split() if w.isalpha()]
    pairs = [(" ".join(words[i : i + n]), " " + " ".join(words[i + n : i + n + k]))
             for i, n, k in ((0, 3, 1), (40, 8, 2), (90, 1, 3), (130, 30, 2), (200, 12, 1), (260, 5, 4), (300, 2, 2))]  # fmt: skip
    requests = [Instance("loglikelihood", {}, pair, idx=0) for pair in pairs]
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    tokenizer = lm.tokenizer_
    assert len(answers) == len(pairs)
    with torch.no_grad():
        for (context, continuation), (logprob, greedy) in zip(pairs, answers, strict=True):
            context_ids = tokenizer.encode(context).ids
            continuation_ids = tokenizer.encode(context + continuation).ids[len(context_ids) :]
            ids = (context_ids + continuation_ids)[-33:-1]  # the context length, cut from the left
            logprobs = F.log_softmax(logits_of(torch.tensor([ids]))[0, -len(continuation_ids) :].float(), dim=-1)
            target = torch.tensor(continuation_ids)
            expected = float(logprobs.gather(1, target[:, None]).sum())
            assert logprob == pytest.approx(expected, rel=1e-4, abs=1e-4), (kind, context, continuation)
            assert greedy == bool((logprobs.argmax(-1) == target).all())
    assert max(len(tokenizer.encode(c).ids) for c, _ in pairs) > 32  # one context is cut from the left


def test_other_model_kinds_generate_greedily(other_kind):
    from lm_eval.api.instance import Instance

    kind, lm, logits_of = other_kind
    prompts = ["import os\n", "def ", "class Quitter(object):\n    def", "# The"]
    settings = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    texts = lm.generate_until([Instance("generate_until", {}, (p, dict(settings)), idx=0) for p in prompts], True)
    with torch.no_grad():
        for prompt, text in zip(prompts, texts, strict=True):
            ids, new = lm.tokenizer_.encode(prompt).ids, []
            for _ in range(6):  # greedy, one whole forward per token, stopping at end-of-text
                token = int(logits_of(torch.tensor([ids + new]))[0, -1].argmax())
                if token == lm.eot_token_id:
                    break
                new.append(token)
            assert text == lm.tokenizer_.decode(new).split("\n")[0], (kind, prompt)
    assert len(set(texts)) > 1 and all(text.strip() for text in texts)  # tokens of its own, not one blank line
