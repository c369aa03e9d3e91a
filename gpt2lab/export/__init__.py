"""``python -m gpt2lab.export``. The exporters live in ``gpt2lab.exporters``; ``export`` stays importable here."""

from gpt2lab.exporters.export import export

__all__ = ["export"]
