"""``python -m gpt2lab.check``: the command. The check-up itself is ``gpt2lab.checkup``."""
