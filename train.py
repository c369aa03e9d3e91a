"""Train a GPT-2: ``python train.py [preset=small] [key=value ...]``. See README.md and docs/training.md."""

from gpt2lab.train.__main__ import main

if __name__ == "__main__":
    main()
