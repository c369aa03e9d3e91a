"""``gpt2lab <verb> [overrides]``: one console script for every entry point (``gpt2lab train``, ``gpt2lab
evaluate``, ...), each the command in ``gpt2lab/<verb>/__main__.py``: a Hydra app on its own ``conf/<verb>.yaml``
(``cli/app.py``), or argparse for ``runs``, ``presets`` and ``wizard``; ``lm-eval`` is lm-evaluation-harness's own
command line with gpt2lab's models registered."""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "train": "train a model (python train.py)",
    "evaluate": "loss, perplexity and bits per byte of a checkpoint (python -m gpt2lab.evaluate)",
    "generate": "continue text with a checkpoint (python -m gpt2lab.generate)",
    "chat": "talk to a checkpoint in the terminal (python -m gpt2lab.chat)",
    "serve": "a checkpoint behind OpenAI's HTTP API, on LitServe (python -m gpt2lab.serve)",
    "export": "a checkpoint as Hugging Face, ONNX and TorchScript directories (python -m gpt2lab.export)",
    "check": "a model's check-up before training: shapes, gradients, causality, ... (python -m gpt2lab.check)",
    "runs": "a table of the runs under a directory, with curves (python -m gpt2lab.runs)",
    "presets": "the recipes in conf/preset/ with estimated times here; cp, --recommend (python -m gpt2lab.presets)",
    "wizard": "a recipe of your own, asked step by step, as conf/experiment/<name>.yaml (python -m gpt2lab.wizard)",
    "lm-eval": "lm-evaluation-harness's command line with --model gpt2lab (python -m gpt2lab.harness)",
}
MODULES = {"lm-eval": "harness"}  # a verb whose package has another name


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VERBS:
        listed = "\n".join(f"  {verb:10s} {what}" for verb, what in VERBS.items())
        given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        print(f"usage: gpt2lab <command> [key=value ...] [--help]\n{given}commands:\n{listed}", file=sys.stderr)
        raise SystemExit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    module = importlib.import_module(f"gpt2lab.{MODULES.get(sys.argv[1], sys.argv[1])}.__main__")
    # The module's own file as the program: Lightning's DDP launcher re-runs sys.argv[0] for the other ranks.
    sys.argv = [module.__file__, *sys.argv[2:]]
    module.main()


if __name__ == "__main__":
    main()
