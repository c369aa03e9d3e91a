"""``python -m gpt2lab.check`` / ``gpt2lab check``: a model's check-up before training.

python -m gpt2lab.check [model=... | ckpt=<checkpoint>] [tier=1|2|3] [device=auto]
"""

from typing import Any

from gpt2lab.checkup.run import check, register_check_schema
from gpt2lab.cli.app import hydra_app

app = hydra_app("check", check, literal_keys=("check.prompt",))


def main() -> Any:
    """Entry point: ``conf/check.yaml`` (its schema is the check-up's own) with the command line's overrides. The
    check-up prints its tables; a failed check ends with an ``Error:`` line that names it."""
    register_check_schema()
    return app()


if __name__ == "__main__":
    main()
