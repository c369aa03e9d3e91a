"""``python -m gpt2lab.presets`` / ``gpt2lab presets``: the recipes, timed here."""

from gpt2lab.presets.catalog import main

if __name__ == "__main__":
    main()
