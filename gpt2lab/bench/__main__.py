"""``python -m gpt2lab.bench``: speed measurements. ``[overrides] [options]``: the training step
(``bench.training``); ``decode ...``: decoding beside transformers (``bench.decode``); ``loss ...``: the output
layer and its loss, plain, gpt2lab's Triton kernel and liger-kernel's, side by side (``bench.loss``);
``data ...``: preparing a synthetic corpus of a few GB, its memory and disk (``bench.data``);
``export ...``: exported graphs beside PyTorch eager on the CPU (``bench.export``); ``harness ...``: lm-eval's
``--model gpt2lab`` beside ``--model hf`` (``bench.harness``); ``serve ...``: gpt2lab's OpenAI-compatible server
under HTTP load at 1, 8 and 32 clients (``bench.serve``). Each one measures only while other processes leave the
CPU cores free (``bench.machine``: ``--busy-ok`` measures anyway, ``--busy-wait SECONDS``) and prints the load. ``python -m gpt2lab.bench.reference_loop`` is gpt2lab's
model in the reference script's own loop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2lab.bench import decode, export, loss, machine, training


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["decode"]:
        return decode.main(argv[1:])
    if argv[:1] == ["export"]:
        return export.main(argv[1:])
    if argv[:1] == ["data"]:
        from gpt2lab.bench import data  # imports datasets and the data module, which the GPU benches need not

        return data.main(argv[1:])
    if argv[:1] == ["loss"]:
        return loss.main(argv[1:])
    if argv[:1] == ["harness"]:
        from gpt2lab.bench import harness  # needs lm-eval (pip install 'gpt2lab[eval]')

        return harness.main(argv[1:])
    if argv[:1] == ["serve"]:
        from gpt2lab.bench import serve  # needs httpx2 (the openai client's HTTP library)

        return serve.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m gpt2lab.bench",
        description="Training-step throughput (and memory) of a gpt2lab config, through the real training path.",
        epilog="python -m gpt2lab.bench data|decode|export|harness|loss|serve --help: the other benchmarks",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py (default: preset=small)")
    parser.add_argument("-b", "--micro-batch", type=int, nargs="+", help="micro-batch sizes (default: data.batch_size)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--reference", type=Path, help="the plain-PyTorch baseline script (reference_step.py)")
    parser.add_argument(
        "--reference-variants",
        nargs="+",
        default=["nano_compile"],
        metavar="VARIANT",
        help="the reference script's variants (nano, nano_compile, hf, hf_compile), the first one the baseline of "
        f"the ratio; {training.REFERENCE_LOOP_VARIANT}: gpt2lab's model in the reference's own loop",
    )
    parser.add_argument("--memory", action="store_true", help="largest micro-batch per model size, +/- checkpointing")
    parser.add_argument("--models", nargs="+", default=training.MEMORY_MODELS, help="model sizes for --memory")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    machine.add_busy_options(parser)
    # Overrides (key=value) may stand anywhere, even right after -b's numbers.
    words = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_intermixed_args([a for a in argv if a not in words])
    args.overrides = words + args.overrides or training.DEFAULT_OVERRIDES
    return training.bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
