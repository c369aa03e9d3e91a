"""The one exception type a user should ever see from gpt2lab: a message that names the problem and the fix."""


class ConfigError(ValueError):
    """Bad input: a config value, a file, a checkpoint. The message says which and what was expected."""
