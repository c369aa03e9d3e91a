"""``python -m gpt2lab.evaluate`` / ``gpt2lab evaluate``: score a checkpoint."""

from gpt2lab.evaluate.evaluator import main

if __name__ == "__main__":
    main()
