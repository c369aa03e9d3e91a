"""``python -m gpt2lab.generate`` / ``gpt2lab generate``: continue text with a checkpoint."""

from gpt2lab.inference.generator import main

if __name__ == "__main__":
    main()
