"""``python -m gpt2lab.chat`` / ``gpt2lab chat``: talk to a checkpoint in the terminal.

python -m gpt2lab.chat ckpt=<.ckpt file | run directory | last | best> [inference.temperature=0.7] [device=cpu]
"""

from omegaconf import DictConfig

from gpt2lab.chat.terminal import converse
from gpt2lab.cli.app import hydra_app
from gpt2lab.config import given_on_command_line
from gpt2lab.inference.chat import chat_session


def run(cfg: DictConfig) -> None:
    """The session ``conf/chat.yaml`` describes, in the terminal until /quit or Ctrl-D."""
    converse(chat_session(cfg, stop_given=given_on_command_line("inference.stop")))


main = hydra_app("chat", run)

if __name__ == "__main__":
    main()
