"""``gpt2lab lm-eval`` / ``python -m gpt2lab.harness``: lm-evaluation-harness's own command line, with gpt2lab's
models registered as ``--model gpt2lab``. Every lm-eval option works as documented by lm-eval:

    gpt2lab lm-eval --model gpt2lab --model_args ckpt=outputs/train/runs/<run>,device=cpu --tasks hellaswag
    gpt2lab lm-eval ls tasks

lm-eval finds models only in its own registry (it has no plugin entry points), so a plain ``lm_eval --model
gpt2lab`` needs the model imported first; this command is lm-eval's ``lm_eval`` with that import done.
"""

import sys

from gpt2lab.errors import ConfigError, refuse
from gpt2lab.harness.tasks import require_lm_eval


def main() -> None:
    try:
        require_lm_eval()
        import gpt2lab.harness.lm  # noqa: F401 - registers --model gpt2lab
    except ConfigError as e:
        refuse(str(e))
    from lm_eval.__main__ import cli_evaluate

    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        cli_evaluate()
    except ConfigError as e:  # the gpt2lab model's bad --model_args, a checkpoint that cannot be found, ...
        refuse(str(e))


if __name__ == "__main__":
    main()
